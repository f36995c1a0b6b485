//! How is anything trained? One loop, generic over a [`Task`].
//!
//! A task (COTS in [`crate::trainer`], the cross-encoder in [`crate::cross`],
//! VLDeformer's decomposition in [`crate::decompose`]) builds its model and
//! objectives, turns a batch into named loss terms, and says which
//! variables train and which follow them by EMA. [`Loop`] does the rest,
//! once for every task:
//!
//! - one optimizer step = `optim.accumulation` micro-batches, each: the
//!   task's forward, a finite check, backward; then gradient averaging,
//!   global-norm clipping, AdamW at the scheduled rate, the EMA update, and
//!   the task's `after_step` (COTS enqueues its momentum keys);
//! - metrics (`metrics.jsonl`, the progress bar, `plot.svg`), validation,
//!   checkpoints every `checkpoint_every` steps and at the end, exact resume
//!   from the newest complete checkpoint;
//! - SIGINT / SIGTERM: the step under way finishes, a checkpoint is written
//!   and [`Loop::run`] returns with `interrupted` set (a second signal ends
//!   the process at once).
//!
//! Randomness is drawn from generators seeded by `(seed, step, micro-batch)`
//! ([`StepContext`]) and the loader's order is a function of `(seed, epoch)`;
//! with the checkpointed optimizer, task state and data position, a resumed
//! run reproduces the loss curve of an uninterrupted one exactly on the CPU.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use cots_data::{Batch, Dataset, Loader, LoaderConfig, LoaderPosition};
use cots_encoders::momentum::Momentum;
use cots_eval::RetrievalReport;
use cots_objectives::{Losses, ObjectiveState, Objectives};
use cots_ops::SeededRng;
use cots_text::TextTokenizer;
use serde_json::json;

use crate::metrics::{self, MetricsWriter};
use crate::model::sorted_vars;
use crate::optim::{self, AdamW, Grads, OptimConfig};
use crate::run_dir::RunDir;
use crate::schedule::{lr_at, momentum_at, ScheduleConfig};
use crate::{checkpoint, Error, Result};

/// What the loop itself needs to know: length, optimizer, schedule, EMA and
/// how often to log, validate and save.
#[derive(Clone, Debug, PartialEq)]
pub struct LoopConfig {
    pub steps: u64,
    pub seed: u64,
    pub optim: OptimConfig,
    pub schedule: ScheduleConfig,
    /// EMA momentum of the variables that follow by EMA ([`Task::ema`]).
    pub momentum: f64,
    /// With a value, the momentum follows a cosine from `momentum` to this
    /// over the run ([`momentum_at`]).
    pub momentum_final: Option<f64>,
    /// Write a metrics record every this many steps (and at the end).
    pub log_every: u64,
    /// Validate every this many steps and at the end (0: never).
    pub eval_every: u64,
    /// Checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept on disk (the newest).
    pub keep_last: usize,
}

impl LoopConfig {
    fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::Config("the run needs steps >= 1".into()));
        }
        if self.optim.accumulation == 0 {
            return Err(Error::Config("optim.accumulation must be >= 1".into()));
        }
        Ok(())
    }
}

/// Where in the run a micro-batch is: the seeds of its random draws.
#[derive(Clone, Copy, Debug)]
pub struct StepContext {
    pub seed: u64,
    /// Optimizer steps completed before this one.
    pub step: u64,
    /// Micro-batch within the step.
    pub micro: u64,
}

impl StepContext {
    /// A seed for one kind of random draw (`salt`) of this micro-batch.
    pub fn seed_for(&self, salt: u64) -> u64 {
        self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ self.step.wrapping_mul(0xBF58_476D_1CE4_E5B9)
            ^ self.micro.wrapping_mul(0x94D0_49BB_1331_11EB)
            ^ salt
    }

    /// The dropout generator of this micro-batch.
    pub fn dropout(&self) -> SeededRng {
        SeededRng::new(self.seed_for(3))
    }
}

/// What a task's forward pass produced for one micro-batch.
pub struct Forward<K> {
    /// The weighted total (backward runs on it) and every named term.
    pub losses: Losses,
    /// Further scalars for the metrics record (e.g. `amf_filtered`).
    pub stats: Vec<(String, f64)>,
    /// What [`Task::after_step`] needs from this micro-batch; must hold no
    /// graph (detach it).
    pub keep: K,
}

