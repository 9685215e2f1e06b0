#!/usr/bin/env python3
"""Runs a reward function written for TRL's `GRPOTrainer` as `ppo train --reward-command`.

    --reward-command "python scripts/trl_reward.py my_rewards.py:correctness"
    --reward-command "python scripts/trl_reward.py trl.rewards:think_format_reward"
    --reward-command "python scripts/trl_reward.py 'trl.rewards:get_soft_overlong_punishment(512, 64)'"

The argument is MODULE:NAME: MODULE a Python file or an importable module, NAME a reward
function in it, or an expression evaluated in it that gives one (a factory's call). Each
JSON line `ppo train` writes is one completion; the function is called as `GRPOTrainer`
calls it, with lists of one: `prompts` (the row's prompt as given: text or messages),
`completions` (the text, or `[{"role": "assistant", "content": …}]` after a conversation),
`completion_ids` (with the EOS that ended it), every other column of the row as a keyword,
and `trainer_state` with `global_step` and `max_steps` (the run's iterations done and in
all). The answer is `{"reward": x}`, null where the function returns None (or NaN): the
reward does not apply there. Coroutine functions are awaited. TRL's `log_extra`,
`log_metric` and `environments` are not passed; a function that needs one stops the run
with Python's error.
"""
import asyncio
import importlib
import importlib.util
import inspect
import json
import math
import os
import sys
import types

# What `ppo train` adds to the row's columns; the rest go to the function as TRL passes them.
OURS = ("prompt", "response", "raw_prompt", "completion", "completion_ids", "trainer_state")


class Attributes(dict):
    """A module's attributes as a mapping (what `eval` looks its names up in)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def __missing__(self, name):
        try:
            return getattr(self.module, name)
        except AttributeError:
            raise NameError(f"{self.module.__name__} has no '{name}'") from None


def load(spec):
    module_name, sep, expr = spec.rpartition(":")
    if not sep or not module_name or not expr:
        sys.exit(f"trl_reward.py: '{spec}' is not MODULE:NAME")
    if module_name.endswith(".py") or os.sep in module_name:
        path = os.path.abspath(module_name)
        name = os.path.splitext(os.path.basename(path))[0]
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None:
            sys.exit(f"trl_reward.py: cannot read {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.path.insert(0, os.path.dirname(path))
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    # Names resolve in the module as attributes, so lazy modules (`trl.rewards`) work too.
    names = Attributes(module)
    function = names[expr] if expr.isidentifier() else eval(expr, {}, names)
    if not callable(function):
        sys.exit(f"trl_reward.py: '{expr}' in {module_name} is not a function")
    return function


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: trl_reward.py MODULE:NAME")
    function = load(sys.argv[1])
    for line in sys.stdin:
        row = json.loads(line)
        columns = {key: [value] for key, value in row.items() if key not in OURS}
        if "trainer_state" in row:
            columns["trainer_state"] = types.SimpleNamespace(**row["trainer_state"])
        rewards = function(
            prompts=[row["raw_prompt"]],
            completions=[row["completion"]],
            completion_ids=[row["completion_ids"]],
            **columns,
        )
        if inspect.isawaitable(rewards):
            rewards = asyncio.run(rewards)
        if len(rewards) != 1:
            sys.exit(f"trl_reward.py: {sys.argv[1]} gave {len(rewards)} rewards for one completion")
        reward = rewards[0]
        if reward is not None:
            reward = float(reward)
            if math.isnan(reward):
                reward = None
        print(json.dumps({"reward": reward}), flush=True)


if __name__ == "__main__":
    main()
