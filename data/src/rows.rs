//! The rows of a dataset file, in the files `datasets` reads: JSON Lines, a JSON array of
//! objects, or Parquet (`Dataset.to_parquet`, the Hub's `*.parquet` shards); a file name with
//! `*` or `?` (`data/train-*.parquet`) reads every matching file, in name order, as one
//! dataset, as `datasets`' `data_files` patterns do. Every problem is reported with the file,
//! where the row is (its line, or a Parquet row's index) and the field: invalid UTF-8,
//! invalid JSON, a missing or mistyped field, an empty string where text is required. Blank
//! lines are skipped; a dataset with no rows is an error.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::error::{DataError, Place, Result};

/// One row being decoded: knows where it came from, so field errors can say so.
pub struct Row<'a> {
    pub file: &'a Path,
    pub place: Place,
    pub object: Map<String, Value>,
}

impl Row<'_> {
    pub fn error(&self, field: Option<&str>, message: impl Into<String>) -> DataError {
        DataError {
            file: self.file.to_path_buf(),
            place: Some(self.place),
            field: field.map(str::to_string),
            message: message.into(),
            source: None,
        }
    }

    /// Whether the row gives `field`: present and not `null` (a table's row has every
    /// column, `null` where it had none, as `datasets` writes Parquet and JSON).
    pub fn has(&self, field: &str) -> bool {
        self.object.get(field).is_some_and(|v| !v.is_null())
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

/// The rows of a dataset, with where each came from; dereferences to the rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Rows<T> {
    /// What was asked for: a file, or a pattern of files.
    pub path: PathBuf,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
    /// Each row's file (an index into `files`) and place in it.
    pub places: Vec<(usize, Place)>,
    items: Vec<T>,
}

impl<T> std::ops::Deref for Rows<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.items
    }
}

impl<T> std::ops::DerefMut for Rows<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.items
    }
}

impl<T> Rows<T> {
    pub fn into_vec(self) -> Vec<T> {
        self.items
    }

    /// Row `index`'s file and place, as an error names them (`rows.jsonl:12`,
    /// `train.parquet[11]`).
    pub fn at(&self, index: usize) -> (&Path, Place) {
        let (file, place) = self.places[index];
        (&self.files[file], place)
    }

    /// An error about row `index`'s field `field` (`None`: the row as a whole).
    pub fn error(
        &self,
        index: usize,
        field: Option<&str>,
        message: impl Into<String>,
    ) -> DataError {
        let (file, place) = self.at(index);
        DataError {
            file: file.to_path_buf(),
            place: Some(place),
            field: field.map(str::to_string),
            message: message.into(),
            source: None,
        }
    }

    /// `e`, raised while tokenizing row `index` (a chat template refusing it, a text the
    /// tokenizer cannot encode), named by this row's file and place, with what raised it.
    pub fn locate(&self, index: usize, e: DataError) -> DataError {
        DataError {
            message: format!("{} ({})", e.message, e.file.display()),
            source: e.source,
            ..self.error(index, None, "")
        }
    }
}

/// Reads every row of `path` (a file or a pattern of files) through `decode`, stopping at
/// the first error.
pub fn read<T>(path: &Path, mut decode: impl FnMut(&Row) -> Result<T>) -> Result<Rows<T>> {
    let files = expand(path)?;
    let mut items = Vec::new();
    let mut places = Vec::new();
    for (f, file) in files.iter().enumerate() {
        let mut each = |place: Place, object: Map<String, Value>| -> Result<()> {
            items.push(decode(&Row {
                file,
                place,
                object,
            })?);
            places.push((f, place));
            Ok(())
        };
        if file.extension().is_some_and(|e| e == "parquet") {
            crate::parquet::read(file, each)?;
        } else {
            read_json(file, &mut each)?;
        }
    }
    if items.is_empty() {
        let what = if files.len() == 1 {
            "the file is empty"
        } else {
            "every file is empty"
        };
        return Err(DataError::file(path, format!("no rows ({what})")));
    }
    Ok(Rows {
        path: path.to_path_buf(),
        files,
        places,
        items,
    })
}

