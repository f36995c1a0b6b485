//! Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words:
//! Transformers for Image Recognition at Scale", ICLR 2021), the image stream
//! of COTS.
//!
//! Tensor names follow Hugging Face `ViTModel` (`embeddings.cls_token`,
//! `encoder.layer.N.layernorm_before.weight`, ...). Blocks are pre-LN with an
//! exact (erf) GELU. A learnable mask token replaces the embeddings of masked
//! patches, as in BEiT, for masked vision modeling. Every piece has a
//! backward pass and dropout is driven by an explicit [`SeededRng`].

use candle_core::{DType, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use cots_ops::SeededRng;
use serde::{Deserialize, Serialize};

use crate::bert::{check_heads, dense, linear, Activation, LayerNorm, SelfAttention};
use crate::{Error, Result};

fn default_act() -> Activation {
    Activation::Gelu
}
fn default_eps() -> f64 {
    1e-12
}

/// ViT hyper-parameters, with the field names of Hugging Face `ViTConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
}

impl Config {
    /// 32 px images, 8 px patches (16 patches), 2 layers 64 wide: for tests.
    pub fn tiny() -> Self {
        Self {
            image_size: 32,
            patch_size: 8,
            hidden_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 128,
            ..Self::base()
        }
    }

    /// 64 px images, 8 px patches (64 patches), 4 layers 256 wide: CPU training.
    pub fn small() -> Self {
        Self {
            image_size: 64,
            patch_size: 8,
            hidden_size: 256,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            intermediate_size: 1024,
            ..Self::base()
        }
    }

    /// ViT-B/16 at 224 px (196 patches, 12 layers, 768 wide, 12 heads).
    pub fn base() -> Self {
        Self {
            image_size: 224,
            patch_size: 16,
            num_channels: 3,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-12,
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
        }
    }

    /// Patches per side of the square image.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }

    /// Patches per image (the sequence length without CLS).
    pub fn num_patches(&self) -> usize {
        self.grid_size() * self.grid_size()
    }

    /// Checks the shape constraints the modules rely on.
    pub fn validate(&self) -> Result<()> {
        check_heads(self.hidden_size, self.num_attention_heads)?;
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(Error::Config(format!(
                "vit: image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            )));
        }
        Ok(())
    }
}

/// Cuts images into non-overlapping `patch x patch` squares, flattened
/// channel-major (the layout of a convolution kernel `[D, C, p, p]`).
///
/// # Shapes
/// - `pixels`: `[B, C, H, W]` with `H` and `W` multiples of `patch`;
///   output `[B, (H/p) * (W/p), C * p * p]`, patches in row-major order.
pub(crate) fn patchify(pixels: &Tensor, patch: usize) -> Result<Tensor> {
    let (b, c, hgt, wid) = pixels.dims4()?;
    let (gh, gw) = (hgt / patch, wid / patch);
    Ok(pixels
        .reshape((b, c, gh, patch, gw, patch))?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?
        .reshape((b, gh * gw, c * patch * patch))?)
}

/// Pre-LN block: `x + Attn(LN(x))`, then `x + MLP(LN(x))`.
#[derive(Clone, Debug)]
struct ViTLayer {
    layernorm_before: LayerNorm,
    attention: SelfAttention,
    attention_output: Linear,
    layernorm_after: LayerNorm,
    intermediate: Linear,
    output: Linear,
    act: Activation,
    dropout: f32,
}

impl ViTLayer {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let att = vb.pp("attention");
        Ok(Self {
            layernorm_before: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("layernorm_before"))?,
            attention: SelfAttention::new(
                h,
                cfg.num_attention_heads,
                cfg.attention_probs_dropout_prob,
                att.pp("attention"),
            )?,
            attention_output: linear(h, h, att.pp("output").pp("dense"))?,
            layernorm_after: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("layernorm_after"))?,
            intermediate: linear(h, cfg.intermediate_size, vb.pp("intermediate").pp("dense"))?,
            output: linear(cfg.intermediate_size, h, vb.pp("output").pp("dense"))?,
            act: cfg.hidden_act,
            dropout: cfg.hidden_dropout_prob as f32,
        })
    }

    fn forward(&self, x: &Tensor, rng: Option<&SeededRng>) -> Result<Tensor> {
        let a = self
            .attention
            .forward(&self.layernorm_before.forward(x)?, None, rng)?;
        let a = dense(&self.attention_output, &a)?;
        let x = (cots_ops::dropout(&a, self.dropout, rng)? + x)?;
        let h = dense(&self.intermediate, &self.layernorm_after.forward(&x)?)?;
        let h = self.act.apply(&h)?;
        let h = dense(&self.output, &h)?;
        Ok((cots_ops::dropout(&h, self.dropout, rng)? + x)?)
    }
}

