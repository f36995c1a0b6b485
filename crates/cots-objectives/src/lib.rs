//! # cots-objectives: what is each training signal, and how do I swap one?
//!
//! Training objectives of COTS (Lu et al., "COTS: Collaborative Two-Stream
//! Vision-Language Pre-Training Model for Cross-Modal Retrieval", CVPR 2022)
//! and the losses it is compared with, behind one small trait.
//!
//! - [`Objective`]: step features ([`StepFeatures`]) in, named loss terms
//!   out, own state saved with checkpoints; [`Objectives`] composes weighted
//!   objectives.
//! - One file per objective: [`itc`] (instance level, momentum contrastive
//!   over lockstep queues), [`mvlm`] (token level, MLM + MVM without a fusion
//!   module), [`kl`] (task level), [`amf`] (adaptive momentum filter), and the
//!   comparison losses [`clip`], [`vse`], [`itm`], and [`bimodal`]
//!   (VLDeformer's decomposition loss, negatives from both modalities).
//! - [`queue`]: the lockstep image/text/id queues, written once per step.
//! - [`registry`]: the TOML-friendly [`ObjectivesConfig`] and [`build`].
//!
//! The trainer's step order (every objective relies on it):
//! 1. forward: clean online passes; momentum passes, masked passes and dVAE
//!    codes as [`Objectives::needs`] says;
//! 2. [`Objectives::filter`]: AMF pair weights from the momentum embeddings
//!    (put them into [`MomentumFeatures::pair_weights`]);
//! 3. [`Objectives::losses`] on the step's [`StepFeatures`]: the weighted
//!    total and every named term; keep [`StepFeatures::detached`] for step 6
//!    so the graph can go after the backward;
//! 4. backward on the total, optimizer step;
//! 5. EMA update of the momentum encoders;
//! 6. [`Objectives::after_step`] on the detached features: enqueues the
//!    momentum keys of the kept pairs.
//!
//! Objectives receive tensors only; they never depend on the encoders. The
//! masked positions of MLM/MVM arrive as index tensors built on the host with
//! the batch, so the losses run on the device without reading anything back.

pub mod amf;
pub mod bimodal;
pub mod clip;
mod compose;
mod error;
pub mod itc;
pub mod itm;
pub mod kl;
pub mod mvlm;
mod objective;
pub mod queue;
pub mod registry;
pub mod vse;

pub use compose::{Losses, Objectives};
pub use error::{Error, Result};
pub use mvlm::Dims;
pub use objective::{
    weighted_mean, LossTerm, MaskedImage, MaskedText, MatchLogits, MomentumFeatures, Needs,
    Objective, ObjectiveState, StepFeatures,
};
pub use queue::{LockstepQueue, QueueConfig, SharedQueue};
pub use registry::{build, ObjectiveConfig, ObjectivesConfig};
