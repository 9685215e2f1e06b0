//! `sft train`: supervised fine-tuning with the loss on the completion / assistant tokens.
//!
//! One step is one optimiser step over `batch_size × grad_accum` rows; the loss is the
//! token-weighted mean over the whole accumulated batch, so it does not depend on how the
//! batch is split into micro-batches.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use common::cli::{AdapterArgs, DeviceArgs, MemoryArgs, OptimArgs, RunArgs, TrainDataArgs};
use common::train::Session;
use common::{Head, Model, ModelOptions, Trainee, World};
use data::sampler::Sampler;
use data::sft::{collate, prepare, Prepared, TokenizedSft};
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
    pub adapter: AdapterArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub memory: MemoryArgs,
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
    /// Parameters trained (the adapter's with LoRA or prompt tuning), and all of them.
    pub trainable_parameters: i64,
    pub total_parameters: i64,
}

impl TrainArgs {
    fn validate(&self) -> Result<()> {
        self.data.validate()?;
        self.run.validate()?;
        self.optim.validate()?;
        self.adapter.validate()?;
        Ok(())
    }
}

/// Tokenizes `path`'s rows, cut or dropped at `max_length` tokens.
fn prepare_file(
    path: &Path,
    tok: &data::Tokenizer,
    args: &TrainArgs,
    max_length: usize,
) -> Result<Prepared> {
    let examples = data::read_sft(path)?;
    let prepared = prepare(&examples, tok, max_length, args.data.truncation, true)?;
    if prepared.truncated + prepared.dropped > 0 {
        tracing::warn!(
            "{}: {} rows truncated and {} dropped at --max-length {}",
            path.display(),
            prepared.truncated,
            prepared.dropped,
            max_length
        );
    }
    if prepared.rows.is_empty() {
        bail!(
            "{}: no row is left to train on after --max-length {}",
            path.display(),
            max_length
        );
    }
    Ok(prepared)
}

/// Mean NLL per target token over `eval`'s rows.
fn evaluate(model: &Model, eval: &Prepared, batch_size: usize, pad_id: i64) -> f64 {
    let per_row = nll_per_row(model, &eval.rows, batch_size, pad_id);
    let (nll, n) = per_row
        .iter()
        .fold((0.0, 0), |(a, b), (x, y)| (a + x, b + y));
    nll / n.max(1) as f64
}

/// Forward and backward over this rank's rows of one step, in micro-batches; the loss is
/// divided by the target tokens of the whole step on every rank, so it is the same
/// whatever the split. Returns the step's loss and the tokens seen here.
fn accumulate(
    model: &Model,
    rows: &[&TokenizedSft],
    batch_size: usize,
    pad_id: i64,
    world: &World,
) -> (f64, i64) {
    let local_targets: i64 = rows
        .iter()
        .map(|r| r.loss_mask[1..].iter().sum::<i64>())
        .sum();
    let targets = world.sum(local_targets as f64).max(1.0);
    let (mut loss_value, mut tokens) = (0.0, 0i64);
    for micro in rows.chunks(batch_size) {
        let batch = collate(micro, pad_id, model.device());
        let (nll, _) = token_nll(model, &batch);
        let loss = nll.sum(Kind::Float) / targets;
        model.backward(&loss);
        loss_value += loss.double_value(&[]);
        tokens += micro.iter().map(|r| r.ids.len() as i64).sum::<i64>();
    }
    (world.sum(loss_value), tokens)
}

