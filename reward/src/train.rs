//! `reward train`: the ranking loss over every pair of each ranking, then the
//! normalisation that makes demonstrations score 0 on average (InstructGPT §3.5).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use common::cli::{DeviceArgs, OptimArgs, RunArgs};
use common::optim::AdamW;
use common::scoring::{last_token_scores, Normalization};
use common::train::{optimizer_step, Session, Trainable};
use common::{Head, Model};
use data::cli::TrainDataArgs;
use data::preference::{collate, prepare, sft_sequence, PreparedRankings};
use data::Tokenizer;
use serde::Serialize;

use crate::loss::ranking_loss;
use crate::score_sequences;

#[derive(Debug, Clone, Args, Serialize)]
pub struct TrainArgs {
    /// Hugging Face model directory: an SFT model (its LM head is dropped and a `score`
    /// head initialised) or a reward model (its `score` head is kept).
    #[arg(long)]
    pub model: PathBuf,
    /// Rankings: {"prompt","chosen","rejected"[,"margin"]} or {"prompt","responses":[best,…]};
    /// prompt and responses may be message lists.
    #[command(flatten)]
    #[serde(flatten)]
    pub data: TrainDataArgs,
    /// SFT-format rows scored after training to centre the rewards (default: the best
    /// response of each training ranking).
    #[arg(long)]
    pub normalize_data: Option<PathBuf>,
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
    pub eval_accuracy: Option<f64>,
    pub normalization: Normalization,
    /// A signal stopped the run (checkpointed; no `final/` yet).
    pub stopped: bool,
}

fn prepare_file(
    path: &std::path::Path,
    tok: &Tokenizer,
    args: &TrainArgs,
) -> Result<PreparedRankings> {
    let examples = data::read_preferences(path)?;
    let prepared = prepare(&examples, tok, args.data.max_length, args.data.truncation)?;
    if prepared.truncated + prepared.dropped > 0 {
        tracing::warn!(
            "{}: {} rankings truncated and {} dropped at --max-length {}",
            path.display(),
            prepared.truncated,
            prepared.dropped,
            args.data.max_length
        );
    }
    if prepared.rows.is_empty() {
        bail!(
            "{}: no ranking is left after --max-length {}",
            path.display(),
            args.data.max_length
        );
    }
    Ok(prepared)
}

/// Ranking metrics over a set of rows (`prefix/loss`, `/accuracy`, `/margin`,
/// `/reward_mean`, `/reward_std`).
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    loss_sum: f64,
    elements: usize,
    pairs: usize,
    correct: i64,
    margin_sum: f64,
    reward_sum: f64,
    reward_sq_sum: f64,
    rewards: usize,
}

impl Stats {
    fn add_rewards(&mut self, rewards: &[f32]) {
        for &r in rewards {
            self.reward_sum += f64::from(r);
            self.reward_sq_sum += f64::from(r) * f64::from(r);
        }
        self.rewards += rewards.len();
    }

    fn scalars(&self, prefix: &str) -> Vec<(String, f64)> {
        let n = self.rewards.max(1) as f64;
        let mean = self.reward_sum / n;
        vec![
            (
                format!("{prefix}/loss"),
                self.loss_sum / self.elements.max(1) as f64,
            ),
            (
                format!("{prefix}/accuracy"),
                self.correct as f64 / self.pairs.max(1) as f64,
            ),
            (
                format!("{prefix}/margin"),
                self.margin_sum / self.pairs.max(1) as f64,
            ),
            (format!("{prefix}/reward_mean"), mean),
            (
                format!("{prefix}/reward_std"),
                (self.reward_sq_sum / n - mean * mean).max(0.0).sqrt(),
            ),
        ]
    }
}

/// Forward, loss and (when `train`) backward over `rows` in micro-batches; the loss is
/// divided by `elements_total`, the number of rankings in the whole step.
fn run_rows(
    model: &Model,
    rows: &[&data::preference::TokenizedRanking],
    args: &TrainArgs,
    pad_id: i64,
    train: bool,
    elements_total: usize,
) -> Stats {
    let mut stats = Stats::default();
    for micro in rows.chunks(args.data.batch_size) {
        let batch = collate(micro, pad_id, model.device());
        let rewards = last_token_scores(model, &batch.input_ids, &batch.attention_mask);
        let out = ranking_loss(&rewards, &batch.group_sizes, &batch.margins);
        let loss = &out.loss_sum / elements_total.max(1) as f64;
        if train {
            loss.backward();
        }
        stats.loss_sum += out.loss_sum.double_value(&[]);
        stats.elements += micro.len();
        stats.pairs += out.pairs;
        stats.correct += out.correct;
        stats.margin_sum += out.margin_sum;
        stats.add_rewards(
            &Vec::<f32>::try_from(rewards.detach().to_device(tch::Device::Cpu)).expect("f32"),
        );
    }
    stats
}

