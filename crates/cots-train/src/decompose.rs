//! How is a trained single-stream model decomposed into two fast encoders?
//!
//! VLDeformer's second stage (Zhang et al., 2021): the cross-encoder's joint
//! transformer, weights and all, becomes an image encoder and a text encoder
//! ([`cots_encoders::decomposed`]) that are trained with contrastive
//! learning whose negatives come from both modalities
//! ([`cots_objectives::bimodal`]) on a (small) target set: the training
//! split of the cross-encoder's data, optionally cut to `target_items`.
//!
//! The output directory is a run that [`crate::inference::Run::open`] serves
//! like a COTS run (eval, embed, search): `config.toml` (the data and image
//! transform), `decomposed.json` (model config), `tokenizer.json`, and,
//! written atomically at every save, `decomposed.safetensors` and
//! `decompose.json` (training config, source, step, loss), plus
//! `metrics.jsonl`. A crash leaves the last save intact; training restarts
//! from step 0 (no resume).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::DType;
use candle_nn::{VarBuilder, VarMap};
use cots_data::{Loader, LoaderConfig, LoaderPosition, Split};
use cots_encoders::decomposed::{self, Decomposed, Pooling};
use cots_objectives::bimodal::{Bimodal, BimodalConfig};
use cots_objectives::{Objectives, StepInputs};
use cots_ops::SeededRng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::RunConfig;
use crate::cross::{CrossRun, CROSS_WEIGHTS_FILE};
use crate::inference::{Run, CONFIG_FILE, DECOMPOSED_FILE, DECOMPOSED_WEIGHTS};
use crate::metrics::{progress_bar, MetricsWriter};
use crate::model::{seed_init, sorted_vars};
use crate::optim::{self, AdamW, OptimConfig};
use crate::schedule::{lr_at, ScheduleConfig};
use crate::trainer::load_dataset;
use crate::{checkpoint, Error, Result};

/// Training record of a decomposed run.
pub const DECOMPOSE_META: &str = "decompose.json";

/// Settings of [`decompose`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecomposeConfig {
    pub steps: u64,
    /// Pairs per step.
    pub batch_size: usize,
    /// Width of the shared embedding space (new projections).
    pub embed_dim: usize,
    pub pooling: Pooling,
    /// The bimodal-negative contrastive loss.
    pub loss: BimodalConfig,
    pub optim: OptimConfig,
    pub schedule: ScheduleConfig,
    /// Train on the first this many training images only (the paper's
    /// small target set); 0 takes the whole training split.
    pub target_items: usize,
    pub seed: u64,
    /// Save every this many steps (and at the end); 0 saves only at the end.
    pub save_every: u64,
}

