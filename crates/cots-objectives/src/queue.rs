//! Lockstep negative queues of momentum keys (COTS instance and task level).
//!
//! The image queue `Q_I [K, E]`, the text queue `Q_T [K, E]` and the id queue
//! `[K]` u32 share ONE write pointer, so slot `k` of all three always describes
//! the same past pair. The task-level KL compares `f . Q_T` with `t . Q_I`
//! column by column, which only means something because of this invariant.
//!
//! Initialisation: every slot holds a random unit vector (seeded, as MoCo
//! does) and the id [`EMPTY_SLOT`], which never matches a row, so an unfilled
//! slot is a harmless negative and never a false positive.
//!
//! Writes happen in place, after backward (the composition enqueues in
//! `after_step`), from detached keys: a queue never holds a graph. Pairs that
//! the adaptive momentum filter dropped (weight 0) are not written at all; the
//! pointer advances only by the number of kept pairs and wraps around.
//!
//! Staleness: each slot also keeps, on the host, the optimizer step whose
//! keys it holds (the trainer announces the step with
//! [`LockstepQueue::set_step`] before the forward pass), so the age of the
//! negatives can be logged ([`LockstepQueue::staleness`]). The stamps are part
//! of the checkpointed state, so a resumed run logs the same ages.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};
use cots_ops::queue::EMPTY_SLOT;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, ObjectiveState, Result};

/// Size and initialisation of the lockstep queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Number of slots `K`; must be a multiple of the batch size.
    pub size: usize,
    /// Seed of the random unit vectors that fill the queue before training.
    pub seed: u64,
    /// The first optimizer step whose objectives read the queue (default 0:
    /// from the start, as MoCo/ALBEF). Before it the queue is filled but not
    /// read: ITC contrasts within the batch (momentum keys, every pair a
    /// candidate) and KL contributes nothing. Early in a short run the online
    /// towers move fast, so keys a hundred steps old are easy negatives that
    /// the loss learns to tell apart by age (docs/results.md, "Why ITC +
    /// queue loses to CLIP"); a late start keeps that shortcut out.
    pub start_step: u64,
}

impl Default for QueueConfig {
    /// ALBEF's queue size, a power of two so common batch sizes divide it.
    fn default() -> Self {
        Self {
            size: 65_536,
            seed: 0,
            start_step: 0,
        }
    }
}

/// A read-only view of the queue at one moment.
///
/// The tensors share storage with the queue, which is overwritten in place by
/// the next enqueue: use them within the step (copy them to keep them).
#[derive(Clone, Debug)]
pub struct QueueView {
    /// `[K, E]` image keys.
    pub image: Tensor,
    /// `[K, E]` text keys.
    pub text: Tensor,
    /// `[K]` u32 pair ids, [`EMPTY_SLOT`] where nothing was written yet.
    pub ids: Tensor,
}

/// The image, text and id queues with their one pointer.
#[derive(Debug)]
pub struct LockstepQueue {
    image: Tensor,
    text: Tensor,
    ids: Tensor,
    ptr: usize,
    /// Per slot: the step whose keys it holds, [`NEVER_WRITTEN`] before the
    /// first write.
    stamps: Vec<u32>,
    /// The step being trained (stamped on the next enqueue).
    step: u64,
    /// See [`QueueConfig::start_step`].
    start_step: u64,
}

/// Stamp of a slot that still holds its random initial vector.
pub const NEVER_WRITTEN: u32 = u32::MAX;

/// Age statistics of the written queue slots, in optimizer steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Staleness {
    /// Mean age of the written slots (`0` keys from this very step).
    pub mean: f64,
    /// Age of the oldest written slot.
    pub max: u64,
    /// Fraction of the slots written at least once.
    pub filled: f64,
}

/// Unit vectors from a seeded generator (standard normals, then L2-normalised).
fn random_unit_rows(rows: usize, dim: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(rows * dim);
    for _ in 0..rows {
        let row: Vec<f64> = (0..dim)
            .map(|_| rng.sample::<f64, _>(rand_distr::StandardNormal))
            .collect();
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        out.extend(row.into_iter().map(|v| v / norm));
    }
    out
}

