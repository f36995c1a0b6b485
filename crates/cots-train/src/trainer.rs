//! The COTS task: two towers, their momentum copies, the objectives and the
//! frozen visual tokenizer, trained by the one [`Loop`].
//!
//! [`Cots::new`] builds the complete system from a [`RunConfig`] (towers,
//! pretrained weights, frozen parts, objectives, data); [`Trainer`] is the
//! loop over it. A micro-batch becomes a [`StepBatch`] (MLM and patch masks
//! drawn from generators seeded by the step), [`System::forward`] gives the
//! named losses, and after the optimizer and EMA updates every micro-batch's
//! momentum keys are enqueued.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use cots_data::masking::{block_mask, mlm_mask};
use cots_data::synthetic::vocabulary;
use cots_data::video::{self, MissingPolicy};
use cots_data::{manifest, Dataset, LoaderConfig, Split};
use cots_encoders::momentum::Momentum;
use cots_encoders::weights::{self, HfBertDir};
use cots_encoders::{efficientnet, temporal, two_stream};
use cots_eval::RetrievalReport;
use cots_text::TextTokenizer;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::config::{DataKind, RunConfig};
use crate::inference;
use crate::model::{sorted_vars, Freeze, StepBatch, StepOutput, System, MODEL_PREFIX};
use crate::run_dir::RunDir;
use crate::train_loop::{Forward, Loop, LoopConfig, StepContext, Task, TaskData, TaskState};
use crate::{checkpoint, Error, Result};

pub use crate::train_loop::{RunSummary, StepLog};

/// COTS training: the loop over the [`Cots`] task.
pub type Trainer = Loop<Cots>;

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

/// The COTS task: the system built complete from a run config, and its data.
pub struct Cots {
    pub cfg: RunConfig,
    pub system: System,
    pub tokenizer: Arc<TextTokenizer>,
    /// The whole dataset (validation and test splits are read from it).
    data: Arc<Dataset>,
    /// The training split as the loader reads it.
    train: Arc<Dataset>,
    /// Per item of `train`: whether `data.noisy_pairs` gave it captions
    /// that are not its own (`None` without injected noise). The loader's
    /// `Batch::item_indices` maps each row to its item, so the labels reach
    /// the filter's precision and recall without riding in the batch.
    noisy_items: Option<Arc<Vec<bool>>>,
    loader_cfg: LoaderConfig,
    device: Device,
}

impl Cots {
    /// Builds the system of `cfg` on `device`: towers (pretrained where the
    /// config says), frozen parts, momentum copies, objectives, data.
    pub fn new(mut cfg: RunConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let data = load_dataset(&cfg)?;
        let tokenizer = make_tokenizer(&cfg, &data)?;
        let model_cfg = model_config(&cfg, tokenizer.vocab_size())?;
        // The data must be cut to the size the ViT was built for.
        cfg.data.image.size = model_cfg.vision.image_size;
        let freeze = Freeze {
            lock_text: cfg.model.lock_text,
            // Random crops make every image new: nothing to remember.
            remember_images: cfg.data.random_crop.is_none(),
        };
        let mut system = System::new(
            &model_cfg,
            &cfg.objectives,
            cfg.model.dvae.as_deref(),
            freeze,
            device,
            cfg.train.seed,
        )?;
        load_pretrained(&cfg, &model_cfg, &system)?;
        system.ema.copy_from_online()?;
        // Frozen towers now equal their momentum copies for good: the
        // per-step EMA skips them (27 M of MiniLM + EfficientNet weights).
        let frozen = system.frozen_prefixes();
        system
            .ema
            .retain(|n| !frozen.iter().any(|p| n.starts_with(p)));
        if cfg.is_video() && system.objectives.needs().masked_image {
            return Err(Error::Config(
                "masked vision modeling is not supported on video data (MLM is: it reads the \
                 text); remove MVM from the objectives"
                    .into(),
            ));
        }
        let mut train = data.split(Split::Train)?;
        let mut noisy_items = None;
        if cfg.data.noisy_pairs > 0.0 {
            let clean = train.clone();
            let noisy =
                train.with_noisy_pairs(cfg.data.noisy_pairs, cfg.train.seed ^ 0x004e_015e)?;
            // The label is what a pair is, not what the injection touched: an
            // item handed captions identical to its own is still a right pair.
            noisy_items = Some(Arc::new(
                clean
                    .items
                    .iter()
                    .zip(&train.items)
                    .map(|(a, b)| a.captions != b.captions)
                    .collect(),
            ));
            tracing::info!(
                "noisy pairs: {} of {} training images carry another image's captions",
                noisy.len(),
                train.items.len()
            );
        }
        let loader_cfg = LoaderConfig {
            batch_size: cfg.data.batch_size,
            seed: cfg.train.seed,
            max_text_len: cfg.data.max_text_len,
            prefetch: 4,
            image: cfg.data.image.clone(),
            random_crop: cfg.data.random_crop,
            on_bad_input: cfg.data.on_bad_input,
        };
        Ok(Self {
            cfg,
            system,
            tokenizer: Arc::new(tokenizer),
            data: Arc::new(data),
            train: Arc::new(train),
            noisy_items,
            loader_cfg,
            device: device.clone(),
        })
    }

