//! The Llama family: Llama 2/3 (Touvron et al. 2023), Mistral, Qwen2, Qwen3, Phi-3,
//! SmolLM3, OLMo 2 and 3, Granite, and the MoE models below, which differ only in
//! configuration.
//!
//! Mirrors `transformers/models/llama/modeling_llama.py` (and the `mistral`, `qwen2`,
//! `qwen3` copies): RMSNorm, rotary embeddings (default, linear, llama3 or YaRN frequencies),
//! SwiGLU, grouped-query attention, optional q/k/v/o biases, tied or untied embeddings, and
//! Qwen3's per-head RMSNorm of queries and keys before rotary; Phi-3's fused `qkv_proj` and
//! `gate_up_proj` (kept as stored, split after the product) and partial rotary; SmolLM3's
//! layers without rotary (NoPE); OLMo 2's and 3's norms after each block ([`Norms`]) and
//! q/k norms over whole projections, OLMo 3's sliding layers with their own rotary set;
//! Granite's multipliers; the sparse expert blocks of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE
//! and gpt-oss in place of the MLP ([`super::moe`]), with OLMoE's `clip_qkv`, and gpt-oss's
//! attention sinks and sliding layers beside full ones.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use super::attention::{KvCache, Masking};
use super::layers::{param, Activation, Embedding, Linear};
use super::moe::{MoeShape, SparseMoe};
use super::options::ModelOptions;
use super::recompute::{backward_blocks_with, run_blocks, RouterSaved, Saved};
use super::ModelType;
use crate::error::{Error, Result};

/// `config.json` of `llama`, `mistral`, `qwen2`, `qwen3`, `phi3`, `mixtral`, `qwen2_moe`,
/// `qwen3_moe`, `olmoe`, `gpt_oss`, `smollm3`, `olmo2`, `olmo3` and `granite`, with Hugging
/// Face's field names.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub model_type: ModelType,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    #[serde(default)]
    pub head_dim: Option<i64>,
    /// See [`Config::norm_eps`] for the architectures' defaults.
    #[serde(default)]
    pub rms_norm_eps: Option<f64>,
    #[serde(
        default = "defaults::hidden_act",
        deserialize_with = "defaults::hidden_act_field"
    )]
    pub hidden_act: Activation,
    #[serde(default = "defaults::init_range")]
    pub initializer_range: f64,
    /// Biases on the attention projections (gpt-oss's default true, the others' false).
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: bool,
    /// See [`Config::tied`] for the architectures' defaults.
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// transformers 4 layout: `rope_theta` and `rope_scaling` at the top level.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// transformers 5 layout: everything under `rope_parameters`.
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub sliding_window: Option<i64>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// The share of each head's dimensions that rotate (Phi-4-mini: 0.75).
    #[serde(default = "defaults::one")]
    pub partial_rotary_factor: f64,
    #[serde(default)]
    pub max_position_embeddings: Option<f64>,
    /// Phi-3's pretraining length, which LongRoPE's switch and factor read (it wins over
    /// the one in `rope_scaling`, as in `transformers`).
    #[serde(default)]
    pub original_max_position_embeddings: Option<f64>,
    /// Mixture of experts: experts per MoE layer (Qwen3-MoE's `num_experts`; Mixtral's,
    /// and what transformers 5 saves for both, `num_local_experts`).
    #[serde(default)]
    pub num_experts: Option<i64>,
    #[serde(default)]
    pub num_local_experts: Option<i64>,
    /// Experts each token goes to (top k).
    #[serde(default)]
    pub num_experts_per_tok: Option<i64>,
    /// The Qwens' expert width (Mixtral's and OLMoE's experts use `intermediate_size`).
    #[serde(default)]
    pub moe_intermediate_size: Option<i64>,
    /// Renormalise the top-k probabilities (Mixtral always does).
    #[serde(default)]
    pub norm_topk_prob: bool,
    /// The Qwens: every this-many layers is sparse, except `mlp_only_layers` (dense MLPs of
    /// `intermediate_size`).
    #[serde(default)]
    pub decoder_sparse_step: Option<i64>,
    #[serde(default)]
    pub mlp_only_layers: Option<Vec<i64>>,
    /// The load-balancing loss's weight the architecture declares ([`Config::aux_loss_coef`]).
    #[serde(default)]
    pub router_aux_loss_coef: Option<f64>,
    #[serde(default)]
    pub router_jitter_noise: Option<f64>,
    /// Qwen2-MoE: q/k/v biases (default true) and the shared expert's width.
    #[serde(default)]
    pub qkv_bias: Option<bool>,
    #[serde(default)]
    pub shared_expert_intermediate_size: Option<i64>,
    /// OLMoE: queries, keys and values clamped to ±this after their projections.
    #[serde(default)]
    pub clip_qkv: Option<f64>,
    /// gpt-oss: the experts' clamped SwiGLU (`σ(α·gate)` gain, clamp limit).
    #[serde(default)]
    pub swiglu_alpha: Option<f64>,
    #[serde(default)]
    pub swiglu_limit: Option<f64>,
    /// gpt-oss and SmolLM3: `sliding_attention` or `full_attention` per layer (gpt-oss's
    /// default: the even layers slide; SmolLM3's: the layers without rotary, with
    /// `use_sliding_window`).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// SmolLM3: 1 where a layer applies rotary embeddings, 0 where it has none (NoPE);
    /// default every `no_rope_layer_interval`-th (4) layer has none.
    #[serde(default)]
    pub no_rope_layers: Option<Vec<i64>>,
    #[serde(default)]
    pub no_rope_layer_interval: Option<i64>,
    /// Granite: the embeddings scaled by `embedding_multiplier`, each block's output by
    /// `residual_multiplier` before the residual sum, the attention scores by
    /// `attention_multiplier` (in place of 1/√head_dim), the logits divided by
    /// `logits_scaling`.
    #[serde(default)]
    pub embedding_multiplier: Option<f64>,
    #[serde(default)]
    pub residual_multiplier: Option<f64>,
    #[serde(default)]
    pub attention_multiplier: Option<f64>,
    #[serde(default)]
    pub logits_scaling: Option<f64>,
}

mod defaults {
    pub fn hidden_act() -> super::Activation {
        super::Activation::Silu
    }
    pub fn hidden_act_field<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<super::Activation, D::Error> {
        super::Activation::deserialize_field(d, "hidden_act")
    }
    pub fn init_range() -> f64 {
        0.02
    }
    pub fn one() -> f64 {
        1.0
    }
}

/// How rotary frequencies are derived from the base ones.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// LongRoPE (Phi-3's 128k models, Phi-4-mini): one factor per rotary frequency, the
    /// short ones while a forward's positions stay within
    /// `original_max_position_embeddings` and the long ones past it (chosen per forward,
    /// as `transformers`' `longrope_frequency_update`), cos and sin scaled by
    /// `attention_factor`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: f64,
        attention_factor: f64,
    },
    /// YaRN (Peng et al. 2023; Qwen3's and DeepSeek's long-context configs): each frequency
    /// between its original value (fast ones, past `beta_fast` rotations over the original
    /// length) and its interpolation by `factor` (slow ones, under `beta_slow`), along a
    /// linear ramp, and cos and sin scaled by `attention_factor` (transformers'
    /// `_compute_yarn_parameters`).
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        attention_factor: f64,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

