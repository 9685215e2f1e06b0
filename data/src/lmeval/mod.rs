//! Tasks in lm-evaluation-harness's YAML format, read as lm-eval 0.4 reads them: a
//! documented subset of its keys (anything else is refused by name), local JSON data,
//! prompts with zero or more shots (plain or through a chat template), the requests a
//! model answers, filters over its answers, and the metrics with their standard errors.
//! The model side (log-likelihoods, generation) is `sft eval --tasks`.

pub mod config;
pub mod filters;
pub mod metrics;
pub mod task;
pub mod yaml;

pub use config::{OutputType, TaskConfig};
pub use task::{PromptOptions, Task, Turn};
