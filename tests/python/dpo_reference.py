"""An independent DPO computation with `transformers`, for the `dpo eval` parity test.

    dpo_reference.py perturb --model DIR --out DIR [--seed S --scale X]
        a copy of DIR whose weights have seeded Gaussian noise added (a reference that differs)
    dpo_reference.py compute --policy DIR --ref DIR --data FILE --beta B
                             --configs '[["sigmoid", 0.0, 0.0], ["robust", 0.2, 0.0, "js_divergence"], ...]'
        for each (loss type, label smoothing, RPO α[, f-divergence[, its α[, LD-DPO's α[, loss
        weights[, WPO[, reference-free[, SimPO's γ]]]]]]]]), the loss type a comma list (TRL's
        list-valued loss_type, "sft" its NLL term) summed with the weights: per-pair sequence
        log-probs and losses, and the metrics; one JSON document
        {"configs": [{"pairs": [...], "metrics": {...}}]}. aot and aot_unpaired sort within
        batches of --batch pairs (in file order); simpo and orpo are CPOTrainer's and
        ORPOTrainer's losses (no reference, mean token log-probs).
    dpo_reference.py kto --policy DIR --ref DIR --data FILE --beta B --batch N
                         --loss-type kto|apo_zero_unpaired --desirable-weight W --undesirable-weight W
        TRL 1.16's KTOTrainer written out for evaluation: preference rows unpaired as
        unpair_preference_dataset does (per block of 1000 rows, the chosen completions, then the
        rejected ones; a ranking as its pairs), each completion tokenized alone, the KL
        completions rotated by one within each batch of N, and per batch of N the KL estimate
        max(0, mean(log pi(y'|x) - log pi_ref(y'|x))); one JSON document
        {"completions": [{"index", "response", "label", "logps", "ref_logps", "loss"}], "metrics": {...}}

Tokenization follows TRL 1.16's DPOTrainer (`_prepare_dataset`): text rows get the EOS appended
to chosen and rejected, `prompt` and `prompt + response` are tokenized with the tokenizer's
special tokens; conversational rows go through apply_chat_template (the prompt with the
generation prompt); the completion starts after the common prefix of the tokenized prompt with
both tokenized sequences. A ranking {"responses": [...]} is its pairs (i better than j, i < j).
Each sequence is scored alone (no padding). The losses are copied from `_compute_loss`.
"""
import argparse
import json
import math

import torch
import torch.nn.functional as F
import transformers as tf


def common_prefix_length(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pairs_of(row):
    if "responses" in row:
        r = row["responses"]
        return [(row["prompt"], r[i], r[j]) for i in range(len(r)) for j in range(i + 1, len(r))]
    return [(row["prompt"], row["chosen"], row["rejected"])]


def encode(tok, prompt, response):
    """The prompt's tokens and prompt + response's, as TRL 1.16 tokenizes them."""
    if isinstance(prompt, list):
        def chat(messages, **kw):
            return tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]
        return chat(prompt, add_generation_prompt=True), chat(prompt + response)
    eos = tok.eos_token
    response = response if response.endswith(eos) else response + eos
    return tok(text=prompt)["input_ids"], tok(text=prompt + response)["input_ids"]


def tokenize(tok, prompt, chosen, rejected):
    p, c = encode(tok, prompt, chosen)
    r = encode(tok, prompt, rejected)[1]
    n = min(common_prefix_length(p, c), common_prefix_length(p, r))
    return p[:n], c[n:], r[n:]


@torch.no_grad()
def score(model, prompt_ids, completion_ids):
    ids = torch.tensor([prompt_ids + completion_ids])
    mask = torch.tensor([[0] * len(prompt_ids) + [1] * len(completion_ids)])[:, 1:].float()
    logits = model(input_ids=ids).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    tokens = lp[mask.bool()].tolist()  # the scored completion tokens' log-probs, in order
    # WPO (TRL 1.16, use_weighting): exp of the mean aligned log-prob log p - log sum p^2.
    aligned = ((lp - torch.logsumexp(2 * logp, -1)) * mask).sum() / mask.sum().clamp(min=1.0)
    # TRL 1.16's `entropy` (of the next-token distribution) and `is_top1` (the argmax is the
    # token) at the scored completion tokens, summed.
    entropy = -(logp.exp() * logp).sum(-1)
    top1 = (logits.argmax(-1) == ids[:, 1:]).float()
    return ((lp * mask).sum().item(), (logits.mean(-1) * mask).sum().item(), mask.sum().item(), tokens,
            math.exp(aligned.item()), (entropy * mask).sum().item(), (top1 * mask).sum().item())


def ld_sum(tokens, shared, ld):
    """TRL 1.16's LD-DPO sum: tokens past the pair's shorter completion weigh ld."""
    if ld is None:
        return sum(tokens)
    return sum(tokens[:shared]) + ld * sum(tokens[shared:])


