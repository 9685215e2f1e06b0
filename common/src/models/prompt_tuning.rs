//! Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
//! Tuning"; the lecture's 提示学习) as PEFT implements it: `N` trainable virtual-token
//! embeddings are put before every input's token embeddings (the attention mask gets `N`
//! ones in front, positions run over the virtual tokens first) while the whole model stays
//! frozen. Nothing reported or saved includes the virtual positions: the model's hidden
//! states, logits and scores are those of the real tokens.
//!
//! Prefix tuning (Li & Liang 2021; P-tuning v2, Liu et al. 2022: "deep" prompts), PEFT's
//! PREFIX_TUNING, is its arm [`PromptKind::Prefix`]: the `N` virtual tokens are trained keys
//! and values in every layer's attention instead of input embeddings — `[N, layers × 2 ×
//! kv_dim]`, layer `l`'s keys at `2l` and values at `2l + 1`, as PEFT's `get_prompt` lays
//! them out (`kv_dim` = key/value heads × head size: PEFT's grouped-query adjustment). They
//! go into the key/value cache before the first forward's tokens (keys as they are: PEFT
//! hands them to the model as cached, already rotated keys), the real tokens' positions
//! start at `N`, and nothing else of the model changes.
//!
//! On disk: PEFT's `adapter_config.json` (`peft_type` PROMPT_TUNING or PREFIX_TUNING) and
//! `adapter_model.safetensors` holding `prompt_embeddings` (`[N, H]`, or the prefix).

use std::path::Path;

use serde_json::{json, Value};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// The key of the virtual-token embeddings, in our variables and in PEFT's file.
pub const KEY: &str = "prompt_embeddings";

/// How the virtual tokens start (PEFT's `PromptTuningInit`).
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInit {
    /// `RANDOM`: N(0, 1), as `torch.nn.Embedding` initialises.
    Random,
    /// `SAMPLE_VOCAB`: the embeddings of tokens drawn uniformly from the vocabulary.
    Vocab,
    /// `TEXT`: the embeddings of this text's tokens, cut or repeated to N.
    Text { text: String, ids: Vec<i64> },
}

impl PromptInit {
    fn peft_name(&self) -> &'static str {
        match self {
            PromptInit::Random => "RANDOM",
            PromptInit::Vocab => "SAMPLE_VOCAB",
            PromptInit::Text { .. } => "TEXT",
        }
    }
}

/// Where the virtual tokens go (PEFT's `peft_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptKind {
    /// PROMPT_TUNING: input embeddings before the tokens.
    #[default]
    Input,
    /// PREFIX_TUNING: keys and values before the tokens, in every layer.
    Prefix,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PromptTuningConfig {
    pub num_virtual_tokens: i64,
    pub init: PromptInit,
    pub kind: PromptKind,
}

/// A model's attention shape as a prefix needs it: `(layers, key/value heads, head size)`.
pub type PrefixShape = (i64, i64, i64);

/// Layer by layer, the `(keys, values)` `[B, kv heads, N, head size]` of the prefix
/// `prefix` `[N, layers × 2 × kv_dim]` for a batch of `batch` rows (PEFT's `get_prompt`:
/// `view(B, N, 2L, H, d).permute(2, 0, 3, 1, 4)`, keys at `2l`, values at `2l + 1`).
pub fn prefix_keys_values(
    prefix: &Tensor,
    batch: i64,
    (layers, heads, dim): PrefixShape,
) -> Vec<(Tensor, Tensor)> {
    let n = prefix.size()[0];
    let kv = prefix
        .view([n, 2 * layers, heads, dim])
        .permute([1, 2, 0, 3]);
    (0..layers)
        .map(|l| {
            let rows = |i: i64| kv.get(i).unsqueeze(0).expand([batch, heads, n, dim], false);
            (rows(2 * l), rows(2 * l + 1))
        })
        .collect()
}

impl PromptTuningConfig {
    /// The width of one virtual token: the hidden size for input embeddings, layers × 2 ×
    /// kv_dim for a prefix.
    pub fn width(&self, hidden: i64, (layers, heads, dim): PrefixShape) -> i64 {
        match self.kind {
            PromptKind::Input => hidden,
            PromptKind::Prefix => layers * 2 * heads * dim,
        }
    }

