//! Batched sampling from left-padded prompts with a KV cache: the prompt is run once, then
//! one token per step; no prefix is ever recomputed.
//!
//! Randomness comes from a `StdRng` seeded by the caller (one uniform per row and step,
//! inverse-CDF sampling on the device), so a seed reproduces its samples on a given device.

pub mod command;

use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};

use crate::models::{Head, Model};

#[derive(Debug, Clone)]
pub struct SamplingConfig {
    pub max_new_tokens: i64,
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep the `top_k` most likely tokens; 0 keeps all.
    pub top_k: i64,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f64,
    /// A row finishes at the first of these.
    pub eos_ids: Vec<i64>,
    /// Written after a row has finished.
    pub pad_id: i64,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Length => "length",
        }
    }
}

/// Sampled continuations, `[B, N]` with N ≤ `max_new_tokens`.
#[derive(Debug)]
pub struct Generation {
    /// Sampled tokens (the EOS included); `pad_id` after a row finished.
    pub tokens: Tensor,
    /// 1 on sampled tokens (EOS included), 0 after.
    pub mask: Tensor,
    /// Log-prob of each sampled token under `softmax(logits / temperature)` before top-k/p
    /// filtering (the distribution PPO trains), f32; 0 after a row finished.
    pub logprobs: Tensor,
    pub lengths: Vec<i64>,
    pub finish: Vec<FinishReason>,
}

/// On a GPU, how many steps pass between checks that every row has finished.
const STOP_CHECK: i64 = 8;

/// Samples continuations of `prompt_ids` (`[B, P]`, left-padded; `prompt_mask` 0 on pads).
pub fn generate(
    model: &Model,
    prompt_ids: &Tensor,
    prompt_mask: &Tensor,
    cfg: &SamplingConfig,
) -> Generation {
    let stop_check = if model.device().is_cuda() {
        STOP_CHECK
    } else {
        1
    };
    generate_checking_every(model, prompt_ids, prompt_mask, cfg, stop_check)
}

fn generate_checking_every(
    model: &Model,
    prompt_ids: &Tensor,
    prompt_mask: &Tensor,
    cfg: &SamplingConfig,
    stop_check: i64,
) -> Generation {
    assert_eq!(
        model.head,
        Head::Lm,
        "generation needs a language-model head"
    );
    let _guard = tch::no_grad_guard();
    let device = model.device();
    let (b, p) = prompt_ids.size2().unwrap();
    let n = cfg.max_new_tokens;
    // Everything the loop needs from the host is made here: the step loop itself never
    // waits for the device except to ask whether every row has finished, which it does
    // every step on the CPU (where it is free) and every STOP_CHECK steps on a GPU (so
    // kernel launches run ahead). Steps after the last row finished only add pad columns,
    // which are trimmed: the result is the same either way.
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let uniforms: Vec<f32> = (0..n * b).map(|_| rng.random::<f32>()).collect();
    let uniforms = Tensor::from_slice(&uniforms).view([n, b]).to_device(device);
    let eos = Tensor::from_slice(&cfg.eos_ids).to_device(device);
    let pad = Tensor::from(cfg.pad_id).to_device(device);
    let zero = Tensor::from(0f32).to_device(device);
    let ones = Tensor::ones([b, 1], (Kind::Int64, device));
    let mut cache = model.new_cache_with_capacity(p + n);
    let mut mask = prompt_mask.to_kind(Kind::Int64).to_device(device);
    let hidden = model.hidden(&prompt_ids.to_device(device), &mask, Some(&mut cache));
    let mut logits = model
        .head_output(&hidden.narrow(1, p - 1, 1))
        .squeeze_dim(1);

    let mut finished = Tensor::zeros([b], (Kind::Bool, device));
    let (mut tokens, mut alive, mut logprobs) = (vec![], vec![], vec![]);
    for step in 0..n {
        let (token, logprob) = sample(&logits, cfg, &uniforms.get(step));
        let running = finished.logical_not();
        let token = token.where_self(&running, &pad);
        let logprob = logprob.where_self(&running, &zero);
        alive.push(running);
        finished = finished.logical_or(&Tensor::isin(&token, &eos, false, false));
        tokens.push(token.shallow_clone());
        logprobs.push(logprob);
        if step + 1 == n || ((step + 1) % stop_check == 0 && finished.all().int64_value(&[]) == 1) {
            break;
        }
        mask = Tensor::cat(&[&mask, &ones], 1);
        let hidden = model.hidden(&token.unsqueeze(1), &mask, Some(&mut cache));
        logits = model.head_output(&hidden).squeeze_dim(1);
    }
    let mask = Tensor::stack(&alive, 1).to_kind(Kind::Int64);
    let lengths = Vec::<i64>::try_from(
        mask.sum_dim_intlist([1].as_slice(), false, Kind::Int64)
            .to_device(tch::Device::Cpu),
    )
    .unwrap();
    // Columns after the longest row are padding only (steps taken between stop checks).
    let width = lengths.iter().copied().max().unwrap_or(0).max(1);
    let tokens = Tensor::stack(&tokens, 1).narrow(1, 0, width);
    let mask = mask.narrow(1, 0, width);
    let logprobs = Tensor::stack(&logprobs, 1).narrow(1, 0, width);
    let ended = Vec::<bool>::try_from(finished.to_device(tch::Device::Cpu)).unwrap();
    let finish = ended
        .into_iter()
        .map(|e| {
            if e {
                FinishReason::Eos
            } else {
                FinishReason::Length
            }
        })
        .collect();
    Generation {
        tokens,
        mask,
        logprobs,
        lengths,
        finish,
    }
}

