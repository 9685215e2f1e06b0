//! The one error type of the `common` library.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("invalid {what} '{value}': {expected}")]
    InvalidOption {
        what: &'static str,
        value: String,
        expected: String,
    },
    /// A command-line option (or its `--config` key) with a value that cannot be used.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{dir}: cannot load the model")]
    Load {
        dir: PathBuf,
        #[source]
        source: Box<Error>,
    },
    /// Capturing or replaying a CUDA graph failed (the shim's message).
    #[error("{0}")]
    CudaGraph(String),
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }
    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}
