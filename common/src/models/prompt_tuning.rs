//! Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
//! Tuning"; the lecture's 提示学习) as PEFT implements it: `N` trainable virtual-token
//! embeddings are put before every input's token embeddings (the attention mask gets `N`
//! ones in front, positions run over the virtual tokens first) while the whole model stays
//! frozen. Nothing reported or saved includes the virtual positions: the model's hidden
//! states, logits and scores are those of the real tokens.
//!
//! On disk: PEFT's `adapter_config.json` (`peft_type` PROMPT_TUNING) and
//! `adapter_model.safetensors` holding `prompt_embeddings` `[N, H]`.

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

#[derive(Debug, Clone, PartialEq)]
pub struct PromptTuningConfig {
    pub num_virtual_tokens: i64,
    pub init: PromptInit,
}

impl PromptTuningConfig {
    /// The `[N, H]` virtual-token embeddings under `root`, N(0, 1) (PEFT's RANDOM); the
    /// other inits start from the loaded model's embeddings ([`Self::start_ids`]).
    pub fn create(&self, root: &nn::Path, hidden: i64) -> Tensor {
        let init = Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        root.var(KEY, &[self.num_virtual_tokens, hidden], init)
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

    /// `adapter_config.json` as PEFT writes it.
    pub fn to_peft(&self, base: Option<&Path>, task_type: &str, dims: (i64, i64, i64)) -> Value {
        let (token_dim, heads, layers) = dims;
        let (text, tokenizer) = match &self.init {
            PromptInit::Text { text, .. } => {
                (Some(text.clone()), base.map(|b| b.display().to_string()))
            }
            _ => (None, None),
        };
        json!({
            "peft_type": "PROMPT_TUNING",
            "task_type": task_type,
            "base_model_name_or_path": base.map(|b| b.display().to_string()),
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

    /// The config of a PEFT `adapter_config.json` with `peft_type` PROMPT_TUNING (the
    /// weights are read from the file, so the initialisation does not matter).
    pub fn from_peft(v: &Value) -> Result<Self, String> {
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
        })
    }
}
