//! KTO (Ethayarajh et al. 2024) and APO-zero's unpaired form, as TRL 1.16's `KTOTrainer`
//! defines them: the policy trained on unpaired feedback — a completion and whether it is
//! desirable — against the frozen reference, with no pairs.
//!
//! With ρ = log π(y|x) − log π_ref(y|x) (sums over the completion's tokens) and β:
//! - `kto`: 1 − σ(β(ρ − z)) for a desirable completion, 1 − σ(β(z − ρ)) otherwise, where
//!   z = max(0, mean over the batch of log π(y'|x) − log π_ref(y'|x)) is the KL estimate
//!   from mismatched completions y' (each completion scored after another row's prompt, see
//!   [`data::pairs::prepare_unpaired`]), with no gradient;
//! - `apo_zero_unpaired`: 1 − σ(βρ) for a desirable completion, σ(βρ) otherwise.
//!
//! Each loss is weighted by `--desirable-weight` or `--undesirable-weight`, and a step's
//! loss is the mean over its completions. The KL estimate is taken over a training step's
//! completions on every rank (TRL: over each device's batch, the same with one process and
//! `--grad-accum 1`), and over each `--batch-size` batch in `dpo eval` (as TRL evaluates).
//! An unpaired completion is a [`TokenizedPair`] whose `chosen` is the completion and
//! whose `rejected` is its mismatched completion.

use common::trainee::micro_batches;
use common::{Model, Trainee, World};
use data::pairs::{collate_side, TokenizedPair};
use tch::{Device, Kind, Tensor};

use crate::loss::{LossArgs, LossType};
use crate::{score, Reference};

/// The per-completion losses `[B]`, weighted: `logps` and `ref_logps` the completions'
/// sequence log-probs, `desirable` their labels, `kl` the batch's KL estimate.
pub fn unpaired_loss(
    args: &LossArgs,
    kl: f64,
    (logps, ref_logps): (&Tensor, &Tensor),
    desirable: &Tensor,
) -> Tensor {
    let x = (logps - ref_logps) * args.beta;
    let (good, bad) = match args.unpaired() {
        Some(LossType::Kto) => (
            -((&x - kl * args.beta).sigmoid()) + 1.0,
            -((-&x + kl * args.beta).sigmoid()) + 1.0,
        ),
        Some(LossType::ApoZeroUnpaired) => (-x.sigmoid() + 1.0, x.sigmoid()),
        other => unreachable!("not an unpaired loss: {other:?}"),
    };
    (good * args.desirable_weight).where_self(desirable, &(bad * args.undesirable_weight))
}

/// Sums over completions that give the logged metrics (TRL's `KTOTrainer` names); add
/// them over micro-batches and ranks, then read [`KtoStats::named`].
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct KtoStats {
    pub completions: f64,
    pub loss_sum: f64,
    /// Desirable, then undesirable: counts, Σ β·ρ, Σ log π, Σ over completion tokens of
    /// the mean logit, and those tokens.
    pub count: [f64; 2],
    pub rewards: [f64; 2],
    pub logps: [f64; 2],
    pub logits: [f64; 2],
    pub tokens: [f64; 2],
    /// Σ of the KL estimates used, over the batches counted in `batches`.
    pub kl_sum: f64,
    pub batches: f64,
    /// Σ over every completion token of the policy's next-token entropy (TRL's `entropy`).
    pub entropy_sum: f64,
}

impl KtoStats {
    pub fn add(&mut self, o: &KtoStats) {
        self.completions += o.completions;
        self.loss_sum += o.loss_sum;
        for i in 0..2 {
            self.count[i] += o.count[i];
            self.rewards[i] += o.rewards[i];
            self.logps[i] += o.logps[i];
            self.logits[i] += o.logits[i];
            self.tokens[i] += o.tokens[i];
        }
        self.kl_sum += o.kl_sum;
        self.batches += o.batches;
        self.entropy_sum += o.entropy_sum;
    }

    /// The same sums over every rank (the KL estimate, already global, is kept).
    pub fn summed(&self, world: &World) -> KtoStats {
        let [completions, loss_sum, c0, c1, r0, r1, l0, l1, g0, g1, t0, t1, entropy_sum] = world
            .sums([
                self.completions,
                self.loss_sum,
                self.count[0],
                self.count[1],
                self.rewards[0],
                self.rewards[1],
                self.logps[0],
                self.logps[1],
                self.logits[0],
                self.logits[1],
                self.tokens[0],
                self.tokens[1],
                self.entropy_sum,
            ]);
        KtoStats {
            completions,
            loss_sum,
            count: [c0, c1],
            rewards: [r0, r1],
            logps: [l0, l1],
            logits: [g0, g1],
            tokens: [t0, t1],
            entropy_sum,
            ..*self
        }
    }

