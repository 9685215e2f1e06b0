//! The InstructGPT ranking loss (Ouyang et al. 2022, §3.5): for a prompt whose K responses
//! are ranked best first, every one of the K·(K−1)/2 pairs contributes
//! `−log σ(r_better − r_worse − margin)`, and the element's loss is the mean over its
//! pairs. All pairs of a ranking live in one batch element, each response forwarded once.
//! With a centring coefficient c, each pair also adds `c·(r_better + r_worse)²`
//! (Eisenstein et al. 2023; TRL's `center_rewards_coefficient` for a pair).

use tch::{Kind, Tensor};

/// Per-batch results of [`ranking_loss`].
#[derive(Debug)]
pub struct RankingLoss {
    /// Σ over elements of each element's mean pair loss (divide by the number of elements
    /// in the whole accumulated batch for the mean).
    pub loss_sum: Tensor,
    pub pairs: usize,
    /// Pairs whose better response scored higher.
    pub correct: i64,
    /// Σ over pairs of `r_better − r_worse`.
    pub margin_sum: f64,
}

/// `(better, worse, weight)` index triples over the concatenated rewards of elements of
/// sizes `group_sizes`; the weight 1 / C(K, 2) makes each element's pairs average.
pub fn pairs(group_sizes: &[usize]) -> Vec<(usize, usize, f64, usize)> {
    let mut out = vec![];
    let mut start = 0;
    for (element, &k) in group_sizes.iter().enumerate() {
        let weight = 1.0 / (k * (k - 1) / 2) as f64;
        for i in 0..k {
            for j in i + 1..k {
                out.push((start + i, start + j, weight, element));
            }
        }
        start += k;
    }
    out
}

/// The ranking loss of rewards `[N]` (N = Σ group sizes, each group best first), with the
/// centring term weighted by `center` (0: none).
pub fn ranking_loss(
    rewards: &Tensor,
    group_sizes: &[usize],
    margins: &[f64],
    center: f64,
) -> RankingLoss {
    let device = rewards.device();
    let triples = pairs(group_sizes);
    let better: Vec<i64> = triples.iter().map(|t| t.0 as i64).collect();
    let worse: Vec<i64> = triples.iter().map(|t| t.1 as i64).collect();
    let weight: Vec<f32> = triples.iter().map(|t| t.2 as f32).collect();
    let margin: Vec<f32> = triples.iter().map(|t| margins[t.3] as f32).collect();
    let r = rewards.to_kind(Kind::Float);
    let (r_better, r_worse) = (
        r.index_select(0, &Tensor::from_slice(&better).to_device(device)),
        r.index_select(0, &Tensor::from_slice(&worse).to_device(device)),
    );
    let diff = &r_better - &r_worse;
    let z = &diff - Tensor::from_slice(&margin).to_device(device);
    let mut pair_loss = -z.log_sigmoid();
    if center > 0.0 {
        pair_loss += (r_better + r_worse).square() * center;
    }
    let loss_sum = (pair_loss * Tensor::from_slice(&weight).to_device(device)).sum(Kind::Float);
    let diff = diff.detach();
    RankingLoss {
        loss_sum,
        pairs: triples.len(),
        correct: diff.gt(0.0).sum(Kind::Int64).int64_value(&[]),
        margin_sum: diff.sum(Kind::Double).double_value(&[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_sigmoid(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    /// A K = 4 ranking: the element's loss is the plain mean of its 6 pairwise losses.
    #[test]
    fn k4_loss_is_the_mean_of_its_six_pairs() {
        let r = [1.5f64, 0.3, -0.2, 0.9];
        let rewards = Tensor::from_slice(&r.map(|x| x as f32));
        let out = ranking_loss(&rewards, &[4], &[0.25], 0.0);
        let mut expected = 0.0;
        let mut n = 0;
        for i in 0..4 {
            for j in i + 1..4 {
                expected += -log_sigmoid(r[i] - r[j] - 0.25);
                n += 1;
            }
        }
        assert_eq!(n, 6);
        assert_eq!(out.pairs, 6);
        let got = out.loss_sum.double_value(&[]);
        assert!(
            (got - expected / 6.0).abs() < 1e-6,
            "{got} vs {}",
            expected / 6.0
        );
        // ordered correctly: (0,1) (0,2) (0,3) (1,2); wrong: (1,3) (2,3)
        assert_eq!(out.correct, 4);
    }

    #[test]
    fn elements_of_different_sizes_weigh_the_same() {
        // a pair (K = 2) and a K = 3 ranking: loss_sum = loss(pair) + mean(3 pairs)
        let r = [0.5f64, -0.5, 2.0, 1.0, 0.0];
        let rewards = Tensor::from_slice(&r.map(|x| x as f32));
        let out = ranking_loss(&rewards, &[2, 3], &[0.0, 0.0], 0.0);
        let pair = -log_sigmoid(1.0);
        let k3 = (-log_sigmoid(1.0) - log_sigmoid(2.0) - log_sigmoid(1.0)) / 3.0;
        assert!((out.loss_sum.double_value(&[]) - (pair + k3)).abs() < 1e-6);
        assert_eq!(out.pairs, 4);
        assert!((out.margin_sum - (1.0 + 1.0 + 2.0 + 1.0)).abs() < 1e-6);
    }

    #[test]
    fn gradient_flows_to_every_response() {
        let rewards = Tensor::from_slice(&[0.1f32, 0.2, 0.3]).set_requires_grad(true);
        ranking_loss(&rewards, &[3], &[0.0], 0.0)
            .loss_sum
            .backward();
        let g: Vec<f32> = Vec::try_from(rewards.grad()).unwrap();
        assert!(g[0] < 0.0 && g[2] > 0.0, "{g:?}");
    }

    /// TRL's centring term, per pair and averaged like the pair losses: a pair (K = 2)
    /// adds c·(r_c + r_r)², a K = 3 ranking the mean over its pairs; its gradient pulls
    /// every reward towards zero.
    #[test]
    fn centring_adds_the_squared_pair_sums() {
        let r = [0.5f64, -0.25, 2.0, 1.0, 0.5];
        let rewards = Tensor::from_slice(&r.map(|x| x as f32)).set_requires_grad(true);
        let plain = ranking_loss(&rewards, &[2, 3], &[0.0, 0.0], 0.0);
        let centred = ranking_loss(&rewards, &[2, 3], &[0.0, 0.0], 0.01);
        let pair = (r[0] + r[1]).powi(2);
        let k3 = ((r[2] + r[3]).powi(2) + (r[2] + r[4]).powi(2) + (r[3] + r[4]).powi(2)) / 3.0;
        let added = centred.loss_sum.double_value(&[]) - plain.loss_sum.double_value(&[]);
        assert!((added - 0.01 * (pair + k3)).abs() < 1e-6, "{added}");
        (centred.loss_sum - plain.loss_sum).backward();
        let grad = Vec::<f32>::try_from(rewards.grad()).unwrap();
        // d/dr_0 of 0.01·(r_0 + r_1)² = 0.02·(r_0 + r_1)
        assert!(
            (f64::from(grad[0]) - 0.02 * (r[0] + r[1])).abs() < 1e-6,
            "{grad:?}"
        );
        assert!(grad[2..].iter().all(|&g| g > 0.0), "{grad:?}");
    }
}
