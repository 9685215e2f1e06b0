//! Command-line pieces every stage shares, flattened into each stage's arguments. Each is
//! also settable from the `--config` TOML file and serialised into `OUT/config.toml`.

use std::path::PathBuf;

use clap::Args;
use data::sampler::Sampler;
use data::sft::Truncation;
use serde::Serialize;
use tch::{Device, Kind};

use crate::device::{self, DeviceChoice, DtypeChoice};
use crate::error::{Error, Result};
use crate::models::lora::{self, LoraConfig, LoraInit, TargetModules};
use crate::models::prompt_tuning::{PromptInit, PromptKind, PromptTuningConfig};
use crate::models::quant::{Bnb4bit, QuantType};
use crate::models::ModelOptions;
use crate::optim::{AdamWConfig, GradExchange, OptimName, ZeroStage};
use crate::schedule::{Schedule, ScheduleKind};

/// The message of the first failed check, as an error (each check is a condition and the
/// message naming the option that breaks it).
pub fn require(checks: &[(bool, &'static str)]) -> Result<()> {
    match checks.iter().find(|(ok, _)| !ok) {
        Some((_, message)) => Err(Error::InvalidArgument(message.to_string())),
        None => Ok(()),
    }
}

/// `--device` and `--dtype`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct DeviceArgs {
    /// Where to run: auto (CUDA when present), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Weights and activations: auto (bf16 on CUDA, f32 on CPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: DtypeChoice,
}

impl DeviceArgs {
    /// Resolves the choice and logs it, as every command does at start.
    pub fn resolve(&self) -> (Device, Kind) {
        let device = self.device.resolve();
        let kind = self.dtype.resolve(device);
        tracing::info!(
            "device {} · dtype {}",
            device::describe(device),
            device::hf_dtype_name(kind)
        );
        (device, kind)
    }

    /// [`DeviceArgs::resolve`] for a rank of `world`: `cuda` means this rank's GPU.
    pub fn resolve_for(&self, world: &crate::World) -> (Device, Kind) {
        let (device, kind) = self.resolve();
        (world.device(device), kind)
    }
}

/// `--cuda-graph` (the default) and `--no-cuda-graph`: how decoding runs on CUDA.
#[derive(Debug, Clone, Args, Serialize)]
pub struct DecodeArgs {
    /// On CUDA, capture the decode step as a CUDA graph and replay it (the default).
    #[arg(long, overrides_with = "no_cuda_graph")]
    pub cuda_graph: bool,
    /// On CUDA, launch every kernel of every decode step from the host (no CUDA graphs).
    #[arg(long, overrides_with = "cuda_graph")]
    pub no_cuda_graph: bool,
}

impl DecodeArgs {
    pub fn use_cuda_graph(&self) -> bool {
        !self.no_cuda_graph
    }
}

/// The optimiser and its schedule.
#[derive(Debug, Clone, Args, Serialize)]
pub struct OptimArgs {
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f64,
    /// Learning-rate schedule after warmup: constant, linear or cosine.
    #[arg(long, default_value = "linear")]
    pub schedule: ScheduleKind,
    /// Steps of linear warmup from 0.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// The schedule decays to lr × this.
    #[arg(long, default_value_t = 0.0)]
    pub min_lr_ratio: f64,
    /// Decoupled weight decay (not applied to biases, norms and embeddings).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// AdamW β1.
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    /// AdamW β2.
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    /// AdamW ε (1e-5 is the common RLHF choice).
    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f64,
    /// Clip gradients to this global norm; 0 disables clipping.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Data parallel: 1 shards the optimizer state (f32 master weights and Adam moments)
    /// across the ranks, as DeepSpeed's ZeRO stage 1; 0 keeps all of it on every rank.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub zero_stage: u8,
    /// Data parallel: exchange the gradients during the step's last backward pass, in
    /// buckets, as PyTorch's DDP does (same numbers; the exchange hides behind the
    /// backward). Off: after it, in one go.
    #[arg(long)]
    pub overlap_grad_reduce: bool,
    /// The bucket size of --overlap-grad-reduce, in MB (DDP's bucket_cap_mb).
    #[arg(long, default_value_t = crate::overlap::DEFAULT_BUCKET_CAP_MB)]
    pub bucket_cap_mb: f64,
    /// LoRA+: LoRA's B matrices (and DoRA's magnitudes) learn at --lr × this (PEFT's
    /// loraplus_lr_ratio; its authors suggest 16). Needs a LoRA adapter.
    #[arg(long)]
    pub loraplus_lr_ratio: Option<f64>,
    /// The optimizer (Hugging Face's TrainingArguments names): adamw_torch, or adamw_8bit
    /// (alias adamw_bnb_8bit): bitsandbytes' AdamW8bit, the moments of every parameter of
    /// 4096 elements or more held in 8 bits (blocks of 256 with an f32 scale each): 2 bytes
    /// per parameter instead of 8.
    #[arg(long, value_enum, default_value_t = OptimName::AdamwTorch)]
    pub optim: OptimName,
    /// Mixture-of-Experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): the weight of the
    /// routers' load-balancing loss (Switch Transformer's, as transformers computes it)
    /// added to every micro-batch's loss, divided by the step's micro-batches (TRL's
    /// router_aux_loss_coef). Default: the model config's router_aux_loss_coef
    /// (transformers' defaults 0.001, OLMoE's 0.01); 0 turns it off. Refused above 0 for a
    /// model without experts.
    #[arg(long)]
    pub router_aux_loss_coef: Option<f64>,
    /// A BEMA of the trained weights beside them (`--bema`, TRL's `BEMACallback`).
    #[command(flatten)]
    #[serde(flatten)]
    pub bema: crate::averaging::BemaArgs,
}

impl OptimArgs {
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_eps,
            weight_decay: self.weight_decay,
            loraplus_lr_ratio: self.loraplus_lr_ratio,
            eight_bit: self.optim == OptimName::Adamw8bit,
        }
    }

    /// How the gradients are exchanged between data-parallel ranks.
    pub fn grad_exchange(&self) -> GradExchange {
        GradExchange {
            zero: match self.zero_stage {
                0 => ZeroStage::Off,
                _ => ZeroStage::Optimizer,
            },
            overlap_bucket_bytes: self
                .overlap_grad_reduce
                .then_some((self.bucket_cap_mb * 1e6) as usize),
        }
    }

    /// The learning-rate schedule over `total_steps` optimiser updates.
    pub fn schedule(&self, total_steps: u64) -> Schedule {
        Schedule {
            kind: self.schedule,
            base_lr: self.lr,
            warmup_steps: self.warmup_steps,
            total_steps,
            min_lr_ratio: self.min_lr_ratio,
        }
    }

    /// Nonsensical values, as the option that holds them.
    pub fn validate(&self) -> Result<()> {
        require(&[
            (self.lr > 0.0 && self.lr.is_finite(), "--lr must be > 0"),
            (
                (0.0..=1.0).contains(&self.min_lr_ratio),
                "--min-lr-ratio must be in [0, 1]",
            ),
            (self.weight_decay >= 0.0, "--weight-decay must be ≥ 0"),
            (
                (0.0..1.0).contains(&self.adam_beta1),
                "--adam-beta1 must be in [0, 1)",
            ),
            (
                (0.0..1.0).contains(&self.adam_beta2),
                "--adam-beta2 must be in [0, 1)",
            ),
            (self.adam_eps > 0.0, "--adam-eps must be > 0"),
            (self.max_grad_norm >= 0.0, "--max-grad-norm must be ≥ 0"),
            (
                self.bucket_cap_mb > 0.0 && self.bucket_cap_mb.is_finite(),
                "--bucket-cap-mb must be > 0",
            ),
            (
                self.loraplus_lr_ratio
                    .is_none_or(|r| r > 0.0 && r.is_finite()),
                "--loraplus-lr-ratio must be > 0",
            ),
            (
                self.router_aux_loss_coef
                    .is_none_or(|c| c >= 0.0 && c.is_finite()),
                "--router-aux-loss-coef must be ≥ 0",
            ),
            (
                self.optim == OptimName::AdamwTorch || self.zero_stage == 0,
                "--optim adamw_8bit with --zero-stage 1 is not supported (its 8-bit blocks follow each parameter, a shard cuts them)",
            ),
        ])?;
        self.bema.validate()
    }
}

