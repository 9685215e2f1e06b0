"""Reference for a reward model whose tokenizer is not the policy's (ppo/tests/reward_tokenizer.rs):
TRL 1.16's `GRPOTrainer._calculate_rewards` for a model in `reward_funcs`.

    reward_tokenizer_reference.py make --out DIR
    reward_tokenizer_reference.py score --model DIR --cases FILE

`make` writes a tiny LlamaForSequenceClassification with a tokenizer of its own (a byte-level
BPE of another vocabulary than the test policy's, Llama 3's special tokens and a Llama-3-style
chat template) into DIR. `score` reads FILE, a JSON list of {"prompt": text or messages,
"completion": text, or messages after tools}, and prints each one's reward as the trainer computes it: a batch of
conversations rendered with `trl.data_utils.apply_chat_template({"messages": prompt +
[assistant completion]}, reward tokenizer)` (+ the completion's messages), plain prompts joined to their completion, tokenized
right-padded without special tokens, the model's `logits[:, 0]`.
"""
import argparse
import json

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from trl.data_utils import apply_chat_template, is_conversational

SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|finetune_right_pad_id|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CORPUS = [
    "There are 35 heads and 94 legs in the cage. How many rabbits? 12 rabbits and 23 chickens.",
    "鸡兔同笼，头35，脚94。兔12只，鸡23只。The answer is 12.",
    "system user assistant You solve puzzles step by step: 11*2=22, 30-22=8, 8/2=4 rabbits.",
]


def make(out):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                      eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256, num_labels=1,
                            pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id,
                            eos_token_id=fast.eos_token_id, tie_word_embeddings=False)
    model = tf.LlamaForSequenceClassification(config)
    with torch.no_grad():  # scores of order 1, so that 1e-4 is a real tolerance
        model.score.weight.normal_(0, 1)
    model.save_pretrained(out)
    print(json.dumps({"vocab_size": len(fast)}))


def score(model_dir, cases_file):
    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    model = tf.AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    cases = json.load(open(cases_file))
    scores = []
    # The trainer decides per batch whether its prompts are conversations: one batch each.
    for conversational in (True, False):
        batch = [c for c in cases if is_conversational({"prompt": c["prompt"]}) == conversational]
        if not batch:
            continue
        prompts = [c["prompt"] for c in batch]
        if conversational:
            # A completion given as messages is one with tools (the turns and results).
            completions = [
                c["completion"] if isinstance(c["completion"], list)
                else [{"role": "assistant", "content": c["completion"]}]
                for c in batch
            ]
            messages = [{"messages": p + c} for p, c in zip(prompts, completions, strict=True)]
            texts = [apply_chat_template(x, tok)["text"] for x in messages]
        else:
            texts = [p + c["completion"] for p, c in zip(prompts, batch, strict=True)]
        inputs = tok(text=texts, return_tensors="pt", padding=True, padding_side="right",
                     add_special_tokens=False)
        with torch.inference_mode():
            rewards = model(**inputs).logits[:, 0]
        scores += [{"case": c, "text": t, "score": r} for c, t, r in zip(batch, texts, rewards.tolist())]
    print(json.dumps(scores, ensure_ascii=False))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["make", "score"])
    parser.add_argument("--out")
    parser.add_argument("--model")
    parser.add_argument("--cases")
    args = parser.parse_args()
    if args.command == "make":
        make(args.out)
    else:
        score(args.model, args.cases)


if __name__ == "__main__":
    main()
