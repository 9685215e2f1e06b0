"""TRL 1.16's experimental TPOTrainer itself on one batch, for the `dpo --tpo-alpha` parity test.

    tpo_reference.py --model DIR --data FILE,FILE,... --configs '[["sigmoid", 0.01, 0.1, 1.0, 0.5], ...]'
        for each file and each (loss_type, beta, label_smoothing, tpo_alpha, tpo_l_gamma): a
        TPOTrainer built on the model and the rows of the file (its own tokenization,
        `_prepare_dataset`), the whole file collated as one batch by its own collator, and
        its `compute_loss` over it (f32, CPU, no dropout). Prints one JSON document
        {"files": [{"configs": [{"loss": x, "rewards/chosen": x, "rewards/margins": x}, ...]}, ...]}.
"""
import argparse
import json
import os
import tempfile

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
import transformers as tf
from datasets import Dataset
from trl.experimental.tpo import TPOConfig, TPOTrainer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--configs", required=True)
    a = p.parse_args()

    tok = tf.AutoTokenizer.from_pretrained(a.model)
    model = tf.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.eval()
    files = []
    for path in a.data.split(","):
        rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        files.append({"configs": one_file(model, tok, rows, json.loads(a.configs))})
    print(json.dumps({"files": files}))


def one_file(model, tok, rows, configs):
    out = []
    for loss_type, beta, label_smoothing, tpo_alpha, gamma in configs:
        with tempfile.TemporaryDirectory() as tmp:
            args = TPOConfig(
                output_dir=tmp,
                loss_type=loss_type,
                beta=beta,
                label_smoothing=label_smoothing,
                tpo_alpha=tpo_alpha,
                tpo_l_gamma=gamma,
                bf16=False,
                gradient_checkpointing=False,
                max_length=None,
                per_device_train_batch_size=len(rows),
                report_to=[],
                use_cpu=True,
            )
            trainer = TPOTrainer(
                model=model,
                args=args,
                train_dataset=Dataset.from_list(rows),
                processing_class=tok,
            )
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
            with torch.no_grad():
                loss = trainer.compute_loss(model, batch)
            metrics = trainer._metrics["eval"]
            out.append(
                {
                    "loss": loss.item(),
                    "rewards/chosen": metrics["rewards/chosen"][-1],
                    "rewards/margins": metrics["rewards/margins"][-1],
                }
            )
    return out


if __name__ == "__main__":
    main()
