//! How is a trained single-stream model decomposed into two fast encoders?
//!
//! VLDeformer's second stage (Zhang et al., 2021): the cross-encoder's joint
//! transformer, weights and all, becomes an image encoder and a text encoder
//! ([`cots_encoders::decomposed`]) that are trained with contrastive
//! learning whose negatives come from both modalities
//! ([`cots_objectives::bimodal`]) on a (small) target set: the training
//! split of the cross-encoder's data, optionally cut to `target_items`.
//! [`DecomposeTask`] is that training; the one [`Loop`] runs it.
//!
//! The output folder ([`RunDir`]) is a run that [`crate::inference::Run::open`]
//! serves like a COTS run (eval, embed, search): `config.toml` (the data and
//! image transform), `decomposed.json` (model config), `tokenizer.json`, the
//! loop's checkpoints and `metrics.jsonl`, and, written atomically after every
//! checkpoint, `decomposed.safetensors` and `decompose.json` (training
//! config, source, step, loss). A killed decomposition resumes exactly.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use cots_data::{Batch, LoaderConfig, Split};
use cots_encoders::decomposed::{self, Decomposed, Pooling};
use cots_objectives::bimodal::{Bimodal, BimodalConfig};
use cots_objectives::{Objectives, StepFeatures};
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::cross::CrossRun;
use crate::inference::Run;
use crate::model::{seed_init, sorted_vars};
use crate::optim::OptimConfig;
use crate::run_dir::RunDir;
use crate::schedule::ScheduleConfig;
use crate::train_loop::{Forward, Loop, LoopConfig, StepContext, Task, TaskData, TaskState};
use crate::trainer::load_dataset;
use crate::{checkpoint, Error, Result};

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
pub fn saved_step(dir: &RunDir) -> Result<u64> {
    if !dir.decompose_record().exists() {
        return Ok(0);
    }
    let meta: SavedMeta = dir.read_json(&dir.decompose_record())?;
    Ok(meta.step)
}

/// Whether the decomposition in `dir` ran to the end (its record's step
/// reached its planned steps).
pub fn finished(dir: &RunDir) -> Result<bool> {
    if !dir.decompose_record().exists() {
        return Ok(false);
    }
    let meta: SavedMeta = dir.read_json(&dir.decompose_record())?;
    Ok(meta.step >= meta.train.steps)
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
    let path = RunDir::new(&source.dir).cross_weights();
    let tensors = cots_encoders::weights::read_safetensors(&path)?;
    cots_encoders::weights::load_tensors(map, &tensors, &path, "joint.", &[])?;
    Ok(model)
}

impl DecomposeConfig {
    fn loop_config(&self) -> LoopConfig {
        LoopConfig {
            steps: self.steps,
            seed: self.seed,
            optim: self.optim.clone(),
            schedule: self.schedule.clone(),
            momentum: 0.0,
            momentum_final: None,
            log_every: 1,
            eval_every: 0,
            checkpoint_every: self.save_every,
            keep_last: 2,
        }
    }
}

/// The decomposition's training: the two encoders over the cross-encoder's
/// weights, the bimodal-negative loss, the target set.
pub struct DecomposeTask<'a> {
    source: &'a CrossRun,
    dc: DecomposeConfig,
    /// The data config written with the run (the cross-encoder's image
    /// transform and text length).
    run_cfg: RunConfig,
    map: VarMap,
    model: Decomposed,
    objective: Objectives,
    /// The training split, tokenizer and batching.
    data: TaskData,
}

