//! Fused CPU kernels, with a backward pass, for the per-row ops of a
//! transformer block: LayerNorm and softmax over the last dimension, the
//! exact (erf) GELU, and bias + GELU.
//!
//! The compositions in [`crate::nn`] (the references these kernels are tested
//! against) run five to ten candle ops per call, each a full pass over memory
//! with its own allocation and broadcast, and candle's `gelu_erf` calls the
//! scalar `libm::erff` per element. Here every op is one candle custom op in
//! the forward pass and one in the backward pass; each works on whole rows
//! that stay in L1 while they are read several times:
//! - LayerNorm saves nothing: its backward recomputes the row's mean and
//!   `1 / std` and gives `dx`, `dweight` and `dbias` from one kernel;
//! - softmax's backward is `y * (g - sum(g * y))` from its own output;
//! - GELU's backward is `g * gelu'(x)` from its input.
//!
//! The f32 loops are written lane by lane and compiled once per instruction
//! set by `pulp` (AVX-512, AVX2), as in [`crate::queue_fused`]; f32
//! exponentials use [`exp_f32`] and the error function [`erf_f32`], both
//! branch-free so that they vectorise. f64 runs the same loops with the
//! standard library's `exp` and libm's `erf` (the tests' tight tolerance).
//!
//! Threads: work is split into blocks of whole rows of about
//! [`BLOCK_ELEMS`] elements, run on rayon's global pool when the tensor has
//! at least [`PAR_MIN_ELEMS`] elements. candle's CPU matmul hands its gemm
//! calls to the same pool, so the two never run more threads than the pool
//! has. Blocks are fixed by the shape, not by the thread count, and partial
//! sums across blocks (the LayerNorm parameter gradients) are added in block
//! order, so results do not depend on the number of threads.
//!
//! The public entry points live in [`crate::nn`]; they take these kernels for
//! contiguous f32 / f64 CPU tensors and the composition otherwise (other
//! dtypes, other devices, strided views).

use std::ops::Neg;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
    WithDType,
};
use rayon::prelude::*;

pub use crate::queue_fused::exp_f32;
use crate::queue_fused::slice_of;

/// Elements per block of rows (one unit of parallel work).
pub const BLOCK_ELEMS: usize = 16 * 1024;
/// Tensors smaller than this run on the calling thread.
pub const PAR_MIN_ELEMS: usize = 64 * 1024;
/// Accumulator lanes of the row reductions (one AVX-512 register of f32).
const LANES: usize = 16;

/// The element types the kernels run in.
pub trait Float: WithDType + Neg<Output = Self> {
    /// `e^x`, exactly 0 where the true value underflows.
    fn exp_(self) -> Self;
    fn sqrt_(self) -> Self;
    fn erf_(self) -> Self;
}

impl Float for f64 {
    #[inline(always)]
    fn exp_(self) -> f64 {
        self.exp()
    }
    #[inline(always)]
    fn sqrt_(self) -> f64 {
        self.sqrt()
    }
    #[inline(always)]
    fn erf_(self) -> f64 {
        candle_core::cpu::erf::erf_f64(self)
    }
}

impl Float for f32 {
    #[inline(always)]
    fn exp_(self) -> f32 {
        // `exp_f32` clamps at -87 (about 1.6e-38); masked attention scores
        // (-1e9) must give exactly 0, as the composition does.
        let e = exp_f32(self);
        if self < -87.0 {
            0.0
        } else {
            e
        }
    }
    #[inline(always)]
    fn sqrt_(self) -> f32 {
        self.sqrt()
    }
    #[inline(always)]
    fn erf_(self) -> f32 {
        erf_f32(self)
    }
}

