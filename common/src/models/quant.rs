//! QLoRA's frozen 4-bit base (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of
//! Quantized LLMs") as bitsandbytes stores it and `transformers` loads it
//! (`BitsAndBytesConfig(load_in_4bit=True)`, bitsandbytes' `Linear4bit`).
//!
//! A linear layer's weight `[out, in]` is cut, row-major, into blocks of 64 values; each
//! block keeps its absolute maximum (`absmax`, f32) and each value the index of the nearest
//! of 16 levels (`quant_map`: NF4, the normal distribution's quantiles, or FP4) of the value
//! divided by it, two indices per byte, the first in the high nibble. With nested
//! ("double") quantization the absmax values themselves, less their mean (`nested_offset`),
//! are stored as 8-bit indices into bitsandbytes' dynamic map (`nested_quant_map`) with one
//! f32 scale per 256 of them (`nested_absmax`). The forward pass dequantizes the weight
//! into the activations' dtype and multiplies, as bitsandbytes' own fallback does; nothing
//! of it trains (adapters do).
//!
//! On disk (a model saved quantized by `transformers`): `<module>.weight` (u8
//! `[out·in/2, 1]`), `<module>.weight.absmax`, `….quant_map`, `….nested_absmax`,
//! `….nested_quant_map` and `….quant_state.bitsandbytes__nf4` (or `__fp4`: the JSON of
//! the rest: shape, blocksize, nested offset), and `quantization_config` in `config.json`.
//! Here the packed weight is held `[out, in/2]` (the same bytes, rows kept), so that its
//! shape names the layer's.

use serde_json::{Map, Value};
use tch::nn;
use tch::{Device, Kind, Tensor};

/// bitsandbytes' block size for the weights (its default; `transformers` never changes it).
pub const BLOCKSIZE: i64 = 64;
/// The block size of nested quantization (the only one bitsandbytes dequantizes).
pub const NESTED_BLOCKSIZE: i64 = 256;

/// The variables beside a quantized layer's packed `weight`, under `<module>.weight.`.
pub const ABSMAX: &str = "absmax";
pub const QUANT_MAP: &str = "quant_map";
pub const NESTED_ABSMAX: &str = "nested_absmax";
pub const NESTED_QUANT_MAP: &str = "nested_quant_map";
/// Ours (bitsandbytes keeps it in the quant-state JSON): the mean taken off the absmax
/// values before nested quantization, a 0-dim f32.
pub const NESTED_OFFSET: &str = "nested_offset";

/// The 4-bit data types (`bnb_4bit_quant_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    /// NormalFloat4: 16 quantiles of N(0, 1), QLoRA's default.
    #[default]
    Nf4,
    /// A 4-bit float (1 sign, 2 exponent, 1 mantissa bits).
    Fp4,
}

impl QuantType {
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// bitsandbytes' `get_4bit_type`: the 16 levels by index, f32.
    pub fn levels(self, device: Device) -> Tensor {
        let values: [f32; 16] = match self {
            QuantType::Nf4 => [
                -1.0,
                -0.696_192_8,
                -0.525_073_05,
                -0.394_917_5,
                -0.284_441_38,
                -0.184_773_43,
                -0.091_050_036,
                0.0,
                0.079_580_3,
                0.160_930_2,
                0.246_112_3,
                0.337_915_24,
                0.440_709_83,
                0.562_617,
                0.722_956_84,
                1.0,
            ],
            // Bit patterns 0b0000–0b1111 as values, then divided by the largest (12).
            QuantType::Fp4 => [
                0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0,
                -2.0, -3.0,
            ],
        };
        let t = Tensor::from_slice(&values).to_device(device);
        let max = t.abs().max();
        t / max
    }
}

/// How a model's linear layers are quantized: `--load-in-4bit` with
/// `--bnb-4bit-quant-type` and `--use-bnb-nested-quant` (TRL's `ModelConfig` names), or a
/// checkpoint's own `quantization_config`.
#[derive(Debug, Clone, PartialEq)]
pub struct Bnb4bit {
    pub quant_type: QuantType,
    /// Nested quantization of the absmax values (`bnb_4bit_use_double_quant`).
    pub double_quant: bool,
    /// Modules kept in full precision (`llm_int8_skip_modules`), matched as `transformers`
    /// matches them.
    pub skip_modules: Vec<String>,
}

