//! The optimisation half of a PPO iteration: `--ppo-epochs` passes over the rollout batch
//! in shuffled minibatches, each one clipped policy step (plus entropy bonus and PPO-ptx)
//! and one clipped value step; and the EMA of the policy.

use std::collections::{BTreeMap, HashMap};

use anyhow::Result;
use common::ops::masked_mean;
use common::optim::AdamW;
use common::sampler::Sampler;
use common::schedule::Schedule;
use common::train::{optimizer_step, StepOutcome};
use common::Model;
use data::sft::{collate, TokenizedSft};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{Kind, Tensor};

use crate::args::TrainArgs;
use crate::math::{policy_loss, value_loss};
use crate::rollout::{response_logprobs, response_values, Rollout};

/// An exponential moving average of the policy's weights.
pub struct Ema {
    decay: f64,
    pub weights: BTreeMap<String, Tensor>,
}

impl Ema {
    pub fn new(model: &Model, decay: f64) -> Self {
        let _guard = tch::no_grad_guard();
        let weights = model
            .named_tensors()
            .into_iter()
            .map(|(k, t)| (k, t.detach().copy()))
            .collect();
        Ema { decay, weights }
    }

    pub fn update(&mut self, model: &Model) {
        let _guard = tch::no_grad_guard();
        for (name, param) in model.named_tensors() {
            let _ = self
                .weights
                .get_mut(&name)
                .expect("same model")
                .lerp_(&param, 1.0 - self.decay);
        }
    }

    pub fn vars(&self) -> HashMap<String, Tensor> {
        self.weights
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect()
    }
}

/// A seed for (step, purpose), so a resumed run samples what the uninterrupted one did.
pub fn derived_seed(seed: u64, step: u64, purpose: u64) -> u64 {
    seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ purpose.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
}

/// Averages over the minibatches of one iteration.
pub struct UpdateStats {
    pub policy_loss: f64,
    pub value_loss: f64,
    pub ptx_loss: f64,
    pub approxkl: f64,
    pub clipfrac: f64,
    pub value_clipfrac: f64,
    pub ratio: f64,
    /// Max |ratio − 1| on the first minibatch, before any update: 0 unless dropout is on or
    /// the rollout and the training forward disagree.
    pub first_ratio_max_dev: f64,
    /// The last policy optimiser step.
    pub outcome: StepOutcome,
}