/// The error function in f32, branch-free so that loops over it vectorise.
///
/// `|x| < 1`: the Maclaurin series to `x^25` (truncation below 1e-11).
/// Otherwise `1 - erfc(|x|)` with the Chebyshev fit of Numerical Recipes
/// (`erfcc`, relative error of `erfc` below 1.2e-7), whose exponential is
/// [`exp_f32`]. Measured against f64 `erf` on a dense grid (test
/// `erf_f32_is_accurate`, 2.4M points on [-12, 12]): max absolute error
/// 1.6e-7, about 3 f32 ulp of values near 1 (libm's scalar `erff`: 1 ulp).
/// NaN stays NaN.
// The erfcc coefficients are kept as published (their f32 roundings are the
// same values).
#[allow(clippy::excessive_precision)]
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let z = x.abs();
    // Series: 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1)), n <= 12.
    let z2 = z * z;
    let mut s = 1.0 / 11_975_040_000.0f32;
    s = s * z2 - 1.0 / 918_086_400.0;
    s = s * z2 + 1.0 / 76_204_800.0;
    s = s * z2 - 1.0 / 6_894_720.0;
    s = s * z2 + 1.0 / 685_440.0;
    s = s * z2 - 1.0 / 75_600.0;
    s = s * z2 + 1.0 / 9_360.0;
    s = s * z2 - 1.0 / 1_320.0;
    s = s * z2 + 1.0 / 216.0;
    s = s * z2 - 1.0 / 42.0;
    s = s * z2 + 1.0 / 10.0;
    s = s * z2 - 1.0 / 3.0;
    s = s * z2 + 1.0;
    let small = std::f32::consts::FRAC_2_SQRT_PI * z * s;
    // Numerical Recipes' erfcc; beyond |x| = 10 erfc is 0 in f32.
    let zc = z.min(10.0);
    let t = 1.0 / (1.0 + 0.5 * zc);
    let mut p = 0.170_872_77f32;
    p = p * t - 0.822_152_23;
    p = p * t + 1.488_515_87;
    p = p * t - 1.135_203_98;
    p = p * t + 0.278_868_07;
    p = p * t - 0.186_288_06;
    p = p * t + 0.096_784_18;
    p = p * t + 0.374_091_96;
    p = p * t + 1.000_023_68;
    p = p * t - 1.265_512_23;
    let large = 1.0 - t * exp_f32(p - zc * zc);
    let r = if z < 1.0 { small } else { large };
    if x.is_nan() {
        x
    } else {
        r.copysign(x)
    }
}

/// `x * Phi(x)`: GELU with the exact normal CDF.
#[inline(always)]
fn gelu<T: Float>(x: T) -> T {
    let half = T::from_f64(0.5);
    half * x * (T::one() + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf_())
}

/// `d/dx [x * Phi(x)] = Phi(x) + x * phi(x)`.
#[inline(always)]
fn gelu_grad<T: Float>(x: T) -> T {
    let half = T::from_f64(0.5);
    let cdf = half * (T::one() + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf_());
    // 1 / sqrt(2 pi)
    let pdf = T::from_f64(0.398_942_280_401_432_7) * (-(half * x * x)).exp_();
    cdf + x * pdf
}

// ---------------------------------------------------------------------------
// Row reductions with LANES independent accumulators (float addition is not
// associative, so LLVM vectorises a reduction only when it is written so).

#[inline(always)]
pub(crate) fn reduce<T: Float>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> T) -> T {
    let mut acc = [T::zero(); LANES];
    let chunks = a
        .chunks_exact(LANES)
        .zip(b.chunks_exact(LANES))
        .zip(c.chunks_exact(LANES));
    for ((a, b), c) in chunks {
        for l in 0..LANES {
            acc[l] += f(a[l], b[l], c[l]);
        }
    }
    let full = a.len() - a.len() % LANES;
    let mut s = T::zero();
    for ((&a, &b), &c) in a[full..].iter().zip(&b[full..]).zip(&c[full..]) {
        s += f(a, b, c);
    }
    for v in acc {
        s += v;
    }
    s
}

#[inline(always)]
pub(crate) fn max_of<T: Float>(a: &[T]) -> T {
    let ninf = T::from_f64(f64::NEG_INFINITY);
    let mut acc = [ninf; LANES];
    for c in a.chunks_exact(LANES) {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let full = a.len() - a.len() % LANES;
    a[full..]
        .iter()
        .chain(&acc)
        .fold(ninf, |m, &x| if x > m { x } else { m })
}

/// The row's mean and `1 / sqrt(var + eps)` (two passes: the centred sum of
/// squares does not cancel as `E[x^2] - E[x]^2` does).
#[inline(always)]
fn ln_stats<T: Float>(x: &[T], eps: f64) -> (T, T) {
    let n = T::from_f64(x.len() as f64);
    let mean = reduce(x, x, x, |a, _, _| a) / n;
    let var = reduce(x, x, x, |a, _, _| (a - mean) * (a - mean)) / n;
    (mean, T::one() / (var + T::from_f64(eps)).sqrt_())
}

// ---------------------------------------------------------------------------
// The block driver.

/// Work on one block of whole rows: `out` is the block's slice of the
/// output, starting at row `first_row`.
trait Kernel: Sync {
    type Elem: Float;
    type Partial: Send;
    fn rows(&self, first_row: usize, out: &mut [Self::Elem]) -> Self::Partial;
}

struct Dispatch<'a, K: Kernel>(&'a K, usize, &'a mut [K::Elem]);

impl<K: Kernel> pulp::WithSimd for Dispatch<'_, K> {
    type Output = K::Partial;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> K::Partial {
        self.0.rows(self.1, self.2)
    }
}