    /// The loop settings of the run config.
    pub fn loop_config(&self) -> LoopConfig {
        let (c, t) = (&self.cfg, &self.cfg.train);
        LoopConfig {
            steps: t.steps,
            seed: t.seed,
            optim: c.optim.clone(),
            schedule: c.schedule.clone(),
            momentum: t.momentum,
            momentum_final: t.momentum_final,
            log_every: t.log_every,
            eval_every: t.eval_every,
            checkpoint_every: t.checkpoint_every,
            keep_last: t.keep_last,
        }
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

    /// The batch on the training device, with the masks the objectives need.
    ///
    /// The masks are drawn here on the host, so the masked positions (and
    /// MLM's targets) are found here too and uploaded with the batch: the
    /// MVLM loss then only gathers on the device.
    fn to_step_batch(&self, b: &cots_data::Batch, ctx: &StepContext) -> Result<StepBatch> {
        let needs = self.system.objectives.needs();
        let dev = &self.device;
        let (bsz, len) = b.input_ids.dims2()?;
        let mlm = if needs.masked_text {
            let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed_for(1));
            let (ids, labels) = mlm_mask(
                &b.ids_host,
                &b.mask_host,
                &self.tokenizer.special(),
                self.tokenizer.vocab_size(),
                self.cfg.train.mlm_prob,
                &mut rng,
            );
            Some(crate::model::MaskedTextBatch::from_host(
                ids,
                &labels,
                (bsz, len),
                self.system.cfg.text.vocab_size,
                dev,
            )?)
        } else {
            None
        };
        let mvm = if needs.masked_image {
            let g = self.system.cfg.vision.image_size / self.system.cfg.vision.patch_size;
            let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed_for(2));
            let m: Vec<u8> = (0..bsz)
                .flat_map(|_| block_mask(g, g, self.cfg.train.mvm_ratio, &mut rng))
                .collect();
            Some(crate::model::MaskedPatchBatch::from_host(
                m,
                (bsz, g * g),
                dev,
            )?)
        } else {
            None
        };
        Ok(StepBatch {
            pixels: b.pixels.to_device(dev)?,
            input_ids: b.input_ids.to_device(dev)?,
            attention_mask: b.attention_mask.to_device(dev)?,
            image_ids: b.image_ids.to_device(dev)?,
            mlm,
            mvm,
        })
    }
}

impl Task for Cots {
    type Keep = StepOutput;

    fn label(&self) -> &str {
        "train"
    }

    fn data(&self) -> TaskData {
        TaskData {
            train: self.train.clone(),
            tokenizer: self.tokenizer.clone(),
            loader: self.loader_cfg.clone(),
        }
    }

    fn trainable(&self) -> Vec<(String, candle_core::Var)> {
        self.system.trainable()
    }

    fn ema(&self) -> Option<&Momentum> {
        Some(&self.system.ema)
    }

    fn forward(
        &mut self,
        batch: &cots_data::Batch,
        ctx: &StepContext,
    ) -> Result<Forward<StepOutput>> {
        let sb = self.to_step_batch(batch, ctx)?;
        // The queue stamps this step's keys with the step (for their age).
        let queue = self.system.objectives.queue().cloned();
        if let Some(q) = &queue {
            q.lock().set_step(ctx.step);
        }
        let out = self.system.forward(&sb, Some(&ctx.dropout()))?;
        let mut stats = match &out.amf {
            Some(a) => amf_stats(a, self.noisy_items.as_deref(), &batch.item_indices)?,
            None => Vec::new(),
        };
        // The diagnostics cost a [B, K] product and host reads: only on the
        // steps whose metrics record is written.
        let (done, t) = (ctx.step + 1, &self.cfg.train);
        if done.is_multiple_of(t.log_every.max(1)) || done == t.steps {
            stats.extend(instance_diagnostics(&out, queue.as_ref())?);
        }
        Ok(Forward {
            losses: out.losses.clone(),
            stats,
            keep: out,
        })
    }

    fn after_step(&mut self, kept: Vec<StepOutput>) -> Result<()> {
        for out in &kept {
            self.system.enqueue(out)?;
        }
        Ok(())
    }

    fn state(&self) -> Result<TaskState> {
        let s = &self.system;
        let maps = [("online", &s.online), ("momentum", &s.momentum_vars)];
        let mut state = TaskState::of(&maps, &s.objectives)?;
        state.meta.insert("config".into(), json!(self.cfg));
        Ok(state)
    }

    fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        meta: &serde_json::Value,
    ) -> Result<()> {
        let s = &mut self.system;
        let maps = [("online", &s.online), ("momentum", &s.momentum_vars)];
        TaskState::restore(&maps, &mut s.objectives, tensors, meta, &s.device)
    }

    fn write_run_files(&self, dir: &RunDir) -> Result<()> {
        dir.write_config(&self.cfg)?;
        self.system.cfg.save(dir.model_config())?;
        self.tokenizer.save(dir.path())?;
        Ok(())
    }

    fn validate(&self) -> Result<Option<RetrievalReport>> {
        self.evaluate(Split::Val).map(Some)
    }

    fn finish(&self) {
        let s = &self.system;
        for (what, tower) in [("image", &s.frozen_image), ("text", &s.locked_text)] {
            let Some(c) = tower.as_ref().map(|t| &t.cache) else {
                continue;
            };
            if c.hits + c.misses > 0 {
                tracing::info!(
                    "frozen {what} tower: {} inputs remembered, {} of {} rows looked up",
                    c.len(),
                    c.hits,
                    c.hits + c.misses
                );
            }
        }
    }
}

/// What the adaptive momentum filter did this step, logged every step
/// (issue #31): the dropped fraction, whether the rule was active, the
/// batch's median rank (rank rule), and, when noise was injected, its
/// precision and recall against the labels (`amf_precision`, `amf_recall`,
/// absent on a step where they are undefined: nothing dropped, no noisy
/// pair), the counts they come from (`amf_dropped`, `amf_noisy`,
/// `amf_true_drops`, to pool over steps), and the mean decision score of
/// the noisy and the clean rows (`amf_score_noisy`, `amf_score_clean`).
fn amf_stats(
    a: &cots_objectives::amf::AmfStats,
    noisy_items: Option<&Vec<bool>>,
    item_indices: &[usize],
) -> Result<Vec<(String, f64)>> {
    let mut stats = vec![
        ("amf_filtered".to_string(), a.filtered_fraction),
        ("amf_active".to_string(), f64::from(u8::from(a.active))),
    ];
    if let Some(m) = a.median_rank {
        stats.push(("amf_median_rank".to_string(), m));
    }
    let Some(labels) = noisy_items else {
        return Ok(stats);
    };
    let noisy: Vec<bool> = item_indices
        .iter()
        .map(|&i| labels.get(i).copied().unwrap_or(false))
        .collect();
    let d = cots_objectives::amf::detection(&a.dropped, &noisy)?;
    for (k, v) in [
        ("amf_dropped", d.dropped),
        ("amf_noisy", d.noisy),
        ("amf_true_drops", d.true_drops),
    ] {
        stats.push((k.to_string(), v as f64));
    }
    for (k, v) in [("amf_precision", d.precision), ("amf_recall", d.recall)] {
        if let Some(v) = v {
            stats.push((k.to_string(), v));
        }
    }
    for (k, want) in [("amf_score_noisy", true), ("amf_score_clean", false)] {
        let rows: Vec<f64> = a
            .row_scores
            .iter()
            .zip(&noisy)
            .filter(|(_, &n)| n == want)
            .map(|(&s, _)| s)
            .collect();
        if !rows.is_empty() {
            stats.push((k.to_string(), rows.iter().sum::<f64>() / rows.len() as f64));
        }
    }
    Ok(stats)
}

