//! LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as PEFT
//! implements it (`peft/tuners/lora/layer.py`): a target layer `y = W·x + b` becomes
//! `y = W·x + b + B·A·dropout(x) · scaling` with `A` `[r, in]` (Kaiming-uniform, a = √5)
//! and `B` `[out, r]` (zeros, so step 0 is the base model exactly), `scaling = α / r`
//! (`α / √r` with rsLoRA). The base weights are frozen; only `A` and `B` train, in f32
//! whatever the base's dtype. GPT-2's Conv1D (`fan_in_fan_out`) gets the same `A` and `B`
//! shapes; only merging transposes the update.
//!
//! DoRA (Liu et al. 2024, PEFT's `use_dora`, `peft/tuners/lora/dora.py`) splits the adapted
//! weight into a trained magnitude `m` `[out]` and a direction: the layer computes
//! `m / ‖W + scaling·B·A‖ · (W + scaling·B·A)·x + b`, the row norm held constant in the
//! backward pass (the paper's §4.3, as PEFT). `m` starts as that norm with `B = 0`, so step
//! 0 is still the base model exactly; it is initialised once the base weights are loaded
//! ([`dora_magnitude`]).
//!
//! PiSSA (Meng et al. 2024) and OLoRA (Büyükakyüz 2024), PEFT's `init_lora_weights`
//! `"pissa"` and `"olora"`, start `A` and `B` from the base weight instead (its top `r`
//! singular directions; its QR factors) and replace the base by the residual
//! `W − scaling·B·A`, so step 0 is the base model up to rounding ([`moved_start`]). The
//! starting `A₀`, `B₀` stay beside the adapter, frozen: with adapters switched off the layer
//! computes `W − scaling·B₀·A₀ + scaling·B₀·A₀ = W`, the base it started from (the
//! reference of PPO and DPO), and on disk the adapter is written as PEFT's
//! `path_initial_model_for_weight_conversion` writes it: a plain LoRA adapter of rank 2r,
//! `[A; A₀]` and `[B, −B₀]`, on the unchanged base ([`LoraConfig::converted`]).
//!
//! On disk an adapter is PEFT's directory (`super::adapter`): `adapter_config.json` and
//! `adapter_model.safetensors` with keys `base_model.model.<module>.lora_{A,B}.weight`
//! (and `….lora_magnitude_vector` with DoRA).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use super::adapter::adapters_enabled;
use super::ModelType;

/// Which layers get an adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TargetModules {
    /// PEFT's default for the architecture (`c_attn` for GPT-2, `q_proj`, `v_proj` for the
    /// Llama family).
    Default,
    /// Every linear (and Conv1D) layer except the output head.
    AllLinear,
    /// Module names: a layer matches when its path is the name or ends with `.name`.
    Names(Vec<String>),
    /// A regular expression the whole path must match (PEFT's `target_modules` given as
    /// a string in `adapter_config.json`).
    Regex(String),
}

impl TargetModules {
    /// `--lora-target-modules`: `all-linear` or a comma-separated list.
    pub fn parse(s: &str) -> Self {
        if s.eq_ignore_ascii_case("all-linear") {
            TargetModules::AllLinear
        } else {
            TargetModules::Names(names(s))
        }
    }

    /// PEFT's `target_modules` or `exclude_modules` value: a list of names, or a string
    /// (`all-linear`, else a regular expression).
    pub fn from_peft(v: &Value, field: &str) -> std::result::Result<Option<Self>, String> {
        Ok(match v {
            Value::Null => None,
            Value::String(s) if s.eq_ignore_ascii_case("all-linear") => {
                Some(TargetModules::AllLinear)
            }
            Value::String(s) => {
                compile(s)
                    .map_err(|e| format!("{field} '{s}' is not a regular expression: {e}"))?;
                Some(TargetModules::Regex(s.clone()))
            }
            Value::Array(a) => Some(TargetModules::Names(
                a.iter()
                    .map(|n| n.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or_else(|| format!("{field} must be a string or a list of strings"))?,
            )),
            _ => return Err(format!("{field} must be a string or a list of strings")),
        })
    }

    /// Whether the layer at `module` matches (`Default` must be resolved first), and
    /// whether it matched by its whole path (PEFT then ignores `layers_to_transform`).
    fn matches(&self, module: &str) -> (bool, bool) {
        match self {
            TargetModules::AllLinear => (true, false),
            TargetModules::Default => (false, false),
            TargetModules::Names(names) => (
                names.iter().any(|n| matches(module, n)),
                names.iter().any(|n| n == module),
            ),
            TargetModules::Regex(re) => {
                let hit = full_match(re, module);
                (hit, hit)
            }
        }
    }
}

/// The names of a comma-separated option value (`--lora-target-modules`,
/// `--lora-target-parameters`, `--lora-modules-to-save`), trimmed, empty ones dropped.
pub fn names(s: &str) -> Vec<String> {
    s.split(',')
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

/// `pattern` anchored at both ends, as Python's `re.fullmatch`.
fn compile(pattern: &str) -> std::result::Result<fancy_regex::Regex, String> {
    fancy_regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| e.to_string())
}

fn full_match(pattern: &str, text: &str) -> bool {
    compile(pattern).is_ok_and(|re| re.is_match(text).unwrap_or(false))
}

/// PEFT's per-layer selections and overrides, read from an adapter's
/// `adapter_config.json` (none from the command line): `exclude_modules`,
/// `layers_to_transform` with `layers_pattern`, `rank_pattern` and `alpha_pattern`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LayerPatterns {
    pub exclude_modules: Option<TargetModules>,
    pub layers_to_transform: Option<Vec<i64>>,
    pub layers_pattern: Vec<String>,
    /// (key, rank): the first key that matches a layer's path (`(.*\.)?key$`) sets its rank.
    pub rank_pattern: Vec<(String, i64)>,
    /// (key, α), matched as `rank_pattern`.
    pub alpha_pattern: Vec<(String, f64)>,
}

