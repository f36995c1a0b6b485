//! EfficientNet-Lite (Tan & Le, "EfficientNet: Rethinking Model Scaling for
//! Convolutional Neural Networks", ICML 2019; the Lite variants of the
//! TensorFlow TPU repository), a frozen ImageNet backbone for the image
//! tower.
//!
//! The Lite variants drop squeeze-and-excitation, use ReLU6 instead of
//! swish and keep the stem (32) and head (1280) widths fixed. Each
//! mobile inverted bottleneck (MBConv) block is: 1x1 expansion conv + BN +
//! ReLU6 (absent when the expand ratio is 1), depthwise k x k conv + BN +
//! ReLU6, 1x1 projection conv + BN (no activation), and a residual when the
//! stride is 1 and the widths agree. Convolutions use TensorFlow "same"
//! padding computed from the actual input size: in total
//! `max((ceil(in/s) - 1) * s + k - in, 0)`, `total / 2` before and the rest
//! after. The PyTorch port (lukemelas-style, `Conv2dStaticSamePadding`)
//! fixes its padding for 224 px; both agree whenever the side is a multiple
//! of 32.
//!
//! Tensor names follow that port (`_conv_stem.weight`, `_bn0.*`,
//! `_blocks.N._expand_conv.weight`, `_blocks.N._bn0.*`,
//! `_blocks.N._depthwise_conv.weight`, `_blocks.N._bn1.*`,
//! `_blocks.N._project_conv.weight`, `_blocks.N._bn2.*`, `_conv_head.weight`,
//! `_bn1.*`, `_fc.*`), so [`load_weights`] of its `.pth` file feeds
//! `VarBuilder::from_tensors` directly.
//!
//! Inference only: BatchNorm uses its running statistics and is folded into
//! the convolution weights at every forward (so weights loaded into a
//! `VarMap` after construction are seen), every weight is detached, and no
//! op records a backward pass. On the CPU in f32 the 1x1 convolutions run as
//! one matrix product over all pixels (channels-last), the depthwise
//! convolution is a hand-written loop over channels (SIMD through `pulp`,
//! threads through `rayon`) with the bias and ReLU6 fused; other devices and
//! dtypes take candle's generic grouped `conv2d` (correct, slow).

use std::collections::HashMap;
use std::path::Path;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Storage, Tensor, D};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One stage of MBConv blocks (a line of the TF block strings, e.g.
/// `r2_k3_s22_e6_i16_o24`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    pub repeats: usize,
    pub kernel: usize,
    /// Stride of the stage's first block; the others use 1.
    pub stride: usize,
    pub expand_ratio: usize,
    pub input_filters: usize,
    pub output_filters: usize,
}

/// EfficientNet-Lite hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub stem_channels: usize,
    pub stages: Vec<Stage>,
    pub head_channels: usize,
    pub batch_norm_eps: f64,
    /// Width of the ImageNet classifier `_fc`; `None` builds no classifier.
    #[serde(default)]
    pub num_classes: Option<usize>,
}

impl Config {
    /// EfficientNet-Lite0 without its classifier: 16 MBConv blocks,
    /// 1280 features, 3.4 M parameters.
    pub fn lite0() -> Self {
        let s = |repeats, kernel, stride, expand_ratio, input_filters, output_filters| Stage {
            repeats,
            kernel,
            stride,
            expand_ratio,
            input_filters,
            output_filters,
        };
        Self {
            stem_channels: 32,
            stages: vec![
                s(1, 3, 1, 1, 32, 16),
                s(2, 3, 2, 6, 16, 24),
                s(2, 5, 2, 6, 24, 40),
                s(3, 3, 2, 6, 40, 80),
                s(3, 5, 1, 6, 80, 112),
                s(4, 5, 2, 6, 112, 192),
                s(1, 3, 1, 6, 192, 320),
            ],
            head_channels: 1280,
            batch_norm_eps: 1e-3,
            num_classes: None,
        }
    }

    /// [`Config::lite0`] with the 1000-class ImageNet classifier.
    pub fn lite0_imagenet() -> Self {
        Self {
            num_classes: Some(1000),
            ..Self::lite0()
        }
    }

