//! Instance-level momentum contrastive loss (COTS level 1, MoCo/ALBEF style).
//!
//! `L_i2t = mean_i [lse(l_i) - mean_{p in P_i} l_i[p]]` with
//! `l_i = [f_i . t^_i, f_i . Q_T] / tau`, where `P_i` holds the momentum key
//! of the pair itself and every queue slot with the same image id (other
//! captions of the same image are positives, not negatives). `L_t2i` mirrors
//! it with `t_i`, `f^_i` and `Q_I`. Rows are averaged with the AMF pair
//! weights. Terms: `itc_i2t`, `itc_t2i`.
//!
//! `in_batch_negatives` (default `false`, the COTS/MoCo formula): when true
//! the momentum keys of the current batch are candidates too, as in ALBEF,
//! expressed as the queue `cat(batch keys, Q)` with ids `cat(batch ids, ids)`.
//! The row's own key is then present twice (column 0 and its batch slot),
//! both as positives; this differs from ALBEF only in that duplicate.

use candle_core::Tensor;
use cots_ops::queue::{queue_contrastive, PositiveIds};
use serde::{Deserialize, Serialize};

use crate::{weighted_mean, LossTerm, Needs, Objective, Result, SharedQueue, StepInputs};

/// Settings of the instance-level contrastive objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ItcConfig {
    pub weight: f64,
    /// Use the current batch's momentum keys as candidates too (ALBEF).
    pub in_batch_negatives: bool,
    /// Treat queue slots with the row's image id as positives.
    pub use_ids: bool,
}

impl Default for ItcConfig {
    fn default() -> Self {
        Self {
            weight: 1.0,
            in_batch_negatives: false,
            use_ids: true,
        }
    }
}

/// The instance-level objective; reads the shared lockstep queue.
#[derive(Debug)]
pub struct Itc {
    cfg: ItcConfig,
    queue: SharedQueue,
}

impl Itc {
    pub fn new(cfg: &ItcConfig, queue: SharedQueue) -> Self {
        Self {
            cfg: cfg.clone(),
            queue,
        }
    }
}

impl Objective for Itc {
    fn name(&self) -> &str {
        "itc"
    }

    fn needs(&self) -> Needs {
        Needs {
            momentum: true,
            ..Needs::default()
        }
    }

    fn losses(&mut self, x: &StepInputs) -> Result<Vec<LossTerm>> {
        let (f_m, t_m) = x.momentum(self.name())?;
        let q = self.queue.view();
        let (q_img, q_txt, q_ids) = if self.cfg.in_batch_negatives {
            let ids = x.image_ids.to_dtype(candle_core::DType::U32)?;
            (
                Tensor::cat(&[&f_m.to_dtype(q.image.dtype())?, &q.image], 0)?,
                Tensor::cat(&[&t_m.to_dtype(q.text.dtype())?, &q.text], 0)?,
                Tensor::cat(&[&ids, &q.ids], 0)?,
            )
        } else {
            (q.image, q.text, q.ids)
        };
        let ids = self.cfg.use_ids.then_some(PositiveIds {
            rows: x.image_ids,
            queue: &q_ids,
        });
        let tau = x.temperature;
        let i2t = queue_contrastive(x.image_embed, &t_m, &q_txt, ids, tau)?;
        let t2i = queue_contrastive(x.text_embed, &f_m, &q_img, ids, tau)?;
        Ok(vec![
            LossTerm::new("itc_i2t", weighted_mean(&i2t.loss, x.pair_weights)?),
            LossTerm::new("itc_t2i", weighted_mean(&t2i.loss, x.pair_weights)?),
        ])
    }
}
