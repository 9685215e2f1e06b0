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
use common::trainee::micro_batches;
use common::{Head, Model, ModelOptions, Trainee, World};
use data::packing;
use data::sampler::{Mixture, RowOrder};
use data::sft::{collate, prepare, Prepared, TokenizedSft};
use serde::Serialize;
use tch::Kind;

use crate::distill::{self, Completions, DistillArgs};
use crate::eval::{nll_per_row, token_means, token_nll_with};
use crate::gold;

#[derive(Debug, Clone, Args, Serialize)]
pub struct TrainArgs {
    /// Hugging Face model directory to fine-tune (weights, config.json, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub tokenizer: common::cli::TokenizerArgs,
    /// Demonstrations ({"prompt","completion"}, {"messages"} or {"text"}) and eval rows.
    #[command(flatten)]
    #[serde(flatten)]
    pub data: TrainDataArgs,
    /// Pack rows into sequences of up to --max-length tokens (--packing-strategy, TRL's
    /// `packing`): no padding; --batch-size then counts packed sequences.
    #[arg(long)]
    pub packing: bool,
    /// How rows are packed (TRL's `packing_strategy`): bfd (best-fit decreasing; longer
    /// rows cut to --max-length; positions restart at each row and attention never crosses
    /// rows), bfd_split (the same, longer rows first cut into pieces of --max-length, so no
    /// token is lost) or wrapped (the rows run together and cut every --max-length tokens:
    /// attention across rows, as pretraining packs).
    #[arg(long, default_value = "bfd")]
    pub packing_strategy: packing::Strategy,
    /// Pack --eval-data too (TRL's `eval_packing`; default: as --packing).
    #[arg(long, action = clap::ArgAction::Set)]
    pub eval_packing: Option<bool>,
    #[command(flatten)]
    #[serde(flatten)]
    pub loss_scope: crate::eval::LossScopeArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub row_args: crate::eval::RowArgs,
    /// The per-token loss: nll (the negative log-likelihood) or dft (Dynamic Fine-Tuning,
    /// Wu et al. 2025: each token's NLL weighted by its probability, held constant; TRL's
    /// `loss_type="dft"`). Evaluation always reports the NLL.
    #[arg(long, value_enum, default_value = "nll")]
    pub loss_type: SftLoss,
    /// NEFTune (Jain et al. 2023; transformers' `neftune_noise_alpha`, e.g. 5): uniform
    /// noise in ±α/√(T·H) added to the input embeddings of each training forward (a batch
    /// of T tokens, hidden size H); evaluation and generation see none.
    #[arg(long)]
    pub neftune_noise_alpha: Option<f64>,
    /// Knowledge distillation from a teacher (TRL's GKD): --teacher-model and its options.
    #[command(flatten)]
    #[serde(flatten)]
    pub distill: DistillArgs,
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

/// `--loss-type` of `sft train`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SftLoss {
    #[default]
    Nll,
    Dft,
}

