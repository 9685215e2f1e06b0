//! Gemma, Gemma 2 and Gemma 3 (text): `gemma`, `gemma2` and `gemma3_text`.
//!
//! Mirrors `transformers/models/gemma{,2}/modeling_gemma{,2}.py` and
//! `gemma3/modeling_gemma3.py`:
//! RMSNorm scaling by `1 + weight` (in f32, then cast), embeddings scaled by √hidden (in
//! the weights' dtype), GeGLU (`gelu_pytorch_tanh`), norms before and after both the
//! attention and the feed-forward block, queries scaled by `query_pre_attn_scalar^-½`,
//! sliding-window and global layers (`layer_types`, or transformers' rule: Gemma 2's even
//! layers slide, Gemma 3's every `sliding_window_pattern`-th layer is global), Gemma 2's
//! attention-logit and final-logit soft-capping, and Gemma 3's per-head q/k norms and
//! separate rotary bases for local and global layers. Gemma 3 has no attention-logit
//! soft-capping: `transformers` ignores `attn_logit_softcapping` there, and so do we.

use std::path::Path;

use serde::{Deserialize, Deserializer};
use serde_json::Value;
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use super::attention::{KvCache, Masking};
use super::layers::{param, Activation, Embedding, Linear};
use super::llama::{
    cos_sin, inv_freq, parse_rope, rotate_half, Rope, RopeLengths, RopeScaling, Rotary,
};
use super::options::ModelOptions;
use super::recompute::{backward_blocks, run_blocks, Saved};
use super::ModelType;
use crate::error::{Error, Result};

/// `config.json` of `gemma2` and `gemma3_text`, with Hugging Face's field names. Fields
/// whose default differs between the two (`final_logit_softcapping`,
/// `attn_logit_softcapping`) keep "absent" apart from "null".
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
    #[serde(default = "defaults::head_dim")]
    pub head_dim: i64,
    /// Gemma 2 and 3 read `hidden_activation`, Gemma `hidden_act` (its legacy "gelu"
    /// meaning the tanh approximation, as `transformers` rewrites it).
    #[serde(default)]
    pub hidden_activation: Option<String>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default = "defaults::rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "defaults::init_range")]
    pub initializer_range: f64,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "defaults::yes")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    /// Gemma 3 (transformers 4 layout): the local layers' rotary base.
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
    /// Gemma 2 and 3 (default 256); Gemma scales by `head_dim` instead.
    #[serde(default = "defaults::query_pre_attn_scalar")]
    pub query_pre_attn_scalar: f64,
    #[serde(default = "defaults::sliding_window")]
    pub sliding_window: Option<i64>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub sliding_window_pattern: Option<i64>,
    #[serde(default, deserialize_with = "defaults::present")]
    pub final_logit_softcapping: Option<Option<f64>>,
    #[serde(default, deserialize_with = "defaults::present")]
    pub attn_logit_softcapping: Option<Option<f64>>,
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
}

mod defaults {
    use super::*;

    pub fn head_dim() -> i64 {
        256
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
    pub fn init_range() -> f64 {
        0.02
    }
    pub fn yes() -> bool {
        true
    }
    pub fn query_pre_attn_scalar() -> f64 {
        256.0
    }
    pub fn sliding_window() -> Option<i64> {
        Some(4096)
    }
    /// A field that is present (possibly `null`): `Some(value)`.
    pub fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
        Option::<f64>::deserialize(d).map(Some)
    }
}

impl Config {
    fn gemma3(&self) -> bool {
        self.model_type == ModelType::Gemma3Text
    }

    /// The first Gemma: Llama's block (no norms after attention and MLP), one window-free
    /// attention, no soft-capping.
    fn gemma1(&self) -> bool {
        self.model_type == ModelType::Gemma
    }

    /// The MLP's activation (`gelu_pytorch_tanh` unless the config names another).
    pub fn activation(&self) -> Result<Activation, String> {
        let (field, value) = match self.gemma1() {
            true => ("hidden_act", self.hidden_act.as_deref()),
            false => ("hidden_activation", self.hidden_activation.as_deref()),
        };
        match value {
            None | Some("gelu") if self.gemma1() => Ok(Activation::GeluPytorchTanh),
            None => Ok(Activation::GeluPytorchTanh),
            Some(v) => Activation::parse(field, v),
        }
    }

