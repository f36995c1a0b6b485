//! Fused, tiled CPU implementations of the queue contrastive loss and the
//! task-level KL, as candle custom ops with a backward pass (their CUDA
//! forward passes: `queue_cuda` and `queue_kl_cuda`, feature `cuda`).
//!
//! Neither op ever holds the `B x (1+K)` logits: the queue is streamed in
//! tiles of [`TILE`] slots, each tile's logits `[B, TILE]` come from one
//! gemm call (AVX-512 kernels when the CPU has them), and a running max /
//! running sum per row keeps the log-sum-exp (the online softmax). The
//! exponentials run in f32 SIMD lanes ([`exp_f32`], dispatched at run time
//! by `pulp`); sums across tiles are kept in f64.
//!
//! The contrastive op needs no second pass for its backward. Its query
//! gradient is `sum_j p_ij key_j` minus the positives' keys, a softmax-weighted
//! sum of keys, which the forward pass accumulates flash-attention style: each
//! tile's weights `exp(l_ij - max_i)` times the tile's keys, one more gemm,
//! added to a per-row accumulator that is rescaled whenever the running max
//! moves. The forward output carries that `[B, D]` accumulator, so the
//! backward is a few `[B, D]` tensor ops that run on any device. Extra memory
//! is `O(B * (TILE + D))` whatever `K` is.
//!
//! The KL op works the same way: one streaming pass computes both
//! log-normalisers, the expectations of the log-ratio and the softmax-weighted
//! key sums its gradients are made of (see [`QueueKlOp`]), and its backward
//! pass is a few `[B, D]` tensor ops on the forward output.
//!
//! The temperature is handled outside: callers pass `q / tau`, so autograd
//! gives `tau` its gradient through that division.

use std::collections::HashMap;

use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use rayon::prelude::*;

use crate::queue::{KlDirection, EMPTY_SLOT};

/// Queue slots per tile.
pub const TILE: usize = 2048;

/// The element types the ops run in (f32, f64); sums across tiles are f64.
pub trait Real: WithDType {
    /// The largest element (`-inf` when empty; NaNs are skipped here and
    /// surface through the sum instead).
    fn max_of(xs: &[Self]) -> f64;
    /// Replaces every `x` with `exp(x - shift)` and returns their sum.
    fn exp_shifted_sum(xs: &mut [Self], shift: f64) -> f64;
}

impl Real for f64 {
    fn max_of(xs: &[f64]) -> f64 {
        xs.iter()
            .fold(f64::NEG_INFINITY, |m, &x| if x > m { x } else { m })
    }

    fn exp_shifted_sum(xs: &mut [f64], shift: f64) -> f64 {
        xs.iter_mut()
            .map(|x| {
                *x = (*x - shift).exp();
                *x
            })
            .sum()
    }
}

/// SIMD lanes of the f32 loops (one AVX-512 register).
const LANES: usize = 16;

impl Real for f32 {
    fn max_of(xs: &[f32]) -> f64 {
        pulp::Arch::new().dispatch(MaxF32(xs))
    }

    fn exp_shifted_sum(xs: &mut [f32], shift: f64) -> f64 {
        pulp::Arch::new().dispatch(ExpSumF32 {
            xs,
            shift: shift as f32,
        })
    }
}

// The f32 loops are written lane by lane in plain Rust; `pulp` compiles them
// once per instruction set (AVX-512, AVX2) and picks one at run time, and
// LLVM turns the lanes into vector registers.

struct MaxF32<'a>(&'a [f32]);

impl pulp::WithSimd for MaxF32<'_> {
    type Output = f64;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> f64 {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut chunks = self.0.chunks_exact(LANES);
        for c in &mut chunks {
            for (m, &x) in lanes.iter_mut().zip(c) {
                *m = if x > *m { x } else { *m };
            }
        }
        let m = chunks
            .remainder()
            .iter()
            .chain(&lanes)
            .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
        f64::from(m)
    }
}

struct ExpSumF32<'a> {
    xs: &'a mut [f32],
    shift: f32,
}

impl pulp::WithSimd for ExpSumF32<'_> {
    type Output = f64;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> f64 {
        let shift = self.shift;
        let mut lanes = [0f32; LANES];
        let mut chunks = self.xs.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (s, x) in lanes.iter_mut().zip(c) {
                *x = exp_f32(*x - shift);
                *s += *x;
            }
        }
        let mut total: f64 = lanes.iter().map(|&s| f64::from(s)).sum();
        for x in chunks.into_remainder() {
            *x = exp_f32(*x - shift);
            total += f64::from(*x);
        }
        total
    }
}

/// `e^x` in f32, branch-free so that loops over it vectorise: Cephes' `expf`
/// (range reduction by `ln 2` in two parts, a degree-6 polynomial, the power
/// of two built from its bits). Within 2 ulp of the true value on
/// `[-87, 88]`; inputs are clamped to that range (below it the result is
/// ~1e-38 rather than 0, above it ~1.6e38 rather than inf); NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to the nearest integer, kept in the low
    // mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let e = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    y * f32::from_bits((e.wrapping_add(127) as u32) << 23)
}

/// `out[m, n] (+)= a[m, k] . b[n, k]^T` (`b_transposed`) or `a[m, k] . b[k, n]`,
/// all row-major.
#[allow(clippy::too_many_arguments)]
fn matmul<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    b: &[T],
    b_transposed: bool,
    out: &mut [T],
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out[..m * n].fill(T::from_f64(0.0));
        }
        return;
    }
    let (rhs_cs, rhs_rs) = if b_transposed {
        (k as isize, 1)
    } else {
        (1, n as isize)
    };
    let threads = rayon::current_num_threads().max(1);
    let par = if threads > 1 && m * n * k > 64 * 64 * 64 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every pointer covers the extent implied by its strides: `a` is
    // m x k row-major, `b` is n x k (transposed view) or k x n row-major, and
    // `out` is m x n row-major; the slices were checked by the callers.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            rhs_cs,
            rhs_rs,
            T::from_f64(1.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            par,
        );
    }
}

