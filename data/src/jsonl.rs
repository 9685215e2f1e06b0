//! Streaming JSON Lines reader. Every problem is reported with the file, the 1-based line
//! number and the field: invalid UTF-8, invalid JSON, a missing or mistyped field, an empty
//! string where text is required. Blank lines are skipped; a file with no rows is an error.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{DataError, Result};

/// One row being decoded: knows where it came from, so field errors can say so.
pub struct Row<'a> {
    pub file: &'a Path,
    pub line: usize,
    pub object: Map<String, Value>,
}

impl Row<'_> {
    pub fn error(&self, field: Option<&str>, message: impl Into<String>) -> DataError {
        DataError {
            file: self.file.to_path_buf(),
            line: Some(self.line),
            field: field.map(str::to_string),
            message: message.into(),
            source: None,
        }
    }

    pub fn has(&self, field: &str) -> bool {
        self.object.contains_key(field)
    }

    /// A required non-empty string.
    pub fn text(&self, field: &str) -> Result<String> {
        match self.object.get(field) {
            None => Err(self.error(Some(field), "missing")),
            Some(v) => self.text_value(field, v),
        }
    }

    pub fn text_value(&self, field: &str, v: &Value) -> Result<String> {
        match v {
            Value::String(s) if s.trim().is_empty() => {
                Err(self.error(Some(field), "is empty; text is required"))
            }
            Value::String(s) => Ok(s.clone()),
            other => Err(self.error(
                Some(field),
                format!("expected a string, got {}", type_name(other)),
            )),
        }
    }

    /// An optional number.
    pub fn number(&self, field: &str) -> Result<Option<f64>> {
        match self.object.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => Err(self.error(
                Some(field),
                format!("expected a number, got {}", type_name(other)),
            )),
        }
    }

    /// A required array.
    pub fn array(&self, field: &str) -> Result<&Vec<Value>> {
        match self.object.get(field) {
            None => Err(self.error(Some(field), "missing")),
            Some(Value::Array(a)) => Ok(a),
            Some(other) => Err(self.error(
                Some(field),
                format!("expected an array, got {}", type_name(other)),
            )),
        }
    }
}

pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The rows of a file, with where each came from; dereferences to the rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Rows<T> {
    pub path: PathBuf,
    /// 1-based line of each row.
    pub lines: Vec<usize>,
    items: Vec<T>,
}

impl<T> std::ops::Deref for Rows<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.items
    }
}

impl<T> Rows<T> {
    pub fn into_vec(self) -> Vec<T> {
        self.items
    }

    /// `e`, raised while tokenizing row `index` (a chat template refusing it, a text the
    /// tokenizer cannot encode), named by this file and the row's line, with what raised it.
    pub fn locate(&self, index: usize, e: DataError) -> DataError {
        DataError {
            file: self.path.clone(),
            line: self.lines.get(index).copied(),
            field: None,
            message: format!("{} ({})", e.message, e.file.display()),
            source: e.source,
        }
    }
}

/// Reads every row of `path` through `decode`, stopping at the first error.
pub fn read<T>(path: &Path, mut decode: impl FnMut(&Row) -> Result<T>) -> Result<Rows<T>> {
    let file = File::open(path).map_err(|e| DataError::file(path, "cannot open").because(e))?;
    let mut reader = BufReader::new(file);
    let mut rows = Vec::new();
    let mut lines = Vec::new();
    let mut buf = Vec::new();
    let mut line = 0;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| DataError::file(path, "cannot read").because(e))?;
        if n == 0 {
            break;
        }
        line += 1;
        let at = |message: String| DataError {
            file: PathBuf::from(path),
            line: Some(line),
            field: None,
            message,
            source: None,
        };
        let text = std::str::from_utf8(&buf)
            .map_err(|e| at(format!("invalid UTF-8 at byte {}", e.valid_up_to())))?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let value: Value =
            serde_json::from_str(text).map_err(|e| at("invalid JSON".into()).because(e))?;
        let Value::Object(object) = value else {
            return Err(at(format!(
                "expected a JSON object, got {}",
                type_name(&value)
            )));
        };
        rows.push(decode(&Row {
            file: path,
            line,
            object,
        })?);
        lines.push(line);
    }
    if rows.is_empty() {
        return Err(DataError::file(path, "no rows (the file is empty)"));
    }
    Ok(Rows {
        path: path.to_path_buf(),
        lines,
        items: rows,
    })
}
