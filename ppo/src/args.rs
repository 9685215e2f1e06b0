//! The options of `ppo train` (each also settable from the `--config` TOML file).

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use common::cli::{require, AdapterArgs, DecodeArgs, DeviceArgs, OptimArgs, RunArgs};
use serde::Serialize;

use crate::math::{AdvantageEstimator, KlEstimator};

#[derive(Debug, Clone, Args, Serialize)]
pub struct TrainArgs {
    /// The SFT policy (Hugging Face directory); also the frozen reference.
    #[arg(long)]
    pub policy: PathBuf,
    /// The reward model from `reward train` (its normalisation is applied).
    #[arg(long)]
    pub reward_model: PathBuf,
    /// Initial value model (default: the reward model, as InstructGPT does).
    #[arg(long)]
    pub value_model: Option<PathBuf>,
    /// Prompts: {"prompt"} or {"messages"} per line.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Prompts per iteration (rollout batch).
    #[arg(long, default_value_t = 16)]
    pub rollout_batch_size: usize,
    /// Longest prompt in tokens; longer prompts keep their last tokens.
    #[arg(long, default_value_t = 512)]
    pub max_prompt_length: usize,
    /// Most tokens sampled per response.
    #[arg(long, default_value_t = 64)]
    pub response_length: i64,
    /// Sampling temperature (> 0); log-probs are computed at this temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Sample among the K most likely tokens; 0 keeps all.
    #[arg(long, default_value_t = 0)]
    pub top_k: i64,
    /// Nucleus sampling mass; 1 keeps all.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Subtracted from the score of a response that did not end with EOS.
    #[arg(long)]
    pub missing_eos_penalty: Option<f64>,
    /// Clip scores to [−c, c].
    #[arg(long)]
    pub score_clip: Option<f64>,
    /// Whiten the per-token rewards over the batch before GAE.
    #[arg(long)]
    pub whiten_rewards: bool,
    /// Initial KL coefficient β.
    #[arg(long, default_value_t = 0.05)]
    pub kl_coef: f64,
    /// Per-token KL estimator: k1 (log π − log π_ref) or k3.
    #[arg(long, default_value = "k1")]
    pub kl_estimator: KlEstimator,
    /// Adapt β towards this KL (Ziegler et al.); unset keeps β fixed.
    #[arg(long)]
    pub kl_target: Option<f64>,
    /// Horizon of the adaptive KL controller, in samples.
    #[arg(long, default_value_t = 10000.0)]
    pub kl_horizon: f64,
    /// GAE discount γ.
    #[arg(long, default_value_t = 1.0)]
    pub gamma: f64,
    /// GAE λ.
    #[arg(long, default_value_t = 0.95)]
    pub lam: f64,
    /// Passes over each rollout batch.
    #[arg(long, default_value_t = 4)]
    pub ppo_epochs: usize,
    /// Minibatches per pass (one optimiser step each).
    #[arg(long, default_value_t = 1)]
    pub num_minibatches: usize,
    /// Micro-batches per minibatch (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Policy ratio clip ε.
    #[arg(long, default_value_t = 0.2)]
    pub cliprange: f64,
    /// Value clip around the rollout's values.
    #[arg(long, default_value_t = 0.2)]
    pub cliprange_value: f64,
    /// Weight of the value loss.
    #[arg(long, default_value_t = 0.1)]
    pub vf_coef: f64,
    /// Entropy bonus weight (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub entropy_coef: f64,
    /// Learning rate of the value model (default: --lr).
    #[arg(long)]
    pub value_lr: Option<f64>,
    /// PPO-ptx: SFT-format rows whose language-modelling loss is added to the policy loss.
    #[arg(long)]
    pub ptx_data: Option<PathBuf>,
    /// PPO-ptx weight γ.
    #[arg(long, default_value_t = 0.0)]
    pub ptx_coef: f64,
    /// Longest PPO-ptx row in tokens (longer rows are cut at the end).
    #[arg(long, default_value_t = 512)]
    pub ptx_max_length: usize,
    /// Keep an exponential moving average of the policy weights with this decay (e.g. 0.992).
    #[arg(long)]
    pub ema_decay: Option<f64>,
    /// Write sample prompts/responses/scores every N iterations (0: never).
    #[arg(long, default_value_t = 10)]
    pub sample_every: u64,
    /// How many samples each time.
    #[arg(long, default_value_t = 4)]
    pub num_samples: usize,
    /// An adapter (LoRA or a soft prompt) on the policy and the critic: the reference is
    /// the policy with its adapter off, and (without --value-model) the reward model is the
    /// critic with its adapter off.
    #[command(flatten)]
    #[serde(flatten)]
    pub adapter: AdapterArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub optim: OptimArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub decode: DecodeArgs,
}

