//! Datasets of every stage: readers of JSON Lines, JSON arrays and Parquet with
//! file/row/field errors, the tokenizer
//! with special tokens and chat templates, loss masks and truncation, collation, and
//! seeded resumable sampling.

pub mod byte_level;
pub mod chat;
pub mod error;
pub mod formats;
pub mod io;
pub mod lmeval;
pub mod packing;
pub mod pairs;
pub mod parquet;
pub mod preference;
pub mod prompts;
pub mod response;
pub mod rows;
pub mod sampler;
pub mod sft;
pub mod tokenizer;

pub use error::{DataError, Result};
pub use formats::{Content, Message, PreferenceExample, PromptExample, SftExample, TemplateArgs};
pub use tokenizer::Tokenizer;

use std::path::Path;

/// Reads an SFT file (`{"prompt","completion"}`, `{"messages"}` or `{"text"}` rows).
pub fn read_sft(path: &Path) -> Result<rows::Rows<SftExample>> {
    rows::read(path, SftExample::decode)
}

/// Reads an SFT file whose language-modelling rows keep their text in `text_field` (TRL's
/// `dataset_text_field`).
pub fn read_sft_with(path: &Path, text_field: &str) -> Result<rows::Rows<SftExample>> {
    rows::read(path, |row| SftExample::decode_with(row, text_field))
}

/// Reads a preference file (pairs and rankings, plain or conversational).
pub fn read_preferences(path: &Path) -> Result<rows::Rows<PreferenceExample>> {
    rows::read(path, PreferenceExample::decode)
}

/// Reads unpaired feedback (KTO's rows) or preference rows, for an unpaired loss.
pub fn read_feedback(path: &Path) -> Result<rows::Rows<formats::FeedbackExample>> {
    rows::read(path, formats::FeedbackExample::decode)
}

/// Reads a prompt file keeping each row's other fields (for rewards that read them).
pub fn read_prompts_with_fields(
    path: &Path,
) -> Result<rows::Rows<(PromptExample, formats::PromptFields)>> {
    rows::read(path, formats::decode_prompt_with_fields)
}

/// Reads a prompt file (`{"prompt"}` or `{"messages"}` rows).
pub fn read_prompts(path: &Path) -> Result<rows::Rows<PromptExample>> {
    rows::read(path, formats::decode_prompt)
}