/// Runs `k` over `out` in blocks of whole rows of length `d`, in parallel
/// when `out` is large; the blocks' partial results come back in order.
fn run_blocks<K: Kernel>(k: &K, out: &mut [K::Elem], d: usize) -> Vec<K::Partial> {
    if out.is_empty() || d == 0 {
        return Vec::new();
    }
    let rows_per_block = (BLOCK_ELEMS / d).max(1);
    let block = rows_per_block * d;
    let arch = pulp::Arch::new();
    let run =
        |(i, chunk): (usize, &mut [K::Elem])| arch.dispatch(Dispatch(k, i * rows_per_block, chunk));
    if out.len() >= PAR_MIN_ELEMS && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(block).enumerate().map(run).collect()
    } else {
        out.chunks_mut(block).enumerate().map(run).collect()
    }
}

fn last_dim(l: &Layout) -> Result<usize> {
    match l.dims().last() {
        Some(&d) => Ok(d),
        None => bail!("fused ops need at least one dimension"),
    }
}

/// Splits the flat output of a fused backward op (the gradients of several
/// inputs, one after the other) into one tensor per input, each with that
/// input's shape.
pub(crate) fn split_flat<const N: usize>(
    flat: &Tensor,
    like: [&Tensor; N],
) -> Result<[Option<Tensor>; N]> {
    let mut start = 0;
    let mut out: [Option<Tensor>; N] = std::array::from_fn(|_| None);
    for (slot, t) in out.iter_mut().zip(like) {
        let n = t.elem_count();
        *slot = Some(flat.narrow(0, start, n)?.reshape(t.shape())?);
        start += n;
    }
    Ok(out)
}

/// Whether the fused kernels take these tensors: all on the CPU, all f32 or
/// all f64, all contiguous, none a scalar.
pub fn fusable(ts: &[&Tensor]) -> bool {
    let Some(first) = ts.first() else {
        return false;
    };
    let dtype = first.dtype();
    matches!(dtype, DType::F32 | DType::F64)
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == dtype && t.is_contiguous() && t.rank() > 0)
}

// ---------------------------------------------------------------------------
// LayerNorm.

struct LnFwd<'a, T> {
    x: &'a [T],
    w: &'a [T],
    b: &'a [T],
    d: usize,
    eps: f64,
}

impl<T: Float> Kernel for LnFwd<'_, T> {
    type Elem = T;
    type Partial = ();

    #[inline(always)]
    fn rows(&self, first: usize, out: &mut [T]) {
        let d = self.d;
        for (r, y) in out.chunks_exact_mut(d).enumerate() {
            let x = &self.x[(first + r) * d..(first + r + 1) * d];
            let (mean, rstd) = ln_stats(x, self.eps);
            for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(self.w).zip(self.b) {
                *y = (x - mean) * rstd * w + b;
            }
        }
    }
}

struct LnBwd<'a, T> {
    x: &'a [T],
    w: &'a [T],
    g: &'a [T],
    d: usize,
    eps: f64,
}

impl<T: Float> Kernel for LnBwd<'_, T> {
    type Elem = T;
    /// The block's sums of `dweight` and `dbias`.
    type Partial = (Vec<T>, Vec<T>);

    #[inline(always)]
    fn rows(&self, first: usize, out: &mut [T]) -> (Vec<T>, Vec<T>) {
        let d = self.d;
        let n = T::from_f64(d as f64);
        let mut dw = vec![T::zero(); d];
        let mut db = vec![T::zero(); d];
        for (r, dx) in out.chunks_exact_mut(d).enumerate() {
            let span = (first + r) * d..(first + r + 1) * d;
            let (x, g) = (&self.x[span.clone()], &self.g[span]);
            let (mean, rstd) = ln_stats(x, self.eps);
            // With gh = g * w and xhat = (x - mean) * rstd:
            // dx = rstd * (gh - mean(gh) - xhat * mean(gh * xhat)).
            let mean_gh = reduce(g, self.w, x, |g, w, _| g * w) / n;
            let mean_ghx = reduce(g, self.w, x, |g, w, x| g * w * (x - mean)) * rstd / n;
            let rows = dx.iter_mut().zip(x).zip(g).zip(self.w);
            for ((((dx, &x), &g), &w), (dw, db)) in rows.zip(dw.iter_mut().zip(db.iter_mut())) {
                let xhat = (x - mean) * rstd;
                *dx = rstd * (g * w - mean_gh - xhat * mean_ghx);
                *dw += g * xhat;
                *db += g;
            }
        }
        (dw, db)
    }
}

