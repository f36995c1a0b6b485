//! How do per-frame image features become one video vector?
//!
//! COTS (Lu et al., "COTS: Collaborative Two-Stream Vision-Language
//! Pre-training Model for Cross-Modal Retrieval", CVPR 2022) retrieves videos
//! by encoding sampled frames with the image stream and aggregating the frame
//! features over time. Two aggregators are offered:
//!
//! - [`Mode::Mean`]: the plain temporal mean. No weights, and blind to frame
//!   order: "moves left to right" and "moves right to left" give the same vector.
//! - [`Mode::Transformer`]: a small post-LN transformer (the BERT block of
//!   [`crate::bert`]) over the frame features plus learned frame-position
//!   embeddings, in the style of CLIP4Clip's "seqTransf" head (Luo et al.,
//!   2021). The position embeddings make it order-sensitive. Its readout is
//!   chosen by [`Readout`]: the mean over frames of the transformer output
//!   plus the input features (a residual, so a freshly initialised head stays
//!   close to mean pooling and does not destroy pretrained image features), or
//!   the final state of a learned CLS token prepended to the frames.
//!
//! Tensor names: `frame_position_embeddings.weight` `[num_frames, D]`,
//! `cls_token` `[1, 1, D]` (CLS readout only) and `encoder.layer.N.*` with
//! Hugging Face BERT names.

use candle_core::{Module, Tensor, D};
use candle_nn::{Embedding, Init, VarBuilder};
use cots_ops::SeededRng;
use serde::{Deserialize, Serialize};

use crate::bert::{self, Activation, BertEncoder};
use crate::{Error, Result};

/// Standard deviation of the position-embedding and CLS init, as in BERT.
const INIT_STD: f64 = 0.02;

/// Which vector the transformer aggregator returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Readout {
    /// Mean over frames of (transformer output + input features).
    #[default]
    Mean,
    /// The final hidden state of a learned CLS token prepended to the frames.
    Cls,
}

/// How frame features are aggregated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Mode {
    /// Temporal mean pooling; no weights.
    #[default]
    Mean,
    /// A `layers`-deep, `heads`-headed transformer over the frames.
    Transformer {
        layers: usize,
        heads: usize,
        #[serde(default)]
        readout: Readout,
    },
}

fn default_num_frames() -> usize {
    8
}
fn default_mlp_ratio() -> usize {
    4
}
fn default_eps() -> f64 {
    1e-12
}
fn default_position_scale() -> f64 {
    1.0
}
fn is_one(x: &f64) -> bool {
    *x == 1.0
}

/// Temporal aggregator hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub mode: Mode,
    /// The most frames a clip may have (rows of the position table).
    #[serde(default = "default_num_frames")]
    pub num_frames: usize,
    /// Width `D` of the frame features (the image stream's output).
    pub hidden: usize,
    /// Feed-forward width as a multiple of `hidden`.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: usize,
    /// Dropout inside the transformer (hidden states and attention).
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// The frame positions are added as `position_scale * table`. A table
    /// initialised like BERT's (std 0.02) is tiny next to LayerNormed frame
    /// features (std 1), so a fresh head is nearly blind to order and, with
    /// image features that do not yet tell frames apart, gets almost no
    /// gradient to become otherwise; a scale of 50 starts the positions at
    /// the features' size and lets them move as fast (a reparametrisation,
    /// like a learning-rate multiplier that also scales the init).
    #[serde(default = "default_position_scale", skip_serializing_if = "is_one")]
    pub position_scale: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::Mean,
            num_frames: default_num_frames(),
            hidden: 256,
            mlp_ratio: default_mlp_ratio(),
            dropout: 0.0,
            layer_norm_eps: default_eps(),
            position_scale: default_position_scale(),
        }
    }
}

impl Config {
    /// A 2-layer, 4-head transformer head with mean readout over `hidden`-wide features.
    pub fn transformer(hidden: usize, num_frames: usize) -> Self {
        Self {
            mode: Mode::Transformer {
                layers: 2,
                heads: 4,
                readout: Readout::Mean,
            },
            num_frames,
            hidden,
            ..Self::default()
        }
    }

    /// The BERT block configuration of the transformer mode (`None` for mean pooling).
    fn bert_config(&self) -> Result<Option<bert::Config>> {
        let Mode::Transformer { layers, heads, .. } = self.mode else {
            return Ok(None);
        };
        let cfg = bert::Config {
            // The encoder stack never reads the vocabulary; 1 satisfies validation.
            vocab_size: 1,
            hidden_size: self.hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: self.mlp_ratio * self.hidden,
            hidden_act: Activation::Gelu,
            max_position_embeddings: self.num_frames + 1,
            type_vocab_size: 1,
            layer_norm_eps: self.layer_norm_eps,
            hidden_dropout_prob: self.dropout,
            attention_probs_dropout_prob: self.dropout,
            pad_token_id: 0,
        };
        cfg.validate()?;
        Ok(Some(cfg))
    }