/// The ViT image encoder (no pooler, no classifier).
#[derive(Clone, Debug)]
pub struct VisionTransformer {
    cls_token: Tensor,
    mask_token: Tensor,
    position_embeddings: Tensor,
    patch_weight: Tensor,
    patch_bias: Tensor,
    layers: Vec<ViTLayer>,
    layernorm: LayerNorm,
    cfg: Config,
}

impl VisionTransformer {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let h = cfg.hidden_size;
        let p = cfg.patch_size;
        let normal = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let emb = vb.pp("embeddings");
        let proj = emb.pp("patch_embeddings").pp("projection");
        let enc = vb.pp("encoder").pp("layer");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ViTLayer::new(cfg, enc.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cls_token: emb.get_with_hints((1, 1, h), "cls_token", normal)?,
            // Hugging Face initialises the mask token to zeros.
            mask_token: emb.get_with_hints((1, 1, h), "mask_token", Init::Const(0.0))?,
            position_embeddings: emb.get_with_hints(
                (1, cfg.num_patches() + 1, h),
                "position_embeddings",
                normal,
            )?,
            patch_weight: proj.get_with_hints((h, cfg.num_channels, p, p), "weight", normal)?,
            patch_bias: proj.get_with_hints(h, "bias", Init::Const(0.0))?,
            layers,
            layernorm: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("layernorm"))?,
            cfg: cfg.clone(),
        })
    }

    /// The patch embedding: a convolution whose kernel equals its stride,
    /// computed as one matmul over non-overlapping patches (exactly the
    /// convolution, without im2col's padding logic).
    ///
    /// # Shapes
    /// - `pixels`: `[B, C, H, W]`; output `[B, N, D]`.
    fn embed_patches(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, hgt, wid) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        if c != self.cfg.num_channels || hgt != self.cfg.image_size || wid != self.cfg.image_size {
            return Err(Error::Config(format!(
                "vit expects images of shape [B, {}, {}, {}], got {:?}",
                self.cfg.num_channels,
                self.cfg.image_size,
                self.cfg.image_size,
                pixels.dims()
            )));
        }
        let patches = patchify(pixels, p)?;
        let (_, n, cpp) = patches.dims3()?;
        let d = self.cfg.hidden_size;
        let w = self.patch_weight.reshape((d, cpp))?;
        let x = patches
            .reshape((b * n, cpp))?
            .matmul(&w.t()?)?
            .broadcast_add(&self.patch_bias)?;
        Ok(x.reshape((b, n, d))?)
    }

    /// Encodes images; `rng = Some(..)` means training (dropout active).
    ///
    /// # Shapes
    /// - `pixel_values`: `[B, C, H, W]` float;
    /// - `bool_masked_pos`: `[B, N]` (u8, u32 or float), 1 replaces that
    ///   patch's embedding by the mask token before position embeddings;
    /// - output: `[B, 1 + N, D]` after the final LayerNorm; index 0 is CLS.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        bool_masked_pos: Option<&Tensor>,
        rng: Option<&SeededRng>,
    ) -> Result<Tensor> {
        let mut x = self.embed_patches(pixel_values)?;
        let (b, n, d) = x.dims3()?;
        if let Some(mask) = bool_masked_pos {
            if mask.dims() != [b, n] {
                return Err(Error::Config(format!(
                    "bool_masked_pos must be [{b}, {n}], got {:?}",
                    mask.dims()
                )));
            }
            let m = mask
                .to_dtype(DType::F32)?
                .to_dtype(x.dtype())?
                .unsqueeze(2)?;
            let keep = (1.0 - &m)?;
            x = (x.broadcast_mul(&keep)? + m.broadcast_mul(&self.mask_token)?)?;
        }
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.position_embeddings)?;
        let mut x = cots_ops::dropout(&x, self.cfg.hidden_dropout_prob as f32, rng)?;
        for layer in &self.layers {
            x = layer.forward(&x, rng)?;
        }
        self.layernorm.forward(&x)
    }

    pub fn num_patches(&self) -> usize {
        self.cfg.num_patches()
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
}