pub fn update(
    args: &TrainArgs,
    ro: &Rollout,
    advantages: &Tensor,
    returns: &Tensor,
    policy: &Model,
    value: &Model,
    policy_opt: &mut AdamW,
    value_opt: &mut AdamW,
    (policy_schedule, value_schedule): (&Schedule, &Schedule),
    mut ptx: Option<(&[TokenizedSft], &mut Sampler)>,
    mut ema: Option<&mut Ema>,
    pad_id: i64,
    step: u64,
) -> Result<UpdateStats> {
    let b = ro.full_ids.size()[0] as usize;
    let minibatch = b / args.num_minibatches;
    let micro = minibatch / args.grad_accum;
    let device = ro.full_ids.device();
    let mut sums: BTreeMap<&str, f64> = BTreeMap::new();
    let mut count = 0f64;
    let mut first_ratio_max_dev = 0.0;
    let mut outcome = None;
    for epoch in 0..args.ppo_epochs {
        let mut order: Vec<i64> = (0..b as i64).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(derived_seed(
            args.run.seed,
            step,
            100 + epoch as u64,
        )));
        for (mb_index, mb) in order.chunks(minibatch).enumerate() {
            let mb_idx = Tensor::from_slice(mb).to_device(device);
            let mb_tokens = ro
                .mask
                .index_select(0, &mb_idx)
                .sum(Kind::Float)
                .double_value(&[])
                .max(1.0);
            let mut mb_stats: BTreeMap<&str, f64> = BTreeMap::new();
            for part in mb.chunks(micro) {
                let idx = Tensor::from_slice(part).to_device(device);
                let pick = |t: &Tensor| t.index_select(0, &idx);
                let (ids, full_mask, mask) =
                    (pick(&ro.full_ids), pick(&ro.full_mask), pick(&ro.mask));
                // Token-weighted: micro-batches of one minibatch sum to its token mean.
                let weight = mask.sum(Kind::Float).double_value(&[]) / mb_tokens;
                let (new_lp, ent) =
                    response_logprobs(policy, &ids, &full_mask, ro.prompt_len, args.temperature);
                let pl = policy_loss(
                    &new_lp,
                    &pick(&ro.logprobs),
                    &pick(advantages),
                    &mask,
                    args.cliprange,
                );
                let mut policy_total = &pl.loss * weight;
                if args.entropy_coef > 0.0 {
                    policy_total -= masked_mean(&ent, &mask) * (args.entropy_coef * weight);
                }
                policy_total.backward();
                let new_values = response_values(value, &ids, &full_mask, ro.prompt_len);
                let (vl, vclip) = value_loss(
                    &new_values,
                    &pick(&ro.values),
                    &pick(returns),
                    &mask,
                    args.cliprange_value,
                );
                (&vl * (args.vf_coef * weight)).backward();
                if epoch == 0 && mb_index == 0 {
                    first_ratio_max_dev = f64::max(first_ratio_max_dev, pl.ratio_max_dev);
                }
                for (k, v) in [
                    ("policy", pl.loss.double_value(&[])),
                    ("value", vl.double_value(&[])),
                    ("approxkl", pl.approxkl),
                    ("clipfrac", pl.clipfrac),
                    ("vclip", vclip),
                    ("ratio", pl.ratio_mean),
                ] {
                    *mb_stats.entry(k).or_default() += v * weight;
                }
            }
            if let Some((rows, sampler)) = ptx.as_mut() {
                if args.ptx_coef > 0.0 {
                    let picked: Vec<&TokenizedSft> = sampler
                        .next_batch(minibatch)
                        .iter()
                        .map(|&i| &rows[i])
                        .collect();
                    let batch = collate(&picked, pad_id, device);
                    let t = batch.input_ids.size()[1];
                    let logits = policy.forward(&batch.input_ids, &batch.attention_mask);
                    let lp = common::ops::logprobs_of(
                        &logits.narrow(1, 0, t - 1),
                        &batch.input_ids.narrow(1, 1, t - 1),
                    );
                    let ptx_loss = -masked_mean(&lp, &batch.loss_mask.narrow(1, 1, t - 1));
                    (&ptx_loss * args.ptx_coef).backward();
                    *mb_stats.entry("ptx").or_default() += ptx_loss.double_value(&[]);
                }
            }
            let mut loss = mb_stats.get("policy").copied().unwrap_or(0.0);
            common::faults::hit("mid-step");
            if common::faults::nan_from(step) {
                loss = f64::NAN;
            }
            let o = optimizer_step(
                policy_opt,
                policy_schedule,
                policy_opt.step as u64,
                args.optim.max_grad_norm,
                loss,
            );
            optimizer_step(
                value_opt,
                value_schedule,
                value_opt.step as u64,
                args.optim.max_grad_norm,
                mb_stats["value"],
            );
            if let Some(ema) = ema.as_mut() {
                ema.update(policy);
            }
            outcome = Some(o);
            for (k, v) in mb_stats {
                *sums.entry(k).or_default() += v;
            }
            count += 1.0;
        }
    }
    let avg = |k: &str| sums.get(k).copied().unwrap_or(0.0) / count.max(1.0);
    Ok(UpdateStats {
        policy_loss: avg("policy"),
        value_loss: avg("value"),
        ptx_loss: avg("ptx"),
        approxkl: avg("approxkl"),
        clipfrac: avg("clipfrac"),
        value_clipfrac: avg("vclip"),
        ratio: avg("ratio"),
        first_ratio_max_dev,
        outcome: outcome.expect("at least one minibatch"),
    })
}
