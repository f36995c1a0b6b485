//! Discrete visual tokenizer for masked vision modeling (the dVAE of DALL-E /
//! BEiT, here a VQ-VAE: van den Oord et al., "Neural Discrete Representation
//! Learning", NeurIPS 2017).
//!
//! The encoder downsamples by the ViT patch size with `log2(patch)` stride-2
//! convolutions, so the code grid equals the ViT patch grid and each patch
//! gets one visual token. Each grid cell is replaced by its nearest codebook
//! entry; the decoder (nearest upsampling + 3x3 convolutions) maps codes back
//! to pixels. Gradients cross the non-differentiable lookup with the
//! straight-through estimator.
//!
//! Lookup uses L2-normalised encoder outputs and codebook entries (cosine
//! similarity, as in ViT-VQGAN): with unnormalised vectors a few entries
//! near the data win every lookup at initialisation and the rest of the
//! codebook never trains.
//!
//! Loss: `recon + codebook + commitment * commit`, where
//! `recon = mean (x - x_hat)^2`, `codebook = mean (sg(z_e) - z_q)^2` and
//! `commit = mean (z_e - sg(z_q))^2`.
//!
//! Codebook collapse (a handful of entries win every lookup, so masked vision
//! modeling predicts near-constant targets) is fought by the training-only
//! options of [`VqTraining`], applied by [`CodebookTrainer`] around each
//! optimizer step: k-means initialisation of the codebook from the encoder
//! outputs of the first batch (Jukebox; VQGAN follow-ups), dead-code restarts
//! to encoder outputs of the current batch, and EMA codebook updates (the
//! VQ-VAE paper's appendix, VQ-VAE-2) instead of the codebook loss. Low
//! dimensional codes (ViT-VQGAN's factorized codes) are [`Config::code_dim`]:
//! `to_code` projects the encoder output down, the lookup is on the unit
//! sphere there, and `from_code` projects back up.
//!
//! In COTS training the dVAE is frozen: the trainer calls [`Dvae::codes`] on
//! the clean image and keeps the dVAE's variables out of the optimizer.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Shape of the tokenizer; presets match the ViT presets' image and patch sizes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub image_size: usize,
    /// Must be a power of two and equal the ViT patch size.
    pub patch_size: usize,
    pub channels: usize,
    /// Width of the convolution stacks.
    pub hidden: usize,
    /// Width of a code vector.
    pub code_dim: usize,
    /// Number of visual tokens.
    pub codebook_size: usize,
    /// Weight of the commitment term (beta in the VQ-VAE paper).
    pub commitment: f64,
    /// How the codebook is trained and kept alive. Training-only: a saved
    /// tokenizer encodes the same whatever this says, so a `dvae.json`
    /// written before the field existed loads with the new defaults
    /// ([`VqTraining::default`]) and gives the same codes as before.
    #[serde(default)]
    pub vq: VqTraining,
}

/// How the codebook is updated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CodebookUpdate {
    /// The optimizer moves the codebook along the gradient of the codebook
    /// loss (the VQ-VAE paper's main text).
    Loss,
    /// Each entry is the exponential moving average of the encoder outputs
    /// assigned to it (VQ-VAE appendix, VQ-VAE-2): `N_k <- decay N_k + (1 -
    /// decay) n_k`, `m_k <- decay m_k + (1 - decay) sum z`, `e_k = m_k / N_k`
    /// with Laplace-smoothed counts. The codebook leaves the optimizer and the
    /// codebook loss moves nothing.
    Ema {
        /// In `(0, 1)`; 0.99 in VQ-VAE-2.
        decay: f64,
    },
}

/// Training-only remedies for codebook collapse, applied by [`CodebookTrainer`].
///
/// The defaults are the combination measured in docs/results.md ("Visual
/// tokenizer"); [`VqTraining::none`] is the plain VQ-VAE that collapsed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VqTraining {
    /// Lloyd iterations of k-means (k-means++ seeding) on the encoder outputs
    /// of the first batch, whose centroids replace the random codebook before
    /// the first step; 0 keeps the random initialisation. Default 10.
    pub kmeans_iters: usize,
    /// A code that no row of `restart_after` consecutive batches chose is
    /// reset to a random encoder output of the current batch; 0 never resets.
    /// Default 10.
    pub restart_after: usize,
    /// Default: [`CodebookUpdate::Loss`].
    pub update: CodebookUpdate,
}

impl Default for VqTraining {
    fn default() -> Self {
        Self {
            kmeans_iters: 10,
            restart_after: 10,
            update: CodebookUpdate::Loss,
        }
    }
}

impl VqTraining {
    /// The plain VQ-VAE: random codebook, no restarts, codebook loss.
    pub fn none() -> Self {
        Self {
            kmeans_iters: 0,
            restart_after: 0,
            update: CodebookUpdate::Loss,
        }
    }

    fn validate(&self) -> Result<()> {
        if let CodebookUpdate::Ema { decay } = self.update {
            if !(decay > 0.0 && decay < 1.0) {
                return Err(Error::Config(format!(
                    "dvae vq.update.decay must be in (0, 1), got {decay}"
                )));
            }
        }
        Ok(())
    }
}

impl Config {
    /// 32 px images, 8 px patches (4 x 4 grid), 256 tokens.
    pub fn tiny() -> Self {
        Self {
            image_size: 32,
            patch_size: 8,
            channels: 3,
            hidden: 32,
            code_dim: 32,
            codebook_size: 256,
            commitment: 0.25,
            vq: VqTraining::default(),
        }
    }

    /// 64 px images, 8 px patches (8 x 8 grid), 512 tokens.
    pub fn small() -> Self {
        Self {
            image_size: 64,
            hidden: 64,
            code_dim: 64,
            codebook_size: 512,
            ..Self::tiny()
        }
    }

