//! Training-path checks: every variable of each tower receives a finite,
//! non-zero gradient (our LayerNorm, softmax and dropout keep the graph
//! intact), the momentum EMA is exact, and configs round-trip.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use cots_encoders::momentum::Momentum;
use cots_encoders::two_stream::{self, ImageTower, ProjectionConfig, TwoStream};
use cots_encoders::{bert, vit};
use cots_ops::SeededRng;

mod common;

use common::{assert_all_grads, TestResult};

/// A random linear functional of `x`: generic enough that no parameter's
/// gradient vanishes by symmetry (a plain sum after LayerNorm would).
fn probe(x: &Tensor) -> candle_core::Result<Tensor> {
    let r = Tensor::randn(0f32, 1.0, x.shape(), x.device())?;
    (x * r)?.sum_all()
}

/// Both attention paths: the fused op (no attention dropout) and the
/// composition with dropout between the softmax and the value product.
#[test]
fn vit_every_variable_gets_a_gradient() -> TestResult {
    for dropout in [0.0, 0.1] {
        vit_grads(dropout)?;
    }
    Ok(())
}

fn vit_grads(dropout: f64) -> TestResult {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let cfg = vit::Config {
        hidden_dropout_prob: dropout,
        attention_probs_dropout_prob: dropout,
        ..vit::Config::tiny()
    };
    let model = vit::VisionTransformer::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let n = model.num_patches();
    let pixels = Tensor::randn(0f32, 1.0, (2, 3, cfg.image_size, cfg.image_size), &dev)?;
    // Half of each image's patches are masked so the mask token is used.
    let mask: Vec<u8> = (0..2 * n).map(|i| (i % 2) as u8).collect();
    let mask = Tensor::from_vec(mask, (2, n), &dev)?;
    let rng = SeededRng::new(1);
    let out = model.forward(&pixels, Some(&mask), Some(&rng))?;
    assert_eq!(out.dims(), &[2, 1 + n, cfg.hidden_size]);
    assert_all_grads(&vm, &probe(&out)?)
}

/// Both attention paths, with a padded row: the fused op (no attention
/// dropout) and the composition (the tiny preset's dropout).
#[test]
fn bert_every_variable_gets_a_gradient() -> TestResult {
    for dropout in [Some(0.0), None] {
        bert_grads(dropout)?;
    }
    Ok(())
}

fn bert_grads(attention_dropout: Option<f64>) -> TestResult {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let mut cfg = bert::Config::tiny(50);
    if let Some(p) = attention_dropout {
        cfg.attention_probs_dropout_prob = p;
    }
    let model = bert::BertModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let ids = Tensor::new(&[[2u32, 7, 9, 11, 3], [2, 13, 3, 0, 0]], &dev)?;
    let types = Tensor::new(&[[0u32, 0, 0, 1, 1], [0, 1, 1, 0, 0]], &dev)?;
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &dev)?;
    let rng = SeededRng::new(2);
    let out = model.forward(&ids, Some(&types), Some(&mask), Some(&rng))?;
    assert_eq!(out.dims(), &[2, 5, cfg.hidden_size]);
    assert_all_grads(&vm, &probe(&out)?)
}

#[test]
fn two_stream_every_variable_gets_a_gradient() -> TestResult {
    two_stream_grads(two_stream::Config::tiny(40))?;
    // With the MLP projection heads and input dropout.
    two_stream_grads(two_stream::Config {
        projection: ProjectionConfig {
            mlp_hidden: Some(24),
            input_dropout: 0.2,
        },
        ..two_stream::Config::tiny(40)
    })
}

