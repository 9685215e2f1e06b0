//! The DPO losses as TRL 1.16's `DPOTrainer` defines them, over per-pair sequence
//! log-probabilities (summed over each completion's tokens) of the policy and the frozen
//! reference. Pure functions over tensors, tested without a model.
//!
//! With ρ_c = log π(c) − log π_ref(c), ρ_r likewise, Δ = ρ_c − ρ_r and σ the sigmoid:
//! - `sigmoid` (Rafailov et al. 2023): −log σ(βΔ)
//! - `hinge` (SLiC): relu(1 − βΔ)
//! - `ipo` (Azar et al. 2023): (Δ' − 1/(2β))², where Δ' divides each log-ratio by its
//!   completion's token count, as TRL does
//! - `robust` (Chowdhury et al. 2024): (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε), ε the
//!   label smoothing
//! - `exo_pair` (Ji et al. 2024): KL of (σ(βΔ), σ(−βΔ)) from (1 − ε, ε)
//! - `nca_pair` (Chen et al. 2024): −log σ(βρ_c) − ½ log σ(−βρ_c) − ½ log σ(−βρ_r)
//! - `bco_pair` (Jung et al. 2024): −log σ(βρ_c) − log σ(−βρ_r)
//! - `sppo_hard` (Wu et al. 2024): (ρ_c − 1/(2β))² + (ρ_r + 1/(2β))²
//! - `apo_zero`, `apo_down` (D'Oosterlinck et al. 2024): 1 − σ(βρ_c) + σ(βρ_r), and
//!   σ(βρ_c) + 1 − σ(βΔ)
//! - `discopop` (Chris Lu et al. 2024): with x = βΔ and m = σ(x/τ):
//!   −log σ(x)·(1 − m) + e^(−x)·m
//! - `sigmoid_norm`: −log σ(βΔ') with IPO's per-token Δ'
//!
//! With `--f-divergence-type` (f-DPO) the losses on Δ (and Δ') compare scores f(ρ) in
//! place of the log-ratios (see [`FDivergence`]).
//!
//! Several losses may be summed with weights (TRL 1.16's list-valued `loss_type` with
//! `loss_weights`, e.g. MPO's `sigmoid,bco_pair,sft` with `0.8,0.2,1`). `sft` is the mean
//! NLL of the chosen completions' tokens: RPO's term (`--rpo-alpha α` is `sigmoid,sft` with
//! weights `1,α`). With `--use-weighting` (WPO) each pair's loss is multiplied by the
//! policy's length-normalised probabilities of its two responses, see [`wpo_weights`].
//!
//! - `aot`, `aot_unpaired` (Melnyk et al. 2024): within each micro-batch (TRL: a device's
//!   batch), the sorted policy log-ratios log π(c) − log π(r) against the sorted reference
//!   ones (`aot`), or the sorted ρ_c against the sorted ρ_r (`aot_unpaired`), each
//!   difference δ in −(1−ε) log σ(βδ) − ε log σ(−βδ). Sorting ties these two to
//!   `--batch-size`: unlike the others, the same step split otherwise gives another loss.
//!
//! Reference-free losses (no reference model is loaded; its log-probs count as 0):
//! - `--reference-free` with any of the above (TRL's former `reference_free`); with
//!   `sigmoid` and `--cpo-alpha 1` (the NLL term) it is CPO (Xu et al. 2024, TRL's
//!   `CPOTrainer`).
//! - `simpo` (Meng et al. 2024, TRL's `CPOTrainer` `loss_type="simpo"`): on the mean
//!   token log-probs p̄, −(1−ε) log σ(βx) − ε log σ(−βx) with x = p̄_c − p̄_r − γ/β
//!   (`--simpo-gamma`); CPO-SimPO with `--cpo-alpha`.
//! - `orpo` (Hong et al. 2024, TRL's `ORPOTrainer`): the chosen tokens' NLL (weight 1)
//!   plus −β log σ(log odds(p̄_c) − log odds(p̄_r)), odds(p̄) = e^p̄ / (1 − e^p̄).
//!
//! With `simpo` and `orpo` the logged log-probs and rewards are the mean token log-probs
//! (×β), as TRL's trainers log them.

use serde::Serialize;
use tch::{Kind, Tensor};

/// `--loss-type`, under TRL's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    #[default]
    Sigmoid,
    Ipo,
    Hinge,
    Robust,
    #[value(name = "exo_pair", alias = "exo-pair")]
    ExoPair,
    #[value(name = "nca_pair", alias = "nca-pair")]
    NcaPair,
    #[value(name = "bco_pair", alias = "bco-pair")]
    BcoPair,
    #[value(name = "sppo_hard", alias = "sppo-hard")]
    SppoHard,
    #[value(name = "apo_zero", alias = "apo-zero")]
    ApoZero,
    #[value(name = "apo_down", alias = "apo-down")]
    ApoDown,
    Discopop,
    #[value(name = "sigmoid_norm", alias = "sigmoid-norm")]
    SigmoidNorm,
    Aot,
    #[value(name = "aot_unpaired", alias = "aot-unpaired")]
    AotUnpaired,
    /// SimPO (reference-free, on mean token log-probs; TRL's CPOTrainer).
    Simpo,
    /// ORPO (reference-free, on mean token log-probs, with the NLL; TRL's ORPOTrainer).
    Orpo,
    /// The chosen completions' mean token NLL (not a pair loss).
    Sft,
    /// KTO (Ethayarajh et al. 2024) on unpaired feedback (see [`crate::kto`]).
    Kto,
    /// APO-zero's unpaired form (D'Oosterlinck et al. 2024) on unpaired feedback.
    #[value(name = "apo_zero_unpaired", alias = "apo-zero-unpaired")]
    ApoZeroUnpaired,
}

impl LossType {
    /// Whether the loss reads unpaired feedback (TRL's `KTOTrainer` losses).
    pub fn unpaired(self) -> bool {
        matches!(self, LossType::Kto | LossType::ApoZeroUnpaired)
    }

    /// Whether `--label-smoothing` enters the loss (robust, exo_pair, aot, aot_unpaired,
    /// simpo), as in TRL 1.16.
    fn smooths(self) -> bool {
        matches!(
            self,
            LossType::Robust
                | LossType::ExoPair
                | LossType::Aot
                | LossType::AotUnpaired
                | LossType::Simpo
        )
    }

    /// Whether the loss reads each response's mean token log-prob and no reference
    /// (SimPO's and ORPO's trainers).
    pub fn length_normalised(self) -> bool {
        matches!(self, LossType::Simpo | LossType::Orpo)
    }

    /// Whether the loss sorts the pairs of its micro-batch (`aot`, `aot_unpaired`).
    fn sorts(self) -> bool {
        matches!(self, LossType::Aot | LossType::AotUnpaired)
    }

