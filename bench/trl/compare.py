#!/usr/bin/env python3
"""The TRL side of `bench/trl_compare.sh`: one stage of the `make bench` workload run by
TRL on the same model directories, data and batch shapes, printing one JSON line.

    python bench/trl/compare.py {sft,sft-varied,sft-packed,reward,dpo,rloo,grpo,ppo} --work DIR --arch ARCH [--device cuda]

DIR is what `BENCH_KEEP=DIR make bench` leaves: `<arch>-lm/`, `<arch>-rm/`, `sft.jsonl`,
`sft-varied.jsonl`, `pairs.jsonl`, `prompts.jsonl`. Settings mirror ppo/benches/stages.rs (and read the same
BENCH_BATCH, BENCH_SEQ, BENCH_ROLLOUT, BENCH_RESPONSE): f32 on the CPU, TRL's default
mixed precision on CUDA (f32 weights, bf16 autocast; we keep bf16 weights with f32 master
copies in the optimiser), batch 8 × 128 tokens (reward: 4 pairs), lr 1e-5, constant schedule, AdamW, no gradient
checkpointing (TRL turns it on by default; we never recompute), dropout off, 2 warm-up and
8 measured steps (median of step-end to step-end times, which include TRL's data loading
and logging, as our numbers include ours). PPO (TRL 0.29.1 `trl.experimental.ppo`, run
with that version first on PYTHONPATH): 16 rollout rows of 32 tokens, 1 epoch, 2
minibatches, value model and GAE. RLOO and GRPO (TRL 1.16): 8 prompts × 2 completions of 32
tokens per generation, 2 optimiser steps per generation (the same 16 sequences and 2
updates), against our `rloo` and `grpo` rows, which sample the same.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from datasets import load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
)

WARMUP, MEASURED = 2, 8
BATCH = int(os.environ.get("BENCH_BATCH", 8))
SEQ = int(os.environ.get("BENCH_SEQ", 128))
ROLLOUT = int(os.environ.get("BENCH_ROLLOUT", 16))
RESPONSE = int(os.environ.get("BENCH_RESPONSE", 32))
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
CUDA = False


class StepTimer(TrainerCallback):
    """Seconds between consecutive step ends (the first from the start of training)."""

    def __init__(self):
        self.times, self.last = [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if CUDA:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


def common_args(out, steps):
    return dict(
        output_dir=out,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        max_steps=steps,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        use_cpu=not CUDA,
        bf16=CUDA,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )


def kwargs_for(arch):
    return NO_DROPOUT if arch.startswith("gpt2") else {}


def tokenizer(path, padding_side="right"):
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = padding_side
    return tok


def sft(work, arch, out):
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(f"{work}/{arch}-lm", dtype=torch.float32, **kwargs_for(arch))
    data = load_dataset("json", data_files=f"{work}/sft.jsonl", split="train")
    timer = StepTimer()
    cfg = SFTConfig(**common_args(out, WARMUP + MEASURED), max_length=SEQ, packing=False)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data,
                         processing_class=tokenizer(f"{work}/{arch}-lm"), callbacks=[timer])
    tokens = statistics.mean(len(r) for r in trainer.train_dataset["input_ids"])
    trainer.train()
    step = statistics.median(timer.times[WARMUP:])
    return {"steps_per_second": 1 / step, "tokens_per_second": BATCH * tokens / step}


def sft_varied(work, arch, out, packed):
    """SFT on rows of 16 to SEQ tokens (`sft-varied.jsonl`): padded to each batch's longest,
    BATCH rows a step, or packed (TRL's packing=True, best-fit decreasing, padding-free
    with position ids) with our `sft-packed` row's number of packs a step."""
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(f"{work}/{arch}-lm", dtype=torch.float32, **kwargs_for(arch))
    data = load_dataset("json", data_files=f"{work}/sft-varied.jsonl", split="train")
    mean = statistics.mean(len(r["text"]) + 1 for r in data)
    batch = max(1, round(BATCH * mean / SEQ)) if packed else BATCH
    timer = StepTimer()
    cfg = SFTConfig(**{**common_args(out, WARMUP + MEASURED), "per_device_train_batch_size": batch},
                    max_length=SEQ, packing=packed)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data,
                         processing_class=tokenizer(f"{work}/{arch}-lm"), callbacks=[timer])
    tokens = statistics.mean(len(r) for r in trainer.train_dataset["input_ids"])
    trainer.train()
    step = statistics.median(timer.times[WARMUP:])
    return {"tokens_per_second": batch * tokens / step, "batch": batch}


