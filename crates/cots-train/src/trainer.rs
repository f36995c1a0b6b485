//! The training loop.
//!
//! One optimizer step = `accumulation` micro-batches, each: forward passes,
//! AMF weights and losses ([`System::forward`]), a finite check, backward;
//! then gradient averaging, global-norm clipping, AdamW at the scheduled
//! rate, the EMA update of the momentum towers, and the enqueue of every
//! micro-batch's kept momentum keys.
//!
//! Randomness (dropout, MLM and patch masks) is drawn from generators seeded
//! by `(seed, step, micro-batch)`, and the loader's order is a function of
//! `(seed, epoch)`; together with the checkpointed optimizer, queues, filter
//! statistics and data position this makes a resumed run reproduce the loss
//! curve of an uninterrupted one exactly on the CPU.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use cots_data::masking::{block_mask, mlm_mask};
use cots_data::synthetic::vocabulary;
use cots_data::video::{self, MissingPolicy};
use cots_data::{manifest, Dataset, Loader, LoaderConfig, LoaderPosition, Split};
use cots_encoders::weights::{self, HfBertDir};
use cots_encoders::{efficientnet, temporal, two_stream};
use cots_eval::RetrievalReport;
use cots_objectives::ObjectiveState;
use cots_ops::SeededRng;
use cots_text::TextTokenizer;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::config::{DataKind, RunConfig};
use crate::inference::{self, CHECKPOINTS, CONFIG_FILE, MODEL_FILE};
use crate::metrics::{self, MetricsWriter};
use crate::model::{sorted_vars, StepBatch, System, MODEL_PREFIX};
use crate::optim::{self, AdamW, Grads};
use crate::schedule::lr_at;
use crate::{checkpoint, Error, Result};

/// What one optimizer step did.
#[derive(Clone, Debug)]
pub struct StepLog {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub terms: Vec<(String, f64)>,
    pub grad_norm: f64,
    pub amf_filtered: Option<f64>,
    pub pairs_per_s: f64,
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub steps: u64,
    pub seconds: f64,
    pub final_loss: f64,
    pub checkpoint: PathBuf,
}

/// Loads the dataset a run config names.
pub fn load_dataset(cfg: &RunConfig) -> Result<Dataset> {
    let d = &cfg.data;
    let policy = match d.on_bad_input {
        cots_data::loader::SkipPolicy::Fail => MissingPolicy::Error,
        cots_data::loader::SkipPolicy::Skip => MissingPolicy::Skip,
    };
    let videos = |resolved: video::Resolved| {
        if !resolved.skipped.is_empty() {
            tracing::warn!(
                "{} annotated videos have no file and were left out:",
                resolved.skipped.len()
            );
            for s in resolved.skipped.iter().take(20) {
                tracing::warn!("  {}: {}", s.id, s.reason);
            }
        }
        Dataset::from_videos(&resolved.records)
    };
    let data = match d.kind {
        DataKind::Synthetic => Dataset::synthetic(&cots_data::synthetic::SyntheticConfig {
            image_size: d.image.size,
            ..d.synthetic.clone()
        }),
        DataKind::SyntheticVideo => {
            Dataset::synthetic_video(&video::synthetic::SyntheticVideoConfig {
                size: d.image.size as u32,
                ..d.synthetic_video.clone()
            })
        }
        DataKind::VideoManifest => {
            let path = d.path.as_ref().ok_or_else(|| {
                Error::Config("data.kind = \"video_manifest\" needs data.path".into())
            })?;
            videos(video::msrvtt::read_manifest(path, policy).map_err(cots_data::Error::from)?)
        }
        DataKind::Msrvtt => {
            let (Some(json), Some(files)) = (&d.path, &d.msrvtt) else {
                return Err(Error::Config(
                    "data.kind = \"msrvtt\" needs data.path (MSRVTT_data.json) and [data.msrvtt]"
                        .into(),
                ));
            };
            let dir = d
                .root
                .clone()
                .or_else(|| json.parent().map(Path::to_path_buf))
                .unwrap_or_default();
            videos(
                video::msrvtt::msrvtt_1ka(json, &files.train_list, &files.test_csv, &dir, policy)
                    .map_err(cots_data::Error::from)?,
            )
        }
        kind @ (DataKind::Manifest | DataKind::Karpathy) => {
            let path = d
                .path
                .as_ref()
                .ok_or_else(|| Error::Config(format!("data.kind = \"{kind}\" needs data.path")))?;
            let root = d
                .root
                .clone()
                .or_else(|| path.parent().map(Path::to_path_buf))
                .unwrap_or_default();
            if kind == DataKind::Karpathy {
                manifest::load_karpathy(path, &root)?
            } else {
                manifest::load_jsonl(path, &root)?
            }
        }
    };
    data.validate()?;
    Ok(data)
}

