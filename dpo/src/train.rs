//! `dpo train`: the policy optimised on preference pairs against a frozen reference.
//!
//! One step is one optimiser step over `batch_size × grad_accum` pairs; its loss is the
//! mean pair loss over the whole step (plus RPO's term), whatever the micro-batching.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use common::averaging::BemaRefArgs;
use common::cli::{
    AdapterArgs, DeviceArgs, MemoryArgs, OptimArgs, RunArgs, SyncRefArgs, TrainDataArgs,
};
use common::train::Session;
use common::{Head, Model, ModelOptions, Trainee, World};
use data::pairs::{prepare, prepare_unpaired, PairLimits, PreparedPairs};
use data::sampler::Sampler;
use data::Tokenizer;
use serde::Serialize;

use crate::kto::{kl_estimate, run_unpaired};
use crate::loss::{LossArgs, LossType};
use crate::{run_pairs, Reference, StepTotals, StoredRefLogps};

/// Where `--precompute-ref-logprobs` keeps the reference's log-probs in the run.
pub const REF_LOGPS: &str = "ref_logps.json";

#[derive(Debug, Clone, Args, Serialize)]
pub struct TrainArgs {
    /// Hugging Face model directory to optimise (the SFT model), or a LoRA/prompt-tuning
    /// adapter directory.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub tokenizer: common::cli::TokenizerArgs,
    /// The frozen reference (default: the starting model; with a fresh adapter, the model
    /// with its adapter off).
    #[arg(long)]
    pub ref_model: Option<PathBuf>,
    /// Preference rows: {"prompt","chosen","rejected"} or a ranking {"prompt","responses"}
    /// (all its pairs), text or conversations, as `reward train` reads them. --batch-size
    /// counts pairs; --max-length keeps each sequence's start (TRL's keep_start).
    #[command(flatten)]
    #[serde(flatten)]
    pub data: TrainDataArgs,
    /// Keep only the last N tokens of each prompt (before --max-length applies).
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    #[command(flatten)]
    #[serde(flatten)]
    pub loss: LossArgs,
    /// Compute the reference's log-probs once before training (kept in OUT/ref_logps.json
    /// and reused on --resume), so the reference is not held during training (also
    /// --precompute-ref-log-probs, TRL's `precompute_ref_log_probs`).
    #[arg(long, alias = "precompute-ref-log-probs")]
    pub precompute_ref_logprobs: bool,
    /// Rows per forward of that precomputation (TRL's `precompute_ref_batch_size`;
    /// default --batch-size): a frozen forward holds no gradients, so it can take more.
    #[arg(long, requires = "precompute_ref_logprobs")]
    pub precompute_ref_batch_size: Option<usize>,
    #[command(flatten)]
    #[serde(flatten)]
    pub sync: SyncRefArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub bema_ref: BemaRefArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub adapter: AdapterArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub memory: MemoryArgs,
    /// Turn off LoRA's dropout in training (TRL's disable_dropout, true by default in
    /// DPOConfig and KTOConfig; the adapter's lora_dropout stays in its files).
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
    pub eval_loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
    /// A signal stopped the run (checkpointed; no `final/` yet).
    pub stopped: bool,
}

/// The pairs of `path`, tokenized and cut to the limits; an error when none is left. With
/// `unpaired` (an unpaired loss: the batch size its KL pairing rotates within), the
/// unpaired completions of KTO's rows or of preference rows instead.
pub fn prepare_file(
    path: &Path,
    tok: &Tokenizer,
    limits: PairLimits,
    (unpaired, gold): (Option<usize>, bool),
) -> Result<PreparedPairs> {
    let prepared = match unpaired {
        None => {
            let rows = data::read_preferences(path)?;
            // --tpo-alpha: every row needs its gold completion.
            if let Some(i) = rows.iter().position(|row| gold && row.gold.is_none()) {
                return Err(rows
                    .error(i, Some("reference"), "missing: --tpo-alpha trains on each row's gold completion (TPO's triple-preference rows: 'chosen', 'rejected' and 'reference')")
                    .into());
            }
            prepare(&rows, tok, limits)?
        }
        Some(chunk) => prepare_unpaired(&data::read_feedback(path)?, tok, limits, chunk)?,
    };
    if prepared.truncated + prepared.dropped > 0 {
        tracing::warn!(
            "{}: {} pairs truncated and {} dropped (--max-length {}, --max-prompt-length {:?})",
            path.display(),
            prepared.truncated,
            prepared.dropped,
            limits.max_length,
            limits.max_prompt_length
        );
    }
    if prepared.pairs.is_empty() {
        bail!(
            "{}: no pair is left after --max-length {}",
            path.display(),
            limits.max_length
        );
    }
    Ok(prepared)
}