    /// Whether the loss is built on the chosen−rejected score difference, the only losses
    /// an f-divergence other than the reverse KL generalises (TRL 1.16's list, which
    /// includes `sft`).
    fn takes_f_divergence(self) -> bool {
        !matches!(
            self,
            LossType::NcaPair
                | LossType::BcoPair
                | LossType::SppoHard
                | LossType::ApoZero
                | LossType::ApoDown
                | LossType::Kto
                | LossType::ApoZeroUnpaired
                | LossType::Aot
                | LossType::AotUnpaired
                | LossType::Simpo
                | LossType::Orpo
        )
    }
}

/// `--f-divergence-type` (f-DPO, Wang et al. 2023): the regulariser between policy and
/// reference, which turns each log-ratio ρ into the score the loss compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FDivergence {
    /// ρ itself (DPO's).
    #[default]
    #[value(name = "reverse_kl", alias = "reverse-kl")]
    ReverseKl,
    /// 1 − e^(−ρ).
    #[value(name = "forward_kl", alias = "forward-kl")]
    ForwardKl,
    /// log 2 + log σ(ρ).
    #[value(name = "js_divergence", alias = "js-divergence")]
    JsDivergence,
    /// (e^((α−1)ρ) − 1) / (α − 1), the exponent capped at 80 as TRL does for f32; ρ at α = 1.
    #[value(name = "alpha_divergence", alias = "alpha-divergence")]
    AlphaDivergence,
}

impl FDivergence {
    /// The score of log-ratios `rho` (α: `--f-alpha-divergence-coef`).
    pub fn score(self, rho: &Tensor, alpha: f64) -> Tensor {
        match self {
            FDivergence::ReverseKl => rho.shallow_clone(),
            FDivergence::ForwardKl => -(-rho).exp() + 1.0,
            FDivergence::JsDivergence => rho.log_sigmoid() + std::f64::consts::LN_2,
            FDivergence::AlphaDivergence if (alpha - 1.0).abs() < 1e-6 => rho.shallow_clone(),
            FDivergence::AlphaDivergence => {
                let t = (rho * (alpha - 1.0)).clamp_max(80.0);
                (t.exp() - 1.0) / (alpha - 1.0)
            }
        }
    }
}

/// The loss options `dpo train` and `dpo eval` share.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct LossArgs {
    /// β: the strength of the implicit KL constraint (IPO's τ).
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// The loss, as TRL 1.16 defines it: sigmoid (DPO), ipo, hinge, robust, exo_pair,
    /// nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, discopop, sigmoid_norm, aot,
    /// aot_unpaired or sft (the chosen tokens' NLL); a comma list sums several, weighted
    /// by --loss-weights. Reference-free, alone: simpo (TRL's CPOTrainer) or orpo (TRL's
    /// ORPOTrainer). On unpaired feedback (KTO's rows, or preference rows unpaired), TRL's
    /// KTOTrainer's kto or apo_zero_unpaired, alone.
    #[arg(long, value_delimiter = ',', default_value = "sigmoid")]
    pub loss_type: Vec<LossType>,
    /// One weight per --loss-type entry (TRL's `loss_weights`; default 1 each).
    #[arg(long, value_delimiter = ',')]
    pub loss_weights: Vec<f64>,
    /// WPO (Zhou et al. 2024; TRL's `use_weighting`): weigh each pair's loss by
    /// exp(mean over its tokens of log π(y_t) − log Σ_v π(v)²) of the chosen response times
    /// that of the rejected one, from the policy (no gradient through the weights).
    #[arg(long)]
    pub use_weighting: bool,
    /// ε, the assumed share of flipped labels (robust, aot, aot_unpaired, simpo and
    /// CPO's reference-free sigmoid, in [0, 0.5), and exo_pair, in (0, 0.5): EXO
    /// recommends 1e-3; as in TRL 1.16, the other losses do not use it).
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// τ of the discopop loss: the temperature of its mix of the logistic and the
    /// exponential losses (TRL's `discopop_tau`).
    #[arg(long, default_value_t = 0.05)]
    pub discopop_tau: f64,
    /// The f-divergence the implicit KL constraint uses (f-DPO): reverse_kl (DPO's),
    /// forward_kl, js_divergence or alpha_divergence; only the losses on the
    /// chosen−rejected difference take another than reverse_kl (not nca_pair, bco_pair,
    /// sppo_hard, apo_zero, apo_down), as in TRL 1.16.
    #[arg(long, default_value = "reverse_kl")]
    pub f_divergence_type: FDivergence,
    /// α of alpha_divergence.
    #[arg(long, default_value_t = 0.5)]
    pub f_alpha_divergence_coef: f64,
    /// LD-DPO (Liu et al. 2024; TRL's `ld_alpha`, in [0, 1]): a sequence's log-prob counts
    /// the tokens past the shorter response of its pair with weight α (the policy's and
    /// the reference's alike), so a longer response gains nothing from its length alone.
    /// Unset: plain sums. RPO's NLL stays unweighted, as TRL's `sft` term.
    #[arg(long)]
    pub ld_alpha: Option<f64>,
    /// RPO: add α × the mean NLL of the chosen completions' tokens (0: off). Also spelt
    /// --cpo-alpha (TRL's CPOTrainer's name for the same term).
    #[arg(long, visible_alias = "cpo-alpha", default_value_t = 0.0)]
    pub rpo_alpha: f64,
    /// TPO (Saeidi et al. 2024; TRL's experimental TPOTrainer `tpo_alpha`): add α × the
    /// mean NLL of each row's gold completion (its `reference` column) (0: off). TRL's TPO
    /// is this with a reference-free loss: --reference-free --loss-type sigmoid (its
    /// `sigmoid`), hinge or ipo, or --loss-type simpo (its `tpo-l`, γ = --simpo-gamma).
    #[arg(long, default_value_t = 0.0)]
    pub tpo_alpha: f64,
    /// No reference model: its log-probs count as 0, so the implicit reward is β·log π
    /// (TRL's former `reference_free`; `simpo` and `orpo` are reference-free always).
    #[arg(long)]
    pub reference_free: bool,
    /// γ of `simpo`: the target reward margin (TRL's `simpo_gamma`).
    #[arg(long, default_value_t = 0.5)]
    pub simpo_gamma: f64,
    /// AlphaPO's α (Gupta et al. 2025; TRL's CPOTrainer `alpha`): with a reference-free
    /// sigmoid, hinge or simpo loss, each response's log-prob x (simpo's mean token
    /// log-prob) becomes the reward (1 − e^(−αx))/α = (1 − p^(−α))/α before the loss and
    /// the logged rewards (the logged log-probs stay x). 0: off. AlphaPO itself is
    /// `--loss-type simpo --alpha A`.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub alpha: f64,
    /// KTO: the weight of the desirable completions' losses (TRL's `desirable_weight`).
    #[arg(long, default_value_t = 1.0)]
    pub desirable_weight: f64,
    /// KTO: the weight of the undesirable completions' losses.
    #[arg(long, default_value_t = 1.0)]
    pub undesirable_weight: f64,
}