impl LayerPatterns {
    /// The layer index in `module` (`model.layers.3.mlp.up_proj` → 3), PEFT's rule.
    fn layer_index(&self, module: &str) -> Option<i64> {
        let pattern = if self.layers_pattern.is_empty() {
            r"^.*?\.[^.]*\.(\d+)\.".to_string()
        } else {
            format!(r"^(?:.*?\.)?(?:{})\.(\d+)\.", self.layers_pattern.join("|"))
        };
        let re = fancy_regex::Regex::new(&pattern).ok()?;
        re.captures(module).ok()??.get(1)?.as_str().parse().ok()
    }

    /// The value of the first key of `pattern` that matches `module` (PEFT's
    /// `get_pattern_key`).
    fn lookup<T: Copy>(pattern: &[(String, T)], module: &str) -> Option<T> {
        pattern
            .iter()
            .find(|(key, _)| key_regex(key).is_ok_and(|re| re.is_match(module).unwrap_or(false)))
            .map(|(_, v)| *v)
    }
}

/// A `rank_pattern` or `alpha_pattern` key as PEFT matches it against a layer's path:
/// `(.*\.)?key$` from the start; an error names what is wrong with the expression.
pub fn key_regex(key: &str) -> std::result::Result<fancy_regex::Regex, String> {
    fancy_regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| e.to_string())
}

/// DoRA's magnitude vector under a module's path (PEFT's key, without `.weight`).
pub const MAGNITUDE: &str = "lora_magnitude_vector";
/// PiSSA's and OLoRA's frozen start beside `lora_A.weight` and `lora_B.weight`
/// (`<module>.lora_A.initial_weight`); never written as such (see [`LoraConfig::converted`]).
pub const INITIAL: &str = "initial_weight";
/// [`INITIAL`] under `lora_A` and `lora_B`: the start's names within its module.
pub const INITIAL_A: &str = "lora_A.initial_weight";
pub const INITIAL_B: &str = "lora_B.initial_weight";

/// Whether one of our variables is PiSSA's or OLoRA's frozen start (a copy, not a
/// parameter).
pub fn is_initial(name: &str) -> bool {
    name.ends_with(INITIAL_A) || name.ends_with(INITIAL_B)
}

/// Whether a variable name is an adapter's (`….lora_A.weight`, `….lora_B.weight`,
/// `….lora_magnitude_vector`).
pub fn is_adapter(name: &str) -> bool {
    name.contains(".lora_A.")
        || name.contains(".lora_B.")
        || name.ends_with(MAGNITUDE)
        || name.ends_with(&format!(".{SAVED}.weight"))
        || name.ends_with(TOKEN_DELTA)
}

/// PEFT's rule: a module matches a target name when its path is the name or ends with
/// `.name`.
pub fn matches(module: &str, name: &str) -> bool {
    module == name || module.ends_with(&format!(".{name}"))
}

/// PEFT's `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING` for our architectures; where
/// it has none (PEFT then asks for `target_modules`: Phi-3, the MoE models but Mixtral,
/// SmolLM3, OLMo 2 and 3, Granite), the Llama family's, or Phi-3's fused projection.
pub fn default_targets(model_type: ModelType) -> Vec<String> {
    match model_type {
        ModelType::Gpt2 => vec!["c_attn".into()],
        ModelType::Llama
        | ModelType::Mistral
        | ModelType::Qwen2
        | ModelType::Qwen3
        | ModelType::Mixtral
        | ModelType::Qwen2Moe
        | ModelType::Qwen3Moe
        | ModelType::Olmoe
        | ModelType::GptOss
        | ModelType::Smollm3
        | ModelType::Olmo2
        | ModelType::Olmo3
        | ModelType::Granite
        | ModelType::Gemma
        | ModelType::Gemma2
        | ModelType::Gemma3Text => {
            vec!["q_proj".into(), "v_proj".into()]
        }
        ModelType::Phi3 => vec!["qkv_proj".into()],
    }
}

