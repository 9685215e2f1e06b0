//! A task file read as JSON values: YAML through `serde_yaml_ng`, `include:` merged (the
//! included file first, this file's keys over it, as lm-eval does), and a strict reader of
//! keys that names every key it does not know instead of ignoring it.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{DataError, Result};
use crate::rows::type_name;

/// Where the supported keys are listed; every refusal points there.
pub const SUBSET: &str = "see the README's 'Task files' section for the supported subset";

/// `path`'s mapping with its `include:` chain merged.
pub fn load(path: &Path) -> Result<Map<String, Value>> {
    load_depth(path, 0)
}

fn load_depth(path: &Path, depth: usize) -> Result<Map<String, Value>> {
    if depth > 8 {
        return Err(DataError::file(
            path,
            "include: more than 8 files deep (a cycle?)",
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| DataError::file(path, "cannot read").because(e))?;
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)
        .map_err(|e| DataError::file(path, "invalid YAML").because(e))?;
    let Value::Object(mut map) = to_json(yaml, path, "")? else {
        return Err(DataError::file(
            path,
            "a task file is a YAML mapping (key: value lines)",
        ));
    };
    let Some(include) = map.remove("include") else {
        return Ok(map);
    };
    let Value::String(name) = include else {
        return Err(field_error(path, "include", "expected a file name"));
    };
    let base_path = path.parent().unwrap_or(Path::new(".")).join(&name);
    let mut merged = load_depth(&base_path, depth + 1)?;
    merged.extend(map);
    Ok(merged)
}

fn to_json(v: serde_yaml_ng::Value, path: &Path, at: &str) -> Result<Value> {
    use serde_yaml_ng::Value as Y;
    Ok(match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                serde_json::Number::from_f64(n.as_f64().unwrap_or(f64::NAN))
                    .map(Value::Number)
                    .ok_or_else(|| field_error(path, at, "not a finite number"))?
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, x)| to_json(x, path, &format!("{at}[{i}]")))
                .collect::<Result<_>>()?,
        ),
        Y::Mapping(m) => {
            let mut out = Map::new();
            for (k, x) in m {
                let key = match k {
                    Y::String(s) => s,
                    other => serde_yaml_ng::to_string(&other)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                };
                let inner = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                out.insert(key, to_json(x, path, &inner)?);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => {
            return Err(field_error(
                path,
                at,
                format!(
                    "the YAML tag {} (Python code in lm-eval) cannot run here; {SUBSET}",
                    t.tag
                ),
            ))
        }
    })
}

pub fn field_error(path: &Path, field: &str, message: impl Into<String>) -> DataError {
    DataError {
        field: (!field.is_empty()).then(|| field.to_string()),
        ..DataError::file(path, message)
    }
}

/// A mapping read key by key; [`Keys::finish`] refuses whatever was not read.
pub struct Keys {
    pub file: PathBuf,
    scope: String,
    map: Map<String, Value>,
}

impl Keys {
    pub fn new(file: &Path, scope: &str, map: Map<String, Value>) -> Self {
        Keys {
            file: file.to_path_buf(),
            scope: scope.to_string(),
            map,
        }
    }

    /// The full name of `key` in this mapping (`fewshot_config.sampler`).
    pub fn name(&self, key: &str) -> String {
        if self.scope.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.scope)
        }
    }

    pub fn error(&self, key: &str, message: impl Into<String>) -> DataError {
        field_error(&self.file, &self.name(key), message)
    }

    /// The value of `key`; YAML's `null` counts as absent.
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    pub fn string(&mut self, key: &str) -> Result<Option<String>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => {
                Err(self.error(key, format!("expected a string, got {}", type_name(&other))))
            }
        }
    }

    pub fn int(&mut self, key: &str) -> Result<Option<i64>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Number(n)) if n.is_i64() => Ok(n.as_i64()),
            Some(other) => Err(self.error(key, format!("expected an integer, got {other}"))),
        }
    }

    pub fn count(&mut self, key: &str) -> Result<Option<usize>> {
        match self.int(key)? {
            Some(n) if n < 0 => Err(self.error(key, "must be ≥ 0")),
            n => Ok(n.map(|n| n as usize)),
        }
    }

    pub fn float(&mut self, key: &str) -> Result<Option<f64>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => Err(self.error(key, format!("expected a number, got {other}"))),
        }
    }

    pub fn bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(other) => Err(self.error(key, format!("expected true or false, got {other}"))),
        }
    }

    pub fn mapping(&mut self, key: &str) -> Result<Option<Keys>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Keys::new(&self.file, &self.name(key), m))),
            Some(other) => Err(self.error(
                key,
                format!("expected a mapping, got {}", type_name(&other)),
            )),
        }
    }

    pub fn list(&mut self, key: &str) -> Result<Option<Vec<Value>>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(other) => {
                Err(self.error(key, format!("expected a list, got {}", type_name(&other))))
            }
        }
    }

    /// A list of mappings, each as its own `Keys` (named `key[i]`); `what` says what the
    /// items must hold when one is not a mapping.
    pub fn mappings(&mut self, key: &str, what: &str) -> Result<Option<Vec<Keys>>> {
        let Some(list) = self.list(key)? else {
            return Ok(None);
        };
        list.into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Object(m) => {
                    Ok(Keys::new(&self.file, &self.name(&format!("{key}[{i}]")), m))
                }
                _ => Err(self.error(key, format!("expected mappings with {what}"))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Refuses every key not read: nothing in a task file is silently ignored.
    pub fn finish(self) -> Result<()> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(key) => Err(self.error(key, format!("not supported; {SUBSET}"))),
        }
    }
}
