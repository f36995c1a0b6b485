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
//!   in-batch InfoNCE (the ablation);
//! - `queue_size`: the paper's optional queue, here the detached image and
//!   text embeddings of the most recent past batches (a memory bank of the
//!   online model; VLDeformer has no momentum encoder), whose items join the
//!   negatives of their modality (`top_k` selects over batch and queue
//!   together). Saved with the objective's state.
//!
//! Rows are averaged with the AMF pair weights. Terms: `bimodal_i2t`
//! (image queries), `bimodal_t2i` (text queries).

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{
    weighted_mean, Error, LossTerm, Needs, Objective, ObjectiveState, Result, StepFeatures,
};

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
    /// Past-batch embeddings kept as extra negatives (0: none).
    pub queue_size: usize,
}

impl Default for BimodalConfig {
    fn default() -> Self {
        Self {
            weight: 1.0,
            intra_modal: true,
            top_k: 0,
            beta: 0.0,
            queue_size: 0,
        }
    }
}

/// Per-row weights over `[other modality | own modality]` candidates,
/// `[B][2C]`: 1 on the positive, the negative weights, 0 elsewhere.
///
/// `cross[i][j] = s(q_i, p_j)` and `intra[i][j] = s(q_i, q_j)` over the
/// same `C` candidates of each modality: the batch (`j < B`, so the positive
/// of row `i` is column `i`), then any queued items; `ids[j]` is candidate
/// `j`'s image id and `ids[i]`, `i < B`, query `i`'s.
pub fn candidate_weights(
    cross: &[Vec<f64>],
    intra: &[Vec<f64>],
    ids: &[u32],
    cfg: &BimodalConfig,
) -> Vec<Vec<f64>> {
    let (b, c) = (cross.len(), ids.len());
    let mut out = vec![vec![0.0; 2 * c]; b];
    for i in 0..b {
        // (column, similarity) of each kept negative.
        let mut kept: Vec<(usize, f64)> = Vec::new();
        let mut pick = |row: &[f64], offset: usize| {
            let mut neg: Vec<(usize, f64)> = (0..c)
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
            pick(&intra[i], c);
        }
        out[i][i] = 1.0;
        if kept.is_empty() {
            continue;
        }
        if cfg.beta == 0.0 {
            for (col, _) in kept {
                out[i][col] = 1.0;
            }
        } else {
            let top = kept.iter().fold(f64::MIN, |m, k| m.max(k.1));
            let e: Vec<f64> = kept
                .iter()
                .map(|k| (cfg.beta * (k.1 - top)).exp())
                .collect();
            let scale = kept.len() as f64 / e.iter().sum::<f64>();
            for ((col, _), e) in kept.into_iter().zip(e) {
                out[i][col] = e * scale;
            }
        }
    }
    out
}

/// Detached embeddings of past batches, oldest first.
#[derive(Clone, Debug, Default)]
struct PastBatches {
    /// `(images [n, E], texts [n, E], ids)` per batch.
    batches: std::collections::VecDeque<(Tensor, Tensor, Vec<u32>)>,
}

impl PastBatches {
    fn len(&self) -> usize {
        self.batches.iter().map(|b| b.2.len()).sum()
    }

    /// Appends a batch, then drops the oldest while more than `cap` are kept.
    fn push(&mut self, f: &Tensor, t: &Tensor, ids: Vec<u32>, cap: usize) {
        self.batches.push_back((f.detach(), t.detach(), ids));
        while self.len() > cap {
            self.batches.pop_front();
        }
    }

    /// All queued `(images, texts, ids)`, or `None` when empty.
    fn all(&self) -> Result<Option<(Tensor, Tensor, Vec<u32>)>> {
        if self.batches.is_empty() {
            return Ok(None);
        }
        let f: Vec<&Tensor> = self.batches.iter().map(|b| &b.0).collect();
        let t: Vec<&Tensor> = self.batches.iter().map(|b| &b.1).collect();
        let ids = self.batches.iter().flat_map(|b| b.2.clone()).collect();
        Ok(Some((Tensor::cat(&f, 0)?, Tensor::cat(&t, 0)?, ids)))
    }
}

/// The bimodal-negative contrastive objective (its state: the queue).
#[derive(Clone, Debug)]
pub struct Bimodal {
    cfg: BimodalConfig,
    queue: PastBatches,
}

impl Bimodal {
    pub fn new(cfg: &BimodalConfig) -> Result<Self> {
        if cfg.beta < 0.0 || !cfg.beta.is_finite() {
            return Err(Error::Config(format!(
                "bimodal: beta {} must be finite and >= 0",
                cfg.beta
            )));
        }
        Ok(Self {
            cfg: cfg.clone(),
            queue: PastBatches::default(),
        })
    }