    /// Width of the pooled features.
    pub fn out_dim(&self) -> usize {
        self.head_channels
    }

    /// Checks the constraints the modules rely on.
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(Error::Config(format!("efficientnet: {m}")));
        if self.stages.is_empty() {
            return err("no stages".into());
        }
        let mut width = self.stem_channels;
        for (i, s) in self.stages.iter().enumerate() {
            if s.repeats == 0 || s.expand_ratio == 0 || s.output_filters == 0 {
                return err(format!("stage {i}: zero repeats, expand ratio or width"));
            }
            if s.kernel.is_multiple_of(2) || !(s.stride == 1 || s.stride == 2) {
                return err(format!(
                    "stage {i}: kernel {} must be odd and stride {} 1 or 2",
                    s.kernel, s.stride
                ));
            }
            // The Lite stem is fixed at 32 and feeds the first stage whatever
            // its nominal input width; later stages must chain.
            if i > 0 && s.input_filters != width {
                return err(format!(
                    "stage {i} takes {} channels, the previous stage gives {width}",
                    s.input_filters
                ));
            }
            width = s.output_filters;
        }
        if self.num_classes == Some(0) {
            return err("num_classes is 0".into());
        }
        Ok(())
    }
}

/// Reads EfficientNet weights for `VarBuilder::from_tensors` or
/// [`crate::weights::load_tensors`]: a PyTorch `.pth` checkpoint (legacy or
/// zip format), or a `.safetensors` file with the same names. BatchNorm's
/// `num_batches_tracked` counters (training bookkeeping, not weights) are
/// left out.
pub fn load_weights(path: &Path) -> Result<HashMap<String, Tensor>> {
    let tensors: Vec<(String, Tensor)> =
        if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
            crate::weights::read_safetensors(path)?
                .into_iter()
                .collect()
        } else {
            crate::torch_file::read_pth(path)?
        };
    Ok(tensors
        .into_iter()
        .filter(|(name, _)| !name.ends_with("num_batches_tracked"))
        .collect())
}

/// "Same" padding of one side: `(before, after, output size)`.
fn same_pad(size: usize, kernel: usize, stride: usize) -> (usize, usize, usize) {
    let out = size.div_ceil(stride);
    let total = ((out.max(1) - 1) * stride + kernel).saturating_sub(size);
    (total / 2, total - total / 2, out)
}

/// True when the hand-written CPU kernels apply.
fn fast_path(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// BatchNorm in eval mode, kept as its four tensors and folded on use.
#[derive(Clone, Debug)]
struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: f64,
}

impl BatchNorm {
    fn new(channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            running_mean: vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?,
            running_var: vb.get_with_hints(channels, "running_var", Init::Const(1.0))?,
            eps,
        })
    }

    /// Folds the normalisation into the preceding bias-free convolution:
    /// `(w * s, beta - mean * s)` with `s = gamma / sqrt(var + eps)`, both
    /// detached. `weight` has the output channels first.
    fn fold(&self, weight: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = (self.weight.detach() / (self.running_var.detach() + self.eps)?.sqrt()?)?;
        let bias = (self.bias.detach() - (self.running_mean.detach() * &s)?)?;
        let mut shape = vec![1; weight.rank()];
        shape[0] = s.elem_count();
        let w = weight.detach().broadcast_mul(&s.reshape(shape)?)?;
        Ok((w, bias))
    }
}

/// A bias-free convolution followed by BatchNorm.
#[derive(Clone, Debug)]
struct ConvBn {
    weight: Tensor,
    bn: BatchNorm,
}