impl LockstepQueue {
    /// A queue of `cfg.size` random unit vectors of width `dim`, all ids empty.
    pub fn new(cfg: &QueueConfig, dim: usize, dtype: DType, device: &Device) -> Result<Self> {
        if cfg.size == 0 || dim == 0 {
            return Err(Error::Config(format!(
                "queue size ({}) and embedding width ({dim}) must be positive",
                cfg.size
            )));
        }
        let init = |seed| -> Result<Tensor> {
            let v = random_unit_rows(cfg.size, dim, seed);
            Ok(Tensor::from_vec(v, (cfg.size, dim), device)?.to_dtype(dtype)?)
        };
        // Different seeds for the two modalities: identical random slots would
        // make the initial image and text negatives artificially aligned.
        let image = init(cfg.seed)?;
        let text = init(cfg.seed.wrapping_add(1))?;
        let ids = Tensor::from_vec(vec![EMPTY_SLOT; cfg.size], cfg.size, device)?;
        Ok(Self {
            image,
            text,
            ids,
            ptr: 0,
            stamps: vec![NEVER_WRITTEN; cfg.size],
            step: 0,
            start_step: cfg.start_step,
        })
    }

    /// Announces the optimizer step being trained; the next enqueue stamps
    /// its slots with it.
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    /// Whether objectives read the queue at the step being trained
    /// ([`QueueConfig::start_step`]).
    pub fn active(&self) -> bool {
        self.step >= self.start_step
    }

    /// Mean and max age (current step minus the stamp) of the written slots,
    /// `None` while nothing has been written.
    pub fn staleness(&self) -> Option<Staleness> {
        let mut n = 0usize;
        let (mut sum, mut max) = (0u64, 0u64);
        for &s in &self.stamps {
            if s == NEVER_WRITTEN {
                continue;
            }
            let age = self.step.saturating_sub(u64::from(s));
            n += 1;
            sum += age;
            max = max.max(age);
        }
        (n > 0).then(|| Staleness {
            mean: sum as f64 / n as f64,
            max,
            filled: n as f64 / self.stamps.len().max(1) as f64,
        })
    }

    /// Number of slots `K`.
    pub fn size(&self) -> usize {
        self.ids.dims1().unwrap_or(0)
    }

    /// The next slot to be written.
    pub fn ptr(&self) -> usize {
        self.ptr
    }

    /// The current contents (see [`QueueView`] about aliasing).
    pub fn view(&self) -> QueueView {
        QueueView {
            image: self.image.clone(),
            text: self.text.clone(),
            ids: self.ids.clone(),
        }
    }

    /// Writes the kept pairs of a batch at the same slots of all three queues.
    ///
    /// Rows whose weight is zero are skipped. The batch size (before
    /// filtering) must divide the queue size, as in MoCo/ALBEF; the pointer
    /// still wraps correctly when filtering makes a write cross the end.
    ///
    /// # Shapes
    /// - `image_keys`, `text_keys`: `[B, E]`; `ids`: `[B]` u32; `weights`: `[B]`.
    pub fn enqueue(
        &mut self,
        image_keys: &Tensor,
        text_keys: &Tensor,
        ids: &Tensor,
        weights: Option<&[f32]>,
    ) -> Result<()> {
        let k = self.size();
        let (b, e) = image_keys.dims2()?;
        if b == 0 || !k.is_multiple_of(b) {
            return Err(Error::QueueBatch { queue: k, batch: b });
        }
        let want = [b, self.image.dim(1)?];
        for (name, t) in [("image_keys", image_keys), ("text_keys", text_keys)] {
            if t.dims() != want {
                return Err(Error::BadInput {
                    objective: "queue".into(),
                    input: name,
                    message: format!("expected shape {want:?}, got {:?}", t.dims()),
                });
            }
        }
        if ids.dims() != [b] || e != want[1] {
            return Err(Error::BadInput {
                objective: "queue".into(),
                input: "ids",
                message: format!("expected shape [{b}], got {:?}", ids.dims()),
            });
        }
        let kept: Vec<u32> = match weights {
            None => (0..b as u32).collect(),
            Some(w) => (0..b as u32).filter(|&i| w[i as usize] > 0.0).collect(),
        };
        if kept.is_empty() {
            return Ok(());
        }
        let n = kept.len();
        let idx = Tensor::from_vec(kept, n, image_keys.device())?;
        let dtype = self.image.dtype();
        // Detached and contiguous copies: slice_set needs contiguous sources
        // and a queue must never keep a graph alive.
        let img = image_keys.detach().index_select(&idx, 0)?.to_dtype(dtype)?;
        let txt = text_keys.detach().index_select(&idx, 0)?.to_dtype(dtype)?;
        let id = ids.to_dtype(DType::U32)?.index_select(&idx, 0)?;
        let first = n.min(k - self.ptr);
        let parts = [(0, self.ptr, first), (first, 0, n - first)];
        let stamp = u32::try_from(self.step).unwrap_or(NEVER_WRITTEN - 1);
        for (src, dst, len) in parts {
            if len == 0 {
                continue;
            }
            self.image
                .slice_set(&img.narrow(0, src, len)?.contiguous()?, 0, dst)?;
            self.text
                .slice_set(&txt.narrow(0, src, len)?.contiguous()?, 0, dst)?;
            self.ids
                .slice_set(&id.narrow(0, src, len)?.contiguous()?, 0, dst)?;
            self.stamps[dst..dst + len].fill(stamp);
        }
        self.ptr = (self.ptr + n) % k;
        Ok(())
    }