    /// Per-row losses of queries `q` against partners `p`, with the queued
    /// items of each modality (`queued_p`, `queued_q`, ids `queued_ids`)
    /// as extra negatives.
    ///
    /// # Shapes
    /// - `q`, `p`: `[B, E]`; `queued_*`: `[K, E]`; `tau`: scalar; returns `[B]`.
    fn direction(
        &self,
        q: &Tensor,
        p: &Tensor,
        ids: &[u32],
        queued: Option<(&Tensor, &Tensor, &[u32])>,
        tau: &Tensor,
    ) -> Result<Tensor> {
        let b = ids.len();
        let (p_all, q_all, all_ids) = match queued {
            None => (p.clone(), q.clone(), ids.to_vec()),
            Some((qp, qq, qids)) => (
                Tensor::cat(&[p, qp], 0)?,
                Tensor::cat(&[q, qq], 0)?,
                ids.iter().chain(qids).copied().collect(),
            ),
        };
        let c = all_ids.len();
        let cross = q.matmul(&p_all.t()?)?;
        let intra = q.matmul(&q_all.t()?)?;
        let host = |t: &Tensor| -> Result<Vec<Vec<f64>>> {
            Ok(t.detach().to_dtype(DType::F64)?.to_vec2::<f64>()?)
        };
        let (hc, hi) = (host(&cross)?, host(&intra)?);
        let w = candidate_weights(&hc, &hi, &all_ids, &self.cfg);
        let tau_v = tau.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        // The log-sum-exp shift: the largest logit that carries weight (the
        // query's self-similarity, which carries none, would underflow the rest).
        let shift: Vec<f64> = (0..b)
            .map(|i| {
                (0..2 * c)
                    .filter(|&col| w[i][col] > 0.0)
                    .map(|col| if col < c { hc[i][col] } else { hi[i][col - c] } / tau_v)
                    .fold(f64::MIN, f64::max)
            })
            .collect();
        let dev = q.device();
        let dt = q.dtype();
        let w = Tensor::from_vec(w.concat(), (b, 2 * c), dev)?.to_dtype(dt)?;
        let shift = Tensor::from_vec(shift, (b, 1), dev)?.to_dtype(dt)?;
        let pos = (cross.narrow(1, 0, b)? * Tensor::eye(b, dt, dev)?)?
            .sum(1)?
            .broadcast_div(tau)?;
        let logits = Tensor::cat(&[&cross, &intra], 1)?.broadcast_div(tau)?;
        let lse = (logits.broadcast_sub(&shift)?.exp()? * w)?
            .sum_keepdim(1)?
            .log()?
            .add(&shift)?
            .squeeze(1)?;
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

    fn losses(&mut self, x: &StepFeatures) -> Result<Vec<LossTerm>> {
        let (f, t) = (&x.image_embed, &x.text_embed);
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
        let queued = self.queue.all()?;
        let as_parts = |swap: bool| {
            queued.as_ref().map(|(qf, qt, qids)| {
                let (p, q) = if swap { (qf, qt) } else { (qt, qf) };
                (p, q, qids.as_slice())
            })
        };
        let i2t = self.direction(f, t, &ids, as_parts(false), &x.temperature)?;
        let t2i = self.direction(t, f, &ids, as_parts(true), &x.temperature)?;
        let w = x.pair_weights();
        Ok(vec![
            LossTerm::new("bimodal_i2t", weighted_mean(&i2t, w)?),
            LossTerm::new("bimodal_t2i", weighted_mean(&t2i, w)?),
        ])
    }

    fn after_step(&mut self, x: &StepFeatures) -> Result<()> {
        if self.cfg.queue_size > 0 {
            let ids = x.image_ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
            self.queue
                .push(&x.image_embed, &x.text_embed, ids, self.cfg.queue_size);
        }
        Ok(())
    }

    /// The queue, batch by batch (`image/N`, `text/N`, `ids/N`, oldest
    /// first), so a resumed run drops batches exactly when an uninterrupted
    /// one would.
    fn state(&self) -> Result<ObjectiveState> {
        let mut st = ObjectiveState::default();
        for (n, (f, t, ids)) in self.queue.batches.iter().enumerate() {
            st.tensors.insert(format!("image/{n}"), f.clone());
            st.tensors.insert(format!("text/{n}"), t.clone());
            st.tensors.insert(
                format!("ids/{n}"),
                Tensor::from_vec(ids.clone(), ids.len(), &Device::Cpu)?,
            );
        }
        Ok(st)
    }

    fn load_state(&mut self, s: &ObjectiveState) -> Result<()> {
        self.queue = PastBatches::default();
        for n in 0..s.tensors.len() / 3 {
            let f = s.tensor("bimodal", &format!("image/{n}"))?;
            let t = s.tensor("bimodal", &format!("text/{n}"))?;
            let ids = s.tensor("bimodal", &format!("ids/{n}"))?.to_vec1::<u32>()?;
            self.queue.push(f, t, ids, usize::MAX);
        }
        Ok(())
    }
}
