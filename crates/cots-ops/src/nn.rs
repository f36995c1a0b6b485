//! Differentiable neural-network primitives.
//!
//! candle's `LayerNorm`, `softmax_last_dim` and `rms_norm` take fused paths that
//! have no backward: parameters before them get no gradient and nothing errors.
//! [`layer_norm`], [`softmax_last_dim`], [`gelu_erf`] and [`bias_gelu_erf`] run
//! the fused kernels of [`crate::fused`] (one op forward, one backward) on
//! contiguous f32 / f64 CPU tensors, and otherwise the compositions of
//! differentiable primitives kept here as `*_reference`, which are also what
//! the fused kernels are tested against.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Result, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::fused;

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
///
/// # Shapes
/// - `x`: `[..., D]`; `weight`, `bias`: `[D]`; output: same as `x`.
///
/// Fused for contiguous f32 / f64 CPU tensors; otherwise
/// [`layer_norm_reference`].
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dims().last().copied();
    let params_fit = d.is_some_and(|d| weight.dims() == [d] && bias.dims() == [d]);
    if params_fit && fused::fusable(&[x, weight, bias]) {
        fused::layer_norm(x, weight, bias, eps)
    } else {
        layer_norm_reference(x, weight, bias, eps)
    }
}

/// [`layer_norm`] as a composition of candle primitives (any dtype, device
/// or layout).
///
/// Statistics are computed in f32 (or f64 when `x` is f64) even for half inputs.
pub fn layer_norm_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let in_dtype = x.dtype();
    let compute = match in_dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let x = x.to_dtype(compute)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed
        .to_dtype(in_dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// Softmax over the last dimension, with a backward pass.
///
/// # Shapes
/// - `x`: `[..., D]`; output: same as `x`.
///
/// Fused for contiguous f32 / f64 CPU tensors; otherwise
/// [`softmax_last_dim_reference`].
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused::fusable(&[x]) {
        fused::softmax_last_dim(x)
    } else {
        softmax_last_dim_reference(x)
    }
}

/// [`softmax_last_dim`] as a composition of candle primitives.
pub fn softmax_last_dim_reference(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

/// Exact GELU, `x * Phi(x) = x / 2 * (1 + erf(x / sqrt 2))` (BERT, ViT).
///
/// Fused for contiguous f32 / f64 CPU tensors (f32 error function:
/// [`fused::erf_f32`]); otherwise candle's `gelu_erf`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if fused::fusable(&[x]) {
        fused::gelu_erf(x)
    } else {
        x.gelu_erf()
    }
}

/// [`gelu_erf`] as a composition of candle primitives whose backward passes
/// use exact constants (candle's own `gelu_erf` backward rounds
/// `1 / sqrt(2 pi)` to 0.398942).
pub fn gelu_erf_reference(x: &Tensor) -> Result<Tensor> {
    let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
    x * cdf?
}

/// `gelu_erf(x + bias)`, the bias add of a linear layer fused with its
/// activation.
///
/// # Shapes
/// - `x`: `[..., D]`; `bias`: `[D]`; output: same as `x`.
pub fn bias_gelu_erf(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let fits = x.dims().last().is_some_and(|&d| bias.dims() == [d]);
    if fits && fused::fusable(&[x, bias]) {
        fused::bias_gelu_erf(x, bias)
    } else {
        gelu_erf(&x.broadcast_add(bias)?)
    }
}

/// [`bias_gelu_erf`] as a composition of candle primitives.
pub fn bias_gelu_erf_reference(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    gelu_erf_reference(&x.broadcast_add(bias)?)
}

/// A seedable random generator shared by all dropout sites of a model.
///
/// Its state (seed and stream position) can be read and restored, so a
/// resumed training run draws exactly the masks the uninterrupted run would.
#[derive(Clone, Debug)]
pub struct SeededRng(Arc<Mutex<ChaCha8Rng>>);

/// The serialisable state of a [`SeededRng`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    pub seed: [u8; 32],
    pub word_pos: u128,
}

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(seed))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChaCha8Rng> {
        // A poisoned lock only means another thread panicked mid-draw; the
        // generator state itself is still a valid state.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> RngState {
        let rng = self.lock();
        RngState {
            seed: rng.get_seed(),
            word_pos: rng.get_word_pos(),
        }
    }

    pub fn restore(&self, state: RngState) {
        let mut rng = self.lock();
        *rng = ChaCha8Rng::from_seed(state.seed);
        rng.set_word_pos(state.word_pos);
    }

    /// `n` draws from U[0, 1).
    pub fn uniform(&self, n: usize) -> Vec<f32> {
        let mut rng = self.lock();
        (0..n).map(|_| rng.random::<f32>()).collect()
    }
}

/// Inverted dropout: zero each element with probability `p` and scale the rest
/// by `1 / (1 - p)`. Identity when `p == 0` or `rng` is `None` (evaluation).
pub fn dropout(x: &Tensor, p: f32, rng: Option<&SeededRng>) -> Result<Tensor> {
    let Some(rng) = rng else {
        return Ok(x.clone());
    };
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return x.zeros_like();
    }
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = rng
        .uniform(x.elem_count())
        .into_iter()
        .map(|u| if u >= p { scale } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn layer_norm_matches_formula_and_has_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 5), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, 5, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, 5, &dev)?)?;
        let y = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)?;
        let xs = x.to_vec2::<f64>()?;
        let (wv, bv) = (w.to_vec1::<f64>()?, b.to_vec1::<f64>()?);
        let ys = y.to_vec2::<f64>()?;
        for (row, yrow) in xs.iter().zip(&ys) {
            let mean = row.iter().sum::<f64>() / 5.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 5.0;
            for j in 0..5 {
                let want = (row[j] - mean) / (var + 1e-5).sqrt() * wv[j] + bv[j];
                assert!((want - yrow[j]).abs() < 1e-10, "{want} vs {}", yrow[j]);
            }
        }
        let grads = (y.sqr()?.sum_all()?).backward()?;
        for v in [&x, &w, &b] {
            let g = grads.get(v.as_tensor()).expect("gradient missing");
            assert!(g.abs()?.sum_all()?.to_scalar::<f64>()? > 0.0);
        }
        Ok(())
    }

    #[test]
    fn dropout_is_reproducible_from_saved_state() -> Result<()> {
        let x = Tensor::ones((4, 8), DType::F32, &Device::Cpu)?;
        let rng = SeededRng::new(7);
        let _ = dropout(&x, 0.5, Some(&rng))?;
        let saved = rng.state();
        let a = dropout(&x, 0.5, Some(&rng))?.to_vec2::<f32>()?;
        rng.restore(saved);
        let b = dropout(&x, 0.5, Some(&rng))?.to_vec2::<f32>()?;
        assert_eq!(a, b);
        let flat: Vec<f32> = a.into_iter().flatten().collect();
        assert!(flat.iter().all(|&v| v == 0.0 || v == 2.0));
        assert!(flat.contains(&0.0) && flat.contains(&2.0));
        assert_eq!(
            dropout(&x, 0.5, None)?.to_vec2::<f32>()?,
            x.to_vec2::<f32>()?
        );
        Ok(())
    }
}