impl Bnb4bit {
    pub fn new(quant_type: QuantType, double_quant: bool) -> Self {
        Bnb4bit {
            quant_type,
            double_quant,
            skip_modules: vec![],
        }
    }

    /// A checkpoint's `quantization_config` (`config.json`): `None` when it has none; an
    /// error for what is stored some other way (8-bit, another method or storage type).
    pub fn from_config(raw: &Map<String, Value>) -> Result<Option<Self>, String> {
        raw.get("quantization_config")
            .map(Self::from_json)
            .transpose()
    }

    /// `transformers`' `BitsAndBytesConfig` as JSON (what [`Bnb4bit::to_json`] writes).
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::json!({
            "quant_method": "bitsandbytes",
            "load_in_4bit": true,
            "bnb_4bit_quant_type": self.quant_type.name(),
            "bnb_4bit_use_double_quant": self.double_quant,
        });
        if !self.skip_modules.is_empty() {
            v["llm_int8_skip_modules"] = serde_json::json!(self.skip_modules);
        }
        v
    }

    /// A `quantization_config` object.
    pub fn from_json(q: &Value) -> Result<Self, String> {
        let field = |k: &str| q.get(k).filter(|v| !v.is_null());
        let method = field("quant_method").and_then(Value::as_str).unwrap_or("");
        if method != "bitsandbytes" {
            return Err(format!(
                "quantization_config: quant_method '{method}' is not supported (only bitsandbytes' 4-bit weights are read)"
            ));
        }
        let flag = |k: &str| field(k).and_then(Value::as_bool).unwrap_or(false);
        if !flag("load_in_4bit") && !flag("_load_in_4bit") {
            return Err(
                "quantization_config: only bitsandbytes' 4-bit weights (load_in_4bit) are read, not 8-bit ones"
                    .into(),
            );
        }
        let quant_type = match field("bnb_4bit_quant_type").and_then(Value::as_str) {
            None | Some("fp4") => QuantType::Fp4,
            Some("nf4") => QuantType::Nf4,
            Some(other) => {
                return Err(format!(
                    "quantization_config: bnb_4bit_quant_type '{other}' is not supported (nf4, fp4)"
                ))
            }
        };
        if let Some(storage) = field("bnb_4bit_quant_storage").and_then(Value::as_str) {
            if storage != "uint8" {
                return Err(format!(
                    "quantization_config: bnb_4bit_quant_storage '{storage}' is not supported (uint8)"
                ));
            }
        }
        let skip_modules = match field("llm_int8_skip_modules") {
            None => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or("quantization_config: llm_int8_skip_modules must be a list of strings")?,
            Some(_) => {
                return Err(
                    "quantization_config: llm_int8_skip_modules must be a list of strings".into(),
                )
            }
        };
        Ok(Bnb4bit {
            quant_type,
            double_quant: flag("bnb_4bit_use_double_quant"),
            skip_modules,
        })
    }

    /// Whether the linear layer at `module` (`in_dim` inputs) is quantized: not when a skip
    /// pattern matches it (`transformers`' `should_convert_module`: from the start up to a
    /// module boundary, as a regular expression, or as a suffix), nor when its inputs are
    /// odd (never in a real model: rows would share a byte).
    pub fn converts(&self, module: &str, in_dim: i64) -> bool {
        let skipped = self.skip_modules.iter().any(|key| {
            module.ends_with(key.as_str())
                || fancy_regex::Regex::new(&format!(r"^(?:{key})(?:(?<=\.)|(?=\.|$))"))
                    .is_ok_and(|re| re.is_match(module).unwrap_or(false))
        });
        !skipped && in_dim % 2 == 0
    }
}

/// Whether a variable is part of a quantized layer's stored state (kept in its own dtype
/// whatever the model's).
pub fn is_state(name: &str) -> bool {
    [
        ABSMAX,
        QUANT_MAP,
        NESTED_ABSMAX,
        NESTED_QUANT_MAP,
        NESTED_OFFSET,
    ]
    .iter()
    .any(|s| name.ends_with(&format!(".weight.{s}")))
}

/// A quantized layer's tensors (the model's variables, shared).
#[derive(Debug)]
pub struct Quantized {
    /// u8 `[out, in/2]`.
    pub packed: Tensor,
    /// f32 `[blocks]`, or u8 with nested quantization.
    pub absmax: Tensor,
    /// f32 `[16]`.
    pub quant_map: Tensor,
    pub nested: Option<Nested>,
    /// Indices into `quant_map` of both nibbles of every byte value, `[512]`.
    pairs: Tensor,
}