impl Rope {
    /// The constant scale of cos and sin: YaRN's attention factor, else 1 (LongRoPE's
    /// comes with its long frequencies, [`long_inv_freq`]).
    pub fn attention_scale(&self) -> f64 {
        match &self.scaling {
            RopeScaling::Yarn {
                attention_factor, ..
            } => *attention_factor,
            _ => 1.0,
        }
    }
}

impl Config {
    pub fn num_kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// `rms_norm_eps`, or transformers' default for the architecture (1e-5 for Phi-3,
    /// Mixtral, OLMoE, gpt-oss and OLMo 2, 1e-6 for the others).
    pub fn norm_eps(&self) -> f64 {
        let default = match self.model_type {
            ModelType::Phi3
            | ModelType::Mixtral
            | ModelType::Olmoe
            | ModelType::GptOss
            | ModelType::Olmo2
            | ModelType::Olmo3 => 1e-5,
            _ => 1e-6,
        };
        self.rms_norm_eps.unwrap_or(default)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Qwen2 always has q/k/v biases, Qwen2-MoE unless `qkv_bias` is false; Llama has them
    /// when `attention_bias` is set.
    pub fn qkv_bias(&self) -> bool {
        match self.model_type {
            ModelType::Qwen2 => true,
            ModelType::Qwen2Moe => self.qkv_bias.unwrap_or(true),
            ModelType::Mistral | ModelType::Mixtral | ModelType::Phi3 => false,
            _ => self.attention_bias(),
        }
    }

    /// `attention_bias`, gpt-oss's default true.
    fn attention_bias(&self) -> bool {
        self.attention_bias
            .unwrap_or(self.model_type == ModelType::GptOss)
    }

    /// The output projection's bias: with `attention_bias` wherever q/k/v follow it too
    /// (Llama, Qwen3, Qwen3-MoE, OLMoE, OLMo 2, SmolLM3, gpt-oss); never in Qwen2, Qwen2-MoE,
    /// Mistral, Mixtral and Phi-3.
    pub fn o_bias(&self) -> bool {
        !matches!(
            self.model_type,
            ModelType::Qwen2
                | ModelType::Qwen2Moe
                | ModelType::Mistral
                | ModelType::Mixtral
                | ModelType::Phi3
        ) && self.attention_bias()
    }

    /// The dense MLP's biases: `mlp_bias` in Llama, SmolLM3 and Granite, none in the others.
    pub fn mlp_bias(&self) -> bool {
        matches!(
            self.model_type,
            ModelType::Llama | ModelType::Smollm3 | ModelType::Granite
        ) && self.mlp_bias
    }

    /// Granite's multipliers (1 elsewhere): embeddings, block outputs, and the logits'
    /// divisor.
    pub fn multipliers(&self) -> (f64, f64, f64) {
        if self.model_type != ModelType::Granite {
            return (1.0, 1.0, 1.0);
        }
        (
            self.embedding_multiplier.unwrap_or(1.0),
            self.residual_multiplier.unwrap_or(1.0),
            self.logits_scaling.unwrap_or(1.0),
        )
    }

    /// The attention scores' scale: Granite's `attention_multiplier`, else 1/√head_dim.
    pub fn attention_scale(&self) -> f64 {
        match (self.model_type, self.attention_multiplier) {
            (ModelType::Granite, Some(m)) => m,
            (ModelType::Granite, None) => 1.0,
            _ => (self.head_dim() as f64).powf(-0.5),
        }
    }

    /// `tie_word_embeddings`, or transformers' default (SmolLM3's true, the others' false).
    pub fn tied(&self) -> bool {
        self.tie_word_embeddings
            .unwrap_or(self.model_type == ModelType::Smollm3)
    }

    /// Which layers apply rotary embeddings: all, but SmolLM3's `no_rope_layers` (NoPE).
    pub fn rope_layers(&self) -> Vec<bool> {
        let n = self.num_hidden_layers;
        if self.model_type != ModelType::Smollm3 {
            return vec![true; n as usize];
        }
        match &self.no_rope_layers {
            Some(flags) => flags.iter().map(|&f| f != 0).collect(),
            None => {
                let interval = self.no_rope_layer_interval.unwrap_or(4).max(1);
                (0..n).map(|i| (i + 1) % interval != 0).collect()
            }
        }
    }

    /// OLMo 2 and 3 normalise each block's output (`post_attention_layernorm`,
    /// `post_feedforward_layernorm`) instead of its input.
    pub fn post_norms(&self) -> bool {
        matches!(self.model_type, ModelType::Olmo2 | ModelType::Olmo3)
    }

    /// gpt-oss's learned attention sinks: one logit per head beside the keys', which takes
    /// a share of the softmax and no value.
    pub fn attention_sinks(&self) -> bool {
        self.model_type == ModelType::GptOss
    }

    /// Which layers attend within [`Config::local_window`] (gpt-oss's `layer_types`); the
    /// others attend over everything (or Mistral's window, [`Config::sliding_window`]).
    pub fn sliding_layers(&self) -> Vec<bool> {
        let n = self.num_hidden_layers as usize;
        let derived: Vec<bool> = match self.model_type {
            ModelType::GptOss => (0..n).map(|i| i % 2 == 0).collect(),
            // OLMo 3: three sliding layers, then a full one.
            ModelType::Olmo3 => (0..n).map(|i| (i + 1) % 4 != 0).collect(),
            // SmolLM3 slides only with use_sliding_window, on its NoPE layers by default.
            ModelType::Smollm3 if self.use_sliding_window == Some(true) => {
                self.rope_layers().iter().map(|rope| !rope).collect()
            }
            _ => return vec![false; n],
        };
        match &self.layer_types {
            Some(types) => types.iter().map(|t| t == "sliding_attention").collect(),
            None => derived,
        }
    }

    /// gpt-oss's and SmolLM3's `layer_types` must name each layer's attention, and
    /// SmolLM3's `no_rope_layers` each layer's rotary.
    fn layer_types_problem(&self) -> Option<String> {
        let n = self.num_hidden_layers as usize;
        if let Some(flags) = self.no_rope_layers.as_ref() {
            if self.model_type == ModelType::Smollm3 && flags.len() != n {
                return Some(format!(
                    "no_rope_layers has {} entries for {n} layers",
                    flags.len()
                ));
            }
        }
        let types = self.layer_types.as_ref()?;
        if !matches!(
            self.model_type,
            ModelType::GptOss | ModelType::Smollm3 | ModelType::Olmo3
        ) {
            return None;
        }
        if types.len() != n {
            return Some(format!(
                "layer_types has {} entries for {n} layers",
                types.len()
            ));
        }
        types
            .iter()
            .find(|t| !matches!(t.as_str(), "sliding_attention" | "full_attention"))
            .map(|t| format!("layer_types: '{t}' is not sliding_attention or full_attention"))
    }

    /// The window of the sliding layers of [`Config::sliding_layers`], when some slide.
    pub fn local_window(&self) -> Option<i64> {
        let w = match self.model_type {
            ModelType::GptOss => self.sliding_window.or(Some(128)),
            ModelType::Smollm3 if self.use_sliding_window == Some(true) => self.sliding_window,
            ModelType::Olmo3 => self.sliding_window.or(Some(4096)),
            _ => None,
        };
        w.filter(|_| self.sliding_layers().contains(&true))
    }

    /// Phi-3 stores q, k and v as one `qkv_proj`, and gate and up as one `gate_up_proj`.
    pub fn fused(&self) -> bool {
        self.model_type == ModelType::Phi3
    }

    /// Dimensions of each head that rotary embeddings turn (the first ones).
    pub fn rotary_dim(&self) -> i64 {
        (self.head_dim() as f64 * self.partial_rotary_factor) as i64
    }

    /// Qwen3 normalises each head's queries and keys (`q_norm`, `k_norm`) before rotary;
    /// OLMoE all of them at once, right after their projections.
    pub fn qk_norm(&self) -> Option<QkNormKind> {
        match self.model_type {
            ModelType::Qwen3 | ModelType::Qwen3Moe => Some(QkNormKind::PerHead),
            ModelType::Olmoe | ModelType::Olmo2 | ModelType::Olmo3 => Some(QkNormKind::Whole),
            _ => None,
        }
    }

    /// The load-balancing loss's weight the config declares (transformers' defaults when
    /// absent: 0.001, OLMoE's 0.01).
    pub fn aux_loss_coef(&self) -> f64 {
        let default = match self.model_type {
            ModelType::Olmoe => 0.01,
            _ => 0.001,
        };
        self.router_aux_loss_coef.unwrap_or(default)
    }

    /// Mixtral's `router_jitter_noise` (the others' routers have none: transformers
    /// ignores the field there).
    pub fn router_jitter(&self) -> f64 {
        match self.model_type {
            ModelType::Mixtral => self.router_jitter_noise.unwrap_or(0.0),
            _ => 0.0,
        }
    }

    /// Whether the architecture puts sparse MoE blocks in its layers.
    pub fn is_moe(&self) -> bool {
        matches!(
            self.model_type,
            ModelType::Mixtral
                | ModelType::Qwen2Moe
                | ModelType::Qwen3Moe
                | ModelType::Olmoe
                | ModelType::GptOss
        )
    }

    /// Experts per MoE layer and experts per token (transformers' defaults when absent).
    pub fn experts(&self) -> (i64, i64) {
        match self.model_type {
            ModelType::Mixtral => (
                self.num_local_experts.or(self.num_experts).unwrap_or(8),
                self.num_experts_per_tok.unwrap_or(2),
            ),
            ModelType::Qwen2Moe => (
                self.num_experts.or(self.num_local_experts).unwrap_or(60),
                self.num_experts_per_tok.unwrap_or(4),
            ),
            ModelType::Olmoe => (
                self.num_experts.or(self.num_local_experts).unwrap_or(64),
                self.num_experts_per_tok.unwrap_or(8),
            ),
            ModelType::GptOss => (
                self.num_local_experts.or(self.num_experts).unwrap_or(128),
                self.num_experts_per_tok.unwrap_or(4),
            ),
            _ => (
                self.num_experts.or(self.num_local_experts).unwrap_or(128),
                self.num_experts_per_tok.unwrap_or(8),
            ),
        }
    }

    /// The MoE block of layer `i`, when it has one (Qwen3-MoE's `mlp_only_layers` and
    /// `decoder_sparse_step` leave some layers dense).
    pub fn moe_shape(&self, i: i64) -> Option<MoeShape> {
        let (experts, top_k) = self.experts();
        let sparse = match self.model_type {
            ModelType::Mixtral | ModelType::Olmoe | ModelType::GptOss => true,
            ModelType::Qwen2Moe | ModelType::Qwen3Moe => {
                let step = self.decoder_sparse_step.unwrap_or(1);
                !self.mlp_only_layers.as_deref().unwrap_or(&[]).contains(&i)
                    && experts > 0
                    && (i + 1) % step == 0
            }
            _ => false,
        };
        sparse.then(|| MoeShape {
            hidden: self.hidden_size,
            intermediate: match self.model_type {
                ModelType::Mixtral | ModelType::Olmoe | ModelType::GptOss => self.intermediate_size,
                ModelType::Qwen2Moe => self.moe_intermediate_size.unwrap_or(1408),
                _ => self.moe_intermediate_size.unwrap_or(768),
            },
            shared_intermediate: (self.model_type == ModelType::Qwen2Moe)
                .then(|| self.shared_expert_intermediate_size.unwrap_or(5632)),
            experts,
            top_k,
            // gpt-oss's softmax over the top k logits is the renormalised top k.
            norm_topk_prob: self.norm_topk_prob
                || matches!(self.model_type, ModelType::Mixtral | ModelType::GptOss),
            clamped_swiglu: (self.model_type == ModelType::GptOss).then(|| {
                (
                    self.swiglu_alpha.unwrap_or(1.702),
                    self.swiglu_limit.unwrap_or(7.0),
                )
            }),
            jitter: self.router_jitter(),
            std: self.initializer_range,
        })
    }

    /// The attention window, where the architecture uses one.
    pub fn sliding_window(&self) -> Option<i64> {
        match self.model_type {
            ModelType::Mistral | ModelType::Phi3 | ModelType::Mixtral => self.sliding_window,
            _ => None,
        }
    }

    /// Rotary parameters from either config layout.
    pub fn rope(&self) -> Result<Rope, String> {
        // OLMo 3 keeps one set per layer type (transformers 4's rope_scaling is the full
        // layers'); see Config::local_rope.
        let params = match self.model_type {
            ModelType::Olmo3 => self.layer_type_rope("full_attention"),
            _ => self.rope_parameters.as_ref(),
        }
        .or(self.rope_scaling.as_ref())
        .filter(|v| !v.is_null());
        // Phi-3's configs call LongRoPE "su" or "yarn" too (transformers renames them).
        let renamed = params
            .filter(|_| self.model_type == ModelType::Phi3)
            .and_then(|p| {
                let kind = p.get("rope_type").or_else(|| p.get("type"))?.as_str()?;
                matches!(kind, "su" | "yarn").then(|| {
                    let mut p = p.clone();
                    p["rope_type"] = Value::from("longrope");
                    p
                })
            });
        let lengths = RopeLengths {
            max: self.max_position_embeddings,
            original: self.original_max_position_embeddings,
        };
        // gpt-oss's default: YaRN by 32 over 4096 positions.
        let default = (self.model_type == ModelType::GptOss && params.is_none()).then(|| {
            serde_json::json!({"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                "beta_slow": 1.0, "truncate": false, "original_max_position_embeddings": 4096})
        });
        // transformers' `default_theta`s.
        let theta = match self.model_type {
            ModelType::GptOss => 150000.0,
            ModelType::Mixtral => 1e6,
            ModelType::Smollm3 => 2e6,
            ModelType::Olmo3 => 500000.0,
            _ => 10000.0,
        };
        let rope = parse_rope(
            renamed.as_ref().or(params).or(default.as_ref()),
            self.rope_theta.unwrap_or(theta),
            lengths,
        )?;
        if let RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        } = &rope.scaling
        {
            let half = (self.rotary_dim() / 2) as usize;
            if short_factor.len() != half || long_factor.len() != half {
                return Err(format!("rope longrope: short_factor and long_factor need {half} entries each (half the rotary dimension), not {} and {}", short_factor.len(), long_factor.len()));
            }
        }
        Ok(rope)
    }

    /// OLMo 3's rotary parameters under `rope_parameters[layer_type]` (transformers 5).
    fn layer_type_rope(&self, layer_type: &str) -> Option<&Value> {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get(layer_type))
            .filter(|v| !v.is_null())
    }

    /// The rotary parameters of OLMo 3's sliding layers, when it has some: their own set
    /// (transformers 4: the default rotation at `rope_theta`, no scaling).
    pub fn local_rope(&self) -> Result<Option<Rope>, String> {
        if self.model_type != ModelType::Olmo3 || self.local_window().is_none() {
            return Ok(None);
        }
        let theta = self.rope_theta.unwrap_or(500000.0);
        parse_rope(
            self.layer_type_rope("sliding_attention"),
            theta,
            RopeLengths::default(),
        )
        .map(Some)
    }

    /// Values this implementation cannot honour, named with `path`.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let (experts, top_k) = self.experts();
        // The Qwens' num_experts 0 makes every layer a dense MLP.
        let all_dense =
            experts == 0 && matches!(self.model_type, ModelType::Qwen2Moe | ModelType::Qwen3Moe);
        let problem = if self.hidden_act != Activation::Silu {
            Some(format!(
                "hidden_act '{}' is not supported (supported: silu)",
                self.hidden_act.name()
            ))
        } else if self.num_attention_heads % self.num_kv_heads() != 0 {
            Some(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            ))
        } else if matches!(
            self.model_type,
            ModelType::Qwen2 | ModelType::Qwen3 | ModelType::Qwen2Moe | ModelType::Qwen3Moe
        ) && self.use_sliding_window == Some(true)
        {
            Some(format!(
                "use_sliding_window true is not supported for {}",
                self.model_type.name()
            ))
        } else if self.is_moe() && (top_k < 1 || top_k > experts) && !all_dense {
            Some(format!(
                "num_experts_per_tok {top_k} must be between 1 and the {experts} experts"
            ))
        } else if self.decoder_sparse_step.is_some_and(|s| s < 1) {
            Some("decoder_sparse_step must be at least 1".to_string())
        } else if let Some(problem) = self.layer_types_problem() {
            Some(problem)
        } else {
            self.rope().err().or(self.local_rope().err())
        };
        match problem {
            Some(message) => Err(Error::config(path, message)),
            None => Ok(()),
        }
    }
}

