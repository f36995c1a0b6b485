//! A linear layer, `y = x W^T + b`, as one candle custom op forward and one
//! backward on the CPU.
//!
//! candle-nn's `Linear` already folds `[B, L, in]` into one `[B * L, in]`
//! product (and candle's matmul backward gives `dW` as one product), but the
//! bias stays a separate broadcast add: a second pass over the output
//! forward, and in the backward a reduction over the batch plus the
//! zero-fill and add that candle's backprop spends on every node's
//! gradient. At the demo model's sizes (`[32 * 65, 128]` outputs) those
//! small full passes cost about as much as the product. Here the output
//! starts as the bias, repeated over rows, and `gemm` accumulates `x W^T`
//! into it; the backward gives `dx = g W`, `dW = g^T x` (two products) and
//! `db` = the column sums of `g`, from one op.
//!
//! Threads: each product hands rayon's pool to `gemm`, as candle's matmul
//! does, when it is large enough to split.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType, D};

use crate::fused::{fusable, split_flat, Float};
use crate::queue_fused::slice_of;

/// Multiply-adds below which a product runs on the calling thread.
const PAR_MIN_MACS: usize = 64 * 64 * 64;

/// `x W^T + b` over the last dimension of `x`.
///
/// # Shapes
/// - `x`: `[..., in]`; `weight`: `[out, in]`; `bias`: `[out]`;
/// - output: `[..., out]`.
///
/// Fused (one op forward, one backward) for contiguous f32 / f64 CPU
/// tensors with a bias; otherwise [`linear_reference`] (which is also
/// candle-nn's `Linear` for these shapes).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let Some(b) = bias else {
        return linear_reference(x, weight, None);
    };
    let (out, inp) = match weight.dims() {
        &[out, inp] => (out, inp),
        _ => return linear_reference(x, weight, bias),
    };
    let fits = x.rank() >= 1
        && x.dim(D::Minus1)? == inp
        && b.dims() == [out]
        && x.elem_count() > 0
        && out > 0;
    if fits && fusable(&[x, weight, b]) {
        x.apply_op3(weight, b, LinearOp)
    } else {
        linear_reference(x, weight, bias)
    }
}