/// Where a run writes, how long it runs, how it checkpoints and resumes.
#[derive(Debug, Clone, Args, Serialize)]
pub struct RunArgs {
    /// Output directory: config.toml, checkpoints/, final/, tb/, metrics.jsonl.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// TOML file setting any of these options (flags on the command line win).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Continue from the newest complete checkpoint in --output-dir.
    #[arg(long)]
    pub resume: bool,
    /// Replace a run already in --output-dir.
    #[arg(long)]
    pub overwrite: bool,
    /// Passes over the training data (ignored when --max-steps is given).
    #[arg(long, default_value_t = 1)]
    pub epochs: u64,
    /// Total optimiser steps (PPO: iterations); overrides --epochs.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Write a checkpoint every N steps; 0 writes one only at the end.
    #[arg(long, default_value_t = 0)]
    pub save_every: u64,
    /// Keep only the newest N checkpoints; 0 keeps all.
    #[arg(long, default_value_t = 0)]
    pub keep_last: usize,
    /// Seed of the data order and of any sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Log a line every N steps when stderr is not a terminal.
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
    /// Stop after this many consecutive steps with a non-finite loss or gradient (each is
    /// skipped); the last good checkpoint stays.
    #[arg(long, default_value_t = 5)]
    pub max_bad_steps: u64,
    /// Data parallel: seconds a rank waits for the others at a collective before it exits
    /// non-zero naming the store (a checkpoint written by rank 0 holds the rest meanwhile).
    #[arg(long, default_value_t = 1800)]
    pub dist_timeout: u64,
}

