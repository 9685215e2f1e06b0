//! A training run as every stage's loop sees it: the output directory, the metric streams,
//! the trainer state, checkpoints of the run's training units, signals and the non-finite
//! step counter. Only the world's main rank writes files.

use std::path::{Path, PathBuf};

use data::sampler::SamplerPosition;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::checkpoint;
use crate::cli::RunArgs;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::models::Model;
use crate::optim::OptimizerState;
use crate::rng;
use crate::run_dir::{RunDir, TRAINER_STATE};
use crate::trainee::{StepOutcome, Trainee};
use crate::world::World;

/// Writes checkpoint `step`: each training unit, then `extra`, then `trainer_state.json`
/// last.
fn save_checkpoint<S: Serialize>(
    run: &RunDir,
    step: u64,
    trainees: &[(&Trainee, OptimizerState)],
    state: &S,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    run.save_checkpoint(step, |dir| {
        for (t, optimizer) in trainees {
            t.save(dir, optimizer)?;
        }
        extra(dir)?;
        crate::faults::hit("checkpoint-mid-write");
        let json = serde_json::to_string_pretty(state).expect("trainer state serialises");
        checkpoint::write_atomic(&dir.join(TRAINER_STATE), json.as_bytes())
    })
}

/// Restores what [`save_checkpoint`] wrote into `dir` and returns the trainer state.
fn load_checkpoint<S: DeserializeOwned>(dir: &Path, trainees: &mut [&mut Trainee]) -> Result<S> {
    for t in trainees.iter_mut() {
        t.load(dir)?;
    }
    let path = dir.join(TRAINER_STATE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path, source })
}

/// Restores this rank's random generators from checkpoint `dir` (`rng_state_{rank}`); a
/// checkpoint without them (an older one, or fewer ranks) leaves them as seeded.
fn restore_rng(dir: &Path, world: &World, trainees: &[&mut Trainee]) -> Result<()> {
    let path = rng::file(dir, world.rank());
    if !path.exists() {
        tracing::warn!(
            "{} is not there: random draws (LoRA dropout) continue from the seed, not from where the run was",
            path.display()
        );
        return Ok(());
    }
    let devices: Vec<_> = trainees.iter().map(|t| t.model.device()).collect();
    rng::restore(&path, &devices)
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

/// The parts of a training run every stage's loop uses: the processes, the output
/// directory, the metric streams and the trainer state, resumed when asked.
pub struct Session {
    pub world: World,
    pub run: RunDir,
    /// The main rank's metric streams (`None` on the other ranks).
    metrics: Option<Metrics>,
    pub state: TrainerState,
    keep_last: usize,
    save_every: u64,
    max_bad_steps: u64,
    consecutive_bad: u64,
    /// Set by SIGINT/SIGTERM: finish the step, checkpoint, exit cleanly.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The checkpoint this run resumed from.
    pub resumed_from: Option<PathBuf>,
}

/// Why a training loop ended before its last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGINT or SIGTERM: the current step finished and was checkpointed.
    Signal,
}

