//! Direct preference optimisation (Rafailov et al. 2023): the policy trained on preference
//! pairs against a frozen reference, with the reward model implicit. The reward stage's
//! preference data, the SFT model as policy and reference, the shared training unit.
//!
//! This file holds what `train` and `eval` share: where the reference's log-probs come
//! from, and one pass over pairs in micro-batches (forward, loss, metrics, and backward
//! when training). `kto` holds the unpaired losses' pass (KTO, APO-zero unpaired).

pub mod eval;
pub mod kto;
pub mod loss;
pub mod train;

use std::path::Path;

use anyhow::{bail, Context, Result};
use common::models::adapter::{without_adapters, AdapterDir};
use common::models::TokenSpec;
use common::trainee::micro_batches;
use common::{Head, Model, ModelOptions, Trainee};
use data::pairs::{collate, collate_gold, PairBatch, TokenizedPair};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use loss::{pair_loss, wpo_weights, LossArgs, PairLogps, Stats};

/// Where the frozen reference's log-probs come from.
pub enum Reference {
    /// A frozen model (`--ref-model`, or a copy of the starting model).
    Model(Box<Model>),
    /// The policy with its adapter switched off (a fresh LoRA or prompt-tuning adapter:
    /// the base model is the reference, as PEFT's `disable_adapter()` gives it).
    AdapterOff,
    /// Computed once before training (`--precompute-ref-logprobs`), by pair index.
    Precomputed(Vec<[f32; 2]>),
    /// No reference (`--reference-free`, `simpo`, `orpo`): every log-prob counts as 0.
    Free,
}

impl Reference {
    /// The reference for `policy` (loaded from `model_dir` with `opts`): `ref_model` when
    /// given, else the starting model — the policy itself with a fresh adapter off, or a
    /// frozen copy.
    pub fn load(
        policy: &Model,
        model_dir: &Path,
        ref_model: Option<&Path>,
        opts: &ModelOptions,
    ) -> Result<Reference> {
        let reference = match ref_model {
            Some(dir) => {
                let plain = ModelOptions::new(Head::Lm, opts.device, opts.kind).frozen();
                Model::load(dir, &plain)
                    .with_context(|| format!("loading --ref-model {}", dir.display()))?
                    .0
            }
            None if policy.options.has_adapter() && AdapterDir::read(model_dir)?.is_none() => {
                return Ok(Reference::AdapterOff)
            }
            None => Model::load(model_dir, &opts.clone().frozen())?.0,
        };
        let (a, b) = (reference.config.vocab_size(), policy.config.vocab_size());
        if a != b {
            bail!(
                "--ref-model {}: its vocabulary has {a} tokens, the policy's {b}; the reference must share the policy's tokenizer",
                ref_model.unwrap_or(model_dir).display()
            );
        }
        Ok(Reference::Model(Box::new(reference)))
    }

    /// The reference's `[2B]` sequence log-probs (chosen rows, then rejected) of `batch`,
    /// whose pairs have the indices `indices`.
    fn logps(
        &self,
        policy: &Model,
        batch: &PairBatch,
        indices: &[usize],
        ld_alpha: Option<f64>,
    ) -> Tensor {
        match self {
            Reference::Precomputed(values) => {
                let chosen: Vec<f32> = indices.iter().map(|&i| values[i][0]).collect();
                let rejected: Vec<f32> = indices.iter().map(|&i| values[i][1]).collect();
                Tensor::from_slice(&[chosen, rejected].concat()).to_device(policy.device())
            }
            _ => self.model_logps(policy, batch, ld_alpha),
        }
    }

    /// The reference's `[B]` sequence log-probs of one side of `indices`' pairs (`batch`
    /// from [`data::pairs::collate_side`]): the chosen completions, or the rejected ones.
    fn side_logps(
        &self,
        policy: &Model,
        batch: &PairBatch,
        indices: &[usize],
        rejected: bool,
    ) -> Tensor {
        match self {
            Reference::Precomputed(values) => {
                let side = usize::from(rejected);
                let values: Vec<f32> = indices.iter().map(|&i| values[i][side]).collect();
                Tensor::from_slice(&values).to_device(policy.device())
            }
            _ => self.model_logps(policy, batch, None),
        }
    }