fn two_stream_grads(cfg: two_stream::Config) -> TestResult {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let model = TwoStream::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let s = cfg.vision.image_size;
    let pixels = Tensor::randn(0f32, 1.0, (3, 3, s, s), &dev)?;
    let n = cfg.vision.num_patches();
    let mask = Tensor::from_vec(
        (0..3 * n).map(|i| (i % 3 == 0) as u32).collect::<Vec<_>>(),
        (3, n),
        &dev,
    )?;
    let ids = Tensor::new(&[[2u32, 7, 9, 3], [2, 13, 3, 0], [2, 5, 6, 3]], &dev)?;
    let am = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], &dev)?;
    let rng = SeededRng::new(3);
    let img = model.encode_image(&pixels, Some(&mask), Some(&rng))?;
    let txt = model.encode_text(&ids, Some(&am), Some(&rng))?;
    assert_eq!(img.embed.dims(), &[3, cfg.embed_dim]);
    assert_eq!(txt.embed.dims(), &[3, cfg.embed_dim]);
    assert_eq!(txt.hidden.dims(), &[3, 4, cfg.text.hidden_size]);
    let norms = img.embed.sqr()?.sum(1)?.to_vec1::<f32>()?;
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5), "{norms:?}");
    let temp = model.temperature()?;
    assert!((temp.to_scalar::<f32>()? - 0.07).abs() < 1e-7);
    // An InfoNCE loss over the batch: the way the towers are trained.
    let logits = img.embed.matmul(&txt.embed.t()?)?.broadcast_div(&temp)?;
    let targets = Tensor::arange(0u32, 3, &dev)?;
    let loss = (candle_nn::loss::cross_entropy(&logits, &targets)?
        + candle_nn::loss::cross_entropy(&logits.t()?, &targets)?)?;
    assert_all_grads(&vm, &loss)
}

#[test]
fn temperature_is_clamped() -> TestResult {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let model = TwoStream::new(
        &two_stream::Config::tiny(40),
        VarBuilder::from_varmap(&vm, DType::F32, &dev),
    )?;
    let temp = vm.data().lock().map_err(|_| "poisoned")?["temp"].clone();
    temp.set(&Tensor::new(3.0f32, &dev)?)?;
    assert_eq!(model.temperature()?.to_scalar::<f32>()?, 0.5);
    temp.set(&Tensor::new(-1.0f32, &dev)?)?;
    assert_eq!(model.temperature()?.to_scalar::<f32>()?, 0.001);
    Ok(())
}

fn tiny_two_stream(dev: &Device) -> Result<VarMap, Box<dyn std::error::Error>> {
    let vm = VarMap::new();
    TwoStream::new(
        &two_stream::Config::tiny(40),
        VarBuilder::from_varmap(&vm, DType::F32, dev),
    )?;
    Ok(vm)
}

fn values(v: &Var) -> candle_core::Result<Vec<f32>> {
    v.as_tensor().flatten_all()?.to_vec1::<f32>()
}

#[test]
fn momentum_update_is_the_ema_for_every_variable() -> TestResult {
    let dev = Device::Cpu;
    let online = tiny_two_stream(&dev)?;
    let momentum = tiny_two_stream(&dev)?;
    let ema = Momentum::new(&online, &momentum)?;
    assert_eq!(ema.pairs.len(), online.all_vars().len());
    let before: Vec<Vec<f32>> = ema
        .pairs
        .iter()
        .map(|(_, m)| values(m))
        .collect::<candle_core::Result<_>>()?;
    let m = 0.9;
    ema.update(m)?;
    let mut checked = 0;
    for ((name, (o, mv)), old) in ema.names().iter().zip(&ema.pairs).zip(&before) {
        let (o, new) = (values(o)?, values(mv)?);
        for ((&o, &n), &p) in o.iter().zip(&new).zip(old) {
            let want = m as f32 * p + (1.0 - m as f32) * o;
            assert!(
                (n - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{name}: {n} vs {want}"
            );
            checked += 1;
        }
        // Two independent random inits differ, so an update that did
        // nothing would fail the check above for randomly initialised vars.
    }
    assert!(checked > 10_000);
    ema.copy_from_online()?;
    for (o, mv) in &ema.pairs {
        assert_eq!(values(o)?, values(mv)?);
    }
    Ok(())
}

#[test]
fn momentum_reports_mismatched_variables() -> TestResult {
    let dev = Device::Cpu;
    let online = tiny_two_stream(&dev)?;
    let momentum = tiny_two_stream(&dev)?;
    VarBuilder::from_varmap(&momentum, DType::F32, &dev).get((2, 2), "stray")?;
    let err = Momentum::new(&online, &momentum).expect_err("extra variable must be an error");
    assert!(err.to_string().contains("stray"), "{err}");
    let shaped = VarMap::new();
    VarBuilder::from_varmap(&shaped, DType::F32, &dev).get((2, 3), "w")?;
    let other = VarMap::new();
    VarBuilder::from_varmap(&other, DType::F32, &dev).get((3, 2), "w")?;
    let err = Momentum::new(&shaped, &other).expect_err("shape mismatch must be an error");
    assert!(err.to_string().contains("`w`"), "{err}");
    Ok(())
}

#[test]
fn configs_round_trip_through_toml_and_json() -> TestResult {
    let dir = tempfile::tempdir()?;
    for cfg in [
        two_stream::Config::tiny(123),
        two_stream::Config::small(4567),
        two_stream::Config::base(),
        two_stream::Config {
            image_tower: ImageTower::EfficientnetLite0,
            projection: ProjectionConfig {
                mlp_hidden: Some(64),
                input_dropout: 0.3,
            },
            ..two_stream::Config::small(99)
        },
    ] {
        for ext in ["toml", "json"] {
            let path = dir.path().join(format!("cfg.{ext}"));
            cfg.save(&path)?;
            assert_eq!(two_stream::Config::load(&path)?, cfg, "{ext}");
        }
    }
    // A Hugging Face config.json with only the required keys gets BERT's defaults.
    let hf = r#"{"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1,
                 "num_attention_heads": 4, "intermediate_size": 64,
                 "model_type": "bert", "hidden_act": "gelu_new"}"#;
    let cfg: bert::Config = serde_json::from_str(hf)?;
    assert_eq!(cfg.hidden_act, bert::Activation::GeluTanh);
    assert_eq!(cfg.type_vocab_size, 2);
    assert_eq!(cfg.max_position_embeddings, 512);
    assert_eq!(cfg.layer_norm_eps, 1e-12);
    let bad = two_stream::Config {
        temp_init: 2.0,
        ..two_stream::Config::tiny(10)
    };
    let path = dir.path().join("bad.json");
    bad.save(&path)?;
    assert!(two_stream::Config::load(&path).is_err());
    Ok(())
}

