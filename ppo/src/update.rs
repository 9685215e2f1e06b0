//! The optimisation half of a PPO iteration: `--ppo-epochs` passes over the rollout batch
//! in shuffled minibatches, each one clipped policy step (plus entropy bonus and PPO-ptx)
//! and one clipped value step (the policy's averages, `--ema-decay` and `--bema`, follow
//! its steps in the training unit).

use std::collections::BTreeMap;

use anyhow::Result;
use common::trainee::{micro_batches, StepOutcome};
use common::{Model, Trainee, World};
use data::sampler::Sampler;
use data::sft::{collate, TokenizedSft};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{Kind, Tensor};

use crate::args::TrainArgs;
use crate::math::{
    a2po_loss, high_entropy_mask, importance_weight, kl_per_token, off_policy_mask,
    online_dpo_loss, policy_loss, value_loss, AdvantageEstimator, Advantages, EntropyController,
    KlEstimator, LossAggregation, PolicyLoss,
};
use crate::rollout::{response_logprobs, response_values, Rollout};
use crate::sdft::{self, Teacher};

pub use common::rng::derived_seed;

/// PPO-ptx: SFT rows whose language-modelling loss joins the policy loss, and their order.
pub struct Ptx {
    pub rows: Vec<TokenizedSft>,
    pub sampler: Sampler,
    pub coef: f64,
    pub pad_id: i64,
}

/// What the update trains: the policy, the critic (when the estimator has one), and what
/// rides along with the policy's steps (the entropy bonus's coefficient among them).
pub struct Learners<'a> {
    pub policy: &'a mut Trainee,
    pub critic: Option<&'a mut Trainee>,
    pub ptx: Option<&'a mut Ptx>,
    pub entropy: &'a mut EntropyController,
    /// SDFT's and SDPO's teacher (`--advantage-estimator sdft`, `sdpo`).
    pub teacher: Option<Teacher<'a>>,
}

/// Averages over the minibatches of one iteration.
pub struct UpdateStats {
    pub policy_loss: f64,
    pub value_loss: f64,
    pub ptx_loss: f64,
    /// The KL loss term (`--kl-in-loss`), before β.
    pub kl_loss: f64,
    pub approxkl: f64,
    pub clipfrac: f64,
    /// TRL's `clip_ratio/low_mean` and `/high_mean` (see [`crate::math::PolicyLoss`]).
    pub clip_low: f64,
    pub clip_high: f64,
    /// TRL's `clip_ratio/low_min` and `/high_max`: each minibatch's least per-sequence
    /// share of low-clipped tokens and greatest of high-clipped ones (every rank's
    /// sequences), averaged over the minibatches (0 when the objective does not clip).
    pub clip_low_min: f64,
    pub clip_high_max: f64,
    pub value_clipfrac: f64,
    pub ratio: f64,
    /// VESPO's mean φ (`--policy-loss vespo`).
    pub vespo_phi: Option<f64>,
    /// CISPO's share of tokens whose weight the cap held (`--policy-loss cispo`; TRL's
    /// `cispo_clip_ratio`).
    pub cispo_clip: Option<f64>,
    /// The share of policy tokens off-policy sequence masking dropped
    /// (`--off-policy-mask-threshold`).
    pub off_policy_masked: Option<f64>,
    /// Online DPO's means over the pairs (`--advantage-estimator online-dpo`): β·Σ(log π −
    /// log π_ref) of the chosen and of the rejected responses, the share of pairs where the
    /// first exceeds the second, and the log-prob sums of each.
    pub online_dpo: Option<OnlineDpoStats>,
    /// A*-PO's means over the responses (`--advantage-estimator a2po`, TRL's
    /// `implicit_reward` and `advantage`): β·Σ(log π − log π_ref), and the target r − V*.
    pub a2po: Option<(f64, f64)>,
    /// SDFT's per-token loss, the mean over the loss tokens (TRL's
    /// `self_distillation/distillation_loss`).
    pub distillation_loss: Option<f64>,
    /// SDPO's GRPO policy loss alone (TRL's `self_distillation/policy_loss`).
    pub sdpo_policy_loss: Option<f64>,
    /// A MoE policy's load-balancing loss, the mean over the update's backward passes and
    /// every rank (TRL's `aux_loss`; `--router-aux-loss-coef`).
    pub aux_loss: Option<f64>,
    /// Max |ratio − 1| on the first minibatch, before any update: 0 unless dropout is on or
    /// the rollout and the training forward disagree.
    pub first_ratio_max_dev: f64,
    /// The last policy optimiser step.
    pub outcome: StepOutcome,
}

