"""TRL 1.16's GOLD (trl.experimental.gold: cross-tokenizer distillation with the ULD loss)
with `transformers`, for the `sft train --teacher-model --use-uld-loss` tests.

    gold_reference.py make-teacher --out DIR
        DIR: a tiny GPT-2 with a byte-level BPE tokenizer of its own (400 tokens, trained
        here on the student fixture's corpus plus other text: other merges, other ids).

    gold_reference.py loss --student DIR --teacher DIR --rows ROWS.jsonl --configs JSON
        ROWS.jsonl: {"prompt","completion"} rows. Each row is tokenized by TRL's own GOLD
        data path (GOLDTrainer._prepare_dataset_with_original_text: the student's ids, byte
        offsets and completion mask, and the prompt's and completion's text), the teacher's
        inputs are built by TRL's build_teacher_inputs_from_texts, both models run alone on
        each row (float32), and TRL's ULDLoss gives the row's loss. JSON: a list of
        GOLDConfig field overrides; for each, the mean over the rows of ULDLoss (TRL's loss
        of a batch of all rows, whose distillation part is the rows' mean, whose
        cross-entropy part is over all their completion tokens), and with the hybrid loss the
        means over the rows of its matched and unmatched parts. Also the student's ids and
        completion masks, for the test to compare with its own tokenization.
"""
import argparse
import json
import os
import sys
from types import SimpleNamespace

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_reference import CORPUS, SPECIALS  # noqa: E402

TEACHER_CORPUS = CORPUS + [
    "Rabbits and chickens share a cage: count the heads, then the legs.",
    "A rabbit has 4 legs and a chicken 2; 鸡兔同笼 is the old puzzle.",
] * 10


def make_teacher(out):
    torch.manual_seed(1)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEACHER_CORPUS, trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    config = tf.GPT2Config(vocab_size=len(fast), n_embd=48, n_layer=2, n_head=4, n_positions=256,
                           initializer_range=0.2, bos_token_id=fast.eos_token_id,
                           eos_token_id=fast.eos_token_id)
    tf.GPT2LMHeadModel(config).eval().save_pretrained(out)
    print(json.dumps({"vocab_size": len(fast)}))


GOLD_DEFAULTS = dict(
    uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
    uld_teacher_temperature=1.0, uld_skip_student_eos=True, uld_skip_teacher_eos=True,
    use_extended_uld=True, uld_token_merge_strategy="observed", uld_use_hybrid_loss=False,
    uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=0.5,
)


def student_rows(student_tok, rows, use_extended_uld):
    """TRL's GOLD data path on `rows`: GOLDTrainer._prepare_dataset_with_original_text."""
    import datasets
    from trl.experimental.gold import GOLDTrainer

    datasets.disable_progress_bars()
    args = SimpleNamespace(dataset_num_proc=None, dataset_text_field="text", max_length=None,
                           use_extended_uld=use_extended_uld)
    # One row at a time: a table of several takes its columns from all of them, so a
    # conversation would have a `prompt` of None.
    return [next(iter(GOLDTrainer._prepare_dataset_with_original_text(
        None, datasets.Dataset.from_list([row]), student_tok, args, False, None, "train")))
        for row in rows]


def loss(a):
    from trl.experimental.gold.gold_trainer import ULDLoss, build_teacher_inputs_from_texts

    student_tok = tf.AutoTokenizer.from_pretrained(a.student)
    teacher_tok = tf.AutoTokenizer.from_pretrained(a.teacher)
    student = tf.AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32).eval()
    teacher = tf.AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in open(a.rows)]
    out = {"configs": []}
    for overrides in json.loads(a.configs):
        config = SimpleNamespace(**{**GOLD_DEFAULTS, **overrides})
        prepared = student_rows(student_tok, rows, config.use_extended_uld)
        out["ids"] = [p["input_ids"] for p in prepared]
        out["masks"] = [p["completion_mask"] for p in prepared]
        uld = ULDLoss(config, student_tokenizer=student_tok, teacher_tokenizer=teacher_tok)
        distillation, matched, unmatched = [], [], []
        ce_sum, ce_tokens = 0.0, 0
        with torch.no_grad():
            for p in prepared:
                ids = torch.tensor([p["input_ids"]])
                labels = torch.tensor([[t if m else -100 for t, m in zip(p["input_ids"], p["completion_mask"])]])
                t_ids, t_labels, t_mask, t_offsets = build_teacher_inputs_from_texts(
                    teacher_tok, [p["original_prompt_text"]], [p["original_completion_text"]],
                    use_extended_uld=config.use_extended_uld)
                s_logits = student(input_ids=ids).logits.float()
                t_logits = teacher(input_ids=t_ids, attention_mask=t_mask).logits.float()
                # The distillation part alone (cross-entropy weight 0 here), then the
                # cross-entropy over all rows' tokens as one batch would average it.
                uld.crossentropy_weight = 0.0
                d = uld(s_logits, t_logits, labels, t_labels, ids, t_ids,
                        student_byte_offsets=torch.tensor([p["byte_offsets"]]),
                        teacher_byte_offsets=t_offsets)
                distillation.append(d.item())
                if config.uld_use_hybrid_loss:
                    matched.append(float(uld.last_matched_loss))
                    unmatched.append(float(uld.last_unmatched_loss))
                shift = s_logits[0, :-1].log_softmax(-1)
                target = labels[0, 1:]
                keep = target != -100
                ce_sum += -shift[keep].gather(-1, target[keep][:, None]).sum().item()
                ce_tokens += int(keep.sum())
        n = len(prepared)
        result = {"loss": sum(distillation) / n + config.uld_crossentropy_weight * ce_sum / ce_tokens}
        if matched:
            result["matched_loss"] = sum(matched) / n
            result["unmatched_loss"] = sum(unmatched) / n
        out["configs"].append(result)
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["make-teacher", "loss"])
    ap.add_argument("--out")
    ap.add_argument("--student")
    ap.add_argument("--teacher")
    ap.add_argument("--rows")
    ap.add_argument("--configs", default="[{}]")
    a = ap.parse_args()
    if a.command == "make-teacher":
        make_teacher(a.out)
    else:
        loss(a)


if __name__ == "__main__":
    main()
