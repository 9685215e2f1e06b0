//! Causal language models in Hugging Face layout: a backbone per architecture (one file
//! each) and a head that is either the language-model head or the scalar `score` head of
//! `*ForSequenceClassification`.

pub mod attention;
pub mod gpt2;
mod layers;
pub mod llama;
mod options;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde_json::Value;
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

use data::Tokenizer;

use crate::checkpoint::{self, LoadReport};
use crate::error::{Error, Result};
pub use attention::{positions_from_mask, KvCache, Masking};
use layers::param;
pub use layers::Activation;
pub use options::ModelOptions;

/// The `model_type` values this crate implements, parsed once from `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    Gpt2,
    Llama,
    Mistral,
    Qwen2,
}

impl ModelType {
    pub const ALL: [ModelType; 4] = [
        ModelType::Gpt2,
        ModelType::Llama,
        ModelType::Mistral,
        ModelType::Qwen2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ModelType::Gpt2 => "gpt2",
            ModelType::Llama => "llama",
            ModelType::Mistral => "mistral",
            ModelType::Qwen2 => "qwen2",
        }
    }

    /// `transformers`' class names (also what vLLM looks up): causal LM and scalar head.
    /// GPT-2's LM class is the historical `GPT2LMHeadModel`.
    fn classes(self) -> (&'static str, &'static str) {
        match self {
            ModelType::Gpt2 => ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
            ModelType::Llama => ("LlamaForCausalLM", "LlamaForSequenceClassification"),
            ModelType::Mistral => ("MistralForCausalLM", "MistralForSequenceClassification"),
            ModelType::Qwen2 => ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
        }
    }
}