impl Session {
    /// Prepares `OUT` (refusing an existing run without --resume/--overwrite), writes
    /// `config.toml`, and with --resume restores the newest checkpoint into `trainees`.
    /// Call it only after every input was read and checked.
    pub fn start<C: Serialize>(
        stage: &str,
        config: &C,
        run_args: &RunArgs,
        total_steps: u64,
        world: World,
        trainees: &mut [&mut Trainee],
    ) -> Result<Session> {
        let run = if world.is_main() {
            let run = RunDir::prepare(&run_args.output_dir, run_args.resume, run_args.overwrite)?;
            checkpoint::write_atomic(
                &run.root.join("config.toml"),
                crate::config_file::to_toml(config).as_bytes(),
            )?;
            run
        } else {
            RunDir::at(&run_args.output_dir)
        };
        world.barrier();
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
        let mut resumed_from = None;
        if run_args.resume {
            match run.latest_checkpoint() {
                Some((step, dir)) => {
                    state = load_checkpoint(&dir, trainees)?;
                    state.total_steps = total_steps;
                    restore_rng(&dir, &world, trainees)?;
                    resumed_at = Some(step);
                    tracing::info!("resumed from {} (step {step})", dir.display());
                    resumed_from = Some(dir);
                }
                None => tracing::info!(
                    "--resume: no checkpoint in {}, starting at step 0",
                    run.checkpoints().display()
                ),
            }
        }
        let metrics = if world.is_main() {
            let m = Metrics::open(&run, resumed_at, total_steps, run_args.log_every)?;
            Some(m)
        } else {
            None
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, stop.clone()).map_err(|e| {
                Error::config(&run.root, format!("cannot install the signal handler: {e}"))
            })?;
        }
        Ok(Session {
            world,
            run,
            metrics,
            state,
            keep_last: run_args.keep_last,
            save_every: run_args.save_every,
            max_bad_steps: run_args.max_bad_steps,
            consecutive_bad: 0,
            stop,
            resumed_from,
        })
    }

    /// Whether SIGINT/SIGTERM asked the run to stop after the step that just finished.
    /// Whether a signal asked the run to stop, on any rank (a collective: every rank gets
    /// the same answer at the same call, so all stop after the same step).
    pub fn stop_requested(&self) -> Option<Stop> {
        let here = self.stop.load(std::sync::atomic::Ordering::SeqCst);
        let anywhere = match self.world.size() {
            1 => here,
            _ => self.world.sum(f64::from(u8::from(here))) > 0.0,
        };
        anywhere.then_some(Stop::Signal)
    }

    /// Logs how to resume a run stopped by a signal (after its checkpoint was written).
    pub fn report_stop(&self) {
        tracing::warn!(
            "stopped by signal after step {} of {}; checkpoint written. Continue with the same command and --resume",
            self.state.step,
            self.state.total_steps
        );
    }

    pub fn done(&self) -> bool {
        self.state.step >= self.state.total_steps
    }

    /// Whether the step just finished is the last one.
    pub fn at_end(&self) -> bool {
        self.state.step == self.state.total_steps
    }

    /// TRL's `num_tokens`: the run's count of tokens trained on, `tokens` (this step's,
    /// every rank's) added. The count is the checkpoint's stage state (`trainer_state.json`),
    /// so a resumed run counts on; for the stages that keep no other (PPO keeps its own).
    pub fn count_tokens(&mut self, tokens: f64) -> f64 {
        let count = self.state.extra["num_tokens"].as_f64().unwrap_or(0.0) + tokens;
        self.state.extra = serde_json::json!({ "num_tokens": count });
        count
    }

    /// Counts a finished step (its optimiser outcome and loss). Too many consecutive
    /// non-finite steps end the run with an error; the last checkpoint is left as it was.
    pub fn finish_step(
        &mut self,
        outcome: &StepOutcome,
        loss: f64,
        sampler: SamplerPosition,
    ) -> Result<()> {
        if outcome.skipped {
            self.state.skipped_steps += 1;
            self.consecutive_bad += 1;
            tracing::warn!(
                "step {}: non-finite loss or gradient, update skipped",
                self.state.step + 1
            );
            if self.consecutive_bad >= self.max_bad_steps.max(1) {
                let last = self
                    .run
                    .latest_checkpoint()
                    .map(|(_, p)| p.display().to_string());
                return Err(Error::config(
                    &self.run.root,
                    format!(
                        "{} consecutive steps had a non-finite loss or gradient (--max-bad-steps); stopped at step {}. Last good checkpoint: {}. Lower --lr or check the data",
                        self.consecutive_bad,
                        self.state.step + 1,
                        last.unwrap_or_else(|| "none".into())
                    ),
                ));
            }
        } else {
            self.consecutive_bad = 0;
        }
        self.state.step += 1;
        self.state.sampler = sampler;
        self.state.last_loss = loss;
        Ok(())
    }

    /// Whether a checkpoint is due after the step just finished (always after the last,
    /// and when a signal asked the run to stop).
    pub fn checkpoint_due(&self) -> bool {
        self.at_end()
            || self.stop_requested().is_some()
            || (self.save_every > 0 && self.state.step.is_multiple_of(self.save_every))
    }

    /// Records `scalars` at `step` (TensorBoard, `metrics.jsonl`, progress).
    pub fn log(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        match &mut self.metrics {
            Some(m) => m.log(step, scalars),
            None => Ok(()),
        }
    }

    /// A text summary for TensorBoard's Text tab.
    pub fn text(&mut self, step: u64, tag: &str, text: &str) {
        if let Some(m) = &mut self.metrics {
            m.text(step, tag, text);
        }
    }

    /// Flushes the metric streams and closes the progress bar.
    pub fn finish(&mut self) {
        if let Some(m) = &mut self.metrics {
            m.finish();
        }
    }

    /// Writes a checkpoint of the current step (`trainees`, then what `extra` writes into
    /// its directory) and applies --keep-last.
    pub fn save(
        &mut self,
        trainees: &[&Trainee],
        extra: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        // What every rank takes part in: the optimiser states (whole on the main rank,
        // gathered under ZeRO-1) and every rank's random generators.
        let optimizers: Vec<Option<OptimizerState>> =
            trainees.iter().map(|t| t.optimizer.state()).collect();
        let devices: Vec<_> = trainees.iter().map(|t| t.model.device()).collect();
        let rng_states = self.world.gather_bytes(&rng::snapshot(&devices)?);
        if let Some(m) = &mut self.metrics {
            m.flush();
            let units: Vec<(&Trainee, OptimizerState)> = trainees
                .iter()
                .zip(optimizers)
                .map(|(t, o)| {
                    (
                        *t,
                        o.expect("the main rank holds the whole optimizer state"),
                    )
                })
                .collect();
            let dir = save_checkpoint(&self.run, self.state.step, &units, &self.state, |dir| {
                for (rank, state) in rng_states.iter().enumerate() {
                    checkpoint::write_atomic(&rng::file(dir, rank), state)?;
                }
                extra(dir)
            })?;
            crate::faults::hit("checkpoint-after-rename");
            self.run.prune(self.keep_last)?;
            tracing::info!(
                "checkpoint {} ({})",
                dir.display(),
                human_size(dir_size(&dir))
            );
        }
        self.world.barrier();
        Ok(())
    }

    /// Appends JSON lines to the run's `file` (e.g. `samples.jsonl`).
    pub fn append(&self, file: &str, lines: &str) -> Result<()> {
        if !self.world.is_main() {
            return Ok(());
        }
        let path = self.run.root.join(file);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        std::io::Write::write_all(&mut f, lines.as_bytes()).map_err(|e| Error::io(&path, e))
    }

    /// Writes `dir_name` (e.g. `final`) as a Hugging Face directory (an adapter directory
    /// for a model with adapters), aside then renamed, with the tokenizer and generation
    /// files of `sidecar_from`.
    pub fn write_model(&self, dir_name: &str, model: &Model, sidecar_from: &Path) -> Result<()> {
        self.write_dir(dir_name, |tmp| model.save(tmp, Some(sidecar_from)))
    }

    /// Writes each of `trainee`'s averages as the directory of its kind (`bema/`,
    /// `final_ema/`), as [`Session::write_model`] writes the model.
    pub fn write_averages(&self, trainee: &Trainee) -> Result<()> {
        for average in &trainee.averages {
            average.swapped_in(&trainee.model, || {
                self.write_model(average.kind.dir_name(), &trainee.model, &trainee.source)
            })?;
        }
        Ok(())
    }

    /// Writes `dir_name` as a plain Hugging Face model with the adapters folded in.
    pub fn write_merged(&self, dir_name: &str, model: &Model, sidecar_from: &Path) -> Result<()> {
        self.write_dir(dir_name, |tmp| model.save_merged(tmp, Some(sidecar_from)))
    }

    fn write_dir(&self, dir_name: &str, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        if !self.world.is_main() {
            return Ok(());
        }
        let dest = self.run.root.join(dir_name);
        let tmp = self.run.root.join(format!(".{dir_name}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        write(&tmp)?;
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
        }
        std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
        tracing::info!("model written to {}", dest.display());
        Ok(())
    }
}

/// Total size in bytes of the files under `dir` (0 where it cannot be read).
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn human_size(bytes: u64) -> String {
    let mb = bytes as f64 / 1e6;
    if mb >= 1000.0 {
        format!("{:.2} GB", mb / 1000.0)
    } else {
        format!("{mb:.1} MB")
    }
}