/// The data a run reads before it starts.
struct Inputs {
    tok: Tokenizer,
    train: PreparedPairs,
    eval: Option<PreparedPairs>,
}

/// The policy, its reference and the data, all checked before the run directory is touched.
fn read_inputs(args: &TrainArgs, world: &World) -> Result<(Model, Reference, Inputs)> {
    let (device, kind) = args.device.resolve_for(world);
    args.run.seed_torch();
    let opts = ModelOptions {
        disable_dropout: args.disable_dropout,
        ..args.memory.apply(
            args.adapter
                .apply(ModelOptions::new(Head::Lm, device, kind)),
        )
    };
    let (mut policy, tok) = Model::load_with_tokenizer(&args.model, &opts)?;
    let tok = args.tokenizer.apply(&mut policy, tok)?;
    let reference = match args.loss.uses_reference() {
        true => Reference::load(&policy, &args.model, args.ref_model.as_deref(), &opts)?,
        false => Reference::Free,
    };
    let limits = PairLimits {
        max_prompt_length: args.max_prompt_length,
        max_length: policy.cap_length(args.data.max_length, "--max-length"),
        truncation: args.data.truncation,
    };
    let unpaired = args.loss.unpaired().map(|_| args.data.batch_size);
    let gold = args.loss.tpo_alpha != 0.0;
    let train = prepare_file(
        args.data.single("dpo train")?,
        &tok,
        limits,
        (unpaired, gold),
    )?;
    let eval = args
        .data
        .eval_data
        .as_deref()
        .map(|p| prepare_file(p, &tok, limits, (unpaired, gold)))
        .transpose()?;
    Ok((policy, reference, Inputs { tok, train, eval }))
}

/// With `--precompute-ref-logprobs`: the stored reference log-probs of a resumed run, or
/// computed now and stored; the reference model is released either way. Returns the
/// training and the evaluation pairs' references.
fn precompute(
    session: &Session,
    reference: Reference,
    inputs: &Inputs,
    policy: &Model,
    (batch_size, ld_alpha): (usize, Option<f64>),
) -> Result<(Reference, Reference)> {
    let path = session.run.root.join(REF_LOGPS);
    let eval_pairs = inputs.eval.as_ref().map_or(&[][..], |e| &e.pairs[..]);
    let stored = if session.resumed_from.is_some() && path.exists() {
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        let stored: StoredRefLogps = serde_json::from_str(&text)
            .with_context(|| format!("{}: not the reference log-probs of a run", path.display()))?;
        if stored.train.len() != inputs.train.pairs.len() || stored.eval.len() != eval_pairs.len() {
            bail!(
                "{}: holds the reference log-probs of {} + {} pairs, the data now has {} + {}: resume with the data the run started with",
                path.display(),
                stored.train.len(),
                stored.eval.len(),
                inputs.train.pairs.len(),
                eval_pairs.len()
            );
        }
        if stored.ld_alpha != ld_alpha {
            bail!(
                "{}: holds reference log-probs weighted with --ld-alpha {:?}, the run now asks for {:?}: resume with the --ld-alpha the run started with",
                path.display(),
                stored.ld_alpha,
                ld_alpha
            );
        }
        tracing::info!("reference log-probs read from {}", path.display());
        stored
    } else {
        let shape = (batch_size, inputs.tok.pad_id);
        let started = Instant::now();
        let stored = StoredRefLogps {
            train: reference.precompute(policy, &inputs.train.pairs, shape, ld_alpha),
            eval: reference.precompute(policy, eval_pairs, shape, ld_alpha),
            ld_alpha,
        };
        if session.world.is_main() {
            let json = serde_json::to_string(&stored).expect("serialises");
            common::checkpoint::write_atomic(&path, json.as_bytes())?;
        }
        tracing::info!(
            "reference log-probs of {} pairs precomputed in {:.1}s",
            stored.train.len() + stored.eval.len(),
            started.elapsed().as_secs_f64()
        );
        stored
    };
    Ok((
        Reference::Precomputed(stored.train),
        Reference::Precomputed(stored.eval),
    ))
}

