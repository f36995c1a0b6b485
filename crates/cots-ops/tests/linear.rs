//! The fused linear op (`cots_ops::linear`) against its composition of
//! candle primitives (`cots_ops::linear_reference`), forward and the
//! gradients of the input, weight and bias, on fresh random inputs in f64
//! (tight tolerance) and f32, for 1-, 2- and 3-dimensional inputs at sizes
//! below and above the point where the products go to rayon's pool.

use candle_core::{DType, Result, Var};
use cots_ops::{linear, linear_reference};

mod common;

use common::{max_abs, randn, rel_err};

fn check(x_shape: &[usize], out: usize, dtype: DType, tol: f64) -> Result<()> {
    let inp = *x_shape.last().expect("rank >= 1");
    let x = Var::from_tensor(&randn(x_shape, dtype)?)?;
    let w = Var::from_tensor(&randn(&[out, inp], dtype)?)?;
    let b = Var::from_tensor(&randn(&[out], dtype)?)?;
    let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
    let y = linear(xt, wt, Some(bt))?;
    let y_ref = linear_reference(xt, wt, Some(bt))?;
    let mut want = x_shape.to_vec();
    *want.last_mut().expect("rank >= 1") = out;
    assert_eq!(y.dims(), want.as_slice());
    let name = format!("{x_shape:?} -> {out} {dtype:?}");
    let e = rel_err(&y, &y_ref)?;
    assert!(e <= tol, "{name}: forward error {e:e} > {tol:e}");
    let up = randn(y_ref.dims(), dtype)?;
    let grads = (&y * &up)?.sum_all()?.backward()?;
    let grads_ref = (&y_ref * &up)?.sum_all()?.backward()?;
    for (which, t) in [("x", xt), ("weight", wt), ("bias", bt)] {
        let g = grads.get(t).expect("fused op gave no gradient");
        let g_ref = grads_ref.get(t).expect("reference gave no gradient");
        assert!(max_abs(g_ref)? > 0.0, "{name}: d{which} is zero");
        let e = rel_err(g, g_ref)?;
        assert!(e <= tol, "{name}: d{which} error {e:e} > {tol:e}");
    }
    Ok(())
}

const SHAPES: [(&[usize], usize); 4] = [
    (&[7], 5),
    (&[3, 7], 5),
    (&[2, 5, 3], 11),
    // 2 x 65 x 96 -> 80: products large enough for the pool.
    (&[2, 65, 96], 80),
];

#[test]
fn matches_reference_f64() -> Result<()> {
    for (shape, out) in SHAPES {
        check(shape, out, DType::F64, 1e-12)?;
    }
    Ok(())
}

#[test]
fn matches_reference_f32() -> Result<()> {
    for (shape, out) in SHAPES {
        check(shape, out, DType::F32, 1e-5)?;
    }
    Ok(())
}

#[test]
fn without_bias_or_with_a_strided_input_it_is_the_composition() -> Result<()> {
    let x = randn(&[4, 6], DType::F64)?;
    let w = randn(&[3, 6], DType::F64)?;
    let b = randn(&[3], DType::F64)?;
    let y = linear(&x, &w, None)?;
    assert!(rel_err(&y, &x.matmul(&w.t()?)?)? < 1e-12);
    // A transposed view is not contiguous: the composition runs.
    let xt = randn(&[6, 4], DType::F64)?.t()?;
    assert!(!xt.is_contiguous());
    let y = linear(&xt, &w, Some(&b))?;
    let want = xt.contiguous()?.matmul(&w.t()?)?.broadcast_add(&b)?;
    assert!(rel_err(&y, &want)? < 1e-12);
    // Mismatched sizes are errors, not panics.
    assert!(linear(&x, &randn(&[3, 5], DType::F64)?, Some(&b)).is_err());
    Ok(())
}
