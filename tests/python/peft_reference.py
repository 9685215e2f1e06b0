"""PEFT's side of the LoRA tests: tiny random models with the shared fixture's tokenizer,
adapters made and randomised by `peft`, and log-probs of adapters and merged models that
the Rust side wrote.

    peft_reference.py make  --root DIR --tokenizer DIR --ids IDS.json
        DIR/<arch>/          a tiny random transformers model (vocab 320) + tokenizer files
        DIR/<arch>-peft/     a LoRA adapter on it made by peft, A and B random
        DIR/<arch>-peft-score/  a SEQ_CLS LoRA adapter (every linear layer + score head)
        DIR/<arch>-prompt/   a prompt-tuning adapter (5 random virtual tokens)
        DIR/<arch>-prefix/   a prefix-tuning adapter (3 random virtual tokens' keys and values)
        DIR/<arch>-prefix-projected/  the same with PEFT's prefix projection (an MLP)
        DIR/<arch>-dora/     a DoRA adapter on every linear layer, A, B and magnitude random
        DIR/<arch>-<case>/   LoRA adapters with PEFT's per-layer settings and starts (PATTERNS)
        prints {arch: {"base", "peft", "prompt", "prefix", "prefix_projected", "dora": logprobs, "peft_score": scores,
                "dora_grad": {our tensor name: gradient of the summed log-probs}},
                "patterns": {"<arch>-<case>": logprobs}}
    peft_reference.py check --adapter DIR [--merged DIR] [--score] --ids IDS.json
        prints {"adapter": logprobs or scores, "merged": logprobs}
    peft_reference.py check --cases '[{"adapter": DIR, "merged": DIR or null}, ...]' --ids IDS.json
        the same for every case in one process (importing torch and peft takes seconds),
        prints a list

IDS.json: {"ids": [[...]], "mask": [[...]]}, right-padded. Log-probs are of each next
token ([B, T-1]); scores are read at each row's last real token (pad id 0 never occurs).
"""
import argparse
import json
import shutil
import sys

import torch
import transformers as tf
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model

VOCAB = 320


def configs():
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {
        "gpt2": tf.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.1, **common),
        "llama": tf.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=64,
            initializer_range=0.1, **common),
        "qwen2": tf.Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64,
            initializer_range=0.1, **common),
    }


