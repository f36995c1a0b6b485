//! The trainable COTS system: online towers, momentum towers, objectives and
//! the frozen visual tokenizer, and one forward pass of a training step.
//!
//! The step order is the one the objectives crate documents: forward passes
//! (clean, momentum, masked, dVAE codes as the objectives need) -> AMF weights
//! -> losses. Backward, the optimizer, the EMA update and the enqueue are done
//! by the trainer, in that order, after [`System::forward`].

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cots_encoders::dvae::{self, Dvae};
use cots_encoders::momentum::Momentum;
use cots_encoders::two_stream::{self, ImageOutput, TwoStream};
use cots_objectives::{
    amf::AmfStats, Dims, Losses, MlmInputs, MvmInputs, Objectives, ObjectivesConfig, StepInputs,
};
use cots_ops::SeededRng;

use crate::frozen::{self, FeatureCache};
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
    /// Masked-language-modeling inputs: `([B, L]` u32 masked ids, `[B, L]` i64
    /// labels with -100 where not masked), when the objectives need them.
    pub mlm: Option<(Tensor, Tensor)>,
    /// `[B, N]` u8 patch mask for masked vision modeling, when needed.
    pub patch_mask: Option<Tensor>,
}

/// What one forward pass produced.
pub struct StepOutput {
    pub losses: Losses,
    pub amf: Option<AmfStats>,
    /// Kept alive for [`System::after_step`] (the enqueue).
    image_embed_m: Option<Tensor>,
    text_embed_m: Option<Tensor>,
    pair_weights: Option<Tensor>,
    image_embed: Tensor,
    text_embed: Tensor,
    image_ids: Tensor,
    temperature: Tensor,
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
    /// The text tower is locked (`model.lock_text`): not trained, run
    /// without dropout, its output detached.
    pub lock_text: bool,
    /// Features of the frozen towers (the CNN image tower, a locked text
    /// tower), remembered per input.
    pub image_cache: FeatureCache,
    pub text_cache: FeatureCache,
}

