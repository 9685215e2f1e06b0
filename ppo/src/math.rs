//! The PPO math as pure functions over tensors: no model, no configuration object.
//! Shapes: `[B, T]` over response tokens, with a 0/1 `mask` (1 on real response tokens,
//! the EOS included); masked positions never change any result.
//!
//! References: Schulman et al. 2017 (clipped surrogate), Schulman et al. 2016 (GAE),
//! Ziegler et al. 2019 (per-token KL penalty, adaptive KL controller), and TRL's
//! `PPOTrainer` whose metric definitions we keep.

use common::ops::{masked_mean, masked_whiten, row_masked_mean, row_masked_sum};
use common::World;
use tch::{Kind, Tensor};

/// How the per-token KL between policy and reference is estimated (Schulman's k1/k3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `log π − log π_ref`: unbiased, can be negative per token.
    #[default]
    K1,
    /// `(r − 1) − log r` with `r = π_ref / π`: unbiased, always ≥ 0, lower variance.
    K3,
}

impl std::str::FromStr for KlEstimator {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "k1" => Ok(KlEstimator::K1),
            "k3" => Ok(KlEstimator::K3),
            _ => Err(format!("'{s}' is not a KL estimator (expected k1 or k3)")),
        }
    }
}

impl std::fmt::Display for KlEstimator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KlEstimator::K1 => "k1",
            KlEstimator::K3 => "k3",
        })
    }
}

/// Per-token KL estimate, 0 where `mask` is 0.
pub fn kl_per_token(
    logprobs: &Tensor,
    ref_logprobs: &Tensor,
    mask: &Tensor,
    estimator: KlEstimator,
) -> Tensor {
    let log_ratio = logprobs - ref_logprobs;
    let kl = match estimator {
        KlEstimator::K1 => log_ratio,
        KlEstimator::K3 => {
            let neg = -log_ratio;
            neg.exp() - 1.0 - neg
        }
    };
    kl * mask.to_kind(Kind::Float)
}

/// Index of the last real token of each row (`[B]`); rows with no token give 0. A mask
/// may have holes (tool results inside a response): the last 1 counts, not the count.
fn last_index(mask: &Tensor) -> Tensor {
    let t = mask.size()[1];
    let positions = Tensor::arange(t, (Kind::Int64, mask.device())) + 1;
    ((mask.to_kind(Kind::Int64) * positions).amax([1].as_slice(), false) - 1).clamp_min(0)
}

/// Rewards per token: `−β · kl` everywhere, plus the sequence's `score` on its last real
/// token. Returns `(rewards, non_score_rewards)`.
pub fn shaped_rewards(kl: &Tensor, scores: &Tensor, mask: &Tensor, beta: f64) -> (Tensor, Tensor) {
    let mask_f = mask.to_kind(Kind::Float);
    let non_score = -(kl * beta) * &mask_f;
    let at_end = Tensor::zeros_like(&non_score).scatter(
        1,
        &last_index(mask).unsqueeze(1),
        &scores.to_kind(Kind::Float).unsqueeze(1),
    );
    ((&non_score + at_end * mask_f), non_score)
}

/// Generalised advantage estimation over each row's real tokens:
/// `δ_t = r_t + γ·V_{t+1} − V_t`, `A_t = δ_t + γλ·A_{t+1}`, with `V` and `A` taken as 0
/// past the last real token. Returns `(advantages, returns = advantages + values)`, both 0
/// where `mask` is 0.
pub fn gae(
    rewards: &Tensor,
    values: &Tensor,
    mask: &Tensor,
    gamma: f64,
    lam: f64,
) -> (Tensor, Tensor) {
    let mask_f = mask.to_kind(Kind::Float);
    let values = values.to_kind(Kind::Float) * &mask_f;
    let rewards = rewards.to_kind(Kind::Float) * &mask_f;
    let t = rewards.size()[1];
    let mut last = Tensor::zeros_like(&rewards.select(1, 0));
    let mut advantages = Vec::with_capacity(t as usize);
    for i in (0..t).rev() {
        let next_value = if i + 1 < t {
            values.select(1, i + 1)
        } else {
            Tensor::zeros_like(&last)
        };
        let delta = rewards.select(1, i) + gamma * next_value - values.select(1, i);
        last = (delta + gamma * lam * &last) * mask_f.select(1, i);
        advantages.push(last.shallow_clone());
    }
    advantages.reverse();
    let advantages = Tensor::stack(&advantages, 1);
    let returns = (&advantages + &values) * &mask_f;
    (advantages, returns)
}

/// How a rollout's per-token rewards become advantages. Each estimator is one arm here,
/// matched in [`advantages`] only; the loop never looks inside. The group estimators see
/// the rollout as consecutive groups of `group` responses to the same prompt, and give
/// every token of a response its sequence's advantage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AdvantageEstimator {
    /// Generalised advantage estimation over a learned critic's values (PPO's own).
    Gae { gamma: f64, lam: f64 },
    /// GRPO (Shao et al. 2024): `(R − mean of the group) / (std + 1e-4)`, the unbiased
    /// std of the group (`scale`: of the whole batch, or none) as TRL's `GRPOTrainer`
    /// computes it.
    Grpo { group: i64, scale: RewardScale },
    /// Dr. GRPO (Liu et al. 2025): `R − mean of the group`, no std division.
    DrGrpo { group: i64 },
    /// RLOO (Ahmadian et al. 2024): `R − mean of the other group − 1 responses`;
    /// `normalize`: then normalised over the whole batch ([`batch_normalized`], TRL's
    /// `normalize_advantages`).
    Rloo { group: i64, normalize: bool },
    /// GDPO (TRL's `multi_objective_aggregation="normalize_then_sum"`): each reward
    /// source normalised within the group on its own, the weighted sum normalised over
    /// the whole batch ([`decoupled_group_advantages`]).
    Gdpo { group: i64 },
    /// REINFORCE++ (Hu 2025): the discounted return-to-go of the per-token rewards (KL
    /// penalty on every token, score on the last), whitened over the global batch.
    ReinforcePlusPlus { gamma: f64 },
    /// Online DPO (Guo et al. 2024, TRL's `OnlineDPOTrainer`): two responses per prompt,
    /// the better rewarded chosen (the first on a tie, as TRL's `first >= second`), +1 on
    /// its tokens and −1 on the other's ([`preferences`]); the policy loss is then DPO's on
    /// the pair ([`online_dpo_loss`]).
    OnlineDpo { loss: PairLoss },
    /// A*-PO (Brantley et al. 2025, TRL's experimental `A2POTrainer`): one response per
    /// prompt, its advantage `r − V*(x)` against the optimal value of its prompt, estimated
    /// before training from the starting policy's samples ([`optimal_value`]); the policy
    /// loss regresses `β·Σ(log π − log π_ref)` onto it ([`a2po_loss`]).
    A2po,
    /// SDFT (Shenfeld et al. 2026, TRL's experimental `SDFTTrainer`): no advantage; the
    /// policy loss is the divergence from a teacher shown each row's privileged context
    /// ([`crate::sdft`]).
    Sdft,
    /// SDPO (Hübotter et al. 2026, TRL's experimental `SDPOTrainer`): GRPO's advantages;
    /// the policy loss blends GRPO's with the divergence from a teacher shown a successful
    /// response of the group ([`crate::sdft`]).
    Sdpo { group: i64, scale: RewardScale },
}

/// DPO's loss on a pair's margin `z` (TRL's `OnlineDPOConfig.loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PairLoss {
    /// `−log σ(β·z)` (DPO's).
    #[default]
    Sigmoid,
    /// `(z − 1/(2β))²` (IPO's).
    Ipo,
}

impl AdvantageEstimator {
    /// Whether a critic (value model) is loaded, trained, checkpointed and exported.
    pub fn needs_critic(&self) -> bool {
        matches!(self, AdvantageEstimator::Gae { .. })
    }

    /// Online DPO's loss on its pairs; `None` for the estimators that take a per-token
    /// policy loss.
    pub fn pair_loss(&self) -> Option<PairLoss> {
        match self {
            AdvantageEstimator::OnlineDpo { loss } => Some(*loss),
            _ => None,
        }
    }

    /// Whether the policy loss holds the policy to the reference itself (online DPO's and
    /// A*-PO's, with β = `--kl-coef`): the rewards then carry no KL penalty.
    pub fn kl_in_objective(&self) -> bool {
        matches!(
            self,
            AdvantageEstimator::OnlineDpo { .. } | AdvantageEstimator::A2po
        )
    }

    /// Whether advantages compare the responses of a group (grpo, dr-grpo, rloo).
    pub fn is_group(&self) -> bool {
        matches!(
            self,
            AdvantageEstimator::Grpo { .. }
                | AdvantageEstimator::DrGrpo { .. }
                | AdvantageEstimator::Rloo { .. }
                | AdvantageEstimator::Gdpo { .. }
                | AdvantageEstimator::Sdpo { .. }
        )
    }

    /// Responses per prompt the estimator compares (1 for the others).
    pub fn group(&self) -> i64 {
        match self {
            AdvantageEstimator::Grpo { group, .. }
            | AdvantageEstimator::DrGrpo { group }
            | AdvantageEstimator::Rloo { group, .. }
            | AdvantageEstimator::Gdpo { group }
            | AdvantageEstimator::Sdpo { group, .. } => *group,
            AdvantageEstimator::OnlineDpo { .. } => 2,
            _ => 1,
        }
    }
}

/// What GRPO divides a response's advantage by (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RewardScale {
    /// The std of the response's group (GRPO's).
    #[default]
    Group,
    /// The std of every reward of the rollout batch, over every rank (Lite PPO's).
    Batch,
    /// Nothing (Dr. GRPO's advantage).
    None,
}

impl std::str::FromStr for RewardScale {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "group" => Ok(RewardScale::Group),
            "batch" => Ok(RewardScale::Batch),
            "none" => Ok(RewardScale::None),
            _ => Err(format!(
                "'{s}' is not a reward scaling (expected group, batch or none)"
            )),
        }
    }
}

impl std::fmt::Display for RewardScale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RewardScale::Group => "group",
            RewardScale::Batch => "batch",
            RewardScale::None => "none",
        })
    }
}

/// Per-sequence advantages `[B]` of rewards `[B]` in consecutive groups of `group`:
/// `R − baseline`, the baseline the group's mean (`leave_one_out`: of the others), divided
/// by the unbiased std + 1e-4 of the group or of the whole batch (every rank's rewards) as
/// `scale` says. A NaN reward (a response no reward source scored, TRL's unscorable
/// completion) is left out of every mean and std, as TRL's `nanmean` and `nanstd` leave
/// it; its advantage is NaN, and so is every advantage of a group with too few scored
/// responses for its baseline (one, or one for the std): [`advantages`] makes them 0.
pub fn group_advantages(
    rewards: &Tensor,
    group: i64,
    leave_one_out: bool,
    scale: RewardScale,
    world: &World,
) -> Tensor {
    let r = rewards.to_kind(Kind::Float).view([-1, group]);
    let (count, sum) = known_count_sum(&r, 1);
    let baseline = if leave_one_out {
        (&sum - &r) / (&count - 1.0)
    } else {
        sum / &count
    };
    let adv = &r - baseline;
    let adv = match scale {
        RewardScale::Group => adv / (nan_std(&r, 1) + 1e-4),
        RewardScale::Batch => adv / (var_over(world, known_moments(rewards)).sqrt() + 1e-4),
        RewardScale::None => adv,
    };
    adv.view([-1])
}

/// The number of values of `x` along `dim` that are not NaN and their sum (`dim` kept).
fn known_count_sum(x: &Tensor, dim: i64) -> (Tensor, Tensor) {
    let count = x
        .isnan()
        .logical_not()
        .sum_dim_intlist([dim].as_slice(), true, Kind::Float);
    let sum = x
        .nan_to_num(0.0, None, None)
        .sum_dim_intlist([dim].as_slice(), true, Kind::Float);
    (count, sum)
}

/// The unbiased std along `dim` (kept) of the values of `x` that are not NaN, NaN where
/// fewer than two are (TRL's `nanstd`).
pub(crate) fn nan_std(x: &Tensor, dim: i64) -> Tensor {
    let (count, sum) = known_count_sum(x, dim);
    let squares = (x - sum / &count)
        .square()
        .nan_to_num(0.0, None, None)
        .sum_dim_intlist([dim].as_slice(), true, Kind::Float);
    let var = squares / (&count - 1.0);
    var.where_self(&count.gt(1.0), &Tensor::full_like(&var, f64::NAN))
        .sqrt()
}

/// GDPO's advantages `[B]` (Liu et al. 2026, "Group reward-Decoupled Normalization Policy
/// Optimization"; TRL's `normalize_then_sum`): each source's scores in `by_source`
/// `[B, K]` become `(r − mean of the group) / (unbiased std of the group + 1e-4)` on
/// their own, are summed with `weights`, and the sum is normalised over the whole batch
/// (every rank's rows): `(s − mean) / (unbiased std + 1e-4)`. A source that did not score
/// a response (NaN) is left out of its group's statistics and of that response's sum, as
/// TRL's `nanmean`, `nanstd` and `nansum` leave it; a response no source scored is NaN.
pub fn decoupled_group_advantages(
    by_source: &Tensor,
    weights: &[f64],
    group: i64,
    world: &World,
) -> Tensor {
    let k = by_source.size()[1];
    let r = by_source.to_kind(Kind::Float).view([-1, group, k]);
    let (count, sum) = known_count_sum(&r, 1);
    let normed = (&r - sum / count) / (nan_std(&r, 1) + 1e-4);
    let w = Tensor::from_slice(weights)
        .to_kind(Kind::Float)
        .to_device(r.device());
    let summed = (normed * w)
        .nan_to_num(0.0, None, None)
        .sum_dim_intlist([2].as_slice(), false, Kind::Float)
        .view([-1]);
    let unscored = by_source.isnan().all_dim(1, false);
    let summed = summed.masked_fill(&unscored, f64::NAN);
    batch_normalized(&summed, world)
}

/// `(x − mean) / (unbiased std + 1e-4)` over every rank's `x` `[B]` (NaN left out, and
/// left NaN).
pub fn batch_normalized(x: &Tensor, world: &World) -> Tensor {
    let [n, sum, sum_sq] = world.sums(known_moments(x).into());
    let var = unbiased_var((n, sum, sum_sq));
    (x - sum / n.max(1.0)) / (var.sqrt() + 1e-4)
}

