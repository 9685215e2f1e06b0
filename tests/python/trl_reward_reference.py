"""What TRL's `GRPOTrainer` would have computed for a run's sampled completions, for
`ppo/tests/grpo.rs`: reads the arguments `tests/python/trl_style_rewards.py` logged (through
`scripts/trl_reward.py`: one call per batch, each iteration's rollout one batch), checks that
they are TRL's (the prompt rows as given, completions as the assistant's message whose text is
`batch_decode(completion_ids, skip_special_tokens=True)`, `log_metric` and `log_extra`), then
calls TRL's `think_format_reward` and the test's functions once on each batch, as the trainer
does, and sums them with the weights as its `nansum` does; it keeps what they logged as the
trainer would: each metric's mean over the calls of an iteration, each completion's extra
columns. Prints {"problems": [...], "expected": [...], "texts": [...], "metrics": [{...} per
iteration], "extra": [{...} per completion], "per_function": [[reward or None per completion] per
function], "advantages": [GRPO's advantage per completion]}."""
import argparse
import asyncio
import json

import sys
import types

from transformers import AutoTokenizer
from trl.rewards import think_format_reward

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import trl_style_rewards  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--log", required=True)
parser.add_argument("--prompts", required=True)
parser.add_argument("--tokenizer", required=True)
parser.add_argument("--weights", required=True, help="comma list: think, digits, async")
parser.add_argument("--steps", type=int, required=True, help="iterations of the run, each a batch")
parser.add_argument("--group", type=int, required=True, help="--num-generations")
args = parser.parse_args()

batches = [json.loads(line) for line in open(args.log)]
if len(batches) != args.steps:
    print(json.dumps({"problems": [f"{len(batches)} calls for {args.steps} iterations"]}))
    sys.exit()
per_step = len(batches[0]["id"])
# The calls' arguments, a completion at a time.
calls = [{**{key: [b[key][j]] for key in ("prompts", "completions", "completion_ids", "answer", "id")},
          "step": b["step"], "other": b["other"]}
         for b in batches for j in range(len(b["id"]))]
if len(calls) != per_step * args.steps:
    print(json.dumps({"problems": [f"batches of {[len(b['id']) for b in batches]} completions"]}))
    sys.exit()
rows = {json.loads(line)["id"]: json.loads(line) for line in open(args.prompts)}
tok = AutoTokenizer.from_pretrained(args.tokenizer)
problems = []
for i, call in enumerate(calls):
    if call["step"] != [i // per_step, args.steps]:
        problems.append(f"call {i}: trainer_state {call['step']}, not [{i // per_step}, {args.steps}]")
    row = rows[call["id"][0]]
    if call["prompts"][0] != row["prompt"]:
        problems.append(f"prompt {call['prompts'][0]} is not the row's {row['prompt']}")
    if call["answer"][0] != row["answer"]:
        problems.append(f"answer {call['answer'][0]} is not the row's {row['answer']}")
    if call["other"]:
        problems.append(f"unexpected arguments {call['other']}")
    completion = call["completions"][0]
    text = tok.batch_decode([call["completion_ids"][0]], skip_special_tokens=True)[0]
    if completion != [{"role": "assistant", "content": text}]:
        problems.append(f"completion {completion} is not the assistant's message of {text!r}")

batch = {key: [c[key][0] for c in calls] for key in ("prompts", "completions", "completion_ids", "answer", "id")}
# One call per batch (iteration), as the trainer makes them.
per_function = [[], [], []]
metrics, extra = [], []
for start in range(0, len(calls), per_step):
    part = {key: values[start:start + per_step] for key, values in batch.items()}
    state = types.SimpleNamespace(global_step=start // per_step, max_steps=args.steps)
    logged, columns = {}, [{} for _ in range(per_step)]

    def log_metric(name, value):
        logged.setdefault(name, []).append(value)

    def log_extra(column, values):
        for c, v in zip(columns, values):
            c[column] = v

    per_function[0] += think_format_reward(completions=part["completions"])
    per_function[1] += trl_style_rewards.digits_and_length(
        **part, trainer_state=state, log_metric=log_metric, log_extra=log_extra)
    per_function[2] += asyncio.run(trl_style_rewards.async_length(**part))
    metrics.append({name: sum(v) / len(v) for name, v in logged.items()})
    extra += columns
weights = [float(w) for w in args.weights.split(",")]
expected = []
for i in range(len(calls)):
    values = [w * r[i] for w, r in zip(weights, per_function) if r[i] is not None]
    expected.append(sum(values) if values else None)
# GRPO's advantages, as the trainer computes them from the summed rewards (every completion
# here has one): each group of --group consecutive completions, (r - mean) / (std + 1e-4),
# the std unbiased (torch's default).
advantages = []
for start in range(0, len(expected), args.group):
    group = expected[start:start + args.group]
    mean = sum(group) / len(group)
    std = (sum((r - mean) ** 2 for r in group) / (len(group) - 1)) ** 0.5
    advantages += [(r - mean) / (std + 1e-4) for r in group]
print(json.dumps({"problems": problems, "expected": expected,
                  "texts": [c["completions"][0][0]["content"] for c in calls],
                  "per_function": per_function, "advantages": advantages,
                  "metrics": metrics, "extra": extra}))
