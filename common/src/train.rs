//! Concrete helpers the three training loops share: the optimiser step (clip, skip a
//! non-finite step, schedule, AdamW) and a checkpoint's save and restore.

use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};

use crate::checkpoint;
use crate::error::{Error, Result};
use crate::models::Model;
use crate::optim::AdamW;
use crate::run_dir::{RunDir, TRAINER_STATE};
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
