//! Image-text matching (UNITER/ALBEF style) for the single-stream baseline.
//!
//! The cross-encoder scores a mix of matching pairs and sampled negatives;
//! [`Itm`] is the 2-way cross-entropy on its logits (term `itm`; AMF weights
//! do not apply, the labels already say which pairs match).
//! [`HardNegativeSampler`] picks the negatives: for each row of a contrastive
//! similarity matrix, a column with a different image id, drawn with
//! probability proportional to `exp(sim / tau)` (ALBEF's hard negatives). The
//! trainer owns the sampler because it runs before the cross-encoder; its RNG
//! state is checkpointable.

use candle_core::{DType, Tensor};
use cots_ops::nn::{RngState, SeededRng};
use serde::{Deserialize, Serialize};

use crate::{Error, LossTerm, Needs, Objective, Result, StepFeatures};

/// Settings of the matching objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ItmConfig {
    pub weight: f64,
}

impl Default for ItmConfig {
    fn default() -> Self {
        Self { weight: 1.0 }
    }
}

/// The matching objective (stateless).
#[derive(Clone, Debug)]
pub struct Itm {
    _cfg: ItmConfig,
}

impl Itm {
    pub fn new(cfg: &ItmConfig) -> Self {
        Self { _cfg: cfg.clone() }
    }
}

impl Objective for Itm {
    fn name(&self) -> &str {
        "itm"
    }

    fn needs(&self) -> Needs {
        Needs {
            cross_encoder: true,
            ..Needs::default()
        }
    }

    fn losses(&mut self, x: &StepFeatures) -> Result<Vec<LossTerm>> {
        let inp = x.matching(self.name())?;
        let labels = inp.labels.to_dtype(DType::U32)?;
        let loss = candle_nn::loss::cross_entropy(&inp.logits, &labels)?;
        Ok(vec![LossTerm::new("itm", loss)])
    }
}

/// Seeded sampler of hard negatives from a similarity matrix.
#[derive(Clone, Debug)]
pub struct HardNegativeSampler {
    rng: SeededRng,
}

impl HardNegativeSampler {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: SeededRng::new(seed),
        }
    }

    /// For each row `r`, a column `c` with `col_ids[c] != row_ids[r]`, drawn
    /// with probability `softmax_c(sim[r, c] / tau)` renormalised over those
    /// columns; `None` when every column shares the row's id.
    ///
    /// # Shapes
    /// - `sim`: `[R, C]`; `row_ids`: `R` ids; `col_ids`: `C` ids.
    pub fn sample(
        &mut self,
        sim: &Tensor,
        row_ids: &[u32],
        col_ids: &[u32],
        tau: f64,
    ) -> Result<Vec<Option<usize>>> {
        let (r, c) = sim.dims2()?;
        if row_ids.len() != r || col_ids.len() != c || tau <= 0.0 {
            return Err(Error::BadInput {
                objective: "itm".into(),
                input: "sim",
                message: format!(
                    "similarity {:?} needs {r} row ids and {c} column ids (got {} and {}) and tau > 0 (got {tau})",
                    sim.dims(), row_ids.len(), col_ids.len()
                ),
            });
        }
        let sim = sim.detach().to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let draws = self.rng.uniform(r);
        let mut out = Vec::with_capacity(r);
        for ((row, &id), u) in sim.iter().zip(row_ids).zip(draws) {
            let allowed: Vec<usize> = (0..c).filter(|&j| col_ids[j] != id).collect();
            // Subtracting the row max keeps exp() finite for small tau.
            let Some(max) = allowed.iter().map(|&j| row[j] / tau).reduce(f64::max) else {
                out.push(None);
                continue;
            };
            let w: Vec<f64> = allowed
                .iter()
                .map(|&j| (row[j] / tau - max).exp())
                .collect();
            let mut target = u as f64 * w.iter().sum::<f64>();
            let mut pick = allowed[allowed.len() - 1];
            for (&j, wj) in allowed.iter().zip(&w) {
                if target < *wj {
                    pick = j;
                    break;
                }
                target -= wj;
            }
            out.push(Some(pick));
        }
        Ok(out)
    }

    pub fn state(&self) -> RngState {
        self.rng.state()
    }

    pub fn load_state(&mut self, s: RngState) {
        self.rng.restore(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sampler_follows_the_softmax_over_other_ids_and_resumes() -> Result<()> {
        let n = 4000;
        let row = [0.9f64, 0.5, -0.2, 0.1, 0.4];
        let col_ids = [7u32, 1, 2, 7, 3];
        let tau = 0.3;
        let sim = Tensor::from_vec(row.repeat(n), (n, 5), &Device::Cpu)?;
        let row_ids = vec![7u32; n];
        let mut s = HardNegativeSampler::new(5);
        let picks = s.sample(&sim, &row_ids, &col_ids, tau)?;
        let mut counts = [0usize; 5];
        for p in &picks {
            counts[p.expect("row 7 has negatives")] += 1;
        }
        // Direct formula: softmax(sim / tau) over the columns whose id is not 7.
        let z: f64 = [1, 2, 4].iter().map(|&j| (row[j] / tau).exp()).sum();
        for j in 0..5 {
            let want = if col_ids[j] == 7 {
                0.0
            } else {
                (row[j] / tau).exp() / z
            };
            let got = counts[j] as f64 / n as f64;
            let tol = 4.0 * (want * (1.0 - want) / n as f64).sqrt() + 1e-12;
            assert!((got - want).abs() <= tol, "column {j}: {got} vs {want}");
        }
        // Resuming from saved RNG state repeats the draws exactly.
        let state = s.state();
        let a = s.sample(&sim, &row_ids, &col_ids, tau)?;
        s.load_state(state);
        assert_eq!(a, s.sample(&sim, &row_ids, &col_ids, tau)?);
        // A row whose id every column shares has no negative.
        let one = Tensor::from_vec(vec![0.1f64, 0.2], (1, 2), &Device::Cpu)?;
        assert_eq!(s.sample(&one, &[4], &[4, 4], tau)?, vec![None]);
        Ok(())
    }
}
