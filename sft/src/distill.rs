//! Knowledge distillation in `sft train --teacher-model DIR`: TRL's `GKDTrainer`
//! (Agarwal et al. 2024, "On-policy distillation of language models: learning from
//! self-generated mistakes").
//!
//! The per-token loss is the generalized Jensen–Shannon divergence between the student's
//! and the teacher's next-token distributions at every completion token, summed over the
//! vocabulary ([`common::ops::generalized_jsd`]); a step's loss is its mean over the
//! step's completion tokens, as the NLL's is. Which completions: with probability λ
//! (`--lmbda`, drawn once per step from the run's seed) the student's own samples of each
//! row's prompt (on-policy); otherwise the data's completions, or with `--seq-kd` the
//! teacher's samples (sequence-level KD).
//!
//! With `--distillation-objective iw_opd` the per-token loss is IW-OPD's instead (Xie et al.
//! 2026, "On the Position Bias of On-Policy Distillation", TRL's experimental
//! `IWOPDTrainer`): on the completion's own tokens only, see [`iw_opd`].
//!
//! With `--use-uld-loss` the teacher may have its own tokenizer and the loss is GOLD's
//! ([`crate::gold`]); with `--tool-command` the samples may call tools, whose results are
//! read by both models and left out of the loss ([`SampleTools`]).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use common::generate::{generate_rows, SamplingConfig};
use common::models::TokenSpec;
use common::rng::derived_seed;
use common::tools::{read_schemas, segments, ToolCommand, ToolFormat, ToolStats, Tools};
use common::{Head, Model, ModelOptions};
use data::prompts::collate_left;
use data::sft::{SftBatch, TokenizedSft};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tch::{Kind, Tensor};

use crate::eval::{batch_hidden, target_outputs};

/// The distillation options of `sft train`, under TRL's `GKDConfig` names.
#[derive(Debug, Clone, Args, Serialize)]
pub struct DistillArgs {
    /// A teacher: the loss becomes the generalized JSD between the student's and the
    /// teacher's next-token distributions on the completion tokens (TRL's GKDTrainer). It
    /// must share the student's tokenizer, unless --use-uld-loss (TRL's GOLD).
    #[arg(long)]
    pub teacher_model: Option<PathBuf>,
    /// β of the generalized JSD, in [0, 1]: 0 is KL(teacher‖student) (forward KL, word-level
    /// KD), 1 is KL(student‖teacher) (reverse KL); TRL's default 0.5.
    #[arg(long, default_value_t = 0.5, requires = "teacher_model")]
    pub beta: f64,
    /// λ, in [0, 1]: the share of steps trained on the student's own samples of the rows'
    /// prompts instead of the data's completions (TRL's `lmbda`, default 0.5; 0 is
    /// supervised KD on the data, 1 fully on-policy).
    #[arg(long, default_value_t = 0.5, requires = "teacher_model")]
    pub lmbda: f64,
    /// Sequence-level KD: the steps that are not on-policy train on the teacher's samples
    /// of the prompts instead of the data's completions (TRL's `seq_kd`).
    #[arg(long, requires = "teacher_model")]
    pub seq_kd: bool,
    /// Sampling temperature of the student's and the teacher's samples (TRL's 0.9).
    #[arg(long, default_value_t = 0.9, requires = "teacher_model")]
    pub temperature: f64,
    /// Both distributions of the generalized JSD are taken at this temperature (default 1,
    /// as TRL's GKDTrainer; TRL 1.16's DistillationTrainer divides by its sampling
    /// `temperature` here too: give the same value as --temperature).
    #[arg(long, default_value_t = 1.0, requires = "teacher_model")]
    pub distillation_temperature: f64,
    /// Longest sample, in tokens (TRL's `max_new_tokens`).
    #[arg(long, default_value_t = 128, requires = "teacher_model")]
    pub max_new_tokens: usize,
    /// The samples' nucleus: the smallest set of likeliest tokens holding this probability
    /// (TRL's DistillationTrainer `top_p`; 1: all).
    #[arg(long, default_value_t = 1.0, requires = "teacher_model")]
    pub top_p: f64,
    /// The samples' k likeliest tokens only (TRL's `top_k`; 0: all).
    #[arg(long, default_value_t = 0, requires = "teacher_model")]
    pub top_k: i64,
    /// The samples' tokens at least this share of the likeliest one's probability (TRL's
    /// `min_p`; 0: all).
    #[arg(long, default_value_t = 0.0, requires = "teacher_model")]
    pub min_p: f64,
    /// The samples' repetition penalty (TRL's `repetition_penalty`; 1: none).
    #[arg(long, default_value_t = 1.0, requires = "teacher_model")]
    pub repetition_penalty: f64,
    /// The loss (TRL's `distillation_objective`): jsd (GKD's generalized JSD over the
    /// vocabulary, with --beta) or iw_opd (IW-OPD's sampled-token loss: each completion
    /// token's log-prob times the teacher's log-prob less the student's, weighted towards
    /// the early tokens by --iw-opd-gamma; log-probs at --temperature).
    #[arg(long, value_enum, default_value = "jsd", requires = "teacher_model")]
    pub distillation_objective: Objective,
    /// IW-OPD's γ ≥ 0: a token weighs 1 + γ·(1 − the share of its row's |advantage| before
    /// it), so the first weighs 1 + γ and the last about 1 (TRL's `iw_opd_gamma`).
    #[arg(long, default_value_t = 0.5, requires = "teacher_model")]
    pub iw_opd_gamma: f64,
    /// IW-OPD: the least total |advantage| a row's weights are normalised by (TRL's
    /// `iw_opd_epsilon`).
    #[arg(long, default_value_t = 1e-8, requires = "teacher_model")]
    pub iw_opd_epsilon: f64,
    /// A teacher with another tokenizer: TRL's GOLD (--use-uld-loss and its options).
    #[command(flatten)]
    #[serde(flatten)]
    pub gold: crate::gold::GoldArgs,
    /// Tools the samples may call (TRL's `DistillationTrainer(tools=…)`).
    #[command(flatten)]
    #[serde(flatten)]
    pub tools: ToolArgs,
    /// Write each sampled step's samples to OUT/samples.jsonl (TRL's `log_completions`):
    /// prompt and completion, text and token ids.
    #[arg(long, requires = "teacher_model")]
    pub log_completions: bool,
    /// How many samples of each sampled step --log-completions writes (TRL's
    /// `num_completions_to_print`; default: all of the main process's).
    #[arg(long, requires = "log_completions")]
    pub num_completions_to_print: Option<usize>,
}

