//! Outputs of the commands: JSON Lines written atomically.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::error::{DataError, Result};

/// Writes JSON Lines through a temporary file renamed into place, so a crash never leaves a
/// half-written output.
pub fn write_jsonl(path: &Path, rows: &[serde_json::Value]) -> Result<()> {
    let tmp = path.with_extension("jsonl.tmp");
    let fail = |e: std::io::Error| DataError::file(path, "cannot write").because(e);
    let mut f = fs::File::create(&tmp).map_err(fail)?;
    for row in rows {
        writeln!(f, "{row}").map_err(fail)?;
    }
    f.sync_all().map_err(fail)?;
    fs::rename(&tmp, path).map_err(fail)
}