/// The MLP head is `normalize(linear(x) + fc2(gelu(fc1(x))))` on a dropped-out
/// input in training, and deterministic without a generator.
#[test]
fn mlp_projection_matches_its_formula_and_drops_out_only_in_training() -> TestResult {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let cfg = two_stream::Config {
        projection: ProjectionConfig {
            mlp_hidden: Some(16),
            input_dropout: 0.5,
        },
        ..two_stream::Config::tiny(40)
    };
    let model = TwoStream::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let d = cfg.vision_width();
    let x = Tensor::randn(0f32, 1.0, (4, d), &dev)?;
    let get = |name: &str| -> Result<Tensor, Box<dyn std::error::Error>> {
        let data = vm.data().lock().unwrap();
        Ok(data
            .get(name)
            .ok_or_else(|| format!("no variable {name}"))?
            .as_tensor()
            .clone())
    };
    let lin = |x: &Tensor, p: &str| -> Result<Tensor, Box<dyn std::error::Error>> {
        Ok(x.matmul(&get(&format!("{p}.weight"))?.t()?)?
            .broadcast_add(&get(&format!("{p}.bias"))?)?)
    };
    // Slow reference: GELU (erf) written out per element.
    let h = lin(&x, "vision_proj_mlp.fc1")?;
    let hv: Vec<f32> = h.flatten_all()?.to_vec1()?;
    let gelu: Vec<f32> = hv
        .iter()
        .map(|&v| {
            let v = v as f64;
            (0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2))) as f32
        })
        .collect();
    let g = Tensor::from_vec(gelu, h.dims(), &dev)?;
    let y = (lin(&x, "vision_proj")? + lin(&g, "vision_proj_mlp.fc2")?)?;
    let want = y.broadcast_div(&y.sqr()?.sum_keepdim(1)?.sqrt()?)?;
    let got = model.project_image(&x, None)?;
    let diff = (got.clone() - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-5, "MLP head differs from its formula by {diff}");
    assert_eq!(
        model.project_image(&x, None)?.to_vec2::<f32>()?,
        got.to_vec2::<f32>()?
    );
    let rng = SeededRng::new(11);
    let train = model.project_image(&x, Some(&rng))?;
    let moved = (train - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(moved > 1e-3, "input dropout did nothing in training");
    Ok(())
}

/// erf by its Maclaurin series (|x| small) or continued fraction, to 1e-12.
fn erf(x: f64) -> f64 {
    if x.abs() < 3.0 {
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        // erfc continued fraction (Lentz), enough for |x| >= 3.
        let z = x.abs();
        let mut f = z;
        let mut c = z;
        let mut d = 0.0;
        for k in 1..200 {
            let a = k as f64 / 2.0;
            d = z + a * d;
            d = 1.0 / d;
            c = z + a / c;
            f *= c * d;
        }
        let erfc = (-z * z).exp() / (f * std::f64::consts::PI.sqrt());
        (1.0 - erfc).copysign(x)
    }
}
