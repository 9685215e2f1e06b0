//! Knowledge distillation in `sft train --teacher-model DIR`: TRL's `GKDTrainer`
//! (Agarwal et al. 2024, "On-policy distillation of language models: learning from
//! self-generated mistakes").
//!
//! The per-token loss is the generalized Jensen–Shannon divergence between the student's
//! and the teacher's next-token distributions at every completion token, summed over the
//! vocabulary ([`common::ops::generalized_jsd`]); a step's loss is its mean over the
//! step's completion tokens, as the NLL's is. Which completions: with probability λ
//! (`--lmbda`, drawn once per step from the run's seed) the student's own samples of each
//! row's prompt (on-policy); otherwise the data's completions, or with `--seq-kd` the
//! teacher's samples (sequence-level KD).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use common::generate::{generate_rows, SamplingConfig};
use common::rng::derived_seed;
use common::{Head, Model, ModelOptions};
use data::prompts::collate_left;
use data::sft::{SftBatch, TokenizedSft};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tch::{Kind, Tensor};

use crate::eval::batch_hidden;

/// The distillation options of `sft train`, under TRL's `GKDConfig` names.
#[derive(Debug, Clone, Args, Serialize)]
pub struct DistillArgs {
    /// A teacher: the loss becomes the generalized JSD between the student's and the
    /// teacher's next-token distributions on the completion tokens (TRL's GKDTrainer). It
    /// must share the student's tokenizer.
    #[arg(long)]
    pub teacher_model: Option<PathBuf>,
    /// β of the generalized JSD, in [0, 1]: 0 is KL(teacher‖student) (forward KL, word-level
    /// KD), 1 is KL(student‖teacher) (reverse KL); TRL's default 0.5.
    #[arg(long, default_value_t = 0.5, requires = "teacher_model")]
    pub beta: f64,
    /// λ, in [0, 1]: the share of steps trained on the student's own samples of the rows'
    /// prompts instead of the data's completions (TRL's `lmbda`, default 0.5; 0 is
    /// supervised KD on the data, 1 fully on-policy).
    #[arg(long, default_value_t = 0.5, requires = "teacher_model")]
    pub lmbda: f64,
    /// Sequence-level KD: the steps that are not on-policy train on the teacher's samples
    /// of the prompts instead of the data's completions (TRL's `seq_kd`).
    #[arg(long, requires = "teacher_model")]
    pub seq_kd: bool,
    /// Sampling temperature of the student's and the teacher's samples (TRL's 0.9).
    #[arg(long, default_value_t = 0.9, requires = "teacher_model")]
    pub temperature: f64,
    /// Longest sample, in tokens (TRL's `max_new_tokens`).
    #[arg(long, default_value_t = 128, requires = "teacher_model")]
    pub max_new_tokens: usize,
}

impl DistillArgs {
    pub fn validate(&self) -> Result<()> {
        common::cli::require(&[
            ((0.0..=1.0).contains(&self.beta), "--beta must be in [0, 1]"),
            (
                (0.0..=1.0).contains(&self.lmbda),
                "--lmbda must be in [0, 1]",
            ),
            (
                self.temperature > 0.0 && self.temperature.is_finite(),
                "--temperature must be > 0",
            ),
            (
                self.max_new_tokens > 0,
                "--max-new-tokens must be at least 1",
            ),
        ])?;
        Ok(())
    }

    /// Whether any step samples (on-policy, or the teacher's sequences).
    pub fn samples(&self) -> bool {
        self.lmbda > 0.0 || self.seq_kd
    }
}

/// The per-token generalized JSD `[B, T − 1]` of `batch` (0 off the completion tokens):
/// only completion positions reach the two heads, chunk by chunk (see
/// [`Model::distill_outputs`]), the student's with its gradient.
pub fn token_jsd(student: &Model, teacher: &Model, batch: &SftBatch, beta: f64) -> Tensor {
    let t = batch.input_ids.size()[1];
    let rows = |m: &Model| {
        let h = batch_hidden(m, batch);
        let size = h.size();
        h.reshape([-1, size[2]])
    };
    let mask = batch.loss_mask.narrow(1, 1, t - 1).to_kind(Kind::Float);
    let at = mask.reshape([-1]).nonzero().squeeze_dim(1);
    let student_h = rows(student).index_select(0, &at);
    let teacher_h = tch::no_grad(|| rows(teacher).index_select(0, &at));
    let jsd = student.distill_outputs(&student_h, teacher, &teacher_h, beta);
    Tensor::zeros_like(&mask)
        .reshape([-1])
        .index_put(&[Some(at)], &jsd, false)
        .reshape(mask.size())
}

/// The teacher: a frozen model on the student's device that shares its vocabulary.
pub fn load_teacher(dir: &std::path::Path, student: &Model) -> Result<Model> {
    let opts = ModelOptions::new(Head::Lm, student.device(), student.kind()).frozen();
    let teacher = Model::load(dir, &opts)
        .with_context(|| format!("loading --teacher-model {}", dir.display()))?
        .0;
    let (a, b) = (teacher.config.vocab_size(), student.config.vocab_size());
    if a != b {
        bail!(
            "--teacher-model {}: its vocabulary has {a} tokens, the student's {b}; the teacher must share the student's tokenizer",
            dir.display()
        );
    }
    Ok(teacher)
}