/// `max_position_embeddings` and `original_max_position_embeddings` at the top of a
/// config, which LongRoPE and llama3 scaling read.
#[derive(Debug, Clone, Copy, Default)]
pub struct RopeLengths {
    pub max: Option<f64>,
    pub original: Option<f64>,
}

/// Rotary parameters from a `rope_parameters` (transformers 5) or `rope_scaling`
/// (transformers 4) object; `theta` when the object has no `rope_theta`.
pub fn parse_rope(
    params: Option<&Value>,
    theta: f64,
    lengths: RopeLengths,
) -> Result<Rope, String> {
    let get = |key: &str| params.and_then(|p| p.get(key)).and_then(Value::as_f64);
    let factors = |key: &str| -> Result<Vec<f64>, String> {
        params
            .and_then(|p| p.get(key))
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_f64).collect())
            .ok_or(format!(
                "rope longrope scaling needs '{key}', a list of numbers"
            ))
    };
    // transformers gives the top-level field priority (Phi-3 stores it there).
    let original = lengths.original.or(get("original_max_position_embeddings"));
    let theta = get("rope_theta").unwrap_or(theta);
    let kind = params
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let need = |key: &str| get(key).ok_or(format!("rope {kind} scaling needs '{key}'"));
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: original
                .ok_or("rope llama3 scaling needs 'original_max_position_embeddings'")?,
        },
        "longrope" => {
            let original = original
                .or(lengths.max)
                .ok_or("rope longrope scaling needs 'original_max_position_embeddings'")?;
            let factor = get("factor")
                .or(lengths.max.map(|m| m / original))
                .unwrap_or(1.0);
            let attention_factor = get("attention_factor").unwrap_or(if factor <= 1.0 {
                1.0
            } else {
                (1.0 + factor.ln() / original.ln()).sqrt()
            });
            RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            }
        }
        "yarn" => {
            let original = original
                .or(lengths.max)
                .ok_or("rope yarn scaling needs 'original_max_position_embeddings'")?;
            let factor = match get("factor") {
                Some(f) => f,
                None => lengths.max.ok_or("rope yarn scaling needs 'factor'")? / original,
            };
            let mscale = |scale: f64, m: f64| match scale <= 1.0 {
                true => 1.0,
                false => 0.1 * m * scale.ln() + 1.0,
            };
            let attention_factor = match (get("attention_factor"), get("mscale"), get("mscale_all_dim")) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    mscale(factor, m) / mscale(factor, all)
                }
                _ => mscale(factor, 1.0),
            };
            // transformers' `or`: a missing or zero beta takes the default.
            let nonzero = |key: &str, default: f64| get(key).filter(|b| *b != 0.0).unwrap_or(default);
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                attention_factor,
                beta_fast: nonzero("beta_fast", 32.0),
                beta_slow: nonzero("beta_slow", 1.0),
                truncate: params
                    .and_then(|p| p.get("truncate"))
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
            }
        }
        other => {
            return Err(format!(
            "rope_type '{other}' is not supported (supported: default, linear, llama3, longrope, yarn)"
        ))
        }
    };
    Ok(Rope { theta, scaling })
}