    /// Checks the constraints the module relies on.
    pub fn validate(&self) -> Result<()> {
        if !(self.position_scale.is_finite() && self.position_scale > 0.0) {
            return Err(Error::Config(format!(
                "temporal: position_scale {} must be positive",
                self.position_scale
            )));
        }
        if self.hidden == 0 || self.num_frames == 0 {
            return Err(Error::Config(
                "temporal: hidden and num_frames must be positive".into(),
            ));
        }
        if let Mode::Transformer { layers: 0, .. } = self.mode {
            return Err(Error::Config(
                "temporal: a transformer needs at least one layer (use mode = mean instead)".into(),
            ));
        }
        self.bert_config().map(|_| ())
    }
}

/// The weights of the transformer mode.
#[derive(Clone, Debug)]
struct TemporalTransformer {
    positions: Embedding,
    cls: Option<Tensor>,
    encoder: BertEncoder,
    readout: Readout,
    num_frames: usize,
    position_scale: f64,
}

/// Aggregates `[B, T, D]` frame features into `[B, D]` video features.
#[derive(Clone, Debug)]
pub struct TemporalPool {
    transformer: Option<TemporalTransformer>,
    hidden: usize,
}

impl TemporalPool {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let transformer = match (cfg.mode, cfg.bert_config()?) {
            (Mode::Transformer { readout, .. }, Some(bert_cfg)) => {
                let init = Init::Randn {
                    mean: 0.0,
                    stdev: INIT_STD,
                };
                let table = vb.pp("frame_position_embeddings").get_with_hints(
                    (cfg.num_frames, cfg.hidden),
                    "weight",
                    init,
                )?;
                let cls = match readout {
                    Readout::Cls => {
                        Some(vb.get_with_hints((1, 1, cfg.hidden), "cls_token", init)?)
                    }
                    Readout::Mean => None,
                };
                Some(TemporalTransformer {
                    positions: Embedding::new(table, cfg.hidden),
                    cls,
                    encoder: BertEncoder::new(&bert_cfg, vb.pp("encoder"))?,
                    readout,
                    num_frames: cfg.num_frames,
                    position_scale: cfg.position_scale,
                })
            }
            _ => None,
        };
        Ok(Self {
            transformer,
            hidden: cfg.hidden,
        })
    }

    /// Whether the output depends on frame order (the transformer mode).
    pub fn is_order_sensitive(&self) -> bool {
        self.transformer.is_some()
    }

    /// Aggregates frame features over time. `rng` drives dropout in the
    /// transformer mode; `None` means evaluation.
    ///
    /// # Shapes
    /// - `frame_feats`: `[B, T, D]` with `1 <= T <= num_frames` and `D = hidden`;
    ///   output `[B, D]`.
    pub fn forward(&self, frame_feats: &Tensor, rng: Option<&SeededRng>) -> Result<Tensor> {
        let (b, t, d) = frame_feats.dims3()?;
        if d != self.hidden || t == 0 {
            return Err(Error::Config(format!(
                "temporal: frame features are [{b}, {t}, {d}], expected [B, 1..=T, {}]",
                self.hidden
            )));
        }
        let Some(tr) = &self.transformer else {
            return Ok(frame_feats.mean(1)?);
        };
        if t > tr.num_frames {
            return Err(Error::Config(format!(
                "temporal: {t} frames exceed num_frames {}",
                tr.num_frames
            )));
        }
        let positions = Tensor::arange(0u32, t as u32, frame_feats.device())?;
        let positions = (tr.positions.forward(&positions)? * tr.position_scale)?.unsqueeze(0)?;
        let x = frame_feats.broadcast_add(&positions)?;
        match (&tr.cls, tr.readout) {
            (Some(cls), Readout::Cls) => {
                let cls = cls.broadcast_as((b, 1, d))?;
                let x = Tensor::cat(&[&cls, &x], 1)?;
                let h = tr.encoder.forward(&x, None, rng)?;
                Ok(h.narrow(1, 0, 1)?.squeeze(1)?)
            }
            _ => {
                let h = tr.encoder.forward(&x, None, rng)?;
                Ok((h + frame_feats)?.mean(D::Minus2)?)
            }
        }
    }
}
