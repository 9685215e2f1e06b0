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

/// One parameter's slices of its group's buffers (what a checkpoint stores by name).
#[derive(Debug)]
struct ParamState {
    /// f32 master copy when the parameter itself is half precision.
    master: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// Parameters of one weight-decay class and dtype, stored back to back: every parameter
/// and its gradient are views of `params` and `grads`, so a step is a few whole-buffer
/// operations instead of a dozen per parameter (and the gradient norm one reduction).
#[derive(Debug)]
struct Group {
    decay: bool,
    params: Tensor,
    grads: Tensor,
    master: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// Elements per update chunk: bounds the step's temporaries (about 3 × 4 bytes each).
const CHUNK: i64 = 1 << 26;

#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    groups: Vec<Group>,
    params: BTreeMap<String, ParamState>,
    /// Optimiser steps taken.
    pub step: i64,
}

impl AdamW {
    /// Over the trainable variables `vars` (name → variable). The variables (and their
    /// gradients) are moved into the optimiser's flat buffers, values kept; gradients start
    /// at zero, and a parameter that gets no gradient in a step is updated with a zero one.
    pub fn new(vars: HashMap<String, Tensor>, config: AdamWConfig) -> Self {
        let trainable: BTreeMap<String, Tensor> = vars
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        // Every gradient defined (zero), so that it can be re-seated in the flat buffer;
        // backward then accumulates into it in place.
        if !trainable.is_empty() {
            tch::with_grad(|| {
                trainable
                    .values()
                    .map(|p| p.sum(Kind::Float) * 0.0)
                    .reduce(|a, b| a + b)
                    .unwrap()
                    .backward()
            });
        }
        let _guard = tch::no_grad_guard();
        // (decay, dtype, device) → members
        type Class = (bool, String, String);
        let mut classes: BTreeMap<Class, Vec<(&String, &Tensor)>> = BTreeMap::new();
        for (name, p) in &trainable {
            let key = (
                !no_decay(name),
                format!("{:?}", p.kind()),
                format!("{:?}", p.device()),
            );
            classes.entry(key).or_default().push((name, p));
        }
        let mut groups = vec![];
        let mut params = BTreeMap::new();
        for ((decay, _, _), members) in classes {
            let (kind, device) = (members[0].1.kind(), members[0].1.device());
            let total: i64 = members.iter().map(|(_, p)| p.numel() as i64).sum();
            let flat = Tensor::empty([total], (kind, device));
            let grads = Tensor::zeros([total], (kind, device));
            let f32_zeros = || Tensor::zeros([total], (Kind::Float, device));
            let (exp_avg, exp_avg_sq) = (f32_zeros(), f32_zeros());
            let mut offset = 0;
            let mut views = vec![];
            for (name, p) in &members {
                let n = p.numel() as i64;
                let view = |t: &Tensor| t.narrow(0, offset, n).view(p.size().as_slice());
                let pv = view(&flat);
                pv.shallow_clone().copy_(p);
                let _ = p.shallow_clone().set_source_tensor_(&pv);
                let _ = p.grad().set_source_tensor_(&view(&grads));
                params.insert(
                    (*name).clone(),
                    ParamState {
                        master: None,
                        exp_avg: view(&exp_avg),
                        exp_avg_sq: view(&exp_avg_sq),
                    },
                );
                views.push(((*name).clone(), offset, n, p.size()));
                offset += n;
            }
            let master = (kind != Kind::Float).then(|| flat.to_kind(Kind::Float));
            if let Some(m) = &master {
                for (name, offset, n, shape) in views {
                    params.get_mut(&name).unwrap().master =
                        Some(m.narrow(0, offset, n).view(shape.as_slice()));
                }
            }
            groups.push(Group {
                decay,
                params: flat,
                grads,
                master,
                exp_avg,
                exp_avg_sq,
            });
        }
        AdamW {
            config,
            groups,
            params,
            step: 0,
        }
    }

    /// The names of the parameters it trains (those that require a gradient).
    pub fn parameter_names(&self) -> Vec<String> {
        self.params.keys().cloned().collect()
    }

    /// The flat gradient buffers, one per group: what a data-parallel step sums over ranks.
    pub fn grad_buffers(&self) -> impl Iterator<Item = &Tensor> {
        self.groups.iter().map(|g| &g.grads)
    }