/// The files `path` names: itself, or, when its file name holds `*` or `?`, every file of
/// its directory whose name matches, in name order (none matching is an error).
fn expand(path: &Path) -> Result<Vec<PathBuf>> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    if !name.contains(['*', '?']) {
        return Ok(vec![path.to_path_buf()]);
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if dir.to_string_lossy().contains(['*', '?']) {
        return Err(DataError::file(
            path,
            "a pattern may only be in the file name, not in its directories",
        ));
    }
    let entries = std::fs::read_dir(dir).map_err(|e| {
        DataError::file(dir, "cannot list the directory of a file pattern").because(e)
    })?;
    let mut files = vec![];
    for entry in entries {
        let entry = entry.map_err(|e| DataError::file(dir, "cannot list").because(e))?;
        if wildcard(&name, &entry.file_name().to_string_lossy()) && entry.path().is_file() {
            files.push(entry.path());
        }
    }
    if files.is_empty() {
        return Err(DataError::file(path, "no file matches the pattern"));
    }
    files.sort();
    Ok(files)
}

/// Whether `name` matches `pattern`: `*` any run of characters, `?` any one.
fn wildcard(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Greedy matching with backtracking to the last `*`.
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

fn at_line(path: &Path, line: usize, message: impl Into<String>) -> DataError {
    DataError {
        file: PathBuf::from(path),
        place: Some(Place::Line(line)),
        field: None,
        message: message.into(),
        source: None,
    }
}

/// The row object `text` holds, at `line` of `path`.
fn object_at(path: &Path, line: usize, text: &str) -> Result<Map<String, Value>> {
    match serde_json::from_str(text).map_err(|e| at_line(path, line, "invalid JSON").because(e))? {
        Value::Object(object) => Ok(object),
        other => Err(at_line(
            path,
            line,
            format!("expected a JSON object, got {}", type_name(&other)),
        )),
    }
}

/// A JSON file: one array of row objects when it starts with `[` (each row named by the
/// line it starts on), else JSON Lines, as `datasets`' json loader reads both (a UTF-8 byte
/// order mark before them too, as Windows editors write one).
fn read_json(
    path: &Path,
    each: &mut impl FnMut(Place, Map<String, Value>) -> Result<()>,
) -> Result<()> {
    let file = File::open(path).map_err(|e| DataError::file(path, "cannot open").because(e))?;
    let mut reader = BufReader::new(file);
    let cannot_read = |e| DataError::file(path, "cannot read").because(e);
    const BOM: &[u8] = b"\xEF\xBB\xBF";
    if reader.fill_buf().map_err(cannot_read)?.starts_with(BOM) {
        reader.consume(BOM.len());
    }
    let starts_array = loop {
        let buf = reader.fill_buf().map_err(cannot_read)?;
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => break buf[i] == b'[',
            None if buf.is_empty() => break false,
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    };
    if starts_array {
        let mut bytes = vec![];
        reader.read_to_end(&mut bytes).map_err(cannot_read)?;
        return read_array(path, &bytes, each);
    }
    read_lines(path, reader, each)
}

fn read_lines(
    path: &Path,
    mut reader: impl BufRead,
    each: &mut impl FnMut(Place, Map<String, Value>) -> Result<()>,
) -> Result<()> {
    let mut buf = Vec::new();
    let mut line = 0;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| DataError::file(path, "cannot read").because(e))?;
        if n == 0 {
            return Ok(());
        }
        line += 1;
        let text = std::str::from_utf8(&buf).map_err(|e| {
            at_line(
                path,
                line,
                format!("invalid UTF-8 at byte {}", e.valid_up_to()),
            )
        })?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        each(Place::Line(line), object_at(path, line, text)?)?;
    }
}