/// Where a step's completions come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completions {
    /// The data's.
    Data,
    /// The student's samples (on-policy).
    Student,
    /// The teacher's samples (`--seq-kd`).
    Teacher,
}

impl Completions {
    /// Step `step`'s draw: on-policy with probability λ, from a stream of the run's seed.
    pub fn of_step(args: &DistillArgs, seed: u64, step: u64) -> Completions {
        let mut rng = rand::rngs::StdRng::seed_from_u64(derived_seed(seed, step, 1));
        if rng.random::<f64>() < args.lmbda {
            Completions::Student
        } else if args.seq_kd {
            Completions::Teacher
        } else {
            Completions::Data
        }
    }
}

/// Where a row's last completion span starts: its prompt is what comes before (for a
/// conversation, every turn before the last assistant turn, as TRL's GKD collator splits
/// it). `None` for a row with no completion token.
pub fn prompt_length(row: &TokenizedSft) -> Option<usize> {
    let last = row.loss_mask.iter().rposition(|&m| m == 1)?;
    let start = row.loss_mask[..=last]
        .iter()
        .rposition(|&m| m == 0)
        .map_or(0, |i| i + 1);
    Some(start)
}

/// `rows` with their completions replaced by `sampler`'s samples of their prompts (the
/// prompt cut to its last `room` tokens where it is longer), `batch_size` rows at a time:
/// the prompt's tokens are not in the loss, the sample's are (its EOS included). The rows
/// are `offset..` of the step's `total` (a rank's share): each samples with the numbers it
/// has in the whole step, so the ranks together sample what one process samples.
pub fn sampled_rows(
    sampler: &Model,
    rows: &[&TokenizedSft],
    (batch_size, pad_id, eos_ids): (usize, i64, &[i64]),
    args: &DistillArgs,
    (room, seed): (usize, u64),
    (offset, total): (usize, usize),
) -> Vec<TokenizedSft> {
    if rows.is_empty() {
        return vec![];
    }
    let _guard = tch::no_grad_guard();
    let prompts: Vec<&[i64]> = rows
        .iter()
        .map(|r| {
            let p = &r.ids[..prompt_length(r).unwrap_or(r.ids.len())];
            &p[p.len().saturating_sub(room)..]
        })
        .collect();
    let batch = collate_left(&prompts, pad_id, sampler.device());
    let cfg = SamplingConfig {
        max_new_tokens: args.max_new_tokens as i64,
        temperature: args.temperature,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repetition_penalty: 1.0,
        eos_ids: eos_ids.to_vec(),
        pad_id,
        seed,
        cuda_graph: true,
    };
    let g = generate_rows(
        sampler,
        &batch.input_ids,
        &batch.attention_mask,
        &cfg,
        batch_size,
        (offset as i64, total as i64),
    );
    let tokens =
        Vec::<Vec<i64>>::try_from(g.tokens.to_device(tch::Device::Cpu)).expect("sampled token ids");
    (prompts.iter().zip(tokens).zip(&g.lengths))
        .map(|((prompt, sample), &len)| {
            let sample = &sample[..len as usize];
            let ids = [*prompt, sample].concat();
            let mask = [vec![0; prompt.len()], vec![1; sample.len()]].concat();
            TokenizedSft::new(ids, mask)
        })
        .collect()
}

/// The seed of step `step`'s samples.
pub fn sample_seed(seed: u64, step: u64) -> u64 {
    derived_seed(seed, step, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row's prompt is what precedes its last completion span.
    #[test]
    fn the_prompt_ends_where_the_last_completion_span_starts() {
        let row = |mask: &[i64]| TokenizedSft::new(vec![7; mask.len()], mask.to_vec());
        assert_eq!(prompt_length(&row(&[0, 0, 1, 1])), Some(2));
        assert_eq!(prompt_length(&row(&[0, 1, 1, 0, 0, 1, 1, 0])), Some(5));
        assert_eq!(prompt_length(&row(&[1, 1])), Some(0));
        assert_eq!(prompt_length(&row(&[0, 0])), None);
    }

    /// λ's draw: never on-policy at 0, always at 1, about λ of the steps between; the
    /// others are the teacher's with --seq-kd.
    #[test]
    fn steps_are_on_policy_with_probability_lambda() {
        let args = |lmbda: f64, seq_kd: bool| DistillArgs {
            teacher_model: None,
            beta: 0.5,
            lmbda,
            seq_kd,
            temperature: 0.9,
            max_new_tokens: 8,
        };
        let count = |a: &DistillArgs, c: Completions| {
            (0..1000)
                .filter(|&s| Completions::of_step(a, 3, s) == c)
                .count()
        };
        assert_eq!(count(&args(0.0, false), Completions::Data), 1000);
        assert_eq!(count(&args(1.0, true), Completions::Student), 1000);
        let half = count(&args(0.5, true), Completions::Student);
        assert!((430..570).contains(&half), "{half}");
        assert_eq!(count(&args(0.5, true), Completions::Teacher), 1000 - half);
    }
}