fn dot<T: Real>(a: &[T], b: &[T]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x.to_f64() * y.to_f64()).sum()
}

/// A contiguous CPU slice of `t` (made contiguous by the caller).
fn with_slice<T: Real, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!(
            "the fused queue ops run on the CPU; move the tensors to the CPU or use the naive path"
        )
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("the fused queue ops need contiguous inputs")
    };
    f(&cpu.as_slice::<T>()?[start..end])
}

/// The elements of a contiguous CPU storage `s` under layout `l` (also used
/// by [`crate::fused`]).
pub(crate) fn slice_of<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("the fused ops need contiguous inputs (the public functions fall back otherwise)")
    };
    Ok(&s.as_slice::<T>()?[start..end])
}

/// Row ids and slot ids that mark extra positives.
#[derive(Clone, Debug)]
struct Ids {
    rows: Vec<u32>,
    slots: Vec<u32>,
}

impl Ids {
    /// The queue slots of every id (empty slots left out).
    fn slots_by_id(&self) -> HashMap<u32, Vec<usize>> {
        let mut by_id: HashMap<u32, Vec<usize>> = HashMap::new();
        for (j, &id) in self.slots.iter().enumerate() {
            if id != EMPTY_SLOT {
                by_id.entry(id).or_default().push(j);
            }
        }
        by_id
    }

    /// The queue slots that share row `i`'s id.
    fn positives<'a>(&self, by_id: &'a HashMap<u32, Vec<usize>>, i: usize) -> &'a [usize] {
        by_id.get(&self.rows[i]).map_or(&[], Vec::as_slice)
    }
}

/// Columns of the contrastive op's output before the two `[D]` blocks.
pub const CONTRASTIVE_HEAD: usize = 3;

/// The instance-level op: inputs `(q / tau, k, queue)`.
///
/// Output `[B, 3 + 2D]`, row `i`: `loss_i`, `lse_i`, the number of positive
/// columns `cnt_i`, then `sum_j p_ij key_j` (the softmax-weighted key, `key_0
/// = k_i`), then the sum of the positive columns' keys. The last two blocks
/// are what the backward pass needs; they are zero when no input tracks a
/// gradient. [`queue_contrastive_fused`] returns the first two columns.
#[derive(Clone, Debug)]
pub struct QueueContrastiveOp {
    ids: Option<Ids>,
    /// Whether the forward pass accumulates the weighted keys for backward.
    with_grad: bool,
}

impl QueueContrastiveOp {
    pub fn new(ids: Option<(Vec<u32>, Vec<u32>)>, with_grad: bool) -> Self {
        Self {
            ids: ids.map(|(rows, slots)| Ids { rows, slots }),
            with_grad,
        }
    }

    fn forward<T: Real>(&self, qs: &[T], kk: &[T], queue: &[T], b: usize, d: usize) -> Vec<T> {
        let k = queue.len() / d.max(1);
        let zero = T::from_f64(0.0);
        fn row<T>(x: &[T], i: usize, d: usize) -> &[T] {
            &x[i * d..(i + 1) * d]
        }
        // Column 0, the row's own positive key, opens the running max (so
        // its weight is exp(0) = 1) and the accumulator.
        let mut max: Vec<f64> = (0..b).map(|i| dot(row(qs, i, d), row(kk, i, d))).collect();
        let mut sum = vec![1.0f64; b];
        let mut acc: Vec<T> = if self.with_grad {
            kk.to_vec()
        } else {
            Vec::new()
        };
        let mut tile = vec![zero; b * TILE.min(k)];
        for t0 in (0..k).step_by(TILE) {
            let tn = TILE.min(k - t0);
            let keys = &queue[t0 * d..(t0 + tn) * d];
            let tile = &mut tile[..b * tn];
            matmul(b, tn, d, qs, keys, true, tile, false);
            // Logits become weights exp(l - new max); the sum and the
            // accumulator are rescaled to the new max.
            type Row<'a, T> = (((&'a mut [T], &'a mut f64), &'a mut f64), &'a mut [T]);
            let online = |(((w, m), s), a): Row<T>| {
                let new = m.max(T::max_of(w));
                let scale = (*m - new).exp();
                *s = *s * scale + T::exp_shifted_sum(w, new);
                *m = new;
                if scale != 1.0 {
                    for x in a {
                        *x = T::from_f64(x.to_f64() * scale);
                    }
                }
            };
            let rows = tile
                .par_chunks_mut(tn)
                .zip(max.par_iter_mut())
                .zip(sum.par_iter_mut());
            if self.with_grad {
                rows.zip(acc.par_chunks_mut(d)).for_each(online);
                matmul(b, d, tn, tile, keys, false, &mut acc, true);
            } else {
                rows.for_each(|x| online((x, &mut [][..])));
            }
        }
        let by_id = self.ids.as_ref().map(Ids::slots_by_id).unwrap_or_default();
        let width = CONTRASTIVE_HEAD + 2 * d;
        let mut out = vec![zero; b * width];
        out.par_chunks_mut(width).enumerate().for_each(|(i, o)| {
            let (qi, ki) = (row(qs, i, d), row(kk, i, d));
            let extra = self
                .ids
                .as_ref()
                .map_or(&[][..], |ids| ids.positives(&by_id, i));
            let lse = max[i] + sum[i].ln();
            let cnt = 1 + extra.len();
            let pos = dot(qi, ki)
                + extra
                    .iter()
                    .map(|&j| dot(qi, &queue[j * d..(j + 1) * d]))
                    .sum::<f64>();
            o[0] = T::from_f64(lse - pos / cnt as f64);
            o[1] = T::from_f64(lse);
            o[2] = T::from_f64(cnt as f64);
            if self.with_grad {
                let (weighted, pos_keys) = o[CONTRASTIVE_HEAD..].split_at_mut(d);
                for (w, a) in weighted.iter_mut().zip(row(&acc, i, d)) {
                    *w = T::from_f64(a.to_f64() / sum[i]);
                }
                pos_keys.copy_from_slice(ki);
                for &j in extra {
                    for (p, x) in pos_keys.iter_mut().zip(&queue[j * d..(j + 1) * d]) {
                        *p += *x;
                    }
                }
            }
        });
        out
    }
}