pub fn run(args: &TrainArgs) -> Result<TrainSummary> {
    args.validate()?;
    // Read everything that can be wrong before the output directory is touched.
    let (device, kind) = args.device.resolve();
    args.run.seed_torch();
    let opts = args.memory.apply(
        args.adapter
            .apply(ModelOptions::new(Head::Lm, device, kind)),
    );
    let (model, tok) = Model::load_with_tokenizer(&args.model, &opts)?;
    let max_length = model.cap_length(args.data.max_length, "--max-length");
    let train = prepare_file(&args.data.data, &tok, args, max_length)?;
    let eval = args
        .data
        .eval_data
        .as_deref()
        .map(|p| prepare_file(p, &tok, args, max_length))
        .transpose()?;

    let total_steps = args
        .data
        .total_steps(train.rows.len(), args.run.epochs, args.run.max_steps);
    let schedule = args.optim.schedule(total_steps);
    let mut trainee = Trainee::new("", model, &args.model, &args.optim, schedule);
    let world = World::single();
    let mut session = Session::start(
        "sft",
        args,
        &args.run,
        total_steps,
        world,
        &mut [&mut trainee],
    )
    .context("starting the run")?;
    let lengths = train.rows.iter().map(|r| r.ids.len()).collect();
    let mut sampler = args.data.sampler(lengths, args.run.seed);
    sampler.restore(session.state.sampler);
    tracing::info!(
        "sft: {} rows, {} steps of {} rows ({} × {} accumulated)",
        train.rows.len(),
        total_steps,
        args.data.rows_per_step(),
        args.data.batch_size,
        args.data.grad_accum
    );
    let mut eval_loss = None;
    while !session.done() && session.stop_requested().is_none() {
        let batch = Batch {
            sampler: &mut sampler,
            rows: &train,
            pad_id: tok.pad_id,
        };
        let mut scalars = train_step(&mut session, &mut trainee, batch, args)?;
        let eval_due = args.data.eval_due(session.state.step, session.at_end());
        if let Some(eval) = eval.as_ref().filter(|_| eval_due) {
            let loss = evaluate(&trainee.model, eval, args.data.batch_size, tok.pad_id);
            eval_loss = Some(loss);
            scalars.extend([("eval/loss", loss), ("eval/perplexity", loss.exp())]);
        }
        session.log(session.state.step, &scalars)?;
        if session.checkpoint_due() {
            session.save(&[&trainee], |_| Ok(()))?;
        }
    }
    let stopped = session.stop_requested().is_some();
    if stopped {
        session.report_stop();
    } else {
        session.write_model("final", &trainee.model, &args.model)?;
        if args.adapter.save_merged && trainee.model.options.lora.is_some() {
            session.write_merged("final_merged", &trainee.model, &args.model)?;
        }
    }
    session.finish();
    let (trainable_parameters, total_parameters) = trainee.parameter_counts();
    Ok(TrainSummary {
        steps: session.state.step,
        final_loss: session.state.last_loss,
        eval_loss,
        stopped,
        trainable_parameters,
        total_parameters,
    })
}

/// Where a step's rows come from.
struct Batch<'a> {
    sampler: &'a mut Sampler,
    rows: &'a Prepared,
    pad_id: i64,
}

/// One optimiser step over the sampler's next rows; returns the step's scalars.
fn train_step(
    session: &mut Session,
    trainee: &mut Trainee,
    batch: Batch,
    args: &TrainArgs,
) -> Result<Vec<(&'static str, f64)>> {
    let started = Instant::now();
    let indices = batch.sampler.next_batch(args.data.rows_per_step());
    let world = &session.world;
    let rows: Vec<_> = world
        .shard(&indices)
        .iter()
        .map(|&i| &batch.rows.rows[i])
        .collect();
    let model = &trainee.model;
    let (loss, tokens) = accumulate(model, &rows, args.data.batch_size, batch.pad_id, world);
    let outcome = trainee.step(loss, world);
    let tokens = world.sum(tokens as f64);
    session.finish_step(&outcome, loss, batch.sampler.position())?;
    Ok(vec![
        ("train/loss", loss),
        ("train/lr", outcome.lr),
        ("train/grad_norm", outcome.grad_norm),
        (
            "train/tokens_per_second",
            tokens / started.elapsed().as_secs_f64().max(1e-9),
        ),
        ("train/skipped_steps", session.state.skipped_steps as f64),
    ])
}