/// Discounted return-to-go of per-token rewards over each row's real tokens.
pub fn returns_to_go(rewards: &Tensor, mask: &Tensor, gamma: f64) -> Tensor {
    let mask_f = mask.to_kind(Kind::Float);
    let rewards = rewards.to_kind(Kind::Float) * &mask_f;
    let t = rewards.size()[1];
    let mut running = Tensor::zeros_like(&rewards.select(1, 0));
    let mut out = Vec::with_capacity(t as usize);
    for i in (0..t).rev() {
        // A token outside the mask passes the return through (a tool result inside a
        // response is not a step); after the response it stays 0.
        let m = mask_f.select(1, i);
        running = (rewards.select(1, i) + gamma * &running) * &m + &running * (1.0 - &m);
        out.push(&running * &m);
    }
    out.reverse();
    Tensor::stack(&out, 1)
}

/// What an estimator gives the update: advantages `[B, N]` whitened over the whole rollout
/// batch (every rank), and the critic's regression targets where there is a critic.
#[derive(Debug)]
pub struct Advantages {
    pub advantages: Tensor,
    pub returns: Option<Tensor>,
}

/// The advantages of one rollout batch under `estimator`. `values` are the critic's (for
/// estimators that need one).
pub fn advantages(
    estimator: AdvantageEstimator,
    rewards: &Tensor,
    values: Option<&Tensor>,
    (mask, sources): (&Tensor, (&Tensor, &[f64])),
    world: &World,
) -> Advantages {
    let _guard = tch::no_grad_guard();
    let mask_f = mask.to_kind(Kind::Float);
    // A response's reward for the group estimators: its score plus its KL penalties.
    let per_sequence = || {
        rewards
            .to_kind(Kind::Float)
            .sum_dim_intlist([1].as_slice(), false, Kind::Float)
    };
    // A response no source scored (NaN) has no advantage, nor has one whose group held
    // too few scored responses for a baseline (TRL's `nan_to_num(advantages, nan=0.0)`).
    let broadcast = |a: Tensor| a.nan_to_num(0.0, None, None).unsqueeze(1) * &mask_f;
    match estimator {
        AdvantageEstimator::Gae { gamma, lam } => {
            let values = values.expect("GAE needs the critic's values");
            let (raw, returns) = gae(rewards, values, mask, gamma, lam);
            Advantages {
                advantages: masked_whiten(&raw, mask, true, world),
                returns: Some(returns),
            }
        }
        AdvantageEstimator::Grpo { group, scale } | AdvantageEstimator::Sdpo { group, scale } => {
            Advantages {
                advantages: broadcast(group_advantages(
                    &per_sequence(),
                    group,
                    false,
                    scale,
                    world,
                )),
                returns: None,
            }
        }
        AdvantageEstimator::DrGrpo { group } => Advantages {
            advantages: broadcast(group_advantages(
                &per_sequence(),
                group,
                false,
                RewardScale::None,
                world,
            )),
            returns: None,
        },
        AdvantageEstimator::Rloo { group, normalize } => {
            let a = group_advantages(&per_sequence(), group, true, RewardScale::None, world);
            Advantages {
                advantages: broadcast(match normalize {
                    true => batch_normalized(&a, world),
                    false => a,
                }),
                returns: None,
            }
        }
        AdvantageEstimator::Gdpo { group } => Advantages {
            advantages: broadcast(decoupled_group_advantages(
                sources.0, sources.1, group, world,
            )),
            returns: None,
        },
        AdvantageEstimator::ReinforcePlusPlus { gamma } => Advantages {
            advantages: masked_whiten(&returns_to_go(rewards, mask, gamma), mask, true, world),
            returns: None,
        },
        AdvantageEstimator::OnlineDpo { .. } => Advantages {
            advantages: broadcast(preferences(&per_sequence())),
            returns: None,
        },
        AdvantageEstimator::Sdft => Advantages {
            advantages: Tensor::zeros_like(mask),
            returns: None,
        },
        AdvantageEstimator::A2po => {
            let v_star = values.expect("A*-PO needs each prompt's optimal value");
            Advantages {
                advantages: broadcast(per_sequence() - v_star.to_kind(Kind::Float)),
                returns: None,
            }
        }
    }
}

/// A*-PO's optimal value of a prompt from the rewards of `n` responses sampled from the
/// reference: `V* = β₁·log((1/n)·Σ exp(r_i/β₁))`, taken through the log-sum-exp (TRL's
/// `_estimate_optimal_values`). Between the mean reward (β₁ → ∞) and the best (β₁ → 0).
pub fn optimal_value(rewards: &[f64], beta1: f64) -> f64 {
    let top = rewards
        .iter()
        .map(|r| r / beta1)
        .fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = rewards.iter().map(|r| (r / beta1 - top).exp()).sum();
    beta1 * (top + sum.ln() - (rewards.len() as f64).ln())
}

/// A*-PO's loss over a micro-batch's responses (TRL's `A2POTrainer.compute_loss`): with
/// `s` = Σ over a response's `mask`ed tokens of log π − log π_ref, its implicit reward
/// `β·s` regressed onto its target `r − V*` (`advantage`, the same on each of its tokens),
/// `(β·s − (r − V*))²`, the mean over the responses. Also returns, per response, the
/// implicit reward and the target, which TRL logs.
pub fn a2po_loss(
    (logprobs, ref_logprobs): (&Tensor, &Tensor),
    advantage: &Tensor,
    mask: &Tensor,
    beta: f64,
) -> (Tensor, (Tensor, Tensor)) {
    let implicit =
        row_masked_sum(&(logprobs - ref_logprobs).to_kind(Kind::Float), mask, false) * beta;
    let target = advantage.select(1, 0).to_kind(Kind::Float);
    let loss = (&implicit - &target).square().mean(Kind::Float);
    (loss, (implicit.detach(), target))
}

/// Rewards `[B]` of consecutive pairs (a prompt's two responses) as +1 for the chosen one,
/// the better rewarded (the first on a tie, as TRL's `first_half >= second_half`), and −1
/// for the rejected one.
pub fn preferences(rewards: &Tensor) -> Tensor {
    let pairs = rewards.to_kind(Kind::Float).view([-1, 2]);
    let first = pairs
        .select(1, 0)
        .ge_tensor(&pairs.select(1, 1))
        .to_kind(Kind::Float)
        * 2.0
        - 1.0;
    Tensor::stack(&[&first, &(-&first)], 1).view([-1])
}

/// Online DPO's loss over the pairs of a micro-batch (consecutive rows, `preference` +1 on
/// the chosen response's tokens and −1 on the rejected one's, [`preferences`]): with
/// `s` = Σ over a response's `mask`ed tokens of log π − log π_ref, each pair's margin
/// `z = s_chosen − s_rejected` and its loss `−log σ(β·z)` or `(z − 1/(2β))²`, the mean
/// over the pairs (TRL's `OnlineDPOTrainer.training_step`). Also returns, per pair, what
/// TRL logs: β·s of the chosen and of the rejected response, and their log-prob sums.
pub fn online_dpo_loss(
    (logprobs, ref_logprobs): (&Tensor, &Tensor),
    preference: &Tensor,
    mask: &Tensor,
    beta: f64,
    loss: PairLoss,
) -> (Tensor, PairStats) {
    let rows = |t: &Tensor| row_masked_sum(&t.to_kind(Kind::Float), mask, false);
    // The preference is ±1 on each of a response's tokens: its first column says which.
    let sign = preference.select(1, 0).view([-1, 2]);
    let chosen_first = sign.select(1, 0).gt(0.0);
    // Each pair's (chosen, rejected) value of a per-row quantity `[B]`.
    let split = |x: &Tensor| {
        let x = x.view([-1, 2]);
        let (a, b) = (x.select(1, 0), x.select(1, 1));
        (
            a.where_self(&chosen_first, &b),
            b.where_self(&chosen_first, &a),
        )
    };
    let logps = rows(logprobs);
    let margin = rows(&(logprobs - ref_logprobs));
    let (chosen, rejected) = split(&margin);
    let z = &chosen - &rejected;
    let losses = match loss {
        PairLoss::Sigmoid => -(&z * beta).log_sigmoid(),
        PairLoss::Ipo => (&z - 1.0 / (2.0 * beta)).square(),
    };
    let (logps_chosen, logps_rejected) = split(&logps.detach());
    let stats = PairStats {
        chosen_rewards: (chosen.detach() * beta),
        rejected_rewards: (rejected.detach() * beta),
        logps_chosen,
        logps_rejected,
    };
    (losses.mean(Kind::Float), stats)
}

/// What TRL's `OnlineDPOTrainer` logs of a micro-batch's pairs, one value per pair.
pub struct PairStats {
    /// β·Σ(log π − log π_ref) of the chosen and of the rejected response
    /// (`rewards/chosen`, `rewards/rejected`; their difference `rewards/margins`, its
    /// sign `rewards/accuracies`).
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
    /// Σ log π of each (`logps/chosen`, `logps/rejected`).
    pub logps_chosen: Tensor,
    pub logps_rejected: Tensor,
}

/// How the per-token policy loss of a minibatch becomes one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum LossAggregation {
    /// Mean over every token of the minibatch (DAPO's; PPO's until now).
    #[default]
    TokenMean,
    /// Each sequence's token mean, then the mean over sequences (GRPO's).
    SeqMeanTokenMean,
    /// Each sequence's token sum over a constant (the response length), then the mean over
    /// sequences (Dr. GRPO's length-unbiased form).
    SeqMeanTokenSumNorm,
    /// Each sequence's token sum, then the mean over sequences (veRL's; TRL's `luspo`
    /// aggregation, which weighs a sequence by its length).
    SeqMeanTokenSum,
}

impl LossAggregation {
    const NAMES: [(&'static str, LossAggregation); 4] = [
        ("token-mean", LossAggregation::TokenMean),
        ("seq-mean-token-mean", LossAggregation::SeqMeanTokenMean),
        (
            "seq-mean-token-sum-norm",
            LossAggregation::SeqMeanTokenSumNorm,
        ),
        ("seq-mean-token-sum", LossAggregation::SeqMeanTokenSum),
    ];

    /// `per_token` `[B, N]` aggregated over this micro-batch's `mask`; `norm` is the
    /// constant of `SeqMeanTokenSumNorm`.
    pub fn aggregate(self, per_token: &Tensor, mask: &Tensor, norm: f64) -> Tensor {
        let sums = row_masked_sum(per_token, mask, false);
        match self {
            LossAggregation::TokenMean => masked_mean(per_token, mask),
            LossAggregation::SeqMeanTokenMean => {
                row_masked_mean(per_token, mask, false).mean(per_token.kind())
            }
            LossAggregation::SeqMeanTokenSumNorm => (sums / norm).mean(per_token.kind()),
            LossAggregation::SeqMeanTokenSum => sums.mean(per_token.kind()),
        }
    }

    /// The share of a minibatch's loss this micro-batch carries (so that micro-batches sum
    /// to the minibatch's aggregate): its tokens, or its sequences.
    pub fn weight(self, tokens: f64, mb_tokens: f64, rows: f64, mb_rows: f64) -> f64 {
        match self {
            LossAggregation::TokenMean => tokens / mb_tokens,
            _ => rows / mb_rows,
        }
    }
}

impl std::str::FromStr for LossAggregation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, a)| *a)
            .ok_or_else(|| {
                format!("'{s}' is not a loss aggregation (expected token-mean, seq-mean-token-mean, seq-mean-token-sum-norm or seq-mean-token-sum)")
            })
    }
}

impl std::fmt::Display for LossAggregation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = Self::NAMES.iter().find(|(_, a)| a == self).unwrap().0;
        f.write_str(name)
    }
}

/// Per-token rewards of a rollout: `−β·KL` on every token plus the score on the last
/// (see [`shaped_rewards`]), whitened over the whole batch when `whiten` (with the mean
/// kept, as TRL's `whiten_rewards`). A NaN score (a response no reward source scored)
/// makes its row's rewards NaN, for the group estimators to leave out, and the other
/// rows' statistics leave it out. Returns `(rewards, non_score_rewards)`.
pub fn rewards(
    kl: &Tensor,
    scores: &Tensor,
    mask: &Tensor,
    beta: f64,
    whiten: bool,
    world: &World,
) -> (Tensor, Tensor) {
    let _guard = tch::no_grad_guard();
    let scored = scores.isnan().logical_not().unsqueeze(1);
    let (rewards, non_score) = shaped_rewards(kl, &scores.nan_to_num(0.0, None, None), mask, beta);
    let rewards = if whiten {
        let counted = mask.to_kind(Kind::Float) * scored.to_kind(Kind::Float);
        masked_whiten(&rewards, &counted, false, world)
    } else {
        rewards
    };
    let nan = Tensor::full_like(&rewards, f64::NAN);
    (rewards.where_self(&scored, &nan), non_score)
}

/// Results of the clipped surrogate objective.
#[derive(Debug)]
pub struct PolicyLoss {
    /// `mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)))` over masked tokens.
    pub loss: Tensor,
    /// Fraction of tokens where the clipped term was the larger.
    pub clipfrac: f64,
    /// Fractions of tokens whose ratio is below `1 − low` with a negative advantage, and
    /// above `1 + high` with a positive one (TRL's `clip_ratio/low_mean`, `/high_mean`).
    pub clip_low: f64,
    pub clip_high: f64,
    /// `½·mean((log π − log π_old)²)`, as TRL reports it.
    pub approxkl: f64,
    /// VESPO's φ (each sequence's token mean), the mean over the sequences (TRL's
    /// `vespo/phi_seq_mean`); 0 otherwise.
    pub vespo_phi: f64,
    pub ratio_mean: f64,
    /// Largest `|ρ − 1|` over masked tokens.
    pub ratio_max_dev: f64,
    /// The smallest of the sequences' shares of low-clipped tokens and the largest of their
    /// shares of high-clipped ones (TRL's `clip_ratio/low_min` and `/high_max`), over the
    /// sequences with tokens; `None` for the objectives that do not clip.
    pub seq_clip: Option<(f64, f64)>,
}