    pub fn zero_grad(&self) {
        for g in &self.groups {
            let _ = g.grads.shallow_clone().zero_();
        }
    }

    /// Global L2 norm of all gradients, read from the device once.
    pub fn grad_norm(&self) -> f64 {
        let _guard = tch::no_grad_guard();
        let squares: Vec<Tensor> = self
            .groups
            .iter()
            .map(|g| g.grads.to_kind(Kind::Float).square().sum(Kind::Float))
            .collect();
        if squares.is_empty() {
            return 0.0;
        }
        Tensor::stack(&squares, 0)
            .sum(Kind::Double)
            .double_value(&[])
            .sqrt()
    }

    /// Scales the gradients so their global norm is at most `max_norm` (when > 0), as
    /// `torch.nn.utils.clip_grad_norm_` does. Returns the norm before clipping.
    pub fn clip_grad_norm(&self, max_norm: f64) -> f64 {
        let norm = self.grad_norm();
        if max_norm > 0.0 && norm.is_finite() {
            let coef = max_norm / (norm + 1e-6);
            if coef < 1.0 {
                let _guard = tch::no_grad_guard();
                for g in &self.groups {
                    let _ = g.grads.shallow_clone().g_mul_scalar_(coef);
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
        for g in &self.groups {
            let total = g.params.size()[0];
            let mut start = 0;
            while start < total {
                let n = CHUNK.min(total - start);
                let part = |t: &Tensor| t.narrow(0, start, n);
                let grad = part(&g.grads).to_kind(Kind::Float);
                let mut p = part(g.master.as_ref().unwrap_or(&g.params));
                let mut exp_avg = part(&g.exp_avg);
                let mut exp_avg_sq = part(&g.exp_avg_sq);
                if g.decay && c.weight_decay != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let _ = exp_avg.lerp_(&grad, 1.0 - c.beta1);
                let _ = exp_avg_sq
                    .g_mul_scalar_(c.beta2)
                    .addcmul_(&grad, &(&grad * (1.0 - c.beta2)));
                let denom = (exp_avg_sq.sqrt() / bias_correction2.sqrt()) + c.eps;
                let _ = p.addcdiv_(&(&exp_avg * -step_size), &denom);
                if g.master.is_some() {
                    part(&g.params).copy_(&p);
                }
                start += n;
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
        // A second parameter of the same group: its slice of the flat buffer must not
        // disturb the first one's.
        let init_u = Tensor::randn([5], (Kind::Float, Device::Cpu));
        let u = (ours_vs.root() / "other").var_copy("weight", &init_u);
        let theirs_vs = nn::VarStore::new(Device::Cpu);
        let w2 = (theirs_vs.root() / "layer").var_copy("weight", &init);
        let u2 = (theirs_vs.root() / "other").var_copy("weight", &init_u);
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
            ((&w - &target).square().sum(Kind::Float) + (&u * 3.0).sin().sum(Kind::Float))
                .backward();
            ours.step(1e-2);
            theirs.zero_grad();
            ((&w2 - &target).square().sum(Kind::Float) + (&u2 * 3.0).sin().sum(Kind::Float))
                .backward();
            theirs.step();
        }
        for (a, b) in [(&w, &w2), (&u, &u2)] {
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "AdamW differs from libtorch's by {diff}");
        }
        assert!(
            (&w - &init).abs().max().double_value(&[]) > 1e-3,
            "w did not move"
        );
    }

    /// Half-precision parameters: updated through the f32 master, which they follow.
    #[test]
    fn bf16_parameters_follow_their_master() {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let init = Tensor::from_slice(&[1f32, -2.0, 0.5]);
        let w = vs.root().var_copy("w", &init);
        let b = (vs.root() / "b").var_copy("bias", &init);
        vs.bfloat16();
        assert_eq!(w.kind(), Kind::BFloat16);
        let mut opt = AdamW::new(vs.variables(), config(0.1));
        for _ in 0..3 {
            opt.zero_grad();
            ((&w * &w).sum(Kind::Float) + b.sum(Kind::Float)).backward();
            opt.step(0.1);
        }
        for (name, t) in [("w", &w), ("b.bias", &b)] {
            let master = opt.params[name].master.as_ref().unwrap();
            assert!(t.equal(&master.to_kind(Kind::BFloat16)), "{name}");
            assert!(
                (master - &init).abs().min().double_value(&[]) > 0.1,
                "{name} moved"
            );
        }
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
