//! How is the single-stream baseline trained and used for retrieval?
//!
//! - [`CrossTask`]: image-text matching (ITM) on the same data as a trained
//!   two-stream run, with hard negatives mined from that run's contrastive
//!   similarities (ALBEF's sampling: for each image a caption of another
//!   image drawn with probability `softmax(sim / tau)`, and for each caption
//!   an image the same way), so every positive has two negatives; trained by
//!   the one [`Loop`] ([`train_cross`]);
//! - [`CrossRun`]: a trained cross-encoder opened for scoring;
//! - [`CrossScorer`]: scores every (image, text) pair in batches: what
//!   single-stream retrieval costs;
//! - [`hybrid_evaluate`]: two-stream top-k, rescored by the cross-encoder
//!   (the ALBEF/X-VLM two-stage recipe).
//!
//! A cross-encoder folder ([`RunDir`]) holds the loop's checkpoints and
//! `metrics.jsonl`, and after every checkpoint the serving files
//! `cross.json` (model config, training config, the mining run's weights
//! hash, step) and `cross.safetensors`, plus `tokenizer.json`. A killed
//! training resumes exactly with `resume`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use cots_data::image_io::{load_pixels, ImageConfig};
use cots_data::{Batch, Dataset, ImageSource, LoaderConfig, Split};
use cots_encoders::cross::{self, match_score, CrossEncoder};
use cots_encoders::two_stream::TwoStream;
use cots_eval::{evaluate_scorer, EvalOptions, MatrixScorer, PairScorer, RetrievalReport};
use cots_objectives::itm::{HardNegativeSampler, Itm, ItmConfig};
use cots_objectives::{MatchLogits, Objectives, StepFeatures};
use cots_text::TextTokenizer;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::inference::{load_frozen, Run};
use crate::model::{seed_init, sorted_vars};
use crate::optim::OptimConfig;
use crate::run_dir::RunDir;
use crate::schedule::ScheduleConfig;
use crate::train_loop::{Forward, Loop, LoopConfig, StepContext, Task, TaskData, TaskState};
use crate::trainer::load_dataset;
use crate::{checkpoint, Error, Result};

/// Settings of [`train_cross`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CrossTrainConfig {
    pub steps: u64,
    /// Positive pairs per step (each brings two sampled negatives).
    pub batch_size: usize,
    pub optim: OptimConfig,
    pub schedule: ScheduleConfig,
    /// Temperature of the hard-negative sampling softmax.
    pub negative_tau: f64,
    pub seed: u64,
    /// Save every this many steps (and at the end); 0 saves only at the end.
    pub save_every: u64,
}

impl Default for CrossTrainConfig {
    fn default() -> Self {
        Self {
            steps: 400,
            batch_size: 32,
            optim: OptimConfig {
                lr: 2e-4,
                ..OptimConfig::default()
            },
            schedule: ScheduleConfig {
                warmup_steps: 40,
                ..ScheduleConfig::default()
            },
            negative_tau: 0.05,
            seed: 0,
            save_every: 100,
        }
    }
}

impl CrossTrainConfig {
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

/// A trained cross-encoder, opened for scoring.
pub struct CrossRun {
    pub dir: PathBuf,
    pub cfg: cross::Config,
    pub model: CrossEncoder,
    pub tokenizer: TextTokenizer,
    pub image: ImageConfig,
    pub step: u64,
    /// The ITM loss of the last training step.
    pub loss: Option<f64>,
    /// The steps its training was set to run.
    pub planned_steps: u64,
    /// The config of the run it was trained with (its data), when recorded.
    pub run_cfg: Option<RunConfig>,
    /// Hash of the weights.
    pub weights_hash: String,
    pub device: Device,
}

#[derive(Serialize, Deserialize)]
struct SavedMeta {
    model: cross::Config,
    image: ImageConfig,
    train: CrossTrainConfig,
    /// Weights hash of the two-stream run that mined the negatives.
    miner: String,
    step: u64,
    /// The ITM loss of the last step trained.
    #[serde(default)]
    loss: Option<f64>,
    /// The mining run's config: its data are the cross-encoder's data
    /// (absent in directories written before it was recorded).
    #[serde(default)]
    run: Option<RunConfig>,
}

/// The cross-encoder's training: ITM with negatives mined by a frozen
/// two-stream run.
pub struct CrossTask<'a> {
    miner: &'a Run,
    towers: &'a TwoStream,
    tc: CrossTrainConfig,
    cfg: cross::Config,
    map: VarMap,
    model: CrossEncoder,
    itm: Objectives,
    temperature: Tensor,
    /// The training split, tokenizer and batching.
    data: TaskData,
}