impl ConvBn {
    fn new(
        (c_out, c_in_per_group, k): (usize, usize, usize),
        eps: f64,
        conv: VarBuilder,
        bn: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            weight: conv.get_with_hints(
                (c_out, c_in_per_group, k, k),
                "weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )?,
            bn: BatchNorm::new(c_out, eps, bn)?,
        })
    }

    /// 1x1 convolution + BN (+ ReLU6) (+ residual) on channels-last `x`.
    ///
    /// # Shapes
    /// - `x`: `[B, H, W, C_in]`, `residual`: `[B, H, W, C_out]`; output
    ///   `[B, H, W, C_out]`.
    fn pointwise(&self, x: &Tensor, relu6: bool, residual: Option<&Tensor>) -> Result<Tensor> {
        let (b, h, w, c_in) = x.dims4()?;
        let (wt, bias) = self.bn.fold(&self.weight)?;
        let c_out = wt.dim(0)?;
        // [C_out, C_in, 1, 1] -> [C_in, C_out], a transposed view gemm reads as is.
        let wt = wt.reshape((c_out, c_in))?.t()?;
        let y = x.reshape((b * h * w, c_in))?.matmul(&wt)?;
        let y = bias_act(y, &bias, relu6, residual)?;
        Ok(y.reshape((b, h, w, c_out))?)
    }

    /// Depthwise k x k convolution with "same" padding + BN + ReLU6.
    ///
    /// # Shapes
    /// - `x`: `[B, H, W, C]`; output `[B, ceil(H/s), ceil(W/s), C]`.
    fn depthwise(&self, x: &Tensor, stride: usize) -> Result<Tensor> {
        let (wt, bias) = self.bn.fold(&self.weight)?;
        let (c, _, k, _) = wt.dims4()?;
        if fast_path(x) {
            let wt = wt.reshape((c, k * k))?.t()?.contiguous()?;
            depthwise_conv2d(x, &wt, &bias, stride, true)
        } else {
            depthwise_reference(x, &wt, &bias, stride, true)
        }
    }

    /// The stem: a k x k stride-2 convolution from NCHW pixels to
    /// channels-last features, + BN + ReLU6.
    ///
    /// # Shapes
    /// - `x`: `[B, C_in, H, W]`; output `[B, ceil(H/2), ceil(W/2), C_out]`.
    fn stem(&self, x: &Tensor) -> Result<Tensor> {
        let (wt, bias) = self.bn.fold(&self.weight)?;
        let k = wt.dim(3)?;
        let (_, _, h, w) = x.dims4()?;
        let (top, bottom, _) = same_pad(h, k, 2);
        let (left, right, _) = same_pad(w, k, 2);
        let x = x
            .pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, left, right)?;
        let y = x
            .conv2d(&wt, 0, 2, 1, 1)?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        bias_act(y, &bias, true, None)
    }
}

/// Mobile inverted bottleneck block without squeeze-excite.
#[derive(Clone, Debug)]
struct MBConv {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    stride: usize,
    residual: bool,
}

impl MBConv {
    fn new(
        (c_in, c_out, kernel, stride, expand_ratio): (usize, usize, usize, usize, usize),
        eps: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mid = c_in * expand_ratio;
        let expand = if expand_ratio != 1 {
            Some(ConvBn::new(
                (mid, c_in, 1),
                eps,
                vb.pp("_expand_conv"),
                vb.pp("_bn0"),
            )?)
        } else {
            None
        };
        Ok(Self {
            expand,
            depthwise: ConvBn::new(
                (mid, 1, kernel),
                eps,
                vb.pp("_depthwise_conv"),
                vb.pp("_bn1"),
            )?,
            project: ConvBn::new((c_out, mid, 1), eps, vb.pp("_project_conv"), vb.pp("_bn2"))?,
            stride,
            residual: stride == 1 && c_in == c_out,
        })
    }

    /// # Shapes
    /// - `x`: `[B, H, W, C_in]`; output `[B, ceil(H/s), ceil(W/s), C_out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match &self.expand {
            Some(e) => e.pointwise(x, true, None)?,
            None => x.clone(),
        };
        let h = self.depthwise.depthwise(&h, self.stride)?;
        self.project
            .pointwise(&h, false, self.residual.then_some(x))
    }
}

/// The EfficientNet-Lite backbone (stem, MBConv blocks, head conv), with an
/// optional ImageNet classifier.
#[derive(Clone, Debug)]
pub struct EfficientNetLite {
    stem: ConvBn,
    blocks: Vec<MBConv>,
    head: ConvBn,
    fc: Option<(Tensor, Tensor)>,
    cfg: Config,
}

