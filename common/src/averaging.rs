//! Averages of a training unit's weights, kept beside it and written as a model of their
//! own at the end: PPO's exponential moving average (`ppo train --ema-decay`,
//! `final_ema/`) and BEMA in every stage (`--bema`, `bema/`: TRL's `BEMACallback`, Block
//! & Zhang 2025). Each is an arm of [`Average`]; the training unit updates its averages
//! after every optimiser step and keeps them in its checkpoints, so `--resume` continues
//! them where they were (TRL starts its BEMA again from the resumed weights).
//!
//! Only trained tensors are averaged (with adapters, the adapters: a frozen base never
//! moves). Only the main rank keeps them: it alone writes checkpoints and models, and
//! the weights are the same on every rank after each step.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use clap::Args;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::checkpoint;
use crate::cli::require;
use crate::error::Result;
use crate::models::Model;

/// BEMA, bias-corrected exponential moving average (TRL's `BEMACallback`, with its
/// argument names and defaults): every `--bema-update-freq` steps,
/// EMA ← (1 − β_t)·EMA + β_t·θ_t and BEMA = EMA + α_t·(θ_t − θ_0), where
/// β_t = max((ρ + γ·t)^−κ, --bema-min-ema-multiplier) and α_t = (ρ + γ·t)^−η.
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize, PartialEq)]
pub struct BemaArgs {
    /// Keep a BEMA of the trained weights and write it as `OUT/bema/` at the end.
    #[arg(long)]
    pub bema: bool,
    /// Steps between BEMA updates (φ; TRL's `update_freq`).
    #[arg(long, default_value_t = 400)]
    pub bema_update_freq: u64,
    /// κ, the power of the EMA's decay; 0 disables the EMA (TRL's `ema_power`).
    #[arg(long, default_value_t = 0.5)]
    pub bema_ema_power: f64,
    /// η, the power of the bias correction's decay (TRL's `bias_power`).
    #[arg(long, default_value_t = 0.2)]
    pub bema_bias_power: f64,
    /// ρ, the schedule's starting age (TRL's `lag`).
    #[arg(long, default_value_t = 10.0)]
    pub bema_lag: f64,
    /// τ, the steps before θ_0 and the EMA are taken (TRL's `update_after`).
    #[arg(long, default_value_t = 0)]
    pub bema_update_after: u64,
    /// γ, the step's factor in the schedule (TRL's `multiplier`).
    #[arg(long, default_value_t = 1.0)]
    pub bema_multiplier: f64,
    /// The EMA's decay factor never falls below this (TRL's `min_ema_multiplier`).
    #[arg(long, default_value_t = 0.0)]
    pub bema_min_ema_multiplier: f64,
}

impl BemaArgs {
    pub fn validate(&self) -> crate::error::Result<()> {
        require(&[
            (
                self.bema_update_freq > 0,
                "--bema-update-freq must be at least 1",
            ),
            (
                self.bema_lag + self.bema_multiplier > 0.0 && self.bema_multiplier >= 0.0,
                "--bema-lag + --bema-multiplier must be > 0 and --bema-multiplier ≥ 0",
            ),
            (
                self.bema_ema_power >= 0.0 && self.bema_bias_power >= 0.0,
                "--bema-ema-power and --bema-bias-power must be ≥ 0",
            ),
            (
                (0.0..=1.0).contains(&self.bema_min_ema_multiplier),
                "--bema-min-ema-multiplier must be in [0, 1]",
            ),
        ])
    }

    /// The average `--bema` asks for.
    pub fn average(&self) -> Option<Average> {
        self.bema.then(|| Average::Bema(self.clone()))
    }

    /// β_t, the EMA's decay factor at step `t`.
    pub fn ema_beta(&self, t: u64) -> f64 {
        (self.bema_lag + self.bema_multiplier * t as f64)
            .powf(-self.bema_ema_power)
            .max(self.bema_min_ema_multiplier)
    }

    /// α_t, the bias correction's factor at step `t`.
    pub fn bias_alpha(&self, t: u64) -> f64 {
        (self.bema_lag + self.bema_multiplier * t as f64).powf(-self.bema_bias_power)
    }
}

