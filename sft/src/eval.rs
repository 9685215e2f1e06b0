//! `sft eval`: the mean negative log-likelihood of every row's target tokens.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use common::cli::{require, DeviceArgs};
use common::models::{TokenOutputs, TokenSpec};
use common::{Head, Model, ModelOptions};
use data::sft::{collate, prepare, SftBatch, TokenizedSft, Truncation};
use serde_json::json;
use tch::{Kind, Tensor};

/// How `sft` reads its rows beyond their shape (TRL's `SFTConfig` names).
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct RowArgs {
    /// The column holding a language-modelling row's text (TRL's `dataset_text_field`):
    /// rows without `prompt` or `messages` are read from it.
    #[arg(long, default_value = "text")]
    pub dataset_text_field: String,
}

/// Which tokens carry the loss (TRL's `completion_only_loss` and `assistant_only_loss`).
#[derive(Debug, Clone, Copy, Args, serde::Serialize)]
pub struct LossScopeArgs {
    /// Prompt–completion rows: loss on the completion only (true, TRL's default) or on
    /// every token (false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub completion_only_loss: bool,
    /// Conversations: loss on the assistant turns only (true, the default here) or on
    /// every token of the rendered conversation — from the completion on for a
    /// conversational prompt–completion row with --completion-only-loss (false, TRL's
    /// default `assistant_only_loss=False`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub assistant_only_loss: bool,
}

impl LossScopeArgs {
    pub fn scope(&self) -> data::sft::LossScope {
        data::sft::LossScope {
            completion_only: self.completion_only_loss,
            assistant_only: self.assistant_only_loss,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Hugging Face model directory (weights, config.json, tokenizer.json), or a LoRA
    /// adapter directory (PEFT's format).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub tokenizer: common::cli::TokenizerArgs,
    /// The base model of an adapter directory (default: its base_model_name_or_path).
    #[arg(long)]
    pub base_model: Option<PathBuf>,
    #[command(flatten)]
    pub quant: common::cli::QuantArgs,
    /// SFT rows: {"prompt","completion"}, {"messages"} or {"text"} per line (the NLL
    /// mode; --tasks runs task files instead).
    #[arg(long, required_unless_present = "tasks", conflicts_with = "tasks")]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub tasks: crate::tasks::TaskArgs,
    /// Per-row results as JSON Lines: {"index","nll","tokens"}; with --tasks, one line per
    /// document and filter (lm-eval's sample fields and the full prompt).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Longest row in tokens (default 1024); longer rows follow --truncation. With
    /// --tasks: the longest sequence scored or generated (default, as lm-eval: the length
    /// config.json states, else 2048), contexts cut on the left.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// truncate (cut the completion's end) or drop rows over --max-length.
    #[arg(long, default_value = "truncate")]
    pub truncation: Truncation,
    #[command(flatten)]
    pub loss_scope: LossScopeArgs,
    #[command(flatten)]
    pub row_args: RowArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// One row's sums over its target tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowNll {
    /// Σ of the negative log-likelihood.
    pub nll: f64,
    pub tokens: i64,
    /// Σ of the next-token entropy, and the targets that are the argmax.
    pub entropy: f64,
    pub top1: f64,
}

/// Each row's [`RowNll`].
pub fn nll_per_row(
    model: &Model,
    rows: &[TokenizedSft],
    batch_size: usize,
    pad_id: i64,
) -> Vec<RowNll> {
    let _guard = tch::no_grad_guard();
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch_size) {
        let refs: Vec<_> = chunk.iter().collect();
        let batch = collate(&refs, pad_id, model.device());
        let t = token_nll_with(model, &batch, true);
        let cpu = |x: &Tensor| {
            Vec::<f64>::try_from(x.to_kind(Kind::Double).to_device(tch::Device::Cpu))
                .expect("cpu f64")
        };
        let sums = cpu(&t.nll.sum_dim_intlist([1].as_slice(), false, Kind::Double));
        let counts = cpu(&t.mask.sum_dim_intlist([1].as_slice(), false, Kind::Double));
        let entropy = cpu(t.entropy.as_ref().expect("asked for"));
        let top1 = cpu(t.top1.as_ref().expect("asked for"));
        out.extend((0..sums.len()).map(|i| RowNll {
            nll: sums[i],
            tokens: counts[i] as i64,
            entropy: entropy[i],
            top1: top1[i],
        }));
    }
    out
}

/// Token means over `rows`: the NLL, TRL's `entropy` and `mean_token_accuracy`.
pub fn token_means(rows: &[RowNll]) -> (f64, f64, f64) {
    let n = rows.iter().map(|r| r.tokens).sum::<i64>().max(1) as f64;
    let sum = |f: fn(&RowNll) -> f64| rows.iter().map(f).sum::<f64>() / n;
    (sum(|r| r.nll), sum(|r| r.entropy), sum(|r| r.top1))
}

/// The hidden states `[B, T-1, H]` of a batch's positions that predict a next token
/// (packed rows kept apart).
pub fn batch_hidden(model: &Model, batch: &SftBatch) -> Tensor {
    let t = batch.input_ids.size()[1];
    match &batch.segment_ids {
        Some(segments) => model.hidden_packed(&batch.input_ids, segments),
        None => model.hidden(&batch.input_ids, &batch.attention_mask, None),
    }
    .narrow(1, 0, t - 1)
}

/// Per-token NLL of the targets `[B, T-1]` (0 elsewhere) and the target mask.
pub fn token_nll(model: &Model, batch: &SftBatch) -> (Tensor, Tensor) {
    let out = token_nll_with(model, batch, false);
    (out.nll, out.mask)
}

/// What one forward of the NLL gives: the per-token NLL of the targets `[B, T-1]` (0
/// elsewhere) and the target mask; with `metrics`, each row's Σ over its targets of the
/// entropy of the next-token distribution and its number of targets that are the argmax
/// (`[B]`; TRL's `entropy` and `mean_token_accuracy`; detached).
pub struct TokenNll {
    pub nll: Tensor,
    pub mask: Tensor,
    pub entropy: Option<Tensor>,
    pub top1: Option<Tensor>,
}

/// `model`'s outputs (`spec`'s) at each position for the token that follows it, `[B, T-1]`,
/// and the mask of the targets (the tokens the loss is on).
pub fn target_outputs(model: &Model, batch: &SftBatch, spec: TokenSpec) -> (TokenOutputs, Tensor) {
    let t = batch.input_ids.size()[1];
    let labels = batch.input_ids.narrow(1, 1, t - 1);
    let out = model.token_outputs(&batch_hidden(model, batch), &labels, spec);
    let mask = batch.loss_mask.narrow(1, 1, t - 1).to_kind(Kind::Float);
    (out, mask)
}

pub fn token_nll_with(model: &Model, batch: &SftBatch, metrics: bool) -> TokenNll {
    let spec = TokenSpec {
        entropy: metrics,
        greedy: metrics,
        ..TokenSpec::default()
    };
    let (out, mask) = target_outputs(model, batch, spec);
    let rows = |x: Option<Tensor>| {
        x.map(|x| {
            (x.detach().to_kind(Kind::Float) * &mask).sum_dim_intlist(
                [1].as_slice(),
                false,
                Kind::Double,
            )
        })
    };
    TokenNll {
        entropy: rows(out.entropy),
        top1: rows(out.greedy),
        nll: -out.logprobs * &mask,
        mask,
    }
}

/// Token-weighted totals of an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSummary {
    pub rows: usize,
    pub tokens: i64,
    pub loss: f64,
    /// TRL's `entropy` and `mean_token_accuracy` over the target tokens.
    pub entropy: f64,
    pub mean_token_accuracy: f64,
    pub dropped: usize,
}

