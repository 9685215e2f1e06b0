//! Causal language models in Hugging Face layout: a backbone per architecture (one file
//! each) and a head that is either the language-model head or the scalar `score` head of
//! `*ForSequenceClassification`.

pub mod adapter;
pub mod attention;
pub mod gemma;
pub mod gpt2;
mod layers;
pub mod llama;
pub mod lora;
pub mod moe;
pub mod mxfp4;
mod options;
pub mod prompt_tuning;
pub mod quant;
mod recompute;
pub mod vocab;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::Path;

use serde_json::Value;
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

use data::Tokenizer;

use crate::checkpoint::{self, LoadReport};
use crate::error::{Error, Result};
pub use attention::{positions_from_mask, positions_from_segments, KvCache, Masking};
use layers::param;
pub use layers::Activation;
pub use options::ModelOptions;
use prompt_tuning::PromptKind;
pub use vocab::{TokenOutputs, TokenSpec};

/// The `model_type` values this crate implements, parsed once from `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    Gpt2,
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
    Gemma,
    Gemma2,
    #[serde(rename = "gemma3_text")]
    Gemma3Text,
    Mixtral,
    #[serde(rename = "qwen2_moe")]
    Qwen2Moe,
    #[serde(rename = "qwen3_moe")]
    Qwen3Moe,
    Olmoe,
    #[serde(rename = "gpt_oss")]
    GptOss,
    Smollm3,
    Olmo2,
    Olmo3,
    Granite,
}

impl ModelType {
    pub const ALL: [ModelType; 18] = [
        ModelType::Gpt2,
        ModelType::Llama,
        ModelType::Mistral,
        ModelType::Qwen2,
        ModelType::Qwen3,
        ModelType::Phi3,
        ModelType::Gemma,
        ModelType::Gemma2,
        ModelType::Gemma3Text,
        ModelType::Mixtral,
        ModelType::Qwen2Moe,
        ModelType::Qwen3Moe,
        ModelType::Olmoe,
        ModelType::GptOss,
        ModelType::Smollm3,
        ModelType::Olmo2,
        ModelType::Olmo3,
        ModelType::Granite,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ModelType::Gpt2 => "gpt2",
            ModelType::Llama => "llama",
            ModelType::Mistral => "mistral",
            ModelType::Qwen2 => "qwen2",
            ModelType::Qwen3 => "qwen3",
            ModelType::Phi3 => "phi3",
            ModelType::Gemma => "gemma",
            ModelType::Gemma2 => "gemma2",
            ModelType::Gemma3Text => "gemma3_text",
            ModelType::Mixtral => "mixtral",
            ModelType::Qwen2Moe => "qwen2_moe",
            ModelType::Qwen3Moe => "qwen3_moe",
            ModelType::Olmoe => "olmoe",
            ModelType::GptOss => "gpt_oss",
            ModelType::Smollm3 => "smollm3",
            ModelType::Olmo2 => "olmo2",
            ModelType::Olmo3 => "olmo3",
            ModelType::Granite => "granite",
        }
    }

    /// `transformers`' class names (also what vLLM looks up): causal LM and scalar head
    /// (empty where transformers has none). GPT-2's LM class is the historical
    /// `GPT2LMHeadModel`.
    fn classes(self) -> (&'static str, &'static str) {
        match self {
            ModelType::Gpt2 => ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
            ModelType::Llama => ("LlamaForCausalLM", "LlamaForSequenceClassification"),
            ModelType::Mistral => ("MistralForCausalLM", "MistralForSequenceClassification"),
            ModelType::Qwen2 => ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
            ModelType::Qwen3 => ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
            ModelType::Phi3 => ("Phi3ForCausalLM", "Phi3ForSequenceClassification"),
            ModelType::Gemma => ("GemmaForCausalLM", "GemmaForSequenceClassification"),
            ModelType::Gemma2 => ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
            ModelType::Gemma3Text => ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
            ModelType::Mixtral => ("MixtralForCausalLM", "MixtralForSequenceClassification"),
            ModelType::Qwen2Moe => ("Qwen2MoeForCausalLM", "Qwen2MoeForSequenceClassification"),
            ModelType::Qwen3Moe => ("Qwen3MoeForCausalLM", "Qwen3MoeForSequenceClassification"),
            // transformers has no OlmoeForSequenceClassification: no scalar head.
            ModelType::Olmoe => ("OlmoeForCausalLM", ""),
            ModelType::GptOss => ("GptOssForCausalLM", "GptOssForSequenceClassification"),
            ModelType::Smollm3 => ("SmolLM3ForCausalLM", "SmolLM3ForSequenceClassification"),
            ModelType::Olmo2 => ("Olmo2ForCausalLM", "Olmo2ForSequenceClassification"),
            ModelType::Olmo3 => ("Olmo3ForCausalLM", "Olmo3ForSequenceClassification"),
            // transformers has no GraniteForSequenceClassification: no scalar head.
            ModelType::Granite => ("GraniteForCausalLM", ""),
        }
    }
}

#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per model, never in a hot loop
pub enum Arch {
    Gpt2(gpt2::Config),
    Llama(llama::Config),
    Gemma(gemma::Config),
}

/// A parsed `config.json`, keeping the original JSON so that saving preserves every field.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: ModelType,
    pub arch: Arch,
    pub raw: serde_json::Map<String, Value>,
}

impl ModelConfig {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let raw: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        Self::from_json(raw, &path)
    }

    /// `path` names the file in errors.
    pub fn from_json(raw: Value, path: &Path) -> Result<Self> {
        let Value::Object(raw) = raw else {
            return Err(Error::config(path, "expected a JSON object"));
        };
        let name = raw
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::config(path, "field 'model_type' is missing"))?;
        let model_type = ModelType::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = ModelType::ALL.iter().map(|t| t.name()).collect();
                Error::config(
                    path,
                    format!(
                        "model_type '{name}' is not supported (supported: {})",
                        names.join(", ")
                    ),
                )
            })?;
        let invalid = |e: serde_json::Error| Error::config(path, e.to_string());
        let json = Value::Object(raw.clone());
        let arch = match model_type {
            ModelType::Gpt2 => {
                let c: gpt2::Config = serde_json::from_value(json).map_err(invalid)?;
                c.validate(path)?;
                Arch::Gpt2(c)
            }
            ModelType::Llama
            | ModelType::Mistral
            | ModelType::Qwen2
            | ModelType::Qwen3
            | ModelType::Phi3
            | ModelType::Mixtral
            | ModelType::Qwen2Moe
            | ModelType::Qwen3Moe
            | ModelType::Olmoe
            | ModelType::GptOss
            | ModelType::Smollm3
            | ModelType::Olmo2
            | ModelType::Olmo3
            | ModelType::Granite => {
                let c: llama::Config = serde_json::from_value(json).map_err(invalid)?;
                c.validate(path)?;
                Arch::Llama(c)
            }
            ModelType::Gemma | ModelType::Gemma2 | ModelType::Gemma3Text => {
                let c: gemma::Config = serde_json::from_value(json).map_err(invalid)?;
                c.validate(path)?;
                Arch::Gemma(c)
            }
        };
        Ok(ModelConfig {
            model_type,
            arch,
            raw,
        })
    }

    pub fn hidden_size(&self) -> i64 {
        match &self.arch {
            Arch::Gpt2(c) => c.n_embd,
            Arch::Llama(c) => c.hidden_size,
            Arch::Gemma(c) => c.hidden_size,
        }
    }

    pub fn vocab_size(&self) -> i64 {
        match &self.arch {
            Arch::Gpt2(c) => c.vocab_size,
            Arch::Llama(c) => c.vocab_size,
            Arch::Gemma(c) => c.vocab_size,
        }
    }

    /// `(layers, key/value heads, head size)`: the shape of a prefix's keys and values.
    pub fn prefix_shape(&self) -> prompt_tuning::PrefixShape {
        let layers = self.num_layers() as i64;
        match &self.arch {
            Arch::Gpt2(c) => (layers, c.n_head, c.n_embd / c.n_head),
            Arch::Llama(c) => (layers, c.num_kv_heads(), c.head_dim()),
            Arch::Gemma(c) => (layers, c.num_kv_heads(), c.head_dim),
        }
    }

    pub fn num_layers(&self) -> usize {
        (match &self.arch {
            Arch::Gpt2(c) => c.n_layer,
            Arch::Llama(c) => c.num_hidden_layers,
            Arch::Gemma(c) => c.num_hidden_layers,
        }) as usize
    }

    pub fn tie_word_embeddings(&self) -> bool {
        match &self.arch {
            Arch::Gpt2(c) => c.tie_word_embeddings,
            Arch::Llama(c) => c.tied(),
            Arch::Gemma(c) => c.tie_word_embeddings,
        }
    }

    /// The most positions the model can read, where it has a position table (GPT-2's
    /// `n_positions`); rotary models have none.
    pub fn max_positions(&self) -> Option<usize> {
        match &self.arch {
            Arch::Gpt2(c) => Some(c.n_positions as usize),
            Arch::Llama(_) | Arch::Gemma(_) => None,
        }
    }

    /// The sequence length `config.json` states (`n_positions`, `max_position_embeddings`
    /// or `n_ctx`, the first present), else 2048: lm-eval's `HFLM.max_length`.
    pub fn stated_length(&self) -> usize {
        ["n_positions", "max_position_embeddings", "n_ctx"]
            .iter()
            .find_map(|k| self.raw.get(*k).and_then(serde_json::Value::as_u64))
            .map_or(2048, |n| n as usize)
    }

    /// Integer or list field of `config.json` (`eos_token_id` may be either).
    pub fn token_ids(&self, field: &str) -> Vec<i64> {
        ids_of(self.raw.get(field))
    }

    fn backbone_prefix(&self) -> &'static str {
        match self.arch {
            Arch::Gpt2(_) => "transformer",
            Arch::Llama(_) | Arch::Gemma(_) => "model",
        }
    }

    /// The single adapter between stored names and ours: our variables carry
    /// `transformers`' names and layouts, and a base-model checkpoint (`GPT2Model`,
    /// `LlamaModel`) stores the backbone without its prefix.
    fn checkpoint_aliases(&self, name: &str) -> Vec<String> {
        let prefix = format!("{}.", self.backbone_prefix());
        name.strip_prefix(&prefix)
            .map(|short| vec![short.to_string()])
            .unwrap_or_default()
    }
}

/// An integer, or a list of integers, from a JSON field.
pub fn ids_of(value: Option<&Value>) -> Vec<i64> {
    match value {
        Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
        _ => vec![],
    }
}

/// Which output a model produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Next-token logits `[B, T, V]` (`*ForCausalLM`).
    Lm,
    /// One scalar per position `[B, T]` (`*ForSequenceClassification`, `num_labels = 1`).
    Score,
}