impl<'a> CrossTask<'a> {
    /// A fresh cross-encoder the size of `miner`'s model, on `miner`'s
    /// training split.
    pub fn new(miner: &'a Run, tc: &CrossTrainConfig) -> Result<Self> {
        if tc.batch_size < 2 || tc.steps == 0 || tc.negative_tau <= 0.0 {
            return Err(Error::Config(
                "train-cross needs batch_size >= 2, steps >= 1 and negative_tau > 0".into(),
            ));
        }
        let towers = miner.two_stream("train-cross (hard-negative mining)")?;
        let cfg = cross::Config::matching(towers.config());
        let map = VarMap::new();
        let model = CrossEncoder::new(
            &cfg,
            VarBuilder::from_varmap(&map, DType::F32, &miner.device),
        )?;
        seed_init(&map, tc.seed)?;
        let mut itm = Objectives::new(None, None);
        itm.push(1.0, Box::new(Itm::new(&ItmConfig::default())))?;
        let train = Arc::new(load_dataset(&miner.cfg)?.split(Split::Train)?);
        let loader = LoaderConfig {
            batch_size: tc.batch_size,
            seed: tc.seed,
            max_text_len: cfg.max_text_len,
            image: miner.image_config(),
            on_bad_input: miner.cfg.data.on_bad_input,
            ..LoaderConfig::default()
        };
        Ok(Self {
            miner,
            towers,
            tc: tc.clone(),
            cfg,
            map,
            model,
            itm,
            temperature: towers.temperature()?.detach(),
            data: TaskData {
                train,
                tokenizer: Arc::new(miner.tokenizer.clone()),
                loader,
            },
        })
    }

    fn saved_meta(&self, step: u64, loss: Option<f64>) -> SavedMeta {
        SavedMeta {
            model: self.cfg.clone(),
            image: self.data.loader.image.clone(),
            train: self.tc.clone(),
            miner: self.miner.weights_hash.clone(),
            step,
            loss,
            run: Some(self.miner.cfg.clone()),
        }
    }
}