    /// 224 px images, 16 px patches (14 x 14 grid), 1024 tokens.
    pub fn base() -> Self {
        Self {
            image_size: 224,
            patch_size: 16,
            hidden: 128,
            code_dim: 128,
            codebook_size: 1024,
            ..Self::tiny()
        }
    }

    /// Side of the code grid (= the ViT patch grid).
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }

    /// Number of codes per image `N`.
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }

    pub fn validate(&self) -> Result<()> {
        self.vq.validate()?;
        let p = self.patch_size;
        if p < 2 || !p.is_power_of_two() {
            return Err(Error::Config(format!(
                "dvae patch_size must be a power of two >= 2, got {p}"
            )));
        }
        if self.image_size == 0 || !self.image_size.is_multiple_of(p) {
            return Err(Error::Config(format!(
                "dvae image_size {} must be a positive multiple of patch_size {p}",
                self.image_size
            )));
        }
        if self.channels == 0 || self.hidden == 0 || self.code_dim == 0 || self.codebook_size < 2 {
            return Err(Error::Config(format!(
                "dvae channels, hidden and code_dim must be positive and codebook_size >= 2, got {self:?}"
            )));
        }
        Ok(())
    }
}

/// Losses and codebook statistics of one batch.
#[derive(Clone, Debug)]
pub struct DvaeLoss {
    /// Scalar: `recon + codebook + commitment * commit`.
    pub total: Tensor,
    /// Scalar: mean squared reconstruction error.
    pub recon: Tensor,
    /// Scalar: moves codebook entries toward the encoder outputs.
    pub codebook: Tensor,
    /// Scalar: keeps the encoder outputs near their codes.
    pub commit: Tensor,
    /// `exp(entropy)` of the batch's code histogram (1 = collapse).
    pub perplexity: f32,
    /// Fraction of codebook entries used in the batch.
    pub usage: f32,
    /// `[B * N, code_dim]`, detached: the normalised encoder outputs that
    /// [`CodebookTrainer::after_step`] averages into the codebook and restarts
    /// dead codes from.
    pub latents: Tensor,
    /// The code chosen for each row of `latents`.
    pub assignments: Vec<u32>,
}

/// The VQ-VAE visual tokenizer.
#[derive(Clone, Debug)]
pub struct Dvae {
    cfg: Config,
    down: Vec<Conv2d>,
    to_code: Conv2d,
    codebook: Tensor,
    from_code: Conv2d,
    up: Vec<Conv2d>,
    to_pixels: Conv2d,
}

fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

impl Dvae {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let stages = cfg.patch_size.trailing_zeros() as usize;
        let down_cfg = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let same = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let enc = vb.pp("encoder");
        let mut down = Vec::with_capacity(stages);
        for i in 0..stages {
            let cin = if i == 0 { cfg.channels } else { cfg.hidden };
            down.push(candle_nn::conv2d(
                cin,
                cfg.hidden,
                4,
                down_cfg,
                enc.pp(format!("down{i}")),
            )?);
        }
        let to_code = candle_nn::conv2d(
            cfg.hidden,
            cfg.code_dim,
            1,
            Default::default(),
            enc.pp("to_code"),
        )?;
        let codebook = vb.pp("codebook").get_with_hints(
            (cfg.codebook_size, cfg.code_dim),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        let dec = vb.pp("decoder");
        let from_code = candle_nn::conv2d(
            cfg.code_dim,
            cfg.hidden,
            1,
            Default::default(),
            dec.pp("from_code"),
        )?;
        let mut up = Vec::with_capacity(stages);
        for i in 0..stages {
            up.push(candle_nn::conv2d(
                cfg.hidden,
                cfg.hidden,
                3,
                same,
                dec.pp(format!("up{i}")),
            )?);
        }
        let to_pixels = candle_nn::conv2d(cfg.hidden, cfg.channels, 3, same, dec.pp("to_pixels"))?;
        Ok(Self {
            cfg: cfg.clone(),
            down,
            to_code,
            codebook,
            from_code,
            up,
            to_pixels,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn check_pixels(&self, pixels: &Tensor) -> Result<usize> {
        let (b, c, h, w) = pixels.dims4()?;
        let s = self.cfg.image_size;
        if c != self.cfg.channels || h != s || w != s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: "dvae pixels".into(),
                expected: (b, self.cfg.channels, s, s).into(),
                got: pixels.shape().clone(),
            }
            .into());
        }
        Ok(b)
    }

