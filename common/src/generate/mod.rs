//! Batched sampling from left-padded prompts with a KV cache: the prompt is run once, then
//! one token per step; no prefix is recomputed, except once for Phi-3 with LongRoPE when
//! the sequence crosses its switch length (as `transformers` does, see
//! [`Decoder::restart`]).
//!
//! The decode step has fixed shapes and addresses: a static cache written at a slot held
//! on the device, a mask built from that slot, and every per-step result written in place
//! into buffers sized for the whole response. On CUDA the step is captured once per call
//! as a CUDA graph and replayed (one host call per token instead of a few hundred kernel
//! launches); elsewhere, or with `cuda_graph` off, the same step runs eagerly.
//!
//! Randomness comes from a `StdRng` seeded by the caller (one uniform per row and step,
//! drawn up front, inverse-CDF sampling on the device), so a seed reproduces its samples
//! on a given device, with or without graphs.

pub mod command;

use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};

use crate::cuda_graph::{self, CudaGraph};
use crate::models::{Head, KvCache, Masking, Model};

/// What can be wrong with the sampling filters `--top-p`, `--top-k`, `--min-p` and
/// `--repetition-penalty`, one line each, as every command that samples names them.
pub fn filter_problems(
    (top_p, top_k): (f64, i64),
    (min_p, repetition_penalty): (f64, f64),
) -> [(bool, &'static str); 4] {
    [
        (top_p > 0.0 && top_p <= 1.0, "--top-p must be in (0, 1]"),
        (top_k >= 0, "--top-k must be ≥ 0"),
        ((0.0..=1.0).contains(&min_p), "--min-p must be in [0, 1]"),
        (
            repetition_penalty > 0.0 && repetition_penalty.is_finite(),
            "--repetition-penalty must be > 0",
        ),
    ]
}

#[derive(Debug, Clone)]
pub struct SamplingConfig {
    pub max_new_tokens: i64,
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep the `top_k` most likely tokens; 0 keeps all.
    pub top_k: i64,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f64,
    /// Keep the tokens at least `min_p` times as likely as the most likely one
    /// (transformers' `min_p`); 0 keeps all.
    pub min_p: f64,
    /// transformers' `repetition_penalty` (CTRL, Keskar et al. 2019): the logit of every
    /// token already in the row (its prompt without padding, and what it sampled) is
    /// divided by it where positive and multiplied where negative, before the temperature
    /// and the filters; 1 is off.
    pub repetition_penalty: f64,
    /// A row finishes at the first of these.
    pub eos_ids: Vec<i64>,
    /// Written after a row has finished.
    pub pad_id: i64,
    pub seed: u64,
    /// On CUDA, replay the decode step as a CUDA graph (`--no-cuda-graph` turns it off).
    pub cuda_graph: bool,
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
    let b = prompt_ids.size()[0];
    generate_in_chunks(model, prompt_ids, prompt_mask, cfg, b as usize)
}

/// The seed's uniforms, `[N, B]`: step-major, so a row's numbers do not depend on how the
/// batch is split.
fn draw_uniforms(cfg: &SamplingConfig, b: i64) -> Tensor {
    let n = cfg.max_new_tokens;
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let uniforms: Vec<f32> = (0..n * b).map(|_| rng.random::<f32>()).collect();
    Tensor::from_slice(&uniforms).view([n, b])
}

/// [`generate`] over at most `chunk` rows at a time (`--generation-batch-size`): the same
/// tokens as one call, since each row keeps its uniforms and its padding.
pub fn generate_in_chunks(
    model: &Model,
    prompt_ids: &Tensor,
    prompt_mask: &Tensor,
    cfg: &SamplingConfig,
    chunk: usize,
) -> Generation {
    let b = prompt_ids.size()[0];
    generate_rows(model, prompt_ids, prompt_mask, cfg, chunk, (0, b))
}

/// [`generate_in_chunks`] for rows `offset..offset + B` of a batch of `total` rows (a
/// data-parallel rank's share): each row gets the uniforms it has in the whole batch, so
/// the ranks together sample what one process samples.
pub fn generate_rows(
    model: &Model,
    prompt_ids: &Tensor,
    prompt_mask: &Tensor,
    cfg: &SamplingConfig,
    chunk: usize,
    (offset, total): (i64, i64),
) -> Generation {
    let b = prompt_ids.size()[0];
    let uniforms = draw_uniforms(cfg, total).narrow(1, offset, b);
    generate_with(model, prompt_ids, prompt_mask, cfg, chunk, uniforms)
}

/// [`generate_in_chunks`] for the rows `rows` (in that order) of a batch of `total` rows:
/// each row gets the uniforms it has in the whole batch (a tool loop's continuations of
/// some rows).
pub fn generate_picked(
    model: &Model,
    prompt_ids: &Tensor,
    prompt_mask: &Tensor,
    cfg: &SamplingConfig,
    chunk: usize,
    (rows, total): (&[i64], i64),
) -> Generation {
    let uniforms = draw_uniforms(cfg, total).index_select(1, &Tensor::from_slice(rows));
    generate_with(model, prompt_ids, prompt_mask, cfg, chunk, uniforms)
}

/// Blocks of at most `chunk` rows, each row sampled with its column of `uniforms` (`[N, B]`).
fn generate_with(
    model: &Model,
    prompt_ids: &Tensor,
    prompt_mask: &Tensor,
    cfg: &SamplingConfig,
    chunk: usize,
    uniforms: Tensor,
) -> Generation {
    let stop_check = if model.device().is_cuda() {
        STOP_CHECK
    } else {
        1
    };
    let (b, chunk) = (prompt_ids.size()[0], chunk.max(1));
    let parts: Vec<Generation> = (0..b)
        .step_by(chunk)
        .map(|start| {
            let len = (chunk as i64).min(b - start);
            let rows = |t: &Tensor| t.narrow(0, start, len);
            let u = uniforms.narrow(1, start, len);
            generate_checking_every(
                model,
                &rows(prompt_ids),
                &rows(prompt_mask),
                cfg,
                stop_check,
                u,
            )
        })
        .collect();
    Generation::concat(parts, cfg.pad_id)
}

impl Generation {
    /// Row blocks of one batch as one generation (narrower blocks padded on the right).
    fn concat(parts: Vec<Generation>, pad_id: i64) -> Generation {
        if parts.len() == 1 {
            return parts.into_iter().next().expect("one part");
        }
        let width = parts.iter().map(|g| g.tokens.size()[1]).max().unwrap_or(1);
        let widen = |t: &Tensor, fill: f64| {
            let missing = width - t.size()[1];
            if missing == 0 {
                return t.shallow_clone();
            }
            let pad = Tensor::full([t.size()[0], missing], fill, (t.kind(), t.device()));
            Tensor::cat(&[t, &pad], 1)
        };
        let cat = |f: &dyn Fn(&Generation) -> Tensor| {
            Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0)
        };
        Generation {
            tokens: cat(&|g| widen(&g.tokens, pad_id as f64)),
            mask: cat(&|g| widen(&g.mask, 0.0)),
            logprobs: cat(&|g| widen(&g.logprobs, 0.0)),
            lengths: parts.iter().flat_map(|g| g.lengths.clone()).collect(),
            finish: parts.iter().flat_map(|g| g.finish.clone()).collect(),
        }
    }
}