impl CustomOp3 for QueueContrastiveOp {
    fn name(&self) -> &'static str {
        "queue-contrastive"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, d) = l1.shape().dims2()?;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                f32::to_cpu_storage_owned(self.forward(
                    slice_of::<f32>(s1, l1)?,
                    slice_of(s2, l2)?,
                    slice_of(s3, l3)?,
                    b,
                    d,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                f64::to_cpu_storage_owned(self.forward(
                    slice_of::<f64>(s1, l1)?,
                    slice_of(s2, l2)?,
                    slice_of(s3, l3)?,
                    b,
                    d,
                ))
            }
            _ => bail!("queue_contrastive: inputs must all be f32 or all f64"),
        };
        Ok((out, Shape::from((b, CONTRASTIVE_HEAD + 2 * d))))
    }

    /// The same forward pass as [`Self::cpu_fwd`] by the kernels of
    /// `kernels/queue_contrastive.cu` (f32 only); they always fill the two
    /// key blocks.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let ids = self
            .ids
            .as_ref()
            .map(|i| (i.rows.as_slice(), i.slots.as_slice()));
        crate::queue_cuda::contrastive_fwd(s1, l1, s2, l2, s3, l3, ids)
    }

    /// From the saved forward output alone, on any device: with
    /// `a = g_loss + g_lse` and `c = g_loss / cnt`, `dL/dl_ij = a p_ij - c
    /// [j positive]`, so `d q_i = a sum_j p_ij key_j - c sum_{j pos} key_j`
    /// and `d k_i = (a p_i0 - c) q_i`.
    fn bwd(
        &self,
        qs: &Tensor,
        k: &Tensor,
        _queue: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !self.with_grad {
            bail!("queue_contrastive: backward through a forward run without gradients");
        }
        let d = qs.dim(1)?;
        let a = (grad.narrow(1, 0, 1)? + grad.narrow(1, 1, 1)?)?;
        let c = (grad.narrow(1, 0, 1)? / res.narrow(1, 2, 1)?)?;
        let weighted = res.narrow(1, CONTRASTIVE_HEAD, d)?;
        let pos_keys = res.narrow(1, CONTRASTIVE_HEAD + d, d)?;
        let gq = (weighted.broadcast_mul(&a)? - pos_keys.broadcast_mul(&c)?)?;
        let p0 = ((qs * k)?.sum_keepdim(1)? - res.narrow(1, 1, 1)?)?.exp()?;
        let gk = qs.broadcast_mul(&((a * p0)? - c)?)?;
        Ok((Some(gq), Some(gk), None))
    }
}

/// Instance-level loss through the fused op (see `queue::queue_contrastive`).
///
/// # Shapes
/// - `q_scaled` = `q / tau`, `k`: `[B, D]`; `queue`: `[K, D]`; returns
///   `[B, 2]` = `(loss, lse)` per row.
pub fn queue_contrastive_fused(
    q_scaled: &Tensor,
    k: &Tensor,
    queue: &Tensor,
    ids: Option<(Vec<u32>, Vec<u32>)>,
) -> Result<Tensor> {
    let queue = queue.detach().contiguous()?;
    let with_grad = q_scaled.track_op() || k.track_op();
    q_scaled
        .contiguous()?
        .apply_op3(
            &k.contiguous()?,
            &queue,
            QueueContrastiveOp::new(ids, with_grad),
        )?
        .narrow(1, 0, 2)
}

/// The op's whole output `[B, 3 + 2D]` (see [`QueueContrastiveOp`]) with no
/// backward pass, on the CPU or, with the `cuda` feature, a CUDA device: what
/// the tests compare between devices and the benchmarks time.
pub fn queue_contrastive_raw(
    q_scaled: &Tensor,
    k: &Tensor,
    queue: &Tensor,
    ids: Option<(Vec<u32>, Vec<u32>)>,
) -> Result<Tensor> {
    q_scaled.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &queue.contiguous()?,
        &QueueContrastiveOp::new(ids, true),
    )
}

/// Columns of the KL op's output before its `[D]` blocks.
pub const KL_HEAD: usize = 5;

/// One `[D]` block of the KL op's output: a softmax-weighted sum of keys.
///
/// For row `i`, `a_j = fs_i . keyT_j` with `keyT_0 = t_m_i`, `keyT_j =
/// queue_t_{j-1}`, and `b_j = ts_i . keyI_j` with `keyI_0 = f_m_i`, `keyI_j =
/// queue_i_{j-1}`; `P = softmax(a)`, `Q = softmax(b)` and `c = a - b`. The
/// blocks weighted by `c` centre it at the row's own pair, `c_0 = a_0 - b_0`:
/// the gradients only see `c` minus its expectation, so the shift changes
/// nothing but rounding, and it makes the gradients of identical
/// distributions (an empty queue) exactly zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KlBlock {
    /// `sum_j P_j keyT_j`.
    PKeyT,
    /// `sum_j Q_j keyI_j`.
    QKeyI,
    /// `sum_j P_j (c_j - c_0) keyT_j` (needed by `KL(P || Q)` only).
    PcKeyT,
    /// `sum_j P_j keyI_j` (`KL(P || Q)` only).
    PKeyI,
    /// `sum_j Q_j keyT_j` (`KL(Q || P)` only).
    QKeyT,
    /// `sum_j Q_j (c_j - c_0) keyI_j` (`KL(Q || P)` only).
    QcKeyI,
}