def reward(work, arch, out):
    from trl import RewardConfig, RewardTrainer

    tok = tokenizer(f"{work}/{arch}-lm")
    model = AutoModelForSequenceClassification.from_pretrained(
        f"{work}/{arch}-lm", num_labels=1, dtype=torch.float32, **kwargs_for(arch))
    model.config.pad_token_id = tok.pad_token_id
    data = load_dataset("json", data_files=f"{work}/pairs.jsonl", split="train")
    timer = StepTimer()
    args = common_args(out, WARMUP + MEASURED)
    args["per_device_train_batch_size"] = BATCH // 2
    cfg = RewardConfig(**args, max_length=None)
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok,
                            callbacks=[timer])
    ds = trainer.train_dataset
    tokens = statistics.mean(len(a) + len(b) for a, b in zip(ds["chosen_ids"], ds["rejected_ids"]))
    trainer.train()
    step = statistics.median(timer.times[WARMUP:])
    return {"steps_per_second": 1 / step, "tokens_per_second": BATCH // 2 * tokens / step}


def dpo(work, arch, out):
    """TRL 1.16's DPOTrainer on the reward row's pairs: BATCH // 2 pairs a step (BATCH
    sequences), sigmoid loss, β 0.1, the reference a frozen copy of the model (TRL's
    default), no precomputed reference log-probs, as our `dpo` row."""
    from trl import DPOConfig, DPOTrainer

    tok = tokenizer(f"{work}/{arch}-lm")
    model = AutoModelForCausalLM.from_pretrained(f"{work}/{arch}-lm", dtype=torch.float32, **kwargs_for(arch))
    data = load_dataset("json", data_files=f"{work}/pairs.jsonl", split="train")
    timer = StepTimer()
    args = common_args(out, WARMUP + MEASURED)
    args["per_device_train_batch_size"] = BATCH // 2
    cfg = DPOConfig(**args, max_length=None, beta=0.1, loss_type=["sigmoid"])
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok,
                         callbacks=[timer])
    ds = trainer.train_dataset
    tokens = statistics.mean(2 * len(p) + len(c) + len(r)
                             for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]))
    trainer.train()
    step = statistics.median(timer.times[WARMUP:])
    return {"steps_per_second": 1 / step, "tokens_per_second": BATCH // 2 * tokens / step}


def ppo(work, arch, out):
    import trl
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    assert trl.__version__.startswith("0.29"), f"PPO needs TRL 0.29.x first on PYTHONPATH, got {trl.__version__}"
    tok = tokenizer(f"{work}/{arch}-lm", padding_side="left")
    lm = lambda: AutoModelForCausalLM.from_pretrained(f"{work}/{arch}-lm", dtype=torch.float32, **kwargs_for(arch))
    sc = lambda: AutoModelForSequenceClassification.from_pretrained(
        f"{work}/{arch}-rm", num_labels=1, dtype=torch.float32, **kwargs_for(arch))
    policy, ref, reward_model, value = lm(), lm(), sc(), sc()
    for m in (reward_model, value):
        m.config.pad_token_id = tok.pad_token_id
    data = load_dataset("json", data_files=f"{work}/prompts.jsonl", split="train")
    data = data.map(lambda r: {"input_ids": tok(r["prompt"])["input_ids"]}, remove_columns=data.column_names)
    iterations = WARMUP + MEASURED
    args = common_args(out, iterations)
    del args["max_steps"]
    args["per_device_train_batch_size"] = ROLLOUT // 2
    cfg = PPOConfig(**args, gradient_accumulation_steps=1, num_mini_batches=2, num_ppo_epochs=1,
                    total_episodes=ROLLOUT * iterations, response_length=RESPONSE,
                    local_rollout_forward_batch_size=ROLLOUT, num_sample_generations=0,
                    kl_coef=0.05, stop_token=None, missing_eos_penalty=None)
    timer = StepTimer()
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref,
                         reward_model=reward_model, value_model=value, train_dataset=data,
                         callbacks=[timer])
    trainer.train()
    it = statistics.median(timer.times[WARMUP:])
    return {"iterations_per_second": 1 / it, "tokens_per_second": ROLLOUT * RESPONSE / it}


