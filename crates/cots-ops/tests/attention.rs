//! The fused attention op (`cots_ops::attention`) against its composition of
//! candle primitives (`cots_ops::attention_reference`), forward and the
//! gradients of q, k and v, on fresh random inputs in f64 (tight tolerance)
//! and f32, with and without a padding mask, at odd sizes that run on the
//! calling thread and at sizes split across rayon's pool; and the same for
//! `cots_ops::attention_packed`, which reads and writes heads packed in the
//! last dimension.

use candle_core::{DType, Device, IndexOp, Result, Tensor, Var};
use cots_ops::{attention, attention_packed, attention_reference};

mod common;

use common::{max_abs, randn, rel_err};

/// The additive key mask `[B, 1, 1, Lk]` that `attention_bias` makes: batch
/// entry `i` keeps its first `Lk - i` keys (entry 0 keeps all, the others
/// have partly masked rows), at least one.
fn padding_bias(b: usize, lk: usize, dtype: DType) -> Result<Tensor> {
    let mut v = vec![0f64; b * lk];
    for i in 0..b {
        let keep = lk.saturating_sub(i).max(1);
        for j in keep..lk {
            v[i * lk + j] = -1e9;
        }
    }
    Tensor::from_vec(v, (b, 1, 1, lk), &Device::Cpu)?.to_dtype(dtype)
}

/// Fused and reference on the same `q [b, h, lq, d]`, `k [b, h, lk, d]`,
/// `v [b, h, lk, dv]` with the same random upstream gradient; asserts the
/// outputs and the three input gradients agree within `tol`.
fn check(
    (b, h, lq, lk, d, dv): (usize, usize, usize, usize, usize, usize),
    masked: bool,
    packed: bool,
    dtype: DType,
    tol: f64,
) -> Result<()> {
    let q = Var::from_tensor(&randn(&[b, h, lq, d], dtype)?)?;
    let k = Var::from_tensor(&randn(&[b, h, lk, d], dtype)?)?;
    let v = Var::from_tensor(&randn(&[b, h, lk, dv], dtype)?)?;
    let bias = if masked {
        Some(padding_bias(b, lk, dtype)?)
    } else {
        None
    };
    let scale = 1.0 / (d as f64).sqrt();
    let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
    let y_ref = attention_reference(qt, kt, vt, bias.as_ref(), scale)?;
    let y = if packed {
        // The same heads packed side by side, `[B, L, H * D]`; the output
        // is split back into heads to compare.
        let pack = |t: &Tensor| -> Result<Tensor> {
            let (b, h, l, w) = t.dims4()?;
            t.transpose(1, 2)?.contiguous()?.reshape((b, l, h * w))
        };
        let y = attention_packed(&pack(qt)?, &pack(kt)?, &pack(vt)?, h, bias.as_ref(), scale)?;
        assert_eq!(y.dims(), [b, lq, h * dv]);
        y.reshape((b, lq, h, dv))?.transpose(1, 2)?
    } else {
        attention(qt, kt, vt, bias.as_ref(), scale)?
    };
    assert_eq!(y.dims(), [b, h, lq, dv]);
    let name = format!("[{b}, {h}, {lq}/{lk}, {d}/{dv}] masked={masked} packed={packed} {dtype:?}");
    let e = rel_err(&y, &y_ref)?;
    assert!(e <= tol, "{name}: forward error {e:e} > {tol:e}");

    let up = randn(y_ref.dims(), dtype)?;
    let grads = (&y * &up)?.sum_all()?.backward()?;
    let grads_ref = (&y_ref * &up)?.sum_all()?.backward()?;
    for (which, t) in [("q", qt), ("k", kt), ("v", vt)] {
        let g = grads.get(t).expect("fused op gave no gradient");
        let g_ref = grads_ref.get(t).expect("reference gave no gradient");
        assert!(max_abs(g_ref)? > 0.0, "{name}: d{which} is zero");
        let e = rel_err(g, g_ref)?;
        assert!(e <= tol, "{name}: d{which} error {e:e} > {tol:e}");
    }
    if masked {
        // Masked keys get exactly no weight, hence exactly zero dk and dv
        // (batch entry 1 keeps lk - 1 keys).
        for t in [kt, vt] {
            let g = grads.get(t).expect("gradient");
            let last = g.i((1, .., lk - 1, ..))?;
            assert_eq!(max_abs(&last)?, 0.0, "{name}: a masked key got a gradient");
        }
    }
    Ok(())
}