def f_score(fdiv, alpha, rho):
    """TRL 1.16's f-divergence scores of a log-ratio (f-DPO)."""
    if fdiv == "reverse_kl" or (fdiv == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return rho
    if fdiv == "forward_kl":
        return 1 - math.exp(-rho)
    if fdiv == "js_divergence":
        return math.log(2) + F.logsigmoid(torch.tensor(rho, dtype=torch.float64)).item()
    if fdiv == "alpha_divergence":
        return (math.exp(min((alpha - 1.0) * rho, 80.0)) - 1.0) / (alpha - 1.0)
    raise ValueError(fdiv)


def loss_of(kind, beta, eps, c, r, rc, rr, nc, nr, fdiv="reverse_kl", alpha=0.5, gamma=0.5):
    # The difference losses compare scores: the log-ratios themselves under reverse KL.
    cs, rs = f_score(fdiv, alpha, c - rc), f_score(fdiv, alpha, r - rr)
    delta = cs - rs
    ls = lambda x: F.logsigmoid(torch.tensor(x, dtype=torch.float64)).item()
    if kind == "sigmoid":
        return -ls(beta * delta)
    if kind == "hinge":
        return max(0.0, 1 - beta * delta)
    if kind == "ipo":
        d = cs / max(nc, 1) - rs / max(nr, 1)
        return (d - 1 / (2 * beta)) ** 2
    if kind == "robust":
        return (-(1 - eps) * ls(beta * delta) + eps * ls(-beta * delta)) / (1 - 2 * eps)
    sig = lambda x: torch.sigmoid(torch.tensor(x, dtype=torch.float64)).item()
    cr, rr_ = beta * (c - rc), beta * (r - rr)
    if kind == "exo_pair":
        qw, ql = sig(beta * delta), sig(-beta * delta)
        return qw * (ls(beta * delta) - math.log1p(-eps)) + ql * (ls(-beta * delta) - math.log(eps))
    if kind == "nca_pair":
        return -ls(cr) - 0.5 * ls(-cr) - 0.5 * ls(-rr_)
    if kind == "bco_pair":
        return -ls(cr) - ls(-rr_)
    if kind == "sppo_hard":
        return ((c - rc) - 0.5 / beta) ** 2 + ((r - rr) + 0.5 / beta) ** 2
    if kind == "apo_zero":
        return 1 - sig(cr) + sig(rr_)
    if kind == "apo_down":
        return sig(cr) + 1 - sig(beta * delta)
    if kind == "discopop":
        x = beta * delta
        m = sig(x / DISCOPOP_TAU)
        return -ls(x) * (1 - m) + math.exp(-x) * m
    if kind == "sigmoid_norm":
        d = cs / max(nc, 1) - rs / max(nr, 1)
        return -ls(beta * d)
    if kind == "simpo":
        # CPOTrainer.cpo_loss (loss_type="simpo"), on mean token log-probs, no reference.
        x = delta - gamma / beta
        return -ls(beta * x) * (1 - eps) - ls(-beta * x) * eps
    if kind == "orpo":
        # ORPOTrainer.odds_ratio_loss; its NLL is added as RPO's term.
        return -beta * ls(log_odds(c, r))
    raise ValueError(kind)


def log1mexp(x):
    """ORPO's log(1 - exp(x)), branching at -ln 2."""
    return math.log1p(-math.exp(x)) if x < -math.log(2) else math.log(-math.expm1(x))


def log_odds(c, r):
    """ORPO's log odds ratio of two mean token log-probs."""
    return (c - r) - (log1mexp(c) - log1mexp(r))


def sorted_losses(kind, beta, eps, out, batch):
    """TRL 1.16's aot and aot_unpaired: each batch of `batch` pairs (a device's batch, in
    order) sorted, then the conservative logistic loss of the sorted differences."""
    losses = []
    for i in range(0, len(out), batch):
        chunk = out[i:i + batch]
        col = lambda k: torch.tensor([x[k] for x in chunk], dtype=torch.float64)
        c, r, rc, rr = col("logps_chosen"), col("logps_rejected"), col("ref_logps_chosen"), col("ref_logps_rejected")
        if kind == "aot":
            delta = torch.sort(c - r)[0] - torch.sort(rc - rr)[0]
        else:
            delta = torch.sort(c - rc)[0] - torch.sort(r - rr)[0]
        losses += (-F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps).tolist()
    return losses


DISCOPOP_TAU = 0.05  # TRL's DPOConfig.discopop_tau default


def load(a):
    """The tokenizer, the policy, the reference (f32) and the data rows."""
    tok = tf.AutoTokenizer.from_pretrained(a.policy)
    policy = tf.AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32).eval()
    ref = tf.AutoModelForCausalLM.from_pretrained(a.ref, dtype=torch.float32).eval()
    return tok, policy, ref, [json.loads(l) for l in open(a.data) if l.strip()]


