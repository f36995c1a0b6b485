//! The two-stream model of COTS (Lu et al., "COTS: Collaborative Two-Stream
//! Vision-Language Pre-Training Model for Cross-Modal Retrieval", CVPR 2022):
//! a ViT image tower and a BERT text tower that never see each other, each
//! followed by a linear projection of its CLS state into a shared, L2-normalised
//! embedding space, plus the learnable contrastive temperature.
//!
//! The image tower may instead be a frozen, ImageNet-pretrained CNN
//! ([`ImageTower::EfficientnetLite0`]): its globally pooled features take the
//! place of the CLS state, and only the projection above it learns (LiT,
//! Zhai et al. 2022, "Locked-image Tuning").
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
use crate::efficientnet::{self, EfficientNetLite};
use crate::temporal::{self, TemporalPool};
use crate::vit::{self, VisionTransformer};
use crate::{Error, Result};

/// Bounds of the learnable temperature (ALBEF's).
pub const TEMP_MIN: f64 = 0.001;
pub const TEMP_MAX: f64 = 0.5;

fn default_temp() -> f64 {
    0.07
}
fn default_temp_min() -> f64 {
    TEMP_MIN
}
fn default_text_len() -> usize {
    32
}
fn cls() -> Pooling {
    Pooling::Cls
}

/// Which network is the image tower.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageTower {
    /// The ViT described by [`Config::vision`], trained (COTS's tower).
    #[default]
    Vit,
    /// ImageNet EfficientNet-Lite0 ([`efficientnet::Config::lite0`]),
    /// frozen: inference-only, its 1280-d globally pooled features feed the
    /// trained projection. Of [`Config::vision`] only `image_size` (the input
    /// resolution) applies. Start it from pretrained weights
    /// ([`efficientnet::load_weights`]); random weights mean nothing here.
    EfficientnetLite0,
}

impl ImageTower {
    pub fn is_vit(&self) -> bool {
        *self == ImageTower::Vit
    }
}

/// The projections of both towers' pooled outputs into the shared space.
/// The default is COTS's: one linear map each, no dropout.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProjectionConfig {
    /// Width of a GELU MLP (`Linear -> GELU -> Linear`, variables
    /// `{vision,text}_proj_mlp.{fc1,fc2}`) whose output is added to the
    /// linear projection's; `None` (the default) keeps the linear map alone.
    pub mlp_hidden: Option<usize>,
    /// Dropout on the pooled tower output before it is projected, in
    /// training only. With frozen towers this is the regulariser that
    /// matters: the heads see the same features every epoch.
    pub input_dropout: f64,
}

impl ProjectionConfig {
    pub fn is_linear(&self) -> bool {
        *self == Self::default()
    }
}

/// Both towers' hyper-parameters and the shared embedding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Which network is the image tower (`vit`, the default, or
    /// `efficientnet-lite0`).
    #[serde(default, skip_serializing_if = "ImageTower::is_vit")]
    pub image_tower: ImageTower,
    pub vision: vit::Config,
    pub text: bert::Config,
    /// Width of the shared embedding space.
    pub embed_dim: usize,
    /// The projection heads (linear by default).
    #[serde(default, skip_serializing_if = "ProjectionConfig::is_linear")]
    pub projection: ProjectionConfig,
    /// Initial contrastive temperature.
    #[serde(default = "default_temp")]
    pub temp_init: f64,
    /// Lower bound of the learnable temperature (default [`TEMP_MIN`],
    /// ALBEF's 0.001). A higher floor keeps the contrastive losses from
    /// sharpening onto a few easy negatives early in a short run; equal to
    /// `temp_init`, the temperature is fixed.
    #[serde(default = "default_temp_min")]
    pub temp_min: f64,
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

/// The named sizes of a two-stream model (`model.preset` in a run config).
/// Deserialising an unknown name is an error listing these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    Tiny,
    Small,
    Base,
}

impl Preset {
    /// The preset's config; `vocab_size` sizes the text embedding table of
    /// `tiny` and `small` (`base` keeps BERT-base's 30,522 pieces).
    pub fn config(self, vocab_size: usize) -> Config {
        match self {
            Self::Tiny => Config::tiny(vocab_size),
            Self::Small => Config::small(vocab_size),
            Self::Base => Config::base(),
        }
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tiny => "tiny",
            Self::Small => "small",
            Self::Base => "base",
        })
    }
}

