//! VSE++ hinge triplet ranking loss (Faghri et al., BMVC 2018), a comparison loss.
//!
//! With cosine similarities `s = f t^T` and `s_ii` the pair's own score:
//! `L_i2t(i) = max_{j not in P_i} [margin - s_ii + s_ij]_+` (the hardest
//! negative caption) and `L_t2i(j) = max_{i not in P_j} [margin - s_jj + s_ij]_+`
//! (the hardest negative image), where `P_i` holds the pairs sharing pair
//! `i`'s image id. With `hardest_negative = false` the max becomes a sum (the
//! original VSE0 loss). The temperature is not used. Rows are averaged with
//! the AMF pair weights. Terms: `vse_i2t`, `vse_t2i`.

use candle_core::D;
use serde::{Deserialize, Serialize};

use crate::clip::same_pair_mask;
use crate::{weighted_mean, LossTerm, Needs, Objective, Result, StepFeatures};

/// Settings of the hinge triplet objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VseConfig {
    pub weight: f64,
    pub margin: f64,
    /// Hardest negative only (VSE++) instead of the sum over negatives.
    pub hardest_negative: bool,
    /// Captions of the same image are not negatives.
    pub use_ids: bool,
}

impl Default for VseConfig {
    fn default() -> Self {
        Self {
            weight: 1.0,
            margin: 0.2,
            hardest_negative: true,
            use_ids: true,
        }
    }
}

/// The hinge triplet objective (stateless).
#[derive(Clone, Debug)]
pub struct Vse {
    cfg: VseConfig,
}

impl Vse {
    pub fn new(cfg: &VseConfig) -> Self {
        Self { cfg: cfg.clone() }
    }
}

impl Objective for Vse {
    fn name(&self) -> &str {
        "vse"
    }

    fn needs(&self) -> Needs {
        Needs::default()
    }

    fn losses(&mut self, x: &StepFeatures) -> Result<Vec<LossTerm>> {
        let (f, t) = (&x.image_embed, &x.text_embed);
        let s = f.matmul(&t.t()?)?; // [B, B], rows images, columns texts
        let pos = (f * t)?.sum_keepdim(D::Minus1)?; // [B, 1]
        let negatives =
            same_pair_mask(&x.image_ids, self.cfg.use_ids, f.dtype())?.affine(-1.0, 1.0)?;
        // Costs are >= 0 after the hinge, and positives are zeroed, so the
        // max over a row is the hardest negative's cost (0 without negatives).
        let cost_i2t = (s.broadcast_sub(&pos)? + self.cfg.margin)?
            .relu()?
            .mul(&negatives)?;
        let cost_t2i = (s.broadcast_sub(&pos.t()?)? + self.cfg.margin)?
            .relu()?
            .mul(&negatives)?;
        let (i2t, t2i) = if self.cfg.hardest_negative {
            (cost_i2t.max(1)?, cost_t2i.max(0)?)
        } else {
            (cost_i2t.sum(1)?, cost_t2i.sum(0)?)
        };
        Ok(vec![
            LossTerm::new("vse_i2t", weighted_mean(&i2t, x.pair_weights())?),
            LossTerm::new("vse_t2i", weighted_mean(&t2i, x.pair_weights())?),
        ])
    }
}