def compute(a):
    tok, policy, ref, rows = load(a)
    scored = []
    for row in rows:
        for prompt, chosen, rejected in pairs_of(row):
            p, c, r = tokenize(tok, prompt, chosen, rejected)
            scored.append((p, c, r, score(policy, p, c), score(policy, p, r), score(ref, p, c),
                           score(ref, p, r)))
    configs = [metrics(a.beta, *config[:3], scored, *config[3:], batch=a.batch) for config in json.loads(a.configs)]
    print(json.dumps({"configs": configs}))


def metrics(beta, loss_type, eps, rpo_alpha, scored, fdiv="reverse_kl", alpha=0.5, ld=None, weights=None,
            wpo=False, ref_free=False, gamma=0.5, batch=2):
    kinds = loss_type.split(",")
    weights = weights or [1.0] * len(kinds)
    # TRL's "sft" entry is RPO's NLL term (CPO's cpo_alpha); ORPO's NLL weighs 1.
    rpo_alpha += sum(w for k, w in zip(kinds, weights) if k in ("sft", "orpo"))
    # SimPO and ORPO (CPOTrainer, ORPOTrainer): no reference, mean token log-probs
    # (get_batch_logps(average_log_prob=True): over the scored completion tokens).
    mean = any(k in ("simpo", "orpo") for k in kinds)
    ref_free = ref_free or mean
    out = []
    for p, c, r, (plain_c, gc, tc, xc, wc, ec, kc), (_, gr, tr, xr, wr, er, _), ref_c, ref_r in scored:
        shared = min(len(xc), len(xr))
        lc, lr = ld_sum(xc, shared, ld), ld_sum(xr, shared, ld)
        rc, rr = ld_sum(ref_c[3], shared, ld), ld_sum(ref_r[3], shared, ld)
        if ref_free:
            rc, rr = 0.0, 0.0
        if mean:
            lc, lr = lc / len(xc), lr / len(xr)
        loss = sum(w * loss_of(k, beta, eps, lc, lr, rc, rr, len(c), len(r), fdiv, alpha, gamma)
                   for k, w in zip(kinds, weights) if k not in ("sft", "aot", "aot_unpaired"))
        if wpo:
            loss *= wc * wr
        out.append(dict(ids=[p, c, r], logps_chosen=lc, logps_rejected=lr, ref_logps_chosen=rc,
                        ref_logps_rejected=rr, loss=loss, logit_sums=[gc, gr], tokens=[tc, tr],
                        nll_logps_chosen=plain_c, entropy=ec + er, top1_chosen=kc))
    for k, w in zip(kinds, weights):
        if k in ("aot", "aot_unpaired"):
            for x, l in zip(out, sorted_losses(k, beta, eps, out, batch)):
                x["loss"] += w * l
    n = len(out)
    rc = [beta * (x["logps_chosen"] - x["ref_logps_chosen"]) for x in out]
    rr = [beta * (x["logps_rejected"] - x["ref_logps_rejected"]) for x in out]
    loss = sum(x["loss"] for x in out) / n
    if rpo_alpha > 0:
        # RPO's NLL (TRL's "sft" term) weighs every token alike, with or without LD-DPO.
        loss += rpo_alpha * -sum(x["nll_logps_chosen"] for x in out) / sum(x["tokens"][0] for x in out)
    summary = {
        "loss": loss,
        "rewards/chosen": sum(rc) / n,
        "rewards/rejected": sum(rr) / n,
        "rewards/accuracies": sum(float(x > y) for x, y in zip(rc, rr)) / n,
        "rewards/margins": sum(x - y for x, y in zip(rc, rr)) / n,
        "logps/chosen": sum(x["logps_chosen"] for x in out) / n,
        "logps/rejected": sum(x["logps_rejected"] for x in out) / n,
        "logits/chosen": sum(x["logit_sums"][0] for x in out) / sum(x["tokens"][0] for x in out),
        "logits/rejected": sum(x["logit_sums"][1] for x in out) / sum(x["tokens"][1] for x in out),
        "entropy": sum(x["entropy"] for x in out) / sum(x["tokens"][0] + x["tokens"][1] for x in out),
        "mean_token_accuracy": sum(x["top1_chosen"] for x in out) / sum(x["tokens"][0] for x in out),
    }
    if rpo_alpha > 0:
        summary["nll_loss"] = -sum(x["nll_logps_chosen"] for x in out) / sum(x["tokens"][0] for x in out)
    if "orpo" in kinds:
        odds = [log_odds(x["logps_chosen"], x["logps_rejected"]) for x in out]
        ls = lambda v: F.logsigmoid(torch.tensor(v, dtype=torch.float64)).item()
        summary["log_odds_ratio"] = sum(ls(v) for v in odds) / n
        summary["log_odds_chosen"] = sum(odds) / n
    return {"pairs": out, "metrics": summary}


