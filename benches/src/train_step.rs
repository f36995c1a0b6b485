//! The real COTS training step at three sizes, with its batches prepared
//! before any timing (issue #23). Shared by the criterion bench
//! (benches/benches/train_step.rs) and the `step_profile` binary
//! (per-phase times, perf runs, the spec the PyTorch reference reads).
//!
//! A [`Rig`] is a [`Trainer`] (`Loop<Cots>`, the loop `cots train` runs)
//! built from a [`RunConfig`], plus a few batches made by the loader's own
//! [`make_batch`] from the synthetic dataset. [`Rig::step`] hands them to
//! [`Trainer::train_step_on`]: forward (online and momentum towers, ITC over
//! the queue, KL), backward, global-norm clipping, AdamW, EMA and enqueue,
//! exactly as in training. What is left out: the loader (its worker fills
//! its prefetch channel once, during warm-up, then blocks), the per-step
//! diagnostics logged every `log_every` steps, validation and checkpoints.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use cots_data::loader::{epoch_order, make_batch};
use cots_data::{Batch, LoaderPosition};
use cots_encoders::two_stream::{self, Preset};
use cots_train::config::RunConfig;
use cots_train::optim::{self, AdamW, Grads};
use cots_train::train_loop::{StepContext, Task};
use cots_train::trainer::{StepLog, Trainer};
use serde_json::json;

/// The three sizes of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// configs/demo.toml: ViT 3x128 on 64 px, BERT 2x128, batch 32, ITC +
    /// KL over a 4,096-slot queue.
    Demo,
    /// The `small` preset (ViT 4x256 on 64 px, BERT 4x256 with dropout 0.1)
    /// with the demo's data, objectives and queue, batch 32.
    Small,
    /// ViT-B/16 at 224 px + BERT-base (30,522 pieces, dropout 0.1), 32
    /// tokens, batch 8, ITC + KL over ALBEF's 65,536-slot queue.
    Base,
}

impl Size {
    pub const ALL: [Size; 3] = [Size::Demo, Size::Small, Size::Base];

    pub fn name(self) -> &'static str {
        match self {
            Size::Demo => "demo",
            Size::Small => "small",
            Size::Base => "base",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|z| z.name() == s)
            .with_context(|| format!("unknown size `{s}` (demo, small, base)"))
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Training images of the synthetic dataset the batches are drawn from
/// (fewer than the demo's 20,000: only a few batches are ever made).
const SYNTHETIC_TRAIN: usize = 512;
/// Distinct batches cycled through by [`Rig::step`].
const BATCHES: usize = 4;

/// The run config of `size`, writing into `dir` (the run folder and, for
/// `base`, the model config file).
pub fn run_config(size: Size, dir: &Path) -> Result<RunConfig> {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/demo.toml");
    let mut cfg = RunConfig::load(&demo)?;
    cfg.data.synthetic.train = SYNTHETIC_TRAIN;
    // The timed work is the old demo's step, ITC with momentum keys over the
    // queue + KL, from the first step (the demo now reads the queue only
    // from mid-run): fixed here, so that a change of the demo's objectives
    // does not change what is timed, and what benches/reference/train_step.py
    // writes.
    let slots = cfg.objectives.queue.size;
    cfg.objectives = serde_json::from_value(json!({
        "queue": { "size": slots },
        "amf": { "enabled": false },
        "objectives": [{ "kind": "itc" }, { "kind": "kl" }],
    }))
    .context("the benchmark's objectives")?;
    match size {
        Size::Demo => {}
        Size::Small => {
            cfg.model.preset = Preset::Small;
            cfg.model.two_stream = None;
        }
        Size::Base => {
            // A model config file keeps BERT-base's 30,522-piece embedding
            // table; a preset or an inline config would be cut to the
            // synthetic tokenizer's vocabulary.
            let mut m = two_stream::Config::base();
            m.max_text_len = 32;
            let path = dir.join("base-model.json");
            m.save(&path)?;
            cfg.model.two_stream = None;
            cfg.model.config = Some(path);
            cfg.data.batch_size = 8;
            cfg.data.max_text_len = 32;
            cfg.objectives.queue.size = 65_536;
        }
    }
    cfg.train.out = dir.join("run");
    // No metrics record, hence no diagnostics, within the benchmark.
    cfg.train.steps = u64::MAX;
    cfg.train.log_every = u64::MAX;
    cfg.validate()?;
    Ok(cfg)
}

/// A trainer of one size and the batches it steps on.
pub struct Rig {
    pub size: Size,
    pub trainer: Trainer,
    pub batches: Vec<Batch>,
    next: usize,
    _dir: tempfile::TempDir,
}

impl Rig {
    pub fn new(size: Size) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let cfg = run_config(size, dir.path())?;
        let trainer = Trainer::new(cfg, &Device::Cpu, false)?;
        let data = trainer.task.data();
        let order = epoch_order(&data.train.pairs(), data.loader.seed, 0);
        let bs = data.loader.batch_size;
        let batches = (0..BATCHES)
            .map(|b| {
                let position = LoaderPosition {
                    epoch: 0,
                    batch: b as u64,
                };
                let pairs = &order[b * bs..(b + 1) * bs];
                let b = make_batch(&data.train, &data.tokenizer, &data.loader, pairs, position)?;
                match size {
                    // The BERT-base shape: 32 tokens, whatever the
                    // synthetic captions' lengths.
                    Size::Base => {
                        pad_text(b, data.loader.max_text_len, data.tokenizer.special().pad)
                    }
                    // Padded to the batch's longest caption, as in training.
                    Size::Demo | Size::Small => Ok(b),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            size,
            trainer,
            batches,
            next: 0,
            _dir: dir,
        })
    }

