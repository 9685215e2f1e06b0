//! Shared by every stage: models in Hugging Face layout (loaded with their tokenizer),
//! checkpoint I/O, generation with a KV cache, scoring with a scalar head, tensor ops,
//! device/dtype selection, and the training machinery (the training unit, the world of
//! processes, the run's session).

pub mod averaging;
pub mod checkpoint;
pub mod cli;
pub mod config_file;
pub mod cuda_graph;
pub mod device;
pub mod dist;
pub mod error;
pub mod faults;
pub mod generate;
pub mod logging;
pub mod metrics;
pub mod models;
pub mod ops;
pub mod optim;
pub mod overlap;
pub mod program;
pub mod python_str;
pub mod rng;
pub mod run_dir;
pub mod schedule;
pub mod scoring;
pub mod shim;
pub mod sync_ref;
pub mod tools;
pub mod train;
pub mod trainee;
pub mod world;

pub use error::{Error, Result};
pub use models::{Head, Model, ModelConfig, ModelOptions};
pub use trainee::Trainee;
pub use world::World;