impl Task for CrossTask<'_> {
    type Keep = ();

    fn label(&self) -> &str {
        "train-cross"
    }

    fn data(&self) -> TaskData {
        self.data.clone()
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        sorted_vars(&self.map)
    }

    fn forward(&mut self, b: &Batch, ctx: &StepContext) -> Result<Forward<()>> {
        let device = &self.miner.device;
        let pixels = b.pixels.to_device(device)?;
        let ids = b.input_ids.to_device(device)?;
        let mask = b.attention_mask.to_device(device)?;
        let image_ids = b.image_ids.to_device(device)?;
        // Mining: the frozen two-stream model's similarities.
        let f = self
            .towers
            .encode_image(&pixels, None, None)?
            .embed
            .detach();
        let t = self
            .towers
            .encode_text(&ids, Some(&mask), None)?
            .embed
            .detach();
        let sim = f.matmul(&t.t()?)?;
        let owners = b.image_ids.to_vec1::<u32>()?;
        let mut sampler = HardNegativeSampler::new(ctx.seed_for(0x17a3));
        let neg_text = sampler.sample(&sim, &owners, &owners, self.tc.negative_tau)?;
        let neg_image = sampler.sample(&sim.t()?, &owners, &owners, self.tc.negative_tau)?;
        // Pairs: every positive, each image with a hard caption, each caption
        // with a hard image (rows whose whole batch shares their id have none).
        let n = owners.len();
        let (mut img_rows, mut txt_rows, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            img_rows.push(i as u32);
            txt_rows.push(i as u32);
            labels.push(1u32);
        }
        for (i, j) in neg_text.iter().enumerate() {
            if let Some(j) = j {
                img_rows.push(i as u32);
                txt_rows.push(*j as u32);
                labels.push(0);
            }
        }
        for (j, i) in neg_image.iter().enumerate() {
            if let Some(i) = i {
                img_rows.push(*i as u32);
                txt_rows.push(j as u32);
                labels.push(0);
            }
        }
        let rng = ctx.dropout();
        let img_tok = self.model.embed_image(&pixels, Some(&rng))?;
        let txt_tok = self.model.embed_text(&ids, Some(&rng))?;
        let img_idx = Tensor::new(img_rows.as_slice(), device)?;
        let txt_idx = Tensor::new(txt_rows.as_slice(), device)?;
        let logits = self.model.joint(
            &txt_tok.index_select(&txt_idx, 0)?,
            &mask.index_select(&txt_idx, 0)?,
            &img_tok.index_select(&img_idx, 0)?,
            Some(&rng),
        )?;
        let features = StepFeatures::new(f, t, image_ids, self.temperature.clone()).with_matching(
            MatchLogits {
                logits,
                labels: Tensor::new(labels.as_slice(), device)?,
            },
        );
        Ok(Forward {
            losses: self.itm.losses(&features)?,
            stats: Vec::new(),
            keep: (),
        })
    }

    fn state(&self) -> Result<TaskState> {
        let state = TaskState::of(&[("model", &self.map)], &self.itm)?;
        Ok(state.with_source(&self.miner.weights_hash))
    }

    fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        meta: &serde_json::Value,
    ) -> Result<()> {
        let from = &self.miner;
        TaskState::check_source(meta, &from.weights_hash, &from.dir, "cross-encoder")?;
        let maps = [("model", &self.map)];
        TaskState::restore(&maps, &mut self.itm, tensors, meta, &self.miner.device)
    }

    fn write_run_files(&self, dir: &RunDir) -> Result<()> {
        self.data.tokenizer.save(dir.path())?;
        Ok(())
    }

    fn export(&self, dir: &RunDir, step: u64, loss: f64) -> Result<()> {
        checkpoint::save_model(
            &dir.cross_weights(),
            &self.map,
            &dir.cross_config(),
            &self.saved_meta(step, Some(loss)),
        )
    }
}

/// Trains a cross-encoder the size of `miner`'s model on `miner`'s training
/// split in `out`; with `resume`, continues a killed training there. Returns
/// it opened.
pub fn train_cross(
    miner: &Run,
    out: &Path,
    tc: &CrossTrainConfig,
    quiet: bool,
    resume: bool,
) -> Result<CrossRun> {
    let dir = RunDir::create(out)?;
    if !resume && dir.cross_config().exists() && dir.cross_weights().exists() {
        return Err(Error::Config(format!(
            "{} already holds a cross-encoder: choose another output directory, remove it, \
             or pass --resume to continue its training",
            out.display()
        )));
    }
    let task = CrossTask::new(miner, tc)?;
    let mut run = Loop::start(task, tc.loop_config(), dir, resume)?;
    run.run(quiet)?;
    CrossRun::open(out, &miner.device)
}