impl LossArgs {
    fn weights(&self) -> Vec<f64> {
        if self.loss_weights.is_empty() {
            vec![1.0; self.loss_type.len()]
        } else {
            self.loss_weights.clone()
        }
    }

    /// The pair losses of --loss-type (every entry but `sft`) with their weights.
    pub fn pair_terms(&self) -> Vec<(LossType, f64)> {
        self.loss_type
            .iter()
            .copied()
            .zip(self.weights())
            .filter(|&(t, _)| t != LossType::Sft && !t.unpaired())
            .collect()
    }

    /// The unpaired loss (kto, apo_zero_unpaired), when --loss-type is one.
    pub fn unpaired(&self) -> Option<LossType> {
        self.loss_type.iter().copied().find(|t| t.unpaired())
    }

    /// The weight of the chosen tokens' mean NLL: `sft`'s in --loss-type, or --rpo-alpha;
    /// `orpo`'s NLL weighs 1 (×its --loss-weights entry).
    pub fn nll_weight(&self) -> f64 {
        let sft: f64 = (self.loss_type.iter().zip(self.weights()))
            .filter(|&(&t, _)| matches!(t, LossType::Sft | LossType::Orpo))
            .map(|(_, w)| w)
            .sum();
        sft + self.rpo_alpha
    }

    /// Whether a reference model is read: not with --reference-free, `simpo` or `orpo`.
    pub fn uses_reference(&self) -> bool {
        !self.reference_free && !self.length_normalised()
    }

    /// Whether the losses read mean token log-probs (`simpo`, `orpo`).
    pub fn length_normalised(&self) -> bool {
        self.loss_type.iter().any(|t| t.length_normalised())
    }

    /// `lp` with AlphaPO's reward shape (1 − e^(−αx))/α on the policy's log-probs when
    /// --alpha is set (the references are 0: AlphaPO is reference-free).
    fn shaped(&self, lp: &PairLogps) -> PairLogps {
        let shape = |x: &Tensor| match self.alpha {
            0.0 => x.shallow_clone(),
            a => (-(x * -a).exp() + 1.0) / a,
        };
        PairLogps {
            chosen: shape(&lp.chosen),
            rejected: shape(&lp.rejected),
            ref_chosen: lp.ref_chosen.shallow_clone(),
            ref_rejected: lp.ref_rejected.shallow_clone(),
            chosen_tokens: lp.chosen_tokens.shallow_clone(),
            rejected_tokens: lp.rejected_tokens.shallow_clone(),
        }
    }

    /// Whether `orpo` is the loss (its odds-ratio metrics are logged).
    fn orpo(&self) -> bool {
        self.loss_type.contains(&LossType::Orpo)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let has = |t: LossType| self.loss_type.contains(&t);
        common::cli::require(&[
            (
                self.beta > 0.0 && self.beta.is_finite(),
                "--beta must be > 0",
            ),
            (!self.loss_type.is_empty(), "--loss-type needs a loss"),
            (
                self.loss_weights.is_empty() || self.loss_weights.len() == self.loss_type.len(),
                "--loss-weights needs one weight per --loss-type entry",
            ),
            (
                self.loss_weights.iter().all(|w| w.is_finite()),
                "--loss-weights must be numbers",
            ),
            (
                self.label_smoothing == 0.0
                    || self.loss_type.iter().any(|t| t.smooths())
                    || (self.reference_free && has(LossType::Sigmoid)),
                "--label-smoothing applies to --loss-type robust, exo_pair, aot, aot_unpaired and simpo, and to sigmoid with --reference-free (CPO's) only (TRL 1.16's other losses do not use it)",
            ),
            (
                (0.0..0.5).contains(&self.label_smoothing),
                "--label-smoothing must be in [0, 0.5)",
            ),
            (
                !has(LossType::ExoPair) || self.label_smoothing > 0.0,
                "--loss-type exo_pair needs --label-smoothing > 0 (EXO recommends 1e-3)",
            ),
            (
                self.discopop_tau > 0.0 && self.discopop_tau.is_finite(),
                "--discopop-tau must be > 0",
            ),
            (
                self.f_divergence_type == FDivergence::ReverseKl
                    || self.loss_type.iter().all(|t| t.takes_f_divergence()),
                "--f-divergence-type other than reverse_kl needs a loss on the chosen−rejected difference (sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop or sft), as in TRL 1.16",
            ),
            (
                self.f_alpha_divergence_coef.is_finite(),
                "--f-alpha-divergence-coef must be a number",
            ),
            (
                self.ld_alpha.is_none_or(|a| (0.0..=1.0).contains(&a)),
                "--ld-alpha must be in [0, 1]",
            ),
            (self.rpo_alpha >= 0.0, "--rpo-alpha must be ≥ 0"),
            (
                self.tpo_alpha >= 0.0 && self.tpo_alpha.is_finite(),
                "--tpo-alpha must be ≥ 0",
            ),
            (
                self.tpo_alpha == 0.0 || (self.unpaired().is_none() && !self.use_weighting),
                "--tpo-alpha trains on the gold completions of preference pairs: not with kto or apo_zero_unpaired (unpaired rows have none), nor with --use-weighting (as the NLL term of --rpo-alpha)",
            ),
            (
                self.rpo_alpha == 0.0 || !has(LossType::Sft),
                "--rpo-alpha and sft in --loss-type are the same term: give its weight once (--loss-weights)",
            ),
            (
                !self.use_weighting || self.nll_weight() == 0.0,
                "--use-weighting with the NLL term (sft in --loss-type, or --rpo-alpha) is not offered: TRL scales that term by each micro-batch's mean weight, which ties the loss to how a step is split",
            ),
            (
                self.unpaired().is_none()
                    || (self.loss_type.len() == 1
                        && self.rpo_alpha == 0.0
                        && !self.use_weighting
                        && self.ld_alpha.is_none()),
                "--loss-type kto and apo_zero_unpaired stand alone (TRL's KTOTrainer): not in a list, nor with --rpo-alpha, --use-weighting or --ld-alpha",
            ),
            (
                !self.length_normalised()
                    || (self.loss_type.len() == 1
                        && !self.use_weighting
                        && self.ld_alpha.is_none()),
                "--loss-type simpo and orpo stand alone (TRL's CPOTrainer and ORPOTrainer): not in a list, nor with --use-weighting or --ld-alpha",
            ),
            (
                !(has(LossType::Orpo) && self.rpo_alpha != 0.0),
                "--loss-type orpo has its NLL term built in (weight 1): --rpo-alpha would add a second one",
            ),
            (
                self.simpo_gamma.is_finite(),
                "--simpo-gamma must be a number",
            ),
            (
                self.alpha == 0.0
                    || (self.alpha.is_finite()
                        && (self.reference_free || has(LossType::Simpo))
                        && self.loss_type.iter().all(|t| {
                            matches!(t, LossType::Sigmoid | LossType::Hinge | LossType::Simpo | LossType::Sft)
                        })),
                "--alpha (AlphaPO) shapes reference-free rewards: it needs --reference-free with --loss-type sigmoid or hinge, or --loss-type simpo",
            ),
            (
                !(self.reference_free && self.unpaired().is_some()),
                "--reference-free does not apply to kto and apo_zero_unpaired: their KL estimate and rewards are taken against the reference",
            ),
            (
                !self.use_weighting || !self.loss_type.iter().any(|t| t.sorts()),
                "--use-weighting with aot or aot_unpaired is not offered: they sort the pairs, which would misalign each pair's weight (as TRL refuses it)",
            ),
            (
                self.desirable_weight > 0.0
                    && self.undesirable_weight > 0.0
                    && self.desirable_weight.is_finite()
                    && self.undesirable_weight.is_finite(),
                "--desirable-weight and --undesirable-weight must be > 0",
            ),
        ])?;
        Ok(())
    }
}

