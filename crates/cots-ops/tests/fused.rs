//! The fused LayerNorm, softmax, GELU and bias + GELU kernels against their
//! compositions of candle primitives (`cots_ops::nn::*_reference`), forward
//! and backward (the gradient of every input), on fresh random inputs in f64
//! (tight tolerance) and f32, at shapes small enough to run on the calling
//! thread and large enough to be split across rayon's pool.

use candle_core::{DType, Device, Result, Tensor, Var};
use cots_ops::fused::{self, erf_f32};
use cots_ops::nn;

type Op = fn(&[Tensor]) -> Result<Tensor>;

/// Random normal input scaled by `scale` and shifted by `shift`.
fn randn(shape: &[usize], scale: f64, shift: f64, dtype: DType) -> Result<Tensor> {
    ((Tensor::randn(0f64, 1.0, shape, &Device::Cpu)? * scale)? + shift)?.to_dtype(dtype)
}

mod common;

use common::{max_abs, rel_err};

/// Runs `op` and `reference` on the same inputs with the same random
/// upstream gradient; checks the outputs and every input's gradient agree
/// within `tol`. Returns the largest error seen.
fn check(name: &str, op: Op, reference: Op, inputs: &[Tensor], tol: f64) -> Result<f64> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = op(&ts)?;
    let y_ref = reference(&ts)?;
    let up = randn(y_ref.dims(), 1.0, 0.0, y_ref.dtype())?;
    let grads = (&y * &up)?.sum_all()?.backward()?;
    let grads_ref = (&y_ref * &up)?.sum_all()?.backward()?;
    let mut worst = rel_err(&y, &y_ref)?;
    assert!(worst <= tol, "{name}: forward error {worst:e} > {tol:e}");
    for (i, t) in ts.iter().enumerate() {
        let g = grads.get(t).expect("fused op gave no gradient");
        let g_ref = grads_ref.get(t).expect("reference gave no gradient");
        assert!(
            max_abs(g_ref)? > 0.0,
            "{name}: input {i}'s reference gradient is zero"
        );
        let e = rel_err(g, g_ref)?;
        assert!(
            e <= tol,
            "{name}: gradient of input {i}: error {e:e} > {tol:e}"
        );
        worst = worst.max(e);
    }
    Ok(worst)
}

const EPS: f64 = 1e-5;

fn ln(t: &[Tensor]) -> Result<Tensor> {
    fused::layer_norm(&t[0], &t[1], &t[2], EPS)
}
fn ln_ref(t: &[Tensor]) -> Result<Tensor> {
    nn::layer_norm_reference(&t[0], &t[1], &t[2], EPS)
}
fn softmax(t: &[Tensor]) -> Result<Tensor> {
    fused::softmax_last_dim(&t[0])
}
fn softmax_ref(t: &[Tensor]) -> Result<Tensor> {
    nn::softmax_last_dim_reference(&t[0])
}
fn gelu(t: &[Tensor]) -> Result<Tensor> {
    fused::gelu_erf(&t[0])
}
fn gelu_ref(t: &[Tensor]) -> Result<Tensor> {
    nn::gelu_erf_reference(&t[0])
}
fn bias_gelu(t: &[Tensor]) -> Result<Tensor> {
    fused::bias_gelu_erf(&t[0], &t[1])
}
fn bias_gelu_ref(t: &[Tensor]) -> Result<Tensor> {
    nn::bias_gelu_erf_reference(&t[0], &t[1])
}

/// Tolerances: f64 agrees to rounding; f32 differs by summation order and
/// by `exp_f32` / `erf_f32` (a few ulp).
fn tol(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-12
    } else {
        2e-5
    }
}

/// Row shapes: one row, odd widths below and above the SIMD lane count,
/// the demo and base widths, and tensors over the parallel threshold.
const ROW_SHAPES: &[&[usize]] = &[
    &[1, 1],
    &[3, 7],
    &[2, 5, 33],
    &[64, 128],
    &[4, 65, 128],
    &[2, 197, 768],
    &[40, 3, 769],
];