/// Tools in the distillation's samples, with `ppo train`'s options: TRL 1.16's
/// `DistillationTrainer(tools=…)`. A sample that calls tools (in its chat template's own
/// tool-call form) gets their results appended as `tool` messages and is continued; the
/// results' tokens are in the sequence both models read but out of the loss (TRL's
/// `tool_mask`).
#[derive(Debug, Clone, Args, Serialize)]
pub struct ToolArgs {
    /// The program that runs the samples' tool calls: `sh -c CMD` started once, one
    /// {"name", "arguments"} line in per call, one {"result": …} or {"error": "…"} line
    /// back (as `ppo train --tool-command`).
    #[arg(long, requires = "teacher_model")]
    pub tool_command: Option<String>,
    /// The tools' schemas, a JSON list as `apply_chat_template(tools=…)` takes them,
    /// rendered into every prompt-only row that has no `tools` of its own; a call's text
    /// arguments are typed by them.
    #[arg(long, requires = "tool_command")]
    pub tools: Option<PathBuf>,
    /// Most rounds of tool calls in one sample (TRL's `max_tool_calling_iterations`;
    /// default: only --max-new-tokens bounds them).
    #[arg(long, requires = "tool_command")]
    pub max_tool_calling_iterations: Option<usize>,
    /// Seconds to wait for each answer of --tool-command.
    #[arg(long, default_value_t = 60.0)]
    pub tool_timeout: f64,
}

/// `--tool-command` started, and `--tools` (which types the calls' arguments).
pub struct SampleTools {
    pub tools: Tools,
    pub schemas: Option<serde_json::Value>,
}

