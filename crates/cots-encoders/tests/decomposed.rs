//! VLDeformer's decomposition: the decomposed encoders start from the
//! cross-encoder's exact weights, each side runs on its own modality only
//! (a text's embedding is the stack on `[CLS] text [SEP]`, an image's the
//! stack on `[CLS] [SEP] patches`, whatever else is in the batch), padding
//! does not move a text, and every trainable variable gets a gradient.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cots_encoders::cross::{self, CrossEncoder};
use cots_encoders::decomposed::{self, Decomposed, Pooling};
use cots_encoders::two_stream::l2_normalize;
use cots_encoders::weights::load_tensors;
use cots_ops::SeededRng;

mod common;

use common::{assert_all_grads, pad_batch, TestResult};
const CLS: u32 = 2;
const SEP: u32 = 3;

fn pixels(b: usize, seed: u64) -> candle_core::Result<Tensor> {
    let s = cross::Config::tiny(40).image_size;
    let rng = SeededRng::new(seed);
    let v: Vec<f32> = rng
        .uniform(b * 3 * s * s)
        .into_iter()
        .map(|u| 2.0 * u - 1.0)
        .collect();
    Tensor::from_vec(v, (b, 3, s, s), &Device::Cpu)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

fn tensors(vm: &VarMap) -> HashMap<String, Tensor> {
    let data = vm.data().lock().expect("lock");
    data.iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

/// A random cross-encoder and a decomposition of it, weights loaded.
fn decomposed(
    pooling: Pooling,
    dropout: f64,
) -> Result<(VarMap, CrossEncoder, VarMap, Decomposed), Box<dyn std::error::Error>> {
    let mut ccfg = cross::Config::tiny(40);
    ccfg.joint.hidden_dropout_prob = dropout;
    ccfg.joint.attention_probs_dropout_prob = dropout;
    let dev = Device::Cpu;
    let cvm = VarMap::new();
    let ce = CrossEncoder::new(&ccfg, VarBuilder::from_varmap(&cvm, DType::F32, &dev))?;
    let mut dcfg = decomposed::Config::new(&ccfg, 24, CLS, SEP);
    dcfg.pooling = pooling;
    let dvm = VarMap::new();
    let d = Decomposed::new(&dcfg, VarBuilder::from_varmap(&dvm, DType::F32, &dev))?;
    let report = load_tensors(
        &dvm,
        &tensors(&cvm),
        "cross.safetensors".as_ref(),
        "joint.",
        &[],
    )?;
    // Only the matching head is left over.
    assert!(
        report
            .unexpected
            .iter()
            .all(|k| k.starts_with("pooler.") || k.starts_with("itm_head.")),
        "{:?}",
        report.unexpected
    );
    Ok((cvm, ce, dvm, d))
}

#[test]
fn the_decomposed_stack_is_the_cross_encoders_stack_bit_for_bit() -> TestResult {
    let (cvm, _ce, dvm, _d) = decomposed(Pooling::Mean, 0.0)?;
    let (src, dst) = (tensors(&cvm), tensors(&dvm));
    let mut shared = 0;
    for (name, t) in &src {
        if name.starts_with("pooler.") || name.starts_with("itm_head.") {
            continue;
        }
        let d = dst
            .get(&format!("joint.{name}"))
            .ok_or_else(|| format!("joint.{name} is missing"))?;
        assert_eq!(d.dims(), t.dims(), "{name}");
        let (a, b) = (
            t.flatten_all()?.to_vec1::<f32>()?,
            d.flatten_all()?.to_vec1::<f32>()?,
        );
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} differs"
        );
        shared += 1;
    }
    assert!(shared > 10);
    // Beyond the stack the decomposition adds only its projections and temperature.
    let extra: Vec<&String> = dst.keys().filter(|k| !k.starts_with("joint.")).collect();
    assert_eq!(extra.len(), 5, "{extra:?}");
    Ok(())
}

