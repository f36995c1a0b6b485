//! The trainable COTS system: online towers, momentum towers, objectives and
//! the frozen visual tokenizer, and one forward pass of a training step.
//!
//! The step order is the one the objectives crate documents: forward passes
//! (clean, momentum, masked, dVAE codes as the objectives need) -> AMF weights
//! -> losses. Backward, the optimizer and the EMA update are done by the loop
//! ([`crate::train_loop::Loop`]) after [`System::forward`]; then
//! [`System::enqueue`].

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cots_encoders::dvae::{self, Dvae};
use cots_encoders::momentum::Momentum;
use cots_encoders::two_stream::{self, TwoStream};
use cots_objectives::{
    amf::AmfStats, Dims, Losses, MaskedImage, MaskedText, MomentumFeatures, Objectives,
    ObjectivesConfig, StepFeatures,
};
use cots_ops::SeededRng;

use crate::frozen::FrozenTower;
use crate::{Error, Result};

/// Prefix of the towers' variables in the online and momentum maps.
pub const MODEL_PREFIX: &str = "model";
/// Prefix of the objectives' trainable heads in the online map.
pub const HEADS_PREFIX: &str = "objectives";

/// One training batch as tensors on the training device.
#[derive(Clone, Debug)]
pub struct StepBatch {
    /// `[B, 3, H, W]` f32, normalised.
    pub pixels: Tensor,
    /// `[B, L]` u32.
    pub input_ids: Tensor,
    /// `[B, L]` u32, 1 keep / 0 pad.
    pub attention_mask: Tensor,
    /// `[B]` u32, captions of one image share it.
    pub image_ids: Tensor,
    /// Masked-language-modeling inputs, when the objectives need them.
    pub mlm: Option<MaskedTextBatch>,
    /// Masked-vision-modeling inputs, when the objectives need them.
    pub mvm: Option<MaskedPatchBatch>,
}

/// Masked-language-modeling inputs of a batch.
///
/// The masks are drawn on the host, so the masked positions are found there
/// too, once, and uploaded with the batch: the loss then gathers them on the
/// device without reading anything back.
#[derive(Clone, Debug)]
pub struct MaskedTextBatch {
    /// `[B, L]` u32: the token ids after masking, input of the masked text pass.
    pub input_ids: Tensor,
    /// `[M]` u32: the masked positions, flat `b * L + l`, ascending.
    pub positions: Tensor,
    /// `[M]` u32: the original token id at each of `positions`.
    pub targets: Tensor,
}

impl MaskedTextBatch {
    /// From the host output of [`cots_data::masking::mlm_mask`] for a
    /// `[B, L]` batch: `masked_ids`, and `labels` holding the original id
    /// where a token was masked and a negative value elsewhere. Every
    /// original id must be below `vocab`, the MLM head's output size.
    pub fn from_host(
        masked_ids: Vec<u32>,
        labels: &[i64],
        (b, l): (usize, usize),
        vocab: usize,
        device: &Device,
    ) -> Result<Self> {
        if masked_ids.len() != b * l || labels.len() != b * l {
            return Err(Error::Config(format!(
                "masked text: {} ids and {} labels for a [{b}, {l}] batch",
                masked_ids.len(),
                labels.len()
            )));
        }
        let mut positions = Vec::new();
        let mut targets = Vec::new();
        for (i, &label) in labels.iter().enumerate() {
            // Negative labels (-100 by convention) mark unmasked tokens.
            if label < 0 {
                continue;
            }
            if label as u64 >= vocab as u64 {
                return Err(Error::Config(format!(
                    "masked text: label {label} at ({}, {}) is outside the vocabulary of {vocab}",
                    i / l,
                    i % l
                )));
            }
            positions.push(i as u32);
            targets.push(label as u32);
        }
        let m = positions.len();
        Ok(Self {
            input_ids: Tensor::from_vec(masked_ids, (b, l), device)?,
            positions: Tensor::from_vec(positions, m, device)?,
            targets: Tensor::from_vec(targets, m, device)?,
        })
    }
}

/// Masked-vision-modeling inputs of a batch (see [`MaskedTextBatch`] about
/// why the positions come from the host).
#[derive(Clone, Debug)]
pub struct MaskedPatchBatch {
    /// `[B, N]` u8: 1 where the patch is masked (the ViT swaps in its mask token).
    pub patch_mask: Tensor,
    /// `[M]` u32: the masked patches, flat `b * N + n`, ascending.
    pub positions: Tensor,
}