fn generate_checking_every(
    model: &Model,
    prompt_ids: &Tensor,
    prompt_mask: &Tensor,
    cfg: &SamplingConfig,
    stop_check: i64,
    uniforms: Tensor,
) -> Generation {
    assert_eq!(
        model.head,
        Head::Lm,
        "generation needs a language-model head"
    );
    let _guard = tch::no_grad_guard();
    let n = cfg.max_new_tokens;
    let mut decoder = Decoder::prefill(model, prompt_ids, prompt_mask, cfg, uniforms);
    // Phi-3 with LongRoPE: the step whose input reaches past the switch length reruns the
    // whole sequence instead.
    let width = model.virtual_tokens() + prompt_ids.size()[1];
    let restart_at = model
        .rope_cache_reset()
        .map(|original| original + 1 - width)
        .filter(|&k| k >= 1 && k < n);
    // The loop never waits for the device except to ask whether every row has finished,
    // which it does every step on the CPU (where it is free) and every STOP_CHECK steps on
    // a GPU (so kernel launches run ahead). Steps after the last row finished only add pad
    // columns, which are trimmed: the result is the same either way.
    // MoE layers find each expert's tokens on the host, which a captured graph cannot.
    let use_graph =
        cfg.cuda_graph && model.device().is_cuda() && cuda_graph::available() && !model.is_moe();
    let mut graph: Option<CudaGraph> = None;
    // Capture once, and once more after a restart (the graph holds the old cache).
    let mut capture = use_graph;
    let mut step = 1;
    while step < n {
        if step % stop_check == 0 && decoder.finished.all().int64_value(&[]) == 1 {
            break;
        }
        if restart_at == Some(step) {
            graph = None;
            decoder.restart(prompt_ids, prompt_mask, step);
            capture = use_graph;
            step += 1;
        } else if let Some(graph) = &graph {
            graph.replay().unwrap_or_else(|e| panic!("{e}"));
            step += 1;
        } else if capture && n - step > 1 {
            capture = false;
            // The warm-up call is step 1; the recorded call is step 2, run by the first
            // replay. A capture that fails leaves the eager loop to carry on.
            let mut calls = 0;
            match CudaGraph::capture(|| {
                calls += 1;
                decoder.step();
            }) {
                Ok(g) => graph = Some(g),
                Err(e) => tracing::warn!("{e}; decoding without CUDA graphs"),
            }
            step += calls.min(1);
        } else {
            decoder.step();
            step += 1;
        }
    }
    drop(graph); // its memory pool back to the allocator before the results are read
    decoder.finish()
}

