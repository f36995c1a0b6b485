//! Task-level alignment (COTS level 3): KL between the image-to-text and
//! text-to-image retrieval distributions over the lockstep queues.
//!
//! `D_i2t(i) = softmax([f_i . t^_i, f_i . Q_T] / tau)` and
//! `D_t2i(i) = softmax([t_i . f^_i, t_i . Q_I] / tau)`; column `k` of both is
//! the same past pair because the queues are written in lockstep.
//! Term: `kl` (rows averaged with the AMF pair weights); zero before the
//! queue's `start_step`.
//!
//! Options (the paper's choice is not public): `direction` (default
//! symmetric) and `stop_grad_target`: the first argument of each KL is the
//! target and its query is detached, so only the other distribution moves
//! toward it. The temperature stays trainable on both sides.

use cots_ops::queue::{queue_kl, KlDirection};
use serde::{Deserialize, Serialize};

use crate::{weighted_mean, LossTerm, Needs, Objective, Result, SharedQueue, StepFeatures};

/// Settings of the task-level objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KlConfig {
    pub weight: f64,
    pub direction: KlDirection,
    /// Detach the query of the target distribution (the first KL argument).
    pub stop_grad_target: bool,
}

impl Default for KlConfig {
    fn default() -> Self {
        Self {
            weight: 1.0,
            direction: KlDirection::Symmetric,
            stop_grad_target: false,
        }
    }
}

/// The task-level objective; reads the shared lockstep queue.
#[derive(Debug)]
pub struct Kl {
    cfg: KlConfig,
    queue: SharedQueue,
}

impl Kl {
    pub fn new(cfg: &KlConfig, queue: SharedQueue) -> Self {
        Self {
            cfg: cfg.clone(),
            queue,
        }
    }
}

impl Objective for Kl {
    fn name(&self) -> &str {
        "kl"
    }

    fn needs(&self) -> Needs {
        Needs {
            momentum: true,
            ..Needs::default()
        }
    }

    fn losses(&mut self, x: &StepFeatures) -> Result<Vec<LossTerm>> {
        if !self.queue.active() {
            // Before the queue's start step the term is a constant zero, so
            // the logs keep one column per term.
            let zero =
                candle_core::Tensor::zeros((), x.image_embed.dtype(), x.image_embed.device())?;
            return Ok(vec![LossTerm::new("kl", zero)]);
        }
        let m = x.momentum(self.name())?;
        let (f_m, t_m) = (m.image.detach(), m.text.detach());
        let q = self.queue.view();
        let (f, t, tau) = (&x.image_embed, &x.text_embed, &x.temperature);
        let kl = |f: &_, t: &_, dir| queue_kl(f, &t_m, &q.text, t, &f_m, &q.image, tau, dir);
        let per_row = match (self.cfg.stop_grad_target, self.cfg.direction) {
            (false, dir) => kl(f, t, dir)?,
            (true, KlDirection::I2tToT2i) => kl(&f.detach(), t, KlDirection::I2tToT2i)?,
            (true, KlDirection::T2iToI2t) => kl(f, &t.detach(), KlDirection::T2iToI2t)?,
            // Each half has its own target, so the two halves need two calls.
            (true, KlDirection::Symmetric) => {
                let a = kl(&f.detach(), t, KlDirection::I2tToT2i)?;
                let b = kl(f, &t.detach(), KlDirection::T2iToI2t)?;
                ((a + b)? * 0.5)?
            }
        };
        Ok(vec![LossTerm::new(
            "kl",
            weighted_mean(&per_row, x.pair_weights())?,
        )])
    }
}
