//! Helpers shared by the fused-op tests: random inputs and the error
//! measure against a reference.

use candle_core::{DType, Device, Result, Tensor};

/// Standard normal values of `shape`, drawn in f64 and cast to `dtype`.
#[allow(dead_code)]
pub fn randn(shape: &[usize], dtype: DType) -> Result<Tensor> {
    Tensor::randn(0f64, 1.0, shape, &Device::Cpu)?.to_dtype(dtype)
}

pub fn max_abs(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar()
}

/// Largest `|a - b| / (1 + max|b|)` over the tensor.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims());
    Ok(max_abs(&(a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?)? / (1.0 + max_abs(b)?))
}