#[test]
fn each_side_is_the_shared_stack_on_its_own_modality() -> TestResult {
    for pooling in [Pooling::Mean, Pooling::Cls] {
        let (_cvm, ce, dvm, d) = decomposed(pooling, 0.0)?;
        let dev = Device::Cpu;
        let stack = ce.transformer();
        let proj = |side: &str, pooled: &Tensor| -> Result<Tensor, Box<dyn std::error::Error>> {
            let w = tensors(&dvm);
            let lin = candle_nn::Linear::new(
                w[&format!("{side}_proj.weight")].clone(),
                Some(w[&format!("{side}_proj.bias")].clone()),
            );
            Ok(l2_normalize(&lin.forward(pooled)?)?)
        };
        let pool = |h: &Tensor| -> candle_core::Result<Tensor> {
            match pooling {
                Pooling::Cls => h.narrow(1, 0, 1)?.squeeze(1),
                Pooling::Mean => h.mean(1),
            }
        };
        // Texts: one at a time, unpadded, through the cross-encoder's own
        // stack, against the decomposed text encoder on a padded batch.
        let texts: [&[u32]; 3] = [
            &[CLS, 5, 6, SEP],
            &[CLS, 9, SEP],
            &[CLS, 11, 12, 13, 14, SEP],
        ];
        let (ids, mask) = pad_batch(&texts, 9)?;
        let batch = d.encode_text(&ids, &mask, None)?;
        for (i, t) in texts.iter().enumerate() {
            let one = Tensor::new(*t, &dev)?.unsqueeze(0)?;
            let h = stack.encode(
                &stack.embed_text(&one, None)?,
                &Tensor::ones_like(&one)?,
                None,
            )?;
            let want = proj("text", &pool(&h)?)?;
            let err = max_abs_diff(&batch.narrow(0, i, 1)?, &want)?;
            assert!(err < 1e-5, "{pooling:?} text {i}: {err}");
        }
        // Images: the stack on an empty caption followed by the patches,
        // one image at a time, against the batched image encoder.
        let img = pixels(3, 11)?;
        let batch = d.encode_image(&img, None)?;
        for i in 0..3 {
            let prefix = stack.embed_text(&Tensor::new(&[[CLS, SEP]], &dev)?, None)?;
            let patches = stack.embed_image(&img.narrow(0, i, 1)?, None)?;
            let x = Tensor::cat(&[&prefix, &patches], 1)?;
            let h = stack.encode(&x, &Tensor::ones((1, x.dim(1)?), DType::F32, &dev)?, None)?;
            let want = proj("image", &pool(&h)?)?;
            let err = max_abs_diff(&batch.narrow(0, i, 1)?, &want)?;
            assert!(err < 1e-5, "{pooling:?} image {i}: {err}");
        }
        // Unit norm, and the two sides are genuinely different functions.
        let norms = batch.sqr()?.sum(1)?.to_vec1::<f32>()?;
        assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5), "{norms:?}");
    }
    Ok(())
}

#[test]
fn every_decomposed_variable_gets_a_gradient() -> TestResult {
    let (_cvm, _ce, dvm, d) = decomposed(Pooling::Mean, 0.1)?;
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[CLS, 7, 9, 11, SEP], [CLS, 13, SEP, 0, 0]], &dev)?;
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &dev)?;
    let rng = SeededRng::new(5);
    let f = d.encode_image(&pixels(2, 3)?, Some(&rng))?;
    let t = d.encode_text(&ids, &mask, Some(&rng))?;
    // A contrastive loss through the temperature, so every variable is used.
    let logits = f.matmul(&t.t()?)?.broadcast_div(&d.temperature()?)?;
    let labels = Tensor::new(&[0u32, 1], &dev)?;
    let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
    assert!(dvm.all_vars().len() > 10);
    assert_all_grads(&dvm, &loss)?;
    Ok(())
}

#[test]
fn a_bad_config_is_an_error() {
    let ccfg = cross::Config::tiny(40);
    let mut cfg = decomposed::Config::new(&ccfg, 24, CLS, SEP);
    cfg.sep_token_id = 40;
    let err = cfg
        .validate()
        .expect_err("out-of-vocabulary [SEP]")
        .to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    let cfg = decomposed::Config::new(&ccfg, 0, CLS, SEP);
    assert!(cfg.validate().is_err());
}
