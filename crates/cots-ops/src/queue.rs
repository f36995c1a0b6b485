//! Contrastive softmax over negative queues (COTS instance level) and the KL
//! between the image-to-text and text-to-image distributions (task level).
//!
//! Row `i` of the instance-level logits is
//! `l_i = [q_i . k_i, q_i . queue_1, ..., q_i . queue_K] / tau`.
//! With optional ids, every queue slot whose id equals the row's id is a
//! positive too (other captions of the same image). The per-row loss is the
//! soft-target cross-entropy used by ALBEF:
//! `loss_i = lse(l_i) - mean_{p in P_i} l_i[p]`, where `P_i` holds column 0 and
//! the same-id slots. The per-row log-normaliser `lse(l_i)` is returned too, so
//! that callers can recompute probabilities tile by tile.
//!
//! [`queue_contrastive_naive`] and [`queue_kl_naive`] build the full
//! `B x (1+K)` logits with ordinary candle ops: they are the obviously-correct
//! references for tests and the baselines for benchmarks.

use candle_core::{DType, Result, Tensor, D};

/// Queue slots that share an id with a row are positives for that row.
///
/// Ids are `u32`; `u32::MAX` marks an empty slot and never matches.
#[derive(Clone, Copy, Debug)]
pub struct PositiveIds<'a> {
    /// `[B]` u32: the pair (image) id of each row.
    pub rows: &'a Tensor,
    /// `[K]` u32: the pair (image) id of each queue slot.
    pub queue: &'a Tensor,
}

/// Id of an empty queue slot.
pub const EMPTY_SLOT: u32 = u32::MAX;

/// Per-row outputs of the instance-level contrastive op.
#[derive(Clone, Debug)]
pub struct QueueContrastiveOutput {
    /// `[B]`: `lse_i - mean_{p in P_i} l_i[p]`.
    pub loss: Tensor,
    /// `[B]`: `lse_i = log sum_j exp(l_i[j])` over all `1 + K` columns.
    pub lse: Tensor,
}

/// Which KL divergence the task-level op computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlDirection {
    /// `KL(D_i2t || D_t2i)`.
    I2tToT2i,
    /// `KL(D_t2i || D_i2t)`.
    T2iToI2t,
    /// `(KL(D_i2t || D_t2i) + KL(D_t2i || D_i2t)) / 2`.
    #[default]
    Symmetric,
}

/// Logits `[B, 1+K]` of queries against their positive key and the queue.
fn full_logits(q: &Tensor, k: &Tensor, queue: &Tensor, tau: &Tensor) -> Result<Tensor> {
    let pos = (q * k)?.sum_keepdim(D::Minus1)?; // [B, 1]
    let neg = q.matmul(&queue.t()?)?; // [B, K]
    Tensor::cat(&[pos, neg], 1)?.broadcast_div(tau)
}

/// Positive mask `[B, 1+K]` (1.0 for column 0 and same-id slots) in `dtype`.
fn positive_mask(
    b: usize,
    k: usize,
    ids: Option<PositiveIds>,
    dtype: DType,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let first = Tensor::ones((b, 1), dtype, dev)?;
    let rest = match ids {
        Some(ids) => {
            let rows = ids.rows.reshape((b, 1))?;
            let slots = ids.queue.reshape((1, k))?;
            rows.broadcast_eq(&slots)?.to_dtype(dtype)?
        }
        None => Tensor::zeros((b, k), dtype, dev)?,
    };
    Tensor::cat(&[first, rest], 1)
}

/// Reference instance-level loss: materialises the full logits.
///
/// # Shapes
/// - `q`, `k`: `[B, D]`; `queue`: `[K, D]`; `tau`: scalar (rank 0).
/// - returns `loss`, `lse`: `[B]`.
pub fn queue_contrastive_naive(
    q: &Tensor,
    k: &Tensor,
    queue: &Tensor,
    ids: Option<PositiveIds>,
    tau: &Tensor,
) -> Result<QueueContrastiveOutput> {
    let (b, _) = q.dims2()?;
    let kk = queue.dim(0)?;
    let logits = full_logits(q, k, queue, tau)?;
    let lse = logits.log_sum_exp(D::Minus1)?;
    let mask = positive_mask(b, kk, ids, q.dtype(), q.device())?;
    let pos_mean = ((&logits * &mask)?.sum(D::Minus1)? / mask.sum(D::Minus1)?)?;
    let loss = (&lse - pos_mean)?;
    Ok(QueueContrastiveOutput { loss, lse })
}