impl SftLoss {
    /// The per-token loss of per-token NLLs `nll` (0 off the targets): the NLL itself, or
    /// DFT's `sg(p)·(−log p)` with `p = e^(−nll)`.
    pub fn per_token(self, nll: &tch::Tensor) -> tch::Tensor {
        match self {
            SftLoss::Nll => nll.shallow_clone(),
            SftLoss::Dft => nll * (-nll).exp().detach(),
        }
    }
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
        self.memory.validate()?;
        self.distill.validate()?;
        let teacher = self.distill.teacher_model.is_some();
        let narrow = self.loss_scope.completion_only_loss && self.loss_scope.assistant_only_loss;
        common::cli::require(&[
            (
                !teacher || narrow,
                "--teacher-model samples completions of each row's prompt: leave --completion-only-loss and --assistant-only-loss on",
            ),
            (
                !teacher || self.loss_type == SftLoss::Nll,
                "--loss-type dft with --teacher-model: the loss is then the distillation's generalized JSD",
            ),
            (
                !((self.packing || self.eval_packing()) && self.distill.gold.use_uld_loss),
                "--packing or --eval-packing with --use-uld-loss is not supported: the teacher reads each row's prompt and completion again in its own tokens, and a packed sequence has several",
            ),
            (
                !(teacher && self.packing && self.distill.samples()),
                "--packing with sampled completions (--lmbda > 0 or --seq-kd) is not supported: a packed sequence has several prompts; use --lmbda 0 without --seq-kd, or no packing",
            ),
            (
                self.neftune_noise_alpha.is_none_or(|a| a > 0.0 && a.is_finite()),
                "--neftune-noise-alpha must be > 0",
            ),
            (!(self.packing && self.data.grouped()), "--group-by-length has nothing to group with --packing (packed sequences are all about --max-length long)"),
            (
                self.packing_strategy == packing::Strategy::Bfd || self.packing || self.eval_packing(),
                "--packing-strategy applies with --packing or --eval-packing true",
            ),
            (
                !(self.packing_strategy.cuts_rows() && self.data.truncation == data::sft::Truncation::Drop),
                "--truncation drop keeps rows whole or not at all: --packing-strategy bfd_split and wrapped cut long rows themselves",
            ),
            (!((self.packing || self.eval_packing()) && (self.adapter.prompt_tuning_tokens.is_some() || self.adapter.prefix_tuning_tokens.is_some())), "--packing with --prompt-tuning-tokens or --prefix-tuning-tokens is not supported (the virtual tokens go before one row, not before each packed row)"),
        ])?;
        Ok(())
    }

    /// Whether --eval-data is packed (TRL's `eval_packing`, else as --packing).
    fn eval_packing(&self) -> bool {
        self.eval_packing.unwrap_or(self.packing)
    }

    /// The longest row a file is tokenized to: `max_length`, or whole (`usize::MAX`) when
    /// its rows are `packed` by a strategy that cuts them itself.
    fn row_limit(&self, packed: bool, max_length: usize) -> usize {
        match packed && self.packing_strategy.cuts_rows() {
            true => usize::MAX,
            false => max_length,
        }
    }

    /// `rows` of one file packed as --packing-strategy says.
    fn pack(&self, rows: &[TokenizedSft], max_length: usize) -> Vec<TokenizedSft> {
        packing::pack_with(rows, max_length, self.packing_strategy)
    }
}

/// Tokenizes `path`'s rows, cut or dropped at `max_length` tokens (whole with `max_length`
/// `usize::MAX`: packed by a strategy that cuts them itself). Prompt-only rows
/// (`{"prompt"}` without a completion, TRL's `DistillationTrainer` data) are read as
/// prompts without targets where every step samples its completions
/// (`prompts_allowed`).
fn prepare_file(
    path: &Path,
    tok: &data::Tokenizer,
    (args, prompts_allowed): (&TrainArgs, bool),
    max_length: usize,
) -> Result<Prepared> {
    if prompt_only(path)? {
        anyhow::ensure!(
            prompts_allowed,
            "{}: prompt-only rows (\"prompt\" without \"completion\") have nothing to learn from unless every step samples its completions: give --teacher-model with --lmbda 1 or --seq-kd (TRL's DistillationTrainer), as training data",
            path.display()
        );
        let mut prompts = data::read_prompts(path)?;
        if let Some(file) = &args.distill.tools.tools {
            let schemas = common::tools::read_schemas(file)?;
            for p in prompts.iter_mut() {
                p.template.tools.get_or_insert_with(|| schemas.clone());
            }
        }
        let rows = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let ids = tok.encode_prompt(p).map_err(|e| prompts.locate(i, e))?;
                let targets = vec![0; ids.len()];
                Ok(TokenizedSft::new(ids, targets))
            })
            .collect::<data::Result<Vec<_>>>()?;
        return Ok(Prepared {
            kept: (0..rows.len()).collect(),
            rows,
            ..Prepared::default()
        });
    }
    let examples = data::read_sft_with(path, &args.row_args.dataset_text_field)?;
    let prepared = prepare(
        &examples,
        tok,
        (max_length, args.data.truncation),
        true,
        args.loss_scope.scope(),
    )?;
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