/// Nested quantization's state: f32 scales `[ceil(blocks/256)]`, the dynamic map `[256]`,
/// the offset (0-dim).
#[derive(Debug)]
pub struct Nested {
    pub absmax: Tensor,
    pub quant_map: Tensor,
    pub offset: Tensor,
}

/// What [`quantize`] computes, before it goes into a layer's variables.
#[derive(Debug)]
pub struct QuantizedValues {
    pub packed: Tensor,
    pub absmax: Tensor,
    pub quant_map: Tensor,
    pub nested: Option<Nested>,
}

fn blocks(n: i64, size: i64) -> i64 {
    (n + size - 1) / size
}

impl Quantized {
    /// The variables of a quantized `[in → out]` layer under `p` (`weight` and
    /// `weight.*`), frozen, holding the quantized form of a random `N(0, std²)` weight
    /// (what [`super::Model::new`] gives; a load overwrites it).
    pub fn new(p: &nn::Path, (in_dim, out_dim): (i64, i64), cfg: &Bnb4bit, std: f64) -> Self {
        let device = p.device();
        let n_blocks = blocks(out_dim * in_dim, BLOCKSIZE);
        let zeros = |shape: &[i64], kind: Kind| Tensor::zeros(shape, (kind, device));
        let packed = p.add("weight", zeros(&[out_dim, in_dim / 2], Kind::Uint8), false);
        let w = &(p / "weight");
        let absmax_kind = if cfg.double_quant {
            Kind::Uint8
        } else {
            Kind::Float
        };
        let absmax = w.add(ABSMAX, zeros(&[n_blocks], absmax_kind), false);
        let quant_map = w.add(QUANT_MAP, zeros(&[16], Kind::Float), false);
        let nested = cfg.double_quant.then(|| Nested {
            absmax: w.add(
                NESTED_ABSMAX,
                zeros(&[blocks(n_blocks, NESTED_BLOCKSIZE)], Kind::Float),
                false,
            ),
            quant_map: w.add(NESTED_QUANT_MAP, zeros(&[256], Kind::Float), false),
            offset: w.add(NESTED_OFFSET, zeros(&[], Kind::Float), false),
        });
        let q = Quantized {
            packed,
            absmax,
            quant_map,
            nested,
            pairs: pair_indices(device),
        };
        let init = Tensor::randn([out_dim, in_dim], (Kind::Float, device)) * std;
        q.fill(&init, cfg.quant_type);
        q
    }

    /// The layer at `module` among a model's variables, when it is quantized.
    pub fn find(
        tensors: &std::collections::BTreeMap<String, Tensor>,
        module: &str,
    ) -> Option<Self> {
        let get = |n: &str| {
            tensors
                .get(&format!("{module}.{n}"))
                .map(Tensor::shallow_clone)
        };
        let absmax = get(&format!("weight.{ABSMAX}"))?;
        Some(Quantized {
            packed: get("weight")?,
            pairs: pair_indices(absmax.device()),
            absmax,
            quant_map: get(&format!("weight.{QUANT_MAP}"))?,
            nested: match get(&format!("weight.{NESTED_ABSMAX}")) {
                Some(absmax) => Some(Nested {
                    absmax,
                    quant_map: get(&format!("weight.{NESTED_QUANT_MAP}"))?,
                    offset: get(&format!("weight.{NESTED_OFFSET}"))?,
                }),
                None => None,
            },
        })
    }

    /// The weight's shape, `[out, in]`.
    pub fn shape(&self) -> [i64; 2] {
        let s = self.packed.size();
        [s[0], s[1] * 2]
    }

    /// Fills the packed bytes from a checkpoint's tensor `name` (bitsandbytes stores them
    /// `[out·in/2, 1]`, u8).
    pub fn read_packed(&self, t: &Tensor, name: &str) -> Result<(), String> {
        let [out, inputs] = self.shape();
        if t.kind() != Kind::Uint8 || t.numel() as i64 != out * inputs / 2 {
            return Err(format!(
                "tensor '{name}' ({:?}, {:?}) is not the packed 4-bit form of a {:?} weight",
                t.kind(),
                t.size(),
                self.shape()
            ));
        }
        let _guard = tch::no_grad_guard();
        self.packed.shallow_clone().copy_(
            &t.view(self.packed.size().as_slice())
                .to_device(self.packed.device()),
        );
        Ok(())
    }