impl MaskedPatchBatch {
    /// From a host patch mask of a `[B, N]` batch (non-zero = masked), as
    /// [`cots_data::masking::block_mask`] draws it per image.
    pub fn from_host(mask: Vec<u8>, (b, n): (usize, usize), device: &Device) -> Result<Self> {
        if mask.len() != b * n {
            return Err(Error::Config(format!(
                "patch mask: {} entries for a [{b}, {n}] batch",
                mask.len()
            )));
        }
        let positions: Vec<u32> = (0..b * n)
            .filter(|&i| mask[i] != 0)
            .map(|i| i as u32)
            .collect();
        let m = positions.len();
        Ok(Self {
            patch_mask: Tensor::from_vec(mask, (b, n), device)?,
            positions: Tensor::from_vec(positions, m, device)?,
        })
    }
}

/// What one forward pass produced.
pub struct StepOutput {
    pub losses: Losses,
    pub amf: Option<AmfStats>,
    /// The step's features, detached, kept for [`System::enqueue`] (the
    /// enqueue) without holding the graph.
    pub features: StepFeatures,
}

/// Online model + momentum model + objectives + frozen dVAE.
pub struct System {
    pub cfg: two_stream::Config,
    pub online: VarMap,
    pub model: TwoStream,
    pub momentum_vars: VarMap,
    pub model_m: TwoStream,
    pub ema: Momentum,
    pub objectives: Objectives,
    pub dvae: Option<Dvae>,
    pub device: Device,
    /// The pretrained CNN image tower, frozen (`None`: the ViT trains).
    pub frozen_image: Option<FrozenTower>,
    /// The text tower, locked (`model.lock_text`; `None`: it trains).
    pub locked_text: Option<FrozenTower>,
}

/// Which towers stay fixed, and whether their features are remembered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Freeze {
    /// Lock the text tower (LiT-style): not trained, no dropout, detached.
    pub lock_text: bool,
    /// Remember the frozen image tower's features per image (off under
    /// random crops, where images never repeat).
    pub remember_images: bool,
}

impl System {
    /// Builds fresh towers (momentum initialised as a copy), the objectives'
    /// heads and queue, the frozen towers' wrappers as `freeze` says (the CNN
    /// image tower is always frozen), and loads the frozen dVAE when MVM
    /// needs it.
    pub fn new(
        cfg: &two_stream::Config,
        objectives: &ObjectivesConfig,
        dvae_path: Option<&Path>,
        freeze: Freeze,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        let online = VarMap::new();
        let vb = VarBuilder::from_varmap(&online, DType::F32, device);
        let model = TwoStream::new(cfg, vb.pp(MODEL_PREFIX))?;
        let momentum_vars = VarMap::new();
        let vb_m = VarBuilder::from_varmap(&momentum_vars, DType::F32, device);
        let model_m = TwoStream::new(cfg, vb_m.pp(MODEL_PREFIX))?;
        let ema = Momentum::with_prefix(&online, &momentum_vars, MODEL_PREFIX)?;

        let dvae = match dvae_path {
            Some(dir) => Some(load_dvae(dir, device)?),
            None => None,
        };
        let codebook = dvae.as_ref().map(|d| d.config().codebook_size).unwrap_or(2);
        let dims = Dims {
            embed: cfg.embed_dim,
            text_hidden: cfg.text.hidden_size,
            vision_hidden: cfg.vision_width(),
            vocab: cfg.text.vocab_size,
            codebook,
        };
        let objectives = cots_objectives::build(objectives, dims, vb.pp(HEADS_PREFIX))?;
        seed_init(&online, seed)?;
        ema.copy_from_online()?;
        if objectives.needs().masked_image && !cfg.image_tower.is_vit() {
            return Err(Error::Config(
                "masked vision modeling needs the ViT image tower; the pretrained CNN has no \
                 patches to mask"
                    .into(),
            ));
        }
        if objectives.needs().dvae_codes && dvae.is_none() {
            return Err(Error::Config(
                "masked vision modeling needs a visual tokenizer: run `cots train-tokenizer` and set \
                 model.dvae to its directory, or remove MVM from the objectives"
                    .into(),
            ));
        }
        if let (Some(d), true) = (&dvae, cfg.image_tower.is_vit()) {
            let n = cfg.vision.num_patches();
            if d.config().num_patches() != n {
                return Err(Error::Config(format!(
                    "the visual tokenizer has {} patches per image but the ViT has {n}: train it \
                     with the same image and patch size",
                    d.config().num_patches()
                )));
            }
        }
        Ok(Self {
            cfg: cfg.clone(),
            online,
            model,
            momentum_vars,
            model_m,
            ema,
            objectives,
            dvae,
            device: device.clone(),
            frozen_image: (!cfg.image_tower.is_vit()).then(|| {
                let mut t = FrozenTower::default();
                t.cache.enabled = freeze.remember_images;
                t
            }),
            locked_text: freeze.lock_text.then(FrozenTower::default),
        })
    }