impl SampleTools {
    /// The program of `args` started, the tool-call form read from `tok`'s template; `None`
    /// without --tool-command.
    pub fn start(args: &ToolArgs, tok: &data::Tokenizer) -> Result<Option<SampleTools>> {
        let Some(command) = &args.tool_command else {
            return Ok(None);
        };
        let format = ToolFormat::of(tok).map_err(|e| anyhow::anyhow!("--tool-command: {e}"))?;
        let schemas = args.tools.as_deref().map(read_schemas).transpose()?;
        let timeout = std::time::Duration::from_secs_f64(args.tool_timeout);
        let tools = Tools {
            format,
            runner: std::sync::Arc::new(ToolCommand::start(command, timeout)?),
            max_iterations: args.max_tool_calling_iterations.unwrap_or(usize::MAX),
        };
        Ok(Some(SampleTools { tools, schemas }))
    }
}

/// `--distillation-objective`, under TRL's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// The generalized JSD over the vocabulary (GKD's).
    Jsd,
    /// IW-OPD's importance-weighted sampled-token objective.
    #[value(name = "iw_opd", alias = "iw-opd")]
    IwOpd,
}

impl DistillArgs {
    pub fn validate(&self) -> Result<()> {
        common::cli::require(&[
            ((0.0..=1.0).contains(&self.beta), "--beta must be in [0, 1]"),
            (
                (0.0..=1.0).contains(&self.lmbda),
                "--lmbda must be in [0, 1]",
            ),
            (
                self.temperature > 0.0 && self.temperature.is_finite(),
                "--temperature must be > 0",
            ),
            (
                self.distillation_temperature > 0.0 && self.distillation_temperature.is_finite(),
                "--distillation-temperature must be > 0",
            ),
            (
                self.max_new_tokens > 0,
                "--max-new-tokens must be at least 1",
            ),
            (
                self.iw_opd_gamma >= 0.0 && self.iw_opd_gamma.is_finite(),
                "--iw-opd-gamma must be ≥ 0",
            ),
            (
                self.iw_opd_epsilon > 0.0 && self.iw_opd_epsilon.is_finite(),
                "--iw-opd-epsilon must be > 0",
            ),
        ])?;
        common::cli::require(&common::generate::filter_problems(
            (self.top_p, self.top_k),
            (self.min_p, self.repetition_penalty),
        ))?;
        self.gold.validate()?;
        let uld = self.gold.use_uld_loss;
        let tools = self.tools.tool_command.is_some();
        common::cli::require(&[
            (
                self.tools.tool_timeout > 0.0 && self.tools.tool_timeout.is_finite(),
                "--tool-timeout must be > 0",
            ),
            (
                !tools || self.samples(),
                "--tool-command runs the tool calls of sampled completions: give --lmbda > 0 or --seq-kd",
            ),
            (
                self.distillation_temperature == 1.0
                    || (self.distillation_objective == Objective::Jsd && !uld),
                "--distillation-temperature applies to the generalized JSD: IW-OPD's log-probs are at --temperature, and GOLD has --uld-student-temperature and --uld-teacher-temperature",
            ),
            (
                !(uld && tools),
                "--tool-command with --use-uld-loss is not supported: GOLD reads one completion per row again in the teacher's tokens, and tool results split it",
            ),
            (
                !(uld && self.distillation_objective == Objective::IwOpd),
                "--distillation-objective iw_opd reads the teacher's log-prob of each of the student's tokens, which needs a shared tokenizer: not with --use-uld-loss",
            ),
            (
                !(uld && self.seq_kd),
                "--seq-kd trains on the teacher's samples, which are in its own tokens: not with --use-uld-loss",
            ),
        ])?;
        Ok(())
    }

    /// Whether any step samples (on-policy, or the teacher's sequences).
    pub fn samples(&self) -> bool {
        self.lmbda > 0.0 || self.seq_kd
    }
}

/// What IW-OPD logs of a step (TRL's `iw_opd/*`): sums over the completion tokens of the
/// weighted advantage w·a, of |a| and of the weight w, their count, and the least and
/// greatest weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IwOpdStats {
    pub advantage: f64,
    pub abs_advantage: f64,
    pub weight: f64,
    pub tokens: f64,
    pub min_weight: f64,
    pub max_weight: f64,
}

impl Default for IwOpdStats {
    /// No token.
    fn default() -> Self {
        IwOpdStats {
            advantage: 0.0,
            abs_advantage: 0.0,
            weight: 0.0,
            tokens: 0.0,
            min_weight: f64::INFINITY,
            max_weight: f64::NEG_INFINITY,
        }
    }
}