    /// The `[N, width]` virtual tokens under `root`, N(0, 1) (PEFT's RANDOM, and its
    /// prefix encoder's `nn.Embedding`); the other inits start from the loaded model's
    /// embeddings ([`Self::start_ids`]).
    pub fn create(&self, root: &nn::Path, width: i64) -> Tensor {
        let init = Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        root.var(KEY, &[self.num_virtual_tokens, width], init)
    }

    /// The tokens whose embeddings (the model's input embeddings, scaled where the model
    /// scales them, as PEFT reads them through `word_embeddings(ids)`) start the virtual
    /// tokens: drawn uniformly from the `vocab` (SAMPLE_VOCAB) or the text's tokens cut or
    /// repeated to N (TEXT); none for RANDOM.
    pub fn start_ids(&self, vocab: i64, device: tch::Device) -> Option<Tensor> {
        let n = self.num_virtual_tokens;
        match &self.init {
            PromptInit::Random => None,
            PromptInit::Vocab => Some(Tensor::randint(vocab, [n], (Kind::Int64, device))),
            PromptInit::Text { ids, .. } => {
                let repeated: Vec<i64> = ids.iter().copied().cycle().take(n as usize).collect();
                Some(Tensor::from_slice(&repeated).to_device(device))
            }
        }
    }

    /// `adapter_config.json` as PEFT writes it; `dims` are `(hidden size, attention heads)`
    /// and the prefix's shape.
    pub fn to_peft(
        &self,
        base: Option<&Path>,
        task_type: &str,
        (hidden, heads): (i64, i64),
        (layers, kv_heads, dim): PrefixShape,
    ) -> Value {
        let base_name = base.map(|b| b.display().to_string());
        if self.kind == PromptKind::Prefix {
            // PEFT's grouped-query adjustment: token_dim and heads are the keys' and values'.
            return json!({
                "peft_type": "PREFIX_TUNING",
                "task_type": task_type,
                "base_model_name_or_path": base_name,
                "num_virtual_tokens": self.num_virtual_tokens,
                "token_dim": kv_heads * dim,
                "num_transformer_submodules": 1,
                "num_attention_heads": kv_heads,
                "num_layers": layers,
                "encoder_hidden_size": kv_heads * dim,
                "prefix_projection": false,
                "inference_mode": true,
                "revision": null,
            });
        }
        let (token_dim, heads, layers) = (hidden, heads, layers);
        let (text, tokenizer) = match &self.init {
            PromptInit::Text { text, .. } => {
                (Some(text.clone()), base.map(|b| b.display().to_string()))
            }
            _ => (None, None),
        };
        json!({
            "peft_type": "PROMPT_TUNING",
            "task_type": task_type,
            "base_model_name_or_path": base_name,
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": token_dim,
            "num_transformer_submodules": 1,
            "num_attention_heads": heads,
            "num_layers": layers,
            "prompt_tuning_init": self.init.peft_name(),
            "prompt_tuning_init_text": text,
            "tokenizer_name_or_path": tokenizer,
            "inference_mode": true,
            "revision": null,
        })
    }

    /// The config of a PEFT `adapter_config.json` with `peft_type` PROMPT_TUNING or
    /// PREFIX_TUNING (`kind`; the weights are read from the file, so the initialisation
    /// does not matter). A prefix trained with `prefix_projection` is saved as the
    /// encoder's output (PEFT's `get_prompt_embedding_to_save`), so it loads as a plain
    /// prefix, as PEFT loads it for inference.
    pub fn from_peft(v: &Value, kind: PromptKind) -> Result<Self, String> {
        let n = v
            .get("num_virtual_tokens")
            .and_then(Value::as_i64)
            .ok_or("field 'num_virtual_tokens' is missing")?;
        if n <= 0 {
            return Err(format!("num_virtual_tokens {n} must be at least 1"));
        }
        if v.get("num_transformer_submodules")
            .and_then(Value::as_i64)
            .unwrap_or(1)
            != 1
        {
            return Err("num_transformer_submodules must be 1 (a decoder-only model)".into());
        }
        Ok(PromptTuningConfig {
            num_virtual_tokens: n,
            init: PromptInit::Random,
            kind,
        })
    }
}