impl RunArgs {
    /// The processes of this run: the one process, or the ranks torchrun or Slurm launched
    /// (connected to the run's c10d store).
    pub fn world(&self) -> Result<crate::World> {
        crate::World::from_env(std::time::Duration::from_secs(self.dist_timeout))
    }

    pub fn validate(&self) -> Result<()> {
        require(&[
            (
                self.epochs > 0 || self.max_steps.is_some(),
                "--epochs must be at least 1",
            ),
            (self.max_steps != Some(0), "--max-steps must be at least 1"),
            (
                self.dist_timeout > 0,
                "--dist-timeout must be at least 1 second",
            ),
        ])
    }

    /// Seeds libtorch's generator, so that freshly initialised weights (a new `score` head)
    /// are the same in every run with this seed. Call before loading models.
    pub fn seed_torch(&self) {
        tch::manual_seed(self.seed as i64);
    }
}

/// `--chat-template-path`, `--eos-token` and `--chat-template-kwargs`: what a run changes in
/// the model's tokenizer.
#[derive(Debug, Clone, Args, Serialize, Default)]
pub struct TokenizerArgs {
    /// A .jinja (or .j2) chat template used instead of the tokenizer's for every
    /// conversation (TRL's `chat_template_path` given a template file), and written as
    /// chat_template.jinja with the tokenizer files of every model the run saves.
    #[arg(long)]
    pub chat_template_path: Option<PathBuf>,
    /// The end-of-sequence token, a token of the vocabulary (TRL's `eos_token`; e.g.
    /// <|im_end|> for a base model trained on ChatML): appended to text rows, eos_token in
    /// chat templates, the first of the EOS ids that end generation, and so in the saved
    /// tokenizer_config.json, generation_config.json and config.json.
    #[arg(long)]
    pub eos_token: Option<String>,
    /// More variables for the chat template, a JSON object (TRL's `chat_template_kwargs`,
    /// e.g. '{"enable_thinking": false}' for Qwen3): for every conversation of the run; a
    /// row's own `chat_template_kwargs` field overrides them.
    #[arg(long, value_parser = parse_template_kwargs)]
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
}

fn parse_template_kwargs(
    s: &str,
) -> std::result::Result<serde_json::Map<String, serde_json::Value>, String> {
    let v: serde_json::Value = serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))?;
    data::formats::template_kwargs(&v)
}

impl TokenizerArgs {
    /// `tok` with these changes, and `model` carrying them into what it saves; both as
    /// they are without them.
    pub fn apply(
        &self,
        model: &mut crate::Model,
        mut tok: data::Tokenizer,
    ) -> Result<data::Tokenizer> {
        if let Some(path) = &self.chat_template_path {
            let (with, text) = tok.with_chat_template_file(path)?;
            tok = with;
            model.tokenizer_overrides.chat_template = Some(text);
        }
        if let Some(token) = &self.eos_token {
            tok = tok.with_eos_token(token)?;
            let id = tok.eos_id.expect("set");
            model.tokenizer_overrides.eos = Some((token.clone(), id));
            model.config.raw.insert("eos_token_id".into(), id.into());
        }
        if let Some(kwargs) = &self.chat_template_kwargs {
            tok = tok.with_template_kwargs(kwargs.clone());
        }
        Ok(tok)
    }
}

