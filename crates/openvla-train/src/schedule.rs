//! Learning-rate schedules.
//!
//! `finetune.py` trains at a constant learning rate (spec §7.3), which stays the default. Training
//! a policy from scratch (`openvla init` + `--mode full`) benefits from a linear warmup and a
//! cosine decay, as in Hugging Face's `get_cosine_schedule_with_warmup`, which PyTorch training
//! scripts step once after every optimizer step:
//!
//! ```text
//! s < warmup:  lr(s) = base * s / warmup                      (s = optimizer steps done before)
//! otherwise:   lr(s) = base * max(0, 0.5 * (1 + cos(pi * (s - warmup) / (total - warmup))))
//! ```
//!
//! so the first update of a warmed-up run uses lr 0 (as the reference's scheduler does) and
//! the last one a learning rate close to 0. The schedule depends on the total step count: a run
//! resumed with a larger `--max-steps` continues on the longer curve from where it is.

use crate::error::{Result, TrainError};
use serde::{Deserialize, Serialize};

/// The shape of the learning rate over a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
pub enum LrScheduleKind {
    /// The base learning rate at every step (`finetune.py`).
    #[default]
    #[value(name = "constant")]
    #[serde(rename = "constant")]
    Constant,
    /// Linear warmup, then half a cosine down to 0 at the last step.
    #[value(name = "cosine")]
    #[serde(rename = "cosine")]
    Cosine,
}

/// A learning-rate schedule: a kind, a linear warmup and the run's length.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// The shape after warmup.
    pub kind: LrScheduleKind,
    /// Optimizer steps of linear warmup from 0 (0 = none).
    pub warmup_steps: u64,
    /// Optimizer steps of the whole run (the cosine reaches 0 there).
    pub total_steps: u64,
}

impl LrSchedule {
    /// The constant schedule (no warmup).
    pub fn constant() -> Self {
        Self {
            kind: LrScheduleKind::Constant,
            warmup_steps: 0,
            total_steps: 0,
        }
    }

    /// Checks that the warmup fits in the run.
    pub fn validate(&self) -> Result<()> {
        if self.warmup_steps > 0 && self.warmup_steps >= self.total_steps {
            return Err(TrainError::Invalid(format!(
                "--warmup-steps {} must be smaller than --max-steps {}",
                self.warmup_steps, self.total_steps
            )));
        }
        Ok(())
    }

    /// The multiplier of the base learning rate for the update that follows `done` optimizer
    /// steps (0-based: the first update has `done = 0`).
    pub fn factor(&self, done: u64) -> f64 {
        if done < self.warmup_steps {
            return done as f64 / self.warmup_steps as f64;
        }
        match self.kind {
            LrScheduleKind::Constant => 1.0,
            LrScheduleKind::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                // Clamped: a step past the end (never taken by a run) stays at 0.
                let progress = ((done - self.warmup_steps) as f64 / span).min(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate of the update that follows `done` optimizer steps.
    pub fn lr(&self, base: f64, done: u64) -> f64 {
        base * self.factor(done)
    }

    /// Whether the schedule is the plain constant one (the learning rate never changes).
    pub fn is_constant(&self) -> bool {
        self.kind == LrScheduleKind::Constant && self.warmup_steps == 0
    }
}

impl Default for LrSchedule {
    fn default() -> Self {
        Self::constant()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(warmup: u64, total: u64) -> LrSchedule {
        LrSchedule {
            kind: LrScheduleKind::Cosine,
            warmup_steps: warmup,
            total_steps: total,
        }
    }

    #[test]
    fn constant_is_one_everywhere() {
        let s = LrSchedule::constant();
        assert!(s.is_constant());
        for d in [0, 1, 10, 1_000_000] {
            assert_eq!(s.factor(d), 1.0);
        }
    }

    #[test]
    fn cosine_matches_hugging_face_values() {
        // transformers.get_cosine_schedule_with_warmup(opt, 10, 110), lr_lambda(step):
        // 0 -> 0.0, 5 -> 0.5, 10 -> 1.0, 60 -> 0.5, 35 -> 0.8535533905932737, 110 -> 0.0
        let s = cosine(10, 110);
        assert!(!s.is_constant());
        let want = [
            (0, 0.0),
            (5, 0.5),
            (10, 1.0),
            (35, 0.853_553_390_593_273_7),
            (60, 0.5),
            (110, 0.0),
        ];
        for (d, f) in want {
            assert!((s.factor(d) - f).abs() < 1e-12, "step {d}: {}", s.factor(d));
        }
        assert_eq!(s.lr(4e-4, 60), 2e-4);
        // Past the end it stays at 0 rather than rising again.
        assert_eq!(s.factor(150), 0.0);
    }

    #[test]
    fn constant_with_warmup_ramps_then_holds() {
        let s = LrSchedule {
            kind: LrScheduleKind::Constant,
            warmup_steps: 4,
            total_steps: 100,
        };
        assert!(!s.is_constant());
        assert_eq!(s.factor(0), 0.0);
        assert_eq!(s.factor(2), 0.5);
        assert_eq!(s.factor(4), 1.0);
        assert_eq!(s.factor(99), 1.0);
    }

    #[test]
    fn warmup_longer_than_run_is_an_error() {
        let err = cosine(100, 100).validate().unwrap_err().to_string();
        assert!(err.contains("--warmup-steps 100"), "{err}");
        assert!(cosine(10, 100).validate().is_ok());
        assert!(LrSchedule::constant().validate().is_ok());
    }
}