    /// Normalised encoder outputs, one row per grid cell in row-major order.
    ///
    /// # Shapes
    /// - `pixels`: `[B, C, S, S]`; returns `[B * N, code_dim]`.
    fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut x = pixels.clone();
        for conv in &self.down {
            x = conv.forward(&x)?.relu()?;
        }
        let z = self.to_code.forward(&x)?; // [B, D, g, g]
        let (b, d, g, _) = z.dims4()?;
        l2_normalize(&z.permute((0, 2, 3, 1))?.reshape((b * g * g, d))?)
    }

    /// Normalised encoder outputs (the vectors the codebook lookup compares),
    /// detached, one row per patch in the ViT patch order.
    ///
    /// # Shapes
    /// - `pixels`: `[B, C, S, S]`; returns `[B * N, code_dim]`.
    pub fn latents(&self, pixels: &Tensor) -> Result<Tensor> {
        self.check_pixels(pixels)?;
        Ok(self.encode(&pixels.detach())?.detach())
    }

    /// The raw (unnormalised) codebook.
    ///
    /// # Shapes
    /// Returns `[codebook_size, code_dim]`.
    pub fn codebook(&self) -> &Tensor {
        &self.codebook
    }

    /// Overwrites the codebook in place (k-means initialisation, restarts,
    /// EMA updates). Only a codebook built over a `VarMap` can be written.
    ///
    /// # Shapes
    /// - `values`: `[codebook_size, code_dim]`.
    pub fn set_codebook(&self, values: &Tensor) -> Result<()> {
        if !self.codebook.is_variable() {
            return Err(Error::VarMismatch {
                name: "codebook.weight".into(),
                message: "the codebook is not a variable (loaded frozen) and cannot be updated"
                    .into(),
            });
        }
        let values = values
            .to_dtype(self.codebook.dtype())?
            .to_device(self.codebook.device())?
            .contiguous()?;
        candle_core::Var::from_tensor(&self.codebook)?.set(&values)?;
        Ok(())
    }

    /// Index of the nearest (cosine) codebook entry of each row.
    fn nearest(&self, z: &Tensor, codebook: &Tensor) -> Result<Tensor> {
        Ok(z.matmul(&codebook.t()?)?.argmax(D::Minus1)?)
    }

    /// Visual token of every patch, row-major over the grid (the ViT patch order).
    ///
    /// # Shapes
    /// - `pixels`: `[B, C, S, S]`; returns `[B, N]` u32 in `[0, codebook_size)`.
    pub fn codes(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = self.check_pixels(pixels)?;
        let pixels = pixels.detach();
        let z = self.encode(&pixels)?;
        let cb = l2_normalize(&self.codebook.detach())?;
        Ok(self
            .nearest(&z, &cb)?
            .to_dtype(DType::U32)?
            .reshape((b, self.cfg.num_patches()))?)
    }

    /// Reconstruction from codes.
    ///
    /// # Shapes
    /// - `codes`: `[B, N]` u32; returns `[B, C, S, S]`.
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        let b = codes.dim(0)?;
        let cb = l2_normalize(&self.codebook)?;
        let z = cb.index_select(&codes.flatten_all()?, 0)?;
        self.decode_rows(&z, b)
    }

    /// # Shapes
    /// - `z`: `[B * N, code_dim]`; returns `[B, C, S, S]`.
    fn decode_rows(&self, z: &Tensor, b: usize) -> Result<Tensor> {
        let g = self.cfg.grid();
        let mut x = z
            .reshape((b, g, g, self.cfg.code_dim))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        x = self.from_code.forward(&x)?.relu()?;
        for conv in &self.up {
            let (_, _, h, w) = x.dims4()?;
            x = conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?.relu()?;
        }
        Ok(self.to_pixels.forward(&x)?)
    }

    /// Training losses of the tokenizer on a batch.
    ///
    /// # Shapes
    /// - `pixels`: `[B, C, S, S]`; every loss is a scalar.
    pub fn forward_loss(&self, pixels: &Tensor) -> Result<DvaeLoss> {
        let b = self.check_pixels(pixels)?;
        let z_e = self.encode(pixels)?;
        let cb = l2_normalize(&self.codebook)?;
        let idx = self.nearest(&z_e.detach(), &cb.detach())?;
        let z_q = cb.index_select(&idx, 0)?;
        let codebook = (z_e.detach() - &z_q)?.sqr()?.mean_all()?;
        let commit = (&z_e - z_q.detach())?.sqr()?.mean_all()?;
        // Straight-through: the forward value is z_q, the gradient reaches z_e.
        let z_st = (&z_e + (&z_q - &z_e)?.detach())?;
        let recon = (self.decode_rows(&z_st, b)? - pixels)?.sqr()?.mean_all()?;
        let total = ((&recon + &codebook)? + (&commit * self.cfg.commitment)?)?;
        let assignments = idx.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let (perplexity, usage) = self.code_stats(&assignments);
        Ok(DvaeLoss {
            total,
            recon,
            codebook,
            commit,
            perplexity,
            usage,
            latents: z_e.detach(),
            assignments,
        })
    }

    fn code_stats(&self, codes: &[u32]) -> (f32, f32) {
        let mut counts = vec![0usize; self.cfg.codebook_size];
        for &c in codes {
            if let Some(n) = counts.get_mut(c as usize) {
                *n += 1;
            }
        }
        let total = codes.len().max(1) as f64;
        let entropy: f64 = counts
            .iter()
            .filter(|&&n| n > 0)
            .map(|&n| {
                let p = n as f64 / total;
                -p * p.ln()
            })
            .sum();
        let used = counts.iter().filter(|&&n| n > 0).count();
        (
            entropy.exp() as f32,
            used as f32 / self.cfg.codebook_size as f32,
        )
    }
}

/// k-means++ seeding (Arthur & Vassilvitskii, 2007): the first centre is a
/// random row, each next one a row drawn with probability proportional to
/// its squared distance to the nearest centre so far. When every row
/// coincides with a centre (fewer distinct rows than `k`), the rest are
/// uniform draws.
///
/// # Shapes
/// - `rows`: `n * d` row-major, `n >= 1`; returns `k * d` row-major.
fn kmeans_plus_plus(rows: &[f32], d: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n = rows.len() / d;
    let row = |i: usize| &rows[i * d..(i + 1) * d];
    let dist2 = |a: &[f32], b: &[f32]| -> f64 {
        a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum()
    };
    let mut centres = Vec::with_capacity(k * d);
    centres.extend_from_slice(row(rng.random_range(0..n)));
    let mut nearest: Vec<f64> = (0..n).map(|i| dist2(row(i), &centres[..d])).collect();
    while centres.len() < k * d {
        let total: f64 = nearest.iter().sum();
        let pick = if total > 0.0 {
            let mut target = rng.random::<f64>() * total;
            let mut pick = n - 1;
            for (i, &w) in nearest.iter().enumerate() {
                if target < w {
                    pick = i;
                    break;
                }
                target -= w;
            }
            pick
        } else {
            rng.random_range(0..n)
        };
        let start = centres.len();
        centres.extend_from_slice(row(pick));
        let c = centres[start..].to_vec();
        for (i, m) in nearest.iter_mut().enumerate() {
            *m = m.min(dist2(row(i), &c));
        }
    }
    centres
}