/// Parameter-efficient training: LoRA adapters (PEFT's semantics and file format).
#[derive(Debug, Clone, Args, Serialize, Default)]
pub struct AdapterArgs {
    /// LoRA rank; LoRA is off when absent (every weight trains).
    #[arg(long)]
    pub lora_r: Option<i64>,
    /// LoRA α (the update is scaled by α / r); default: the rank.
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the adapters' input while training.
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Layers that get adapters: module names, comma-separated (a layer matches its name
    /// or a dotted suffix), or all-linear; default: PEFT's for the architecture (c_attn
    /// for GPT-2, q_proj,v_proj for the Llama family).
    #[arg(long)]
    pub lora_target_modules: Option<String>,
    /// Parameters that get adapters (PEFT's target_parameters), comma-separated, matched
    /// like module names: gpt-oss's fused experts, e.g.
    /// mlp.experts.gate_up_proj,mlp.experts.down_proj (or 7.mlp.experts.gate_up_proj for
    /// layer 7's). Without --lora-target-modules, no module gets one.
    #[arg(long)]
    pub lora_target_parameters: Option<String>,
    /// rsLoRA: scale by α / √r instead of α / r.
    #[arg(long)]
    pub use_rslora: bool,
    /// Full trainable copies beside the adapters (TRL's lora_modules_to_save, PEFT's
    /// modules_to_save): embed_tokens (wte for GPT-2) and/or lm_head, comma-separated;
    /// e.g. for tokens a chat template added. Tied embeddings become two copies.
    #[arg(long)]
    pub lora_modules_to_save: Option<String>,
    /// Train only these rows of the input embedding (and of a head tied to it) beside the
    /// adapters (PEFT's trainable_token_indices): ids, comma-separated, e.g. the tokens a
    /// chat template added; a lighter alternative to --lora-modules-to-save embed_tokens.
    #[arg(long, value_delimiter = ',')]
    pub trainable_token_indices: Option<Vec<i64>>,
    /// DoRA: a trained magnitude per output row beside A and B (PEFT's use_dora).
    #[arg(long)]
    pub use_dora: bool,
    /// How A and B start (PEFT's init_lora_weights): true (A Kaiming-uniform, B zeros),
    /// gaussian (A normal with std 1/r), pissa (the base weight's top r singular
    /// directions; the base keeps the residual) or olora (its QR factors; likewise).
    /// PiSSA and OLoRA adapters are written as plain LoRA adapters of rank 2r on the
    /// unchanged base, as PEFT converts them.
    #[arg(long, value_enum, default_value_t = LoraInit::Kaiming)]
    pub init_lora_weights: LoraInit,
    /// Prompt tuning: this many trainable virtual tokens before every input, the whole
    /// model frozen (off when absent; not with --lora-r).
    #[arg(long)]
    pub prompt_tuning_tokens: Option<i64>,
    /// How the virtual tokens start: random (N(0, 1)), vocab (embeddings of random
    /// vocabulary tokens) or text (of --prompt-tuning-init-text's tokens, repeated).
    #[arg(long, default_value = "random")]
    pub prompt_tuning_init: PromptInitChoice,
    /// The text whose token embeddings start the virtual tokens (--prompt-tuning-init text).
    #[arg(long)]
    pub prompt_tuning_init_text: Option<String>,
    /// Prefix tuning (PEFT's PREFIX_TUNING; P-tuning v2's deep prompts): this many
    /// trainable virtual tokens as keys and values in every layer's attention, the whole
    /// model frozen (off when absent; not with --lora-r or --prompt-tuning-tokens).
    #[arg(long)]
    pub prefix_tuning_tokens: Option<i64>,
    /// Also write OUT/final_merged/: a plain Hugging Face model with the adapters folded in.
    #[arg(long)]
    pub save_merged: bool,
    /// The base model of an adapter directory given as --model (default: its
    /// base_model_name_or_path).
    #[arg(long)]
    pub base_model: Option<PathBuf>,
}

impl AdapterArgs {
    pub fn validate(&self) -> Result<()> {
        let text_init = self.prompt_tuning_init == PromptInitChoice::Text;
        let lora = self.lora();
        let saved = lora.as_ref().map_or(&[][..], |l| &l.modules_to_save[..]);
        let known = |n: &String| crate::models::lora::is_embedding_name(n) || n == "lm_head";
        let saves_embedding = lora.as_ref().is_some_and(|l| l.saves_embedding());
        require(&[
            (
                saved.iter().all(known),
                "--lora-modules-to-save takes embed_tokens (wte for GPT-2) and lm_head",
            ),
            (
                !(saves_embedding && self.trainable_token_indices.is_some()),
                "--trainable-token-indices with --lora-modules-to-save embed_tokens: the copy already trains every row; choose one",
            ),
            (
                self.lora_r.is_none_or(|r| r > 0),
                "--lora-r must be at least 1",
            ),
            (
                self.prompt_tuning_tokens.is_none_or(|n| n > 0),
                "--prompt-tuning-tokens must be at least 1",
            ),
            (
                self.lora_r.is_none() || self.prompt_tuning_tokens.is_none(),
                "--lora-r and --prompt-tuning-tokens cannot be combined (one adapter per run)",
            ),
            (
                self.prefix_tuning_tokens.is_none_or(|n| n > 0),
                "--prefix-tuning-tokens must be at least 1",
            ),
            (
                self.prefix_tuning_tokens.is_none()
                    || (self.lora_r.is_none() && self.prompt_tuning_tokens.is_none()),
                "--prefix-tuning-tokens cannot be combined with --lora-r or --prompt-tuning-tokens (one adapter per run)",
            ),
            (
                self.prefix_tuning_tokens.is_none()
                    || self.prompt_tuning_init == PromptInitChoice::Random,
                "--prompt-tuning-init starts --prompt-tuning-tokens' embeddings; a prefix (--prefix-tuning-tokens) starts N(0, 1), as PEFT's",
            ),
            (
                text_init == self.prompt_tuning_init_text.is_some(),
                "--prompt-tuning-init text needs --prompt-tuning-init-text (and the text needs it)",
            ),
            (
                !self.save_merged || self.lora_r.is_some(),
                "--save-merged needs --lora-r (prompt and prefix tuning cannot be folded into the weights)",
            ),
            (
                self.lora_alpha.is_none_or(|a| a > 0.0),
                "--lora-alpha must be > 0",
            ),
            (
                (0.0..1.0).contains(&self.lora_dropout),
                "--lora-dropout must be in [0, 1)",
            ),
            (
                self.lora_r.is_some()
                    || (self.lora_alpha.is_none()
                        && self.lora_target_modules.is_none()
                        && self.lora_target_parameters.is_none()
                        && !self.use_rslora
                        && self.lora_modules_to_save.is_none()
                        && self.trainable_token_indices.is_none()
                        && !self.use_dora
                        && self.init_lora_weights == LoraInit::Kaiming
                        && self.lora_dropout == 0.0),
                "--lora-alpha, --lora-dropout, --lora-target-modules, --lora-target-parameters, --lora-modules-to-save, --trainable-token-indices, --use-rslora, --use-dora and --init-lora-weights need --lora-r",
            ),
        ])
    }