impl Config {
    /// Tiny towers for tests (32 px images, 64-wide, 2 layers, embed 32).
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            image_tower: ImageTower::Vit,
            vision: vit::Config::tiny(),
            text: bert::Config::tiny(vocab_size),
            embed_dim: 32,
            projection: ProjectionConfig::default(),
            temp_init: default_temp(),
            temp_min: default_temp_min(),
            max_text_len: 32,
            text_pooling: Pooling::Cls,
            temporal: None,
        }
    }

    /// Small towers for CPU training (64 px, 256-wide, 4 layers, embed 128).
    pub fn small(vocab_size: usize) -> Self {
        Self {
            image_tower: ImageTower::Vit,
            vision: vit::Config::small(),
            text: bert::Config::small(vocab_size),
            embed_dim: 128,
            projection: ProjectionConfig::default(),
            temp_init: default_temp(),
            temp_min: default_temp_min(),
            max_text_len: 40,
            text_pooling: Pooling::Cls,
            temporal: None,
        }
    }

    /// ViT-B/16 224 px + BERT-base uncased, embed 256 (ALBEF's setting).
    pub fn base() -> Self {
        Self {
            image_tower: ImageTower::Vit,
            vision: vit::Config::base(),
            text: bert::Config::base(),
            embed_dim: 256,
            projection: ProjectionConfig::default(),
            temp_init: default_temp(),
            temp_min: default_temp_min(),
            max_text_len: 40,
            text_pooling: Pooling::Cls,
            temporal: None,
        }
    }

    /// Width of the image tower's output (the vector that is projected).
    pub fn vision_width(&self) -> usize {
        match self.image_tower {
            ImageTower::Vit => self.vision.hidden_size,
            ImageTower::EfficientnetLite0 => efficientnet::Config::lite0().out_dim(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.vision.validate()?;
        if !self.image_tower.is_vit() && self.vision.num_channels != 3 {
            return Err(Error::Config(format!(
                "the pretrained CNN image tower reads RGB images, but vision.num_channels is {}",
                self.vision.num_channels
            )));
        }
        self.text.validate()?;
        if !(0.0..1.0).contains(&self.projection.input_dropout) {
            return Err(Error::Config(format!(
                "projection.input_dropout {} must be in [0, 1)",
                self.projection.input_dropout
            )));
        }
        if self.projection.mlp_hidden == Some(0) {
            return Err(Error::Config(
                "projection.mlp_hidden must be positive".into(),
            ));
        }
        if self.embed_dim == 0 {
            return Err(Error::Config("embed_dim must be positive".into()));
        }
        if !(TEMP_MIN..=TEMP_MAX).contains(&self.temp_init) {
            return Err(Error::Config(format!(
                "temp_init {} is outside [{TEMP_MIN}, {TEMP_MAX}]",
                self.temp_init
            )));
        }
        if !(TEMP_MIN..=self.temp_init).contains(&self.temp_min) {
            return Err(Error::Config(format!(
                "temp_min {} must be in [{TEMP_MIN}, temp_init = {}]",
                self.temp_min, self.temp_init
            )));
        }
        if let Some(t) = &self.temporal {
            t.validate()?;
            if t.hidden != self.vision_width() {
                return Err(Error::Config(format!(
                    "temporal.hidden {} must equal the image tower's width {}",
                    t.hidden,
                    self.vision_width()
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
    /// clips, `[B, T, Dv]`: the CLS state of every frame. The CNN tower has
    /// no tokens: `[B, 1, Dv]`, its pooled features in the CLS slot.
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

/// The image tower's network.
#[derive(Clone, Debug)]
enum Vision {
    Vit(VisionTransformer),
    Cnn(EfficientNetLite),
}

impl Vision {
    /// `[B, 1 + N, Dv]` ViT states, or `[B, 1, Dv]` pooled CNN features,
    /// detached (the CNN is frozen and its ops have no backward pass).
    fn forward(
        &self,
        pixels: &Tensor,
        mask: Option<&Tensor>,
        rng: Option<&SeededRng>,
    ) -> Result<Tensor> {
        match self {
            Vision::Vit(v) => v.forward(pixels, mask, rng),
            Vision::Cnn(c) => {
                if mask.is_some() {
                    return Err(Error::Config(
                        "masked vision modeling needs the ViT image tower (the CNN has no patches)"
                            .into(),
                    ));
                }
                Ok(c.forward(pixels)?.detach().unsqueeze(1)?)
            }
        }
    }
}

/// One tower's projection into the shared space: linear, plus an optional
/// GELU MLP beside it, after optional input dropout; L2-normalised.
#[derive(Clone, Debug)]
struct Projection {
    linear: Linear,
    mlp: Option<(Linear, Linear)>,
    input_dropout: f32,
}

impl Projection {
    /// Variables `{name}.*` and `{name}_mlp.{fc1,fc2}.*`.
    fn new(in_dim: usize, cfg: &Config, vb: &VarBuilder, name: &str) -> Result<Self> {
        let mlp = match cfg.projection.mlp_hidden {
            Some(h) => {
                let vb = vb.pp(format!("{name}_mlp"));
                Some((
                    linear(in_dim, h, vb.pp("fc1"))?,
                    linear(h, cfg.embed_dim, vb.pp("fc2"))?,
                ))
            }
            None => None,
        };
        Ok(Self {
            linear: linear(in_dim, cfg.embed_dim, vb.pp(name))?,
            mlp,
            input_dropout: cfg.projection.input_dropout as f32,
        })
    }

    fn forward(&self, x: &Tensor, rng: Option<&SeededRng>) -> Result<Tensor> {
        let x = cots_ops::nn::dropout(x, self.input_dropout, rng)?;
        let mut y = self.linear.forward(&x)?;
        if let Some((fc1, fc2)) = &self.mlp {
            y = (y + fc2.forward(&cots_ops::gelu_erf(&fc1.forward(&x)?)?)?)?;
        }
        l2_normalize(&y)
    }
}

/// Two towers, two projections and a temperature.
#[derive(Clone, Debug)]
pub struct TwoStream {
    vision: Vision,
    text: BertModel,
    vision_proj: Projection,
    text_proj: Projection,
    temp: Tensor,
    temporal: Option<TemporalPool>,
    cfg: Config,
}

impl TwoStream {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            vision: match cfg.image_tower {
                ImageTower::Vit => {
                    Vision::Vit(VisionTransformer::new(&cfg.vision, vb.pp("vision"))?)
                }
                ImageTower::EfficientnetLite0 => Vision::Cnn(EfficientNetLite::new(
                    &efficientnet::Config::lite0(),
                    vb.pp("vision"),
                )?),
            },
            text: BertModel::new(&cfg.text, vb.pp("text"))?,
            vision_proj: Projection::new(cfg.vision_width(), cfg, &vb, "vision_proj")?,
            text_proj: Projection::new(cfg.text.hidden_size, cfg, &vb, "text_proj")?,
            temp: vb.get_with_hints((), "temp", Init::Const(cfg.temp_init))?,
            temporal: match &cfg.temporal {
                Some(t) => Some(TemporalPool::new(t, vb.pp("temporal"))?),
                None => None,
            },
            cfg: cfg.clone(),
        })
    }

    /// The learnable temperature clamped to [`Config::temp_min`, [`TEMP_MAX`]]
    /// (gradient flows while it is inside the bounds).
    ///
    /// # Shapes
    /// - output: `[]` (a scalar).
    pub fn temperature(&self) -> Result<Tensor> {
        Ok(self.temp.clamp(self.cfg.temp_min, TEMP_MAX)?)
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
        let embed = self.project_image(&hidden.get_on_dim(1, 0)?, rng)?;
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
        let embed = self.project_image(&temporal.forward(&cls, rng)?, rng)?;
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
        let embed = self.project_text(&self.pool_text(&hidden, attention_mask)?, rng)?;
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

    /// Projects image CLS states (pooled features) into the shared space
    /// and L2-normalises; `rng = Some(..)` means training (input dropout).
    ///
    /// # Shapes
    /// - `cls`: `[B, Dv]`; output `[B, E]`.
    pub fn project_image(&self, cls: &Tensor, rng: Option<&SeededRng>) -> Result<Tensor> {
        self.vision_proj.forward(cls, rng)
    }

    /// Projects pooled text states into the shared space and L2-normalises;
    /// `rng = Some(..)` means training (input dropout).
    ///
    /// # Shapes
    /// - `cls`: `[B, Dt]`; output `[B, E]`.
    pub fn project_text(&self, cls: &Tensor, rng: Option<&SeededRng>) -> Result<Tensor> {
        self.text_proj.forward(cls, rng)
    }

    /// The ViT, unless the image tower is the CNN.
    pub fn vision(&self) -> Option<&VisionTransformer> {
        match &self.vision {
            Vision::Vit(v) => Some(v),
            Vision::Cnn(_) => None,
        }
    }

    /// Whether the image tower is frozen (the pretrained CNN): it is not
    /// trained, and a momentum copy of it computes the same features.
    pub fn image_tower_frozen(&self) -> bool {
        matches!(self.vision, Vision::Cnn(_))
    }

    pub fn text(&self) -> &BertModel {
        &self.text
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
}