    /// Queries are scaled by this to the −½: `query_pre_attn_scalar`, Gemma's `head_dim`.
    fn query_scalar(&self) -> f64 {
        match self.gemma1() {
            true => self.head_dim as f64,
            false => self.query_pre_attn_scalar,
        }
    }

    pub fn num_kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// `tanh` soft-capping of the final logits: Gemma 2's default is 30, Gemma 3's none.
    pub fn final_logit_softcapping(&self) -> Option<f64> {
        if self.gemma1() {
            return None;
        }
        let default = (!self.gemma3()).then_some(30.0);
        self.final_logit_softcapping.unwrap_or(default)
    }

    /// Gemma 2's soft-capping of attention logits (default 50); never for Gemma 3.
    pub fn attn_logit_softcapping(&self) -> Option<f64> {
        match self.gemma3() || self.gemma1() {
            true => None,
            false => self.attn_logit_softcapping.unwrap_or(Some(50.0)),
        }
    }

    /// Which layers use the sliding window: `layer_types`, else Gemma 2's even layers and
    /// all but every `sliding_window_pattern`-th (default 6) of Gemma 3's.
    pub fn sliding_layers(&self) -> Vec<bool> {
        let n = self.num_hidden_layers;
        if self.gemma1() {
            return vec![false; n as usize];
        }
        match &self.layer_types {
            Some(types) => types.iter().map(|t| t == "sliding_attention").collect(),
            None => {
                let pattern = match self.gemma3() {
                    true => self.sliding_window_pattern.unwrap_or(6),
                    false => 2,
                };
                (0..n).map(|i| (i + 1) % pattern != 0).collect()
            }
        }
    }

    /// Rotary parameters of the global and the local layers. Gemma 2 has one set; Gemma
    /// 3's global layers default to base 10⁶ (and take `rope_scaling`), its local ones to
    /// `rope_local_base_freq` (10⁴), or `rope_parameters` per layer type (transformers 5).
    pub fn ropes(&self) -> Result<(Rope, Rope), String> {
        let nonnull = |v: Option<&Value>| v.filter(|v| !v.is_null()).cloned();
        if !self.gemma3() {
            let params = nonnull(self.rope_parameters.as_ref().or(self.rope_scaling.as_ref()));
            let rope = parse_rope(
                params.as_ref(),
                self.rope_theta.unwrap_or(10000.0),
                RopeLengths::default(),
            )?;
            return Ok((rope.clone(), rope));
        }
        let per_type = |key: &str| nonnull(self.rope_parameters.as_ref().and_then(|p| p.get(key)));
        let global = per_type("full_attention").or(nonnull(self.rope_scaling.as_ref()));
        let local = per_type("sliding_attention");
        let lengths = RopeLengths::default();
        let ropes = (
            parse_rope(global.as_ref(), self.rope_theta.unwrap_or(1e6), lengths)?,
            parse_rope(
                local.as_ref(),
                self.rope_local_base_freq.unwrap_or(1e4),
                lengths,
            )?,
        );
        for r in [&ropes.0, &ropes.1] {
            match r.scaling {
                RopeScaling::LongRope { .. } => {
                    return Err("rope_type 'longrope' is not supported for Gemma".into())
                }
                RopeScaling::Yarn { .. } => {
                    return Err("rope_type 'yarn' is not supported for Gemma".into())
                }
                _ => {}
            }
        }
        Ok(ropes)
    }