impl CrossRun {
    /// Opens a directory written by [`train_cross`].
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        let run_dir = RunDir::new(dir);
        let meta: SavedMeta = run_dir.read_json(&run_dir.cross_config())?;
        let weights = run_dir.cross_weights();
        let tensors = candle_core::safetensors::load(&weights, device)
            .map_err(|e| Error::Checkpoint(format!("{}: {e}", weights.display())))?;
        let model = load_frozen(&tensors, &weights, device, |vb| {
            CrossEncoder::new(&meta.model, vb)
        })?;
        Ok(Self {
            run_cfg: meta.run,
            weights_hash: checkpoint::weights_hash(&tensors)?,
            dir: dir.to_path_buf(),
            cfg: meta.model,
            model,
            tokenizer: TextTokenizer::from_dir(dir)?,
            image: meta.image,
            step: meta.step,
            loss: meta.loss,
            planned_steps: meta.train.steps,
            device: device.clone(),
        })
    }

    /// Whether its training ran to the end (not killed or interrupted).
    pub fn finished(&self) -> bool {
        self.step >= self.planned_steps
    }

    /// A scorer over every image and caption of `data`.
    pub fn scorer(&self, data: &Dataset, pair_batch: usize) -> Result<CrossScorer<'_>> {
        let sources: Vec<ImageSource> = data.items.iter().map(|i| i.source.clone()).collect();
        let (texts, _) = data.queries();
        CrossScorer::new(
            &self.model,
            &self.tokenizer,
            &sources,
            &texts,
            &self.image,
            pair_batch,
            &self.device,
        )
    }

    /// Full single-stream retrieval on `data`: every pair scored.
    pub fn evaluate(&self, data: &Dataset) -> Result<RetrievalReport> {
        self.evaluate_with(data, &EvalOptions::default())
    }

    /// [`Self::evaluate`] with other options (e.g. the dual-softmax row);
    /// the similarity tile is always 64 query rows.
    pub fn evaluate_with(&self, data: &Dataset, opts: &EvalOptions) -> Result<RetrievalReport> {
        let (_, targets) = data.queries();
        let scorer = self.scorer(data, 256)?;
        Ok(evaluate_scorer(
            &scorer,
            &targets,
            &EvalOptions {
                block: 64,
                ..opts.clone()
            },
            "image",
        )?)
    }
}

/// Scores (image, text) pairs with the joint transformer. The embedding
/// layers run once per image and per text up front; the joint stack runs
/// once per pair, `pair_batch` pairs at a time.
pub struct CrossScorer<'a> {
    model: &'a CrossEncoder,
    images: Tensor,
    texts: Tensor,
    masks: Tensor,
    pair_batch: usize,
}