/// `(x, weight, bias) -> LayerNorm(x)` over the last dimension.
#[derive(Clone, Copy, Debug)]
pub struct LayerNormOp {
    pub eps: f64,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let d = last_dim(l1)?;
        if l2.shape().elem_count() != d || l3.shape().elem_count() != d {
            bail!("fused layer_norm: weight and bias must have {d} elements");
        }
        macro_rules! run {
            ($t:ty) => {{
                let k = LnFwd::<$t> {
                    x: slice_of(s1, l1)?,
                    w: slice_of(s2, l2)?,
                    b: slice_of(s3, l3)?,
                    d,
                    eps: self.eps,
                };
                let mut out = vec![0 as $t; k.x.len()];
                run_blocks(&k, &mut out, d);
                <$t>::to_cpu_storage_owned(out)
            }};
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => run!(f32),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => run!(f64),
            _ => bail!("fused layer_norm: inputs must all be f32 or all f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        if !fusable(&[x, w, &g]) {
            bail!("fused layer_norm backward: inputs left the CPU or changed dtype");
        }
        let flat = x.apply_op3_no_bwd(w, &g, &LayerNormBwdOp { eps: self.eps })?;
        let [dx, dw, db] = split_flat(&flat, [x, w, w])?;
        Ok((dx, dw, db))
    }
}

/// `(x, weight, grad) -> [dx (flat), dweight, dbias]`, one flat vector.
struct LayerNormBwdOp {
    eps: f64,
}

impl LayerNormBwdOp {
    fn run<T: Float>(&self, x: &[T], w: &[T], g: &[T], d: usize) -> Vec<T> {
        let n = x.len();
        let mut out = vec![T::zero(); n + 2 * d];
        let (dx, params) = out.split_at_mut(n);
        let k = LnBwd {
            x,
            w,
            g,
            d,
            eps: self.eps,
        };
        let partials = run_blocks(&k, dx, d);
        // Block sums are added in block order, in f64.
        let mut sums = vec![0f64; 2 * d];
        for (pw, pb) in &partials {
            for (s, v) in sums.iter_mut().zip(pw.iter().chain(pb)) {
                *s += v.to_f64();
            }
        }
        for (p, s) in params.iter_mut().zip(sums) {
            *p = T::from_f64(s);
        }
        out
    }
}

impl CustomOp3 for LayerNormBwdOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm-bwd"
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
        let d = last_dim(l1)?;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                f32::to_cpu_storage_owned(self.run::<f32>(
                    slice_of(s1, l1)?,
                    slice_of(s2, l2)?,
                    slice_of(s3, l3)?,
                    d,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                f64::to_cpu_storage_owned(self.run::<f64>(
                    slice_of(s1, l1)?,
                    slice_of(s2, l2)?,
                    slice_of(s3, l3)?,
                    d,
                ))
            }
            _ => bail!("fused layer_norm backward: inputs must all be f32 or all f64"),
        };
        let len = l1.shape().elem_count() + 2 * d;
        Ok((out, Shape::from(len)))
    }
}

/// LayerNorm over the last dimension as one fused op (callers check
/// [`fusable`]; [`crate::nn::layer_norm`] does).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    x.apply_op3(weight, bias, LayerNormOp { eps })
}

// ---------------------------------------------------------------------------
// Softmax over the last dimension.

struct SoftmaxFwd<'a, T> {
    x: &'a [T],
    d: usize,
}

impl<T: Float> Kernel for SoftmaxFwd<'_, T> {
    type Elem = T;
    type Partial = ();

    #[inline(always)]
    fn rows(&self, first: usize, out: &mut [T]) {
        let d = self.d;
        for (r, y) in out.chunks_exact_mut(d).enumerate() {
            let x = &self.x[(first + r) * d..(first + r + 1) * d];
            let max = max_of(x);
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x - max).exp_();
            }
            let inv = T::one() / reduce(y, y, y, |a, _, _| a);
            for y in y.iter_mut() {
                *y *= inv;
            }
        }
    }
}