/// TRL's `OnlineDPOTrainer` statistics, averaged over the pairs of a minibatch, then over
/// the minibatches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OnlineDpoStats {
    pub chosen: f64,
    pub rejected: f64,
    pub accuracy: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
}

/// `--ppo-epochs` passes over the rollout batch in `--num-minibatches` shuffled
/// minibatches, one optimiser step of each learner per minibatch. `step` is the
/// iteration (it seeds the shuffles); `beta` weighs the KL loss term (`--kl-in-loss`).
pub fn update(
    args: &TrainArgs,
    (ro, adv): (&Rollout, &Advantages),
    mut learners: Learners,
    world: &World,
    (step, beta): (u64, f64),
) -> Result<UpdateStats> {
    // The minibatches are drawn from the whole rollout batch (every rank's rows), and each
    // rank works on its rows of each: the ranks together take the steps one process takes.
    let b = ro.full_ids.size()[0] as usize;
    let (offset, total) = crate::train::rollout_rows_of(args, world);
    let (offset, total) = (offset as usize, total as usize);
    let minibatch = total / args.num_minibatches;
    let mut sums: BTreeMap<&str, f64> = BTreeMap::new();
    let mut count = 0f64;
    let mut first_ratio_max_dev = 0.0;
    let mut outcome = None;
    // Σ over the minibatches that had sequences to clip of their least low-clipped share
    // and greatest high-clipped one, and how many they were.
    let mut seq_clip = (0.0, 0.0, 0f64);
    // The policy's tokens: with --mask-truncated-completions, none of a response cut at
    // --response-length.
    let policy_mask = if args.mask_truncated_completions {
        let ended: Vec<f32> = ro.ended_with_eos.iter().map(|&e| f32::from(e)).collect();
        let ended = Tensor::from_slice(&ended).to_device(ro.mask.device());
        &ro.mask * ended.unsqueeze(1).to_kind(ro.mask.kind())
    } else {
        ro.mask.shallow_clone()
    };
    // SDFT leaves the first --num-loss-tokens-to-skip tokens of each response out.
    let skip = args.sdft.num_loss_tokens_to_skip;
    let policy_mask = match learners.teacher.is_some() && skip > 0 {
        true => {
            let n = policy_mask.size()[1];
            let at = Tensor::arange(n, (Kind::Int64, policy_mask.device()));
            &policy_mask * at.ge(skip).to_kind(policy_mask.kind()).unsqueeze(0)
        }
        false => policy_mask,
    };
    // Online DPO's pairs stay whole: its minibatches are shuffled a pair at a time.
    let unit = match args.advantage_estimator().pair_loss() {
        Some(_) => 2,
        None => 1,
    };
    for epoch in 0..args.ppo_epochs {
        let mut order: Vec<usize> = (0..total / unit).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(derived_seed(
            args.run.seed,
            step,
            100 + epoch as u64,
        )));
        let order: Vec<usize> = order
            .into_iter()
            .flat_map(|u| u * unit..(u + 1) * unit)
            .collect();
        for (mb_index, global) in order.chunks(minibatch).enumerate() {
            let mb: Vec<i64> = global
                .iter()
                .filter(|&&g| g >= offset && g < offset + b)
                .map(|&g| (g - offset) as i64)
                .collect();
            let coefs = (beta, learners.entropy.applied());
            let mut mb_stats =
                minibatch_backward(args, (ro, adv, &policy_mask), &learners, &mb, world, coefs);
            let dev = mb_stats.remove("ratio_max_dev").unwrap_or(0.0);
            // The minibatch's sequence clip extremes, over every rank's sequences of it.
            let (lo, hi) = world.min_max((
                mb_stats.remove("clip_low_min").unwrap_or(f64::INFINITY),
                mb_stats
                    .remove("clip_high_max")
                    .unwrap_or(f64::NEG_INFINITY),
            ));
            if lo.is_finite() {
                seq_clip = (seq_clip.0 + lo, seq_clip.1 + hi, seq_clip.2 + 1.0);
            }
            if epoch == 0 && mb_index == 0 {
                first_ratio_max_dev = dev;
            }
            // Each rank's statistics are its share of the minibatch's (weighted by global
            // counts): their sum over ranks is the minibatch's.
            let local = STAT_KEYS.map(|key| mb_stats.get(key).copied().unwrap_or(0.0));
            for (key, total) in STAT_KEYS.into_iter().zip(world.sums(local)) {
                mb_stats.insert(key, total);
            }
            if let Some(ptx) = learners.ptx.as_deref_mut() {
                let loss = ptx_backward(learners.policy, ptx, minibatch, world);
                mb_stats.insert("ptx", loss);
            }
            let policy_loss = mb_stats.get("policy").copied().unwrap_or(0.0);
            outcome = Some(learners.policy.step(policy_loss));
            if let Some(critic) = learners.critic.as_deref_mut() {
                critic.step(mb_stats["value"]);
            }
            let tokens = mb_stats["entropy_tokens"];
            if tokens > 0.0 {
                learners.entropy.update(mb_stats["entropy_sum"] / tokens);
            }
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
        kl_loss: avg("kl"),
        approxkl: avg("approxkl"),
        clipfrac: avg("clipfrac"),
        clip_low: avg("clip_low"),
        clip_high: avg("clip_high"),
        clip_low_min: seq_clip.0 / seq_clip.2.max(1.0),
        clip_high_max: seq_clip.1 / seq_clip.2.max(1.0),
        value_clipfrac: avg("vclip"),
        ratio: avg("ratio"),
        vespo_phi: (args.policy_loss == crate::args::PolicyLossName::Vespo)
            .then(|| avg("vespo_phi")),
        cispo_clip: (args.policy_loss == crate::args::PolicyLossName::Cispo)
            .then(|| avg("clip_high")),
        off_policy_masked: args.off_policy_mask_threshold.map(|_| avg("opsm")),
        online_dpo: (unit == 2).then(|| OnlineDpoStats {
            chosen: avg("dpo_chosen"),
            rejected: avg("dpo_rejected"),
            accuracy: avg("dpo_accuracy"),
            logps_chosen: avg("logps_chosen"),
            logps_rejected: avg("logps_rejected"),
        }),
        a2po: (args.advantage_estimator() == AdvantageEstimator::A2po)
            .then(|| (avg("implicit_reward"), avg("advantage"))),
        distillation_loss: learners.teacher.is_some().then(|| avg("distillation_loss")),
        sdpo_policy_loss: matches!(args.advantage_estimator(), AdvantageEstimator::Sdpo { .. })
            .then(|| avg("sd_policy")),
        aux_loss: learners.policy.take_aux_loss(world),
        first_ratio_max_dev,
        outcome: outcome.expect("at least one minibatch"),
    })
}