/// Inverse frequencies `[D/2]` (f32), as `transformers`' `ROPE_INIT_FUNCTIONS` compute them.
pub fn inv_freq(rope: &Rope, head_dim: i64) -> Vec<f64> {
    let base: Vec<f64> = (0..head_dim / 2)
        .map(|i| 1.0 / rope.theta.powf((2 * i) as f64 / head_dim as f64))
        .collect();
    match &rope.scaling {
        RopeScaling::None => base,
        // The short factors; [`long_inv_freq`] gives the long ones.
        RopeScaling::LongRope { short_factor, .. } => {
            base.iter().zip(short_factor).map(|(f, s)| f / s).collect()
        }
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: original,
            beta_fast,
            beta_slow,
            truncate,
            ..
        } => {
            let dim = head_dim as f64;
            // The dimension whose frequency turns `rotations` times over the original length.
            let correction = |rotations: f64| {
                dim * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()
                    / (2.0 * rope.theta.ln())
            };
            let (mut low, mut high) = (correction(*beta_fast), correction(*beta_slow));
            if *truncate {
                (low, high) = (low.floor(), high.ceil());
            }
            let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
            if low == high {
                high += 0.001;
            }
            base.into_iter()
                .enumerate()
                .map(|(i, f)| {
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    // The share of the original frequency: 1 below the ramp, 0 above it.
                    let extrapolation = 1.0 - ramp;
                    f / factor * (1.0 - extrapolation) + f * extrapolation
                })
                .collect()
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_len,
        } => {
            let (factor, low_freq_factor, high_freq_factor, old_len) =
                (*factor, *low_freq_factor, *high_freq_factor, *old_len);
            let low_wavelen = old_len / low_freq_factor;
            let high_wavelen = old_len / high_freq_factor;
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_len / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// LongRoPE's long-factor frequencies, its switch length and its cos/sin scale; `None`
/// for the other scalings (their scale is 1).
pub fn long_inv_freq(rope: &Rope, head_dim: i64) -> Option<(Vec<f64>, f64, f64)> {
    let RopeScaling::LongRope {
        long_factor,
        original_max_position_embeddings,
        attention_factor,
        ..
    } = &rope.scaling
    else {
        return None;
    };
    let plain = Rope {
        theta: rope.theta,
        scaling: RopeScaling::None,
    };
    let freqs = inv_freq(&plain, head_dim)
        .iter()
        .zip(long_factor)
        .map(|(f, l)| f / l)
        .collect();
    Some((freqs, *original_max_position_embeddings, *attention_factor))
}

/// cos and sin `[B, 1, T, D]` of the rotary embedding at `positions` for frequencies
/// `inv_freq`: in f32 like transformers, times `scale` (LongRoPE's attention factor), then
/// in `kind`.
pub(crate) fn cos_sin(
    positions: &Tensor,
    inv_freq: &Tensor,
    scale: f64,
    kind: Kind,
) -> (Tensor, Tensor) {
    let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq;
    let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
    let (cos, sin) = (emb.cos(), emb.sin());
    if scale == 1.0 {
        (cos.to_kind(kind), sin.to_kind(kind))
    } else {
        ((cos * scale).to_kind(kind), (sin * scale).to_kind(kind))
    }
}

/// `LlamaRMSNorm`: normalise in f32, scale in the input dtype (gpt-oss's, whose weights
/// transformers keeps in f32, scales in f32 and casts after).
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
    scale_in_f32: bool,
}

impl RmsNorm {
    /// A norm of `dim` features as `cfg`'s architecture computes it.
    fn new(p: nn::Path, dim: i64, cfg: &Config, opts: &ModelOptions) -> Self {
        RmsNorm {
            weight: param(&p, "weight", &[dim], Init::Const(1.0), opts),
            eps: cfg.norm_eps(),
            scale_in_f32: matches!(
                cfg.model_type,
                ModelType::GptOss | ModelType::Olmo2 | ModelType::Olmo3
            ),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.square().mean_dim([-1].as_slice(), true, Kind::Float);
        let normed = xf * (var + self.eps).rsqrt();
        if self.scale_in_f32 {
            (self.weight.to_kind(Kind::Float) * normed).to_kind(kind)
        } else {
            &self.weight * normed.to_kind(kind)
        }
    }
}

pub(crate) fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[x2.neg(), x1], -1)
}