impl KlBlock {
    /// The blocks of the output for `direction`, in their order.
    pub fn all(direction: KlDirection) -> &'static [KlBlock] {
        use KlBlock::*;
        match direction {
            KlDirection::I2tToT2i => &[PKeyT, QKeyI, PcKeyT, PKeyI],
            KlDirection::T2iToI2t => &[PKeyT, QKeyI, QKeyT, QcKeyI],
            KlDirection::Symmetric => &[PKeyT, QKeyI, PcKeyT, PKeyI, QKeyT, QcKeyI],
        }
    }

    /// Whether the block is weighted by `P` (else by `Q`).
    fn under_p(self) -> bool {
        matches!(self, KlBlock::PKeyT | KlBlock::PcKeyT | KlBlock::PKeyI)
    }

    /// Whether the block sums text keys `keyT` (else image keys `keyI`).
    fn text_keys(self) -> bool {
        matches!(self, KlBlock::PKeyT | KlBlock::PcKeyT | KlBlock::QKeyT)
    }

    /// Whether the weights are multiplied by `c - c_0`.
    fn times_c(self) -> bool {
        matches!(self, KlBlock::PcKeyT | KlBlock::QcKeyI)
    }
}

/// Columns of the KL op's output for `direction` and width `d`.
pub fn kl_width(direction: KlDirection, d: usize) -> usize {
    KL_HEAD + KlBlock::all(direction).len() * d
}

/// The task-level KL: inputs `(f / tau, t / tau)`, constants the momentum
/// keys and queues.
///
/// Output `[B, 5 + n D]`, row `i` (notation of [`KlBlock`]): the KL of the
/// direction, `lse(a)`, `lse(b)`, `E_P[c] - c_0`, `E_Q[c] - c_0`, then the `n` blocks of
/// [`KlBlock::all`] (4 for one direction, 6 for the symmetric KL). The blocks
/// are what the backward pass needs; they are zero when no input tracks a
/// gradient. [`queue_kl_fused`] returns the first column.
///
/// With `KL(P || Q) = E_P[c] - lse(a) + lse(b)` and `KL(Q || P) = -E_Q[c] -
/// lse(b) + lse(a)`, the logit gradients are `dKL(P||Q)/da_j = P_j (c_j -
/// E_P[c])`, `dKL(P||Q)/db_j = Q_j - P_j`, `dKL(Q||P)/db_j = -Q_j (c_j -
/// E_Q[c])` and `dKL(Q||P)/da_j = P_j - Q_j`, so `d fs = sum_j (dKL/da_j)
/// keyT_j` and `d ts = sum_j (dKL/db_j) keyI_j` are combinations of the
/// blocks. One streaming pass accumulates them flash-attention style, with
/// weights `exp(a_j - max a)` and `exp(b_j - max b)` rescaled whenever a
/// running max moves; per tile that is 2 logit gemms and one gemm per block.
#[derive(Clone, Debug)]
pub struct QueueKlOp {
    t_m: Tensor,
    queue_t: Tensor,
    f_m: Tensor,
    queue_i: Tensor,
    direction: KlDirection,
    /// Whether the forward pass accumulates the blocks for backward.
    with_grad: bool,
}

/// The running state of one row: maxima, sums of the shifted exponentials
/// and of the shifted exponentials times `c - c_0`, all relative to the maxima.
#[derive(Clone, Copy, Debug)]
struct KlState {
    max_a: f64,
    sum_a: f64,
    max_b: f64,
    sum_b: f64,
    /// `sum_j exp(a_j - max_a) (c_j - c_0)`.
    c_a: f64,
    /// `sum_j exp(b_j - max_b) (c_j - c_0)`.
    c_b: f64,
    /// `c_0 = a_0 - b_0`.
    c0: f64,
}

impl KlState {
    /// Column 0 opens both running maxima, so its weights are `exp(0) = 1`
    /// (and its centred `c` is 0).
    fn first(a0: f64, b0: f64) -> Self {
        Self {
            max_a: a0,
            sum_a: 1.0,
            max_b: b0,
            sum_b: 1.0,
            c_a: 0.0,
            c_b: 0.0,
            c0: a0 - b0,
        }
    }

    /// Takes one tile's logits `a`, `b` of this row; leaves the weights
    /// `exp(a - max_a)`, `exp(b - max_b)` in `a` and `b` and those weights times
    /// `c - c_0` in `ca` and `cb`, and returns the factors that rescale the old
    /// P-weighted and Q-weighted sums to the new maxima.
    fn update<T: Real>(
        &mut self,
        a: &mut [T],
        b: &mut [T],
        ca: &mut [T],
        cb: &mut [T],
    ) -> (f64, f64) {
        let c0 = T::from_f64(self.c0);
        for ((c, x), y) in ca.iter_mut().zip(&*a).zip(&*b) {
            *c = *x - *y - c0;
        }
        let max_a = self.max_a.max(T::max_of(a));
        let max_b = self.max_b.max(T::max_of(b));
        let scale_a = (self.max_a - max_a).exp();
        let scale_b = (self.max_b - max_b).exp();
        self.sum_a = self.sum_a * scale_a + T::exp_shifted_sum(a, max_a);
        self.sum_b = self.sum_b * scale_b + T::exp_shifted_sum(b, max_b);
        self.max_a = max_a;
        self.max_b = max_b;
        let (sa, sb) = weigh_by_c(a, b, ca, cb);
        self.c_a = self.c_a * scale_a + sa;
        self.c_b = self.c_b * scale_b + sb;
        (scale_a, scale_b)
    }

    fn lse_a(&self) -> f64 {
        self.max_a + self.sum_a.ln()
    }

    fn lse_b(&self) -> f64 {
        self.max_b + self.sum_b.ln()
    }
}

