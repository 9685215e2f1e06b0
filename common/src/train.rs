//! Concrete helpers the three training loops share: the optimiser step (clip, skip a
//! non-finite step, schedule, AdamW) and a checkpoint's save and restore.

use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::checkpoint;
use crate::cli::{OptimArgs, RunArgs};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::models::Model;
use crate::optim::AdamW;
use crate::run_dir::{RunDir, TRAINER_STATE};
use crate::sampler::SamplerPosition;
use crate::schedule::Schedule;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    /// The loss or the gradients were not finite: the update was skipped.
    pub skipped: bool,
}

/// Clips, then applies one AdamW step at the schedule's rate for `step` steps taken, and
/// zeroes the gradients. A non-finite `loss` or gradient skips the update.
pub fn optimizer_step(
    opt: &mut AdamW,
    schedule: &Schedule,
    step: u64,
    max_grad_norm: f64,
    loss: f64,
) -> StepOutcome {
    let grad_norm = opt.clip_grad_norm(max_grad_norm);
    let lr = schedule.lr(step);
    let skipped = !loss.is_finite() || !grad_norm.is_finite();
    if !skipped {
        opt.step(lr);
    }
    opt.zero_grad();
    StepOutcome {
        grad_norm,
        lr,
        skipped,
    }
}

/// One trainable model and its optimiser, as a checkpoint holds them: the model as a
/// Hugging Face directory under `subdir` (`""` for the checkpoint root), the optimiser's
/// state next to it.
pub struct Trainable<'a> {
    pub subdir: &'a str,
    pub model: &'a Model,
    pub optimizer: &'a AdamW,
    /// Tokenizer and generation files to copy along.
    pub sidecar_from: &'a Path,
}

/// Writes checkpoint `step`: each trainable, then `trainer_state.json` last.
pub fn save_checkpoint<S: Serialize>(
    run: &RunDir,
    step: u64,
    trainables: &[Trainable],
    state: &S,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<std::path::PathBuf> {
    run.save_checkpoint(step, |dir| {
        for t in trainables {
            let sub = dir.join(t.subdir);
            t.model.save(&sub, Some(t.sidecar_from))?;
            t.optimizer.save(&sub)?;
        }
        extra(dir)?;
        crate::faults::hit("checkpoint-mid-write");
        let json = serde_json::to_string_pretty(state).expect("trainer state serialises");
        checkpoint::write_atomic(&dir.join(TRAINER_STATE), json.as_bytes())
    })
}

/// Restores what [`save_checkpoint`] wrote into `dir` and returns the trainer state.
pub fn load_checkpoint<S: DeserializeOwned>(
    dir: &Path,
    trainables: &mut [(&str, &Model, &mut AdamW)],
) -> Result<S> {
    for (subdir, model, opt) in trainables.iter_mut() {
        let sub = dir.join(*subdir);
        model.load_weights(&sub)?;
        opt.load(&sub)?;
    }
    let path = dir.join(TRAINER_STATE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path, source })
}

/// What `trainer_state.json` holds; `extra` carries a stage's own state (PPO: the KL
/// coefficient).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub stage: String,
    pub step: u64,
    pub total_steps: u64,
    pub sampler: SamplerPosition,
    pub seed: u64,
    pub skipped_steps: u64,
    pub last_loss: f64,
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// The parts of a training run every stage's loop uses: the output directory, the
/// schedule, the metric streams and the trainer state, resumed when asked.
pub struct Session {
    pub run: RunDir,
    pub schedule: Schedule,
    pub metrics: Metrics,
    pub state: TrainerState,
    keep_last: usize,
    save_every: u64,
}

impl Session {
    /// Prepares `OUT` (refusing an existing run without --resume/--overwrite), writes
    /// `config.toml`, and with --resume restores the newest checkpoint into `trainables`.
    /// Call it only after every input was read and checked.
    pub fn start<C: Serialize>(
        stage: &str,
        config: &C,
        run_args: &RunArgs,
        optim: &OptimArgs,
        total_steps: u64,
        trainables: &mut [(&str, &Model, &mut AdamW)],
    ) -> Result<Session> {
        let run = RunDir::prepare(&run_args.output_dir, run_args.resume, run_args.overwrite)?;
        checkpoint::write_atomic(
            &run.root.join("config.toml"),
            crate::config_file::to_toml(config).as_bytes(),
        )?;
        let schedule = Schedule {
            kind: optim.schedule,
            base_lr: optim.lr,
            warmup_steps: optim.warmup_steps,
            total_steps,
            min_lr_ratio: optim.min_lr_ratio,
        };
        let mut state = TrainerState {
            stage: stage.into(),
            step: 0,
            total_steps,
            sampler: SamplerPosition::default(),
            seed: run_args.seed,
            skipped_steps: 0,
            last_loss: f64::NAN,
            extra: serde_json::Value::Null,
        };
        let mut resumed_at = None;
        if run_args.resume {
            match run.latest_checkpoint() {
                Some((step, dir)) => {
                    state = load_checkpoint(&dir, trainables)?;
                    state.total_steps = total_steps;
                    resumed_at = Some(step);
                    tracing::info!("resumed from {} (step {step})", dir.display());
                }
                None => tracing::info!(
                    "--resume: no checkpoint in {}, starting at step 0",
                    run.checkpoints().display()
                ),
            }
        }
        let metrics = Metrics::open(&run, resumed_at, total_steps, run_args.log_every)?;
        Ok(Session {
            run,
            schedule,
            metrics,
            state,
            keep_last: run_args.keep_last,
            save_every: run_args.save_every,
        })
    }

    pub fn done(&self) -> bool {
        self.state.step >= self.state.total_steps
    }

    /// Whether the step just finished is the last one.
    pub fn at_end(&self) -> bool {
        self.state.step == self.state.total_steps
    }

    /// Counts a finished step (its optimiser outcome and loss).
    pub fn finish_step(&mut self, outcome: &StepOutcome, loss: f64, sampler: SamplerPosition) {
        if outcome.skipped {
            self.state.skipped_steps += 1;
            tracing::warn!(
                "step {}: non-finite loss or gradient, update skipped",
                self.state.step + 1
            );
        }
        self.state.step += 1;
        self.state.sampler = sampler;
        self.state.last_loss = loss;
    }

    /// Whether a checkpoint is due after the step just finished (always after the last).
    pub fn checkpoint_due(&self) -> bool {
        self.at_end() || (self.save_every > 0 && self.state.step % self.save_every == 0)
    }

    /// Writes a checkpoint of the current step and applies --keep-last.
    pub fn save(
        &mut self,
        trainables: &[Trainable],
        extra: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        self.metrics.flush();
        let dir = save_checkpoint(&self.run, self.state.step, trainables, &self.state, extra)?;
        self.run.prune(self.keep_last)?;
        tracing::info!("checkpoint {}", dir.display());
        Ok(dir)
    }

    /// Writes `dir_name` (e.g. `final`) as a Hugging Face directory, aside then renamed.
    pub fn write_model(
        &self,
        dir_name: &str,
        model: &Model,
        sidecar_from: &Path,
    ) -> Result<PathBuf> {
        let dest = self.run.root.join(dir_name);
        let tmp = self.run.root.join(format!(".{dir_name}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        model.save(&tmp, Some(sidecar_from))?;
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
        }
        std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
        tracing::info!("model written to {}", dest.display());
        Ok(dest)
    }
}
