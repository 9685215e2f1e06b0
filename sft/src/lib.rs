//! Step 1 of InstructGPT: supervised fine-tuning on demonstrations, plus the commands that
//! read a language model with its tokenizer: `eval` (per-row NLL) and `generate`.

pub mod eval;
pub mod generate;
pub mod train;

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use common::{Head, Model};
use data::Tokenizer;
use tch::{Device, Kind};

/// A model directory's weights (with `head`) and tokenizer, checked against each other.
pub fn load_with_tokenizer(
    dir: &Path,
    head: Head,
    device: Device,
    kind: Kind,
) -> Result<(Model, Tokenizer)> {
    let tokenizer = Tokenizer::load(dir)?;
    let (model, _) = Model::load(dir, head, device, kind)
        .with_context(|| format!("loading the model in {}", dir.display()))?;
    let (tokens, embedded) = (tokenizer.vocab_size() as i64, model.config.vocab_size());
    if tokens > embedded {
        bail!(
            "{}: the tokenizer has {tokens} tokens but the model embeds only {embedded} (vocab_size in config.json)",
            dir.join("tokenizer.json").display()
        );
    }
    Ok((model, tokenizer))
}

/// Writes JSON Lines through a temporary file renamed into place, so a crash never leaves a
/// half-written output.
pub fn write_jsonl(path: &Path, rows: &[serde_json::Value]) -> Result<()> {
    let tmp = path.with_extension("jsonl.tmp");
    let mut f =
        fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    for row in rows {
        writeln!(f, "{row}").with_context(|| format!("cannot write {}", tmp.display()))?;
    }
    f.sync_all().ok();
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