impl Default for DecomposeConfig {
    fn default() -> Self {
        Self {
            steps: 300,
            batch_size: 32,
            embed_dim: 256,
            pooling: Pooling::default(),
            loss: BimodalConfig::default(),
            optim: OptimConfig {
                lr: 1e-4,
                ..OptimConfig::default()
            },
            schedule: ScheduleConfig {
                warmup_steps: 30,
                ..ScheduleConfig::default()
            },
            target_items: 0,
            seed: 0,
            save_every: 100,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct SavedMeta {
    train: DecomposeConfig,
    /// The cross-encoder directory and weights hash it came from.
    source: String,
    source_hash: String,
    step: u64,
    loss: Option<f64>,
}

/// The step of the last save of the decomposed run in `dir` (0 when the
/// record is absent).
pub fn saved_step(dir: &Path) -> Result<u64> {
    let path = dir.join(DECOMPOSE_META);
    if !path.exists() {
        return Ok(0);
    }
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let meta: SavedMeta = serde_json::from_str(&text).map_err(|e| Error::Format {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(meta.step)
}

/// A decomposed model over `source`'s weights: the joint stack loaded
/// bit-identically under `joint.`, fresh projections and temperature, all
/// variables of `map`.
pub fn decomposed_from(
    source: &CrossRun,
    embed_dim: usize,
    pooling: Pooling,
    seed: u64,
    map: &VarMap,
) -> Result<Decomposed> {
    let special = source.tokenizer.special();
    let mut cfg = decomposed::Config::new(&source.cfg, embed_dim, special.cls, special.sep);
    cfg.pooling = pooling;
    let model = Decomposed::new(
        &cfg,
        VarBuilder::from_varmap(map, DType::F32, &source.device),
    )?;
    // Fresh parts first (the seeded init touches every variable), then the
    // source's weights over the shared stack.
    seed_init(map, seed)?;
    let path = source.dir.join(CROSS_WEIGHTS_FILE);
    let tensors = cots_encoders::weights::read_safetensors(&path)?;
    cots_encoders::weights::load_tensors(map, &tensors, &path, "joint.", &[])?;
    Ok(model)
}

fn save(out: &Path, map: &VarMap, meta: &SavedMeta) -> Result<()> {
    checkpoint::save_model(
        &out.join(DECOMPOSED_WEIGHTS),
        map,
        &out.join(DECOMPOSE_META),
        meta,
    )
}

/// Decomposes `source` into two encoders trained on the training split of
/// `data` (a run config; its image transform and text length are replaced
/// by the cross-encoder's) and writes them to `out`; returns the run opened.
pub fn decompose(
    source: &CrossRun,
    data: &RunConfig,
    out: &Path,
    dc: &DecomposeConfig,
    quiet: bool,
) -> Result<Run> {
    if dc.batch_size < 2 || dc.steps == 0 || dc.embed_dim == 0 {
        return Err(Error::Config(
            "decompose needs batch_size >= 2, steps >= 1 and embed_dim >= 1".into(),
        ));
    }
    checkpoint::claim_output_dir(
        out,
        DECOMPOSED_FILE,
        DECOMPOSED_WEIGHTS,
        "a decomposed model",
    )?;
    let device = &source.device;
    let map = VarMap::new();
    let model = decomposed_from(source, dc.embed_dim, dc.pooling, dc.seed, &map)?;
    let mut adam = AdamW::new(sorted_vars(&map), &dc.optim)?;
    let mut objective = Objectives::new(None, None);
    objective.push(1.0, Box::new(Bimodal::new(&dc.loss)?))?;

    let mut run_cfg = data.clone();
    run_cfg.data.image = source.image.clone();
    run_cfg.data.max_text_len = source.cfg.max_text_len;
    let mut train = load_dataset(&run_cfg)?.split(Split::Train)?;
    if dc.target_items > 0 {
        train.items.truncate(dc.target_items);
    }
    let mut loader = Loader::new(
        Arc::new(train),
        Arc::new(source.tokenizer.clone()),
        LoaderConfig {
            batch_size: dc.batch_size,
            seed: dc.seed,
            max_text_len: source.cfg.max_text_len,
            image: source.image.clone(),
            on_bad_input: run_cfg.data.on_bad_input,
            ..LoaderConfig::default()
        },
        LoaderPosition::default(),
    )?;
    checkpoint::write_atomic(&out.join(CONFIG_FILE), run_cfg.to_toml()?.as_bytes())?;
    source.tokenizer.save(out)?;
    model.config().save(out.join(DECOMPOSED_FILE))?;
    let mut meta = SavedMeta {
        train: dc.clone(),
        source: source.dir.display().to_string(),
        source_hash: source.weights_hash.clone(),
        step: 0,
        loss: None,
    };
    let metrics_path = out.join("metrics.jsonl");
    let _ = std::fs::remove_file(&metrics_path);
    let mut metrics = MetricsWriter::open(&metrics_path)?;

    let bar = progress_bar("decompose ", dc.steps, quiet);
    let started = Instant::now();
    for step in 0..dc.steps {
        let b = loader.next_batch()?;
        let pixels = b.pixels.to_device(device)?;
        let ids = b.input_ids.to_device(device)?;
        let mask = b.attention_mask.to_device(device)?;
        let image_ids = b.image_ids.to_device(device)?;
        let rng = SeededRng::new(dc.seed.wrapping_mul(0x9E37_79B9).wrapping_add(step));
        let f = model.encode_image(&pixels, Some(&rng))?;
        let t = model.encode_text(&ids, &mask, Some(&rng))?;
        let temperature = model.temperature()?;
        let inputs = StepInputs {
            image_embed: &f,
            text_embed: &t,
            image_embed_m: None,
            text_embed_m: None,
            image_ids: &image_ids,
            temperature: &temperature,
            pair_weights: None,
            mlm: None,
            mvm: None,
            itm: None,
        };
        let losses = objective.losses(&inputs)?;
        let mut record = json!({"step": step + 1});
        for term in &losses.terms {
            let v = term.value.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            record[format!("loss/{}", term.name)] = json!(v);
        }
        let loss = losses.total;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::NonFinite(format!(
                "decompose: the loss is {value} at step {step}; the last save in {} is intact",
                out.display()
            )));
        }
        let lr = lr_at(&dc.schedule, dc.optim.lr, step, dc.steps);
        optim::backward_step(&loss, &sorted_vars(&map), &mut adam, dc.optim.grad_clip, lr)?;
        objective.after_step(&inputs)?;
        let pairs_s =
            ((step + 1) as usize * dc.batch_size) as f64 / started.elapsed().as_secs_f64();
        record["lr"] = json!(lr);
        record["pairs_per_s"] = json!(pairs_s);
        metrics.write(&record)?;
        meta.loss = Some(value);
        bar.set_position(step + 1);
        bar.set_message(format!("loss {value:.4} lr {lr:.2e} {pairs_s:.1} pairs/s"));
        if dc.save_every > 0 && (step + 1) % dc.save_every == 0 && step + 1 < dc.steps {
            meta.step = step + 1;
            save(out, &map, &meta)?;
        }
    }
    bar.finish();
    meta.step = dc.steps;
    save(out, &map, &meta)?;
    Run::open(out, device)
}