/// The tokenizer of a run: the pretrained one when the text tower is
/// initialised from a checkpoint, else a word-level vocabulary of the data.
fn make_tokenizer(cfg: &RunConfig, data: &Dataset) -> Result<TextTokenizer> {
    if let Some(dir) = &cfg.model.text_init {
        return Ok(TextTokenizer::from_dir(dir)?);
    }
    if let Some(dir) = &cfg.model.init {
        return Ok(TextTokenizer::from_dir(dir)?);
    }
    let words: Vec<String> = if cfg.data.kind == DataKind::Synthetic {
        vocabulary()
    } else {
        let mut set = std::collections::BTreeSet::new();
        for it in &data.items {
            for c in &it.captions {
                for w in c.to_lowercase().split(|ch: char| !ch.is_alphanumeric()) {
                    if !w.is_empty() {
                        set.insert(w.to_string());
                    }
                }
            }
        }
        set.into_iter().collect()
    };
    Ok(TextTokenizer::from_words(&words)?)
}

fn model_config(cfg: &RunConfig, vocab: usize) -> Result<two_stream::Config> {
    let mut m = match (&cfg.model.config, &cfg.model.two_stream) {
        (Some(p), _) => two_stream::Config::load(p)?,
        (None, Some(inline)) => inline.clone(),
        (None, None) => cfg.model.preset.config(vocab),
    };
    if cfg.model.text_init.is_none() && cfg.model.config.is_none() {
        m.text.vocab_size = vocab;
    }
    m.max_text_len = cfg.data.max_text_len;
    // A video run's temporal head reads the image tower's CLS states, one
    // per sampled frame.
    m.temporal = match (cfg.is_video(), cfg.data.image.frames) {
        (true, Some(frames)) => Some(temporal::Config {
            mode: cfg.model.temporal,
            num_frames: frames,
            hidden: m.vision_width(),
            position_scale: cfg.model.temporal_position_scale,
            ..temporal::Config::default()
        }),
        _ => None,
    };
    Ok(m)
}

fn derived_seed(seed: u64, step: u64, micro: u64, salt: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ step.wrapping_mul(0xBF58_476D_1CE4_E5B9)
        ^ micro.wrapping_mul(0x94D0_49BB_1331_11EB)
        ^ salt
}

/// A training run.
pub struct Trainer {
    pub cfg: RunConfig,
    pub system: System,
    pub tokenizer: Arc<TextTokenizer>,
    data: Arc<Dataset>,
    /// The training split and the loader's settings, kept so that
    /// [`Trainer::peek_batch`] can rebuild the next batch.
    train: Arc<Dataset>,
    loader_cfg: LoaderConfig,
    loader: Loader,
    optim: AdamW,
    step: u64,
    out: PathBuf,
    metrics: MetricsWriter,
    device: Device,
}