/// Forward and backward of the clipped policy loss (with the entropy bonus and the KL term
/// of `--kl-in-loss`) over the tokens of `policy_mask`, and of the critic's clipped value
/// loss over every response token, over the micro-batches of minibatch `mb` (rollout row
/// indices). Each micro-batch is weighted by its share of the minibatch (tokens, or
/// sequences, as `--loss-aggregation` counts them), so the micro-batches sum to the
/// minibatch's loss over every rank. Returns the minibatch's weighted statistics.
fn minibatch_backward(
    args: &TrainArgs,
    (ro, adv, policy_mask): (&Rollout, &Advantages, &Tensor),
    learners: &Learners,
    mb: &[i64],
    world: &World,
    (beta, entropy_coef): (f64, f64),
) -> BTreeMap<&'static str, f64> {
    let device = ro.full_ids.device();
    let estimator = args.advantage_estimator();
    let online_dpo = estimator.pair_loss();
    let micro = mb.len().div_ceil(args.grad_accum).max(1);
    // Online DPO's micro-batches hold whole pairs.
    let micro = micro + usize::from(online_dpo.is_some()) * (micro % 2);
    let mb_idx = Tensor::from_slice(mb).to_device(device);
    let tokens_of = |mask: &Tensor| {
        let local = mask
            .index_select(0, &mb_idx)
            .sum(Kind::Float)
            .double_value(&[]);
        world.sum(local).max(1.0)
    };
    let (mb_tokens, mb_value_tokens) = (tokens_of(policy_mask), tokens_of(&ro.mask));
    // The distilled tokens (SDPO's: of the responses whose teacher was shown something).
    let mb_distilled = ro
        .teacher
        .as_ref()
        .map_or(mb_tokens, |t| tokens_of(&t.loss_mask(policy_mask)));
    let mb_rows = world.sum(mb.len() as f64);
    let surrogate = args.surrogate();
    let (aggregation, norm) = (surrogate.aggregation, surrogate.norm);
    let keep = (args.top_entropy_quantile < 1.0).then(|| {
        high_entropy_tokens(
            args,
            (ro, policy_mask),
            &learners.policy.model,
            (mb, micro),
            world,
        )
    });
    let mut stats: BTreeMap<&str, f64> = BTreeMap::new();
    let mut ratio_max_dev = 0f64;
    let mut seq_clip: Option<(f64, f64)> = None;
    learners.policy.set_micro_batches(mb.len(), micro);
    if let Some(critic) = &learners.critic {
        critic.set_micro_batches(mb.len(), micro);
    }
    for (part, last) in micro_batches(mb, micro) {
        let idx = Tensor::from_slice(part).to_device(device);
        let pick = |t: &Tensor| t.index_select(0, &idx);
        let (ids, full_mask) = (pick(&ro.full_ids), pick(&ro.full_mask));
        let (mask, value_mask) = (pick(policy_mask), pick(&ro.mask));
        let tokens = mask.sum(Kind::Float).double_value(&[]);
        let weight = aggregation.weight(tokens, mb_tokens, part.len() as f64, mb_rows);
        let value_weight = value_mask.sum(Kind::Float).double_value(&[]) / mb_value_tokens;
        let policy = &learners.policy.model;
        let (old_lp, advantages) = (pick(&ro.logprobs), pick(&adv.advantages));
        // SDFT and SDPO: the student's and the teacher's logits (none at SDPO's weight 0);
        // the importance weight only where the rollout feeds more than one optimiser step
        // (as TRL's).
        let distilled = args.advantage_estimator == crate::args::EstimatorName::Sdft
            || args.sdft.distillation_weight > 0.0;
        let sdft = match (learners.teacher, &ro.teacher, args.self_distillation()) {
            (Some(teacher), Some(inputs), Some(settings)) if distilled => {
                // (No weight for responses sampled from the teacher's prompt, as TRL's.)
                let reused =
                    args.ppo_epochs * args.num_minibatches > 1 && !args.sdft.generate_from_teacher;
                let inputs = inputs.pick(&idx);
                let loss_mask = inputs.loss_mask(&mask);
                Some(sdft::token_losses(
                    (policy, teacher),
                    (&ids, &full_mask, ro.prompt_len),
                    &inputs,
                    (&loss_mask, reused.then_some(&old_lp)),
                    (&args.sdft, settings, args.temperature),
                ))
            }
            _ => None,
        };
        let (new_lp, ent) = match &sdft {
            Some(s) => (s.logprobs.shallow_clone(), s.entropy.shallow_clone()),
            None => response_logprobs(
                policy,
                &ids,
                &full_mask,
                ro.prompt_len,
                (args.temperature, entropy_coef > 0.0),
            ),
        };
        let keep = keep.as_ref().map(pick);
        // The policy loss's tokens: the high-entropy ones, less the off-policy responses.
        let opsm = args
            .off_policy_mask_threshold
            .map(|delta| off_policy_mask(&new_lp, &old_lp, &advantages, &mask, delta));
        // ... each weighted by the sampler's correction (--sampling-correction).
        let correction = ro.correction.as_ref().map(pick);
        let loss_keep = [&keep, &opsm, &correction]
            .into_iter()
            .flatten()
            .fold(None, |acc: Option<Tensor>, t| {
                Some(acc.map_or_else(|| t.shallow_clone(), |a| a * t))
            });
        if let Some(opsm) = &opsm {
            let dropped = (-opsm + 1.0) * &mask;
            *stats.entry("opsm").or_default() +=
                dropped.sum(Kind::Float).double_value(&[]) / mb_tokens;
        }
        let pl = match estimator {
            AdvantageEstimator::OnlineDpo { loss } => {
                let reference = pick(&ro.ref_logprobs);
                let pair = (&new_lp, &reference);
                let (dpo, pairs) = online_dpo_loss(pair, &advantages, &mask, beta, loss);
                add_pair_stats(&mut stats, &pairs, weight);
                PolicyLoss::unclipped(dpo, &(&new_lp - &old_lp), &mask)
            }
            AdvantageEstimator::A2po => {
                let reference = pick(&ro.ref_logprobs);
                let (regression, (implicit, target)) =
                    a2po_loss((&new_lp, &reference), &advantages, &mask, beta);
                let mean = |t: &Tensor| t.mean(Kind::Float).double_value(&[]);
                *stats.entry("implicit_reward").or_default() += mean(&implicit) * weight;
                *stats.entry("advantage").or_default() += mean(&target) * weight;
                PolicyLoss::unclipped(regression, &(&new_lp - &old_lp), &mask)
            }
            AdvantageEstimator::Sdft => {
                let s = sdft.as_ref().expect("SDFT's teacher inputs");
                let loss = aggregation.aggregate(&s.loss, &mask, norm);
                // TRL's distillation_loss: the mean over the minibatch's loss tokens.
                let sum = s.loss.detach().sum(Kind::Double).double_value(&[]);
                *stats.entry("distillation_loss").or_default() += sum / mb_tokens;
                PolicyLoss::unclipped(loss, &(&new_lp - &old_lp), &mask)
            }
            _ => policy_loss(
                &new_lp,
                &old_lp,
                &advantages,
                (&mask, loss_keep.as_ref()),
                &surrogate,
            ),
        };
        let mut policy_total = &pl.loss * weight;
        let mut policy_stat = pl.loss.double_value(&[]) * weight;
        if let AdvantageEstimator::Sdpo { .. } = estimator {
            // SDPO's GRPO part alone (also at --distillation-weight 0, where no teacher runs).
            *stats.entry("sd_policy").or_default() += policy_stat;
        }
        if let (AdvantageEstimator::Sdpo { .. }, Some(s)) = (estimator, &sdft) {
            // SDPO: (1 − w)·GRPO's loss + w·the distillation's, each response's mean over
            // its distilled tokens averaged over every response (0 for the undistilled).
            let w = args.sdft.distillation_weight;
            let distill = LossAggregation::SeqMeanTokenMean.aggregate(&s.loss, &mask, norm);
            let row_weight = part.len() as f64 / mb_rows;
            policy_total = policy_total * (1.0 - w) + &distill * (w * row_weight);
            policy_stat = (1.0 - w) * policy_stat + w * row_weight * distill.double_value(&[]);
            let sum = s.loss.detach().sum(Kind::Double).double_value(&[]);
            *stats.entry("distillation_loss").or_default() += sum / mb_distilled;
        }
        // The tokens that carry the policy loss: the entropy bonus acts on them, and
        // adaptive entropy control measures their mean entropy over every rank.
        let acting = match &keep {
            Some(keep) => &mask * keep,
            None => mask.shallow_clone(),
        };
        let ent = ent * &acting;
        if entropy_coef > 0.0 {
            policy_total -= aggregation.aggregate(&ent, &mask, norm) * (entropy_coef * weight);
        }
        *stats.entry("entropy_sum").or_default() += ent.detach().sum(Kind::Float).double_value(&[]);
        *stats.entry("entropy_tokens").or_default() += acting.sum(Kind::Float).double_value(&[]);
        if args.kl_in_loss {
            // GRPO's form: k3 of the reference against the current policy, per token.
            let mut kl = kl_per_token(&new_lp, &pick(&ro.ref_logprobs), &mask, KlEstimator::K3);
            if args.use_bias_correction_kl {
                // DeepSeek-V3.2's correction: the tokens came from π_old, not π.
                kl *= importance_weight(&(&new_lp - &old_lp), &mask, surrogate.level);
            }
            let kl_loss = aggregation.aggregate(&kl, &mask, norm);
            policy_total += &kl_loss * (beta * weight);
            *stats.entry("kl").or_default() += kl_loss.double_value(&[]) * weight;
        }
        // PPO-ptx's backward comes after the minibatch's.
        learners
            .policy
            .backward(&policy_total, last && learners.ptx.is_none());
        ratio_max_dev = ratio_max_dev.max(pl.ratio_max_dev);
        seq_clip = match (seq_clip, pl.seq_clip) {
            (Some((lo, hi)), Some((l, h))) => Some((lo.min(l), hi.max(h))),
            (a, b) => a.or(b),
        };
        *stats.entry("policy").or_default() += policy_stat;
        let mut add = |k, v: f64| *stats.entry(k).or_default() += v * weight;
        add("approxkl", pl.approxkl);
        add("clipfrac", pl.clipfrac);
        add("clip_low", pl.clip_low);
        add("clip_high", pl.clip_high);
        add("ratio", pl.ratio_mean);
        // A mean over sequences: this micro-batch's share of the minibatch's rows.
        *stats.entry("vespo_phi").or_default() += pl.vespo_phi * part.len() as f64 / mb_rows;
        if let (Some(critic), Some(values), Some(returns)) =
            (&learners.critic, &ro.values, &adv.returns)
        {
            let new_values = response_values(&critic.model, &ids, &full_mask, ro.prompt_len);
            let (vl, vclip) = value_loss(
                &new_values,
                &pick(values),
                &pick(returns),
                &value_mask,
                args.cliprange_value,
            );
            critic.backward(&(&vl * (args.vf_coef * value_weight)), last);
            *stats.entry("value").or_default() += vl.double_value(&[]) * value_weight;
            *stats.entry("vclip").or_default() += vclip * value_weight;
        }
    }
    if mb.is_empty() {
        // None of the minibatch's rows are on this rank.
        learners.policy.skip_backward(learners.ptx.is_none());
        if let Some(critic) = &learners.critic {
            critic.skip_backward(true);
        }
    }
    stats.insert("ratio_max_dev", ratio_max_dev);
    // This rank's sequences of the minibatch (the ranks' extremes are taken in `update`).
    if let Some((lo, hi)) = seq_clip {
        stats.insert("clip_low_min", lo);
        stats.insert("clip_high_max", hi);
    }
    stats
}

