//! Shared helpers of the integration tests: seeded random inputs, plain-Rust
//! references and finite differences.
#![allow(dead_code)]

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};

pub type Mat = Vec<Vec<f64>>;

pub fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// `rows` random unit vectors of width `dim`.
pub fn unit_rows(r: &mut impl Rng, rows: usize, dim: usize) -> Mat {
    (0..rows)
        .map(|_| {
            let v: Vec<f64> = (0..dim).map(|_| r.random::<f64>() * 2.0 - 1.0).collect();
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.into_iter().map(|x| x / n).collect()
        })
        .collect()
}

pub fn random_mat(r: &mut impl Rng, rows: usize, cols: usize) -> Mat {
    (0..rows)
        .map(|_| (0..cols).map(|_| r.random::<f64>() * 2.0 - 1.0).collect())
        .collect()
}

pub fn tensor(m: &Mat) -> Tensor {
    let (r, c) = (m.len(), m[0].len());
    Tensor::from_vec(m.concat(), (r, c), &Device::Cpu).expect("tensor")
}

pub fn var(m: &Mat) -> Var {
    Var::from_tensor(&tensor(m)).expect("var")
}

pub fn mat(t: &Tensor) -> Mat {
    t.to_vec2::<f64>().expect("f64 matrix")
}

pub fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().expect("f64 scalar")
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub fn lse(v: &[f64]) -> f64 {
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

pub fn log_softmax(v: &[f64]) -> Vec<f64> {
    let l = lse(v);
    v.iter().map(|x| x - l).collect()
}

/// `sum_i w_i x_i / sum_i w_i`.
pub fn wmean(x: &[f64], w: Option<&[f64]>) -> f64 {
    match w {
        None => x.iter().sum::<f64>() / x.len() as f64,
        Some(w) => dot(x, w) / w.iter().sum::<f64>(),
    }
}

/// Central finite differences of `f` at `p`.
pub fn fd_grad(p: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let h = 1e-6;
    (0..p.len())
        .map(|i| {
            let mut a = p.to_vec();
            let mut b = p.to_vec();
            a[i] += h;
            b[i] -= h;
            (f(&a) - f(&b)) / (2.0 * h)
        })
        .collect()
}

/// Splits a flat vector into a `rows x cols` matrix.
pub fn unflat(p: &[f64], rows: usize, cols: usize) -> Mat {
    (0..rows)
        .map(|r| p[r * cols..(r + 1) * cols].to_vec())
        .collect()
}

pub fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

/// Gradient of `t` in `grads` flattened, zeros when absent.
pub fn grad_of(grads: &candle_core::backprop::GradStore, t: &Tensor) -> Vec<f64> {
    match grads.get(t) {
        Some(g) => g
            .flatten_all()
            .and_then(|g| g.to_vec1::<f64>())
            .expect("grad"),
        None => vec![0.0; t.elem_count()],
    }
}