/// With `c` in `ca`: `cb = wb c`, `ca = wa c`; returns both sums (in f64 lanes,
/// because `E_P[c] - lse(a)` cancels).
fn weigh_by_c<T: Real>(wa: &[T], wb: &[T], ca: &mut [T], cb: &mut [T]) -> (f64, f64) {
    const N: usize = 8;
    let (mut sa, mut sb) = ([0f64; N], [0f64; N]);
    let mut rows = ca.chunks_exact_mut(N).zip(cb.chunks_exact_mut(N));
    let mut weights = wa.chunks_exact(N).zip(wb.chunks_exact(N));
    for ((ca, cb), (wa, wb)) in (&mut rows).zip(&mut weights) {
        for l in 0..N {
            cb[l] = wb[l] * ca[l];
            ca[l] *= wa[l];
            sa[l] += ca[l].to_f64();
            sb[l] += cb[l].to_f64();
        }
    }
    let done = wa.len() - wa.len() % N;
    let (mut ta, mut tb): (f64, f64) = (sa.iter().sum(), sb.iter().sum());
    for j in done..wa.len() {
        cb[j] = wb[j] * ca[j];
        ca[j] *= wa[j];
        ta += ca[j].to_f64();
        tb += cb[j].to_f64();
    }
    (ta, tb)
}

impl QueueKlOp {
    /// The op for constants `t_m`, `f_m` `[B, D]` and `queue_t`, `queue_i`
    /// `[K, D]` (detached); `with_grad` makes the forward pass fill the blocks.
    pub fn new(
        t_m: &Tensor,
        queue_t: &Tensor,
        f_m: &Tensor,
        queue_i: &Tensor,
        direction: KlDirection,
        with_grad: bool,
    ) -> Result<Self> {
        Ok(Self {
            t_m: t_m.detach().contiguous()?,
            queue_t: queue_t.detach().contiguous()?,
            f_m: f_m.detach().contiguous()?,
            queue_i: queue_i.detach().contiguous()?,
            direction,
            with_grad,
        })
    }