/// How `A` and `B` start (PEFT's `init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LoraInit {
    /// `A` Kaiming-uniform (a = √5), `B` zeros (PEFT's `True`).
    #[default]
    #[value(name = "true")]
    #[serde(rename = "true")]
    Kaiming,
    /// `A` ~ N(0, 1/r²) (std 1/r), `B` zeros.
    Gaussian,
    /// PiSSA: `B·A` the base weight's top `r` singular triplets (√(σ/scaling) on each
    /// side), the base replaced by the residual.
    Pissa,
    /// OLoRA: `B`, `A` the first `r` columns and rows of the base weight's QR
    /// factors, the base replaced by the residual.
    Olora,
}

impl LoraInit {
    /// PEFT's `init_lora_weights` in `adapter_config.json`. Starts that leave the base weight
    /// as it is load as any adapter (the stored `A` and `B` are all that counts); PiSSA and
    /// OLoRA are redone on the base, as PEFT does when it loads them; the other starts that
    /// change the base are refused.
    pub fn from_peft(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::Null | Value::Bool(_) => Ok(LoraInit::Kaiming),
            Value::String(s) => match s.to_lowercase().as_str() {
                "gaussian" => Ok(LoraInit::Gaussian),
                "pissa" => Ok(LoraInit::Pissa),
                "olora" => Ok(LoraInit::Olora),
                "eva" | "orthogonal" => Ok(LoraInit::Kaiming),
                other => Err(format!(
                    "init_lora_weights '{other}' is not supported (supported: true, false, gaussian, eva, orthogonal, pissa, olora)"
                )),
            },
            other => Err(format!("init_lora_weights {other} is not supported")),
        }
    }

    /// Its name on the command line and in `adapter_config.json`.
    pub fn name(self) -> &'static str {
        match self {
            LoraInit::Kaiming => "true",
            LoraInit::Gaussian => "gaussian",
            LoraInit::Pissa => "pissa",
            LoraInit::Olora => "olora",
        }
    }

    /// Whether the start moves part of the base weight into `A` and `B`.
    pub fn moves_base(self) -> bool {
        matches!(self, LoraInit::Pissa | LoraInit::Olora)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
    /// DoRA: a trained magnitude per output row beside `A` and `B`.
    pub use_dora: bool,
    /// Per-layer selections and ranks of a PEFT adapter directory.
    pub patterns: LayerPatterns,
    /// How `A` and `B` start.
    pub init: LoraInit,
    /// PEFT's `modules_to_save` beyond a sequence classifier's head: full trainable copies
    /// of the input embedding (`embed_tokens`, GPT-2's `wte`) and of the LM head
    /// (`lm_head`), used while adapters are on; the originals stay frozen (tied ones
    /// become two independent copies, as PEFT makes them).
    pub modules_to_save: Vec<String>,
    /// PEFT's `trainable_token_indices`: these rows of the input embedding (and of a head
    /// tied to it) train, as a `[n, H]` tensor that replaces them while adapters are on.
    pub trainable_token_indices: Vec<i64>,
    /// PEFT's `target_parameters`: parameters (not modules) adapted by name, PEFT's
    /// `ParamWrapper` ([`ExpertsLora`]): gpt-oss's fused experts.
    pub target_parameters: Vec<String>,
}

/// The trainable rows' tensor under the embedding's path (PEFT's name).
pub const TOKEN_DELTA: &str = "token_adapter.trainable_tokens_delta";

/// The module names `modules_to_save` may hold: a sequence classifier's head (always
/// saved beside adapters), the input embedding and the LM head.
pub const EMBEDDING_NAMES: &[&str] = &["embed_tokens", "wte"];

/// Whether a `modules_to_save` (or `trainable_token_indices`) name is the input embedding:
/// one of [`EMBEDDING_NAMES`], alone or as the last part of a path.
pub fn is_embedding_name(name: &str) -> bool {
    EMBEDDING_NAMES.contains(&name.rsplit('.').next().unwrap_or(name))
}
pub const SCORE_NAMES: &[&str] = &["classifier", "score"];

/// A module path's copy under `modules_to_save` (`model.embed_tokens` →
/// `model.embed_tokens.modules_to_save.weight`); PEFT writes it as the module's own weight.
pub fn saved_copy(module: &str) -> String {
    format!("{module}.{SAVED}.weight")
}
/// The infix of [`saved_copy`] (PEFT's `modules_to_save`, without its adapter name).
pub const SAVED: &str = "modules_to_save";

impl LoraConfig {
    /// Whether `modules_to_save` names the input embedding.
    pub fn saves_embedding(&self) -> bool {
        self.modules_to_save.iter().any(|n| is_embedding_name(n))
    }

    /// Whether `modules_to_save` names the LM head.
    pub fn saves_lm_head(&self) -> bool {
        self.modules_to_save.iter().any(|n| n == "lm_head")
    }
}

impl LoraConfig {
    /// The rank of the layer at `module` (`rank_pattern`, else `r`).
    pub fn rank(&self, module: &str) -> i64 {
        LayerPatterns::lookup(&self.patterns.rank_pattern, module).unwrap_or(self.r)
    }

