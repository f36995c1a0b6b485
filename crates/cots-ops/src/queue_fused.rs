//! Fused, tiled CPU implementations of the queue contrastive loss and the
//! task-level KL, as candle custom ops with a backward pass.
//!
//! Neither op ever holds the `B x (1+K)` logits: the queue is streamed in
//! tiles of [`TILE`] slots, each tile's logits `[B, TILE]` come from one
//! gemm call (AVX-512 kernels when the CPU has them), and a running max /
//! running sum per row keeps the log-sum-exp (the online softmax). The
//! backward pass recomputes the tiles from the saved log-normaliser and
//! accumulates the query gradient with a second gemm per tile. Extra memory
//! is `O(B * TILE)` whatever `K` is.
//!
//! The temperature is handled outside: callers pass `q / tau`, so autograd
//! gives `tau` its gradient through that division.

use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use rayon::prelude::*;

use crate::queue::{KlDirection, EMPTY_SLOT};

/// Queue slots per tile.
pub const TILE: usize = 512;

/// The element types the ops run in (f32, f64); all accumulation is in f64.
pub trait Real: WithDType {}
impl Real for f32 {}
impl Real for f64 {}

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
    fn is_pos(&self, row: usize, slot: usize) -> bool {
        let s = self.slots[slot];
        s != EMPTY_SLOT && s == self.rows[row]
    }
}

/// The instance-level op: inputs `(q / tau, k, queue)`, output `[B, 2]` =
/// `(loss, lse)` per row.
#[derive(Clone, Debug)]
pub struct QueueContrastiveOp {
    ids: Option<Ids>,
}

impl QueueContrastiveOp {
    pub fn new(ids: Option<(Vec<u32>, Vec<u32>)>) -> Self {
        Self {
            ids: ids.map(|(rows, slots)| Ids { rows, slots }),
        }
    }

    fn positives(&self, b: usize, k: usize) -> Vec<f64> {
        (0..b)
            .map(|i| {
                1.0 + self
                    .ids
                    .as_ref()
                    .map_or(0, |ids| (0..k).filter(|&j| ids.is_pos(i, j)).count())
                    as f64
            })
            .collect()
    }

    fn forward<T: Real>(&self, q: &[T], kk: &[T], queue: &[T], b: usize, d: usize) -> Vec<T> {
        let k = queue.len() / d.max(1);
        // Column 0: the row's own positive key.
        let mut max: Vec<f64> = (0..b)
            .map(|i| dot(&q[i * d..(i + 1) * d], &kk[i * d..(i + 1) * d]))
            .collect();
        let mut pos_sum = max.clone();
        let mut sum = vec![1.0f64; b];
        let mut tile = vec![T::from_f64(0.0); b * TILE];
        for t0 in (0..k).step_by(TILE) {
            let tn = TILE.min(k - t0);
            matmul(
                b,
                tn,
                d,
                q,
                &queue[t0 * d..(t0 + tn) * d],
                true,
                &mut tile,
                false,
            );
            max.par_iter_mut()
                .zip(sum.par_iter_mut())
                .zip(pos_sum.par_iter_mut())
                .enumerate()
                .for_each(|(i, ((m, s), p))| {
                    let row = &tile[i * tn..(i + 1) * tn];
                    let tile_max = row.iter().fold(f64::NEG_INFINITY, |a, v| a.max(v.to_f64()));
                    let new_max = m.max(tile_max);
                    *s = *s * (*m - new_max).exp()
                        + row
                            .iter()
                            .map(|v| (v.to_f64() - new_max).exp())
                            .sum::<f64>();
                    *m = new_max;
                    if let Some(ids) = &self.ids {
                        for (j, v) in row.iter().enumerate() {
                            if ids.is_pos(i, t0 + j) {
                                *p += v.to_f64();
                            }
                        }
                    }
                });
        }
        let cnt = self.positives(b, k);
        (0..b)
            .flat_map(|i| {
                let lse = max[i] + sum[i].ln();
                [T::from_f64(lse - pos_sum[i] / cnt[i]), T::from_f64(lse)]
            })
            .collect()
    }