impl IwOpdStats {
    /// Both's sums, and their extremes.
    pub fn merge(self, o: IwOpdStats) -> IwOpdStats {
        IwOpdStats {
            advantage: self.advantage + o.advantage,
            abs_advantage: self.abs_advantage + o.abs_advantage,
            weight: self.weight + o.weight,
            tokens: self.tokens + o.tokens,
            min_weight: self.min_weight.min(o.min_weight),
            max_weight: self.max_weight.max(o.max_weight),
        }
    }

    /// TRL's `iw_opd/mean_advantage`, `mean_abs_advantage`, `mean_weight`, `min_weight`
    /// and `max_weight` over every rank's tokens of the step (TRL averages its micro-
    /// batches' means).
    pub fn scalars(&self, world: &common::World) -> Vec<(String, f64)> {
        let [advantage, abs_advantage, weight, tokens] =
            world.sums([self.advantage, self.abs_advantage, self.weight, self.tokens]);
        let (lo, hi) = world.min_max((self.min_weight, self.max_weight));
        let n = tokens.max(1.0);
        [
            ("mean_advantage", advantage / n),
            ("mean_abs_advantage", abs_advantage / n),
            ("mean_weight", weight / n),
            ("min_weight", lo),
            ("max_weight", hi),
        ]
        .into_iter()
        .map(|(k, v)| (format!("iw_opd/{k}"), v))
        .collect()
    }
}

/// What a distillation loss logs of a micro-batch: IW-OPD's statistics, or (the JSD) Σ
/// over the completion tokens of the student's entropy (TRL's DistillationTrainer
/// `entropy`).
pub enum TokenStats {
    IwOpd(IwOpdStats),
    Entropy(f64),
}

/// The per-token loss `[B, T − 1]` of `batch` (0 off the completion tokens), with the
/// student's gradient: `--distillation-objective`'s; and what it logs.
pub fn token_loss(
    student: &Model,
    teacher: &Model,
    batch: &SftBatch,
    args: &DistillArgs,
) -> (Tensor, TokenStats) {
    match args.distillation_objective {
        Objective::Jsd => {
            let at = (args.beta, args.distillation_temperature);
            let (jsd, entropy) = token_jsd(student, teacher, batch, at);
            (jsd, TokenStats::Entropy(entropy))
        }
        Objective::IwOpd => {
            let spec = TokenSpec {
                temperature: args.temperature,
                ..TokenSpec::default()
            };
            let (student_out, mask) = target_outputs(student, batch, spec);
            let (teacher_out, _) = tch::no_grad(|| target_outputs(teacher, batch, spec));
            let (student_lp, teacher_lp) = (student_out.logprobs, teacher_out.logprobs);
            let (loss, stats) = iw_opd(
                &student_lp,
                &teacher_lp,
                &mask,
                (args.iw_opd_gamma, args.iw_opd_epsilon),
            );
            (loss, TokenStats::IwOpd(stats))
        }
    }
}

/// IW-OPD's per-token loss `[B, N]` (TRL's `IWOPDTrainer._compute_iw_opd_loss`): with the
/// advantage a_t = log π_teacher(x_t) − log π_student(x_t) (no gradient) on each `mask`ed
/// token x_t of a row, and P_t the sum of |a| over the row's tokens before t,
/// `−log π_student(x_t) · w_t · a_t` with `w_t = 1 + γ·(1 − P_t / max(Σ|a|, ε))`: the
/// prefix-discrepancy weight that favours the early tokens, whose teacher signal has not yet
/// drifted.
pub fn iw_opd(
    student: &Tensor,
    teacher: &Tensor,
    mask: &Tensor,
    (gamma, eps): (f64, f64),
) -> (Tensor, IwOpdStats) {
    let advantage = (teacher - student.detach()) * mask;
    let abs = advantage.abs();
    let before = abs.cumsum(1, Kind::Float) - &abs;
    let total = abs
        .sum_dim_intlist([1].as_slice(), true, Kind::Float)
        .clamp_min(eps);
    let weights = (-(before / total) + 1.0) * gamma + 1.0;
    let weighted = &weights * &advantage;
    let loss = -(student * &weighted) * mask;
    let sum = |t: &Tensor| (t * mask).sum(Kind::Double).double_value(&[]);
    let real = mask.to_kind(Kind::Bool);
    let w = weights.masked_select(&real);
    let (lo, hi) = match w.numel() {
        0 => (f64::INFINITY, f64::NEG_INFINITY),
        _ => (w.min().double_value(&[]), w.max().double_value(&[])),
    };
    let stats = IwOpdStats {
        advantage: sum(&weighted),
        abs_advantage: sum(&abs),
        weight: sum(&weights),
        tokens: mask.sum(Kind::Double).double_value(&[]),
        min_weight: lo,
        max_weight: hi,
    };
    (loss, stats)
}

