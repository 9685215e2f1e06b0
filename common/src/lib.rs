//! Shared by every stage: models in Hugging Face layout, checkpoint I/O, generation with a
//! KV cache, tensor ops, and device/dtype selection.

pub mod checkpoint;
pub mod cli;
pub mod config_file;
pub mod device;
pub mod error;
pub mod faults;
pub mod generate;
pub mod logging;
pub mod metrics;
pub mod models;
pub mod ops;
pub mod optim;
pub mod run_dir;
pub mod sampler;
pub mod schedule;
pub mod scoring;
pub mod train;

pub use error::{Error, Result};
pub use models::{Head, Model, ModelConfig};
