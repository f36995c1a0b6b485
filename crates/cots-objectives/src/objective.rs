//! The [`Objective`] trait: step inputs in, named loss terms out, own state out.
//!
//! Encoders only produce features; every training signal is its own type that
//! turns the features of one step into named scalar loss terms (the open_clip
//! shape). The trainer never looks inside an objective: it asks the
//! composition ([`crate::Objectives`]) which forward passes to run
//! ([`Needs`]), hands it the resulting tensors ([`StepInputs`]), and
//! back-propagates the weighted total.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// Which forward passes and side inputs the trainer must provide.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Momentum (EMA) encoders: `image_embed_m` and `text_embed_m`.
    pub momentum: bool,
    /// A second text pass with masked tokens: [`MlmInputs`].
    pub masked_text: bool,
    /// A second image pass with masked patches: the hidden part of [`MvmInputs`].
    pub masked_image: bool,
    /// Visual token codes from the frozen dVAE: the codes of [`MvmInputs`].
    pub dvae_codes: bool,
    /// Match logits of a single-stream cross-encoder: [`ItmInputs`].
    pub cross_encoder: bool,
}

impl Needs {
    /// Everything either side needs.
    pub fn union(self, o: Needs) -> Needs {
        Needs {
            momentum: self.momentum || o.momentum,
            masked_text: self.masked_text || o.masked_text,
            masked_image: self.masked_image || o.masked_image,
            dvae_codes: self.dvae_codes || o.dvae_codes,
            cross_encoder: self.cross_encoder || o.cross_encoder,
        }
    }
}

/// Inputs of masked language modeling.
#[derive(Clone, Copy, Debug)]
pub struct MlmInputs<'a> {
    /// `[B, L, Dt]`: last hidden states of the text encoder on the MASKED text.
    pub hidden: &'a Tensor,
    /// `[B, L]` i64: the original token id at masked positions, `-100` elsewhere.
    pub labels: &'a Tensor,
}

/// Inputs of masked vision modeling.
#[derive(Clone, Copy, Debug)]
pub struct MvmInputs<'a> {
    /// `[B, 1 + N, Dv]`: last hidden states of the image encoder on the MASKED
    /// image, `[CLS]` first, then the `N` patches in row-major grid order.
    pub hidden: &'a Tensor,
    /// `[B, N]` any dtype: non-zero where the patch was masked.
    pub mask: &'a Tensor,
    /// `[B, N]` u32: visual token of every patch from the frozen dVAE on the
    /// CLEAN image (same grid order as the patches).
    pub codes: &'a Tensor,
}

/// Inputs of image-text matching (single-stream baseline).
#[derive(Clone, Copy, Debug)]
pub struct ItmInputs<'a> {
    /// `[B', 2]`: cross-encoder logits (column 1 = "match").
    pub logits: &'a Tensor,
    /// `[B']` u32: 1 for a matching pair, 0 for a sampled negative.
    pub labels: &'a Tensor,
}

/// Everything one training step produced that an objective may read.
///
/// Online embeddings carry gradients; momentum embeddings must come from the
/// EMA encoders and are detached by the objectives anyway. The paired global
/// feature used by MLM/MVM is the clean online embedding of the other
/// modality (`image_embed` for MLM, `text_embed` for MVM).
#[derive(Clone, Copy, Debug)]
pub struct StepInputs<'a> {
    /// `[B, E]`: online image embeddings, L2-normalised.
    pub image_embed: &'a Tensor,
    /// `[B, E]`: online text embeddings, L2-normalised.
    pub text_embed: &'a Tensor,
    /// `[B, E]`: momentum image embeddings, L2-normalised (when `Needs::momentum`).
    pub image_embed_m: Option<&'a Tensor>,
    /// `[B, E]`: momentum text embeddings, L2-normalised (when `Needs::momentum`).
    pub text_embed_m: Option<&'a Tensor>,
    /// `[B]` u32: image id of each pair; captions of one image share it.
    pub image_ids: &'a Tensor,
    /// Scalar (rank 0): the learnable, already clamped temperature.
    pub temperature: &'a Tensor,
    /// `[B]` f32: per-pair weights from the adaptive momentum filter (0 = dropped).
    pub pair_weights: Option<&'a Tensor>,
    pub mlm: Option<MlmInputs<'a>>,
    pub mvm: Option<MvmInputs<'a>>,
    pub itm: Option<ItmInputs<'a>>,
}