    /// Values this implementation cannot honour, named with `path`.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let types_ok = self.layer_types.as_ref().is_none_or(|t| {
            t.len() == self.num_hidden_layers as usize
                && t.iter()
                    .all(|x| x == "sliding_attention" || x == "full_attention")
        });
        let problem = if self.num_attention_heads % self.num_kv_heads() != 0 {
            Some(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            ))
        } else if !types_ok {
            Some(format!(
                "layer_types must list {} entries, each sliding_attention or full_attention",
                self.num_hidden_layers
            ))
        } else if let Err(e) = self.activation() {
            Some(e)
        } else if self.use_bidirectional_attention == Some(true) {
            Some("use_bidirectional_attention true (an embedding model) is not supported".into())
        } else if self.sliding_window.is_none() && self.sliding_layers().contains(&true) {
            Some("sliding_window is null but some layers slide".into())
        } else {
            self.ropes().err()
        };
        match problem {
            Some(message) => Err(Error::config(path, message)),
            None => Ok(()),
        }
    }
}

/// `Gemma2RMSNorm`: normalise and scale by `1 + weight` in f32, then cast.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: nn::Path, dim: i64, eps: f64, opts: &ModelOptions) -> Self {
        RmsNorm {
            weight: param(&p, "weight", &[dim], Init::Const(0.0), opts),
            eps,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let xf = x.to_kind(Kind::Float);
        let var = xf.square().mean_dim([-1].as_slice(), true, Kind::Float);
        let scale = self.weight.to_kind(Kind::Float) + 1.0;
        (xf * (var + self.eps).rsqrt() * scale).to_kind(x.kind())
    }
}

#[derive(Debug)]
struct Layer {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Gemma 3's per-head norms of queries and keys.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    post_attention_layernorm: RmsNorm,
    /// Gemma 2 and 3: norms of the attention's output and of the MLP's input and output
    /// (Gemma's `post_attention_layernorm` is its MLP's input norm, as Llama's).
    feedforward_norms: Option<(RmsNorm, RmsNorm)>,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
    sliding: bool,
    scale: f64,
    softcap: Option<f64>,
    n_heads: i64,
    n_kv_heads: i64,
    head_dim: i64,
}

