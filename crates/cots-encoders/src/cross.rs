//! The single-stream baseline: one joint transformer over a text and an
//! image, in the style of UNITER (Chen et al., ECCV 2020), Unicoder-VL (Li et
//! al., AAAI 2020) and VinVL (Zhang et al., CVPR 2021).
//!
//! The input is `[CLS] text tokens [SEP]` followed by the image's patch
//! embeddings; text tokens take token type 0 and patches type 1 (the same
//! token-type table), each side has its own position embeddings. A post-LN
//! BERT stack attends over the whole sequence, and an image-text matching
//! head (pooler `tanh(W h_cls)` then a 2-way linear) says whether the pair
//! matches. Retrieval must run this for EVERY (image, text) pair, which is
//! what makes single-stream models slow: see `cargo xtask speedup`.
//!
//! Tensor names follow Hugging Face BERT for the shared parts
//! (`embeddings.*`, `encoder.layer.N.*`, `pooler.dense`), plus
//! `image_embeddings.{projection,position_embeddings,LayerNorm}` and
//! `itm_head`.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};
use cots_ops::SeededRng;
use serde::{Deserialize, Serialize};

use crate::bert::{self, attention_bias, linear, BertEmbeddings, BertEncoder, LayerNorm};
use crate::two_stream;
use crate::vit::patchify;
use crate::{Error, Result};

/// Hyper-parameters of the joint transformer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Width, depth, heads, vocabulary and dropout of the joint stack.
    pub joint: bert::Config,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    /// Longest tokenised text, `[CLS]` and `[SEP]` included.
    pub max_text_len: usize,
}

impl Config {
    /// The cross-encoder at the same size as a two-stream model: the text
    /// tower's width, heads, vocabulary and dropout, the deeper tower's
    /// depth, the image tower's image and patch sizes. This is what makes
    /// the speed comparison like for like.
    pub fn matching(ts: &two_stream::Config) -> Self {
        let mut joint = ts.text.clone();
        joint.num_hidden_layers = ts.text.num_hidden_layers.max(ts.vision.num_hidden_layers);
        joint.type_vocab_size = joint.type_vocab_size.max(2);
        Self {
            joint,
            image_size: ts.vision.image_size,
            patch_size: ts.vision.patch_size,
            num_channels: ts.vision.num_channels,
            max_text_len: ts.max_text_len,
        }
    }

    /// Matches [`two_stream::Config::tiny`] (tests).
    pub fn tiny(vocab_size: usize) -> Self {
        Self::matching(&two_stream::Config::tiny(vocab_size))
    }

    /// Matches [`two_stream::Config::small`].
    pub fn small(vocab_size: usize) -> Self {
        Self::matching(&two_stream::Config::small(vocab_size))
    }

    /// Matches [`two_stream::Config::base`]: 12 layers, 768 wide, ViT-B/16
    /// patches at 224 px.
    pub fn base() -> Self {
        Self::matching(&two_stream::Config::base())
    }

    /// Patches per image.
    pub fn num_patches(&self) -> usize {
        let g = self.image_size / self.patch_size.max(1);
        g * g
    }

