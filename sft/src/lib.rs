//! Step 1 of InstructGPT: supervised fine-tuning on demonstrations, plus the commands that
//! read a language model with its tokenizer: `eval` (per-row NLL, or lm-evaluation-harness
//! task files) and `generate`.

pub mod distill;
pub mod eval;
pub mod gold;
pub mod tasks;
pub mod train;

pub use common::generate::command as generate;
