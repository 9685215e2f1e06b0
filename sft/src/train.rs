//! `sft train`: supervised fine-tuning with the loss on the completion / assistant tokens.
//!
//! One step is one optimiser step over `batch_size × grad_accum` rows; the loss is the
//! token-weighted mean over the whole accumulated batch, so it does not depend on how the
//! batch is split into micro-batches.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use common::cli::{DeviceArgs, OptimArgs, RunArgs};
use common::metrics::Metrics;
use common::optim::AdamW;
use common::run_dir::RunDir;
use common::schedule::Schedule;
use common::train::{load_checkpoint, optimizer_step, save_checkpoint, Trainable};
use common::Head;
use data::sampler::{Sampler, SamplerPosition};
use data::sft::{collate, prepare, Prepared, Truncation};
use serde::{Deserialize, Serialize};
use tch::Kind;

use crate::eval::{nll_per_row, token_nll};

#[derive(Debug, Clone, Args, Serialize)]
pub struct TrainArgs {
    /// Hugging Face model directory to fine-tune (weights, config.json, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Demonstrations: {"prompt","completion"}, {"messages"} or {"text"} per line.
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out rows in the same format, for eval/loss.
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
    /// Longest row in tokens; longer rows follow --truncation.
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// truncate (cut the completion's end) or drop rows over --max-length.
    #[arg(long, default_value = "truncate")]
    pub truncation: Truncation,
    #[command(flatten)]
    #[serde(flatten)]
    pub optim: OptimArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArgs,
}

/// What `trainer_state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub stage: String,
    pub step: u64,
    pub total_steps: u64,
    pub sampler: SamplerPosition,
    pub seed: u64,
    pub skipped_steps: u64,
    pub last_loss: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    pub steps: u64,
    pub final_loss: f64,
    pub eval_loss: Option<f64>,
}

impl TrainArgs {
    fn validate(&self) -> Result<()> {
        ensure!(self.batch_size > 0, "--batch-size must be at least 1");
        ensure!(self.grad_accum > 0, "--grad-accum must be at least 1");
        ensure!(self.max_length > 1, "--max-length must be at least 2");
        ensure!(
            self.run.epochs > 0 || self.run.max_steps.is_some(),
            "--epochs must be at least 1"
        );
        ensure!(
            self.run.max_steps != Some(0),
            "--max-steps must be at least 1"
        );
        self.optim.validate().map_err(anyhow::Error::msg)
    }
}

fn prepare_file(
    path: &std::path::Path,
    tok: &data::Tokenizer,
    args: &TrainArgs,
) -> Result<Prepared> {
    let examples = data::read_sft(path)?;
    let prepared = prepare(&examples, tok, args.max_length, args.truncation, true)?;
    if prepared.truncated + prepared.dropped > 0 {
        tracing::warn!(
            "{}: {} rows truncated and {} dropped at --max-length {}",
            path.display(),
            prepared.truncated,
            prepared.dropped,
            args.max_length
        );
    }
    if prepared.rows.is_empty() {
        bail!(
            "{}: no row is left to train on after --max-length {}",
            path.display(),
            args.max_length
        );
    }
    Ok(prepared)
}