impl Layer {
    fn new(p: nn::Path, cfg: &Config, sliding: bool, opts: &ModelOptions) -> Self {
        let (h, d, std) = (cfg.hidden_size, cfg.head_dim, cfg.initializer_range);
        let (nh, nkv, i) = (
            cfg.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.intermediate_size,
        );
        let (attn, mlp) = (&p / "self_attn", &p / "mlp");
        let linear = |path: nn::Path, dims, bias| Linear::new(path, dims, bias, std, opts);
        let norm = |path: nn::Path, dim| RmsNorm::new(path, dim, cfg.rms_norm_eps, opts);
        let bias = cfg.attention_bias;
        Layer {
            input_layernorm: norm(&p / "input_layernorm", h),
            q_proj: linear(&attn / "q_proj", (h, nh * d), bias),
            k_proj: linear(&attn / "k_proj", (h, nkv * d), bias),
            v_proj: linear(&attn / "v_proj", (h, nkv * d), bias),
            o_proj: linear(&attn / "o_proj", (nh * d, h), bias),
            qk_norm: cfg
                .gemma3()
                .then(|| (norm(&attn / "q_norm", d), norm(&attn / "k_norm", d))),
            post_attention_layernorm: norm(&p / "post_attention_layernorm", h),
            feedforward_norms: (!cfg.gemma1()).then(|| {
                (
                    norm(&p / "pre_feedforward_layernorm", h),
                    norm(&p / "post_feedforward_layernorm", h),
                )
            }),
            gate_proj: linear(&mlp / "gate_proj", (h, i), false),
            up_proj: linear(&mlp / "up_proj", (h, i), false),
            down_proj: linear(&mlp / "down_proj", (i, h), false),
            act: cfg.activation().expect("validated config"),
            sliding,
            scale: cfg.query_scalar().powf(-0.5),
            softcap: cfg.attn_logit_softcapping(),
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: d,
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        masking: &Masking,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor {
        let (b, t, _) = x.size3().unwrap();
        let normed = self.input_layernorm.forward(x);
        let heads = |y: Tensor, n: i64| y.view([b, t, n, self.head_dim]).transpose(1, 2);
        let mut q = heads(self.q_proj.forward(&normed), self.n_heads);
        let mut k = heads(self.k_proj.forward(&normed), self.n_kv_heads);
        let v = heads(self.v_proj.forward(&normed), self.n_kv_heads);
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            (q, k) = (q_norm.forward(&q), k_norm.forward(&k));
        }
        let rope = |r: &Tensor| r * cos + rotate_half(r) * sin;
        let (q, k) = (rope(&q), rope(&k));
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let masking = masking.for_layer(self.sliding);
        let attn = match self.softcap {
            Some(cap) => masking.attend_written_out(&q, &k, &v, self.scale, Some(cap), None),
            None => masking.attend(&q, &k, &v, Some(self.scale)),
        };
        let attn = attn
            .transpose(1, 2)
            .reshape([b, t, self.n_heads * self.head_dim]);
        let out = self.o_proj.forward(&attn);
        let Some((pre, post)) = &self.feedforward_norms else {
            // Gemma: Llama's block.
            let x = x + out;
            let normed = self.post_attention_layernorm.forward(&x);
            return &x + self.mlp(&normed);
        };
        let x = x + self.post_attention_layernorm.forward(&out);
        &x + post.forward(&self.mlp(&pre.forward(&x)))
    }

    fn mlp(&self, x: &Tensor) -> Tensor {
        let gated = self.act.forward(&self.gate_proj.forward(x)) * self.up_proj.forward(x);
        self.down_proj.forward(&gated)
    }
}

/// `GemmaModel` / `Gemma2Model` / `Gemma3TextModel`: scaled embeddings, decoder layers and the final
/// norm, under `model.`.
#[derive(Debug)]
pub struct Gemma {
    embed_tokens: Embedding,
    embed_scale: f64,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// Inverse rotary frequencies of the global and the local layers.
    inv_freq: (Tensor, Tensor),
    sliding_window: Option<i64>,
}

impl Gemma {
    /// `cfg` must have passed [`Config::validate`].
    pub fn new(p: nn::Path, cfg: &Config, opts: &ModelOptions) -> Self {
        let (global, local) = cfg.ropes().expect("validated config");
        let freqs = |rope: &Rope| {
            let f: Vec<f32> = inv_freq(rope, cfg.head_dim)
                .into_iter()
                .map(|f| f as f32)
                .collect();
            Tensor::from_slice(&f).to_device(p.device())
        };
        let sliding = cfg.sliding_layers();
        Gemma {
            embed_tokens: Embedding::new(
                &p / "embed_tokens",
                cfg.vocab_size,
                cfg.hidden_size,
                cfg.initializer_range,
                opts,
            ),
            embed_scale: (cfg.hidden_size as f64).sqrt(),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| Layer::new(&p / "layers" / i, cfg, sliding[i as usize], opts))
                .collect(),
            norm: RmsNorm::new(&p / "norm", cfg.hidden_size, cfg.rms_norm_eps, opts),
            inv_freq: (freqs(&global), freqs(&local)),
            sliding_window: cfg.sliding_window,
        }
    }

    pub fn embedding_weight(&self) -> &Tensor {
        &self.embed_tokens.weight
    }