    /// Reads a checkpoint's quant-state tensor `name` (bitsandbytes' JSON, see
    /// [`read_state`]): checked against this layer and `cfg`, its nested offset kept.
    pub fn read_quant_state(&self, t: &Tensor, cfg: &Bnb4bit, name: &str) -> Result<(), String> {
        let bytes = Vec::<u8>::try_from(t.flatten(0, -1)).map_err(|e| e.to_string())?;
        let offset = read_state(&bytes, self.shape(), cfg, name)?;
        if let (Some(offset), Some(nested)) = (offset, &self.nested) {
            let _guard = tch::no_grad_guard();
            let _ = nested.offset.shallow_clone().fill_(offset);
        }
        Ok(())
    }

    /// Quantizes a checkpoint's full-precision weight `name` into this layer, `[out, in]`
    /// (GPT-2's Conv1D stores `[in, out]`: `transposed`).
    pub fn read_full(
        &self,
        t: Tensor,
        transposed: bool,
        quant_type: QuantType,
        name: &str,
    ) -> Result<(), String> {
        let w = if transposed { t.transpose(0, 1) } else { t };
        if w.size() != self.shape() {
            let [out, inputs] = self.shape();
            let expected = if transposed {
                [inputs, out]
            } else {
                [out, inputs]
            };
            let stored = if transposed {
                w.transpose(0, 1).size()
            } else {
                w.size()
            };
            return Err(format!(
                "tensor '{name}' has shape {stored:?}, the model expects {expected:?}"
            ));
        }
        self.fill(&w, quant_type);
        Ok(())
    }

    /// Quantizes `w` (`[out, in]`) into this layer's variables.
    pub fn fill(&self, w: &Tensor, quant_type: QuantType) {
        let v = quantize(
            &w.to_device(self.packed.device()),
            quant_type,
            self.nested.is_some(),
        );
        let _guard = tch::no_grad_guard();
        self.packed
            .shallow_clone()
            .copy_(&v.packed.view(self.packed.size().as_slice()));
        self.absmax.shallow_clone().copy_(&v.absmax);
        self.quant_map.shallow_clone().copy_(&v.quant_map);
        if let (Some(n), Some(v)) = (&self.nested, &v.nested) {
            n.absmax.shallow_clone().copy_(&v.absmax);
            n.quant_map.shallow_clone().copy_(&v.quant_map);
            n.offset.shallow_clone().copy_(&v.offset);
        }
    }

    /// The absmax of every block, f32 (nested: `map[i]·scale[i/256] + offset`).
    fn absmax_f32(&self) -> Tensor {
        match &self.nested {
            None => self.absmax.shallow_clone(),
            Some(n) => {
                let values = n.quant_map.index_select(0, &self.absmax.to_kind(Kind::Int));
                blockwise(&values, &n.absmax, NESTED_BLOCKSIZE) + &n.offset
            }
        }
    }

    /// The weight `[out, in]` in `kind` (bitsandbytes' `dequantize_4bit`: levels times
    /// absmax in f32, then cast).
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        let _guard = tch::no_grad_guard();
        let table = self.quant_map.index_select(0, &self.pairs).view([256, 2]);
        let levels = Tensor::embedding(
            &table,
            &self.packed.flatten(0, -1).to_kind(Kind::Int),
            -1,
            false,
            false,
        )
        .flatten(0, -1);
        blockwise(&levels, &self.absmax_f32(), BLOCKSIZE)
            .view(self.shape().as_slice())
            .to_kind(kind)
    }
}

/// `quant_map` indices of the high and low nibble of each byte value 0–255, interleaved.
fn pair_indices(device: Device) -> Tensor {
    let bytes = Tensor::arange(256, (Kind::Int64, device));
    Tensor::stack(
        &[bytes.divide_scalar_mode(16, "floor"), bytes.remainder(16)],
        1,
    )
    .flatten(0, -1)
}

