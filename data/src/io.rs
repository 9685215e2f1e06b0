//! What every command does with files: a model directory loaded with its tokenizer
//! (checked against each other), and JSON Lines outputs written atomically.

use std::fs;
use std::io::Write;
use std::path::Path;

use common::{Head, Model};
use tch::{Device, Kind};

use crate::error::{DataError, Result};
use crate::tokenizer::Tokenizer;

/// A model directory's weights (with `head`) and tokenizer, checked against each other.
pub fn load_with_tokenizer(
    dir: &Path,
    head: Head,
    device: Device,
    kind: Kind,
) -> Result<(Model, Tokenizer)> {
    let tokenizer = Tokenizer::load(dir)?;
    let (model, _) = Model::load(dir, head, device, kind)
        .map_err(|e| DataError::file(dir, format!("cannot load the model: {e}")))?;
    let (tokens, embedded) = (tokenizer.vocab_size() as i64, model.config.vocab_size());
    if tokens > embedded {
        return Err(DataError::file(
            dir.join("tokenizer.json"),
            format!("the tokenizer has {tokens} tokens but the model embeds only {embedded} (vocab_size in config.json)"),
        ));
    }
    Ok((model, tokenizer))
}

/// Writes JSON Lines through a temporary file renamed into place, so a crash never leaves a
/// half-written output.
pub fn write_jsonl(path: &Path, rows: &[serde_json::Value]) -> Result<()> {
    let tmp = path.with_extension("jsonl.tmp");
    let fail = |e: std::io::Error| DataError::file(path, format!("cannot write: {e}"));
    let mut f = fs::File::create(&tmp).map_err(fail)?;
    for row in rows {
        writeln!(f, "{row}").map_err(fail)?;
    }
    f.sync_all().map_err(fail)?;
    fs::rename(&tmp, path).map_err(fail)
}
