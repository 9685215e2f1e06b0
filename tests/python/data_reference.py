"""References for the data and SFT-command tests, computed with `transformers`.

    data_reference.py make --root DIR

Builds DIR/model (a tiny Llama with a byte-level BPE tokenizer trained here, ChatML chat
template, pad == eos), writes DIR/sft.jsonl and DIR/prompts.jsonl, and prints per-row token
ids, loss masks, completion NLLs and greedy completions as one JSON document.
"""
import argparse
import json
import os
import sys

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

SFT_ROWS = [
    {"prompt": "There are 3 heads and 10 legs. ", "completion": "2 rabbits and 1 chicken."},
    {"prompt": "Question: 2+2=", "completion": " 4"},
    {"text": "Chickens have two legs; rabbits have four legs."},
    {"messages": [
        {"role": "system", "content": "You solve cage puzzles."},
        {"role": "user", "content": "5 heads, 14 legs?"},
        {"role": "assistant", "content": "2 rabbits, 3 chickens. Café!"},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes: 2*4 + 3*2 = 14."},
    ]},
    # An empty system message, as public SFT sets have: rendered, not refused.
    {"messages": [
        {"role": "system", "content": ""},
        {"role": "user", "content": "3 heads, 10 legs?"},
        {"role": "assistant", "content": "2 rabbits, 1 chicken."},
    ]},
]
PROMPTS = [
    {"prompt": "There are 7 heads"},
    {"messages": [{"role": "user", "content": "How many legs?"}]},
    {"prompt": "Rabbits"},
]
# Prompts with other fields (they travel to the rewards), and preference rows shaped as
# ultrafeedback_binarized's: written both as JSON Lines and as Parquet by `datasets`.
PROMPT_FIELD_ROWS = [
    {"prompt": [{"role": "user", "content": "35 heads, 94 legs?"}], "answer": "12 rabbits", "id": 7, "level": 1.5},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3 heads, 10 legs?"}],
     "answer": "2 rabbits", "id": 8, "level": None},
]
PREFERENCE_ROWS = [
    {"prompt": "5 heads, 14 legs?",
     "chosen": [{"role": "user", "content": "5 heads, 14 legs?"}, {"role": "assistant", "content": "2 rabbits."}],
     "rejected": [{"role": "user", "content": "5 heads, 14 legs?"}, {"role": "assistant", "content": "5 rabbits."}],
     "score_chosen": 8.0, "score_rejected": 3.5},
    {"prompt": "3 heads, 10 legs?",
     "chosen": [{"role": "user", "content": "3 heads, 10 legs?"}, {"role": "assistant", "content": "2 rabbits, 1 chicken."}],
     "rejected": [{"role": "user", "content": "3 heads, 10 legs?"}, {"role": "assistant", "content": "3 chickens."}],
     "score_chosen": 9.0, "score_rejected": 1.0},
]
CORPUS = [
    "There are 35 heads and 94 legs in the cage. How many chickens and rabbits?",
    "Chickens have two legs; rabbits have four legs. Café au lait.",
    "If all were chickens there would be 70 legs; the 24 extra legs belong to 12 rabbits.",
    "Question: 2+2= 4. Yes: 2*4 + 3*2 = 14. Sure? You solve cage puzzles.",
] * 20


def build_tokenizer(path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return fast


def chat_ids_and_mask(tok, messages):
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            through = tok.apply_chat_template(messages[: i + 1], tokenize=False)
            # byte offsets, as the Rust side uses
            spans.append((len(before.encode()), len(through.encode())))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    mask = []
    for start_char, _ in enc["offset_mapping"]:
        start = len(full[:start_char].encode())
        mask.append(int(any(a <= start < b for a, b in spans)))
    return ids, mask


def sft_ids_and_mask(tok, row):
    """TRL's rule: prompt+completion tokenized together, loss after the prompt's tokens."""
    if "messages" in row:
        return chat_ids_and_mask(tok, row["messages"])
    if "prompt" in row:
        n = len(tok(row["prompt"])["input_ids"])
        ids = tok(row["prompt"] + row["completion"])["input_ids"]
        mask = [0] * n + [1] * (len(ids) - n)
    else:
        ids = tok(row["text"])["input_ids"]
        mask = [1] * len(ids)
    if ids[-1] != tok.eos_token_id:
        ids, mask = ids + [tok.eos_token_id], mask + [1]
    return ids, mask


def write_parquet(root):
    """The data as `datasets` writes Parquet: the SFT rows as a Hub dataset's shards (one
    row each: `from_list` takes its columns from its first row, and the rows differ in
    shape), the prompt and preference rows as one table each (beside their JSON Lines), and
    a table whose third row has an empty completion."""
    import datasets
    datasets.disable_progress_bars()
    os.makedirs(f"{root}/parquet", exist_ok=True)
    for i, row in enumerate(SFT_ROWS):
        datasets.Dataset.from_list([row]).to_parquet(
            f"{root}/parquet/sft-{i:05d}-of-{len(SFT_ROWS):05d}.parquet")
    for name, rows in [("prompt_fields", PROMPT_FIELD_ROWS), ("preferences", PREFERENCE_ROWS)]:
        datasets.Dataset.from_list(rows).to_parquet(f"{root}/parquet/{name}.parquet")
        with open(f"{root}/parquet/{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    bad = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"},
           {"prompt": "e", "completion": " "}]
    datasets.Dataset.from_list(bad).to_parquet(f"{root}/parquet/bad.parquet")


def make(root):
    torch.manual_seed(0)
    tok = build_tokenizer(f"{root}/model")
    config = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256, initializer_range=0.1,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                            bos_token_id=None)
    model = tf.LlamaForCausalLM(config).eval()
    model.save_pretrained(f"{root}/model")
    for name, rows in [("sft", SFT_ROWS), ("prompts", PROMPTS)]:
        with open(f"{root}/{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    write_parquet(root)
    out = {"sft": [], "generate": []}
    with torch.no_grad():
        for row in SFT_ROWS:
            ids, mask = sft_ids_and_mask(tok, row)
            t = torch.tensor([ids])
            logp = model(input_ids=t).logits[0, :-1].float().log_softmax(-1)
            lp = logp.gather(-1, t[0, 1:, None]).squeeze(-1)
            m = torch.tensor(mask[1:], dtype=torch.float32)
            # TRL's SFTTrainer `entropy` and `mean_token_accuracy` sums over the targets.
            entropy = -(logp.exp() * logp).sum(-1)
            top1 = (logp.argmax(-1) == t[0, 1:]).float()
            out["sft"].append({"ids": ids, "mask": mask,
                               "nll": float(-(lp * m).sum() / m.sum()), "tokens": int(m.sum()),
                               "entropy": float((entropy * m).sum()), "top1": float((top1 * m).sum())})
        for p in PROMPTS:
            if "messages" in p:
                ids = tok.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=True,
                                              return_dict=False)
            else:
                ids = tok(p["prompt"])["input_ids"]
            t = torch.tensor([ids])
            gen = model.generate(input_ids=t, attention_mask=torch.ones_like(t), do_sample=False,
                                 max_new_tokens=16, pad_token_id=tok.pad_token_id)
            out["generate"].append(tok.decode(gen[0, len(ids):], skip_special_tokens=True))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["make"])
    ap.add_argument("--root", required=True)
    args = ap.parse_args()
    json.dump(make(args.root), sys.stdout)


if __name__ == "__main__":
    main()