    /// The mean loss over the completions.
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.completions.max(1.0)
    }

    /// `(name, value)` with TRL's names: `loss`, `kl`, `entropy`, and for each side that has
    /// completions `rewards/chosen` (desirable) or `/rejected`, `logps/…`, `logits/…`;
    /// `rewards/margins` when both have.
    pub fn named(&self) -> Vec<(&'static str, f64)> {
        let mut out = vec![
            ("loss", self.loss()),
            ("kl", self.kl_sum / self.batches.max(1.0)),
            (
                "entropy",
                self.entropy_sum / (self.tokens[0] + self.tokens[1]).max(1.0),
            ),
        ];
        let names = [
            ("rewards/chosen", "logps/chosen", "logits/chosen"),
            ("rewards/rejected", "logps/rejected", "logits/rejected"),
        ];
        for (i, (reward, logps, logits)) in names.into_iter().enumerate() {
            if self.count[i] > 0.0 {
                out.push((reward, self.rewards[i] / self.count[i]));
                out.push((logps, self.logps[i] / self.count[i]));
                out.push((logits, self.logits[i] / self.tokens[i].max(1.0)));
            }
        }
        if self.count[0] > 0.0 && self.count[1] > 0.0 {
            let margin = self.rewards[0] / self.count[0] - self.rewards[1] / self.count[1];
            out.push(("rewards/margins", margin));
        }
        out
    }
}

/// One completion's numbers, for `dpo eval`'s rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnpairedResult {
    pub logps: f64,
    pub ref_logps: f64,
    pub loss: f64,
}

/// The KL estimate z over `items` on every rank of `world`: max(0, the mean over their
/// mismatched completions of log π − log π_ref), without gradient; 0 for
/// `apo_zero_unpaired`, which has none. Every rank calls it.
pub fn kl_estimate(
    policy: &Model,
    reference: &Reference,
    items: &[(usize, &TokenizedPair)],
    (batch_size, pad_id): (usize, i64),
    (args, world): (&LossArgs, &World),
) -> f64 {
    if args.unpaired() != Some(LossType::Kto) {
        return 0.0;
    }
    let _guard = tch::no_grad_guard();
    let mut sum = 0.0;
    for (micro, _) in micro_batches(items, batch_size) {
        let (indices, pairs): (Vec<usize>, Vec<&TokenizedPair>) = micro.iter().copied().unzip();
        let batch = collate_side(&pairs, true, pad_id, policy.device());
        let logps = score(policy, &batch, (false, false), None).logps;
        let ref_logps = reference.side_logps(policy, &batch, &indices, true);
        sum += (logps - ref_logps).sum(Kind::Double).double_value(&[]);
    }
    let [sum, n] = world.sums([sum, items.len() as f64]);
    (sum / n.max(1.0)).max(0.0)
}

/// Forward (policy and reference), loss and metrics over the completions of `items` (with
/// their indices into `labels`) in micro-batches of `batch_size`, with the KL estimate
/// `kl`; with `backward` (the step's completions on every rank, and the trainee whose model
/// `policy` is), each micro-batch's share of the step's mean loss is backpropagated.
pub fn run_unpaired(
    policy: &Model,
    reference: &Reference,
    (items, labels): (&[(usize, &TokenizedPair)], &[bool]),
    (batch_size, pad_id): (usize, i64),
    (args, kl): (&LossArgs, f64),
    backward: Option<(f64, &Trainee)>,
) -> (KtoStats, Vec<UnpairedResult>) {
    let mut stats = KtoStats {
        kl_sum: kl,
        batches: 1.0,
        ..KtoStats::default()
    };
    let mut results = Vec::with_capacity(items.len());
    if let Some((_, trainee)) = backward {
        trainee.set_micro_batches(items.len(), batch_size);
    }
    for (micro, last) in micro_batches(items, batch_size) {
        let (indices, pairs): (Vec<usize>, Vec<&TokenizedPair>) = micro.iter().copied().unzip();
        let batch = collate_side(&pairs, false, pad_id, policy.device());
        let ref_logps = reference.side_logps(policy, &batch, &indices, false);
        let _guard = backward.is_none().then(tch::no_grad_guard);
        let scored = score(policy, &batch, (true, false), None);
        let flags: Vec<bool> = indices.iter().map(|&i| labels[i]).collect();
        let desirable = Tensor::from_slice(&flags).to_device(policy.device());
        let losses = unpaired_loss(args, kl, (&scored.logps, &ref_logps), &desirable);
        if let Some((completions, trainee)) = backward {
            trainee.backward(&(losses.sum(Kind::Float) / completions.max(1.0)), last);
        }
        let cpu = |x: &Tensor| {
            Vec::<f64>::try_from(x.detach().to_kind(Kind::Double).to_device(Device::Cpu))
                .expect("f64")
        };
        let (lp, rl, l) = (cpu(&scored.logps), cpu(&ref_logps), cpu(&losses));
        let logits = cpu(scored.logit_sums.as_ref().expect("asked for"));
        stats.entropy_sum += cpu(scored.entropy_sums.as_ref().expect("asked for"))
            .iter()
            .sum::<f64>();
        let tokens = cpu(&scored.tokens);
        for (k, &good) in flags.iter().enumerate() {
            let side = usize::from(!good);
            stats.completions += 1.0;
            stats.loss_sum += l[k];
            stats.count[side] += 1.0;
            stats.rewards[side] += args.beta * (lp[k] - rl[k]);
            stats.logps[side] += lp[k];
            stats.logits[side] += logits[k];
            stats.tokens[side] += tokens[k];
            results.push(UnpairedResult {
                logps: lp[k],
                ref_logps: rl[k],
                loss: l[k],
            });
        }
    }
    (stats, results)
}

