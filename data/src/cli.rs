//! Data options shared by the supervised stages (`sft train`, `reward train`), flattened
//! into their arguments.

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use crate::sft::Truncation;

#[derive(Debug, Clone, Args, Serialize)]
pub struct TrainDataArgs {
    /// Training rows, JSON Lines.
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out rows in the same format, for the eval/ metrics.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Evaluate every N steps (and at the end); 0 evaluates only at the end.
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Longest sequence in tokens; longer rows follow --truncation.
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// truncate or drop rows over --max-length (SFT cuts the completion's end; the reward
    /// model keeps the end and cuts the prompt's start).
    #[arg(long, default_value = "truncate")]
    pub truncation: Truncation,
    /// Batch rows of similar length together (less padding, faster steps when lengths
    /// vary), as transformers' `group_by_length`; batches are still shuffled.
    #[arg(long)]
    pub group_by_length: bool,
}

impl TrainDataArgs {
    pub fn validate(&self) -> Result<(), String> {
        let checks = [
            (self.batch_size > 0, "--batch-size must be at least 1"),
            (self.grad_accum > 0, "--grad-accum must be at least 1"),
            (self.max_length > 1, "--max-length must be at least 2"),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, message)) => Err(message.to_string()),
            None => Ok(()),
        }
    }

    /// The training order over rows of these `lengths` (in tokens): shuffled, and grouped
    /// by length with `--group-by-length`.
    pub fn sampler(&self, lengths: Vec<usize>, seed: u64) -> common::sampler::Sampler {
        if self.group_by_length {
            common::sampler::Sampler::grouped_by_length(lengths, self.batch_size, seed)
        } else {
            common::sampler::Sampler::new(lengths.len(), seed, true)
        }
    }

    /// Rows per optimiser step.
    pub fn rows_per_step(&self) -> usize {
        self.batch_size * self.grad_accum
    }

    /// Total steps for `rows` rows: `max_steps`, else `epochs` passes.
    pub fn total_steps(&self, rows: usize, epochs: u64, max_steps: Option<u64>) -> u64 {
        max_steps.unwrap_or(epochs * rows.div_ceil(self.rows_per_step()) as u64)
    }

    /// Whether to evaluate after `step` (always at the end).
    pub fn eval_due(&self, step: u64, last: bool) -> bool {
        last || (self.eval_every > 0 && step % self.eval_every == 0)
    }
}
