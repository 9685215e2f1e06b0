//! Activation recomputation (gradient checkpointing) without autograd hooks: a forward
//! that records gradients runs the transformer blocks under `no_grad`, keeping only each
//! block's input, and hands the rest of the forward (final norm, head, loss) a leaf that
//! stands for the last block's output. After `loss.backward()` has put the loss's gradient
//! on that leaf, [`backward_blocks`] recomputes the blocks from the last to the first, each
//! with its graph, and backpropagates the gradient through it (`Σ y·g` has gradient `g`
//! with respect to `y`), ending in the graph of the first block's input (embeddings, soft
//! prompt, position embeddings). Parameter gradients are the stored-activation run's; the
//! memory held between forward and backward is one `[B, T, H]` tensor per block.

use tch::{Kind, Tensor};

use super::attention::Masking;

/// What a checkpointed forward keeps for its backward.
#[derive(Debug)]
pub(crate) struct Saved {
    /// The first block's input with its graph.
    pub first_input: Tensor,
    /// Each block's input, without graph.
    pub inputs: Vec<Tensor>,
    /// The leaf standing for the last block's output (its gradient arrives with the
    /// loss's backward).
    pub output: Tensor,
    pub positions: Tensor,
    pub masking: Masking,
    /// MoE models whose load-balancing loss applies: the forward's router logits.
    pub router: Option<RouterSaved>,
}

/// A checkpointed forward's router logits (no graph) and, once the load-balancing loss
/// has been weighed ([`super::Model::backward_router_aux_loss`]), the per-expert
/// coefficients c (with the token mask m) that make Σ_layers Σ_tokens Σ_e c_e·p_e·m the
/// weighted loss to the first order: the term each recomputed MoE block adds to its
/// backward.
#[derive(Debug)]
pub(crate) struct RouterSaved {
    pub logits: Vec<Tensor>,
    pub real: Tensor,
    pub coefficients: Option<Tensor>,
}

/// Runs `n` blocks (`block(i, x, masking)`) from `first_input` without keeping their
/// activations; the returned [`Saved`] holds each block's input and, as `output`, the last
/// block's output as a leaf that requires grad (what the rest of the forward builds on).
pub(crate) fn run_blocks(
    first_input: Tensor,
    positions: &Tensor,
    masking: Masking,
    n: usize,
    block: impl Fn(usize, &Tensor, &Masking) -> Tensor,
) -> Saved {
    let (output, inputs) = {
        let _guard = tch::no_grad_guard();
        let mut inputs = Vec::with_capacity(n);
        let mut x = first_input.detach();
        for i in 0..n {
            let y = block(i, &x, &masking);
            inputs.push(x);
            x = y;
        }
        (x.detach().set_requires_grad(true), inputs)
    };
    Saved {
        first_input,
        inputs,
        output,
        positions: positions.shallow_clone(),
        masking,
        router: None,
    }
}

/// Backpropagates the gradient on `saved.output` through the recomputed blocks into the
/// first input's graph. Nothing happens when the loss did not depend on this forward.
pub(crate) fn backward_blocks(saved: Saved, block: impl Fn(usize, &Tensor, &Masking) -> Tensor) {
    backward_blocks_with(saved, |i, x, masking| (block(i, x, masking), None));
}

/// [`backward_blocks`] where a recomputed block may also give a scalar of its own graph
/// that joins the loss (a MoE block's share of the load-balancing loss).
pub(crate) fn backward_blocks_with(
    saved: Saved,
    block: impl Fn(usize, &Tensor, &Masking) -> (Tensor, Option<Tensor>),
) {
    let mut grad = saved.output.grad();
    if !grad.defined() {
        return;
    }
    for (i, input) in saved.inputs.into_iter().enumerate().rev() {
        let x = input.set_requires_grad(true);
        let (y, term) = block(i, &x, &saved.masking);
        match term {
            Some(term) => ((&y * grad.detach()).sum(Kind::Float) + term).backward(),
            None => pull_back(&y, &grad),
        }
        grad = x.grad();
    }
    pull_back(&saved.first_input, &grad);
}

