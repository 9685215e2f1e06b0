"""Independent reference computations with `transformers`, for the Rust parity tests.

    reference.py make  --root DIR --cases CASES.json   build tiny random models, save them
                                                      under DIR/<name>, print references
    reference.py check --root DIR --cases CASES.json   load what the Rust side saved under
                                                      DIR/<name>-saved-{lm,score}, print outputs

CASES.json: {"batches": {name: {"ids": [[...]], "mask": [[...]]}}, "prompts": {"ids", "mask"},
            "repetition_penalty": p,
"max_new_tokens": N}. Output: one JSON document on stdout.
"""
import argparse
import json
import sys

import torch
import transformers as tf

VOCAB = 97


def configs():
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {
        "gpt2": tf.GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4, initializer_range=0.1, **common),
        # Llama with attention_bias (q/k/v and o biases) and mlp_bias.
        "llama": tf.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=64,
            initializer_range=0.1, attention_bias=True, mlp_bias=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16},
            **common),
        "qwen2": tf.Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64,
            initializer_range=0.1, **common),
        # Qwen3: q/k norms per head, an explicit head_dim different from hidden / heads.
        "qwen3": tf.Qwen3Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
            max_position_embeddings=64, initializer_range=0.1, **common),
        # Phi-3: fused qkv_proj and gate_up_proj, partial rotary (Phi-4-mini's), a sliding
        # window shorter than the inputs.
        "phi3": tf.Phi3Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, partial_rotary_factor=0.5, sliding_window=7,
            tie_word_embeddings=False, max_position_embeddings=64, initializer_range=0.1,
            resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **common),
        # Phi-3 128k-style LongRoPE: per-frequency short and long factors switching at
        # original_max_position_embeddings 8, inside the test batches (all long) and inside
        # greedy generation (the prompts start short and cross it), with the attention
        # factor of max/original = 8.
        "phi3_longrope": tf.Phi3Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, partial_rotary_factor=0.5, tie_word_embeddings=False,
            max_position_embeddings=64, original_max_position_embeddings=8,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                             "short_factor": [1.0, 1.3, 1.7, 2.0], "long_factor": [1.5, 2.5, 4.0, 6.0]},
            initializer_range=0.1, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **common),
        "mistral": tf.MistralConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, sliding_window=6, max_position_embeddings=64,
            initializer_range=0.1, **common),
        # Gemma: Llama's block with (1 + w) norms, scaled embeddings, GeGLU from the legacy
        # hidden_act "gelu" (the tanh approximation), head_dim unlike hidden / heads, MQA.
        "gemma": tf.GemmaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=24, hidden_act="gelu", max_position_embeddings=64,
            initializer_range=0.1, **common),
        # Gemma 2: (1 + w) norms, scaled embeddings, GeGLU, pre/post norms, soft-capped
        # attention and final logits (caps small enough to bite), query_pre_attn_scalar
        # unlike head_dim, sliding (even) and global layers with a window shorter than the
        # inputs, GQA, tied embeddings.
        "gemma2": tf.Gemma2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20, sliding_window=5,
            attn_logit_softcapping=1.5, final_logit_softcapping=3.0, max_position_embeddings=64,
            initializer_range=0.1, **common),
        # Gemma 3: q/k norms, a global layer every 3rd (sliding_window_pattern), separate
        # rotary bases (linear scaling on the global ones), attn_logit_softcapping set but
        # ignored (as transformers does), untied embeddings, one KV head.
        "gemma3_text": tf.Gemma3TextConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=1, head_dim=24, query_pre_attn_scalar=20, sliding_window=5,
            sliding_window_pattern=3, attn_logit_softcapping=1.0, final_logit_softcapping=3.0,
            tie_word_embeddings=False, max_position_embeddings=64, initializer_range=0.1,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
            **common),
        # Mixtral: 4 experts, top 2 renormalised, a sliding window shorter than the inputs.
        "mixtral": tf.MixtralConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=7,
            tie_word_embeddings=False, max_position_embeddings=64, initializer_range=0.1, **common),
        # Qwen3-MoE: q/k norms, 6 experts of their own width, top 3 not renormalised, the
        # second layer a dense MLP (mlp_only_layers).
        "qwen3_moe": tf.Qwen3MoeConfig(
            hidden_size=64, intermediate_size=128, moe_intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=6,
            num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[1],
            tie_word_embeddings=False, max_position_embeddings=64, initializer_range=0.1, **common),
        # YaRN on Qwen3: factor 4 over an original length of 16, inside the batches and
        # inside greedy generation, partial truncation of the ramp, the default attention
        # factor (0.1·ln 4 + 1).
        "qwen3_yarn": tf.Qwen3Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
            max_position_embeddings=64, initializer_range=0.1,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 16},
            **common),
        # YaRN with DeepSeek's mscale / mscale_all_dim attention factor and other betas,
        # untruncated (the ramp runs over dimensions 0 to 4.03, fractional ends), on Llama.
        "llama_yarn": tf.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=64,
            initializer_range=0.1,
            rope_parameters={"rope_type": "yarn", "rope_theta": 100.0, "factor": 8.0,
                             "original_max_position_embeddings": 32, "mscale": 1.0,
                             "mscale_all_dim": 0.5, "beta_fast": 16.0, "beta_slow": 0.5,
                             "truncate": False},
            **common),
        # Qwen2-MoE: q/k/v biases, 4 experts of their own width, top 2 renormalised, a
        # gated shared expert, the first layer dense (decoder_sparse_step 2).
        "qwen2_moe": tf.Qwen2MoeConfig(
            hidden_size=64, intermediate_size=128, moe_intermediate_size=40,
            shared_expert_intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
            decoder_sparse_step=2, tie_word_embeddings=False, max_position_embeddings=64,
            initializer_range=0.1, **common),
        # OLMoE: q/k norms over all heads, clipped q/k/v, 5 experts, top 2 not renormalised.
        "olmoe": tf.OlmoeConfig(
            hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts=5, num_experts_per_tok=2, clip_qkv=0.5,
            tie_word_embeddings=False, max_position_embeddings=64, initializer_range=0.1, **common),
        # gpt-oss: attention sinks, q/k/v/o biases, sliding (even) and full layers with a
        # window shorter than the inputs, a biased router over 4 fused experts (top 2), the
        # clamped SwiGLU with a limit that bites, YaRN (untruncated), f32-scaled norms.
        "gpt_oss": tf.GptOssConfig(
            hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
            sliding_window=5, swiglu_limit=1.0, tie_word_embeddings=False,
            max_position_embeddings=64, initializer_range=0.1,
            rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                             "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": 16},
            **common),
        # SmolLM3: every 2nd layer without rotary (NoPE), those sliding with a window of 5
        # (use_sliding_window), tied embeddings by default, attention and MLP biases.
        "smollm3": tf.SmolLM3Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, no_rope_layer_interval=2, use_sliding_window=True,
            sliding_window=5, attention_bias=True, mlp_bias=True, max_position_embeddings=64,
            initializer_range=0.1, **common),
        # OLMo 2: norms after the attention and the MLP (none before), q/k norms over all
        # heads, biases with attention_bias.
        "olmo2": tf.Olmo2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False,
            max_position_embeddings=64, initializer_range=0.1, **common),
        # OLMo 3: OLMo 2's layer, three sliding layers (window 5) then a full one, each
        # kind with its own rotary set (YaRN on the full layers, another base on the
        # sliding ones).
        "olmo3": tf.Olmo3Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, sliding_window=5, tie_word_embeddings=False,
            max_position_embeddings=64, initializer_range=0.1,
            rope_parameters={
                "full_attention": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 16},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
            **common),
        # Granite: its four multipliers (embeddings, block outputs, attention scores, and
        # the logits' divisor), tied embeddings, attention and MLP biases.
        "granite": tf.GraniteConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, embedding_multiplier=3.0, residual_multiplier=0.5,
            attention_multiplier=0.1, logits_scaling=2.5, attention_bias=True, mlp_bias=True,
            tie_word_embeddings=True, max_position_embeddings=64, initializer_range=0.1, **common),
    }