/// TRL's BEMA reference updates (its experimental `BEMACallback(update_ref_model=True)`,
/// `trl.experimental.bema_for_ref_model`, with its `DPOTrainer`), for `dpo train`.
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize, PartialEq)]
pub struct BemaRefArgs {
    /// Every --bema-ref-model-update-freq steps, the frozen reference takes the policy's
    /// BEMA (`--bema`) as it stands after that step's update: a lagged, smoothed policy as
    /// the reference. The moved reference is saved in each checkpoint.
    #[arg(long)]
    pub bema_update_ref_model: bool,
    /// Steps between the reference's updates (TRL's `ref_model_update_freq`).
    #[arg(long, default_value_t = 400)]
    pub bema_ref_model_update_freq: u64,
    /// The first update's step (0: the first is at --bema-ref-model-update-freq; TRL's
    /// `ref_model_update_after`).
    #[arg(long, default_value_t = 0)]
    pub bema_ref_model_update_after: u64,
}

impl BemaRefArgs {
    pub fn validate(&self, bema: &BemaArgs) -> crate::error::Result<()> {
        require(&[
            (
                !self.bema_update_ref_model || bema.bema,
                "--bema-update-ref-model needs --bema (the average the reference takes)",
            ),
            (
                self.bema_ref_model_update_freq > 0,
                "--bema-ref-model-update-freq must be at least 1",
            ),
        ])
    }

    /// Whether the reference takes the average after step `step` (1-based).
    pub fn due(&self, step: u64) -> bool {
        let after = self.bema_ref_model_update_after;
        self.bema_update_ref_model
            && step >= after.max(1)
            && (step - after).is_multiple_of(self.bema_ref_model_update_freq)
    }

    /// Whether the reference has taken the average by step `step`, so a checkpoint must
    /// keep it.
    pub fn has_moved(&self, step: u64) -> bool {
        let first = match self.bema_ref_model_update_after {
            0 => self.bema_ref_model_update_freq,
            after => after,
        };
        self.bema_update_ref_model && step >= first
    }
}

/// Which average of the weights.
#[derive(Debug, Clone, PartialEq)]
pub enum Average {
    /// average ← decay·average + (1 − decay)·θ after every step, on the model's device.
    Ema { decay: f64 },
    /// BEMA, its buffers in host memory as TRL keeps them (`device="cpu"`).
    Bema(BemaArgs),
}

impl Average {
    /// The directory the average is written as at the end of a run.
    pub fn dir_name(&self) -> &'static str {
        match self {
            Average::Ema { .. } => "final_ema",
            Average::Bema(_) => "bema",
        }
    }

    /// Its file in a training unit's checkpoint directory.
    pub fn file(&self) -> &'static str {
        match self {
            Average::Ema { .. } => "ema.safetensors",
            Average::Bema(_) => "bema.safetensors",
        }
    }
}

/// An average of a model's trained tensors and what updating it needs.
pub struct WeightAverage {
    pub kind: Average,
    /// Optimiser steps taken (skipped ones too: TRL's `global_step`).
    steps: u64,
    /// The average under each trained tensor's name (BEMA: the weights of its last update).
    pub weights: BTreeMap<String, Tensor>,
    /// BEMA's θ_0 and EMA (empty for an EMA).
    theta0: BTreeMap<String, Tensor>,
    ema: BTreeMap<String, Tensor>,
}

/// Copies of `model`'s trained tensors, on `device`.
fn trained_copies(model: &Model, device: Device) -> BTreeMap<String, Tensor> {
    let _guard = tch::no_grad_guard();
    model
        .named_tensors()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(k, t)| (k, t.detach().to_device(device).copy()))
        .collect()
}

