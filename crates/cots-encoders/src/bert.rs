//! BERT text encoder (Devlin et al., "BERT: Pre-training of Deep Bidirectional
//! Transformers for Language Understanding", NAACL 2019), the text stream of
//! COTS.
//!
//! The module tree and tensor names follow Hugging Face `BertModel` without
//! the `bert.` prefix (`embeddings.word_embeddings.weight`,
//! `encoder.layer.3.attention.self.query.weight`, ...), so BERT-family
//! checkpoints such as MiniLM load directly. Blocks are post-LN as in the
//! original BERT. Unlike candle-transformers' BERT, every piece here has a
//! backward pass (LayerNorm and softmax from [`cots_ops`]) and dropout is
//! real, driven by an explicit [`SeededRng`] so that training is reproducible.
//!
//! The pieces ([`BertEmbeddings`], [`BertLayer`], [`BertEncoder`],
//! [`attention_bias`]) are public because the single-stream cross-encoder
//! reuses them over a joint text-and-image sequence.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Embedding, Init, Linear, VarBuilder};
use cots_ops::SeededRng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Standard deviation of the truncated-normal init used by Hugging Face BERT
/// and ViT (`initializer_range`); a plain normal is close enough for training
/// from scratch.
const INIT_STD: f64 = 0.02;

/// Additive bias given to padded keys. Large enough that `exp` underflows to
/// zero in f32, small enough that adding a score never overflows to `-inf`.
const MASKED_BIAS: f64 = -1e9;

/// The feed-forward non-linearity (`hidden_act` in Hugging Face configs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Activation {
    /// Exact GELU, `x * Phi(x)` with the error function (BERT, ViT).
    #[default]
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation of GELU (GPT-2 style).
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
}

impl Activation {
    pub(crate) fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Gelu => cots_ops::gelu_erf(x)?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Relu => x.relu()?,
        })
    }
}

fn default_act() -> Activation {
    Activation::Gelu
}
fn default_max_pos() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f64 {
    0.1
}

/// BERT hyper-parameters; deserialises from a Hugging Face `config.json`
/// (unknown keys are ignored, missing optional ones take BERT's defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default)]
    pub pad_token_id: u32,
}

impl Config {
    /// A 2-layer, 64-wide BERT for tests: forward and backward in milliseconds.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            hidden_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 128,
            max_position_embeddings: 64,
            ..Self::base()
        }
    }

    /// A 4-layer, 256-wide BERT that trains on a CPU in minutes.
    pub fn small(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            hidden_size: 256,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            intermediate_size: 1024,
            max_position_embeddings: 128,
            ..Self::base()
        }
    }

    /// BERT-base uncased: 12 layers, 768 wide, 12 heads, 30,522 WordPiece tokens.
    pub fn base() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: Activation::Gelu,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            pad_token_id: 0,
        }
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_json_file(path: &std::path::Path) -> Result<Self> {
        let cfg: Self = crate::files::read_json(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the shape constraints the modules rely on.
    pub fn validate(&self) -> Result<()> {
        check_heads(self.hidden_size, self.num_attention_heads)?;
        if self.vocab_size == 0 || self.max_position_embeddings == 0 {
            return Err(Error::Config(
                "bert: vocab_size and max_position_embeddings must be positive".into(),
            ));
        }
        Ok(())
    }
}

pub(crate) fn check_heads(hidden: usize, heads: usize) -> Result<()> {
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(Error::Config(format!(
            "hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        )));
    }
    Ok(())
}

/// A linear layer initialised like Hugging Face (normal weights, zero bias).
pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: INIT_STD,
        },
    )?;
    let b = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
    Ok(Linear::new(w, Some(b)))
}

/// `layer(x)` as one fused op forward and one backward
/// ([`cots_ops::linear`]: the bias add folded into the product), for every
/// `[B, L, in]` projection inside the transformer blocks.
pub(crate) fn dense(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    Ok(cots_ops::linear(x, layer.weight(), layer.bias())?)
}

/// LayerNorm with a backward pass (candle's fused one has none).
#[derive(Clone, Debug)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(cots_ops::layer_norm(x, &self.weight, &self.bias, self.eps)?)
    }
}

/// Multi-head scaled dot-product self-attention (query, key, value
/// projections only; the output projection belongs to the caller's naming).
#[derive(Clone, Debug)]
pub(crate) struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    heads: usize,
    head_dim: usize,
    dropout: f32,
}

impl SelfAttention {
    pub(crate) fn new(hidden: usize, heads: usize, dropout: f64, vb: VarBuilder) -> Result<Self> {
        check_heads(hidden, heads)?;
        Ok(Self {
            query: linear(hidden, hidden, vb.pp("query"))?,
            key: linear(hidden, hidden, vb.pp("key"))?,
            value: linear(hidden, hidden, vb.pp("value"))?,
            heads,
            head_dim: hidden / heads,
            dropout: dropout as f32,
        })
    }