/// Sequence log-probabilities of a batch of pairs, each `[B]` f32.
pub struct PairLogps {
    pub chosen: Tensor,
    pub rejected: Tensor,
    pub ref_chosen: Tensor,
    pub ref_rejected: Tensor,
    /// Completion tokens of each chosen and rejected response (IPO's normalisation).
    pub chosen_tokens: Tensor,
    pub rejected_tokens: Tensor,
}

/// The per-pair loss `[B]`: the weighted sum of --loss-type's pair losses (without the
/// NLL term, which is per token, and without WPO's weights).
pub fn pair_loss(args: &LossArgs, lp: &PairLogps) -> Tensor {
    let lp = &args.shaped(lp);
    let mut total = lp.chosen.zeros_like();
    for (loss_type, weight) in args.pair_terms() {
        total += single_loss(args, loss_type, lp) * weight;
    }
    total
}

/// One pair loss `[B]`.
fn single_loss(args: &LossArgs, loss_type: LossType, lp: &PairLogps) -> Tensor {
    let chosen_ratio = &lp.chosen - &lp.ref_chosen;
    let rejected_ratio = &lp.rejected - &lp.ref_rejected;
    let beta = args.beta;
    // The scores the difference losses compare: the log-ratios under DPO's reverse KL.
    let score = |rho: &Tensor| {
        args.f_divergence_type
            .score(rho, args.f_alpha_divergence_coef)
    };
    let (chosen_score, rejected_score) = (score(&chosen_ratio), score(&rejected_ratio));
    let delta = &chosen_score - &rejected_score;
    // IPO's per-token difference of the scores.
    let per_token = || {
        &chosen_score / lp.chosen_tokens.clamp_min(1.0)
            - &rejected_score / lp.rejected_tokens.clamp_min(1.0)
    };
    let eps = args.label_smoothing;
    let (c, r) = (&chosen_ratio * beta, &rejected_ratio * beta);
    match loss_type {
        // CPOTrainer's sigmoid smooths its labels (DPOTrainer's does not).
        LossType::Sigmoid if args.reference_free => conservative(delta, beta, eps),
        LossType::Sigmoid => -(&delta * beta).log_sigmoid(),
        LossType::Hinge => (-(&delta * beta) + 1.0).relu(),
        LossType::Ipo => (per_token() - 1.0 / (2.0 * beta)).square(),
        LossType::Robust => {
            let clean = -(&delta * beta).log_sigmoid() * (1.0 - eps);
            let flipped = -(&delta * -beta).log_sigmoid() * eps;
            (clean - flipped) / (1.0 - 2.0 * eps)
        }
        LossType::ExoPair => {
            let x = &delta * beta;
            let (log_qw, log_ql) = (x.log_sigmoid(), (-&x).log_sigmoid());
            log_qw.exp() * (&log_qw - (-eps).ln_1p()) + log_ql.exp() * (log_ql - eps.ln())
        }
        LossType::NcaPair => {
            -c.log_sigmoid() - (-&c).log_sigmoid() * 0.5 - (-&r).log_sigmoid() * 0.5
        }
        LossType::BcoPair => -c.log_sigmoid() - (-&r).log_sigmoid(),
        LossType::SppoHard => {
            (&chosen_ratio - 0.5 / beta).square() + (&rejected_ratio + 0.5 / beta).square()
        }
        LossType::ApoZero => -c.sigmoid() + 1.0 + r.sigmoid(),
        LossType::ApoDown => c.sigmoid() + 1.0 - (&delta * beta).sigmoid(),
        LossType::Discopop => {
            let x = &delta * beta;
            let m = (&x / args.discopop_tau).sigmoid();
            -x.log_sigmoid() * (-&m + 1.0) + (-&x).exp() * m
        }
        LossType::SigmoidNorm => -(per_token() * beta).log_sigmoid(),
        LossType::Aot => {
            let sorted = |x: Tensor| x.sort(0, false).0;
            let policy = sorted(&lp.chosen - &lp.rejected);
            let reference = sorted(&lp.ref_chosen - &lp.ref_rejected);
            conservative(policy - reference, beta, eps)
        }
        LossType::AotUnpaired => {
            let sorted = |x: &Tensor| x.sort(0, false).0;
            conservative(sorted(&chosen_ratio) - sorted(&rejected_ratio), beta, eps)
        }
        LossType::Simpo => conservative(
            &lp.chosen - &lp.rejected - args.simpo_gamma / beta,
            beta,
            eps,
        ),
        LossType::Orpo => -odds_ratio(lp).log_sigmoid() * beta,
        LossType::Sft | LossType::Kto | LossType::ApoZeroUnpaired => {
            unreachable!("{loss_type:?} is not a pair loss")
        }
    }
}

/// −(1−ε) log σ(βx) − ε log σ(−βx): the logistic loss of x with the label flipped with
/// probability ε (cDPO's; `aot`'s and `simpo`'s form).
fn conservative(x: Tensor, beta: f64, eps: f64) -> Tensor {
    -(&x * beta).log_sigmoid() * (1.0 - eps) - (&x * -beta).log_sigmoid() * eps
}

/// log(1 − e^x) for x < 0, without cancellation (branching at −ln 2 as TRL's `log1mexp`).
fn log1mexp(x: &Tensor) -> Tensor {
    let near = (-x.expm1()).log();
    let far = (-x.exp()).log1p();
    far.where_self(&x.lt(-std::f64::consts::LN_2), &near)
}

/// ORPO's log odds ratio `[B]`: log odds(p̄_c) − log odds(p̄_r) of the mean token
/// log-probs, odds(p̄) = e^p̄ / (1 − e^p̄).
pub fn odds_ratio(lp: &PairLogps) -> Tensor {
    let (c, r) = (
        lp.chosen.to_kind(Kind::Float),
        lp.rejected.to_kind(Kind::Float),
    );
    (&c - &r) - (log1mexp(&c) - log1mexp(&r))
}