/// The training data of a task and how to batch it.
#[derive(Clone)]
pub struct TaskData {
    pub train: Arc<Dataset>,
    pub tokenizer: Arc<TextTokenizer>,
    pub loader: LoaderConfig,
}

/// Checkpointable state of a task beyond what the loop saves (optimizer,
/// step, data position): its variables and any other state, as named
/// tensors and JSON fields merged into the checkpoint's record.
#[derive(Default)]
pub struct TaskState {
    pub tensors: HashMap<String, Tensor>,
    pub meta: serde_json::Map<String, serde_json::Value>,
}

impl TaskState {
    /// The usual state: every variable of each `(prefix, map)` as
    /// `prefix.name`, and the objectives' state (tensors under
    /// `objectives.`, record under `"objectives"`).
    pub fn of(maps: &[(&str, &VarMap)], objectives: &Objectives) -> Result<Self> {
        let mut tensors = HashMap::new();
        for (prefix, map) in maps {
            for (n, v) in sorted_vars(map) {
                tensors.insert(format!("{prefix}.{n}"), v.as_tensor().clone());
            }
        }
        let state = objectives.state()?;
        for (n, t) in state.tensors {
            tensors.insert(format!("objectives.{n}"), t);
        }
        let mut meta = serde_json::Map::new();
        meta.insert("objectives".into(), state.meta);
        Ok(Self { tensors, meta })
    }

    /// Records the weights hash of the run the task was built from
    /// (`--from`), checked by [`TaskState::check_source`] on resume.
    pub fn with_source(mut self, hash: &str) -> Self {
        self.meta.insert("source".into(), hash.into());
        self
    }

    /// Errs unless the checkpoint record `meta` names `hash` as its source:
    /// resuming `what` over another `--from` run (`from`) would mix two runs.
    pub fn check_source(
        meta: &serde_json::Value,
        hash: &str,
        from: &std::path::Path,
        what: &str,
    ) -> Result<()> {
        if meta["source"].as_str() == Some(hash) {
            return Ok(());
        }
        Err(Error::Checkpoint(format!(
            "this {what} was started from another run (weights {}), not {} ({hash}): resume \
             with the same --from",
            meta["source"],
            from.display()
        )))
    }

    /// Restores what [`TaskState::of`] saved from a checkpoint's `tensors`
    /// and record `meta`; a missing variable is an error naming it.
    pub fn restore(
        maps: &[(&str, &VarMap)],
        objectives: &mut Objectives,
        tensors: &HashMap<String, Tensor>,
        meta: &serde_json::Value,
        device: &Device,
    ) -> Result<()> {
        for (prefix, map) in maps {
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
                .map(|(k, v)| Ok((k, v.to_device(device)?)))
                .collect::<Result<_>>()?,
            meta: meta["objectives"].clone(),
        };
        objectives.load_state(&state)?;
        Ok(())
    }
}

/// One kind of training: a model, its objectives and its data.
pub trait Task {
    /// What a micro-batch hands to [`Task::after_step`].
    type Keep;
    /// Names the task in the progress bar and errors (`"train"`, ...).
    fn label(&self) -> &str;
    /// The training split, tokenizer and batching.
    fn data(&self) -> TaskData;
    /// Variables the optimizer updates, sorted by name.
    fn trainable(&self) -> Vec<(String, Var)>;
    /// The variables that follow the trained ones by EMA, if any.
    fn ema(&self) -> Option<&Momentum> {
        None
    }
    /// The forward half of a step on one micro-batch.
    fn forward(&mut self, batch: &Batch, ctx: &StepContext) -> Result<Forward<Self::Keep>>;
    /// After the optimizer and EMA updates, with every micro-batch's keep.
    fn after_step(&mut self, _kept: Vec<Self::Keep>) -> Result<()> {
        Ok(())
    }
    /// Everything to checkpoint (trainable variables included).
    fn state(&self) -> Result<TaskState>;
    /// Restores [`Task::state`] from a checkpoint's tensors and record.
    fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        meta: &serde_json::Value,
    ) -> Result<()>;
    /// Writes the run files that do not change during training (config,
    /// tokenizer, architecture).
    fn write_run_files(&self, dir: &RunDir) -> Result<()>;
    /// After every checkpoint: writes what readers of the run open (the
    /// cross-encoder's and the decomposed model's serving files).
    fn export(&self, _dir: &RunDir, _step: u64, _loss: f64) -> Result<()> {
        Ok(())
    }
    /// Validation retrieval metrics, when the task has a validation split.
    fn validate(&self) -> Result<Option<RetrievalReport>> {
        Ok(None)
    }
    /// Logs what the task wants said at the end of a run.
    fn finish(&self) {}
}