pub fn run(args: &TrainArgs) -> Result<TrainSummary> {
    args.data.validate()?;
    args.optim.validate()?;
    args.run.validate()?;
    args.adapter.validate()?;
    args.memory.validate()?;
    args.loss.validate()?;
    args.sync.validate()?;
    args.bema_ref.validate(&args.optim.bema)?;
    let moves = args.sync.sync_ref_model || args.bema_ref.bema_update_ref_model;
    common::cli::require(&[
        (
            !(args.sync.sync_ref_model && args.bema_ref.bema_update_ref_model),
            "--sync-ref-model and --bema-update-ref-model both move the reference: use one of them",
        ),
        (
            !(args.sync.sync_ref_model && args.precompute_ref_logprobs),
            "--sync-ref-model moves the reference, whose log-probs --precompute-ref-logprobs computes once: use one of them",
        ),
        (
            !(args.bema_ref.bema_update_ref_model && args.precompute_ref_logprobs),
            "--bema-update-ref-model moves the reference, whose log-probs --precompute-ref-logprobs computes once: use one of them",
        ),
        (
            args.loss.uses_reference()
                || !(args.ref_model.is_some() || args.precompute_ref_logprobs || moves),
            "the loss is reference-free (--reference-free, simpo or orpo): --ref-model, --precompute-ref-logprobs, --sync-ref-model and --bema-update-ref-model do not apply",
        ),
        (
            args.precompute_ref_batch_size.is_none_or(|b| b > 0),
            "--precompute-ref-batch-size must be at least 1",
        ),
        (
            args.precompute_ref_batch_size.is_none() || args.loss.unpaired() != Some(LossType::Kto),
            "--precompute-ref-batch-size with --loss-type kto: its KL estimate pairs each completion with another of its batch, so the reference is scored in the training batches",
        ),
        (
            args.loss.unpaired() != Some(LossType::Kto) || args.data.batch_size > 1,
            "--loss-type kto needs --batch-size ≥ 2: its KL estimate scores each completion after another one's prompt within a batch",
        ),
    ])?;
    let world = args.run.world()?;
    let (policy, reference, inputs) = read_inputs(args, &world)?;
    if moves {
        let option = match args.sync.sync_ref_model {
            true => "--sync-ref-model",
            false => "--bema-update-ref-model",
        };
        match &reference {
            Reference::Model(m) => common::sync_ref::check(m, &policy)?,
            _ => anyhow::bail!("{option} needs a reference copy to move: with a fresh LoRA or prompt-tuning adapter the reference is the policy with its adapter off (TRL refuses it with PEFT too)"),
        }
    }
    let total_steps = args.data.total_steps(
        inputs.train.pairs.len(),
        args.run.epochs,
        args.run.max_steps,
        world.size(),
    );
    let schedule = args.optim.schedule(total_steps);
    let mut trainee = Trainee::new("", policy, &args.model, &args.optim, &world, schedule)?;
    let mut session = Session::start(
        "dpo",
        args,
        &args.run,
        total_steps,
        world,
        &mut [&mut trainee],
    )
    .context("starting the run")?;
    let (train_ref, eval_ref) = if args.precompute_ref_logprobs {
        let (t, e) = precompute(
            &session,
            reference,
            &inputs,
            &trainee.model,
            (
                args.precompute_ref_batch_size
                    .unwrap_or(args.data.batch_size),
                args.loss.ld_alpha,
            ),
        )?;
        (t, Some(e))
    } else {
        (reference, None)
    };
    if let (Reference::Model(m), Some(dir)) = (&train_ref, &session.resumed_from) {
        common::sync_ref::restore(m, dir)?;
    }
    let lengths = inputs.train.pairs.iter().map(|p| p.len()).collect();
    let mut sampler = args.data.sampler(lengths, args.run.seed);
    sampler.restore(session.state.sampler);
    let unit = match args.loss.unpaired() {
        Some(_) => "completions",
        None => "pairs",
    };
    tracing::info!(
        "dpo: {} {unit}, {total_steps} steps of {} {unit}, {:?} loss, β {}",
        inputs.train.pairs.len(),
        args.data.rows_per_step() * session.world.size(),
        args.loss.loss_type,
        args.loss.beta
    );
    if args.loss.unpaired().is_some() {
        let desirable = inputs.train.labels.iter().filter(|&&l| l).count();
        tracing::info!(
            "dpo: {desirable} desirable and {} undesirable completions",
            inputs.train.labels.len() - desirable
        );
    }
    let pad_id = inputs.tok.pad_id;
    let (mut eval_loss, mut eval_accuracy) = (None, None);
    while !session.done() && session.stop_requested().is_none() {
        let data = StepData {
            sampler: &mut sampler,
            pairs: &inputs.train,
            reference: &train_ref,
            pad_id,
        };
        let mut scalars = train_step(&mut session, &mut trainee, data, args)?;
        let step = session.state.step;
        if let (Reference::Model(m), true) = (&train_ref, args.sync.due(step)) {
            common::sync_ref::mix(m, &trainee.model, args.sync.ref_model_mixup_alpha);
        }
        if let (Reference::Model(m), true) = (&train_ref, args.bema_ref.due(step)) {
            let average = trainee.averages.first();
            common::sync_ref::take_average(m, &trainee.model, average, &session.world);
        }
        let eval_due = args.data.eval_due(session.state.step, session.at_end());
        if let Some(eval) = inputs.eval.as_ref().filter(|_| eval_due) {
            let reference = eval_ref.as_ref().unwrap_or(&train_ref);
            let shape = (args.data.batch_size, pad_id);
            let (loss, accuracy, named) =
                evaluate(&trainee.model, reference, eval, shape, &args.loss);
            (eval_loss, eval_accuracy) = (Some(loss), accuracy);
            scalars.extend(named.into_iter().map(|(k, v)| (format!("eval/{k}"), v)));
        }
        let refs: Vec<(&str, f64)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        session.log(session.state.step, &refs)?;
        if session.checkpoint_due() {
            // A reference that has moved is part of the run's state.
            let moved = match &train_ref {
                Reference::Model(m)
                    if args.sync.has_moved(step) || args.bema_ref.has_moved(step) =>
                {
                    Some(m)
                }
                _ => None,
            };
            session.save(&[&trainee], |dir| match moved {
                Some(m) => Ok(common::sync_ref::save(m, dir)?),
                None => Ok(()),
            })?;
        }
    }
    let stopped = session.stop_requested().is_some();
    if stopped {
        session.report_stop();
    } else {
        session.write_model("final", &trainee.model, &args.model)?;
        session.write_averages(&trainee)?;
        if args.adapter.save_merged && trainee.model.options.lora.is_some() {
            session.write_merged("final_merged", &trainee.model, &args.model)?;
        }
    }
    session.finish();
    Ok(TrainSummary {
        steps: session.state.step,
        final_loss: session.state.last_loss,
        eval_loss,
        eval_accuracy,
        stopped,
    })
}

