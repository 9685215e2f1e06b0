"""TRL 1.16's SDFT loss (trl.experimental.sdft) with `transformers`, for the
`ppo train --advantage-estimator sdft` parity test.

    sdft_reference.py --model DIR --prompts PROMPTS.jsonl --samples SAMPLES.jsonl
                      [--template T] [--mode topk_logits] [--alpha 0.5] [--topk 100]
                      [--add-tail] [--skip 0] [--temperature 1.0]

SAMPLES.jsonl: a run's `samples.jsonl` lines of one step (`prompt`, the decoded prompt
text, and `completion_ids`, the sampled tokens). Each sample's row of PROMPTS.jsonl is the
one whose prompt, tokenized and decoded, is that text (a conversation through the chat
template). As TRL's SDFTTrainer does: the student prompt is the
tokenizer's ids of the row's prompt; the teacher prompt is
DemonstrationTeacherContextBuilder._compose_teacher_prompt of the prompt and its
`privileged_context`, tokenized the same way; the logits at the completion's positions
(divided by the temperature) of the model over prompt + completion and over teacher
prompt + completion go through TRL's own compute_topk_self_distillation_loss /
compute_full_logit_self_distillation_loss / compute_sampled_token_self_distillation_loss;
the loss mask leaves out the first --skip completion tokens. Prints one JSON document:

    {"loss": mean over the samples of each one's mean over its loss tokens,
     "distillation_loss": the mean over every sample's loss tokens,
     "teacher_prompts": [each sample's teacher prompt, tokenized and decoded]}

    sdft_reference.py --sdpo --num-generations K [--weight 1] [--threshold 1]
                      [--include-feedback] ...

SDPO instead (trl.experimental.sdpo, whose defaults are sampled_token and alpha 1): the
samples are the whole step's rollout in order (groups of K), each with its `score`; TRL's
own SuccessfulRolloutTeacherContextBuilder.build (on a stand-in trainer: one process) makes
the teacher prompts from them and the rows' `privileged_context` (feedback), the GRPO
advantages are TRL's ((r − group mean) / (group std + 1e-4)), the policy loss TRL's
default `dapo` one at ratio 1, the distillation loss on the responses given a teacher
context, and the loss (1 − w)·policy + w·distillation. Prints {"loss", "policy_loss",
"distillation_loss", "teacher_prompts" (decoded), and TRL's `self_distillation/*_fraction`
metrics}.

Each sample is run alone (no padding), the model in float32. The step's policy is still the
starting one, so the student and (base) teacher weights are the model's; --student DIR
gives the student other weights (a trained policy, against its base teacher).
"""
import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import argparse
import json
from types import SimpleNamespace

import torch
import transformers as tf
from trl.experimental.sdft import loss_utils
from trl.experimental.sdft.sdft_trainer import DemonstrationTeacherContextBuilder


def per_token_loss(losses, a, student, teacher, completion):
    """The trainer's own `loss_utils` (`losses`: SDFT's or SDPO's module) for --mode."""
    if a.mode == "topk_logits":
        return losses.compute_topk_self_distillation_loss(
            student,
            teacher,
            distillation_topk=a.topk,
            distillation_alpha=a.alpha,
            distillation_add_tail=a.add_tail,
        )
    if a.mode == "full_logits":
        return losses.compute_full_logit_self_distillation_loss(
            student, teacher, distillation_alpha=a.alpha
        )
    return losses.compute_sampled_token_self_distillation_loss(
        student, teacher, torch.tensor([completion]), distillation_alpha=a.alpha
    )