impl EfficientNetLite {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let eps = cfg.batch_norm_eps;
        let stem = ConvBn::new(
            (cfg.stem_channels, 3, 3),
            eps,
            vb.pp("_conv_stem"),
            vb.pp("_bn0"),
        )?;
        let mut blocks = Vec::new();
        let mut width = cfg.stem_channels;
        for s in &cfg.stages {
            for r in 0..s.repeats {
                let stride = if r == 0 { s.stride } else { 1 };
                let vb_b = vb.pp(format!("_blocks.{}", blocks.len()));
                blocks.push(MBConv::new(
                    (width, s.output_filters, s.kernel, stride, s.expand_ratio),
                    eps,
                    vb_b,
                )?);
                width = s.output_filters;
            }
        }
        let head = ConvBn::new(
            (cfg.head_channels, width, 1),
            eps,
            vb.pp("_conv_head"),
            vb.pp("_bn1"),
        )?;
        let fc = match cfg.num_classes {
            Some(n) => {
                let f = vb.pp("_fc");
                let w = f.get_with_hints(
                    (n, cfg.head_channels),
                    "weight",
                    candle_nn::init::DEFAULT_KAIMING_NORMAL,
                )?;
                Some((w, f.get_with_hints(n, "bias", Init::Const(0.0))?))
            }
            None => None,
        };
        Ok(Self {
            stem,
            blocks,
            head,
            fc,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Channels-last feature map after the head conv + BN + ReLU6.
    fn features_nhwc(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        if c != 3 || h == 0 || w == 0 {
            return Err(Error::Config(format!(
                "efficientnet: expected [B, 3, H, W] pixels, got {:?}",
                x.dims()
            )));
        }
        let mut h = self.stem.stem(x)?;
        for b in &self.blocks {
            h = b.forward(&h)?;
        }
        self.head.pointwise(&h, true, None)
    }

    /// The feature map before pooling. Inference only (no gradients).
    ///
    /// # Shapes
    /// - `x`: `[B, 3, H, W]`, pixels scaled as `(x - 0.5) / 0.5`; output
    ///   `[B, 1280, ceil(H/32), ceil(W/32)]` (contiguous).
    pub fn forward_map(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.features_nhwc(x)?.permute((0, 3, 1, 2))?.contiguous()?)
    }

    /// Globally average-pooled features. Inference only (no gradients).
    ///
    /// # Shapes
    /// - `x`: `[B, 3, H, W]`, pixels scaled as `(x - 0.5) / 0.5`; output
    ///   `[B, 1280]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let f = self.features_nhwc(x)?;
        let (b, h, w, c) = f.dims4()?;
        Ok(f.reshape((b, h * w, c))?.mean(1)?)
    }

    /// ImageNet logits of pooled features (no dropout: inference).
    ///
    /// # Shapes
    /// - `pooled`: `[B, 1280]` from [`forward`](Self::forward); output
    ///   `[B, num_classes]`.
    ///
    /// Errors with [`Error::Config`] when the model has no classifier.
    pub fn logits(&self, pooled: &Tensor) -> Result<Tensor> {
        let Some((w, b)) = &self.fc else {
            return Err(Error::Config(
                "efficientnet: built without a classifier (num_classes is None)".into(),
            ));
        };
        Ok(pooled
            .matmul(&w.detach().t()?)?
            .broadcast_add(&b.detach())?)
    }
}

/// Adds a per-channel bias, then ReLU6 if asked, then `residual`, in place
/// on the CPU (`y` must be a fresh tensor nobody else holds).
///
/// # Shapes
/// - `y`: `[..., C]` contiguous, `bias`: `[C]`, `residual`: like `y`.
fn bias_act(y: Tensor, bias: &Tensor, relu6: bool, residual: Option<&Tensor>) -> Result<Tensor> {
    if !fast_path(&y) || !y.is_contiguous() {
        let mut y = y.broadcast_add(bias)?;
        if relu6 {
            y = y.clamp(0f32, 6f32)?;
        }
        if let Some(r) = residual {
            y = (y + r)?;
        }
        return Ok(y);
    }
    let bias = bias.to_dtype(DType::F32)?.contiguous()?;
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    {
        let (b_store, b_layout) = bias.storage_and_layout();
        let bias_s = cpu_slice(&b_store, b_layout)?;
        let r_guard = residual.as_ref().map(|r| r.storage_and_layout());
        let res_s = match &r_guard {
            Some((s, l)) => Some(cpu_slice(s, l)?),
            None => None,
        };
        y.inplace_op1(&BiasAct {
            bias: bias_s,
            residual: res_s,
            relu6,
        })?;
    }
    Ok(y)
}