/// The per-token generalized JSD `[B, T − 1]` of `batch` (0 off the completion tokens):
/// only completion positions reach the two heads, chunk by chunk (see
/// [`Model::distill_outputs`]), the student's with its gradient; and the student's entropy
/// summed over those positions.
pub fn token_jsd(
    student: &Model,
    teacher: &Model,
    batch: &SftBatch,
    (beta, temperature): (f64, f64),
) -> (Tensor, f64) {
    let t = batch.input_ids.size()[1];
    let rows = |m: &Model| {
        let h = batch_hidden(m, batch);
        let size = h.size();
        h.reshape([-1, size[2]])
    };
    let mask = batch.loss_mask.narrow(1, 1, t - 1).to_kind(Kind::Float);
    let at = mask.reshape([-1]).nonzero().squeeze_dim(1);
    let student_h = rows(student).index_select(0, &at);
    let teacher_h = tch::no_grad(|| rows(teacher).index_select(0, &at));
    let (jsd, entropy) =
        student.distill_outputs(&student_h, teacher, &teacher_h, (beta, temperature));
    let loss = Tensor::zeros_like(&mask)
        .reshape([-1])
        .index_put(&[Some(at)], &jsd, false)
        .reshape(mask.size());
    (loss, entropy.sum(Kind::Double).double_value(&[]))
}

/// The teacher: a frozen model on the student's device that shares its vocabulary (or,
/// with `own_tokenizer` (--use-uld-loss), need not).
pub fn load_teacher(dir: &std::path::Path, student: &Model, own_tokenizer: bool) -> Result<Model> {
    let opts = ModelOptions::new(Head::Lm, student.device(), student.kind()).frozen();
    let teacher = Model::load(dir, &opts)
        .with_context(|| format!("loading --teacher-model {}", dir.display()))?
        .0;
    let (a, b) = (teacher.config.vocab_size(), student.config.vocab_size());
    if a != b && !own_tokenizer {
        bail!(
            "--teacher-model {}: its vocabulary has {a} tokens, the student's {b}; the teacher must share the student's tokenizer (or give --use-uld-loss: TRL's GOLD, for a teacher with its own)",
            dir.display()
        );
    }
    Ok(teacher)
}

/// Where a step's completions come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completions {
    /// The data's.
    Data,
    /// The student's samples (on-policy).
    Student,
    /// The teacher's samples (`--seq-kd`).
    Teacher,
}

impl Completions {
    /// Step `step`'s draw: on-policy with probability λ, from a stream of the run's seed.
    pub fn of_step(args: &DistillArgs, seed: u64, step: u64) -> Completions {
        let mut rng = rand::rngs::StdRng::seed_from_u64(derived_seed(seed, step, 1));
        if rng.random::<f64>() < args.lmbda {
            Completions::Student
        } else if args.seq_kd {
            Completions::Teacher
        } else {
            Completions::Data
        }
    }
}

/// Where a row's last completion span starts: its prompt is what comes before (for a
/// conversation, every turn before the last assistant turn, as TRL's GKD collator splits
/// it). `None` for a row with no completion token.
pub fn prompt_length(row: &TokenizedSft) -> Option<usize> {
    let last = row.loss_mask.iter().rposition(|&m| m == 1)?;
    let start = row.loss_mask[..=last]
        .iter()
        .rposition(|&m| m == 0)
        .map_or(0, |i| i + 1);
    Some(start)
}