/// One JSON array of row objects; each row is named by the line its object starts on.
fn read_array(
    path: &Path,
    bytes: &[u8],
    each: &mut impl FnMut(Place, Map<String, Value>) -> Result<()>,
) -> Result<()> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        at_line(
            path,
            line,
            format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        )
    })?;
    let items: Vec<&RawValue> = serde_json::from_str(text)
        .map_err(|e| at_line(path, e.line(), "invalid JSON").because(e))?;
    let (mut line, mut seen) = (1, 0);
    for item in items {
        // Where the item's text lies in the file: count the newlines up to it.
        let offset = item.get().as_ptr() as usize - text.as_ptr() as usize;
        line += text[seen..offset].matches('\n').count();
        seen = offset;
        each(Place::Line(line), object_at(path, line, item.get())?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn prompts(path: &Path) -> Result<Rows<String>> {
        read(path, |row| row.text("prompt"))
    }

    #[test]
    fn wildcards() {
        assert!(wildcard("train-*.parquet", "train-00000-of-00002.parquet"));
        assert!(wildcard("*", "x"));
        assert!(wildcard("a?c*", "abc"));
        assert!(wildcard("*b*b", "abxbb"));
        assert!(!wildcard("train-*.parquet", "test-00000.parquet"));
        assert!(!wildcard("a?c", "ac"));
        assert!(!wildcard("*.json", "x.jsonl"));
    }

    /// A JSON array of rows (pretty-printed, as Alpaca-style files are): each row named by
    /// the line its object starts on; JSON Lines in a `.json` file read as JSON Lines.
    #[test]
    fn json_arrays_and_lines() {
        let dir = tempfile::tempdir().unwrap();
        let array = write(
            dir.path(),
            "a.json",
            "\n[\n  {\"prompt\": \"one\"},\n  {\n    \"prompt\": \"two\"\n  },\n\n  {\"prompt\": 3}\n]\n",
        );
        let e = prompts(&array).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}:8: field 'prompt': expected a string, got a number",
                array.display()
            )
        );
        let ok = write(
            dir.path(),
            "b.json",
            "[{\"prompt\": \"one\"},\n {\"prompt\": \"two\"}]",
        );
        let rows = prompts(&ok).unwrap();
        assert_eq!(&rows[..], ["one", "two"]);
        assert_eq!(rows.places, [(0, Place::Line(1)), (0, Place::Line(2))]);
        let lines = write(
            dir.path(),
            "c.json",
            "{\"prompt\": \"one\"}\n\n{\"prompt\": \"two\"}\n",
        );
        assert_eq!(
            prompts(&lines).unwrap().places,
            [(0, Place::Line(1)), (0, Place::Line(3))]
        );
        let bad = write(dir.path(), "d.json", "[{\"prompt\": \"one\"},\n 4]");
        let e = prompts(&bad).unwrap_err().to_string();
        assert!(
            e.ends_with(":2: expected a JSON object, got a number"),
            "{e}"
        );
        let broken = write(
            dir.path(),
            "e.json",
            "[{\"prompt\": \"one\"},\n {\"prompt\": }]",
        );
        let e = prompts(&broken).unwrap_err().to_string();
        assert!(e.ends_with(":2: invalid JSON"), "{e}");
        // A byte order mark is read past, in an array and in lines.
        let marked = write(dir.path(), "g.json", "\u{feff}[{\"prompt\": \"one\"}]");
        assert_eq!(&prompts(&marked).unwrap()[..], ["one"]);
        let marked = write(dir.path(), "h.jsonl", "\u{feff}{\"prompt\": \"one\"}\n");
        assert_eq!(&prompts(&marked).unwrap()[..], ["one"]);
        let empty = write(dir.path(), "f.json", " [ ] ");
        assert!(prompts(&empty)
            .unwrap_err()
            .to_string()
            .ends_with("no rows (the file is empty)"));
    }

    /// `dir/train-*.jsonl`: every matching file in name order, one dataset; errors name the
    /// file the row is in.
    #[test]
    fn patterns_read_every_matching_file_in_order() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "train-2.jsonl", "{\"prompt\": \"c\"}\n");
        write(
            dir.path(),
            "train-1.jsonl",
            "{\"prompt\": \"a\"}\n{\"prompt\": \"b\"}\n",
        );
        write(dir.path(), "test-1.jsonl", "{\"prompt\": \"x\"}\n");
        let rows = prompts(&dir.path().join("train-*.jsonl")).unwrap();
        assert_eq!(&rows[..], ["a", "b", "c"]);
        assert_eq!(
            rows.at(2),
            (dir.path().join("train-2.jsonl").as_path(), Place::Line(1))
        );
        let e = prompts(&dir.path().join("nothing-*.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("nothing-*.jsonl: no file matches the pattern"),
            "{e}"
        );
        let bad = write(dir.path(), "train-3.jsonl", "{\"prompt\": 1}\n");
        let e = prompts(&dir.path().join("train-?.jsonl"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "{}:1: field 'prompt': expected a string, got a number",
                bad.display()
            )
        );
    }

    /// A table's row has every column, `null` where it had none: `has` says no.
    #[test]
    fn null_fields_are_absent() {
        let row = Row {
            file: Path::new("x"),
            place: Place::Index(3),
            object: serde_json::from_str(r#"{"a": null, "b": 1}"#).unwrap(),
        };
        assert!(!row.has("a") && row.has("b") && !row.has("c"));
        assert_eq!(
            row.error(Some("b"), "bad").to_string(),
            "x[3]: field 'b': bad"
        );
    }
}
