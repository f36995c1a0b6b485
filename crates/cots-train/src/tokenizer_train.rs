//! How is the visual tokenizer trained? `cots train-tokenizer`: the VQ-VAE
//! whose codes masked vision modeling predicts, trained on the images of a
//! run's training split, then saved and frozen.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use cots_data::synthetic::vocabulary;
use cots_data::{Loader, LoaderConfig, LoaderPosition, Split};
use cots_encoders::dvae::{self, Dvae};
use cots_text::TextTokenizer;
use indicatif::ProgressBar;
use serde::Serialize;

use crate::config::RunConfig;
use crate::model::{sorted_vars, DVAE_CONFIG, DVAE_WEIGHTS};
use crate::optim::{collect_grads, AdamW, OptimConfig};
use crate::trainer::load_dataset;
use crate::{checkpoint, Error, Result};

/// How the tokenizer did, measured on held-out batches after training.
#[derive(Clone, Debug, Serialize)]
pub struct TokenizerReport {
    pub steps: u64,
    /// Mean squared reconstruction error of normalised pixels ([-1, 1]).
    pub recon_mse: f64,
    /// `exp(entropy)` of the code histogram over the evaluation batches.
    pub perplexity: f64,
    /// Fraction of codebook entries used over the evaluation batches.
    pub usage: f64,
    pub codebook_size: usize,
    /// Dead codes reset to encoder outputs during training (`vq.restart_after`).
    pub restarts: u64,
}

/// Trains a dVAE matched to the ViT of `preset` on the data of `cfg` and
/// saves it in `out` (`dvae.json`, `dvae.safetensors`, `report.json`).
pub fn train_tokenizer(
    cfg: &RunConfig,
    dvae_cfg: &dvae::Config,
    steps: u64,
    out: &Path,
    device: &Device,
    quiet: bool,
) -> Result<TokenizerReport> {
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let data = load_dataset(cfg)?;
    let words = vocabulary();
    // Captions are not used, but the loader tokenises them; any vocabulary will do.
    let tokenizer = Arc::new(TextTokenizer::from_words(&words)?);
    let image = cots_data::image_io::ImageConfig {
        size: dvae_cfg.image_size,
        ..cfg.data.image.clone()
    };
    let lcfg = |seed| LoaderConfig {
        batch_size: cfg.data.batch_size,
        seed,
        max_text_len: 64,
        prefetch: 4,
        image: image.clone(),
        random_crop: None,
        on_bad_input: cfg.data.on_bad_input,
    };
    let mut train = Loader::new(
        Arc::new(data.split(Split::Train)?),
        tokenizer.clone(),
        lcfg(cfg.train.seed),
        LoaderPosition::default(),
    )?;

    let map = VarMap::new();
    let model = Dvae::new(dvae_cfg, VarBuilder::from_varmap(&map, DType::F32, device))?;
    crate::model::seed_init(&map, cfg.train.seed)?;
    let mut vq = dvae::CodebookTrainer::new(dvae_cfg, cfg.train.seed);
    // With EMA updates the codebook is moved by `vq`, never by the optimizer.
    let all_vars = sorted_vars(&map);
    let vars: Vec<_> = all_vars
        .iter()
        .filter(|(name, _)| vq.optimizes_codebook() || !name.starts_with("codebook"))
        .cloned()
        .collect();
    let mut opt = AdamW::new(
        vars.clone(),
        &OptimConfig {
            lr: 2e-3,
            weight_decay: 0.0,
            ..OptimConfig::default()
        },
    )?;
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(steps)
    };
    for step in 0..steps {
        let b = train.next_batch()?;
        let pixels = b.pixels.to_device(device)?;
        vq.before_step(&model, &pixels)?;
        let loss = model.forward_loss(&pixels)?;
        let total = loss.total.to_scalar::<f32>()?;
        if !total.is_finite() {
            return Err(Error::NonFinite(format!(
                "the tokenizer loss is {total} at step {step}"
            )));
        }
        let grads = collect_grads(&loss.total.backward()?, &vars);
        opt.step(&grads, 2e-3)?;
        vq.after_step(&model, &loss)?;
        bar.set_position(step + 1);
        bar.set_message(format!(
            "recon {:.4}, batch usage {:.0}%",
            loss.recon.to_scalar::<f32>()?,
            100.0 * loss.usage
        ));
    }
    bar.finish_and_clear();

    // Held-out statistics: reconstruction and code usage on validation images.
    let eval_split = data
        .split(Split::Val)
        .or_else(|_| data.split(Split::Test))?;
    let mut eval = Loader::new(
        Arc::new(eval_split),
        tokenizer,
        lcfg(1),
        LoaderPosition::default(),
    )?;
    let mut counts = vec![0u64; dvae_cfg.codebook_size];
    let mut mse = 0.0;
    let batches = eval.batches_per_epoch().clamp(1, 8);
    for _ in 0..batches {
        let px = eval.next_batch()?.pixels.to_device(device)?;
        mse += f64::from(model.forward_loss(&px)?.recon.to_scalar::<f32>()?) / batches as f64;
        for c in model.codes(&px)?.flatten_all()?.to_vec1::<u32>()? {
            counts[c as usize] += 1;
        }
    }
    let n: u64 = counts.iter().sum();
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n as f64;
            -p * p.ln()
        })
        .sum();
    let report = TokenizerReport {
        steps,
        recon_mse: mse,
        perplexity: entropy.exp(),
        usage: counts.iter().filter(|&&c| c > 0).count() as f64 / counts.len() as f64,
        codebook_size: dvae_cfg.codebook_size,
        restarts: vq.restarts(),
    };

    let tensors = all_vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    checkpoint::write_atomic(
        &out.join(DVAE_CONFIG),
        serde_json::to_string_pretty(dvae_cfg)
            .map_err(|e| Error::Config(e.to_string()))?
            .as_bytes(),
    )?;
    candle_core::safetensors::save(&tensors, out.join(DVAE_WEIGHTS))?;
    checkpoint::write_atomic(
        &out.join("report.json"),
        serde_json::to_string_pretty(&report)
            .map_err(|e| Error::Config(e.to_string()))?
            .as_bytes(),
    )?;
    Ok(report)
}