/// `values[i] · scales[i / size]` (the last block may be short), f32.
pub fn blockwise(values: &Tensor, scales: &Tensor, size: i64) -> Tensor {
    let n = values.size()[0];
    let full = n / size * size;
    let head = (values.narrow(0, 0, full).view([-1, size])
        * scales.narrow(0, 0, full / size).view([-1, 1]))
    .view([full]);
    if full == n {
        head
    } else {
        let tail = values.narrow(0, full, n - full) * scales.narrow(0, full / size, 1);
        Tensor::cat(&[head, tail], 0)
    }
}

/// bitsandbytes' blockwise absmax scaling (its `quantize_4bit` and `quantize_blockwise`
/// fallbacks): per block of `size` values the absolute maximum, and each value divided by
/// it (times its reciprocal, as bitsandbytes), clamped to [-1, 1]. Scaled `[n]`, absmax
/// `[blocks]`, f32.
pub fn scale_blocks(flat: &Tensor, size: i64) -> (Tensor, Tensor) {
    let n = flat.size()[0];
    let full = n / size * size;
    let com = flat.narrow(0, 0, full).view([-1, size]);
    let absmax = com.abs().amax([-1].as_slice(), false);
    let scaled = (com * absmax.clamp_min(1e-38).reciprocal().view([-1, 1]))
        .clamp(-1.0, 1.0)
        .view([full]);
    if full == n {
        return (scaled, absmax);
    }
    let rest = flat.narrow(0, full, n - full);
    let am = rest.abs().max().clamp_min(1e-38);
    (
        Tensor::cat(&[scaled, (rest / &am).clamp(-1.0, 1.0)], 0),
        Tensor::cat(&[absmax, am.unsqueeze(0)], 0),
    )
}

/// The index in `levels` of the level nearest each value (by the midpoints of the sorted
/// levels; a value on a midpoint goes down), i64.
pub fn nearest(scaled: &Tensor, levels: &Tensor) -> Tensor {
    let order = levels.argsort(0, false);
    let sorted = levels.index_select(0, &order);
    order.index_select(0, &scaled.bucketize(&midpoints(&sorted), false, false))
}

/// The midpoints between neighbouring `sorted` levels: [`nearest`]'s bounds, for levels
/// already sorted (the dynamic maps), computed once.
pub fn midpoints(sorted: &Tensor) -> Tensor {
    let k = sorted.size()[0];
    (sorted.narrow(0, 0, k - 1) + sorted.narrow(0, 1, k - 1)) / 2.0
}

/// bitsandbytes' dynamic 8-bit map (`create_dynamic_map(signed)`), sorted, f32: the levels
/// nested quantization stores the absmax values with (signed), and 8-bit AdamW its first
/// (signed) and second (unsigned) moments.
pub fn dynamic_map(signed: bool, device: Device) -> Tensor {
    let mut parts = vec![];
    for i in 0..7 {
        let items = if signed { 1i64 << i } else { 1i64 << (i + 1) } + 1;
        let bounds = Tensor::linspace(0.1, 1.0, items, (Kind::Float, Device::Cpu));
        let means = (bounds.narrow(0, 0, items - 1) + bounds.narrow(0, 1, items - 1)) / 2.0;
        let scale = 10f64.powi(i - 6);
        parts.push(&means * scale);
        if signed {
            parts.push(&means * -scale);
        }
    }
    parts.push(Tensor::from_slice(&[0f32, 1.0]));
    Tensor::cat(&parts, 0).sort(0, false).0.to_device(device)
}

/// `w` (`[out, in]`, any float dtype) quantized as bitsandbytes quantizes it (blocks of
/// 64, `quant_type`'s levels; with `nested`, the absmax values less their mean in blocks
/// of 256 against the dynamic map). The packed bytes come out `[out·in/2, 1]`.
pub fn quantize(w: &Tensor, quant_type: QuantType, nested: bool) -> QuantizedValues {
    let _guard = tch::no_grad_guard();
    let device = w.device();
    let levels = quant_type.levels(device);
    let (mut scaled, absmax) = scale_blocks(&w.to_kind(Kind::Float).flatten(0, -1), BLOCKSIZE);
    if scaled.size()[0] % 2 == 1 {
        scaled = scaled.constant_pad_nd([0, 1]);
    }
    let q = nearest(&scaled, &levels);
    let packed = (q.slice(0, 0, None, 2) * 16 + q.slice(0, 1, None, 2))
        .to_kind(Kind::Uint8)
        .unsqueeze(1);
    if !nested {
        return QuantizedValues {
            packed,
            absmax,
            quant_map: levels,
            nested: None,
        };
    }
    let offset = absmax.mean(Kind::Float);
    let map = dynamic_map(true, device);
    let (scaled2, absmax2) = scale_blocks(&(&absmax - &offset), NESTED_BLOCKSIZE);
    QuantizedValues {
        packed,
        absmax: nearest(&scaled2, &map).to_kind(Kind::Uint8),
        quant_map: levels,
        nested: Some(Nested {
            absmax: absmax2,
            quant_map: map,
            offset,
        }),
    }
}