/// What one optimizer step did.
#[derive(Clone, Debug)]
pub struct StepLog {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub terms: Vec<(String, f64)>,
    pub stats: Vec<(String, f64)>,
    pub grad_norm: f64,
    pub pairs_per_s: f64,
}

/// What a finished (or interrupted) run reports.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub steps: u64,
    pub seconds: f64,
    pub final_loss: f64,
    /// The newest checkpoint's JSON.
    pub checkpoint: PathBuf,
    /// Stopped early by SIGINT or SIGTERM, after checkpointing.
    pub interrupted: bool,
}

/// The training loop over a task.
pub struct Loop<T: Task> {
    pub task: T,
    pub cfg: LoopConfig,
    dir: RunDir,
    loader: Loader,
    optim: AdamW,
    step: u64,
    metrics: MetricsWriter,
}

impl<T: Task> Loop<T> {
    /// Prepares `task` in `dir`; with `resume`, continues from the newest
    /// complete checkpoint there. A fresh run refuses a folder that already
    /// holds checkpoints.
    pub fn start(mut task: T, cfg: LoopConfig, dir: RunDir, resume: bool) -> Result<Self> {
        cfg.validate()?;
        let mut optim = AdamW::new(task.trainable(), &cfg.optim)?;
        let mut step = 0;
        let mut start = LoaderPosition::default();
        if resume {
            // A damaged newest checkpoint is skipped with a warning naming it.
            let Some((latest, tensors, meta)) = checkpoint::load_latest(&dir.checkpoints())? else {
                return Err(Error::Checkpoint(format!(
                    "--resume: {} has no complete checkpoint",
                    dir.checkpoints().display()
                )));
            };
            task.load_state(&tensors, &meta)?;
            optim.load_state(
                &checkpoint::strip(&tensors, "optim"),
                meta["optim_step"].as_u64().unwrap_or(0),
            )?;
            step = meta["step"].as_u64().unwrap_or(0);
            start = serde_json::from_value(meta["loader"].clone()).map_err(|e| {
                Error::Checkpoint(format!("{}: loader position: {e}", latest.display()))
            })?;
            metrics::truncate_from(&dir.metrics(), step + 1)?;
            tracing::info!("resumed from {} at step {step}", latest.display());
        } else {
            // A fresh run must not mix with an older one's checkpoints, even
            // damaged ones.
            if dir.has_checkpoints()? {
                return Err(Error::Config(format!(
                    "{} already holds checkpoints: pass --resume to continue it, or choose another output directory",
                    dir.path().display()
                )));
            }
            let _ = std::fs::remove_file(dir.metrics());
        }
        // Everything needed to use or resume the run sits beside the checkpoints.
        task.write_run_files(&dir)?;
        let data = task.data();
        let loader = Loader::new(data.train, data.tokenizer, data.loader, start)?;
        let metrics = MetricsWriter::open(&dir.metrics())?;
        Ok(Self {
            task,
            cfg,
            dir,
            loader,
            optim,
            step,
            metrics,
        })
    }

    /// Optimizer steps completed.
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn dir(&self) -> &RunDir {
        &self.dir
    }

    /// The position of the next batch the loader hands out.
    pub fn loader_position(&self) -> LoaderPosition {
        self.loader.position()
    }

    /// One optimizer step on the loader's next batches.
    pub fn train_step(&mut self) -> Result<StepLog> {
        self.step_with(|loader| loader.next_batch().map_err(Error::from))
    }

    /// One optimizer step on `batches` (one per micro-batch, so
    /// `optim.accumulation` of them) instead of the loader's: the same
    /// forward, backward, clipping, AdamW, EMA and `after_step`. The loader
    /// is neither read nor advanced, so checkpoints written afterwards record
    /// a data position these batches did not come from. For benchmarks
    /// (benches/benches/train_step.rs), which must keep data loading out of
    /// the timed region.
    pub fn train_step_on(&mut self, batches: &[Batch]) -> Result<StepLog> {
        let accum = self.cfg.optim.accumulation;
        if batches.len() != accum {
            return Err(Error::Config(format!(
                "train_step_on: {} batches for optim.accumulation = {accum}",
                batches.len()
            )));
        }
        let mut next = batches.iter();
        self.step_with(|_| {
            next.next()
                .cloned()
                .ok_or_else(|| Error::Config("train_step_on: out of batches".into()))
        })
    }