impl Trainer {
    /// Prepares a run in `cfg.train.out`; with `resume`, continues from its
    /// newest complete checkpoint.
    pub fn new(mut cfg: RunConfig, device: &Device, resume: bool) -> Result<Self> {
        cfg.validate()?;
        let out = cfg.train.out.clone();
        std::fs::create_dir_all(&out).map_err(|source| Error::Io {
            path: out.clone(),
            source,
        })?;
        let data = load_dataset(&cfg)?;
        let tokenizer = make_tokenizer(&cfg, &data)?;
        let model_cfg = model_config(&cfg, tokenizer.vocab_size())?;
        // The data must be cut to the size the ViT was built for.
        cfg.data.image.size = model_cfg.vision.image_size;
        let mut system = System::new(
            &model_cfg,
            &cfg.objectives,
            cfg.model.dvae.as_deref(),
            device,
            cfg.train.seed,
        )?;

        if let Some(dir) = &cfg.model.text_init {
            let hf = HfBertDir::open(dir)?;
            let report = hf.load_into(&system.online, &format!("{MODEL_PREFIX}.text."))?;
            tracing::info!(
                "text tower initialised from {} ({} tensors)",
                dir.display(),
                report.loaded.len()
            );
        }
        match (&cfg.model.image_init, &cfg.model.init) {
            (Some(path), _) => {
                if model_cfg.image_tower.is_vit() {
                    return Err(Error::Config(format!(
                        "model.image_init ({}) is for a pretrained CNN image tower: set \
                         image_tower = \"efficientnet-lite0\" in [model.two_stream], or remove it",
                        path.display()
                    )));
                }
                let tensors = efficientnet::load_weights(path)?;
                let report = weights::load_tensors(
                    &system.online,
                    &tensors,
                    path,
                    &format!("{MODEL_PREFIX}.vision."),
                    &[],
                )?;
                tracing::info!(
                    "image tower initialised from {} ({} tensors, {} unused)",
                    path.display(),
                    report.loaded.len(),
                    report.unexpected.len()
                );
            }
            (None, None) if !model_cfg.image_tower.is_vit() => {
                return Err(Error::Config(
                    "the CNN image tower is frozen, so it needs pretrained weights: set \
                     model.image_init to the EfficientNet-Lite0 .pth (see configs/emoji-effnet.toml) \
                     or model.init to a run that has them"
                        .into(),
                ))
            }
            _ => {}
        }
        if let Some(dir) = &cfg.model.init {
            init_towers(&system, dir)?;
        }
        system.ema.copy_from_online()?;
        system.lock_text = cfg.model.lock_text;
        // Frozen towers now equal their momentum copies for good: the
        // per-step EMA skips them (27 M of MiniLM + EfficientNet weights).
        let frozen = system.frozen_prefixes();
        system
            .ema
            .retain(|n| !frozen.iter().any(|p| n.starts_with(p)));
        // Random crops make every image new: nothing to remember.
        system.image_cache.enabled = cfg.data.random_crop.is_none();
        if cfg.is_video() && system.objectives.needs().masked_image {
            return Err(Error::Config(
                "masked vision modeling is not supported on video data (MLM is: it reads the \
                 text); remove MVM from the objectives"
                    .into(),
            ));
        }

        let optim = AdamW::new(system.trainable(), &cfg.optim)?;
        let mut train = data.split(Split::Train)?;
        if cfg.data.noisy_pairs > 0.0 {
            let noisy =
                train.with_noisy_pairs(cfg.data.noisy_pairs, cfg.train.seed ^ 0x004e_015e)?;
            tracing::info!(
                "noisy pairs: {} of {} training images carry another image's captions",
                noisy.len(),
                train.items.len()
            );
        }
        let train = Arc::new(train);
        let tokenizer = Arc::new(tokenizer);
        let mut start = LoaderPosition::default();
        let mut step = 0;
        let mut trainer_optim = optim;

        let ckpt_dir = out.join(CHECKPOINTS);
        if resume {
            // A damaged newest checkpoint is skipped with a warning naming it.
            let Some((latest, tensors, meta)) = checkpoint::load_latest(&ckpt_dir)? else {
                return Err(Error::Checkpoint(format!(
                    "--resume: {} has no complete checkpoint",
                    ckpt_dir.display()
                )));
            };
            restore(&mut system, &mut trainer_optim, &tensors, &meta)?;
            step = meta["step"].as_u64().unwrap_or(0);
            start = serde_json::from_value(meta["loader"].clone()).map_err(|e| {
                Error::Checkpoint(format!("{}: loader position: {e}", latest.display()))
            })?;
            metrics::truncate_from(&out.join("metrics.jsonl"), step + 1)?;
            tracing::info!("resumed from {} at step {step}", latest.display());
        } else {
            // A fresh run must not mix with an older one's checkpoints, even
            // damaged ones.
            if !checkpoint::list(&ckpt_dir)?.is_empty() {
                return Err(Error::Config(format!(
                    "{} already holds checkpoints: pass --resume to continue it, or choose another output directory",
                    out.display()
                )));
            }
            let _ = std::fs::remove_file(out.join("metrics.jsonl"));
        }

        // Everything needed to use or resume the run sits beside the checkpoints.
        crate::checkpoint::write_atomic(&out.join(CONFIG_FILE), cfg.to_toml()?.as_bytes())?;
        model_cfg.save(out.join(MODEL_FILE))?;
        tokenizer.save(&out)?;

        let loader_cfg = LoaderConfig {
            batch_size: cfg.data.batch_size,
            seed: cfg.train.seed,
            max_text_len: cfg.data.max_text_len,
            prefetch: 4,
            image: cfg.data.image.clone(),
            random_crop: cfg.data.random_crop,
            on_bad_input: cfg.data.on_bad_input,
        };
        let loader = Loader::new(train.clone(), tokenizer.clone(), loader_cfg.clone(), start)?;
        let metrics = MetricsWriter::open(&out.join("metrics.jsonl"))?;
        Ok(Self {
            cfg,
            system,
            tokenizer,
            data: Arc::new(data),
            train,
            loader_cfg,
            loader,
            optim: trainer_optim,
            step,
            out,
            metrics,
            device: device.clone(),
        })
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn out_dir(&self) -> &Path {
        &self.out
    }

    /// The first micro-batch the next [`Trainer::train_step`] will train
    /// on, exactly as that step will see it (same pixels, tokens and
    /// masks), without consuming it. For inspecting the step from outside
    /// (tests check the EMA and the enqueue against it); it loads the batch
    /// a second time, so the loop never calls it.
    pub fn peek_batch(&self) -> Result<StepBatch> {
        let position = self.loader.position();
        let order = cots_data::loader::epoch_order(
            &self.train.pairs(),
            self.loader_cfg.seed,
            position.epoch,
        );
        let first = position.batch as usize * self.loader_cfg.batch_size;
        let pairs = order
            .get(first..first + self.loader_cfg.batch_size)
            .ok_or_else(|| Error::Config(format!("no batch at loader position {position:?}")))?;
        let batch = cots_data::loader::make_batch(
            &self.train,
            &self.tokenizer,
            &self.loader_cfg,
            pairs,
            position,
        )?;
        self.to_step_batch(&batch, 0)
    }

    fn to_step_batch(&self, b: &cots_data::Batch, micro: u64) -> Result<StepBatch> {
        let needs = self.system.objectives.needs();
        let dev = &self.device;
        let (bsz, len) = b.input_ids.dims2()?;
        let mlm = if needs.masked_text {
            let mut rng =
                ChaCha8Rng::seed_from_u64(derived_seed(self.cfg.train.seed, self.step, micro, 1));
            let (ids, labels) = mlm_mask(
                &b.ids_host,
                &b.mask_host,
                &self.tokenizer.special(),
                self.tokenizer.vocab_size(),
                self.cfg.train.mlm_prob,
                &mut rng,
            );
            Some((
                Tensor::from_vec(ids, (bsz, len), dev)?,
                Tensor::from_vec(labels, (bsz, len), dev)?,
            ))
        } else {
            None
        };
        let patch_mask = if needs.masked_image {
            let g = self.system.cfg.vision.image_size / self.system.cfg.vision.patch_size;
            let mut rng =
                ChaCha8Rng::seed_from_u64(derived_seed(self.cfg.train.seed, self.step, micro, 2));
            let m: Vec<u8> = (0..bsz)
                .flat_map(|_| block_mask(g, g, self.cfg.train.mvm_ratio, &mut rng))
                .collect();
            Some(Tensor::from_vec(m, (bsz, g * g), dev)?)
        } else {
            None
        };
        Ok(StepBatch {
            pixels: b.pixels.to_device(dev)?,
            input_ids: b.input_ids.to_device(dev)?,
            attention_mask: b.attention_mask.to_device(dev)?,
            image_ids: b.image_ids.to_device(dev)?,
            mlm,
            patch_mask,
        })
    }

    /// One optimizer step.
    pub fn train_step(&mut self) -> Result<StepLog> {
        let t0 = Instant::now();
        let accum = self.cfg.optim.accumulation as u64;
        // Frozen variables (an `optim.lr_scales` multiplier of 0) get no
        // update and stay out of the clipping norm.
        let vars: Vec<_> = self
            .system
            .trainable()
            .into_iter()
            .filter(|(name, _)| self.cfg.optim.trains(name))
            .collect();
        let mut grads = Grads::new();
        let mut outputs = Vec::new();
        let mut loss = 0.0;
        let mut terms: HashMap<String, f64> = HashMap::new();
        let mut filtered = None;
        let mut pairs = 0usize;
        for micro in 0..accum {
            let batch = self.loader.next_batch()?;
            pairs += batch.captions.len();
            let sb = self.to_step_batch(&batch, micro)?;
            let rng = SeededRng::new(derived_seed(self.cfg.train.seed, self.step, micro, 3));
            let out = self.system.forward(&sb, Some(&rng))?;
            let total = out.losses.total.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let mut named = Vec::new();
            for t in &out.losses.terms {
                let v = t.value.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                named.push(format!("{}={v:.4}", t.name));
                *terms.entry(t.name.clone()).or_default() += v / accum as f64;
            }
            if !total.is_finite() {
                let last = checkpoint::latest(&self.out.join(CHECKPOINTS))?
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none yet".into());
                return Err(Error::NonFinite(format!(
                    "the loss is {total} at step {} ({}); training stopped. The last good checkpoint is {last}; \
                     try a lower optim.lr or a smaller optim.grad_clip",
                    self.step + 1,
                    named.join(", ")
                )));
            }
            loss += total / accum as f64;
            if let Some(a) = &out.amf {
                filtered = Some(a.filtered_fraction);
            }
            let store = out.losses.total.backward()?;
            optim::accumulate(&mut grads, optim::collect_grads(&store, &vars))?;
            outputs.push(out);
        }
        if accum > 1 {
            optim::scale(&mut grads, 1.0 / accum as f64)?;
        }
        let grad_norm = optim::clip_grad_norm(&mut grads, self.cfg.optim.grad_clip)?;
        let lr = lr_at(
            &self.cfg.schedule,
            self.cfg.optim.lr,
            self.step,
            self.cfg.train.steps,
        );
        self.optim.step(&grads, lr)?;
        for (i, out) in outputs.iter().enumerate() {
            // The EMA moves once per optimizer step; every micro-batch enqueues.
            let m = if i == 0 { self.cfg.train.momentum } else { 1.0 };
            self.system.after_step(out, m)?;
        }
        self.step += 1;
        let mut terms: Vec<(String, f64)> = terms.into_iter().collect();
        terms.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(StepLog {
            step: self.step,
            lr,
            loss,
            terms,
            grad_norm,
            amf_filtered: filtered,
            pairs_per_s: pairs as f64 / t0.elapsed().as_secs_f64().max(1e-9),
        })
    }

    /// Retrieval metrics on a split of the run's dataset.
    pub fn evaluate(&self, split: Split) -> Result<RetrievalReport> {
        let data = self.data.split(split)?;
        inference::evaluate(
            &self.system.model,
            &self.tokenizer,
            &data,
            &self.cfg.data.image,
            self.cfg.data.max_text_len,
            &self.device,
            &cots_eval::EvalOptions::default(),
        )
    }

    /// Writes a complete checkpoint of the current state.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let mut tensors = HashMap::new();
        for (n, v) in sorted_vars(&self.system.online) {
            // A diverged update must never overwrite a good checkpoint.
            let s = v
                .as_tensor()
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
            if !s.is_finite() {
                return Err(Error::NonFinite(format!(
                    "`{n}` is not finite after step {}: training stopped without checkpointing; \
                     try a lower optim.lr or a smaller optim.grad_clip",
                    self.step
                )));
            }
            tensors.insert(format!("online.{n}"), v.as_tensor().clone());
        }
        for (n, v) in sorted_vars(&self.system.momentum_vars) {
            tensors.insert(format!("momentum.{n}"), v.as_tensor().clone());
        }
        let state = self.system.objectives.state()?;
        for (n, t) in &state.tensors {
            tensors.insert(format!("objectives.{n}"), t.clone());
        }
        for (n, t) in self.optim.state() {
            tensors.insert(format!("optim.{n}"), t);
        }
        let meta = json!({
            "step": self.step,
            "optim_step": self.optim.step_count(),
            "loader": self.loader.position(),
            "objectives": state.meta,
            "config": self.cfg,
        });
        checkpoint::save(
            &self.out.join(CHECKPOINTS),
            self.step,
            &tensors,
            &meta,
            self.cfg.train.keep_last,
        )
    }