impl<'a> DecomposeTask<'a> {
    /// `source` taken apart, to be trained on the training split of `data`
    /// (a run config; its image transform and text length are replaced by
    /// the cross-encoder's).
    pub fn new(source: &'a CrossRun, data: &RunConfig, dc: &DecomposeConfig) -> Result<Self> {
        if dc.batch_size < 2 || dc.steps == 0 || dc.embed_dim == 0 {
            return Err(Error::Config(
                "decompose needs batch_size >= 2, steps >= 1 and embed_dim >= 1".into(),
            ));
        }
        let map = VarMap::new();
        let model = decomposed_from(source, dc.embed_dim, dc.pooling, dc.seed, &map)?;
        let mut objective = Objectives::new(None, None);
        objective.push(1.0, Box::new(Bimodal::new(&dc.loss)?))?;
        let mut run_cfg = data.clone();
        run_cfg.data.image = source.image.clone();
        run_cfg.data.max_text_len = source.cfg.max_text_len;
        let mut train = load_dataset(&run_cfg)?.split(Split::Train)?;
        if dc.target_items > 0 {
            train.items.truncate(dc.target_items);
        }
        let loader = LoaderConfig {
            batch_size: dc.batch_size,
            seed: dc.seed,
            max_text_len: source.cfg.max_text_len,
            image: source.image.clone(),
            on_bad_input: run_cfg.data.on_bad_input,
            ..LoaderConfig::default()
        };
        Ok(Self {
            source,
            dc: dc.clone(),
            run_cfg,
            map,
            model,
            objective,
            data: TaskData {
                train: Arc::new(train),
                tokenizer: Arc::new(source.tokenizer.clone()),
                loader,
            },
        })
    }
}

impl Task for DecomposeTask<'_> {
    /// The step's features, detached: the queue of past batches takes them.
    type Keep = StepFeatures;

    fn label(&self) -> &str {
        "decompose"
    }

    fn data(&self) -> TaskData {
        self.data.clone()
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        sorted_vars(&self.map)
    }

    fn forward(&mut self, b: &Batch, ctx: &StepContext) -> Result<Forward<StepFeatures>> {
        let device = &self.source.device;
        let pixels = b.pixels.to_device(device)?;
        let ids = b.input_ids.to_device(device)?;
        let mask = b.attention_mask.to_device(device)?;
        let rng = ctx.dropout();
        let features = StepFeatures::new(
            self.model.encode_image(&pixels, Some(&rng))?,
            self.model.encode_text(&ids, &mask, Some(&rng))?,
            b.image_ids.to_device(device)?,
            self.model.temperature()?,
        );
        Ok(Forward {
            losses: self.objective.losses(&features)?,
            stats: Vec::new(),
            keep: features.detached()?,
        })
    }

    fn after_step(&mut self, kept: Vec<StepFeatures>) -> Result<()> {
        for features in &kept {
            self.objective.after_step(features)?;
        }
        Ok(())
    }

    fn state(&self) -> Result<TaskState> {
        let state = TaskState::of(&[("model", &self.map)], &self.objective)?;
        Ok(state.with_source(&self.source.weights_hash))
    }

    fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        meta: &serde_json::Value,
    ) -> Result<()> {
        let from = &self.source;
        TaskState::check_source(meta, &from.weights_hash, &from.dir, "decomposition")?;
        let maps = [("model", &self.map)];
        TaskState::restore(
            &maps,
            &mut self.objective,
            tensors,
            meta,
            &self.source.device,
        )
    }

    fn write_run_files(&self, dir: &RunDir) -> Result<()> {
        dir.write_config(&self.run_cfg)?;
        self.data.tokenizer.save(dir.path())?;
        self.model.config().save(dir.decomposed_config())?;
        Ok(())
    }

    fn export(&self, dir: &RunDir, step: u64, loss: f64) -> Result<()> {
        let meta = SavedMeta {
            train: self.dc.clone(),
            source: self.source.dir.display().to_string(),
            source_hash: self.source.weights_hash.clone(),
            step,
            loss: Some(loss),
        };
        checkpoint::save_model(
            &dir.decomposed_weights(),
            &self.map,
            &dir.decompose_record(),
            &meta,
        )
    }
}

/// Decomposes `source` into two encoders trained on the training split of
/// `data` (a run config; its image transform and text length are replaced
/// by the cross-encoder's) in `out`; with `resume`, continues a killed
/// decomposition there. Returns the run opened.
pub fn decompose(
    source: &CrossRun,
    data: &RunConfig,
    out: &Path,
    dc: &DecomposeConfig,
    quiet: bool,
    resume: bool,
) -> Result<Run> {
    let dir = RunDir::create(out)?;
    if !resume && dir.decomposed_config().exists() && dir.decomposed_weights().exists() {
        return Err(Error::Config(format!(
            "{} already holds a decomposed model: choose another output directory, remove it, \
             or pass --resume to continue its training",
            out.display()
        )));
    }
    let task = DecomposeTask::new(source, data, dc)?;
    let mut run = Loop::start(task, dc.loop_config(), dir, resume)?;
    run.run(quiet)?;
    Run::open(out, &source.device)
}