impl<'a> StepInputs<'a> {
    /// The momentum embeddings `(image, text)`, detached, or a
    /// [`Error::MissingInput`] naming `objective`.
    pub fn momentum(&self, objective: &str) -> Result<(Tensor, Tensor)> {
        let missing = |input| Error::MissingInput {
            objective: objective.to_string(),
            input,
        };
        let f_m = self.image_embed_m.ok_or_else(|| missing("image_embed_m"))?;
        let t_m = self.text_embed_m.ok_or_else(|| missing("text_embed_m"))?;
        Ok((f_m.detach(), t_m.detach()))
    }

    /// Pair weights on the host, `None` when every pair counts fully.
    pub fn pair_weights_host(&self) -> Result<Option<Vec<f32>>> {
        match self.pair_weights {
            Some(w) => Ok(Some(w.to_dtype(DType::F32)?.to_vec1::<f32>()?)),
            None => Ok(None),
        }
    }

    /// Batch size `B`.
    pub fn batch_size(&self) -> Result<usize> {
        Ok(self.image_embed.dim(0)?)
    }
}

/// One named scalar loss term, unweighted.
#[derive(Clone, Debug)]
pub struct LossTerm {
    pub name: String,
    /// Rank-0 tensor.
    pub value: Tensor,
}

impl LossTerm {
    pub fn new(name: impl Into<String>, value: Tensor) -> Self {
        Self {
            name: name.into(),
            value,
        }
    }
}

/// Checkpointable state of an objective: named tensors (saved as safetensors)
/// plus small JSON metadata (pointers, counters, running statistics, RNG state).
#[derive(Clone, Debug, Default)]
pub struct ObjectiveState {
    pub tensors: BTreeMap<String, Tensor>,
    pub meta: serde_json::Value,
}

impl ObjectiveState {
    /// The tensor `name`, or a [`Error::State`] naming `owner`.
    pub fn tensor(&self, owner: &str, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::State {
            owner: owner.to_string(),
            message: format!("tensor `{name}` is missing"),
        })
    }
}

/// A training signal.
///
/// The trainer's step order, which every objective may rely on:
/// 1. forward passes (clean, momentum, masked, dVAE codes as [`Needs`] says);
/// 2. AMF weights (`Objectives::filter`) from the momentum embeddings;
/// 3. [`Objective::losses`] for every objective, summed with their weights;
/// 4. backward and optimizer step;
/// 5. EMA update of the momentum encoders;
/// 6. [`Objective::after_step`] (the composition then enqueues the momentum
///    keys into the lockstep queue, once).
pub trait Objective: Send {
    /// Unique name; also the prefix of this objective's checkpoint state.
    fn name(&self) -> &str;
    /// The forward passes this objective reads.
    fn needs(&self) -> Needs;
    /// Named, unweighted scalar loss terms of this step.
    fn losses(&mut self, x: &StepInputs) -> Result<Vec<LossTerm>>;
    /// Called once after the optimizer and EMA updates.
    fn after_step(&mut self, _x: &StepInputs) -> Result<()> {
        Ok(())
    }
    /// State to checkpoint (trainable weights live in the model's `VarMap`, not here).
    fn state(&self) -> Result<ObjectiveState> {
        Ok(ObjectiveState::default())
    }
    /// Restores what [`Objective::state`] returned.
    fn load_state(&mut self, _s: &ObjectiveState) -> Result<()> {
        Ok(())
    }
}

/// Mean of `per_row` weighted by the pair weights, normalised by the weight sum.
///
/// With all weights zero the result is an exact zero that still depends on
/// `per_row`, so the graph stays connected and the step is a no-op.
///
/// # Shapes
/// - `per_row`: `[B]`; `weights`: `[B]` or `None`; returns a scalar.
pub fn weighted_mean(per_row: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
    match weights {
        None => Ok(per_row.mean_all()?),
        Some(w) => {
            let w = w.to_dtype(per_row.dtype())?;
            let sum: f64 = w.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            let total = (per_row * &w)?.sum_all()?;
            Ok((total / sum.max(1e-12))?)
        }
    }
}