struct SoftmaxBwd<'a, T> {
    y: &'a [T],
    g: &'a [T],
    d: usize,
}

impl<T: Float> Kernel for SoftmaxBwd<'_, T> {
    type Elem = T;
    type Partial = ();

    #[inline(always)]
    fn rows(&self, first: usize, out: &mut [T]) {
        let d = self.d;
        for (r, dx) in out.chunks_exact_mut(d).enumerate() {
            let span = (first + r) * d..(first + r + 1) * d;
            let (y, g) = (&self.y[span.clone()], &self.g[span]);
            let dot = reduce(g, y, y, |g, y, _| g * y);
            for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                *dx = y * (g - dot);
            }
        }
    }
}

/// Softmax over the last dimension.
#[derive(Clone, Copy, Debug)]
pub struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l)?;
        macro_rules! run {
            ($t:ty) => {{
                let k = SoftmaxFwd::<$t> {
                    x: slice_of(s, l)?,
                    d,
                };
                let mut out = vec![0 as $t; k.x.len()];
                run_blocks(&k, &mut out, d);
                <$t>::to_cpu_storage_owned(out)
            }};
        }
        let out = match s {
            CpuStorage::F32(_) => run!(f32),
            CpuStorage::F64(_) => run!(f64),
            _ => bail!("fused softmax: input must be f32 or f64"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        let y = y.contiguous()?;
        Ok(Some(y.apply_op2_no_bwd(&g, &SoftmaxBwdOp)?))
    }
}

/// `(y, grad) -> y * (grad - sum(grad * y))`.
struct SoftmaxBwdOp;

impl CustomOp2 for SoftmaxBwdOp {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l1)?;
        macro_rules! run {
            ($t:ty) => {{
                let k = SoftmaxBwd::<$t> {
                    y: slice_of(s1, l1)?,
                    g: slice_of(s2, l2)?,
                    d,
                };
                let mut out = vec![0 as $t; k.y.len()];
                run_blocks(&k, &mut out, d);
                <$t>::to_cpu_storage_owned(out)
            }};
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => run!(f32),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => run!(f64),
            _ => bail!("fused softmax backward: inputs must both be f32 or both f64"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Softmax over the last dimension as one fused op (callers check
/// [`fusable`]; [`crate::nn::softmax_last_dim`] does).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.apply_op1(SoftmaxOp)
}

// ---------------------------------------------------------------------------
// GELU and bias + GELU. Elementwise work is cut into "rows" of BLOCK_ELEMS.

/// `out = gelu(x + bias)` (`bias` broadcast over rows of `d`; no bias when
/// `bias` is empty), or with `g`, `out = g * gelu'(x + bias)`; the partial
/// result is the block's sum of `out` over rows (the bias gradient).
struct Gelu<'a, T> {
    x: &'a [T],
    bias: &'a [T],
    g: Option<&'a [T]>,
    d: usize,
}

impl<T: Float> Kernel for Gelu<'_, T> {
    type Elem = T;
    type Partial = Vec<T>;

    #[inline(always)]
    fn rows(&self, first: usize, out: &mut [T]) -> Vec<T> {
        let d = self.d;
        let span = first * d..first * d + out.len();
        let x = &self.x[span.clone()];
        match (self.g, self.bias.is_empty()) {
            (None, true) => {
                for (y, &x) in out.iter_mut().zip(x) {
                    *y = gelu(x);
                }
                Vec::new()
            }
            (None, false) => {
                for (y, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                    for ((y, &x), &b) in y.iter_mut().zip(x).zip(self.bias) {
                        *y = gelu(x + b);
                    }
                }
                Vec::new()
            }
            (Some(g), true) => {
                for ((dx, &x), &g) in out.iter_mut().zip(x).zip(&g[span]) {
                    *dx = g * gelu_grad(x);
                }
                Vec::new()
            }
            (Some(g), false) => {
                let mut db = vec![T::zero(); d];
                let rows = out.chunks_exact_mut(d).zip(x.chunks_exact(d));
                for ((dx, x), g) in rows.zip(g[span].chunks_exact(d)) {
                    let cols = dx.iter_mut().zip(x).zip(g).zip(self.bias);
                    for ((((dx, &x), &g), &b), db) in cols.zip(db.iter_mut()) {
                        *dx = g * gelu_grad(x + b);
                        *db += *dx;
                    }
                }
                db
            }
        }
    }
}