/// bitsandbytes' quant-state JSON (`<module>.weight.quant_state.bitsandbytes__<type>`):
/// checks it against the layer (`shape` `[out, in]`, the block sizes, the type) and returns
/// the nested offset, when there is one. `what` names the tensor in errors.
pub fn read_state(
    bytes: &[u8],
    shape: [i64; 2],
    cfg: &Bnb4bit,
    what: &str,
) -> Result<Option<f64>, String> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| format!("tensor '{what}' is not bitsandbytes' quant state JSON: {e}"))?;
    let int = |k: &str| v.get(k).and_then(Value::as_i64);
    let stored_shape: Option<Vec<i64>> = v
        .get("shape")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_i64).collect());
    if stored_shape.as_deref() != Some(&shape[..]) {
        return Err(format!(
            "tensor '{what}': shape {:?}, the model expects {shape:?}",
            v.get("shape")
        ));
    }
    if int("blocksize") != Some(BLOCKSIZE) {
        return Err(format!(
            "tensor '{what}': blocksize {:?} is not supported (only {BLOCKSIZE}, bitsandbytes' default)",
            v.get("blocksize")
        ));
    }
    if v.get("quant_type").and_then(Value::as_str) != Some(cfg.quant_type.name()) {
        return Err(format!(
            "tensor '{what}': quant_type {:?}, config.json says {}",
            v.get("quant_type"),
            cfg.quant_type.name()
        ));
    }
    let offset = v.get("nested_offset").and_then(Value::as_f64);
    if cfg.double_quant != offset.is_some() {
        return Err(format!(
            "tensor '{what}': nested quantization {}, config.json says bnb_4bit_use_double_quant {}",
            offset.is_some(),
            cfg.double_quant
        ));
    }
    if offset.is_some() && int("nested_blocksize") != Some(NESTED_BLOCKSIZE) {
        return Err(format!(
            "tensor '{what}': nested_blocksize {:?} is not supported (only {NESTED_BLOCKSIZE})",
            v.get("nested_blocksize")
        ));
    }
    Ok(offset)
}

