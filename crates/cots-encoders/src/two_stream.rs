//! The two-stream model of COTS (Lu et al., "COTS: Collaborative Two-Stream
//! Vision-Language Pre-Training Model for Cross-Modal Retrieval", CVPR 2022):
//! a ViT image tower and a BERT text tower that never see each other, each
//! followed by a linear projection of its CLS state into a shared, L2-normalised
//! embedding space, plus the learnable contrastive temperature.
//!
//! Variables are scoped `vision.*`, `text.*`, `vision_proj.*`, `text_proj.*`
//! and `temp`, so a Hugging Face BERT checkpoint loads under `text.` (see
//! [`crate::weights::HfBertDir::load_into`]).

use std::path::Path;

use candle_core::{Module, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};
use cots_ops::SeededRng;
use serde::{Deserialize, Serialize};

use crate::bert::{self, linear, BertModel, Pooling};
use crate::temporal::{self, TemporalPool};
use crate::vit::{self, VisionTransformer};
use crate::{Error, Result};

/// Bounds of the learnable temperature (ALBEF's).
pub const TEMP_MIN: f64 = 0.001;
pub const TEMP_MAX: f64 = 0.5;

fn default_temp() -> f64 {
    0.07
}
fn default_text_len() -> usize {
    32
}
fn cls() -> Pooling {
    Pooling::Cls
}

/// Both towers' hyper-parameters and the shared embedding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub vision: vit::Config,
    pub text: bert::Config,
    /// Width of the shared embedding space.
    pub embed_dim: usize,
    /// Initial contrastive temperature.
    #[serde(default = "default_temp")]
    pub temp_init: f64,
    /// Longest tokenised text, `[CLS]` and `[SEP]` included.
    #[serde(default = "default_text_len")]
    pub max_text_len: usize,
    /// How the text tower's states become the vector that is projected:
    /// `cls` (COTS, the default) or `mean` (what sentence-transformers
    /// checkpoints such as all-MiniLM-L6-v2 were trained for).
    #[serde(default = "cls")]
    pub text_pooling: Pooling,
    /// The temporal head of a video model (frame features aggregated over
    /// time); `None` for an image model. Its `hidden` must equal the image
    /// tower's width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temporal: Option<temporal::Config>,
}