/// Reference task-level KL: materialises both distributions.
///
/// `D_i2t(i) = softmax([f_i . t^_i, f_i . Q_T] / tau)` and
/// `D_t2i(i) = softmax([t_i . f^_i, t_i . Q_I] / tau)`; the queues are in
/// lockstep (slot k of both describes one past pair).
///
/// # Shapes
/// - `f`, `t_m`, `t`, `f_m`: `[B, D]`; `queue_t`, `queue_i`: `[K, D]`;
///   `tau`: scalar. Returns the per-row KL `[B]`.
#[allow(clippy::too_many_arguments)]
pub fn queue_kl_naive(
    f: &Tensor,
    t_m: &Tensor,
    queue_t: &Tensor,
    t: &Tensor,
    f_m: &Tensor,
    queue_i: &Tensor,
    tau: &Tensor,
    direction: KlDirection,
) -> Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(&full_logits(f, t_m, queue_t, tau)?, D::Minus1)?;
    let log_q = candle_nn::ops::log_softmax(&full_logits(t, f_m, queue_i, tau)?, D::Minus1)?;
    let kl = |log_a: &Tensor, log_b: &Tensor| -> Result<Tensor> {
        (log_a.exp()? * (log_a - log_b)?)?.sum(D::Minus1)
    };
    match direction {
        KlDirection::I2tToT2i => kl(&log_p, &log_q),
        KlDirection::T2iToI2t => kl(&log_q, &log_p),
        KlDirection::Symmetric => (kl(&log_p, &log_q)? + kl(&log_q, &log_p)?)? * 0.5,
    }
}

/// Instance-level contrastive loss over a negative queue (see the module doc).
///
/// On the CPU (f32 or f64), and in f32 on CUDA with the `cuda` feature for
/// `D <= 1024`, this is the fused op of [`crate::queue_fused`] (its forward on CUDA is
/// `kernels/queue_contrastive.cu`); elsewhere the naive composition. Both
/// agree up to floating-point rounding.
pub fn queue_contrastive(
    q: &Tensor,
    k: &Tensor,
    queue: &Tensor,
    ids: Option<PositiveIds>,
    tau: &Tensor,
) -> Result<QueueContrastiveOutput> {
    if !contrastive_fused_applies(q) {
        return queue_contrastive_naive(q, k, queue, ids, tau);
    }
    let ids = match ids {
        Some(ids) => Some((
            ids.rows
                .flatten_all()?
                .to_dtype(DType::U32)?
                .to_vec1::<u32>()?,
            ids.queue
                .flatten_all()?
                .to_dtype(DType::U32)?
                .to_vec1::<u32>()?,
        )),
        None => None,
    };
    let out = crate::queue_fused::queue_contrastive_fused(&q.broadcast_div(tau)?, k, queue, ids)?;
    Ok(QueueContrastiveOutput {
        loss: out.narrow(1, 0, 1)?.squeeze(1)?,
        lse: out.narrow(1, 1, 1)?.squeeze(1)?,
    })
}

/// Whether the fused CPU op handles these inputs.
fn fused_applies(q: &Tensor) -> bool {
    q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::F64)
}

/// Whether the fused contrastive op handles these inputs: on the CPU, or in
/// f32 on CUDA when built with the `cuda` feature and `D` fits the kernel
/// (`kernels/queue_contrastive.cu`).
fn contrastive_fused_applies(q: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() && q.dtype() == DType::F32 {
        return q.dim(1).is_ok_and(|d| d <= crate::queue_cuda::MAX_DIM);
    }
    fused_applies(q)
}

/// Whether the fused KL op handles these inputs: on the CPU, or in f32 on
/// CUDA when built with the `cuda` feature and `D` fits the kernel
/// (`kernels/queue_kl.cu`).
fn kl_fused_applies(f: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    if f.device().is_cuda() && f.dtype() == DType::F32 {
        return f.dim(1).is_ok_and(|d| d <= crate::queue_kl_cuda::MAX_DIM);
    }
    fused_applies(f)
}

/// Task-level KL between the two retrieval distributions over lockstep queues.
///
/// On the CPU (f32 or f64), and in f32 on CUDA with the `cuda` feature for
/// `D <= 512`, this is the fused op of [`crate::queue_fused`] (its forward on
/// CUDA is `kernels/queue_kl.cu`); elsewhere the naive composition. Both
/// agree up to rounding.
#[allow(clippy::too_many_arguments)]
pub fn queue_kl(
    f: &Tensor,
    t_m: &Tensor,
    queue_t: &Tensor,
    t: &Tensor,
    f_m: &Tensor,
    queue_i: &Tensor,
    tau: &Tensor,
    direction: KlDirection,
) -> Result<Tensor> {
    if !kl_fused_applies(f) {
        return queue_kl_naive(f, t_m, queue_t, t, f_m, queue_i, tau, direction);
    }
    crate::queue_fused::queue_kl_fused(
        &f.broadcast_div(tau)?,
        t_m,
        queue_t,
        &t.broadcast_div(tau)?,
        f_m,
        queue_i,
        direction,
    )
}
