//! Learning-rate schedules as pure functions of the optimiser step.
//!
//! `step` counts the steps already taken, as `transformers`' schedulers do: with warmup the
//! first step runs at lr 0 · ramp, reaching the base rate at `step = warmup`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    #[default]
    Linear,
    Cosine,
}

impl FromStr for ScheduleKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "constant" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            _ => Err(format!(
                "'{s}' is not a schedule (expected constant, linear or cosine)"
            )),
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cosine => "cosine",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// The decay ends at `base_lr · min_lr_ratio`.
    pub min_lr_ratio: f64,
}

impl Schedule {
    /// The learning rate of the step after `step` steps were taken.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * step as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let decay = match self.kind {
            ScheduleKind::Constant => return self.base_lr,
            ScheduleKind::Linear => 1.0 - progress,
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        self.base_lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(kind: ScheduleKind, floor: f64) -> Schedule {
        Schedule {
            kind,
            base_lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
            min_lr_ratio: floor,
        }
    }

    #[test]
    fn warmup_then_decay() {
        let lin = s(ScheduleKind::Linear, 0.0);
        assert_eq!(lin.lr(0), 0.0);
        assert_eq!(lin.lr(5), 0.5);
        assert_eq!(lin.lr(10), 1.0);
        assert!((lin.lr(60) - 0.5).abs() < 1e-12);
        assert_eq!(lin.lr(110), 0.0);
        assert_eq!(lin.lr(500), 0.0);
        let cos = s(ScheduleKind::Cosine, 0.1);
        assert!((cos.lr(60) - 0.55).abs() < 1e-12);
        assert!((cos.lr(110) - 0.1).abs() < 1e-12);
        assert_eq!(s(ScheduleKind::Constant, 0.0).lr(100), 1.0);
    }
}
