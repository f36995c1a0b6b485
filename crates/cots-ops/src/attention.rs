//! Multi-head scaled dot-product attention, `softmax(scale * q k^T + bias) v`,
//! as one candle custom op forward and one backward on the CPU.
//!
//! The composition ([`attention_reference`]) runs a batched matmul, a
//! broadcast add, a softmax and a second batched matmul, and its backward
//! about twice as many ops; around it an encoder splits the heads out of
//! its projections (`[B, L, H * D]` to `[B, H, L, D]`, a copy each for q, k
//! and v) and merges them back (another copy), every copy again in the
//! backward pass. candle's CPU matmul calls `gemm` once per batch entry,
//! each call handed the whole thread pool, so with `B * H` small heads (the
//! demo model: 128 heads of `[65 x 32]`) every attention matmul is `B * H`
//! fork/joins of the pool over problems far too small to split.
//!
//! Here the batch entries are the unit of parallel work: rayon splits the
//! `B` entries over its pool once per op, and each entry runs its heads one
//! after the other, each head's products single-threaded
//! (`gemm::Parallelism::None`) with its `[Lq, Lk]` scores in a per-thread
//! scratch buffer that stays in cache. A batch of one runs its heads in
//! turn and hands each product to the pool instead. [`attention_packed`]
//! reads the heads straight out of `[B, L, H * D]` projections (through
//! `gemm`'s row strides) and writes `[B, L, H * Dv]`, so no split or merge
//! copy is made in either pass.
//!
//! Nothing is saved between the passes: the backward recomputes each head's
//! probabilities `P` (one more product) and gives, with `dO` the upstream
//! gradient,
//! `dV = P^T dO`, `dP = dO V^T`, `dS = P * (dP - rowsum(dP * P))`,
//! `dQ = scale dS K`, `dK = scale dS^T Q`.
//! Batch entries are independent and each is computed in a fixed order, so
//! with more than one entry results do not depend on the number of threads.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;

use crate::fused::{fusable, max_of, reduce, split_flat, Float};
use crate::queue_fused::slice_of;

/// Multiply-adds (over all heads) below which the op runs on the calling
/// thread.
const PAR_MIN_MACS: usize = 256 * 1024;

/// Attention of queries `q` over keys `k` and values `v`, per batch entry and
/// head: `softmax(scale * q k^T + bias) v`.
///
/// # Shapes
/// - `q`: `[B, H, Lq, D]`; `k`: `[B, H, Lk, D]`; `v`: `[B, H, Lk, Dv]`;
/// - `bias`: broadcastable to `[B, 1, 1, Lk]`, an additive key mask (what
///   `cots_encoders::bert::attention_bias` makes: 0 kept, a large negative
///   number padded);
/// - output: `[B, H, Lq, Dv]`.
///
/// Fused (one op forward, one backward; see the module doc) for contiguous
/// f32 / f64 CPU tensors with a bias of that shape; otherwise the
/// composition of differentiable candle ops. The bias gets no gradient on
/// the fused path (it is a constant mask, held by the op rather than taken
/// as an input); use [`attention_reference`] for a trainable bias.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    match fused_inputs(q, k, v, bias, Heads::Split)? {
        Some(bias) => q.apply_op3(
            k,
            v,
            AttentionOp {
                scale,
                bias,
                heads: Heads::Split,
            },
        ),
        None => composed(q, k, v, bias, scale, crate::nn::softmax_last_dim),
    }
}

/// [`attention`] on heads packed in the last dimension, as linear
/// projections produce them: head `h` is columns `h * D..(h + 1) * D`.
///
/// # Shapes
/// - `q`: `[B, Lq, H * D]`; `k`: `[B, Lk, H * D]`; `v`: `[B, Lk, H * Dv]`;
/// - `bias`: broadcastable to `[B, 1, 1, Lk]` (as for [`attention`]);
/// - output: `[B, Lq, H * Dv]`, the heads' outputs side by side.
///
/// Fused without any split or merge copy for contiguous f32 / f64 CPU
/// tensors (the bias then gets no gradient); otherwise the heads are split
/// out and [`attention`]'s composition runs.
pub fn attention_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let layout = Heads::Packed(heads);
    if let Some(bias) = fused_inputs(q, k, v, bias, layout)? {
        return q.apply_op3(
            k,
            v,
            AttentionOp {
                scale,
                bias,
                heads: layout,
            },
        );
    }
    let split = |t: &Tensor| -> Result<Tensor> {
        let (b, l, w) = t.dims3()?;
        if heads == 0 || w % heads != 0 {
            bail!("attention_packed: width {w} is not a multiple of {heads} heads");
        }
        t.reshape((b, l, heads, w / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    let ctx = composed(
        &split(q)?,
        &split(k)?,
        &split(v)?,
        bias,
        scale,
        crate::nn::softmax_last_dim,
    )?;
    let (b, _, lq, dv) = ctx.dims4()?;
    ctx.transpose(1, 2)?.reshape((b, lq, heads * dv))
}

/// [`attention`] as a composition of candle primitives (batched matmuls, a
/// broadcast add, candle-nn's softmax composition): any dtype, device or
/// layout, and a gradient for every input including the bias.
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    composed(q, k, v, bias, scale, crate::nn::softmax_last_dim_reference)
}

fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
    softmax: fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if let Some(bias) = bias {
        scores = scores.broadcast_add(bias)?;
    }
    softmax(&scores)?.matmul(v)
}

