//! VLDeformer's contrastive loss with bimodal hard negatives (Zhang et al.,
//! "VLDeformer: Vision-Language Decomposed Transformer for Fast Cross-Modal
//! Retrieval", 2021): the objective that decomposes a single-stream model
//! into two encoders.
//!
//! For an image query `f_i` the positive is its caption `t_i`, and the
//! negatives come from BOTH modalities: the other captions `t_j` and the
//! other images `f_j` of the batch. Same-modality negatives are the hard
//! ones: an encoder that embeds images near images and texts near texts
//! (which a transformer run on one modality at a time starts out doing)
//! is pushed apart by them. A text query is the same with the roles
//! swapped. Items sharing the query's image id (other captions of its
//! image, the query itself) are neither positive nor negative. With
//! `l = s / tau` and negative weights `w`:
//!
//! `L_i = -l(q_i, p_i) + log( exp l(q_i, p_i) + sum_{n in N_i} w_n exp l(q_i, n) )`
//!
//! Where the paper leaves details open they are options, all off by default
//! (uniform weights over every negative of both modalities):
//! - `top_k`: keep only the `k` hardest (most similar) negatives of each
//!   modality per query;
//! - `beta`: weight the kept negatives by `exp(beta * s)`, normalised to
//!   mean 1 (Robinson et al., ICLR 2021); weights carry no gradient;
//! - `intra_modal = false` drops the same-modality negatives, leaving plain
//!   in-batch InfoNCE (the ablation).
//!
//! Rows are averaged with the AMF pair weights. Terms: `bimodal_i2t`
//! (image queries), `bimodal_t2i` (text queries).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::{weighted_mean, Error, LossTerm, Needs, Objective, Result, StepInputs};

/// Settings of the bimodal-negative contrastive objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BimodalConfig {
    pub weight: f64,
    /// Negatives of the query's own modality join the other modality's.
    pub intra_modal: bool,
    /// Keep the `k` hardest negatives of each modality per query (0: all).
    pub top_k: usize,
    /// Hardness weighting `exp(beta * s)` of the kept negatives (0: uniform).
    pub beta: f64,
}

impl Default for BimodalConfig {
    fn default() -> Self {
        Self {
            weight: 1.0,
            intra_modal: true,
            top_k: 0,
            beta: 0.0,
        }
    }
}

/// Per-row weights over `[other modality | own modality]` candidates,
/// `[B][2B]`: 1 on the positive, the negative weights, 0 elsewhere.
///
/// `cross[i][j] = s(q_i, p_j)`, `intra[i][j] = s(q_i, q_j)`.
pub fn candidate_weights(
    cross: &[Vec<f64>],
    intra: &[Vec<f64>],
    ids: &[u32],
    cfg: &BimodalConfig,
) -> Vec<Vec<f64>> {
    let b = ids.len();
    let mut out = vec![vec![0.0; 2 * b]; b];
    for i in 0..b {
        // (column, similarity) of each kept negative.
        let mut kept: Vec<(usize, f64)> = Vec::new();
        let mut pick = |row: &[f64], offset: usize| {
            let mut neg: Vec<(usize, f64)> = (0..b)
                .filter(|&j| ids[j] != ids[i])
                .map(|j| (offset + j, row[j]))
                .collect();
            if cfg.top_k > 0 {
                neg.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
                neg.truncate(cfg.top_k);
            }
            kept.extend(neg);
        };
        pick(&cross[i], 0);
        if cfg.intra_modal {
            pick(&intra[i], b);
        }
        out[i][i] = 1.0;
        if kept.is_empty() {
            continue;
        }
        if cfg.beta == 0.0 {
            for (c, _) in kept {
                out[i][c] = 1.0;
            }
        } else {
            let top = kept.iter().fold(f64::MIN, |m, k| m.max(k.1));
            let e: Vec<f64> = kept
                .iter()
                .map(|k| (cfg.beta * (k.1 - top)).exp())
                .collect();
            let scale = kept.len() as f64 / e.iter().sum::<f64>();
            for ((c, _), e) in kept.into_iter().zip(e) {
                out[i][c] = e * scale;
            }
        }
    }
    out
}

