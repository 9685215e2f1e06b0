"""Hugging Face `generate` on the workload of our generation rows (issue 20): what TRL's
trainers call for their rollouts (`unwrapped_model.generate`, the default dynamic cache).

    python3 bench/hf_generate.py MODEL_DIR --batch 64 --batch 256 [--response 128]

Prompts of 64 random tokens, `--response` new tokens sampled at temperature 1 (every row
runs to the end), bf16 on CUDA; the median of 3 timed calls after one warm-up. One JSON
line per batch size, with the same fields as our rows.
"""
import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

PROMPT = 64


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, action="append", required=True)
    ap.add_argument("--response", type=int, default=128)
    ap.add_argument("--name", default="")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    kind = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=kind).to(dev).eval()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for batch in args.batch:
        torch.manual_seed(0)
        ids = torch.randint(1, 95, (batch, PROMPT), device=dev)
        mask = torch.ones_like(ids)
        times = []
        for i in range(4):
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                     temperature=1.0, top_k=0, top_p=1.0,
                                     max_new_tokens=args.response,
                                     min_new_tokens=args.response, pad_token_id=0)
            sync()
            if i > 0:
                times.append(time.perf_counter() - start)
            assert out.shape[1] == PROMPT + args.response
        seconds = statistics.median(times)
        print(json.dumps({"stage": "generate", "model": args.name or args.model,
                          "decode": "transformers generate", "batch": batch,
                          "tokens_per_second": batch * args.response / seconds,
                          "ms_per_step": 1e3 * seconds / args.response}), flush=True)


if __name__ == "__main__":
    main()
