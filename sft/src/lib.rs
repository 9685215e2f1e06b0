//! Step 1 of InstructGPT: supervised fine-tuning on demonstrations, plus the commands that
//! read a language model with its tokenizer: `eval` (per-row NLL) and `generate`.

pub mod eval;
pub mod train;

pub use common::generate::command as generate;