    fn next_batch(&mut self) -> Batch {
        let b = self.batches[self.next % self.batches.len()].clone();
        self.next += 1;
        b
    }

    /// One real optimizer step ([`Trainer::train_step_on`]).
    pub fn step(&mut self) -> Result<StepLog> {
        let b = self.next_batch();
        Ok(self.trainer.train_step_on(std::slice::from_ref(&b))?)
    }

    /// The forward half alone (the graph is dropped): for profiling the
    /// forward pass apart from the rest.
    pub fn forward_only(&mut self) -> Result<f64> {
        let b = self.next_batch();
        let ctx = self.context();
        let out = self.trainer.task.forward(&b, &ctx)?;
        Ok(out.losses.total.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    }

    fn context(&self) -> StepContext {
        StepContext {
            seed: self.trainer.cfg.seed,
            step: self.trainer.step(),
            micro: 0,
        }
    }

    /// The parts of one step, each timed. It replays what
    /// `Loop::train_step_on` does in the same order with the same
    /// functions, but with an optimizer of its own (`adamw`) and without
    /// advancing the trainer's step count; [`Rig::step`] is the real thing.
    pub fn timed_step(&mut self, adamw: &mut AdamW) -> Result<Phases> {
        let b = self.next_batch();
        let ctx = self.context();
        let cfg = self.trainer.cfg.clone();
        let vars: Vec<_> = self
            .trainer
            .task
            .trainable()
            .into_iter()
            .filter(|(name, _)| cfg.optim.trains(name))
            .collect();
        let t = Instant::now();
        let out = self.trainer.task.forward(&b, &ctx)?;
        let loss = out.losses.total.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !loss.is_finite() {
            bail!("the loss is {loss}");
        }
        let forward = t.elapsed();
        let t = Instant::now();
        let store = out.losses.total.backward()?;
        let mut grads = Grads::new();
        optim::accumulate(&mut grads, optim::collect_grads(&store, &vars))?;
        drop(store);
        let backward = t.elapsed();
        let t = Instant::now();
        optim::clip_grad_norm(&mut grads, cfg.optim.grad_clip)?;
        let clip = t.elapsed();
        let t = Instant::now();
        adamw.step(&grads, cfg.optim.lr)?;
        let adamw_time = t.elapsed();
        let t = Instant::now();
        if let Some(ema) = self.trainer.task.ema() {
            ema.update(cfg.momentum)?;
        }
        let ema = t.elapsed();
        let t = Instant::now();
        self.trainer.task.after_step(vec![out.keep])?;
        let enqueue = t.elapsed();
        Ok(Phases {
            forward,
            backward,
            clip,
            adamw: adamw_time,
            ema,
            enqueue,
        })
    }

    /// A fresh AdamW over the trainer's trainable variables, for
    /// [`Rig::timed_step`].
    pub fn adamw(&self) -> Result<AdamW> {
        Ok(AdamW::new(
            self.trainer.task.trainable(),
            &self.trainer.cfg.optim,
        )?)
    }

    /// What the PyTorch reference (benches/reference/train_step.py) needs to
    /// do the same step: the model config, batch shapes, queue, optimizer
    /// and objective settings, and our parameter count to check against.
    pub fn spec(&self) -> Result<serde_json::Value> {
        let task = &self.trainer.task;
        // The loader pads each batch to its longest caption, so lengths
        // differ between batches: the reference makes its batches alike.
        let mut text_lens = Vec::new();
        let mut pad_fractions = Vec::new();
        for b in &self.batches {
            let (bsz, len) = b.input_ids.dims2()?;
            let pad = b.mask_host.iter().filter(|&&m| m == 0).count();
            text_lens.push(len);
            pad_fractions.push(pad as f64 / (bsz * len) as f64);
        }
        let batch = self.batches[0].input_ids.dim(0)?;
        let params: usize = task.trainable().iter().map(|(_, v)| v.elem_count()).sum();
        let trained: usize = task
            .trainable()
            .iter()
            .filter(|(n, _)| self.trainer.cfg.optim.trains(n))
            .count();
        Ok(json!({
            "size": self.size.name(),
            "batch": batch,
            "text_lens": text_lens,
            "pad_fractions": pad_fractions,
            "model": task.system.cfg,
            "objectives": task.cfg.objectives,
            "optim": task.cfg.optim,
            "momentum": self.trainer.cfg.momentum,
            "params": params,
            "trainable_tensors": trained,
        }))
    }
}

/// `batch` with its text padded (mask 0) to `len` tokens.
fn pad_text(mut batch: Batch, len: usize, pad: u32) -> Result<Batch> {
    let (b, l) = batch.input_ids.dims2()?;
    if l >= len {
        return Ok(batch);
    }
    let mut ids = Vec::with_capacity(b * len);
    let mut mask = Vec::with_capacity(b * len);
    for r in 0..b {
        ids.extend_from_slice(&batch.ids_host[r * l..(r + 1) * l]);
        ids.extend(std::iter::repeat_n(pad, len - l));
        mask.extend_from_slice(&batch.mask_host[r * l..(r + 1) * l]);
        mask.extend(std::iter::repeat_n(0, len - l));
    }
    let device = batch.input_ids.device().clone();
    batch.input_ids = Tensor::from_vec(ids.clone(), (b, len), &device)?;
    batch.attention_mask = Tensor::from_vec(mask.clone(), (b, len), &device)?;
    batch.ids_host = ids;
    batch.mask_host = mask;
    Ok(batch)
}

/// Wall-clock time of each part of one step.
#[derive(Clone, Copy, Debug, Default)]
pub struct Phases {
    /// Both towers (online and momentum), the projections and the losses.
    pub forward: Duration,
    /// `backward()` and gathering the gradients of the trained variables.
    pub backward: Duration,
    pub clip: Duration,
    pub adamw: Duration,
    pub ema: Duration,
    pub enqueue: Duration,
}

impl Phases {
    pub const NAMES: [&'static str; 6] = ["forward", "backward", "clip", "adamw", "ema", "enqueue"];

    pub fn as_array(&self) -> [Duration; 6] {
        [
            self.forward,
            self.backward,
            self.clip,
            self.adamw,
            self.ema,
            self.enqueue,
        ]
    }
}

/// The median of `xs` (sorted in place); 0 for none.
pub fn median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    }
}

/// Peak resident set size of this process so far, in MiB (`getrusage`).
pub fn peak_rss_mib() -> f64 {
    // SAFETY: getrusage only writes the struct it is handed.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return f64::NAN;
    }
    // Linux reports ru_maxrss in KiB.
    usage.ru_maxrss as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn sizes_round_trip_their_names() {
        for s in Size::ALL {
            assert_eq!(Size::parse(s.name()).unwrap(), s);
        }
        assert!(Size::parse("huge").is_err());
    }

