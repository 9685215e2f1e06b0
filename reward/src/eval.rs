//! `reward eval`: rewards of rankings (with whether each pair is ordered correctly) or of
//! single prompt/completion rows, normalised as the model's config says (raw scores too).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use common::cli::{require, DeviceArgs};
use common::scoring::{score_sequences, Normalization};
use common::{Head, Model, ModelOptions};
use data::formats::{PreferenceExample, SftExample};
use data::preference::{sft_sequence, tokenize, truncate_left};
use data::sft::Truncation;
use serde_json::json;

use crate::loss::pairs;

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Reward model directory (from `reward train`), or a LoRA adapter directory with its
    /// score head (PEFT's `SEQ_CLS` format).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub tokenizer: common::cli::TokenizerArgs,
    /// The base model of an adapter directory (default: its base_model_name_or_path).
    #[arg(long)]
    pub base_model: Option<PathBuf>,
    #[command(flatten)]
    pub quant: common::cli::QuantArgs,
    /// Rankings/pairs, or SFT-format rows (prompt/completion, messages, text) to score.
    #[arg(long)]
    pub data: PathBuf,
    /// Per-row results as JSON Lines.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Longest sequence; longer ones keep their last --max-length tokens.
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
}

enum Row {
    Ranking(PreferenceExample),
    Single(SftExample),
}

#[derive(Debug, Clone, PartialEq)]
pub struct EvalSummary {
    pub rows: usize,
    pub pairs: usize,
    pub accuracy: Option<f64>,
    pub mean_margin: Option<f64>,
    pub mean_reward: f64,
}

pub fn run(args: &EvalArgs) -> Result<EvalSummary> {
    require(&[
        (args.batch_size > 0, "--batch-size must be at least 1"),
        (args.max_length > 1, "--max-length must be at least 2"),
    ])?;
    args.quant.validate()?;
    let (device, kind) = args.device.resolve();
    let rows = data::rows::read(&args.data, |row| {
        if row.has("chosen") || row.has("rejected") || row.has("responses") {
            PreferenceExample::decode(row).map(Row::Ranking)
        } else {
            SftExample::decode(row).map(Row::Single)
        }
    })?;
    let opts = ModelOptions {
        base_model: args.base_model.clone(),
        quantization: args.quant.config(),
        ..ModelOptions::new(Head::Score, device, kind).frozen()
    };
    let (mut model, tok) = Model::load_with_tokenizer(&args.model, &opts)?;
    let tok = args.tokenizer.apply(&mut model, tok)?;
    let norm = Normalization::of(&model);
    let max_length = model.cap_length(args.max_length, "--max-length");
    // Every sequence of every row, scored in one pass.
    let mut sequences = vec![];
    let mut spans = vec![];
    for (i, row) in rows.iter().enumerate() {
        let seqs = match row {
            Row::Ranking(ex) => tokenize(ex, &tok).map(|r| r.sequences),
            Row::Single(ex) => sft_sequence(&tok, ex).map(|s| vec![s]),
        }
        .map_err(|e| rows.locate(i, e))?;
        spans.push((sequences.len(), seqs.len()));
        for s in seqs {
            sequences
                .push(truncate_left(&s, max_length, Truncation::Truncate).expect("truncate keeps"));
        }
    }
    let raw = score_sequences(&model, &sequences, args.batch_size, tok.pad_id);
    let mut out = Vec::with_capacity(rows.len());
    let (mut n_pairs, mut correct, mut margin_sum) = (0usize, 0usize, 0f64);
    for (i, (row, &(start, k))) in rows.iter().zip(&spans).enumerate() {
        let raw_row = &raw[start..start + k];
        let rewards: Vec<f64> = raw_row.iter().map(|&r| norm.apply(r)).collect();
        match row {
            Row::Ranking(_) => {
                let ordered: Vec<bool> = pairs(&[k])
                    .iter()
                    .map(|&(a, b, _, _)| rewards[a] > rewards[b])
                    .collect();
                n_pairs += ordered.len();
                correct += ordered.iter().filter(|&&c| c).count();
                margin_sum += pairs(&[k])
                    .iter()
                    .map(|&(a, b, _, _)| rewards[a] - rewards[b])
                    .sum::<f64>();
                out.push(json!({"index": i, "rewards": rewards, "raw_rewards": raw_row, "pairs_correct": ordered}));
            }
            Row::Single(_) => {
                out.push(json!({"index": i, "reward": rewards[0], "raw_reward": raw_row[0]}))
            }
        }
    }
    if let Some(path) = &args.output {
        data::io::write_jsonl(path, &out)?;
    }
    Ok(EvalSummary {
        rows: rows.len(),
        pairs: n_pairs,
        accuracy: (n_pairs > 0).then(|| correct as f64 / n_pairs as f64),
        mean_margin: (n_pairs > 0).then(|| margin_sum / n_pairs as f64),
        mean_reward: raw.iter().map(|&r| norm.apply(r)).sum::<f64>() / raw.len().max(1) as f64,
    })
}