    /// The update's scale at `module`: α / r, or α / √r with rsLoRA (`alpha_pattern` and
    /// `rank_pattern` applied).
    pub fn scaling(&self, module: &str) -> f64 {
        let alpha =
            LayerPatterns::lookup(&self.patterns.alpha_pattern, module).unwrap_or(self.alpha);
        let r = self.rank(module) as f64;
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// The same config with `Default` targets spelled out for `model_type` (none beside
    /// `target_parameters`, as PEFT leaves `target_modules` unset then).
    pub fn resolved(&self, model_type: ModelType) -> Self {
        let target_modules = match &self.target_modules {
            TargetModules::Default if !self.target_parameters.is_empty() => {
                TargetModules::Names(vec![])
            }
            TargetModules::Default => TargetModules::Names(default_targets(model_type)),
            other => other.clone(),
        };
        LoraConfig {
            target_modules,
            ..self.clone()
        }
    }

    /// Whether the layer at `module` (its dotted path) gets an adapter (after
    /// [`LoraConfig::resolved`]), PEFT's `check_target_module_exists`: not when
    /// `exclude_modules` matches; with `layers_to_transform`, only in those layers (unless
    /// a name gave the whole path).
    pub fn targets(&self, module: &str) -> bool {
        let p = &self.patterns;
        if p.exclude_modules
            .as_ref()
            .is_some_and(|e| e.matches(module).0)
        {
            return false;
        }
        let (hit, whole_path) = self.target_modules.matches(module);
        match &p.layers_to_transform {
            Some(layers) if hit && !whole_path => {
                p.layer_index(module).is_some_and(|i| layers.contains(&i))
            }
            _ => hit,
        }
    }

    /// Whether `exclude_modules` names the layer at `module` (or a target name).
    pub fn excludes(&self, module: &str) -> bool {
        let exclude = self.patterns.exclude_modules.as_ref();
        exclude.is_some_and(|e| e.matches(module).0)
    }

    /// The plain adapter a PiSSA or OLoRA adapter is written as (PEFT's
    /// `path_initial_model_for_weight_conversion`): every rank doubled (`[A; A₀]`,
    /// `[B, −B₀]`), every α doubled (× √2 with rsLoRA) so each layer keeps its scale, the
    /// base left as it was.
    pub fn converted(&self) -> Self {
        let factor = if self.use_rslora {
            std::f64::consts::SQRT_2
        } else {
            2.0
        };
        let p = &self.patterns;
        LoraConfig {
            r: 2 * self.r,
            alpha: factor * self.alpha,
            init: LoraInit::Kaiming,
            patterns: LayerPatterns {
                rank_pattern: p
                    .rank_pattern
                    .iter()
                    .map(|(k, r)| (k.clone(), 2 * r))
                    .collect(),
                alpha_pattern: p
                    .alpha_pattern
                    .iter()
                    .map(|(k, a)| (k.clone(), factor * a))
                    .collect(),
                ..p.clone()
            },
            ..self.clone()
        }
    }

    /// `adapter_config.json` as PEFT writes it; `targets` are the adapted modules' names
    /// (written where the targets were not given as names or a regular expression).
    pub fn to_peft(
        &self,
        base: Option<&Path>,
        task_type: &str,
        targets: &[String],
        fan_in_fan_out: bool,
        modules_to_save: Option<Vec<String>>,
    ) -> Value {
        let p = &self.patterns;
        let target_modules = match &self.target_modules {
            TargetModules::Names(names) if names.is_empty() => Value::Null,
            TargetModules::Names(names) => json!(names),
            TargetModules::Regex(re) => json!(re),
            TargetModules::Default | TargetModules::AllLinear => json!(targets),
        };
        let exclude_modules = match &p.exclude_modules {
            Some(TargetModules::Names(names)) => json!(names),
            Some(TargetModules::Regex(re)) => json!(re),
            _ => Value::Null,
        };
        let layers_pattern = match p.layers_pattern.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let pattern = |kv: Vec<(&String, Value)>| {
            Value::Object(kv.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        };
        json!({
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base.map(|b| b.display().to_string()),
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": target_modules,
            "exclude_modules": exclude_modules,
            "fan_in_fan_out": fan_in_fan_out,
            "bias": "none",
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "modules_to_save": modules_to_save,
            "target_parameters": (!self.target_parameters.is_empty())
                .then_some(&self.target_parameters),
            "trainable_token_indices": (!self.trainable_token_indices.is_empty())
                .then_some(&self.trainable_token_indices),
            "init_lora_weights": match self.init {
                LoraInit::Kaiming => json!(true),
                init => json!(init.name()),
            },
            "inference_mode": true,
            "layers_to_transform": p.layers_to_transform,
            "layers_pattern": layers_pattern,
            "rank_pattern": pattern(p.rank_pattern.iter().map(|(k, v)| (k, json!(v))).collect()),
            "alpha_pattern": pattern(p.alpha_pattern.iter().map(|(k, v)| (k, json!(v))).collect()),
            "revision": null,
        })
    }
}

impl LoraConfig {
    /// Whether `target_parameters` names the parameter `param` (its dotted path): PEFT's
    /// rule, the path or a suffix after a dot.
    pub fn targets_parameter(&self, param: &str) -> bool {
        self.target_parameters.iter().any(|t| matches(param, t))
    }

    /// The targeted ones of `params` (a module's parameters, in their order) with the
    /// paths of their adapters, as PEFT nests its `ParamWrapper`s: each targeted parameter
    /// wraps the module again, the first innermost, so with n targeted the k-th adapter
    /// sits under `base_layer.` n − 1 − k times (`mlp.experts.base_layer.lora_A` for
    /// `gate_up_proj` beside `mlp.experts.lora_A` for `down_proj`).
    pub fn parameter_adapters(&self, module: &str, params: &[&str]) -> Vec<(String, String)> {
        let targeted: Vec<&&str> = params
            .iter()
            .filter(|p| self.targets_parameter(&format!("{module}.{p}")))
            .collect();
        let n = targeted.len();
        targeted
            .into_iter()
            .enumerate()
            .map(|(k, p)| {
                let path = format!("{module}{}", ".base_layer".repeat(n - 1 - k));
                (format!("{module}.{p}"), path)
            })
            .collect()
    }
}

/// LoRA on a 3-D expert parameter `W` `[E, in, out]` (PEFT's `ParamWrapper` on gpt-oss's
/// `gate_up_proj` and `down_proj`): `A` `[r·E, in]` and `B` `[out, r·E]` (initialised as
/// a layer's: Kaiming-uniform and zeros), expert e's update `scaling · A_eᵀ·B_eᵀ` with
/// `A_e` = `A` viewed `[E, r, in]` at e and `B_e` = `B` viewed `[out, r, E]` at e (PEFT's
/// `get_delta_weight`).
#[derive(Debug)]
pub struct ExpertsLora {
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
    experts: i64,
}

impl ExpertsLora {
    /// `lora_A.weight` and `lora_B.weight` under `p`, for the parameter `param`.
    pub fn new(
        p: &nn::Path,
        param: &str,
        (experts, in_dim, out_dim): (i64, i64, i64),
        cfg: &LoraConfig,
    ) -> Self {
        let r = cfg.rank(param);
        ExpertsLora {
            a: (p / "lora_A").var(
                "weight",
                &[r * experts, in_dim],
                a_init(cfg.init, r, in_dim),
            ),
            b: (p / "lora_B").var("weight", &[out_dim, r * experts], Init::Const(0.0)),
            scaling: cfg.scaling(param),
            experts,
        }
    }

    /// Expert `e`'s update of its output for inputs `x` `[n, in]` (zero while adapters
    /// are switched off): `scaling · (x·A_eᵀ)·B_eᵀ`, in `x`'s dtype.
    pub fn delta(&self, e: i64, x: &Tensor) -> Option<Tensor> {
        if !adapters_enabled() {
            return None;
        }
        let (a, b) = factors(&self.a, &self.b, self.experts);
        let y = x
            .to_kind(self.a.kind())
            .linear::<Tensor>(&a.get(e), None)
            .linear::<Tensor>(&b.select(2, e), None)
            * self.scaling;
        Some(y.to_kind(x.kind()))
    }
}

/// How `A` starts for rank `r` and `in_dim` inputs: Gaussian with std 1/r, else
/// `kaiming_uniform_(a=√5)`, whose bound √(6 / ((1 + a²)·fan_in)) is 1/√in (PiSSA and
/// OLoRA overwrite it once the base is loaded).
fn a_init(init: LoraInit, r: i64, in_dim: i64) -> Init {
    match init {
        LoraInit::Gaussian => Init::Randn {
            mean: 0.0,
            stdev: 1.0 / r as f64,
        },
        _ => {
            let bound = 1.0 / (in_dim as f64).sqrt();
            Init::Uniform {
                lo: -bound,
                up: bound,
            }
        }
    }
}

/// `A` `[r·E, in]` as `[E, r, in]` and `B` `[out, r·E]` as `[out, r, E]`.
fn factors(a: &Tensor, b: &Tensor, experts: i64) -> (Tensor, Tensor) {
    let (in_dim, out_dim) = (a.size()[1], b.size()[0]);
    (
        a.view([experts, -1, in_dim]),
        b.view([out_dim, -1, experts]),
    )
}

/// A 3-D expert parameter `[E, in, out]` with its [`ExpertsLora`] update folded in.
pub fn merged_experts(weight: &Tensor, a: &Tensor, b: &Tensor, scaling: f64) -> Tensor {
    let experts = weight.size()[0];
    let (a, b) = factors(&a.to_kind(Kind::Float), &b.to_kind(Kind::Float), experts);
    let delta = Tensor::einsum("ore,eri->eio", &[b, a], None::<&[i64]>) * scaling;
    (weight.to_kind(Kind::Float) + delta).to_kind(weight.kind())
}

/// One adapted layer's low-rank update (and DoRA's magnitude).
#[derive(Debug)]
pub struct LoraAdapter {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    /// DoRA's `m`, `[out]`.
    pub magnitude: Option<Tensor>,
    /// PiSSA's and OLoRA's starting `(A₀, B₀)`, frozen: what the base gave up.
    pub initial: Option<(Tensor, Tensor)>,
    pub scaling: f64,
    dropout: f64,
    /// GPT-2's Conv1D: the base weight is stored `[in, out]`.
    fan_in_fan_out: bool,
}

impl LoraAdapter {
    /// `lora_A.weight` and `lora_B.weight` (and DoRA's `lora_magnitude_vector`, ones until
    /// [`dora_magnitude`] sets it) under `p`, the adapted layer at `module`.
    pub fn new(
        p: &nn::Path,
        module: &str,
        (in_dim, out_dim): (i64, i64),
        cfg: &LoraConfig,
        fan_in_fan_out: bool,
    ) -> Self {
        let r = cfg.rank(module);
        let a = (p / "lora_A").var("weight", &[r, in_dim], a_init(cfg.init, r, in_dim));
        let b = (p / "lora_B").var("weight", &[out_dim, r], Init::Const(0.0));
        let magnitude = cfg
            .use_dora
            .then(|| p.var(MAGNITUDE, &[out_dim], Init::Const(1.0)));
        let initial = cfg.init.moves_base().then(|| {
            let frozen = |t: Tensor| t.set_requires_grad(false);
            (
                frozen((p / "lora_A").var(INITIAL, &[r, in_dim], Init::Const(0.0))),
                frozen((p / "lora_B").var(INITIAL, &[out_dim, r], Init::Const(0.0))),
            )
        });
        LoraAdapter {
            a,
            b,
            magnitude,
            initial,
            scaling: cfg.scaling(module),
            dropout: cfg.dropout,
            fan_in_fan_out,
        }
    }

    /// The adapted layer's output for its base output `y = W·x + b` (just `y` while
    /// adapters are switched off); `weight` and `bias` are the base layer's, for DoRA.
    pub fn add_to(&self, y: Tensor, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
        if !adapters_enabled() {
            // The base it started from: PiSSA's and OLoRA's residual gets its start back.
            return match &self.initial {
                Some((a0, b0)) => {
                    let start = x
                        .to_kind(a0.kind())
                        .linear::<Tensor>(a0, None)
                        .linear::<Tensor>(b0, None)
                        * self.scaling;
                    y + start.to_kind(x.kind())
                }
                None => y,
            };
        }
        let xa = x.to_kind(self.a.kind());
        let dropout = self.dropout > 0.0 && super::grad_enabled();
        let xa = if dropout {
            xa.dropout(self.dropout, true)
        } else {
            xa
        };
        let lora = xa
            .linear::<Tensor>(&self.a, None)
            .linear::<Tensor>(&self.b, None)
            * self.scaling;
        let Some(m) = &self.magnitude else {
            return y + lora.to_kind(x.kind());
        };
        // PEFT's DoraLinearLayer.forward: y + (m/‖W + ΔW‖ − 1)·W·x + m/‖W + ΔW‖·ΔW·x, where
        // W·x is the base output without its bias (recomputed on the dropped-out input
        // while dropout is active).
        let w = out_in(weight, self.fan_in_fan_out).to_kind(self.a.kind());
        let norm = {
            let _guard = tch::no_grad_guard();
            weight_norm(&w, &low_rank(&self.a, &self.b, self.scaling))
        };
        let scale = m / norm;
        let base = if dropout {
            xa.linear::<Tensor>(&w, None)
        } else {
            match bias {
                Some(b) => &y - b,
                None => y.shallow_clone(),
            }
            .to_kind(self.a.kind())
        };
        y + ((&scale - 1.0) * base + scale * lora).to_kind(x.kind())
    }
}

/// A base weight as `[out, in]` (GPT-2's Conv1D stores it `[in, out]`).
fn out_in(weight: &Tensor, fan_in_fan_out: bool) -> Tensor {
    if fan_in_fan_out {
        weight.transpose(0, 1)
    } else {
        weight.shallow_clone()
    }
}

/// `‖W + ΔW‖` per output row, `[out]`, in f32 (PEFT's `get_weight_norm`); `w` and `delta`
/// are `[out, in]`.
fn weight_norm(w: &Tensor, delta: &Tensor) -> Tensor {
    (w.to_kind(Kind::Float) + delta).linalg_norm(2.0, [1].as_slice(), false, Kind::Float)
}

/// DoRA's starting magnitude: the row norms of the adapted weight (`weight` as stored,
/// `a`, `b` and `scaling` as in [`LoraAdapter`]), as PEFT's `update_layer` sets it.
pub fn dora_magnitude(
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    fan_in_fan_out: bool,
) -> Tensor {
    let delta = low_rank(a, b, scaling);
    weight_norm(&out_in(weight, fan_in_fan_out), &delta)
}

/// `scaling · B·A` in f32, `[out, in]`.
fn low_rank(a: &Tensor, b: &Tensor, scaling: f64) -> Tensor {
    b.to_kind(Kind::Float).matmul(&a.to_kind(Kind::Float)) * scaling
}

/// A residual base weight (as stored) re-based from one start `(A₀, B₀)` to another:
/// `W + scaling·B₀·A₀ − scaling·B₁·A₁` (a resumed run whose checkpoint holds another start
/// than the one just computed from the base).
pub fn rebased(
    weight: &Tensor,
    (a0, b0): (&Tensor, &Tensor),
    (a1, b1): (&Tensor, &Tensor),
    scaling: f64,
    fan_in_fan_out: bool,
) -> Tensor {
    let w = out_in(weight, fan_in_fan_out).to_kind(Kind::Float) + low_rank(a0, b0, scaling)
        - low_rank(a1, b1, scaling);
    out_in(&w, fan_in_fan_out).to_kind(weight.kind())
}

/// PiSSA's or OLoRA's start from a base weight (as stored; PEFT's `pissa_init`,
/// `olora_init`): `(A, B, residual)`, `A` `[r, in]` and `B` `[out, r]` in f32 and the
/// residual `W − scaling·B·A` as stored, in the weight's dtype, so that
/// `residual + scaling·B·A` is the weight up to rounding. PiSSA: `W = U·S·Vᴴ`,
/// `A = √(S_r / scaling)·Vᴴ_r`, `B = U_r·√(S_r / scaling)`; OLoRA: `W = Q·R`, `A = R_r`,
/// `B = Q_r`. `None` when `r` is more than the weight's rank can be.
pub fn moved_start(
    init: LoraInit,
    weight: &Tensor,
    r: i64,
    scaling: f64,
    fan_in_fan_out: bool,
) -> Option<(Tensor, Tensor, Tensor)> {
    let w = out_in(weight, fan_in_fan_out).to_kind(Kind::Float);
    let size = w.size();
    if r > size[0].min(size[1]) {
        return None;
    }
    let (a, b) = match init {
        LoraInit::Pissa => {
            // torch.svd is linalg_svd with the default driver, as PEFT calls it.
            let (u, s, v) = w.svd(true, true);
            let root = (s.narrow(0, 0, r) / scaling).sqrt();
            let a = root.unsqueeze(1) * v.narrow(1, 0, r).transpose(0, 1);
            let b = u.narrow(1, 0, r) * root.unsqueeze(0);
            (a, b)
        }
        LoraInit::Olora => {
            let (q, rr) = Tensor::linalg_qr(&w, "reduced");
            (rr.narrow(0, 0, r), q.narrow(1, 0, r))
        }
        LoraInit::Kaiming | LoraInit::Gaussian => unreachable!("{init:?} leaves the base as it is"),
    };
    let (a, b) = (a.contiguous(), b.contiguous());
    let residual = &w - low_rank(&a, &b, scaling);
    let residual = out_in(&residual, fan_in_fan_out).to_kind(weight.kind());
    Some((a, b, residual))
}

/// The base weight with the adapter folded in, as stored and in its dtype: `W + scaling·B·A`,
/// or with DoRA `m / ‖W + scaling·B·A‖ · (W + scaling·B·A)` (PEFT's `merge`).
pub fn merged_weight(
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    magnitude: Option<&Tensor>,
    fan_in_fan_out: bool,
) -> Tensor {
    let w = out_in(weight, fan_in_fan_out).to_kind(Kind::Float);
    let delta = low_rank(a, b, scaling);
    let mut merged = &w + &delta;
    if let Some(m) = magnitude {
        merged = (m.to_kind(Kind::Float) / weight_norm(&w, &delta)).unsqueeze(1) * merged;
    }
    out_in(&merged, fan_in_fan_out).to_kind(weight.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `target_parameters` nest as PEFT's `ParamWrapper`s (the first of a module's targeted
    /// parameters innermost), a layer's digits match whole, and an expert's update applied
    /// on the fly is the merged parameter's.
    #[test]
    fn parameter_adapters_nest_as_peft_and_merge_as_they_apply() {
        let cfg = LoraConfig {
            r: 2,
            alpha: 3.0,
            dropout: 0.0,
            target_modules: TargetModules::Names(vec![]),
            use_rslora: false,
            use_dora: false,
            patterns: Default::default(),
            init: LoraInit::Kaiming,
            modules_to_save: vec![],
            trainable_token_indices: vec![],
            target_parameters: vec![
                "mlp.experts.gate_up_proj".into(),
                "1.mlp.experts.down_proj".into(),
            ],
        };
        let params = ["gate_up_proj", "down_proj"];
        let at = |layer: &str| {
            cfg.parameter_adapters(&format!("model.layers.{layer}.mlp.experts"), &params)
        };
        let m = |layer: &str, rest: &str| format!("model.layers.{layer}.mlp.experts{rest}");
        assert_eq!(at("0"), [(m("0", ".gate_up_proj"), m("0", ""))]);
        assert_eq!(
            at("1"),
            [
                (m("1", ".gate_up_proj"), m("1", ".base_layer")),
                (m("1", ".down_proj"), m("1", ""))
            ]
        );
        assert_eq!(at("11").len(), 1);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let lora = ExpertsLora::new(&vs.root(), "x.down_proj", (3, 5, 4), &cfg);
        tch::no_grad(|| {
            lora.b.shallow_clone().copy_(
                &Tensor::arange(24, (Kind::Float, tch::Device::Cpu))
                    .view([4, 6])
                    .sin(),
            );
        });
        let w = Tensor::arange(60, (Kind::Float, tch::Device::Cpu))
            .view([3, 5, 4])
            .cos();
        let merged = merged_experts(&w, &lora.a, &lora.b, lora.scaling);
        let x = Tensor::arange(10, (Kind::Float, tch::Device::Cpu))
            .view([2, 5])
            .tan();
        for e in 0..3 {
            let direct = x.matmul(&w.get(e)) + lora.delta(e, &x).unwrap();
            let diff = (direct - x.matmul(&merged.get(e)))
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff < 1e-5, "expert {e}: {diff}");
        }
        assert!((lora.scaling - 1.5).abs() < 1e-12);
    }

    #[test]
    fn targets_match_whole_names_and_suffixes() {
        let cfg = LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: TargetModules::parse("q_proj, mlp.down_proj"),
            use_rslora: false,
            use_dora: false,
            patterns: Default::default(),
            init: Default::default(),
            modules_to_save: vec![],
            trainable_token_indices: vec![],
            target_parameters: vec![],
        };
        assert!(cfg.targets("model.layers.0.self_attn.q_proj"));
        assert!(cfg.targets("model.layers.1.mlp.down_proj"));
        assert!(!cfg.targets("model.layers.0.self_attn.k_proj"));
        assert!(!cfg.targets("model.layers.0.self_attn.xq_proj"));
        assert_eq!(cfg.scaling("q_proj"), 2.0);
        let rs = LoraConfig {
            use_rslora: true,
            r: 4,
            ..cfg.clone()
        };
        assert_eq!(rs.scaling("q_proj"), 2.0);
        let default = LoraConfig {
            target_modules: TargetModules::Default,
            ..cfg
        };
        let gpt2 = default.resolved(ModelType::Gpt2);
        assert!(gpt2.targets("transformer.h.0.attn.c_attn"));
        assert!(!gpt2.targets("transformer.h.0.attn.c_proj"));
        let qwen2 = default.resolved(ModelType::Qwen2);
        assert!(qwen2.targets("model.layers.3.self_attn.v_proj"));
    }

    /// PiSSA's and OLoRA's starts hold the part of the weight the residual gave up
    /// (`residual + scaling·B·A = W`, in both layouts); PiSSA's is the top of the spectrum,
    /// OLoRA's `A` the top rows of an upper-triangular `R`; a rank the weight cannot have
    /// is `None`.
    #[test]
    fn moved_starts_split_the_weight() {
        tch::manual_seed(0);
        let w = Tensor::randn([6, 5], (Kind::Float, tch::Device::Cpu));
        let scaling = 2.0;
        for init in [LoraInit::Pissa, LoraInit::Olora] {
            for fan_in_fan_out in [false, true] {
                let stored = if fan_in_fan_out {
                    w.tr().contiguous()
                } else {
                    w.shallow_clone()
                };
                let (a, b, residual) =
                    moved_start(init, &stored, 3, scaling, fan_in_fan_out).unwrap();
                assert_eq!((a.size(), b.size()), (vec![3, 5], vec![6, 3]));
                assert_eq!(residual.size(), stored.size());
                let back = out_in(&residual, fan_in_fan_out) + low_rank(&a, &b, scaling);
                let diff = (back - &w).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "{init:?} {fan_in_fan_out}: {diff:e}");
                if init == LoraInit::Pissa {
                    let top = low_rank(&a, &b, scaling).svd(true, false).1.narrow(0, 0, 3);
                    let (_, s, _) = w.svd(true, true);
                    let diff = (top - s.narrow(0, 0, 3)).abs().max().double_value(&[]);
                    assert!(diff < 1e-5, "PiSSA keeps the top singular values: {diff:e}");
                } else {
                    assert!(
                        a.tril(-1).abs().max().double_value(&[]) < 1e-7,
                        "R is upper-triangular"
                    );
                }
            }
            assert!(moved_start(init, &w, 6, scaling, false).is_none());
        }
    }

