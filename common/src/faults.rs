//! Crash points for the crash-and-resume tests: when `RLHF_CRASH_AT` names a point (e.g.
//! `checkpoint-before-rename` or `checkpoint-before-rename@2` for its second hit), the
//! process kills itself with SIGKILL there — no destructor, no flush, exactly like a
//! machine being taken away; with `RLHF_CRASH_RANK=r` only data-parallel rank r does. Unset, `hit` costs one environment lookup.
//!
//! `RLHF_NAN_FROM_STEP=k` makes [`nan_from`] true once a training unit has taken k
//! updates, so tests can drive the non-finite-loss path. Both are used by the training
//! unit's `step` (`common::trainee`) and the checkpoint writer only.

use std::sync::atomic::{AtomicUsize, Ordering};

static HITS: AtomicUsize = AtomicUsize::new(0);

pub fn hit(point: &str) {
    let Ok(spec) = std::env::var("RLHF_CRASH_AT") else {
        return;
    };
    // RLHF_CRASH_RANK=r: only data-parallel rank r (RANK) dies.
    if let Ok(rank) = std::env::var("RLHF_CRASH_RANK") {
        if std::env::var("RANK").ok() != Some(rank) {
            return;
        }
    }
    let (name, nth) = match spec.split_once('@') {
        Some((n, k)) => (n.to_string(), k.parse().unwrap_or(1)),
        None => (spec, 1),
    };
    if name == point && HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        #[allow(unsafe_code)]
        // SAFETY: kill(2) on our own pid; nothing is touched afterwards.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Whether the loss of a step taken after `updates` updates should be poisoned with NaN
/// (tests only).
pub fn nan_from(updates: u64) -> bool {
    std::env::var("RLHF_NAN_FROM_STEP")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|k| updates >= k)
}
