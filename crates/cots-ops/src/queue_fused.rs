//! Fused, tiled CPU implementations of the queue contrastive loss and the
//! task-level KL, as candle custom ops with a backward pass.
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
//! The KL op recomputes its tiles in the backward pass from the saved
//! log-normalisers.
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

fn slice_of<'a, T: Real>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("the fused queue ops need contiguous inputs")
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
    /// For every row, the queue slots that share its id.
    fn positive_slots(&self) -> Vec<Vec<usize>> {
        let mut by_id: HashMap<u32, Vec<usize>> = HashMap::new();
        for (j, &id) in self.slots.iter().enumerate() {
            if id != EMPTY_SLOT {
                by_id.entry(id).or_default().push(j);
            }
        }
        self.rows
            .iter()
            .map(|id| by_id.get(id).cloned().unwrap_or_default())
            .collect()
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
        let positives = self
            .ids
            .as_ref()
            .map(Ids::positive_slots)
            .unwrap_or_default();
        let width = CONTRASTIVE_HEAD + 2 * d;
        let mut out = vec![zero; b * width];
        out.par_chunks_mut(width).enumerate().for_each(|(i, o)| {
            let (qi, ki) = (row(qs, i, d), row(kk, i, d));
            let extra = positives.get(i).map_or(&[][..], Vec::as_slice);
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

/// The task-level KL: inputs `(f / tau, t / tau)`, constants the momentum
/// keys and queues; output `[B]`.
#[derive(Clone, Debug)]
pub struct QueueKlOp {
    t_m: Tensor,
    queue_t: Tensor,
    f_m: Tensor,
    queue_i: Tensor,
    direction: KlDirection,
}

/// Per-row statistics of one distribution pair.
struct KlRows {
    lse_p: Vec<f64>,
    lse_q: Vec<f64>,
    /// `sum_j P_j (a_j - b_j)` and `sum_j Q_j (b_j - a_j)`.
    e_p: Vec<f64>,
    e_q: Vec<f64>,
}

impl QueueKlOp {
    /// Streams both logit sets; `visit(i, a_j, b_j)` sees every column of row i.
    #[allow(clippy::too_many_arguments)]
    fn stream<T: Real>(
        fs: &[T],
        ts: &[T],
        tm: &[T],
        qt: &[T],
        fm: &[T],
        qi: &[T],
        b: usize,
        d: usize,
        mut visit: impl FnMut(usize, usize, &[T], &[T]),
    ) {
        let k = qt.len() / d.max(1);
        let mut ta = vec![T::from_f64(0.0); b * TILE];
        let mut tb = vec![T::from_f64(0.0); b * TILE];
        // Column 0.
        let a0: Vec<T> = (0..b)
            .map(|i| T::from_f64(dot(&fs[i * d..(i + 1) * d], &tm[i * d..(i + 1) * d])))
            .collect();
        let b0: Vec<T> = (0..b)
            .map(|i| T::from_f64(dot(&ts[i * d..(i + 1) * d], &fm[i * d..(i + 1) * d])))
            .collect();
        for i in 0..b {
            visit(i, 0, &a0[i..i + 1], &b0[i..i + 1]);
        }
        for t0 in (0..k).step_by(TILE) {
            let tn = TILE.min(k - t0);
            matmul(
                b,
                tn,
                d,
                fs,
                &qt[t0 * d..(t0 + tn) * d],
                true,
                &mut ta,
                false,
            );
            matmul(
                b,
                tn,
                d,
                ts,
                &qi[t0 * d..(t0 + tn) * d],
                true,
                &mut tb,
                false,
            );
            for i in 0..b {
                visit(
                    i,
                    1 + t0,
                    &ta[i * tn..(i + 1) * tn],
                    &tb[i * tn..(i + 1) * tn],
                );
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn rows<T: Real>(
        fs: &[T],
        ts: &[T],
        tm: &[T],
        qt: &[T],
        fm: &[T],
        qi: &[T],
        b: usize,
        d: usize,
    ) -> KlRows {
        // Pass 1: online log-sum-exp of both distributions.
        let (mut mp, mut sp) = (vec![f64::NEG_INFINITY; b], vec![0f64; b]);
        let (mut mq, mut sq) = (vec![f64::NEG_INFINITY; b], vec![0f64; b]);
        let online = |m: &mut f64, s: &mut f64, xs: &[T]| {
            let tile_max = xs.iter().fold(f64::NEG_INFINITY, |a, v| a.max(v.to_f64()));
            let new = m.max(tile_max);
            *s = if m.is_finite() {
                *s * (*m - new).exp()
            } else {
                0.0
            } + xs.iter().map(|v| (v.to_f64() - new).exp()).sum::<f64>();
            *m = new;
        };
        Self::stream(fs, ts, tm, qt, fm, qi, b, d, |i, _, a, bb| {
            online(&mut mp[i], &mut sp[i], a);
            online(&mut mq[i], &mut sq[i], bb);
        });
        let lse_p: Vec<f64> = (0..b).map(|i| mp[i] + sp[i].ln()).collect();
        let lse_q: Vec<f64> = (0..b).map(|i| mq[i] + sq[i].ln()).collect();
        // Pass 2: expectations of the log-ratio under each distribution.
        let (mut e_p, mut e_q) = (vec![0f64; b], vec![0f64; b]);
        Self::stream(fs, ts, tm, qt, fm, qi, b, d, |i, _, a, bb| {
            for (x, y) in a.iter().zip(bb) {
                let (x, y) = (x.to_f64(), y.to_f64());
                e_p[i] += (x - lse_p[i]).exp() * (x - y);
                e_q[i] += (y - lse_q[i]).exp() * (y - x);
            }
        });
        KlRows {
            lse_p,
            lse_q,
            e_p,
            e_q,
        }
    }

    fn kl(&self, r: &KlRows, i: usize) -> f64 {
        // KL(P||Q) = E_P[a - b] - lse_p + lse_q, and symmetrically.
        let pq = r.e_p[i] - r.lse_p[i] + r.lse_q[i];
        let qp = r.e_q[i] - r.lse_q[i] + r.lse_p[i];
        match self.direction {
            KlDirection::I2tToT2i => pq,
            KlDirection::T2iToI2t => qp,
            KlDirection::Symmetric => 0.5 * (pq + qp),
        }
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

    /// Gradients w.r.t. the scaled queries `(d fs, d ts)` for output gradient `g` `[B]`.
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Real>(
        &self,
        fs: &[T],
        ts: &[T],
        tm: &[T],
        qt: &[T],
        fm: &[T],
        qi: &[T],
        g: &[T],
        b: usize,
        d: usize,
    ) -> (Vec<T>, Vec<T>) {
        let r = Self::rows(fs, ts, tm, qt, fm, qi, b, d);
        let (wpq, wqp) = match self.direction {
            KlDirection::I2tToT2i => (1.0, 0.0),
            KlDirection::T2iToI2t => (0.0, 1.0),
            KlDirection::Symmetric => (0.5, 0.5),
        };
        // With c = a - b: dKL(P||Q)/da = P (c - E_P c), dKL(P||Q)/db = Q - P;
        // dKL(Q||P)/db = Q (-c - E_Q[-c]), dKL(Q||P)/da = P - Q.
        let coef = |i: usize, x: f64, y: f64| -> (f64, f64) {
            let p = (x - r.lse_p[i]).exp();
            let q = (y - r.lse_q[i]).exp();
            let gi = g[i].to_f64();
            let da = wpq * p * ((x - y) - r.e_p[i]) + wqp * (p - q);
            let db = wpq * (q - p) + wqp * q * ((y - x) - r.e_q[i]);
            (gi * da, gi * db)
        };
        let k = qt.len() / d.max(1);
        let mut gf = vec![T::from_f64(0.0); b * d];
        let mut gt = vec![T::from_f64(0.0); b * d];
        for i in 0..b {
            // Rounded to T exactly as the forward pass saw column 0.
            let x = T::from_f64(dot(&fs[i * d..(i + 1) * d], &tm[i * d..(i + 1) * d])).to_f64();
            let y = T::from_f64(dot(&ts[i * d..(i + 1) * d], &fm[i * d..(i + 1) * d])).to_f64();
            let (ca, cb) = coef(i, x, y);
            for z in 0..d {
                gf[i * d + z] = T::from_f64(ca * tm[i * d + z].to_f64());
                gt[i * d + z] = T::from_f64(cb * fm[i * d + z].to_f64());
            }
        }
        let mut ta = vec![T::from_f64(0.0); b * TILE];
        let mut tb = vec![T::from_f64(0.0); b * TILE];
        for t0 in (0..k).step_by(TILE) {
            let tn = TILE.min(k - t0);
            let (kt, ki) = (&qt[t0 * d..(t0 + tn) * d], &qi[t0 * d..(t0 + tn) * d]);
            matmul(b, tn, d, fs, kt, true, &mut ta, false);
            matmul(b, tn, d, ts, ki, true, &mut tb, false);
            ta[..b * tn]
                .par_chunks_mut(tn)
                .zip(tb[..b * tn].par_chunks_mut(tn))
                .enumerate()
                .for_each(|(i, (ra, rb))| {
                    for (x, y) in ra.iter_mut().zip(rb.iter_mut()) {
                        let (ca, cb) = coef(i, x.to_f64(), y.to_f64());
                        *x = T::from_f64(ca);
                        *y = T::from_f64(cb);
                    }
                });
            matmul(b, d, tn, &ta[..b * tn], kt, false, &mut gf, true);
            matmul(b, d, tn, &tb[..b * tn], ki, false, &mut gt, true);
        }
        (gf, gt)
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
                    let r = Self::rows(fs, ts, tm, qt, fm, qi, b, d);
                    Ok(<$t>::to_cpu_storage_owned(
                        (0..b).map(|i| <$t>::from_f64(self.kl(&r, i))).collect(),
                    ))
                })?
            }};
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => run!(f32),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => run!(f64),
            _ => bail!("queue_kl: inputs must all be f32 or all f64"),
        };
        Ok((out, Shape::from(b)))
    }

    fn bwd(
        &self,
        fs: &Tensor,
        ts: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, d) = fs.dims2()?;
        let grad = grad.contiguous()?;
        macro_rules! run {
            ($t:ty) => {{
                let (gf, gt) = with_slice::<$t, _>(fs, |f| {
                    with_slice::<$t, _>(ts, |t| {
                        with_slice::<$t, _>(&grad, |g| {
                            self.consts::<$t, _>(|tm, qt, fm, qi| {
                                Ok(self.backward(f, t, tm, qt, fm, qi, g, b, d))
                            })
                        })
                    })
                })?;
                (
                    Tensor::from_vec(gf, (b, d), fs.device())?,
                    Tensor::from_vec(gt, (b, d), fs.device())?,
                )
            }};
        }
        let (gf, gt) = match fs.dtype() {
            candle_core::DType::F32 => run!(f32),
            candle_core::DType::F64 => run!(f64),
            dt => bail!("queue_kl: unsupported dtype {dt:?}"),
        };
        Ok((Some(gf), Some(gt)))
    }
}

/// Task-level KL through the fused op (see `queue::queue_kl`).
///
/// # Shapes
/// - `f_scaled` = `f / tau`, `t_scaled` = `t / tau`, `t_m`, `f_m`: `[B, D]`;
///   `queue_t`, `queue_i`: `[K, D]`; returns `[B]`.
#[allow(clippy::too_many_arguments)]
pub fn queue_kl_fused(
    f_scaled: &Tensor,
    t_m: &Tensor,
    queue_t: &Tensor,
    t_scaled: &Tensor,
    f_m: &Tensor,
    queue_i: &Tensor,
    direction: KlDirection,
) -> Result<Tensor> {
    let op = QueueKlOp {
        t_m: t_m.detach().contiguous()?,
        queue_t: queue_t.detach().contiguous()?,
        f_m: f_m.detach().contiguous()?,
        queue_i: queue_i.detach().contiguous()?,
        direction,
    };
    f_scaled
        .contiguous()?
        .apply_op2(&t_scaled.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
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
}
