//! `dpo eval`: the DPO loss and metrics of a policy against a reference on preference
//! pairs (one JSON row per pair), or an unpaired loss's on completions (one row per
//! completion); and a summary.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use common::cli::{require, DeviceArgs};
use common::{Head, Model, ModelOptions};
use data::pairs::PairLimits;
use data::sft::Truncation;
use serde_json::{json, Value};

use crate::loss::{LossArgs, LossType};
use crate::train::prepare_file;
use crate::{run_pairs, Reference};

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// The policy: a Hugging Face model directory or an adapter directory.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub tokenizer: common::cli::TokenizerArgs,
    /// The reference (default for an adapter directory: its base model, the adapter off).
    #[arg(long)]
    pub ref_model: Option<PathBuf>,
    /// The base model of an adapter directory (default: its base_model_name_or_path).
    #[arg(long)]
    pub base_model: Option<PathBuf>,
    #[command(flatten)]
    pub quant: common::cli::QuantArgs,
    /// Preference rows (pairs or rankings), as `dpo train` reads them; with an unpaired
    /// loss, KTO's rows ({"prompt","completion","label"}) or preference rows unpaired.
    #[arg(long)]
    pub data: PathBuf,
    /// Per-pair results as JSON Lines.
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub loss: LossArgs,
    /// Pairs per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Longest sequence in tokens (each sequence's start is kept).
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// Keep only the last N tokens of each prompt.
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// truncate or drop pairs over --max-length.
    #[arg(long, default_value = "truncate")]
    pub truncation: Truncation,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// The summary: the pair count, then `loss` and TRL's metric names.
pub fn run(args: &EvalArgs) -> Result<Value> {
    require(&[
        (args.batch_size > 0, "--batch-size must be at least 1"),
        (args.max_length > 1, "--max-length must be at least 2"),
        (
            args.loss.unpaired() != Some(LossType::Kto) || args.batch_size > 1,
            "--loss-type kto needs --batch-size ≥ 2: its KL estimate scores each completion after another one's prompt within a batch",
        ),
    ])?;
    args.loss.validate()?;
    args.quant.validate()?;
    let (device, kind) = args.device.resolve();
    let opts = ModelOptions {
        base_model: args.base_model.clone(),
        quantization: args.quant.config(),
        ..ModelOptions::new(Head::Lm, device, kind).frozen()
    };
    let (mut policy, tok) = Model::load_with_tokenizer(&args.model, &opts)?;
    let tok = args.tokenizer.apply(&mut policy, tok)?;
    let reference = match (&args.ref_model, args.loss.uses_reference()) {
        (None, false) => Reference::Free,
        (Some(_), false) => bail!("--ref-model does not apply: the loss is reference-free (--reference-free, simpo or orpo)"),
        (Some(dir), true) => Reference::load(&policy, &args.model, Some(dir), &opts)?,
        (None, true) if policy.options.has_adapter() => Reference::AdapterOff,
        (None, true) => bail!("--ref-model is required: --model {} is a full model (only an adapter directory has its base as the default reference)", args.model.display()),
    };
    let limits = PairLimits {
        max_prompt_length: args.max_prompt_length,
        max_length: policy.cap_length(args.max_length, "--max-length"),
        truncation: args.truncation,
    };
    let unpaired = args.loss.unpaired().map(|_| args.batch_size);
    let prepared = prepare_file(
        &args.data,
        &tok,
        limits,
        (unpaired, args.loss.tpo_alpha != 0.0),
    )?;
    let pairs: Vec<_> = prepared.pairs.iter().enumerate().collect();
    let shape = (args.batch_size, tok.pad_id);
    if unpaired.is_some() {
        let items = (&pairs[..], &prepared.labels[..]);
        let (stats, results) = crate::kto::evaluate(&policy, &reference, items, shape, &args.loss);
        if let Some(out) = &args.output {
            let beta = args.loss.beta;
            let rows: Vec<Value> = (prepared.origin.iter().zip(&prepared.labels))
                .zip(&results)
                .map(|((&(index, place, _), label), r)| {
                    json!({"index": index, "response": place, "label": label,
                           "logps": r.logps, "ref_logps": r.ref_logps,
                           "reward": beta * (r.logps - r.ref_logps), "loss": r.loss})
                })
                .collect();
            data::io::write_jsonl(out, &rows)?;
        }
        let mut summary = serde_json::Map::new();
        summary.insert("completions".into(), json!(results.len()));
        summary.insert("dropped".into(), json!(prepared.dropped));
        for (k, v) in stats.named() {
            summary.insert(k.into(), json!(v));
        }
        return Ok(Value::Object(summary));
    }
    let (stats, results) = run_pairs(&policy, &reference, &pairs, shape, &args.loss, None);
    if let Some(out) = &args.output {
        let beta = args.loss.beta;
        let rows: Vec<Value> = prepared
            .origin
            .iter()
            .zip(&results)
            .map(|(&(index, chosen, rejected), r)| {
                json!({"index": index, "chosen": chosen, "rejected": rejected,
                       "logps_chosen": r.logps[0], "logps_rejected": r.logps[1],
                       "ref_logps_chosen": r.ref_logps[0], "ref_logps_rejected": r.ref_logps[1],
                       "reward_chosen": beta * (r.logps[0] - r.ref_logps[0]),
                       "reward_rejected": beta * (r.logps[1] - r.ref_logps[1]),
                       "loss": r.loss})
            })
            .collect();
        data::io::write_jsonl(out, &rows)?;
    }
    let mut summary = serde_json::Map::new();
    summary.insert("pairs".into(), json!(results.len()));
    summary.insert("dropped".into(), json!(prepared.dropped));
    for (k, v) in stats.named(&args.loss) {
        summary.insert(k.into(), json!(v));
    }
    Ok(Value::Object(summary))
}