impl WeightAverage {
    /// Starts at `model`'s weights (BEMA's θ_0 and EMA too).
    pub fn new(kind: Average, model: &Model) -> Self {
        let device = match kind {
            Average::Ema { .. } => model.device(),
            Average::Bema(_) => Device::Cpu,
        };
        let weights = trained_copies(model, device);
        let copy = |m: &BTreeMap<String, Tensor>| -> BTreeMap<String, Tensor> {
            m.iter().map(|(k, t)| (k.clone(), t.copy())).collect()
        };
        let (theta0, ema) = match kind {
            Average::Ema { .. } => (BTreeMap::new(), BTreeMap::new()),
            Average::Bema(_) => (copy(&weights), copy(&weights)),
        };
        WeightAverage {
            kind,
            steps: 0,
            weights,
            theta0,
            ema,
        }
    }

    /// After an optimiser step of `model`.
    pub fn update(&mut self, model: &Model) {
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        let t = self.steps;
        let params = model.named_tensors();
        match &self.kind {
            Average::Ema { decay } => {
                for (name, average) in &mut self.weights {
                    let _ = average.lerp_(&params[name], 1.0 - decay);
                }
            }
            Average::Bema(args) => {
                let after = args.bema_update_after;
                if t < after {
                    return;
                }
                // θ_t in host memory (`copy_` takes the buffers' kind).
                let theta = |name: &str| params[name].detach().to_device(Device::Cpu);
                if t == after {
                    for (name, theta0) in &mut self.theta0 {
                        theta0.copy_(&theta(name));
                    }
                    for (name, ema) in &mut self.ema {
                        ema.copy_(&theta(name));
                    }
                } else if (t - after).is_multiple_of(args.bema_update_freq) {
                    let (beta, alpha) = (args.ema_beta(t), args.bias_alpha(t));
                    for (name, running) in &mut self.weights {
                        let now = theta(name).to_kind(running.kind());
                        let ema = self.ema.get_mut(name).expect("same names");
                        let _ = ema.g_mul_scalar_(1.0 - beta);
                        let _ = ema.g_add_(&(&now * beta));
                        running.copy_(&(&*ema + (&now - &self.theta0[name]) * alpha));
                    }
                }
            }
        }
    }

    /// What a checkpoint keeps: the average under the tensors' names (the file PPO's EMA
    /// always wrote), and for BEMA its θ_0 and EMA under `theta0.`/`ema.` and the step.
    fn state(&self) -> BTreeMap<String, Tensor> {
        let mut state: BTreeMap<String, Tensor> = self
            .weights
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        if let Average::Bema(_) = self.kind {
            for (prefix, part) in [("theta0.", &self.theta0), ("ema.", &self.ema)] {
                state.extend(
                    part.iter()
                        .map(|(k, t)| (format!("{prefix}{k}"), t.shallow_clone())),
                );
            }
            // As f64 (exact to 2^53), a kind the checkpoint files store.
            state.insert("steps".into(), Tensor::from_slice(&[self.steps as f64]));
        }
        state
    }