/// [`linear`] as candle primitives: the input folded to rows, one matmul
/// with the transposed weight, a broadcast bias add.
pub fn linear_reference(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (&inp, lead) = match x.dims().split_last() {
        Some(split) => split,
        None => bail!("linear: the input is a scalar"),
    };
    let rows = lead.iter().product::<usize>();
    let y = x.reshape((rows, inp))?.matmul(&weight.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut shape = lead.to_vec();
    shape.push(weight.dim(0)?);
    y.reshape(shape)
}

/// `c[m, n] (+)= a . b` with `a`, `b` and `c` given by (row, column)
/// strides; `accumulate` adds to `c` instead of overwriting it.
#[allow(clippy::too_many_arguments)]
fn matmul<T: Float>(
    (m, n, k): (usize, usize, usize),
    c: &mut [T],
    a: &[T],
    (a_rs, a_cs): (usize, usize),
    b: &[T],
    (b_rs, b_cs): (usize, usize),
    accumulate: bool,
) {
    let within = |len: usize, rs: usize, cs: usize, rows: usize, cols: usize| {
        rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len
    };
    // The callers pass whole row-major matrices of exactly these sizes.
    debug_assert!(
        within(a.len(), a_rs, a_cs, m, k) && within(b.len(), b_rs, b_cs, k, n) && c.len() >= m * n
    );
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k >= PAR_MIN_MACS {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every pointer with its strides stays inside its slice (see
    // above); `c` is m x n row-major.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        );
    }
}

/// `y[rows, out] = b + x[rows, inp] . w[out, inp]^T`.
fn forward<T: Float>(x: &[T], w: &[T], b: &[T], inp: usize) -> Vec<T> {
    let out = b.len();
    let rows = x.len() / inp;
    let mut y = Vec::with_capacity(rows * out);
    for _ in 0..rows {
        y.extend_from_slice(b);
    }
    matmul((rows, out, inp), &mut y, x, (inp, 1), w, (1, inp), true);
    y
}

/// `[dx (rows x inp), dw (out x inp), db (out)]`, one flat vector.
fn backward<T: Float>(x: &[T], w: &[T], g: &[T], inp: usize, out: usize) -> Vec<T> {
    let rows = x.len() / inp;
    let (nx, nw) = (rows * inp, out * inp);
    let mut res = vec![T::zero(); nx + nw + out];
    let (dx, rest) = res.split_at_mut(nx);
    let (dw, db) = rest.split_at_mut(nw);
    // dx = g . w; dw = g^T . x
    matmul((rows, inp, out), dx, g, (out, 1), w, (inp, 1), false);
    matmul((out, inp, rows), dw, g, (1, out), x, (inp, 1), false);
    // db: column sums of g, accumulated in f64 row by row.
    let mut sums = vec![0f64; out];
    for row in g.chunks_exact(out) {
        for (s, v) in sums.iter_mut().zip(row) {
            *s += v.to_f64();
        }
    }
    for (d, s) in db.iter_mut().zip(sums) {
        *d = T::from_f64(s);
    }
    res
}

/// `(x [..., in], weight [out, in], bias [out]) -> x W^T + b`.
#[derive(Clone, Copy, Debug)]
struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
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
        let (&[out, inp], &[bn]) = (l2.dims(), l3.dims()) else {
            bail!("fused linear: weight must be [out, in] and bias [out]");
        };
        if l1.dims().last() != Some(&inp) || bn != out {
            bail!("fused linear: input, weight and bias do not fit together");
        }
        let y = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                f32::to_cpu_storage_owned(forward::<f32>(
                    slice_of(s1, l1)?,
                    slice_of(s2, l2)?,
                    slice_of(s3, l3)?,
                    inp,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                f64::to_cpu_storage_owned(forward::<f64>(
                    slice_of(s1, l1)?,
                    slice_of(s2, l2)?,
                    slice_of(s3, l3)?,
                    inp,
                ))
            }
            _ => bail!("fused linear: inputs must all be f32 or all f64"),
        };
        let mut shape = l1.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = out;
        }
        Ok((y, Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        if !fusable(&[x, w, &g]) {
            bail!("fused linear backward: inputs left the CPU or changed dtype");
        }
        let flat = x.apply_op3_no_bwd(w, &g, &LinearBwdOp)?;
        let [dx, dw, db] = split_flat(&flat, [x, w, b])?;
        Ok((dx, dw, db))
    }
}

/// `(x, weight, grad) -> [dx, dweight, dbias]`, one flat vector.
struct LinearBwdOp;

impl CustomOp3 for LinearBwdOp {
    fn name(&self) -> &'static str {
        "fused-linear-bwd"
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
        let &[out, inp] = l2.dims() else {
            bail!("fused linear backward: weight must be [out, in]");
        };
        let rows = l1.shape().elem_count() / inp.max(1);
        if l3.shape().elem_count() != rows * out {
            bail!("fused linear backward: the gradient does not match the output");
        }
        let res = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                f32::to_cpu_storage_owned(backward::<f32>(
                    slice_of(s1, l1)?,
                    slice_of(s2, l2)?,
                    slice_of(s3, l3)?,
                    inp,
                    out,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                f64::to_cpu_storage_owned(backward::<f64>(
                    slice_of(s1, l1)?,
                    slice_of(s2, l2)?,
                    slice_of(s3, l3)?,
                    inp,
                    out,
                ))
            }
            _ => bail!("fused linear backward: inputs must all be f32 or all f64"),
        };
        Ok((res, Shape::from(rows * inp + out * inp + out)))
    }
}