def group_method(work, arch, out, config_cls, trainer_cls):
    """RLOO or GRPO (TRL 1.16) on the same setting: ROLLOUT // 2 prompts × 2 completions of
    RESPONSE tokens per generation, 2 optimiser steps per generation (the same sequences and
    updates as our PPO row), β 0.05, the reward model as the reward function."""
    model = AutoModelForCausalLM.from_pretrained(f"{work}/{arch}-lm", dtype=torch.float32, **kwargs_for(arch))
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        f"{work}/{arch}-rm", num_labels=1, dtype=torch.float32, **kwargs_for(arch))
    reward_tok = tokenizer(f"{work}/{arch}-rm")
    reward_model.config.pad_token_id = reward_tok.pad_token_id
    data = load_dataset("json", data_files=f"{work}/prompts.jsonl", split="train")
    iterations = WARMUP + MEASURED
    # One generation of ROLLOUT completions feeds two optimiser steps of ROLLOUT // 2.
    args = common_args(out, 2 * iterations)
    args["per_device_train_batch_size"] = ROLLOUT // 2
    cfg = config_cls(**args, num_generations=2, steps_per_generation=2,
                     max_completion_length=RESPONSE, num_iterations=1, beta=0.05,
                     log_completions=False)
    timer = StepTimer()
    trainer = trainer_cls(model=model, reward_funcs=reward_model, args=cfg, train_dataset=data,
                          processing_class=tokenizer(f"{work}/{arch}-lm", padding_side="left"),
                          reward_processing_classes=reward_tok, callbacks=[timer])
    trainer.train()
    pairs = [a + b for a, b in zip(timer.times[0::2], timer.times[1::2])]
    it = statistics.median(pairs[WARMUP:])
    return {"iterations_per_second": 1 / it, "tokens_per_second": ROLLOUT * RESPONSE / it}


def rloo(work, arch, out):
    from trl import RLOOConfig, RLOOTrainer

    return group_method(work, arch, out, RLOOConfig, RLOOTrainer)


def grpo(work, arch, out):
    from trl import GRPOConfig, GRPOTrainer

    return group_method(work, arch, out, GRPOConfig, GRPOTrainer)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["sft", "sft-varied", "sft-packed", "reward", "dpo", "ppo", "rloo", "grpo"])
    p.add_argument("--work", required=True)
    p.add_argument("--arch", required=True, help="model directories <work>/<arch>-lm, -rm")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = p.parse_args()
    import trl

    global CUDA
    CUDA = a.device == "cuda"

    with tempfile.TemporaryDirectory() as out:
        stages = {"sft": sft, "reward": reward, "dpo": dpo, "ppo": ppo, "rloo": rloo, "grpo": grpo,
                  "sft-varied": lambda w, m, o: sft_varied(w, m, o, packed=False),
                  "sft-packed": lambda w, m, o: sft_varied(w, m, o, packed=True)}
        row = stages[a.stage](a.work, a.arch, out)
    row = {"stage": a.stage, "model": a.arch, "trl": trl.__version__, "device": a.device,
           "torch_threads": torch.get_num_threads(), **row}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
