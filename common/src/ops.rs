//! Tensor helpers the stages share: per-token log-probs and entropy from logits, and
//! masked reductions. Masks are 0/1 tensors of the same shape as the values (any dtype).

use tch::{Kind, Tensor};

use crate::world::World;

/// Log-probability of `labels` under `logits` (`[.., V]` → `[..]`), in f32.
///
/// Computed as `logit[label] − logsumexp(logits)`, which never materialises a second
/// `[B, T, V]` tensor of log-probs (the gather touches one value per position).
pub fn logprobs_of(logits: &Tensor, labels: &Tensor) -> Tensor {
    let logits = logits.to_kind(Kind::Float);
    let picked = logits
        .gather(-1, &labels.unsqueeze(-1), false)
        .squeeze_dim(-1);
    picked - logits.logsumexp([-1].as_slice(), false)
}

/// Entropy of the categorical distribution given by `logits` (`[.., V]` → `[..]`), in f32.
pub fn entropy(logits: &Tensor) -> Tensor {
    let logits = logits.to_kind(Kind::Float);
    let lse = logits.logsumexp([-1].as_slice(), false);
    let expected_logit = (logits.softmax(-1, Kind::Float) * &logits).sum_dim_intlist(
        [-1].as_slice(),
        false,
        Kind::Float,
    );
    lse - expected_logit
}

/// The generalized JSD of Agarwal et al. (their Eq. 1, as TRL's `generalized_jsd_loss`
/// computes it) between the distributions of `student` and `teacher` logits `[N, V]`, per
/// position `[N]` (f32): with M = (1 − β)·student + β·teacher,
/// β·KL(teacher‖M) + (1 − β)·KL(student‖M); KL(teacher‖student) at β = 0 and
/// KL(student‖teacher) at β = 1.
pub fn generalized_jsd(student: &Tensor, teacher: &Tensor, beta: f64) -> Tensor {
    generalized_jsd_of_logprobs(
        &student.log_softmax(-1, Kind::Float),
        &teacher.log_softmax(-1, Kind::Float),
        beta,
    )
}

/// [`generalized_jsd`] of log-probabilities `[N, V]` as they are (TRL's
/// `generalized_jsd_loss` with `logits_are_probs`, given the logs of its probabilities:
/// nothing renormalises them).
pub fn generalized_jsd_of_logprobs(s: &Tensor, t: &Tensor, beta: f64) -> Tensor {
    // KL(p‖q) of log-probabilities, over the vocabulary.
    let kl = |p: &Tensor, q: &Tensor| {
        (p.exp() * (p - q)).sum_dim_intlist([-1].as_slice(), false, Kind::Float)
    };
    if beta == 0.0 {
        return kl(t, s);
    }
    if beta == 1.0 {
        return kl(s, t);
    }
    let mixture =
        Tensor::stack(&[s + (1.0 - beta).ln(), t + beta.ln()], 0).logsumexp([0].as_slice(), false);
    kl(t, &mixture) * beta + kl(s, &mixture) * (1.0 - beta)
}

/// [`generalized_jsd`] over the student's `k` likeliest tokens (TRL's SDFT/SDPO
/// `compute_topk_self_distillation_loss`): both distributions' log-probs there, then
/// either renormalised over the k tokens or (`add_tail`) given one more bucket with the
/// probability left outside them, log(1 − mass) with the mass capped just below 1.
pub fn topk_generalized_jsd(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    (k, beta): (i64, f64),
    add_tail: bool,
) -> Tensor {
    let k = k.min(*student_logits.size().last().expect("a vocabulary"));
    let lse = |t: &Tensor| t.logsumexp([-1].as_slice(), true);
    let (top, index) = student_logits.topk(k, -1, true, true);
    let student = top - lse(student_logits);
    let teacher = teacher_logits.gather(-1, &index, false) - lse(teacher_logits);
    let tail = |log_probs: Tensor| {
        let mass = log_probs.logsumexp([-1].as_slice(), true).clamp_max(-1e-7);
        let rest = (-mass.expm1()).log();
        Tensor::cat(&[log_probs, rest], -1)
    };
    match add_tail {
        // (generalized_jsd normalises its inputs: renormalised over the k tokens.)
        false => generalized_jsd(&student, &teacher, beta),
        true => generalized_jsd(&tail(student), &tail(teacher), beta),
    }
}

