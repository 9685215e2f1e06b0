//! Hugging Face checkpoint files: `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`) into a `VarStore`, and a `VarStore`'s tensors back out.
//!
//! Files are memory-mapped, so a large checkpoint is never read into RAM whole; each stored
//! tensor is converted to its variable's dtype and device as it is copied in.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// `transformers`' default `max_shard_size` ("5GB").
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

/// The files that travel with a model directory besides its weights and `config.json`.
pub const SIDECAR_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
];

/// What a load found besides the tensors it needed.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Stored tensors the model has no variable for.
    pub unexpected: Vec<String>,
    /// Variables the checkpoint lacked that were allowed to keep their initialisation.
    pub initialised: Vec<String>,
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        // bitsandbytes' packed 4-bit weights and quant states.
        Dtype::U8 => Kind::Uint8,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Uint8 => Dtype::U8,
        _ => return None,
    })
}

/// The safetensors files of a model directory.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let text = fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json {
                path: index.clone(),
                source,
            })?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::checkpoint(&index, "field 'weight_map' is missing"))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(Error::checkpoint(
        dir,
        format!("no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are supported)"),
    ))
}

#[allow(unsafe_code)]
fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the mapping is read-only and lives only while this load runs; a checkpoint
    // rewritten underneath a running load is outside what we guard against.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// Copies every variable of `vars` from the checkpoint in `dir`.
///
/// `aliases(name)` lists other names a variable may be stored under (older layouts);
/// variables in `optional` may be absent and then keep their initialisation. A missing
/// tensor, a shape mismatch or an unsupported dtype is an error naming the tensor.
pub fn load_into(
    vars: &HashMap<String, Tensor>,
    dir: &Path,
    aliases: impl Fn(&str) -> Vec<String>,
    optional: &[&str],
) -> Result<LoadReport> {
    load_from_files(
        vars,
        &weight_files(dir)?,
        dir,
        aliases,
        optional,
        &Takes::new(),
    )
}

/// Stored tensors that do not go into a variable as they are, by name: each is handed to
/// its function on the CPU, in its stored dtype and shape, with the file it came from (a
/// weight quantized as it is read, a packed weight reshaped, a JSON blob).
pub type Takes<'a> = BTreeMap<String, Box<dyn Fn(&Path, Tensor) -> Result<()> + 'a>>;

/// [`load_into`], and every tensor of `takes` (all must be stored) handed to its function.
pub fn load_into_taking(
    vars: &HashMap<String, Tensor>,
    dir: &Path,
    aliases: impl Fn(&str) -> Vec<String>,
    optional: &[&str],
    takes: &Takes,
) -> Result<LoadReport> {
    load_from_files(vars, &weight_files(dir)?, dir, aliases, optional, takes)
}

/// Fills every variable of `vars` from one safetensors file (optimizer state, EMA weights);
/// all must be present.
pub fn load_file(vars: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    load_from_files(
        vars,
        &[path.to_path_buf()],
        path,
        |_| vec![],
        &[],
        &Takes::new(),
    )
    .map(|_| ())
}

fn load_from_files(
    vars: &HashMap<String, Tensor>,
    files: &[PathBuf],
    source: &Path,
    aliases: impl Fn(&str) -> Vec<String>,
    optional: &[&str],
    takes: &Takes,
) -> Result<LoadReport> {
    let maps = files
        .iter()
        .map(|f| map_file(f))
        .collect::<Result<Vec<_>>>()?;
    let mut stored: BTreeMap<String, (usize, &PathBuf)> = BTreeMap::new();
    let mut parsed = Vec::with_capacity(maps.len());
    for (i, (map, path)) in maps.iter().zip(files).enumerate() {
        let st = SafeTensors::deserialize(map)
            .map_err(|e| Error::checkpoint(path, format!("not a valid safetensors file: {e}")))?;
        for name in st.names() {
            stored.insert(name.to_string(), (i, path));
        }
        parsed.push(st);
    }

    // The stored name of `name` (itself or an alias), its file's index and path.
    let find = |name: &String| {
        std::iter::once(name.clone())
            .chain(aliases(name))
            .find_map(|k| stored.get(&k).map(|&(i, path)| (k, i, path)))
    };
    // The stored tensor `key` on the CPU in its own dtype, checked against `expected`.
    let read = |key: &str, i: usize, path: &Path, expected: Option<Vec<i64>>| -> Result<Tensor> {
        let view = parsed[i]
            .tensor(key)
            .map_err(|e| Error::checkpoint(path, format!("tensor '{key}': {e}")))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if let Some(expected) = expected.filter(|e| *e != shape) {
            return Err(Error::checkpoint(
                path,
                format!("tensor '{key}' has shape {shape:?}, the model expects {expected:?}"),
            ));
        }
        let kind = kind_of(view.dtype()).ok_or_else(|| {
            Error::checkpoint(
                path,
                format!("tensor '{key}' has unsupported dtype {:?}", view.dtype()),
            )
        })?;
        Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?)
    };
    let missing = |name: &str| Error::checkpoint(source, format!("missing tensor '{name}'"));

    let mut used = std::collections::HashSet::new();
    let mut report = LoadReport::default();
    let _guard = tch::no_grad_guard();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        let Some((key, i, path)) = find(name) else {
            if optional.contains(&name.as_str()) {
                report.initialised.push(name.clone());
                continue;
            }
            return Err(missing(name));
        };
        let cpu = read(&key, i, path, Some(var.size()))?;
        var.shallow_clone()
            .f_copy_(&cpu.to_device(var.device()).to_kind(var.kind()))?;
        used.insert(key);
    }
    for (name, take) in takes {
        let (key, i, path) = find(name).ok_or_else(|| missing(name))?;
        take(path, read(&key, i, path, None)?)?;
        used.insert(key);
    }
    report.unexpected = stored.into_keys().filter(|k| !used.contains(k)).collect();
    Ok(report)
}