/// One Lloyd iteration of k-means: each row goes to its nearest centroid
/// (squared Euclidean distance, ties to the lower index), and each centroid
/// moves to the mean of its rows; a centroid without rows stays where it is.
///
/// # Shapes
/// - `rows`: `[n, d]`, `centroids`: `[k, d]`, same float dtype; returns the
///   new centroids `[k, d]` and the assignment `[n]` u32.
pub fn lloyd_step(rows: &Tensor, centroids: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_, d) = rows.dims2()?;
    let (k, dc) = centroids.dims2()?;
    if d != dc {
        return Err(candle_core::Error::ShapeMismatchBinaryOp {
            lhs: rows.shape().clone(),
            rhs: centroids.shape().clone(),
            op: "lloyd_step",
        }
        .into());
    }
    // |x - c|^2 = |x|^2 - 2 x.c + |c|^2, and |x|^2 is the same for every
    // centroid of a row, so it does not change the argmin.
    let score = (rows.matmul(&centroids.t()?)? * -2.0)?
        .broadcast_add(&centroids.sqr()?.sum(1)?.unsqueeze(0)?)?;
    let assign = score.argmin(D::Minus1)?.to_dtype(DType::U32)?;
    let ids = Tensor::arange(0u32, k as u32, rows.device())?.unsqueeze(0)?;
    let onehot = assign
        .unsqueeze(1)?
        .broadcast_eq(&ids)?
        .to_dtype(rows.dtype())?; // [n, k]
    let sums = onehot.t()?.contiguous()?.matmul(rows)?; // [k, d]
    let counts = onehot.sum(0)?; // [k]
    let means = sums.broadcast_div(&counts.maximum(1.0)?.unsqueeze(1)?)?;
    let empty = counts.eq(0.0)?.unsqueeze(1)?.broadcast_as((k, d))?;
    Ok((empty.where_cond(centroids, &means)?, assign))
}

/// k-means++ seeding followed by `iters` Lloyd iterations.
///
/// # Shapes
/// - `rows`: `[n, d]` with `n >= 1`; returns the centroids `[k, d]` in the
///   dtype of `rows`.
pub fn kmeans(rows: &Tensor, k: usize, iters: usize, seed: u64) -> Result<Tensor> {
    let (n, d) = rows.dims2()?;
    if n == 0 || k == 0 {
        return Err(Error::Config(format!(
            "k-means needs at least one row and one centroid, got {n} rows and k = {k}"
        )));
    }
    let host = rows.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let seeds = kmeans_plus_plus(&host, d, k, &mut ChaCha8Rng::seed_from_u64(seed));
    let mut c = Tensor::from_vec(seeds, (k, d), rows.device())?.to_dtype(rows.dtype())?;
    for _ in 0..iters {
        c = lloyd_step(rows, &c)?.0;
    }
    Ok(c)
}

/// EMA statistics of the codebook (host copies, f64).
#[derive(Clone, Debug)]
struct EmaState {
    decay: f64,
    /// `N_k`, one per code.
    counts: Vec<f64>,
    /// `m_k`, `codebook_size * code_dim` row-major.
    sums: Vec<f64>,
}

/// Applies [`VqTraining`] around the optimizer steps of a tokenizer's
/// training: k-means initialisation before the first step, EMA updates and
/// dead-code restarts after each. The training loop owns it; the model only
/// exposes its codebook.
#[derive(Clone, Debug)]
pub struct CodebookTrainer {
    cfg: VqTraining,
    codebook_size: usize,
    code_dim: usize,
    /// Steps seen by [`Self::after_step`].
    step: u64,
    /// Step at which each code was last chosen (or restarted).
    last_used: Vec<u64>,
    ema: Option<EmaState>,
    rng: ChaCha8Rng,
    initialised: bool,
    restarts: u64,
}