    /// Trains to `cfg.train.steps`, logging, validating and checkpointing.
    pub fn run(&mut self, quiet: bool) -> Result<RunSummary> {
        let total = self.cfg.train.steps;
        let t0 = Instant::now();
        let bar = crate::metrics::progress_bar("", total, quiet);
        bar.set_position(self.step);
        let mut last = f64::NAN;
        let mut ckpt = PathBuf::new();
        while self.step < total {
            let log = self.train_step()?;
            last = log.loss;
            let terms: Vec<String> = log
                .terms
                .iter()
                .map(|(n, v)| format!("{n} {v:.3}"))
                .collect();
            bar.set_message(format!(
                "loss {:.3} | {} | {:.1} pairs/s",
                log.loss,
                terms.join(" "),
                log.pairs_per_s
            ));
            bar.set_position(self.step);
            if self.step.is_multiple_of(self.cfg.train.log_every.max(1)) || self.step == total {
                let mut rec = json!({
                    "step": log.step, "lr": log.lr, "loss/total": log.loss,
                    "grad_norm": log.grad_norm, "pairs_per_s": log.pairs_per_s,
                });
                for (n, v) in &log.terms {
                    rec[format!("loss/{n}")] = json!(v);
                }
                if let Some(f) = log.amf_filtered {
                    rec["amf_filtered"] = json!(f);
                }
                self.metrics.write(&rec)?;
                if bar.is_hidden() && !quiet {
                    tracing::info!(
                        "step {}/{total} loss {:.4} ({})",
                        self.step,
                        log.loss,
                        terms.join(", ")
                    );
                }
            }
            let eval_every = self.cfg.train.eval_every;
            if eval_every > 0 && (self.step.is_multiple_of(eval_every) || self.step == total) {
                if let Ok(r) = self.evaluate(Split::Val) {
                    let mut rec = json!({"step": self.step, "val/rsum": r.rsum});
                    for (k, v) in &r.t2i.recall {
                        rec[format!("val/t2i_r{k}")] = json!(v);
                    }
                    for (k, v) in &r.i2t.recall {
                        rec[format!("val/i2t_r{k}")] = json!(v);
                    }
                    self.metrics.write(&rec)?;
                }
            }
            if self
                .step
                .is_multiple_of(self.cfg.train.checkpoint_every.max(1))
                || self.step == total
            {
                ckpt = self.save_checkpoint()?;
            }
        }
        bar.finish_and_clear();
        for (what, c) in [
            ("image", &self.system.image_cache),
            ("text", &self.system.text_cache),
        ] {
            if c.hits + c.misses > 0 {
                tracing::info!(
                    "frozen {what} tower: {} inputs remembered, {} of {} rows looked up",
                    c.len(),
                    c.hits,
                    c.hits + c.misses
                );
            }
        }
        let skipped = self.loader.skipped();
        if !skipped.is_empty() {
            tracing::warn!(
                "{} training samples were unreadable and replaced:",
                skipped.len()
            );
            for s in skipped.iter().take(20) {
                tracing::warn!("  {}: {}", s.source, s.reason);
            }
        }
        let records = metrics::read(&self.out.join("metrics.jsonl"))?;
        if let Err(e) = metrics::plot(&records, &self.out.join("plot.svg")) {
            tracing::warn!("could not draw the loss plot: {e}");
        }
        if ckpt.as_os_str().is_empty() {
            ckpt = checkpoint::latest(&self.out.join(CHECKPOINTS))?.unwrap_or_default();
        }
        Ok(RunSummary {
            steps: self.step,
            seconds: t0.elapsed().as_secs_f64(),
            final_loss: last,
            checkpoint: ckpt,
        })
    }
}