/// A micro-batch's online DPO statistics (means over its pairs), weighed by its share of
/// the minibatch, into the minibatch's `stats`.
fn add_pair_stats(stats: &mut BTreeMap<&str, f64>, pairs: &crate::math::PairStats, weight: f64) {
    let mean = |t: &Tensor| t.mean(Kind::Float).double_value(&[]);
    let margins = &pairs.chosen_rewards - &pairs.rejected_rewards;
    for (key, value) in [
        ("dpo_chosen", mean(&pairs.chosen_rewards)),
        ("dpo_rejected", mean(&pairs.rejected_rewards)),
        ("dpo_accuracy", mean(&margins.gt(0.0).to_kind(Kind::Float))),
        ("logps_chosen", mean(&pairs.logps_chosen)),
        ("logps_rejected", mean(&pairs.logps_rejected)),
    ] {
        *stats.entry(key).or_default() += value * weight;
    }
}

/// `--top-entropy-quantile` ρ: 1 on the policy tokens of minibatch `mb` whose entropy
/// under the current policy (at `--temperature`) is at least the (1 − ρ) quantile of the
/// minibatch's policy tokens on every rank (torch.quantile's linear interpolation, as
/// TRL's `get_high_entropy_mask`), 0 elsewhere; `[B, N]` over this rank's rollout rows.
/// The entropies come from a forward without grad before the minibatch's backward, so
/// the threshold does not depend on how the minibatch is split into micro-batches and
/// ranks. Every rank calls it, with or without rows in the minibatch; the forward runs in
/// micro-batches of `micro` rows, as the backward does.
fn high_entropy_tokens(
    args: &TrainArgs,
    (ro, policy_mask): (&Rollout, &Tensor),
    policy: &Model,
    (mb, micro): (&[i64], usize),
    world: &World,
) -> Tensor {
    let _guard = tch::no_grad_guard();
    let device = ro.full_ids.device();
    let mut entropy = ro.mask.zeros_like().to_kind(Kind::Float);
    let mut in_mb = ro.mask.zeros_like().to_kind(Kind::Float);
    for (part, _) in micro_batches(mb, micro) {
        let idx = Tensor::from_slice(part).to_device(device);
        let pick = |t: &Tensor| t.index_select(0, &idx);
        let (_, ent) = response_logprobs(
            policy,
            &pick(&ro.full_ids),
            &pick(&ro.full_mask),
            ro.prompt_len,
            (args.temperature, false),
        );
        let _ = entropy.index_copy_(0, &idx, &ent.to_kind(Kind::Float));
        let _ = in_mb.index_fill_(0, &idx, 1.0);
    }
    let counted = (policy_mask.to_kind(Kind::Float) * &in_mb).gt(0.0);
    let local = Vec::<f32>::try_from(entropy.masked_select(&counted).to_device(tch::Device::Cpu))
        .expect("f32 entropies");
    let bytes: Vec<u8> = local.iter().flat_map(|x| x.to_le_bytes()).collect();
    let all: Vec<f32> = world
        .gather_bytes(&bytes)
        .iter()
        .flat_map(|b| b.chunks_exact(4))
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    high_entropy_mask(&entropy, &counted, &all, args.top_entropy_quantile)
}