impl<'a> CrossScorer<'a> {
    pub fn new(
        model: &'a CrossEncoder,
        tokenizer: &TextTokenizer,
        images: &[ImageSource],
        texts: &[String],
        image: &ImageConfig,
        pair_batch: usize,
        device: &Device,
    ) -> Result<Self> {
        if images.is_empty() || texts.is_empty() {
            return Err(Error::Config(
                "the cross-encoder needs images and texts to score".into(),
            ));
        }
        let mut img = Vec::new();
        for chunk in images.chunks(64) {
            let pixels: Vec<Vec<f32>> = chunk
                .par_iter()
                .map(|s| load_pixels(s, image))
                .collect::<std::result::Result<_, _>>()?;
            let t = Tensor::from_vec(
                pixels.concat(),
                (chunk.len(), 3, image.size, image.size),
                device,
            )?;
            // Detached: kept for many pairs, they must not hold the graph.
            img.push(model.embed_image(&t, None)?.detach());
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let (ids, masks) = tokenizer
            .encode_batch(&refs, model.config().max_text_len)?
            .to_tensors(device)?;
        Ok(Self {
            model,
            images: Tensor::cat(&img, 0)?,
            texts: model.embed_text(&ids, None)?.detach(),
            masks,
            pair_batch: pair_batch.max(1),
        })
    }

    /// Scores of the listed `(image, text)` pairs, in order.
    pub fn score_pairs(&self, pairs: &[(usize, usize)]) -> Result<Vec<f32>> {
        let dev = self.images.device();
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(self.pair_batch) {
            let ii: Vec<u32> = chunk.iter().map(|p| p.0 as u32).collect();
            let tt: Vec<u32> = chunk.iter().map(|p| p.1 as u32).collect();
            let ii = Tensor::new(ii.as_slice(), dev)?;
            let tt = Tensor::new(tt.as_slice(), dev)?;
            let logits = self.model.joint(
                &self.texts.index_select(&tt, 0)?,
                &self.masks.index_select(&tt, 0)?,
                &self.images.index_select(&ii, 0)?,
                None,
            )?;
            out.extend(
                match_score(&logits)?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(out)
    }
}

impl PairScorer for CrossScorer<'_> {
    fn n_images(&self) -> usize {
        self.images.dim(0).unwrap_or(0)
    }
    fn n_texts(&self) -> usize {
        self.texts.dim(0).unwrap_or(0)
    }
    fn score_block(
        &self,
        images: std::ops::Range<usize>,
        texts: std::ops::Range<usize>,
    ) -> cots_eval::Result<Vec<f32>> {
        let pairs: Vec<(usize, usize)> = images
            .flat_map(|i| texts.clone().map(move |t| (i, t)))
            .collect();
        self.score_pairs(&pairs)
            .map_err(|e| cots_eval::Error::Scorer(e.to_string()))
    }
}

/// Two-stage retrieval: each query's top `k` by the two-stream similarity
/// `sim` (`[N images, M texts]`), reordered by `score_pairs` (the
/// cross-encoder: [`CrossScorer::score_pairs`]); the rest keep their
/// two-stream order below them. Returns the report and the number of pairs
/// re-scored (cross-encoder passes).
pub fn hybrid_evaluate(
    sim: &Tensor,
    score_pairs: impl Fn(&[(usize, usize)]) -> Result<Vec<f32>>,
    targets: &[usize],
    k: usize,
) -> Result<(RetrievalReport, usize)> {
    let (n, m) = sim.dims2()?;
    let s = sim.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let best_first = |a: (usize, f32), b: (usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    // Each query's candidates: image queries first (k_i texts each), then
    // text queries (k_t images each), as (image, text) pairs.
    let (k_i, k_t) = (k.min(m), k.min(n));
    let mut pairs = Vec::with_capacity(n * k_i + m * k_t);
    for (i, row) in s.iter().enumerate() {
        let mut order: Vec<usize> = (0..m).collect();
        order.sort_by(|&a, &b| best_first((a, row[a]), (b, row[b])));
        pairs.extend(order[..k_i].iter().map(|&j| (i, j)));
    }
    let columns: Vec<Vec<f32>> = (0..m)
        .map(|j| s.iter().map(|row| row[j]).collect())
        .collect();
    for (j, col) in columns.iter().enumerate() {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| best_first((a, col[a]), (b, col[b])));
        pairs.extend(order[..k_t].iter().map(|&i| (i, j)));
    }
    let scores = score_pairs(&pairs)?;
    if scores.len() != pairs.len() {
        return Err(Error::Config(format!(
            "the re-ranker returned {} scores for {} pairs",
            scores.len(),
            pairs.len()
        )));
    }
    // Re-ranked candidates get scores a whole number of units above every
    // two-stream similarity, best cross score highest (no rounding can tie
    // them); the other items keep their two-stream score and order below.
    let top = s.iter().flatten().fold(f32::MIN, |a, &b| a.max(b));
    let lift = |p: usize, k: usize| top + 1.0 + (k - p) as f32;
    // Writes one direction's re-ranked groups (`k` candidates per query)
    // into a copy of the similarity matrix; `by_text` says which side of a
    // pair breaks ties.
    let rerank = |pairs: &[(usize, usize)], scores: &[f32], k: usize, by_text: bool| {
        let mut out = s.clone();
        for (group, sc) in pairs.chunks(k.max(1)).zip(scores.chunks(k.max(1))) {
            let key = |q: usize| if by_text { group[q].1 } else { group[q].0 };
            let mut idx: Vec<usize> = (0..group.len()).collect();
            idx.sort_by(|&a, &b| best_first((key(a), sc[a]), (key(b), sc[b])));
            for (p, q) in idx.into_iter().enumerate() {
                let (i, j) = group[q];
                out[i][j] = lift(p, k);
            }
        }
        out
    };
    let (row_pairs, col_pairs) = pairs.split_at(n * k_i);
    let (row_scores, col_scores) = scores.split_at(n * k_i);
    let i2t = rerank(row_pairs, row_scores, k_i, true);
    let t2i = rerank(col_pairs, col_scores, k_t, false);
    let opts = EvalOptions::default();
    let eval = |v: Vec<Vec<f32>>| -> Result<RetrievalReport> {
        let scorer = MatrixScorer::new(v.concat(), n, m)?;
        Ok(evaluate_scorer(&scorer, targets, &opts, "image")?)
    };
    let from_t2i = eval(t2i)?;
    let mut report = eval(i2t)?;
    report.t2i = from_t2i.t2i;
    report.rsum = report
        .i2t
        .recall
        .iter()
        .chain(&report.t2i.recall)
        .map(|r| r.1)
        .sum();
    Ok((report, pairs.len()))
}