    /// Gradients `(d q, d k)` from the output gradient `g` `[B, 2]` and the
    /// forward result `res` `[B, 2]`.
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Real>(
        &self,
        q: &[T],
        kk: &[T],
        queue: &[T],
        res: &[T],
        g: &[T],
        b: usize,
        d: usize,
    ) -> (Vec<T>, Vec<T>) {
        let k = queue.len() / d.max(1);
        let cnt = self.positives(b, k);
        let lse: Vec<f64> = (0..b).map(|i| res[i * 2 + 1].to_f64()).collect();
        let g_loss: Vec<f64> = (0..b).map(|i| g[i * 2].to_f64()).collect();
        let g_lse: Vec<f64> = (0..b).map(|i| g[i * 2 + 1].to_f64()).collect();
        // dL/dl_ij = (g_loss_i + g_lse_i) p_ij - g_loss_i [j positive] / cnt_i.
        let coef = |i: usize, logit: f64, positive: bool| -> f64 {
            let p = (logit - lse[i]).exp();
            (g_loss[i] + g_lse[i]) * p - if positive { g_loss[i] / cnt[i] } else { 0.0 }
        };
        let mut gq = vec![T::from_f64(0.0); b * d];
        let mut gk = vec![T::from_f64(0.0); b * d];
        for i in 0..b {
            let (qi, ki) = (&q[i * d..(i + 1) * d], &kk[i * d..(i + 1) * d]);
            let c0 = coef(i, dot(qi, ki), true);
            for x in 0..d {
                gq[i * d + x] = T::from_f64(c0 * ki[x].to_f64());
                gk[i * d + x] = T::from_f64(c0 * qi[x].to_f64());
            }
        }
        let mut tile = vec![T::from_f64(0.0); b * TILE];
        for t0 in (0..k).step_by(TILE) {
            let tn = TILE.min(k - t0);
            let keys = &queue[t0 * d..(t0 + tn) * d];
            matmul(b, tn, d, q, keys, true, &mut tile, false);
            tile[..b * tn]
                .par_chunks_mut(tn)
                .enumerate()
                .for_each(|(i, row)| {
                    for (j, v) in row.iter_mut().enumerate() {
                        let positive = self.ids.as_ref().is_some_and(|ids| ids.is_pos(i, t0 + j));
                        *v = T::from_f64(coef(i, v.to_f64(), positive));
                    }
                });
            matmul(b, d, tn, &tile[..b * tn], keys, false, &mut gq, true);
        }
        (gq, gk)
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
        Ok((out, Shape::from((b, 2))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        queue: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, d) = q.dims2()?;
        let (res, grad) = (res.contiguous()?, grad.contiguous()?);
        macro_rules! run {
            ($t:ty) => {{
                with_slice::<$t, _>(q, |qs| {
                    with_slice::<$t, _>(k, |ks| {
                        with_slice::<$t, _>(queue, |qu| {
                            with_slice::<$t, _>(&res, |rs| {
                                with_slice::<$t, _>(&grad, |gs| {
                                    Ok(self.backward(qs, ks, qu, rs, gs, b, d))
                                })
                            })
                        })
                    })
                })?
            }};
        }
        let (gq, gk) = match q.dtype() {
            candle_core::DType::F32 => {
                let (a, c) = run!(f32);
                (
                    Tensor::from_vec(a, (b, d), q.device())?,
                    Tensor::from_vec(c, (b, d), q.device())?,
                )
            }
            candle_core::DType::F64 => {
                let (a, c) = run!(f64);
                (
                    Tensor::from_vec(a, (b, d), q.device())?,
                    Tensor::from_vec(c, (b, d), q.device())?,
                )
            }
            dt => bail!("queue_contrastive: unsupported dtype {dt:?}"),
        };
        Ok((Some(gq), Some(gk), None))
    }
}

/// Instance-level loss through the fused op (see `queue::queue_contrastive`).
///
/// # Shapes
/// - `q_scaled` = `q / tau`, `k`: `[B, D]`; `queue`: `[K, D]`; returns `[B, 2]`.
pub fn queue_contrastive_fused(
    q_scaled: &Tensor,
    k: &Tensor,
    queue: &Tensor,
    ids: Option<(Vec<u32>, Vec<u32>)>,
) -> Result<Tensor> {
    let queue = queue.detach().contiguous()?;
    q_scaled
        .contiguous()?
        .apply_op3(&k.contiguous()?, &queue, QueueContrastiveOp::new(ids))
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