/// Writes `tensors` (name → tensor) into `dir` as `model.safetensors`, or as shards plus
/// `model.safetensors.index.json` when they exceed `max_shard_bytes`. Each file is written
/// under a temporary name and renamed into place.
pub fn save_tensors(
    tensors: &BTreeMap<String, Tensor>,
    dir: &Path,
    max_shard_bytes: usize,
) -> Result<()> {
    let mut shards: Vec<Vec<(&String, Tensor)>> = vec![vec![]];
    let mut shard_bytes = 0usize;
    let mut total = 0usize;
    for (name, t) in tensors {
        let t = to_storable(t);
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        if shard_bytes > 0 && shard_bytes + bytes > max_shard_bytes {
            shards.push(vec![]);
            shard_bytes = 0;
        }
        shard_bytes += bytes;
        total += bytes;
        shards.last_mut().unwrap().push((name, t));
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        write_safetensors(shard, &dir.join(&file))?;
        for (name, _) in shard {
            weight_map.insert((*name).clone(), file.clone());
        }
    }
    if n > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        write_atomic(
            &dir.join(INDEX_FILE),
            serde_json::to_string_pretty(&index).unwrap().as_bytes(),
        )?;
    } else {
        let stale = dir.join(INDEX_FILE);
        if stale.exists() {
            fs::remove_file(&stale).map_err(|e| Error::io(&stale, e))?;
        }
    }
    Ok(())
}

fn to_storable(t: &Tensor) -> Tensor {
    t.detach().to_device(tch::Device::Cpu).contiguous()
}

/// Writes `tensors` into one safetensors file at `path` (through a temporary name).
pub fn save_file(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let stored: Vec<(&String, Tensor)> = tensors.iter().map(|(k, t)| (k, to_storable(t))).collect();
    write_safetensors(&stored, path)
}

fn write_safetensors(tensors: &[(&String, Tensor)], path: &Path) -> Result<()> {
    let mut buffers = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype = dtype_of(t.kind()).ok_or_else(|| {
            Error::checkpoint(
                path,
                format!("cannot store '{name}' of kind {:?}", t.kind()),
            )
        })?;
        let mut data = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, t.numel())?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        buffers.push((name.as_str(), dtype, shape, data));
    }
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, data)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (name.to_string(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::checkpoint(path, e.to_string()))?;
    // transformers checks for this metadata when it loads the file.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = tmp_path(path);
    safetensors::tensor::serialize_to_file(views, Some(metadata), &tmp)
        .map_err(|e| Error::checkpoint(&tmp, e.to_string()))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a crash leaves
/// either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Copies the tokenizer and generation files of a model directory into another.
pub fn copy_sidecar_files(from: &Path, to: &Path) -> Result<()> {
    if from == to {
        return Ok(());
    }
    for name in SIDECAR_FILES {
        let src = from.join(name);
        if src.exists() {
            let bytes = fs::read(&src).map_err(|e| Error::io(&src, e))?;
            write_atomic(&to.join(name), &bytes)?;
        }
    }
    Ok(())
}

/// What a run changes in the tokenizer files it saves beside a model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerOverrides {
    /// `--chat-template-path`: written as `chat_template.jinja`, and any `chat_template` of
    /// `tokenizer_config.json` removed (it would take precedence for some loaders).
    pub chat_template: Option<String>,
    /// `--eos-token` (text, id): `tokenizer_config.json`'s `eos_token`, and the first of
    /// `generation_config.json`'s `eos_token_id` (as TRL sets them).
    pub eos: Option<(String, i64)>,
}

