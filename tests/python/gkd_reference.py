"""TRL 1.16's GKD loss (trl.experimental.gkd.GKDTrainer.generalized_jsd_loss) with
`transformers`, for the `sft train --teacher-model` parity test.

    gkd_reference.py --student DIR --teacher DIR --rows ROWS.json --betas 0,0.5,1,0.5@0.7
        ROWS.json: [{"ids": [...], "mask": [...]}] (token ids and the loss mask, 1 on the
        completion tokens). For each β: the generalized JSD summed over the vocabulary at
        every completion token (the logits at position i against the token at i + 1, as
        GKDTrainer.compute_loss shifts them), averaged over those tokens; one JSON document
        {"losses": [...]} in the order of --betas. β@T: both distributions at temperature T
        (TRL's DistillationTrainer applies its `temperature` to the divergence).

    Also, under "sft", TRL's SFTTrainer metrics of the student alone over the same
    completion tokens: `entropy` (of the next-token distribution),
    `mean_token_accuracy` (the token is the argmax) and `nll` (the SFT loss), means over
    every row's tokens.

    gkd_reference.py ... --iw-opd 0.5:1.0,2:0.9
        also, for each γ:temperature, TRL's own IWOPDTrainer._compute_iw_opd_loss (the
        sampled-token IW-OPD loss, the row's tokens its samples) summed over every row's
        completion tokens and divided by their number, with the iw_opd/* metrics it logs
        (each row's means weighted by its tokens; the extremes over the rows):
        {"losses": [...], "iw_opd": [{"loss": x, "iw_opd/mean_weight": x, ...}, ...]}.

Each row is run alone (no padding). The divergence is copied from generalized_jsd_loss
(F.kl_div with log targets; the mixture by logsumexp).
"""
import os
from collections import defaultdict
from types import SimpleNamespace

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import argparse
import json

import torch
import torch.nn.functional as F
import transformers as tf


def generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature=1.0):
    """GKDTrainer.generalized_jsd_loss at `temperature` (both logits divided by it, as
    DistillationTrainer's divergence does), reduction "batchmean"."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-beta), teacher_log_probs + torch.log(beta)]),
            dim=0,
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    mask = labels != -100
    return jsd[mask].sum(), mask.sum()


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--student")
    ap.add_argument("--teacher")
    ap.add_argument("--rows")
    ap.add_argument("--betas", default="0.5")
    ap.add_argument("--iw-opd", default="")
    a = ap.parse_args()
    student = tf.AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32).eval()
    teacher = tf.AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32).eval()
    rows = json.load(open(a.rows))
    # β, or β@temperature.
    betas = [tuple(float(x) for x in (b.split("@") + ["1"])[:2]) for b in a.betas.split(",")]
    logits = []
    for row in rows:
        ids = torch.tensor([row["ids"]])
        labels = torch.tensor([[t if m else -100 for t, m in zip(row["ids"], row["mask"])]])
        logits.append((student(input_ids=ids).logits[:, :-1].float(),
                       teacher(input_ids=ids).logits[:, :-1].float(), labels[:, 1:]))
    losses = []
    for beta, temperature in betas:
        total, tokens = 0.0, 0
        for s, t, labels in logits:
            jsd, n = generalized_jsd_loss(s, t, labels, beta, temperature)
            total += jsd.item()
            tokens += n.item()
        losses.append(total / max(tokens, 1))
    entropy, top1, nll, tokens = 0.0, 0.0, 0.0, 0
    for s, _, labels in logits:
        mask = labels != -100
        logp = F.log_softmax(s, dim=-1)
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll += -picked[mask].sum().item()
        entropy += (-(logp.exp() * logp).sum(-1))[mask].sum().item()
        top1 += (s.argmax(-1) == labels)[mask].sum().item()
        tokens += mask.sum().item()
    out = {
        "losses": losses,
        "sft": {
            "entropy": entropy / max(tokens, 1),
            "mean_token_accuracy": top1 / max(tokens, 1),
            "nll": nll / max(tokens, 1),
        },
    }
    if a.iw_opd:
        out["iw_opd"] = [iw_opd_loss(student, teacher, rows, c) for c in a.iw_opd.split(",")]
    print(json.dumps(out))


def iw_opd_loss(student, teacher, rows, config):
    """TRL's IWOPDTrainer._compute_iw_opd_loss over every row, at γ:temperature."""
    from trl.experimental.iw_opd import IWOPDTrainer

    gamma, temperature = (float(x) for x in config.split(":"))
    trainer = SimpleNamespace(
        temperature=temperature,
        iw_opd_gamma=gamma,
        iw_opd_epsilon=1e-8,
        model=SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    total, tokens = 0.0, 0
    sums = defaultdict(float)
    for row in rows:
        ids = torch.tensor([row["ids"]])
        labels = torch.tensor([[t if m else -100 for t, m in zip(row["ids"], row["mask"])]])[:, 1:]
        completion = ids[:, 1:]
        teacher_lp = F.log_softmax(teacher(input_ids=ids).logits[:, :-1].float() / temperature, dim=-1)
        teacher_lp = teacher_lp.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        loss_sum = IWOPDTrainer._compute_iw_opd_loss(
            trainer,
            student_logits=student(input_ids=ids).logits[:, :-1].float(),
            completion_tokens=completion,
            labels=labels,
            teacher_actual_logprobs=teacher_lp,
            num_items_in_batch=1,
        )
        total += loss_sum.item()
        n = int((labels != -100).sum())
        tokens += n
        logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        for k in ("mean_advantage", "mean_abs_advantage", "mean_weight"):
            sums[k] += logged[f"iw_opd/{k}"] * n
        sums["min_weight"] = min(sums.get("min_weight", float("inf")), logged["iw_opd/min_weight"])
        sums["max_weight"] = max(sums.get("max_weight", float("-inf")), logged["iw_opd/max_weight"])
    out = {"loss": total / max(tokens, 1)}
    for k in ("mean_advantage", "mean_abs_advantage", "mean_weight"):
        out[f"iw_opd/{k}"] = sums[k] / max(tokens, 1)
    out["iw_opd/min_weight"] = sums["min_weight"]
    out["iw_opd/max_weight"] = sums["max_weight"]
    return out


if __name__ == "__main__":
    main()