    /// The LoRA configuration, when --lora-r is given.
    pub fn lora(&self) -> Option<LoraConfig> {
        let r = self.lora_r?;
        Some(LoraConfig {
            r,
            alpha: self.lora_alpha.unwrap_or(r as f64),
            dropout: self.lora_dropout,
            target_modules: self
                .lora_target_modules
                .as_deref()
                .map_or(TargetModules::Default, TargetModules::parse),
            use_rslora: self.use_rslora,
            use_dora: self.use_dora,
            patterns: Default::default(),
            init: self.init_lora_weights,
            modules_to_save: self
                .lora_modules_to_save
                .as_deref()
                .map(lora::names)
                .unwrap_or_default(),
            trainable_token_indices: self.trainable_token_indices.clone().unwrap_or_default(),
            target_parameters: self
                .lora_target_parameters
                .as_deref()
                .map(lora::names)
                .unwrap_or_default(),
        })
    }

    /// The prompt-tuning configuration, when --prompt-tuning-tokens (or
    /// --prefix-tuning-tokens) is given (a text init is tokenized when the model is loaded).
    pub fn prompt_tuning(&self) -> Option<PromptTuningConfig> {
        let init = match self.prompt_tuning_init {
            PromptInitChoice::Random => PromptInit::Random,
            PromptInitChoice::Vocab => PromptInit::Vocab,
            PromptInitChoice::Text => PromptInit::Text {
                text: self.prompt_tuning_init_text.clone().unwrap_or_default(),
                ids: vec![],
            },
        };
        if let Some(n) = self.prefix_tuning_tokens {
            return Some(PromptTuningConfig {
                num_virtual_tokens: n,
                init: PromptInit::Random,
                kind: PromptKind::Prefix,
            });
        }
        Some(PromptTuningConfig {
            num_virtual_tokens: self.prompt_tuning_tokens?,
            init,
            kind: PromptKind::Input,
        })
    }