/// How q, k, v and the output hold their heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Heads {
    /// `[B, H, L, D]`: each head's `[L, D]` block is contiguous.
    Split,
    /// `[B, L, H * D]` with this many heads: head `h` is columns
    /// `h * D..(h + 1) * D` of every row.
    Packed(usize),
}

/// The sizes of one call: `b` batch entries of `h` heads, each head
/// `q [lq, d]`, `k [lk, d]`, `v [lk, dv]`, out `[lq, dv]`.
#[derive(Clone, Copy, Debug)]
struct Dims {
    heads: Heads,
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
}

impl Dims {
    /// The sizes from the shapes of q, k and v, `None` when they do not
    /// describe one attention call of `heads` layout.
    fn from_shapes(heads: Heads, q: &[usize], k: &[usize], v: &[usize]) -> Option<Self> {
        let dims = match (heads, q, k, v) {
            (Heads::Split, &[b, h, lq, d], &[kb, kh, lk, kd], &[vb, vh, vl, dv]) => {
                let fit = (kb, kh, kd) == (b, h, d) && (vb, vh, vl) == (b, h, lk);
                fit.then_some(Self {
                    heads,
                    b,
                    h,
                    lq,
                    lk,
                    d,
                    dv,
                })
            }
            (Heads::Packed(h), &[b, lq, qw], &[kb, lk, kw], &[vb, vl, vw]) => {
                let fit = h > 0
                    && qw % h == 0
                    && vw % h == 0
                    && (kb, kw) == (b, qw)
                    && (vb, vl) == (b, lk);
                fit.then_some(Self {
                    heads,
                    b,
                    h,
                    lq,
                    lk,
                    d: qw / h.max(1),
                    dv: vw / h.max(1),
                })
            }
            _ => None,
        }?;
        let Dims {
            b,
            h,
            lq,
            lk,
            d,
            dv,
            ..
        } = dims;
        (![b, h, lq, lk, d, dv].contains(&0)).then_some(dims)
    }

    fn of(heads: Heads, q: &Layout, k: &Layout, v: &Layout) -> Result<Self> {
        match Self::from_shapes(heads, q.dims(), k.dims(), v.dims()) {
            Some(dims) => Ok(dims),
            None => bail!("fused attention: q, k and v do not fit together"),
        }
    }

    /// Where head `h` of a batch entry's block of `rows x (H * width)`
    /// values starts, and its row stride.
    fn place(&self, h: usize, rows: usize, width: usize) -> (usize, usize) {
        match self.heads {
            Heads::Split => (h * rows * width, width),
            Heads::Packed(n) => (h * width, n * width),
        }
    }

    /// Whether the batch entries run in parallel, and the parallelism each
    /// product gets inside one entry.
    fn plan(&self) -> (bool, gemm::Parallelism) {
        let macs = self.b * self.h * self.lq * self.lk * (self.d + self.dv);
        let threads = rayon::current_num_threads();
        if macs < PAR_MIN_MACS || threads < 2 {
            (false, gemm::Parallelism::None)
        } else if self.b > 1 {
            (true, gemm::Parallelism::None)
        } else {
            (false, gemm::Parallelism::Rayon(threads))
        }
    }
}