impl TrainArgs {
    /// How advantages are estimated (today GAE with --gamma and --lam).
    pub fn advantage_estimator(&self) -> AdvantageEstimator {
        AdvantageEstimator::Gae {
            gamma: self.gamma,
            lam: self.lam,
        }
    }

    /// Whether the reward model is the critic's base with its adapter off (LoRA without a
    /// separate --value-model): one copy of the reward model's weights serves both.
    pub fn reward_is_critic_base(&self) -> bool {
        (self.adapter.lora_r.is_some() || self.adapter.prompt_tuning_tokens.is_some())
            && self.value_model.is_none()
            && self.advantage_estimator().needs_critic()
    }

    /// Where the critic starts: --value-model, else the reward model (as InstructGPT).
    pub fn critic_source(&self) -> &Path {
        self.value_model.as_ref().unwrap_or(&self.reward_model)
    }

    pub fn validate(&self) -> Result<()> {
        self.optim.validate()?;
        self.run.validate()?;
        self.adapter.validate()?;
        require(&[
            (
                self.rollout_batch_size > 0,
                "--rollout-batch-size must be at least 1",
            ),
            (
                self.response_length > 0,
                "--response-length must be at least 1",
            ),
            (
                self.temperature > 0.0,
                "--temperature must be > 0 (PPO samples)",
            ),
            (
                self.top_p > 0.0 && self.top_p <= 1.0,
                "--top-p must be in (0, 1]",
            ),
            (self.top_k >= 0, "--top-k must be ≥ 0"),
            (self.kl_coef >= 0.0, "--kl-coef must be ≥ 0"),
            (
                self.kl_target.is_none_or(|t| t > 0.0),
                "--kl-target must be > 0",
            ),
            (self.kl_horizon > 0.0, "--kl-horizon must be > 0"),
            (
                (0.0..=1.0).contains(&self.gamma),
                "--gamma must be in [0, 1]",
            ),
            ((0.0..=1.0).contains(&self.lam), "--lam must be in [0, 1]"),
            (self.ppo_epochs > 0, "--ppo-epochs must be at least 1"),
            (
                self.num_minibatches > 0,
                "--num-minibatches must be at least 1",
            ),
            (self.grad_accum > 0, "--grad-accum must be at least 1"),
            (
                self.rollout_batch_size % (self.num_minibatches * self.grad_accum) == 0,
                "--rollout-batch-size must be a multiple of --num-minibatches × --grad-accum",
            ),
            (self.cliprange > 0.0, "--cliprange must be > 0"),
            (self.cliprange_value > 0.0, "--cliprange-value must be > 0"),
            (self.vf_coef >= 0.0, "--vf-coef must be ≥ 0"),
            (
                self.value_lr.is_none_or(|lr| lr > 0.0),
                "--value-lr must be > 0",
            ),
            (self.ptx_coef >= 0.0, "--ptx-coef must be ≥ 0"),
            (
                self.ptx_coef == 0.0 || self.ptx_data.is_some(),
                "--ptx-coef needs --ptx-data",
            ),
            (
                self.ema_decay.is_none_or(|d| (0.0..1.0).contains(&d)),
                "--ema-decay must be in [0, 1)",
            ),
            (
                self.max_prompt_length > 0,
                "--max-prompt-length must be at least 1",
            ),
        ])?;
        Ok(())
    }
}