fn run_gelu<T: Float>(x: &[T], bias: &[T], g: Option<&[T]>, d: usize) -> Vec<T> {
    let with_db = g.is_some() && !bias.is_empty();
    let d = if bias.is_empty() { BLOCK_ELEMS } else { d };
    let mut out = vec![T::zero(); x.len() + if with_db { bias.len() } else { 0 }];
    let (main, db) = out.split_at_mut(x.len());
    let k = Gelu { x, bias, g, d };
    let partials = run_blocks(&k, main, d);
    if with_db {
        let mut sums = vec![0f64; bias.len()];
        for p in &partials {
            for (s, v) in sums.iter_mut().zip(p) {
                *s += v.to_f64();
            }
        }
        for (o, s) in db.iter_mut().zip(sums) {
            *o = T::from_f64(s);
        }
    }
    out
}

/// Exact GELU, `x * Phi(x)`.
#[derive(Clone, Copy, Debug)]
pub struct GeluErfOp;

impl CustomOp1 for GeluErfOp {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => {
                f32::to_cpu_storage_owned(run_gelu::<f32>(slice_of(s, l)?, &[], None, 0))
            }
            CpuStorage::F64(_) => {
                f64::to_cpu_storage_owned(run_gelu::<f64>(slice_of(s, l)?, &[], None, 0))
            }
            _ => bail!("fused gelu: input must be f32 or f64"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&g, &GeluBwdOp)?))
    }
}

/// `(x, grad) -> grad * gelu'(x)`.
struct GeluBwdOp;

impl CustomOp2 for GeluBwdOp {
    fn name(&self) -> &'static str {
        "fused-gelu-erf-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => f32::to_cpu_storage_owned(run_gelu::<f32>(
                slice_of(s1, l1)?,
                &[],
                Some(slice_of(s2, l2)?),
                0,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => f64::to_cpu_storage_owned(run_gelu::<f64>(
                slice_of(s1, l1)?,
                &[],
                Some(slice_of(s2, l2)?),
                0,
            )),
            _ => bail!("fused gelu backward: inputs must both be f32 or both f64"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Exact GELU as one fused op (callers check [`fusable`];
/// [`crate::nn::gelu_erf`] does).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.apply_op1(GeluErfOp)
}

/// `(x [..., D], bias [D]) -> gelu(x + bias)`.
#[derive(Clone, Copy, Debug)]
pub struct BiasGeluErfOp;

impl CustomOp2 for BiasGeluErfOp {
    fn name(&self) -> &'static str {
        "fused-bias-gelu-erf"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l1)?;
        if l2.shape().elem_count() != d {
            bail!("fused bias_gelu: bias must have {d} elements");
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => f32::to_cpu_storage_owned(run_gelu::<f32>(
                slice_of(s1, l1)?,
                slice_of(s2, l2)?,
                None,
                d,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => f64::to_cpu_storage_owned(run_gelu::<f64>(
                slice_of(s1, l1)?,
                slice_of(s2, l2)?,
                None,
                d,
            )),
            _ => bail!("fused bias_gelu: inputs must both be f32 or both f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let flat = x.apply_op3_no_bwd(bias, &g, &BiasGeluBwdOp)?;
        let [dx, db] = split_flat(&flat, [x, bias])?;
        Ok((dx, db))
    }
}

/// `(x, bias, grad) -> [dx (flat), dbias]`.
struct BiasGeluBwdOp;

impl CustomOp3 for BiasGeluBwdOp {
    fn name(&self) -> &'static str {
        "fused-bias-gelu-erf-bwd"
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
        let d = last_dim(l1)?;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                f32::to_cpu_storage_owned(run_gelu::<f32>(
                    slice_of(s1, l1)?,
                    slice_of(s2, l2)?,
                    Some(slice_of(s3, l3)?),
                    d,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                f64::to_cpu_storage_owned(run_gelu::<f64>(
                    slice_of(s1, l1)?,
                    slice_of(s2, l2)?,
                    Some(slice_of(s3, l3)?),
                    d,
                ))
            }
            _ => bail!("fused bias_gelu backward: inputs must all be f32 or all f64"),
        };
        Ok((out, Shape::from(l1.shape().elem_count() + d)))
    }
}

/// `gelu(x + bias)` as one fused op (callers check [`fusable`];
/// [`crate::nn::bias_gelu_erf`] does).
pub fn bias_gelu_erf(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.apply_op2(bias, BiasGeluErfOp)
}