/// Odd sizes (L = 7, D = 5, H = 3): one thread.
const ODD: (usize, usize, usize, usize, usize, usize) = (2, 3, 7, 7, 5, 5);
/// Demo-like heads, enough work to be split over the pool.
const POOL: (usize, usize, usize, usize, usize, usize) = (4, 4, 33, 33, 16, 16);
/// Cross-attention shapes: fewer queries than keys, values wider than keys.
const CROSS: (usize, usize, usize, usize, usize, usize) = (3, 2, 5, 11, 4, 6);
/// One batch entry with enough work that each product is handed to the pool.
const ONE: (usize, usize, usize, usize, usize, usize) = (1, 4, 70, 70, 32, 32);

fn check_all(dtype: DType, tol: f64) -> Result<()> {
    for shape in [ODD, POOL, CROSS, ONE] {
        for masked in [false, true] {
            if masked && shape.0 < 2 {
                continue;
            }
            for packed in [false, true] {
                check(shape, masked, packed, dtype, tol)?;
            }
        }
    }
    Ok(())
}

#[test]
fn matches_reference_f64() -> Result<()> {
    check_all(DType::F64, 1e-12)
}

#[test]
fn matches_reference_f32() -> Result<()> {
    check_all(DType::F32, 2e-5)
}

#[test]
fn a_bias_shared_by_the_batch_broadcasts() -> Result<()> {
    let (b, h, l, d) = (3, 2, 6, 4);
    let q = randn(&[b, h, l, d], DType::F64)?;
    let k = randn(&[b, h, l, d], DType::F64)?;
    let v = randn(&[b, h, l, d], DType::F64)?;
    let bias = padding_bias(3, l, DType::F64)?.i(2..3)?;
    assert_eq!(bias.dims(), [1, 1, 1, l]);
    let y = attention(&q, &k, &v, Some(&bias), 0.5)?;
    let y_ref = attention_reference(&q, &k, &v, Some(&bias), 0.5)?;
    assert!(rel_err(&y, &y_ref)? < 1e-12);
    Ok(())
}

#[test]
fn packed_heads_must_divide_the_width() -> Result<()> {
    let x = randn(&[2, 3, 10], DType::F32)?;
    assert!(attention_packed(&x, &x, &x, 3, None, 1.0).is_err());
    assert!(attention_packed(&x, &x, &x, 0, None, 1.0).is_err());
    Ok(())
}

/// The fused path holds the bias as a constant (no gradient); strided
/// inputs fall back to the composition, which differentiates everything.
#[test]
fn fused_path_is_taken_for_contiguous_inputs_only() -> Result<()> {
    let (b, h, l, d) = (2, 2, 5, 3);
    let q = Var::from_tensor(&randn(&[b, h, l, d], DType::F64)?)?;
    let k = Var::from_tensor(&randn(&[b, h, l, d], DType::F64)?)?;
    let v = Var::from_tensor(&randn(&[b, h, l, d], DType::F64)?)?;
    let bias = Var::from_tensor(&padding_bias(b, l, DType::F64)?)?;
    let y = attention(
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        Some(&bias),
        0.5,
    )?;
    let grads = y.sum_all()?.backward()?;
    assert!(grads.get(q.as_tensor()).is_some());
    assert!(grads.get(bias.as_tensor()).is_none());
    let packed = Var::from_tensor(&randn(&[b, l, h * d], DType::F64)?)?;
    let p = packed.as_tensor();
    let y = attention_packed(p, p, p, h, Some(&bias), 0.5)?;
    let grads = y.sum_all()?.backward()?;
    assert!(grads.get(p).is_some());
    assert!(grads.get(bias.as_tensor()).is_none());

    // A transposed view of k: not contiguous, so the composition runs.
    let kt = Var::from_tensor(&randn(&[b, h, d, l], DType::F64)?)?;
    let k_view = kt.as_tensor().transpose(2, 3)?;
    assert!(!k_view.is_contiguous());
    let y = attention(q.as_tensor(), &k_view, v.as_tensor(), Some(&bias), 0.5)?;
    let y_ref = attention_reference(
        q.as_tensor(),
        &k_view.contiguous()?,
        v.as_tensor(),
        Some(&bias),
        0.5,
    )?;
    assert!(rel_err(&y, &y_ref)? < 1e-12);
    let grads = y.sum_all()?.backward()?;
    assert!(grads.get(kt.as_tensor()).is_some());
    assert!(grads.get(bias.as_tensor()).is_some());
    Ok(())
}
