//! The training unit: a model together with its optimiser, its learning-rate schedule and
//! its name in checkpoints. A stage holds one per model it trains (SFT and reward: one;
//! PPO: the policy and, when the advantage estimator needs one, the critic).
//!
//! Everything that happens to a trained model happens here, once: the optimiser step
//! (gradients summed over the world's ranks, global-norm clipping, the non-finite check,
//! the update at the schedule's rate), the averages of its weights that follow each step
//! (`common::averaging`), the crash and NaN injection points of the reliability tests,
//! and the checkpoint's save and restore.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::averaging::{Average, WeightAverage};
use crate::cli::OptimArgs;
use crate::error::{Error, Result};
use crate::faults;
use crate::models::Model;
use crate::optim::{AdamW, OptimizerState};
use crate::schedule::Schedule;
use crate::world::World;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    /// The loss or the gradients were not finite: the update was skipped.
    pub skipped: bool,
}

pub struct Trainee {
    /// Its sub-directory in a checkpoint (`""`: the checkpoint's root).
    pub name: &'static str,
    pub model: Model,
    pub optimizer: AdamW,
    pub schedule: Schedule,
    /// Global gradient-norm clip (0: none).
    pub max_grad_norm: f64,
    /// The directory the model was loaded from: its tokenizer and generation files go
    /// along with every save.
    pub source: PathBuf,
    /// Averages of the weights updated after every step (`--bema`, PPO's `--ema-decay`);
    /// kept on the main rank only.
    pub averages: Vec<WeightAverage>,
    /// MoE models: the load-balancing loss's weight (`--router-aux-loss-coef`; 0: off).
    router_aux_loss_coef: f64,
    /// The micro-batches of a step on this rank, over which that weight is spread.
    micro_batches: AtomicUsize,
    /// The load-balancing losses of the backward passes since [`Trainee::take_aux_loss`].
    aux_losses: Mutex<Vec<f64>>,
}

impl Trainee {
    /// Trains `model` (loaded from `source`) with AdamW as `optim` says, its gradients
    /// summed over `world`'s ranks, at the rates of `schedule`. LoRA+ (`optim`'s
    /// `--loraplus-lr-ratio`) is refused for a model without LoRA.
    pub fn new(
        name: &'static str,
        model: Model,
        source: &Path,
        optim: &OptimArgs,
        world: &World,
        schedule: Schedule,
    ) -> Result<Self> {
        if let Some(ratio) = optim.loraplus_lr_ratio {
            if model.options.lora.is_none() {
                return Err(Error::InvalidArgument(
                    "--loraplus-lr-ratio needs a LoRA adapter (--lora-r, or a LoRA adapter directory as the model)".into(),
                ));
            }
            tracing::info!("LoRA+: the B matrices (and DoRA's magnitudes) learn at --lr × {ratio}");
        }
        if let Some(digest) = model.moved_start_digest() {
            same_start_on_every_rank(world, digest)?;
        }
        let optimizer = AdamW::distributed(
            model.vs.variables(),
            optim.adamw(),
            world,
            optim.grad_exchange(),
        );
        let router_aux_loss_coef = router_aux_loss_coef(&model, source, optim)?;
        model.record_router_logits(router_aux_loss_coef > 0.0);
        let (trained, total) = parameter_counts(&model);
        tracing::info!(
            "{}: training {trained} of {total} parameters",
            if name.is_empty() { "model" } else { name }
        );
        let mut trainee = Trainee {
            name,
            model,
            optimizer,
            schedule,
            max_grad_norm: optim.max_grad_norm,
            source: source.to_path_buf(),
            averages: vec![],
            router_aux_loss_coef,
            micro_batches: AtomicUsize::new(1),
            aux_losses: Mutex::new(vec![]),
        };
        if let Some(bema) = optim.bema.average() {
            trainee.keep_average(bema, world);
        }
        Ok(trainee)
    }

    /// Keeps `kind` of average of the weights from now on (on the main rank).
    pub fn keep_average(&mut self, kind: Average, world: &World) {
        if world.is_main() {
            self.averages.push(WeightAverage::new(kind, &self.model));
        }
    }

