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
use common::optim::AdamW;
use common::train::{optimizer_step, Session, Trainable};
use common::Head;
use data::cli::TrainDataArgs;
use data::sft::{collate, prepare, Prepared};
use serde::Serialize;
use tch::Kind;

use crate::eval::{nll_per_row, token_nll};

#[derive(Debug, Clone, Args, Serialize)]
pub struct TrainArgs {
    /// Hugging Face model directory to fine-tune (weights, config.json, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Demonstrations ({"prompt","completion"}, {"messages"} or {"text"}) and eval rows.
    #[command(flatten)]
    #[serde(flatten)]
    pub data: TrainDataArgs,
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

#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    pub steps: u64,
    pub final_loss: f64,
    pub eval_loss: Option<f64>,
    /// A signal stopped the run (checkpointed; no `final/` yet).
    pub stopped: bool,
}

impl TrainArgs {
    fn validate(&self) -> Result<()> {
        self.data.validate().map_err(anyhow::Error::msg)?;
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
    let prepared = prepare(
        &examples,
        tok,
        args.data.max_length,
        args.data.truncation,
        true,
    )?;
    if prepared.truncated + prepared.dropped > 0 {
        tracing::warn!(
            "{}: {} rows truncated and {} dropped at --max-length {}",
            path.display(),
            prepared.truncated,
            prepared.dropped,
            args.data.max_length
        );
    }
    if prepared.rows.is_empty() {
        bail!(
            "{}: no row is left to train on after --max-length {}",
            path.display(),
            args.data.max_length
        );
    }
    Ok(prepared)
}

pub fn run(args: &TrainArgs) -> Result<TrainSummary> {
    args.validate()?;
    // Read everything that can be wrong before the output directory is touched.
    let (device, kind) = args.device.resolve();
    args.run.seed_torch();
    let (model, tok) = data::io::load_with_tokenizer(&args.model, Head::Lm, device, kind)?;
    let train = prepare_file(&args.data.data, &tok, args)?;
    let eval = args
        .data
        .eval_data
        .as_deref()
        .map(|p| prepare_file(p, &tok, args))
        .transpose()?;

    let rows_per_step = args.data.rows_per_step();
    let total_steps = args
        .data
        .total_steps(train.rows.len(), args.run.epochs, args.run.max_steps);
    let mut opt = AdamW::new(model.vs.variables(), args.optim.adamw());
    let mut session = Session::start(
        "sft",
        args,
        &args.run,
        &args.optim,
        total_steps,
        &mut [("", &model, &mut opt)],
    )
    .context("starting the run")?;
    let lengths = train.rows.iter().map(|r| r.ids.len()).collect();
    let mut sampler = args.data.sampler(lengths, args.run.seed);
    sampler.restore(session.state.sampler);
    tracing::info!(
        "sft: {} rows, {} steps of {} rows ({} × {} accumulated)",
        train.rows.len(),
        total_steps,
        rows_per_step,
        args.data.batch_size,
        args.data.grad_accum
    );
    let evaluate = |eval: &Prepared| -> f64 {
        let per_row = nll_per_row(&model, &eval.rows, args.data.batch_size, tok.pad_id);
        let (nll, n) = per_row
            .iter()
            .fold((0.0, 0), |(a, b), (x, y)| (a + x, b + y));
        nll / n.max(1) as f64
    };
    let mut eval_loss = None;

    while !session.done() && session.stop_requested().is_none() {
        let started = Instant::now();
        let indices = sampler.next_batch(rows_per_step);
        let rows: Vec<_> = indices.iter().map(|&i| &train.rows[i]).collect();
        let targets: i64 = rows
            .iter()
            .map(|r| r.loss_mask[1..].iter().sum::<i64>())
            .sum();
        let mut loss_value = 0.0;
        let mut tokens = 0i64;
        for micro in rows.chunks(args.data.batch_size) {
            let batch = collate(micro, tok.pad_id, device);
            let (nll, _) = token_nll(&model, &batch);
            let loss = nll.sum(Kind::Float) / targets.max(1) as f64;
            loss.backward();
            loss_value += loss.double_value(&[]);
            tokens += micro.iter().map(|r| r.ids.len() as i64).sum::<i64>();
        }
        let step = session.state.step;
        common::faults::hit("mid-step");
        if common::faults::nan_from(step) {
            loss_value = f64::NAN;
        }
        let outcome = optimizer_step(
            &mut opt,
            &session.schedule,
            step,
            args.optim.max_grad_norm,
            loss_value,
        );
        session.finish_step(&outcome, loss_value, sampler.position())?;
        let elapsed = started.elapsed().as_secs_f64();
        let mut scalars = vec![
            ("train/loss", loss_value),
            ("train/lr", outcome.lr),
            ("train/grad_norm", outcome.grad_norm),
            ("train/tokens_per_second", tokens as f64 / elapsed.max(1e-9)),
            ("train/skipped_steps", session.state.skipped_steps as f64),
        ];
        if let Some(eval) = &eval {
            if args.data.eval_due(session.state.step, session.at_end()) {
                let loss = evaluate(eval);
                eval_loss = Some(loss);
                scalars.push(("eval/loss", loss));
                scalars.push(("eval/perplexity", loss.exp()));
            }
        }
        session.metrics.log(session.state.step, &scalars)?;
        if session.checkpoint_due() {
            let t = Trainable {
                subdir: "",
                model: &model,
                optimizer: &opt,
                sidecar_from: &args.model,
            };
            session.save(&[t], |_| Ok(()))?;
        }
    }
    let stopped = session.stop_requested().is_some();
    if stopped {
        session.report_stop();
    } else {
        session.write_model("final", &model, &args.model)?;
    }
    let summary = TrainSummary {
        steps: session.state.step,
        final_loss: session.state.last_loss,
        eval_loss,
        stopped,
    };
    session.metrics.finish();
    Ok(summary)
}
