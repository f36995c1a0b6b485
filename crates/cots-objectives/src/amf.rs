//! Adaptive momentum filter (COTS AMF; the mechanism is reconstructed).
//!
//! Web pairs are noisy. Each pair is scored with the momentum encoders,
//! `s_i = f^_i . t^_i`; an EMA of the mean and of the second moment of the
//! scores gives a running mean `mu` and std `sigma`. After `warmup_steps`
//! calls, pairs with `s_i < mu - lambda * sigma` get weight 0: every objective
//! averages its rows with these weights, and the composition does not
//! enqueue them.
//!
//! The threshold of a step uses the statistics of the previous steps; the
//! step's own scores (all of them, dropped or not) are folded in afterwards,
//! so the statistics describe the whole data distribution rather than the
//! part that survived earlier filtering (which would ratchet the threshold
//! upward). The first call initialises the statistics directly, so no
//! zero-initialised EMA biases them.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::{Error, ObjectiveState, Result};

/// Settings of the adaptive momentum filter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmfConfig {
    pub enabled: bool,
    /// Drop pairs scoring more than `lambda` running stds below the running mean.
    pub lambda: f64,
    /// Steps during which statistics are gathered but nothing is dropped.
    pub warmup_steps: u64,
    /// EMA momentum of the statistics (per step).
    pub momentum: f64,
}

impl Default for AmfConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            lambda: 1.0,
            warmup_steps: 1000,
            momentum: 0.99,
        }
    }
}

/// What the filter decided this step, for logging.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AmfStats {
    /// Running mean and std after this step's update.
    pub mean: f64,
    pub std: f64,
    /// The threshold used this step (`None` during warm-up).
    pub threshold: Option<f64>,
    pub kept: usize,
    pub filtered_fraction: f64,
}

/// Per-pair weights and statistics of one step.
#[derive(Clone, Debug)]
pub struct AmfOutput {
    /// `[B]` f32: 1 kept, 0 dropped.
    pub weights: Tensor,
    pub stats: AmfStats,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Running {
    step: u64,
    /// `(mean, second moment)` once the first batch was seen.
    moments: Option<(f64, f64)>,
}

/// The adaptive momentum filter; its running statistics are checkpointed.
#[derive(Clone, Debug)]
pub struct AdaptiveMomentumFilter {
    cfg: AmfConfig,
    run: Running,
}

impl AdaptiveMomentumFilter {
    pub fn new(cfg: &AmfConfig) -> Result<Self> {
        if !(0.0..1.0).contains(&cfg.momentum) || !(cfg.lambda.is_finite()) {
            return Err(Error::Config(format!(
                "amf.momentum must be in [0, 1) and amf.lambda finite, got {} and {}",
                cfg.momentum, cfg.lambda
            )));
        }
        Ok(Self {
            cfg: cfg.clone(),
            run: Running::default(),
        })
    }

    fn mean_std(&self) -> Option<(f64, f64)> {
        self.run
            .moments
            .map(|(m, m2)| (m, (m2 - m * m).max(0.0).sqrt()))
    }

    /// Scores the pairs, decides the weights, then updates the statistics.
    ///
    /// # Shapes
    /// - `image_embed_m`, `text_embed_m`: `[B, E]` (L2-normalised momentum keys).
    /// - returns weights `[B]` f32.
    pub fn filter(&mut self, image_embed_m: &Tensor, text_embed_m: &Tensor) -> Result<AmfOutput> {
        let s: Vec<f64> = (image_embed_m.detach() * text_embed_m.detach())?
            .sum(D::Minus1)?
            .to_dtype(DType::F64)?
            .to_vec1()?;
        let b = s.len();
        let threshold = match self.mean_std() {
            Some((m, sd)) if self.run.step >= self.cfg.warmup_steps => {
                Some(m - self.cfg.lambda * sd)
            }
            _ => None,
        };
        let w: Vec<f32> = s
            .iter()
            .map(|&v| match threshold {
                Some(th) if v < th => 0.0,
                _ => 1.0,
            })
            .collect();
        let kept = w.iter().filter(|&&v| v > 0.0).count();
        if b > 0 {
            let bm = s.iter().sum::<f64>() / b as f64;
            let bm2 = s.iter().map(|v| v * v).sum::<f64>() / b as f64;
            let a = self.cfg.momentum;
            self.run.moments = Some(match self.run.moments {
                None => (bm, bm2),
                Some((m, m2)) => (a * m + (1.0 - a) * bm, a * m2 + (1.0 - a) * bm2),
            });
        }
        self.run.step += 1;
        let (mean, std) = self.mean_std().unwrap_or((0.0, 0.0));
        let weights = Tensor::from_vec(w, b, image_embed_m.device())?;
        Ok(AmfOutput {
            weights,
            stats: AmfStats {
                mean,
                std,
                threshold,
                kept,
                filtered_fraction: if b == 0 {
                    0.0
                } else {
                    (b - kept) as f64 / b as f64
                },
            },
        })
    }

    /// The step counter and running moments (metadata only).
    pub fn state(&self) -> Result<ObjectiveState> {
        Ok(ObjectiveState {
            meta: serde_json::to_value(self.run).map_err(|e| Error::State {
                owner: "amf".into(),
                message: e.to_string(),
            })?,
            ..Default::default()
        })
    }

    pub fn load_state(&mut self, s: &ObjectiveState) -> Result<()> {
        self.run = serde_json::from_value(s.meta.clone()).map_err(|e| Error::State {
            owner: "amf".into(),
            message: e.to_string(),
        })?;
        Ok(())
    }
}
