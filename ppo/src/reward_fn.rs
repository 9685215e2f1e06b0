//! Where PPO's scores come from: any [`RewardFunction`] — the learned reward model, or a
//! rule over the text (tests, programmatic judges).

use anyhow::Result;
use common::scoring::{score_sequences, Normalization};
use common::Model;

/// One rollout batch as the reward sees it.
pub struct RewardInput<'a> {
    /// Prompt token ids, unpadded.
    pub prompts: &'a [Vec<i64>],
    /// Response token ids, unpadded, without the EOS that ended them.
    pub responses: &'a [Vec<i64>],
    /// The responses decoded (special tokens skipped).
    pub texts: &'a [String],
}

pub trait RewardFunction {
    /// One score per response.
    fn scores(&self, input: &RewardInput) -> Result<Vec<f64>>;
}

/// A reward model from `reward train`, with its normalisation applied. Each sequence is
/// scored as the reward model was trained: prompt + response, no EOS, at the last token.
pub struct RewardModel<'a> {
    pub model: &'a Model,
    pub normalization: Normalization,
    pub pad_id: i64,
    pub batch_size: usize,
    /// Score with the model's adapters switched off: with LoRA, the critic's base (and
    /// its original head) is the reward model, so one copy of it serves both.
    pub without_adapters: bool,
}

impl RewardFunction for RewardModel<'_> {
    fn scores(&self, input: &RewardInput) -> Result<Vec<f64>> {
        let sequences: Vec<Vec<i64>> = input
            .prompts
            .iter()
            .zip(input.responses)
            .map(|(p, r)| [p.as_slice(), r.as_slice()].concat())
            .collect();
        let score = || score_sequences(self.model, &sequences, self.batch_size, self.pad_id);
        let raw = if self.without_adapters {
            common::models::adapter::without_adapters(score)
        } else {
            score()
        };
        Ok(raw
            .into_iter()
            .map(|r| self.normalization.apply(r))
            .collect())
    }
}

/// A reward computed from the decoded text alone.
pub struct TextRule<F: Fn(&str) -> f64>(pub F);

impl<F: Fn(&str) -> f64> RewardFunction for TextRule<F> {
    fn scores(&self, input: &RewardInput) -> Result<Vec<f64>> {
        Ok(input.texts.iter().map(|t| (self.0)(t)).collect())
    }
}
