//! GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners").
//!
//! Mirrors `transformers/models/gpt2/modeling_gpt2.py`: learned positions, pre-LayerNorm
//! blocks, fused `c_attn`, `gelu_new`. Parameters keep Hugging Face's names *and* layouts:
//! GPT-2's `Conv1D` stores weights as `[in, out]`, so `Conv1D::forward` is `x·W + b` and
//! no checkpoint tensor is ever transposed.

use std::path::Path;

use serde::Deserialize;
use tch::nn;
use tch::Tensor;

use super::attention::{KvCache, Masking};
use super::layers::{Activation, Conv1D, Embedding, LayerNorm};
use super::options::ModelOptions;
use super::recompute::{backward_blocks, run_blocks, Saved};
use crate::error::{Error, Result};

/// GPT-2's `config.json`, with Hugging Face's field names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: i64,
    #[serde(default = "defaults::n_positions")]
    pub n_positions: i64,
    #[serde(default = "defaults::n_embd")]
    pub n_embd: i64,
    #[serde(default = "defaults::n_layer")]
    pub n_layer: i64,
    #[serde(default = "defaults::n_head")]
    pub n_head: i64,
    #[serde(default)]
    pub n_inner: Option<i64>,
    #[serde(
        default = "defaults::activation",
        deserialize_with = "defaults::activation_field"
    )]
    pub activation_function: Activation,
    #[serde(default = "defaults::eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "defaults::init_range")]
    pub initializer_range: f64,
    #[serde(default = "defaults::yes")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "defaults::yes")]
    pub tie_word_embeddings: bool,
}

mod defaults {
    pub fn vocab_size() -> i64 {
        50257
    }
    pub fn n_positions() -> i64 {
        1024
    }
    pub fn n_embd() -> i64 {
        768
    }
    pub fn n_layer() -> i64 {
        12
    }
    pub fn n_head() -> i64 {
        12
    }
    pub fn activation() -> super::Activation {
        super::Activation::GeluNew
    }
    pub fn activation_field<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<super::Activation, D::Error> {
        super::Activation::deserialize_field(d, "activation_function")
    }
    pub fn eps() -> f64 {
        1e-5
    }
    pub fn init_range() -> f64 {
        0.02
    }
    pub fn yes() -> bool {
        true
    }
}

impl Config {
    /// Values this implementation cannot honour, named with `path`.
    pub fn validate(&self, path: &Path) -> Result<()> {
        if self.n_embd % self.n_head != 0 {
            return Err(Error::config(
                path,
                format!(
                    "n_embd {} is not a multiple of n_head {}",
                    self.n_embd, self.n_head
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Block {
    ln_1: LayerNorm,
    c_attn: Conv1D,
    attn_proj: Conv1D,
    ln_2: LayerNorm,
    c_fc: Conv1D,
    mlp_proj: Conv1D,
    activation: Activation,
    n_head: i64,
    scale: Option<f64>,
}

impl Block {
    fn new(p: nn::Path, cfg: &Config, layer: i64, opts: &ModelOptions) -> Self {
        let h = cfg.n_embd;
        let inner = cfg.n_inner.unwrap_or(4 * h);
        let std = cfg.initializer_range;
        // GPT-2 scales the residual projections by 1/sqrt(2·n_layer) at initialisation.
        let proj_std = std / (2.0 * cfg.n_layer as f64).sqrt();
        let head_dim = (h / cfg.n_head) as f64;
        let mut scale = if cfg.scale_attn_weights {
            1.0 / head_dim.sqrt()
        } else {
            1.0
        };
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        Block {
            ln_1: LayerNorm::new(&p / "ln_1", h, cfg.layer_norm_epsilon, opts),
            c_attn: Conv1D::new(&p / "attn" / "c_attn", (h, 3 * h), std, opts),
            attn_proj: Conv1D::new(&p / "attn" / "c_proj", (h, h), proj_std, opts),
            ln_2: LayerNorm::new(&p / "ln_2", h, cfg.layer_norm_epsilon, opts),
            c_fc: Conv1D::new(&p / "mlp" / "c_fc", (h, inner), std, opts),
            mlp_proj: Conv1D::new(&p / "mlp" / "c_proj", (inner, h), proj_std, opts),
            activation: cfg.activation_function,
            n_head: cfg.n_head,
            scale: Some(scale),
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        masking: &Masking,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor {
        let (b, t, h) = x.size3().unwrap();
        let qkv = self.c_attn.forward(&self.ln_1.forward(x));
        let heads = |t_: Tensor| {
            t_.view([b, t, self.n_head, h / self.n_head])
                .transpose(1, 2)
        };
        let mut parts = qkv.split(h, -1).into_iter();
        let q = heads(parts.next().unwrap());
        let k = heads(parts.next().unwrap());
        let v = heads(parts.next().unwrap());
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let attn = masking
            .attend(&q, &k, &v, self.scale)
            .transpose(1, 2)
            .reshape([b, t, h]);
        let x = x + self.attn_proj.forward(&attn);
        let mlp = self.mlp_proj.forward(
            &self
                .activation
                .forward(&self.c_fc.forward(&self.ln_2.forward(&x))),
        );
        x + mlp
    }
}

/// `GPT2Model`: embeddings, blocks and the final LayerNorm, under `transformer.`.
#[derive(Debug)]
pub struct Gpt2 {
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
}

impl Gpt2 {
    pub fn new(p: nn::Path, cfg: &Config, opts: &ModelOptions) -> Self {
        let std = cfg.initializer_range;
        Gpt2 {
            wte: Embedding::new(&p / "wte", cfg.vocab_size, cfg.n_embd, std, opts),
            wpe: Embedding::new(&p / "wpe", cfg.n_positions, cfg.n_embd, std, opts),
            blocks: (0..cfg.n_layer)
                .map(|i| Block::new(&p / "h" / i, cfg, i, opts))
                .collect(),
            ln_f: LayerNorm::new(&p / "ln_f", cfg.n_embd, cfg.layer_norm_epsilon, opts),
        }
    }

    pub fn embedding_weight(&self) -> &Tensor {
        &self.wte.weight
    }

    /// Token embeddings `[B, T, H]` of `ids`.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        self.wte.forward(ids)
    }

    /// [`Self::embed`] with another embedding weight (a `modules_to_save` copy).
    pub fn embed_with(&self, weight: &Tensor, ids: &Tensor) -> Tensor {
        Tensor::embedding(weight, ids, -1, false, false)
    }

    /// Final hidden states `[B, T, H]` of token embeddings `embeds` at `positions`.
    pub fn forward(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        masking: &Masking,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor {
        let mut x = embeds + self.wpe.forward(positions);
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            x = block.forward(&x, masking, layer_cache);
        }
        self.ln_f.forward(&x)
    }

    /// [`Gpt2::forward`] keeping only each block's input (activation recomputation);
    /// [`Gpt2::backward_saved`] is its backward.
    pub(crate) fn forward_saving(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        masking: Masking,
    ) -> (Tensor, Saved) {
        let first_input = embeds + self.wpe.forward(positions);
        let saved = run_blocks(
            first_input,
            positions,
            masking,
            self.blocks.len(),
            |i, x, m| self.blocks[i].forward(x, m, None),
        );
        (self.ln_f.forward(&saved.output), saved)
    }

    pub(crate) fn backward_saved(&self, saved: Saved) {
        backward_blocks(saved, |i, x, masking| {
            self.blocks[i].forward(x, masking, None)
        });
    }
}