#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per model, never in a hot loop
pub enum Arch {
    Gpt2(gpt2::Config),
    Llama(llama::Config),
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
            ModelType::Llama | ModelType::Mistral | ModelType::Qwen2 => {
                let c: llama::Config = serde_json::from_value(json).map_err(invalid)?;
                c.validate(path)?;
                Arch::Llama(c)
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
        }
    }

    pub fn vocab_size(&self) -> i64 {
        match &self.arch {
            Arch::Gpt2(c) => c.vocab_size,
            Arch::Llama(c) => c.vocab_size,
        }
    }

    pub fn num_layers(&self) -> usize {
        (match &self.arch {
            Arch::Gpt2(c) => c.n_layer,
            Arch::Llama(c) => c.num_hidden_layers,
        }) as usize
    }

    pub fn tie_word_embeddings(&self) -> bool {
        match &self.arch {
            Arch::Gpt2(c) => c.tie_word_embeddings,
            Arch::Llama(c) => c.tie_word_embeddings,
        }
    }

    /// The most positions the model can read, where it has a position table (GPT-2's
    /// `n_positions`); rotary models have none.
    pub fn max_positions(&self) -> Option<usize> {
        match &self.arch {
            Arch::Gpt2(c) => Some(c.n_positions as usize),
            Arch::Llama(_) => None,
        }
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

    /// Integer or list field of `config.json` (`eos_token_id` may be either).
    pub fn token_ids(&self, field: &str) -> Vec<i64> {
        ids_of(self.raw.get(field))
    }

    fn backbone_prefix(&self) -> &'static str {
        match self.arch {
            Arch::Gpt2(_) => "transformer",
            Arch::Llama(_) => "model",
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
}

/// A backbone and a head, with its variables in one `VarStore` under HF names.
#[derive(Debug)]
pub struct Model {
    pub vs: nn::VarStore,
    pub config: ModelConfig,
    pub head: Head,
    /// How it was built.
    pub options: ModelOptions,
    backbone: Backbone,
    /// `[V, H]` (possibly the tied input embedding) or `[1, H]`: both heads are a
    /// bias-free linear map of the final hidden states.
    head_weight: Tensor,
}

const SCORE_WEIGHT: &str = "score.weight";

impl Model {
    /// A model with freshly initialised weights (`transformers`' initialisation scheme).
    pub fn new(config: ModelConfig, opts: &ModelOptions) -> Self {
        let mut vs = nn::VarStore::new(opts.device);
        let root = vs.root();
        let backbone = match &config.arch {
            Arch::Gpt2(c) => Backbone::Gpt2(gpt2::Gpt2::new(&root / "transformer", c, opts)),
            Arch::Llama(c) => Backbone::Llama(llama::Llama::new(&root / "model", c, opts)),
        };
        let hidden = config.hidden_size();
        let head = opts.head;
        let head_weight = match head {
            Head::Score => param(
                &(&root / "score"),
                "weight",
                &[1, hidden],
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0 / ((hidden + 1) as f64).sqrt(),
                },
                opts,
            ),
            Head::Lm if config.tie_word_embeddings() => match &backbone {
                Backbone::Gpt2(b) => b.embedding_weight().shallow_clone(),
                Backbone::Llama(b) => b.embedding_weight().shallow_clone(),
            },
            Head::Lm => {
                let std = match &config.arch {
                    Arch::Gpt2(c) => c.initializer_range,
                    Arch::Llama(c) => c.initializer_range,
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
        if opts.kind != Kind::Float {
            vs.set_kind(opts.kind);
        }
        Model {
            vs,
            config,
            head,
            options: opts.clone(),
            backbone,
            head_weight,
        }
    }

    /// Loads a Hugging Face model directory. A `Score` model may come from a causal LM
    /// (its `score` head is then initialised, as `transformers` does); an `Lm` model from
    /// a reward model only when its embeddings are tied.
    pub fn load(dir: &Path, opts: &ModelOptions) -> Result<(Self, LoadReport)> {
        let config = ModelConfig::load(dir)?;
        let model = Model::new(config, opts);
        let optional: &[&str] = match opts.head {
            Head::Score => &[SCORE_WEIGHT],
            Head::Lm => &[],
        };
        let report = checkpoint::load_into(
            &model.vs.variables(),
            dir,
            |name| model.config.checkpoint_aliases(name),
            optional,
        )?;
        if !report.unexpected.is_empty() {
            tracing::debug!(
                "{}: {} stored tensors unused: {}",
                dir.display(),
                report.unexpected.len(),
                report.unexpected.join(", ")
            );
        }
        Ok((model, report))
    }

    /// A model directory's weights and its tokenizer, checked against each other.
    pub fn load_with_tokenizer(dir: &Path, opts: &ModelOptions) -> Result<(Self, Tokenizer)> {
        let tokenizer = Tokenizer::load(dir)?;
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
    /// model); every variable must be there.
    pub fn load_weights(&self, dir: &Path) -> Result<()> {
        checkpoint::load_into(&self.vs.variables(), dir, |_| vec![], &[]).map(|_| ())
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn kind(&self) -> Kind {
        self.head_weight.kind()
    }

    /// Final hidden states `[B, T, H]`. `attention_mask` is `[B, S]` over the cached and
    /// the new tokens (S = cached + T); positions come from it.
    pub fn hidden(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor {
        let t = ids.size()[1];
        let s = attention_mask.size()[1];
        let positions = positions_from_mask(attention_mask).narrow(1, s - t, t);
        let window = match &self.backbone {
            Backbone::Llama(b) => b.sliding_window(),
            Backbone::Gpt2(_) => None,
        };
        // A cache remembers whether its prompt was padded (later tokens are real ones).
        let padded = match cache.as_deref_mut() {
            Some(c) => *c
                .padded
                .get_or_insert_with(|| Masking::has_padding(attention_mask)),
            None => Masking::has_padding(attention_mask),
        };
        let masking = Masking::new(attention_mask, t, window, Some(padded));
        match &self.backbone {
            Backbone::Gpt2(b) => b.forward(ids, &positions, &masking, cache),
            Backbone::Llama(b) => b.forward(ids, &positions, &masking, cache),
        }
    }

    /// The head applied to hidden states: `[B, T, V]` logits or `[B, T]` scores.
    pub fn head_output(&self, hidden: &Tensor) -> Tensor {
        let out = hidden.linear::<Tensor>(&self.head_weight, None);
        match self.head {
            Head::Lm => out,
            Head::Score => out.squeeze_dim(-1),
        }
    }

    /// Logits `[B, T, V]` (Lm) or scores `[B, T]` (Score) at every position.
    pub fn forward(&self, ids: &Tensor, attention_mask: &Tensor) -> Tensor {
        self.head_output(&self.hidden(ids, attention_mask, None))
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_layers())
    }

    /// A cache that holds `capacity` positions without reallocating.
    pub fn new_cache_with_capacity(&self, capacity: i64) -> KvCache {
        KvCache::with_capacity(self.config.num_layers(), capacity)
    }

    /// Every variable under its Hugging Face name.
    pub fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        self.vs.variables().into_iter().collect()
    }

    /// Writes a Hugging Face directory: `config.json` (architecture and dtype updated),
    /// the weights, and the tokenizer files of `sidecar_from` if given.
    pub fn save(&self, dir: &Path, sidecar_from: Option<&Path>) -> Result<()> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        checkpoint::save_tensors(
            &self.named_tensors(),
            dir,
            checkpoint::DEFAULT_MAX_SHARD_BYTES,
        )?;
        let config = self.export_config();
        checkpoint::write_atomic(
            &dir.join("config.json"),
            serde_json::to_string_pretty(&config).unwrap().as_bytes(),
        )?;
        if let Some(from) = sidecar_from {
            checkpoint::copy_sidecar_files(from, dir)?;
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

    #[test]
    fn unsupported_configs_are_named() {
        let p = Path::new("m/config.json");
        let e = ModelConfig::from_json(json!({"model_type": "bert"}), p)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "m/config.json: model_type 'bert' is not supported (supported: gpt2, llama, mistral, qwen2)"
        );
        let mut bad = tiny_llama();
        bad["hidden_act"] = json!("gelu");
        let e = ModelConfig::from_json(bad, p).unwrap_err().to_string();
        assert!(e.contains("hidden_act 'gelu' is not supported"), "{e}");
        let e = ModelConfig::from_json(json!({"model_type": "llama"}), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `vocab_size`"), "{e}");
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
