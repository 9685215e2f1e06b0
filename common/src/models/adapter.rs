//! Adapter directories as PEFT writes them — `adapter_config.json` and
//! `adapter_model.safetensors` (keys `base_model.model.<our name>`, and PEFT's own
//! `prompt_embeddings`) — for LoRA (`super::lora`) and prompt tuning
//! (`super::prompt_tuning`), and the switch that turns every adapter off (PEFT's
//! `disable_adapter()`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::lora::{self, LayerPatterns, LoraConfig, LoraInit, TargetModules};
use super::prompt_tuning::{self, PromptKind, PromptTuningConfig};
use crate::error::{Error, Result};

/// PEFT's prefix of every key in `adapter_model.safetensors`.
pub const KEY_PREFIX: &str = "base_model.model.";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// `config.json` keys a model directory would carry that an adapter directory keeps in
/// `adapter_config.json` instead: a reward model's normalisation (see `common::scoring`).
pub const CARRIED_KEYS: &[&str] = &["rlhf_reward_bias", "rlhf_reward_std"];
/// How the base was held while the adapter trained (`transformers`' `BitsAndBytesConfig`
/// as JSON), in `adapter_config.json` of a QLoRA adapter: loading the adapter loads its
/// base the same way, so it computes what it computed in training (PEFT ignores the key).
pub const BASE_QUANTIZATION: &str = "rlhf_base_quantization_config";

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
    /// [`BASE_QUANTIZATION`]: the base was held in 4 bits while it trained.
    pub quantization: Option<super::quant::Bnb4bit>,
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
            Some("PROMPT_TUNING") => AdapterKind::PromptTuning(
                PromptTuningConfig::from_peft(&v, PromptKind::Input).map_err(bad)?,
            ),
            Some("PREFIX_TUNING") => AdapterKind::PromptTuning(
                PromptTuningConfig::from_peft(&v, PromptKind::Prefix).map_err(bad)?,
            ),
            other => {
                return Err(bad(format!(
                    "peft_type {other:?} is not supported (supported: LORA, PROMPT_TUNING, PREFIX_TUNING)"
                )))
            }
        };
        let carried = CARRIED_KEYS
            .iter()
            .filter_map(|k| Some((k.to_string(), v.get(*k)?.clone())))
            .collect();
        let quantization = v
            .get(BASE_QUANTIZATION)
            .map(super::quant::Bnb4bit::from_json)
            .transpose()
            .map_err(|m| bad(format!("{BASE_QUANTIZATION}: {m}")))?;
        Ok(Some(AdapterDir {
            dir: dir.to_path_buf(),
            kind,
            carried,
            quantization,
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

/// LoRA settings of `adapter_config.json` that change what the adapter computes and that
/// we do not implement: refused when set, never ignored.
const UNSUPPORTED_LORA_KEYS: &[&str] = &[
    "lora_bias",
    "layer_replication",
    "use_qalora",
    "use_bdlora",
    "alora_invocation_tokens",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
];

/// Whether a config value is set (not null, false, empty or zero).
fn is_set(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::Number(n) => n.as_f64() != Some(0.0),
    }
}

/// The LoRA settings of a PEFT `adapter_config.json`, PEFT's per-layer patterns included.
/// A list of token ids (`trainable_token_indices`).
fn ids_list(v: &Value) -> std::result::Result<Vec<i64>, String> {
    v.as_array()
        .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
        .filter(|ids| ids.iter().all(|&i| i >= 0))
        .ok_or_else(|| format!("trainable_token_indices {v} must be a list of token ids"))
}

fn lora_config(v: &Value) -> std::result::Result<LoraConfig, String> {
    if let Some(bias) = v
        .get("bias")
        .and_then(Value::as_str)
        .filter(|b| *b != "none")
    {
        return Err(format!("bias '{bias}' is not supported (supported: none)"));
    }
    if let Some(key) = UNSUPPORTED_LORA_KEYS
        .iter()
        .find(|k| v.get(**k).is_some_and(is_set))
    {
        return Err(format!("{key} {} is not supported", v[*key]));
    }
    // A SEQ_CLS adapter's trained head is PEFT's modules_to_save ["classifier", "score"];
    // the input embedding and the LM head are copied (lora::LoraConfig::modules_to_save);
    // full copies of other layers are not implemented.
    let mut modules_to_save = vec![];
    if let Some(Value::Array(names)) = v.get("modules_to_save") {
        for n in names {
            let name = n.as_str().unwrap_or_default();
            if lora::SCORE_NAMES.contains(&name) {
                continue;
            }
            if !lora::is_embedding_name(name) && name != "lm_head" {
                return Err(format!(
                    "modules_to_save {n} is not supported (supported: the score head of a SEQ_CLS adapter, embed_tokens, wte, lm_head)"
                ));
            }
            modules_to_save.push(name.to_string());
        }
    }
    // trainable_token_indices: a list (the input embedding's rows), or PEFT's dict form
    // with the embedding's name as its one key.
    let trainable_token_indices: Vec<i64> = match v.get("trainable_token_indices") {
        None | Some(Value::Null) => vec![],
        Some(Value::Object(m)) => {
            let mut found = vec![];
            for (k, ids) in m {
                if !lora::is_embedding_name(k) {
                    return Err(format!(
                        "trainable_token_indices for {k} is not supported (only the input embedding: embed_tokens, wte)"
                    ));
                }
                found = ids_list(ids)?;
            }
            found
        }
        Some(ids) => ids_list(ids)?,
    };
    if !trainable_token_indices.is_empty() && v.get("ensure_weight_tying").is_some_and(is_set) {
        return Err(
            "ensure_weight_tying true with trainable_token_indices is not supported".into(),
        );
    }
    if !trainable_token_indices.is_empty()
        && modules_to_save.iter().any(|n| lora::is_embedding_name(n))
    {
        return Err(
            "trainable_token_indices with the embedding in modules_to_save is not supported (the copy already trains every row)"
                .into(),
        );
    }
    if !modules_to_save.is_empty() && v.get("ensure_weight_tying").is_some_and(is_set) {
        return Err(
            "ensure_weight_tying true with modules_to_save is not supported (the copies are made untied, PEFT's default)"
                .into(),
        );
    }
    let r = v.get("r").and_then(Value::as_i64).unwrap_or(8);
    if r <= 0 {
        return Err(format!("r {r} must be at least 1"));
    }
    let get = |k: &str| v.get(k).unwrap_or(&Value::Null);
    let target_modules = TargetModules::from_peft(get("target_modules"), "target_modules")?
        .unwrap_or(TargetModules::Default);
    let exclude_modules = TargetModules::from_peft(get("exclude_modules"), "exclude_modules")?;
    let layers_to_transform = match get("layers_to_transform") {
        Value::Null => None,
        Value::Number(n) => Some(vec![n
            .as_i64()
            .ok_or("layers_to_transform must be integers")?]),
        Value::Array(a) => Some(
            a.iter()
                .map(Value::as_i64)
                .collect::<Option<Vec<_>>>()
                .ok_or("layers_to_transform must be integers")?,
        ),
        _ => return Err("layers_to_transform must be an integer or a list of integers".into()),
    };
    let layers_pattern = match get("layers_pattern") {
        Value::Null => vec![],
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|p| p.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or("layers_pattern must be a string or a list of strings")?,
        _ => return Err("layers_pattern must be a string or a list of strings".into()),
    };
    let pattern = |field: &str| -> std::result::Result<Vec<(String, f64)>, String> {
        match get(field) {
            Value::Null => Ok(vec![]),
            Value::Object(o) => o
                .iter()
                .map(|(k, x)| {
                    super::lora::key_regex(k)
                        .map_err(|e| format!("{field}[{k:?}] is not a regular expression: {e}"))?;
                    x.as_f64()
                        .filter(|x| *x > 0.0)
                        .map(|x| (k.clone(), x))
                        .ok_or_else(|| format!("{field}[{k:?}] must be a positive number"))
                })
                .collect(),
            _ => Err(format!("{field} must be an object of module keys")),
        }
    };
    let rank_pattern = pattern("rank_pattern")?
        .into_iter()
        .map(|(k, r)| (k, r as i64))
        .collect();
    Ok(LoraConfig {
        r,
        alpha: v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0),
        dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        target_modules,
        use_rslora: v.get("use_rslora").and_then(Value::as_bool) == Some(true),
        use_dora: v.get("use_dora").and_then(Value::as_bool) == Some(true),
        init: LoraInit::from_peft(get("init_lora_weights"))?,
        modules_to_save,
        trainable_token_indices,
        target_parameters: match get("target_parameters") {
            Value::Null => vec![],
            Value::Array(a) => a
                .iter()
                .map(|n| n.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or("target_parameters must be a list of strings")?,
            _ => return Err("target_parameters must be a list of strings".into()),
        },
        patterns: LayerPatterns {
            exclude_modules,
            layers_to_transform,
            layers_pattern,
            rank_pattern,
            alpha_pattern: pattern("alpha_pattern")?,
        },
    })
}

/// Whether one of our variables belongs to an adapter (LoRA's A and B, the virtual
/// tokens of prompt tuning): trained in f32, saved in the adapter file.
pub fn is_adapter_tensor(name: &str) -> bool {
    super::lora::is_adapter(name) || name == prompt_tuning::KEY
}

/// PEFT's key in `adapter_model.safetensors` for our variable `name`.
pub fn peft_key(name: &str) -> String {
    let saved = format!(".{}.weight", lora::SAVED);
    match name {
        prompt_tuning::KEY => name.to_string(),
        // A modules_to_save copy is written as the module's own weight.
        _ => match name.strip_suffix(&saved) {
            Some(module) => format!("{KEY_PREFIX}{module}.weight"),
            None => format!("{KEY_PREFIX}{name}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Settings that change what a PEFT adapter computes are read, or refused by name;
    /// never ignored.
    #[test]
    fn peft_lora_settings_are_read_or_refused() {
        let base = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj"], "lora_bias": false, "layer_replication": null,
            "modules_to_save": null, "rank_pattern": {}, "alpha_pattern": {}});
        let cfg = lora_config(&base).unwrap();
        assert_eq!(cfg.patterns, LayerPatterns::default());
        let with = |k: &str, v: Value| {
            let mut c = base.clone();
            c[k] = v;
            lora_config(&c)
        };
        let refused = [
            ("lora_bias", json!(true), "lora_bias true is not supported"),
            ("use_qalora", json!(true), "use_qalora true is not supported"),
            (
                "modules_to_save",
                json!(["lm_head", "mlp"]),
                "modules_to_save \"mlp\" is not supported (supported: the score head of a SEQ_CLS adapter, embed_tokens, wte, lm_head)",
            ),
            (
                "target_modules",
                json!("q_proj("),
                "target_modules 'q_proj(' is not a regular expression",
            ),
            (
                "init_lora_weights",
                json!("corda"),
                "init_lora_weights 'corda' is not supported (supported: true, false, gaussian, eva, orthogonal, pissa, olora)",
            ),
            (
                "init_lora_weights",
                json!("pissa_niter_4"),
                "init_lora_weights 'pissa_niter_4' is not supported",
            ),
            (
                "rank_pattern",
                json!({"v_proj": 0}),
                "rank_pattern[\"v_proj\"] must be a positive number",
            ),
            (
                "alpha_pattern",
                json!({"q_proj(": 16}),
                "alpha_pattern[\"q_proj(\"] is not a regular expression",
            ),
        ];
        for (key, value, message) in refused {
            let err = with(key, value).unwrap_err();
            assert!(err.starts_with(message), "{key}: {err}");
        }
        assert!(with("modules_to_save", json!(["classifier", "score"])).is_ok());
        let saved = with("modules_to_save", json!(["embed_tokens", "lm_head"])).unwrap();
        assert!(saved.saves_embedding() && saved.saves_lm_head());
        for (init, want) in [
            (json!(false), LoraInit::Kaiming),
            (json!("gaussian"), LoraInit::Gaussian),
            (json!("eva"), LoraInit::Kaiming),
            (json!("pissa"), LoraInit::Pissa),
            (json!("olora"), LoraInit::Olora),
        ] {
            assert_eq!(with("init_lora_weights", init).unwrap().init, want);
        }
        let cfg = with("layers_to_transform", json!(1)).unwrap();
        assert!(cfg.targets("model.layers.1.self_attn.q_proj"));
        assert!(!cfg.targets("model.layers.0.self_attn.q_proj"));
        // A whole path given as a target ignores layers_to_transform, as in PEFT.
        let mut c = base.clone();
        c["target_modules"] = json!(["model.layers.0.self_attn.q_proj"]);
        c["layers_to_transform"] = json!([1]);
        assert!(lora_config(&c)
            .unwrap()
            .targets("model.layers.0.self_attn.q_proj"));
        let cfg = with("rank_pattern", json!({"layers.1.self_attn.q_proj": 2})).unwrap();
        assert_eq!(cfg.rank("model.layers.1.self_attn.q_proj"), 2);
        assert_eq!(cfg.rank("model.layers.0.self_attn.q_proj"), 4);
        assert_eq!(cfg.scaling("model.layers.1.self_attn.q_proj"), 4.0);
    }
}
