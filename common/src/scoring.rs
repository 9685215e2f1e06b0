//! How a scalar-head (reward or value) model's output is read, and the reward
//! normalisation stored with a reward model.
//!
//! The rule: the reward of a sequence is the score at its last real token (the last
//! position where the attention mask is 1; right or left padding). Sequences are scored as
//! they are, with no EOS appended, so the last real token is never the pad id and
//! `transformers`' `*ForSequenceClassification` (which reads the last token that is not
//! `pad_token_id`) reads the same position — also where pad and EOS share one id.

use data::preference::pad_right;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::models::{Head, Model};

/// `config.json` keys of the normalisation: `normalised = raw + bias`.
pub const BIAS_KEY: &str = "rlhf_reward_bias";
/// The raw rewards' standard deviation over the normalisation set (informational; PPO
/// can whiten with it).
pub const STD_KEY: &str = "rlhf_reward_std";

/// Index of the last real token of each row of a `[B, T]` 0/1 mask.
pub fn last_real_index(mask: &Tensor) -> Tensor {
    let t = mask.size()[1];
    let positions = Tensor::arange(t, (Kind::Int64, mask.device())).unsqueeze(0);
    (positions * mask.to_kind(Kind::Int64)).argmax(1, false)
}

/// Raw score of each row at its last real token, `[B]` f32.
pub fn last_token_scores(model: &Model, ids: &Tensor, mask: &Tensor) -> Tensor {
    assert_eq!(model.head, Head::Score, "scores need a scalar head");
    let scores = model.forward(ids, mask);
    scores
        .gather(1, &last_real_index(mask).unsqueeze(1), false)
        .squeeze_dim(1)
        .to_kind(Kind::Float)
}

/// Raw rewards of `sequences` (token ids, unpadded) under a scalar-head `model`, read at
/// each sequence's last token, in batches of `batch_size`.
pub fn score_sequences(
    model: &Model,
    sequences: &[Vec<i64>],
    batch_size: usize,
    pad_id: i64,
) -> Vec<f64> {
    let _guard = tch::no_grad_guard();
    let mut out = Vec::with_capacity(sequences.len());
    for chunk in sequences.chunks(batch_size.max(1)) {
        let refs: Vec<&[i64]> = chunk.iter().map(Vec::as_slice).collect();
        let (ids, mask) = pad_right(&refs, pad_id, model.device());
        let scores = last_token_scores(model, &ids, &mask).to_device(Device::Cpu);
        out.extend(
            Vec::<f32>::try_from(scores)
                .expect("f32 scores")
                .into_iter()
                .map(f64::from),
        );
    }
    out
}

/// The normalisation stored in a reward model's config (bias 0 when absent).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalization {
    pub bias: f64,
    pub std: Option<f64>,
}

impl Normalization {
    pub fn of(model: &Model) -> Self {
        let raw = &model.config.raw;
        Normalization {
            bias: raw.get(BIAS_KEY).and_then(Value::as_f64).unwrap_or(0.0),
            std: raw.get(STD_KEY).and_then(Value::as_f64),
        }
    }

    /// Makes `raw` rewards of the normalisation set average 0.
    pub fn from_rewards(raw: &[f64]) -> Self {
        let n = raw.len().max(1) as f64;
        let mean = raw.iter().sum::<f64>() / n;
        let var = raw.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
        Normalization {
            bias: -mean,
            std: Some(var.sqrt()),
        }
    }

    /// Stores it in the model's config (written with the model).
    pub fn store(&self, model: &mut Model) {
        model
            .config
            .raw
            .insert(BIAS_KEY.into(), Value::from(self.bias));
        if let Some(std) = self.std {
            model.config.raw.insert(STD_KEY.into(), Value::from(std));
        }
    }

    pub fn apply(&self, raw: f64) -> f64 {
        raw + self.bias
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_real_index_for_both_paddings() {
        let mask = Tensor::from_slice2(&[[1i64, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]]);
        assert_eq!(
            Vec::<i64>::try_from(last_real_index(&mask)).unwrap(),
            [2, 3, 0]
        );
    }

    #[test]
    fn normalisation_centres_the_set() {
        let n = Normalization::from_rewards(&[1.0, 2.0, 6.0]);
        assert_eq!(n.bias, -3.0);
        let centred: f64 = [1.0, 2.0, 6.0].iter().map(|&r| n.apply(r)).sum();
        assert!(centred.abs() < 1e-12);
    }
}