#[test]
fn layer_norm_matches_reference() -> Result<()> {
    for dtype in [DType::F64, DType::F32] {
        for &shape in ROW_SHAPES {
            let d = shape[shape.len() - 1];
            // A shifted, scaled input checks the centred variance.
            for (scale, shift) in [(1.0, 0.0), (2.0, 3.0)] {
                let inputs = [
                    randn(shape, scale, shift, dtype)?,
                    randn(&[d], 1.0, 1.0, dtype)?,
                    randn(&[d], 1.0, 0.0, dtype)?,
                ];
                if d == 1 {
                    // A one-element row normalises to 0: only the bias
                    // has a gradient, so compare the forward pass alone.
                    let e = rel_err(&ln(&inputs)?, &ln_ref(&inputs)?)?;
                    assert!(e <= tol(dtype));
                    continue;
                }
                check(
                    &format!("layer_norm {dtype:?} {shape:?}"),
                    ln,
                    ln_ref,
                    &inputs,
                    tol(dtype),
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn softmax_matches_reference() -> Result<()> {
    let shapes: &[&[usize]] = &[
        &[1, 1],
        &[4, 7],
        &[2, 3, 65],
        &[4, 4, 65, 65],
        &[2, 12, 40, 197],
    ];
    for dtype in [DType::F64, DType::F32] {
        for &shape in shapes {
            let x = randn(shape, 3.0, 0.0, dtype)?;
            if shape[shape.len() - 1] == 1 {
                // A one-element row has softmax 1 and gradient exactly 0.
                assert_eq!(
                    rel_err(&softmax(std::slice::from_ref(&x))?, &softmax_ref(&[x])?)?,
                    0.0
                );
                continue;
            }
            check(
                &format!("softmax {dtype:?} {shape:?}"),
                softmax,
                softmax_ref,
                &[x],
                tol(dtype),
            )?;
        }
    }
    Ok(())
}

#[test]
fn softmax_gives_exact_zeros_under_an_attention_mask() -> Result<()> {
    for dtype in [DType::F64, DType::F32] {
        let x = randn(&[6, 10], 1.0, 0.0, dtype)?;
        let mask = Tensor::new(
            &[0f64, 0., 0., -1e9, 0., -1e9, 0., 0., 0., -1e9],
            &Device::Cpu,
        )?
        .to_dtype(dtype)?;
        let y = fused::softmax_last_dim(&x.broadcast_add(&mask)?)?.to_dtype(DType::F64)?;
        for row in y.to_vec2::<f64>()? {
            for j in [3, 5, 9] {
                assert_eq!(row[j], 0.0, "{dtype:?}: masked column {j} is {}", row[j]);
            }
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-6);
        }
    }
    Ok(())
}

#[test]
fn gelu_matches_reference() -> Result<()> {
    let shapes: &[&[usize]] = &[&[1], &[3, 7, 33], &[2, 65, 512], &[70_001]];
    for dtype in [DType::F64, DType::F32] {
        for &shape in shapes {
            // Scale 3 reaches the tails where erf saturates.
            let x = randn(shape, 3.0, 0.0, dtype)?;
            check(
                &format!("gelu {dtype:?} {shape:?}"),
                gelu,
                gelu_ref,
                &[x],
                tol(dtype),
            )?;
        }
    }
    Ok(())
}

#[test]
fn bias_gelu_matches_reference() -> Result<()> {
    for dtype in [DType::F64, DType::F32] {
        for &shape in ROW_SHAPES {
            let d = shape[shape.len() - 1];
            let inputs = [
                randn(shape, 2.0, 0.0, dtype)?,
                randn(&[d], 1.0, 0.0, dtype)?,
            ];
            check(
                &format!("bias_gelu {dtype:?} {shape:?}"),
                bias_gelu,
                bias_gelu_ref,
                &inputs,
                tol(dtype),
            )?;
        }
    }
    Ok(())
}

/// The public functions: fused on contiguous f32 / f64 CPU tensors (the same
/// bits as the fused op), the composition on strided views and half types,
/// with gradients either way.
#[test]
fn public_functions_dispatch_and_fall_back() -> Result<()> {
    let x = randn(&[6, 32], 1.0, 0.0, DType::F32)?;
    let (w, b) = (
        randn(&[32], 1.0, 1.0, DType::F32)?,
        randn(&[32], 1.0, 0.0, DType::F32)?,
    );
    let same = |a: &Tensor, b: &Tensor| -> Result<bool> { Ok(rel_err(a, b)? == 0.0) };
    assert!(same(
        &nn::layer_norm(&x, &w, &b, EPS)?,
        &fused::layer_norm(&x, &w, &b, EPS)?
    )?);
    assert!(same(
        &nn::softmax_last_dim(&x)?,
        &fused::softmax_last_dim(&x)?
    )?);
    assert!(same(&nn::gelu_erf(&x)?, &fused::gelu_erf(&x)?)?);
    assert!(same(
        &nn::bias_gelu_erf(&x, &b)?,
        &fused::bias_gelu_erf(&x, &b)?
    )?);

    // A transposed view is not contiguous: the composition runs.
    let xt = Var::from_tensor(&randn(&[32, 6], 1.0, 0.0, DType::F64)?)?;
    let view = xt.as_tensor().t()?;
    assert!(!fused::fusable(&[&view]));
    let (w, b) = (w.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let y = nn::layer_norm(&view, &w, &b, EPS)?;
    let y_ref = nn::layer_norm_reference(&view.contiguous()?, &w, &b, EPS)?;
    assert!(rel_err(&y, &y_ref)? < 1e-12);
    let s = nn::softmax_last_dim(&view)?;
    let g = nn::gelu_erf(&view)?;
    let grads = ((y.sum_all()? + s.sqr()?.sum_all()?)? + g.sum_all()?)?.backward()?;
    assert!(max_abs(grads.get(xt.as_tensor()).expect("no gradient"))? > 0.0);

    // Half precision takes the composition.
    let h = x.to_dtype(DType::BF16)?;
    assert!(!fused::fusable(&[&h]));
    assert_eq!(nn::softmax_last_dim(&h)?.dtype(), DType::BF16);
    Ok(())
}

/// `erf_f32` and the f32 GELU and its derivative against f64 on a dense grid
/// over [-12, 12] (every f32 input is exact in f64, so the f64 value is the
/// truth up to 1e-16).
#[test]
fn erf_f32_is_accurate() -> Result<()> {
    let n = 2_400_001;
    let xs: Vec<f32> = (0..n)
        .map(|i| (-12.0 + 24.0 * i as f64 / (n - 1) as f64) as f32)
        .collect();
    let mut worst_erf = 0f64;
    for &x in &xs {
        let truth = candle_core::cpu::erf::erf_f64(f64::from(x));
        worst_erf = worst_erf.max((f64::from(erf_f32(x)) - truth).abs());
    }
    let t = Tensor::new(xs.as_slice(), &Device::Cpu)?;
    let var = Var::from_tensor(&t)?;
    let y = fused::gelu_erf(var.as_tensor())?;
    let dy = y.sum_all()?.backward()?;
    let dy = dy
        .get(var.as_tensor())
        .expect("no gradient")
        .to_vec1::<f32>()?;
    let y = y.to_vec1::<f32>()?;
    let (mut worst_gelu, mut worst_grad) = (0f64, 0f64);
    for ((&x, &y), &dy) in xs.iter().zip(&y).zip(&dy) {
        let x = f64::from(x);
        let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x * std::f64::consts::FRAC_1_SQRT_2));
        let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        // Relative to max(1, |x|): the f32 rounding of x * Phi(x) itself.
        worst_gelu = worst_gelu.max((f64::from(y) - x * cdf).abs() / x.abs().max(1.0));
        worst_grad = worst_grad.max((f64::from(dy) - (cdf + x * pdf)).abs());
    }
    println!("max |erf_f32 - erf|: {worst_erf:e}; gelu: {worst_gelu:e} (/max(1,|x|)); gelu': {worst_grad:e}");
    // Measured: 1.6e-7, 1.4e-7 and 1.8e-7 (about 3 f32 ulp of values near 1).
    assert!(worst_erf < 2.5e-7, "erf_f32 error {worst_erf:e}");
    assert!(worst_gelu < 2.5e-7, "gelu f32 error {worst_gelu:e}");
    assert!(worst_grad < 3e-7, "gelu' f32 error {worst_grad:e}");
    // NaN and the infinities.
    assert!(erf_f32(f32::NAN).is_nan());
    assert_eq!(erf_f32(f32::INFINITY), 1.0);
    assert_eq!(erf_f32(f32::NEG_INFINITY), -1.0);
    assert_eq!(erf_f32(0.0), 0.0);
    Ok(())
}