def completion_logits(model, ids, n, temperature):
    """SDFTTrainer._forward_logits on one unpadded row: logits[:, :-1][:, -n:] / temperature."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    return logits[:, :-1, :][:, -n:, :] / temperature


def load(path):
    return tf.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--student", help="the student's weights, when not --model's (the teacher's)")
    p.add_argument("--prompts", required=True)
    p.add_argument("--samples", required=True)
    p.add_argument("--template", default="{prompt}\n\n{privileged_context}")
    p.add_argument("--mode", help="default topk_logits (SDFT's), sampled_token with --sdpo")
    p.add_argument("--alpha", type=float, help="default 0.5 (SDFT's), 1 with --sdpo")
    p.add_argument("--topk", type=int, default=100)
    p.add_argument("--add-tail", action="store_true")
    p.add_argument("--skip", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--sdpo", action="store_true")
    p.add_argument("--num-generations", type=int, default=2)
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--threshold", type=float, default=1.0)
    p.add_argument("--include-feedback", action="store_true")
    p.add_argument("--max-reprompt-len", type=int, default=10240)
    a = p.parse_args()
    a.mode = a.mode or ("sampled_token" if a.sdpo else "topk_logits")
    a.alpha = a.alpha if a.alpha is not None else (1.0 if a.sdpo else 0.5)
    if a.sdpo:
        return sdpo(a)

    tok = tf.AutoTokenizer.from_pretrained(a.model)
    model = load(a.model)
    student_model = load(a.student) if a.student else model
    rows = [json.loads(l) for l in open(a.prompts) if l.strip()]
    def prompt_ids(prompt):
        # SDFTTrainer._tokenize_prompts: a conversation through the chat template with the
        # generation prompt, a text as it is.
        if isinstance(prompt, list):
            return tok.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        return tok(text=prompt)["input_ids"]

    # Each sample's row: the one whose prompt decodes to the sample's `prompt`.
    by_prompt = {tok.decode(prompt_ids(r["prompt"]), skip_special_tokens=True): r for r in rows}
    samples = [json.loads(l) for l in open(a.samples) if l.strip()]
    builder = DemonstrationTeacherContextBuilder(
        SimpleNamespace(args=SimpleNamespace(teacher_prompt_template=a.template))
    )

    per_sample, token_sum, token_count, teacher_prompts = [], 0.0, 0.0, []
    for s in samples:
        row = by_prompt[s["prompt"]]
        completion = s["completion_ids"]
        teacher_prompt = prompt_ids(
            builder._compose_teacher_prompt(row["prompt"], row["privileged_context"])
        )
        teacher_prompts.append(tok.decode(teacher_prompt, skip_special_tokens=True))
        n = len(completion)
        student_ids = prompt_ids(row["prompt"]) + completion
        student = completion_logits(student_model, student_ids, n, a.temperature)
        teacher = completion_logits(model, teacher_prompt + completion, n, a.temperature)
        loss = per_token_loss(loss_utils, a, student, teacher, completion)
        mask = (torch.arange(len(completion)) >= a.skip).float().unsqueeze(0)
        per_sample.append(((loss * mask).sum() / mask.sum().clamp(min=1.0)).item())
        token_sum += (loss * mask).sum().item()
        token_count += mask.sum().item()
    print(
        json.dumps(
            {
                "loss": sum(per_sample) / len(per_sample),
                "distillation_loss": token_sum / max(token_count, 1.0),
                "teacher_prompts": teacher_prompts,
            }
        )
    )


def sdpo(a):
    from trl.experimental.sdpo import loss_utils as sdpo_loss
    from trl.experimental.sdpo.sdpo_config import SDPOConfig
    from trl.experimental.sdpo.sdpo_trainer import SuccessfulRolloutTeacherContextBuilder

    tok = tf.AutoTokenizer.from_pretrained(a.model)
    model = load(a.model)
    rows = {r["prompt"]: r for r in (json.loads(l) for l in open(a.prompts) if l.strip())}
    samples = [json.loads(l) for l in open(a.samples) if l.strip()]
    config = SDPOConfig(
        output_dir="/tmp/sdpo-reference",
        use_cpu=True,
        bf16=False,
        success_reward_threshold=a.threshold,
        include_environment_feedback=a.include_feedback,
        distillation_weight=a.weight,
        max_reprompt_len=a.max_reprompt_len,
    )
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    identity = lambda t, **_: t
    trainer = SimpleNamespace(
        args=config,
        accelerator=SimpleNamespace(
            device="cpu", process_index=0, gather=identity, pad_across_processes=identity
        ),
        model=SimpleNamespace(training=True),
        num_generations=a.num_generations,
        _tokenizer=SimpleNamespace(pad_token_id=pad),
        processing_class=tok,
        _tokenize_prompts_untruncated=lambda prompts: [tok(text=p)["input_ids"] for p in prompts],
    )
    completions = [s["completion_ids"] for s in samples]
    width = max(len(c) for c in completions)
    completion_ids = torch.tensor([c + [pad] * (width - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    prompts = [s["prompt"] for s in samples]
    rewards = torch.tensor([s["score"] for s in samples], dtype=torch.float32)
    feedbacks = [rows[p].get("privileged_context") for p in prompts]
    builder = SuccessfulRolloutTeacherContextBuilder(trainer)
    out = builder.build(
        {"completion_ids": completion_ids, "completion_mask": completion_mask},
        prompts,
        rewards,
        feedbacks=feedbacks,
    )
    teacher_len = out["teacher_input_ids"].size(1) - width
    k = a.num_generations
    grouped = rewards.view(-1, k)
    advantages = (rewards - grouped.mean(1).repeat_interleave(k)) / (
        grouped.std(1).repeat_interleave(k) + 1e-4
    )

    pg_sum, pg_tokens, distill_rows, distill_sum, distill_tokens, teacher_prompts = 0, 0, [], 0, 0, []
    for i, (s, c) in enumerate(zip(samples, completions)):
        n = len(c)
        row_mask = out["teacher_attention_mask"][i, :teacher_len].bool()
        teacher_prompt = out["teacher_input_ids"][i, :teacher_len][row_mask].tolist()
        teacher_prompts.append(tok.decode(teacher_prompt, skip_special_tokens=True))
        # The GRPO part at ratio 1: −A on every token, `dapo`: over every token of the batch.
        pg_sum += -advantages[i].item() * n
        pg_tokens += n
        active = out["self_distillation_mask"][i].item()
        student = completion_logits(model, tok(text=s["prompt"])["input_ids"] + c, n, a.temperature)
        teacher = completion_logits(model, teacher_prompt + c, n, a.temperature)
        loss = per_token_loss(sdpo_loss, a, student, teacher, c)
        mask = torch.full((1, n), float(active))
        distill_rows.append(((loss * mask).sum() / mask.sum().clamp(min=1.0)).item())
        distill_sum += (loss * mask).sum().item()
        distill_tokens += mask.sum().item()
    policy_loss = pg_sum / pg_tokens
    distillation = sum(distill_rows) / len(distill_rows)
    print(
        json.dumps(
            {
                "loss": (1 - a.weight) * policy_loss + a.weight * distillation,
                "policy_loss": policy_loss,
                "distillation_loss": distill_sum / max(distill_tokens, 1.0),
                "teacher_prompts": teacher_prompts,
                **builder.last_metrics,
            }
        )
    )


if __name__ == "__main__":
    main()
