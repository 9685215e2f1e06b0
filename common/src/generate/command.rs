//! The `generate` command of `sft` and `ppo`: sample completions for a file of prompts.

use std::path::PathBuf;

use clap::Args;
use data::prompts::collate_left;
use serde_json::json;

use super::{generate, FinishReason, SamplingConfig};
use crate::cli::{require, DecodeArgs, DeviceArgs};
use crate::error::Result;
use crate::models::{Head, Model, ModelOptions};

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Hugging Face model directory (weights, config.json, tokenizer.json), or a LoRA
    /// adapter directory (PEFT's format).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub tokenizer: crate::cli::TokenizerArgs,
    /// The base model of an adapter directory (default: its base_model_name_or_path).
    #[arg(long)]
    pub base_model: Option<PathBuf>,
    #[command(flatten)]
    pub quant: crate::cli::QuantArgs,
    /// Prompts: {"prompt"} or {"messages"} per line (messages use the chat template).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Results as JSON Lines: {"index","prompt","completion","finish_reason"}.
    #[arg(long)]
    pub output: PathBuf,
    /// Most tokens generated per prompt.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: i64,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Sample among the K most likely tokens; 0 keeps all.
    #[arg(long, default_value_t = 0)]
    pub top_k: i64,
    /// Sample among the most likely tokens holding this much probability; 1 keeps all.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sample among the tokens at least this many times as likely as the most likely one
    /// (transformers' `min_p`); 0 keeps all.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f64,
    /// transformers' `repetition_penalty`: the logits of the tokens already in a row (its
    /// prompt and what it generated) are divided by it where positive and multiplied where
    /// negative; 1 is off (CTRL's paper uses 1.2).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Seed of the sampling; the same seed gives the same completions.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Completions per prompt (transformers' `num_return_sequences`): with N > 1 each
    /// prompt's N rows follow one another, each with its `sample` number (0..N).
    #[arg(long, default_value_t = 1)]
    pub num_return_sequences: usize,
    /// Token ids that end a completion (comma-separated); default: generation_config.json's
    /// eos_token_id, else config.json's, else the tokenizer's EOS.
    #[arg(long, value_delimiter = ',')]
    pub eos_token_id: Vec<i64>,
    /// Prompts per generation batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub decode: DecodeArgs,
}

/// Counts of a generation run.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateSummary {
    pub rows: usize,
    pub finished_eos: usize,
    pub tokens: i64,
}

impl GenerateSummary {
    /// The summary line the command prints.
    pub fn to_json(&self, args: &GenerateArgs) -> serde_json::Value {
        json!({"rows": self.rows, "finished_eos": self.finished_eos, "tokens": self.tokens,
               "output": args.output})
    }
}

pub fn run(args: &GenerateArgs) -> Result<GenerateSummary> {
    require(&[
        (args.batch_size > 0, "--batch-size must be at least 1"),
        (
            args.max_new_tokens > 0,
            "--max-new-tokens must be at least 1",
        ),
        (args.temperature >= 0.0, "--temperature must be ≥ 0"),
        (
            args.num_return_sequences > 0,
            "--num-return-sequences must be at least 1",
        ),
    ])?;
    require(&super::filter_problems(
        (args.top_p, args.top_k),
        (args.min_p, args.repetition_penalty),
    ))?;
    args.quant.validate()?;
    let (device, kind) = args.device.resolve();
    let prompts = data::read_prompts(&args.prompts)?;
    let opts = ModelOptions {
        base_model: args.base_model.clone(),
        quantization: args.quant.config(),
        ..ModelOptions::new(Head::Lm, device, kind).frozen()
    };
    let (mut model, tok) = Model::load_with_tokenizer(&args.model, &opts)?;
    let tok = args.tokenizer.apply(&mut model, tok)?;
    let room = model.prompt_room(args.max_new_tokens as usize, "--max-new-tokens")?;
    let mut cut = 0;
    let encoded = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ids = tok.encode_prompt(p).map_err(|e| prompts.locate(i, e))?;
            cut += usize::from(ids.len() > room);
            Ok(ids[ids.len().saturating_sub(room)..].to_vec())
        })
        .collect::<data::Result<Vec<_>>>()?;
    if cut > 0 {
        tracing::warn!(
            "{}: {cut} prompts cut to their last {room} tokens to fit the model's positions with --max-new-tokens {}",
            args.prompts.display(),
            args.max_new_tokens
        );
    }
    let eos_ids = if args.eos_token_id.is_empty() {
        tok.generation_eos_ids()?
    } else {
        args.eos_token_id.clone()
    };
    if eos_ids.is_empty() {
        tracing::warn!("no EOS token id is known: every completion runs to --max-new-tokens");
    }
    // (prompt index, sample number) of each row to generate, a prompt's samples together.
    let n = args.num_return_sequences;
    let jobs: Vec<(usize, usize)> = (0..encoded.len())
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .collect();
    let mut rows = Vec::with_capacity(jobs.len());
    let mut summary = GenerateSummary {
        rows: 0,
        finished_eos: 0,
        tokens: 0,
    };
    for (b, chunk) in jobs.chunks(args.batch_size).enumerate() {
        let refs: Vec<&[i64]> = chunk.iter().map(|&(i, _)| encoded[i].as_slice()).collect();
        let batch = collate_left(&refs, tok.pad_id, device);
        let cfg = SamplingConfig {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repetition_penalty: args.repetition_penalty,
            eos_ids: eos_ids.clone(),
            pad_id: tok.pad_id,
            // One stream per batch, derived from the seed.
            seed: args.seed.wrapping_add(b as u64),
            cuda_graph: args.decode.use_cuda_graph(),
        };
        let out = generate(&model, &batch.input_ids, &batch.attention_mask, &cfg);
        let tokens = Vec::<Vec<i64>>::try_from(out.tokens.to_device(tch::Device::Cpu))?;
        for (i, (row, &(index, sample))) in tokens.iter().zip(chunk).enumerate() {
            let len = out.lengths[i] as usize;
            summary.tokens += len as i64;
            summary.finished_eos += usize::from(out.finish[i] == FinishReason::Eos);
            let mut line = json!({
                "index": index,
                "prompt": prompts[index].to_json(),
                "completion": tok.decode(&row[..len], true),
                "finish_reason": out.finish[i].as_str(),
            });
            if n > 1 {
                line["sample"] = json!(sample);
            }
            rows.push(line);
        }
    }
    summary.rows = rows.len();
    data::io::write_jsonl(&args.output, &rows)?;
    Ok(summary)
}