    /// A reference model's sequence log-probs of every row of `batch`.
    fn model_logps(&self, policy: &Model, batch: &PairBatch, ld_alpha: Option<f64>) -> Tensor {
        let _guard = tch::no_grad_guard();
        let run = |m: &Model| score(m, batch, (false, false), ld_alpha).logps;
        match self {
            Reference::Model(m) => run(m),
            Reference::AdapterOff => without_adapters(|| run(policy)),
            Reference::Free => {
                let rows = batch.input_ids.size()[0];
                Tensor::zeros([rows], (Kind::Float, policy.device()))
            }
            Reference::Precomputed(_) => unreachable!("precomputed log-probs are looked up"),
        }
    }

    /// Every pair's `[chosen, rejected]` log-probs under this reference, computed once
    /// (weighted by `ld_alpha` as the run's).
    pub fn precompute(
        &self,
        policy: &Model,
        pairs: &[TokenizedPair],
        (batch_size, pad_id): (usize, i64),
        ld_alpha: Option<f64>,
    ) -> Vec<[f32; 2]> {
        let mut out = Vec::with_capacity(pairs.len());
        let indices: Vec<usize> = (0..pairs.len()).collect();
        for chunk in indices.chunks(batch_size) {
            let refs: Vec<&TokenizedPair> = chunk.iter().map(|&i| &pairs[i]).collect();
            let batch = collate(&refs, pad_id, policy.device());
            let lp = self.logps(policy, &batch, chunk, ld_alpha);
            let lp = Vec::<f32>::try_from(lp.to_device(Device::Cpu)).expect("f32 log-probs");
            let (c, r) = lp.split_at(chunk.len());
            out.extend(c.iter().zip(r).map(|(&c, &r)| [c, r]));
        }
        out
    }
}

/// The reference log-probs kept with a run (`OUT/ref_logps.json`) by
/// `--precompute-ref-logprobs`, so that a resumed run reuses them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRefLogps {
    pub train: Vec<[f32; 2]>,
    pub eval: Vec<[f32; 2]>,
    /// The `--ld-alpha` they were weighted with (absent in files of earlier runs: none).
    #[serde(default)]
    pub ld_alpha: Option<f64>,
}

/// A model's sums over each row's completion tokens, `[N]` each.
pub(crate) struct Scored {
    /// Σ log π(token) over the completion (with the graph when grad is on); with
    /// `--ld-alpha`, the tokens past the pair's shorter completion weigh α.
    logps: Tensor,
    /// The same sum with every token weighing 1 (RPO's NLL).
    plain_logps: Tensor,
    /// Σ over the completion of the mean logit over the vocabulary, of the entropy of the
    /// next-token distribution, and of the tokens that are its argmax (detached; with
    /// `metrics` only).
    logit_sums: Option<Tensor>,
    entropy_sums: Option<Tensor>,
    greedy_counts: Option<Tensor>,
    /// Completion tokens that are scored (the first token of a sequence is not).
    tokens: Tensor,
    /// Σ over the completion of log π(token) − log Σ_v π(v)² (detached; WPO's weights).
    aligned_sums: Option<Tensor>,
}

