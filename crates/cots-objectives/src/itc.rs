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
//!
//! `keys` (default `momentum`, the formula above) picks where the in-batch
//! keys come from. `online`: the keys are the online embeddings of the other
//! tower, with gradient, so both towers learn from both directions as in
//! CLIP, and every pair of the batch is a candidate (same-id pairs are
//! positives):
//! `l_i = [f_i . t_1, ..., f_i . t_B, f_i . Q_T] / tau`; the queue's
//! momentum keys are extra negatives only. `queue_negatives` (default
//! `true`) can switch the queue part off: online keys without the queue are
//! CLIP, momentum keys without the queue are in-batch momentum contrast
//! (MoCo v3, which needs `in_batch_negatives`). These two options separate
//! the two suspects behind ITC's gap to CLIP: keys without gradient from the
//! momentum towers, and stale queue negatives.
//! Before the queue's `start_step` (see `QueueConfig`) no formulation reads
//! the queue: momentum keys are contrasted within the batch (every pair a
//! candidate), online keys as in CLIP.
//! Measured on the demo model over three seeds in docs/results.md, section
//! "Why ITC + queue loses to CLIP". Without `queue_negatives` the composition
//! still keeps and fills the queue (ITC counts as a queue reader, and KL may
//! read it), so the momentum towers still run.

use candle_core::{DType, Tensor, D};
use cots_ops::queue::{queue_contrastive, PositiveIds};
use serde::{Deserialize, Serialize};

use crate::clip::same_pair_mask;
use crate::queue::QueueView;
use crate::{weighted_mean, Error, LossTerm, Needs, Objective, Result, SharedQueue, StepFeatures};

/// Where the in-batch keys of the instance-level loss come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    /// The momentum (EMA) towers, detached: MoCo/ALBEF/COTS.
    #[default]
    Momentum,
    /// The online towers, with gradient to both: CLIP's in-batch loss.
    Online,
}

/// Settings of the instance-level contrastive objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ItcConfig {
    pub weight: f64,
    /// Use the current batch's momentum keys as candidates too (ALBEF).
    pub in_batch_negatives: bool,
    /// Treat queue slots with the row's image id as positives.
    pub use_ids: bool,
    /// Source of the in-batch keys (see the module doc).
    pub keys: KeySource,
    /// Use the lockstep queue's momentum keys as negatives.
    pub queue_negatives: bool,
}

impl ItcConfig {
    /// Rejects the one combination without any negative: momentum keys, no
    /// in-batch negatives and no queue.
    pub fn validate(&self) -> Result<()> {
        if self.keys == KeySource::Momentum && !self.in_batch_negatives && !self.queue_negatives {
            return Err(Error::Config(
                "itc: momentum keys with `queue_negatives = false` need `in_batch_negatives = \
                 true` (otherwise no row has a negative)"
                    .into(),
            ));
        }
        if !self.weight.is_finite() {
            return Err(Error::Config(format!("itc: weight {}", self.weight)));
        }
        Ok(())
    }
}