    /// Writes the average into checkpoint directory `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        checkpoint::save_file(&self.state(), &dir.join(self.kind.file()))
    }

    /// Restores the average from the first of `dirs` that holds it; whether one did.
    pub fn load(&mut self, dirs: &[&Path]) -> Result<bool> {
        let Some(path) = dirs
            .iter()
            .map(|d| d.join(self.kind.file()))
            .find(|p| p.exists())
        else {
            return Ok(false);
        };
        let steps = Tensor::from_slice(&[0f64]);
        let mut vars: HashMap<String, Tensor> = self
            .state()
            .into_iter()
            .filter(|(k, _)| k != "steps")
            .collect();
        if let Average::Bema(_) = self.kind {
            vars.insert("steps".into(), steps.shallow_clone());
        }
        checkpoint::load_file(&vars, &path)?;
        if let Average::Bema(_) = self.kind {
            self.steps = steps.double_value(&[0]) as u64;
        }
        Ok(true)
    }

    /// Runs `write` with the average in `model`'s trained tensors, then puts the model's
    /// own weights back.
    pub fn swapped_in<T>(&self, model: &Model, write: impl FnOnce() -> T) -> T {
        let _guard = tch::no_grad_guard();
        let mut vars = model.vs.variables();
        let own: Vec<(String, Tensor)> = self
            .weights
            .iter()
            .map(|(name, average)| {
                let var = vars.get_mut(name).expect("the average's model");
                let own = var.copy();
                var.copy_(average);
                (name.clone(), own)
            })
            .collect();
        let out = write();
        for (name, own) in own {
            vars.get_mut(&name)
                .expect("the average's model")
                .copy_(&own);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Head, ModelConfig, ModelOptions};

    fn tiny(seed: i64) -> Model {
        let raw = serde_json::json!({
            "model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1});
        let config = ModelConfig::from_json(raw, Path::new("config.json")).unwrap();
        tch::manual_seed(seed);
        Model::new(config, &ModelOptions::cpu(Head::Lm))
    }

    fn set_weights(model: &Model, from: &Model) {
        let _guard = tch::no_grad_guard();
        let src = from.named_tensors();
        for (name, mut t) in model.named_tensors() {
            t.copy_(&src[&name]);
        }
    }

    /// BEMA over five steps (τ = 1, φ = 2: θ_0 at step 1, updates at 3 and 5) equals the
    /// formula written out, and a checkpointed copy continues identically.
    #[test]
    fn bema_follows_its_formula_and_resumes() {
        let args = BemaArgs {
            bema: true,
            bema_update_freq: 2,
            bema_ema_power: 0.5,
            bema_bias_power: 0.2,
            bema_lag: 3.0,
            bema_update_after: 1,
            bema_multiplier: 1.5,
            bema_min_ema_multiplier: 0.0,
        };
        let model = tiny(0);
        let thetas: Vec<Model> = (1..=6).map(tiny).collect();
        let mut avg = WeightAverage::new(Average::Bema(args.clone()), &model);
        let name = "model.layers.0.mlp.up_proj.weight";
        let p = |m: &Model| m.named_tensors()[name].detach().copy();
        let (mut theta0, mut ema, mut bema) = (p(&model), p(&model), p(&model));
        let dir = tempfile::tempdir().unwrap();
        for (i, theta) in thetas.iter().enumerate() {
            let t = i as u64 + 1;
            set_weights(&model, theta);
            avg.update(&model);
            if t == 1 {
                theta0 = p(theta);
                ema = p(theta);
            } else if (t - 1).is_multiple_of(2) {
                let base: f64 = 3.0 + 1.5 * t as f64;
                let (beta, alpha) = (base.powf(-0.5), base.powf(-0.2));
                ema = &ema * (1.0 - beta) + p(theta) * beta;
                bema = &ema + (p(theta) - &theta0) * alpha;
            }
            let diff = (&avg.weights[name] - &bema).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "step {t}: {diff:e}");
            if t == 4 {
                avg.save(dir.path()).unwrap();
            }
        }
        // From the step-4 checkpoint, steps 5 and 6 again.
        let mut resumed = WeightAverage::new(Average::Bema(args), &tiny(9));
        assert!(resumed.load(&[dir.path()]).unwrap());
        for theta in &thetas[4..] {
            set_weights(&model, theta);
            resumed.update(&model);
        }
        for (k, t) in &avg.weights {
            assert!(t.equal(&resumed.weights[k]), "{k}");
        }
        // The average goes into the model for a write and comes out again.
        let before = p(&model);
        let inside = avg.swapped_in(&model, || p(&model));
        assert!(inside.equal(&bema));
        assert!(p(&model).equal(&before));
    }

    /// PPO's EMA: decay·average + (1 − decay)·θ each step.
    #[test]
    fn ema_follows_its_formula() {
        let model = tiny(0);
        let name = "model.layers.0.mlp.up_proj.weight";
        let start = model.named_tensors()[name].copy();
        let mut avg = WeightAverage::new(Average::Ema { decay: 0.9 }, &model);
        let next = tiny(1);
        set_weights(&model, &next);
        avg.update(&model);
        let want = &start * 0.9 + next.named_tensors()[name].copy() * 0.1;
        let diff = (&avg.weights[name] - want).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{diff:e}");
    }
}