/// The attention's input projections: separate, or Phi-3's one `qkv_proj`. (One per
/// layer: the separate variant's size does not matter.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Qkv {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// The MLP's gate and up projections: separate, or Phi-3's one `gate_up_proj` (gate first).
#[derive(Debug)]
enum GateUp {
    Separate { gate: Linear, up: Linear },
    Fused(Linear),
}

/// A SwiGLU MLP, `down(silu(gate(x)) · up(x))`: a dense layer's, and each MoE expert's.
#[derive(Debug)]
pub(crate) struct SwiGlu {
    gate_up: GateUp,
    down: Linear,
}

impl SwiGlu {
    /// Separate projections `p/{gate}`, `p/{up}`, `p/{down}` (the names as stored) of
    /// `h → i → h`.
    pub(crate) fn separate(
        p: &nn::Path,
        [gate, up, down]: [&str; 3],
        (h, i): (i64, i64),
        (bias, std): (bool, f64),
        opts: &ModelOptions,
    ) -> Self {
        let linear = |name: &str, dims| Linear::new(p / name, dims, bias, std, opts);
        SwiGlu {
            gate_up: GateUp::Separate {
                gate: linear(gate, (h, i)),
                up: linear(up, (h, i)),
            },
            down: linear(down, (i, h)),
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate, up } => (gate.forward(x), up.forward(x)),
            GateUp::Fused(gate_up) => {
                let both = gate_up.forward(x).chunk(2, -1);
                (both[0].shallow_clone(), both[1].shallow_clone())
            }
        };
        self.down.forward(&(gate.silu() * up))
    }
}

/// Where a layer normalises its queries and keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNormKind {
    /// Each head over `head_dim`, after the split into heads (Qwen3).
    PerHead,
    /// All heads at once, right after the projection (OLMoE).
    Whole,
}

/// Where a layer normalises: each block's input (the Llama family), or each block's
/// output before the residual sum (OLMo 2).
#[derive(Debug)]
enum Norms {
    Pre {
        input: RmsNorm,
        post_attention: RmsNorm,
    },
    Post {
        attention: RmsNorm,
        feedforward: RmsNorm,
    },
}

/// The feed-forward part of a layer: an MLP, or a sparse MoE block. (One per layer: the
/// variants' sizes do not matter.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Mlp {
    Dense(SwiGlu),
    Sparse(SparseMoe),
}

#[derive(Debug)]
struct Layer {
    norms: Norms,
    qkv: Qkv,
    o_proj: Linear,
    /// The norms of queries and keys: Qwen3's per head (over `head_dim`), OLMoE's over
    /// all of them.
    qk_norm: Option<(QkNormKind, RmsNorm, RmsNorm)>,
    /// OLMoE's `clip_qkv`.
    clip_qkv: Option<f64>,
    /// gpt-oss's attention sinks (`[heads]`, `self_attn.sinks`).
    sinks: Option<Tensor>,
    /// Attends within the local window ([`Masking::for_layer`]).
    sliding: bool,
    /// Applies rotary embeddings (SmolLM3's NoPE layers do not).
    rope: bool,
    /// The attention scores' scale ([`Config::attention_scale`]).
    attention_scale: f64,
    /// Granite's `residual_multiplier`: each block's output scaled before the residual
    /// sum.
    residual: f64,
    mlp: Mlp,
    n_heads: i64,
    n_kv_heads: i64,
    head_dim: i64,
    rotary_dim: i64,
}