MOE = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss")
ROUTERS = (".gate.weight", ".router.weight")
# transformers has no sequence-classification class for these.
NO_SCORE = ("olmoe", "granite")


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def token_logprobs(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits.float()
    logp = logits[:, :-1].log_softmax(-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def batch(case):
    return torch.tensor(case["ids"]), torch.tensor(case["mask"])


def make(root, cases):
    torch.manual_seed(0)
    out = {}
    for name, config in configs().items():
        # eager attention: an implementation independent of the SDPA kernel we call.
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        with torch.no_grad():
            # Random norms and biases, so that every parameter matters to the comparison.
            for pname, p in model.named_parameters():
                if pname.endswith("bias") or "norm" in pname or "ln_" in pname:
                    p.add_(torch.randn_like(p) * 0.2)
                if pname.endswith(ROUTERS):  # MoE routers: decisive top-k choices
                    p.copy_(torch.randn_like(p))
                if pname.endswith("sinks"):  # gpt-oss's sinks: a share that matters
                    p.copy_(torch.randn_like(p))
        model.save_pretrained(f"{root}/{name}")
        res = {"logprobs": {}}
        with torch.no_grad():
            for bname, case in cases["batches"].items():
                ids, mask = batch(case)
                res["logprobs"][bname] = token_logprobs(model, ids, mask).tolist()
            if name in MOE:
                # transformers' load_balancing_loss_func over the padded batch's real tokens.
                ids, mask = batch(cases["batches"]["right"])
                out_ = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                             output_router_logits=True)
                res["aux_loss"] = out_.aux_loss.item()
                # The gradient of the first layer's router for the next-token NLL (mean over real
                # targets) plus 0.5 × aux_loss.
                with torch.enable_grad():
                    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                                   output_router_logits=True)
                    logp = logits.logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                    valid = (mask[:, :-1] * mask[:, 1:]).float()
                    total = -(logp * valid).sum() / valid.sum() + 0.5 * logits.aux_loss
                    router = next(p for n, p in model.named_parameters() if n.endswith(ROUTERS))
                    res["router_grad"] = torch.autograd.grad(total, router)[0].tolist()
            ids, mask = batch(cases["prompts"])
            gen = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False,
                max_new_tokens=cases["max_new_tokens"], min_new_tokens=cases["max_new_tokens"],
                eos_token_id=None, pad_token_id=0)
            res["greedy"] = gen[:, ids.shape[1]:].tolist()
            # With repetition_penalty, row by row without padding: transformers penalises
            # every id of input_ids, the pad id of a left-padded row included; ours only a
            # row's own tokens.
            res["greedy_repetition_penalty"] = []
            for row_ids, row_mask in zip(ids, mask):
                real = row_ids[row_mask.bool()].unsqueeze(0)
                gen = model.generate(
                    input_ids=real, attention_mask=torch.ones_like(real), do_sample=False,
                    repetition_penalty=cases["repetition_penalty"],
                    max_new_tokens=cases["max_new_tokens"], min_new_tokens=cases["max_new_tokens"],
                    eos_token_id=None, pad_token_id=0)
                res["greedy_repetition_penalty"].append(gen[0, real.shape[1]:].tolist())
        out[name] = res
    out["gpt_oss_mxfp4"] = mxfp4_variant(root, cases)
    return out