/// The decode state: the static cache and every input and output of a step as a device
/// tensor updated in place, so that a step never allocates a tensor another step reads.
struct Decoder<'a> {
    model: &'a Model,
    cfg: &'a SamplingConfig,
    cache: KvCache,
    /// `[B, S]`: keys a query may see (prompt padding false), S the cache's length.
    key_valid: Tensor,
    /// `[B, 1]` the last sampled token, the next step's input.
    token: Tensor,
    /// `[B, 1]` its position id, and `[1]` its cache slot.
    positions: Tensor,
    slot: Tensor,
    /// `[1]` the column being sampled.
    column: Tensor,
    /// `[N, B]` the uniforms, one per step and row.
    uniforms: Tensor,
    /// `[B, V]` with `--repetition-penalty`: the tokens each row has had so far.
    seen: Option<Tensor>,
    finished: Tensor,
    /// `[B, N]` results: tokens (pad where not sampled), log-probs, and whether the row
    /// was still running when the column was sampled.
    tokens: Tensor,
    logprobs: Tensor,
    alive: Tensor,
    eos: Tensor,
    pad: Tensor,
    zero: Tensor,
}

impl<'a> Decoder<'a> {
    /// Runs the prompts (one forward, filling the cache) and samples the first token.
    fn prefill(
        model: &'a Model,
        prompt_ids: &Tensor,
        prompt_mask: &Tensor,
        cfg: &'a SamplingConfig,
        uniforms: Tensor,
    ) -> Self {
        let device = model.device();
        let (b, p) = prompt_ids.size2().unwrap();
        let n = cfg.max_new_tokens;
        // Room for every position, rounded up to a multiple of 16 (aligned rows for the
        // fused attention kernels; the slots past the end stay masked).
        let virtual_tokens = model.virtual_tokens();
        let room = (virtual_tokens + p + n + 15) / 16 * 16 - virtual_tokens;
        let mut cache = model.new_cache_with_capacity(room);
        let mask = prompt_mask.to_kind(Kind::Int64).to_device(device);
        let hidden = model.hidden(&prompt_ids.to_device(device), &mask, Some(&mut cache));
        let logits = model
            .head_output(&hidden.narrow(1, p - 1, 1))
            .squeeze_dim(1);
        let generated = cache.buffer_len() - virtual_tokens - p;
        let ones = |width: i64| Tensor::ones([b, width], (Kind::Bool, device));
        let key_valid = Tensor::cat(
            &[
                ones(virtual_tokens),
                mask.to_kind(Kind::Bool),
                ones(generated),
            ],
            1,
        );
        let real = mask.sum_dim_intlist([1].as_slice(), true, Kind::Int64);
        let seen = (cfg.repetition_penalty != 1.0).then(|| {
            let vocab = logits.size()[1];
            Tensor::zeros([b, vocab], (Kind::Float, device))
                .scatter_add(1, &prompt_ids.to_device(device), &mask.to_kind(Kind::Float))
                .gt(0.0)
        });
        let int = |v: i64| Tensor::from_slice(&[v]).to_device(device);
        let mut decoder = Decoder {
            model,
            cfg,
            cache,
            key_valid,
            token: Tensor::zeros([b, 1], (Kind::Int64, device)),
            positions: real + virtual_tokens,
            slot: int(virtual_tokens + p),
            column: int(0),
            uniforms: uniforms.to_device(device),
            seen,
            finished: Tensor::zeros([b], (Kind::Bool, device)),
            tokens: Tensor::full([b, n], cfg.pad_id, (Kind::Int64, device)),
            logprobs: Tensor::zeros([b, n], (Kind::Float, device)),
            alive: Tensor::zeros([b, n], (Kind::Bool, device)),
            eos: Tensor::from_slice(&cfg.eos_ids).to_device(device),
            pad: Tensor::from(cfg.pad_id).to_device(device),
            zero: Tensor::from(0f32).to_device(device),
        };
        decoder.record(&logits);
        if n > 1 {
            decoder.cache.write_at(&decoder.slot);
        }
        decoder
    }