impl Default for ItcConfig {
    fn default() -> Self {
        Self {
            weight: 1.0,
            in_batch_negatives: false,
            use_ids: true,
            keys: KeySource::Momentum,
            queue_negatives: true,
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

impl Itc {
    /// The in-batch formulation (online keys, or no queue): the full logits
    /// `[B, B (+ K)]` by ordinary ops, so that gradients reach the in-batch
    /// keys too. At K = 4,096 and B = 32 the logits are 0.5 MB; the fused
    /// op only pays off at ALBEF's 65,536 slots, where its keys are detached
    /// anyway.
    fn batch_losses(&self, x: &StepFeatures) -> Result<Vec<LossTerm>> {
        self.batch_losses_with(x, self.cfg.queue_negatives)
    }

    /// [`Itc::batch_losses`] with the queue part on or off (off before the
    /// queue's start step).
    fn batch_losses_with(&self, x: &StepFeatures, read_queue: bool) -> Result<Vec<LossTerm>> {
        let (f_k, t_k) = match self.cfg.keys {
            KeySource::Online => (x.image_embed.clone(), x.text_embed.clone()),
            KeySource::Momentum => {
                let m = x.momentum(self.name())?;
                (m.image.detach(), m.text.detach())
            }
        };
        let queue = read_queue.then(|| self.queue.view());
        let tau = &x.temperature;
        let i2t = self.batch_side(
            &x.image_embed,
            &t_k,
            queue.as_ref().map(|q| &q.text),
            &x.image_ids,
            queue.as_ref(),
            tau,
        )?;
        let t2i = self.batch_side(
            &x.text_embed,
            &f_k,
            queue.as_ref().map(|q| &q.image),
            &x.image_ids,
            queue.as_ref(),
            tau,
        )?;
        let w = x.pair_weights();
        Ok(vec![
            LossTerm::new("itc_i2t", weighted_mean(&i2t, w)?),
            LossTerm::new("itc_t2i", weighted_mean(&t2i, w)?),
        ])
    }

    /// One direction: queries `q` against the batch keys `k` (every pair,
    /// same-id pairs positive; only the own key when momentum keys come
    /// without in-batch negatives) and the queue's keys of the other modality.
    ///
    /// # Shapes
    /// - `q`, `k`: `[B, E]`; `queue_keys`: `[K, E]`; `ids`: `[B]`; returns `[B]`.
    fn batch_side(
        &self,
        q: &Tensor,
        k: &Tensor,
        queue_keys: Option<&Tensor>,
        ids: &Tensor,
        queue: Option<&QueueView>,
        tau: &Tensor,
    ) -> Result<Tensor> {
        let dtype = q.dtype();
        // Without the queue every row needs the batch's other keys as
        // negatives (momentum keys before the queue's start step).
        let all_pairs =
            self.cfg.keys == KeySource::Online || self.cfg.in_batch_negatives || queue.is_none();
        let (mut logits, mut mask) = if all_pairs {
            (
                vec![q.matmul(&k.t()?)?],
                vec![same_pair_mask(ids, self.cfg.use_ids, dtype)?],
            )
        } else {
            let b = q.dim(0)?;
            (
                vec![(q * k)?.sum_keepdim(D::Minus1)?],
                vec![Tensor::ones((b, 1), dtype, q.device())?],
            )
        };
        if let (Some(keys), Some(view)) = (queue_keys, queue) {
            let keys = keys.to_dtype(dtype)?;
            logits.push(q.matmul(&keys.t()?)?);
            let b = q.dim(0)?;
            let kk = keys.dim(0)?;
            mask.push(if self.cfg.use_ids {
                ids.to_dtype(DType::U32)?
                    .reshape((b, 1))?
                    .broadcast_eq(&view.ids.reshape((1, kk))?)?
                    .to_dtype(dtype)?
            } else {
                Tensor::zeros((b, kk), dtype, q.device())?
            });
        }
        let logits = Tensor::cat(&logits, 1)?.broadcast_div(tau)?;
        let mask = Tensor::cat(&mask, 1)?;
        // Soft-target cross-entropy: lse over all columns minus the mean of
        // the positive columns (the same per-row loss as the fused op).
        let lse = logits.log_sum_exp(D::Minus1)?;
        let pos = ((&logits * &mask)?.sum(D::Minus1)? / mask.sum(D::Minus1)?)?;
        Ok((lse - pos)?)
    }
}

impl Objective for Itc {
    fn name(&self) -> &str {
        "itc"
    }

    fn needs(&self) -> Needs {
        Needs {
            // The queue's keys come from the momentum towers; the composition
            // asks for them whenever a queue exists.
            momentum: self.cfg.keys == KeySource::Momentum,
            ..Needs::default()
        }
    }

    fn losses(&mut self, x: &StepFeatures) -> Result<Vec<LossTerm>> {
        if self.cfg.keys == KeySource::Online || !self.cfg.queue_negatives {
            return self.batch_losses(x);
        }
        if !self.queue.active() {
            // Before the queue's start step: in-batch momentum contrast.
            return self.batch_losses_with(x, false);
        }
        let m = x.momentum(self.name())?;
        let (f_m, t_m) = (m.image.detach(), m.text.detach());
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
            rows: &x.image_ids,
            queue: &q_ids,
        });
        let tau = &x.temperature;
        let i2t = queue_contrastive(&x.image_embed, &t_m, &q_txt, ids, tau)?;
        let t2i = queue_contrastive(&x.text_embed, &f_m, &q_img, ids, tau)?;
        let w = x.pair_weights();
        Ok(vec![
            LossTerm::new("itc_i2t", weighted_mean(&i2t.loss, w)?),
            LossTerm::new("itc_t2i", weighted_mean(&t2i.loss, w)?),
        ])
    }
}