/// The statistics a minibatch's ranks sum.
const STAT_KEYS: [&str; 22] = [
    "policy",
    "approxkl",
    "clipfrac",
    "clip_low",
    "clip_high",
    "ratio",
    "kl",
    "value",
    "vclip",
    "vespo_phi",
    "opsm",
    "entropy_sum",
    "entropy_tokens",
    "dpo_chosen",
    "dpo_rejected",
    "dpo_accuracy",
    "logps_chosen",
    "logps_rejected",
    "implicit_reward",
    "advantage",
    "distillation_loss",
    "sd_policy",
];

/// PPO-ptx: the language-modelling loss of the next `rows` SFT rows (this rank's share of
/// them), times its weight, backpropagated into the policy. Returns the (unweighted) loss,
/// the token mean over every rank's rows.
fn ptx_backward(policy: &Trainee, ptx: &mut Ptx, rows: usize, world: &World) -> f64 {
    let indices = ptx.sampler.next_batch(rows);
    let picked: Vec<&TokenizedSft> = world
        .shard(&indices)
        .iter()
        .map(|&i| &ptx.rows[i])
        .collect();
    let batch = collate(&picked, ptx.pad_id, policy.model.device());
    let t = batch.input_ids.size()[1];
    let model = &policy.model;
    let hidden = model
        .hidden(&batch.input_ids, &batch.attention_mask, None)
        .narrow(1, 0, t - 1);
    let labels = batch.input_ids.narrow(1, 1, t - 1);
    let lp = model
        .token_outputs(&hidden, &labels, common::models::TokenSpec::default())
        .logprobs;
    let mask = batch.loss_mask.narrow(1, 1, t - 1).to_kind(lp.kind());
    let tokens = world.sum(mask.sum(Kind::Float).double_value(&[])).max(1.0);
    let loss = -(lp * mask).sum(Kind::Float) / tokens;
    policy.backward(&(&loss * ptx.coef), true);
    world.sum(loss.double_value(&[]))
}