    /// Samples the current column from `logits` `[B, V]` and writes it everywhere.
    fn record(&mut self, logits: &Tensor) {
        let uniforms = self.uniforms.index_select(0, &self.column).squeeze_dim(0);
        let (token, logprob) = sample(logits, self.cfg, &uniforms, self.seen.as_ref());
        let running = self.finished.logical_not();
        let token = token.where_self(&running, &self.pad);
        let logprob = logprob.where_self(&running, &self.zero);
        let column = &self.column;
        let _ = self.tokens.index_copy_(1, column, &token.unsqueeze(1));
        let _ = self.logprobs.index_copy_(1, column, &logprob.unsqueeze(1));
        let _ = self.alive.index_copy_(1, column, &running.unsqueeze(1));
        // isin without a host sync: compare against every EOS id.
        let eos = token
            .unsqueeze(1)
            .eq_tensor(&self.eos.unsqueeze(0))
            .any_dim(1, false);
        let _ = self.finished.logical_or_(&eos);
        if let Some(seen) = &mut self.seen {
            // (A finished row marks its pad: nothing reads that row's sampling again.)
            let _ = seen.scatter_value_(1, &token.unsqueeze(1), 1);
        }
        self.token.copy_(&token.unsqueeze(1));
        let _ = self.column.g_add_scalar_(1);
    }

