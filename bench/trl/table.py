#!/usr/bin/env python3
"""Our/TRL ratios from the JSON lines of `make bench` and bench/trl/compare.py."""

import json
import platform
import sys
from datetime import date


def rows(path):
    return [json.loads(line) for line in open(path) if line.startswith("{")]


ours = {(r["stage"], r["model"]): r for r in rows(sys.argv[1])}
trl = rows(sys.argv[2])
if trl[0]["device"] == "cuda":
    import torch

    where = f"{torch.cuda.get_device_name()}, bf16 (ours: bf16 weights, f32 master; TRL: f32 weights, bf16 autocast)"
else:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.machine())
    where = f"{cpu}, torch threads {trl[0]['torch_threads']}, f32"
print(f"\n{date.today()}, {where}\n")
print("| stage | model | ours | TRL | TRL version | ours / TRL |")
print("|---|---|---|---|---|---|")
for t in trl:
    # Our RLOO and GRPO (issue 16) against TRL's; older runs of ours had only PPO for RLOO.
    o = ours.get((t["stage"], t["model"])) or ours[("ppo", t["model"])]
    # Rows of varied length (padded or packed) compare real tokens per second.
    key = next(k for k in ("iterations_per_second", "steps_per_second", "tokens_per_second") if k in t)
    unit = {"iterations_per_second": "it/s", "steps_per_second": "steps/s", "tokens_per_second": "tokens/s"}[key]
    name = {"sft": "SFT", "sft-varied": "SFT, varied lengths, padded", "sft-packed": "SFT, varied lengths, packed",
            "reward": "reward", "dpo": "DPO", "ppo": "PPO", "rloo": "RLOO", "grpo": "GRPO"}[t["stage"]]
    print(f"| {name} | {t['model']} | {o[key]:.2f} {unit} | {t[key]:.2f} {unit} | {t['trl']} | {o[key] / t[key]:.2f}× |")
    print(json.dumps({"stage": t["stage"], "model": t["model"], "ours": o[key], "trl": t[key],
                      "ratio": o[key] / t[key]}), file=sys.stderr)