/// [`Scored`] of `batch` (its rows the chosen completions, then the rejected ones);
/// `metrics` adds the mean-logit sums (the policy's, for `logits/*`; the reference needs
/// only its log-probs) and `wpo` the aligned log-prob sums of WPO's weights; `ld_alpha` weighs each row's tokens past its pair's shorter
/// completion (LD-DPO, as TRL 1.16 counts positions: scored completion tokens).
pub(crate) fn score(
    model: &Model,
    batch: &PairBatch,
    (metrics, wpo): (bool, bool),
    ld_alpha: Option<f64>,
) -> Scored {
    let t = batch.input_ids.size()[1];
    let hidden = model
        .hidden(&batch.input_ids, &batch.attention_mask, None)
        .narrow(1, 0, t - 1);
    let mask = batch
        .completion_mask
        .narrow(1, 1, t - 1)
        .to_kind(Kind::Float);
    let spec = TokenSpec {
        mean_logit: metrics,
        entropy: metrics,
        greedy: metrics,
        log_sum_sq_probs: wpo,
        ..TokenSpec::default()
    };
    let out = model.token_outputs(&hidden, &batch.input_ids.narrow(1, 1, t - 1), spec);
    let row_sum = |x: &Tensor| x.sum_dim_intlist([1].as_slice(), false, Kind::Float);
    let tokens = row_sum(&mask);
    let plain_logps = row_sum(&(&out.logprobs * &mask));
    let logps = match ld_alpha {
        None => plain_logps.shallow_clone(),
        Some(alpha) => {
            let b = tokens.size()[0] / 2;
            let shared = tokens
                .narrow(0, 0, b)
                .minimum(&tokens.narrow(0, b, b))
                .repeat([2]);
            let position = mask.cumsum(1, Kind::Float);
            let tail = position
                .gt_tensor(&shared.unsqueeze(1))
                .to_kind(Kind::Float)
                * &mask;
            row_sum(&(&out.logprobs * (&mask - tail * (1.0 - alpha))))
        }
    };
    Scored {
        logps,
        plain_logps,
        logit_sums: out.mean_logit.map(|m| row_sum(&(m * &mask))),
        entropy_sums: out.entropy.map(|e| row_sum(&(e.detach() * &mask))),
        greedy_counts: out
            .greedy
            .map(|g| row_sum(&(g.to_kind(Kind::Float) * &mask))),
        aligned_sums: out
            .log_sum_sq_probs
            .map(|sq| row_sum(&((out.logprobs.detach() - sq) * &mask))),
        tokens,
    }
}

/// One pair's numbers, for `dpo eval`'s rows: the policy's and the reference's chosen
/// and rejected log-probs, and the pair's loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairResult {
    pub logps: [f64; 2],
    pub ref_logps: [f64; 2],
    pub loss: f64,
}

/// How [`run_pairs`] divides each micro-batch's loss before its backward pass: by the
/// pairs, the chosen completion tokens and the gold ones of the whole step (all ranks).
#[derive(Debug, Clone, Copy)]
pub struct StepTotals {
    pub pairs: f64,
    pub chosen_tokens: f64,
    pub gold_tokens: f64,
}

impl StepTotals {
    /// The totals of `pairs` (this rank's of the step) over every rank of `world`.
    pub fn of(pairs: &[(usize, &TokenizedPair)], world: &common::World) -> StepTotals {
        let tokens = |side: fn(&TokenizedPair) -> &Vec<i64>| {
            let local: usize = pairs.iter().map(|(_, p)| scored_tokens(p, side(p))).sum();
            world.sum(local as f64)
        };
        StepTotals {
            pairs: world.sum(pairs.len() as f64),
            chosen_tokens: tokens(|p| &p.chosen),
            gold_tokens: tokens(|p| &p.gold),
        }
    }
}

/// The tokens of `completion` (a completion of `pair`) that are scored: all but the first
/// of a sequence without a prompt (RPO's and TPO's denominators).
fn scored_tokens(pair: &TokenizedPair, completion: &[i64]) -> usize {
    completion.len() - usize::from(pair.prompt.is_empty() && !completion.is_empty())
}