impl Layer {
    fn new(p: nn::Path, index: i64, cfg: &Config, opts: &ModelOptions) -> Self {
        let (h, d, std) = (cfg.hidden_size, cfg.head_dim(), cfg.initializer_range);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let attn = &p / "self_attn";
        let mlp = &p / "mlp";
        let i = cfg.intermediate_size;
        let linear = |path: nn::Path, dims, bias| Linear::new(path, dims, bias, std, opts);
        let norm = |path: nn::Path| RmsNorm::new(path, h, cfg, opts);
        let sink_init = Init::Randn {
            mean: 0.0,
            stdev: std,
        };
        Layer {
            norms: if cfg.post_norms() {
                Norms::Post {
                    attention: norm(&p / "post_attention_layernorm"),
                    feedforward: norm(&p / "post_feedforward_layernorm"),
                }
            } else {
                Norms::Pre {
                    input: norm(&p / "input_layernorm"),
                    post_attention: norm(&p / "post_attention_layernorm"),
                }
            },
            qkv: if cfg.fused() {
                Qkv::Fused(linear(&attn / "qkv_proj", (h, (nh + 2 * nkv) * d), false))
            } else {
                Qkv::Separate {
                    q: linear(&attn / "q_proj", (h, nh * d), cfg.qkv_bias()),
                    k: linear(&attn / "k_proj", (h, nkv * d), cfg.qkv_bias()),
                    v: linear(&attn / "v_proj", (h, nkv * d), cfg.qkv_bias()),
                }
            },
            o_proj: linear(&attn / "o_proj", (nh * d, h), cfg.o_bias()),
            qk_norm: cfg.qk_norm().map(|kind| {
                let norm = |path: nn::Path, dim| RmsNorm::new(path, dim, cfg, opts);
                let (q_dim, k_dim) = match kind {
                    QkNormKind::PerHead => (d, d),
                    QkNormKind::Whole => (nh * d, nkv * d),
                };
                (
                    kind,
                    norm(&attn / "q_norm", q_dim),
                    norm(&attn / "k_norm", k_dim),
                )
            }),
            clip_qkv: cfg.clip_qkv,
            sinks: cfg
                .attention_sinks()
                .then(|| param(&attn, "sinks", &[nh], sink_init, opts)),
            sliding: cfg.sliding_layers()[index as usize],
            rope: cfg.rope_layers()[index as usize],
            attention_scale: cfg.attention_scale(),
            residual: cfg.multipliers().1,
            mlp: match cfg.moe_shape(index) {
                Some(shape) if cfg.model_type == ModelType::Mixtral => Mlp::Sparse(SparseMoe::new(
                    &p / "block_sparse_moe",
                    cfg.model_type,
                    shape,
                    opts,
                )),
                Some(shape) => Mlp::Sparse(SparseMoe::new(mlp, cfg.model_type, shape, opts)),
                None if cfg.fused() => Mlp::Dense(SwiGlu {
                    gate_up: GateUp::Fused(linear(&mlp / "gate_up_proj", (h, 2 * i), false)),
                    down: linear(&mlp / "down_proj", (i, h), cfg.mlp_bias()),
                }),
                None => Mlp::Dense(SwiGlu::separate(
                    &mlp,
                    ["gate_proj", "up_proj", "down_proj"],
                    (h, i),
                    (cfg.mlp_bias(), std),
                    opts,
                )),
            },
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: d,
            rotary_dim: cfg.rotary_dim(),
        }
    }

    /// The layer's output; a MoE layer's router logits go to `router` when given.
    fn forward(
        &self,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        masking: &Masking,
        cache: Option<(&mut KvCache, usize)>,
        router: Option<&mut Vec<Tensor>>,
    ) -> Tensor {
        let (b, t, _) = x.size3().unwrap();
        let normed = match &self.norms {
            Norms::Pre { input, .. } => input.forward(x),
            Norms::Post { .. } => x.shallow_clone(),
        };
        let heads = |y: Tensor, n: i64| y.view([b, t, n, self.head_dim]).transpose(1, 2);
        // Partial rotary: the first `rotary_dim` dimensions turn, the rest pass.
        let (rd, d) = (self.rotary_dim, self.head_dim);
        let rope = |y: Tensor| {
            let turn = |r: &Tensor| r * cos + rotate_half(r) * sin;
            if rd == d {
                turn(&y)
            } else {
                Tensor::cat(&[turn(&y.narrow(-1, 0, rd)), y.narrow(-1, rd, d - rd)], -1)
            }
        };
        let (q, k, v) = match &self.qkv {
            Qkv::Separate { q, k, v } => {
                (q.forward(&normed), k.forward(&normed), v.forward(&normed))
            }
            Qkv::Fused(qkv) => {
                let sizes = [self.n_heads * d, self.n_kv_heads * d, self.n_kv_heads * d];
                let mut parts = qkv.forward(&normed).split_with_sizes(sizes, -1).into_iter();
                let mut next = || parts.next().expect("three parts");
                (next(), next(), next())
            }
        };
        let (mut q, mut k, mut v) = (q, k, v);
        if let Some((QkNormKind::Whole, q_norm, k_norm)) = &self.qk_norm {
            (q, k) = (q_norm.forward(&q), k_norm.forward(&k));
        }
        if let Some(c) = self.clip_qkv {
            (q, k, v) = (q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c));
        }
        let (mut q, mut k) = (heads(q, self.n_heads), heads(k, self.n_kv_heads));
        if let Some((QkNormKind::PerHead, q_norm, k_norm)) = &self.qk_norm {
            (q, k) = (q_norm.forward(&q), k_norm.forward(&k));
        }
        let (q, k) = match self.rope {
            true => (rope(q), rope(k)),
            false => (q, k),
        };
        let v = heads(v, self.n_kv_heads);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let masking = masking.for_layer(self.sliding);
        let scale = self.attention_scale;
        let attn = match &self.sinks {
            Some(sinks) => masking.attend_written_out(&q, &k, &v, scale, None, Some(sinks)),
            None => masking.attend(&q, &k, &v, Some(scale)),
        };
        let attn = attn
            .transpose(1, 2)
            .reshape([b, t, self.n_heads * self.head_dim]);
        let residual = |y: Tensor| {
            if self.residual == 1.0 {
                y
            } else {
                y * self.residual
            }
        };
        let attn = residual(self.o_proj.forward(&attn));
        let (x, normed) = match &self.norms {
            Norms::Pre { post_attention, .. } => {
                let x = x + attn;
                let normed = post_attention.forward(&x);
                (x, normed)
            }
            Norms::Post { attention, .. } => {
                let x = x + attention.forward(&attn);
                (x.shallow_clone(), x)
            }
        };
        let y = match &self.mlp {
            Mlp::Dense(mlp) => mlp.forward(&normed),
            Mlp::Sparse(moe) => {
                let (y, logits) = moe.forward(&normed, super::grad_enabled());
                if let Some(router) = router {
                    router.push(logits);
                }
                y
            }
        };
        match &self.norms {
            Norms::Pre { .. } => x + residual(y),
            Norms::Post { feedforward, .. } => x + feedforward.forward(&y),
        }
    }
}

