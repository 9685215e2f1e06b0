"""Checks a finished run's outputs with the reference libraries.

    check_run.py --model DIR --ids IDS.json [--tb DIR]
    check_run.py --model DIR --ids IDS.json --score

Prints {"logprobs": [[...]], "tb": {tag: [steps...]}}: next-token log-probs of the rows in
IDS.json (unpadded, one forward each) under AutoModelForCausalLM loaded from DIR, and the
scalar tags and steps TensorBoard's EventAccumulator reads from the event files in --tb.
"""
import argparse
import json
import sys

import torch
import transformers as tf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--tb")
    ap.add_argument("--score", action="store_true",
                    help="score the rows (right-padded, one batch) with AutoModelForSequenceClassification")
    args = ap.parse_args()
    if args.score:
        model = tf.AutoModelForSequenceClassification.from_pretrained(args.model).eval()
        rows = json.load(open(args.ids))
        width = max(map(len, rows))
        pad = model.config.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with torch.no_grad():
            scores = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        json.dump({"scores": scores.tolist(), "pad_token_id": pad}, sys.stdout)
        return
    model = tf.AutoModelForCausalLM.from_pretrained(args.model).eval()
    out = {"logprobs": []}
    with torch.no_grad():
        for row in json.load(open(args.ids)):
            t = torch.tensor([row])
            logp = model(input_ids=t).logits[0, :-1].float().log_softmax(-1)
            out["logprobs"].append(logp.gather(-1, t[0, 1:, None]).squeeze(-1).tolist())
    if args.tb:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        acc = EventAccumulator(args.tb)
        acc.Reload()
        out["tb"] = {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
