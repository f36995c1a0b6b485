//! The composition: weighted objectives, the shared queue, the filter.
//!
//! [`Objectives`] is the one thing the trainer talks to. It sums the weighted
//! terms into the total, returns every unweighted term for logging, exposes
//! the union of the objectives' [`Needs`], writes the lockstep queue once per
//! step (so ITC and KL, which both read it, never enqueue twice), and gathers
//! every objective's state under its name for checkpoints.

use candle_core::{DType, Tensor};

use crate::amf::{AdaptiveMomentumFilter, AmfOutput};
use crate::{Error, LossTerm, Needs, Objective, ObjectiveState, Result, SharedQueue, StepFeatures};

/// Result of [`Objectives::losses`].
#[derive(Clone, Debug)]
pub struct Losses {
    /// Scalar: `sum_objectives weight * sum_terms term`; call `backward` on it.
    pub total: Tensor,
    /// Every term, unweighted, for logging.
    pub terms: Vec<LossTerm>,
}

struct Entry {
    weight: f64,
    objective: Box<dyn Objective>,
}

/// Weighted objectives plus the state they share.
pub struct Objectives {
    entries: Vec<Entry>,
    queue: Option<SharedQueue>,
    amf: Option<AdaptiveMomentumFilter>,
}

impl std::fmt::Debug for Objectives {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<(&str, f64)> = self
            .entries
            .iter()
            .map(|e| (e.objective.name(), e.weight))
            .collect();
        f.debug_struct("Objectives")
            .field("objectives", &names)
            .field("queue", &self.queue.is_some())
            .field("amf", &self.amf.is_some())
            .finish()
    }
}

impl Objectives {
    /// An empty composition; `queue` is enqueued after every step when present.
    pub fn new(queue: Option<SharedQueue>, amf: Option<AdaptiveMomentumFilter>) -> Self {
        Self {
            entries: Vec::new(),
            queue,
            amf,
        }
    }

    /// Adds an objective; names must be unique (they prefix the checkpoint state).
    pub fn push(&mut self, weight: f64, objective: Box<dyn Objective>) -> Result<()> {
        let name = objective.name();
        if name.is_empty() || name == "queue" || name == "amf" || name.contains('.') {
            return Err(Error::Config(format!(
                "objective name `{name}` is reserved or empty, or contains `.`"
            )));
        }
        if self.entries.iter().any(|e| e.objective.name() == name) {
            return Err(Error::Config(format!("two objectives are named `{name}`")));
        }
        if !weight.is_finite() {
            return Err(Error::Config(format!(
                "objective `{name}` has weight {weight}"
            )));
        }
        self.entries.push(Entry { weight, objective });
        Ok(())
    }

    /// The shared lockstep queue, for custom objectives that read it.
    pub fn queue(&self) -> Option<&SharedQueue> {
        self.queue.as_ref()
    }

    /// `(name, weight)` of each objective in order.
    pub fn names(&self) -> Vec<(String, f64)> {
        self.entries
            .iter()
            .map(|e| (e.objective.name().to_string(), e.weight))
            .collect()
    }

    /// The passes the trainer must run: the union over objectives, plus the
    /// momentum encoders when the queue or the filter needs their keys.
    pub fn needs(&self) -> Needs {
        let own = Needs {
            momentum: self.queue.is_some() || self.amf.is_some(),
            ..Needs::default()
        };
        self.entries
            .iter()
            .fold(own, |n, e| n.union(e.objective.needs()))
    }

    /// Step 2: AMF weights from the momentum keys, `None` when AMF is off;
    /// the trainer puts them into [`crate::MomentumFeatures::pair_weights`].
    /// [`Objectives::filter_pairs`] with every pair distinct.
    ///
    /// # Shapes
    /// - `image_embed_m`, `text_embed_m`: `[B, E]`; weights `[B]` f32.
    pub fn filter(
        &mut self,
        image_embed_m: &Tensor,
        text_embed_m: &Tensor,
    ) -> Result<Option<AmfOutput>> {
        self.filter_pairs(image_embed_m, text_embed_m, None)
    }