/// `dpo eval` and `--eval-data` of an unpaired loss: each `--batch-size` batch with its own
/// KL estimate, as TRL evaluates; the stats (`kl` their mean) and each completion's
/// numbers.
pub fn evaluate(
    policy: &Model,
    reference: &Reference,
    (items, labels): (&[(usize, &TokenizedPair)], &[bool]),
    shape: (usize, i64),
    args: &LossArgs,
) -> (KtoStats, Vec<UnpairedResult>) {
    let (mut stats, mut results) = (KtoStats::default(), vec![]);
    let alone = World::single();
    for chunk in items.chunks(shape.0.max(1)) {
        let kl = kl_estimate(policy, reference, chunk, shape, (args, &alone));
        let (s, r) = run_unpaired(policy, reference, (chunk, labels), shape, (args, kl), None);
        stats.add(&s);
        results.extend(r);
    }
    (stats, results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::FDivergence;

    fn args(loss_type: LossType) -> LossArgs {
        LossArgs {
            beta: 0.5,
            loss_type: vec![loss_type],
            loss_weights: vec![],
            use_weighting: false,
            label_smoothing: 0.0,
            discopop_tau: 0.05,
            f_divergence_type: FDivergence::ReverseKl,
            f_alpha_divergence_coef: 0.5,
            ld_alpha: None,
            rpo_alpha: 0.0,
            tpo_alpha: 0.0,
            reference_free: false,
            simpo_gamma: 0.5,
            alpha: 0.0,
            desirable_weight: 1.5,
            undesirable_weight: 0.5,
        }
    }

    /// Each unpaired loss against TRL's formula written out, with the side weights.
    #[test]
    fn unpaired_losses_match_their_formulas() {
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        let lp = Tensor::from_slice(&[-3.0f32, -5.0, -2.0]);
        let rl = Tensor::from_slice(&[-3.5f32, -4.0, -2.0]);
        let desirable = Tensor::from_slice(&[true, false, false]);
        let rho = [0.5, -1.0, 0.0];
        let (beta, kl) = (0.5, 0.3);
        let got = |t: LossType| {
            let l = unpaired_loss(&args(t), kl, (&lp, &rl), &desirable);
            Vec::<f64>::try_from(l.to_kind(Kind::Double)).unwrap()
        };
        let kto = got(LossType::Kto);
        let want = [
            1.5 * (1.0 - sigmoid(beta * (rho[0] - kl))),
            0.5 * (1.0 - sigmoid(beta * (kl - rho[1]))),
            0.5 * (1.0 - sigmoid(beta * (kl - rho[2]))),
        ];
        for i in 0..3 {
            assert!(
                (kto[i] - want[i]).abs() < 1e-6,
                "kto {i}: {kto:?} vs {want:?}"
            );
        }
        let apo = got(LossType::ApoZeroUnpaired);
        let want = [
            1.5 * (1.0 - sigmoid(beta * rho[0])),
            0.5 * sigmoid(beta * rho[1]),
            0.5 * sigmoid(beta * rho[2]),
        ];
        for i in 0..3 {
            assert!(
                (apo[i] - want[i]).abs() < 1e-6,
                "apo {i}: {apo:?} vs {want:?}"
            );
        }
    }

    /// The unpaired losses stand alone, as in TRL's KTOTrainer.
    #[test]
    fn unpaired_losses_refuse_pair_options() {
        let list = LossArgs {
            loss_type: vec![LossType::Kto, LossType::Sigmoid],
            ..args(LossType::Kto)
        };
        let e = list.validate().unwrap_err().to_string();
        assert!(e.contains("stand alone"), "{e}");
        let rpo = LossArgs {
            rpo_alpha: 0.5,
            ..args(LossType::Kto)
        };
        assert!(rpo.validate().is_err());
        let zero = LossArgs {
            undesirable_weight: 0.0,
            ..args(LossType::Kto)
        };
        let e = zero.validate().unwrap_err().to_string();
        assert!(e.contains("--undesirable-weight must be > 0"), "{e}");
        args(LossType::Kto).validate().unwrap();
    }
}