impl System {
    /// Builds fresh towers (momentum initialised as a copy), the objectives'
    /// heads and queue, and loads the frozen dVAE when MVM needs it.
    pub fn new(
        cfg: &two_stream::Config,
        objectives: &ObjectivesConfig,
        dvae_path: Option<&Path>,
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
            lock_text: false,
            image_cache: FeatureCache::default(),
            text_cache: FeatureCache::default(),
        })
    }

    /// The forward half of a training step: every pass the objectives need,
    /// the AMF weights and the weighted losses.
    pub fn forward(&mut self, b: &StepBatch, rng: Option<&SeededRng>) -> Result<StepOutput> {
        let needs = self.objectives.needs();
        let device = self.device.clone();
        let rows = |picked: &[usize]| -> Result<Tensor> {
            let idx: Vec<u32> = picked.iter().map(|&i| i as u32).collect();
            Ok(Tensor::new(idx, &device)?)
        };
        let img = if self.model.image_tower_frozen() && b.pixels.rank() == 4 {
            // Pooled CNN features, remembered per image when caching.
            let model = &self.model;
            let features = |picked: &[usize]| -> Result<Tensor> {
                let pixels = b.pixels.index_select(&rows(picked)?, 0)?;
                Ok(model
                    .encode_image(&pixels, None, None)?
                    .hidden
                    .get_on_dim(1, 0)?)
            };
            let pooled = self.image_cache.features(
                b.pixels.dim(0)?,
                || frozen::pixel_keys(&b.pixels),
                features,
                &device,
            )?;
            ImageOutput {
                embed: self.model.project_image(&pooled, rng)?,
                hidden: pooled.unsqueeze(1)?,
            }
        } else {
            self.model.encode_image(&b.pixels, None, rng)?
        };
        // A locked text tower's pooled states (no dropout, detached),
        // remembered per caption when caching.
        let locked_text = if self.lock_text {
            let model = &self.model;
            let features = |picked: &[usize]| -> Result<Tensor> {
                let idx = rows(picked)?;
                let ids = b.input_ids.index_select(&idx, 0)?;
                let mask = b.attention_mask.index_select(&idx, 0)?;
                let hidden = model.text().forward(&ids, None, Some(&mask), None)?;
                Ok(model.pool_text(&hidden, Some(&mask))?.detach())
            };
            Some(self.text_cache.features(
                b.input_ids.dim(0)?,
                || frozen::text_keys(&b.input_ids, &b.attention_mask),
                features,
                &device,
            )?)
        } else {
            None
        };
        let txt_embed = match &locked_text {
            Some(pooled) => self.model.project_text(pooled, rng)?,
            None => {
                self.model
                    .encode_text(&b.input_ids, Some(&b.attention_mask), rng)?
                    .embed
            }
        };
        let temperature = self.model.temperature()?;

        let (image_embed_m, text_embed_m) = if needs.momentum {
            // The momentum towers run without dropout, like MoCo's key encoder.
            // A frozen image tower is its own momentum copy, like a locked
            // text tower below.
            let f = if self.model.image_tower_frozen() && b.pixels.rank() == 4 {
                self.model_m
                    .project_image(&img.hidden.get_on_dim(1, 0)?, None)?
            } else {
                self.model_m.encode_image(&b.pixels, None, None)?.embed
            }
            .detach();
            // A locked tower is its own momentum copy (the EMA of constant
            // weights), so only the momentum projection differs.
            let t = if let Some(pooled) = &locked_text {
                self.model_m.project_text(pooled, None)?
            } else {
                self.model_m
                    .encode_text(&b.input_ids, Some(&b.attention_mask), None)?
                    .embed
            }
            .detach();
            (Some(f), Some(t))
        } else {
            (None, None)
        };
        let amf = match (&image_embed_m, &text_embed_m) {
            (Some(f), Some(t)) => self.objectives.filter(f, t)?,
            _ => None,
        };
        let pair_weights = amf.as_ref().map(|a| a.weights.clone());

        let masked_text = match (&b.mlm, needs.masked_text) {
            (Some((ids, labels)), true) => {
                let hidden = self
                    .model
                    .encode_text(ids, Some(&b.attention_mask), rng)?
                    .hidden;
                Some((hidden, labels.clone()))
            }
            (None, true) => return Err(Error::Config("MLM needs masked text in the batch".into())),
            _ => None,
        };
        let masked_image = match (&b.patch_mask, needs.masked_image) {
            (Some(mask), true) => {
                let hidden = self.model.encode_image(&b.pixels, Some(mask), rng)?.hidden;
                let codes = match &self.dvae {
                    Some(d) => d.codes(&b.pixels)?,
                    None => return Err(Error::Config("MVM needs the visual tokenizer".into())),
                };
                Some((hidden, mask.clone(), codes))
            }
            (None, true) => {
                return Err(Error::Config("MVM needs a patch mask in the batch".into()))
            }
            _ => None,
        };

        let inputs = StepInputs {
            image_embed: &img.embed,
            text_embed: &txt_embed,
            image_embed_m: image_embed_m.as_ref(),
            text_embed_m: text_embed_m.as_ref(),
            image_ids: &b.image_ids,
            temperature: &temperature,
            pair_weights: pair_weights.as_ref(),
            mlm: masked_text
                .as_ref()
                .map(|(hidden, labels)| MlmInputs { hidden, labels }),
            mvm: masked_image
                .as_ref()
                .map(|(hidden, mask, codes)| MvmInputs {
                    hidden,
                    mask,
                    codes,
                }),
            itm: None,
        };
        let losses = self.objectives.losses(&inputs)?;
        Ok(StepOutput {
            losses,
            amf: amf.map(|a| a.stats),
            image_embed_m,
            text_embed_m,
            pair_weights,
            image_embed: img.embed.detach(),
            text_embed: txt_embed.detach(),
            image_ids: b.image_ids.clone(),
            temperature: temperature.detach(),
        })
    }

    /// After the optimizer step: EMA update of the momentum towers, then the
    /// objectives' own updates (the enqueue of the kept momentum keys).
    pub fn after_step(&mut self, out: &StepOutput, momentum: f64) -> Result<()> {
        self.ema.update(momentum)?;
        let inputs = StepInputs {
            image_embed: &out.image_embed,
            text_embed: &out.text_embed,
            image_embed_m: out.image_embed_m.as_ref(),
            text_embed_m: out.text_embed_m.as_ref(),
            image_ids: &out.image_ids,
            temperature: &out.temperature,
            pair_weights: out.pair_weights.as_ref(),
            mlm: None,
            mvm: None,
            itm: None,
        };
        self.objectives.after_step(&inputs)?;
        Ok(())
    }

    /// Name prefixes of the frozen towers' variables: a locked text tower,
    /// the CNN image tower.
    pub fn frozen_prefixes(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.lock_text {
            out.push(format!("{MODEL_PREFIX}.text."));
        }
        if self.model.image_tower_frozen() {
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