    /// Token embeddings `[B, T, H]` of `ids`, times √hidden in the weights' dtype (bf16
    /// rounds √2304 = 48 exactly, √3072 to 55.5, as `transformers` does).
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        self.embed_with(&self.embed_tokens.weight, ids)
    }

    /// [`Self::embed`] with another embedding weight (a `modules_to_save` copy).
    pub fn embed_with(&self, w: &Tensor, ids: &Tensor) -> Tensor {
        let scale = Tensor::from(self.embed_scale as f32)
            .to_kind(w.kind())
            .to_device(w.device());
        Tensor::embedding(w, ids, -1, false, false) * scale
    }

    /// Final hidden states `[B, T, H]` of embeddings `embeds` at `positions`; `masking`
    /// carries the local layers' window ([`Masking::for_layer`]).
    pub fn forward(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        masking: &Masking,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor {
        let rotary = self.rotary(positions, embeds.kind());
        let mut x = embeds.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            x = layer.forward(&x, rotary.for_layer(layer.sliding), masking, layer_cache);
        }
        self.norm.forward(&x)
    }

    /// cos/sin of the global and the local rotary sets, in f32 then in `kind`.
    fn rotary(&self, positions: &Tensor, kind: Kind) -> Rotary {
        let one = |inv_freq: &Tensor| cos_sin(positions, inv_freq, 1.0, kind);
        Rotary {
            global: one(&self.inv_freq.0),
            local: Some(one(&self.inv_freq.1)),
        }
    }

    /// [`Gemma::forward`] keeping only each layer's input (activation recomputation);
    /// [`Gemma::backward_saved`] is its backward.
    pub(crate) fn forward_saving(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        masking: Masking,
    ) -> (Tensor, Saved) {
        let rotary = self.rotary(positions, embeds.kind());
        let first_input = embeds.shallow_clone();
        let saved = run_blocks(
            first_input,
            positions,
            masking,
            self.layers.len(),
            |i, x, m| {
                let layer = &self.layers[i];
                layer.forward(x, rotary.for_layer(layer.sliding), m, None)
            },
        );
        (self.norm.forward(&saved.output), saved)
    }

    pub(crate) fn backward_saved(&self, saved: Saved) {
        let rotary = self.rotary(&saved.positions, saved.first_input.kind());
        backward_blocks(saved, |i, x, masking| {
            let layer = &self.layers[i];
            layer.forward(x, rotary.for_layer(layer.sliding), masking, None)
        });
    }

    /// The window of the sliding layers (the global ones have none).
    pub fn local_window(&self) -> Option<i64> {
        self.layers
            .iter()
            .any(|l| l.sliding)
            .then_some(self.sliding_window)
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: Value) -> Config {
        let mut v = serde_json::json!({
            "model_type": "gemma2", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults_follow_transformers() {
        let g2 = config(serde_json::json!({}));
        assert_eq!(g2.sliding_layers(), [true, false, true, false]);
        assert_eq!(g2.final_logit_softcapping(), Some(30.0));
        assert_eq!(g2.attn_logit_softcapping(), Some(50.0));
        assert_eq!(g2.head_dim, 256);
        let off = config(serde_json::json!({"final_logit_softcapping": null}));
        assert_eq!(off.final_logit_softcapping(), None);
        let g3 = config(
            serde_json::json!({"model_type": "gemma3_text", "num_hidden_layers": 7,
            "attn_logit_softcapping": 50.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
        );
        assert_eq!(
            g3.sliding_layers(),
            [true, true, true, true, true, false, true]
        );
        assert_eq!(g3.final_logit_softcapping(), None);
        assert_eq!(
            g3.attn_logit_softcapping(),
            None,
            "ignored, as transformers"
        );
        let (global, local) = g3.ropes().unwrap();
        assert_eq!(global.theta, 1e6);
        assert_eq!(global.scaling, RopeScaling::Linear { factor: 8.0 });
        assert_eq!(
            (local.theta, local.scaling.clone()),
            (1e4, RopeScaling::None)
        );
        let v5 = config(
            serde_json::json!({"model_type": "gemma3_text", "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
        );
        assert_eq!(v5.ropes().unwrap(), (global, local));
        // Gemma: every layer global, no caps, the legacy hidden_act "gelu" is the tanh one,
        // queries scaled by head_dim (query_pre_attn_scalar is Gemma 2's).
        let g1 = config(
            serde_json::json!({"model_type": "gemma", "hidden_act": "gelu",
            "hidden_activation": null, "query_pre_attn_scalar": 7}),
        );
        assert_eq!(g1.sliding_layers(), [false; 4]);
        assert_eq!(
            (g1.final_logit_softcapping(), g1.attn_logit_softcapping()),
            (None, None)
        );
        assert_eq!(g1.activation(), Ok(Activation::GeluPytorchTanh));
        assert_eq!(g1.query_scalar(), 256.0);
        let relu = config(serde_json::json!({"hidden_activation": "relu"}));
        assert_eq!(relu.activation(), Ok(Activation::Relu));
        let bad = config(serde_json::json!({"layer_types": ["sliding_attention"]}));
        let e = bad.validate(Path::new("c.json")).unwrap_err().to_string();
        assert!(e.contains("layer_types must list 4 entries"), "{e}");
    }
}