pub fn run(args: &TrainArgs) -> Result<TrainSummary> {
    args.validate()?;
    // Read everything that can be wrong before the output directory is touched.
    let (device, kind) = args.device.resolve();
    let (model, tok) = crate::load_with_tokenizer(&args.model, Head::Lm, device, kind)?;
    let train = prepare_file(&args.data, &tok, args)?;
    let eval = args
        .eval_data
        .as_deref()
        .map(|p| prepare_file(p, &tok, args))
        .transpose()?;
    let run = RunDir::prepare(&args.run.output_dir, args.run.resume, args.run.overwrite)?;
    common::checkpoint::write_atomic(
        &run.root.join("config.toml"),
        common::config_file::to_toml(args).as_bytes(),
    )?;

    let rows_per_step = args.batch_size * args.grad_accum;
    let steps_per_epoch = train.rows.len().div_ceil(rows_per_step) as u64;
    let total_steps = args
        .run
        .max_steps
        .unwrap_or(args.run.epochs * steps_per_epoch);
    let schedule = Schedule {
        kind: args.optim.schedule,
        base_lr: args.optim.lr,
        warmup_steps: args.optim.warmup_steps,
        total_steps,
        min_lr_ratio: args.optim.min_lr_ratio,
    };
    let mut opt = AdamW::new(model.vs.variables(), args.optim.adamw());
    let mut sampler = Sampler::new(train.rows.len(), args.run.seed, true);
    let mut state = TrainerState {
        stage: "sft".into(),
        step: 0,
        total_steps,
        sampler: sampler.position(),
        seed: args.run.seed,
        skipped_steps: 0,
        last_loss: f64::NAN,
    };
    let mut resumed_at = None;
    if args.run.resume {
        if let Some((step, dir)) = run.latest_checkpoint() {
            state = load_checkpoint(&dir, &mut [("", &model, &mut opt)])
                .with_context(|| format!("resuming from {}", dir.display()))?;
            sampler.restore(state.sampler);
            resumed_at = Some(step);
            tracing::info!("resumed from {} (step {step})", dir.display());
        } else {
            tracing::info!(
                "--resume: no checkpoint in {}, starting at step 0",
                run.checkpoints().display()
            );
        }
    }
    tracing::info!(
        "sft: {} rows, {} steps of {} rows ({} × {} accumulated)",
        train.rows.len(),
        total_steps,
        rows_per_step,
        args.batch_size,
        args.grad_accum
    );
    let mut metrics = Metrics::open(&run, resumed_at, total_steps, args.run.log_every)?;
    let save = |state: &TrainerState, opt: &AdamW| -> Result<()> {
        let t = Trainable {
            subdir: "",
            model: &model,
            optimizer: opt,
            sidecar_from: &args.model,
        };
        let dir = save_checkpoint(&run, state.step, &[t], state, |_| Ok(()))?;
        run.prune(args.run.keep_last)?;
        tracing::info!("checkpoint {}", dir.display());
        Ok(())
    };
    let evaluate = |eval: &Prepared| -> f64 {
        let per_row = nll_per_row(&model, &eval.rows, args.batch_size, tok.pad_id);
        let (nll, n) = per_row
            .iter()
            .fold((0.0, 0), |(a, b), (x, y)| (a + x, b + y));
        nll / n.max(1) as f64
    };
    let mut eval_loss = None;

    while state.step < total_steps {
        let started = Instant::now();
        let indices = sampler.next_batch(rows_per_step);
        let rows: Vec<_> = indices.iter().map(|&i| &train.rows[i]).collect();
        let targets: i64 = rows
            .iter()
            .map(|r| r.loss_mask[1..].iter().sum::<i64>())
            .sum();
        let mut loss_value = 0.0;
        let mut tokens = 0i64;
        for micro in rows.chunks(args.batch_size) {
            let batch = collate(micro, tok.pad_id, device);
            let (nll, _) = token_nll(&model, &batch);
            let loss = nll.sum(Kind::Float) / targets.max(1) as f64;
            loss.backward();
            loss_value += loss.double_value(&[]);
            tokens += micro.iter().map(|r| r.ids.len() as i64).sum::<i64>();
        }
        let outcome = optimizer_step(
            &mut opt,
            &schedule,
            state.step,
            args.optim.max_grad_norm,
            loss_value,
        );
        if outcome.skipped {
            state.skipped_steps += 1;
            tracing::warn!(
                "step {}: non-finite loss or gradient, update skipped",
                state.step + 1
            );
        }
        state.step += 1;
        state.sampler = sampler.position();
        state.last_loss = loss_value;
        let elapsed = started.elapsed().as_secs_f64();
        let mut scalars = vec![
            ("train/loss", loss_value),
            ("train/lr", outcome.lr),
            ("train/grad_norm", outcome.grad_norm),
            ("train/tokens_per_second", tokens as f64 / elapsed.max(1e-9)),
            ("train/skipped_steps", state.skipped_steps as f64),
        ];
        let last = state.step == total_steps;
        if let Some(eval) = &eval {
            if last || (args.eval_every > 0 && state.step % args.eval_every == 0) {
                let loss = evaluate(eval);
                eval_loss = Some(loss);
                scalars.push(("eval/loss", loss));
                scalars.push(("eval/perplexity", loss.exp()));
            }
        }
        metrics.log(state.step, &scalars)?;
        if last || (args.run.save_every > 0 && state.step % args.run.save_every == 0) {
            metrics.flush();
            save(&state, &opt)?;
        }
    }
    metrics.finish();
    write_final(&run, &model, &args.model)?;
    Ok(TrainSummary {
        steps: state.step,
        final_loss: state.last_loss,
        eval_loss,
    })
}

/// `OUT/final/`: the model as a Hugging Face directory, written aside and renamed.
pub fn write_final(
    run: &RunDir,
    model: &common::Model,
    sidecar_from: &std::path::Path,
) -> Result<()> {
    let final_dir = run.final_dir();
    let tmp = run.root.join(".final.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    model.save(&tmp, Some(sidecar_from))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("writing {}", final_dir.display()))?;
    tracing::info!("final model in {}", final_dir.display());
    Ok(())
}