/// `rows` with their completions replaced by `sampler`'s samples of their prompts (the
/// prompt cut to its last `room` tokens where it is longer), `batch_size` rows at a time:
/// the prompt's tokens are not in the loss, the sample's are (its EOS included). The rows
/// are `offset..` of the step's `total` (a rank's share): each samples with the numbers it
/// has in the whole step, so the ranks together sample what one process samples. With
/// `tools`, the samples go through the tool loop (TRL's `_tool_call_loop`), the results'
/// tokens out of the loss; what the loop did is returned.
pub fn sampled_rows(
    sampler: &Model,
    rows: &[&TokenizedSft],
    (batch_size, pad_id, eos_ids): (usize, i64, &[i64]),
    args: &DistillArgs,
    (room, seed): (usize, u64),
    (offset, total): (usize, usize),
    tools: Option<(&SampleTools, &data::Tokenizer)>,
) -> Result<Sampled> {
    if rows.is_empty() {
        return Ok(Sampled::default());
    }
    let _guard = tch::no_grad_guard();
    let prompts: Vec<Vec<i64>> = rows
        .iter()
        .map(|r| {
            let p = &r.ids[..prompt_length(r).unwrap_or(r.ids.len())];
            p[p.len().saturating_sub(room)..].to_vec()
        })
        .collect();
    let refs: Vec<&[i64]> = prompts.iter().map(Vec::as_slice).collect();
    let batch = collate_left(&refs, pad_id, sampler.device());
    let cfg = SamplingConfig {
        max_new_tokens: args.max_new_tokens as i64,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        eos_ids: eos_ids.to_vec(),
        pad_id,
        seed,
        cuda_graph: true,
    };
    let g = generate_rows(
        sampler,
        &batch.input_ids,
        &batch.attention_mask,
        &cfg,
        batch_size,
        (offset as i64, total as i64),
    );
    // Each sample's tokens, and which of them it sampled (the rest: tool results).
    let (samples, stats): (Vec<Sample>, ToolStats) = match tools {
        None => {
            let samples = segments(&g)?
                .into_iter()
                .map(|s| {
                    let n = s.ids.len();
                    (s.ids, vec![true; n])
                })
                .collect();
            (samples, ToolStats::default())
        }
        Some((t, tok)) => {
            let schemas = vec![t.schemas.clone(); rows.len()];
            let (responses, stats) = t.tools.run(
                (sampler, tok),
                (&prompts, &g),
                (&cfg, batch_size, (offset as i64, total as i64)),
                &schemas,
            )?;
            let samples = responses.into_iter().map(|r| (r.ids, r.sampled)).collect();
            (samples, stats)
        }
    };
    let rows = prompts
        .iter()
        .zip(samples)
        .map(|(prompt, (sample, sampled))| {
            let ids = [prompt.as_slice(), &sample].concat();
            let mask = std::iter::repeat_n(0, prompt.len())
                .chain(sampled.iter().map(|&s| i64::from(s)))
                .collect();
            TokenizedSft::new(ids, mask)
        })
        .collect();
    Ok(Sampled {
        rows,
        prompt_lengths: prompts.iter().map(Vec::len).collect(),
        stats,
    })
}

/// A sample's tokens and which of them were sampled (the rest: tool results).
type Sample = (Vec<i64>, Vec<bool>);

/// A step's samples: rows of prompt and sample (the loss on the sampled tokens only), where
/// each sample starts, and what the tool loop did.
#[derive(Default)]
pub struct Sampled {
    pub rows: Vec<TokenizedSft>,
    pub prompt_lengths: Vec<usize>,
    pub stats: ToolStats,
}

impl Sampled {
    /// `samples.jsonl`'s lines of the first `n` (TRL's `log_completions`): the step, the
    /// prompt's and the completion's text and token ids, and with tools the completion's
    /// tool mask (1 on sampled tokens, 0 on tool results: out of the loss).
    pub fn lines(&self, step: u64, tok: &data::Tokenizer, (n, tools): (usize, bool)) -> String {
        let mut out = String::new();
        for (row, &p) in self.rows.iter().zip(&self.prompt_lengths).take(n) {
            let (prompt, completion) = row.ids.split_at(p);
            let mut line = serde_json::json!({
                "step": step,
                "prompt": tok.decode(prompt, false),
                "completion": tok.decode(completion, false),
                "prompt_ids": prompt,
                "completion_ids": completion,
            });
            if tools {
                line["tool_mask"] = serde_json::json!(row.loss_mask[p..]);
            }
            out.push_str(&format!("{line}\n"));
        }
        out
    }
}