/// The stored name of a layer's quant state.
pub fn state_key(module: &str, quant_type: QuantType) -> String {
    format!(
        "{module}.weight.quant_state.bitsandbytes__{}",
        quant_type.name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(cfg: &Bnb4bit, (i, o): (i64, i64)) -> (nn::VarStore, Quantized) {
        let vs = nn::VarStore::new(Device::Cpu);
        let q = Quantized::new(&(vs.root() / "l"), (i, o), cfg, 0.02);
        (vs, q)
    }

    #[test]
    fn dequantized_weights_are_within_half_a_level_of_the_originals() {
        tch::manual_seed(0);
        for quant_type in [QuantType::Nf4, QuantType::Fp4] {
            for double_quant in [false, true] {
                let cfg = Bnb4bit::new(quant_type, double_quant);
                // 40 × 30 = 1200 values: 18 full blocks and a short one.
                let (_vs, q) = layer(&cfg, (30, 40));
                let w = Tensor::randn([40, 30], (Kind::Float, Device::Cpu));
                q.fill(&w, quant_type);
                let back = q.dequantize(Kind::Float);
                assert_eq!(back.size(), [40, 30]);
                // The widest gap between neighbouring levels is 1/3 (FP4), so no value
                // moves by more than a sixth of its block's absmax (plus the nested
                // error of the absmax itself).
                let flat = w.flatten(0, -1);
                let absmax = Tensor::cat(
                    &[
                        flat.narrow(0, 0, 1152)
                            .view([18, 64])
                            .abs()
                            .amax([-1].as_slice(), false)
                            .repeat_interleave_self_int(64, 0, None),
                        flat.narrow(0, 1152, 48).abs().max().expand([48], false),
                    ],
                    0,
                );
                let err = (&back.flatten(0, -1) - &flat).abs() / &absmax;
                let worst = err.max().double_value(&[]);
                assert!(
                    worst < 0.17 + 0.02,
                    "{quant_type:?} {double_quant}: {worst}"
                );
                // The extremes of each block come back exactly (levels ±1) without nesting.
                if !double_quant {
                    let i = flat.abs().argmax(None, false).int64_value(&[]);
                    let (a, b) = (
                        flat.double_value(&[i]),
                        back.flatten(0, -1).double_value(&[i]),
                    );
                    assert!((a - b).abs() < 1e-6, "{a} {b}");
                }
            }
        }
    }

    #[test]
    fn bytes_hold_the_first_value_in_the_high_nibble() {
        let levels = QuantType::Nf4.levels(Device::Cpu);
        // The levels themselves, scaled by 2: indices 0..16, absmax 2.
        let w = (&levels * 2.0).view([2, 8]);
        let v = quantize(&w, QuantType::Nf4, false);
        let bytes = Vec::<u8>::try_from(v.packed.flatten(0, -1)).unwrap();
        assert_eq!(bytes, [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
        assert_eq!(Vec::<f32>::try_from(v.absmax).unwrap(), [2.0]);
    }

    #[test]
    fn the_dynamic_map_is_bitsandbytes() {
        let map = Vec::<f32>::try_from(dynamic_map(true, Device::Cpu)).unwrap();
        assert_eq!(map.len(), 256);
        // bitsandbytes 0.50.2: create_dynamic_map()[0, 1, 127, 128, 255].
        assert_eq!(
            [map[0], map[1], map[127], map[128], map[255]],
            [-0.992_968_74, -0.978_906_3, 0.0, 5.500_000_4e-7, 1.0]
        );
        assert!(map.windows(2).all(|w| w[0] <= w[1]));
        assert!(map.contains(&0.0));
        // create_dynamic_map(signed=False)[0, 1, 2, 128, 254, 255].
        let map = Vec::<f32>::try_from(dynamic_map(false, Device::Cpu)).unwrap();
        assert_eq!(
            [map[0], map[1], map[2], map[128], map[254], map[255]],
            [0.0, 3.250_000_3e-7, 7.75e-7, 0.110_546_87, 0.996_484_4, 1.0]
        );
    }

    #[test]
    fn config_and_state_are_read_and_checked() {
        let cfg: Map<String, Value> = serde_json::from_str(
            r#"{"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true,
                "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true,
                "llm_int8_skip_modules": ["lm_head", "model.layers.1.mlp"]}}"#,
        )
        .unwrap();
        let q = Bnb4bit::from_config(&cfg).unwrap().unwrap();
        assert_eq!((q.quant_type, q.double_quant), (QuantType::Nf4, true));
        assert!(q.converts("model.layers.0.mlp.up_proj", 64));
        assert!(!q.converts("model.layers.1.mlp.up_proj", 64));
        assert!(q.converts("model.layers.11.mlp.up_proj", 64));
        assert!(!q.converts("model.layers.0.mlp.up_proj", 63));
        assert_eq!(Bnb4bit::from_json(&q.to_json()), Ok(q.clone()));
        for (json, wanted) in [
            (r#"{"quant_method": "gptq"}"#, "quant_method 'gptq'"),
            (
                r#"{"quant_method": "bitsandbytes", "load_in_8bit": true}"#,
                "not 8-bit",
            ),
        ] {
            let raw: Map<String, Value> =
                serde_json::from_str(&format!(r#"{{"quantization_config": {json}}}"#)).unwrap();
            let e = Bnb4bit::from_config(&raw).unwrap_err();
            assert!(e.contains(wanted), "{e}");
        }
        let state = br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 32], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.052672252058982849}"#;
        assert_eq!(
            read_state(state, [64, 32], &q, "w").unwrap(),
            Some(0.052_672_252_058_982_85)
        );
        let e = read_state(state, [32, 64], &q, "w").unwrap_err();
        assert!(e.contains("the model expects [32, 64]"), "{e}");
        let e = read_state(state, [64, 32], &Bnb4bit::new(QuantType::Nf4, false), "w").unwrap_err();
        assert!(e.contains("nested quantization true"), "{e}");
    }
}