# PEFT's per-layer settings: ranks and alphas by pattern, excluded modules, chosen layers,
# a regular expression for the targets.
PATTERNS = {
    "llama-patterns": dict(target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"v_proj": 2},
                           alpha_pattern={"layers.1.self_attn.q_proj": 32}, exclude_modules=["layers.0.mlp.up_proj"]),
    "llama-layers": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                         layers_to_transform=[1], layers_pattern="layers",
                         use_rslora=True, exclude_modules=["o_proj"]),
    "gpt2-regex": dict(target_modules=r".*\.c_(attn|fc)", rank_pattern={"c_fc": 3}),
    # Starts that move part of the base into A and B (redone on the base when PEFT loads
    # the adapter): PiSSA on GPT-2's Conv1D and on every Llama layer, OLoRA on Qwen2's
    # biased projections (PEFT's OLoRA does not transpose Conv1D weights).
    "gpt2-pissa": dict(init_lora_weights="pissa"),
    "llama-pissa": dict(target_modules="all-linear", init_lora_weights="pissa", use_rslora=True),
    "qwen2-olora": dict(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], init_lora_weights="olora"),
    # Full copies of the input embedding and the LM head (modules_to_save): separate ones on
    # Llama; on Qwen2, whose head is its embedding, two independent copies.
    "llama-save": dict(modules_to_save=["embed_tokens", "lm_head"]),
    "qwen2-save": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
    # Trainable rows of Qwen2's tied embedding and head (ids the rows of the test batch hold).
    "qwen2-tokens": dict(target_modules=["q_proj"], trainable_token_indices=[3, 65, 158, 251]),
}


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def logprobs_grad(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits.float()
    logp = logits[:, :-1].log_softmax(-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def logprobs(model, ids, mask, virtual_tokens=0, prefix=False):
    if prefix:
        # A prefix is the cache the model continues: positions count on from it, and the
        # logits are the real tokens' only.
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    elif virtual_tokens:
        # PEFT drops position ids for prompt learning (the model counts from 0 over the
        # virtual tokens) and returns logits for the virtual positions too.
        logits = model(input_ids=ids, attention_mask=mask).logits.float()[:, virtual_tokens:]
    else:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits.float()
    logp = logits[:, :-1].log_softmax(-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1).tolist()


def scores(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()


def load_ids(path):
    case = json.load(open(path))
    return torch.tensor(case["ids"]), torch.tensor(case["mask"])


def randomise(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                # DoRA's magnitude: the weight's row norms, moved by up to ±30%.
                p.mul_(1 + (torch.rand_like(p) - 0.5) * 0.6)
            elif "lora_" in name or "score" in name:
                p.copy_(torch.randn_like(p) * 0.3)
            elif "modules_to_save" in name or "trainable_tokens_delta" in name:
                # A copy moved off its original, each differently.
                p.add_(torch.randn_like(p) * 0.1)


def our_name(peft_name):
    """`base_model.model.<module>.lora_A.default.weight` -> `<module>.lora_A.weight`."""
    name = peft_name.removeprefix("base_model.model.").replace(".default", "")
    return name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def make(root, tokenizer, ids, mask):
    torch.manual_seed(0)
    out = {}
    for name, config in configs().items():
        base = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        base.save_pretrained(f"{root}/{name}")
        for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]:
            try:
                shutil.copy(f"{tokenizer}/{f}", f"{root}/{name}/{f}")
            except FileNotFoundError:
                pass
        res = {}
        with torch.no_grad():
            res["base"] = logprobs(base, ids, mask)
        # Default targets for the architecture, rsLoRA, and A and B both random.
        lora = LoraConfig(r=4, lora_alpha=8, use_rslora=(name == "llama"), task_type="CAUSAL_LM")
        peft = get_peft_model(base, lora)
        randomise(peft)
        # As if made from a model directory: relative to the adapter, as a user's files are.
        peft.peft_config["default"].base_model_name_or_path = f"../{name}"
        peft.save_pretrained(f"{root}/{name}-peft")
        with torch.no_grad():
            res["peft"] = logprobs(peft.eval(), ids, mask)
        # A reward model's adapter: LoRA on every linear layer plus the score head.
        seq = tf.AutoModelForSequenceClassification.from_pretrained(f"{root}/{name}", num_labels=1).eval()
        seq_peft = get_peft_model(seq, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", task_type="SEQ_CLS"))
        randomise(seq_peft)
        seq_peft.peft_config["default"].base_model_name_or_path = f"{root}/{name}"
        seq_peft.save_pretrained(f"{root}/{name}-peft-score")
        with torch.no_grad():
            res["peft_score"] = scores(seq_peft.eval(), ids, mask)
        # Prompt tuning: 5 virtual tokens, N(0, 1) as PEFT starts them.
        base = tf.AutoModelForCausalLM.from_pretrained(f"{root}/{name}").eval()
        prompt = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
        prompt.peft_config["default"].base_model_name_or_path = f"{root}/{name}"
        prompt.save_pretrained(f"{root}/{name}-prompt")
        with torch.no_grad():
            res["prompt"] = logprobs(prompt.eval(), ids, mask, virtual_tokens=5)
        # Prefix tuning: 3 virtual tokens as keys and values in every layer, N(0, 1) as
        # PEFT's prefix encoder starts them (grouped-query models: their key/value heads).
        base = tf.AutoModelForCausalLM.from_pretrained(f"{root}/{name}").eval()
        prefix = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        prefix.peft_config["default"].base_model_name_or_path = f"{root}/{name}"
        prefix.save_pretrained(f"{root}/{name}-prefix")
        with torch.no_grad():
            res["prefix"] = logprobs(prefix.eval(), ids, mask, prefix=True)
        # With PEFT's prefix projection (an MLP over the virtual tokens, trained as a
        # whole): saved as what the MLP gives (get_prompt_embedding_to_save).
        base = tf.AutoModelForCausalLM.from_pretrained(f"{root}/{name}").eval()
        projected = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                            prefix_projection=True, encoder_hidden_size=16))
        projected.peft_config["default"].base_model_name_or_path = f"{root}/{name}"
        projected.save_pretrained(f"{root}/{name}-prefix-projected")
        with torch.no_grad():
            res["prefix_projected"] = logprobs(projected.eval(), ids, mask, prefix=True)
        # DoRA on every linear layer; the gradient of the summed real log-probs.
        base = tf.AutoModelForCausalLM.from_pretrained(f"{root}/{name}").eval()
        dora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear",
                                               task_type="CAUSAL_LM"))
        randomise(dora)
        dora.peft_config["default"].base_model_name_or_path = f"../{name}"
        dora.save_pretrained(f"{root}/{name}-dora")
        lp = logprobs_grad(dora.eval(), ids, mask)
        res["dora"] = lp.detach().tolist()
        (lp * mask[:, 1:]).sum().backward()
        res["dora_grad"] = {our_name(n): p.grad.tolist() for n, p in dora.named_parameters() if p.requires_grad}
        out[name] = res
    out["patterns"] = {}
    for case, kw in PATTERNS.items():
        arch = case.split("-")[0]
        base = tf.AutoModelForCausalLM.from_pretrained(f"{root}/{arch}").eval()
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **kw))
        randomise(model)
        model.peft_config["default"].base_model_name_or_path = f"../{arch}"
        model.save_pretrained(f"{root}/{case}")
        with torch.no_grad():
            out["patterns"][case] = logprobs(model.eval(), ids, mask)
    return out


def check(adapter, merged, score, ids, mask):
    out = {}
    with torch.no_grad():
        if score:
            model = tf.AutoModelForSequenceClassification
        else:
            model = tf.AutoModelForCausalLM
        config = json.load(open(f"{adapter}/adapter_config.json"))
        base = model.from_pretrained(config["base_model_name_or_path"], **({"num_labels": 1} if score else {}))
        peft = PeftModel.from_pretrained(base, adapter).eval()
        virtual = config.get("num_virtual_tokens") or 0
        prefix = config.get("peft_type") == "PREFIX_TUNING"
        out["adapter"] = scores(peft, ids, mask) if score else logprobs(peft, ids, mask, virtual, prefix)
        if merged:
            plain = tf.AutoModelForCausalLM.from_pretrained(merged).eval()
            out["merged"] = logprobs(plain, ids, mask)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["make", "check"])
    ap.add_argument("--root")
    ap.add_argument("--tokenizer")
    ap.add_argument("--adapter")
    ap.add_argument("--merged")
    ap.add_argument("--score", action="store_true")
    ap.add_argument("--cases")
    ap.add_argument("--ids", required=True)
    args = ap.parse_args()
    ids, mask = load_ids(args.ids)
    if args.command == "make":
        result = make(args.root, args.tokenizer, ids, mask)
    elif args.cases:
        result = [check(c["adapter"], c.get("merged"), c.get("score", False), ids, mask)
                  for c in json.loads(args.cases)]
    else:
        result = check(args.adapter, args.merged, args.score, ids, mask)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