pub fn run(args: &TrainArgs) -> Result<TrainSummary> {
    args.data.validate().map_err(anyhow::Error::msg)?;
    args.optim.validate().map_err(anyhow::Error::msg)?;
    ensure!(
        args.run.max_steps != Some(0),
        "--max-steps must be at least 1"
    );
    let (device, kind) = args.device.resolve();
    args.run.seed_torch();
    let (mut model, tok) = data::io::load_with_tokenizer(&args.model, Head::Score, device, kind)?;
    let train = prepare_file(&args.data.data, &tok, args)?;
    let eval = args
        .data
        .eval_data
        .as_deref()
        .map(|p| prepare_file(p, &tok, args))
        .transpose()?;
    let normalize_set: Vec<Vec<i64>> = match &args.normalize_data {
        Some(path) => data::read_sft(path)?
            .iter()
            .map(|ex| sft_sequence(&tok, ex))
            .collect::<data::Result<_>>()?,
        None => train.rows.iter().map(|r| r.sequences[0].clone()).collect(),
    };

    let total_steps = args
        .data
        .total_steps(train.rows.len(), args.run.epochs, args.run.max_steps);
    let mut opt = AdamW::new(model.vs.variables(), args.optim.adamw());
    let mut session = Session::start(
        "reward",
        args,
        &args.run,
        &args.optim,
        total_steps,
        &mut [("", &model, &mut opt)],
    )
    .context("starting the run")?;
    let lengths = train
        .rows
        .iter()
        .map(|r| r.sequences.iter().map(Vec::len).max().unwrap_or(0))
        .collect();
    let mut sampler = args.data.sampler(lengths, args.run.seed);
    sampler.restore(session.state.sampler);
    let pairs: usize = train
        .rows
        .iter()
        .map(|r| r.sequences.len() * (r.sequences.len() - 1) / 2)
        .sum();
    tracing::info!(
        "reward: {} rankings ({pairs} pairs), {total_steps} steps of {} rankings",
        train.rows.len(),
        args.data.rows_per_step()
    );
    let mut eval_accuracy = None;
    while !session.done() && session.stop_requested().is_none() {
        let started = Instant::now();
        let indices = sampler.next_batch(args.data.rows_per_step());
        let rows: Vec<_> = indices.iter().map(|&i| &train.rows[i]).collect();
        let stats = run_rows(&model, &rows, args, tok.pad_id, true, rows.len());
        let mut loss = stats.loss_sum / stats.elements.max(1) as f64;
        let step = session.state.step;
        common::faults::hit("mid-step");
        if common::faults::nan_from(step) {
            loss = f64::NAN;
        }
        let outcome = optimizer_step(
            &mut opt,
            &session.schedule,
            step,
            args.optim.max_grad_norm,
            loss,
        );
        session.finish_step(&outcome, loss, sampler.position())?;
        let tokens: usize = rows
            .iter()
            .flat_map(|r| r.sequences.iter().map(Vec::len))
            .sum();
        let mut scalars = stats.scalars("train");
        scalars.extend([
            ("train/lr".to_string(), outcome.lr),
            ("train/grad_norm".to_string(), outcome.grad_norm),
            (
                "train/tokens_per_second".to_string(),
                tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
            ),
            (
                "train/skipped_steps".to_string(),
                session.state.skipped_steps as f64,
            ),
        ]);
        if let Some(eval) = &eval {
            if args.data.eval_due(session.state.step, session.at_end()) {
                let _guard = tch::no_grad_guard();
                let all: Vec<_> = eval.rows.iter().collect();
                let stats = run_rows(&model, &all, args, tok.pad_id, false, all.len());
                let s = stats.scalars("eval");
                eval_accuracy = Some(s[1].1);
                scalars.extend(s);
            }
        }
        let refs: Vec<(&str, f64)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        session.metrics.log(session.state.step, &refs)?;
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
    if session.stop_requested().is_some() {
        session.report_stop();
        session.metrics.finish();
        return Ok(TrainSummary {
            steps: session.state.step,
            final_loss: session.state.last_loss,
            eval_accuracy,
            normalization: Normalization::of(&model),
            stopped: true,
        });
    }
    // Centre the rewards on the normalisation set, and record the pad id with which
    // transformers finds each sequence's last token.
    let raw = score_sequences(&model, &normalize_set, args.data.batch_size, tok.pad_id);
    let normalization = Normalization::from_rewards(&raw);
    normalization.store(&mut model);
    model
        .config
        .raw
        .insert("pad_token_id".into(), serde_json::Value::from(tok.pad_id));
    tracing::info!(
        "normalisation over {} sequences: bias {:.4}, std {:.4}",
        raw.len(),
        normalization.bias,
        normalization.std.unwrap_or(0.0)
    );
    session.write_model("final", &model, &args.model)?;
    session.metrics.finish();
    Ok(TrainSummary {
        steps: session.state.step,
        final_loss: session.state.last_loss,
        eval_accuracy,
        normalization,
        stopped: false,
    })
}