    /// One optimizer step, each micro-batch drawn by `next_batch`.
    fn step_with(
        &mut self,
        mut next_batch: impl FnMut(&mut Loader) -> Result<Batch>,
    ) -> Result<StepLog> {
        let t0 = Instant::now();
        let accum = self.cfg.optim.accumulation as u64;
        // Frozen variables (an `optim.lr_scales` multiplier of 0) get no
        // update and stay out of the clipping norm.
        let vars: Vec<_> = self
            .task
            .trainable()
            .into_iter()
            .filter(|(name, _)| self.cfg.optim.trains(name))
            .collect();
        let mut grads = Grads::new();
        let mut kept = Vec::new();
        let mut loss = 0.0;
        let mut terms: BTreeMap<String, f64> = BTreeMap::new();
        let mut stats = Vec::new();
        let mut pairs = 0usize;
        for micro in 0..accum {
            let batch = next_batch(&mut self.loader)?;
            pairs += batch.captions.len();
            let ctx = StepContext {
                seed: self.cfg.seed,
                step: self.step,
                micro,
            };
            let out = self.task.forward(&batch, &ctx)?;
            let total = out.losses.total.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let mut named = Vec::new();
            for t in &out.losses.terms {
                let v = t.value.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                named.push(format!("{}={v:.4}", t.name));
                *terms.entry(t.name.clone()).or_default() += v / accum as f64;
            }
            if !total.is_finite() {
                let last = self
                    .dir
                    .latest_checkpoint()?
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none yet".into());
                return Err(Error::NonFinite(format!(
                    "{}: the loss is {total} at step {} ({}); training stopped. The last good \
                     checkpoint is {last}; try a lower optim.lr or a smaller optim.grad_clip",
                    self.task.label(),
                    self.step + 1,
                    named.join(", ")
                )));
            }
            loss += total / accum as f64;
            stats = out.stats;
            let store = out.losses.total.backward()?;
            optim::accumulate(&mut grads, optim::collect_grads(&store, &vars))?;
            kept.push(out.keep);
        }
        if accum > 1 {
            optim::scale(&mut grads, 1.0 / accum as f64)?;
        }
        let grad_norm = optim::clip_grad_norm(&mut grads, self.cfg.optim.grad_clip)?;
        let lr = lr_at(
            &self.cfg.schedule,
            self.cfg.optim.lr,
            self.step,
            self.cfg.steps,
        );
        self.optim.step(&grads, lr)?;
        // The EMA moves once per optimizer step, before the task's updates
        // (COTS enqueues keys of the updated momentum towers' step).
        if let Some(ema) = self.task.ema() {
            let m = momentum_at(
                self.cfg.momentum,
                self.cfg.momentum_final,
                self.step,
                self.cfg.steps,
            );
            ema.update(m)?;
        }
        self.task.after_step(kept)?;
        self.step += 1;
        Ok(StepLog {
            step: self.step,
            lr,
            loss,
            terms: terms.into_iter().collect(),
            stats,
            grad_norm,
            pairs_per_s: pairs as f64 / t0.elapsed().as_secs_f64().max(1e-9),
        })
    }

    /// Writes a complete checkpoint of the current state, then the task's
    /// serving files.
    pub fn save_checkpoint(&self, loss: f64) -> Result<PathBuf> {
        // A diverged update must never overwrite a good checkpoint.
        for (n, v) in self.task.trainable() {
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
        }
        let TaskState { mut tensors, meta } = self.task.state()?;
        for (n, t) in self.optim.state() {
            tensors.insert(format!("optim.{n}"), t);
        }
        let mut record = json!({
            "step": self.step,
            "optim_step": self.optim.step_count(),
            "loader": self.loader.position(),
        });
        for (k, v) in meta {
            record[k] = v;
        }
        let json = checkpoint::save(
            &self.dir.checkpoints(),
            self.step,
            &tensors,
            &record,
            self.cfg.keep_last,
        )?;
        self.task.export(&self.dir, self.step, loss)?;
        Ok(json)
    }