/// Forward (policy and reference), loss and metrics over `pairs` (with their indices) in
/// micro-batches of `batch_size`; with `backward` (the step's totals and the trainee whose
/// model `policy` is), each micro-batch's share of the step's loss is backpropagated.
pub fn run_pairs(
    policy: &Model,
    reference: &Reference,
    pairs: &[(usize, &TokenizedPair)],
    (batch_size, pad_id): (usize, i64),
    args: &LossArgs,
    backward: Option<(StepTotals, &Trainee)>,
) -> (Stats, Vec<PairResult>) {
    let mut stats = Stats::default();
    let mut results = Vec::with_capacity(pairs.len());
    if let Some((_, trainee)) = &backward {
        trainee.set_micro_batches(pairs.len(), batch_size);
    }
    for (micro, last) in micro_batches(pairs, batch_size) {
        let (indices, refs): (Vec<usize>, Vec<&TokenizedPair>) = micro.iter().copied().unzip();
        let batch = collate(&refs, pad_id, policy.device());
        let ref_logps = reference.logps(policy, &batch, &indices, args.ld_alpha);
        let _guard = backward.is_none().then(tch::no_grad_guard);
        let scored = score(policy, &batch, (true, args.use_weighting), args.ld_alpha);
        let b = micro.len() as i64;
        let halves = |x: &Tensor| (x.narrow(0, 0, b), x.narrow(0, b, b));
        // SimPO and ORPO read each response's mean token log-prob.
        let logps = match args.length_normalised() {
            true => &scored.logps / scored.tokens.clamp_min(1.0),
            false => scored.logps.shallow_clone(),
        };
        let (chosen, rejected) = halves(&logps);
        let plain_chosen = scored.plain_logps.narrow(0, 0, b);
        let (ref_chosen, ref_rejected) = halves(&ref_logps);
        let lengths = |rejected: bool| {
            let n: Vec<f32> = refs
                .iter()
                .map(|p| if rejected { p.rejected.len() } else { p.chosen.len() } as f32)
                .collect();
            Tensor::from_slice(&n).to_device(policy.device())
        };
        let lp = PairLogps {
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            chosen_tokens: lengths(false),
            rejected_tokens: lengths(true),
        };
        let mut losses = pair_loss(args, &lp);
        if let Some(sums) = &scored.aligned_sums {
            let ((sc, sr), (nc, nr)) = (halves(sums), halves(&scored.tokens));
            losses *= wpo_weights((&sc, &sr), (&nc, &nr));
        }
        // TPO's gold completions, through the policy on their own.
        let gold = (args.tpo_alpha != 0.0).then(|| {
            let batch = collate_gold(&refs, pad_id, policy.device());
            score(policy, &batch, (false, false), None)
        });
        if let Some((totals, trainee)) = backward {
            let mut loss = losses.sum(Kind::Float) / totals.pairs.max(1.0);
            let nll_weight = args.nll_weight();
            if nll_weight != 0.0 {
                let nll = -plain_chosen.sum(Kind::Float);
                loss += nll * (nll_weight / totals.chosen_tokens.max(1.0));
            }
            if let Some(gold) = &gold {
                let nll = -gold.plain_logps.sum(Kind::Float);
                loss += nll * (args.tpo_alpha / totals.gold_tokens.max(1.0));
            }
            trainee.backward(&loss, last);
        }
        let mut s = Stats::of(args, &lp, &losses);
        if let Some(gold) = &gold {
            s.nll_logps_gold = gold
                .plain_logps
                .detach()
                .sum(Kind::Double)
                .double_value(&[]);
            s.tokens_gold = gold.tokens.sum(Kind::Double).double_value(&[]);
        }
        let (logits_c, logits_r) = halves(scored.logit_sums.as_ref().expect("asked for"));
        let (tokens_c, tokens_r) = halves(&scored.tokens);
        let total = |x: &Tensor| x.sum(Kind::Double).double_value(&[]);
        s.logits_chosen = total(&logits_c);
        s.logits_rejected = total(&logits_r);
        s.tokens_chosen = total(&tokens_c);
        s.tokens_rejected = total(&tokens_r);
        s.nll_logps_chosen = total(&plain_chosen.detach());
        s.entropy_sum = total(scored.entropy_sums.as_ref().expect("asked for"));
        let greedy = scored.greedy_counts.as_ref().expect("asked for");
        s.greedy_chosen = total(&halves(greedy).0);
        stats.add(&s);
        let cpu = |x: &Tensor| {
            Vec::<f64>::try_from(x.detach().to_kind(Kind::Double).to_device(Device::Cpu))
                .expect("f64")
        };
        let (c, r, rc, rr, l) = (
            cpu(&lp.chosen),
            cpu(&lp.rejected),
            cpu(&lp.ref_chosen),
            cpu(&lp.ref_rejected),
            cpu(&losses),
        );
        results.extend((0..micro.len()).map(|i| PairResult {
            logps: [c[i], r[i]],
            ref_logps: [rc[i], rr[i]],
            loss: l[i],
        }));
    }
    (stats, results)
}