/// cos/sin `[B, 1, T, D]` of one forward: every layer's, and the sliding layers' own where
/// they rotate by another set (OLMo 3, Gemma 3).
pub(crate) struct Rotary {
    pub global: (Tensor, Tensor),
    pub local: Option<(Tensor, Tensor)>,
}

impl Rotary {
    pub fn for_layer(&self, sliding: bool) -> (&Tensor, &Tensor) {
        let (cos, sin) = match (&self.local, sliding) {
            (Some(local), true) => local,
            _ => &self.global,
        };
        (cos, sin)
    }
}

/// `LlamaModel`: embeddings, decoder layers and the final norm, under `model.`.
#[derive(Debug)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    inv_freq: Tensor,
    /// LongRoPE: the long-factor frequencies, the length past which a forward uses them,
    /// and the cos/sin scale.
    long_rope: Option<(Tensor, f64, f64)>,
    /// The cos/sin scale of the other scalings (YaRN's attention factor; else 1).
    rope_scale: f64,
    sliding_window: Option<i64>,
    /// gpt-oss: the window of its sliding layers.
    local_window: Option<i64>,
    /// OLMo 3: its sliding layers' own rotary frequencies and cos/sin scale.
    local_rope: Option<(Tensor, f64)>,
    /// Granite's `embedding_multiplier` (1 elsewhere), applied to every input embedding,
    /// prompt tuning's virtual tokens too, as `transformers` scales `inputs_embeds`.
    embedding_multiplier: f64,
}