    pub fn validate(&self) -> Result<()> {
        self.joint.validate()?;
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(Error::Config(format!(
                "cross-encoder: image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            )));
        }
        if self.joint.type_vocab_size < 2 {
            return Err(Error::Config(
                "cross-encoder: type_vocab_size must be at least 2 (text and image)".into(),
            ));
        }
        if self.max_text_len < 3 || self.max_text_len > self.joint.max_position_embeddings {
            return Err(Error::Config(format!(
                "cross-encoder: max_text_len {} must be in [3, max_position_embeddings {}]",
                self.max_text_len, self.joint.max_position_embeddings
            )));
        }
        Ok(())
    }
}

/// Patch projection, position and type embeddings of the image side.
#[derive(Clone, Debug)]
struct ImageEmbeddings {
    projection: Linear,
    position_embeddings: Tensor,
    layer_norm: LayerNorm,
    patch_size: usize,
    dropout: f32,
}

impl ImageEmbeddings {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.joint.hidden_size;
        let p = cfg.patch_size;
        Ok(Self {
            projection: linear(cfg.num_channels * p * p, h, vb.pp("projection"))?,
            position_embeddings: vb.get_with_hints(
                (1, cfg.num_patches(), h),
                "position_embeddings",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            layer_norm: LayerNorm::new(h, cfg.joint.layer_norm_eps, vb.pp("LayerNorm"))?,
            patch_size: p,
            dropout: cfg.joint.hidden_dropout_prob as f32,
        })
    }

    /// # Shapes
    /// - `pixels`: `[B, C, H, W]`; `image_type`: `[D]`; output `[B, N, D]`.
    fn forward(
        &self,
        pixels: &Tensor,
        image_type: &Tensor,
        rng: Option<&SeededRng>,
    ) -> Result<Tensor> {
        let x = self
            .projection
            .forward(&patchify(pixels, self.patch_size)?)?;
        let x = x
            .broadcast_add(&self.position_embeddings)?
            .broadcast_add(image_type)?;
        let x = self.layer_norm.forward(&x)?;
        Ok(cots_ops::dropout(&x, self.dropout, rng)?)
    }
}

/// The joint stack with its input embeddings: the whole single-stream model
/// but its matching head. The cross-encoder runs it on a text and an image
/// together; VLDeformer's decomposed encoders ([`crate::decomposed`]) run the
/// same module, with the same weights, on one modality at a time.
#[derive(Clone, Debug)]
pub struct JointTransformer {
    embeddings: BertEmbeddings,
    image_embeddings: ImageEmbeddings,
    encoder: BertEncoder,
    cfg: Config,
}

impl JointTransformer {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            embeddings: BertEmbeddings::new(&cfg.joint, vb.pp("embeddings"))?,
            image_embeddings: ImageEmbeddings::new(cfg, vb.pp("image_embeddings"))?,
            encoder: BertEncoder::new(&cfg.joint, vb.pp("encoder"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The image side's input tokens (token type 1).
    ///
    /// # Shapes
    /// - `pixels`: `[B, C, H, W]`; output `[B, N, D]`.
    pub fn embed_image(&self, pixels: &Tensor, rng: Option<&SeededRng>) -> Result<Tensor> {
        let (_, c, h, w) = pixels.dims4()?;
        let s = self.cfg.image_size;
        if c != self.cfg.num_channels || h != s || w != s {
            return Err(Error::Config(format!(
                "the joint transformer expects images of shape [B, {}, {s}, {s}], got {:?}",
                self.cfg.num_channels,
                pixels.dims()
            )));
        }
        let image_type = self.embeddings.token_type_embeddings().get(1)?;
        self.image_embeddings.forward(pixels, &image_type, rng)
    }

    /// The text side's input tokens (token type 0).
    ///
    /// # Shapes
    /// - `input_ids`: `[B, L]` u32; output `[B, L, D]`.
    pub fn embed_text(&self, input_ids: &Tensor, rng: Option<&SeededRng>) -> Result<Tensor> {
        self.embeddings.forward(input_ids, None, rng)
    }

    /// Runs the stack over embedded tokens (any concatenation of
    /// [`Self::embed_text`] and [`Self::embed_image`] outputs).
    ///
    /// # Shapes
    /// - `x`: `[B, S, D]`; `mask`: `[B, S]` (1 keep, 0 padding); output
    ///   `[B, S, D]`.
    pub fn encode(&self, x: &Tensor, mask: &Tensor, rng: Option<&SeededRng>) -> Result<Tensor> {
        let bias = attention_bias(&mask.to_dtype(DType::F32)?, x.dtype())?;
        self.encoder.forward(x, Some(&bias), rng)
    }
}

/// The single-stream image-text matching model.
#[derive(Clone, Debug)]
pub struct CrossEncoder {
    transformer: JointTransformer,
    pooler: Linear,
    itm_head: Linear,
}

impl CrossEncoder {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.joint.hidden_size;
        Ok(Self {
            transformer: JointTransformer::new(cfg, vb.clone())?,
            pooler: linear(h, h, vb.pp("pooler").pp("dense"))?,
            itm_head: linear(h, 2, vb.pp("itm_head"))?,
        })
    }

    pub fn config(&self) -> &Config {
        self.transformer.config()
    }

    /// The joint stack without the matching head.
    pub fn transformer(&self) -> &JointTransformer {
        &self.transformer
    }

    /// The image side's input tokens; computed once per image and reused
    /// for every text it is paired with.
    ///
    /// # Shapes
    /// - `pixels`: `[B, C, H, W]`; output `[B, N, D]`.
    pub fn embed_image(&self, pixels: &Tensor, rng: Option<&SeededRng>) -> Result<Tensor> {
        self.transformer.embed_image(pixels, rng)
    }

    /// The text side's input tokens (token type 0).
    ///
    /// # Shapes
    /// - `input_ids`: `[B, L]` u32; output `[B, L, D]`.
    pub fn embed_text(&self, input_ids: &Tensor, rng: Option<&SeededRng>) -> Result<Tensor> {
        self.transformer.embed_text(input_ids, rng)
    }

    /// Runs the joint transformer on embedded pairs; row `b` pairs text `b`
    /// with image `b`.
    ///
    /// # Shapes
    /// - `text`: `[B, L, D]` from [`Self::embed_text`]; `text_mask`: `[B, L]`
    ///   (1 keep, 0 padding); `image`: `[B, N, D]` from
    ///   [`Self::embed_image`]; output: ITM logits `[B, 2]` (column 1 = match).
    pub fn joint(
        &self,
        text: &Tensor,
        text_mask: &Tensor,
        image: &Tensor,
        rng: Option<&SeededRng>,
    ) -> Result<Tensor> {
        let (b, _, _) = text.dims3()?;
        let (bi, n, _) = image.dims3()?;
        if bi != b {
            return Err(Error::Config(format!(
                "cross-encoder: {b} texts but {bi} images in one batch of pairs"
            )));
        }
        let x = Tensor::cat(&[text, image], 1)?;
        let mask = Tensor::cat(
            &[
                &text_mask.to_dtype(DType::F32)?,
                &Tensor::ones((b, n), DType::F32, x.device())?,
            ],
            1,
        )?;
        let x = self.transformer.encode(&x, &mask, rng)?;
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
        let pooled = self.pooler.forward(&cls)?.tanh()?;
        Ok(self.itm_head.forward(&pooled)?)
    }

    /// ITM logits of pairs given as raw inputs.
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: `[B, L]`; `pixels`: `[B, C, H, W]`;
    ///   output `[B, 2]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        pixels: &Tensor,
        rng: Option<&SeededRng>,
    ) -> Result<Tensor> {
        let text = self.embed_text(input_ids, rng)?;
        let image = self.embed_image(pixels, rng)?;
        self.joint(&text, attention_mask, &image, rng)
    }
}

/// The retrieval score of ITM logits: the log-odds of "match",
/// `logit_match - logit_no_match`, monotone in the match probability.
///
/// # Shapes
/// - `logits`: `[B, 2]`; output `[B]`.
pub fn match_score(logits: &Tensor) -> Result<Tensor> {
    let yes = logits.narrow(D::Minus1, 1, 1)?;
    let no = logits.narrow(D::Minus1, 0, 1)?;
    Ok((yes - no)?.squeeze(D::Minus1)?)
}