impl CodebookTrainer {
    pub fn new(cfg: &Config, seed: u64) -> Self {
        Self {
            cfg: cfg.vq.clone(),
            codebook_size: cfg.codebook_size,
            code_dim: cfg.code_dim,
            step: 0,
            last_used: vec![0; cfg.codebook_size],
            ema: None,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_C0DE_B00C),
            initialised: false,
            restarts: 0,
        }
    }

    /// Whether the optimizer should train the codebook (the codebook loss);
    /// with EMA updates it must leave it alone.
    pub fn optimizes_codebook(&self) -> bool {
        matches!(self.cfg.update, CodebookUpdate::Loss)
    }

    /// Codes restarted so far.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// Call before the forward pass of every step; the first call replaces
    /// the codebook by the k-means centroids of this batch's encoder outputs
    /// (when `kmeans_iters > 0`).
    ///
    /// # Shapes
    /// - `pixels`: `[B, C, S, S]`.
    pub fn before_step(&mut self, dvae: &Dvae, pixels: &Tensor) -> Result<()> {
        if self.initialised {
            return Ok(());
        }
        self.initialised = true;
        if self.cfg.kmeans_iters == 0 {
            return Ok(());
        }
        let z = dvae.latents(pixels)?;
        let seed = self.rng.random::<u64>();
        let c = kmeans(&z, self.codebook_size, self.cfg.kmeans_iters, seed)?;
        dvae.set_codebook(&c)
    }

    /// Call after the optimizer step with the step's loss: moves the
    /// codebook to the EMA of its assigned encoder outputs (EMA mode) and
    /// restarts the codes unused for `restart_after` steps. Returns the
    /// number of codes restarted.
    pub fn after_step(&mut self, dvae: &Dvae, loss: &DvaeLoss) -> Result<usize> {
        let (k, d) = (self.codebook_size, self.code_dim);
        let (n, dl) = loss.latents.dims2()?;
        if dl != d || loss.assignments.len() != n {
            return Err(Error::Config(format!(
                "codebook trainer: {n} x {dl} latents with {} assignments for a {k} x {d} codebook",
                loss.assignments.len()
            )));
        }
        let step = self.step;
        self.step += 1;
        let ema_on = !self.optimizes_codebook();
        let restart_on = self.cfg.restart_after > 0;
        for &c in &loss.assignments {
            if let Some(t) = self.last_used.get_mut(c as usize) {
                *t = step;
            }
        }
        if !ema_on && !restart_on {
            return Ok(0);
        }
        let latents = loss
            .latents
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut book = dvae
            .codebook()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut changed = false;

        if let CodebookUpdate::Ema { decay } = self.cfg.update {
            let ema = self.ema.get_or_insert_with(|| EmaState {
                decay,
                counts: vec![1.0; k],
                sums: book.iter().map(|&v| f64::from(v)).collect(),
            });
            let mut n_k = vec![0f64; k];
            let mut s_k = vec![0f64; k * d];
            for (r, &c) in loss.assignments.iter().enumerate() {
                let c = c as usize;
                n_k[c] += 1.0;
                for j in 0..d {
                    s_k[c * d + j] += f64::from(latents[r * d + j]);
                }
            }
            let g = ema.decay;
            for c in 0..k {
                ema.counts[c] = g * ema.counts[c] + (1.0 - g) * n_k[c];
                for j in 0..d {
                    ema.sums[c * d + j] = g * ema.sums[c * d + j] + (1.0 - g) * s_k[c * d + j];
                }
            }
            // Laplace smoothing keeps a code that lost its rows from dividing by zero.
            const EPS: f64 = 1e-5;
            let total: f64 = ema.counts.iter().sum();
            for c in 0..k {
                let smoothed = (ema.counts[c] + EPS) / (total + k as f64 * EPS) * total;
                for j in 0..d {
                    book[c * d + j] = (ema.sums[c * d + j] / smoothed) as f32;
                }
            }
            changed = true;
        }

        let mut restarted = 0;
        if restart_on && n > 0 {
            let dead: Vec<usize> = (0..k)
                .filter(|&c| step - self.last_used[c] >= self.cfg.restart_after as u64)
                .collect();
            // Distinct rows where the batch has enough, so that two
            // restarted codes do not start on one vector.
            let distinct = rand::seq::index::sample(&mut self.rng, n, dead.len().min(n));
            for (i, &c) in dead.iter().enumerate() {
                let r = if i < n {
                    distinct.index(i)
                } else {
                    self.rng.random_range(0..n)
                };
                let row = &latents[r * d..(r + 1) * d];
                book[c * d..(c + 1) * d].copy_from_slice(row);
                if let Some(ema) = self.ema.as_mut() {
                    ema.counts[c] = 1.0;
                    for (m, &v) in ema.sums[c * d..(c + 1) * d].iter_mut().zip(row) {
                        *m = f64::from(v);
                    }
                }
                self.last_used[c] = step;
                restarted += 1;
            }
            changed |= restarted > 0;
        }
        if changed {
            let t = Tensor::from_vec(book, (k, d), dvae.codebook().device())?;
            dvae.set_codebook(&t)?;
        }
        self.restarts += restarted as u64;
        Ok(restarted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};

    /// Images made of 8 x 8 flat-coloured patches from a 4-colour palette with
    /// zero mean, so predicting the mean image leaves the full variance: only
    /// information carried by the codes can lower the error.
    fn patch_images(n: usize, cfg: &Config, rng: &mut rand::rngs::StdRng) -> Tensor {
        let palette = [
            [0.8f32, -0.8, 0.8],
            [-0.8, 0.8, -0.8],
            [0.8, 0.8, -0.8],
            [-0.8, -0.8, 0.8],
        ];
        let (s, p, g) = (cfg.image_size, cfg.patch_size, cfg.grid());
        let mut v = vec![0f32; n * 3 * s * s];
        for img in 0..n {
            for gy in 0..g {
                for gx in 0..g {
                    let col = palette[rng.random_range(0..palette.len())];
                    for c in 0..3 {
                        for y in gy * p..(gy + 1) * p {
                            for x in gx * p..(gx + 1) * p {
                                v[((img * 3 + c) * s + y) * s + x] = col[c];
                            }
                        }
                    }
                }
            }
        }
        Tensor::from_vec(v, (n, 3, s, s), &Device::Cpu).expect("shape matches")
    }

    /// Redraws every variable of `vm` from `rng` with the scales of candle's
    /// initialisation (see the first test for why).
    fn seed_vars(vm: &VarMap, rng: &mut rand::rngs::StdRng) -> Result<()> {
        let mut vars: Vec<_> = vm
            .data()
            .lock()
            .expect("varmap lock")
            .clone()
            .into_iter()
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in vars {
            let dims = var.dims().to_vec();
            let n: usize = dims.iter().product();
            let fan_in = dims[1..].iter().product::<usize>().max(1) as f32;
            let bound = if name.starts_with("codebook") {
                3f32.sqrt()
            } else if name.ends_with("bias") {
                // The layer's fan-in is not the bias's shape: the width of
                // the layer it feeds is a fair stand-in for these tiny convs.
                1.0 / (dims[0] as f32).sqrt()
            } else {
                (6.0 / fan_in).sqrt()
            };
            let draws: Vec<f32> = (0..n)
                .map(|_| {
                    if bound > 0.0 {
                        rng.random_range(-bound..bound)
                    } else {
                        0.0
                    }
                })
                .collect();
            var.set(&Tensor::from_vec(draws, dims, &Device::Cpu)?)?;
        }
        Ok(())
    }

    #[test]
    fn training_lowers_reconstruction_and_codes_fit_the_patch_grid() -> Result<()> {
        let cfg = Config::tiny();
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        // A first build creates the variables.
        Dvae::new(&cfg, vb.clone())?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // candle's initialisation cannot be seeded; an unlucky draw left the
        // reconstruction at 0.78x its start once in about twenty runs. Every
        // variable is redrawn from the seeded generator instead, with the
        // scales of candle's initialisation (kernels with Kaiming's variance
        // 2/fan_in, small biases, the codebook with unit variance), and the model is
        // built again over them (layers may keep derived copies), so the test
        // sees the same start every time.
        seed_vars(&vm, &mut rng)?;
        let dvae = Dvae::new(&cfg, vb)?;
        let eval = patch_images(16, &cfg, &mut rng);
        let initial = dvae.forward_loss(&eval)?.recon.to_scalar::<f32>()?;
        let mut opt = AdamW::new(
            vm.all_vars(),
            ParamsAdamW {
                lr: 3e-3,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        for step in 0..40 {
            let batch = patch_images(16, &cfg, &mut rng);
            let loss = dvae.forward_loss(&batch)?;
            let grads = loss.total.backward()?;
            if step == 0 {
                // Straight-through must reach the encoder, the codebook loss the codebook.
                for (name, var) in vm.data().lock().expect("varmap lock").iter() {
                    let g = grads
                        .get(var.as_tensor())
                        .unwrap_or_else(|| panic!("no gradient for {name}"));
                    assert!(
                        g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0,
                        "zero gradient for {name}"
                    );
                }
            }
            opt.step(&grads)?;
        }
        let last = dvae.forward_loss(&eval)?;
        let fin = last.recon.to_scalar::<f32>()?;
        eprintln!(
            "dvae recon {initial} -> {fin}, usage {}, perplexity {}",
            last.usage, last.perplexity
        );
        assert!(fin < 0.7 * initial, "recon {initial} -> {fin}");
        assert!(
            last.usage > 1.0 / cfg.codebook_size as f32,
            "codebook collapsed to one entry"
        );

        let codes = dvae.codes(&eval)?;
        assert_eq!(codes.dims(), [16, cfg.num_patches()]);
        assert_eq!(codes.dtype(), DType::U32);
        let max = codes
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .max()
            .unwrap_or(0);
        assert!((max as usize) < cfg.codebook_size);
        // Decoding the codes is what forward_loss reconstructs from.
        let dec = dvae.decode(&codes)?;
        let direct = (dec - &eval)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
        assert!(
            (direct - fin).abs() < 1e-4 * fin.max(1.0),
            "{direct} vs {fin}"
        );
        Ok(())
    }

    #[test]
    fn codes_take_no_gradient_and_reject_wrong_sizes() -> Result<()> {
        let cfg = Config::tiny();
        let vm = VarMap::new();
        let dvae = Dvae::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
        let px = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu)?)?;
        let codes = dvae.codes(px.as_tensor())?;
        assert!(
            !codes.is_variable()
                && codes
                    .to_dtype(DType::F32)?
                    .sum_all()?
                    .backward()?
                    .get(px.as_tensor())
                    .is_none()
        );
        let wrong = Tensor::zeros((2, 3, 64, 64), DType::F32, &Device::Cpu)?;
        assert!(dvae.codes(&wrong).is_err());
        let bad = Config {
            patch_size: 6,
            ..Config::tiny()
        };
        assert!(matches!(
            Dvae::new(&bad, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)),
            Err(Error::Config(_))
        ));
        for c in [Config::small(), Config::base()] {
            assert_eq!(c.image_size / c.patch_size, c.grid());
            c.validate()?;
        }
        Ok(())
    }

    /// Slow reference of one Lloyd iteration in f64: nearest centroid by
    /// explicit squared distance (ties to the lower index), means of the
    /// assigned rows, empty centroids unchanged.
    fn lloyd_reference(x: &[f64], c: &[f64], d: usize) -> (Vec<f64>, Vec<usize>, Vec<Vec<f64>>) {
        let (n, k) = (x.len() / d, c.len() / d);
        let dist: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                (0..k)
                    .map(|j| (0..d).map(|t| (x[i * d + t] - c[j * d + t]).powi(2)).sum())
                    .collect()
            })
            .collect();
        let assign: Vec<usize> = dist
            .iter()
            .map(|row| {
                let mut best = 0;
                for j in 1..k {
                    if row[j] < row[best] {
                        best = j;
                    }
                }
                best
            })
            .collect();
        let mut out = c.to_vec();
        for j in 0..k {
            let members: Vec<usize> = (0..n).filter(|&i| assign[i] == j).collect();
            if !members.is_empty() {
                for t in 0..d {
                    out[j * d + t] =
                        members.iter().map(|&i| x[i * d + t]).sum::<f64>() / members.len() as f64;
                }
            }
        }
        (out, assign, dist)
    }

    #[test]
    fn lloyd_step_matches_a_slow_reference_in_f32_and_f64() -> Result<()> {
        let mut rng = rand::rng();
        for dtype in [DType::F64, DType::F32] {
            for _ in 0..5 {
                let (n, k, d) = (
                    rng.random_range(20..200),
                    rng.random_range(2..12),
                    rng.random_range(1..9),
                );
                let x: Vec<f64> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
                let mut c: Vec<f64> = (0..k * d).map(|_| rng.random_range(-1.0..1.0)).collect();
                // One centroid far from every row must stay where it is.
                c[..d].fill(50.0);
                let (ref_c, ref_a, dist) = lloyd_reference(&x, &c, d);
                let xt = Tensor::from_vec(x.clone(), (n, d), &Device::Cpu)?.to_dtype(dtype)?;
                let ct = Tensor::from_vec(c.clone(), (k, d), &Device::Cpu)?.to_dtype(dtype)?;
                let (new_c, assign) = lloyd_step(&xt, &ct)?;
                let assign = assign.to_vec1::<u32>()?;
                let tol = if dtype == DType::F64 { 1e-10 } else { 1e-4 };
                for (i, &a) in assign.iter().enumerate() {
                    // A different pick is only acceptable at a numerical tie.
                    assert!(
                        dist[i][a as usize] - dist[i][ref_a[i]] <= tol,
                        "{dtype:?} row {i}: {a} vs {}",
                        ref_a[i]
                    );
                }
                assert!(!assign.contains(&0), "the far centroid took rows");
                if assign.iter().zip(&ref_a).all(|(&a, &r)| a as usize == r) {
                    let got = new_c
                        .to_dtype(DType::F64)?
                        .flatten_all()?
                        .to_vec1::<f64>()?;
                    for (g, r) in got.iter().zip(&ref_c) {
                        assert!((g - r).abs() <= tol, "{dtype:?} centroid {g} vs {r}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn kmeans_finds_well_separated_clusters() -> Result<()> {
        let mut rng = rand::rng();
        let d = 4;
        let centres: Vec<Vec<f64>> = (0..5)
            .map(|j| {
                (0..d)
                    .map(|t| if t == j % d { 10.0 } else { 0.0 } * (1 + j / d) as f64)
                    .collect()
            })
            .collect();
        let mut x = Vec::new();
        for _ in 0..40 {
            for c in &centres {
                x.extend(c.iter().map(|v| v + rng.random_range(-0.1..0.1)));
            }
        }
        let xt = Tensor::from_vec(x, (200, d), &Device::Cpu)?;
        let found = kmeans(&xt, 5, 10, rng.random())?.to_vec2::<f64>()?;
        for c in &centres {
            let best = found
                .iter()
                .map(|f| f.iter().zip(c).map(|(a, b)| (a - b).powi(2)).sum::<f64>())
                .fold(f64::INFINITY, f64::min);
            assert!(best < 0.05, "no centroid near {c:?}: {found:?}");
        }
        Ok(())
    }

    #[test]
    fn dead_code_restart_revives_unused_codes() -> Result<()> {
        let cfg = Config {
            vq: VqTraining {
                kmeans_iters: 0,
                restart_after: 1,
                update: CodebookUpdate::Loss,
            },
            ..Config::tiny()
        };
        let vm = VarMap::new();
        let dvae = Dvae::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
        let px = Tensor::randn(0f32, 1.0, (16, 3, 32, 32), &Device::Cpu)?;
        // Eight live codes at the data; the other 248 point away from all of it.
        let z = dvae.latents(&px)?;
        let live = kmeans(&z, 8, 5, 1)?;
        let away = z
            .mean(0)?
            .neg()?
            .unsqueeze(0)?
            .broadcast_as((cfg.codebook_size - 8, cfg.code_dim))?;
        dvae.set_codebook(&Tensor::cat(&[&live, &away.contiguous()?], 0)?)?;
        let before = dvae.forward_loss(&px)?;
        assert!(
            before.assignments.iter().all(|&c| c < 8),
            "dead codes in use"
        );

        let mut vq = CodebookTrainer::new(&cfg, 7);
        // Step 0 marks the codes; at step 1 the unused ones have been idle one step.
        assert_eq!(vq.after_step(&dvae, &before)?, 0);
        let restarted = vq.after_step(&dvae, &before)?;
        assert_eq!(restarted, cfg.codebook_size - 8);
        let after = dvae.forward_loss(&px)?;
        let revived: std::collections::HashSet<u32> = after
            .assignments
            .iter()
            .copied()
            .filter(|&c| c >= 8)
            .collect();
        assert!(
            revived.len() > (cfg.codebook_size - 8) / 2,
            "only {} of {} restarted codes in use",
            revived.len(),
            cfg.codebook_size - 8
        );
        // A code in use is not restarted: the live codes that kept rows are unchanged.
        let book = dvae.codebook().narrow(0, 0, 8)?;
        let used: std::collections::HashSet<u32> = before.assignments.iter().copied().collect();
        for c in used {
            let diff = (book.get(c as usize)? - live.get(c as usize)?)?
                .abs()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "live code {c} was moved");
        }
        Ok(())
    }

    #[test]
    fn ema_update_moves_codes_to_the_average_of_their_rows() -> Result<()> {
        let decay = 0.8;
        let cfg = Config {
            vq: VqTraining {
                kmeans_iters: 0,
                restart_after: 0,
                update: CodebookUpdate::Ema { decay },
            },
            ..Config::tiny()
        };
        let vm = VarMap::new();
        let dvae = Dvae::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
        let px = Tensor::randn(0f32, 1.0, (4, 3, 32, 32), &Device::Cpu)?;
        let start = dvae.codebook().to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let loss = dvae.forward_loss(&px)?;
        let mut vq = CodebookTrainer::new(&cfg, 0);
        assert!(!vq.optimizes_codebook());
        vq.after_step(&dvae, &loss)?;
        let got = dvae.codebook().to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let z = loss.latents.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        // Reference: N_k = decay + (1 - decay) n_k, m_k = decay e_k + (1 - decay) sum z,
        // Laplace-smoothed N_k, e_k = m_k / N_k.
        let k = cfg.codebook_size;
        let mut n = vec![0f64; k];
        let mut sums = vec![vec![0f64; cfg.code_dim]; k];
        for (row, &c) in z.iter().zip(&loss.assignments) {
            n[c as usize] += 1.0;
            for (s, v) in sums[c as usize].iter_mut().zip(row) {
                *s += v;
            }
        }
        let counts: Vec<f64> = n.iter().map(|&n| decay + (1.0 - decay) * n).collect();
        let total: f64 = counts.iter().sum();
        for c in 0..k {
            let smoothed = (counts[c] + 1e-5) / (total + k as f64 * 1e-5) * total;
            for t in 0..cfg.code_dim {
                let m = decay * start[c][t] + (1.0 - decay) * sums[c][t];
                let want = m / smoothed;
                assert!(
                    (got[c][t] - want).abs() < 1e-5 * want.abs().max(1.0),
                    "code {c}[{t}]: {} vs {want}",
                    got[c][t]
                );
            }
        }
        Ok(())
    }

    /// Images of 8 x 8 flat patches whose colours are drawn uniformly from
    /// the RGB cube: a continuum of patch contents, so a healthy tokenizer
    /// spreads them over many codes.
    fn colour_images(n: usize, cfg: &Config, rng: &mut rand::rngs::StdRng) -> Tensor {
        let (s, p, g) = (cfg.image_size, cfg.patch_size, cfg.grid());
        let mut v = vec![0f32; n * 3 * s * s];
        for img in 0..n {
            for gy in 0..g {
                for gx in 0..g {
                    let col: [f32; 3] = [
                        rng.random_range(-1.0..1.0),
                        rng.random_range(-1.0..1.0),
                        rng.random_range(-1.0..1.0),
                    ];
                    for c in 0..3 {
                        for y in gy * p..(gy + 1) * p {
                            for x in gx * p..(gx + 1) * p {
                                v[((img * 3 + c) * s + y) * s + x] = col[c];
                            }
                        }
                    }
                }
            }
        }
        Tensor::from_vec(v, (n, 3, s, s), &Device::Cpu).expect("shape matches")
    }

    /// Trains the tiny tokenizer for a few seeded steps with `vq` and returns
    /// the fraction of the codebook used on 32 held-out images (512 patches
    /// for 256 codes) and the held-out reconstruction error.
    fn seeded_usage(vq: VqTraining) -> Result<(f32, f32)> {
        let cfg = Config {
            vq,
            ..Config::tiny()
        };
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        Dvae::new(&cfg, vb.clone())?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        seed_vars(&vm, &mut rng)?;
        let dvae = Dvae::new(&cfg, vb)?;
        let mut vq = CodebookTrainer::new(&cfg, 11);
        let vars: Vec<Var> = vm
            .data()
            .lock()
            .expect("varmap lock")
            .iter()
            .filter(|(name, _)| vq.optimizes_codebook() || !name.starts_with("codebook"))
            .map(|(_, v)| v.clone())
            .collect();
        let mut opt = AdamW::new(
            vars,
            ParamsAdamW {
                lr: 3e-3,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        let eval = colour_images(32, &cfg, &mut rng);
        for _ in 0..30 {
            let batch = colour_images(16, &cfg, &mut rng);
            vq.before_step(&dvae, &batch)?;
            let loss = dvae.forward_loss(&batch)?;
            opt.step(&loss.total.backward()?)?;
            vq.after_step(&dvae, &loss)?;
        }
        let last = dvae.forward_loss(&eval)?;
        Ok((last.usage, last.recon.to_scalar::<f32>()?))
    }

    #[test]
    fn codebook_remedies_keep_the_codebook_in_use() -> Result<()> {
        let (old_usage, old_recon) = seeded_usage(VqTraining::none())?;
        let (new_usage, new_recon) = seeded_usage(VqTraining::default())?;
        eprintln!("usage {old_usage} -> {new_usage}, recon {old_recon} -> {new_recon}");
        // The plain VQ-VAE collapses onto a few codes; the remedies keep most
        // of the codebook alive without hurting the reconstruction.
        assert!(old_usage < 0.25, "plain VQ-VAE used {old_usage}");
        assert!(new_usage >= 0.5, "remedies used {new_usage}");
        assert!(
            new_recon <= old_recon * 1.05,
            "recon {old_recon} -> {new_recon}"
        );
        Ok(())
    }

    #[test]
    fn old_configs_load_with_the_new_defaults_and_bad_options_are_rejected() -> Result<()> {
        let old = r#"{"image_size":64,"patch_size":8,"channels":3,"hidden":64,
            "code_dim":64,"codebook_size":512,"commitment":0.25}"#;
        let cfg: Config = serde_json::from_str(old).map_err(|e| Error::Config(e.to_string()))?;
        assert_eq!(cfg, Config::small());
        let typo = old.replace(
            "\"commitment\"",
            "\"vq\":{\"kmeans_iter\":3},\"commitment\"",
        );
        assert!(serde_json::from_str::<Config>(&typo).is_err());
        let bad = Config {
            vq: VqTraining {
                update: CodebookUpdate::Ema { decay: 1.0 },
                ..VqTraining::default()
            },
            ..Config::tiny()
        };
        assert!(matches!(bad.validate(), Err(Error::Config(_))));
        Ok(())
    }
}