    /// `[B, L, D]` to `[B, H, L, D/H]`, contiguous so the batched matmul
    /// over `B * H` runs on dense blocks.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        Ok(x.reshape((b, l, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// # Shapes
    /// - `x`: `[B, L, D]`; `bias`: broadcastable to `[B, H, L, L]`
    ///   (usually `[B, 1, 1, L]` from [`attention_bias`]); output `[B, L, D]`.
    ///
    /// Without attention dropout (evaluation, or a probability of 0) this
    /// is [`cots_ops::attention_packed`] on the projections: one fused op
    /// forward and backward over all heads, no split or merge copies; with
    /// it, the composition with a dropout between the softmax and the value
    /// product.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        rng: Option<&SeededRng>,
    ) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        if self.dropout <= 0.0 || rng.is_none() {
            let (q, k, v) = (
                dense(&self.query, x)?,
                dense(&self.key, x)?,
                dense(&self.value, x)?,
            );
            return Ok(cots_ops::attention_packed(
                &q, &k, &v, self.heads, bias, scale,
            )?);
        }
        // Scaling the queries instead of the scores touches L*D values
        // rather than L*L per head.
        let q = self.split_heads(&(dense(&self.query, x)? * scale)?)?;
        let k = self.split_heads(&dense(&self.key, x)?)?;
        let v = self.split_heads(&dense(&self.value, x)?)?;
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(bias) = bias {
            scores = scores.broadcast_add(bias)?;
        }
        let probs = cots_ops::softmax_last_dim(&scores)?;
        let probs = cots_ops::dropout(&probs, self.dropout, rng)?;
        let ctx = probs.matmul(&v)?;
        Ok(ctx.transpose(1, 2)?.reshape((b, l, d))?)
    }
}

/// Turns a `[B, L]` keep-mask (1 = attend, 0 = padding; any numeric dtype)
/// into the additive attention bias used by [`BertEncoder::forward`].
///
/// # Shapes
/// - `mask`: `[B, L]`; output: `[B, 1, 1, L]` in `dtype`, 0 where kept and a
///   large negative number where padded.
pub fn attention_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, l) = mask.dims2()?;
    let keep = mask.to_dtype(DType::F32)?;
    let bias = ((keep - 1.0)? * -MASKED_BIAS)?;
    Ok(bias.reshape((b, 1, 1, l))?.to_dtype(dtype)?)
}

/// Word, position and token-type embeddings, summed, normalised and dropped out.
#[derive(Clone, Debug)]
pub struct BertEmbeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    layer_norm: LayerNorm,
    dropout: f32,
    max_positions: usize,
}

fn embedding(n: usize, dim: usize, vb: VarBuilder) -> Result<Embedding> {
    let w = vb.get_with_hints(
        (n, dim),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: INIT_STD,
        },
    )?;
    Ok(Embedding::new(w, dim))
}

impl BertEmbeddings {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            word_embeddings: embedding(cfg.vocab_size, h, vb.pp("word_embeddings"))?,
            position_embeddings: embedding(
                cfg.max_position_embeddings,
                h,
                vb.pp("position_embeddings"),
            )?,
            token_type_embeddings: embedding(
                cfg.type_vocab_size,
                h,
                vb.pp("token_type_embeddings"),
            )?,
            layer_norm: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
            dropout: cfg.hidden_dropout_prob as f32,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// The word embedding matrix, for heads that tie their output weights to it.
    ///
    /// # Shapes
    /// - output: `[vocab_size, D]`.
    pub fn word_embeddings(&self) -> &Tensor {
        self.word_embeddings.embeddings()
    }

    /// The token-type embedding matrix (type 0 = text; the cross-encoder
    /// gives image patches type 1).
    ///
    /// # Shapes
    /// - output: `[type_vocab_size, D]`.
    pub fn token_type_embeddings(&self) -> &Tensor {
        self.token_type_embeddings.embeddings()
    }

    /// # Shapes
    /// - `input_ids`: `[B, L]` u32; `token_type_ids`: `[B, L]` u32 (zeros when
    ///   `None`); output `[B, L, D]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        rng: Option<&SeededRng>,
    ) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        if l > self.max_positions {
            return Err(Error::Config(format!(
                "text of {l} tokens exceeds max_position_embeddings {}",
                self.max_positions
            )));
        }
        let dev = input_ids.device();
        let words = self.word_embeddings.forward(input_ids)?;
        let positions = Tensor::arange(0u32, l as u32, dev)?;
        let positions = self.position_embeddings.forward(&positions)?.unsqueeze(0)?;
        let types = match token_type_ids {
            Some(t) => self.token_type_embeddings.forward(t)?,
            None => self
                .token_type_embeddings
                .forward(&Tensor::zeros((b, l), DType::U32, dev)?)?,
        };
        let x = words.broadcast_add(&positions)?.add(&types)?;
        let x = self.layer_norm.forward(&x)?;
        Ok(cots_ops::dropout(&x, self.dropout, rng)?)
    }
}

/// One post-LN transformer block with Hugging Face BERT names.
#[derive(Clone, Debug)]
pub struct BertLayer {
    attention: SelfAttention,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    act: Activation,
    dropout: f32,
}