/// Diagnostics of the instance level, logged every step (issue #31): the
/// learned temperature, how far the momentum keys lag the online embeddings
/// of the same pairs (mean cosine; both are L2-normalised), collapse checks,
/// the age in optimizer steps of the queue's written slots, read before
/// this step's enqueue, i.e. the negatives this step used.
fn instance_diagnostics(
    out: &StepOutput,
    queue: Option<&cots_objectives::SharedQueue>,
) -> Result<Vec<(String, f64)>> {
    let mut stats = Vec::new();
    let x = &out.features;
    let scalar = |t: &Tensor| -> Result<f64> {
        Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
    };
    stats.push(("temperature".to_string(), scalar(&x.temperature)?));
    // Collapse check: the mean cosine between the embeddings of
    // different pairs of the batch (1 when a tower maps everything to
    // one point), online and momentum.
    let spread = |e: &Tensor| -> Result<f64> {
        let b = e.dim(0)? as f64;
        let total = scalar(&e.matmul(&e.t()?)?.sum_all()?)?;
        Ok((total - b) / (b * (b - 1.0)).max(1.0))
    };
    stats.push(("pair_cos_image".to_string(), spread(&x.image_embed)?));
    stats.push(("pair_cos_text".to_string(), spread(&x.text_embed)?));
    if let Some(m) = &x.momentum {
        stats.push(("pair_cos_image_m".to_string(), spread(&m.image)?));
        stats.push(("pair_cos_text_m".to_string(), spread(&m.text)?));
        let cos = |a: &Tensor, b: &Tensor| -> Result<f64> { scalar(&(a * b)?.sum(1)?.mean_all()?) };
        stats.push((
            "cos_momentum_image".to_string(),
            cos(&x.image_embed, &m.image)?,
        ));
        stats.push((
            "cos_momentum_text".to_string(),
            cos(&x.text_embed, &m.text)?,
        ));
    }
    // The shortcut check: the mean cosine of the image queries with the
    // momentum text keys of their own pairs, of the other pairs of this
    // batch, and of the queue's written slots. Keys from older momentum
    // towers that sit apart from this step's keys (queue << batch) can
    // be told apart by age instead of content.
    if let (Some(m), Some(q)) = (&x.momentum, queue) {
        let b = x.image_embed.dim(0)? as f64;
        let sims = x.image_embed.matmul(&m.text.t()?)?;
        let pos = scalar(&(&x.image_embed * &m.text)?.sum_all()?)?;
        let all = scalar(&sims.sum_all()?)?;
        stats.push(("i2t_cos_pos".to_string(), pos / b));
        stats.push((
            "i2t_cos_batch_neg".to_string(),
            (all - pos) / (b * (b - 1.0)).max(1.0),
        ));
        let view = q.view();
        let written = view
            .ids
            .ne(cots_ops::queue::EMPTY_SLOT)?
            .to_dtype(x.image_embed.dtype())?;
        let n = scalar(&written.sum_all()?)?;
        if n > 0.0 {
            let per_slot = x
                .image_embed
                .matmul(&view.text.to_dtype(x.image_embed.dtype())?.t()?)?
                .sum(0)?;
            let queue_sum = scalar(&(per_slot * written)?.sum_all()?)?;
            stats.push(("i2t_cos_queue".to_string(), queue_sum / (n * b)));
        }
    }
    if let Some(age) = queue.and_then(|q| q.lock().staleness()) {
        stats.push(("queue_age_mean".to_string(), age.mean));
        stats.push(("queue_age_max".to_string(), age.max as f64));
        stats.push(("queue_filled".to_string(), age.filled));
    }
    Ok(stats)
}

impl Loop<Cots> {
    /// Prepares the COTS run of `cfg` in `cfg.train.out`; with `resume`,
    /// continues from its newest complete checkpoint.
    pub fn new(cfg: RunConfig, device: &Device, resume: bool) -> Result<Self> {
        let dir = RunDir::create(&cfg.train.out)?;
        let task = Cots::new(cfg, device)?;
        let settings = task.loop_config();
        Loop::start(task, settings, dir, resume)
    }

    /// Retrieval metrics on a split of the run's dataset.
    pub fn evaluate(&self, split: Split) -> Result<RetrievalReport> {
        self.task.evaluate(split)
    }

    /// The run folder.
    pub fn out_dir(&self) -> &Path {
        self.dir().path()
    }

    /// The first micro-batch the next [`Loop::train_step`] will train on,
    /// exactly as that step will see it (same pixels, tokens and masks),
    /// without consuming it. For inspecting the step from outside (tests
    /// check the EMA and the enqueue against it); it loads the batch a
    /// second time, so the loop never calls it.
    pub fn peek_batch(&self) -> Result<StepBatch> {
        let position = self.loader_position();
        let t = &self.task;
        let order =
            cots_data::loader::epoch_order(&t.train.pairs(), t.loader_cfg.seed, position.epoch);
        let first = position.batch as usize * t.loader_cfg.batch_size;
        let pairs = order
            .get(first..first + t.loader_cfg.batch_size)
            .ok_or_else(|| Error::Config(format!("no batch at loader position {position:?}")))?;
        let batch =
            cots_data::loader::make_batch(&t.train, &t.tokenizer, &t.loader_cfg, pairs, position)?;
        let ctx = StepContext {
            seed: self.cfg.seed,
            step: self.step(),
            micro: 0,
        };
        t.to_step_batch(&batch, &ctx)
    }
}

/// Loads the pretrained weights the config names into `system`'s online
/// towers: a Hugging Face BERT for the text tower, the EfficientNet for the
/// CNN image tower, or a whole earlier run (`model.init`).
fn load_pretrained(cfg: &RunConfig, model_cfg: &two_stream::Config, system: &System) -> Result<()> {
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
        init_towers(system, dir)?;
    }
    Ok(())
}

/// Loads the towers of the newest checkpoint of run `dir` into `system`'s
/// online variables. A temporal head missing from the checkpoint (a video
/// run started from an image-text run) keeps its fresh weights.
fn init_towers(system: &System, dir: &Path) -> Result<()> {
    let ckpt = RunDir::new(dir).latest_checkpoint()?.ok_or_else(|| {
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