/// The clip interval of the policy ratio: `[1 − low, 1 + high]` (DAPO's clip-higher when
/// `high > low`); `delta` also caps the unclipped ratio (two-sided GRPO, INTELLECT-2), so
/// a response whose probability grew far beyond the old one's cannot make the loss of a
/// negative advantage unbounded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clip {
    pub low: f64,
    pub high: f64,
    pub delta: Option<f64>,
}

impl Clip {
    pub fn symmetric(eps: f64) -> Self {
        Clip {
            low: eps,
            high: eps,
            delta: None,
        }
    }
}

/// Which probability ratio the surrogate clips (TRL's `importance_sampling_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportanceSampling {
    /// Each token's `π / π_old` (PPO's, GRPO's).
    #[default]
    Token,
    /// One ratio per response: `exp` of the mean over its tokens of `log π − log π_old`,
    /// the length-normalised sequence likelihood ratio of GSPO (Zheng et al. 2025), for
    /// every token of the response.
    Sequence,
}

impl std::str::FromStr for ImportanceSampling {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "token" => Ok(ImportanceSampling::Token),
            "sequence" => Ok(ImportanceSampling::Sequence),
            _ => Err(format!(
                "'{s}' is not an importance sampling level (expected token or sequence)"
            )),
        }
    }
}

impl std::fmt::Display for ImportanceSampling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImportanceSampling::Token => "token",
            ImportanceSampling::Sequence => "sequence",
        })
    }
}

/// What the policy's per-token loss does with the importance weight `w` (`--policy-loss`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Objective {
    /// PPO's clipped surrogate `max(−A·w, −A·clip(w, 1−low, 1+high))`.
    #[default]
    Clip,
    /// CISPO (MiniMax-M1): `−sg(min(w, high))·A·log π` — the weight itself is capped
    /// (at `--cliprange-high`, an absolute bound here as in TRL; ScaleRL uses 5) and no
    /// token loses its gradient.
    Cispo,
    /// SAPO (Gao et al. 2025): a soft gate instead of the clip, `−(4/τ)·σ(τ·(w − 1))·A`,
    /// τ = `pos` for positive advantages and `neg` otherwise; its gradient at w = 1 is the
    /// policy gradient's.
    Sapo { pos: f64, neg: f64 },
    /// VESPO (TRL 1.16's `vespo`): `−sg(φ(w))·A·log π` with w the sequence's importance
    /// weight exp(Σ_t log π/π_old) and the Gamma weight φ(w) = e^λ·w^k·e^(−λw) (φ(1) = 1:
    /// the policy gradient on-policy), k and λ by the advantage's sign.
    Vespo {
        k_pos: f64,
        lambda_pos: f64,
        k_neg: f64,
        lambda_neg: f64,
    },
    /// GMPO (Zhao et al. 2025, TRL's `GMPOTrainer`): per response, `−A·exp(mean_t
    /// clip(log w_t))`, the geometric mean of its token weights, each log-weight clipped in
    /// log space to `[−low, high]` on the side the advantage's sign makes binding (PPO's
    /// min, in logs). A per-response loss: it is averaged over responses
    /// ([`LossAggregation::SeqMeanTokenMean`], set by the caller).
    Gmpo,
}

/// How the policy's surrogate objective is formed and reduced to one number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Surrogate {
    pub objective: Objective,
    pub clip: Clip,
    pub level: ImportanceSampling,
    pub aggregation: LossAggregation,
    /// The constant of [`LossAggregation::SeqMeanTokenSumNorm`] (the response length).
    pub norm: f64,
}

impl Surrogate {
    /// PPO's: per-token ratios clipped to `clip`, the mean over tokens.
    pub fn ppo(clip: Clip) -> Self {
        Surrogate {
            objective: Objective::Clip,
            clip,
            level: ImportanceSampling::Token,
            aggregation: LossAggregation::TokenMean,
            norm: 1.0,
        }
    }
}

/// The policy's per-token loss under `surrogate.objective` — by default the clipped
/// surrogate `max(−A·w, −A·clip(w, 1−low, 1+high))` (`w` capped at `delta` in the first
/// term when set) — aggregated as `surrogate` says. `approxkl`, the ratio's mean and its
/// largest deviation are the per-token ones whatever the level (they check the rollout's
/// log-probs); the clip fractions are of what was clipped (CISPO: capped; SAPO clips
/// nothing). `keep` (0/1 per token, `--top-entropy-quantile`) zeroes the loss of the
/// other tokens, which still count in the aggregation's denominators (TRL's
/// `entropy_mask`).
pub fn policy_loss(
    logprobs: &Tensor,
    old_logprobs: &Tensor,
    advantages: &Tensor,
    (mask, keep): (&Tensor, Option<&Tensor>),
    surrogate: &Surrogate,
) -> PolicyLoss {
    let Surrogate {
        objective,
        clip,
        level,
        aggregation,
        norm,
    } = *surrogate;
    let log_ratio = logprobs - old_logprobs;
    let weight = importance_weight(&log_ratio, mask, level);
    let fraction = |t: &Tensor| masked_mean(&t.to_kind(Kind::Float), mask).double_value(&[]);
    // Each sequence's share of `low` tokens and of `high` ones: the least and the most.
    let seq_extremes = |low: &Tensor, high: &Tensor| {
        let has = mask
            .sum_dim_intlist([1].as_slice(), false, Kind::Float)
            .gt(0.0);
        let share = |t: &Tensor| row_masked_mean(&t.to_kind(Kind::Float), mask, false);
        let (lo, hi) = (
            share(low).masked_select(&has),
            share(high).masked_select(&has),
        );
        (lo.numel() > 0).then(|| (lo.min().double_value(&[]), hi.max().double_value(&[])))
    };
    let positive = advantages.gt(0.0);
    let mut vespo_mean = 0.0;
    let mut seq_clip = None;
    // Per token: the loss, and which tokens were clipped (all, low side, high side).
    let (per_token, clipfrac, clip_low, clip_high) = match objective {
        Objective::Clip => {
            let capped = match clip.delta {
                Some(delta) => weight.clamp_max(delta),
                None => weight.shallow_clone(),
            };
            let unclipped = -advantages * capped;
            let clipped = -advantages * weight.clamp(1.0 - clip.low, 1.0 + clip.high);
            let low = weight.lt(1.0 - clip.low).logical_and(&advantages.lt(0.0));
            let high = weight.gt(1.0 + clip.high).logical_and(&positive);
            seq_clip = seq_extremes(&low, &high);
            (
                unclipped.maximum(&clipped),
                fraction(&clipped.gt_tensor(&unclipped)),
                fraction(&low),
                fraction(&high),
            )
        }
        Objective::Cispo => {
            let capped = weight.clamp_max(clip.high).detach();
            let high = fraction(&weight.gt(clip.high).logical_and(&positive));
            (-(capped * advantages * logprobs), high, 0.0, high)
        }
        Objective::Sapo { pos, neg } => {
            let tau = positive.to_kind(weight.kind()).multiply_scalar(pos - neg) + neg;
            let gate = (&tau * (&weight - 1.0)).sigmoid() * 4.0 / &tau;
            (-(gate * advantages), 0.0, 0.0, 0.0)
        }
        Objective::Vespo {
            k_pos,
            lambda_pos,
            k_neg,
            lambda_neg,
        } => {
            let gamma = [(k_pos, lambda_pos), (k_neg, lambda_neg)];
            let phi = vespo_phi(&log_ratio, advantages, mask, gamma);
            let per_row = row_masked_mean(&phi.to_kind(Kind::Float), mask, false);
            vespo_mean = per_row.mean(Kind::Float).double_value(&[]);
            (-(phi * advantages * logprobs), 0.0, 0.0, 0.0)
        }
        Objective::Gmpo => {
            let clamped = log_ratio.clamp(-clip.low, clip.high);
            let clipped = log_ratio
                .minimum(&clamped)
                .where_self(&positive, &log_ratio.maximum(&clamped));
            let counted = match keep {
                Some(keep) => mask.to_kind(Kind::Float) * keep,
                None => mask.to_kind(Kind::Float),
            };
            let geometric = row_masked_mean(&clipped.to_kind(Kind::Float), &counted, true).exp();
            let low = log_ratio.lt(-clip.low).logical_and(&advantages.lt(0.0));
            let high = log_ratio.gt(clip.high).logical_and(&positive);
            seq_clip = seq_extremes(&low, &high);
            (
                -(geometric * advantages),
                fraction(&low.logical_or(&high)),
                fraction(&low),
                fraction(&high),
            )
        }
    };
    let per_token = match (keep, objective) {
        // GMPO's tokens outside `keep` leave its geometric mean instead.
        (Some(keep), o) if o != Objective::Gmpo => per_token * keep,
        _ => per_token,
    };
    let loss = aggregation.aggregate(&per_token, mask, norm);
    PolicyLoss {
        clipfrac,
        clip_low,
        clip_high,
        vespo_phi: vespo_mean,
        seq_clip,
        ..PolicyLoss::unclipped(loss, &log_ratio, mask)
    }
}

impl PolicyLoss {
    /// `loss` of an objective that clips nothing (online DPO's), with the per-token checks
    /// of `log_ratio` (log π − log π_old) over `mask`: `approxkl`, the ratio's mean and its
    /// largest deviation from 1.
    pub fn unclipped(loss: Tensor, log_ratio: &Tensor, mask: &Tensor) -> Self {
        let d = log_ratio.detach();
        let ratio = d.exp();
        let mask_b = mask.to_kind(Kind::Bool);
        PolicyLoss {
            loss,
            clipfrac: 0.0,
            clip_low: 0.0,
            clip_high: 0.0,
            approxkl: 0.5 * masked_mean(&d.square(), mask).double_value(&[]),
            vespo_phi: 0.0,
            seq_clip: None,
            ratio_mean: masked_mean(&ratio, mask).double_value(&[]),
            // (0 with no token: every response of a micro-batch may be masked out.)
            ratio_max_dev: (ratio - 1.0)
                .abs()
                .masked_fill(&mask_b.logical_not(), 0.0)
                .max()
                .double_value(&[]),
        }
    }
}

/// The importance weight `[B, N]` of each token at `level`, from the per-token
/// `log_ratio` log π − log π_old: its exp (token), or for every token of a response the
/// exp of the mean over its `mask`ed tokens (sequence, GSPO's).
pub fn importance_weight(log_ratio: &Tensor, mask: &Tensor, level: ImportanceSampling) -> Tensor {
    match level {
        ImportanceSampling::Token => log_ratio.exp(),
        ImportanceSampling::Sequence => row_masked_mean(log_ratio, mask, true)
            .expand_as(log_ratio)
            .exp(),
    }
}

/// DeepSeek-V3.2's off-policy sequence mask (TRL's `off_policy_mask_threshold` δ), 0/1
/// `[B, N]` without gradient: 0 where a token's advantage is negative and its response's
/// mean over its `mask`ed tokens of log π_old − log π (the rollout's log-probs against
/// the current policy's) exceeds δ; 1 elsewhere.
pub fn off_policy_mask(
    logprobs: &Tensor,
    old_logprobs: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    delta: f64,
) -> Tensor {
    let drift = (old_logprobs - logprobs.detach()).to_kind(Kind::Float);
    let mean_drift = row_masked_mean(&drift, mask, true);
    advantages
        .ge(0.0)
        .logical_or(&mean_drift.le(delta))
        .to_kind(Kind::Float)
}

/// How the sampler's distribution is corrected towards the training forward's (TRL's
/// `vllm_importance_sampling_mode`): the ratio π_old/π_sampler of the rollout's recomputed
/// log-probs against the log-probs the tokens were sampled with, per token or per
/// response (the exp of the sum over its tokens), truncated to `[min, max]` or zeroed
/// outside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SamplingCorrection {
    TokenTruncate,
    TokenMask,
    SequenceTruncate,
    SequenceMask,
}

/// The importance weight `[B, N]` (no gradient) that corrects the policy loss for the
/// sampler's drift from the training forward (truncated IS, Yao et al. 2025; TRL's
/// `vllm_importance_sampling_correction`): exp(log π_old − log π_sampler) per `mask`ed
/// token, or the exp of each response's sum for every token of it, then clamped to
/// `[min, max]` (truncate) or set to 0 outside it (mask).
pub fn sampling_correction(
    old_logprobs: &Tensor,
    sampler_logprobs: &Tensor,
    mask: &Tensor,
    mode: SamplingCorrection,
    (min, max): (Option<f64>, Option<f64>),
) -> Tensor {
    let mask_f = mask.to_kind(Kind::Float);
    let diff = (old_logprobs - sampler_logprobs).to_kind(Kind::Float) * &mask_f;
    let log_ratio = match mode {
        SamplingCorrection::TokenTruncate | SamplingCorrection::TokenMask => diff,
        SamplingCorrection::SequenceTruncate | SamplingCorrection::SequenceMask => diff
            .sum_dim_intlist([1].as_slice(), true, Kind::Float)
            .expand_as(&mask_f),
    };
    let ratio = log_ratio.exp();
    let (lo, hi) = (
        min.unwrap_or(f64::NEG_INFINITY),
        max.unwrap_or(f64::INFINITY),
    );
    match mode {
        SamplingCorrection::TokenTruncate | SamplingCorrection::SequenceTruncate => {
            ratio.clamp(lo, hi)
        }
        SamplingCorrection::TokenMask | SamplingCorrection::SequenceMask => {
            let inside = ratio.ge(lo).logical_and(&ratio.le(hi));
            ratio * inside.to_kind(Kind::Float)
        }
    }
}

/// How close (relative; absolute below 1 nat) an entropy may fall below the threshold
/// and count as at it: 8× the differences seen between micro-batch splits (1.3e-7).
pub const TIE: f64 = 1e-6;