/// Sum of `values` where `mask` is 1.
pub fn masked_sum(values: &Tensor, mask: &Tensor) -> Tensor {
    (values * mask.to_kind(values.kind())).sum(values.kind())
}

/// Mean of `values` where `mask` is 1 (0 when the mask is empty).
pub fn masked_mean(values: &Tensor, mask: &Tensor) -> Tensor {
    let mask = mask.to_kind(values.kind());
    (values * &mask).sum(values.kind()) / mask.sum(values.kind()).clamp_min(1.0)
}

/// Each row's sum of `values` `[B, N]` where `mask` is 1, in `values`' dtype: `[B]`, or
/// `[B, 1]` with `keepdim`.
pub fn row_masked_sum(values: &Tensor, mask: &Tensor, keepdim: bool) -> Tensor {
    let kind = values.kind();
    (values * mask.to_kind(kind)).sum_dim_intlist([1].as_slice(), keepdim, kind)
}

/// Each row's mean of `values` `[B, N]` where `mask` is 1 (0 for a row without any), in
/// `values`' dtype: `[B]`, or `[B, 1]` with `keepdim`.
pub fn row_masked_mean(values: &Tensor, mask: &Tensor, keepdim: bool) -> Tensor {
    let kind = values.kind();
    let mask = mask.to_kind(kind);
    row_masked_sum(values, &mask, keepdim)
        / mask
            .sum_dim_intlist([1].as_slice(), keepdim, kind)
            .clamp_min(1.0)
}

/// Variance of `values` where `mask` is 1; Bessel-corrected, as TRL's `masked_var`.
pub fn masked_var(values: &Tensor, mask: &Tensor) -> Tensor {
    let mask_f = mask.to_kind(values.kind());
    let mean = masked_mean(values, mask);
    let centred = (values - mean).square();
    let n = mask_f.sum(values.kind());
    let var = (centred * &mask_f).sum(values.kind()) / n.clamp_min(1.0);
    // n / (n − 1); a single element has no spread to correct.
    var * &n / (&n - 1.0).clamp_min(1.0)
}

