//! Helpers shared by the integration tests of the encoders.
#![allow(dead_code)]

use candle_core::{DType, Tensor};
use candle_nn::VarMap;

pub type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Back-propagates `loss` and checks that every variable of `vm` receives
/// a finite, non-zero gradient (a module that cuts the graph fails here).
pub fn assert_all_grads(vm: &VarMap, loss: &Tensor) -> TestResult {
    let grads = loss.backward()?;
    let vars = vm.data().lock().map_err(|_| "poisoned")?;
    assert!(!vars.is_empty());
    let mut missing = Vec::new();
    for (name, var) in vars.iter() {
        match grads.get(var.as_tensor()) {
            None => missing.push(format!("{name}: no gradient")),
            Some(g) => {
                let g = g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                if g.iter().any(|v| !v.is_finite()) {
                    missing.push(format!("{name}: non-finite gradient"));
                } else if g.iter().all(|&v| v == 0.0) {
                    missing.push(format!("{name}: zero gradient"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "variables without a usable gradient: {missing:#?}"
    );
    Ok(())
}

/// Token id rows padded with 0 to `len`, and their attention mask.
///
/// # Shapes
/// - outputs `[texts.len(), len]` u32 each.
pub fn pad_batch(texts: &[&[u32]], len: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for t in texts {
        ids.extend(
            t.iter()
                .copied()
                .chain(std::iter::repeat_n(0, len - t.len())),
        );
        mask.extend((0..len).map(|j| u32::from(j < t.len())));
    }
    let dev = candle_core::Device::Cpu;
    Ok((
        Tensor::from_vec(ids, (texts.len(), len), &dev)?,
        Tensor::from_vec(mask, (texts.len(), len), &dev)?,
    ))
}