/// The seed of step `step`'s samples.
pub fn sample_seed(seed: u64, step: u64) -> u64 {
    derived_seed(seed, step, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row's prompt is what precedes its last completion span.
    #[test]
    fn the_prompt_ends_where_the_last_completion_span_starts() {
        let row = |mask: &[i64]| TokenizedSft::new(vec![7; mask.len()], mask.to_vec());
        assert_eq!(prompt_length(&row(&[0, 0, 1, 1])), Some(2));
        assert_eq!(prompt_length(&row(&[0, 1, 1, 0, 0, 1, 1, 0])), Some(5));
        assert_eq!(prompt_length(&row(&[1, 1])), Some(0));
        assert_eq!(prompt_length(&row(&[0, 0])), None);
    }

    /// IW-OPD's loss and gradient against `_compute_iw_opd_loss` written as a loop over
    /// each row's tokens, with a masked prompt position and padding.
    #[test]
    fn iw_opd_weighs_early_tokens_by_the_discrepancy_after_them() {
        let student = [[-9.0f32, -1.0, -2.0, -0.5], [-9.0, -0.3, -1.5, -9.0]];
        let teacher = [[-1.0f32, -0.5, -3.0, -0.1], [-2.0, -1.3, -0.5, -4.0]];
        let mask = [[0f32, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]];
        let t = |x: &[[f32; 4]; 2]| Tensor::from_slice2(x);
        let (gamma, eps) = (0.5, 1e-8);
        let lp = t(&student).set_requires_grad(true);
        let (loss, stats) = iw_opd(&lp, &t(&teacher), &t(&mask), (gamma, eps));
        loss.sum(Kind::Float).backward();
        let (got, grad) = (
            Vec::<Vec<f32>>::try_from(&loss.detach()).unwrap(),
            Vec::<Vec<f32>>::try_from(&lp.grad()).unwrap(),
        );
        for r in 0..2 {
            let a: Vec<f64> = (0..4)
                .map(|i| f64::from((teacher[r][i] - student[r][i]) * mask[r][i]))
                .collect();
            let total = a.iter().map(|x| x.abs()).sum::<f64>().max(eps);
            let mut before = 0.0;
            for i in 0..4 {
                let w = 1.0 + gamma * (1.0 - before / total);
                before += a[i].abs();
                let m = f64::from(mask[r][i]);
                let want = -f64::from(student[r][i]) * w * a[i] * m;
                assert!((f64::from(got[r][i]) - want).abs() < 1e-5, "{r} {i}");
                assert!(
                    (f64::from(grad[r][i]) + w * a[i] * m).abs() < 1e-5,
                    "{r} {i}"
                );
            }
        }
        // What is logged: 5 tokens, the first of each row weighing 1 + γ.
        assert_eq!(stats.tokens, 5.0);
        assert!((stats.max_weight - 1.5).abs() < 1e-6, "{stats:?}");
        assert!(
            stats.min_weight > 1.0 && stats.min_weight < 1.5,
            "{stats:?}"
        );
        // The first completion token weighs 1 + γ.
        let a = f64::from(teacher[0][1] - student[0][1]);
        assert!((f64::from(got[0][1]) + f64::from(student[0][1]) * 1.5 * a).abs() < 1e-5);
    }

    /// λ's draw: never on-policy at 0, always at 1, about λ of the steps between; the
    /// others are the teacher's with --seq-kd.
    #[test]
    fn steps_are_on_policy_with_probability_lambda() {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: DistillArgs,
        }
        let args = |lmbda: f64, seq_kd: bool| DistillArgs {
            lmbda,
            seq_kd,
            ..<Wrapper as clap::Parser>::parse_from(["sft"]).args
        };
        let count = |a: &DistillArgs, c: Completions| {
            (0..1000)
                .filter(|&s| Completions::of_step(a, 3, s) == c)
                .count()
        };
        assert_eq!(count(&args(0.0, false), Completions::Data), 1000);
        assert_eq!(count(&args(1.0, true), Completions::Student), 1000);
        let half = count(&args(0.5, true), Completions::Student);
        assert!((430..570).contains(&half), "{half}");
        assert_eq!(count(&args(0.5, true), Completions::Teacher), 1000 - half);
    }
}