fn cpu_slice<'a>(s: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    let (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) = (s, l.contiguous_offsets()) else {
        return Err(candle_core::Error::Msg(
            "efficientnet: expected a contiguous f32 CPU tensor".into(),
        )
        .into());
    };
    Ok(&v[start..end])
}

struct BiasAct<'a> {
    bias: &'a [f32],
    residual: Option<&'a [f32]>,
    relu6: bool,
}

impl candle_core::InplaceOp1 for BiasAct<'_> {
    fn name(&self) -> &'static str {
        "efficientnet-bias-act"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(v) = storage else {
            candle_core::bail!("bias-act: expected f32 storage, got {:?}", storage.dtype())
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("bias-act: expected a contiguous tensor")
        };
        let y = &mut v[start..end];
        let c = self.bias.len();
        if c == 0 || y.len() % c != 0 || self.residual.is_some_and(|r| r.len() != y.len()) {
            candle_core::bail!("bias-act: {} values do not match {c} channels", y.len())
        }
        // About 64 KiB per task.
        let rows = (16_384 / c).max(1);
        y.par_chunks_mut(rows * c)
            .enumerate()
            .for_each(|(i, chunk)| {
                let res = self
                    .residual
                    .map(|r| &r[i * rows * c..i * rows * c + chunk.len()]);
                pulp::Arch::new().dispatch(BiasActRows {
                    y: chunk,
                    bias: self.bias,
                    residual: res,
                    relu6: self.relu6,
                });
            });
        Ok(())
    }
}

struct BiasActRows<'a> {
    y: &'a mut [f32],
    bias: &'a [f32],
    residual: Option<&'a [f32]>,
    relu6: bool,
}

impl pulp::WithSimd for BiasActRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let c = self.bias.len();
        for (r, row) in self.y.chunks_exact_mut(c).enumerate() {
            for (v, &b) in row.iter_mut().zip(self.bias) {
                *v += b;
            }
            if self.relu6 {
                for v in row.iter_mut() {
                    *v = v.clamp(0.0, 6.0);
                }
            }
            if let Some(res) = self.residual {
                for (v, &x) in row.iter_mut().zip(&res[r * c..(r + 1) * c]) {
                    *v += x;
                }
            }
        }
    }
}

/// Depthwise convolution with TensorFlow "same" padding, a per-channel bias
/// and an optional ReLU6, on channels-last f32 CPU tensors.
///
/// # Shapes
/// - `x`: `[B, H, W, C]`, `weight`: `[k * k, C]` (row-major taps, i.e. the
///   `[C, 1, k, k]` kernel transposed), `bias`: `[C]`; output
///   `[B, ceil(H/stride), ceil(W/stride), C]`.
///
/// Other devices or dtypes are an error (the model falls back to candle's
/// grouped `conv2d` for those).
pub fn depthwise_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    relu6: bool,
) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let (kk, wc) = weight.dims2()?;
    let k = (kk as f64).sqrt().round() as usize;
    if k * k != kk || wc != c || bias.dims1()? != c || k.is_multiple_of(2) || stride == 0 {
        return Err(Error::Config(format!(
            "depthwise_conv2d: x {:?}, weight {:?}, bias {:?}, stride {stride} do not fit \
             (weight must be [k * k, C] with k odd)",
            x.dims(),
            weight.dims(),
            bias.dims()
        )));
    }
    if !fast_path(x) {
        return Err(Error::Config(format!(
            "depthwise_conv2d: runs on f32 CPU tensors, got {:?} on {:?}",
            x.dtype(),
            x.device()
        )));
    }
    let (top, _, ho) = same_pad(h, k, stride);
    let (left, _, wo) = same_pad(w, k, stride);
    let x = x.contiguous()?;
    let weight = weight.to_dtype(DType::F32)?.contiguous()?;
    let bias = bias.to_dtype(DType::F32)?.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = weight.storage_and_layout();
    let (bs, bl) = bias.storage_and_layout();
    let geom = DwGeom {
        h,
        w,
        c,
        k,
        stride,
        top,
        left,
        wo,
        relu6,
    };
    let (xv, wv, bv) = (
        cpu_slice(&xs, xl)?,
        cpu_slice(&ws, wl)?,
        cpu_slice(&bs, bl)?,
    );
    let mut out = vec![0f32; b * ho * wo * c];
    if !out.is_empty() {
        out.par_chunks_mut(wo * c).enumerate().for_each(|(row, o)| {
            let (bi, oy) = (row / ho, row % ho);
            pulp::Arch::new().dispatch(DwRow {
                g: &geom,
                x: &xv[bi * h * w * c..(bi + 1) * h * w * c],
                weight: wv,
                bias: bv,
                oy,
                out: o,
            });
        });
    }
    Ok(Tensor::from_vec(out, (b, ho, wo, c), x.device())?)
}