    #[test]
    fn padding_keeps_the_rows_and_masks_the_new_columns() {
        let mut b = Batch {
            pixels: Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap(),
            input_ids: Tensor::new(&[[5u32, 6], [7, 0]], &Device::Cpu).unwrap(),
            attention_mask: Tensor::new(&[[1u32, 1], [1, 0]], &Device::Cpu).unwrap(),
            image_ids: Tensor::new(&[0u32, 1], &Device::Cpu).unwrap(),
            ids_host: vec![5, 6, 7, 0],
            mask_host: vec![1, 1, 1, 0],
            captions: vec!["a".into(), "b".into()],
            item_indices: vec![0, 1],
            position: LoaderPosition::default(),
            skipped: Vec::new(),
        };
        b = pad_text(b, 4, 0).unwrap();
        assert_eq!(b.ids_host, [5, 6, 0, 0, 7, 0, 0, 0]);
        assert_eq!(b.mask_host, [1, 1, 0, 0, 1, 0, 0, 0]);
        assert_eq!(
            b.attention_mask.to_vec2::<u32>().unwrap(),
            [[1, 1, 0, 0], [1, 0, 0, 0]]
        );
        assert_eq!(b.input_ids.dims(), [2, 4]);
    }

    #[test]
    fn configs_of_every_size_validate() {
        let dir = tempfile::tempdir().unwrap();
        let base = run_config(Size::Base, dir.path()).unwrap();
        assert_eq!(base.data.batch_size, 8);
        assert_eq!(base.objectives.queue.size, 65_536);
        let m = two_stream::Config::load(base.model.config.as_ref().unwrap()).unwrap();
        assert_eq!(m.text.vocab_size, 30_522);
        assert_eq!(m.vision.image_size, 224);
        let small = run_config(Size::Small, dir.path()).unwrap();
        assert_eq!(small.model.preset, Preset::Small);
        assert_eq!(small.data.batch_size, 32);
    }
}