/// Whether `path`'s first row is prompt-only: a `prompt` and no `completion`.
fn prompt_only(path: &Path) -> Result<bool> {
    let rows = data::rows::read(path, |row| Ok(row.has("prompt") && !row.has("completion")))?;
    Ok(rows[0])
}

/// The training rows: one file's, or (a mixture) every file's in order, each file with
/// its name for `train/loss/<name>` and where its rows start.
struct TrainRows {
    rows: Vec<TokenizedSft>,
    names: Vec<String>,
    starts: Vec<usize>,
}

impl TrainRows {
    fn read(args: &TrainArgs, tok: &data::Tokenizer, max_length: usize) -> Result<TrainRows> {
        let (mut rows, mut names, mut starts) = (vec![], vec![], vec![]);
        for spec in &args.data.data {
            let stem = spec
                .path
                .file_stem()
                .map_or("data".into(), |s| s.to_string_lossy().into_owned());
            let name = if names.contains(&stem) {
                format!("{stem}_{}", names.len())
            } else {
                stem
            };
            starts.push(rows.len());
            let samples_all = args.distill.teacher_model.is_some()
                && (args.distill.lmbda >= 1.0 || args.distill.seq_kd);
            let limit = args.row_limit(args.packing, max_length);
            let prepared = prepare_file(&spec.path, tok, (args, samples_all), limit)?.rows;
            if args.packing {
                let packs = args.pack(&prepared, max_length);
                tracing::info!(
                    "{}: {} rows packed into {} sequences of up to {max_length} tokens ({:.1}% full)",
                    spec.path.display(),
                    prepared.len(),
                    packs.len(),
                    100.0 * packing::fill(&packs, max_length)
                );
                rows.extend(packs);
            } else {
                rows.extend(prepared);
            }
            names.push(name);
        }
        Ok(TrainRows {
            rows,
            names,
            starts,
        })
    }

    fn sizes(&self) -> Vec<usize> {
        let mut ends = self.starts[1..].to_vec();
        ends.push(self.rows.len());
        ends.iter().zip(&self.starts).map(|(e, s)| e - s).collect()
    }

