//! In-batch symmetric InfoNCE (CLIP/ALIGN), the no-queue comparison loss.
//!
//! `l = f t^T / tau` over the batch; row `i` of `L_i2t` is
//! `lse(l_i) - mean_{j in P_i} l_ij` where `P_i` holds the pairs sharing the
//! image id of pair `i` (just `i` when `use_ids` is off); `L_t2i` is the same
//! on `l^T`. Rows are averaged with the AMF pair weights; dropped pairs stay
//! in the batch as negatives for the others (their image and text are each
//! still valid negatives). Terms: `clip_i2t`, `clip_t2i`.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::{weighted_mean, LossTerm, Needs, Objective, Result, StepFeatures};

/// Settings of the in-batch contrastive objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClipConfig {
    pub weight: f64,
    /// Captions of the same image in the batch are positives, not negatives.
    pub use_ids: bool,
}

impl Default for ClipConfig {
    fn default() -> Self {
        Self {
            weight: 1.0,
            use_ids: true,
        }
    }
}

/// Positive mask `[B, B]` in `dtype`: same id (or the diagonal only).
pub(crate) fn same_pair_mask(ids: &Tensor, use_ids: bool, dtype: DType) -> Result<Tensor> {
    let b = ids.dim(0)?;
    if use_ids {
        let ids = ids.to_dtype(DType::U32)?;
        Ok(ids
            .reshape((b, 1))?
            .broadcast_eq(&ids.reshape((1, b))?)?
            .to_dtype(dtype)?)
    } else {
        Ok(Tensor::eye(b, dtype, ids.device())?)
    }
}

/// Soft-target cross-entropy of each row against the rows' positive sets.
///
/// # Shapes
/// - `logits`, `mask`: `[B, C]`; returns `[B]`.
fn soft_ce(logits: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok(((logp * mask)?.sum(D::Minus1)? / mask.sum(D::Minus1)?)?.neg()?)
}

/// The in-batch contrastive objective (stateless).
#[derive(Clone, Debug)]
pub struct Clip {
    cfg: ClipConfig,
}

impl Clip {
    pub fn new(cfg: &ClipConfig) -> Self {
        Self { cfg: cfg.clone() }
    }
}

impl Objective for Clip {
    fn name(&self) -> &str {
        "clip"
    }

    fn needs(&self) -> Needs {
        Needs::default()
    }

    fn losses(&mut self, x: &StepFeatures) -> Result<Vec<LossTerm>> {
        let (f, t) = (&x.image_embed, &x.text_embed);
        let logits = f.matmul(&t.t()?)?.broadcast_div(&x.temperature)?;
        let mask = same_pair_mask(&x.image_ids, self.cfg.use_ids, f.dtype())?;
        let i2t = soft_ce(&logits, &mask)?;
        let t2i = soft_ce(&logits.t()?, &mask)?;
        Ok(vec![
            LossTerm::new("clip_i2t", weighted_mean(&i2t, x.pair_weights())?),
            LossTerm::new("clip_t2i", weighted_mean(&t2i, x.pair_weights())?),
        ])
    }
}