    /// Backpropagates a micro-batch's `loss` ([`Model::backward`]). `last`: no other
    /// backward comes before [`Trainee::step`] — with `--overlap-grad-reduce` the gradients
    /// are then exchanged while it runs. (Passing `false` for the last one only forgoes the
    /// overlap; passing `true` before another backward stops the run at the step.) Every
    /// rank must reach its `last` backward at the same point among its other collectives:
    /// a rank with nothing to backpropagate there calls [`Trainee::skip_backward`].
    ///
    /// A MoE model's load-balancing loss over the micro-batch's forwards is added here,
    /// weighted by `--router-aux-loss-coef` over the step's micro-batches
    /// ([`Trainee::set_micro_batches`]).
    pub fn backward(&self, loss: &tch::Tensor, last: bool) {
        if self.router_aux_loss_coef > 0.0 {
            let weight = self.router_aux_loss_coef
                / self.micro_batches.load(Ordering::Relaxed).max(1) as f64;
            // Before the loss's backward, outside the overlapped exchange (which watches
            // the loss's backward).
            if let Some(value) = self.model.backward_router_aux_loss(weight) {
                self.aux_losses.lock().expect("not poisoned").push(value);
            }
        }
        match last {
            true => self.optimizer.last_backward(|| self.model.backward(loss)),
            false => self.model.backward(loss),
        }
    }

    /// The step's `rows` on this rank, in micro-batches of `size` ([`micro_batches`]): the
    /// load-balancing loss is spread over its backward passes, as TRL divides it by the
    /// gradient accumulation steps.
    pub fn set_micro_batches(&self, rows: usize, size: usize) {
        self.micro_batches
            .store(rows.div_ceil(size), Ordering::Relaxed);
    }

    /// The mean load-balancing loss of the backward passes since the last call, over
    /// every rank (TRL's `aux_loss`); `None` when the loss is off. Every rank must call it
    /// at the same point.
    pub fn take_aux_loss(&self, world: &World) -> Option<f64> {
        if self.router_aux_loss_coef == 0.0 {
            return None;
        }
        let losses = std::mem::take(&mut *self.aux_losses.lock().expect("not poisoned"));
        let [sum, n] = world.sums([losses.iter().sum(), losses.len() as f64]);
        Some(sum / n.max(1.0))
    }

    /// Where the other ranks run a backward and this one has no rows to: with `last`, its
    /// gradients are exchanged here, at the same point as theirs.
    pub fn skip_backward(&self, last: bool) {
        if last {
            self.optimizer.last_backward(|| ());
        }
    }

    /// One optimiser step after the backward passes of a step's micro-batches (`loss` is
    /// the step's loss, only checked for being finite): gradients summed over the ranks,
    /// clipped, and applied at the schedule's rate for the updates taken so far — unless
    /// the loss or the gradient norm is not finite, when the update is skipped (and the
    /// schedule does not advance, as `transformers` does for a skipped step). The
    /// gradients are zeroed either way.
    pub fn step(&mut self, loss: f64) -> StepOutcome {
        faults::hit("mid-step");
        let updates = self.optimizer.step as u64;
        let loss = if faults::nan_from(updates) {
            f64::NAN
        } else {
            loss
        };
        self.optimizer.reduce_gradients();
        let grad_norm = self.optimizer.clip_grad_norm(self.max_grad_norm);
        let lr = self.schedule.lr(updates);
        let skipped = !loss.is_finite() || !grad_norm.is_finite();
        if !skipped {
            self.optimizer.step(lr);
        }
        self.optimizer.zero_grad();
        // Router logits of forwards no backward used (none in the stages' loops).
        self.model.forget_router_logits();
        for average in &mut self.averages {
            average.update(&self.model);
        }
        StepOutcome {
            grad_norm,
            lr,
            skipped,
        }
    }

    /// Parameters that train, and all parameters (tied tensors counted once).
    pub fn parameter_counts(&self) -> (i64, i64) {
        parameter_counts(&self.model)
    }

    /// Writes the model (a Hugging Face directory), the optimiser's state (from
    /// [`AdamW::state`]) and the averages into `checkpoint/<name>`.
    pub fn save(&self, checkpoint: &Path, optimizer: &OptimizerState) -> Result<()> {
        let dir = checkpoint.join(self.name);
        self.model.save(&dir, Some(&self.source))?;
        optimizer.save(&dir)?;
        for average in &self.averages {
            average.save(&dir)?;
        }
        Ok(())
    }