    /// The training order, and the rows in one epoch of it.
    fn order(&self, args: &TrainArgs) -> (RowOrder, usize) {
        if self.names.len() == 1 {
            let lengths = self.rows.iter().map(|r| r.ids.len()).collect();
            return (
                RowOrder::One(args.data.sampler(lengths, args.run.seed)),
                self.rows.len(),
            );
        }
        let sizes = self.sizes();
        let counts = args.data.mixture_counts(&sizes);
        tracing::info!(
            "sft: a mixture of {} datasets, rows per epoch: {}",
            self.names.len(),
            self.names
                .iter()
                .zip(&counts)
                .map(|(n, c)| format!("{n} {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mix = Mixture::new(&sizes, counts, args.run.seed);
        let len = mix.epoch_len();
        (RowOrder::Mix(mix), len)
    }

    fn dataset_of(&self, row: usize) -> usize {
        self.starts.partition_point(|&s| s <= row) - 1
    }

    /// `train/loss/<name>` of each dataset with rows in the step: the summed NLL of its
    /// rows (`row_nll`, of this rank's `indices`) over their target tokens, on all ranks
    /// (`per_row`: each row's loss, over the rows).
    fn loss_by_dataset(
        &self,
        indices: &[usize],
        (row_nll, per_row): (&[f64], bool),
        world: &World,
    ) -> Vec<(String, f64)> {
        let mut out = vec![];
        for (m, name) in self.names.iter().enumerate() {
            let (mut nll, mut n) = (0.0, 0.0);
            for (&i, sum) in indices.iter().zip(row_nll) {
                if self.dataset_of(i) == m {
                    nll += sum;
                    n += match per_row {
                        true => 1.0,
                        false => self.rows[i].loss_mask[1..].iter().sum::<i64>() as f64,
                    };
                }
            }
            let (nll, n) = (world.sum(nll), world.sum(n));
            if n > 0.0 {
                out.push((format!("train/loss/{name}"), nll / n));
            }
        }
        out
    }
}

/// Means per target token over `eval`'s rows: the NLL, the entropy and the argmax hits.
fn evaluate(model: &Model, eval: &Prepared, batch_size: usize, pad_id: i64) -> (f64, f64, f64) {
    token_means(&nll_per_row(model, &eval.rows, batch_size, pad_id))
}

/// What [`accumulate`] measured of this rank's rows.
struct Accumulated {
    /// The step's loss (every rank's).
    loss: f64,
    /// This rank's tokens (prompt and completion).
    tokens: i64,
    /// With `row_nll`: each row's summed loss (with --use-uld-loss, its loss).
    per_row: Vec<f64>,
    /// IW-OPD's statistics of this rank's tokens.
    iw_opd: distill::IwOpdStats,
    /// GOLD's hybrid loss: Σ over this rank's rows of its matched and unmatched parts.
    uld_parts: (f64, f64),
    /// This rank's rows.
    rows: f64,
    /// The NLL's targets here, and Σ over them of the entropy and of the argmax hits
    /// (TRL's `entropy`, `mean_token_accuracy`; with a teacher, the JSD's entropy only).
    targets: f64,
    entropy_sum: f64,
    top1: f64,
}

impl Accumulated {
    /// Nothing yet, of `rows` rows holding `targets` target tokens.
    fn new(rows: usize, targets: f64) -> Accumulated {
        Accumulated {
            loss: 0.0,
            tokens: 0,
            per_row: vec![],
            iw_opd: distill::IwOpdStats::default(),
            uld_parts: (0.0, 0.0),
            rows: rows as f64,
            targets,
            entropy_sum: 0.0,
            top1: 0.0,
        }
    }

    /// TRL's `entropy` and `mean_token_accuracy` of the step, over every rank's targets.
    fn token_metrics(&self, world: &World) -> Vec<(String, f64)> {
        let [entropy, top1, targets] = world.sums([self.entropy_sum, self.top1, self.targets]);
        let n = targets.max(1.0);
        vec![
            ("entropy".into(), entropy / n),
            ("mean_token_accuracy".into(), top1 / n),
        ]
    }

    /// TRL's GOLD `matched_loss` and `unmatched_loss` of the hybrid loss: means over every
    /// rank's rows.
    fn uld_metrics(&self, world: &World) -> Vec<(String, f64)> {
        let [matched, unmatched, rows] =
            world.sums([self.uld_parts.0, self.uld_parts.1, self.rows]);
        let n = rows.max(1.0);
        vec![
            ("matched_loss".into(), matched / n),
            ("unmatched_loss".into(), unmatched / n),
        ]
    }
}

/// A per-token loss `[B, T − 1]`'s share of a step of `targets` target tokens, and each
/// row's sum.
fn per_token(loss: &tch::Tensor, targets: f64) -> (tch::Tensor, tch::Tensor) {
    (
        loss.sum(Kind::Float) / targets,
        loss.sum_dim_intlist([1].as_slice(), false, Kind::Float),
    )
}

/// Forward and backward over this rank's rows of one step, in micro-batches; the loss is
/// divided by the target tokens of the whole step on every rank, so it is the same
/// whatever the split. Returns the step's loss, the tokens seen here, (with `row_nll`, for
/// a mixture's per-dataset losses) each row's summed loss (`loss_type`'s), and what the
/// step logs of this rank's tokens.
fn accumulate(
    trainee: &Trainee,
    rows: &[&TokenizedSft],
    (batch_size, tok): (usize, &data::Tokenizer),
    (loss_type, teacher): (SftLoss, Option<(&Teacher, &DistillArgs)>),
    world: &World,
    row_nll: bool,
) -> Result<Accumulated> {
    let local_targets: i64 = rows
        .iter()
        .map(|r| r.loss_mask[1..].iter().sum::<i64>())
        .sum();
    let targets = world.sum(local_targets as f64).max(1.0);
    let all_rows = world.sum(rows.len() as f64).max(1.0);
    let mut out = Accumulated::new(rows.len(), local_targets as f64);
    let model = &trainee.model;
    trainee.set_micro_batches(rows.len(), batch_size);
    for (micro, last) in micro_batches(rows, batch_size) {
        let (loss, row_losses) = micro_loss(
            model,
            (micro, tok),
            (loss_type, teacher),
            (targets, all_rows),
            &mut out,
        )?;
        if row_nll {
            let sums = row_losses.detach().to_kind(Kind::Double);
            out.per_row
                .extend(Vec::<f64>::try_from(sums.to_device(tch::Device::Cpu)).expect("cpu f64"));
        }
        trainee.backward(&loss, last);
        out.loss += loss.double_value(&[]);
        out.tokens += micro.iter().map(|r| r.ids.len() as i64).sum::<i64>();
    }
    out.loss = world.sum(out.loss);
    Ok(out)
}

/// The loss of one micro-batch `micro` of a step of `targets` target tokens in `all_rows`
/// rows: its share of the step's loss, and each row's (summed) loss; what the step logs of
/// it goes to `out`. GOLD's is the mean of the step's rows' (and the NLL's share over the
/// targets); every other loss is a mean over the step's target tokens.
fn micro_loss(
    model: &Model,
    (micro, tok): (&[&TokenizedSft], &data::Tokenizer),
    (loss_type, teacher): (SftLoss, Option<(&Teacher, &DistillArgs)>),
    (targets, all_rows): (f64, f64),
    out: &mut Accumulated,
) -> Result<(tch::Tensor, tch::Tensor)> {
    let batch = collate(micro, tok.pad_id, model.device());
    Ok(match teacher {
        Some((teacher, distill)) => match &teacher.uld {
            Some(uld) => {
                let l = uld.losses((model, tok), &teacher.model, micro, &batch)?;
                out.uld_parts.0 += l.matched;
                out.uld_parts.1 += l.unmatched;
                let mut loss = l.rows.sum(Kind::Float) / all_rows;
                if let Some(nll) = l.nll_sum {
                    loss += nll * (distill.gold.uld_crossentropy_weight / targets);
                }
                (loss, l.rows)
            }
            None => {
                let (loss, stats) = distill::token_loss(model, &teacher.model, &batch, distill);
                match stats {
                    distill::TokenStats::IwOpd(s) => out.iw_opd = out.iw_opd.merge(s),
                    distill::TokenStats::Entropy(e) => out.entropy_sum += e,
                }
                per_token(&loss, targets)
            }
        },
        None => {
            let nll = token_nll_with(model, &batch, true);
            let total = |x: &Option<tch::Tensor>| {
                x.as_ref()
                    .expect("asked for")
                    .sum(Kind::Double)
                    .double_value(&[])
            };
            out.entropy_sum += total(&nll.entropy);
            out.top1 += total(&nll.top1);
            per_token(&loss_type.per_token(&nll.nll), targets)
        }
    })
}

/// The distillation loss of `eval`'s rows (their data's completions), as a step of all of
/// them would have it (TRL's `eval_loss` of GKD and GOLD): `eval/distillation_loss`.
fn evaluate_distillation(
    model: &Model,
    eval: &Prepared,
    (batch_size, tok): (usize, &data::Tokenizer),
    teacher: (&Teacher, &DistillArgs),
) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let rows: Vec<&TokenizedSft> = eval.rows.iter().collect();
    let targets: i64 = rows
        .iter()
        .map(|r| r.loss_mask[1..].iter().sum::<i64>())
        .sum();
    let mut out = Accumulated::new(rows.len(), targets as f64);
    let denominators = ((targets as f64).max(1.0), (rows.len() as f64).max(1.0));
    let mut loss = 0.0;
    for (micro, _) in micro_batches(&rows, batch_size) {
        let shape = (SftLoss::Nll, Some(teacher));
        let (l, _) = micro_loss(model, (micro, tok), shape, denominators, &mut out)?;
        loss += l.double_value(&[]);
    }
    Ok(loss)
}

pub fn run(args: &TrainArgs) -> Result<TrainSummary> {
    args.validate()?;
    // Read everything that can be wrong before the output directory is touched.
    let world = args.run.world()?;
    let (device, kind) = args.device.resolve_for(&world);
    args.run.seed_torch();
    let opts = ModelOptions {
        neftune_noise_alpha: args.neftune_noise_alpha,
        ..args.memory.apply(
            args.adapter
                .apply(ModelOptions::new(Head::Lm, device, kind)),
        )
    };
    let (mut model, tok) = Model::load_with_tokenizer(&args.model, &opts)?;
    let tok = args.tokenizer.apply(&mut model, tok)?;
    if (args.packing || args.eval_packing()) && model.virtual_tokens() > 0 {
        bail!("--packing: {} is a prompt- or prefix-tuning adapter, and packing with virtual tokens is not supported (they go before one row, not before each packed row)", args.model.display());
    }
    let max_length = model.cap_length(args.data.max_length, "--max-length");
    let teacher = match &args.distill.teacher_model {
        Some(dir) => {
            let gold = &args.distill.gold;
            let teacher = distill::load_teacher(dir, &model, gold.use_uld_loss)?;
            let uld = gold
                .use_uld_loss
                .then(|| gold::Uld::load(gold, args.distill.beta, dir, (&tok, &model, &teacher)))
                .transpose()?;
            // What sampling the prompts needs (nothing when no step samples).
            let (eos_ids, room) = match args.distill.samples() {
                true => (
                    tok.generation_eos_ids()?,
                    model.prompt_room(args.distill.max_new_tokens, "--max-new-tokens")?,
                ),
                false => (vec![], usize::MAX),
            };
            Some(Teacher {
                model: teacher,
                uld,
                tools: distill::SampleTools::start(&args.distill.tools, &tok)?,
                eos_ids,
                room,
            })
        }
        None => None,
    };
    let train = TrainRows::read(args, &tok, max_length)?;
    let eval = args
        .data
        .eval_data
        .as_deref()
        .map(|p| -> Result<Prepared> {
            let packed = args.eval_packing();
            let limit = args.row_limit(packed, max_length);
            let mut eval = prepare_file(p, &tok, (args, false), limit)?;
            if packed {
                eval.rows = args.pack(&eval.rows, max_length);
            }
            Ok(eval)
        })
        .transpose()?;

    let (mut order, epoch_rows) = train.order(args);
    let total_steps = args.data.total_steps(
        epoch_rows,
        args.run.epochs,
        args.run.max_steps,
        world.size(),
    );
    let schedule = args.optim.schedule(total_steps);
    let mut trainee = Trainee::new("", model, &args.model, &args.optim, &world, schedule)?;
    let mut session = Session::start(
        "sft",
        args,
        &args.run,
        total_steps,
        world,
        &mut [&mut trainee],
    )
    .context("starting the run")?;
    order.restore(session.state.sampler);
    tracing::info!(
        "sft: {} {what}, {} steps of {} {what} ({} × {} accumulated × {} ranks)",
        epoch_rows,
        total_steps,
        args.data.rows_per_step() * session.world.size(),
        args.data.batch_size,
        args.data.grad_accum,
        session.world.size(),
        what = if args.packing {
            "packed sequences"
        } else {
            "rows"
        },
    );
    let mut eval_loss = None;
    while !session.done() && session.stop_requested().is_none() {
        let batch = Batch {
            order: &mut order,
            rows: &train,
            tok: &tok,
            teacher: teacher.as_ref(),
        };
        let mut scalars = train_step(&mut session, &mut trainee, batch, args)?;
        let eval_due = args.data.eval_due(session.state.step, session.at_end());
        if let Some(eval) = eval.as_ref().filter(|_| eval_due) {
            let (loss, entropy, top1) =
                evaluate(&trainee.model, eval, args.data.batch_size, tok.pad_id);
            eval_loss = Some(loss);
            scalars.extend([
                ("eval/loss".into(), loss),
                ("eval/perplexity".into(), loss.exp()),
                ("eval/entropy".into(), entropy),
                ("eval/mean_token_accuracy".into(), top1),
            ]);
            if let Some(t) = teacher.as_ref() {
                let shape = (args.data.batch_size, &tok);
                let d = evaluate_distillation(&trainee.model, eval, shape, (t, &args.distill))?;
                scalars.push(("eval/distillation_loss".into(), d));
            }
        }
        let scalars: Vec<(&str, f64)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
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
        session.write_averages(&trainee)?;
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
    order: &'a mut RowOrder,
    rows: &'a TrainRows,
    tok: &'a data::Tokenizer,
    teacher: Option<&'a Teacher>,
}

/// `--teacher-model`: the teacher, and what sampling the prompts needs.
struct Teacher {
    model: Model,
    /// With --use-uld-loss: GOLD's view of the teacher's tokens.
    uld: Option<gold::Uld>,
    /// With --tool-command: the tools the samples may call.
    tools: Option<distill::SampleTools>,
    /// Where a sample ends.
    eos_ids: Vec<i64>,
    /// The longest prompt that leaves room for --max-new-tokens.
    room: usize,
}

/// One optimiser step over the order's next rows; returns the step's scalars (with a
/// mixture, `train/loss/<name>` too: the token-weighted loss of each dataset's rows in
/// the step).
fn train_step(
    session: &mut Session,
    trainee: &mut Trainee,
    batch: Batch,
    args: &TrainArgs,
) -> Result<Vec<(String, f64)>> {
    let started = Instant::now();
    let indices = batch
        .order
        .next_batch(args.data.rows_per_step() * session.world.size());
    let world = &session.world;
    let mine = world.shard(&indices);
    let mut rows: Vec<_> = mine.iter().map(|&i| &batch.rows.rows[i]).collect();
    let mixed = batch.rows.names.len() > 1;
    // Distillation: this step's completions, the data's or sampled from its prompts.
    let step = session.state.step;
    let completions = batch
        .teacher
        .map(|t| (t, Completions::of_step(&args.distill, args.run.seed, step)));
    let sampler = match completions {
        Some((t, Completions::Student)) => Some((t, &trainee.model)),
        Some((t, Completions::Teacher)) => Some((t, &t.model)),
        _ => None,
    };
    let sampled = sampler
        .map(|(t, sampler)| {
            let seed = distill::sample_seed(args.run.seed, step);
            let shape = (args.data.batch_size, batch.tok.pad_id, &t.eos_ids[..]);
            let (offset, _) = world.shard_of(indices.len() as i64);
            let share = (offset as usize, indices.len());
            let tools = t.tools.as_ref().map(|tools| (tools, batch.tok));
            let seeds = (t.room, seed);
            distill::sampled_rows(sampler, &rows, shape, &args.distill, seeds, share, tools)
        })
        .transpose()?;
    // TRL's tool metrics of the step's samples.
    let tools = batch.teacher.and_then(|t| t.tools.as_ref()).is_some();
    let tool_scalars: Vec<(String, f64)> = match &sampled {
        Some(s) if tools => (s.stats.frequencies(s.rows.len() as f64, world).into_iter())
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        _ => vec![],
    };
    if let Some(s) = sampled.as_ref().filter(|_| args.distill.log_completions) {
        let n = args.distill.num_completions_to_print.unwrap_or(usize::MAX);
        // Logged with the step's number, as its metrics are.
        session.append("samples.jsonl", &s.lines(step + 1, batch.tok, (n, tools)))?;
    }
    if let Some(s) = &sampled {
        rows = s.rows.iter().collect();
    }
    let teacher = batch.teacher.map(|t| (t, &args.distill));
    let step_out = accumulate(
        trainee,
        &rows,
        (args.data.batch_size, batch.tok),
        (args.loss_type, teacher),
        world,
        mixed,
    )?;
    let loss = step_out.loss;
    let outcome = trainee.step(loss);
    let aux_loss = trainee.take_aux_loss(world);
    let tokens = world.sum(step_out.tokens as f64);
    let per_dataset = if mixed {
        let uld = args.distill.gold.use_uld_loss;
        batch
            .rows
            .loss_by_dataset(mine, (&step_out.per_row, uld), world)
    } else {
        vec![]
    };
    // What is measured over every rank (each takes part, with tokens of its own or not):
    // TRL's token metrics of the NLL, IW-OPD's, or GOLD's hybrid loss's parts.
    let iw_opd_objective = args.distill.distillation_objective == distill::Objective::IwOpd;
    let token_scalars = match batch.teacher {
        None => step_out.token_metrics(world),
        Some(_) if iw_opd_objective => step_out.iw_opd.scalars(world),
        Some(_) if args.distill.gold.uld_use_hybrid_loss => step_out.uld_metrics(world),
        Some(_) if args.distill.gold.use_uld_loss => vec![],
        // The generalized JSD: TRL's DistillationTrainer `entropy`.
        Some(_) => step_out.token_metrics(world)[..1].to_vec(),
    };
    let num_tokens = session.count_tokens(tokens);
    session.finish_step(&outcome, loss, batch.order.position())?;
    let mut scalars: Vec<(String, f64)> = vec![
        ("train/loss".into(), loss),
        ("train/lr".into(), outcome.lr),
        ("train/grad_norm".into(), outcome.grad_norm),
        (
            "train/tokens_per_second".into(),
            tokens / started.elapsed().as_secs_f64().max(1e-9),
        ),
        (
            "train/skipped_steps".into(),
            session.state.skipped_steps as f64,
        ),
    ];
    scalars.extend(per_dataset);
    if let Some((_, from)) = completions {
        scalars.push((
            "train/on_policy".into(),
            f64::from(u8::from(from == Completions::Student)),
        ));
    }
    scalars.extend(token_scalars);
    scalars.extend(tool_scalars);
    scalars.extend(aux_loss.map(|a| ("aux_loss".into(), a)));
    scalars.push(("num_tokens".into(), num_tokens));
    Ok(scalars)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    /// DFT weighs each token's NLL by its probability (held constant): the value is
    /// `p·(−log p)`, the gradient `p` times the NLL's; off the targets (NLL 0) both are 0.
    #[test]
    fn dft_weighs_each_token_by_its_probability() {
        let nll = Tensor::from_slice(&[0.1f32, 2.0, 0.0]).set_requires_grad(true);
        let dft = SftLoss::Dft.per_token(&nll);
        let v = Vec::<f32>::try_from(&dft.detach()).unwrap();
        for (i, x) in [0.1f32, 2.0, 0.0].iter().enumerate() {
            assert!((v[i] - (-x).exp() * x).abs() < 1e-7, "{v:?}");
        }
        dft.sum(Kind::Float).backward();
        let g = Vec::<f32>::try_from(&nll.grad()).unwrap();
        for (i, x) in [0.1f32, 2.0, 0.0].iter().enumerate() {
            assert!((g[i] - (-x).exp()).abs() < 1e-7, "{g:?}");
        }
        let same = SftLoss::Nll.per_token(&nll.detach());
        assert!(same.equal(&nll.detach()));
    }
}