#[derive(Debug)]
enum Backbone {
    Gpt2(gpt2::Gpt2),
    Llama(llama::Llama),
    Gemma(gemma::Gemma),
}

/// A backbone and a head, with its variables in one `VarStore` under HF names.
#[derive(Debug)]
pub struct Model {
    pub vs: nn::VarStore,
    pub config: ModelConfig,
    pub head: Head,
    /// How it was built (LoRA targets spelled out for the architecture).
    pub options: ModelOptions,
    /// With adapters: the directory the base weights came from.
    pub base_dir: Option<std::path::PathBuf>,
    backbone: Backbone,
    /// `[V, H]` (possibly the tied input embedding) or `[1, H]`: both heads are a
    /// bias-free linear map of the final hidden states.
    head_weight: Tensor,
    /// What the run changed in its tokenizer (`--chat-template-path`, `--eos-token`):
    /// applied to the tokenizer files of every directory this model is saved to.
    pub tokenizer_overrides: checkpoint::TokenizerOverrides,
    /// A scalar head trained beside adapters, or an LM head copied beside LoRA: the head
    /// it started from (frozen), used while adapters are switched off (PEFT's
    /// `modules_to_save`).
    original_head: Option<Tensor>,
    /// Prompt tuning's virtual-token embeddings `[N, H]`, put before every input.
    prompt: Option<Tensor>,
    /// A trainable copy of the input embedding beside LoRA (PEFT's `modules_to_save`),
    /// used while adapters are on.
    saved_embedding: Option<Tensor>,
    /// PEFT's trainable tokens: the rows (ids) of the input embedding, and of a head tied
    /// to it, that are replaced by a trained `[n, H]` tensor while adapters are on.
    trainable_tokens: Option<(Tensor, Tensor)>,
    /// What forwards with grad since the last backward kept for recomputing: their
    /// head's chunks and (with gradient checkpointing) their blocks.
    pending: std::sync::Mutex<Pending>,
    /// Whether forwards with grad keep their MoE router logits for
    /// [`Model::take_router_aux_loss`] (set by the training unit when the load-balancing
    /// loss applies).
    record_router: std::sync::atomic::AtomicBool,
}

const SCORE_WEIGHT: &str = "score.weight";

/// `term.backward()` keeping the graph: a term of the loss whose graph the loss's own
/// backward then runs through again (the MoE load-balancing loss, computed from the
/// blocks' router logits, shares the blocks with the chunked head's recomputed backward).
pub fn backward_keeping_graph(term: &Tensor) {
    let mut term = term.shallow_clone();
    #[allow(unsafe_code)]
    // SAFETY: `term` is a live tensor for the call; at_backward reports failure through
    // torch's last-error slot, read at once.
    let error = unsafe {
        torch_sys::at_backward(term.as_mut_ptr(), 1, 0);
        torch_sys::get_and_reset_last_err()
    };
    if !error.is_null() {
        #[allow(unsafe_code)]
        // SAFETY: a non-null error is a C string torch allocated for us.
        let message = unsafe { std::ffi::CStr::from_ptr(error) }
            .to_string_lossy()
            .into_owned();
        panic!("backward: {message}");
    }
}

/// Whether autograd is recording: training passes (LoRA dropout is active only then, as
/// in PyTorch's train mode; forwards keep what their backward recomputes); evaluation
/// and rollouts run under `no_grad`.
pub(crate) fn grad_enabled() -> bool {
    #[allow(unsafe_code)]
    // SAFETY: at_grad_set_enabled only swaps a thread-local flag and returns the old one;
    // the old value is put back at once.
    unsafe {
        let previous = torch_sys::at_grad_set_enabled(1);
        torch_sys::at_grad_set_enabled(previous);
        previous != 0
    }
}

/// The input embedding's module path (`transformers`' names).
fn embedding_module(config: &ModelConfig) -> &'static str {
    match config.arch {
        Arch::Gpt2(_) => "transformer.wte",
        Arch::Llama(_) | Arch::Gemma(_) => "model.embed_tokens",
    }
}

/// A 4-bit base is frozen: only an adapter on it trains (QLoRA), and PiSSA's and OLoRA's
/// starts, which rewrite the base weights, cannot apply (PEFT refuses them too).
fn check_quantized(opts: &ModelOptions, dir: &Path, stored: bool) -> Result<()> {
    let why = if stored {
        format!(
            "{} is stored in 4 bits (quantization_config)",
            dir.display()
        )
    } else {
        "--load-in-4bit".to_string()
    };
    if opts.trainable && !opts.has_adapter() {
        return Err(Error::InvalidArgument(format!(
            "{why}: 4-bit base weights cannot train; add --lora-r (QLoRA) or --prompt-tuning-tokens"
        )));
    }
    if let Some(l) = opts.lora.as_ref().filter(|l| l.init.moves_base()) {
        return Err(Error::InvalidArgument(format!(
            "{why}: --init-lora-weights {} rewrites the base weights, which are quantized; start it on a full-precision model",
            l.init.name()
        )));
    }
    Ok(())
}

/// What forwards with grad keep until [`Model::backward_recomputed`].
#[derive(Debug, Default)]
struct Pending {
    heads: Vec<vocab::HeadSaved>,
    blocks: Vec<recompute::Saved>,
    /// Each recorded forward's router logits (one `[B·T, E]` per MoE layer) and which of
    /// its `B·T` tokens are real.
    routers: Vec<(Vec<Tensor>, Tensor)>,
}

impl Model {
    /// A model with freshly initialised weights (`transformers`' initialisation scheme);
    /// with LoRA, the adapters as PEFT initialises them and the base frozen.
    pub fn new(config: ModelConfig, opts: &ModelOptions) -> Self {
        let model = Self::build(config, opts);
        model.start_saved();
        if let Err(e) = model.start_moved() {
            panic!("{e}");
        }
        model.start_dora();
        model
    }