/// `Some(bias as a contiguous [B, 1, 1, Lk] tensor, if any)` when the fused
/// op takes these inputs, `None` when the composition must run.
fn fused_inputs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    heads: Heads,
) -> Result<Option<Option<Tensor>>> {
    if !fusable(&[q, k, v]) {
        return Ok(None);
    }
    let Some(Dims { b, lk, .. }) = Dims::from_shapes(heads, q.dims(), k.dims(), v.dims()) else {
        return Ok(None);
    };
    let Some(bias) = bias else {
        return Ok(Some(None));
    };
    let bias_fits = bias.device().is_cpu()
        && bias.dtype() == q.dtype()
        && bias.rank() == 4
        && bias.dims()[1..3] == [1, 1]
        && [1, b].contains(&bias.dims()[0])
        && [1, lk].contains(&bias.dims()[3]);
    if !bias_fits {
        return Ok(None);
    }
    Ok(Some(Some(bias.broadcast_as((b, 1, 1, lk))?.contiguous()?)))
}

/// A matrix read through strides: `(i, t)` is at `data[i * rs + t * cs]`
/// (a transposed view swaps them).
#[derive(Clone, Copy)]
struct Mat<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// Rows `rs` apart with unit column stride, from the start of `data`.
    fn rows(data: &'a [T], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }

    fn t(self) -> Self {
        Self {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Whether `rows x cols` values through these strides stay inside.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `c[m, n] = beta * a[m, k] . b[k, n]`, `c`'s rows `ldc` apart.
///
/// `gemm` with `Parallelism::None` (or the pool, for a batch of one): at
/// one head's sizes it is several times faster than plain loops, and a
/// transposed or strided operand costs no copy, it is read through its
/// strides.
#[allow(clippy::too_many_arguments)]
fn matmul<T: Float>(
    (m, n, k): (usize, usize, usize),
    c: &mut [T],
    ldc: usize,
    a: Mat<T>,
    b: Mat<T>,
    beta: T,
    par: gemm::Parallelism,
) {
    let c_fits = m == 0 || n == 0 || (m - 1) * ldc + n <= c.len();
    // Callers cut every operand from a batch entry's block at the offsets
    // and strides of `Dims::place`, which lie inside it.
    debug_assert!(a.fits(m, k) && b.fits(k, n) && c_fits);
    // SAFETY: every pointer with its strides stays inside its slice (see
    // above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            false,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::zero(),
            beta,
            false,
            false,
            false,
            par,
        );
    }
}

/// `P = softmax(scale * q k^T + bias)` of one head into `p` (`[lq, lk]`).
fn probabilities<T: Float>(
    dims: &Dims,
    scale: T,
    (q, k): (Mat<T>, Mat<T>),
    bias: Option<&[T]>,
    p: &mut [T],
    par: gemm::Parallelism,
) {
    let Dims { lq, lk, d, .. } = *dims;
    matmul((lq, lk, d), p, lk, q, k.t(), scale, par);
    pulp::Arch::new().dispatch(SoftmaxRows { p, bias, lk });
}

/// Row softmax of `p` (rows of `lk`) after adding `bias` to every row.
struct SoftmaxRows<'a, T> {
    p: &'a mut [T],
    bias: Option<&'a [T]>,
    lk: usize,
}

impl<T: Float> pulp::WithSimd for SoftmaxRows<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        for row in self.p.chunks_exact_mut(self.lk) {
            if let Some(bias) = self.bias {
                for (s, &b) in row.iter_mut().zip(bias) {
                    *s += b;
                }
            }
            let max = max_of(row);
            for s in row.iter_mut() {
                *s = (*s - max).exp_();
            }
            let inv = T::one() / reduce(row, row, row, |a, _, _| a);
            for s in row.iter_mut() {
                *s *= inv;
            }
        }
    }
}

/// `dP <- P * (dP - rowsum(dP * P))` (the softmax backward), rows of `lk`.
struct SoftmaxBwdRows<'a, T> {
    p: &'a [T],
    dp: &'a mut [T],
    lk: usize,
}

impl<T: Float> pulp::WithSimd for SoftmaxBwdRows<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let rows = self
            .dp
            .chunks_exact_mut(self.lk)
            .zip(self.p.chunks_exact(self.lk));
        for (dp, p) in rows {
            let dot = reduce(dp, p, p, |g, y, _| g * y);
            for (g, &y) in dp.iter_mut().zip(p) {
                *g = y * (*g - dot);
            }
        }
    }
}

/// One call's inputs as slices, the bias as `[B, Lk]`.
struct Inputs<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    bias: Option<&'a [T]>,
}

