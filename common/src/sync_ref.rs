//! TR-DPO's reference updates (`--sync-ref-model`; Gorbatovski et al. 2024, TRL's
//! `SyncRefModelCallback`): every few steps the frozen reference moves towards the policy,
//! `reference ← α·policy + (1 − α)·reference`. The moved reference is part of the run's
//! state, so checkpoints keep it (`ref_model.safetensors`) and `--resume` restores it.
//! `dpo train --bema-update-ref-model` moves it the other way TRL knows: the reference takes
//! the policy's BEMA ([`take_average`]), kept and restored the same way.

use std::collections::HashMap;
use std::path::Path;

use crate::checkpoint;
use crate::error::Result;
use crate::models::Model;
use crate::world::World;

/// The reference's weights in a checkpoint directory (once it has moved).
pub const FILE: &str = "ref_model.safetensors";

/// Refuses a reference that cannot move towards the policy: one whose tensors differ from
/// the policy's in name or shape (a `--ref-model` of another architecture).
pub fn check(reference: &Model, policy: &Model) -> Result<()> {
    let policy = policy.named_tensors();
    for (name, r) in reference.named_tensors() {
        let fits = policy.get(&name).is_some_and(|p| p.size() == r.size());
        if !fits {
            return Err(crate::error::Error::InvalidArgument(format!(
                "--sync-ref-model: the reference's {name} {:?} has no counterpart of that shape in the policy (the reference must be a model of the policy's architecture)",
                r.size()
            )));
        }
    }
    Ok(())
}

/// `reference ← α·policy + (1 − α)·reference`, tensor by tensor. The reference is a frozen
/// copy of the policy's starting weights, so both have the same tensors.
pub fn mix(reference: &Model, policy: &Model, alpha: f64) {
    let _guard = tch::no_grad_guard();
    let policy = policy.named_tensors();
    for (name, mut r) in reference.named_tensors() {
        if crate::models::quant::is_state(&name) || !r.is_floating_point() {
            // A 4-bit base: frozen in both, the same bytes (a blend of them is not one).
            continue;
        }
        let p = policy
            .get(&name)
            .unwrap_or_else(|| panic!("the policy has no tensor {name} for its reference"));
        let _ = r.lerp_(&p.to_kind(r.kind()), alpha);
    }
}

/// The reference takes the policy's BEMA (`dpo train --bema-update-ref-model`): each of
/// the policy's trained tensors from `average`, which the main rank holds, on every rank.
/// Tensors the policy does not train stay as they are (with full training: none).
pub fn take_average(
    reference: &Model,
    policy: &Model,
    average: Option<&crate::averaging::WeightAverage>,
    world: &World,
) {
    let _guard = tch::no_grad_guard();
    let references = reference.named_tensors();
    for (name, p) in policy.named_tensors() {
        if !p.requires_grad() {
            continue;
        }
        let mut r = references[&name].shallow_clone();
        match average {
            Some(a) => {
                r.copy_(&a.weights[&name]);
            }
            None => {
                let _ = r.zero_();
            }
        }
        if world.size() > 1 {
            // The main rank's average plus zeros: the average, exactly, on every rank.
            world.sum_(&r);
        }
    }
}

/// Writes the reference's weights into checkpoint directory `dir`.
pub fn save(reference: &Model, dir: &Path) -> Result<()> {
    checkpoint::save_file(&reference.named_tensors(), &dir.join(FILE))
}

/// Restores the reference's weights from checkpoint directory `dir` when it holds them
/// (a checkpoint from before the first update does not); whether it did.
pub fn restore(reference: &Model, dir: &Path) -> Result<bool> {
    let path = dir.join(FILE);
    if !path.exists() {
        return Ok(false);
    }
    let vars: HashMap<String, tch::Tensor> = reference.named_tensors().into_iter().collect();
    checkpoint::load_file(&vars, &path)?;
    tracing::info!("--sync-ref-model: the reference resumes as it had moved");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Head, ModelConfig, ModelOptions};

    /// α = 0.25 moves every reference tensor a quarter of the way to the policy's; the
    /// weights round-trip through a checkpoint file.
    #[test]
    fn mix_moves_the_reference_towards_the_policy() {
        let raw = serde_json::json!({
            "model_type": "llama", "vocab_size": 32, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1});
        let config = ModelConfig::from_json(raw, Path::new("config.json")).unwrap();
        let opts = ModelOptions::cpu(Head::Lm);
        tch::manual_seed(1);
        let policy = Model::new(config.clone(), &opts);
        tch::manual_seed(2);
        let reference = Model::new(config.clone(), &opts);
        let before = reference.named_tensors();
        let before: HashMap<String, tch::Tensor> =
            before.into_iter().map(|(k, t)| (k, t.copy())).collect();
        mix(&reference, &policy, 0.25);
        let p = policy.named_tensors();
        for (name, r) in reference.named_tensors() {
            let want = &before[&name] * 0.75 + &p[&name] * 0.25;
            let diff = (r - want).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{name}: {diff:e}");
        }
        let dir = tempfile::tempdir().unwrap();
        save(&reference, dir.path()).unwrap();
        tch::manual_seed(3);
        let fresh = Model::new(config.clone(), &opts);
        assert!(restore(&fresh, dir.path()).unwrap());
        let (a, b) = (fresh.named_tensors(), reference.named_tensors());
        for (name, t) in a {
            assert!(t.equal(&b[&name]), "{name}");
        }
        assert!(!restore(&fresh, &dir.path().join("none")).unwrap());
    }
}