impl BertLayer {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let att = vb.pp("attention");
        Ok(Self {
            attention: SelfAttention::new(
                h,
                cfg.num_attention_heads,
                cfg.attention_probs_dropout_prob,
                att.pp("self"),
            )?,
            attention_output: linear(h, h, att.pp("output").pp("dense"))?,
            attention_norm: LayerNorm::new(
                h,
                cfg.layer_norm_eps,
                att.pp("output").pp("LayerNorm"),
            )?,
            intermediate: linear(h, cfg.intermediate_size, vb.pp("intermediate").pp("dense"))?,
            output: linear(cfg.intermediate_size, h, vb.pp("output").pp("dense"))?,
            output_norm: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
            act: cfg.hidden_act,
            dropout: cfg.hidden_dropout_prob as f32,
        })
    }

    /// # Shapes
    /// - `x`: `[B, L, D]`; `bias`: `[B, 1, 1, L]` (see [`attention_bias`]);
    ///   output `[B, L, D]`.
    pub fn forward(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        rng: Option<&SeededRng>,
    ) -> Result<Tensor> {
        let a = self.attention.forward(x, bias, rng)?;
        let a = dense(&self.attention_output, &a)?;
        let a = cots_ops::dropout(&a, self.dropout, rng)?;
        let x = self.attention_norm.forward(&(a + x)?)?;
        let h = self.act.apply(&dense(&self.intermediate, &x)?)?;
        let h = dense(&self.output, &h)?;
        let h = cots_ops::dropout(&h, self.dropout, rng)?;
        self.output_norm.forward(&(h + x)?)
    }
}

/// A stack of [`BertLayer`]s (`encoder.layer.N`).
#[derive(Clone, Debug)]
pub struct BertEncoder {
    layers: Vec<BertLayer>,
}

impl BertEncoder {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("layer");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BertLayer::new(cfg, vb.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    pub fn layers(&self) -> &[BertLayer] {
        &self.layers
    }

    /// # Shapes
    /// - `x`: `[B, L, D]`; `bias`: `[B, 1, 1, L]` additive attention bias
    ///   from [`attention_bias`] (`None` attends everywhere); output `[B, L, D]`.
    pub fn forward(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        rng: Option<&SeededRng>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.layers {
            x = layer.forward(&x, bias, rng)?;
        }
        Ok(x)
    }
}

/// The BERT text encoder: embeddings followed by the encoder stack (no pooler).
#[derive(Clone, Debug)]
pub struct BertModel {
    embeddings: BertEmbeddings,
    encoder: BertEncoder,
    cfg: Config,
}

impl BertModel {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            embeddings: BertEmbeddings::new(cfg, vb.pp("embeddings"))?,
            encoder: BertEncoder::new(cfg, vb.pp("encoder"))?,
            cfg: cfg.clone(),
        })
    }

    /// All token hidden states of the last layer; index 0 is `[CLS]`.
    /// `rng = Some(..)` means training: dropout is active.
    ///
    /// # Shapes
    /// - `input_ids`: `[B, L]` u32; `token_type_ids`: `[B, L]` u32 or `None`
    ///   (all zeros); `attention_mask`: `[B, L]`, 1 keep / 0 padding, or
    ///   `None` (attend everywhere); output `[B, L, hidden_size]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        rng: Option<&SeededRng>,
    ) -> Result<Tensor> {
        let x = self.embeddings.forward(input_ids, token_type_ids, rng)?;
        let bias = attention_mask
            .map(|m| attention_bias(m, x.dtype()))
            .transpose()?;
        self.encoder.forward(&x, bias.as_ref(), rng)
    }

    pub fn embeddings(&self) -> &BertEmbeddings {
        &self.embeddings
    }

    pub fn encoder(&self) -> &BertEncoder {
        &self.encoder
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }
}

/// How a sequence of token states becomes one vector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over the non-padding positions ([`mean_pool`]; what
    /// sentence-transformers checkpoints such as all-MiniLM-L6-v2 were
    /// trained with, and VLDeformer's choice).
    #[default]
    Mean,
    /// The `[CLS]` position's state (BERT's and COTS's choice).
    Cls,
}

impl Pooling {
    /// Pools `[B, L, D]` states over the positions where `attention_mask`
    /// (`[B, L]`, 1 keep, 0 pad) is 1; output `[B, D]`.
    pub fn pool(self, hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        match self {
            Pooling::Cls => Ok(hidden.get_on_dim(1, 0)?),
            Pooling::Mean => mean_pool(hidden, attention_mask),
        }
    }
}

/// Mean of the token states over kept positions (sentence-transformers'
/// mean pooling).
///
/// # Shapes
/// - `hidden`: `[B, L, D]`; `attention_mask`: `[B, L]` (1 keep, 0 pad);
///   output `[B, D]`.
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let m = attention_mask
        .to_dtype(hidden.dtype())?
        .unsqueeze(D::Minus1)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    // Clamping the count mirrors sentence-transformers and keeps an
    // all-padding row finite.
    let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
    Ok(sum.broadcast_div(&count)?)
}