    /// The rank-2r adapter a PiSSA or OLoRA adapter is written as keeps every layer's scale.
    #[test]
    fn converted_configs_keep_each_scale() {
        for use_rslora in [false, true] {
            let cfg = LoraConfig {
                r: 4,
                alpha: 8.0,
                dropout: 0.0,
                target_modules: TargetModules::AllLinear,
                use_rslora,
                use_dora: false,
                patterns: LayerPatterns {
                    rank_pattern: vec![("v_proj".into(), 2)],
                    alpha_pattern: vec![("layers.1.self_attn.q_proj".into(), 32.0)],
                    ..Default::default()
                },
                init: LoraInit::Pissa,
                modules_to_save: vec![],
                trainable_token_indices: vec![],
                target_parameters: vec![],
            };
            let converted = cfg.converted();
            assert_eq!(converted.init, LoraInit::Kaiming);
            for module in [
                "model.layers.0.self_attn.v_proj",
                "model.layers.1.self_attn.q_proj",
                "model.layers.0.mlp.up_proj",
            ] {
                assert_eq!(converted.rank(module), 2 * cfg.rank(module), "{module}");
                let (a, b) = (converted.scaling(module), cfg.scaling(module));
                assert!(
                    (a - b).abs() < 1e-12,
                    "rslora {use_rslora}, {module}: {a} vs {b}"
                );
            }
        }
    }
}