    /// The forward half of a training step: every pass the objectives need,
    /// the AMF weights and the weighted losses.
    pub fn forward(&mut self, b: &StepBatch, rng: Option<&SeededRng>) -> Result<StepOutput> {
        let needs = self.objectives.needs();
        // A frozen tower's pooled features feed the trained projection (and
        // the momentum projection); a trained tower runs whole. Video
        // batches (rank 5) go through the temporal head either way.
        let image_pooled = match (&mut self.frozen_image, b.pixels.rank()) {
            (Some(tower), 4) => Some(tower.image(&self.model, &b.pixels)?),
            _ => None,
        };
        let image_embed = match &image_pooled {
            Some(pooled) => self.model.project_image(pooled, rng)?,
            None => self.model.encode_image(&b.pixels, None, rng)?.embed,
        };
        let text_pooled = match &mut self.locked_text {
            Some(tower) => Some(tower.text(&self.model, &b.input_ids, &b.attention_mask)?),
            None => None,
        };
        let text_embed = match &text_pooled {
            Some(pooled) => self.model.project_text(pooled, rng)?,
            None => {
                self.model
                    .encode_text(&b.input_ids, Some(&b.attention_mask), rng)?
                    .embed
            }
        };
        let temperature = self.model.temperature()?;

        let momentum = if needs.momentum {
            // The momentum towers run without dropout, like MoCo's key
            // encoder. A frozen tower is its own momentum copy (the EMA of
            // constant weights), so only the momentum projection differs.
            let f = match &image_pooled {
                Some(pooled) => self.model_m.project_image(pooled, None)?,
                None => self.model_m.encode_image(&b.pixels, None, None)?.embed,
            };
            let t = match &text_pooled {
                Some(pooled) => self.model_m.project_text(pooled, None)?,
                None => {
                    self.model_m
                        .encode_text(&b.input_ids, Some(&b.attention_mask), None)?
                        .embed
                }
            };
            Some((f.detach(), t.detach()))
        } else {
            None
        };
        let (momentum, amf) = match momentum {
            Some((image, text)) => {
                let amf = self
                    .objectives
                    .filter_pairs(&image, &text, Some(&b.image_ids))?;
                let features = MomentumFeatures {
                    image,
                    text,
                    pair_weights: amf.as_ref().map(|a| a.weights.clone()),
                };
                (Some(features), amf.map(|a| a.stats))
            }
            None => (None, None),
        };

        let masked_text = match (&b.mlm, needs.masked_text) {
            (Some(m), true) => {
                let hidden = self
                    .model
                    .encode_text(&m.input_ids, Some(&b.attention_mask), rng)?
                    .hidden;
                Some(MaskedText {
                    hidden,
                    positions: m.positions.clone(),
                    targets: m.targets.clone(),
                })
            }
            (None, true) => return Err(Error::Config("MLM needs masked text in the batch".into())),
            _ => None,
        };
        let masked_image = match (&b.mvm, needs.masked_image) {
            (Some(m), true) => {
                let hidden = self
                    .model
                    .encode_image(&b.pixels, Some(&m.patch_mask), rng)?
                    .hidden;
                let codes = match &self.dvae {
                    Some(d) => d.codes(&b.pixels)?,
                    None => return Err(Error::Config("MVM needs the visual tokenizer".into())),
                };
                Some(MaskedImage {
                    hidden,
                    positions: m.positions.clone(),
                    codes,
                })
            }
            (None, true) => {
                return Err(Error::Config("MVM needs a patch mask in the batch".into()))
            }
            _ => None,
        };

        let mut features =
            StepFeatures::new(image_embed, text_embed, b.image_ids.clone(), temperature);
        features.momentum = momentum;
        features.masked_text = masked_text;
        features.masked_image = masked_image;
        let losses = self.objectives.losses(&features)?;
        Ok(StepOutput {
            losses,
            amf,
            features: features.detached()?,
        })
    }

