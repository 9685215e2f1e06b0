//! Adapter directories as PEFT writes them — `adapter_config.json` and
//! `adapter_model.safetensors` (keys `base_model.model.<our name>`, and PEFT's own
//! `prompt_embeddings`) — for LoRA (`super::lora`) and prompt tuning
//! (`super::prompt_tuning`), and the switch that turns every adapter off (PEFT's
//! `disable_adapter()`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::lora::{LoraConfig, TargetModules};
use super::prompt_tuning::{self, PromptTuningConfig};
use crate::error::{Error, Result};

/// PEFT's prefix of every key in `adapter_model.safetensors`.
pub const KEY_PREFIX: &str = "base_model.model.";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// `config.json` keys a model directory would carry that an adapter directory keeps in
/// `adapter_config.json` instead: a reward model's normalisation (see `common::scoring`).
pub const CARRIED_KEYS: &[&str] = &["rlhf_reward_bias", "rlhf_reward_std"];

thread_local! {
    static ADAPTERS_OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every adapter switched off, as PEFT's `disable_adapter()`: adapted layers
/// compute their base alone and a scalar head trained beside the adapters falls back to
/// the head it started from. This is how a LoRA policy is its own frozen reference.
pub fn without_adapters<T>(f: impl FnOnce() -> T) -> T {
    let before = ADAPTERS_OFF.with(|off| off.replace(true));
    let out = f();
    ADAPTERS_OFF.with(|off| off.set(before));
    out
}

/// Whether adapters take part in the forward pass on this thread.
pub fn adapters_enabled() -> bool {
    !ADAPTERS_OFF.with(|off| off.get())
}

/// The adapter an adapter directory holds.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterKind {
    Lora(LoraConfig),
    PromptTuning(PromptTuningConfig),
}

/// What an adapter directory says (`adapter_config.json`).
#[derive(Debug, Clone)]
pub struct AdapterDir {
    pub dir: PathBuf,
    pub kind: AdapterKind,
    /// `base_model_name_or_path` as written.
    pub base: Option<String>,
    /// The [`CARRIED_KEYS`] it holds.
    pub carried: serde_json::Map<String, Value>,
}

impl AdapterDir {
    /// `Some` when `dir` holds `adapter_config.json`.
    pub fn read(dir: &Path) -> Result<Option<AdapterDir>> {
        let path = dir.join(ADAPTER_CONFIG);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        let bad = |m: String| Error::config(&path, m);
        let kind = match v.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => AdapterKind::Lora(lora_config(&v).map_err(bad)?),
            Some("PROMPT_TUNING") => {
                AdapterKind::PromptTuning(PromptTuningConfig::from_peft(&v).map_err(bad)?)
            }
            other => {
                return Err(bad(format!(
                    "peft_type {other:?} is not supported (supported: LORA, PROMPT_TUNING)"
                )))
            }
        };
        let carried = CARRIED_KEYS
            .iter()
            .filter_map(|k| Some((k.to_string(), v.get(*k)?.clone())))
            .collect();
        Ok(Some(AdapterDir {
            dir: dir.to_path_buf(),
            kind,
            carried,
            base: v
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
        }))
    }

    /// The base model's directory: `explicit` (`--base-model`), else
    /// `base_model_name_or_path` — absolute, or relative to the adapter directory, or to the
    /// working directory.
    pub fn base_dir(&self, explicit: Option<&Path>) -> Result<PathBuf> {
        if let Some(dir) = explicit {
            return Ok(dir.to_path_buf());
        }
        let config = self.dir.join(ADAPTER_CONFIG);
        let Some(base) = &self.base else {
            return Err(Error::config(
                config,
                "base_model_name_or_path is missing: pass --base-model DIR",
            ));
        };
        let candidates = [self.dir.join(base), PathBuf::from(base)];
        candidates
            .into_iter()
            .find(|c| c.join("config.json").exists())
            .ok_or_else(|| {
                Error::config(
                    config,
                    format!("the base model '{base}' (base_model_name_or_path) is not a model directory here: pass --base-model DIR"),
                )
            })
    }
}

/// The LoRA settings of a PEFT `adapter_config.json`.
fn lora_config(v: &Value) -> std::result::Result<LoraConfig, String> {
    if let Some(bias) = v
        .get("bias")
        .and_then(Value::as_str)
        .filter(|b| *b != "none")
    {
        return Err(format!("bias '{bias}' is not supported (supported: none)"));
    }
    let r = v.get("r").and_then(Value::as_i64).unwrap_or(8);
    if r <= 0 {
        return Err(format!("r {r} must be at least 1"));
    }
    let target_modules = match v.get("target_modules") {
        Some(Value::String(s)) => TargetModules::parse(s),
        Some(Value::Array(a)) => TargetModules::Names(
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
        ),
        _ => TargetModules::Default,
    };
    Ok(LoraConfig {
        r,
        alpha: v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0),
        dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        target_modules,
        use_rslora: v.get("use_rslora").and_then(Value::as_bool) == Some(true),
        use_dora: v.get("use_dora").and_then(Value::as_bool) == Some(true),
    })
}

/// Whether one of our variables belongs to an adapter (LoRA's A and B, the virtual
/// tokens of prompt tuning): trained in f32, saved in the adapter file.
pub fn is_adapter_tensor(name: &str) -> bool {
    super::lora::is_adapter(name) || name == prompt_tuning::KEY
}

/// PEFT's key in `adapter_model.safetensors` for our variable `name`.
pub fn peft_key(name: &str) -> String {
    match name {
        prompt_tuning::KEY => name.to_string(),
        _ => format!("{KEY_PREFIX}{name}"),
    }
}