/// TRL's `get_high_entropy_mask` for `--top-entropy-quantile` ρ: 1 where a `counted`
/// token's `entropy` is at least the (1 − ρ) quantile (linear interpolation, as
/// `torch.quantile`) of `values`, the counted entropies of every rank; 0 elsewhere, and
/// everywhere when there are none. ρ = 1 keeps every counted token, ρ = 0 the highest.
///
/// An entropy within [`TIE`] below the threshold counts as at it: tokens with one
/// distribution (the first token of a GRPO group's responses) tie, and computed in
/// different micro-batches or ranks they differ in the last bits; with the threshold on
/// them (a quantile inside a run of equal values is that value), an exact comparison
/// would keep some and drop others depending on the split.
pub fn high_entropy_mask(entropy: &Tensor, counted: &Tensor, values: &[f32], rho: f64) -> Tensor {
    if values.is_empty() {
        return entropy.zeros_like().to_kind(Kind::Float);
    }
    let threshold = Tensor::from_slice(values)
        .quantile_scalar(1.0 - rho, None, false, "linear")
        .double_value(&[]);
    entropy
        .ge(threshold - TIE * threshold.abs().max(1.0))
        .logical_and(&counted.to_kind(Kind::Bool))
        .to_kind(Kind::Float)
}

/// VESPO's Gamma weights `[B, N]` (detached; TRL 1.16's `get_gamma_weights`): with
/// log w = Σ_t clamp(log π/π_old, ±20) over each response's tokens, clamped to
/// [log 1e-8, 20], φ = exp(λ + k·log w − λ·w), (k, λ) the first of `gamma` for a
/// non-negative advantage and the second otherwise; λ at least 1e-4; a non-finite φ
/// counts 0.
pub fn vespo_phi(
    log_ratio: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    [(k_pos, lambda_pos), (k_neg, lambda_neg)]: [(f64, f64); 2],
) -> Tensor {
    let kind = log_ratio.kind();
    let log_w = row_masked_sum(&log_ratio.detach().clamp(-20.0, 20.0), mask, true)
        .clamp(1e-8f64.ln(), 20.0);
    let nonneg = advantages.ge(0.0).to_kind(kind);
    let by_sign = |pos: f64, neg: f64| &nonneg * (pos - neg) + neg;
    let (k, lambda) = (
        by_sign(k_pos, k_neg),
        by_sign(lambda_pos, lambda_neg).clamp_min(1e-4),
    );
    let log_phi = &lambda + k * &log_w - lambda * log_w.exp();
    log_phi.exp().nan_to_num(0.0, 0.0, 0.0)
}

/// Clipped value loss: `½·mean(max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²))` and the
/// fraction of tokens where the clipped term was the larger.
pub fn value_loss(
    values: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    cliprange_value: f64,
) -> (Tensor, f64) {
    let clipped_values =
        old_values + (values - old_values).clamp(-cliprange_value, cliprange_value);
    let unclipped = (values - returns).square();
    let clipped = (clipped_values - returns).square();
    let loss = 0.5 * masked_mean(&unclipped.maximum(&clipped), mask);
    let clipfrac =
        masked_mean(&clipped.gt_tensor(&unclipped).to_kind(Kind::Float), mask).double_value(&[]);
    (loss, clipfrac)
}

/// `1 − Var(returns − values) / Var(returns)` over the masked tokens of every rank.
pub fn explained_variance(values: &Tensor, returns: &Tensor, mask: &Tensor, world: &World) -> f64 {
    let var_returns = var_over(world, moments(returns, mask));
    let var_residual = var_over(world, moments(&(returns - values), mask));
    if var_returns == 0.0 {
        return f64::NAN;
    }
    1.0 - var_residual / var_returns
}

/// The Bessel-corrected variance of every rank's values from each rank's (count, Σx, Σx²).
pub fn var_over(world: &World, moments: (f64, f64, f64)) -> f64 {
    let [n, sum, sum_sq] = world.sums(moments.into());
    unbiased_var((n, sum, sum_sq))
}

/// The mean of every rank's values of `x` that are not NaN (NaN where there are none, as
/// TRL's `nanmean`).
pub fn nan_mean_over(world: &World, x: &Tensor) -> f64 {
    let (n, sum, _) = known_moments(x);
    let [n, sum] = world.sums([n, sum]);
    sum / n
}

/// The unbiased variance of (count, Σx, Σx²).
pub(crate) fn unbiased_var((n, sum, sum_sq): (f64, f64, f64)) -> f64 {
    ((sum_sq - sum * sum / n.max(1.0)) / (n - 1.0).max(1.0)).max(0.0)
}

/// (count, Σx, Σx²) of the values of `x` that are not NaN, in f64.
pub(crate) fn known_moments(x: &Tensor) -> (f64, f64, f64) {
    moments(&x.nan_to_num(0.0, None, None), &x.isnan().logical_not())
}

/// (count, Σx, Σx²) of `x` where `mask` is 1, in f64.
fn moments(x: &Tensor, mask: &Tensor) -> (f64, f64, f64) {
    let m = mask.to_kind(Kind::Double);
    let x = x.to_kind(Kind::Double) * &m;
    let total = |t: &Tensor| t.sum(Kind::Double).double_value(&[]);
    (total(&m), total(&x), total(&(&x * &x)))
}

/// The KL coefficient β: fixed, or adapted towards a target KL (Ziegler et al. 2019):
/// `β ← β · (1 + clip(KL / target − 1, −0.2, 0.2) · n / horizon)`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KlController {
    pub value: f64,
    /// `None` keeps β fixed.
    pub target: Option<f64>,
    pub horizon: f64,
}

impl KlController {
    /// After a batch of `n_steps` samples whose mean KL was `kl`.
    pub fn update(&mut self, kl: f64, n_steps: f64) {
        if let Some(target) = self.target {
            let error = (kl / target - 1.0).clamp(-0.2, 0.2);
            self.value *= 1.0 + error * n_steps / self.horizon;
        }
    }
}

/// The entropy bonus's coefficient: fixed (`--entropy-coef`), or adapted after each
/// optimiser step towards a target entropy (Skywork-OR1; TRL 1.16's
/// `use_adaptive_entropy`, see [`EntropyController::update`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EntropyController {
    pub coef: f64,
    /// The last optimiser step's mean token entropy over every rank (`None` before the
    /// first: TRL's +∞).
    pub last_entropy: Option<f64>,
    #[serde(skip)]
    pub adaptive: Option<AdaptiveEntropy>,
}

/// `--use-adaptive-entropy`'s settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveEntropy {
    pub target: f64,
    pub delta: f64,
    pub min: f64,
    pub max: f64,
}

impl EntropyController {
    /// Whether the loss has an entropy bonus at all (its entropies then keep their graph).
    pub fn on(&self) -> bool {
        self.coef > 0.0 || self.adaptive.is_some()
    }

    /// The coefficient this step applies: adaptive control applies its coefficient only
    /// after a step whose entropy was at or below the target.
    pub fn applied(&self) -> f64 {
        match self.adaptive {
            None => self.coef,
            Some(a) if self.last_entropy.is_some_and(|e| e <= a.target) => self.coef,
            Some(_) => 0.0,
        }
    }

    /// After an optimiser step whose tokens had mean entropy `entropy`: the coefficient
    /// grows by `delta` at or below the target and shrinks by it above, within
    /// [`min`, `max`] (a fixed coefficient stays).
    pub fn update(&mut self, entropy: f64) {
        if let Some(a) = self.adaptive {
            self.coef = if entropy <= a.target {
                (self.coef + a.delta).min(a.max)
            } else {
                (self.coef - a.delta).max(a.min)
            };
            self.last_entropy = Some(entropy);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::ops::masked_var;
    use tch::Device;

    fn t(rows: &[&[f32]]) -> Tensor {
        let v: Vec<Vec<f32>> = rows.iter().map(|r| r.to_vec()).collect();
        Tensor::from_slice2(&v)
    }

    fn to_vec(x: &Tensor) -> Vec<Vec<f32>> {
        Vec::<Vec<f32>>::try_from(x.to_kind(Kind::Float)).unwrap()
    }

    /// GAE by a plain loop over each row's real tokens.
    fn gae_loop(r: &[f32], v: &[f32], n: usize, gamma: f32, lam: f32) -> Vec<f32> {
        let mut adv = vec![0f32; r.len()];
        let mut last = 0f32;
        for i in (0..n).rev() {
            let next = if i + 1 < n { v[i + 1] } else { 0.0 };
            let delta = r[i] + gamma * next - v[i];
            last = delta + gamma * lam * last;
            adv[i] = last;
        }
        adv
    }

    #[test]
    fn gae_matches_a_plain_loop_and_ignores_padding() {
        tch::manual_seed(1);
        let rewards = Tensor::randn([3, 6], (Kind::Float, Device::Cpu));
        let values = Tensor::randn([3, 6], (Kind::Float, Device::Cpu));
        let lengths = [6usize, 4, 1];
        let mask = t(&[
            &[1., 1., 1., 1., 1., 1.],
            &[1., 1., 1., 1., 0., 0.],
            &[1., 0., 0., 0., 0., 0.],
        ]);
        let (adv, ret) = gae(&rewards, &values, &mask, 0.9, 0.8);
        let (r, v, a, rt) = (
            to_vec(&rewards),
            to_vec(&values),
            to_vec(&adv),
            to_vec(&ret),
        );
        for (b, &n) in lengths.iter().enumerate() {
            let expected = gae_loop(&r[b], &v[b], n, 0.9, 0.8);
            for i in 0..6 {
                assert!((a[b][i] - expected[i]).abs() < 1e-5, "row {b} token {i}");
                let want_ret = if i < n { expected[i] + v[b][i] } else { 0.0 };
                assert!((rt[b][i] - want_ret).abs() < 1e-5);
            }
        }
        // Garbage in masked positions changes nothing.
        let noisy_r = &rewards + (1 - &mask) * 1000.0;
        let noisy_v = &values - (1 - &mask) * 1000.0;
        let (adv2, ret2) = gae(&noisy_r, &noisy_v, &mask, 0.9, 0.8);
        assert!(adv2.allclose(&adv, 1e-6, 1e-6, false) && ret2.allclose(&ret, 1e-6, 1e-6, false));
    }

    #[test]
    fn gae_with_gamma_lambda_one_is_reward_to_go_minus_values() {
        tch::manual_seed(2);
        let rewards = Tensor::randn([2, 5], (Kind::Float, Device::Cpu));
        let values = Tensor::randn([2, 5], (Kind::Float, Device::Cpu));
        let mask = t(&[&[1., 1., 1., 1., 1.], &[1., 1., 1., 0., 0.]]);
        let (adv, _) = gae(&rewards, &values, &mask, 1.0, 1.0);
        let masked_r = &rewards * &mask;
        let to_go = masked_r.flip([1]).cumsum(1, Kind::Float).flip([1]);
        let expected = (to_go - &values) * &mask;
        assert!(adv.allclose(&expected, 1e-5, 1e-5, false));
    }

    #[test]
    fn gae_advantages_are_whitened_and_returns_kept() {
        tch::manual_seed(4);
        let rewards = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
        let values = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
        let mask = t(&[
            &[1., 1., 1., 1., 1.],
            &[1., 1., 0., 0., 0.],
            &[1., 1., 1., 0., 0.],
        ]);
        let est = AdvantageEstimator::Gae {
            gamma: 1.0,
            lam: 0.95,
        };
        assert!(est.needs_critic());
        let none = (
            &Tensor::zeros([0, 0], (Kind::Float, tch::Device::Cpu)),
            &[][..],
        );
        let out = advantages(
            est,
            &rewards,
            Some(&values),
            (&mask, none),
            &World::single(),
        );
        let (raw, returns) = gae(&rewards, &values, &mask, 1.0, 0.95);
        assert!(out.returns.unwrap().equal(&returns));
        let a = &out.advantages;
        assert!(masked_mean(a, &mask).double_value(&[]).abs() < 1e-5);
        assert!((masked_var(a, &mask).double_value(&[]) - 1.0).abs() < 1e-4);
        // Whitening is affine: the order of the raw advantages is kept.
        let (x, y) = (
            raw.masked_select(&mask.to_kind(Kind::Bool)),
            a.masked_select(&mask.to_kind(Kind::Bool)),
        );
        assert!(x.argsort(0, false).equal(&y.argsort(0, false)));
        let outside: Tensor = a * (1.0 - &mask);
        assert_eq!(outside.abs().sum(Kind::Float).double_value(&[]), 0.0);
    }

    /// The group estimators by plain loops over each group of 4.
    #[test]
    fn group_estimators_match_plain_loops() {
        let r = [1.0f32, 0.0, 0.5, 2.5, 3.0, 3.0, 3.0, 3.0];
        let rewards = Tensor::from_slice(&r);
        let one = World::single();
        let advantages = |leave_one_out, scale| {
            let a = group_advantages(&rewards, 4, leave_one_out, scale, &one);
            Vec::<f32>::try_from(a).unwrap()
        };
        let grpo = advantages(false, RewardScale::Group);
        let dr = advantages(false, RewardScale::None);
        let rloo = advantages(true, RewardScale::None);
        let batch = advantages(false, RewardScale::Batch);
        // The batch's std: of all 8 rewards (unbiased), as TRL's `rewards.std()`.
        let all_mean = r.iter().sum::<f32>() / 8.0;
        let all_std = (r.iter().map(|x| (x - all_mean).powi(2)).sum::<f32>() / 7.0).sqrt();
        for g in r.chunks(4).enumerate() {
            let (gi, xs) = g;
            let mean = xs.iter().sum::<f32>() / 4.0;
            let std = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 3.0).sqrt();
            for (j, &x) in xs.iter().enumerate() {
                let i = gi * 4 + j;
                assert!(
                    (grpo[i] - (x - mean) / (std + 1e-4)).abs() < 1e-5,
                    "grpo {i}"
                );
                assert!((dr[i] - (x - mean)).abs() < 1e-6, "dr-grpo {i}");
                let want = (x - mean) / (all_std + 1e-4);
                assert!((batch[i] - want).abs() < 1e-5, "batch-scaled grpo {i}");
                // RLOO's baseline is the mean of the other three: the sample itself is out.
                let others = (xs.iter().sum::<f32>() - x) / 3.0;
                assert!((rloo[i] - (x - others)).abs() < 1e-6, "rloo {i}");
            }
        }
        // The second group's rewards are all equal: no advantage, whatever the estimator.
        for a in [&grpo, &dr, &rloo, &batch] {
            assert!(a[4..].iter().all(|&x| x == 0.0), "{a:?}");
        }
    }

    /// GDPO by plain loops: two sources in groups of 3, each normalised in its group
    /// (unbiased std + 1e-4), summed with weights 1 and 0.5, the sum normalised over the
    /// batch; a source whose scores are all equal in a group adds nothing there.
    #[test]
    fn gdpo_normalises_each_source_then_the_batch() {
        let r = [
            [1.0f32, 0.0],
            [0.0, 2.0],
            [1.0, 4.0],
            [0.0, 1.0],
            [0.0, 3.0],
            [0.0, 8.0],
        ];
        let weights = [1.0, 0.5];
        let by_source = Tensor::from_slice(r.as_flattened()).view([6, 2]);
        let a = decoupled_group_advantages(&by_source, &weights, 3, &World::single());
        let a = Vec::<f32>::try_from(a).unwrap();
        let mut summed = [0f32; 6];
        for g in 0..2 {
            for k in 0..2 {
                let xs: Vec<f32> = (0..3).map(|j| r[g * 3 + j][k]).collect();
                let mean = xs.iter().sum::<f32>() / 3.0;
                let std = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 2.0).sqrt();
                for j in 0..3 {
                    summed[g * 3 + j] += weights[k] as f32 * (xs[j] - mean) / (std + 1e-4);
                }
            }
        }
        let mean = summed.iter().sum::<f32>() / 6.0;
        let std = (summed.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 5.0).sqrt();
        for i in 0..6 {
            let want = (summed[i] - mean) / (std + 1e-4);
            assert!((a[i] - want).abs() < 1e-5, "{i}: {a:?}");
        }
        // Group 2's first source is all 0: its rows differ by the second source alone.
        assert!((a[3] - a[4]).abs() > 0.1 && a[5] > a[4]);
    }

