//! Small building blocks shared by the architectures, with Hugging Face parameter names.

use tch::nn::{self, Init};
use tch::Tensor;

/// `nn.Linear`: weight `[out, in]` named `weight`, optional `bias`.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool, std: f64) -> Self {
        let weight = p.var(
            "weight",
            &[out_dim, in_dim],
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        );
        let bias = bias.then(|| p.zeros("bias", &[out_dim]));
        Linear { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// `nn.Embedding` with a `weight` of `[num, dim]`.
#[derive(Debug)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(p: nn::Path, num: i64, dim: i64, std: f64) -> Self {
        let weight = p.var(
            "weight",
            &[num, dim],
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        );
        Embedding { weight }
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
    pub fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        LayerNorm {
            weight: p.ones("weight", &[dim]),
            bias: p.zeros("bias", &[dim]),
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