    /// Restores what [`Trainee::save`] wrote into `checkpoint`. An average the checkpoint
    /// lacks starts at the restored weights; PPO's EMA is also read where checkpoints
    /// written before the averages moved here kept it, at the checkpoint's root.
    pub fn load(&mut self, checkpoint: &Path) -> Result<()> {
        let dir = checkpoint.join(self.name);
        self.model.load_weights(&dir)?;
        self.optimizer.load(&dir)?;
        for average in &mut self.averages {
            if !average.load(&[&dir, checkpoint])? {
                tracing::warn!(
                    "{} has no {}: the average starts at the resumed weights",
                    dir.display(),
                    average.kind.file()
                );
                *average = WeightAverage::new(average.kind.clone(), &self.model);
            }
        }
        Ok(())
    }
}

/// PiSSA's and OLoRA's starts come from an SVD or a QR each rank computes from the same
/// base: ranks whose numbers disagree (another library or device) would train different
/// models, so the run stops instead, on every rank.
fn same_start_on_every_rank(world: &World, digest: u64) -> Result<()> {
    let all = world.gather_bytes(&digest.to_le_bytes());
    if all.iter().all(|d| *d == all[0]) {
        return Ok(());
    }
    Err(Error::InvalidArgument(
        "--init-lora-weights: the ranks computed different PiSSA/OLoRA starts from the same base (their SVD or QR differ, another device or library?); run them on identical machines or use --init-lora-weights true".into(),
    ))
}

/// A step's `rows` in micro-batches of `size`, each with whether it is the last: the one
/// whose backward is the step's last ([`Trainee::backward`]'s `last`).
pub fn micro_batches<T>(rows: &[T], size: usize) -> impl Iterator<Item = (&[T], bool)> {
    let count = rows.len().div_ceil(size);
    rows.chunks(size)
        .enumerate()
        .map(move |(i, micro)| (micro, i + 1 == count))
}

/// The load-balancing loss's weight: `--router-aux-loss-coef`, else the MoE model's own
/// (its config's). Refused above 0 for a model without experts.
fn router_aux_loss_coef(model: &Model, source: &Path, optim: &OptimArgs) -> Result<f64> {
    match (optim.router_aux_loss_coef, model.config_router_aux_loss_coef()) {
        (Some(c), None) if c > 0.0 => Err(Error::InvalidArgument(format!(
            "--router-aux-loss-coef: {} is not a Mixture-of-Experts model (it has no router to balance)",
            source.display()
        ))),
        (Some(c), _) => Ok(c),
        (None, Some(c)) => {
            if c > 0.0 {
                tracing::info!("MoE: the routers' load-balancing loss weighs {c} (router_aux_loss_coef; --router-aux-loss-coef 0 turns it off)");
            }
            Ok(c)
        }
        (None, None) => Ok(0.0),
    }
}

fn parameter_counts(model: &Model) -> (i64, i64) {
    // PiSSA's and OLoRA's frozen starts are copies, not parameters; a 4-bit weight is as
    // many parameters as its layer has weights (two per packed byte, as PEFT counts them),
    // its scales and maps none.
    model
        .named_tensors()
        .iter()
        .filter(|(name, _)| {
            !crate::models::lora::is_initial(name) && !crate::models::quant::is_state(name)
        })
        .map(|(_, t)| t)
        .fold((0, 0), |(trained, total), t| {
            let per_element = if t.kind() == tch::Kind::Uint8 { 2 } else { 1 };
            let n = t.numel() as i64 * per_element;
            (trained + if t.requires_grad() { n } else { 0 }, total + n)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ranks with the same PiSSA start go on; with different ones both stop.
    #[test]
    fn ranks_must_share_the_moved_start() {
        for (other, agree) in [(7u64, true), (8, false)] {
            let results = crate::world::in_threads(2, 1 << 20, move |world| {
                let digest = if world.rank() == 0 { 7 } else { other };
                same_start_on_every_rank(&world, digest).is_ok()
            });
            assert_eq!(results, [agree, agree]);
        }
    }
}
