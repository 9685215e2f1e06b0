//! The one error type of the `data` library: every message names the file, and where it
//! applies the line and the field.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub struct DataError {
    pub file: PathBuf,
    /// 1-based line number in a JSON Lines file.
    pub line: Option<usize>,
    pub field: Option<String>,
    pub message: String,
    /// What went wrong underneath (an I/O, JSON or tokenizer error), kept as the error's
    /// source: `{:#}` (as every command prints its error) shows it after the message.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": ")?;
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
            line: None,
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