impl Config {
    /// Tiny towers for tests (32 px images, 64-wide, 2 layers, embed 32).
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            vision: vit::Config::tiny(),
            text: bert::Config::tiny(vocab_size),
            embed_dim: 32,
            temp_init: default_temp(),
            max_text_len: 32,
            text_pooling: Pooling::Cls,
            temporal: None,
        }
    }

    /// Small towers for CPU training (64 px, 256-wide, 4 layers, embed 128).
    pub fn small(vocab_size: usize) -> Self {
        Self {
            vision: vit::Config::small(),
            text: bert::Config::small(vocab_size),
            embed_dim: 128,
            temp_init: default_temp(),
            max_text_len: 40,
            text_pooling: Pooling::Cls,
            temporal: None,
        }
    }

    /// ViT-B/16 224 px + BERT-base uncased, embed 256 (ALBEF's setting).
    pub fn base() -> Self {
        Self {
            vision: vit::Config::base(),
            text: bert::Config::base(),
            embed_dim: 256,
            temp_init: default_temp(),
            max_text_len: 40,
            text_pooling: Pooling::Cls,
            temporal: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.vision.validate()?;
        self.text.validate()?;
        if self.embed_dim == 0 {
            return Err(Error::Config("embed_dim must be positive".into()));
        }
        if !(TEMP_MIN..=TEMP_MAX).contains(&self.temp_init) {
            return Err(Error::Config(format!(
                "temp_init {} is outside [{TEMP_MIN}, {TEMP_MAX}]",
                self.temp_init
            )));
        }
        if let Some(t) = &self.temporal {
            t.validate()?;
            if t.hidden != self.vision.hidden_size {
                return Err(Error::Config(format!(
                    "temporal.hidden {} must equal the image tower's width {}",
                    t.hidden, self.vision.hidden_size
                )));
            }
        }
        if self.max_text_len < 3 || self.max_text_len > self.text.max_position_embeddings {
            return Err(Error::Config(format!(
                "max_text_len {} must be in [3, max_position_embeddings {}]",
                self.max_text_len, self.text.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// Writes the config as TOML (`.toml`) or JSON (any other extension).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let fmt_err = |message: String| Error::Format {
            path: path.to_path_buf(),
            message,
        };
        let text = if is_toml(path) {
            toml::to_string_pretty(self).map_err(|e| fmt_err(e.to_string()))?
        } else {
            serde_json::to_string_pretty(self).map_err(|e| fmt_err(e.to_string()))?
        };
        std::fs::write(path, text).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads a config written by [`Self::save`] (format by extension).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let fmt_err = |message: String| Error::Format {
            path: path.to_path_buf(),
            message,
        };
        let cfg: Self = if is_toml(path) {
            toml::from_str(&text).map_err(|e| fmt_err(e.to_string()))?
        } else {
            serde_json::from_str(&text).map_err(|e| fmt_err(e.to_string()))?
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

fn is_toml(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some("toml")
}

/// Divides each row by its L2 norm (floored at 1e-12, like `F.normalize`).
///
/// # Shapes
/// - `x`: `[B, E]`; output `[B, E]`.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

/// The image tower's output.
#[derive(Clone, Debug)]
pub struct ImageOutput {
    /// `[B, 1 + N, Dv]`, after the final LayerNorm; index 0 is CLS. For
    /// clips, `[B, T, Dv]`: the CLS state of every frame.
    pub hidden: Tensor,
    /// `[B, E]`, L2-normalised projection of the CLS state (of the
    /// temporally aggregated frame CLS states, for clips).
    pub embed: Tensor,
}

/// The text tower's output.
#[derive(Clone, Debug)]
pub struct TextOutput {
    /// `[B, L, Dt]`; index 0 is `[CLS]`.
    pub hidden: Tensor,
    /// `[B, E]`, L2-normalised projection of the `[CLS]` state.
    pub embed: Tensor,
}

/// Two towers, two projections and a temperature.
#[derive(Clone, Debug)]
pub struct TwoStream {
    vision: VisionTransformer,
    text: BertModel,
    vision_proj: Linear,
    text_proj: Linear,
    temp: Tensor,
    temporal: Option<TemporalPool>,
    cfg: Config,
}

impl TwoStream {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            vision: VisionTransformer::new(&cfg.vision, vb.pp("vision"))?,
            text: BertModel::new(&cfg.text, vb.pp("text"))?,
            vision_proj: linear(cfg.vision.hidden_size, cfg.embed_dim, vb.pp("vision_proj"))?,
            text_proj: linear(cfg.text.hidden_size, cfg.embed_dim, vb.pp("text_proj"))?,
            temp: vb.get_with_hints((), "temp", Init::Const(cfg.temp_init))?,
            temporal: match &cfg.temporal {
                Some(t) => Some(TemporalPool::new(t, vb.pp("temporal"))?),
                None => None,
            },
            cfg: cfg.clone(),
        })
    }

    /// The learnable temperature clamped to [[`TEMP_MIN`], [`TEMP_MAX`]]
    /// (gradient flows while it is inside the bounds).
    ///
    /// # Shapes
    /// - output: `[]` (a scalar).
    pub fn temperature(&self) -> Result<Tensor> {
        Ok(self.temp.clamp(TEMP_MIN, TEMP_MAX)?)
    }

    /// Encodes images, or clips when the model has a temporal head;
    /// `rng = Some(..)` means training (dropout active).
    ///
    /// A clip's frames all go through the image tower (one batch of `B * T`
    /// images, shared weights); their CLS states are aggregated over time by
    /// the temporal head and the result is projected like an image's CLS.
    ///
    /// # Shapes
    /// - `pixels`: `[B, C, H, W]` images or `[B, T, C, H, W]` clips; `mask`:
    ///   `[B, N]` patch mask (images only, see [`VisionTransformer::forward`]);
    ///   output hidden `[B, 1 + N, Dv]` (clips: `[B, T, Dv]`), embed `[B, E]`.
    pub fn encode_image(
        &self,
        pixels: &Tensor,
        mask: Option<&Tensor>,
        rng: Option<&SeededRng>,
    ) -> Result<ImageOutput> {
        if pixels.rank() == 5 {
            return self.encode_clip(pixels, mask, rng);
        }
        let hidden = self.vision.forward(pixels, mask, rng)?;
        let embed = self.project_image(&hidden.get_on_dim(1, 0)?)?;
        Ok(ImageOutput { hidden, embed })
    }

    fn encode_clip(
        &self,
        pixels: &Tensor,
        mask: Option<&Tensor>,
        rng: Option<&SeededRng>,
    ) -> Result<ImageOutput> {
        let (b, t, c, h, w) = pixels.dims5()?;
        let Some(temporal) = &self.temporal else {
            return Err(Error::Config(format!(
                "pixels [{b}, {t}, {c}, {h}, {w}] are clips, but this model has no temporal head \
                 (an image model)"
            )));
        };
        if mask.is_some() {
            return Err(Error::Config(
                "masked vision modeling is not supported on clips".into(),
            ));
        }
        let frames = pixels.reshape((b * t, c, h, w))?;
        let cls = self.vision.forward(&frames, None, rng)?.get_on_dim(1, 0)?;
        let cls = cls.reshape((b, t, ()))?;
        let embed = self.project_image(&temporal.forward(&cls, rng)?)?;
        Ok(ImageOutput { hidden: cls, embed })
    }

    /// Encodes texts; `rng = Some(..)` means training (dropout active).
    ///
    /// # Shapes
    /// - `ids`: `[B, L]` u32; `attention_mask`: `[B, L]` 1 keep / 0 pad;
    ///   output hidden `[B, L, Dt]`, embed `[B, E]`.
    pub fn encode_text(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        rng: Option<&SeededRng>,
    ) -> Result<TextOutput> {
        let hidden = self.text.forward(ids, None, attention_mask, rng)?;
        let embed = self.project_text(&self.pool_text(&hidden, attention_mask)?)?;
        Ok(TextOutput { hidden, embed })
    }

    /// The text vector to project: the `[CLS]` state or the masked mean of
    /// the states (`Config::text_pooling`); no mask means no padding.
    ///
    /// # Shapes
    /// - `hidden`: `[B, L, Dt]`; `attention_mask`: `[B, L]`; output `[B, Dt]`.
    pub fn pool_text(&self, hidden: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        match (self.cfg.text_pooling, attention_mask) {
            (Pooling::Mean, None) => Ok(hidden.mean(1)?),
            (pooling, Some(m)) => pooling.pool(hidden, m),
            (Pooling::Cls, None) => Ok(hidden.get_on_dim(1, 0)?),
        }
    }

    /// Projects image CLS states into the shared space and L2-normalises.
    ///
    /// # Shapes
    /// - `cls`: `[B, Dv]`; output `[B, E]`.
    pub fn project_image(&self, cls: &Tensor) -> Result<Tensor> {
        l2_normalize(&self.vision_proj.forward(cls)?)
    }

    /// Projects text CLS states into the shared space and L2-normalises.
    ///
    /// # Shapes
    /// - `cls`: `[B, Dt]`; output `[B, E]`.
    pub fn project_text(&self, cls: &Tensor) -> Result<Tensor> {
        l2_normalize(&self.text_proj.forward(cls)?)
    }

    pub fn vision(&self) -> &VisionTransformer {
        &self.vision
    }

    pub fn text(&self) -> &BertModel {
        &self.text
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
}
