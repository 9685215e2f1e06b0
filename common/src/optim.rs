//! AdamW with state we can save and restore exactly (tch's optimiser hides its moments),
//! f32 master weights for half-precision models, no weight decay on biases, norm weights
//! and embeddings, and global-norm gradient clipping that reports the pre-clip norm.
//!
//! The update is `torch.optim.AdamW`'s (non-fused, non-amsgrad) step, term for term.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::checkpoint;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Whether a parameter is exempt from weight decay: biases, norm weights and embeddings.
pub fn no_decay(name: &str) -> bool {
    name.ends_with(".bias")
        || name.contains("norm")
        || name.contains(".ln_")
        || name.contains("embed_tokens")
        || name.contains(".wte.")
        || name.contains(".wpe.")
}

#[derive(Debug)]
struct ParamState {
    param: Tensor,
    /// f32 copy when the parameter itself is half precision; the update happens here.
    master: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    params: BTreeMap<String, ParamState>,
    /// Optimiser steps taken.
    pub step: i64,
}

impl AdamW {
    /// Over the trainable variables `vars` (name → variable).
    pub fn new(vars: HashMap<String, Tensor>, config: AdamWConfig) -> Self {
        let _guard = tch::no_grad_guard();
        let params = vars
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(name, param)| {
                let master = (param.kind() != Kind::Float).then(|| param.to_kind(Kind::Float));
                let zeros = || Tensor::zeros_like(master.as_ref().unwrap_or(&param));
                let state = ParamState {
                    exp_avg: zeros(),
                    exp_avg_sq: zeros(),
                    decay: !no_decay(&name),
                    master,
                    param,
                };
                (name, state)
            })
            .collect();
        AdamW {
            config,
            params,
            step: 0,
        }
    }

    pub fn zero_grad(&self) {
        for s in self.params.values() {
            let mut g = s.param.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// Global L2 norm of all gradients (missing gradients count as zero).
    pub fn grad_norm(&self) -> f64 {
        let _guard = tch::no_grad_guard();
        let mut total = 0f64;
        for s in self.params.values() {
            let g = s.param.grad();
            if g.defined() {
                total += g
                    .to_kind(Kind::Float)
                    .square()
                    .sum(Kind::Float)
                    .double_value(&[]);
            }
        }
        total.sqrt()
    }

    /// Scales the gradients so their global norm is at most `max_norm` (when > 0), as
    /// `torch.nn.utils.clip_grad_norm_` does. Returns the norm before clipping.
    pub fn clip_grad_norm(&self, max_norm: f64) -> f64 {
        let norm = self.grad_norm();
        if max_norm > 0.0 && norm.is_finite() {
            let coef = max_norm / (norm + 1e-6);
            if coef < 1.0 {
                let _guard = tch::no_grad_guard();
                for s in self.params.values() {
                    let mut g = s.param.grad();
                    if g.defined() {
                        let _ = g.g_mul_scalar_(coef);
                    }
                }
            }
        }
        norm
    }

    /// One AdamW step at learning rate `lr` using the current gradients.
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let c = self.config;
        let bias_correction1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias_correction2 = 1.0 - c.beta2.powi(self.step as i32);
        let step_size = lr / bias_correction1;
        for s in self.params.values_mut() {
            let grad = s.param.grad();
            if !grad.defined() {
                continue;
            }
            let grad = grad.to_kind(Kind::Float);
            let mut p = match &s.master {
                Some(m) => m.shallow_clone(),
                None => s.param.shallow_clone(),
            };
            if s.decay && c.weight_decay != 0.0 {
                let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
            }
            let _ = s.exp_avg.lerp_(&grad, 1.0 - c.beta1);
            let _ = s
                .exp_avg_sq
                .g_mul_scalar_(c.beta2)
                .addcmul_(&grad, &(&grad * (1.0 - c.beta2)));
            let denom = (s.exp_avg_sq.sqrt() / bias_correction2.sqrt()) + c.eps;
            let _ = p.addcdiv_(&(&s.exp_avg * -step_size), &denom);
            if let Some(m) = &s.master {
                s.param.shallow_clone().copy_(&m.to_kind(s.param.kind()));
            }
        }
    }

    /// Writes the moments (and master weights) to `dir/optimizer.safetensors` and the step
    /// and hyperparameters to `dir/optimizer.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut tensors = BTreeMap::new();
        for (name, s) in &self.params {
            tensors.insert(format!("exp_avg.{name}"), s.exp_avg.shallow_clone());
            tensors.insert(format!("exp_avg_sq.{name}"), s.exp_avg_sq.shallow_clone());
            if let Some(m) = &s.master {
                tensors.insert(format!("master.{name}"), m.shallow_clone());
            }
        }
        checkpoint::save_file(&tensors, &dir.join("optimizer.safetensors"))?;
        let meta = serde_json::json!({"step": self.step, "config": self.config});
        checkpoint::write_atomic(&dir.join("optimizer.json"), meta.to_string().as_bytes())
    }

    /// Restores what [`AdamW::save`] wrote; every parameter's state must be there.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let meta_path = dir.join("optimizer.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
        let meta: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json {
                path: meta_path.clone(),
                source,
            })?;
        self.step = meta["step"]
            .as_i64()
            .ok_or_else(|| Error::checkpoint(&meta_path, "field 'step' is missing"))?;
        let mut vars = HashMap::new();
        for (name, s) in &self.params {
            vars.insert(format!("exp_avg.{name}"), s.exp_avg.shallow_clone());
            vars.insert(format!("exp_avg_sq.{name}"), s.exp_avg_sq.shallow_clone());
            if let Some(m) = &s.master {
                vars.insert(format!("master.{name}"), m.shallow_clone());
            }
        }
        checkpoint::load_file(&vars, &dir.join("optimizer.safetensors"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, OptimizerConfig};
    use tch::Device;

    fn config(wd: f64) -> AdamWConfig {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-5,
            weight_decay: wd,
        }
    }

    /// Same trajectory as libtorch's own AdamW over several steps.
    #[test]
    fn matches_libtorch_adamw() {
        tch::manual_seed(0);
        let init = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
        let ours_vs = nn::VarStore::new(Device::Cpu);
        let w = (ours_vs.root() / "layer").var_copy("weight", &init);
        let theirs_vs = nn::VarStore::new(Device::Cpu);
        let w2 = (theirs_vs.root() / "layer").var_copy("weight", &init);
        let mut ours = AdamW::new(ours_vs.variables(), config(0.1));
        let mut theirs = nn::AdamW {
            beta1: 0.9,
            beta2: 0.95,
            wd: 0.1,
            eps: 1e-5,
            amsgrad: false,
        }
        .build(&theirs_vs, 1e-2)
        .unwrap();
        let target = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
        for _ in 0..5 {
            ours.zero_grad();
            (&w - &target).square().sum(Kind::Float).backward();
            ours.step(1e-2);
            theirs.zero_grad();
            (&w2 - &target).square().sum(Kind::Float).backward();
            theirs.step();
        }
        let diff = (&w - &w2).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "AdamW differs from libtorch's by {diff}");
    }

    #[test]
    fn no_decay_groups() {
        assert!(no_decay("model.layers.0.input_layernorm.weight"));
        assert!(no_decay("transformer.h.0.ln_1.weight"));
        assert!(no_decay("transformer.h.0.attn.c_attn.bias"));
        assert!(no_decay("model.embed_tokens.weight"));
        assert!(no_decay("transformer.wte.weight"));
        assert!(!no_decay("model.layers.0.self_attn.q_proj.weight"));
        assert!(!no_decay("lm_head.weight"));
    }

    #[test]
    fn clipping_reports_the_pre_clip_norm() {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var_copy("w", &Tensor::from_slice(&[3f32, 4.0]));
        let opt = AdamW::new(vs.variables(), config(0.0));
        (&w * &w).sum(Kind::Float).backward(); // grad = [6, 8], norm 10
        assert!((opt.clip_grad_norm(1.0) - 10.0).abs() < 1e-5);
        assert!((opt.grad_norm() - 1.0).abs() < 1e-4);
    }

    #[test]
    fn state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var_copy("w", &Tensor::from_slice(&[1f32, -1.0]));
        let mut opt = AdamW::new(vs.variables(), config(0.0));
        (&w * 3.0).sum(Kind::Float).backward();
        opt.step(0.1);
        opt.save(dir.path()).unwrap();
        let mut fresh = AdamW::new(vs.variables(), config(0.0));
        fresh.load(dir.path()).unwrap();
        assert_eq!(fresh.step, 1);
        let (a, b) = (&opt.params["w"], &fresh.params["w"]);
        assert!(a.exp_avg.equal(&b.exp_avg) && a.exp_avg_sq.equal(&b.exp_avg_sq));
    }
}
