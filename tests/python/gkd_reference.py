"""TRL 1.16's GKD loss (trl.experimental.gkd.GKDTrainer.generalized_jsd_loss) with
`transformers`, for the `sft train --teacher-model` parity test.

    gkd_reference.py --student DIR --teacher DIR --rows ROWS.json --betas 0,0.5,1
        ROWS.json: [{"ids": [...], "mask": [...]}] (token ids and the loss mask, 1 on the
        completion tokens). For each β: the generalized JSD summed over the vocabulary at
        every completion token (the logits at position i against the token at i + 1, as
        GKDTrainer.compute_loss shifts them), averaged over those tokens; one JSON document
        {"losses": [...]} in the order of --betas.

Each row is run alone (no padding). The divergence is copied from generalized_jsd_loss
(F.kl_div with log targets; the mixture by logsumexp).
"""
import argparse
import json

import torch
import torch.nn.functional as F
import transformers as tf


def generalized_jsd_loss(student_logits, teacher_logits, labels, beta):
    """GKDTrainer.generalized_jsd_loss at temperature 1, reduction "batchmean"."""
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
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
    a = ap.parse_args()
    student = tf.AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32).eval()
    teacher = tf.AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32).eval()
    rows = json.load(open(a.rows))
    betas = [float(b) for b in a.betas.split(",")]
    logits = []
    for row in rows:
        ids = torch.tensor([row["ids"]])
        labels = torch.tensor([[t if m else -100 for t, m in zip(row["ids"], row["mask"])]])
        logits.append((student(input_ids=ids).logits[:, :-1].float(),
                       teacher(input_ids=ids).logits[:, :-1].float(), labels[:, 1:]))
    losses = []
    for beta in betas:
        total, tokens = 0.0, 0
        for s, t, labels in logits:
            jsd, n = generalized_jsd_loss(s, t, labels, beta)
            total += jsd.item()
            tokens += n.item()
        losses.append(total / max(tokens, 1))
    print(json.dumps({"losses": losses}))


if __name__ == "__main__":
    main()
