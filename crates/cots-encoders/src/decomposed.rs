//! VLDeformer (Zhang et al., "VLDeformer: Vision-Language Decomposed
//! Transformer for Fast Cross-Modal Retrieval", 2021): a trained
//! single-stream model taken apart into two individual encoders.
//!
//! The SAME joint transformer ([`JointTransformer`]: embeddings, type and
//! position embeddings, stack) runs on one modality at a time, each input
//! being the joint input with the other modality removed:
//! - a text alone is `[CLS] text [SEP]`, exactly the text part of the joint
//!   input;
//! - an image alone is the joint input of an empty caption, `[CLS] [SEP]`
//!   followed by the image's patches, so the stack sees the `[CLS]` it was
//!   trained to summarise with.
//!
//! A pooled output ([`Pooling::Mean`] over the non-padding positions, the
//! paper's choice and the default, or [`Pooling::Cls`]) goes through a
//! per-side linear projection and L2 normalisation. No new tower: the point
//! is reusing the early-interaction model's knowledge, which contrastive
//! learning on a small target set then adapts (see
//! `cots_objectives::bimodal`).
//!
//! Variables: the joint transformer under `joint.*` with the cross-encoder's
//! own names below it (`joint.embeddings.*`, `joint.image_embeddings.*`,
//! `joint.encoder.*`), so a cross-encoder checkpoint loads bit-identically
//! under the prefix `joint.`; plus `image_proj`, `text_proj` and `temp`.

use std::path::Path;

use candle_core::{DType, Module, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use cots_ops::SeededRng;
use serde::{Deserialize, Serialize};

use crate::bert::linear;
use crate::cross::{self, JointTransformer};
use crate::dual::DualEncoder;
use crate::two_stream::{l2_normalize, TEMP_MAX, TEMP_MIN};
use crate::{Error, Result};

pub use crate::bert::Pooling;

/// The decomposed model's hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// The single-stream model this was decomposed from.
    pub joint: cross::Config,
    /// Width of the shared embedding space.
    pub embed_dim: usize,
    #[serde(default)]
    pub pooling: Pooling,
    /// Initial contrastive temperature.
    pub temp_init: f64,
    /// `[CLS]` and `[SEP]` of the tokenizer: an image alone is embedded
    /// after an empty caption, `[CLS] [SEP]`.
    pub cls_token_id: u32,
    pub sep_token_id: u32,
}

impl Config {
    /// A decomposition of `joint` into `embed_dim`-wide embeddings.
    pub fn new(joint: &cross::Config, embed_dim: usize, cls: u32, sep: u32) -> Self {
        Self {
            joint: joint.clone(),
            embed_dim,
            pooling: Pooling::default(),
            temp_init: 0.07,
            cls_token_id: cls,
            sep_token_id: sep,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.joint.validate()?;
        if self.embed_dim == 0 {
            return Err(Error::Config(
                "decomposed: embed_dim must be positive".into(),
            ));
        }
        if !(TEMP_MIN..=TEMP_MAX).contains(&self.temp_init) {
            return Err(Error::Config(format!(
                "decomposed: temp_init {} is outside [{TEMP_MIN}, {TEMP_MAX}]",
                self.temp_init
            )));
        }
        let vocab = self.joint.joint.vocab_size as u32;
        if self.cls_token_id >= vocab || self.sep_token_id >= vocab {
            return Err(Error::Config(format!(
                "decomposed: [CLS] {} or [SEP] {} is outside the vocabulary of {vocab}",
                self.cls_token_id, self.sep_token_id
            )));
        }
        Ok(())
    }

    /// Writes the config as JSON.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::files::write_json(path.as_ref(), self)
    }

    /// Reads and validates a config written by [`Self::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let cfg: Self = crate::files::read_json(path.as_ref())?;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The joint transformer as two individual encoders.
#[derive(Clone, Debug)]
pub struct Decomposed {
    joint: JointTransformer,
    image_proj: Linear,
    text_proj: Linear,
    temp: Tensor,
    cfg: Config,
}

impl Decomposed {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let h = cfg.joint.joint.hidden_size;
        Ok(Self {
            joint: JointTransformer::new(&cfg.joint, vb.pp("joint"))?,
            image_proj: linear(h, cfg.embed_dim, vb.pp("image_proj"))?,
            text_proj: linear(h, cfg.embed_dim, vb.pp("text_proj"))?,
            temp: vb.get_with_hints((), "temp", Init::Const(cfg.temp_init))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The shared joint stack.
    pub fn transformer(&self) -> &JointTransformer {
        &self.joint
    }

    /// The learnable temperature clamped to [[`TEMP_MIN`], [`TEMP_MAX`]].
    pub fn temperature(&self) -> Result<Tensor> {
        Ok(self.temp.clamp(TEMP_MIN, TEMP_MAX)?)
    }

    /// Pools `[B, S, D]` states over the positions where `mask` is 1.
    fn pool(&self, h: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.cfg.pooling.pool(h, mask)
    }

    /// Embeds texts alone; `rng = Some(..)` means training (dropout active).
    ///
    /// # Shapes
    /// - `ids`, `mask`: `[B, L]`; output `[B, E]`, L2-normalised.
    pub fn encode_text(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        rng: Option<&SeededRng>,
    ) -> Result<Tensor> {
        let x = self.joint.embed_text(ids, rng)?;
        let h = self.joint.encode(&x, mask, rng)?;
        l2_normalize(&self.text_proj.forward(&self.pool(&h, mask)?)?)
    }

    /// Embeds images alone, after an empty caption `[CLS] [SEP]`.
    ///
    /// # Shapes
    /// - `pixels`: `[B, C, H, W]`; output `[B, E]`, L2-normalised.
    pub fn encode_image(&self, pixels: &Tensor, rng: Option<&SeededRng>) -> Result<Tensor> {
        let patches = self.joint.embed_image(pixels, rng)?;
        let (b, n, _) = patches.dims3()?;
        let ids = Tensor::new(
            &[[self.cfg.cls_token_id, self.cfg.sep_token_id]],
            pixels.device(),
        )?
        .repeat((b, 1))?;
        let prefix = self.joint.embed_text(&ids, rng)?;
        let x = Tensor::cat(&[&prefix, &patches], 1)?;
        let mask = Tensor::ones((b, 2 + n), DType::F32, pixels.device())?;
        let h = self.joint.encode(&x, &mask, rng)?;
        l2_normalize(&self.image_proj.forward(&self.pool(&h, &mask)?)?)
    }
}

impl DualEncoder for Decomposed {
    fn embed_images(&self, pixels: &Tensor) -> Result<Tensor> {
        self.encode_image(pixels, None)
    }
    fn embed_texts(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.encode_text(ids, mask, None)
    }
    fn max_text_len(&self) -> usize {
        self.cfg.joint.max_text_len
    }
}