struct DwGeom {
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    stride: usize,
    top: usize,
    left: usize,
    wo: usize,
    relu6: bool,
}

/// One output row of the depthwise convolution (all columns, all channels).
struct DwRow<'a> {
    g: &'a DwGeom,
    /// One image, `[H, W, C]`.
    x: &'a [f32],
    weight: &'a [f32],
    bias: &'a [f32],
    oy: usize,
    out: &'a mut [f32],
}

impl pulp::WithSimd for DwRow<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let g = self.g;
        let c = g.c;
        // Input rows and columns are `o * stride + tap - pad`; taps that land
        // in the padding are skipped.
        let iy0 = (self.oy * g.stride) as isize - g.top as isize;
        for ox in 0..g.wo {
            let acc = &mut self.out[ox * c..(ox + 1) * c];
            acc.copy_from_slice(self.bias);
            let ix0 = (ox * g.stride) as isize - g.left as isize;
            for ky in 0..g.k {
                let iy = iy0 + ky as isize;
                if iy < 0 || iy >= g.h as isize {
                    continue;
                }
                for kx in 0..g.k {
                    let ix = ix0 + kx as isize;
                    if ix < 0 || ix >= g.w as isize {
                        continue;
                    }
                    let at = (iy as usize * g.w + ix as usize) * c;
                    let inp = &self.x[at..at + c];
                    let wk = &self.weight[(ky * g.k + kx) * c..(ky * g.k + kx + 1) * c];
                    for ((a, &v), &wt) in acc.iter_mut().zip(inp).zip(wk) {
                        *a += v * wt;
                    }
                }
            }
            if g.relu6 {
                for a in acc.iter_mut() {
                    *a = a.clamp(0.0, 6.0);
                }
            }
        }
    }
}

/// The depthwise convolution through candle's grouped `conv2d`: any device
/// and dtype, slow (candle loops over the groups).
///
/// # Shapes
/// - `x`: `[B, H, W, C]`, `weight`: `[C, 1, k, k]`, `bias`: `[C]`; output
///   `[B, ceil(H/stride), ceil(W/stride), C]`.
pub fn depthwise_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    relu6: bool,
) -> Result<Tensor> {
    let (_, h, w, c) = x.dims4()?;
    let k = weight.dim(D::Minus1)?;
    let (top, bottom, _) = same_pad(h, k, stride);
    let (left, right, _) = same_pad(w, k, stride);
    let y = x
        .permute((0, 3, 1, 2))?
        .pad_with_zeros(2, top, bottom)?
        .pad_with_zeros(3, left, right)?
        .contiguous()?
        .conv2d(weight, 0, stride, 1, c)?
        .broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
    let y = if relu6 { y.clamp(0f32, 6f32)? } else { y };
    Ok(y.permute((0, 2, 3, 1))?.contiguous()?)
}