/// WPO's weights `[B]` (Eq. 2 of Zhou et al. 2024, as TRL 1.16 computes them): for each
/// response, exp of the mean over its completion tokens of log π(y_t) − log Σ_v π(v)², the
/// token's log-prob aligned by the log-probability that two samples agree; a pair weighs
/// the product of its chosen and rejected responses' weights. Inputs are per response
/// `[B]`: the sums over completion tokens of those aligned log-probs and the token counts.
pub fn wpo_weights(aligned_sums: (&Tensor, &Tensor), tokens: (&Tensor, &Tensor)) -> Tensor {
    let weight = |sum: &Tensor, n: &Tensor| (sum / n.clamp_min(1.0)).exp();
    (weight(aligned_sums.0, tokens.0) * weight(aligned_sums.1, tokens.1)).detach()
}

/// The implicit rewards β·(log π − log π_ref) of the chosen and rejected responses
/// (detached).
pub fn implicit_rewards(beta: f64, lp: &PairLogps) -> (Tensor, Tensor) {
    (
        ((&lp.chosen - &lp.ref_chosen) * beta).detach(),
        ((&lp.rejected - &lp.ref_rejected) * beta).detach(),
    )
}

/// Sums of a set of pairs that give the logged metrics (TRL's names); add them over
/// micro-batches and ranks, then read [`Stats::named`].
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Stats {
    pub pairs: f64,
    pub loss_sum: f64,
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub correct: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
    /// Σ over completion tokens of the mean logit over the vocabulary.
    pub logits_chosen: f64,
    pub logits_rejected: f64,
    /// Completion tokens scored (the logits' and RPO's denominators).
    pub tokens_chosen: f64,
    pub tokens_rejected: f64,
    /// Σ of the chosen completions' log-probs, every token weighing 1 (RPO's NLL; the
    /// chosen log-probs themselves with --ld-alpha down-weight the tails).
    pub nll_logps_chosen: f64,
    /// Σ over the chosen and rejected completion tokens of the policy's entropy, and the
    /// chosen tokens the policy ranks first (TRL's `entropy`, `mean_token_accuracy`).
    pub entropy_sum: f64,
    pub greedy_chosen: f64,
    /// TPO's: Σ of the gold completions' log-probs, and their scored tokens.
    pub nll_logps_gold: f64,
    pub tokens_gold: f64,
    /// ORPO's Σ log σ(log odds ratio) and Σ log odds ratio (0 for other losses).
    pub log_odds_ratio: f64,
    pub log_odds_chosen: f64,
}

fn sum(t: &Tensor) -> f64 {
    t.sum(Kind::Double).double_value(&[])
}

impl Stats {
    /// The sums of one batch: its pair losses, log-probs and rewards.
    pub fn of(args: &LossArgs, lp: &PairLogps, losses: &Tensor) -> Stats {
        let (rc, rr) = implicit_rewards(args.beta, &args.shaped(lp));
        let (log_odds_ratio, log_odds_chosen) = match args.orpo() {
            true => {
                let odds = odds_ratio(lp).detach();
                (sum(&odds.log_sigmoid()), sum(&odds))
            }
            false => (0.0, 0.0),
        };
        Stats {
            log_odds_ratio,
            log_odds_chosen,
            pairs: losses.size()[0] as f64,
            loss_sum: sum(&losses.detach()),
            rewards_chosen: sum(&rc),
            rewards_rejected: sum(&rr),
            correct: sum(&rc.gt_tensor(&rr)),
            logps_chosen: sum(&lp.chosen.detach()),
            logps_rejected: sum(&lp.rejected.detach()),
            ..Stats::default()
        }
    }

    pub fn add(&mut self, o: &Stats) {
        self.pairs += o.pairs;
        self.loss_sum += o.loss_sum;
        self.rewards_chosen += o.rewards_chosen;
        self.rewards_rejected += o.rewards_rejected;
        self.correct += o.correct;
        self.logps_chosen += o.logps_chosen;
        self.logps_rejected += o.logps_rejected;
        self.logits_chosen += o.logits_chosen;
        self.logits_rejected += o.logits_rejected;
        self.tokens_chosen += o.tokens_chosen;
        self.tokens_rejected += o.tokens_rejected;
        self.nll_logps_chosen += o.nll_logps_chosen;
        self.nll_logps_gold += o.nll_logps_gold;
        self.entropy_sum += o.entropy_sum;
        self.greedy_chosen += o.greedy_chosen;
        self.tokens_gold += o.tokens_gold;
        self.log_odds_ratio += o.log_odds_ratio;
        self.log_odds_chosen += o.log_odds_chosen;
    }

    /// The same sums over every rank of `world`.
    pub fn summed(&self, world: &common::World) -> Stats {
        Stats {
            pairs: world.sum(self.pairs),
            loss_sum: world.sum(self.loss_sum),
            rewards_chosen: world.sum(self.rewards_chosen),
            rewards_rejected: world.sum(self.rewards_rejected),
            correct: world.sum(self.correct),
            logps_chosen: world.sum(self.logps_chosen),
            logps_rejected: world.sum(self.logps_rejected),
            logits_chosen: world.sum(self.logits_chosen),
            logits_rejected: world.sum(self.logits_rejected),
            tokens_chosen: world.sum(self.tokens_chosen),
            tokens_rejected: world.sum(self.tokens_rejected),
            nll_logps_chosen: world.sum(self.nll_logps_chosen),
            nll_logps_gold: world.sum(self.nll_logps_gold),
            entropy_sum: world.sum(self.entropy_sum),
            greedy_chosen: world.sum(self.greedy_chosen),
            tokens_gold: world.sum(self.tokens_gold),
            log_odds_ratio: world.sum(self.log_odds_ratio),
            log_odds_chosen: world.sum(self.log_odds_chosen),
        }
    }

    /// The whole loss: the mean pair loss plus the NLL terms, RPO's α (or `sft`'s weight)
    /// × the chosen tokens' mean NLL and TPO's α × the gold tokens'.
    pub fn loss(&self, args: &LossArgs) -> f64 {
        let mut loss = self.loss_sum / self.pairs.max(1.0);
        let nll_weight = args.nll_weight();
        if nll_weight != 0.0 {
            loss += nll_weight * -self.nll_logps_chosen / self.tokens_chosen.max(1.0);
        }
        if args.tpo_alpha != 0.0 {
            loss += args.tpo_alpha * self.gold_nll();
        }
        loss
    }

    /// The gold completions' mean NLL per token (TPO's term before its α).
    fn gold_nll(&self) -> f64 {
        -self.nll_logps_gold / self.tokens_gold.max(1.0)
    }

