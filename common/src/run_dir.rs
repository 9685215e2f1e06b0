//! A run's output directory: `config.toml`, `checkpoints/step-NNNNNN/`, `final/`, `tb/`,
//! `metrics.jsonl`. Checkpoints are written under a temporary name and renamed, so a crash
//! never leaves a half checkpoint that `--resume` would pick. Writing is separate from the
//! keep/delete policy.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Present in every complete checkpoint; written last, before the rename.
pub const TRAINER_STATE: &str = "trainer_state.json";

#[derive(Debug, Clone)]
pub struct RunDir {
    pub root: PathBuf,
}

fn step_name(step: u64) -> String {
    format!("step-{step:06}")
}

impl RunDir {
    /// Checks and creates the directory before anything is written. Without `resume` or
    /// `overwrite`, a directory holding a run (finished or not) is refused untouched.
    pub fn prepare(root: &Path, resume: bool, overwrite: bool) -> Result<Self> {
        let run = RunDir {
            root: root.to_path_buf(),
        };
        let finished = run.final_dir().exists();
        let started = run.checkpoints().exists() || run.root.join("metrics.jsonl").exists();
        if !resume && !overwrite {
            if finished {
                return Err(Error::config(
                    root,
                    "holds a finished run; pass --overwrite to replace it or choose another --output-dir",
                ));
            }
            if started {
                return Err(Error::config(
                    root,
                    "holds an unfinished run; pass --resume to continue it or --overwrite to start over",
                ));
            }
        }
        fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let probe = root.join(format!(".write-test-{}", std::process::id()));
        fs::write(&probe, b"").map_err(|e| Error::config(root, format!("is not writable: {e}")))?;
        let _ = fs::remove_file(&probe);
        if overwrite && !resume {
            for sub in ["checkpoints", "final", "tb"] {
                let p = root.join(sub);
                if p.exists() {
                    fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
                }
            }
            for file in ["metrics.jsonl", "samples.jsonl", "config.toml"] {
                let p = root.join(file);
                if p.exists() {
                    fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
                }
            }
        }
        fs::create_dir_all(run.checkpoints()).map_err(|e| Error::io(run.checkpoints(), e))?;
        Ok(run)
    }

    /// The run directory at `root` as it is, for ranks that read it but never write it.
    pub fn at(root: &Path) -> Self {
        RunDir {
            root: root.to_path_buf(),
        }
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    pub fn final_dir(&self) -> PathBuf {
        self.root.join("final")
    }

    pub fn tb_dir(&self) -> PathBuf {
        self.root.join("tb")
    }

    /// Complete checkpoints, oldest first.
    pub fn complete_checkpoints(&self) -> Vec<(u64, PathBuf)> {
        let Ok(entries) = fs::read_dir(self.checkpoints()) else {
            return vec![];
        };
        let mut found: Vec<(u64, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let step = name.strip_prefix("step-")?.parse().ok()?;
                e.path()
                    .join(TRAINER_STATE)
                    .exists()
                    .then(|| (step, e.path()))
            })
            .collect();
        found.sort();
        found
    }

    /// The newest complete checkpoint.
    pub fn latest_checkpoint(&self) -> Option<(u64, PathBuf)> {
        self.complete_checkpoints().pop()
    }

    /// Writes checkpoint `step` through `write` into a temporary directory, then renames it
    /// into place. A crash at any point leaves earlier checkpoints as they were.
    pub fn save_checkpoint(
        &self,
        step: u64,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let name = step_name(step);
        let tmp = self.checkpoints().join(format!(".{name}.tmp"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        if let Err(e) = write(&tmp) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if !tmp.join(TRAINER_STATE).exists() {
            let _ = fs::remove_dir_all(&tmp);
            return Err(Error::checkpoint(
                &tmp,
                format!("the writer did not write {TRAINER_STATE}"),
            ));
        }
        crate::faults::hit("checkpoint-before-rename");
        let dest = self.checkpoints().join(&name);
        if dest.exists() {
            fs::remove_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
        }
        fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
        Ok(dest)
    }

    /// Deletes the oldest complete checkpoints beyond the newest `keep_last` (0 keeps all),
    /// and leftovers of interrupted writes. The newest complete checkpoint always stays.
    pub fn prune(&self, keep_last: usize) -> Result<()> {
        if let Ok(entries) = fs::read_dir(self.checkpoints()) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        if keep_last == 0 {
            return Ok(());
        }
        let all = self.complete_checkpoints();
        let excess = all.len().saturating_sub(keep_last.max(1));
        for (_, path) in &all[..excess] {
            fs::remove_dir_all(path).map_err(|e| Error::io(path, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_state(dir: &Path) -> Result<()> {
        fs::write(dir.join(TRAINER_STATE), "{}").map_err(|e| Error::io(dir, e))
    }

    #[test]
    fn checkpoints_are_complete_or_absent_and_pruned() {
        let root = tempfile::tempdir().unwrap();
        let run = RunDir::prepare(root.path(), false, false).unwrap();
        for step in [2, 4, 6] {
            run.save_checkpoint(step, write_state).unwrap();
        }
        // a failed write leaves nothing behind
        let failed = run.save_checkpoint(8, |_| Err(Error::config("x", "disk full")));
        assert!(failed.is_err());
        // a leftover of a crash mid-write is not a checkpoint
        fs::create_dir_all(run.checkpoints().join(".step-000010.tmp")).unwrap();
        fs::create_dir_all(run.checkpoints().join("step-000012")).unwrap(); // no state file
        assert_eq!(run.latest_checkpoint().unwrap().0, 6);
        run.prune(2).unwrap();
        let steps: Vec<u64> = run.complete_checkpoints().iter().map(|c| c.0).collect();
        assert_eq!(steps, [4, 6]);
        assert!(!run.checkpoints().join(".step-000010.tmp").exists());
    }

    #[test]
    fn refuses_an_existing_run_without_resume_or_overwrite() {
        let root = tempfile::tempdir().unwrap();
        let run = RunDir::prepare(root.path(), false, false).unwrap();
        run.save_checkpoint(1, write_state).unwrap();
        let e = RunDir::prepare(root.path(), false, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unfinished run; pass --resume"), "{e}");
        fs::create_dir_all(run.final_dir()).unwrap();
        let e = RunDir::prepare(root.path(), false, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("finished run; pass --overwrite"), "{e}");
        assert!(
            run.latest_checkpoint().is_some(),
            "a refused prepare touched nothing"
        );
        RunDir::prepare(root.path(), false, true).unwrap();
        assert!(run.latest_checkpoint().is_none() && !run.final_dir().exists());
    }
}