/// The bimodal-negative contrastive objective (stateless).
#[derive(Clone, Debug)]
pub struct Bimodal {
    cfg: BimodalConfig,
}

impl Bimodal {
    pub fn new(cfg: &BimodalConfig) -> Result<Self> {
        if cfg.beta < 0.0 || !cfg.beta.is_finite() {
            return Err(Error::Config(format!(
                "bimodal: beta {} must be finite and >= 0",
                cfg.beta
            )));
        }
        Ok(Self { cfg: cfg.clone() })
    }

    /// Per-row losses of queries `q` against partners `p`.
    ///
    /// # Shapes
    /// - `q`, `p`: `[B, E]`; `tau`: scalar; returns `[B]`.
    fn direction(&self, q: &Tensor, p: &Tensor, ids: &[u32], tau: &Tensor) -> Result<Tensor> {
        let b = ids.len();
        let cross = q.matmul(&p.t()?)?;
        let intra = q.matmul(&q.t()?)?;
        let host = |t: &Tensor| -> Result<Vec<Vec<f64>>> {
            Ok(t.detach().to_dtype(DType::F64)?.to_vec2::<f64>()?)
        };
        let (hc, hi) = (host(&cross)?, host(&intra)?);
        let w = candidate_weights(&hc, &hi, ids, &self.cfg);
        let tau_v = tau.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        // The log-sum-exp shift: the largest logit that carries weight (the
        // query's self-similarity, which carries none, would underflow the rest).
        let shift: Vec<f64> = (0..b)
            .map(|i| {
                (0..2 * b)
                    .filter(|&c| w[i][c] > 0.0)
                    .map(|c| if c < b { hc[i][c] } else { hi[i][c - b] } / tau_v)
                    .fold(f64::MIN, f64::max)
            })
            .collect();
        let dev = q.device();
        let dt = q.dtype();
        let w = Tensor::from_vec(w.concat(), (b, 2 * b), dev)?.to_dtype(dt)?;
        let shift = Tensor::from_vec(shift, (b, 1), dev)?.to_dtype(dt)?;
        let logits = Tensor::cat(&[&cross, &intra], 1)?.broadcast_div(tau)?;
        let lse = (logits.broadcast_sub(&shift)?.exp()? * w)?
            .sum_keepdim(1)?
            .log()?
            .add(&shift)?
            .squeeze(1)?;
        let eye = Tensor::eye(b, dt, dev)?;
        let pos = (cross * eye)?.sum(1)?.broadcast_div(tau)?;
        Ok((lse - pos)?)
    }
}

impl Objective for Bimodal {
    fn name(&self) -> &str {
        "bimodal"
    }

    fn needs(&self) -> Needs {
        Needs::default()
    }

    fn losses(&mut self, x: &StepInputs) -> Result<Vec<LossTerm>> {
        let (f, t) = (x.image_embed, x.text_embed);
        let ids = x.image_ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        if ids.len() != f.dim(0)? || t.dim(0)? != f.dim(0)? {
            return Err(Error::BadInput {
                objective: "bimodal".into(),
                input: "image_ids",
                message: format!(
                    "{} ids for {} images and {} texts",
                    ids.len(),
                    f.dim(0)?,
                    t.dim(0)?
                ),
            });
        }
        let i2t = self.direction(f, t, &ids, x.temperature)?;
        let t2i = self.direction(t, f, &ids, x.temperature)?;
        Ok(vec![
            LossTerm::new("bimodal_i2t", weighted_mean(&i2t, x.pair_weights)?),
            LossTerm::new("bimodal_t2i", weighted_mean(&t2i, x.pair_weights)?),
        ])
    }
}
