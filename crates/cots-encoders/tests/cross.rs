//! The single-stream cross-encoder: every variable trains, padding and
//! batching do not change a pair's score, and the score depends on both
//! sides of the pair.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cots_encoders::cross::{self, match_score, CrossEncoder};
use cots_ops::SeededRng;

mod common;

use common::{assert_all_grads, pad_batch, TestResult};

fn model(dropout: f64) -> Result<(VarMap, CrossEncoder), Box<dyn std::error::Error>> {
    let mut cfg = cross::Config::tiny(40);
    cfg.joint.hidden_dropout_prob = dropout;
    cfg.joint.attention_probs_dropout_prob = dropout;
    let vm = VarMap::new();
    let m = CrossEncoder::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    Ok((vm, m))
}

fn pixels(b: usize, seed: u64) -> candle_core::Result<Tensor> {
    let cfg = cross::Config::tiny(40);
    let n = b * 3 * cfg.image_size * cfg.image_size;
    let rng = SeededRng::new(seed);
    let v: Vec<f32> = rng.uniform(n).into_iter().map(|u| 2.0 * u - 1.0).collect();
    Tensor::from_vec(v, (b, 3, cfg.image_size, cfg.image_size), &Device::Cpu)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

#[test]
fn every_variable_gets_a_gradient() -> TestResult {
    let (vm, m) = model(0.1)?;
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[2u32, 7, 9, 11, 3], [2, 13, 3, 0, 0]], &dev)?;
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &dev)?;
    let rng = SeededRng::new(3);
    let logits = m.forward(&ids, &mask, &pixels(2, 1)?, Some(&rng))?;
    assert_eq!(logits.dims(), &[2, 2]);
    let labels = Tensor::new(&[1u32, 0], &dev)?;
    let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
    assert!(vm.all_vars().len() > 10);
    assert_all_grads(&vm, &loss)?;
    Ok(())
}

#[test]
fn padding_and_batching_do_not_change_a_pairs_score() -> TestResult {
    let (_vm, m) = model(0.0)?;
    let dev = Device::Cpu;
    let img = pixels(3, 7)?;
    let texts: [&[u32]; 3] = [&[2, 5, 6, 3], &[2, 9, 3], &[2, 11, 12, 13, 14, 3]];
    // One pair at a time, no padding at all.
    let mut alone = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        let ids = Tensor::new(*t, &dev)?.unsqueeze(0)?;
        let mask = Tensor::ones_like(&ids)?;
        let logits = m.forward(&ids, &mask, &img.narrow(0, i, 1)?, None)?;
        alone.push(match_score(&logits)?.to_vec1::<f32>()?[0]);
    }
    // All three in one batch, padded to 8 tokens.
    let (ids, mask) = pad_batch(&texts, 8)?;
    let batched = match_score(&m.forward(&ids, &mask, &img, None)?)?;
    let alone = Tensor::new(alone.as_slice(), &dev)?;
    assert!(max_abs_diff(&batched, &alone)? < 1e-4);
    // Splitting the work into embed + joint gives the same logits.
    let t = m.embed_text(&ids, None)?;
    let i = m.embed_image(&img, None)?;
    let split = match_score(&m.joint(&t, &mask, &i, None)?)?;
    assert!(max_abs_diff(&split, &batched)? == 0.0);
    Ok(())
}

#[test]
fn the_score_depends_on_both_the_image_and_the_text() -> TestResult {
    let (_vm, m) = model(0.0)?;
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[2u32, 5, 6, 3], [2, 5, 6, 3], [2, 8, 9, 3]], &dev)?;
    let mask = Tensor::ones_like(&ids)?;
    let a = pixels(1, 1)?;
    let b = pixels(1, 2)?;
    let img = Tensor::cat(&[&a, &b, &a], 0)?;
    let s = match_score(&m.forward(&ids, &mask, &img, None)?)?.to_vec1::<f32>()?;
    assert!((s[0] - s[1]).abs() > 1e-6, "image ignored: {s:?}");
    assert!((s[0] - s[2]).abs() > 1e-6, "text ignored: {s:?}");
    Ok(())
}

#[test]
fn bad_shapes_and_configs_are_errors() -> TestResult {
    let (_vm, m) = model(0.0)?;
    let dev = Device::Cpu;
    let wrong = Tensor::zeros((1, 3, 16, 16), DType::F32, &dev)?;
    let err = m.embed_image(&wrong, None).unwrap_err().to_string();
    assert!(err.contains("expects images"), "{err}");
    let mut cfg = cross::Config::tiny(40);
    cfg.patch_size = 7;
    let vm = VarMap::new();
    let err = CrossEncoder::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))
        .unwrap_err()
        .to_string();
    assert!(err.contains("multiple of patch_size"), "{err}");
    // The base preset really is the like-for-like size of the comparison.
    let base = cross::Config::base();
    assert_eq!(
        (
            base.joint.hidden_size,
            base.joint.num_hidden_layers,
            base.num_patches()
        ),
        (768, 12, 196)
    );
    Ok(())
}