    /// Copies of the three queues (`image`, `text`, `ids`) and the pointer.
    pub fn state(&self) -> Result<ObjectiveState> {
        let mut s = ObjectiveState {
            meta: serde_json::json!({ "ptr": self.ptr, "size": self.size(), "step": self.step }),
            ..Default::default()
        };
        s.tensors.insert("image".into(), self.image.copy()?);
        s.tensors.insert("text".into(), self.text.copy()?);
        s.tensors.insert("ids".into(), self.ids.copy()?);
        let k = self.stamps.len();
        let stamps = Tensor::from_vec(self.stamps.clone(), k, &Device::Cpu)?;
        s.tensors.insert("stamps".into(), stamps);
        Ok(s)
    }

    /// Restores [`LockstepQueue::state`]; shapes must match this queue.
    pub fn load_state(&mut self, s: &ObjectiveState) -> Result<()> {
        let err = |message: String| Error::State {
            owner: "queue".into(),
            message,
        };
        let image = s.tensor("queue", "image")?;
        let text = s.tensor("queue", "text")?;
        let ids = s.tensor("queue", "ids")?;
        for (name, t, want) in [
            ("image", image, self.image.dims()),
            ("text", text, self.text.dims()),
            ("ids", ids, self.ids.dims()),
        ] {
            if t.dims() != want {
                return Err(err(format!(
                    "`{name}` has shape {:?}, this run's queue is {want:?} (queue size or embedding width changed?)",
                    t.dims()
                )));
            }
        }
        let ptr = s
            .meta
            .get("ptr")
            .and_then(|p| p.as_u64())
            .ok_or_else(|| err("`ptr` is missing from the metadata".into()))?
            as usize;
        if ptr >= self.size() {
            return Err(err(format!(
                "pointer {ptr} is outside the queue of {} slots",
                self.size()
            )));
        }
        let device = self.image.device().clone();
        // Fresh contiguous storage: the loaded tensors may be views of a
        // checkpoint buffer, and slice_set writes in place.
        self.image = image
            .to_device(&device)?
            .to_dtype(self.image.dtype())?
            .copy()?;
        self.text = text
            .to_device(&device)?
            .to_dtype(self.text.dtype())?
            .copy()?;
        // Checkpoints written before the stamps existed load with every slot
        // unstamped: the keys are restored exactly, only their ages are lost.
        self.stamps = match s.tensors.get("stamps") {
            Some(t) => {
                let v = t.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                if v.len() != self.stamps.len() {
                    return Err(err(format!(
                        "`stamps` has {} slots, this run's queue has {}",
                        v.len(),
                        self.stamps.len()
                    )));
                }
                v
            }
            None => vec![NEVER_WRITTEN; self.stamps.len()],
        };
        self.step = s.meta.get("step").and_then(|p| p.as_u64()).unwrap_or(0);
        self.ids = ids.to_device(&device)?.to_dtype(DType::U32)?.copy()?;
        self.ptr = ptr;
        Ok(())
    }
}

/// The lockstep queue shared by the objectives that read it (ITC, KL) and the
/// composition that writes it once per step.
#[derive(Clone, Debug)]
pub struct SharedQueue(Arc<Mutex<LockstepQueue>>);

impl SharedQueue {
    pub fn new(q: LockstepQueue) -> Self {
        Self(Arc::new(Mutex::new(q)))
    }

    /// Exclusive access. A poisoned lock is recovered: library code here never
    /// panics while holding it, and `enqueue` validates shapes and dtypes
    /// before its first write, so the three queues stay in lockstep.
    pub fn lock(&self) -> MutexGuard<'_, LockstepQueue> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current contents.
    pub fn view(&self) -> QueueView {
        self.lock().view()
    }

    /// See [`LockstepQueue::active`].
    pub fn active(&self) -> bool {
        self.lock().active()
    }
}