/// What `sft eval` reports: the NLL summary, or one summary line per task.
#[derive(Debug, Clone)]
pub enum EvalOutcome {
    Nll(EvalSummary),
    Tasks(Vec<serde_json::Value>),
}

pub fn run(args: &EvalArgs) -> Result<EvalOutcome> {
    require(&[
        (args.batch_size > 0, "--batch-size must be at least 1"),
        (
            args.max_length.is_none_or(|n| n > 1),
            "--max-length must be at least 2",
        ),
        (args.tasks.limit != Some(0), "--limit must be at least 1"),
    ])?;
    args.quant.validate()?;
    let (device, kind) = args.device.resolve();
    let opts = ModelOptions {
        base_model: args.base_model.clone(),
        quantization: args.quant.config(),
        ..ModelOptions::new(Head::Lm, device, kind).frozen()
    };
    let (mut model, tok) = Model::load_with_tokenizer(&args.model, &opts)?;
    let tok = args.tokenizer.apply(&mut model, tok)?;
    let Some(data) = &args.data else {
        let stated = model.config.stated_length();
        let max_length = model.cap_length(args.max_length.unwrap_or(stated), "--max-length");
        let evaluator = crate::tasks::Evaluator {
            model: &model,
            tok: &tok,
            args: &args.tasks,
            batch_size: args.batch_size,
            max_length,
        };
        let (summaries, samples) = evaluator.run()?;
        if let Some(out) = &args.output {
            data::io::write_jsonl(out, &samples)?;
        }
        return Ok(EvalOutcome::Tasks(summaries));
    };
    let max_length = model.cap_length(args.max_length.unwrap_or(1024), "--max-length");
    nll(args, data, &model, &tok, max_length).map(EvalOutcome::Nll)
}

fn nll(
    args: &EvalArgs,
    path: &std::path::Path,
    model: &Model,
    tok: &data::Tokenizer,
    max_length: usize,
) -> Result<EvalSummary> {
    let examples = data::read_sft_with(path, &args.row_args.dataset_text_field)?;
    let prepared = prepare(
        &examples,
        tok,
        (max_length, args.truncation),
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
    let per_row = nll_per_row(model, &prepared.rows, args.batch_size, tok.pad_id);
    let mut rows = Vec::with_capacity(per_row.len());
    for (&index, r) in prepared.kept.iter().zip(&per_row) {
        let n = r.tokens;
        rows.push(json!({"index": index, "nll": r.nll / n.max(1) as f64, "tokens": n}));
    }
    let total_tokens: i64 = per_row.iter().map(|r| r.tokens).sum();
    let (loss, entropy, mean_token_accuracy) = token_means(&per_row);
    if let Some(out) = &args.output {
        data::io::write_jsonl(out, &rows)?;
    }
    Ok(EvalSummary {
        rows: rows.len(),
        tokens: total_tokens,
        loss,
        entropy,
        mean_token_accuracy,
        dropped: prepared.dropped,
    })
}
