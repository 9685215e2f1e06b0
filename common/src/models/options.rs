//! How a model is built: its head, its device and dtype, and what attaches to its layers.
//! Given to [`Model::new`](super::Model::new) and [`Model::load`](super::Model::load) and
//! passed down to every layer (linear, GPT-2's Conv1D, embeddings, norms, attention
//! blocks), so that adapters, soft prompts or activation recomputation arrive as new
//! fields here rather than as new parameters of every constructor.

use std::path::PathBuf;

use tch::{Device, Kind};

use super::lora::LoraConfig;
use super::prompt_tuning::PromptTuningConfig;
use super::quant::Bnb4bit;
use super::Head;

#[derive(Debug, Clone, PartialEq)]
pub struct ModelOptions {
    pub head: Head,
    pub device: Device,
    /// The dtype of weights and activations (f32 master weights live in the optimiser).
    pub kind: Kind,
    /// False for a model that never trains (a PPO reference or reward model): every
    /// parameter is created without a gradient.
    pub trainable: bool,
    /// LoRA adapters on the target layers, the base weights frozen (`None`: no adapter,
    /// every weight trains). Loading an adapter directory sets it from the directory.
    pub lora: Option<LoraConfig>,
    /// Prompt tuning: trainable virtual tokens before every input, the model frozen.
    pub prompt_tuning: Option<PromptTuningConfig>,
    /// The base model of an adapter directory, overriding its `base_model_name_or_path`.
    pub base_model: Option<PathBuf>,
    /// Activation recomputation (`--gradient-checkpointing`): a forward that records
    /// gradients keeps only each block's input, and [`Model::backward`](super::Model::backward)
    /// recomputes the blocks one at a time.
    pub gradient_checkpointing: bool,
    /// NEFTune (Jain et al. 2023; transformers' `neftune_noise_alpha`): in training
    /// forwards (autograd recording), uniform noise in ±α/√(T·H) is added to the input
    /// embeddings of the `[B, T, H]` batch.
    pub neftune_noise_alpha: Option<f64>,
    /// QLoRA: the linear layers' weights held in 4 bits (bitsandbytes' format), frozen
    /// (`--load-in-4bit`); a checkpoint stored quantized sets it from its `config.json`.
    pub quantization: Option<Bnb4bit>,
    /// TRL's `disable_dropout`: LoRA's dropout is not applied (the adapter's
    /// `lora_dropout` is kept as it is in its files, as PEFT's config keeps it).
    pub disable_dropout: bool,
    /// TRL's `cast_lm_head_to_fp32` (the ScaleRL recipe): the LM head's weight held, trained
    /// and applied in f32 whatever `kind` is (untied heads only).
    pub cast_lm_head_to_fp32: bool,
}

impl ModelOptions {
    /// A trainable model with `head` on `device` in `kind`.
    pub fn new(head: Head, device: Device, kind: Kind) -> Self {
        ModelOptions {
            head,
            device,
            kind,
            trainable: true,
            lora: None,
            prompt_tuning: None,
            base_model: None,
            gradient_checkpointing: false,
            neftune_noise_alpha: None,
            quantization: None,
            disable_dropout: false,
            cast_lm_head_to_fp32: false,
        }
    }

    /// The same model with LoRA adapters (or without, for `None`).
    pub fn with_lora(self, lora: Option<LoraConfig>) -> Self {
        ModelOptions { lora, ..self }
    }

    /// The same model with prompt tuning (or without, for `None`).
    pub fn with_prompt_tuning(self, prompt_tuning: Option<PromptTuningConfig>) -> Self {
        ModelOptions {
            prompt_tuning,
            ..self
        }
    }

    /// Whether the model carries an adapter (LoRA or prompt tuning).
    pub fn has_adapter(&self) -> bool {
        self.lora.is_some() || self.prompt_tuning.is_some()
    }

    /// Whether a base weight (not an adapter, not a head trained beside an adapter) trains.
    pub(crate) fn base_trains(&self) -> bool {
        self.trainable && !self.has_adapter()
    }

    /// f32 on the CPU (tests, references).
    pub fn cpu(head: Head) -> Self {
        Self::new(head, Device::Cpu, Kind::Float)
    }

    /// The same model with every parameter frozen.
    pub fn frozen(self) -> Self {
        ModelOptions {
            trainable: false,
            ..self
        }
    }

    /// The same placement with another head.
    pub fn with_head(&self, head: Head) -> Self {
        ModelOptions {
            head,
            ..self.clone()
        }
    }
}
