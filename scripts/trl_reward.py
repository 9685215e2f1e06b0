#!/usr/bin/env python3
"""Runs a reward function written for TRL's `GRPOTrainer` as `ppo train --reward-command`.

    --reward-command "python scripts/trl_reward.py my_rewards.py:correctness"
    --reward-command "python scripts/trl_reward.py trl.rewards:think_format_reward"
    --reward-command "python scripts/trl_reward.py 'trl.rewards:get_soft_overlong_punishment(512, 64)'"

The argument is MODULE:NAME: MODULE a Python file or an importable module, NAME a reward
function in it, or an expression evaluated in it that gives one (a factory's call). Each
JSON line `ppo train` writes is one completion, and every line of a batch (a rank's
rollout, or an evaluation's block) comes before any answer is awaited, so the function is
called once per batch, as `GRPOTrainer` calls it: with `prompts` (each row's prompt as
given: text or messages), `completions` (the text, or `[{"role": "assistant", "content":
…}]` after a conversation; with tools, the assistant's parsed turns and the tool results
between them, as TRL builds them), `completion_ids` (with the EOS that ended it), every other
column of the rows as a keyword, `trainer_state` with `global_step` and `max_steps` (the
run's iterations done and in all), and TRL's `log_metric(name, value)` and
`log_extra(column, values)`. The answers are `{"reward": x}` lines, null where the function
returns None (or NaN): the reward does not apply there; the first line of a batch carries
the values given to `log_metric` (`"metrics"`: each counts once in the iteration's mean of
the metric, logged under its name), and each line its values given to `log_extra`
(`"extra"`: the completion's columns in `samples.jsonl`). Coroutine functions are awaited.
TRL's `environments` is not passed; a function that needs it stops the run with Python's
error.
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
OURS = ("prompt", "response", "raw_prompt", "completion", "completion_ids", "trainer_state", "batch")


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


def batches(lines):
    """The request rows, a batch at a time (a line without "batch" is a batch of one)."""
    batch = []
    for line in lines:
        row = json.loads(line)
        place = row.get("batch", {"index": 0, "size": 1})
        if place["index"] != len(batch):
            sys.exit(f"trl_reward.py: line {place['index']} of a batch came after {len(batch)} lines")
        batch.append(row)
        if len(batch) == place["size"]:
            yield batch
            batch = []
    if batch:
        sys.exit(f"trl_reward.py: the input ended {len(batch)} lines into a batch")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: trl_reward.py MODULE:NAME")
    function = load(sys.argv[1])
    for rows in batches(sys.stdin):
        n = len(rows)
        columns = {key: [row.get(key) for row in rows] for key in rows[0] if key not in OURS}
        if "trainer_state" in rows[0]:
            columns["trainer_state"] = types.SimpleNamespace(**rows[0]["trainer_state"])
        metrics, extra = {}, [{} for _ in rows]

        def log_metric(name, value):
            metrics.setdefault(name, []).append(float(value))

        def log_extra(column, values):
            values = list(values)
            if len(values) != n:
                raise ValueError(f"log_extra('{column}'): {len(values)} values for {n} completions")
            for columns_of, value in zip(extra, values):
                columns_of[column] = value

        rewards = function(
            prompts=[row["raw_prompt"] for row in rows],
            completions=[row["completion"] for row in rows],
            completion_ids=[row["completion_ids"] for row in rows],
            log_metric=log_metric,
            log_extra=log_extra,
            **columns,
        )
        if inspect.isawaitable(rewards):
            rewards = asyncio.run(rewards)
        if len(rewards) != n:
            sys.exit(f"trl_reward.py: {sys.argv[1]} gave {len(rewards)} rewards for {n} completions")
        for i, reward in enumerate(rewards):
            if reward is not None:
                reward = float(reward)
                if math.isnan(reward):
                    reward = None
            answer = {"reward": reward}
            if i == 0 and metrics:
                answer["metrics"] = metrics
            if extra[i]:
                answer["extra"] = extra[i]
            print(json.dumps(answer, default=str), flush=i == n - 1)


if __name__ == "__main__":
    main()