    /// RLOO with TRL's `normalize_advantages`: the leave-one-out advantages over the
    /// batch brought to mean 0 and unbiased std 1 (+1e-4 in the denominator).
    #[test]
    fn normalized_rloo_has_mean_zero_and_unit_std() {
        let r = [1.0f32, 0.0, 0.5, 2.5, 3.0, 3.0];
        let rewards = Tensor::from_slice(&r).unsqueeze(1);
        let mask = Tensor::ones([6, 1], (Kind::Float, tch::Device::Cpu));
        let none = (
            &Tensor::zeros([0, 0], (Kind::Float, tch::Device::Cpu)),
            &[][..],
        );
        let est = AdvantageEstimator::Rloo {
            group: 3,
            normalize: true,
        };
        let out = advantages(est, &rewards, None, (&mask, none), &World::single());
        let a = Vec::<f32>::try_from(out.advantages.view([-1])).unwrap();
        let plain: Vec<f32> = r
            .chunks(3)
            .flat_map(|g| {
                g.iter()
                    .map(|x| x - (g.iter().sum::<f32>() - x) / 2.0)
                    .collect::<Vec<_>>()
            })
            .collect();
        let mean = plain.iter().sum::<f32>() / 6.0;
        let std = (plain.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 5.0).sqrt();
        for i in 0..6 {
            assert!(
                (a[i] - (plain[i] - mean) / (std + 1e-4)).abs() < 1e-5,
                "{i}: {a:?}"
            );
        }
    }

    /// Mean and unbiased std of the values that are not NaN (std NaN below two), as TRL's
    /// `nanmean` and `nanstd`.
    fn scored_mean_std(xs: &[f32]) -> (f32, f32, usize) {
        let known: Vec<f32> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
        let n = known.len();
        let mean = known.iter().sum::<f32>() / n as f32;
        let var = known.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / (n as f32 - 1.0);
        (mean, if n > 1 { var.sqrt() } else { f32::NAN }, n)
    }

    /// Responses no reward source scored (NaN rewards), by plain loops over TRL 1.16's
    /// `GRPOTrainer` and `RLOOTrainer` formulas: left out of their group's mean and std and of
    /// the batch's, advantage 0; a group with one scored response has no std (GRPO) and no
    /// leave-one-out baseline (RLOO), so no advantage either; a group with none, nothing.
    #[test]
    fn unscored_responses_are_left_out_as_trl_leaves_them() {
        let nan = f32::NAN;
        let r = [
            1.0f32, nan, 0.5, 2.5, nan, 2.0, nan, nan, nan, nan, nan, nan, 4.0, 0.0, 1.0, nan,
        ];
        let rewards = Tensor::from_slice(&r).unsqueeze(1);
        let mask = Tensor::ones([16, 1], (Kind::Float, tch::Device::Cpu));
        let none = (
            &Tensor::zeros([0, 0], (Kind::Float, tch::Device::Cpu)),
            &[][..],
        );
        let run = |est| {
            let out = advantages(est, &rewards, None, (&mask, none), &World::single());
            Vec::<f32>::try_from(out.advantages.view([-1])).unwrap()
        };
        let group = 4;
        let grpo = run(AdvantageEstimator::Grpo {
            group,
            scale: RewardScale::Group,
        });
        let batch = run(AdvantageEstimator::Grpo {
            group,
            scale: RewardScale::Batch,
        });
        let dr = run(AdvantageEstimator::DrGrpo { group });
        let rloo = run(AdvantageEstimator::Rloo {
            group,
            normalize: false,
        });
        let rloo_normed = run(AdvantageEstimator::Rloo {
            group,
            normalize: true,
        });
        let (_, all_std, _) = scored_mean_std(&r);
        let mut want_rloo = [nan; 16];
        for (g, xs) in r.chunks(4).enumerate() {
            let (mean, std, n) = scored_mean_std(xs);
            let sum: f32 = xs.iter().filter(|x| !x.is_nan()).sum();
            for (j, &x) in xs.iter().enumerate() {
                let i = g * 4 + j;
                let or_zero = |a: f32| if a.is_nan() { 0.0 } else { a };
                let close = |got: f32, want: f32, what: &str| {
                    assert!(
                        (got - or_zero(want)).abs() < 1e-5,
                        "{what} {i}: {got} vs {want}"
                    );
                };
                close(grpo[i], (x - mean) / (std + 1e-4), "grpo");
                close(batch[i], (x - mean) / (all_std + 1e-4), "batch-scaled grpo");
                close(dr[i], x - mean, "dr-grpo");
                want_rloo[i] = x - (sum - x) / (n as f32 - 1.0);
                close(rloo[i], want_rloo[i], "rloo");
            }
        }
        let (mean, std, _) = scored_mean_std(&want_rloo);
        for i in 0..16 {
            let want = (want_rloo[i] - mean) / (std + 1e-4);
            let want = if want.is_nan() { 0.0 } else { want };
            assert!((rloo_normed[i] - want).abs() < 1e-5, "normalised rloo {i}");
        }
        // Group 1 has one scored response, group 2 none: no advantage anywhere in them
        // (Dr. GRPO's lone scored response is its own mean).
        for a in [&grpo, &batch, &dr, &rloo, &rloo_normed] {
            assert!(a[4..12].iter().all(|&x| x == 0.0), "{a:?}");
            assert_eq!([a[1], a[15]], [0.0, 0.0]);
        }
    }

    /// GDPO with sources that did not score some responses (NaN): each source's group
    /// statistics over the responses it scored, each response's sum over the sources that
    /// scored it, a response none scored out of the batch's statistics with advantage 0
    /// (TRL's `normalize_then_sum` with `nanmean`, `nanstd`, `nansum`).
    #[test]
    fn gdpo_leaves_out_what_a_source_did_not_score() {
        let nan = f32::NAN;
        let r = [
            [1.0f32, nan],
            [0.0, 2.0],
            [nan, 4.0],
            [nan, nan],
            [0.0, 3.0],
            [2.0, nan],
        ];
        let weights = [1.0, 0.5];
        let by_source = Tensor::from_slice(r.as_flattened()).view([6, 2]);
        let a = decoupled_group_advantages(&by_source, &weights, 3, &World::single());
        let a = Vec::<f32>::try_from(a.nan_to_num(0.0, None, None)).unwrap();
        let mut summed = [0f32; 6];
        for g in 0..2 {
            for k in 0..2 {
                let xs: Vec<f32> = (0..3).map(|j| r[g * 3 + j][k]).collect();
                let (mean, std, _) = scored_mean_std(&xs);
                for j in 0..3 {
                    let normed = weights[k] as f32 * (xs[j] - mean) / (std + 1e-4);
                    if !normed.is_nan() {
                        summed[g * 3 + j] += normed;
                    }
                }
            }
        }
        summed[3] = nan;
        let (mean, std, _) = scored_mean_std(&summed);
        for i in 0..6 {
            let want = if i == 3 {
                0.0
            } else {
                (summed[i] - mean) / (std + 1e-4)
            };
            assert!((a[i] - want).abs() < 1e-5, "{i}: {a:?}");
        }
    }

