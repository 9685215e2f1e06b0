//! The one error type of the `data` library: every message names the file, and where it
//! applies the row (its line, or its index in a Parquet file) and the field.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub struct DataError {
    pub file: PathBuf,
    /// Where in the file the row is.
    pub place: Option<Place>,
    pub field: Option<String>,
    pub message: String,
    /// What went wrong underneath (an I/O, JSON or tokenizer error), kept as the error's
    /// source: `{:#}` (as every command prints its error) shows it after the message.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// Where a row is in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The 1-based line a row starts on (JSON Lines, JSON arrays): `rows.jsonl:12`.
    Line(usize),
    /// A Parquet row's 0-based index, as `datasets` indexes it (`ds[11]`): `train.parquet[11]`.
    Index(usize),
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        match self.place {
            Some(Place::Line(line)) => write!(f, ":{line}: ")?,
            Some(Place::Index(i)) => write!(f, "[{i}]: ")?,
            None => write!(f, ": ")?,
        }
        if let Some(field) = &self.field {
            write!(f, "field '{field}': ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl DataError {
    pub fn file(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        DataError {
            file: file.into(),
            place: None,
            field: None,
            message: message.into(),
            source: None,
        }
    }

    /// The same error, caused by `source`.
    pub fn because(self, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        DataError {
            source: Some(source.into()),
            ..self
        }
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