/// The loss, the accuracy (pairs only) and the metrics of every held-out pair or
/// completion.
fn evaluate(
    model: &Model,
    reference: &Reference,
    eval: &PreparedPairs,
    shape: (usize, i64),
    args: &LossArgs,
) -> (f64, Option<f64>, Vec<(&'static str, f64)>) {
    let pairs: Vec<_> = eval.pairs.iter().enumerate().collect();
    if args.unpaired().is_some() {
        let s = crate::kto::evaluate(model, reference, (&pairs, &eval.labels), shape, args).0;
        return (s.loss(), None, s.named());
    }
    let s = run_pairs(model, reference, &pairs, shape, args, None).0;
    (
        s.loss(args),
        Some(s.correct / s.pairs.max(1.0)),
        s.named(args),
    )
}

/// Where a step's pairs come from.
struct StepData<'a> {
    sampler: &'a mut Sampler,
    pairs: &'a PreparedPairs,
    reference: &'a Reference,
    pad_id: i64,
}

/// One optimiser step over the sampler's next pairs; returns the step's scalars.
fn train_step(
    session: &mut Session,
    trainee: &mut Trainee,
    data: StepData,
    args: &TrainArgs,
) -> Result<Vec<(String, f64)>> {
    let started = Instant::now();
    let indices = data
        .sampler
        .next_batch(args.data.rows_per_step() * session.world.size());
    let world = &session.world;
    let pairs: Vec<_> = world
        .shard(&indices)
        .iter()
        .map(|&i| (i, &data.pairs.pairs[i]))
        .collect();
    let shape = (args.data.batch_size, data.pad_id);
    let (loss, named) = if args.loss.unpaired().is_some() {
        // KTO: the KL estimate of the whole step first, then its completions' losses.
        let kl = kl_estimate(
            &trainee.model,
            data.reference,
            &pairs,
            shape,
            (&args.loss, world),
        );
        let completions = world.sum(pairs.len() as f64);
        let (stats, _) = run_unpaired(
            &trainee.model,
            data.reference,
            (&pairs, &data.pairs.labels),
            shape,
            (&args.loss, kl),
            Some((completions, trainee)),
        );
        let stats = stats.summed(world);
        (stats.loss(), stats.named())
    } else {
        let totals = StepTotals::of(&pairs, world);
        let (stats, _) = run_pairs(
            &trainee.model,
            data.reference,
            &pairs,
            shape,
            &args.loss,
            Some((totals, trainee)),
        );
        let stats = stats.summed(world);
        (stats.loss(&args.loss), stats.named(&args.loss))
    };
    let outcome = trainee.step(loss);
    let aux_loss = trainee.take_aux_loss(world);
    // The tokens of every sequence run (prompt and completion; TPO's gold ones too).
    let local_tokens: usize = pairs
        .iter()
        .map(|(_, p)| {
            let gold = match p.gold.is_empty() {
                true => 0,
                false => p.prompt.len() + p.gold.len(),
            };
            2 * p.prompt.len() + p.chosen.len() + p.rejected.len() + gold
        })
        .sum();
    let tokens = world.sum(local_tokens as f64);
    // TRL's count: the sequences trained on (KTO's: each prompt and completion once, not the
    // mismatched ones its KL estimate reads).
    let num_tokens = match args.loss.unpaired() {
        Some(_) => {
            let trained: usize = pairs
                .iter()
                .map(|(_, p)| p.prompt.len() + p.chosen.len())
                .sum();
            session.count_tokens(world.sum(trained as f64))
        }
        None => session.count_tokens(tokens),
    };
    session.finish_step(&outcome, loss, data.sampler.position())?;
    let mut scalars: Vec<(String, f64)> = named
        .into_iter()
        .map(|(k, v)| match k {
            "loss" => ("train/loss".to_string(), v),
            _ => (k.to_string(), v),
        })
        .collect();
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
        ("num_tokens".to_string(), num_tokens),
    ]);
    scalars.extend(aux_loss.map(|a| ("aux_loss".to_string(), a)));
    Ok(scalars)
}
