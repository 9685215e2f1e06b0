//! Small building blocks shared by the architectures, with Hugging Face parameter names.
//! Every layer is built with the model's [`ModelOptions`], which decide how its parameters
//! are made (today: trainable or frozen; adapters attach here later).

use serde::{Deserialize, Deserializer};
use tch::nn::{self, Init};
use tch::Tensor;

use super::lora::{LoraAdapter, LoraConfig};
use super::options::ModelOptions;
use super::quant::Quantized;

/// A base parameter `name` under `p`: trainable unless the options freeze the model or
/// put adapters on it.
pub fn param(p: &nn::Path, name: &str, shape: &[i64], init: Init, opts: &ModelOptions) -> Tensor {
    let t = p.var(name, shape, init);
    if opts.base_trains() {
        t
    } else {
        t.set_requires_grad(false)
    }
}

/// The LoRA adapter of the layer at `p` (`[in → out]`, stored `[in, out]` when
/// `fan_in_fan_out`), when the options target it.
fn adapter(
    p: &nn::Path,
    (in_dim, out_dim): (i64, i64),
    fan_in_fan_out: bool,
    opts: &ModelOptions,
) -> Option<LoraAdapter> {
    let cfg = opts.lora.as_ref()?;
    let module = p.components().collect::<Vec<_>>().join(".");
    if !cfg.targets(&module) {
        return None;
    }
    let without_dropout;
    let cfg = match opts.disable_dropout && cfg.dropout > 0.0 {
        true => {
            without_dropout = LoraConfig {
                dropout: 0.0,
                ..cfg.clone()
            };
            &without_dropout
        }
        false => cfg,
    };
    let adapter = LoraAdapter::new(p, &module, (in_dim, out_dim), cfg, fan_in_fan_out);
    if !opts.trainable {
        for t in [
            Some(&adapter.a),
            Some(&adapter.b),
            adapter.magnitude.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            let _ = t.set_requires_grad(false);
        }
    }
    Some(adapter)
}

/// The 4-bit form of the layer at `p` (`[in → out]`), when the options quantize it.
fn quantized(
    p: &nn::Path,
    (in_dim, out_dim): (i64, i64),
    std: f64,
    opts: &ModelOptions,
) -> Option<Quantized> {
    let cfg = opts.quantization.as_ref()?;
    let module = p.components().collect::<Vec<_>>().join(".");
    cfg.converts(&module, in_dim)
        .then(|| Quantized::new(p, (in_dim, out_dim), cfg, std))
}

fn normal(std: f64) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: std,
    }
}

/// The activation functions of `transformers`' `ACT2FN` that we implement, parsed once
/// from `config.json` (`activation_function`, `hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    GeluNew,
    GeluPytorchTanh,
    Gelu,
    Relu,
    Silu,
}

impl Activation {
    pub const ALL: [Activation; 5] = [
        Activation::GeluNew,
        Activation::GeluPytorchTanh,
        Activation::Gelu,
        Activation::Relu,
        Activation::Silu,
    ];

    /// The name `config.json` uses.
    pub fn name(self) -> &'static str {
        match self {
            Activation::GeluNew => "gelu_new",
            Activation::GeluPytorchTanh => "gelu_pytorch_tanh",
            Activation::Gelu => "gelu",
            Activation::Relu => "relu",
            Activation::Silu => "silu",
        }
    }

    pub fn forward(self, x: &Tensor) -> Tensor {
        match self {
            // GPT-2's `gelu_new` is the tanh approximation.
            Activation::GeluNew | Activation::GeluPytorchTanh => x.gelu("tanh"),
            Activation::Gelu => x.gelu("none"),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
        }
    }

    /// `field`'s value from a config, or a message naming the field and the choices.
    pub fn parse(field: &str, value: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|a| a.name() == value)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|a| a.name()).collect();
                format!(
                    "{field} '{value}' is not supported (supported: {})",
                    names.join(", ")
                )
            })
    }

    /// A serde field reader for `field` (its errors name the field).
    pub(crate) fn deserialize_field<'de, D: Deserializer<'de>>(
        d: D,
        field: &str,
    ) -> Result<Self, D::Error> {
        let value = String::deserialize(d)?;
        Self::parse(field, &value).map_err(serde::de::Error::custom)
    }
}

/// `nn.Linear`: weight `[out, in]` named `weight`, optional `bias`, and a LoRA adapter
/// when the options target it. Quantized (QLoRA), `weight` is the packed 4-bit form.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
    pub quant: Option<Quantized>,
}