    /// `(name, value)` with TRL's names: `loss`, `rewards/chosen`, `rewards/rejected`,
    /// `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`,
    /// `logits/chosen`, `logits/rejected`; with the NLL term `nll_loss` (its mean, before
    /// its weight), with `orpo` `log_odds_ratio` and `log_odds_chosen` (ORPOTrainer's).
    pub fn named(&self, args: &LossArgs) -> Vec<(&'static str, f64)> {
        let n = self.pairs.max(1.0);
        let nll_weight = args.nll_weight();
        let mut named = vec![
            ("loss", self.loss(args)),
            ("rewards/chosen", self.rewards_chosen / n),
            ("rewards/rejected", self.rewards_rejected / n),
            ("rewards/accuracies", self.correct / n),
            (
                "rewards/margins",
                (self.rewards_chosen - self.rewards_rejected) / n,
            ),
            ("logps/chosen", self.logps_chosen / n),
            ("logps/rejected", self.logps_rejected / n),
            (
                "logits/chosen",
                self.logits_chosen / self.tokens_chosen.max(1.0),
            ),
            (
                "logits/rejected",
                self.logits_rejected / self.tokens_rejected.max(1.0),
            ),
            (
                "entropy",
                self.entropy_sum / (self.tokens_chosen + self.tokens_rejected).max(1.0),
            ),
            (
                "mean_token_accuracy",
                self.greedy_chosen / self.tokens_chosen.max(1.0),
            ),
        ];
        if nll_weight != 0.0 {
            named.push((
                "nll_loss",
                -self.nll_logps_chosen / self.tokens_chosen.max(1.0),
            ));
        }
        if args.tpo_alpha != 0.0 {
            named.push(("nll_loss/gold", self.gold_nll()));
        }
        if args.orpo() {
            named.push(("log_odds_ratio", self.log_odds_ratio / n));
            named.push(("log_odds_chosen", self.log_odds_chosen / n));
        }
        named
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(loss_type: LossType, label_smoothing: f64) -> LossArgs {
        LossArgs {
            beta: 0.1,
            loss_type: vec![loss_type],
            loss_weights: vec![],
            use_weighting: false,
            label_smoothing,
            discopop_tau: 0.05,
            f_divergence_type: FDivergence::ReverseKl,
            f_alpha_divergence_coef: 0.5,
            ld_alpha: None,
            rpo_alpha: 0.0,
            tpo_alpha: 0.0,
            reference_free: false,
            simpo_gamma: 0.5,
            alpha: 0.0,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    }

    fn t(v: &[f64]) -> Tensor {
        Tensor::from_slice(&v.iter().map(|&x| x as f32).collect::<Vec<_>>())
    }

    fn logps(c: &[f64], r: &[f64], rc: &[f64], rr: &[f64]) -> PairLogps {
        PairLogps {
            chosen: t(c),
            rejected: t(r),
            ref_chosen: t(rc),
            ref_rejected: t(rr),
            chosen_tokens: t(&[4.0, 2.0]),
            rejected_tokens: t(&[5.0, 1.0]),
        }
    }

    fn log_sigmoid(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    fn values(x: &Tensor) -> Vec<f64> {
        Vec::<f32>::try_from(x)
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    }

    /// Policy = reference: every loss type's value at Δ = 0, and every reward is 0.
    #[test]
    fn at_the_reference_sigmoid_is_ln2_and_rewards_are_zero() {
        let same = logps(&[-3.0, -5.0], &[-4.0, -2.0], &[-3.0, -5.0], &[-4.0, -2.0]);
        let l = values(&pair_loss(&args(LossType::Sigmoid, 0.0), &same));
        assert!(l.iter().all(|&x| (x - 2f64.ln()).abs() < 1e-7), "{l:?}");
        let l = values(&pair_loss(&args(LossType::Hinge, 0.0), &same));
        assert_eq!(l, [1.0, 1.0]);
        let l = values(&pair_loss(&args(LossType::Ipo, 0.0), &same));
        assert!(l.iter().all(|&x| (x - 25.0).abs() < 1e-5), "{l:?}");
        let s = Stats::of(
            &args(LossType::Sigmoid, 0.0),
            &same,
            &pair_loss(&args(LossType::Sigmoid, 0.0), &same),
        );
        assert_eq!(
            (s.rewards_chosen, s.rewards_rejected, s.correct),
            (0.0, 0.0, 0.0)
        );
    }

    /// Each loss type against its formula written out in f64.
    #[test]
    fn losses_match_their_formulas() {
        let lp = logps(&[-3.0, -6.0], &[-4.5, -2.0], &[-3.5, -5.0], &[-4.0, -2.5]);
        let (beta, eps) = (0.1, 0.2);
        // Δ per pair: (0.5 − (−0.5)) = 1.0 and (−1.0 − 0.5) = −1.5
        let delta = [1.0, -1.5];
        let sig: Vec<f64> = delta.iter().map(|d| -log_sigmoid(beta * d)).collect();
        let hinge: Vec<f64> = delta.iter().map(|d| (1.0 - beta * d).max(0.0)).collect();
        let ipo = [
            (0.5 / 4.0 - (-0.5) / 5.0 - 1.0 / (2.0 * beta)).powi(2),
            (-1.0 / 2.0 - 0.5 / 1.0 - 1.0 / (2.0 * beta)).powi(2),
        ];
        let robust: Vec<f64> = delta
            .iter()
            .map(|d| {
                (-(1.0 - eps) * log_sigmoid(beta * d) + eps * log_sigmoid(-beta * d))
                    / (1.0 - 2.0 * eps)
            })
            .collect();
        // ρ_c, ρ_r per pair: (0.5, −0.5) and (−1.0, 0.5); completion tokens 4, 5 and 2, 1.
        let (rho_c, rho_r) = ([0.5, -1.0], [-0.5, 0.5]);
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        let each = |f: &dyn Fn(f64, f64, f64) -> f64| -> Vec<f64> {
            (0..2).map(|i| f(rho_c[i], rho_r[i], delta[i])).collect()
        };
        let exo_eps: f64 = 1e-3;
        let exo = each(&|_, _, d| {
            let (qw, ql) = (sigmoid(beta * d), sigmoid(-beta * d));
            qw * (qw.ln() - (1.0 - exo_eps).ln()) + ql * (ql.ln() - exo_eps.ln())
        });
        let nca = each(&|c, r, _| {
            -log_sigmoid(beta * c) - 0.5 * log_sigmoid(-beta * c) - 0.5 * log_sigmoid(-beta * r)
        });
        let bco = each(&|c, r, _| -log_sigmoid(beta * c) - log_sigmoid(-beta * r));
        let sppo = each(&|c, r, _| (c - 0.5 / beta).powi(2) + (r + 0.5 / beta).powi(2));
        let apo_zero = each(&|c, r, _| 1.0 - sigmoid(beta * c) + sigmoid(beta * r));
        let apo_down = each(&|c, _, d| sigmoid(beta * c) + 1.0 - sigmoid(beta * d));
        let discopop = each(&|_, _, d| {
            let x = beta * d;
            let m = sigmoid(x / 0.05);
            -log_sigmoid(x) * (1.0 - m) + (-x).exp() * m
        });
        let norm = [
            -log_sigmoid(beta * (0.5 / 4.0 - (-0.5) / 5.0)),
            -log_sigmoid(beta * (-1.0 / 2.0 - 0.5 / 1.0)),
        ];
        for (kind, smoothing, expected) in [
            (LossType::Sigmoid, 0.0, sig),
            (LossType::Hinge, 0.0, hinge),
            (LossType::Ipo, 0.0, ipo.to_vec()),
            (LossType::Robust, eps, robust),
            (LossType::ExoPair, exo_eps, exo),
            (LossType::NcaPair, 0.0, nca),
            (LossType::BcoPair, 0.0, bco),
            (LossType::SppoHard, 0.0, sppo),
            (LossType::ApoZero, 0.0, apo_zero),
            (LossType::ApoDown, 0.0, apo_down),
            (LossType::Discopop, 0.0, discopop),
            (LossType::SigmoidNorm, 0.0, norm.to_vec()),
        ] {
            let got = values(&pair_loss(&args(kind, smoothing), &lp));
            for (g, e) in got.iter().zip(&expected) {
                assert!((g - e).abs() < 1e-5, "{kind:?}: {got:?} vs {expected:?}");
            }
        }
        let s = Stats::of(&args(LossType::Sigmoid, 0.0), &lp, &t(&[0.0, 0.0]));
        assert_eq!(s.correct, 1.0);
        assert!((s.rewards_chosen - beta * (0.5 - 1.0)).abs() < 1e-6);
    }

    #[test]
    fn label_smoothing_is_refused_where_trl_ignores_it() {
        assert!(args(LossType::Sigmoid, 0.1).validate().is_err());
        assert!(args(LossType::Robust, 0.1).validate().is_ok());
        assert!(args(LossType::Robust, 0.5).validate().is_err());
        assert!(args(LossType::ExoPair, 1e-3).validate().is_ok());
        let e = args(LossType::ExoPair, 0.0).validate().unwrap_err();
        assert!(
            e.to_string()
                .contains("exo_pair needs --label-smoothing > 0"),
            "{e}"
        );
        assert!(args(LossType::ApoZero, 0.1).validate().is_err());
    }

    /// A list of losses is their weighted sum; `sft` is the NLL term's weight (RPO's α),
    /// not a pair loss; the lists are checked as TRL 1.16 checks them.
    #[test]
    fn loss_lists_sum_their_weighted_losses() {
        let lp = logps(&[-3.0, -6.0], &[-4.5, -2.0], &[-3.5, -5.0], &[-4.0, -2.5]);
        let one = |t| values(&pair_loss(&args(t, 0.0), &lp));
        let mpo = LossArgs {
            loss_type: vec![LossType::Sigmoid, LossType::BcoPair, LossType::Sft],
            loss_weights: vec![0.8, 0.2, 1.5],
            ..args(LossType::Sigmoid, 0.0)
        };
        mpo.validate().unwrap();
        let (sig, bco) = (one(LossType::Sigmoid), one(LossType::BcoPair));
        let got = values(&pair_loss(&mpo, &lp));
        for i in 0..2 {
            let want = 0.8 * sig[i] + 0.2 * bco[i];
            assert!((got[i] - want).abs() < 1e-6, "{i}: {got:?} vs {want}");
        }
        assert_eq!(mpo.nll_weight(), 1.5);
        // Without weights each counts 1; sft alone leaves no pair loss.
        let unweighted = LossArgs {
            loss_weights: vec![],
            ..mpo.clone()
        };
        let got = values(&pair_loss(&unweighted, &lp));
        assert!((got[0] - (sig[0] + bco[0])).abs() < 1e-6);
        assert_eq!(unweighted.nll_weight(), 1.0);
        assert_eq!(
            values(&pair_loss(&args(LossType::Sft, 0.0), &lp)),
            [0.0, 0.0]
        );
        let refused = |a: LossArgs, what: &str| {
            let e = a.validate().unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        };
        refused(
            LossArgs {
                loss_weights: vec![1.0],
                ..mpo.clone()
            },
            "--loss-weights needs one weight per --loss-type entry",
        );
        refused(
            LossArgs {
                rpo_alpha: 0.5,
                ..mpo.clone()
            },
            "--rpo-alpha and sft in --loss-type are the same term",
        );
        refused(
            LossArgs {
                use_weighting: true,
                ..mpo.clone()
            },
            "--use-weighting with the NLL term",
        );
        refused(
            LossArgs {
                f_divergence_type: FDivergence::ForwardKl,
                ..mpo.clone()
            },
            "--f-divergence-type other than reverse_kl",
        );
        // Smoothing is for robust and exo_pair: fine when the list has one of them.
        let smoothed = LossArgs {
            loss_type: vec![LossType::Robust, LossType::Ipo],
            ..args(LossType::Sigmoid, 0.2)
        };
        smoothed.validate().unwrap();
    }

    /// SimPO, ORPO and the sorted aot losses against their formulas written out (TRL's
    /// CPOTrainer, ORPOTrainer and DPOTrainer), with the options they refuse.
    #[test]
    fn reference_free_and_sorted_losses_match_their_formulas() {
        let beta = 0.1;
        // Mean token log-probs for SimPO and ORPO: one pair each side of −ln 2.
        let lp = logps(&[-0.3, -2.0], &[-1.2, -0.5], &[0.0, 0.0], &[0.0, 0.0]);
        let (c, r) = ([-0.3f64, -2.0], [-1.2f64, -0.5]);
        let conservative =
            |x: f64, eps: f64| -log_sigmoid(beta * x) * (1.0 - eps) - log_sigmoid(-beta * x) * eps;
        let simpo = LossArgs {
            simpo_gamma: 0.7,
            alpha: 0.0,
            ..args(LossType::Simpo, 0.1)
        };
        simpo.validate().unwrap();
        assert!(!simpo.uses_reference() && simpo.length_normalised());
        let got = values(&pair_loss(&simpo, &lp));
        for i in 0..2 {
            let want = conservative(c[i] - r[i] - 0.7 / beta, 0.1);
            assert!((got[i] - want).abs() < 1e-6, "simpo {i}: {got:?} vs {want}");
        }
        // AlphaPO (CPOTrainer with `alpha`): r(x) = (1 − e^(−αx))/α in the loss and the
        // logged rewards; the logged log-probs stay x.
        let alphapo = LossArgs {
            alpha: 0.5,
            ..simpo.clone()
        };
        alphapo.validate().unwrap();
        let shape = |x: f64| (1.0 - (-0.5 * x).exp()) / 0.5;
        let got = values(&pair_loss(&alphapo, &lp));
        for i in 0..2 {
            let want = conservative(shape(c[i]) - shape(r[i]) - 0.7 / beta, 0.1);
            assert!(
                (got[i] - want).abs() < 1e-6,
                "alphapo {i}: {got:?} vs {want}"
            );
        }
        let s = Stats::of(&alphapo, &lp, &t(&[0.0, 0.0]));
        assert!((s.rewards_chosen - beta * (shape(c[0]) + shape(c[1]))).abs() < 1e-6);
        assert!((s.logps_chosen - (c[0] + c[1])).abs() < 1e-6);
        let with_reference = LossArgs {
            alpha: 0.5,
            ..args(LossType::Sigmoid, 0.0)
        };
        assert!(with_reference.validate().is_err());
        // CPO's sigmoid (reference-free) smooths its labels as simpo does.
        let cpo = LossArgs {
            reference_free: true,
            ..args(LossType::Sigmoid, 0.1)
        };
        cpo.validate().unwrap();
        let got = values(&pair_loss(&cpo, &lp));
        for i in 0..2 {
            let want = conservative(c[i] - r[i], 0.1);
            assert!((got[i] - want).abs() < 1e-6, "cpo {i}: {got:?} vs {want}");
        }
        assert!(args(LossType::Sigmoid, 0.1).validate().is_err());
        let orpo = args(LossType::Orpo, 0.0);
        orpo.validate().unwrap();
        assert_eq!(orpo.nll_weight(), 1.0);
        let got = values(&pair_loss(&orpo, &lp));
        let log_odds = |p: f64| p - (1.0 - p.exp()).ln();
        for i in 0..2 {
            let want = -beta * log_sigmoid(log_odds(c[i]) - log_odds(r[i]));
            assert!((got[i] - want).abs() < 1e-5, "orpo {i}: {got:?} vs {want}");
        }
        let s = Stats::of(&orpo, &lp, &t(&[0.0, 0.0]));
        let odds0 = log_odds(c[0]) - log_odds(r[0]);
        let odds1 = log_odds(c[1]) - log_odds(r[1]);
        assert!((s.log_odds_chosen - (odds0 + odds1)).abs() < 1e-5);
        // aot: the sorted policy margins against the sorted reference margins.
        let lp = logps(&[-3.0, -6.0], &[-4.5, -2.0], &[-3.5, -5.0], &[-4.0, -2.5]);
        let (policy, reference) = ([-4.0f64, 1.5], [-2.5f64, 0.5]);
        let got = values(&pair_loss(&args(LossType::Aot, 0.1), &lp));
        for i in 0..2 {
            let want = conservative(policy[i] - reference[i], 0.1);
            assert!((got[i] - want).abs() < 1e-6, "aot {i}: {got:?} vs {want}");
        }
        // aot_unpaired: the sorted ρ_c (−1, 0.5) against the sorted ρ_r (−0.5, 0.5).
        let got = values(&pair_loss(&args(LossType::AotUnpaired, 0.0), &lp));
        let want = [conservative(-0.5, 0.0), conservative(0.0, 0.0)];
        for i in 0..2 {
            assert!((got[i] - want[i]).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        let refused = |a: LossArgs, what: &str| {
            let e = a.validate().unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        };
        refused(
            LossArgs {
                loss_type: vec![LossType::Simpo, LossType::Sigmoid],
                ..args(LossType::Simpo, 0.0)
            },
            "simpo and orpo stand alone",
        );
        refused(
            LossArgs {
                rpo_alpha: 1.0,
                ..orpo.clone()
            },
            "orpo has its NLL term built in",
        );
        refused(
            LossArgs {
                use_weighting: true,
                ..args(LossType::Aot, 0.0)
            },
            "--use-weighting with aot",
        );
        refused(
            LossArgs {
                reference_free: true,
                ..args(LossType::Kto, 0.0)
            },
            "--reference-free does not apply to kto",
        );
        refused(args(LossType::Orpo, 0.1), "--label-smoothing applies to");
        let cpo = LossArgs {
            reference_free: true,
            rpo_alpha: 1.0,
            ..args(LossType::Sigmoid, 0.0)
        };
        cpo.validate().unwrap();
        assert!(!cpo.uses_reference() && !cpo.length_normalised());
    }

    /// WPO: each response weighs exp of its mean aligned log-prob, a pair the product.
    #[test]
    fn wpo_weights_are_the_product_of_the_length_normalised_probabilities() {
        let w = wpo_weights(
            (&t(&[-2.0, -0.9]), &t(&[-1.0, 0.0])),
            (&t(&[4.0, 3.0]), &t(&[2.0, 0.0])),
        );
        let want = [(-0.5f64 + -0.5).exp(), (-0.3f64).exp()];
        let got = values(&w);
        for i in 0..2 {
            assert!((got[i] - want[i]).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    /// TRL's names (`nca_pair`), with the kebab-case spelling of our other options too.
    #[test]
    fn loss_types_parse_under_trl_names() {
        use clap::ValueEnum;
        for (name, kind) in [
            ("sigmoid", LossType::Sigmoid),
            ("nca_pair", LossType::NcaPair),
            ("nca-pair", LossType::NcaPair),
            ("sppo_hard", LossType::SppoHard),
            ("discopop", LossType::Discopop),
            ("sigmoid_norm", LossType::SigmoidNorm),
            ("sft", LossType::Sft),
        ] {
            assert_eq!(LossType::from_str(name, false), Ok(kind), "{name}");
        }
        let saved = serde_json::to_value(LossType::ApoZero).unwrap();
        assert_eq!(saved.as_str(), Some("apo_zero"));
    }

    /// f-DPO: each divergence's score of the log-ratios, in the sigmoid loss; α = 1 of the
    /// α-divergence is the reverse KL; the losses not on the difference refuse it.
    #[test]
    fn f_divergences_score_the_log_ratios() {
        let lp = logps(&[-3.0, -6.0], &[-4.5, -2.0], &[-3.5, -5.0], &[-4.0, -2.5]);
        let (rho_c, rho_r) = ([0.5f64, -1.0], [-0.5f64, 0.5]);
        let alpha = 0.3;
        let cases: [(FDivergence, &dyn Fn(f64) -> f64); 4] = [
            (FDivergence::ReverseKl, &|x| x),
            (FDivergence::ForwardKl, &|x| 1.0 - (-x).exp()),
            (FDivergence::JsDivergence, &|x| 2f64.ln() + log_sigmoid(x)),
            (FDivergence::AlphaDivergence, &|x| {
                (((alpha - 1.0) * x).exp() - 1.0) / (alpha - 1.0)
            }),
        ];
        for (f, score) in cases {
            let a = LossArgs {
                f_divergence_type: f,
                f_alpha_divergence_coef: alpha,
                ..args(LossType::Sigmoid, 0.0)
            };
            let got = values(&pair_loss(&a, &lp));
            for i in 0..2 {
                let want = -log_sigmoid(0.1 * (score(rho_c[i]) - score(rho_r[i])));
                assert!((got[i] - want).abs() < 1e-6, "{f:?} {i}: {got:?} vs {want}");
            }
        }
        let alpha_one = LossArgs {
            f_divergence_type: FDivergence::AlphaDivergence,
            f_alpha_divergence_coef: 1.0,
            ..args(LossType::Sigmoid, 0.0)
        };
        let kl = args(LossType::Sigmoid, 0.0);
        assert_eq!(
            values(&pair_loss(&alpha_one, &lp)),
            values(&pair_loss(&kl, &lp))
        );
        let nca = LossArgs {
            f_divergence_type: FDivergence::ForwardKl,
            ..args(LossType::NcaPair, 0.0)
        };
        let e = nca.validate().unwrap_err().to_string();
        assert!(
            e.contains("--f-divergence-type other than reverse_kl"),
            "{e}"
        );
    }
}