fn read_json_object(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    if !path.exists() {
        return Ok(Default::default());
    }
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(v.as_object().cloned().unwrap_or_default())
}

fn write_json_object(path: &Path, map: serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(map)).expect("JSON");
    write_atomic(path, text.as_bytes())
}

/// Applies `o` to the tokenizer files just copied into `dir`.
pub fn apply_tokenizer_overrides(dir: &Path, o: &TokenizerOverrides) -> Result<()> {
    if o == &TokenizerOverrides::default() {
        return Ok(());
    }
    let config_path = dir.join("tokenizer_config.json");
    let mut config = read_json_object(&config_path)?;
    if let Some(template) = &o.chat_template {
        write_atomic(&dir.join("chat_template.jinja"), template.as_bytes())?;
        config.remove("chat_template");
    }
    if let Some((text, id)) = &o.eos {
        config.insert("eos_token".into(), text.clone().into());
        let generation_path = dir.join("generation_config.json");
        let mut generation = read_json_object(&generation_path)?;
        let ids = data::tokenizer::eos_token_ids(generation.get("eos_token_id"));
        let ids = data::tokenizer::eos_first(ids, *id);
        generation.insert("eos_token_id".into(), ids.into());
        write_json_object(&generation_path, generation)?;
    }
    write_json_object(&config_path, config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_round_trip_and_index_lists_every_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let mut tensors = BTreeMap::new();
        for i in 0..5 {
            let t = Tensor::arange(100, (Kind::Float, tch::Device::Cpu)) * i;
            tensors.insert(format!("layer.{i}.weight"), t);
        }
        // 400 bytes each, 1000-byte shards → 3 files.
        save_tensors(&tensors, dir.path(), 1000).unwrap();
        assert!(dir.path().join(INDEX_FILE).exists());
        assert_eq!(weight_files(dir.path()).unwrap().len(), 3);
        let vars: HashMap<String, Tensor> = tensors
            .keys()
            .map(|k| {
                (
                    k.clone(),
                    Tensor::zeros([100], (Kind::Float, tch::Device::Cpu)),
                )
            })
            .collect();
        let report = load_into(&vars, dir.path(), |_| vec![], &[]).unwrap();
        assert!(report.unexpected.is_empty());
        for (k, t) in &tensors {
            assert!(vars[k].equal(t), "{k}");
        }
    }

    #[test]
    fn missing_and_misshapen_tensors_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = BTreeMap::from([(
            "a.weight".to_string(),
            Tensor::ones([2, 3], (Kind::Float, tch::Device::Cpu)),
        )]);
        save_tensors(&tensors, dir.path(), DEFAULT_MAX_SHARD_BYTES).unwrap();
        let wrong = HashMap::from([(
            "a.weight".to_string(),
            Tensor::zeros([3, 2], (Kind::Float, tch::Device::Cpu)),
        )]);
        let err = load_into(&wrong, dir.path(), |_| vec![], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("'a.weight' has shape [2, 3]"), "{err}");
        let missing = HashMap::from([(
            "b.weight".to_string(),
            Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)),
        )]);
        let err = load_into(&missing, dir.path(), |_| vec![], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing tensor 'b.weight'"), "{err}");
        let report = load_into(&missing, dir.path(), |_| vec![], &["b.weight"]).unwrap();
        assert_eq!(report.initialised, ["b.weight"]);
        assert_eq!(report.unexpected, ["a.weight"]);
    }

    #[test]
    fn bf16_files_convert_to_the_variable_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let src = Tensor::from_slice(&[1.5f32, -2.25, 3.0]).to_kind(Kind::BFloat16);
        save_tensors(
            &BTreeMap::from([("w".to_string(), src)]),
            dir.path(),
            DEFAULT_MAX_SHARD_BYTES,
        )
        .unwrap();
        let vars = HashMap::from([(
            "w".to_string(),
            Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)),
        )]);
        load_into(&vars, dir.path(), |_| vec![], &[]).unwrap();
        assert_eq!(vars["w"].kind(), Kind::Float);
        assert!(vars["w"].equal(&Tensor::from_slice(&[1.5f32, -2.25, 3.0])));
    }
}