    /// Step 2 with the pairs' image ids (captions of one image are not
    /// negatives of each other); the filter's rank rule also reads the
    /// queue, before this step's enqueue.
    ///
    /// # Shapes
    /// - `image_embed_m`, `text_embed_m`: `[B, E]`; `ids`: `[B]` u32;
    ///   weights `[B]` f32.
    pub fn filter_pairs(
        &mut self,
        image_embed_m: &Tensor,
        text_embed_m: &Tensor,
        ids: Option<&Tensor>,
    ) -> Result<Option<AmfOutput>> {
        match &mut self.amf {
            Some(amf) => {
                // The rank rule's extra negatives: the queue's most recently
                // written slots only (the write pointer is one past them).
                let r = amf.config().recent_slots;
                let view = match &self.queue {
                    Some(q) if r > 0 => {
                        let q = q.lock();
                        let (k, ptr, view) = (q.size(), q.ptr(), q.view());
                        let r = r.min(k);
                        let idx: Vec<u32> =
                            (0..r).map(|i| ((ptr + k - r + i) % k) as u32).collect();
                        let idx = Tensor::from_vec(idx, r, view.ids.device())?;
                        Some(crate::queue::QueueView {
                            image: view.image.index_select(&idx, 0)?,
                            text: view.text.index_select(&idx, 0)?,
                            ids: view.ids.index_select(&idx, 0)?,
                        })
                    }
                    _ => None,
                };
                Ok(Some(amf.filter_with(
                    image_embed_m,
                    text_embed_m,
                    ids,
                    view.as_ref(),
                )?))
            }
            None => Ok(None),
        }
    }

    /// Step 3: every term of every objective and their weighted total.
    pub fn losses(&mut self, x: &StepFeatures) -> Result<Losses> {
        let mut total: Option<Tensor> = None;
        let mut terms = Vec::new();
        for e in &mut self.entries {
            for term in e.objective.losses(x)? {
                let weighted = (&term.value * e.weight)?;
                total = Some(match total {
                    None => weighted,
                    Some(t) => (t + weighted)?,
                });
                terms.push(term);
            }
        }
        let total = match total {
            Some(t) => t,
            None => return Err(Error::Config("no objective produced a loss term".into())),
        };
        Ok(Losses { total, terms })
    }

    /// Step 6 (after backward, optimizer and EMA), on
    /// [`StepFeatures::detached`]: each objective's `after_step`, then the
    /// momentum keys of the kept pairs go into the lockstep queue, once.
    pub fn after_step(&mut self, x: &StepFeatures) -> Result<()> {
        for e in &mut self.entries {
            e.objective.after_step(x)?;
        }
        if let Some(q) = &self.queue {
            let m = x.momentum("queue")?;
            // The write pointer advances by the number of kept pairs, a host
            // count, so this is the one place the weights are read back.
            let w = match &m.pair_weights {
                Some(w) => Some(w.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                None => None,
            };
            q.lock()
                .enqueue(&m.image, &m.text, &x.image_ids, w.as_deref())?;
        }
        Ok(())
    }

    /// All state, tensors keyed `"<owner>.<name>"` and metadata keyed by owner
    /// (`queue`, `amf`, then each objective's name).
    pub fn state(&self) -> Result<ObjectiveState> {
        let mut parts: Vec<(String, ObjectiveState)> = Vec::new();
        if let Some(q) = &self.queue {
            parts.push(("queue".into(), q.lock().state()?));
        }
        if let Some(a) = &self.amf {
            parts.push(("amf".into(), a.state()?));
        }
        for e in &self.entries {
            parts.push((e.objective.name().to_string(), e.objective.state()?));
        }
        let mut out = ObjectiveState {
            meta: serde_json::Value::Object(Default::default()),
            ..Default::default()
        };
        for (owner, s) in parts {
            for (k, v) in s.tensors {
                out.tensors.insert(format!("{owner}.{k}"), v);
            }
            if let serde_json::Value::Object(m) = &mut out.meta {
                m.insert(owner, s.meta);
            }
        }
        Ok(out)
    }

    /// Restores what [`Objectives::state`] returned.
    pub fn load_state(&mut self, s: &ObjectiveState) -> Result<()> {
        let part = |owner: &str| -> ObjectiveState {
            let prefix = format!("{owner}.");
            ObjectiveState {
                tensors: s
                    .tensors
                    .iter()
                    .filter_map(|(k, v)| {
                        k.strip_prefix(&prefix).map(|k| (k.to_string(), v.clone()))
                    })
                    .collect(),
                meta: s
                    .meta
                    .get(owner)
                    .cloned()
                    .unwrap_or(serde_json::Value::Null),
            }
        };
        if let Some(q) = &self.queue {
            q.lock().load_state(&part("queue"))?;
        }
        if let Some(a) = &mut self.amf {
            a.load_state(&part("amf"))?;
        }
        for e in &mut self.entries {
            let p = part(e.objective.name());
            e.objective.load_state(&p)?;
        }
        Ok(())
    }
}
