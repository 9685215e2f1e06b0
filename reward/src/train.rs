//! `reward train`: the ranking loss over every pair of each ranking, then the
//! normalisation that makes demonstrations score 0 on average (InstructGPT §3.5).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use common::cli::{AdapterArgs, DeviceArgs, MemoryArgs, OptimArgs, RunArgs, TrainDataArgs};
use common::scoring::{last_token_scores, score_sequences, Normalization};
use common::train::Session;
use common::trainee::micro_batches;
use common::{Head, Model, ModelOptions, Trainee, World};
use data::preference::{
    collate, prepare, sft_sequence, truncate_left, PreparedRankings, TokenizedRanking,
};
use data::sampler::Sampler;
use data::sft::Truncation;
use data::Tokenizer;
use serde::Serialize;

use crate::loss::ranking_loss;

#[derive(Debug, Clone, Args, Serialize)]
pub struct TrainArgs {
    /// Hugging Face model directory: an SFT model (its LM head is dropped and a `score`
    /// head initialised) or a reward model (its `score` head is kept).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub tokenizer: common::cli::TokenizerArgs,
    /// Rankings: {"prompt","chosen","rejected"[,"margin"]} or {"prompt","responses":[best,…]};
    /// prompt and responses may be message lists.
    #[command(flatten)]
    #[serde(flatten)]
    pub data: TrainDataArgs,
    /// SFT-format rows scored after training to centre the rewards (default: the best
    /// response of each training ranking).
    #[arg(long)]
    pub normalize_data: Option<PathBuf>,
    /// Adds this × the mean over pairs of (r_better + r_worse)² to the loss, pulling the
    /// rewards towards mean zero (Eisenstein et al. 2023; TRL's
    /// `center_rewards_coefficient`, which recommends 0.01). Off when absent.
    #[arg(long)]
    pub center_rewards_coefficient: Option<f64>,
    #[command(flatten)]
    #[serde(flatten)]
    pub adapter: AdapterArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub memory: MemoryArgs,
    /// Turn off LoRA's dropout in training (TRL's disable_dropout, true by default in
    /// RewardConfig; the adapter's lora_dropout stays in its files).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub disable_dropout: bool,
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

/// Tokenizes `path`'s rankings, cut or dropped at `max_length` tokens.
fn prepare_file(
    path: &std::path::Path,
    tok: &Tokenizer,
    args: &TrainArgs,
    max_length: usize,
) -> Result<PreparedRankings> {
    let examples = data::read_preferences(path)?;
    let prepared = prepare(&examples, tok, max_length, args.data.truncation)?;
    if prepared.truncated + prepared.dropped > 0 {
        tracing::warn!(
            "{}: {} rankings truncated and {} dropped at --max-length {}",
            path.display(),
            prepared.truncated,
            prepared.dropped,
            max_length
        );
    }
    if prepared.rows.is_empty() {
        bail!(
            "{}: no ranking is left after --max-length {}",
            path.display(),
            max_length
        );
    }
    Ok(prepared)
}

/// Ranking metrics over a set of rows (`prefix/loss`, `/accuracy`, `/margin`,
/// `/reward_mean`, `/reward_std`, `/reward_min`, `/reward_max`).
#[derive(Debug, Clone, Copy)]
struct Stats {
    loss_sum: f64,
    elements: usize,
    pairs: usize,
    correct: i64,
    margin_sum: f64,
    reward_sum: f64,
    reward_sq_sum: f64,
    rewards: usize,
    reward_min: f64,
    reward_max: f64,
}

impl Default for Stats {
    /// No row.
    fn default() -> Self {
        Stats {
            loss_sum: 0.0,
            elements: 0,
            pairs: 0,
            correct: 0,
            margin_sum: 0.0,
            reward_sum: 0.0,
            reward_sq_sum: 0.0,
            rewards: 0,
            reward_min: f64::INFINITY,
            reward_max: f64::NEG_INFINITY,
        }
    }
}

impl Stats {
    fn add_rewards(&mut self, rewards: &[f32]) {
        for &r in rewards {
            self.reward_sum += f64::from(r);
            self.reward_sq_sum += f64::from(r) * f64::from(r);
            self.reward_min = self.reward_min.min(f64::from(r));
            self.reward_max = self.reward_max.max(f64::from(r));
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
            (format!("{prefix}/reward_min"), self.reward_min),
            (format!("{prefix}/reward_max"), self.reward_max),
            (
                format!("{prefix}/reward_std"),
                (self.reward_sq_sum / n - mean * mean).max(0.0).sqrt(),
            ),
        ]
    }
}

/// Forward, loss and (when training `trainee`, whose model `model` is) backward over
/// `rows` in micro-batches of `batch_size`; the loss (with the centring term weighted by
/// `center`) is divided by `elements_total`, the number of rankings in the whole step
/// (all ranks).
fn run_rows(
    model: &Model,
    rows: &[&TokenizedRanking],
    ((batch_size, pad_id), center): ((usize, i64), f64),
    train: Option<&Trainee>,
    elements_total: f64,
) -> Stats {
    let mut stats = Stats::default();
    if let Some(trainee) = train {
        trainee.set_micro_batches(rows.len(), batch_size);
    }
    for (micro, last) in micro_batches(rows, batch_size) {
        let batch = collate(micro, pad_id, model.device());
        let rewards = last_token_scores(model, &batch.input_ids, &batch.attention_mask);
        let out = ranking_loss(&rewards, &batch.group_sizes, &batch.margins, center);
        let loss = &out.loss_sum / elements_total.max(1.0);
        if let Some(trainee) = train {
            trainee.backward(&loss, last);
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

impl Stats {
    /// The same statistics summed over the world's ranks.
    fn summed(&self, world: &World) -> Stats {
        let (reward_min, reward_max) = world.min_max((self.reward_min, self.reward_max));
        Stats {
            loss_sum: world.sum(self.loss_sum),
            elements: world.sum(self.elements as f64) as usize,
            pairs: world.sum(self.pairs as f64) as usize,
            correct: world.sum(self.correct as f64) as i64,
            margin_sum: world.sum(self.margin_sum),
            reward_sum: world.sum(self.reward_sum),
            reward_sq_sum: world.sum(self.reward_sq_sum),
            rewards: world.sum(self.rewards as f64) as usize,
            reward_min,
            reward_max,
        }
    }
}

/// What a run reads before it starts: the model, its tokenizer, the rankings to train and
/// evaluate on, and the sequences that normalise the rewards at the end.
struct Inputs {
    model: Model,
    tok: Tokenizer,
    train: PreparedRankings,
    eval: Option<PreparedRankings>,
    normalize_set: Vec<Vec<i64>>,
}

fn read_inputs(args: &TrainArgs, world: &World) -> Result<Inputs> {
    let (device, kind) = args.device.resolve_for(world);
    args.run.seed_torch();
    let opts = ModelOptions {
        disable_dropout: args.disable_dropout,
        ..args.memory.apply(
            args.adapter
                .apply(ModelOptions::new(Head::Score, device, kind)),
        )
    };
    let (mut model, tok) = Model::load_with_tokenizer(&args.model, &opts)?;
    let tok = args.tokenizer.apply(&mut model, tok)?;
    let max_length = model.cap_length(args.data.max_length, "--max-length");
    let train = prepare_file(args.data.single("reward train")?, &tok, args, max_length)?;
    let eval = args
        .data
        .eval_data
        .as_deref()
        .map(|p| prepare_file(p, &tok, args, max_length))
        .transpose()?;
    // Scored whole, unless the model's position table is shorter (then their end counts).
    let limit = model.max_positions().unwrap_or(usize::MAX);
    let normalize_set: Vec<Vec<i64>> = match &args.normalize_data {
        Some(path) => {
            let rows = data::read_sft(path)?;
            rows.iter()
                .enumerate()
                .map(|(i, ex)| {
                    let seq = sft_sequence(&tok, ex).map_err(|e| rows.locate(i, e))?;
                    Ok(truncate_left(&seq, limit, Truncation::Truncate).expect("truncate keeps"))
                })
                .collect::<data::Result<_>>()?
        }
        None => train.rows.iter().map(|r| r.sequences[0].clone()).collect(),
    };
    Ok(Inputs {
        model,
        tok,
        train,
        eval,
        normalize_set,
    })
}

pub fn run(args: &TrainArgs) -> Result<TrainSummary> {
    args.data.validate()?;
    args.optim.validate()?;
    args.run.validate()?;
    args.adapter.validate()?;
    args.memory.validate()?;
    common::cli::require(&[(
        args.center_rewards_coefficient
            .is_none_or(|c| c >= 0.0 && c.is_finite()),
        "--center-rewards-coefficient must be ≥ 0",
    )])?;
    let world = args.run.world()?;
    let Inputs {
        model,
        tok,
        train,
        eval,
        normalize_set,
    } = read_inputs(args, &world)?;
    let total_steps = args.data.total_steps(
        train.rows.len(),
        args.run.epochs,
        args.run.max_steps,
        world.size(),
    );
    let schedule = args.optim.schedule(total_steps);
    let mut trainee = Trainee::new("", model, &args.model, &args.optim, &world, schedule)?;
    let mut session = Session::start(
        "reward",
        args,
        &args.run,
        total_steps,
        world,
        &mut [&mut trainee],
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
        args.data.rows_per_step() * session.world.size()
    );
    let shape = (args.data.batch_size, tok.pad_id);
    let center = args.center_rewards_coefficient.unwrap_or(0.0);
    let mut eval_accuracy = None;
    while !session.done() && session.stop_requested().is_none() {
        let mut scalars = train_step(
            &mut session,
            &mut trainee,
            &mut sampler,
            &train,
            args,
            tok.pad_id,
        )?;
        let eval_due = args.data.eval_due(session.state.step, session.at_end());
        if let Some(eval) = eval.as_ref().filter(|_| eval_due) {
            let s = evaluate(&trainee.model, eval, (shape, center), &session.world);
            eval_accuracy = Some(s[1].1);
            scalars.extend(s);
        }
        let refs: Vec<(&str, f64)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        session.log(session.state.step, &refs)?;
        if session.checkpoint_due() {
            session.save(&[&trainee], |_| Ok(()))?;
        }
    }
    let stopped = session.stop_requested().is_some();
    let normalization = if stopped {
        session.report_stop();
        Normalization::of(&trainee.model)
    } else {
        finish(&session, &mut trainee, &normalize_set, shape)?
    };
    session.finish();
    Ok(TrainSummary {
        steps: session.state.step,
        final_loss: session.state.last_loss,
        eval_accuracy,
        normalization,
        stopped,
    })
}

/// The `eval/` scalars over every held-out ranking (spread over the ranks).
fn evaluate(
    model: &Model,
    eval: &PreparedRankings,
    (shape, center): ((usize, i64), f64),
    world: &World,
) -> Vec<(String, f64)> {
    let _guard = tch::no_grad_guard();
    let rows: Vec<_> = world.shard(&eval.rows).iter().collect();
    let n = world.sum(rows.len() as f64);
    run_rows(model, &rows, (shape, center), None, n)
        .summed(world)
        .scalars("eval")
}

/// One optimiser step over the sampler's next rankings; returns the step's scalars.
fn train_step(
    session: &mut Session,
    trainee: &mut Trainee,
    sampler: &mut Sampler,
    train: &PreparedRankings,
    args: &TrainArgs,
    pad_id: i64,
) -> Result<Vec<(String, f64)>> {
    let started = Instant::now();
    let indices = sampler.next_batch(args.data.rows_per_step() * session.world.size());
    let world = &session.world;
    let rows: Vec<_> = world
        .shard(&indices)
        .iter()
        .map(|&i| &train.rows[i])
        .collect();
    let elements = world.sum(rows.len() as f64);
    let shape = (args.data.batch_size, pad_id);
    let center = args.center_rewards_coefficient.unwrap_or(0.0);
    let stats = run_rows(
        &trainee.model,
        &rows,
        (shape, center),
        Some(trainee),
        elements,
    )
    .summed(world);
    let loss = stats.loss_sum / stats.elements.max(1) as f64;
    let outcome = trainee.step(loss);
    let aux_loss = trainee.take_aux_loss(world);
    let local_tokens: usize = rows
        .iter()
        .flat_map(|r| r.sequences.iter().map(Vec::len))
        .sum();
    let tokens = world.sum(local_tokens as f64);
    let num_tokens = session.count_tokens(tokens);
    session.finish_step(&outcome, loss, sampler.position())?;
    let mut scalars = stats.scalars("train");
    scalars.push(("num_tokens".to_string(), num_tokens));
    scalars.extend(aux_loss.map(|a| ("aux_loss".to_string(), a)));
    scalars.extend([
        ("train/lr".to_string(), outcome.lr),
        ("train/grad_norm".to_string(), outcome.grad_norm),
        (
            "train/tokens_per_second".to_string(),
            tokens / started.elapsed().as_secs_f64().max(1e-9),
        ),
        (
            "train/skipped_steps".to_string(),
            session.state.skipped_steps as f64,
        ),
    ]);
    Ok(scalars)
}

/// Centres the rewards on the normalisation set, records the pad id with which
/// `transformers` finds each sequence's last token, and writes `final/`; an average of the
/// weights (`--bema`) is a reward model of its own, centred on the same set.
fn finish(
    session: &Session,
    trainee: &mut Trainee,
    normalize_set: &[Vec<i64>],
    (batch_size, pad_id): (usize, i64),
) -> Result<Normalization> {
    let model = &mut trainee.model;
    let raw = score_sequences(model, normalize_set, batch_size, pad_id);
    let normalization = Normalization::from_rewards(&raw);
    normalization.store(model);
    model
        .config
        .raw
        .insert("pad_token_id".into(), serde_json::Value::from(pad_id));
    tracing::info!(
        "normalisation over {} sequences: bias {:.4}, std {:.4}",
        raw.len(),
        normalization.bias,
        normalization.std.unwrap_or(0.0)
    );
    session.write_model("final", &trainee.model, &trainee.source)?;
    for average in &trainee.averages {
        let raw = average.swapped_in(&trainee.model, || {
            score_sequences(&trainee.model, normalize_set, batch_size, pad_id)
        });
        Normalization::from_rewards(&raw).store(&mut trainee.model);
        average.swapped_in(&trainee.model, || {
            session.write_model(average.kind.dir_name(), &trainee.model, &trainee.source)
        })?;
        normalization.store(&mut trainee.model);
    }
    Ok(normalization)
}