    /// `transformers`' Phi-3 rule for LongRoPE (`Phi3ForCausalLM.prepare_inputs_for_generation`):
    /// the step whose input sequence first reaches past `original_max_position_embeddings`
    /// drops the cache and runs the whole sequence so far (prompt and the `generated`
    /// tokens) again, so that every cached key is rotated with the long factors from then
    /// on; without it the prompt's keys would keep the short rotation. Samples column
    /// `generated` and leaves the state as [`Decoder::step`] does.
    fn restart(&mut self, prompt_ids: &Tensor, prompt_mask: &Tensor, generated: i64) {
        let device = self.model.device();
        let (b, p) = prompt_ids.size2().unwrap();
        let ids = Tensor::cat(
            &[
                prompt_ids.to_device(device),
                self.tokens.narrow(1, 0, generated),
            ],
            1,
        );
        let mask = Tensor::cat(
            &[
                prompt_mask.to_kind(Kind::Int64).to_device(device),
                Tensor::ones([b, generated], (Kind::Int64, device)),
            ],
            1,
        );
        let capacity = self.cache.buffer_len() - self.model.virtual_tokens();
        self.cache = self.model.new_cache_with_capacity(capacity);
        let hidden = self.model.hidden(&ids, &mask, Some(&mut self.cache));
        let logits = self
            .model
            .head_output(&hidden.narrow(1, p + generated - 1, 1))
            .squeeze_dim(1);
        self.record(&logits);
        let _ = self.slot.g_add_scalar_(1);
        let _ = self.positions.g_add_scalar_(1);
        if generated + 1 < self.cfg.max_new_tokens {
            self.cache.write_at(&self.slot);
        }
    }

    /// One decode step: the last token through the model at its slot, then sampling.
    fn step(&mut self) {
        let masking = self
            .model
            .masking(|w| Masking::at_slot(&self.key_valid, &self.slot, w, self.model.kind()));
        let logits =
            self.model
                .decode_logits(&self.token, &self.positions, &masking, &mut self.cache);
        self.record(&logits);
        let _ = self.slot.g_add_scalar_(1);
        let _ = self.positions.g_add_scalar_(1);
    }

    fn finish(self) -> Generation {
        let lengths = Vec::<i64>::try_from(
            self.alive
                .sum_dim_intlist([1].as_slice(), false, Kind::Int64)
                .to_device(tch::Device::Cpu),
        )
        .unwrap();
        // Columns after the longest row are padding only.
        let width = lengths.iter().copied().max().unwrap_or(0).max(1);
        let ended = Vec::<bool>::try_from(self.finished.to_device(tch::Device::Cpu)).unwrap();
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
            tokens: self.tokens.narrow(1, 0, width),
            mask: self.alive.narrow(1, 0, width).to_kind(Kind::Int64),
            logprobs: self.logprobs.narrow(1, 0, width),
            lengths,
            finish,
        }
    }
}