def tokenize_one(tok, prompt, completion):
    """TRL 1.16's KTO tokenization of one completion (as DPO's, for one response)."""
    p, c = encode(tok, prompt, completion)
    n = common_prefix_length(p, c)
    return p[:n], c[n:]


def unpaired_rows(rows):
    """(row, place, prompt, completion, label) in TRL's order."""
    out = []
    for b in range(0, len(rows), 1000):
        first, second = [], []
        for i, row in enumerate(rows[b:b + 1000], start=b):
            if "label" in row:  # an unpaired row keeps its place
                first.append((i, 0, row["prompt"], row["completion"], row["label"]))
                continue
            r = row["responses"] if "responses" in row else [row["chosen"], row["rejected"]]
            for x in range(len(r)):
                for y in range(x + 1, len(r)):
                    first.append((i, x, row["prompt"], r[x], True))
                    second.append((i, y, row["prompt"], r[y], False))
        out += first + second
    return out


def kto(a):
    tok, policy, ref, rows = load(a)
    items = []
    for row, place, prompt, completion, label in unpaired_rows(rows):
        p, c = tokenize_one(tok, prompt, completion)
        items.append(dict(index=row, response=place, label=label, p=p, c=c))
    # add_kl_completion_ids: the completions rotated by one within each batch.
    for b in range(0, len(items), a.batch):
        batch = items[b:b + a.batch]
        kl = [batch[-1]["c"]] + [x["c"] for x in batch[:-1]]
        for x, k in zip(batch, kl):
            x["kl"] = k
    out, kls = [], []
    sig = lambda x: torch.sigmoid(torch.tensor(x, dtype=torch.float64)).item()
    for b in range(0, len(items), a.batch):
        batch = items[b:b + a.batch]
        if a.loss_type == "kto":
            d = [score(policy, x["p"], x["kl"])[0] - score(ref, x["p"], x["kl"])[0] for x in batch]
            kl = max(0.0, sum(d) / len(d))
        else:
            kl = 0.0
        kls.append(kl)
        for x in batch:
            scored = score(policy, x["p"], x["c"])
            lp, logit_sum, tokens, entropy = scored[0], scored[1], scored[2], scored[5]
            rl = score(ref, x["p"], x["c"])[0]
            rho = lp - rl
            if a.loss_type == "kto":
                loss = 1 - sig(a.beta * (rho - kl)) if x["label"] else 1 - sig(a.beta * (kl - rho))
            else:
                loss = 1 - sig(a.beta * rho) if x["label"] else sig(a.beta * rho)
            loss *= a.desirable_weight if x["label"] else a.undesirable_weight
            out.append(dict(index=x["index"], response=x["response"], label=x["label"], logps=lp,
                            ref_logps=rl, loss=loss, logit_sum=logit_sum, tokens=tokens, entropy=entropy))
    metrics = {"loss": sum(x["loss"] for x in out) / len(out), "kl": sum(kls) / len(kls),
               "entropy": sum(x["entropy"] for x in out) / sum(x["tokens"] for x in out)}
    for label, name in [(True, "chosen"), (False, "rejected")]:
        side = [x for x in out if x["label"] == label]
        if side:
            metrics[f"rewards/{name}"] = sum(a.beta * (x["logps"] - x["ref_logps"]) for x in side) / len(side)
            metrics[f"logps/{name}"] = sum(x["logps"] for x in side) / len(side)
            metrics[f"logits/{name}"] = sum(x["logit_sum"] for x in side) / sum(x["tokens"] for x in side)
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    print(json.dumps({"completions": out, "metrics": metrics}))


def perturb(a):
    model = tf.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    g = torch.Generator().manual_seed(a.seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * a.scale)
    model.save_pretrained(a.out)
    tf.AutoTokenizer.from_pretrained(a.model).save_pretrained(a.out)
    print(json.dumps({"out": a.out}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["perturb", "compute", "kto"])
    ap.add_argument("--model")
    ap.add_argument("--out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=0.02)
    ap.add_argument("--policy")
    ap.add_argument("--ref")
    ap.add_argument("--data")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--configs", default='[["sigmoid", 0.0, 0.0]]')
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--loss-type", default="kto")
    ap.add_argument("--desirable-weight", type=float, default=1.0)
    ap.add_argument("--undesirable-weight", type=float, default=1.0)
    a = ap.parse_args()
    {"perturb": perturb, "compute": compute, "kto": kto}[a.command](a)


if __name__ == "__main__":
    main()
