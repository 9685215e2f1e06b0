//! Parquet files — what `Dataset.to_parquet` writes and the Hugging Face Hub stores every
//! dataset as — read row by row into the JSON objects `datasets` gives Python for them:
//! columns in the file's order, structs as objects, lists as arrays, maps as objects, nulls
//! as `null` (a struct's field that a row lacked comes back `null`, as Arrow stores it and
//! `load_dataset` returns it), and the columns `datasets` stores with its `Json` feature
//! (Parquet's JSON type: strings holding JSON) parsed back into the values they hold.
//! A row is named by its 0-based index (`train.parquet[11]`, `ds[11]` in Python).

use std::fs::File;
use std::path::Path;

use parquet::basic::{ConvertedType, LogicalType, Repetition};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use parquet::schema::types::Type;
use serde_json::{Map, Value};

use crate::error::{DataError, Place, Result};

/// Calls `each` with every row of the Parquet file `path`, in order.
pub fn read(
    path: &Path,
    mut each: impl FnMut(Place, Map<String, Value>) -> Result<()>,
) -> Result<()> {
    let file = File::open(path).map_err(|e| DataError::file(path, "cannot open").because(e))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| DataError::file(path, "not a readable Parquet file").because(e))?;
    let schema = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema_ptr();
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| DataError::file(path, "cannot read its rows").because(e))?;
    for (i, row) in rows.enumerate() {
        let at = |message: String| DataError {
            place: Some(Place::Index(i)),
            ..DataError::file(path, message)
        };
        let row = row.map_err(|e| at("cannot read the row".into()).because(e))?;
        let object = group(&row, Some(&schema)).map_err(|(field, message)| DataError {
            field: Some(field),
            ..at(message)
        })?;
        each(Place::Index(i), object)?;
    }
    Ok(())
}

/// A failure converting a value: the field's path (`messages[0].tool_calls`) and why.
type Failure = (String, String);

/// A struct (or the row) as an object; `ty` is its schema, when known.
fn group(row: &Row, ty: Option<&Type>) -> Result<Map<String, Value>, Failure> {
    let fields = ty.filter(|t| t.is_group()).map(|t| t.get_fields());
    row.get_column_iter()
        .map(|(name, field)| {
            let child = fields.and_then(|f| f.iter().find(|t| t.name() == name));
            let v =
                value(field, child.map(|t| &**t)).map_err(|(path, m)| (join(name, &path), m))?;
            Ok((name.clone(), v))
        })
        .collect()
}

/// `name` then the path below it (`messages` + `[0].role`, `a` + `b` → `a.b`).
fn join(name: &str, path: &str) -> String {
    format!("{name}{}", dot(path))
}

fn value(field: &Field, ty: Option<&Type>) -> Result<Value, Failure> {
    match field {
        Field::Str(s) if ty.is_some_and(is_json) => serde_json::from_str(s).map_err(|e| {
            (
                String::new(),
                format!("a JSON column's value is not valid JSON ({e})"),
            )
        }),
        Field::Group(row) => group(row, ty).map(Value::Object),
        Field::ListInternal(list) => {
            let element = ty.and_then(list_element);
            list.elements()
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    value(f, element).map_err(|(path, m)| (format!("[{i}]{}", dot(&path)), m))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array)
        }
        Field::MapInternal(map) => {
            let value_type = ty.and_then(map_value);
            let mut object = Map::new();
            for (k, v) in map.entries() {
                let key = match k.to_json_value() {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                let v = value(v, value_type).map_err(|(path, m)| (join(&key, &path), m))?;
                object.insert(key, v);
            }
            Ok(Value::Object(object))
        }
        other => Ok(other.to_json_value()),
    }
}

fn dot(path: &str) -> String {
    if path.is_empty() || path.starts_with('[') {
        path.to_string()
    } else {
        format!(".{path}")
    }
}

/// Parquet's JSON type (pyarrow's `arrow.json`, `datasets`' `Json` feature).
fn is_json(ty: &Type) -> bool {
    let info = ty.get_basic_info();
    ty.is_primitive()
        && (info.converted_type() == ConvertedType::JSON
            || matches!(info.logical_type_ref(), Some(LogicalType::Json)))
}

/// The schema of a list's elements, by Parquet's rules for its three-level lists and the
/// older two-level forms.
fn list_element(ty: &Type) -> Option<&Type> {
    let info = ty.get_basic_info();
    let annotated = info.converted_type() == ConvertedType::LIST
        || matches!(info.logical_type_ref(), Some(LogicalType::List));
    if !annotated || ty.is_primitive() {
        // A repeated field without the annotation: the field is its own element.
        return Some(ty);
    }
    let repeated = ty.get_fields().first()?;
    let repeated_info = repeated.get_basic_info();
    if repeated_info.has_repetition() && repeated_info.repetition() != Repetition::REPEATED {
        return None;
    }
    let own_element = repeated.is_primitive()
        || repeated.get_fields().len() > 1
        || repeated.name() == "array"
        || repeated.name() == format!("{}_tuple", ty.name());
    if own_element {
        Some(repeated)
    } else {
        repeated.get_fields().first().map(|t| &**t)
    }
}

/// The schema of a map's values (`key_value` group: key, value).
fn map_value(ty: &Type) -> Option<&Type> {
    let key_value = ty.get_fields().first()?;
    key_value.get_fields().get(1).map(|t| &**t)
}
