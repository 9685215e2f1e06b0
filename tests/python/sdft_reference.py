"""TRL 1.16's SDFT loss (trl.experimental.sdft) with `transformers`, for the
`ppo train --advantage-estimator sdft` parity test.

    sdft_reference.py --model DIR --prompts PROMPTS.jsonl --samples SAMPLES.jsonl
                      [--template T] [--mode topk_logits] [--alpha 0.5] [--topk 100]
                      [--add-tail] [--skip 0] [--temperature 1.0]

SAMPLES.jsonl: a run's `samples.jsonl` lines of one step (`prompt`, the decoded prompt
text, and `completion_ids`, the sampled tokens). Each sample's row of PROMPTS.jsonl is the
one whose `prompt` is that text. As TRL's SDFTTrainer does: the student prompt is the
tokenizer's ids of the row's prompt; the teacher prompt is
DemonstrationTeacherContextBuilder._compose_teacher_prompt of the prompt and its
`privileged_context`, tokenized the same way; the logits at the completion's positions
(divided by the temperature) of the model over prompt + completion and over teacher
prompt + completion go through TRL's own compute_topk_self_distillation_loss /
compute_full_logit_self_distillation_loss / compute_sampled_token_self_distillation_loss;
the loss mask leaves out the first --skip completion tokens. Prints one JSON document:

    {"loss": mean over the samples of each one's mean over its loss tokens,
     "distillation_loss": the mean over every sample's loss tokens,
     "teacher_prompts": [the composed teacher prompt of each sample]}

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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--student", help="the student's weights, when not --model's (the teacher's)")
    p.add_argument("--prompts", required=True)
    p.add_argument("--samples", required=True)
    p.add_argument("--template", default="{prompt}\n\n{privileged_context}")
    p.add_argument("--mode", default="topk_logits")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--topk", type=int, default=100)
    p.add_argument("--add-tail", action="store_true")
    p.add_argument("--skip", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    a = p.parse_args()

    tok = tf.AutoTokenizer.from_pretrained(a.model)
    load = lambda d: tf.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    model = load(a.model)
    student_model = load(a.student) if a.student else model
    rows = [json.loads(l) for l in open(a.prompts) if l.strip()]
    by_prompt = {r["prompt"]: r for r in rows}
    samples = [json.loads(l) for l in open(a.samples) if l.strip()]
    builder = DemonstrationTeacherContextBuilder(
        SimpleNamespace(args=SimpleNamespace(teacher_prompt_template=a.template))
    )

    def completion_logits(prompt_ids, completion, model):
        ids = torch.tensor([prompt_ids + completion])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        # SDFTTrainer._forward_logits: logits[:, :-1][:, -len(completion):] / temperature.
        return logits[:, :-1, :][:, -len(completion) :, :] / a.temperature

    per_sample, token_sum, token_count, teacher_prompts = [], 0.0, 0.0, []
    for s in samples:
        row = by_prompt[s["prompt"]]
        completion = s["completion_ids"]
        teacher_prompt = builder._compose_teacher_prompt(row["prompt"], row["privileged_context"])
        teacher_prompts.append(teacher_prompt)
        student = completion_logits(tok(text=row["prompt"])["input_ids"], completion, student_model)
        teacher = completion_logits(tok(text=teacher_prompt)["input_ids"], completion, model)
        if a.mode == "topk_logits":
            loss = loss_utils.compute_topk_self_distillation_loss(
                student,
                teacher,
                distillation_topk=a.topk,
                distillation_alpha=a.alpha,
                distillation_add_tail=a.add_tail,
            )
        elif a.mode == "full_logits":
            loss = loss_utils.compute_full_logit_self_distillation_loss(
                student, teacher, distillation_alpha=a.alpha
            )
        else:
            loss = loss_utils.compute_sampled_token_self_distillation_loss(
                student, teacher, torch.tensor([completion]), distillation_alpha=a.alpha
            )
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


if __name__ == "__main__":
    main()