def mxfp4_variant(root, cases):
    """gpt-oss with its experts stored as MXFP4 (random codes, scales near 1/16), as the
    released checkpoints are: transformers dequantizes them on the CPU. The log-probs of
    that model."""
    import os
    import safetensors.torch as st

    g = torch.Generator().manual_seed(5)
    stored = {}
    for key, t in st.load_file(f"{root}/gpt_oss/model.safetensors").items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, cols, rows = t.shape
            stored[key + "_blocks"] = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
            stored[key + "_scales"] = torch.randint(121, 126, (experts, rows, cols // 32), generator=g, dtype=torch.uint8)
        else:
            stored[key] = t
    out_dir = f"{root}/gpt_oss_mxfp4"
    os.makedirs(out_dir, exist_ok=True)
    st.save_file(stored, f"{out_dir}/model.safetensors", metadata={"format": "pt"})
    config = json.load(open(f"{root}/gpt_oss/config.json"))
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }
    json.dump(config, open(f"{out_dir}/config.json", "w"))
    model = tf.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    ids, mask = batch(cases["batches"]["right"])
    with torch.no_grad():
        return {"logprobs": {"right": token_logprobs(model, ids, mask).tolist()}}


def check(root, cases):
    out = {}
    for name in configs():
        lm = tf.AutoModelForCausalLM.from_pretrained(f"{root}/{name}-saved-lm").eval()
        if name in NO_SCORE:
            ids, mask = batch(cases["batches"]["right"])
            with torch.no_grad():
                out[name] = {"logprobs": token_logprobs(lm, ids, mask).tolist()}
            continue
        score = tf.AutoModelForSequenceClassification.from_pretrained(f"{root}/{name}-saved-score").eval()
        # `architectures` must name the class transformers itself would (vLLM looks it up).
        for model in (lm, score):
            named = model.config.architectures[0]
            assert named == type(model).__name__, f"{name}: config names {named}, transformers uses {type(model).__name__}"
        ids, mask = batch(cases["batches"]["right"])
        with torch.no_grad():
            out[name] = {
                "logprobs": token_logprobs(lm, ids, mask).tolist(),
                # pad_token_id 0 never occurs in the inputs: the score is read at each
                # row's last real token.
                "scores": score(input_ids=ids, attention_mask=mask).logits[:, 0].tolist(),
            }
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["make", "check"])
    ap.add_argument("--root", required=True)
    ap.add_argument("--cases", required=True)
    args = ap.parse_args()
    cases = json.load(open(args.cases))
    result = make(args.root, cases) if args.command == "make" else check(args.root, cases)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