impl Llama {
    /// `cfg` must have passed [`Config::validate`].
    pub fn new(p: nn::Path, cfg: &Config, opts: &ModelOptions) -> Self {
        let rope = cfg.rope().expect("validated config");
        let f32s = |v: Vec<f64>| {
            let v: Vec<f32> = v.into_iter().map(|f| f as f32).collect();
            Tensor::from_slice(&v).to_device(p.device())
        };
        let long_rope = long_inv_freq(&rope, cfg.rotary_dim())
            .map(|(freqs, original, scale)| (f32s(freqs), original, scale));
        Llama {
            embed_tokens: Embedding::new(
                &p / "embed_tokens",
                cfg.vocab_size,
                cfg.hidden_size,
                cfg.initializer_range,
                opts,
            ),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| Layer::new(&p / "layers" / i, i, cfg, opts))
                .collect(),
            norm: RmsNorm::new(&p / "norm", cfg.hidden_size, cfg, opts),
            inv_freq: f32s(inv_freq(&rope, cfg.rotary_dim())),
            long_rope,
            rope_scale: rope.attention_scale(),
            sliding_window: cfg.sliding_window(),
            local_window: cfg.local_window(),
            embedding_multiplier: cfg.multipliers().0,
            local_rope: cfg.local_rope().expect("validated config").map(|rope| {
                let scale = rope.attention_scale();
                (f32s(inv_freq(&rope, cfg.rotary_dim())), scale)
            }),
        }
    }

    pub fn embedding_weight(&self) -> &Tensor {
        &self.embed_tokens.weight
    }

    /// Token embeddings `[B, T, H]` of `ids`.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        self.embed_tokens.forward(ids)
    }

    /// [`Self::embed`] with another embedding weight (a `modules_to_save` copy).
    pub fn embed_with(&self, weight: &Tensor, ids: &Tensor) -> Tensor {
        Tensor::embedding(weight, ids, -1, false, false)
    }

    /// Final hidden states `[B, T, H]` of token embeddings `embeds` at `positions`; the
    /// MoE layers' router logits `[B·T, E]` go to `router` when given.
    pub fn forward(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        masking: &Masking,
        mut cache: Option<&mut KvCache>,
        mut router: Option<&mut Vec<Tensor>>,
    ) -> Tensor {
        let mut x = self.scaled(embeds);
        let rotary = self.rotary(positions, x.kind());
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            x = layer.forward(
                &x,
                rotary.for_layer(layer.sliding),
                masking,
                layer_cache,
                router.as_deref_mut(),
            );
        }
        self.norm.forward(&x)
    }

    /// The input embeddings times Granite's `embedding_multiplier`.
    fn scaled(&self, embeds: &Tensor) -> Tensor {
        if self.embedding_multiplier == 1.0 {
            embeds.shallow_clone()
        } else {
            embeds * self.embedding_multiplier
        }
    }

    /// cos/sin of the rotary embedding, in f32 like transformers, then in `kind`:
    /// `[B, 1, T, D]` each.
    /// LongRoPE picks its short or long frequencies for the whole forward from the
    /// largest position in it, on the device (no host sync; a cached prompt keeps the
    /// rotation it was cached with, as in `transformers`).
    fn rotary(&self, positions: &Tensor, kind: Kind) -> Rotary {
        let (inv_freq, scale) = match &self.long_rope {
            Some((long, original, scale)) => {
                let past = (positions.max() + 1).to_kind(Kind::Float).gt(*original);
                (long.where_self(&past, &self.inv_freq), *scale)
            }
            None => (self.inv_freq.shallow_clone(), self.rope_scale),
        };
        Rotary {
            global: cos_sin(positions, &inv_freq, scale, kind),
            local: self
                .local_rope
                .as_ref()
                .map(|(freq, scale)| cos_sin(positions, freq, *scale, kind)),
        }
    }

    /// [`Llama::forward`] keeping only each layer's input (activation recomputation);
    /// [`Llama::backward_saved`] is its backward. With `router` (the `[B·T]` mask of real
    /// tokens) the MoE layers' router logits are kept too, for the load-balancing loss.
    pub(crate) fn forward_saving(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        masking: Masking,
        router: Option<&Tensor>,
    ) -> (Tensor, Saved) {
        let rotary = self.rotary(positions, embeds.kind());
        let first_input = self.scaled(embeds);
        let logits = std::cell::RefCell::new(vec![]);
        let mut saved = run_blocks(
            first_input,
            positions,
            masking,
            self.layers.len(),
            |i, x, m| {
                let mut sink = logits.borrow_mut();
                let sink = router.is_some().then_some(&mut *sink);
                let layer = &self.layers[i];
                layer.forward(x, rotary.for_layer(layer.sliding), m, None, sink)
            },
        );
        let logits = logits.into_inner();
        if let (Some(real), false) = (router, logits.is_empty()) {
            saved.router = Some(RouterSaved {
                logits,
                real: real.shallow_clone(),
                coefficients: None,
            });
        }
        (self.norm.forward(&saved.output), saved)
    }

    /// The backward of [`Llama::forward_saving`]: each MoE block recomputed adds its share
    /// of the weighed load-balancing loss, Σ_tokens Σ_e c_e·p_e·m, to its backward.
    pub(crate) fn backward_saved(&self, mut saved: Saved) {
        let rotary = self.rotary(&saved.positions, saved.first_input.kind());
        let balance = saved
            .router
            .take()
            .and_then(|r| Some((r.coefficients?, r.real)));
        backward_blocks_with(saved, |i, x, masking| {
            let mut logits = vec![];
            let router = balance.is_some().then_some(&mut logits);
            let layer = &self.layers[i];
            let y = layer.forward(x, rotary.for_layer(layer.sliding), masking, None, router);
            let term = match (&balance, logits.pop()) {
                (Some((c, real)), Some(logits)) => {
                    Some(super::moe::load_balancing_share(&logits, real, c))
                }
                _ => None,
            };
            (y, term)
        });
    }

    pub fn sliding_window(&self) -> Option<i64> {
        self.sliding_window
    }

    /// The window of the sliding layers when only some slide (gpt-oss).
    pub fn local_window(&self) -> Option<i64> {
        self.local_window
    }

    /// LongRoPE's switch length (`original_max_position_embeddings`).
    pub fn long_rope_length(&self) -> Option<i64> {
        self.long_rope
            .as_ref()
            .map(|(_, original, _)| *original as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: serde_json::Value) -> Config {
        let mut v = serde_json::json!({
            "model_type": "llama", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    /// Fields a config leaves out take transformers' default for its architecture.
    #[test]
    fn absent_fields_take_the_architectures_defaults() {
        let llama = config(serde_json::json!({}));
        assert_eq!(llama.norm_eps(), 1e-6);
        assert_eq!(llama.rope().unwrap().theta, 10000.0);
        assert!(!llama.qkv_bias() && !llama.o_bias());
        let mixtral = config(serde_json::json!({"model_type": "mixtral"}));
        assert_eq!(mixtral.norm_eps(), 1e-5);
        assert_eq!(mixtral.rope().unwrap().theta, 1e6);
        let oss = config(serde_json::json!({"model_type": "gpt_oss", "num_hidden_layers": 3}));
        assert_eq!(oss.norm_eps(), 1e-5);
        assert!(oss.qkv_bias() && oss.o_bias() && oss.attention_sinks());
        assert_eq!(oss.experts(), (128, 4));
        assert_eq!(oss.sliding_layers(), [true, false, true]);
        assert_eq!(oss.local_window(), Some(128));
        let rope = oss.rope().unwrap();
        assert_eq!(rope.theta, 150000.0);
        assert!(matches!(rope.scaling, RopeScaling::Yarn { factor, .. } if factor == 32.0));
        let full = config(serde_json::json!({"model_type": "gpt_oss",
            "layer_types": ["full_attention"], "attention_bias": false}));
        assert_eq!(full.local_window(), None);
        assert!(!full.qkv_bias() && !full.o_bias());
        let bad = config(serde_json::json!({"model_type": "gpt_oss",
            "layer_types": ["global"]}));
        let e = bad
            .validate(Path::new("m/config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("'global' is not sliding_attention"), "{e}");
        let short = config(
            serde_json::json!({"model_type": "gpt_oss", "num_hidden_layers": 2,
            "layer_types": ["full_attention"]}),
        );
        let e = short
            .validate(Path::new("m/config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer_types has 1 entries for 2 layers"), "{e}");
        let smol = config(serde_json::json!({"model_type": "smollm3", "num_hidden_layers": 8}));
        assert!(smol.tied());
        assert_eq!(smol.rope().unwrap().theta, 2e6);
        let nope: Vec<usize> = (0..8).filter(|&i| !smol.rope_layers()[i]).collect();
        assert_eq!(nope, [3, 7]);
        assert_eq!(smol.local_window(), None);
        let sliding = config(
            serde_json::json!({"model_type": "smollm3", "num_hidden_layers": 4,
            "use_sliding_window": true, "sliding_window": 16}),
        );
        assert_eq!(sliding.sliding_layers(), [false, false, false, true]);
        assert_eq!(sliding.local_window(), Some(16));
        let flags = config(
            serde_json::json!({"model_type": "smollm3", "num_hidden_layers": 2,
            "no_rope_layers": [1]}),
        );
        let e = flags
            .validate(Path::new("m/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no_rope_layers has 1 entries for 2 layers"),
            "{e}"
        );
        let olmo = config(serde_json::json!({"model_type": "olmo2", "attention_bias": true}));
        assert_eq!(olmo.norm_eps(), 1e-5);
        assert!(olmo.post_norms() && olmo.qkv_bias() && olmo.o_bias() && !olmo.tied());
        // Mistral's projections have no biases whatever the config says; Llama's MLP has.
        let mistral = config(
            serde_json::json!({"model_type": "mistral", "attention_bias": true,
            "mlp_bias": true}),
        );
        assert!(!mistral.qkv_bias() && !mistral.o_bias() && !mistral.mlp_bias());
        let biased = config(serde_json::json!({"attention_bias": true, "mlp_bias": true}));
        assert!(biased.qkv_bias() && biased.o_bias() && biased.mlp_bias());
        // OLMo 3, transformers 4's layout: rope_scaling is the full layers', the sliding
        // ones rotate by default at rope_theta; three sliding layers, then a full one.
        let olmo3 = config(
            serde_json::json!({"model_type": "olmo3", "num_hidden_layers": 4,
            "rope_theta": 1e4, "rope_scaling": {"rope_type": "yarn", "factor": 8.0,
            "original_max_position_embeddings": 8192}}),
        );
        assert_eq!(olmo3.sliding_layers(), [true, true, true, false]);
        assert_eq!(olmo3.local_window(), Some(4096));
        assert!(matches!(
            olmo3.rope().unwrap().scaling,
            RopeScaling::Yarn { .. }
        ));
        let local = olmo3.local_rope().unwrap().unwrap();
        assert_eq!((local.theta, local.scaling), (1e4, RopeScaling::None));
        let plain = config(serde_json::json!({"model_type": "olmo3"}));
        assert_eq!(plain.rope().unwrap().theta, 500000.0);
    }

    #[test]
    fn rope_from_both_config_layouts() {
        let v4 = config(serde_json::json!({"rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}));
        let v5 = config(
            serde_json::json!({"rope_parameters": {"rope_theta": 500000.0,
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
        );
        assert_eq!(v4.rope().unwrap(), v5.rope().unwrap());
        assert_eq!(v4.rope().unwrap().theta, 500000.0);
        let plain = config(serde_json::json!({}));
        assert_eq!(plain.rope().unwrap().scaling, RopeScaling::None);
        let bad = config(serde_json::json!({"rope_parameters": {"rope_type": "dynamic"}}));
        let e = bad.validate(Path::new("c.json")).unwrap_err().to_string();
        assert!(e.starts_with("c.json: rope_type 'dynamic'"), "{e}");
        let bad = config(serde_json::json!({"rope_parameters": {"rope_type": "yarn"}}));
        let e = bad.validate(Path::new("c.json")).unwrap_err().to_string();
        assert!(
            e.contains("rope yarn scaling needs 'original_max_position_embeddings'"),
            "{e}"
        );
    }

    #[test]
    fn llama3_frequencies_keep_high_and_scale_low() {
        let rope = Rope {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        let plain = inv_freq(
            &Rope {
                theta: 500000.0,
                scaling: RopeScaling::None,
            },
            128,
        );
        let scaled = inv_freq(&rope, 128);
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-15);
    }
}