    /// `opts` with these adapters and base model.
    pub fn apply(&self, opts: ModelOptions) -> ModelOptions {
        ModelOptions {
            base_model: self.base_model.clone(),
            ..opts
                .with_lora(self.lora())
                .with_prompt_tuning(self.prompt_tuning())
        }
    }
}

/// Memory options of the training stages.
#[derive(Debug, Clone, Args, Serialize, Default)]
pub struct MemoryArgs {
    /// Recompute each transformer block's activations in the backward pass instead of
    /// keeping them (activation memory of one block input per layer; about one more
    /// forward pass of compute). Gradients equal the run without it.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub quant: QuantArgs,
}

/// QLoRA's 4-bit base (`--load-in-4bit`; TRL's `ModelConfig` names), in the training
/// stages (with [`MemoryArgs`]) and the commands that evaluate or generate.
#[derive(Debug, Clone, Args, Serialize, Default)]
pub struct QuantArgs {
    /// Hold the linear layers of the models this command loads in 4 bits, as bitsandbytes
    /// does (blocks of 64 values with an f32 scale each; dequantized layer by layer in the
    /// forward pass). The base is frozen: a model that trains needs --lora-r or
    /// --prompt-tuning-tokens. A directory stored quantized (quantization_config in
    /// config.json), or an adapter trained on such a base, loads in 4 bits without it.
    #[arg(long)]
    pub load_in_4bit: bool,
    /// The 4-bit type with --load-in-4bit: nf4 (NormalFloat, QLoRA's) or fp4.
    #[arg(long, value_enum, default_value_t = QuantType::Nf4)]
    pub bnb_4bit_quant_type: QuantType,
    /// With --load-in-4bit, quantize the block scales too (8 bits each, about 0.37 bits
    /// per parameter saved; bitsandbytes' double quantization).
    #[arg(long)]
    pub use_bnb_nested_quant: bool,
}

impl QuantArgs {
    pub fn validate(&self) -> Result<()> {
        require(&[(
            self.load_in_4bit
                || (self.bnb_4bit_quant_type == QuantType::Nf4 && !self.use_bnb_nested_quant),
            "--bnb-4bit-quant-type and --use-bnb-nested-quant need --load-in-4bit",
        )])
    }

    /// The quantization asked for, if any.
    pub fn config(&self) -> Option<Bnb4bit> {
        self.load_in_4bit
            .then(|| Bnb4bit::new(self.bnb_4bit_quant_type, self.use_bnb_nested_quant))
    }
}

impl MemoryArgs {
    pub fn validate(&self) -> Result<()> {
        self.quant.validate()
    }

    /// `opts` with these options.
    pub fn apply(&self, opts: ModelOptions) -> ModelOptions {
        ModelOptions {
            gradient_checkpointing: self.gradient_checkpointing,
            quantization: self.quant.config(),
            ..opts
        }
    }
}

/// TR-DPO's reference updates (`--sync-ref-model`, TRL's `sync_ref_model`), for the stages
/// that hold a frozen reference (`dpo train`, `ppo train`).
#[derive(Debug, Clone, Args, Serialize)]
pub struct SyncRefArgs {
    /// Move the frozen reference towards the policy every --ref-model-sync-steps steps:
    /// reference ← α·policy + (1 − α)·reference (TR-DPO, Gorbatovski et al. 2024). The
    /// moved reference is saved in each checkpoint, so --resume continues with it.
    #[arg(long)]
    pub sync_ref_model: bool,
    /// α of --sync-ref-model.
    #[arg(long, default_value_t = 0.6)]
    pub ref_model_mixup_alpha: f64,
    /// Steps between the reference's updates (--sync-ref-model).
    #[arg(long, default_value_t = 512)]
    pub ref_model_sync_steps: u64,
}

impl SyncRefArgs {
    pub fn validate(&self) -> Result<()> {
        require(&[
            (
                self.ref_model_mixup_alpha > 0.0 && self.ref_model_mixup_alpha <= 1.0,
                "--ref-model-mixup-alpha must be in (0, 1]",
            ),
            (
                self.ref_model_sync_steps > 0,
                "--ref-model-sync-steps must be at least 1",
            ),
        ])
    }

    /// Whether the reference moves after step `step` (1-based, as logged).
    pub fn due(&self, step: u64) -> bool {
        self.sync_ref_model && step.is_multiple_of(self.ref_model_sync_steps)
    }

    /// Whether the reference has moved by step `step`, so a checkpoint must keep it.
    pub fn has_moved(&self, step: u64) -> bool {
        self.sync_ref_model && step >= self.ref_model_sync_steps
    }
}

/// `--prompt-tuning-init`: PEFT's RANDOM, SAMPLE_VOCAB and TEXT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PromptInitChoice {
    #[default]
    Random,
    Vocab,
    Text,
}