/// `(values − mean) / sqrt(var + 1e-8)` over the masked elements of every rank of `world`
/// (mean and Bessel-corrected variance as [`masked_mean`] and [`masked_var`] compute them);
/// with `shift_mean` false the mean is added back (TRL's `masked_whiten`). Masked-out
/// elements are returned as 0.
pub fn masked_whiten(values: &Tensor, mask: &Tensor, shift_mean: bool, world: &World) -> Tensor {
    let kind = values.kind();
    let mask_f = mask.to_kind(kind);
    let n = world.summed(&mask_f.sum(kind));
    let mean = world.summed(&(values * &mask_f).sum(kind)) / n.clamp_min(1.0);
    let centred = (values - &mean).square();
    let var = world.summed(&(centred * &mask_f).sum(kind)) / n.clamp_min(1.0);
    let var = var * &n / (&n - 1.0).clamp_min(1.0);
    let mut whitened = (values - &mean) * (var + 1e-8).rsqrt();
    if !shift_mean {
        whitened += mean;
    }
    whitened * mask.to_kind(values.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(v: &[&[f32]]) -> Tensor {
        Tensor::from_slice2(v)
    }

    fn softmax(x: &[f32]) -> Vec<f64> {
        let m = x.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
        let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|v| v / z).collect()
    }

    /// The generalized JSD against the definition written out over probabilities in
    /// between, and TRL's KL(teacher‖student) at β = 0 and KL(student‖teacher) at β = 1;
    /// 0 where the two agree.
    #[test]
    fn generalized_jsd_is_the_papers_divergence() {
        let s: [&[f32]; 2] = [&[1.0, 0.0, -1.0], &[0.3, 2.0, 0.1]];
        let t: [&[f32]; 2] = [&[0.0, 0.5, 0.2], &[0.3, 2.0, 0.1]];
        let kl =
            |p: &[f64], q: &[f64]| -> f64 { p.iter().zip(q).map(|(a, b)| a * (a / b).ln()).sum() };
        for beta in [0.0, 0.1, 0.5, 1.0] {
            let got = generalized_jsd(&logits(&s), &logits(&t), beta);
            let got = Vec::<f32>::try_from(got).unwrap();
            for i in 0..2 {
                let (p, q) = (softmax(s[i]), softmax(t[i]));
                let m: Vec<f64> = p
                    .iter()
                    .zip(&q)
                    .map(|(a, b)| (1.0 - beta) * a + beta * b)
                    .collect();
                // TRL's ends: the KLs themselves (the mixture's formula is 0 there).
                let want = match beta {
                    0.0 => kl(&q, &p),
                    1.0 => kl(&p, &q),
                    _ => beta * kl(&q, &m) + (1.0 - beta) * kl(&p, &m),
                };
                assert!(
                    (got[i] as f64 - want).abs() < 1e-6,
                    "β {beta} row {i}: {got:?} vs {want}"
                );
            }
            assert!(got[1].abs() < 1e-6, "identical distributions: {got:?}");
        }
    }

    fn close(a: &Tensor, b: &Tensor, tol: f64) -> bool {
        (a - b).abs().max().double_value(&[]) < tol
    }

    #[test]
    fn logprobs_match_log_softmax() {
        tch::manual_seed(0);
        let logits = Tensor::randn([2, 3, 7], (Kind::Float, tch::Device::Cpu));
        let labels = Tensor::from_slice(&[1i64, 6, 0, 3, 3, 2]).view([2, 3]);
        let ours = logprobs_of(&logits, &labels);
        let reference = logits
            .log_softmax(-1, Kind::Float)
            .gather(-1, &labels.unsqueeze(-1), false)
            .squeeze_dim(-1);
        assert!(close(&ours, &reference, 1e-6));
    }

    #[test]
    fn entropy_of_uniform_and_peaked() {
        let uniform = Tensor::zeros([1, 4], (Kind::Float, tch::Device::Cpu));
        assert!((entropy(&uniform).double_value(&[0]) - 4f64.ln()).abs() < 1e-6);
        let peaked = Tensor::from_slice(&[100f32, 0., 0., 0.]).view([1, 4]);
        assert!(entropy(&peaked).double_value(&[0]).abs() < 1e-6);
    }

    #[test]
    fn masked_stats_ignore_masked_values() {
        let v = Tensor::from_slice(&[1f32, 2., 3., 1000.]);
        let m = Tensor::from_slice(&[1f32, 1., 1., 0.]);
        assert!((masked_mean(&v, &m).double_value(&[]) - 2.0).abs() < 1e-6);
        // unbiased variance of [1, 2, 3] is 1
        assert!((masked_var(&v, &m).double_value(&[]) - 1.0).abs() < 1e-6);
        let world = World::single();
        let w = masked_whiten(&v, &m, true, &world);
        let expected = Tensor::from_slice(&[-1f32, 0., 1., 0.]);
        assert!(close(&w, &expected, 1e-4));
        // The same numbers as whitening with masked_mean and masked_var.
        let by_parts = (&v - masked_mean(&v, &m)) * (masked_var(&v, &m) + 1e-8).rsqrt() * &m;
        assert!(w.equal(&by_parts));
        let w = masked_whiten(&v, &m, false, &world);
        let expected = Tensor::from_slice(&[1f32, 2., 3., 0.]);
        assert!(close(&w, &expected, 1e-4));
        assert!((masked_sum(&v, &m).double_value(&[]) - 6.0).abs() < 1e-6);
    }
}