/// One token per row from `[B, V]` logits; `uniforms` `[B]` in [0, 1); `seen` `[B, V]` the
/// tokens `--repetition-penalty` applies to. The log-prob returned is the token's under
/// `softmax(logits / temperature)`, before the penalty and the filters (the distribution
/// PPO trains).
fn sample(
    logits: &Tensor,
    cfg: &SamplingConfig,
    uniforms: &Tensor,
    seen: Option<&Tensor>,
) -> (Tensor, Tensor) {
    let logits = logits.to_kind(Kind::Float);
    let shaped = match seen {
        Some(seen) => {
            let p = cfg.repetition_penalty;
            let penalised = (&logits * p).where_self(&logits.lt(0.0), &(&logits / p));
            penalised.where_self(seen, &logits)
        }
        None => logits.shallow_clone(),
    };
    if cfg.temperature <= 0.0 {
        let token = shaped.argmax(-1, false);
        let logprob = crate::ops::logprobs_of(&logits, &token);
        return (token, logprob);
    }
    let logp = (&logits / cfg.temperature).log_softmax(-1, Kind::Float);
    let probs = match seen {
        Some(_) => (&shaped / cfg.temperature).softmax(-1, Kind::Float),
        None => logp.exp(),
    };
    let vocab = probs.size()[1];
    let filtering = (cfg.top_k > 0 && cfg.top_k < vocab) || cfg.top_p < 1.0 || cfg.min_p > 0.0;
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
        if cfg.min_p > 0.0 {
            // Relative to the most likely token, which every filter keeps: the order of the
            // filters does not matter (transformers applies min-p after top-k and top-p).
            let floor = sorted.narrow(1, 0, 1) * cfg.min_p;
            keep = keep.logical_and(&sorted.ge_tensor(&floor));
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
            min_p: 0.0,
            repetition_penalty: 1.0,
            eos_ids: vec![],
            pad_id: 0,
            seed: 0,
            cuda_graph: true,
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
        let (tok, lp) = sample(&logits, &cfg(1.0, 0, 1.0), &u, None);
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
            let (tok, _) = sample(&logits, &c, &u, None);
            assert_eq!(Vec::<i64>::try_from(tok).unwrap(), [2, 2]);
        }
        // top-p 0.8 keeps 0.7 and 0.2: u = 0.999 of their mass lands on 0.2.
        let (tok, _) = sample(&logits, &cfg(1.0, 0, 0.8), &u, None);
        assert_eq!(Vec::<i64>::try_from(tok).unwrap(), [2, 1]);
        // min-p 0.2 keeps what is at least 0.14 likely (0.7 and 0.2), min-p 0.5 only 0.7.
        for (min_p, last) in [(0.2, 1), (0.5, 2)] {
            let c = SamplingConfig {
                min_p,
                ..cfg(1.0, 0, 1.0)
            };
            let (tok, lp) = sample(&logits, &c, &u, None);
            assert_eq!(
                Vec::<i64>::try_from(tok).unwrap(),
                [2, last],
                "min-p {min_p}"
            );
            // The log-prob is the unfiltered distribution's, as the rollout needs it.
            assert!((lp.double_value(&[0]) - 0.7f64.ln()).abs() < 1e-5);
        }
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
        let every = generate_checking_every(&model, &ids, &mask, &cfg, 1, draw_uniforms(&cfg, 2));
        // Both rows finish early and at different steps, so the check matters.
        assert!(every.lengths.iter().all(|&l| l < 30), "{:?}", every.lengths);
        assert_ne!(every.lengths[0], every.lengths[1]);
        let sparse = generate_checking_every(&model, &ids, &mask, &cfg, 7, draw_uniforms(&cfg, 2));
        assert_eq!(every.lengths, sparse.lengths);
        assert!(every.tokens.equal(&sparse.tokens));
        assert!(every.mask.equal(&sparse.mask));
        assert!(every.logprobs.equal(&sparse.logprobs));
    }

    /// Today's decode before the static cache: a cache that grows by one position per
    /// step and a mask extended by a column each time (the reference for the static one);
    /// the repetition penalty's tokens kept in host lists.
    fn growing_cache_decode(
        model: &Model,
        ids: &Tensor,
        mask: &Tensor,
        cfg: &SamplingConfig,
    ) -> (Tensor, Tensor) {
        let _guard = tch::no_grad_guard();
        let (b, n) = (ids.size()[0], cfg.max_new_tokens);
        let uniforms = draw_uniforms(cfg, b);
        let mut cache = model.new_cache();
        let mut mask = mask.shallow_clone();
        let hidden = model.hidden(ids, &mask, Some(&mut cache));
        let mut logits = model.head_output(&hidden.select(1, -1));
        let mut finished = Tensor::zeros([b], (Kind::Bool, tch::Device::Cpu));
        let eos = Tensor::from_slice(&cfg.eos_ids);
        let (mut tokens, mut logprobs) = (vec![], vec![]);
        // Each row's tokens so far (prompt without padding, then samples), for the penalty.
        let mut history: Vec<Vec<i64>> = (0..b)
            .map(|r| {
                let (row, m) = (ids.get(r), mask.get(r));
                (0..row.size()[0])
                    .filter(|&i| m.int64_value(&[i]) == 1)
                    .map(|i| row.int64_value(&[i]))
                    .collect()
            })
            .collect();
        for step in 0..n {
            let vocab = logits.size()[1];
            let seen: Vec<bool> = history
                .iter()
                .flat_map(|h| (0..vocab).map(move |v| h.contains(&v)))
                .collect();
            let seen = Tensor::from_slice(&seen).view([b, vocab]);
            let penalty = (cfg.repetition_penalty != 1.0).then_some(&seen);
            let (token, logprob) = sample(&logits, cfg, &uniforms.get(step), penalty);
            for (r, h) in history.iter_mut().enumerate() {
                h.push(token.int64_value(&[r as i64]));
            }
            let running = finished.logical_not();
            let token = token.where_self(&running, &Tensor::from(cfg.pad_id));
            logprobs.push(logprob.where_self(&running, &Tensor::from(0f32)));
            finished = finished.logical_or(&Tensor::isin(&token, &eos, false, false));
            tokens.push(token.shallow_clone());
            if finished.all().int64_value(&[]) == 1 {
                break;
            }
            mask = Tensor::cat(
                &[
                    &mask,
                    &Tensor::ones([b, 1], (Kind::Int64, tch::Device::Cpu)),
                ],
                1,
            );
            let hidden = model.hidden(&token.unsqueeze(1), &mask, Some(&mut cache));
            logits = model.head_output(&hidden.select(1, -1));
        }
        (Tensor::stack(&tokens, 1), Tensor::stack(&logprobs, 1))
    }

    fn tiny(model_type: &str, extra: serde_json::Value) -> Model {
        tch::manual_seed(5);
        let mut config = serde_json::json!({"model_type": model_type, "vocab_size": 7,
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
            "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 64});
        config
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let config =
            crate::ModelConfig::from_json(config, std::path::Path::new("config.json")).unwrap();
        Model::new(config, &crate::ModelOptions::cpu(Head::Lm))
    }

    #[test]
    fn static_cache_decodes_as_the_growing_cache_did() {
        let models = [
            tiny("llama", serde_json::json!({})),
            tiny("gpt2", serde_json::json!({})),
            tiny("mistral", serde_json::json!({"sliding_window": 5})),
            // Sliding and global layers; Gemma 2's soft-capped attention over the static
            // cache's additive mask.
            tiny(
                "gemma2",
                serde_json::json!({"sliding_window": 3, "head_dim": 4,
                                   "attn_logit_softcapping": 1.0, "final_logit_softcapping": 2.0}),
            ),
            tiny(
                "gemma3_text",
                serde_json::json!({"sliding_window": 3, "head_dim": 4, "sliding_window_pattern": 2}),
            ),
        ];
        // Left padding of 0, 2 and 3 positions.
        let ids =
            Tensor::from_slice(&[1i64, 2, 3, 4, 5, 0, 0, 3, 4, 1, 0, 0, 0, 6, 2]).view([3, 5]);
        let mask = ids.ne(0).to_kind(Kind::Int64);
        let mut early = 0;
        for model in &models {
            let cases = [
                (0.0, 1.0, 1.0),
                (1.0, 1.0, 1.0),
                (0.8, 0.9, 1.0),
                (0.0, 1.0, 1.3),
                (1.0, 1.0, 0.7),
            ];
            for (temperature, top_p, repetition_penalty) in cases {
                let cfg = SamplingConfig {
                    max_new_tokens: 12,
                    eos_ids: vec![6],
                    seed: 17,
                    repetition_penalty,
                    ..cfg(temperature, 0, top_p)
                };
                let (want_tokens, want_logprobs) = growing_cache_decode(model, &ids, &mask, &cfg);
                let got = generate(model, &ids, &mask, &cfg);
                let width = want_tokens.size()[1];
                assert_eq!(got.tokens.size()[1], width);
                assert!(
                    got.tokens.equal(&want_tokens),
                    "{:?} t={temperature}: {} vs {}",
                    model.config.model_type,
                    got.tokens,
                    want_tokens
                );
                let diff = (&got.logprobs - want_logprobs)
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(diff < 1e-5, "{diff}");
                early += got
                    .finish
                    .iter()
                    .filter(|f| **f == FinishReason::Eos)
                    .count();
            }
        }
        assert!(early >= 3, "rows ending at EOS: {early}");
    }

    /// `--generation-batch-size`: blocks of rows sample what the whole batch samples.
    #[test]
    fn chunked_generation_equals_one_call() {
        let model = tiny("llama", serde_json::json!({}));
        let ids =
            Tensor::from_slice(&[1i64, 2, 3, 4, 5, 0, 0, 3, 4, 1, 0, 0, 0, 6, 2]).view([3, 5]);
        let mask = ids.ne(0).to_kind(Kind::Int64);
        let cfg = SamplingConfig {
            max_new_tokens: 10,
            eos_ids: vec![6],
            seed: 4,
            ..cfg(1.0, 0, 1.0)
        };
        let whole = generate(&model, &ids, &mask, &cfg);
        let chunked = generate_in_chunks(&model, &ids, &mask, &cfg, 2);
        assert_eq!(whole.lengths, chunked.lengths);
        assert!(
            whole.tokens.equal(&chunked.tokens),
            "{} vs {}",
            whole.tokens,
            chunked.tokens
        );
        assert!(whole.mask.equal(&chunked.mask));
        assert!(whole
            .logprobs
            .allclose(&chunked.logprobs, 1e-5, 1e-6, false));
    }

    #[test]
    fn greedy_is_argmax() {
        let logits = Tensor::from_slice(&[1f32, 3., 2.]).unsqueeze(0);
        let (tok, _) = sample(
            &logits,
            &cfg(0.0, 0, 1.0),
            &Tensor::from_slice(&[0.5f32]),
            None,
        );
        assert_eq!(tok.int64_value(&[0]), 1);
    }

    /// The penalty divides a seen token's positive logit and multiplies a negative one
    /// (3 → 1.5, −1 → −2 at 2), leaves unseen ones, and the log-prob stays the
    /// unpenalised distribution's.
    #[test]
    fn repetition_penalty_shapes_what_is_sampled_not_the_logprob() {
        let logits = Tensor::from_slice(&[3f32, -1., 2.]).unsqueeze(0);
        let seen = Tensor::from_slice(&[true, true, false]).unsqueeze(0);
        let c = SamplingConfig {
            repetition_penalty: 2.0,
            ..cfg(0.0, 0, 1.0)
        };
        let u = Tensor::from_slice(&[0.5f32]);
        let (tok, lp) = sample(&logits, &c, &u, Some(&seen));
        assert_eq!(tok.int64_value(&[0]), 2);
        let want = logits.log_softmax(-1, Kind::Float).double_value(&[0, 2]);
        assert!((lp.double_value(&[0]) - want).abs() < 1e-6);
        // Sampling: probabilities ∝ e^1.5, e^−2, e^2; u = 0.3 lands on token 0.
        let c = SamplingConfig {
            repetition_penalty: 2.0,
            ..cfg(1.0, 0, 1.0)
        };
        let z = 1.5f64.exp() + (-2f64).exp() + 2f64.exp();
        let first = 1.5f64.exp() / z;
        for (u, want) in [(first - 1e-3, 0), (first + 1e-3, 1)] {
            let u = Tensor::from_slice(&[u as f32]);
            let (tok, _) = sample(&logits, &c, &u, Some(&seen));
            assert_eq!(tok.int64_value(&[0]), want, "u {u}");
        }
    }
}