/// One `--data FILE[:WEIGHT]`: a training file and its mixing weight.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSpec {
    pub path: PathBuf,
    pub weight: Option<f64>,
}

impl std::str::FromStr for DataSpec {
    type Err = String;
    /// `FILE:WEIGHT` when what follows the last `:` is a number and `FILE` is not itself
    /// an existing file's whole name; else the whole text is the file.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Some((path, w)) = s.rsplit_once(':') {
            if let Ok(weight) = w.parse::<f64>() {
                if !std::path::Path::new(s).exists() {
                    if !(weight.is_finite() && weight > 0.0) {
                        return Err(format!("the weight in '{s}' must be a positive number"));
                    }
                    return Ok(DataSpec {
                        path: path.into(),
                        weight: Some(weight),
                    });
                }
            }
        }
        Ok(DataSpec {
            path: s.into(),
            weight: None,
        })
    }
}

impl std::fmt::Display for DataSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(w) = self.weight {
            write!(f, ":{w}")?;
        }
        Ok(())
    }
}

/// One file as a string (as `config.toml` always had it), several as a list.
fn one_or_list<S: serde::Serializer>(
    specs: &[DataSpec],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match specs {
        [one] => s.serialize_str(&one.to_string()),
        many => s.collect_seq(many.iter().map(ToString::to_string)),
    }
}

/// Data options of the supervised stages (`sft train`, `reward train`).
#[derive(Debug, Clone, Args, Serialize)]
pub struct TrainDataArgs {
    /// Training rows, JSON Lines. `sft train` takes it several times for a mixture of
    /// datasets (FLAN-style), each as FILE or FILE:WEIGHT.
    #[arg(long, required = true)]
    #[serde(serialize_with = "one_or_list")]
    pub data: Vec<DataSpec>,
    /// A mixture without weights draws from each dataset in proportion to its size, capped
    /// at this many rows per mixture epoch (T5 / FLAN's examples-proportional mixing).
    #[arg(long)]
    pub max_examples_per_dataset: Option<usize>,
    /// Held-out rows in the same format, for the eval/ metrics.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Evaluate every N steps (and at the end); 0 evaluates only at the end.
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Longest sequence in tokens; longer rows follow --truncation.
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// truncate or drop rows over --max-length (SFT cuts the completion's end; the reward
    /// model keeps the end and cuts the prompt's start).
    #[arg(long, default_value = "truncate")]
    pub truncation: Truncation,
    /// Batch rows of similar length together (less padding, faster steps when lengths
    /// vary), as transformers' `group_by_length`; batches are still shuffled.
    #[arg(long)]
    pub group_by_length: bool,
    /// The order rows are trained in (transformers' `train_sampling_strategy`): random
    /// (shuffled anew each epoch), sequential (the file's order every epoch: a curriculum)
    /// or group_by_length (as --group-by-length).
    #[arg(long, value_enum, default_value = "random")]
    pub train_sampling_strategy: SamplingStrategy,
}

/// `--train-sampling-strategy`, under transformers' names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SamplingStrategy {
    Random,
    Sequential,
    #[value(name = "group_by_length", alias = "group-by-length")]
    GroupByLength,
}

impl TrainDataArgs {
    pub fn validate(&self) -> Result<()> {
        let weighted = self.data.iter().filter(|d| d.weight.is_some()).count();
        let mixture = self.data.len() > 1;
        require(&[
            (self.batch_size > 0, "--batch-size must be at least 1"),
            (self.grad_accum > 0, "--grad-accum must be at least 1"),
            (self.max_length > 1, "--max-length must be at least 2"),
            (weighted == 0 || weighted == self.data.len(), "--data: give a weight (FILE:WEIGHT) for every file of the mixture, or for none"),
            (weighted == 0 || self.max_examples_per_dataset.is_none(), "--max-examples-per-dataset caps size-proportional mixing; with weights (FILE:WEIGHT) leave it out"),
            (self.max_examples_per_dataset != Some(0), "--max-examples-per-dataset must be at least 1"),
            (!(mixture && self.grouped()), "--group-by-length works on one dataset; a mixture of several --data files cannot use it"),
            (!(self.group_by_length && self.train_sampling_strategy == SamplingStrategy::Sequential), "--group-by-length shuffles its batches: not with --train-sampling-strategy sequential"),
            (!(mixture && self.train_sampling_strategy == SamplingStrategy::Sequential), "--train-sampling-strategy sequential reads one dataset in its order; a mixture of several --data files draws from them by its own seeded order"),
        ])
    }

