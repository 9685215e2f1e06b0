//! A*-PO's first stage (Brantley et al. 2025, TRL's experimental `A2POTrainer`): before
//! training, `--num-value-samples` responses of the starting policy to every training
//! prompt are rewarded, and each prompt's optimal value `V*` is estimated from them
//! ([`crate::math::optimal_value`]). The run keeps them in `OUT/optimal_values.json`, which
//! `--resume` reads back instead of sampling again (the policy has moved by then), and
//! prompts whose responses all scored 0 teach nothing and are left out of training
//! (`--filter-all-incorrect`, TRL's default).
//!
//! The sampling itself is the run's (`train.rs`); what is here is what it keeps and how it
//! is read.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::args::TrainArgs;
use crate::math::optimal_value;

/// Where the run keeps its first stage.
pub const OPTIMAL_VALUES: &str = "optimal_values.json";

/// Every training prompt's rewards from the starting policy and its `V*`, in the order of
/// `--prompts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimalValues {
    pub beta1: f64,
    pub num_value_samples: usize,
    /// `[prompt][sample]`.
    pub rewards: Vec<Vec<f64>>,
    /// `[prompt]`.
    pub v_star: Vec<f64>,
    /// The prompts whose rewards sum to 0 (TRL's `rewards[j].sum() == 0`: for 0/1 rewards,
    /// none correct).
    pub all_incorrect: Vec<usize>,
}

impl OptimalValues {
    /// `V*` of each prompt from its rewards (`[prompt][sample]`).
    pub fn from_rewards(rewards: Vec<Vec<f64>>, beta1: f64) -> Self {
        let v_star = rewards.iter().map(|r| optimal_value(r, beta1)).collect();
        let all_incorrect = (0..rewards.len())
            .filter(|&p| rewards[p].iter().sum::<f64>() == 0.0)
            .collect();
        OptimalValues {
            beta1,
            num_value_samples: rewards.first().map_or(0, Vec::len),
            rewards,
            v_star,
            all_incorrect,
        }
    }

    /// The prompts training samples from: all of them, or with `--filter-all-incorrect` those
    /// whose responses did not all score 0.
    pub fn kept(&self, filter_all_incorrect: bool) -> Vec<usize> {
        (0..self.v_star.len())
            .filter(|p| !filter_all_incorrect || self.all_incorrect.binary_search(p).is_err())
            .collect()
    }

    /// The run's stored first stage, when `--resume` finds one: checked against the run's
    /// `prompts` and options. A resumed run with a checkpoint but no stored values stops:
    /// its policy has moved and cannot sample them again.
    pub fn stored(args: &TrainArgs, prompts: usize) -> Result<Option<Self>> {
        let path = path(args);
        if !args.run.resume {
            return Ok(None);
        }
        if !path.exists() {
            let checkpointed = common::run_dir::RunDir::at(&args.run.output_dir)
                .latest_checkpoint()
                .is_some();
            if checkpointed {
                bail!(
                    "{}: missing: --resume needs the optimal values A*-PO estimated from the starting policy before its first step (the policy has moved since); start the run again without --resume",
                    path.display()
                );
            }
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        let stored: OptimalValues = serde_json::from_str(&text).with_context(|| {
            format!("{}: not the optimal values of an A*-PO run", path.display())
        })?;
        let mismatch = |what: String| {
            anyhow::anyhow!(
                "{}: {what}: resume with the prompts and options the run started with",
                path.display()
            )
        };
        if stored.v_star.len() != prompts || stored.rewards.len() != prompts {
            return Err(mismatch(format!(
                "holds the values of {} prompts, --prompts now has {prompts}",
                stored.v_star.len()
            )));
        }
        if stored.beta1 != args.beta1 || stored.num_value_samples != args.num_value_samples {
            return Err(mismatch(format!(
                "estimated with --beta1 {} and --num-value-samples {}, the run now asks for {} and {}",
                stored.beta1, stored.num_value_samples, args.beta1, args.num_value_samples
            )));
        }
        tracing::info!("A*-PO: optimal values read from {}", path.display());
        Ok(Some(stored))
    }

    /// Writes them into the run (the main rank, after the run directory is prepared).
    pub fn write(&self, args: &TrainArgs) -> Result<()> {
        let json = serde_json::to_string(self).expect("serialises");
        common::checkpoint::write_atomic(&path(args), json.as_bytes())?;
        Ok(())
    }
}

fn path(args: &TrainArgs) -> PathBuf {
    Path::new(&args.run.output_dir).join(OPTIMAL_VALUES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_the_prompts_kept() {
        let rewards = vec![vec![0.0, 1.0, 0.0, 1.0], vec![0.0; 4], vec![1.0; 4]];
        let v = OptimalValues::from_rewards(rewards, 0.5);
        // β₁·log(mean exp(r/β₁)), written out.
        let want = 0.5 * ((2.0 + 2.0 * 2f64.exp()) / 4.0).ln();
        assert!((v.v_star[0] - want).abs() < 1e-12, "{}", v.v_star[0]);
        assert!(v.v_star[1].abs() < 1e-12);
        assert!((v.v_star[2] - 1.0).abs() < 1e-12);
        assert_eq!(v.all_incorrect, [1]);
        assert_eq!(v.num_value_samples, 4);
        assert_eq!(v.kept(true), [0, 2]);
        assert_eq!(v.kept(false), [0, 1, 2]);
    }
}