impl Linear {
    pub fn new(
        p: nn::Path,
        (in_dim, out_dim): (i64, i64),
        bias: bool,
        std: f64,
        opts: &ModelOptions,
    ) -> Self {
        let quant = quantized(&p, (in_dim, out_dim), std, opts);
        let weight = match &quant {
            Some(q) => q.packed.shallow_clone(),
            None => param(&p, "weight", &[out_dim, in_dim], normal(std), opts),
        };
        let bias = bias.then(|| param(&p, "bias", &[out_dim], Init::Const(0.0), opts));
        let lora = adapter(&p, (in_dim, out_dim), false, opts);
        Linear {
            weight,
            bias,
            lora,
            quant,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let weight = match &self.quant {
            Some(q) => q.dequantize(x.kind()),
            None => self.weight.shallow_clone(),
        };
        let y = x.linear(&weight, self.bias.as_ref());
        match &self.lora {
            Some(lora) => lora.add_to(y, x, &weight, self.bias.as_ref()),
            None => y,
        }
    }
}

/// `nn.Embedding` with a `weight` of `[num, dim]`.
#[derive(Debug)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(p: nn::Path, num: i64, dim: i64, std: f64, opts: &ModelOptions) -> Self {
        Embedding {
            weight: param(&p, "weight", &[num, dim], normal(std), opts),
        }
    }

    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }
}

/// `nn.LayerNorm` with `weight` and `bias`.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(p: nn::Path, dim: i64, eps: f64, opts: &ModelOptions) -> Self {
        LayerNorm {
            weight: param(&p, "weight", &[dim], Init::Const(1.0), opts),
            bias: param(&p, "bias", &[dim], Init::Const(0.0), opts),
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [*x.size().last().unwrap()].as_slice(),
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// `transformers.pytorch_utils.Conv1D` (GPT-2): weight `[in, out]`, bias `[out]`, so the
/// forward is `x·W + b` and a stored tensor is never transposed; a LoRA adapter when the
/// options target it. Quantized, the weight is packed `[out, in]` as `transformers`
/// quantizes it (transposed first) and the layer computes `x·Wᵀ + b` like a linear one.
#[derive(Debug)]
pub struct Conv1D {
    pub weight: Tensor,
    pub bias: Tensor,
    pub lora: Option<LoraAdapter>,
    pub quant: Option<Quantized>,
}

impl Conv1D {
    pub fn new(p: nn::Path, (in_dim, out_dim): (i64, i64), std: f64, opts: &ModelOptions) -> Self {
        let quant = quantized(&p, (in_dim, out_dim), std, opts);
        Conv1D {
            weight: match &quant {
                Some(q) => q.packed.shallow_clone(),
                None => param(&p, "weight", &[in_dim, out_dim], normal(std), opts),
            },
            bias: param(&p, "bias", &[out_dim], Init::Const(0.0), opts),
            lora: adapter(&p, (in_dim, out_dim), true, opts),
            quant,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (y, weight) = match &self.quant {
            Some(q) => {
                let w = q.dequantize(x.kind());
                (x.linear(&w, Some(&self.bias)), w.transpose(0, 1))
            }
            None => (
                x.matmul(&self.weight) + &self.bias,
                self.weight.shallow_clone(),
            ),
        };
        match &self.lora {
            Some(lora) => lora.add_to(y, x, &weight, Some(&self.bias)),
            None => y,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Head;

    #[test]
    fn frozen_options_make_frozen_parameters() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let cpu = ModelOptions::cpu(Head::Lm);
        let a = Linear::new(vs.root() / "a", (3, 2), true, 0.02, &cpu);
        let b = Linear::new(vs.root() / "b", (3, 2), true, 0.02, &cpu.clone().frozen());
        assert!(a.weight.requires_grad() && a.bias.unwrap().requires_grad());
        assert!(!b.weight.requires_grad() && !b.bias.unwrap().requires_grad());
    }

    #[test]
    fn activation_names_round_trip_and_unknown_ones_are_named() {
        for a in Activation::ALL {
            assert_eq!(Activation::parse("hidden_act", a.name()), Ok(a));
        }
        let e = Activation::parse("activation_function", "swishy").unwrap_err();
        assert!(
            e.starts_with("activation_function 'swishy' is not supported (supported: gelu_new"),
            "{e}"
        );
    }
}
