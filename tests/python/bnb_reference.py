"""bitsandbytes' side of the QLoRA tests: tiny random models loaded in 4 bits by
`transformers` (BitsAndBytesConfig, f32 compute, CPU), their log-probs, the same models
saved quantized, and PEFT's log-probs of adapters on the 4-bit bases.

    bnb_reference.py make --root DIR --tokenizer DIR --ids IDS.json
        DIR/<case>/        a tiny random model (f32) + tokenizer files, for each of CASES
        DIR/<case>-4bit/   it loaded in 4 bits and saved (bitsandbytes' tensors and
                           quantization_config)
        prints {case: logprobs of the 4-bit model}
    bnb_reference.py check --adapter DIR --case CASE --ids IDS.json
        the adapter (PEFT's directory) on its base loaded in 4 bits as CASE says;
        prints its log-probs
    bnb_reference.py adam8 --steps IN.safetensors --out OUT.safetensors --lr LR --wd WD
        bitsandbytes' AdamW8bit (betas 0.9, 0.999, eps 1e-8, weight decay WD but on biases)
        from IN's `param.<name>` with its `grad.<name>.<step>` gradients; OUT: every parameter after the steps and its
        state (`state1`, `absmax1`, `state2`, `absmax2`, `.<name>`)

IDS.json: {"ids": [[...]], "mask": [[...]]}, right-padded; log-probs of each next token.
bitsandbytes' AVX-512-BF16 inference path (a bf16 kernel) is switched off, so that every
layer runs its reference path: dequantize in f32, then `linear`. Every layer's inputs are a
multiple of the block size (64): bitsandbytes 0.50.2's CPU dequantization kernel takes the
blocks row by row, which differs from its CUDA kernels' (and its own quantization's)
blocks over the whole flattened weight when a row holds part of a block.
"""
import argparse
import json
import shutil

import torch
import transformers as tf

VOCAB = 320

# case: (architecture config, bnb_4bit_quant_type, bnb_4bit_use_double_quant)
CASES = {
    "llama": (
        lambda common: tf.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=64,
            initializer_range=0.1, **common),
        "nf4", True),
    "gpt2": (
        lambda common: tf.GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     initializer_range=0.1, **common),
        "fp4", False),
}


def bnb_config(case):
    _, quant_type, nested = CASES[case]
    return tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                 bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=nested)


def reference_path(model):
    for module in model.modules():
        if hasattr(module, "in_features") and hasattr(module.weight, "quant_state"):
            assert module.in_features % 64 == 0, module
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def load_4bit(path, case):
    model = tf.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb_config(case), device_map="cpu", dtype=torch.float32)
    return reference_path(model.eval())


def logprobs(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    logp = logits[:, :-1].log_softmax(-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1).tolist()


def load_ids(path):
    case = json.load(open(path))
    return torch.tensor(case["ids"]), torch.tensor(case["mask"])


def make(root, tokenizer, ids, mask):
    torch.manual_seed(0)
    out = {}
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    for case, (config, _, _) in CASES.items():
        base = tf.AutoModelForCausalLM.from_config(config(common), attn_implementation="eager")
        base.save_pretrained(f"{root}/{case}")
        model = load_4bit(f"{root}/{case}", case)
        out[case] = logprobs(model, ids, mask)
        model.save_pretrained(f"{root}/{case}-4bit")
        for d in [case, f"{case}-4bit"]:
            for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]:
                try:
                    shutil.copy(f"{tokenizer}/{f}", f"{root}/{d}/{f}")
                except FileNotFoundError:
                    pass
    return out


def check(adapter, case, ids, mask):
    from peft import PeftModel

    base_dir = json.load(open(f"{adapter}/adapter_config.json"))["base_model_name_or_path"]
    model = PeftModel.from_pretrained(load_4bit(base_dir, case), adapter)
    return logprobs(reference_path(model.eval()), ids, mask)


def adam8(steps_path, out_path, lr, wd):
    import bitsandbytes as bnb
    from safetensors.torch import load_file, save_file

    given = load_file(steps_path)
    names = sorted(k.removeprefix("param.") for k in given if k.startswith("param."))
    params = {n: torch.nn.Parameter(given[f"param.{n}"].clone()) for n in names}
    # No weight decay on biases, as ours (and transformers' Trainer) groups them.
    groups = [{"params": [p for n, p in params.items() if not n.endswith("bias")], "weight_decay": wd},
              {"params": [p for n, p in params.items() if n.endswith("bias")], "weight_decay": 0.0}]
    opt = bnb.optim.AdamW8bit(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    steps = 1 + max(int(k.rsplit(".", 1)[1]) for k in given if k.startswith("grad."))
    for step in range(steps):
        for n, p in params.items():
            p.grad = given[f"grad.{n}.{step}"].clone()
        opt.step()
    out = {}
    for n, p in params.items():
        out[f"param.{n}"] = p.detach().clone()
        for key in ["state1", "absmax1", "state2", "absmax2"]:
            if key in opt.state[p]:
                out[f"{key}.{n}"] = opt.state[p][key].clone()
    save_file(out, out_path)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["make", "check", "adam8"])
    p.add_argument("--steps")
    p.add_argument("--out")
    p.add_argument("--lr", type=float)
    p.add_argument("--wd", type=float)
    p.add_argument("--root")
    p.add_argument("--tokenizer")
    p.add_argument("--adapter")
    p.add_argument("--case")
    p.add_argument("--ids")
    a = p.parse_args()
    if a.cmd == "adam8":
        adam8(a.steps, a.out, a.lr, a.wd)
        print(json.dumps({}))
        return
    ids, mask = load_ids(a.ids)
    if a.cmd == "make":
        print(json.dumps(make(a.root, a.tokenizer, ids, mask)))
    else:
        print(json.dumps(check(a.adapter, a.case, ids, mask)))


if __name__ == "__main__":
    main()
