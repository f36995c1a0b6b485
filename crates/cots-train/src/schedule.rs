//! What is the learning rate at step t? Linear warm-up, then cosine decay.

use serde::{Deserialize, Serialize};

/// Warm-up + cosine schedule over `total` steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    pub warmup_steps: u64,
    /// The final learning rate as a fraction of the peak.
    pub min_ratio: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            warmup_steps: 100,
            min_ratio: 0.01,
        }
    }
}

/// The learning rate at `step` (0-based) of `total` for peak `lr`.
pub fn lr_at(cfg: &ScheduleConfig, lr: f64, step: u64, total: u64) -> f64 {
    if step < cfg.warmup_steps {
        return lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let span = total.saturating_sub(cfg.warmup_steps).max(1) as f64;
    let progress = ((step - cfg.warmup_steps) as f64 / span).min(1.0);
    let floor = lr * cfg.min_ratio;
    floor + (lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The EMA momentum at `step` (0-based) of `total`: constant `m0`, or with
/// `m1` a cosine from `m0` at step 0 to `m1` at the end (BYOL, DINO: a
/// momentum rising to 1 lets the momentum towers follow the fast early
/// changes and then settle).
pub fn momentum_at(m0: f64, m1: Option<f64>, step: u64, total: u64) -> f64 {
    match m1 {
        None => m0,
        Some(m1) => {
            let progress = (step as f64 / total.max(1) as f64).min(1.0);
            m1 - (m1 - m0) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn momentum_is_constant_or_a_cosine_between_its_ends() {
        assert_eq!(momentum_at(0.99, None, 37, 100), 0.99);
        assert!((momentum_at(0.9, Some(1.0), 0, 100) - 0.9).abs() < 1e-12);
        assert!((momentum_at(0.9, Some(1.0), 50, 100) - 0.95).abs() < 1e-12);
        assert!((momentum_at(0.9, Some(1.0), 100, 100) - 1.0).abs() < 1e-12);
        let ms: Vec<f64> = (0..=100)
            .map(|s| momentum_at(0.9, Some(1.0), s, 100))
            .collect();
        assert!(ms.windows(2).all(|w| w[1] >= w[0]));
    }

    #[test]
    fn warms_up_then_decays_to_the_floor() {
        let cfg = ScheduleConfig {
            warmup_steps: 10,
            min_ratio: 0.1,
        };
        assert!((lr_at(&cfg, 1.0, 0, 110) - 0.1).abs() < 1e-12);
        assert!((lr_at(&cfg, 1.0, 9, 110) - 1.0).abs() < 1e-12);
        assert!((lr_at(&cfg, 1.0, 10, 110) - 1.0).abs() < 1e-12);
        assert!((lr_at(&cfg, 1.0, 110, 110) - 0.1).abs() < 1e-12);
        let lrs: Vec<f64> = (10..=110).map(|s| lr_at(&cfg, 1.0, s, 110)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]));
    }
}