/// Values per batch entry of q, k, v and the output.
fn block_sizes(dims: &Dims) -> (usize, usize, usize, usize) {
    let Dims {
        h, lq, lk, d, dv, ..
    } = *dims;
    (h * lq * d, h * lk * d, h * lk * dv, h * lq * dv)
}

/// One head's `q`, `k`, `v` and bias row.
struct Head<'a, T> {
    q: Mat<'a, T>,
    k: Mat<'a, T>,
    v: Mat<'a, T>,
    bias: Option<&'a [T]>,
}

impl<T: Float> Inputs<'_, T> {
    /// Head `h` of batch entry `bi`.
    fn head(&self, dims: &Dims, bi: usize, h: usize) -> Head<'_, T> {
        let Dims { lq, lk, d, dv, .. } = *dims;
        let (nq, nk, nv, _) = block_sizes(dims);
        let (qo, qrs) = dims.place(h, lq, d);
        let (ko, krs) = dims.place(h, lk, d);
        let (vo, vrs) = dims.place(h, lk, dv);
        Head {
            q: Mat::rows(&self.q[bi * nq..(bi + 1) * nq][qo..], qrs),
            k: Mat::rows(&self.k[bi * nk..(bi + 1) * nk][ko..], krs),
            v: Mat::rows(&self.v[bi * nv..(bi + 1) * nv][vo..], vrs),
            bias: self.bias.map(|b| &b[bi * lk..(bi + 1) * lk]),
        }
    }
}

fn forward<T: Float>(dims: &Dims, scale: f64, x: &Inputs<T>) -> Vec<T> {
    let Dims { lq, lk, dv, .. } = *dims;
    let scale = T::from_f64(scale);
    let (_, _, _, no) = block_sizes(dims);
    let (parallel, par) = dims.plan();
    let mut out = vec![T::zero(); dims.b * no];
    let entry = |p: &mut Vec<T>, (bi, o): (usize, &mut [T])| {
        for h in 0..dims.h {
            let Head { q, k, v, bias } = x.head(dims, bi, h);
            probabilities(dims, scale, (q, k), bias, p, par);
            let (oo, ors) = dims.place(h, lq, dv);
            matmul(
                (lq, dv, lk),
                &mut o[oo..],
                ors,
                Mat::rows(p, lk),
                v,
                T::one(),
                par,
            );
        }
    };
    let scratch = || vec![T::zero(); lq * lk];
    if parallel {
        out.par_chunks_mut(no)
            .enumerate()
            .for_each_init(scratch, entry);
    } else {
        let mut p = scratch();
        out.chunks_mut(no)
            .enumerate()
            .for_each(|c| entry(&mut p, c));
    }
    out
}

/// `[dq, dk, dv]` (each in its input's layout) flattened into one vector.
fn backward<T: Float>(dims: &Dims, scale: f64, x: &Inputs<T>, g: &[T]) -> Vec<T> {
    let Dims { lq, lk, d, dv, .. } = *dims;
    let scale = T::from_f64(scale);
    let (nq, nk, nv, no) = block_sizes(dims);
    let (parallel, par) = dims.plan();
    let mut out = vec![T::zero(); dims.b * (nq + nk + nv)];
    let (dq, rest) = out.split_at_mut(dims.b * nq);
    let (dk, dvs) = rest.split_at_mut(dims.b * nk);
    type Scratch<T> = (Vec<T>, Vec<T>);
    type Grads<'a, T> = (usize, ((&'a mut [T], &'a mut [T]), &'a mut [T]));
    let entry = |(p, dp): &mut Scratch<T>, (bi, ((dq, dk), dvb)): Grads<T>| {
        let go = &g[bi * no..(bi + 1) * no];
        for h in 0..dims.h {
            let Head { q, k, v, bias } = x.head(dims, bi, h);
            probabilities(dims, scale, (q, k), bias, p, par);
            let (oo, ors) = dims.place(h, lq, dv);
            let go = Mat::rows(&go[oo..], ors);
            let (qo, qrs) = dims.place(h, lq, d);
            let (ko, krs) = dims.place(h, lk, d);
            let (vo, vrs) = dims.place(h, lk, dv);
            // dV = P^T dO; dP = dO V^T
            let pm = Mat::rows(&p[..], lk);
            matmul((lk, dv, lq), &mut dvb[vo..], vrs, pm.t(), go, T::one(), par);
            matmul((lq, lk, dv), dp, lk, go, v.t(), T::one(), par);
            pulp::Arch::new().dispatch(SoftmaxBwdRows { p, dp, lk });
            // dQ = scale dS K; dK = scale dS^T Q
            let ds = Mat::rows(&dp[..], lk);
            matmul((lq, d, lk), &mut dq[qo..], qrs, ds, k, scale, par);
            matmul((lk, d, lq), &mut dk[ko..], krs, ds.t(), q, scale, par);
        }
    };
    let scratch = || (vec![T::zero(); lq * lk], vec![T::zero(); lq * lk]);
    if parallel {
        dq.par_chunks_mut(nq)
            .zip(dk.par_chunks_mut(nk))
            .zip(dvs.par_chunks_mut(nv))
            .enumerate()
            .for_each_init(scratch, entry);
    } else {
        let mut s = scratch();
        dq.chunks_mut(nq)
            .zip(dk.chunks_mut(nk))
            .zip(dvs.chunks_mut(nv))
            .enumerate()
            .for_each(|c| entry(&mut s, c));
    }
    out
}