    /// `(KL(P || Q), KL(Q || P))` weights of the direction.
    fn weights(&self) -> (f64, f64) {
        match self.direction {
            KlDirection::I2tToT2i => (1.0, 0.0),
            KlDirection::T2iToI2t => (0.0, 1.0),
            KlDirection::Symmetric => (0.5, 0.5),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward<T: Real>(
        &self,
        fs: &[T],
        ts: &[T],
        tm: &[T],
        qt: &[T],
        fm: &[T],
        qi: &[T],
        b: usize,
        d: usize,
    ) -> Vec<T> {
        let k = qt.len() / d.max(1);
        let zero = T::from_f64(0.0);
        let blocks = KlBlock::all(self.direction);
        fn row<T>(x: &[T], i: usize, d: usize) -> &[T] {
            &x[i * d..(i + 1) * d]
        }
        // Column 0, rounded to T like the tiles' logits.
        let mut state: Vec<KlState> = (0..b)
            .map(|i| {
                let a0 = T::from_f64(dot(row(fs, i, d), row(tm, i, d))).to_f64();
                let b0 = T::from_f64(dot(row(ts, i, d), row(fm, i, d))).to_f64();
                KlState::first(a0, b0)
            })
            .collect();
        let mut acc: Vec<Vec<T>> = if self.with_grad {
            blocks
                .iter()
                .map(|blk| {
                    let keys = if blk.text_keys() { tm } else { fm };
                    if blk.times_c() {
                        vec![zero; b * d]
                    } else {
                        keys.to_vec()
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        let n = b * TILE.min(k);
        let (mut ta, mut tb, mut ca, mut cb) =
            (vec![zero; n], vec![zero; n], vec![zero; n], vec![zero; n]);
        let mut scales = vec![(1.0, 1.0); b];
        for t0 in (0..k).step_by(TILE) {
            let tn = TILE.min(k - t0);
            let (kt, ki) = (&qt[t0 * d..(t0 + tn) * d], &qi[t0 * d..(t0 + tn) * d]);
            let (ta, tb) = (&mut ta[..b * tn], &mut tb[..b * tn]);
            let (ca, cb) = (&mut ca[..b * tn], &mut cb[..b * tn]);
            matmul(b, tn, d, fs, kt, true, ta, false);
            matmul(b, tn, d, ts, ki, true, tb, false);
            ta.par_chunks_mut(tn)
                .zip(tb.par_chunks_mut(tn))
                .zip(ca.par_chunks_mut(tn))
                .zip(cb.par_chunks_mut(tn))
                .zip(state.par_iter_mut())
                .zip(scales.par_iter_mut())
                .for_each(|(((((ra, rb), rca), rcb), s), scale)| {
                    *scale = s.update(ra, rb, rca, rcb);
                });
            if !self.with_grad {
                continue;
            }
            for (blk, acc) in blocks.iter().zip(&mut acc) {
                let p = blk.under_p();
                acc.par_chunks_mut(d.max(1))
                    .zip(scales.par_iter())
                    .for_each(|(r, &(sa, sb))| {
                        let s = if p { sa } else { sb };
                        if s != 1.0 {
                            for x in r {
                                *x = T::from_f64(x.to_f64() * s);
                            }
                        }
                    });
                let (w, keys): (&[T], _) = match blk {
                    KlBlock::PKeyT => (ta, kt),
                    KlBlock::QKeyI => (tb, ki),
                    KlBlock::PcKeyT => (ca, kt),
                    KlBlock::PKeyI => (ta, ki),
                    KlBlock::QKeyT => (tb, kt),
                    KlBlock::QcKeyI => (cb, ki),
                };
                matmul(b, d, tn, w, keys, false, acc, true);
            }
        }
        let (wpq, wqp) = self.weights();
        let width = kl_width(self.direction, d);
        let mut out = vec![zero; b * width];
        out.par_chunks_mut(width)
            .zip(state.par_iter())
            .enumerate()
            .for_each(|(i, (o, s))| {
                let (lse_a, lse_b) = (s.lse_a(), s.lse_b());
                // Centred: E_P[c] - c_0 and E_Q[c] - c_0.
                let (e_p, e_q) = (s.c_a / s.sum_a, s.c_b / s.sum_b);
                let kl = wpq * (e_p + s.c0 - lse_a + lse_b) + wqp * (-(e_q + s.c0) - lse_b + lse_a);
                for (o, x) in o.iter_mut().zip([kl, lse_a, lse_b, e_p, e_q]) {
                    *o = T::from_f64(x);
                }
                for ((o, blk), acc) in o[KL_HEAD..].chunks_mut(d.max(1)).zip(blocks).zip(&acc) {
                    let norm = if blk.under_p() { s.sum_a } else { s.sum_b };
                    for (o, x) in o.iter_mut().zip(row(acc, i, d)) {
                        *o = T::from_f64(x.to_f64() / norm);
                    }
                }
            });
        out
    }

    fn consts<T: Real, R>(&self, f: impl FnOnce(&[T], &[T], &[T], &[T]) -> Result<R>) -> Result<R> {
        with_slice::<T, _>(&self.t_m, |tm| {
            with_slice::<T, _>(&self.queue_t, |qt| {
                with_slice::<T, _>(&self.f_m, |fm| {
                    with_slice::<T, _>(&self.queue_i, |qi| f(tm, qt, fm, qi))
                })
            })
        })
    }
}

impl CustomOp2 for QueueKlOp {
    fn name(&self) -> &'static str {
        "queue-kl"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, d) = l1.shape().dims2()?;
        macro_rules! run {
            ($t:ty) => {{
                let (fs, ts) = (slice_of::<$t>(s1, l1)?, slice_of::<$t>(s2, l2)?);
                self.consts::<$t, _>(|tm, qt, fm, qi| {
                    Ok(<$t>::to_cpu_storage_owned(
                        self.forward(fs, ts, tm, qt, fm, qi, b, d),
                    ))
                })?
            }};
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => run!(f32),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => run!(f64),
            _ => bail!("queue_kl: inputs must all be f32 or all f64"),
        };
        Ok((out, Shape::from((b, kl_width(self.direction, d)))))
    }

    /// The same forward pass as [`Self::cpu_fwd`] by the kernels of
    /// `kernels/queue_kl.cu` (f32 only); they always fill the blocks.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::queue_kl_cuda::kl_fwd(
            s1,
            l1,
            s2,
            l2,
            &self.t_m,
            &self.queue_t,
            &self.f_m,
            &self.queue_i,
            self.direction,
        )
    }

    /// From the saved forward output alone, on any device (see the formulas
    /// on [`QueueKlOp`]); only the KL column's gradient counts.
    fn bwd(
        &self,
        fs: &Tensor,
        _ts: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !self.with_grad {
            bail!("queue_kl: backward through a forward run without gradients");
        }
        let d = fs.dim(1)?;
        let blocks = KlBlock::all(self.direction);
        let block = |which: KlBlock| -> Result<Tensor> {
            match blocks.iter().position(|&b| b == which) {
                Some(n) => res.narrow(1, KL_HEAD + n * d, d),
                None => bail!("queue_kl: no {which:?} block for {:?}", self.direction),
            }
        };
        let (wpq, wqp) = self.weights();
        // The blocks and expectations share the shift c_0, which cancels.
        let (e_p, e_q) = (res.narrow(1, 3, 1)?, res.narrow(1, 4, 1)?);
        let mut gf: Option<Tensor> = None;
        let mut gt: Option<Tensor> = None;
        let add = |sum: Option<Tensor>, x: Tensor| -> Result<Option<Tensor>> {
            Ok(Some(match sum {
                Some(s) => (s + x)?,
                None => x,
            }))
        };
        if wpq > 0.0 {
            let p_kt = block(KlBlock::PKeyT)?;
            let f = (block(KlBlock::PcKeyT)? - p_kt.broadcast_mul(&e_p)?)?;
            let t = (block(KlBlock::QKeyI)? - block(KlBlock::PKeyI)?)?;
            gf = add(gf, (f * wpq)?)?;
            gt = add(gt, (t * wpq)?)?;
        }
        if wqp > 0.0 {
            let q_ki = block(KlBlock::QKeyI)?;
            let f = (block(KlBlock::PKeyT)? - block(KlBlock::QKeyT)?)?;
            let t = (q_ki.broadcast_mul(&e_q)? - block(KlBlock::QcKeyI)?)?;
            gf = add(gf, (f * wqp)?)?;
            gt = add(gt, (t * wqp)?)?;
        }
        let g = grad.narrow(1, 0, 1)?;
        let (Some(gf), Some(gt)) = (gf, gt) else {
            bail!("queue_kl: a direction without a KL term")
        };
        Ok((Some(gf.broadcast_mul(&g)?), Some(gt.broadcast_mul(&g)?)))
    }
}

/// Task-level KL through the fused op (see `queue::queue_kl`).
///
/// # Shapes
/// - `f_scaled` = `f / tau`, `t_scaled` = `t / tau`, `t_m`, `f_m`: `[B, D]`;
///   `queue_t`, `queue_i`: `[K, D]`; returns `[B]`.
pub fn queue_kl_fused(
    f_scaled: &Tensor,
    t_m: &Tensor,
    queue_t: &Tensor,
    t_scaled: &Tensor,
    f_m: &Tensor,
    queue_i: &Tensor,
    direction: KlDirection,
) -> Result<Tensor> {
    let with_grad = f_scaled.track_op() || t_scaled.track_op();
    let op = QueueKlOp::new(t_m, queue_t, f_m, queue_i, direction, with_grad)?;
    f_scaled
        .contiguous()?
        .apply_op2(&t_scaled.contiguous()?, op)?
        .narrow(1, 0, 1)?
        .squeeze(1)
}

/// The op's whole output `[B, 5 + n D]` (see [`QueueKlOp`]) with no backward
/// pass, on the CPU or, with the `cuda` feature, a CUDA device: what the tests
/// compare between devices and the benchmarks time.
pub fn queue_kl_raw(
    f_scaled: &Tensor,
    t_m: &Tensor,
    queue_t: &Tensor,
    t_scaled: &Tensor,
    f_m: &Tensor,
    queue_i: &Tensor,
    direction: KlDirection,
) -> Result<Tensor> {
    let op = QueueKlOp::new(t_m, queue_t, f_m, queue_i, direction, true)?;
    f_scaled
        .contiguous()?
        .apply_op2_no_bwd(&t_scaled.contiguous()?, &op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use rand::{Rng, SeedableRng};

    #[test]
    fn exp_f32_is_within_two_ulp_of_f64_exp() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut xs: Vec<f32> = (0..200_000)
            .map(|_| rng.random_range(-87.0..88.0))
            .collect();
        xs.extend([
            -87.0, -20.5, -1.0, -0.5, -1e-7, 0.0, 1e-7, 0.5, 1.0, 30.25, 88.0,
        ]);
        for &x in &xs {
            let want = f64::from(x).exp();
            let got = f64::from(exp_f32(x));
            let ulp = f64::from(f32::EPSILON) * want;
            assert!(
                (got - want).abs() <= 2.0 * ulp,
                "exp({x}) = {got}, want {want}"
            );
        }
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(-1e4) < 1e-37 && exp_f32(-1e4) >= 0.0);
    }

    #[test]
    fn f32_exp_sum_and_max_match_f64_on_odd_lengths() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        for n in [0usize, 1, 15, 16, 17, 513] {
            let xs: Vec<f32> = (0..n).map(|_| rng.random_range(-30.0..5.0)).collect();
            let want_max = xs
                .iter()
                .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
            assert_eq!(f32::max_of(&xs), want_max, "n = {n}");
            let shift = want_max.max(0.0);
            // The reference subtracts in f32 too: the op's logits are f32.
            let reference = |x: f32| f64::from(x - shift as f32).exp();
            let want: f64 = xs.iter().map(|&x| reference(x)).sum();
            let mut got = xs.clone();
            let sum = f32::exp_shifted_sum(&mut got, shift);
            assert!(
                (sum - want).abs() <= 1e-6 * want.max(1e-30),
                "n = {n}: {sum} vs {want}"
            );
            for (g, x) in got.iter().zip(&xs) {
                let w = reference(*x);
                assert!((f64::from(*g) - w).abs() <= 3e-7 * w, "{g} vs {w}");
            }
        }
    }