    /// A NaN score makes its row's rewards NaN (for the group estimators to leave out);
    /// whitening's statistics are the other rows' alone.
    #[test]
    fn an_unscored_row_is_out_of_the_whitened_rewards() {
        let kl = t(&[&[0.1, 0.2], &[0.3, 0.0], &[0.0, 0.5]]);
        let mask = t(&[&[1., 1.], &[1., 1.], &[1., 0.]]);
        let scores = Tensor::from_slice(&[1.0f32, f32::NAN, 2.0]);
        let one = World::single();
        let (r, _) = rewards(&kl, &scores, &mask, 0.5, true, &one);
        assert!(r.get(1).isnan().all().int64_value(&[]) == 1);
        let keep = Tensor::from_slice(&[0i64, 2]);
        let scored = Tensor::from_slice(&[1.0f32, 2.0]);
        let (alone, _) = rewards(
            &kl.index_select(0, &keep),
            &scored,
            &mask.index_select(0, &keep),
            0.5,
            true,
            &one,
        );
        let diff = (r.index_select(0, &keep) - alone)
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn group_advantages_cover_every_token_and_need_no_critic() {
        let rewards = t(&[&[0., 0., 1.], &[0., 2., 0.], &[5., 0., 0.], &[0., 0., 7.]]);
        let mask = t(&[&[1., 1., 1.], &[1., 1., 0.], &[1., 0., 0.], &[1., 1., 1.]]);
        for est in [
            AdvantageEstimator::Grpo {
                group: 2,
                scale: RewardScale::Group,
            },
            AdvantageEstimator::DrGrpo { group: 2 },
            AdvantageEstimator::Rloo {
                group: 2,
                normalize: false,
            },
        ] {
            assert!(!est.needs_critic());
            let none = (
                &Tensor::zeros([0, 0], (Kind::Float, tch::Device::Cpu)),
                &[][..],
            );
            let out = advantages(est, &rewards, None, (&mask, none), &World::single());
            assert!(out.returns.is_none());
            let a = to_vec(&out.advantages);
            // Sequence rewards 1, 2 | 5, 7: every real token of a response gets its value.
            let expected = match est {
                AdvantageEstimator::Grpo { .. } => {
                    let s = (0.5f32).sqrt();
                    [
                        -0.5 / (s + 1e-4),
                        0.5 / (s + 1e-4),
                        -1.0 / (2.0 * s + 1e-4),
                        1.0 / (2.0 * s + 1e-4),
                    ]
                }
                AdvantageEstimator::DrGrpo { .. } => [-0.5, 0.5, -1.0, 1.0],
                _ => [-1.0, 1.0, -2.0, 2.0],
            };
            let m = to_vec(&mask);
            for b in 0..4 {
                for i in 0..3 {
                    let want = expected[b] * m[b][i];
                    assert!((a[b][i] - want).abs() < 1e-4, "{est:?} {b} {i}: {a:?}");
                }
            }
        }
    }

    #[test]
    fn reinforce_plus_plus_whitens_the_return_to_go() {
        tch::manual_seed(6);
        let rewards = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let mask = t(&[&[1., 1., 1., 1.], &[1., 1., 0., 0.], &[1., 1., 1., 0.]]);
        let to_go = to_vec(&returns_to_go(&rewards, &mask, 0.9));
        let (r, m) = (to_vec(&rewards), to_vec(&mask));
        for b in 0..3 {
            let mut running = 0f32;
            for i in (0..4).rev() {
                running = (r[b][i] + 0.9 * running) * m[b][i];
                assert!((to_go[b][i] - running).abs() < 1e-5);
            }
        }
        let est = AdvantageEstimator::ReinforcePlusPlus { gamma: 0.9 };
        assert!(!est.needs_critic());
        let none = (
            &Tensor::zeros([0, 0], (Kind::Float, tch::Device::Cpu)),
            &[][..],
        );
        let out = advantages(est, &rewards, None, (&mask, none), &World::single());
        let a = &out.advantages;
        assert!(masked_mean(a, &mask).double_value(&[]).abs() < 1e-5);
        assert!((masked_var(a, &mask).double_value(&[]) - 1.0).abs() < 1e-4);
    }

    /// Each aggregation against a loop, and micro-batches weighted by
    /// `LossAggregation::weight` sum to the whole minibatch's aggregate.
    #[test]
    fn loss_aggregations_match_loops_and_split_into_micro_batches() {
        let x = t(&[
            &[1., 2., 3., 4.],
            &[5., 6., 0., 0.],
            &[7., 0., 0., 0.],
            &[1., 1., 1., 9.],
        ]);
        let mask = t(&[
            &[1., 1., 1., 1.],
            &[1., 1., 0., 0.],
            &[1., 0., 0., 0.],
            &[1., 1., 1., 0.],
        ]);
        let get =
            |a: LossAggregation, x: &Tensor, m: &Tensor| a.aggregate(x, m, 4.0).double_value(&[]);
        assert!((get(LossAggregation::TokenMean, &x, &mask) - 31.0 / 10.0).abs() < 1e-6);
        let seq_means = (2.5 + 5.5 + 7.0 + 1.0) / 4.0;
        assert!((get(LossAggregation::SeqMeanTokenMean, &x, &mask) - seq_means).abs() < 1e-6);
        let seq_sums = (10.0 + 11.0 + 7.0 + 3.0) / 4.0 / 4.0;
        assert!((get(LossAggregation::SeqMeanTokenSumNorm, &x, &mask) - seq_sums).abs() < 1e-6);
        let seq_sums = (10.0 + 11.0 + 7.0 + 3.0) / 4.0;
        assert!((get(LossAggregation::SeqMeanTokenSum, &x, &mask) - seq_sums).abs() < 1e-6);
        for a in LossAggregation::NAMES.map(|(_, a)| a) {
            let whole = get(a, &x, &mask);
            let mb_tokens = mask.sum(Kind::Float).double_value(&[]);
            let mut parts = 0.0;
            for rows in [[0i64, 1], [2, 3]] {
                let idx = Tensor::from_slice(&rows);
                let (xp, mp) = (x.index_select(0, &idx), mask.index_select(0, &idx));
                let w = a.weight(mp.sum(Kind::Float).double_value(&[]), mb_tokens, 2.0, 4.0);
                parts += w * get(a, &xp, &mp);
            }
            assert!((parts - whole).abs() < 1e-6, "{a}: {parts} vs {whole}");
            assert_eq!(a.to_string().parse::<LossAggregation>().unwrap(), a);
        }
    }

    #[test]
    fn clip_higher_widens_the_upper_side_only() {
        // ratio e^0.25 ≈ 1.284 with a positive advantage: clipped at 1.2, not at 1.3.
        let lp = t(&[&[0.25]]);
        let old = t(&[&[0.0]]);
        let adv = t(&[&[1.0]]);
        let mask = t(&[&[1.0]]);
        let loss = |clip| {
            policy_loss(&lp, &old, &adv, (&mask, None), &Surrogate::ppo(clip))
                .loss
                .double_value(&[])
        };
        assert!((loss(Clip::symmetric(0.2)) + 1.2).abs() < 1e-6);
        let higher = Clip {
            high: 0.3,
            ..Clip::symmetric(0.2)
        };
        assert!((loss(higher) + 0.25f64.exp()).abs() < 1e-6);
    }

    /// TRL's `clip_ratio/low_min` and `/high_max`: each sequence's share of its tokens
    /// clipped below (negative advantage) and above (positive), the least and the most
    /// over the sequences with tokens; an empty row counts in neither.
    #[test]
    fn sequence_clip_shares_give_the_least_and_the_most() {
        // Ratios e^x: row 0 has 1 of 2 tokens above 1.2 (advantage +1), row 1 has 2 of 3
        // below 0.8 (advantage −1), row 2 none clipped, row 3 no tokens.
        let lp = t(&[
            &[0.5, 0.0, 9.0],
            &[-0.5, -0.5, 0.0],
            &[0.1, 0.0, 0.0],
            &[5.0, 5.0, 5.0],
        ]);
        let old = Tensor::zeros([4, 3], (Kind::Float, Device::Cpu));
        let adv = t(&[&[1.0; 3], &[-1.0; 3], &[1.0; 3], &[1.0; 3]]);
        let mask = t(&[&[1., 1., 0.], &[1., 1., 1.], &[1., 1., 1.], &[0., 0., 0.]]);
        let clipped = Surrogate::ppo(Clip::symmetric(0.2));
        let out = policy_loss(&lp, &old, &adv, (&mask, None), &clipped);
        assert_eq!(out.seq_clip, Some((0.0, 0.5)));
        // Row 1 twice: the least low share is its 2/3, and nothing clips above.
        let two = Tensor::from_slice(&[1i64, 1]);
        let out = policy_loss(
            &lp.index_select(0, &two),
            &old.index_select(0, &two),
            &adv.index_select(0, &two),
            (&mask.index_select(0, &two), None),
            &clipped,
        );
        let (lo, hi) = out.seq_clip.unwrap();
        assert!((lo - 2.0 / 3.0).abs() < 1e-6 && hi == 0.0, "{lo} {hi}");
        let sapo = Surrogate {
            objective: Objective::Sapo {
                pos: 1.0,
                neg: 1.05,
            },
            ..clipped
        };
        assert_eq!(
            policy_loss(&lp, &old, &adv, (&mask, None), &sapo).seq_clip,
            None
        );
    }

    #[test]
    fn shaped_rewards_put_the_score_on_the_last_token() {
        let kl = t(&[&[0.1, 0.2, 0.3], &[0.5, 9.0, 9.0]]);
        let mask = t(&[&[1., 1., 1.], &[1., 0., 0.]]);
        let scores = Tensor::from_slice(&[1.0f32, -2.0]);
        let (rewards, non_score) = shaped_rewards(&(&kl * &mask), &scores, &mask, 0.5);
        let r = to_vec(&rewards);
        let expected = [[-0.05, -0.1, -0.15 + 1.0], [-0.25 - 2.0, 0.0, 0.0]];
        for b in 0..2 {
            for i in 0..3 {
                assert!((r[b][i] - expected[b][i]).abs() < 1e-6, "{r:?}");
            }
        }
        assert!((non_score.sum(Kind::Float).double_value(&[]) + 0.55).abs() < 1e-6);
    }

    /// A response with a tool result inside it (mask holes): the score goes on the last
    /// sampled token, not at the count of ones; the return to go passes through the hole
    /// unchanged and stays 0 after the response; an empty row scores nowhere.
    #[test]
    fn masks_with_holes_score_the_last_sampled_token() {
        let mask = t(&[&[1., 0., 0., 1., 0.], &[0., 0., 0., 0., 0.]]);
        let kl = Tensor::zeros([2, 5], (Kind::Float, Device::Cpu));
        let scores = Tensor::from_slice(&[2.0f32, 5.0]);
        let (rewards, _) = shaped_rewards(&kl, &scores, &mask, 0.1);
        let r = to_vec(&rewards);
        assert_eq!(r[0], [0., 0., 0., 2., 0.]);
        assert_eq!(r[1], [0.; 5]);
        let rewards = t(&[&[1., 7., 7., 2., 7.], &[1., 1., 1., 1., 1.]]);
        let to_go = to_vec(&returns_to_go(&rewards, &mask, 0.5));
        // Position 0: 1 + 0.5 · (return at the next sampled token, 2) = 2.
        assert_eq!(to_go[0], [2., 0., 0., 2., 0.]);
        assert_eq!(to_go[1], [0.; 5]);
    }

    /// Off-policy sequence masking (DeepSeek-V3.2, TRL's `get_off_policy_mask`): a response
    /// is dropped where its advantage is negative and its mean drift log π_old − log π over
    /// its own tokens (padding left out) exceeds δ; a non-negative advantage always stays.
    #[test]
    fn off_policy_mask_drops_drifted_negative_responses() {
        let old = t(&[&[-1.0, -1.0, -1.0], &[-1.0, -1.0, 0.0], &[-2.0, -2.0, -2.0]]);
        // Drifts: row 0 (0.3 + 0.1 + 0.2) / 3 = 0.2; row 1 (0.4 + 0) / 2 = 0.2, its padding
        // (drift 5) not counted; row 2 the same 0.2 with a positive advantage.
        let new = t(&[
            &[-1.3, -1.1, -1.2],
            &[-1.4, -1.0, -5.0],
            &[-2.3, -2.1, -2.2],
        ]);
        let mask = t(&[&[1., 1., 1.], &[1., 1., 0.], &[1., 1., 1.]]);
        let adv = t(&[&[-1.0; 3], &[-0.5; 3], &[2.0; 3]]);
        let at = |delta| to_vec(&off_policy_mask(&new, &old, &adv, &mask, delta));
        assert_eq!(at(0.1), [[0.0; 3], [0.0; 3], [1.0; 3]]);
        assert_eq!(at(0.25), [[1.0; 3], [1.0; 3], [1.0; 3]]);
        // At the rollout's own policy nothing has drifted: δ = 0 keeps everything.
        assert_eq!(
            to_vec(&off_policy_mask(&old, &old, &adv, &mask, 0.0)),
            [[1.0; 3], [1.0; 3], [1.0; 3]]
        );
    }

    /// The importance weight per token, or per response (GSPO: exp of the mean log-ratio
    /// over the response's tokens, on each of them).
    #[test]
    fn importance_weights_per_token_and_per_sequence() {
        let log_ratio = t(&[&[0.2, -0.4, 3.0]]);
        let mask = t(&[&[1., 1., 0.]]);
        let token = to_vec(&importance_weight(
            &log_ratio,
            &mask,
            ImportanceSampling::Token,
        ));
        let want = [0.2f32.exp(), (-0.4f32).exp(), 3.0f32.exp()];
        for i in 0..3 {
            assert!((token[0][i] - want[i]).abs() < 1e-5, "{token:?}");
        }
        let seq = to_vec(&importance_weight(
            &log_ratio,
            &mask,
            ImportanceSampling::Sequence,
        ));
        assert!(
            seq[0].iter().all(|&w| (w - (-0.1f32).exp()).abs() < 1e-6),
            "{seq:?}"
        );
    }

    #[test]
    fn kl_estimators() {
        let lp = t(&[&[-1.0, -2.0]]);
        let rlp = t(&[&[-1.5, -1.0]]);
        let mask = t(&[&[1., 0.]]);
        let k1 = to_vec(&kl_per_token(&lp, &rlp, &mask, KlEstimator::K1));
        assert_eq!(k1, [[0.5, 0.0]]);
        let k3 = to_vec(&kl_per_token(&lp, &rlp, &mask, KlEstimator::K3));
        let expected = (-0.5f32).exp() - 1.0 + 0.5;
        assert!((k3[0][0] - expected).abs() < 1e-6 && k3[0][1] == 0.0);
    }

    #[test]
    fn ratio_one_means_no_clipping_and_minus_mean_advantage() {
        tch::manual_seed(3);
        let lp = Tensor::randn([2, 4], (Kind::Float, Device::Cpu));
        let adv = Tensor::randn([2, 4], (Kind::Float, Device::Cpu));
        let mask = t(&[&[1., 1., 1., 1.], &[1., 1., 0., 0.]]);
        let out = policy_loss(
            &lp,
            &lp,
            &adv,
            (&mask, None),
            &Surrogate::ppo(Clip::symmetric(0.2)),
        );
        assert_eq!(out.clipfrac, 0.0);
        assert_eq!(out.approxkl, 0.0);
        assert_eq!(out.ratio_max_dev, 0.0);
        let expected = -masked_mean(&adv, &mask).double_value(&[]);
        assert!((out.loss.double_value(&[]) - expected).abs() < 1e-6);
    }

    /// `--top-entropy-quantile`: the mask keeps the counted tokens at or above the
    /// (1 − ρ) quantile of every rank's values (torch.quantile's linear interpolation);
    /// the policy loss is zero on the others, which still count in the token mean.
    #[test]
    fn high_entropy_tokens_alone_carry_the_policy_loss() {
        let entropy = t(&[&[0.1, 0.5, 0.2], &[0.9, 0.3, 2.0]]);
        let counted = t(&[&[1., 1., 1.], &[1., 1., 0.]]);
        let mine = [0.1f32, 0.5, 0.2, 0.9, 0.3];
        let keep =
            |values: &[f32], rho| to_vec(&high_entropy_mask(&entropy, &counted, values, rho));
        // Sorted 0.1 0.2 0.3 0.5 0.9: the 0.8 quantile is 0.5 + 0.2·0.4 = 0.58.
        assert_eq!(keep(&mine, 0.2), [[0., 0., 0.], [1., 0., 0.]]);
        assert_eq!(keep(&mine, 0.5), [[0., 1., 0.], [1., 1., 0.]]);
        assert_eq!(keep(&mine, 1.0), [[1., 1., 1.], [1., 1., 0.]]);
        assert_eq!(keep(&mine, 0.0), [[0., 0., 0.], [1., 0., 0.]]);
        // Another rank's entropies move the threshold (median of 8 values: 0.4).
        let both = [&mine[..], &[0.35, 0.45, 0.6]].concat();
        assert_eq!(keep(&both, 0.5), [[0., 1., 0.], [1., 0., 0.]]);
        assert_eq!(keep(&[], 0.5), [[0., 0., 0.], [0., 0., 0.]]);
        // Ties: the median of four equal values is that value; one computed a few ulps
        // lower elsewhere still counts as at it.
        let tied = t(&[&[5.0, 5.0 - 2e-6, 5.0 - 1e-4]]);
        let mask = high_entropy_mask(&tied, &t(&[&[1., 1., 1.]]), &[5.0; 4], 0.5);
        assert_eq!(to_vec(&mask), [[1., 1., 0.]]);

        let lp = t(&[&[-0.5, -1.0, -2.0, -0.1]]);
        let old = t(&[&[-1.0, -1.0, -1.0, -1.2]]);
        let adv = t(&[&[1.0, -1.0, 2.0, 3.0]]);
        let mask = t(&[&[1., 1., 1., 0.]]);
        let kept = t(&[&[1., 0., 1., 0.]]);
        for aggregation in [
            LossAggregation::TokenMean,
            LossAggregation::SeqMeanTokenMean,
        ] {
            let s = Surrogate {
                aggregation,
                ..Surrogate::ppo(Clip::symmetric(0.2))
            };
            let all = policy_loss(&lp, &old, &adv, (&mask, None), &s);
            let some = policy_loss(&lp, &old, &adv, (&mask, Some(&kept)), &s);
            // Per token: max(−A·w, −A·clip(w)); w = e^0.5, e^0, e^−1 on the masked tokens.
            let per = |w: f64, a: f64| (-a * w).max(-a * w.clamp(0.8, 1.2));
            let (w0, w2) = (0.5f64.exp(), (-1f64).exp());
            let want = (per(w0, 1.0) + per(w2, 2.0)) / 3.0;
            let got = some.loss.double_value(&[]);
            assert!(
                (got - want).abs() < 1e-6,
                "{aggregation:?}: {got} vs {want}"
            );
            let want_all = want + per(1.0, -1.0) / 3.0;
            assert!((all.loss.double_value(&[]) - want_all).abs() < 1e-6);
        }
    }

    #[test]
    fn policy_loss_matches_a_plain_loop() {
        let lp = [-0.5f32, -1.0, -2.0, -0.1];
        let old = [-1.0f32, -1.0, -1.0, -5.0];
        let adv = [1.0f32, -1.0, 2.0, 3.0];
        let mask = [1f32, 1.0, 1.0, 0.0];
        let out = policy_loss(
            &t(&[&lp]),
            &t(&[&old]),
            &t(&[&adv]),
            (&t(&[&mask]), None),
            &Surrogate::ppo(Clip::symmetric(0.2)),
        );
        let (mut sum, mut clipped, mut n) = (0f64, 0, 0);
        for i in 0..3 {
            let ratio = f64::from(lp[i] - old[i]).exp();
            let a = f64::from(adv[i]);
            let (u, c) = (-a * ratio, -a * ratio.clamp(0.8, 1.2));
            sum += u.max(c);
            clipped += usize::from(c > u);
            n += 1;
        }
        assert!((out.loss.double_value(&[]) - sum / n as f64).abs() < 1e-5);
        assert!((out.clipfrac - clipped as f64 / n as f64).abs() < 1e-6);
        assert_eq!(clipped, 1);
    }

    /// GSPO: one ratio per response, `exp(mean over its tokens of log π − log π_old)`,
    /// clipped as a whole; every token of a response gets the same gradient weight
    /// (`−A·s/N` on each log-prob where `s` is unclipped, 0 where it is clipped).
    #[test]
    fn sequence_level_ratio_matches_a_plain_loop() {
        let lp = [[-1.0f32, -2.0, -0.5, 0.0], [-1.0, -1.0, -3.0, -1.0]];
        let old = [[-1.1f32, -1.9, -0.6, 9.0], [-0.5, -0.2, -2.1, -1.0]];
        let adv = [[0.5f32; 4], [-2.0; 4]];
        let mask = [[1f32, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]];
        let rows = |x: &[[f32; 4]; 2]| t(&[&x[0], &x[1]]);
        let logprobs = rows(&lp).set_requires_grad(true);
        let surrogate = Surrogate {
            level: ImportanceSampling::Sequence,
            ..Surrogate::ppo(Clip::symmetric(0.2))
        };
        let out = policy_loss(
            &logprobs,
            &rows(&old),
            &rows(&adv),
            (&rows(&mask), None),
            &surrogate,
        );
        out.loss.backward();
        let grad = to_vec(&logprobs.grad());
        let tokens: f32 = mask.iter().flatten().sum();
        let (mut loss, mut clipped, mut high) = (0f32, 0f32, 0f32);
        for b in 0..2 {
            let n: f32 = mask[b].iter().sum();
            let mean_log: f32 = (0..4)
                .map(|i| (lp[b][i] - old[b][i]) * mask[b][i])
                .sum::<f32>()
                / n;
            let s = mean_log.exp();
            let a = adv[b][0];
            let (u, c) = (-a * s, -a * s.clamp(0.8, 1.2));
            loss += u.max(c) * n;
            for i in 0..4 {
                let want = if c > u {
                    0.0
                } else {
                    -a * s / tokens * mask[b][i]
                };
                assert!((grad[b][i] - want).abs() < 1e-6, "{b} {i}: {grad:?}");
            }
            clipped += f32::from(c > u) * n;
            high += f32::from(s > 1.2 && a > 0.0) * n;
        }
        // Row 0's ratio is e^0.033 (inside the interval), row 1's e^-0.55 (below it, with a
        // negative advantage: clipped, no gradient).
        assert_eq!((clipped, high), (4.0, 0.0));
        assert!((out.clip_low as f32 - 4.0 / tokens).abs() < 1e-6);
        assert!((out.loss.double_value(&[]) as f32 - loss / tokens).abs() < 1e-6);
        assert!((out.clipfrac as f32 - clipped / tokens).abs() < 1e-6);
        assert!((out.clip_high as f32 - high / tokens).abs() < 1e-6);
        // One-token responses: the two levels are the same objective.
        let one = |level| {
            let s = Surrogate {
                level,
                ..Surrogate::ppo(Clip::symmetric(0.2))
            };
            let (lp, old, adv, mask) = (
                t(&[&[-0.3], &[-2.0]]),
                t(&[&[-1.0], &[-1.5]]),
                t(&[&[1.0], &[-1.0]]),
                t(&[&[1.0], &[1.0]]),
            );
            policy_loss(&lp, &old, &adv, (&mask, None), &s)
                .loss
                .double_value(&[])
        };
        assert_eq!(
            one(ImportanceSampling::Token),
            one(ImportanceSampling::Sequence)
        );
        assert_eq!(
            "sequence".parse::<ImportanceSampling>().unwrap(),
            ImportanceSampling::Sequence
        );
        assert!("tokens".parse::<ImportanceSampling>().is_err());
    }

    /// CISPO's gradient is the policy gradient weighted by the capped, detached weight:
    /// `−min(w, cap)·A/N` on each token's log-prob — tokens past the cap keep theirs; SAPO's
    /// soft gate gives the plain policy gradient at w = 1 and shrinks it away from 1.
    #[test]
    fn cispo_and_sapo_match_their_formulas() {
        let lp = [-0.5f32, -1.0, -2.0, -0.3];
        let old = [-1.0f32, -1.0, -1.2, -0.3];
        let adv = [1.0f32, -1.0, 2.0, -0.5];
        let mask = [1f32, 1.0, 1.0, 0.0];
        let run = |objective, cap: f64| {
            let logprobs = t(&[&lp]).set_requires_grad(true);
            let surrogate = Surrogate {
                objective,
                clip: Clip {
                    high: cap,
                    ..Clip::symmetric(0.2)
                },
                ..Surrogate::ppo(Clip::symmetric(0.2))
            };
            let out = policy_loss(
                &logprobs,
                &t(&[&old]),
                &t(&[&adv]),
                (&t(&[&mask]), None),
                &surrogate,
            );
            out.loss.backward();
            let grad = to_vec(&logprobs.grad())[0].clone();
            (out, grad)
        };
        // CISPO with the cap at 1.5: token 0's weight e^0.5 ≈ 1.65 is capped.
        let (out, grad) = run(Objective::Cispo, 1.5);
        let (mut loss, n) = (0f32, 3.0f32);
        for i in 0..4 {
            let w = (lp[i] - old[i]).exp().min(1.5);
            assert!(
                (grad[i] - (-w * adv[i] / n) * mask[i]).abs() < 1e-6,
                "cispo {i}: {grad:?}"
            );
            loss += -w * adv[i] * lp[i] * mask[i];
        }
        assert!((out.loss.double_value(&[]) as f32 - loss / n).abs() < 1e-6);
        assert!((out.clip_high - 1.0 / 3.0).abs() < 1e-6 && out.clip_low == 0.0);
        // SAPO at temperatures 1 (A > 0) and 1.05.
        let (out, grad) = run(
            Objective::Sapo {
                pos: 1.0,
                neg: 1.05,
            },
            0.2,
        );
        let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
        let mut loss = 0f32;
        for i in 0..4 {
            let tau = if adv[i] > 0.0 { 1.0 } else { 1.05 };
            let w = (lp[i] - old[i]).exp();
            let s = sigmoid(tau * (w - 1.0));
            loss += -(4.0 / tau) * s * adv[i] * mask[i];
            // d/dlp of −(4/τ)σ(τ(w−1))·A = −4σ(1−σ)·w·A
            let want = -4.0 * s * (1.0 - s) * w * adv[i] / n * mask[i];
            assert!((grad[i] - want).abs() < 1e-6, "sapo {i}: {grad:?}");
        }
        assert!((out.loss.double_value(&[]) as f32 - loss / n).abs() < 1e-6);
        assert_eq!(out.clipfrac, 0.0);
        // On-policy (w = 1), SAPO's gradient is the policy gradient's −A/N.
        let logprobs = t(&[&old]).set_requires_grad(true);
        let sapo = Surrogate {
            objective: Objective::Sapo {
                pos: 1.0,
                neg: 1.05,
            },
            ..Surrogate::ppo(Clip::symmetric(0.2))
        };
        policy_loss(
            &logprobs,
            &t(&[&old]),
            &t(&[&adv]),
            (&t(&[&mask]), None),
            &sapo,
        )
        .loss
        .backward();
        let grad = to_vec(&logprobs.grad())[0].clone();
        for i in 0..4 {
            assert!((grad[i] - (-adv[i] / n) * mask[i]).abs() < 1e-6, "{grad:?}");
        }
    }

    /// VESPO against TRL's formula written out: per response, log w = Σ log π/π_old over
    /// its tokens, φ = e^λ·w^k·e^(−λw) by the advantage's sign, the gradient −φ·A/N on
    /// each token's log-prob (φ detached); φ(1) = 1, so on-policy it is the policy
    /// gradient; `vespo/phi_seq_mean` is the mean over responses.
    #[test]
    fn vespo_weights_the_gradient_by_the_sequence_gamma() {
        let lp = [[-0.5f32, -1.0, -2.0], [-0.7, -0.2, -0.4]];
        let old = [[-0.6f32, -1.1, -2.3], [-0.4, -0.2, -0.1]];
        let adv = [[1.5f32, 1.5, 1.5], [-0.5, -0.5, -0.5]];
        let mask = [[1f32, 1.0, 1.0], [1.0, 1.0, 0.0]];
        let vespo = Objective::Vespo {
            k_pos: 2.0,
            lambda_pos: 3.0,
            k_neg: 3.0,
            lambda_neg: 2.0,
        };
        let rows = |x: &[[f32; 3]; 2]| t(&[&x[0], &x[1]]);
        let run = |lp: &[[f32; 3]; 2]| {
            let logprobs = rows(lp).set_requires_grad(true);
            let surrogate = Surrogate {
                objective: vespo,
                ..Surrogate::ppo(Clip::symmetric(0.2))
            };
            let out = policy_loss(
                &logprobs,
                &rows(&old),
                &rows(&adv),
                (&rows(&mask), None),
                &surrogate,
            );
            out.loss.backward();
            (out, to_vec(&logprobs.grad()))
        };
        let (out, grad) = run(&lp);
        let n = 5.0f64;
        let (mut loss, mut phis) = (0f64, vec![]);
        for r in 0..2 {
            let log_w: f64 = (0..3)
                .map(|i| f64::from((lp[r][i] - old[r][i]) * mask[r][i]))
                .sum();
            let (k, lambda) = if adv[r][0] >= 0.0 {
                (2.0, 3.0)
            } else {
                (3.0, 2.0)
            };
            let phi = (lambda + k * log_w - lambda * log_w.exp()).exp();
            phis.push(phi);
            for i in 0..3 {
                let a = f64::from(adv[r][i] * mask[r][i]);
                loss += -phi * a * f64::from(lp[r][i]);
                let want = -phi * a / n;
                assert!(
                    (f64::from(grad[r][i]) - want).abs() < 1e-6,
                    "{r} {i}: {grad:?}"
                );
            }
        }
        assert!((out.loss.double_value(&[]) - loss / n).abs() < 1e-6);
        assert!((out.vespo_phi - (phis[0] + phis[1]) / 2.0).abs() < 1e-6);
        assert!(phis[0] != 1.0 && phis[1] != 1.0);
        // On-policy: φ = 1 and the gradient is −A/N.
        let (out, grad) = run(&old);
        assert!((out.vespo_phi - 1.0).abs() < 1e-6);
        for r in 0..2 {
            for i in 0..3 {
                let want = -f64::from(adv[r][i] * mask[r][i]) / n;
                assert!((f64::from(grad[r][i]) - want).abs() < 1e-6, "{grad:?}");
            }
        }
    }

    /// The sampler correction as TRL's `vllm_importance_sampling_mode`s compute it: per
    /// token or per response (exp of the sum over its real tokens), truncated to
    /// [min, max] or zeroed outside it; padding has ratio 1 before masking.
    #[test]
    fn sampling_correction_truncates_or_masks_tokens_and_responses() {
        let old = t(&[&[-1.0, -1.0, -1.0], &[-2.0, -2.0, 0.0]]);
        let sampler = t(&[&[-2.5, -1.0, -0.9], &[-2.1, -2.1, 5.0]]);
        let mask = t(&[&[1.0, 1.0, 1.0], &[1.0, 1.0, 0.0]]);
        let run = |mode, bounds| to_vec(&sampling_correction(&old, &sampler, &mask, mode, bounds));
        let e = |x: f32| x.exp();
        let close = |got: &[Vec<f32>], want: [[f32; 3]; 2]| {
            for b in 0..2 {
                for i in 0..3 {
                    assert!((got[b][i] - want[b][i]).abs() < 1e-5, "{got:?} vs {want:?}");
                }
            }
        };
        let bounds = (Some(0.5), Some(3.0));
        // Token ratios: e^1.5 = 4.48 (above 3), 1, e^−0.1; e^0.1, e^0.1, padding 1.
        close(
            &run(SamplingCorrection::TokenTruncate, bounds),
            [[3.0, 1.0, e(-0.1)], [e(0.1), e(0.1), 1.0]],
        );
        close(
            &run(SamplingCorrection::TokenMask, bounds),
            [[0.0, 1.0, e(-0.1)], [e(0.1), e(0.1), 1.0]],
        );
        // Response ratios: e^1.4 = 4.06 and e^0.2.
        close(
            &run(SamplingCorrection::SequenceTruncate, bounds),
            [[3.0; 3], [e(0.2); 3]],
        );
        close(
            &run(SamplingCorrection::SequenceMask, bounds),
            [[0.0; 3], [e(0.2); 3]],
        );
        close(
            &run(SamplingCorrection::SequenceMask, (None, Some(5.0))),
            [[e(1.4); 3], [e(0.2); 3]],
        );
    }

    #[test]
    fn online_dpo_prefers_the_better_response_and_takes_dpo_loss_on_the_pair() {
        // Two pairs: the second response better in the first, a tie in the second (the
        // first is chosen, as TRL's `first_half >= second_half`).
        let prefs =
            to_vec(&preferences(&Tensor::from_slice(&[0.5f32, 2.0, 1.0, 1.0])).unsqueeze(0));
        assert_eq!(prefs, [[-1.0, 1.0, 1.0, -1.0]]);
        // Four responses of up to three tokens (padding where the mask is 0).
        let lp = [
            [-0.5f32, -1.0, -2.0],
            [-0.7, -0.2, -0.4],
            [-1.2, -0.3, -9.0],
            [-0.1, -0.8, -0.6],
        ];
        let rf = [
            [-0.6f32, -1.3, -1.0],
            [-0.5, -0.3, -0.9],
            [-1.0, -0.2, -3.0],
            [-0.4, -0.6, -0.5],
        ];
        let mask = [
            [1f32, 1.0, 1.0],
            [1.0, 1.0, 0.0],
            [1.0, 1.0, 0.0],
            [1.0, 1.0, 1.0],
        ];
        let rows = |x: &[[f32; 3]; 4]| t(&[&x[0], &x[1], &x[2], &x[3]]);
        let sign = Tensor::from_slice(&[-1f32, 1.0, 1.0, -1.0]).unsqueeze(1) * rows(&mask);
        let beta = 0.1;
        for kind in [PairLoss::Sigmoid, PairLoss::Ipo] {
            let logprobs = rows(&lp).set_requires_grad(true);
            let (loss, stats) =
                online_dpo_loss((&logprobs, &rows(&rf)), &sign, &rows(&mask), beta, kind);
            loss.backward();
            let grad = to_vec(&logprobs.grad());
            // TRL's `training_step`, pair by pair: the chosen response's summed log-ratio
            // less the rejected one's.
            let sum = |x: &[[f32; 3]; 4], r: usize| -> f64 {
                (0..3).map(|i| f64::from(x[r][i] * mask[r][i])).sum()
            };
            let (mut want_loss, mut want_chosen) = (0.0, vec![]);
            for (c, r) in [(1, 0), (2, 3)] {
                let z = (sum(&lp, c) - sum(&rf, c)) - (sum(&lp, r) - sum(&rf, r));
                let (l, dl_dz) = match kind {
                    PairLoss::Sigmoid => {
                        let sig = 1.0 / (1.0 + (-beta * z).exp());
                        (-sig.ln(), -beta * (1.0 - sig))
                    }
                    PairLoss::Ipo => (
                        (z - 1.0 / (2.0 * beta)).powi(2),
                        2.0 * (z - 1.0 / (2.0 * beta)),
                    ),
                };
                want_loss += l / 2.0;
                want_chosen.push(beta * (sum(&lp, c) - sum(&rf, c)));
                for i in 0..3 {
                    let (gc, gr) = (f64::from(grad[c][i]), f64::from(grad[r][i]));
                    assert!(
                        (gc - dl_dz / 2.0 * f64::from(mask[c][i])).abs() < 1e-6,
                        "{kind:?} {c} {i}"
                    );
                    assert!(
                        (gr + dl_dz / 2.0 * f64::from(mask[r][i])).abs() < 1e-6,
                        "{kind:?} {r} {i}"
                    );
                }
            }
            assert!(
                (loss.double_value(&[]) - want_loss).abs() < 1e-5,
                "{kind:?}"
            );
            let chosen = Vec::<f32>::try_from(&stats.chosen_rewards).unwrap();
            for (got, want) in chosen.iter().zip(&want_chosen) {
                assert!((f64::from(*got) - want).abs() < 1e-6);
            }
            let logps = Vec::<f32>::try_from(&stats.logps_rejected).unwrap();
            assert!((f64::from(logps[0]) - sum(&lp, 0)).abs() < 1e-6);
            assert!((f64::from(logps[1]) - sum(&lp, 3)).abs() < 1e-6);
        }
    }

    #[test]
    fn a2po_regresses_the_implicit_reward_onto_the_optimal_advantage() {
        // V* = β₁·log mean exp(r/β₁): the mean reward as β₁ grows, the best as it shrinks,
        // and finite for rewards far beyond exp's range.
        let r = [0.0, 1.0, 1.0, 0.0];
        assert!((optimal_value(&r, 1e6) - 0.5).abs() < 1e-6);
        assert!((optimal_value(&r, 1e-3) - (1.0 + 1e-3 * 0.5f64.ln())).abs() < 1e-9);
        let far = optimal_value(&[1e4, 1e4], 0.5);
        assert!((far - 1e4).abs() < 1e-9, "{far}");
        // Three responses of up to three tokens (padding where the mask is 0), their
        // targets r − V* on every token, as the estimator gives them.
        let lp = [
            [-0.5f32, -1.0, -2.0],
            [-0.7, -0.2, -0.4],
            [-1.2, -0.3, -9.0],
        ];
        let rf = [
            [-0.6f32, -1.3, -1.0],
            [-0.5, -0.3, -0.9],
            [-1.0, -0.2, -3.0],
        ];
        let mask = [[1f32, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]];
        let rows = |x: &[[f32; 3]; 3]| t(&[&x[0], &x[1], &x[2]]);
        // Each score on its response's last token.
        let rewards = rows(&[[0f32, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]);
        let v_star = Tensor::from_slice(&[0.25f64, 0.5, 0.75]);
        let adv = advantages(
            AdvantageEstimator::A2po,
            &rewards,
            Some(&v_star),
            (
                &rows(&mask),
                (&Tensor::zeros([1, 3], (Kind::Float, Device::Cpu)), &[1.0]),
            ),
            &World::single(),
        );
        let targets = [0.75, -0.5, 0.25];
        for (r, row) in to_vec(&adv.advantages).iter().enumerate() {
            for i in 0..3 {
                let want = targets[r] * f64::from(mask[r][i]);
                assert!((f64::from(row[i]) - want).abs() < 1e-6, "{r} {i}");
            }
        }
        let beta = 0.1;
        let logprobs = rows(&lp).set_requires_grad(true);
        let (loss, (implicit, target)) =
            a2po_loss((&logprobs, &rows(&rf)), &adv.advantages, &rows(&mask), beta);
        loss.backward();
        let grad = to_vec(&logprobs.grad());
        // TRL's `compute_loss`, response by response.
        let mut want = 0.0;
        for r in 0..3 {
            let s: f64 = (0..3)
                .map(|i| f64::from((lp[r][i] - rf[r][i]) * mask[r][i]))
                .sum();
            let e = beta * s - targets[r];
            want += e * e / 3.0;
            assert!(
                (f64::from(Vec::<f32>::try_from(&implicit).unwrap()[r]) - beta * s).abs() < 1e-6
            );
            assert!(
                (f64::from(Vec::<f32>::try_from(&target).unwrap()[r]) - targets[r]).abs() < 1e-6
            );
            for i in 0..3 {
                let g = 2.0 * e * beta / 3.0 * f64::from(mask[r][i]);
                assert!((f64::from(grad[r][i]) - g).abs() < 1e-6, "{r} {i}");
            }
        }
        assert!((loss.double_value(&[]) - want).abs() < 1e-6);
    }

    /// GMPO against TRL's `GMPOTrainer._compute_loss` written out: per response the
    /// log-weights clipped in log space on the binding side, their mean over the kept
    /// tokens exponentiated, `−A·G` averaged over responses; a clipped token passes no
    /// gradient, the others `−A·G/(kept tokens)/(responses)`.
    #[test]
    fn gmpo_takes_the_clipped_geometric_mean_per_response() {
        let lp = [[-0.5f32, -1.0, -2.0], [-0.7, -0.2, -0.4]];
        let old = [[-1.0f32, -1.1, -2.1], [-0.4, -0.2, -0.1]];
        let adv = [[1.5f32, 1.5, 1.5], [-0.5, -0.5, -0.5]];
        let mask = [[1f32, 1.0, 1.0], [1.0, 1.0, 0.0]];
        let keep = [[1f32, 1.0, 0.0], [1.0, 1.0, 1.0]];
        let rows = |x: &[[f32; 3]; 2]| t(&[&x[0], &x[1]]);
        let logprobs = rows(&lp).set_requires_grad(true);
        let surrogate = Surrogate {
            objective: Objective::Gmpo,
            aggregation: LossAggregation::SeqMeanTokenMean,
            ..Surrogate::ppo(Clip::symmetric(0.4))
        };
        let out = policy_loss(
            &logprobs,
            &rows(&old),
            &rows(&adv),
            (&rows(&mask), Some(&rows(&keep))),
            &surrogate,
        );
        out.loss.backward();
        let grad = to_vec(&logprobs.grad());
        let (mut loss, mut low, mut high) = (0f64, 0.0, 0.0);
        for r in 0..2 {
            let a = f64::from(adv[r][0]);
            let counted: Vec<f64> = (0..3).map(|i| f64::from(mask[r][i] * keep[r][i])).collect();
            let n: f64 = counted.iter().sum();
            let mut sum = 0.0;
            let mut passes = [false; 3];
            for i in 0..3 {
                let x = f64::from(lp[r][i] - old[r][i]);
                let c = x.clamp(-0.4, 0.4);
                let clipped = if a > 0.0 { x.min(c) } else { x.max(c) };
                passes[i] = clipped == x;
                sum += clipped * counted[i];
                low += f64::from(mask[r][i]) * f64::from(u8::from(x < -0.4 && a < 0.0));
                high += f64::from(mask[r][i]) * f64::from(u8::from(x > 0.4 && a > 0.0));
            }
            let g = (sum / n).exp();
            loss += -a * g / 2.0;
            for i in 0..3 {
                let want = if passes[i] {
                    -a * g * counted[i] / n / 2.0
                } else {
                    0.0
                };
                assert!(
                    (f64::from(grad[r][i]) - want).abs() < 1e-6,
                    "{r} {i}: {grad:?}"
                );
            }
        }
        assert!((out.loss.double_value(&[]) - loss).abs() < 1e-6);
        // Token 0 of response 0 (log-weight 0.5 > 0.4, A > 0) is the one clipped.
        assert_eq!((low, high), (0.0, 1.0));
        assert!((out.clip_high - 1.0 / 5.0).abs() < 1e-6 && out.clip_low == 0.0);
        assert!((out.clipfrac - 1.0 / 5.0).abs() < 1e-6);
    }

    /// Adaptive entropy control as TRL 1.16 steps it: nothing applied before the first
    /// measurement, then the coefficient grows by δ (to the cap) while the entropy is at or
    /// below the target and applies, shrinks above it and does not apply; a fixed
    /// coefficient always applies and never moves.
    #[test]
    fn adaptive_entropy_follows_the_target() {
        let mut c = EntropyController {
            coef: 0.1,
            last_entropy: None,
            adaptive: Some(AdaptiveEntropy {
                target: 0.5,
                delta: 0.05,
                min: 0.0,
                max: 0.2,
            }),
        };
        assert!(c.on());
        assert_eq!(c.applied(), 0.0);
        let mut seen = vec![];
        for entropy in [0.3, 0.4, 0.5, 0.6, 0.9, 0.9, 0.9, 0.1] {
            c.update(entropy);
            seen.push((c.coef, c.applied()));
        }
        let want = [
            (0.15, 0.15),
            (0.2, 0.2),
            (0.2, 0.2),
            (0.15, 0.0),
            (0.1, 0.0),
            (0.05, 0.0),
            (0.0, 0.0),
            (0.05, 0.05),
        ];
        for ((c, a), (wc, wa)) in seen.iter().zip(want) {
            assert!((c - wc).abs() < 1e-12 && (a - wa).abs() < 1e-12, "{seen:?}");
        }
        let mut fixed = EntropyController {
            coef: 0.01,
            last_entropy: None,
            adaptive: None,
        };
        fixed.update(9.0);
        assert_eq!((fixed.coef, fixed.applied()), (0.01, 0.01));
        fixed.coef = 0.0;
        assert!(!fixed.on());
    }

    /// `delta` caps the unclipped ratio: a negative advantage on a token whose probability
    /// grew e-fold costs δ·|A|, not e·|A|; clipping's metrics split by side.
    #[test]
    fn delta_caps_the_ratio_and_clip_ratios_split_by_side() {
        let (lp, old, mask) = (t(&[&[1.0, -2.0]]), t(&[&[0.0, 0.0]]), t(&[&[1.0, 1.0]]));
        let loss = |adv: &Tensor, delta| {
            let clip = Clip {
                delta,
                ..Clip::symmetric(0.2)
            };
            policy_loss(&lp, &old, adv, (&mask, None), &Surrogate::ppo(clip))
        };
        let negative = t(&[&[-1.0, 0.0]]);
        let e = 1f64.exp();
        assert!((loss(&negative, None).loss.double_value(&[]) - e / 2.0).abs() < 1e-6);
        assert!((loss(&negative, Some(1.5)).loss.double_value(&[]) - 0.75).abs() < 1e-6);
        // Ratios e (token 0) and e^-2 (token 1): high side clipped where A > 0, low side
        // where A < 0.
        let out = loss(&t(&[&[1.0, -1.0]]), None);
        assert_eq!((out.clip_high, out.clip_low, out.clipfrac), (0.5, 0.5, 1.0));
        let out = loss(&t(&[&[-1.0, 1.0]]), None);
        assert_eq!((out.clip_high, out.clip_low, out.clipfrac), (0.0, 0.0, 0.0));
    }

    #[test]
    fn value_loss_clips_around_the_old_values() {
        let v = t(&[&[2.0, 0.0]]);
        let old = t(&[&[0.0, 0.0]]);
        let ret = t(&[&[3.0, 1.0]]);
        let mask = t(&[&[1., 1.]]);
        let (loss, clipfrac) = value_loss(&v, &old, &ret, &mask, 0.5);
        // token 0: unclipped (2−3)² = 1, clipped (0.5−3)² = 6.25 → 6.25; token 1: 1 and 1 → 1
        assert!((loss.double_value(&[]) - 0.5 * (6.25 + 1.0) / 2.0).abs() < 1e-6);
        assert!((clipfrac - 0.5).abs() < 1e-9);
    }

    #[test]
    fn adaptive_kl_moves_towards_the_target() {
        let mut c = KlController {
            value: 0.1,
            target: Some(6.0),
            horizon: 10000.0,
        };
        c.update(12.0, 100.0); // error clipped to +0.2
        assert!((c.value - 0.1 * (1.0 + 0.2 * 0.01)).abs() < 1e-12);
        c.update(3.0, 100.0); // error −0.5 → −0.2
        assert!(c.value < 0.1 * (1.0 + 0.2 * 0.01));
        let mut fixed = KlController {
            value: 0.1,
            target: None,
            horizon: 10000.0,
        };
        fixed.update(100.0, 100.0);
        assert_eq!(fixed.value, 0.1);
    }

    #[test]
    fn explained_variance_is_one_for_perfect_values() {
        let r = t(&[&[1.0, 2.0, 3.0, 99.0]]);
        let mask = t(&[&[1., 1., 1., 0.]]);
        assert!((explained_variance(&r, &r, &mask, &World::single()) - 1.0).abs() < 1e-9);
        let zeros = Tensor::zeros_like(&r);
        assert!(explained_variance(&zeros, &r, &mask, &World::single()).abs() < 1e-6);
    }
}