/// The contiguous CPU elements of `t` (checked by [`fused_inputs`]).
fn with_slice<T: WithDType, R>(t: Option<&Tensor>, f: impl FnOnce(Option<&[T]>) -> R) -> Result<R> {
    let Some(t) = t else {
        return Ok(f(None));
    };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("fused attention: a tensor left the CPU");
    };
    Ok(f(Some(slice_of(cpu, layout)?)))
}

/// `(q, k, v) -> softmax(scale * q k^T + bias) v` per head; the bias
/// (contiguous `[B, 1, 1, Lk]`) is a field, not an input, so it gets no
/// gradient.
#[derive(Clone, Debug)]
struct AttentionOp {
    scale: f64,
    bias: Option<Tensor>,
    heads: Heads,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let dims = Dims::of(self.heads, l1, l2, l3)?;
        macro_rules! run {
            ($t:ty) => {{
                let (q, k, v) = (slice_of(s1, l1)?, slice_of(s2, l2)?, slice_of(s3, l3)?);
                let out = with_slice::<$t, _>(self.bias.as_ref(), |bias| {
                    forward(&dims, self.scale, &Inputs { q, k, v, bias })
                })?;
                <$t>::to_cpu_storage_owned(out)
            }};
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => run!(f32),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => run!(f64),
            _ => bail!("fused attention: q, k and v must all be f32 or all f64"),
        };
        let Dims { b, h, lq, dv, .. } = dims;
        let shape = match self.heads {
            Heads::Split => Shape::from((b, h, lq, dv)),
            Heads::Packed(_) => Shape::from((b, lq, h * dv)),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        if !fusable(&[q, k, v, &g]) {
            bail!("fused attention backward: inputs left the CPU or changed dtype");
        }
        let op = AttentionBwdOp {
            scale: self.scale,
            bias: self.bias.clone(),
            heads: self.heads,
            grad: g,
        };
        let flat = q.apply_op3_no_bwd(k, v, &op)?;
        let [dq, dk, dv] = split_flat(&flat, [q, k, v])?;
        Ok((dq, dk, dv))
    }
}

/// `(q, k, v) -> [dq, dk, dv]` (flat) for the upstream gradient `grad`.
struct AttentionBwdOp {
    scale: f64,
    bias: Option<Tensor>,
    heads: Heads,
    grad: Tensor,
}

impl CustomOp3 for AttentionBwdOp {
    fn name(&self) -> &'static str {
        "fused-attention-bwd"
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
        let dims = Dims::of(self.heads, l1, l2, l3)?;
        if self.grad.elem_count() != dims.b * block_sizes(&dims).3 {
            bail!("fused attention backward: the gradient does not match the output");
        }
        macro_rules! run {
            ($t:ty) => {{
                let (q, k, v) = (slice_of(s1, l1)?, slice_of(s2, l2)?, slice_of(s3, l3)?);
                let out = with_slice::<$t, _>(Some(&self.grad), |g| {
                    with_slice::<$t, _>(self.bias.as_ref(), |bias| {
                        let g = g.unwrap_or_default();
                        backward(&dims, self.scale, &Inputs { q, k, v, bias }, g)
                    })
                })??;
                <$t>::to_cpu_storage_owned(out)
            }};
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => run!(f32),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => run!(f64),
            _ => bail!("fused attention backward: q, k and v must all be f32 or all f64"),
        };
        let len = l1.shape().elem_count() + l2.shape().elem_count() + l3.shape().elem_count();
        Ok((out, Shape::from(len)))
    }
}