    /// [`Model::new`] but for DoRA's magnitudes, which start from the base weights: those
    /// of [`Model::load`] are only there once the checkpoint is read.
    fn build(config: ModelConfig, opts: &ModelOptions) -> Self {
        let opts = &ModelOptions {
            lora: opts.lora.as_ref().map(|l| l.resolved(config.model_type)),
            ..opts.clone()
        };
        let mut vs = nn::VarStore::new(opts.device);
        let root = vs.root();
        let backbone = match &config.arch {
            Arch::Gpt2(c) => Backbone::Gpt2(gpt2::Gpt2::new(&root / "transformer", c, opts)),
            Arch::Llama(c) => Backbone::Llama(llama::Llama::new(&root / "model", c, opts)),
            Arch::Gemma(c) => Backbone::Gemma(gemma::Gemma::new(&root / "model", c, opts)),
        };
        let hidden = config.hidden_size();
        let head = opts.head;
        let head_weight = match head {
            // Beside adapters the scalar head trains too (PEFT's `modules_to_save`).
            Head::Score => param(
                &(&root / "score"),
                "weight",
                &[1, hidden],
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0 / ((hidden + 1) as f64).sqrt(),
                },
                &opts.clone().with_lora(None).with_prompt_tuning(None),
            ),
            Head::Lm if config.tie_word_embeddings() => match &backbone {
                Backbone::Gpt2(b) => b.embedding_weight().shallow_clone(),
                Backbone::Llama(b) => b.embedding_weight().shallow_clone(),
                Backbone::Gemma(b) => b.embedding_weight().shallow_clone(),
            },
            Head::Lm => {
                let std = match &config.arch {
                    Arch::Gpt2(c) => c.initializer_range,
                    Arch::Llama(c) => c.initializer_range,
                    Arch::Gemma(c) => c.initializer_range,
                };
                param(
                    &(&root / "lm_head"),
                    "weight",
                    &[config.vocab_size(), hidden],
                    Init::Randn {
                        mean: 0.0,
                        stdev: std,
                    },
                    opts,
                )
            }
        };
        // PEFT's modules_to_save beside LoRA: trainable copies of the input embedding and
        // the LM head (started from the originals once they are loaded: `start_saved`).
        let saved = |module: &str| {
            let mut p = root.clone();
            for part in module.split('.') {
                p = &p / part;
            }
            let copy =
                (&p / lora::SAVED).var("weight", &[config.vocab_size(), hidden], Init::Const(0.0));
            if opts.trainable {
                copy
            } else {
                copy.set_requires_grad(false)
            }
        };
        let lora_cfg = opts.lora.as_ref();
        let saved_embedding = lora_cfg
            .filter(|l| l.saves_embedding())
            .map(|_| saved(embedding_module(&config)));
        // trainable_token_indices: the chosen rows of the embedding, trainable.
        let trainable_tokens = lora_cfg
            .filter(|l| !l.trainable_token_indices.is_empty())
            .map(|l| {
                let mut p = root.clone();
                for part in embedding_module(&config).split('.') {
                    p = &p / part;
                }
                let (module, leaf) = lora::TOKEN_DELTA.split_once('.').unwrap();
                let n = l.trainable_token_indices.len() as i64;
                let delta = (&p / module).var(leaf, &[n, hidden], Init::Const(0.0));
                let delta = if opts.trainable {
                    delta
                } else {
                    delta.set_requires_grad(false)
                };
                let ids = Tensor::from_slice(&l.trainable_token_indices).to_device(opts.device);
                (ids, delta)
            });
        let (head_weight, original_head) = match lora_cfg {
            Some(l) if head == Head::Lm && l.saves_lm_head() => {
                (saved("lm_head"), Some(head_weight))
            }
            _ => (head_weight, None),
        };
        let prompt = opts.prompt_tuning.as_ref().map(|pt| {
            let prompt = pt.create(&root, pt.width(hidden, config.prefix_shape()));
            if opts.trainable {
                prompt
            } else {
                prompt.set_requires_grad(false)
            }
        });
        if opts.kind != Kind::Float && opts.quantization.is_some() {
            // A quantized layer's packed bytes and f32 state keep their dtypes.
            let _guard = tch::no_grad_guard();
            for (name, mut var) in vs.variables() {
                if var.is_floating_point() && !quant::is_state(&name) {
                    var.set_data(&var.to_kind(opts.kind));
                }
            }
        }
        if opts.kind != Kind::Float {
            if opts.quantization.is_none() {
                vs.set_kind(opts.kind);
            }
            // Adapters train in f32 whatever the base's dtype (modules_to_save's copies
            // keep it, as PEFT's copies of the modules do).
            let _guard = tch::no_grad_guard();
            for (name, mut var) in vs.variables() {
                let base_dtype = name.contains(&format!(".{}.", lora::SAVED))
                    || name.ends_with(lora::TOKEN_DELTA);
                if adapter::is_adapter_tensor(&name) && !base_dtype {
                    var.set_data(&var.to_kind(Kind::Float));
                }
            }
        }
        Model {
            vs,
            config,
            head,
            options: opts.clone(),
            base_dir: None,
            backbone,
            head_weight,
            original_head,
            saved_embedding,
            trainable_tokens,
            tokenizer_overrides: Default::default(),
            prompt,
            pending: Default::default(),
            record_router: Default::default(),
        }
    }

    /// Loads a Hugging Face model directory. A `Score` model may come from a causal LM
    /// (its `score` head is then initialised, as `transformers` does); an `Lm` model from
    /// a reward model only when its embeddings are tied.
    ///
    /// An adapter directory (`adapter_config.json`, PEFT's format) loads its base model
    /// (`--base-model`, else `base_model_name_or_path`) with the adapter on it; with
    /// `opts.lora` or `opts.prompt_tuning` a plain directory gets a fresh adapter.
    pub fn load(dir: &Path, opts: &ModelOptions) -> Result<(Self, LoadReport)> {
        if let Some(adapter) = adapter::AdapterDir::read(dir)? {
            let base = adapter.base_dir(opts.base_model.as_deref())?;
            if opts.has_adapter() {
                tracing::warn!(
                    "{}: the adapter's own settings are used, not the command line's",
                    dir.display()
                );
            }
            let mut opts = match adapter.kind {
                adapter::AdapterKind::Lora(l) => opts.clone().with_lora(Some(l)),
                adapter::AdapterKind::PromptTuning(p) => opts.clone().with_prompt_tuning(Some(p)),
            };
            if opts.quantization.is_none() && adapter.quantization.is_some() {
                tracing::info!(
                    "{}: trained on a 4-bit base ({}): its base is loaded in 4 bits too",
                    dir.display(),
                    adapter::BASE_QUANTIZATION
                );
                opts.quantization = adapter.quantization;
            }
            let (mut model, report) = Model::load(&base, &opts)?;
            model.load_adapter(dir, false)?;
            model.config.raw.extend(adapter.carried);
            return Ok((model, report));
        }
        let mut opts = opts.clone();
        if let Some(prompt_tuning::PromptInit::Text { text, ids }) =
            opts.prompt_tuning.as_mut().map(|p| &mut p.init)
        {
            // PEFT tokenizes the init text with the model's tokenizer, special tokens on.
            *ids = Tokenizer::load(dir)?.encode(text, true)?;
        }
        let config = ModelConfig::load(dir)?;
        if opts.head == Head::Score && config.model_type.classes().1.is_empty() {
            return Err(Error::config(
                dir.join("config.json"),
                format!("model_type '{}' has no sequence-classification class in transformers, so it cannot be a reward or value model (a scalar head) here", config.model_type.name()),
            ));
        }
        // gpt-oss's MXFP4 experts are dequantized as they are read (below).
        let mxfp4 = mxfp4::stored(&config.raw);
        let stored = match mxfp4 {
            true => None,
            false => quant::Bnb4bit::from_config(&config.raw)
                .map_err(|m| Error::config(dir.join("config.json"), m))?,
        };
        if let (Some(stored), Some(asked)) = (&stored, &opts.quantization) {
            if stored.quant_type != asked.quant_type || stored.double_quant != asked.double_quant {
                tracing::warn!(
                    "{}: stored quantized ({}, nested {}); --bnb-4bit-quant-type and --use-bnb-nested-quant are ignored",
                    dir.display(),
                    stored.quant_type.name(),
                    stored.double_quant
                );
            }
        }
        opts.quantization = stored.clone().or(opts.quantization.take());
        let vocab = config.vocab_size();
        let tokens = opts.lora.iter().flat_map(|l| &l.trainable_token_indices);
        if let Some(&id) = tokens.into_iter().find(|&&i| i >= vocab) {
            return Err(Error::config(
                dir.join("config.json"),
                format!("trainable token {id} is not below vocab_size {vocab}"),
            ));
        }
        let opts = &opts;
        if opts.quantization.is_some() {
            check_quantized(opts, dir, stored.is_some())?;
        }
        let prefix = opts
            .prompt_tuning
            .as_ref()
            .is_some_and(|p| p.kind == PromptKind::Prefix);
        if prefix && opts.gradient_checkpointing && opts.trainable {
            return Err(Error::InvalidArgument(
                "--gradient-checkpointing with prefix tuning: the prefix enters every layer's attention as cached keys and values, which the recomputed blocks do not take; leave one out".into(),
            ));
        }
        let mut model = Model::build(config, opts);
        // Before the weights are read, so that a head stored in f32 keeps its precision.
        if opts.cast_lm_head_to_fp32 && model.head == Head::Lm {
            model.cast_lm_head_to_fp32(dir)?;
        }
        let adapters: Vec<String> = model.adapter_tensors().into_keys().collect();
        let mut optional: Vec<&str> = adapters.iter().map(String::as_str).collect();
        if opts.head == Head::Score {
            optional.push(SCORE_WEIGHT);
        }
        let mut vars = model.vs.variables();
        let mut takes = model.quantized_takes(&mut vars, stored.is_some());
        if mxfp4 {
            takes.extend(mxfp4::takes(&mut vars));
        }
        let report = checkpoint::load_into_taking(
            &vars,
            dir,
            |name| model.config.checkpoint_aliases(name),
            &optional,
            &takes,
        )?;
        drop(takes);
        model.start_prompt();
        model.start_saved();
        model
            .start_moved()
            .map_err(|m| Error::config(dir.join("config.json"), m))?;
        model.start_dora();
        if let Arch::Llama(c) = &model.config.arch {
            let jitter = c.router_jitter();
            if c.is_moe() && jitter > 0.0 && opts.gradient_checkpointing && opts.trainable {
                return Err(Error::config(
                    dir.join("config.json"),
                    format!("router_jitter_noise {jitter} with --gradient-checkpointing is not supported (the recomputed blocks would draw other noise); set it to 0 or leave checkpointing off"),
                ));
            }
        }
        if model.options.has_adapter() {
            model.base_dir = Some(std::fs::canonicalize(dir).unwrap_or(dir.to_path_buf()));
            if let Some(cfg) = &model.options.lora {
                model.check_targets(cfg, dir)?;
                if cfg.dropout > 0.0 && opts.gradient_checkpointing && !opts.disable_dropout {
                    return Err(Error::config(
                        dir,
                        format!("LoRA dropout {} with --gradient-checkpointing is not supported (the recomputed blocks would draw other dropout masks); set the dropout to 0 or leave checkpointing off", cfg.dropout),
                    ));
                }
            }
            if model.head == Head::Score {
                model.original_head = Some(model.head_weight.detach().copy());
            }
        }
        // The other head's weights and old checkpoints' buffers are expected leftovers;
        // anything else is a weight this model does not use, which transformers would warn
        // of too (a bias the architecture has no place for, a layer too many).
        let (expected, surprising): (Vec<&String>, Vec<&String>) =
            report.unexpected.iter().partition(|name| {
                let other_head = match model.head {
                    Head::Lm => name.as_str() == SCORE_WEIGHT,
                    Head::Score => name.starts_with("lm_head."),
                };
                other_head
                    || name.ends_with(".inv_freq")
                    || name.ends_with(".attn.bias")
                    || name.ends_with(".attn.masked_bias")
            });
        if !expected.is_empty() {
            tracing::debug!("{}: stored tensors unused: {expected:?}", dir.display());
        }
        if !surprising.is_empty() {
            tracing::warn!(
                "{}: {} stored tensors this {} model has no place for, ignored: {}",
                dir.display(),
                surprising.len(),
                model.config.model_type.name(),
                surprising
                    .iter()
                    .map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok((model, report))
    }

    /// TRL's `cast_lm_head_to_fp32`: the LM head's weight becomes f32 (the optimiser then
    /// keeps it in f32 too, and checkpoints store it so) and [`vocab::LmHead::logits`]
    /// applies it to the hidden states cast up. Refused, as TRL documents it, for a head
    /// tied to the input embedding, and for a head an adapter carries (`modules_to_save`).
    fn cast_lm_head_to_fp32(&self, dir: &Path) -> Result<()> {
        let problem = if self.config.tie_word_embeddings() {
            Some("the LM head is tied to the input embedding (tie_word_embeddings), which TRL does not support")
        } else if self.original_head.is_some() {
            Some("the adapter carries the LM head (lm_head in modules_to_save)")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(Error::config(
                dir.join("config.json"),
                format!("--cast-lm-head-to-fp32: {problem}"),
            ));
        }
        let _guard = tch::no_grad_guard();
        let mut head = self.head_weight.shallow_clone();
        head.set_data(&self.head_weight.to_kind(Kind::Float));
        Ok(())
    }

    /// The quantized layers, by module path.
    pub fn quantized_modules(&self) -> BTreeMap<String, quant::Quantized> {
        let tensors = self.named_tensors();
        self.modules_with(&format!("weight.{}", quant::ABSMAX))
            .into_iter()
            .filter_map(|m| quant::Quantized::find(&tensors, &m).map(|q| (m, q)))
            .collect()
    }

    /// How a load fills the quantized layers (taking their entries out of `vars`): from a
    /// checkpoint stored quantized, the packed bytes (stored `[out·in/2, 1]`) and the
    /// quant state's JSON (checked; its nested offset kept), the rest as variables;
    /// otherwise each full-precision weight is quantized as it is read (GPT-2's Conv1D
    /// weights transposed first, as `transformers` does).
    fn quantized_takes(
        &self,
        vars: &mut HashMap<String, Tensor>,
        stored: bool,
    ) -> checkpoint::Takes<'static> {
        let mut takes = checkpoint::Takes::new();
        let Some(cfg) = self.options.quantization.clone() else {
            return takes;
        };
        let fan_in_fan_out = self.fan_in_fan_out();
        for (module, q) in self.quantized_modules() {
            let weight = format!("{module}.weight");
            vars.remove(&weight);
            let state = |n: &str| format!("{weight}.{n}");
            if !stored {
                for n in [
                    quant::ABSMAX,
                    quant::QUANT_MAP,
                    quant::NESTED_ABSMAX,
                    quant::NESTED_QUANT_MAP,
                ] {
                    vars.remove(&state(n));
                }
            }
            vars.remove(&state(quant::NESTED_OFFSET));
            let q = std::rc::Rc::new(q);
            let quant_type = cfg.quant_type;
            let read = |path: &Path, r: std::result::Result<(), String>| {
                r.map_err(|m| Error::checkpoint(path, m))
            };
            if stored {
                let (layer, name) = (q.clone(), weight.clone());
                takes.insert(
                    weight,
                    Box::new(move |path: &Path, t: Tensor| {
                        read(path, layer.read_packed(&t, &name))
                    }),
                );
                let key = quant::state_key(&module, quant_type);
                let (name, cfg) = (key.clone(), cfg.clone());
                takes.insert(
                    key,
                    Box::new(move |path: &Path, t: Tensor| {
                        read(path, q.read_quant_state(&t, &cfg, &name))
                    }),
                );
            } else {
                let name = weight.clone();
                takes.insert(
                    weight,
                    Box::new(move |path: &Path, t: Tensor| {
                        read(path, q.read_full(t, fan_in_fan_out, quant_type, &name))
                    }),
                );
            }
        }
        takes
    }

    /// A base weight in this model's layout and dtype: dequantized when the layer is held
    /// in 4 bits (GPT-2's Conv1D back to `[in, out]`).
    fn base_weight(&self, tensors: &BTreeMap<String, Tensor>, module: &str) -> Tensor {
        match quant::Quantized::find(tensors, module) {
            Some(q) => self.dequantized(&q),
            None => tensors[&format!("{module}.weight")].shallow_clone(),
        }
    }

    /// A 4-bit layer's weight in this model's layout and dtype (GPT-2's Conv1D `[in, out]`).
    fn dequantized(&self, q: &quant::Quantized) -> Tensor {
        let w = q.dequantize(self.kind());
        if self.fan_in_fan_out() {
            w.transpose(0, 1).contiguous()
        } else {
            w
        }
    }

    /// Every variable under its Hugging Face name, a quantized layer's as its dequantized
    /// weight (on the CPU, one at a time): what a plain model directory holds.
    fn plain_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut tensors = self.named_tensors();
        let modules = self.quantized_modules();
        if modules.is_empty() {
            return tensors;
        }
        let weights: Vec<(String, Tensor)> = modules
            .iter()
            .map(|(m, q)| {
                (
                    format!("{m}.weight"),
                    self.dequantized(q).to_device(Device::Cpu),
                )
            })
            .collect();
        tensors.retain(|name, _| !quant::is_state(name));
        tensors.extend(weights);
        tensors
    }

    /// `modules_to_save`'s copies start as the originals (as loaded).
    fn start_saved(&self) {
        let _guard = tch::no_grad_guard();
        if let Some(copy) = &self.saved_embedding {
            let original = self.embedding_weight();
            copy.shallow_clone().copy_(&original.to_kind(copy.kind()));
        }
        if let (Some(original), Head::Lm) = (&self.original_head, self.head) {
            let copy = self.head_weight.shallow_clone();
            copy.shallow_clone().copy_(&original.to_kind(copy.kind()));
        }
        if let Some((ids, delta)) = &self.trainable_tokens {
            let rows = self.embedding_weight().index_select(0, ids);
            delta.shallow_clone().copy_(&rows.to_kind(delta.kind()));
        }
    }

    /// The input embedding with trainable tokens' rows in place (`W.index_copy`, PEFT's
    /// `get_merged_weights`), when there are any.
    fn embedding_with_tokens(&self) -> Option<Tensor> {
        let (ids, delta) = self.trainable_tokens.as_ref()?;
        let w = self.embedding_weight();
        Some(w.index_copy(0, ids, &delta.to_kind(w.kind())))
    }

    /// The backbone's input embedding weight.
    fn embedding_weight(&self) -> &Tensor {
        match &self.backbone {
            Backbone::Gpt2(b) => b.embedding_weight(),
            Backbone::Llama(b) => b.embedding_weight(),
            Backbone::Gemma(b) => b.embedding_weight(),
        }
    }

    /// Prompt tuning's SAMPLE_VOCAB and TEXT inits: the virtual tokens start as the
    /// embeddings of their tokens in the loaded model (PEFT's `word_embeddings(ids)`).
    fn start_prompt(&self) {
        let (Some(cfg), Some(prompt)) = (&self.options.prompt_tuning, &self.prompt) else {
            return;
        };
        if let Some(ids) = cfg.start_ids(self.config.vocab_size(), self.device()) {
            let _guard = tch::no_grad_guard();
            let rows = self.embed(&ids.unsqueeze(0)).squeeze_dim(0);
            prompt.shallow_clone().copy_(&rows.to_kind(prompt.kind()));
        }
    }

    /// PiSSA's and OLoRA's start (`lora::moved_start`): `A`, `B` and their frozen copies
    /// from each adapted base weight (as loaded), the base weight replaced by the residual.
    /// An error names a layer whose rank is less than `r`.
    fn start_moved(&self) -> std::result::Result<(), String> {
        let Some(cfg) = self.options.lora.as_ref().filter(|l| l.init.moves_base()) else {
            return Ok(());
        };
        let tensors = self.named_tensors();
        let _guard = tch::no_grad_guard();
        let fan_in_fan_out = self.fan_in_fan_out();
        for module in self.adapted_modules() {
            let get = |n: &str| tensors[&format!("{module}.{n}")].shallow_clone();
            let mut w = get("weight");
            let r = cfg.rank(&module);
            let (a, b, residual) =
                lora::moved_start(cfg.init, &w, r, cfg.scaling(&module), fan_in_fan_out)
                    .ok_or_else(|| {
                        format!(
                            "--init-lora-weights {}: rank {r} is more than {module} {:?} can hold (its smaller side)",
                            cfg.init.name(),
                            w.size()
                        )
                    })?;
            for (name, value) in [
                ("lora_A.weight", &a),
                ("lora_B.weight", &b),
                (lora::INITIAL_A, &a),
                (lora::INITIAL_B, &b),
            ] {
                get(name).copy_(value);
            }
            w.copy_(&residual);
        }
        Ok(())
    }

    /// DoRA's magnitudes start as the row norms of the adapted weights (as loaded).
    fn start_dora(&self) {
        let Some(cfg) = self.options.lora.as_ref().filter(|l| l.use_dora) else {
            return;
        };
        let tensors = self.named_tensors();
        let _guard = tch::no_grad_guard();
        let fan_in_fan_out = self.fan_in_fan_out();
        for module in self.adapted_modules() {
            let [a, b, m] = ["lora_A.weight", "lora_B.weight", lora::MAGNITUDE]
                .map(|n| &tensors[&format!("{module}.{n}")]);
            let w = &self.base_weight(&tensors, &module);
            let norm = lora::dora_magnitude(w, a, b, cfg.scaling(&module), fan_in_fan_out);
            m.shallow_clone().copy_(&norm.to_kind(m.kind()));
        }
    }

    /// The most real tokens a sequence may have: the position table (GPT-2's
    /// `n_positions`) less prompt tuning's virtual tokens; rotary models have no table.
    pub fn max_positions(&self) -> Option<usize> {
        let virtual_tokens = self.prompt.as_ref().map_or(0, |p| p.size()[0] as usize);
        self.config
            .max_positions()
            .map(|limit| limit.saturating_sub(virtual_tokens))
    }

    /// `requested` (the value of `option`, a length in tokens) capped by the position
    /// table, with a warning when it is cut.
    pub fn cap_length(&self, requested: usize, option: &str) -> usize {
        match self.max_positions() {
            Some(limit) if requested > limit => {
                tracing::warn!(
                    "{option} {requested} is more than the model's {limit} positions (n_positions in config.json): longer sequences are cut at {limit}"
                );
                limit
            }
            _ => requested,
        }
    }

    /// How many prompt tokens fit before `new_tokens` generated ones: unlimited without a
    /// position table; an error naming `option` when the table leaves no room.
    pub fn prompt_room(&self, new_tokens: usize, option: &str) -> Result<usize> {
        match self.max_positions() {
            None => Ok(usize::MAX),
            Some(limit) if new_tokens < limit => Ok(limit - new_tokens),
            Some(limit) => Err(Error::InvalidArgument(format!(
                "{option} {new_tokens} leaves no room for a prompt: the model reads at most {limit} positions (n_positions in config.json)"
            ))),
        }
    }

    /// A model directory's weights and its tokenizer, checked against each other. An
    /// adapter directory without tokenizer files uses its base model's.
    pub fn load_with_tokenizer(dir: &Path, opts: &ModelOptions) -> Result<(Self, Tokenizer)> {
        let tokenizer_dir = match adapter::AdapterDir::read(dir)? {
            Some(a) if !dir.join("tokenizer.json").exists() => {
                a.base_dir(opts.base_model.as_deref())?
            }
            _ => dir.to_path_buf(),
        };
        let tokenizer = Tokenizer::load(&tokenizer_dir)?;
        let (model, _) = Model::load(dir, opts).map_err(|source| Error::Load {
            dir: dir.to_path_buf(),
            source: Box::new(source),
        })?;
        let (tokens, embedded) = (tokenizer.vocab_size() as i64, model.config.vocab_size());
        if tokens > embedded {
            return Err(data::DataError::file(
                dir.join("tokenizer.json"),
                format!("the tokenizer has {tokens} tokens but the model embeds only {embedded} (vocab_size in config.json)"),
            )
            .into());
        }
        Ok((model, tokenizer))
    }

    /// Replaces this model's weights with those stored in `dir` (a checkpoint of the same
    /// model); every variable must be there. With adapters, `dir` is an adapter
    /// directory and only the adapters (and a scalar head) are read.
    pub fn load_weights(&self, dir: &Path) -> Result<()> {
        if self.options.has_adapter() {
            return self.load_adapter(dir, true);
        }
        checkpoint::load_into(&self.vs.variables(), dir, |_| vec![], &[]).map(|_| ())
    }

    /// The adapter tensors (and, beside them, a trained scalar head) under our names.
    fn adapter_tensors(&self) -> BTreeMap<String, Tensor> {
        let score = self.head == Head::Score && self.options.has_adapter();
        self.named_tensors()
            .into_iter()
            .filter(|(name, _)| adapter::is_adapter_tensor(name) || (score && name == SCORE_WEIGHT))
            .collect()
    }

    /// Reads `adapter_model.safetensors` of `dir` into the adapters. PiSSA's and OLoRA's
    /// layers: `A` and `B` as PEFT writes them (their start redone on the base, as PEFT
    /// loads them), or `converted`, as [`Model::save`] writes them (`[A; A₀]`,
    /// `[B, −B₀]`: a resumed run), when the start stored is the one the base gives again,
    /// else the base is re-based to it.
    fn load_adapter(&self, dir: &Path, converted: bool) -> Result<()> {
        let tensors = self.adapter_tensors();
        let moved = self.moved_modules();
        let mut vars: HashMap<String, Tensor> = HashMap::new();
        for (name, t) in &tensors {
            let joined = |dim: usize| {
                let mut size = t.size();
                size[dim] *= 2;
                Tensor::zeros(size, (t.kind(), t.device()))
            };
            let value = match name.rsplit_once(".lora_") {
                _ if lora::is_initial(name) => continue,
                Some((module, "A.weight")) if converted && moved.contains(module) => joined(0),
                Some((module, "B.weight")) if converted && moved.contains(module) => joined(1),
                _ => t.shallow_clone(),
            };
            vars.insert(adapter::peft_key(name), value);
        }
        let _guard = tch::no_grad_guard();
        checkpoint::load_file(&vars, &dir.join(adapter::ADAPTER_WEIGHTS))?;
        if !converted || moved.is_empty() {
            return Ok(());
        }
        let cfg = self.options.lora.as_ref().expect("moved modules have LoRA");
        let weights = self.named_tensors();
        let fan_in_fan_out = self.fan_in_fan_out();
        let mut rebased = 0;
        for module in &moved {
            let get = |n: &str| tensors[&format!("{module}.{n}")].shallow_clone();
            let loaded = |n: &str| &vars[&adapter::peft_key(&format!("{module}.{n}"))];
            let r = cfg.rank(module);
            let (ja, jb) = (loaded("lora_A.weight"), loaded("lora_B.weight"));
            let (a1, b1) = (ja.narrow(0, r, r), -jb.narrow(1, r, r));
            let (mut a0, mut b0) = (get(lora::INITIAL_A), get(lora::INITIAL_B));
            get("lora_A.weight").copy_(&ja.narrow(0, 0, r));
            get("lora_B.weight").copy_(&jb.narrow(1, 0, r));
            if a0.equal(&a1) && b0.equal(&b1) {
                continue;
            }
            let mut w = weights[&format!("{module}.weight")].shallow_clone();
            let residual = lora::rebased(
                &w,
                (&a0, &b0),
                (&a1, &b1),
                cfg.scaling(module),
                fan_in_fan_out,
            );
            w.copy_(&residual);
            a0.copy_(&a1);
            b0.copy_(&b1);
            rebased += 1;
        }
        if rebased > 0 {
            tracing::warn!(
                "{}: {rebased} layers' stored PiSSA/OLoRA start differs from the one computed from the base now (another machine or library?): their base weights were re-based to it, up to rounding",
                dir.display()
            );
        }
        Ok(())
    }

    /// A digest of PiSSA's and OLoRA's starts, bit for bit (`None` without them): the
    /// ranks of a data-parallel run each compute theirs and must agree.
    pub fn moved_start_digest(&self) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        let mut digest = std::hash::DefaultHasher::new();
        let mut any = false;
        for (name, t) in self.named_tensors() {
            if !lora::is_initial(&name) {
                continue;
            }
            any = true;
            name.hash(&mut digest);
            let flat = t
                .detach()
                .to_device(Device::Cpu)
                .to_kind(Kind::Float)
                .flatten(0, -1);
            for x in Vec::<f32>::try_from(flat).expect("a float tensor") {
                x.to_bits().hash(&mut digest);
            }
        }
        any.then(|| digest.finish())
    }

    /// The modules whose adapter moved part of the base weight into it (PiSSA, OLoRA).
    fn moved_modules(&self) -> BTreeSet<String> {
        self.modules_with(lora::INITIAL_A).into_iter().collect()
    }

    /// The modules that carry an adapter, by path (not the parameters' adapters,
    /// [`Model::parameter_adapters`]).
    pub fn adapted_modules(&self) -> Vec<String> {
        let params: BTreeSet<String> = self
            .parameter_adapters()
            .into_iter()
            .map(|(_, path)| path)
            .collect();
        self.modules_with("lora_A.weight")
            .into_iter()
            .filter(|m| !params.contains(m))
            .collect()
    }

    /// The parameters LoRA adapts (`target_parameters`: gpt-oss's fused experts) and the
    /// paths of their adapters.
    pub fn parameter_adapters(&self) -> Vec<(String, String)> {
        let Some(cfg) = self.options.lora.as_ref() else {
            return vec![];
        };
        let first = format!(".{}", moe::FUSED_EXPERT_PARAMS[0]);
        self.named_tensors()
            .into_keys()
            .filter_map(|n| n.strip_suffix(&first).map(str::to_string))
            .flat_map(|module| cfg.parameter_adapters(&module, &moe::FUSED_EXPERT_PARAMS))
            .collect()
    }

    /// The paths of the modules holding a variable named `name` (dotted, within the
    /// module).
    fn modules_with(&self, name: &str) -> Vec<String> {
        let suffix = format!(".{name}");
        self.named_tensors()
            .into_keys()
            .filter_map(|n| n.strip_suffix(&suffix).map(str::to_string))
            .collect()
    }

    /// GPT-2's Conv1D layers store their weights `[in, out]` (PEFT's `fan_in_fan_out`).
    fn fan_in_fan_out(&self) -> bool {
        self.config.model_type == ModelType::Gpt2
    }

    /// Every target name must name at least one layer (PEFT refuses a config whose targets
    /// match nothing; a name that matches nothing is a typo).
    fn check_targets(&self, cfg: &lora::LoraConfig, dir: &Path) -> Result<()> {
        let params: Vec<String> = self
            .parameter_adapters()
            .into_iter()
            .map(|(param, _)| param)
            .collect();
        let unmatched: Vec<&String> = cfg
            .target_parameters
            .iter()
            .filter(|t| !params.iter().any(|p| lora::matches(p, t)))
            .collect();
        let problem = if !unmatched.is_empty() {
            Some(format!("LoRA target parameters {unmatched:?} match no parameter of this {} model (only gpt-oss's fused experts, mlp.experts.gate_up_proj and mlp.experts.down_proj, are held as parameters here)", self.config.model_type.name()))
        } else if params.is_empty() {
            None
        } else if cfg.dropout > 0.0 {
            Some(format!("LoRA dropout {} with target parameters is not supported (PEFT cannot drop out the input of a parameter's update either)", cfg.dropout))
        } else if cfg.use_dora || cfg.init.moves_base() {
            Some(
                "DoRA, PiSSA and OLoRA with target parameters are not supported (nor in PEFT)"
                    .to_string(),
            )
        } else {
            None
        };
        if let Some(message) = problem {
            return Err(Error::config(dir.join("config.json"), message));
        }
        let adapted = self.adapted_modules();
        let missing: Vec<&String> = match &cfg.target_modules {
            lora::TargetModules::Names(names) => names
                .iter()
                .filter(|n| !cfg.excludes(n) && !adapted.iter().any(|m| lora::matches(m, n)))
                .collect(),
            lora::TargetModules::Regex(re) if adapted.is_empty() => vec![re],
            _ => vec![],
        };
        if !missing.is_empty() || (adapted.is_empty() && params.is_empty()) {
            return Err(Error::config(
                dir.join("config.json"),
                format!(
                    "LoRA target modules {missing:?} match no layer of this {} model",
                    self.config.model_type.name()
                ),
            ));
        }
        Ok(())
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The working dtype of weights and activations (adapters, and copies beside them,
    /// train in f32 whatever it is).
    pub fn kind(&self) -> Kind {
        self.options.kind
    }

    /// Final hidden states `[B, T, H]`. `attention_mask` is `[B, S]` over the cached and
    /// the new tokens (S = cached + T); positions come from it. With prompt tuning the
    /// virtual tokens go before the first forward's tokens (and stay in the cache), the
    /// mask gets their ones in front, and only the real tokens' states are returned.
    pub fn hidden(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Tensor {
        let mut x = self.embed_input(ids);
        let mut mask = attention_mask.shallow_clone();
        let mut virtual_tokens = 0;
        // A prefix goes into the cache: this forward's own when it has none.
        let mut own_cache = KvCache::new(self.config.num_layers());
        let mut cache: Option<&mut KvCache> = cache;
        if let Some(prompt) = self.prompt.as_ref().filter(|_| adapter::adapters_enabled()) {
            let (b, n) = (ids.size()[0], prompt.size()[0]);
            let ones = Tensor::ones([b, n], (mask.kind(), mask.device()));
            mask = Tensor::cat(&[&ones, &mask], 1);
            if cache.as_deref().is_none_or(KvCache::is_empty) {
                let prompt = prompt.to_kind(x.kind());
                match self.prompt_kind() {
                    PromptKind::Input => {
                        let prefix = prompt.unsqueeze(0).expand([b, n, -1], false);
                        x = Tensor::cat(&[&prefix, &x], 1);
                        virtual_tokens = n;
                    }
                    PromptKind::Prefix => {
                        let kv = prompt_tuning::prefix_keys_values(
                            &prompt,
                            b,
                            self.config.prefix_shape(),
                        );
                        let cache = cache.get_or_insert(&mut own_cache);
                        for (layer, (k, v)) in kv.into_iter().enumerate() {
                            let _ = cache.append(layer, k, v);
                        }
                    }
                }
            }
        }
        let t = x.size()[1];
        let s = mask.size()[1];
        let positions = positions_from_mask(&mask).narrow(1, s - t, t);
        // A cache remembers whether its prompt was padded (later tokens are real ones).
        let padded = match cache.as_deref_mut() {
            Some(c) => *c.padded.get_or_insert_with(|| Masking::has_padding(&mask)),
            None => Masking::has_padding(&mask),
        };
        let masking = self.masking(|w| Masking::new(&mask, t, w, Some(padded)));
        let real = self.recording_router().then(|| mask.narrow(1, s - t, t));
        let h = self.blocks(&x, &positions, masking, cache, real);
        match virtual_tokens {
            0 => h,
            n => h.narrow(1, n, t - n),
        }
    }

    /// Final hidden states `[B, T, H]` of packed rows ([`data::packing`]): `segment_ids`
    /// `[B, T]` numbers the rows of each sequence (1, 2, …; 0 for padding); positions
    /// restart at each row and attention never crosses rows, so each row's states are
    /// those it has alone. Not with prompt tuning (its tokens go before one row only).
    pub fn hidden_packed(&self, ids: &Tensor, segment_ids: &Tensor) -> Tensor {
        assert_eq!(self.virtual_tokens(), 0, "packed rows with prompt tuning");
        let positions = positions_from_segments(segment_ids);
        let masking = self.masking(|w| Masking::packed(segment_ids, w));
        let real = self.recording_router().then(|| segment_ids.gt(0));
        self.blocks(&self.embed_input(ids), &positions, masking, None, real)
    }

    /// The transformer blocks (and final norm) over embeddings `x`, keeping only the
    /// blocks' inputs when gradient checkpointing applies to this forward, and the MoE
    /// router logits of a training forward while they are recorded (`real`: `[B, T]`,
    /// nonzero at real tokens; given only while recording).
    fn blocks(
        &self,
        x: &Tensor,
        positions: &Tensor,
        masking: Masking,
        cache: Option<&mut KvCache>,
        real: Option<Tensor>,
    ) -> Tensor {
        let recompute = self.options.gradient_checkpointing && self.options.trainable;
        let training = cache.is_none() && grad_enabled();
        let real = real.filter(|_| training).map(|r| r.reshape([-1]));
        if !(recompute && training) {
            let Backbone::Llama(b) = &self.backbone else {
                return self.backbone_forward(x, positions, &masking, cache);
            };
            let mut router = vec![];
            let h = b.forward(
                x,
                positions,
                &masking,
                cache,
                real.is_some().then_some(&mut router),
            );
            if let (Some(real), false) = (real, router.is_empty()) {
                let mut pending = self.pending.lock().expect("not poisoned");
                pending.routers.push((router, real));
            }
            return h;
        }
        let (h, saved) = match &self.backbone {
            Backbone::Gpt2(b) => b.forward_saving(x, positions, masking),
            Backbone::Llama(b) => b.forward_saving(x, positions, masking, real.as_ref()),
            Backbone::Gemma(b) => b.forward_saving(x, positions, masking),
        };
        self.pending
            .lock()
            .expect("not poisoned")
            .blocks
            .push(saved);
        h
    }

    /// The input embeddings of a forward over `ids`: [`Model::embed`] plus NEFTune's noise
    /// in training forwards when the options ask for it (as transformers' hook on the
    /// input embedding module adds it: to the token embeddings, after Gemma's scale, before
    /// GPT-2's positions and any soft prompt).
    fn embed_input(&self, ids: &Tensor) -> Tensor {
        let x = self.embed(ids);
        match self.options.neftune_noise_alpha {
            Some(alpha) if grad_enabled() => {
                let size = x.size();
                let magnitude = alpha / ((size[1] * size[2]) as f64).sqrt();
                let noise = x.zeros_like().uniform_(-magnitude, magnitude);
                x + noise
            }
            _ => x,
        }
    }

    /// Token embeddings `[B, T, H]` of `ids` (from `modules_to_save`'s copy while
    /// adapters are on).
    fn embed(&self, ids: &Tensor) -> Tensor {
        let weight = match &self.saved_embedding {
            Some(copy) if adapter::adapters_enabled() => copy.to_kind(self.kind()),
            _ => match self.embedding_with_tokens() {
                Some(w) if adapter::adapters_enabled() => w,
                _ => self.embedding_weight().shallow_clone(),
            },
        };
        match &self.backbone {
            Backbone::Gpt2(b) => b.embed_with(&weight, ids),
            Backbone::Llama(b) => b.embed_with(&weight, ids),
            Backbone::Gemma(b) => b.embed_with(&weight, ids),
        }
    }

    fn backbone_forward(
        &self,
        x: &Tensor,
        positions: &Tensor,
        masking: &Masking,
        cache: Option<&mut KvCache>,
    ) -> Tensor {
        match &self.backbone {
            Backbone::Gpt2(b) => b.forward(x, positions, masking, cache),
            Backbone::Llama(b) => b.forward(x, positions, masking, cache, None),
            Backbone::Gemma(b) => b.forward(x, positions, masking, cache),
        }
    }

    /// The attention masking of one forward: `build(window)` with the window every layer
    /// uses (Mistral's, or none), and for Gemma's sliding layers beside global ones a
    /// second masking with their window ([`Masking::for_layer`]).
    pub fn masking(&self, build: impl Fn(Option<i64>) -> Masking) -> Masking {
        match &self.backbone {
            Backbone::Llama(b) => match b.local_window() {
                Some(w) => build(b.sliding_window()).with_local(build(Some(w))),
                None => build(b.sliding_window()),
            },
            Backbone::Gpt2(_) => build(None),
            Backbone::Gemma(b) => match b.local_window() {
                Some(w) => build(None).with_local(build(Some(w))),
                None => build(None),
            },
        }
    }

    /// Phi-3 with LongRoPE: its `original_max_position_embeddings`, past which generation
    /// reruns the sequence once ([`crate::generate`]), as `transformers`' Phi-3 does.
    pub fn rope_cache_reset(&self) -> Option<i64> {
        match &self.backbone {
            Backbone::Llama(b) if self.config.model_type == ModelType::Phi3 => b.long_rope_length(),
            _ => None,
        }
    }

    /// Where prompt tuning's virtual tokens go (input embeddings without it).
    fn prompt_kind(&self) -> PromptKind {
        self.options
            .prompt_tuning
            .as_ref()
            .map_or(PromptKind::Input, |p| p.kind)
    }

    /// Prompt tuning's virtual tokens put before the inputs (0 without, or while adapters
    /// are switched off), as embeddings or as a prefix of keys and values.
    pub fn virtual_tokens(&self) -> i64 {
        match &self.prompt {
            Some(p) if adapter::adapters_enabled() => p.size()[0],
            _ => 0,
        }
    }

    /// One decode step over a static cache ([`KvCache::write_at`]): next-token logits
    /// `[B, V]` for `ids` `[B, 1]` at `positions` `[B, 1]`. Never waits for the device, so
    /// it can be captured in a CUDA graph.
    pub fn decode_logits(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        masking: &Masking,
        cache: &mut KvCache,
    ) -> Tensor {
        let x = self.embed(ids);
        let h = self.backbone_forward(&x, positions, masking, Some(cache));
        self.head_output(&h).squeeze_dim(1)
    }

    /// The head applied to hidden states: `[B, T, V]` logits (soft-capped where the model
    /// caps them) or `[B, T]` scores.
    pub fn head_output(&self, hidden: &Tensor) -> Tensor {
        match self.head {
            Head::Lm => self.lm_head().logits(hidden),
            Head::Score => hidden
                .linear::<Tensor>(&self.head_weight_in_use(), None)
                .squeeze_dim(-1),
        }
    }

    /// The LM head in use, with Gemma 2's final-logit soft-capping
    /// (`final_logit_softcapping`) and Granite's `logits_scaling` (none elsewhere).
    fn lm_head(&self) -> vocab::LmHead {
        let (softcap, divisor) = match &self.config.arch {
            Arch::Gemma(c) => (c.final_logit_softcapping(), 1.0),
            Arch::Llama(c) => (None, c.multipliers().2),
            Arch::Gpt2(_) => (None, 1.0),
        };
        vocab::LmHead {
            weight: self.head_weight_in_use(),
            softcap,
            divisor,
        }
    }

    /// Whether the model has sparse MoE layers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).
    pub fn is_moe(&self) -> bool {
        matches!(&self.config.arch, Arch::Llama(c) if c.is_moe())
    }

    /// The load-balancing loss's weight the model's `config.json` declares (MoE models).
    pub fn config_router_aux_loss_coef(&self) -> Option<f64> {
        match &self.config.arch {
            Arch::Llama(c) if c.is_moe() => Some(c.aux_loss_coef()),
            _ => None,
        }
    }

    /// From now on, forwards with grad keep their router logits (MoE models) until
    /// [`Model::backward_router_aux_loss`].
    pub fn record_router_logits(&self, on: bool) {
        self.record_router
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn recording_router(&self) -> bool {
        self.record_router
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Backpropagates `weight` × the load-balancing loss of the forwards recorded since
    /// the last backward (averaged over them), and returns that loss (`None` when none was
    /// recorded). Call it before [`Model::backward`]: forwards that kept their graph
    /// backpropagate now, keeping it for the loss's backward through the same blocks;
    /// checkpointed forwards get their coefficients, and each recomputed MoE block adds
    /// its share during [`Model::backward`].
    pub fn backward_router_aux_loss(&self, weight: f64) -> Option<f64> {
        let Arch::Llama(c) = &self.config.arch else {
            return None;
        };
        let top_k = c.experts().1;
        let graphs = self.graph_router_losses(top_k);
        let mut pending = self.pending.lock().expect("not poisoned");
        let saved: Vec<&mut recompute::RouterSaved> = pending
            .blocks
            .iter_mut()
            .filter_map(|s| s.router.as_mut().filter(|r| r.coefficients.is_none()))
            .collect();
        let n = graphs.as_ref().map_or(0, |(_, n)| *n) + saved.len();
        if n == 0 {
            return None;
        }
        let share = weight / n as f64;
        let mut total = 0.0;
        for r in saved {
            let coefficients = moe::load_balancing_coefficients(&r.logits, &r.real, top_k);
            let loss: f64 = r
                .logits
                .iter()
                .map(|l| moe::load_balancing_share(l, &r.real, &coefficients).double_value(&[]))
                .sum();
            total += loss;
            r.coefficients = Some(coefficients * share);
        }
        drop(pending);
        if let Some((sum, _)) = graphs {
            total += sum.double_value(&[]);
            backward_keeping_graph(&(sum * share));
        }
        Some(total / n as f64)
    }

    /// The summed load-balancing losses of the recorded forwards that kept their graph,
    /// and how many they were (`None`: none); the records are taken.
    fn graph_router_losses(&self, top_k: i64) -> Option<(Tensor, usize)> {
        let routers = std::mem::take(&mut self.pending.lock().expect("not poisoned").routers);
        let n = routers.len();
        routers
            .iter()
            .map(|(logits, real)| moe::load_balancing_loss(logits, real, top_k))
            .reduce(|a, b| a + b)
            .map(|sum| (sum, n))
    }

    /// Drops the router logits recorded by forwards that kept their graph (no backward
    /// will use them).
    pub fn forget_router_logits(&self) {
        self.pending.lock().expect("not poisoned").routers.clear();
    }

    /// The load-balancing loss ([`moe::load_balancing_loss`]) of the forwards recorded
    /// since the last call that kept their graph, averaged over them (`None` when none
    /// was recorded).
    pub fn take_router_aux_loss(&self) -> Option<Tensor> {
        let Arch::Llama(c) = &self.config.arch else {
            return None;
        };
        self.graph_router_losses(c.experts().1)
            .map(|(sum, n)| sum / n as f64)
    }

    /// Backpropagates `loss` through this model: `loss.backward()`, then the parts the
    /// forwards did not keep — the LM head's chunks and, with gradient checkpointing, the
    /// blocks — recomputed one at a time.
    pub fn backward(&self, loss: &Tensor) {
        loss.backward();
        self.backward_recomputed();
    }

    /// The recomputed part of a backward (see [`vocab`] and [`recompute`]): call it after
    /// `loss.backward()` on every model whose outputs the loss used ([`Model::backward`]
    /// does both for a loss of one model).
    pub fn backward_recomputed(&self) {
        let pending = std::mem::take(&mut *self.pending.lock().expect("not poisoned"));
        // The head's gradients reach the hidden states first, then the blocks under them.
        for s in pending.heads.into_iter().rev() {
            vocab::backward_head(s);
        }
        for s in pending.blocks.into_iter().rev() {
            match &self.backbone {
                Backbone::Gpt2(b) => b.backward_saved(s),
                Backbone::Llama(b) => b.backward_saved(s),
                Backbone::Gemma(b) => b.backward_saved(s),
            }
        }
    }

    /// Per-token log-probs of `labels` `[B, T]` given hidden states `[B, T, H]` (from
    /// [`Model::hidden`]), and what `spec` asks for besides, with the LM head applied
    /// [`vocab::POSITIONS_PER_CHUNK`] positions at a time: no `[B, T, V]` tensor exists.
    /// With grad the outputs are leaves whose gradient [`Model::backward`] carries back
    /// through recomputed chunks.
    pub fn token_outputs(&self, hidden: &Tensor, labels: &Tensor, spec: TokenSpec) -> TokenOutputs {
        assert_eq!(self.head, Head::Lm, "token log-probs need the LM head");
        self.chunked_head(hidden, labels, (spec, None))
    }

    /// [`vocab::token_outputs`] with this model's head, what the backward needs kept for
    /// [`Model::backward_recomputed`].
    fn chunked_head(
        &self,
        hidden: &Tensor,
        labels: &Tensor,
        spec: (TokenSpec, Option<vocab::Target>),
    ) -> TokenOutputs {
        let mut head = self.lm_head();
        // A head weight computed with grad (an embedding with trainable tokens in place):
        // the chunks' backward passes each reach a leaf standing for it, whose gradient
        // then goes through the weight's own graph once (backward_head).
        let source = (grad_enabled() && head.weight.requires_grad() && !head.weight.is_leaf())
            .then(|| {
                let leaf = head.weight.detach().set_requires_grad(true);
                std::mem::replace(&mut head.weight, leaf)
            });
        let (outputs, saved) =
            vocab::token_outputs(head, hidden, labels, spec, vocab::POSITIONS_PER_CHUNK);
        if let Some(mut saved) = saved {
            saved.weight_source = source;
            self.pending.lock().expect("not poisoned").heads.push(saved);
        }
        outputs
    }

    /// The generalized JSD (at `beta`, see [`crate::ops::generalized_jsd`]) between this
    /// model's next-token distributions at `hidden` `[R, H]` and `teacher`'s at
    /// `teacher_hidden` `[R, H']`, both at `temperature`, per row `[R]`, both heads applied
    /// [`vocab::POSITIONS_PER_CHUNK`] rows at a time: no `[R, V]` tensor is kept. With grad
    /// the result is a leaf whose gradient [`Model::backward`] carries back through
    /// recomputed chunks into this model (the teacher's side has none). Also the entropy of
    /// this model's distributions (at `temperature`, detached), per row.
    pub fn distill_outputs(
        &self,
        hidden: &Tensor,
        teacher: &Model,
        teacher_hidden: &Tensor,
        (beta, temperature): (f64, f64),
    ) -> (Tensor, Tensor) {
        assert_eq!(self.head, Head::Lm, "distillation needs the LM head");
        let rows = hidden.size()[0];
        let labels = Tensor::zeros([1, rows], (Kind::Int64, hidden.device()));
        let spec = TokenSpec {
            jsd: Some(beta),
            entropy: true,
            temperature,
            ..TokenSpec::default()
        };
        let target = vocab::Target {
            head: teacher.lm_head(),
            hidden: teacher_hidden.detach(),
        };
        let outputs = self.chunked_head(&hidden.unsqueeze(0), &labels, (spec, Some(target)));
        let entropy = outputs.entropy.expect("asked for").squeeze_dim(0);
        (outputs.jsd.expect("asked for").squeeze_dim(0), entropy)
    }

    /// [`Model::token_outputs`] at `hidden` `[B, T, H]`, and with `spec.jsd` the
    /// generalized JSD against `teacher`'s distributions at `teacher_hidden` `[B, T, H']`
    /// (both at `spec.temperature`), in one chunked pass of both heads: no `[B, T, V]`
    /// tensor exists, and one recomputed backward serves every output.
    pub fn token_outputs_against(
        &self,
        (hidden, labels): (&Tensor, &Tensor),
        (teacher, teacher_hidden): (&Model, &Tensor),
        spec: TokenSpec,
    ) -> TokenOutputs {
        assert_eq!(self.head, Head::Lm, "distillation needs the LM head");
        let h = teacher_hidden.size()[2];
        let target = vocab::Target {
            head: teacher.lm_head(),
            hidden: teacher_hidden.detach().reshape([-1, h]),
        };
        self.chunked_head(hidden, labels, (spec, Some(target)))
    }

    /// The head's weight in use: a scalar head trained beside adapters falls back to the
    /// one it started from while adapters are off.
    fn head_weight_in_use(&self) -> Tensor {
        let on = adapter::adapters_enabled();
        match &self.original_head {
            Some(original) if !on => original.shallow_clone(),
            Some(_) => self.head_weight.shallow_clone(),
            // A head tied to an embedding with trainable tokens gets them too (PEFT ties
            // the token adapter to it).
            None if on && self.head == Head::Lm && self.config.tie_word_embeddings() => self
                .embedding_with_tokens()
                .unwrap_or_else(|| self.head_weight.shallow_clone()),
            None => self.head_weight.shallow_clone(),
        }
    }

    /// Logits `[B, T, V]` (Lm) or scores `[B, T]` (Score) at every position.
    pub fn forward(&self, ids: &Tensor, attention_mask: &Tensor) -> Tensor {
        self.head_output(&self.hidden(ids, attention_mask, None))
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_layers())
    }

    /// A cache that holds `capacity` positions (and prompt tuning's virtual tokens)
    /// without reallocating.
    pub fn new_cache_with_capacity(&self, capacity: i64) -> KvCache {
        let virtual_tokens = self.prompt.as_ref().map_or(0, |p| p.size()[0]);
        KvCache::with_capacity(self.config.num_layers(), capacity + virtual_tokens)
    }

    /// Every variable under its Hugging Face name.
    pub fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        self.vs.variables().into_iter().collect()
    }

    /// Writes a Hugging Face directory: `config.json` (architecture and dtype updated),
    /// the weights, and the tokenizer files of `sidecar_from` if given. A model with
    /// adapters writes PEFT's adapter directory instead: `adapter_config.json` and
    /// `adapter_model.safetensors` (the adapters, and a trained scalar head).
    pub fn save(&self, dir: &Path, sidecar_from: Option<&Path>) -> Result<()> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        if self.options.has_adapter() {
            return self.save_adapter(dir, sidecar_from);
        }
        self.write_directory(&self.plain_tensors(), dir, sidecar_from)
    }

    /// `tensors` with this model's `config.json` and `sidecar_from`'s tokenizer files.
    fn write_directory(
        &self,
        tensors: &BTreeMap<String, Tensor>,
        dir: &Path,
        sidecar_from: Option<&Path>,
    ) -> Result<()> {
        checkpoint::save_tensors(tensors, dir, checkpoint::DEFAULT_MAX_SHARD_BYTES)?;
        let config = self.export_config();
        checkpoint::write_atomic(
            &dir.join("config.json"),
            serde_json::to_string_pretty(&config).unwrap().as_bytes(),
        )?;
        self.write_sidecars(sidecar_from, dir)
    }

    /// The tokenizer files of `sidecar_from` into `dir`, with what the run changed in them
    /// (`--chat-template-path`, `--eos-token`).
    fn write_sidecars(&self, sidecar_from: Option<&Path>, dir: &Path) -> Result<()> {
        if let Some(from) = sidecar_from {
            checkpoint::copy_sidecar_files(from, dir)?;
            checkpoint::apply_tokenizer_overrides(dir, &self.tokenizer_overrides)?;
        }
        Ok(())
    }

    fn save_adapter(&self, dir: &Path, sidecar_from: Option<&Path>) -> Result<()> {
        // PiSSA's and OLoRA's layers as the plain LoRA of the unchanged base they are
        // (PEFT's `path_initial_model_for_weight_conversion`).
        let mut tensors = self.adapter_tensors();
        for module in self.moved_modules() {
            let mut take = |n: &str| tensors.remove(&format!("{module}.{n}")).unwrap();
            let (a, b) = (take("lora_A.weight"), take("lora_B.weight"));
            let (a0, b0) = (take(lora::INITIAL_A), take(lora::INITIAL_B));
            tensors.insert(format!("{module}.lora_A.weight"), Tensor::cat(&[a, a0], 0));
            tensors.insert(format!("{module}.lora_B.weight"), Tensor::cat(&[b, -b0], 1));
        }
        let tensors = tensors
            .into_iter()
            .map(|(name, t)| (adapter::peft_key(&name), t))
            .collect();
        checkpoint::save_file(&tensors, &dir.join(adapter::ADAPTER_WEIGHTS))?;
        let (task, mut to_save): (_, Vec<String>) = match self.head {
            Head::Lm => ("CAUSAL_LM", vec![]),
            Head::Score => ("SEQ_CLS", vec!["classifier".into(), "score".into()]),
        };
        if let Some(l) = &self.options.lora {
            to_save.extend(l.modules_to_save.iter().cloned());
        }
        let to_save = (!to_save.is_empty()).then_some(to_save);
        let base = self.base_dir.as_deref();
        let mut config = match (&self.options.lora, &self.options.prompt_tuning) {
            (Some(cfg), _) => {
                let mut targets: Vec<String> = self
                    .adapted_modules()
                    .iter()
                    .map(|m| m.rsplit('.').next().unwrap_or(m).to_string())
                    .collect();
                targets.sort();
                targets.dedup();
                let gpt2 = self.fan_in_fan_out();
                let cfg = match cfg.init.moves_base() {
                    true => cfg.converted(),
                    false => cfg.clone(),
                };
                cfg.to_peft(base, task, &targets, gpt2, to_save)
            }
            (None, Some(cfg)) => {
                let heads = match &self.config.arch {
                    Arch::Gpt2(c) => c.n_head,
                    Arch::Llama(c) => c.num_attention_heads,
                    Arch::Gemma(c) => c.num_attention_heads,
                };
                let dims = (self.config.hidden_size(), heads);
                let mut config = cfg.to_peft(base, task, dims, self.config.prefix_shape());
                config["modules_to_save"] = serde_json::json!(to_save);
                config
            }
            (None, None) => unreachable!("save_adapter without an adapter"),
        };
        if let Some(q) = &self.options.quantization {
            config[adapter::BASE_QUANTIZATION] = q.to_json();
        }
        // A reward model's normalisation travels in the adapter's config (PEFT ignores it).
        for key in adapter::CARRIED_KEYS {
            if let Some(v) = self.config.raw.get(*key) {
                config[*key] = v.clone();
            }
        }
        checkpoint::write_atomic(
            &dir.join(adapter::ADAPTER_CONFIG),
            serde_json::to_string_pretty(&config).unwrap().as_bytes(),
        )?;
        self.write_sidecars(sidecar_from, dir)
    }

    /// Writes the model with every adapter folded into its base weight (`W + scaling·B·A`,
    /// DoRA's magnitude applied, transposed for GPT-2's Conv1D) as a plain Hugging Face
    /// directory.
    pub fn save_merged(&self, dir: &Path, sidecar_from: Option<&Path>) -> Result<()> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let _guard = tch::no_grad_guard();
        let mut tensors = self.plain_tensors();
        let fan_in_fan_out = self.fan_in_fan_out();
        for (param, path) in self.parameter_adapters() {
            let a = tensors.remove(&format!("{path}.lora_A.weight")).unwrap();
            let b = tensors.remove(&format!("{path}.lora_B.weight")).unwrap();
            let scaling = self
                .options
                .lora
                .as_ref()
                .map_or(1.0, |l| l.scaling(&param));
            let w = tensors[&param].to_device(a.device());
            tensors.insert(param, lora::merged_experts(&w, &a, &b, scaling));
        }
        for module in self.adapted_modules() {
            let a = tensors.remove(&format!("{module}.lora_A.weight")).unwrap();
            let b = tensors.remove(&format!("{module}.lora_B.weight")).unwrap();
            let m = tensors.remove(&format!("{module}.{}", lora::MAGNITUDE));
            for start in [lora::INITIAL_A, lora::INITIAL_B] {
                tensors.remove(&format!("{module}.{start}"));
            }
            let name = format!("{module}.weight");
            let scaling = self
                .options
                .lora
                .as_ref()
                .map_or(1.0, |l| l.scaling(&module));
            let merged = lora::merged_weight(
                &tensors[&name].to_device(a.device()),
                &a,
                &b,
                scaling,
                m.as_ref(),
                fan_in_fan_out,
            );
            tensors.insert(name, merged);
        }
        // modules_to_save's copies replace their originals; a tied head that is not the
        // embedding in use any more is written as its own lm_head (the model untied).
        if let Some(copy) = &self.saved_embedding {
            let module = embedding_module(&self.config);
            tensors.remove(&lora::saved_copy(module));
            tensors.insert(format!("{module}.weight"), copy.to_kind(self.kind()));
        }
        if let Some(w) = self.embedding_with_tokens() {
            let module = embedding_module(&self.config);
            tensors.remove(&format!("{module}.{}", lora::TOKEN_DELTA));
            tensors.insert(format!("{module}.weight"), w);
        }
        let head_copied = self.head == Head::Lm && self.original_head.is_some();
        if head_copied {
            tensors.remove(&lora::saved_copy("lm_head"));
        }
        let untie = self.head == Head::Lm
            && self.config.tie_word_embeddings()
            && (head_copied || self.saved_embedding.is_some());
        if head_copied || untie {
            // The head in use with adapters on: its copy, or the original embedding.
            tensors.insert(
                "lm_head.weight".into(),
                self.head_weight.to_kind(self.kind()),
            );
        }
        self.write_directory(&tensors, dir, sidecar_from)?;
        if untie {
            let path = dir.join("config.json");
            let mut config = self.export_config();
            config["tie_word_embeddings"] = Value::Bool(false);
            checkpoint::write_atomic(
                &path,
                serde_json::to_string_pretty(&config).unwrap().as_bytes(),
            )?;
        }
        Ok(())
    }

    fn export_config(&self) -> Value {
        let mut raw = self.config.raw.clone();
        let (lm, score) = self.config.model_type.classes();
        let class = match self.head {
            Head::Lm => lm,
            Head::Score => score,
        };
        raw.insert("architectures".into(), serde_json::json!([class]));
        raw.insert(
            "dtype".into(),
            Value::from(crate::device::hf_dtype_name(self.kind())),
        );
        raw.remove("torch_dtype");
        // Written in full precision (a quantized base is dequantized).
        raw.remove("quantization_config");
        if self.head == Head::Score {
            raw.insert("num_labels".into(), Value::from(1));
            raw.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
            raw.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
        }
        Value::Object(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tiny_llama() -> Value {
        json!({"model_type": "llama", "vocab_size": 11, "hidden_size": 8, "intermediate_size": 16,
               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1})
    }

    /// The digest data-parallel ranks compare covers every PiSSA/OLoRA start, bit for bit.
    #[test]
    fn moved_start_digest_sees_every_start() {
        let config = ModelConfig::from_json(tiny_llama(), Path::new("config.json")).unwrap();
        let lora = |init| lora::LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: lora::TargetModules::AllLinear,
            use_rslora: false,
            use_dora: false,
            patterns: Default::default(),
            init,
            modules_to_save: vec![],
            trainable_token_indices: vec![],
            target_parameters: vec![],
        };
        let plain = Model::new(
            config.clone(),
            &ModelOptions::cpu(Head::Lm).with_lora(Some(lora(lora::LoraInit::Kaiming))),
        );
        assert_eq!(plain.moved_start_digest(), None);
        let model = Model::new(
            config,
            &ModelOptions::cpu(Head::Lm).with_lora(Some(lora(lora::LoraInit::Pissa))),
        );
        let before = model.moved_start_digest().unwrap();
        assert_eq!(model.moved_start_digest(), Some(before));
        let name = format!("model.layers.0.mlp.down_proj.{}", lora::INITIAL_B);
        let t = model.named_tensors()[&name].shallow_clone();
        let _guard = tch::no_grad_guard();
        let _ = t.get(0).get(0).f_add_scalar_(1e-3).unwrap();
        assert_ne!(model.moved_start_digest(), Some(before));
    }

    #[test]
    fn unsupported_configs_are_named() {
        let p = Path::new("m/config.json");
        let e = ModelConfig::from_json(json!({"model_type": "bert"}), p)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "m/config.json: model_type 'bert' is not supported (supported: gpt2, llama, mistral, qwen2, qwen3, phi3, gemma, gemma2, gemma3_text, mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, smollm3, olmo2, olmo3, granite)"
        );
        // LongRoPE needs one factor per rotary frequency (head_dim 4: two).
        let mut phi3 = tiny_llama();
        phi3["model_type"] = json!("phi3");
        phi3["original_max_position_embeddings"] = json!(16);
        phi3["rope_scaling"] =
            json!({"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]});
        let e = ModelConfig::from_json(phi3, p).unwrap_err().to_string();
        assert!(e.contains("need 2 entries each"), "{e}");
        let mut dynamic = tiny_llama();
        dynamic["rope_scaling"] = json!({"rope_type": "dynamic", "factor": 4.0});
        let e = ModelConfig::from_json(dynamic, p).unwrap_err().to_string();
        assert!(e.contains("rope_type 'dynamic' is not supported (supported: default, linear, llama3, longrope, yarn)"), "{e}");
        let mut yarn = tiny_llama();
        yarn["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let e = ModelConfig::from_json(yarn, p).unwrap_err().to_string();
        assert!(
            e.contains("rope yarn scaling needs 'original_max_position_embeddings'"),
            "{e}"
        );
        let mut bad = tiny_llama();
        bad["hidden_act"] = json!("gelu");
        let e = ModelConfig::from_json(bad, p).unwrap_err().to_string();
        assert!(e.contains("hidden_act 'gelu' is not supported"), "{e}");
        let e = ModelConfig::from_json(json!({"model_type": "llama"}), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `vocab_size`"), "{e}");
        let mut moe = tiny_llama();
        moe["model_type"] = json!("mixtral");
        moe["num_local_experts"] = json!(2);
        moe["num_experts_per_tok"] = json!(3);
        let e = ModelConfig::from_json(moe, p).unwrap_err().to_string();
        assert!(
            e.contains("num_experts_per_tok 3 must be between 1 and the 2 experts"),
            "{e}"
        );
        let mut step = tiny_llama();
        step["model_type"] = json!("qwen3_moe");
        step["num_experts"] = json!(2);
        step["num_experts_per_tok"] = json!(1);
        step["decoder_sparse_step"] = json!(0);
        let e = ModelConfig::from_json(step, p).unwrap_err().to_string();
        assert_eq!(e, "m/config.json: decoder_sparse_step must be at least 1");
        let mut none = tiny_llama();
        none["model_type"] = json!("mixtral");
        none["num_local_experts"] = json!(0);
        let e = ModelConfig::from_json(none, p).unwrap_err().to_string();
        assert!(
            e.contains("num_experts_per_tok 2 must be between 1 and the 0 experts"),
            "{e}"
        );
    }

    /// NEFTune: uniform noise of magnitude α/√(T·H) on the input embeddings of training
    /// forwards only; evaluation (no autograd) sees the plain embeddings.
    #[test]
    fn neftune_noise_only_in_training_forwards() {
        let config = ModelConfig::from_json(tiny_llama(), Path::new("x")).unwrap();
        let opts = ModelOptions {
            neftune_noise_alpha: Some(5.0),
            ..ModelOptions::cpu(Head::Lm)
        };
        let model = Model::new(config, &opts);
        let ids = Tensor::from_slice2(&[[1i64, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]]);
        let plain = model.embed(&ids);
        let (t, h) = (6.0, plain.size()[2] as f64);
        let magnitude = 5.0 / (t * h).sqrt();
        let noisy = model.embed_input(&ids);
        let deviation = (&noisy - &plain).abs().max().double_value(&[]);
        assert!(
            deviation <= magnitude + 1e-6 && deviation > 0.8 * magnitude,
            "{deviation} against ±{magnitude}"
        );
        let quiet = tch::no_grad(|| model.embed_input(&ids));
        assert!(quiet.equal(&plain.detach()), "noise without autograd");
    }

    #[test]
    fn wrong_shapes_and_missing_tensors_in_a_model_directory() {
        let dir = tempfile::tempdir().unwrap();
        let config = ModelConfig::from_json(tiny_llama(), Path::new("x")).unwrap();
        let model = Model::new(config, &ModelOptions::cpu(Head::Lm));
        model.save(dir.path(), None).unwrap();
        // A config that disagrees with the stored tensors: hidden size 8 → 16.
        let mut raw = tiny_llama();
        raw["hidden_size"] = json!(16);
        std::fs::write(dir.path().join("config.json"), raw.to_string()).unwrap();
        let e = Model::load(dir.path(), &ModelOptions::cpu(Head::Lm))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("has shape [11, 8], the model expects [11, 16]"),
            "{e}"
        );
        // Untied lm_head missing from the file.
        let mut raw = tiny_llama();
        raw["tie_word_embeddings"] = json!(false);
        std::fs::write(dir.path().join("config.json"), raw.to_string()).unwrap();
        let mut tensors = model.named_tensors();
        tensors.remove("lm_head.weight");
        checkpoint::save_tensors(&tensors, dir.path(), checkpoint::DEFAULT_MAX_SHARD_BYTES)
            .unwrap();
        let e = Model::load(dir.path(), &ModelOptions::cpu(Head::Lm))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing tensor 'lm_head.weight'"), "{e}");
    }
}