/// Loads the towers of the newest checkpoint of run `dir` into `system`'s
/// online variables. A temporal head missing from the checkpoint (a video
/// run started from an image-text run) keeps its fresh weights.
fn init_towers(system: &System, dir: &Path) -> Result<()> {
    let ckpt = checkpoint::latest(&dir.join(CHECKPOINTS))?.ok_or_else(|| {
        Error::Checkpoint(format!("{} has no checkpoint to start from", dir.display()))
    })?;
    let (tensors, _) = checkpoint::load(&ckpt)?;
    let weights = checkpoint::strip(&checkpoint::strip(&tensors, "online"), MODEL_PREFIX);
    let prefix = format!("{MODEL_PREFIX}.");
    let temporal = format!("{prefix}temporal.");
    let has_temporal = weights.keys().any(|k| k.starts_with("temporal."));
    // A view of the variables to fill; they share storage with the system's.
    let towers = candle_nn::VarMap::new();
    {
        let mut view = towers.data().lock().unwrap_or_else(|e| e.into_inner());
        for (name, var) in sorted_vars(&system.online) {
            if name.starts_with(&prefix) && (has_temporal || !name.starts_with(&temporal)) {
                view.insert(name, var);
            }
        }
    }
    cots_encoders::weights::load_tensors(&towers, &weights, &ckpt, &prefix, &[])?;
    tracing::info!(
        "towers initialised from {}{}",
        ckpt.display(),
        if has_temporal || system.cfg.temporal.is_none() {
            ""
        } else {
            " (the temporal head starts fresh)"
        }
    );
    Ok(())
}

/// Restores every checkpointed piece of state into a freshly built system.
fn restore(
    system: &mut System,
    optim: &mut AdamW,
    tensors: &HashMap<String, Tensor>,
    meta: &serde_json::Value,
) -> Result<()> {
    for (prefix, map) in [
        ("online", &system.online),
        ("momentum", &system.momentum_vars),
    ] {
        for (name, var) in sorted_vars(map) {
            let key = format!("{prefix}.{name}");
            let t = tensors
                .get(&key)
                .ok_or_else(|| Error::Checkpoint(format!("tensor `{key}` is missing")))?;
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
    }
    let state = ObjectiveState {
        tensors: checkpoint::strip(tensors, "objectives")
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(&system.device)?)))
            .collect::<Result<_>>()?,
        meta: meta["objectives"].clone(),
    };
    system.objectives.load_state(&state)?;
    optim.load_state(
        &checkpoint::strip(tensors, "optim"),
        meta["optim_step"].as_u64().unwrap_or(0),
    )?;
    Ok(())
}