/// Accumulates `grad`'s pull-back through `y`'s graph into every leaf under it.
pub(crate) fn pull_back(y: &Tensor, grad: &Tensor) {
    if y.requires_grad() {
        (y * grad.detach()).sum(Kind::Float).backward();
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};
    use tch::{Device, Kind, Tensor};

    use crate::models::lora::{LoraConfig, TargetModules};
    use crate::models::prompt_tuning::{PromptInit, PromptTuningConfig};
    use crate::models::{Head, Model, ModelConfig, ModelOptions};
    use crate::ops::logprobs_of;

    fn gpt2() -> Value {
        json!({"model_type": "gpt2", "vocab_size": 23, "n_embd": 16, "n_layer": 3, "n_head": 2,
               "n_positions": 32})
    }

    fn llama() -> Value {
        json!({"model_type": "llama", "vocab_size": 23, "hidden_size": 16, "intermediate_size": 24,
               "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
               "tie_word_embeddings": false})
    }

    /// A model of `config` built with `opts`, with the weights of `like` when given (the
    /// global RNG is shared with tests running beside this one).
    fn model(config: &Value, opts: &ModelOptions, like: Option<&Model>) -> Model {
        let config = ModelConfig::from_json(config.clone(), std::path::Path::new("x")).unwrap();
        let model = Model::new(config, opts);
        let _guard = tch::no_grad_guard();
        let mut vars: Vec<_> = model.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, mut v) in vars {
            match like {
                Some(other) => {
                    v.copy_(&other.vs.variables()[&name]);
                }
                // LoRA's B starts at zero; give it values so A's gradient is not zero too.
                None if name.contains("lora_B") => {
                    v.copy_(&(Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.1));
                }
                None => {}
            }
        }
        model
    }

    /// Every gradient of one forward + backward, by variable name.
    fn gradients(model: &Model) -> Vec<(String, Tensor)> {
        let ids = Tensor::from_slice2(&[[3i64, 5, 7, 9, 11, 2], [0, 0, 4, 6, 8, 10]]);
        let mask = Tensor::from_slice2(&[[1i64, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]);
        let out = model.forward(&ids, &mask);
        let loss = match model.head {
            Head::Lm => -(logprobs_of(&out.narrow(1, 0, 5), &ids.narrow(1, 1, 5))
                * mask.narrow(1, 1, 5))
            .sum(Kind::Float),
            Head::Score => (out * &mask).square().sum(Kind::Float),
        };
        model.backward(&loss);
        let mut grads: Vec<(String, Tensor)> = model
            .vs
            .variables()
            .into_iter()
            .filter(|(_, v)| v.requires_grad())
            .map(|(n, v)| {
                let g = v.grad();
                (n, if g.defined() { g.copy() } else { g })
            })
            .collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        grads
    }

    /// Rank-2 LoRA on every linear layer, α 4.
    fn all_linear_lora() -> LoraConfig {
        LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: TargetModules::AllLinear,
            use_rslora: false,
            use_dora: false,
            patterns: Default::default(),
            init: Default::default(),
            modules_to_save: vec![],
            trainable_token_indices: vec![],
            target_parameters: vec![],
        }
    }

    /// Trainable tokens on a tied head: the chunked head's backward over more positions
    /// than one chunk gives the token rows (reached through the embedding and the head)
    /// the gradient of the direct computation.
    #[test]
    fn trainable_tokens_on_a_tied_head_get_every_chunks_gradient() {
        let mut config = llama();
        config["tie_word_embeddings"] = json!(true);
        let lora = LoraConfig {
            trainable_token_indices: vec![3, 5, 7],
            target_parameters: vec![],
            ..all_linear_lora()
        };
        let m = model(
            &config,
            &ModelOptions::cpu(Head::Lm).with_lora(Some(lora)),
            None,
        );
        let delta = m.named_tensors()["model.embed_tokens.token_adapter.trainable_tokens_delta"]
            .shallow_clone();
        // 2 × 640 positions: two chunks of the head's 1024.
        let t = 640;
        let ids = Tensor::randint(23, [2, t + 1], (Kind::Int64, Device::Cpu));
        let mask = ids.ones_like();
        let labels = ids.narrow(1, 1, t);
        let hidden = m.hidden(&ids, &mask, None).narrow(1, 0, t);
        let out = m.token_outputs(&hidden, &labels, Default::default());
        m.backward(&out.logprobs.sum(Kind::Float));
        let chunked = delta.grad().copy();
        let _ = delta.grad().zero_();
        let logits = m.forward(&ids, &mask).narrow(1, 0, t);
        m.backward(&logprobs_of(&logits, &labels).sum(Kind::Float));
        let direct = delta.grad();
        let scale = direct.abs().max().double_value(&[]);
        let diff = (&chunked - &direct).abs().max().double_value(&[]);
        assert!(
            scale > 0.0 && diff < 1e-5 * scale.max(1.0),
            "{diff:e} of {scale:e}"
        );
    }

    /// With and without recomputation: the same gradient for every trained tensor (1e-5),
    /// for GPT-2 and Llama, with an LM and a scalar head, LoRA, DoRA and prompt tuning.
    #[test]
    fn recomputed_blocks_give_the_stored_activations_gradients() {
        let lora = all_linear_lora();
        let prompt = PromptTuningConfig {
            num_virtual_tokens: 3,
            init: PromptInit::Random,
            kind: Default::default(),
        };
        let gemma2 = json!({"model_type": "gemma2", "vocab_size": 23, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 4, "sliding_window": 3,
            "attn_logit_softcapping": 1.0, "final_logit_softcapping": 2.0});
        let cases = [
            ("gpt2", gpt2(), ModelOptions::cpu(Head::Lm)),
            ("gemma2", gemma2, ModelOptions::cpu(Head::Lm)),
            ("llama", llama(), ModelOptions::cpu(Head::Lm)),
            ("llama score", llama(), ModelOptions::cpu(Head::Score)),
            (
                "gpt2 lora",
                gpt2(),
                ModelOptions::cpu(Head::Lm).with_lora(Some(lora.clone())),
            ),
            (
                "gpt2 dora",
                gpt2(),
                ModelOptions::cpu(Head::Lm).with_lora(Some(LoraConfig {
                    use_dora: true,
                    ..lora.clone()
                })),
            ),
            (
                "llama lora",
                llama(),
                ModelOptions::cpu(Head::Lm).with_lora(Some(lora)),
            ),
            (
                "llama prompt",
                llama(),
                ModelOptions::cpu(Head::Lm).with_prompt_tuning(Some(prompt)),
            ),
        ];
        for (name, config, opts) in cases {
            let plain = model(&config, &opts, None);
            let recomputing = ModelOptions {
                gradient_checkpointing: true,
                ..opts
            };
            let stored = gradients(&plain);
            let recomputed = gradients(&model(&config, &recomputing, Some(&plain)));
            assert_eq!(stored.len(), recomputed.len(), "{name}");
            assert!(!stored.is_empty(), "{name}");
            for ((n, a), (_, b)) in stored.iter().zip(&recomputed) {
                assert!(a.defined() && b.defined(), "{name}: {n} has no gradient");
                let diff = (a - b).abs().max().double_value(&[]);
                let size = a.abs().max().double_value(&[]);
                assert!(
                    diff < 1e-5,
                    "{name}: {n} differs by {diff:e} (max |g| {size:e})"
                );
            }
        }
    }
}