    /// Whether rows of similar length are batched together (--group-by-length, or
    /// --train-sampling-strategy group_by_length).
    pub fn grouped(&self) -> bool {
        self.group_by_length || self.train_sampling_strategy == SamplingStrategy::GroupByLength
    }

    /// The one training file of a stage that does not mix datasets.
    pub fn single(&self, stage: &str) -> Result<&std::path::Path> {
        match self.data.as_slice() {
            [one] if one.weight.is_none() && self.max_examples_per_dataset.is_none() => Ok(&one.path),
            _ => Err(Error::InvalidArgument(format!(
                "--data: {stage} reads one file without a weight (mixtures of datasets are for sft train)"
            ))),
        }
    }

    /// Rows per mixture epoch of each file, for files of `sizes` rows.
    pub fn mixture_counts(&self, sizes: &[usize]) -> Vec<usize> {
        let weights: Option<Vec<f64>> = self.data.iter().map(|d| d.weight).collect();
        data::sampler::mixture_counts(sizes, weights.as_deref(), self.max_examples_per_dataset)
    }

    /// The training order over rows of these `lengths` (in tokens): shuffled (grouped by
    /// length with `--group-by-length`), or the file's (`--train-sampling-strategy
    /// sequential`).
    pub fn sampler(&self, lengths: Vec<usize>, seed: u64) -> Sampler {
        if self.grouped() {
            Sampler::grouped_by_length(lengths, self.batch_size, seed)
        } else {
            let shuffle = self.train_sampling_strategy == SamplingStrategy::Random;
            Sampler::new(lengths.len(), seed, shuffle)
        }
    }

    /// Rows per optimiser step on one rank (`--batch-size` is per rank, as TRL's
    /// `per_device_train_batch_size`).
    pub fn rows_per_step(&self) -> usize {
        self.batch_size * self.grad_accum
    }

    /// Total steps for `rows` rows when `ranks` processes each take
    /// [`Self::rows_per_step`] rows of every step: `max_steps`, else `epochs` passes.
    pub fn total_steps(
        &self,
        rows: usize,
        epochs: u64,
        max_steps: Option<u64>,
        ranks: usize,
    ) -> u64 {
        max_steps.unwrap_or(epochs * rows.div_ceil(self.rows_per_step() * ranks) as u64)
    }

    /// Whether to evaluate after `step` (always at the end).
    pub fn eval_due(&self, step: u64, last: bool) -> bool {
        last || (self.eval_every > 0 && step.is_multiple_of(self.eval_every))
    }
}

/// Ends a command: its JSON summary on stdout and exit 0, or the error with its causes on
/// one line of stderr and exit 1 (no panic, no backtrace).
pub fn finish<E: std::fmt::Display>(result: std::result::Result<serde_json::Value, E>) -> ! {
    match result {
        Ok(summary) => {
            println!("{summary}");
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        data: TrainDataArgs,
    }

    fn data_args(extra: &[&str]) -> TrainDataArgs {
        let argv = [&["sft", "--data", "rows.jsonl"][..], extra].concat();
        <Wrapper as clap::Parser>::parse_from(argv).data
    }

    /// `--train-sampling-strategy sequential` trains the rows in the file's order every
    /// epoch; random shuffles each epoch anew; group_by_length is --group-by-length.
    #[test]
    fn the_sampling_strategy_sets_the_training_order() {
        let lengths = vec![4, 9, 2, 7, 5, 3];
        let order = |args: &TrainDataArgs| {
            let mut s = args.sampler(lengths.clone(), 3);
            [s.next_batch(6), s.next_batch(6)]
        };
        let sequential = data_args(&["--train-sampling-strategy", "sequential"]);
        let file: Vec<usize> = (0..6).collect();
        assert_eq!(order(&sequential), [file.clone(), file.clone()]);
        let random = order(&data_args(&[]));
        assert!(random[0] != file && random[0] != random[1], "{random:?}");
        let grouped = data_args(&["--train-sampling-strategy", "group_by_length"]);
        assert!(grouped.grouped());
        assert_eq!(order(&grouped), order(&data_args(&["--group-by-length"])));
        assert!(grouped.validate().is_ok() && sequential.validate().is_ok());
        let both = data_args(&[
            "--group-by-length",
            "--train-sampling-strategy",
            "sequential",
        ]);
        assert!(both.validate().is_err());
    }
}