    /// After the optimizer and EMA updates: the objectives' own updates (the
    /// enqueue of the kept momentum keys) from the step's detached features.
    pub fn enqueue(&mut self, out: &StepOutput) -> Result<()> {
        self.objectives.after_step(&out.features)?;
        Ok(())
    }

    /// Name prefixes of the frozen towers' variables: a locked text tower,
    /// the CNN image tower.
    pub fn frozen_prefixes(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.locked_text.is_some() {
            out.push(format!("{MODEL_PREFIX}.text."));
        }
        if self.frozen_image.is_some() {
            out.push(format!("{MODEL_PREFIX}.vision."));
        }
        out
    }

    /// Trainable variables (towers and objective heads, less the frozen
    /// towers), sorted by name.
    pub fn trainable(&self) -> Vec<(String, candle_core::Var)> {
        let frozen = self.frozen_prefixes();
        sorted_vars(&self.online)
            .into_iter()
            .filter(|(name, _)| !frozen.iter().any(|p| name.starts_with(p)))
            .collect()
    }
}

/// Variables of a map, sorted by name so that order never depends on hashing.
pub fn sorted_vars(map: &VarMap) -> Vec<(String, candle_core::Var)> {
    let data = map.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut vars: Vec<(String, candle_core::Var)> =
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Re-initialises every randomly initialised variable of `map` from a
/// generator seeded by `seed`, so that two runs with one seed start from the
/// same weights.
///
/// candle's CPU random number generator cannot be seeded, so a fresh
/// `VarMap` differs from run to run. Constants (LayerNorm ones and zeros, the
/// temperature) are kept; random vectors (biases) become zeros; embedding
/// tables and learned tokens are drawn from N(0, 0.02^2) as in BERT and ViT;
/// every other random matrix or kernel from LeCun's N(0, 1/fan_in).
pub fn seed_init(map: &VarMap, seed: u64) -> Result<()> {
    use rand::{Rng, SeedableRng};
    for (i, (name, var)) in sorted_vars(map).into_iter().enumerate() {
        let n = var.elem_count();
        if n < 2 {
            continue;
        }
        let v = var
            .as_tensor()
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        if v.iter().all(|x| *x == v[0]) {
            continue;
        }
        let dims = var.dims();
        let new = if dims.len() == 1 {
            var.zeros_like()?
        } else {
            let std = if name.contains("embeddings") || name.ends_with("_token") {
                0.02
            } else {
                let fan_in: usize = dims[1..].iter().product();
                1.0 / (fan_in.max(1) as f64).sqrt()
            };
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let normal = rand_distr::Normal::new(0.0, std).map_err(candle_core::Error::wrap)?;
            let draws: Vec<f32> = (0..n).map(|_| rng.sample(normal) as f32).collect();
            Tensor::from_vec(draws, var.shape(), var.device())?.to_dtype(var.dtype())?
        };
        var.set(&new)?;
    }
    Ok(())
}

/// File names of a saved visual tokenizer.
pub const DVAE_CONFIG: &str = "dvae.json";
pub const DVAE_WEIGHTS: &str = "dvae.safetensors";

/// Loads a frozen dVAE saved by `cots train-tokenizer` (its variables live in a
/// map of their own that no optimizer ever sees).
pub fn load_dvae(dir: &Path, device: &Device) -> Result<Dvae> {
    let cfg_path = dir.join(DVAE_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| Error::Io {
        path: cfg_path.clone(),
        source,
    })?;
    let cfg: dvae::Config = serde_json::from_str(&text).map_err(|e| Error::Format {
        path: cfg_path.clone(),
        message: e.to_string(),
    })?;
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, device);
    let model = Dvae::new(&cfg, vb)?;
    cots_encoders::weights::load_safetensors(&map, &dir.join(DVAE_WEIGHTS), "", &[])?;
    Ok(model)
}
