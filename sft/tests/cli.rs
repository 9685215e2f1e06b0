//! The binary runs from a plain shell: no LD_LIBRARY_PATH, no other variable.

use std::process::Command;

#[test]
fn runs_with_an_empty_environment() {
    let out = Command::new(env!("CARGO_BIN_EXE_sft"))
        .arg("--version")
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("sft {}", env!("CARGO_PKG_VERSION"))
    );
}