/// One token per row from `[B, V]` logits; `uniforms` `[B]` in [0, 1).
fn sample(logits: &Tensor, cfg: &SamplingConfig, uniforms: &Tensor) -> (Tensor, Tensor) {
    let logits = logits.to_kind(Kind::Float);
    if cfg.temperature <= 0.0 {
        let token = logits.argmax(-1, false);
        let logprob = crate::ops::logprobs_of(&logits, &token);
        return (token, logprob);
    }
    let logp = (&logits / cfg.temperature).log_softmax(-1, Kind::Float);
    let probs = logp.exp();
    let vocab = probs.size()[1];
    let filtering = (cfg.top_k > 0 && cfg.top_k < vocab) || cfg.top_p < 1.0;
    let (probs, order) = if filtering {
        let (sorted, order) = probs.sort(-1, true);
        let mut keep = Tensor::ones_like(&sorted).to_kind(Kind::Bool);
        if cfg.top_k > 0 {
            let rank = Tensor::arange(vocab, (Kind::Int64, sorted.device())).unsqueeze(0);
            keep = keep.logical_and(&rank.lt(cfg.top_k));
        }
        if cfg.top_p < 1.0 {
            // Keep a token while the mass before it is below top_p (the first always stays).
            let before = sorted.cumsum(-1, Kind::Float) - &sorted;
            keep = keep.logical_and(&before.lt(cfg.top_p));
        }
        (sorted * keep.to_kind(Kind::Float), Some(order))
    } else {
        (probs, None)
    };
    let cdf = probs.cumsum(-1, Kind::Float);
    let target = uniforms.unsqueeze(1) * cdf.narrow(1, vocab - 1, 1);
    let choice = cdf
        .lt_tensor(&target)
        .sum_dim_intlist([1].as_slice(), false, Kind::Int64)
        .clamp_max(vocab - 1);
    let token = match order {
        Some(order) => order.gather(1, &choice.unsqueeze(1), false).squeeze_dim(1),
        None => choice,
    };
    let logprob = logp.gather(1, &token.unsqueeze(1), false).squeeze_dim(1);
    (token, logprob)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: f64, top_k: i64, top_p: f64) -> SamplingConfig {
        SamplingConfig {
            max_new_tokens: 1,
            temperature,
            top_k,
            top_p,
            eos_ids: vec![],
            pad_id: 0,
            seed: 0,
        }
    }

    #[test]
    fn inverse_cdf_picks_the_right_bucket() {
        // probabilities 0.1, 0.2, 0.7
        let logits = Tensor::from_slice(&[0.1f32, 0.2, 0.7])
            .log()
            .unsqueeze(0)
            .repeat([3, 1]);
        let u = Tensor::from_slice(&[0.05f32, 0.25, 0.95]);
        let (tok, lp) = sample(&logits, &cfg(1.0, 0, 1.0), &u);
        assert_eq!(Vec::<i64>::try_from(tok).unwrap(), [0, 1, 2]);
        assert!((lp.double_value(&[2]) - 0.7f64.ln()).abs() < 1e-5);
    }

    #[test]
    fn top_k_and_top_p_exclude_the_tail() {
        let logits = Tensor::from_slice(&[0.1f32, 0.2, 0.7])
            .log()
            .unsqueeze(0)
            .repeat([2, 1]);
        let u = Tensor::from_slice(&[0.0f32, 0.999]);
        // top-k 1 and top-p 0.5 both leave only the 0.7 token.
        for c in [cfg(1.0, 1, 1.0), cfg(1.0, 0, 0.5)] {
            let (tok, _) = sample(&logits, &c, &u);
            assert_eq!(Vec::<i64>::try_from(tok).unwrap(), [2, 2]);
        }
        // top-p 0.8 keeps 0.7 and 0.2: u = 0.999 of their mass lands on 0.2.
        let (tok, _) = sample(&logits, &cfg(1.0, 0, 0.8), &u);
        assert_eq!(Vec::<i64>::try_from(tok).unwrap(), [2, 1]);
    }

    #[test]
    fn checking_for_the_end_less_often_changes_nothing() {
        tch::manual_seed(3);
        let config = serde_json::json!({"model_type": "llama", "vocab_size": 6, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "max_position_embeddings": 64});
        let config =
            crate::ModelConfig::from_json(config, std::path::Path::new("config.json")).unwrap();
        let model = Model::new(config, &crate::ModelOptions::cpu(Head::Lm));
        let ids = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 1, 2]).view([2, 4]);
        let mask = Tensor::from_slice(&[0i64, 1, 1, 1, 1, 1, 1, 1]).view([2, 4]);
        let cfg = SamplingConfig {
            max_new_tokens: 30,
            eos_ids: vec![0],
            seed: 11,
            ..cfg(1.0, 0, 1.0)
        };
        let every = generate_checking_every(&model, &ids, &mask, &cfg, 1);
        // Both rows finish early and at different steps, so the check matters.
        assert!(every.lengths.iter().all(|&l| l < 30), "{:?}", every.lengths);
        assert_ne!(every.lengths[0], every.lengths[1]);
        let sparse = generate_checking_every(&model, &ids, &mask, &cfg, 7);
        assert_eq!(every.lengths, sparse.lengths);
        assert!(every.tokens.equal(&sparse.tokens));
        assert!(every.mask.equal(&sparse.mask));
        assert!(every.logprobs.equal(&sparse.logprobs));
    }

    #[test]
    fn greedy_is_argmax() {
        let logits = Tensor::from_slice(&[1f32, 3., 2.]).unsqueeze(0);
        let (tok, _) = sample(&logits, &cfg(0.0, 0, 1.0), &Tensor::from_slice(&[0.5f32]));
        assert_eq!(tok.int64_value(&[0]), 1);
    }
}