    /// Trains to `cfg.steps`, logging, validating and checkpointing; stops
    /// early, checkpointed, on SIGINT or SIGTERM.
    pub fn run(&mut self, quiet: bool) -> Result<RunSummary> {
        let signals = StopOnSignal::register();
        let total = self.cfg.steps;
        let t0 = Instant::now();
        let bar = metrics::progress_bar(&format!("{} ", self.task.label()), total, quiet);
        bar.set_position(self.step);
        let mut last = f64::NAN;
        let mut ckpt = PathBuf::new();
        let mut interrupted = false;
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
            let end = self.step == total;
            if self.step.is_multiple_of(self.cfg.log_every.max(1)) || end {
                let mut rec = json!({
                    "step": log.step, "lr": log.lr, "loss/total": log.loss,
                    "grad_norm": log.grad_norm, "pairs_per_s": log.pairs_per_s,
                });
                for (n, v) in &log.terms {
                    rec[format!("loss/{n}")] = json!(v);
                }
                for (n, v) in &log.stats {
                    rec[n.as_str()] = json!(v);
                }
                self.metrics.write(&rec)?;
                if bar.is_hidden() && !quiet {
                    tracing::info!(
                        "{} step {}/{total} loss {:.4} ({})",
                        self.task.label(),
                        self.step,
                        log.loss,
                        terms.join(", ")
                    );
                }
            }
            let eval_every = self.cfg.eval_every;
            if eval_every > 0 && (self.step.is_multiple_of(eval_every) || end) {
                match self.task.validate() {
                    Ok(Some(r)) => {
                        let mut rec = json!({"step": self.step, "val/rsum": r.rsum});
                        for (k, v) in &r.t2i.recall {
                            rec[format!("val/t2i_r{k}")] = json!(v);
                        }
                        for (k, v) in &r.i2t.recall {
                            rec[format!("val/i2t_r{k}")] = json!(v);
                        }
                        self.metrics.write(&rec)?;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("validation at step {} failed: {e}", self.step),
                }
            }
            interrupted = signals.requested() && !end;
            let every = self.cfg.checkpoint_every;
            if (every > 0 && self.step.is_multiple_of(every)) || end || interrupted {
                ckpt = self.save_checkpoint(last)?;
            }
            if interrupted {
                bar.abandon_with_message(format!(
                    "interrupted at step {}: checkpointed; continue with --resume",
                    self.step
                ));
                break;
            }
        }
        bar.finish_and_clear();
        self.task.finish();
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
        let records = metrics::read(&self.dir.metrics())?;
        if let Err(e) = metrics::plot(&records, &self.dir.plot()) {
            tracing::warn!("could not draw the loss plot: {e}");
        }
        if ckpt.as_os_str().is_empty() {
            ckpt = self.dir.latest_checkpoint()?.unwrap_or_default();
        }
        if interrupted {
            tracing::warn!(
                "{} interrupted at step {}/{total}; {} holds the state: continue with --resume",
                self.task.label(),
                self.step,
                ckpt.display()
            );
        }
        Ok(RunSummary {
            steps: self.step,
            seconds: t0.elapsed().as_secs_f64(),
            final_loss: last,
            checkpoint: ckpt,
            interrupted,
        })
    }
}

/// Set by SIGINT / SIGTERM while a loop runs.
static STOP: AtomicBool = AtomicBool::new(false);
/// Whether a loop is running (and so wants the signals).
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// While this lives, SIGINT and SIGTERM ask the loop to stop (the flag it
/// returns); a second signal, or one while no loop runs, ends the process
/// at once with status `128 + signal`, as the default action would. The
/// handlers are installed once per process and stay (signal-hook cannot
/// restore the previous ones).
struct StopOnSignal;

impl StopOnSignal {
    fn register() -> Self {
        static INSTALL: std::sync::Once = std::sync::Once::new();
        INSTALL.call_once(|| {
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                let action = move || {
                    if !ACTIVE.load(Ordering::SeqCst) || STOP.swap(true, Ordering::SeqCst) {
                        signal_hook::low_level::exit(128 + sig);
                    }
                };
                // SAFETY: the action only touches atomics and calls `_exit`,
                // both async-signal-safe.
                if let Err(e) = unsafe { signal_hook::low_level::register(sig, action) } {
                    tracing::warn!("cannot handle signal {sig}: {e}");
                }
            }
        });
        STOP.store(false, Ordering::SeqCst);
        ACTIVE.store(true, Ordering::SeqCst);
        Self
    }

    fn requested(&self) -> bool {
        STOP.load(Ordering::SeqCst)
    }
}

impl Drop for StopOnSignal {
    fn drop(&mut self) {
        ACTIVE.store(false, Ordering::SeqCst);
        STOP.store(false, Ordering::SeqCst);
    }
}