    /// Without a gradient to track, the op skips the key accumulation and
    /// gives the same loss and lse; with one, the output's key blocks equal
    /// `sum_j p_ij key_j` and the positives' key sum, computed naively.
    #[test]
    fn output_blocks_match_a_naive_reference() -> Result<()> {
        let (b, d, k) = (5, 8, 1100);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut rand =
            |n: usize| -> Vec<f64> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let (qs, kk, queue) = (rand(b * d), rand(b * d), rand(k * d));
        let rows: Vec<u32> = (0..b as u32).collect();
        let slots: Vec<u32> = (0..k as u32)
            .map(|j| if j % 7 == 0 { j % 5 } else { 99 })
            .collect();
        let dev = Device::Cpu;
        let t = |v: &[f64], r: usize| Tensor::from_slice(v, (r, d), &dev);
        let q_var = Var::from_tensor(&t(&qs, b)?)?;
        let ids = Some((rows.clone(), slots.clone()));
        let with = QueueContrastiveOp::new(ids.clone(), true);
        let without = QueueContrastiveOp::new(ids, false);
        let out = q_var
            .as_tensor()
            .apply_op3(&t(&kk, b)?, &t(&queue, k)?, with)?;
        let bare = t(&qs, b)?.apply_op3(&t(&kk, b)?, &t(&queue, k)?, without)?;
        let out = out.to_vec2::<f64>()?;
        let bare = bare.to_vec2::<f64>()?;
        for i in 0..b {
            let key = |j: usize| -> &[f64] {
                if j == 0 {
                    &kk[i * d..(i + 1) * d]
                } else {
                    &queue[(j - 1) * d..j * d]
                }
            };
            let logits: Vec<f64> = (0..=k)
                .map(|j| dot(&qs[i * d..(i + 1) * d], key(j)))
                .collect();
            let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
            let pos: Vec<usize> = std::iter::once(0)
                .chain((1..=k).filter(|&j| slots[j - 1] == rows[i]))
                .collect();
            let loss = lse - pos.iter().map(|&j| logits[j]).sum::<f64>() / pos.len() as f64;
            let mut weighted = vec![0f64; d];
            let mut pos_keys = vec![0f64; d];
            for (j, l) in logits.iter().enumerate() {
                let p = (l - lse).exp();
                for (w, x) in weighted.iter_mut().zip(key(j)) {
                    *w += p * x;
                }
            }
            for &j in &pos {
                for (s, x) in pos_keys.iter_mut().zip(key(j)) {
                    *s += x;
                }
            }
            let want: Vec<f64> = [loss, lse, pos.len() as f64]
                .into_iter()
                .chain(weighted)
                .chain(pos_keys)
                .collect();
            for (c, (g, w)) in out[i].iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-10 * w.abs().max(1.0),
                    "row {i} col {c}: {g} vs {w}"
                );
            }
            assert_eq!(&bare[i][..CONTRASTIVE_HEAD], &out[i][..CONTRASTIVE_HEAD]);
        }
        Ok(())
    }

    /// The naive f64 contract of the KL op's output row `i`: the full logits,
    /// softmaxes and weighted key sums in plain loops.
    #[allow(clippy::too_many_arguments)]
    fn kl_reference(
        fs: &[f64],
        ts: &[f64],
        tm: &[f64],
        qt: &[f64],
        fm: &[f64],
        qi: &[f64],
        d: usize,
        i: usize,
        direction: KlDirection,
    ) -> Vec<f64> {
        let k = qt.len() / d;
        let key = |first: &[f64], queue: &[f64], j: usize| -> Vec<f64> {
            if j == 0 {
                first[i * d..(i + 1) * d].to_vec()
            } else {
                queue[(j - 1) * d..j * d].to_vec()
            }
        };
        let kt: Vec<Vec<f64>> = (0..=k).map(|j| key(tm, qt, j)).collect();
        let ki: Vec<Vec<f64>> = (0..=k).map(|j| key(fm, qi, j)).collect();
        let a: Vec<f64> = kt.iter().map(|x| dot(&fs[i * d..(i + 1) * d], x)).collect();
        let b: Vec<f64> = ki.iter().map(|x| dot(&ts[i * d..(i + 1) * d], x)).collect();
        let lse = |l: &[f64]| {
            let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            m + l.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
        };
        let (lse_a, lse_b) = (lse(&a), lse(&b));
        let p: Vec<f64> = a.iter().map(|x| (x - lse_a).exp()).collect();
        let q: Vec<f64> = b.iter().map(|x| (x - lse_b).exp()).collect();
        let c: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
        let e_p: f64 = p.iter().zip(&c).map(|(p, c)| p * c).sum();
        let e_q: f64 = q.iter().zip(&c).map(|(q, c)| q * c).sum();
        // log P_j - log Q_j, without dividing probabilities that underflow.
        let log_ratio: Vec<f64> = (0..=k).map(|j| (a[j] - lse_a) - (b[j] - lse_b)).collect();
        let kl_pq: f64 = (0..=k).map(|j| p[j] * log_ratio[j]).sum();
        let kl_qp: f64 = (0..=k).map(|j| -q[j] * log_ratio[j]).sum();
        let kl = match direction {
            KlDirection::I2tToT2i => kl_pq,
            KlDirection::T2iToI2t => kl_qp,
            KlDirection::Symmetric => 0.5 * (kl_pq + kl_qp),
        };
        let mut out = vec![kl, lse_a, lse_b, e_p - c[0], e_q - c[0]];
        for blk in KlBlock::all(direction) {
            let mut sum = vec![0f64; d];
            for j in 0..=k {
                let (w, keys) = match blk {
                    KlBlock::PKeyT => (p[j], &kt[j]),
                    KlBlock::QKeyI => (q[j], &ki[j]),
                    KlBlock::PcKeyT => (p[j] * (c[j] - c[0]), &kt[j]),
                    KlBlock::PKeyI => (p[j], &ki[j]),
                    KlBlock::QKeyT => (q[j], &kt[j]),
                    KlBlock::QcKeyI => (q[j] * (c[j] - c[0]), &ki[j]),
                };
                for (s, x) in sum.iter_mut().zip(keys) {
                    *s += w * x;
                }
            }
            out.extend(sum);
        }
        out
    }

    /// The KL op's whole output against [`kl_reference`] in f64 (tight) and
    /// f32 (finite and close), with and without gradients, for queues that
    /// are empty, shorter than a tile, not a multiple of it, and for logits of
    /// +-100 (tau 0.01).
    #[test]
    fn kl_output_blocks_match_a_naive_reference() -> Result<()> {
        let d = 8;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
        for (b, k, scale) in [
            (5, 1100, 1.0),
            (3, 0, 1.0),
            (4, TILE + 301, 1.0),
            (6, 700, 100.0),
        ] {
            let mut rand = |n: usize, s: f64| -> Vec<f64> {
                (0..n).map(|_| s * rng.random_range(-1.0..1.0)).collect()
            };
            // Keys of norm <= 1 (entries in +-1/sqrt(d)); queries scaled up.
            let key = 1.0 / (d as f64).sqrt();
            let (fs, ts) = (rand(b * d, scale * key), rand(b * d, scale * key));
            let (tm, fm) = (rand(b * d, key), rand(b * d, key));
            let (qt, qi) = (rand(k * d, key), rand(k * d, key));
            for direction in [
                KlDirection::I2tToT2i,
                KlDirection::T2iToI2t,
                KlDirection::Symmetric,
            ] {
                let want: Vec<Vec<f64>> = (0..b)
                    .map(|i| kl_reference(&fs, &ts, &tm, &qt, &fm, &qi, d, i, direction))
                    .collect();
                let width = kl_width(direction, d);
                for (dtype, tol) in [(DType::F64, 1e-9), (DType::F32, 2e-4)] {
                    let dev = Device::Cpu;
                    let t =
                        |v: &[f64], r: usize| Tensor::from_slice(v, (r, d), &dev)?.to_dtype(dtype);
                    let (fs_t, ts_t) = (t(&fs, b)?, t(&ts, b)?);
                    let (tm_t, qt_t, fm_t, qi_t) = (t(&tm, b)?, t(&qt, k)?, t(&fm, b)?, t(&qi, k)?);
                    let op = |grad| QueueKlOp::new(&tm_t, &qt_t, &fm_t, &qi_t, direction, grad);
                    let out = fs_t.apply_op2_no_bwd(&ts_t, &op(true)?)?;
                    let bare = fs_t.apply_op2_no_bwd(&ts_t, &op(false)?)?;
                    assert_eq!(out.dims(), [b, width]);
                    let out = out.to_dtype(DType::F64)?.to_vec2::<f64>()?;
                    let bare = bare.to_dtype(DType::F64)?.to_vec2::<f64>()?;
                    // Each column's error relative to that column's largest value.
                    for c in 0..width {
                        let col = want.iter().fold(1f64, |m, r| m.max(r[c].abs()));
                        for i in 0..b {
                            let (g, w) = (out[i][c], want[i][c]);
                            assert!(
                                g.is_finite() && (g - w).abs() <= tol * col,
                                "{direction:?} {dtype:?} b {b} k {k} scale {scale} row {i} col {c}: {g} vs {w}"
                            );
                        }
                    }
                    for i in 0..b {
                        assert_eq!(&bare[i][..KL_HEAD], &out[i][..KL_HEAD]);
                        assert!(bare[i][KL_HEAD..].iter().all(|&x| x == 0.0));
                    }
                }
            }
        }
        Ok(())
    }
}
