//! Helpers for the workspace tests: the reference Python (with `transformers`) that the
//! bootstrap installs, and small tensor comparisons.

use std::path::{Path, PathBuf};
use std::process::Command;

use tch::Tensor;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The Python interpreter holding `transformers`: `RLHF_PYTHON`, else `.venv/bin/python`.
pub fn python() -> PathBuf {
    std::env::var_os("RLHF_PYTHON")
        .map(PathBuf::from)
        .or_else(|| option_env!("RLHF_PYTHON").map(PathBuf::from))
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"))
}

/// Runs `tests/python/<script>` with `args`, returning its stdout parsed as JSON.
/// Panics with the script's stderr when it fails: a broken reference is a test failure.
pub fn run_python(script: &str, args: &[&str]) -> serde_json::Value {
    let path = repo_root().join("tests/python").join(script);
    let out = Command::new(python())
        .arg(&path)
        .args(args)
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference script printed invalid JSON")
}

/// A `[B, T]` i64 tensor from nested JSON arrays.
pub fn tensor_2d_i64(v: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<i64>> = serde_json::from_value(v.clone()).unwrap();
    Tensor::from_slice2(&rows)
}

/// A `[B, T]` f32 tensor from nested JSON arrays.
pub fn tensor_2d_f32(v: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<f32>> = serde_json::from_value(v.clone()).unwrap();
    Tensor::from_slice2(&rows)
}

/// Largest absolute difference between `a` and `b` where `mask` is 1.
pub fn max_masked_diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    ((a - b).abs() * mask.to_kind(tch::Kind::Float))
        .max()
        .double_value(&[])
}
