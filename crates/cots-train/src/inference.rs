//! How is a trained run used? Opening a run directory, embedding images and
//! texts in batches, and evaluating retrieval on a dataset split.
//!
//! A run directory holds `config.toml` (the resolved run config),
//! `model.json` (the two-stream config), `tokenizer.json`, `checkpoints/`
//! and `metrics.jsonl`. The newest complete checkpoint's online weights are
//! the model.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cots_data::image_io::{load_pixels, ImageConfig};
use cots_data::{Dataset, ImageSource};
use cots_encoders::tokenizer::TextTokenizer;
use cots_encoders::two_stream::{self, TwoStream};
use cots_eval::{evaluate_embeddings, EvalOptions, RetrievalReport};
use rayon::prelude::*;

use crate::config::RunConfig;
use crate::model::MODEL_PREFIX;
use crate::{checkpoint, Error, Result};

pub const CONFIG_FILE: &str = "config.toml";
pub const MODEL_FILE: &str = "model.json";
pub const CHECKPOINTS: &str = "checkpoints";

/// Images per encoder batch at inference.
const BATCH: usize = 64;

/// L2-normalised image embeddings `[N, E]` of `sources`, in order.
pub fn embed_images(
    model: &TwoStream,
    sources: &[ImageSource],
    image: &ImageConfig,
    device: &Device,
) -> Result<Tensor> {
    let mut out = Vec::new();
    for chunk in sources.chunks(BATCH) {
        let pixels: Vec<Vec<f32>> = chunk
            .par_iter()
            .map(|s| load_pixels(s, image))
            .collect::<std::result::Result<_, _>>()?;
        let n = chunk.len();
        let t = Tensor::from_vec(pixels.concat(), (n, 3, image.size, image.size), device)?;
        // Detached: validation during training passes the online model, whose
        // weights are variables; an attached output would keep every batch's
        // activations alive through the autograd graph. (A `Run`'s model is
        // frozen and records no graph.)
        out.push(model.encode_image(&t, None, None)?.embed.detach());
    }
    if out.is_empty() {
        return Err(Error::Config("no images to embed".into()));
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// L2-normalised text embeddings `[M, E]` of `texts`, in order.
pub fn embed_texts(
    model: &TwoStream,
    tokenizer: &TextTokenizer,
    texts: &[String],
    max_len: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut out = Vec::new();
    for chunk in texts.chunks(BATCH * 4) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let (ids, mask) = tokenizer.encode_batch(&refs, max_len)?.to_tensors(device)?;
        out.push(model.encode_text(&ids, Some(&mask), None)?.embed.detach());
    }
    if out.is_empty() {
        return Err(Error::Config("no texts to embed".into()));
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// Retrieval metrics of `model` on every image and caption of `data`.
pub fn evaluate(
    model: &TwoStream,
    tokenizer: &TextTokenizer,
    data: &Dataset,
    image: &ImageConfig,
    max_len: usize,
    device: &Device,
) -> Result<RetrievalReport> {
    let sources: Vec<ImageSource> = data.items.iter().map(|i| i.source.clone()).collect();
    let (texts, targets) = data.queries();
    let img = embed_images(model, &sources, image, device)?;
    let txt = embed_texts(model, tokenizer, &texts, max_len, device)?;
    Ok(evaluate_embeddings(
        &img,
        &txt,
        &targets,
        &EvalOptions::default(),
    )?)
}

/// A trained run, opened for inference.
pub struct Run {
    pub dir: PathBuf,
    pub cfg: RunConfig,
    pub model_cfg: two_stream::Config,
    pub tokenizer: TextTokenizer,
    pub model: TwoStream,
    pub device: Device,
    /// Hash of the model weights: embeddings of two runs never mix silently.
    pub weights_hash: String,
    pub step: u64,
}

impl Run {
    /// Opens `dir`, loading the newest complete checkpoint's online weights.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        let cfg = RunConfig::load(&dir.join(CONFIG_FILE))?;
        let model_cfg = two_stream::Config::load(dir.join(MODEL_FILE))?;
        let tokenizer = TextTokenizer::from_dir(dir)?;
        let ckpt = checkpoint::latest(&dir.join(CHECKPOINTS))?.ok_or_else(|| {
            Error::Checkpoint(format!(
                "{} has no complete checkpoint (train it first, or check the path)",
                dir.display()
            ))
        })?;
        let (tensors, meta) = checkpoint::load(&ckpt)?;
        let weights = checkpoint::strip(&checkpoint::strip(&tensors, "online"), MODEL_PREFIX);
        let map = VarMap::new();
        TwoStream::new(
            &model_cfg,
            VarBuilder::from_varmap(&map, DType::F32, device),
        )?;
        // Loading through the VarMap names any missing or mis-shaped tensor;
        // the model itself is rebuilt on plain tensors (no autograd graph).
        cots_encoders::weights::load_tensors(&map, &weights, &ckpt, "", &[])?;
        let model = TwoStream::new(
            &model_cfg,
            cots_encoders::weights::frozen(&map, DType::F32, device),
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            weights_hash: checkpoint::weights_hash(&weights)?,
            step: meta["step"].as_u64().unwrap_or(0),
            cfg,
            model_cfg,
            tokenizer,
            model,
            device: device.clone(),
        })
    }

    /// The image transform the model was trained with.
    pub fn image_config(&self) -> ImageConfig {
        self.cfg.data.image.clone()
    }

    pub fn embed_images(&self, sources: &[ImageSource]) -> Result<Tensor> {
        embed_images(&self.model, sources, &self.image_config(), &self.device)
    }

    pub fn embed_texts(&self, texts: &[String]) -> Result<Tensor> {
        embed_texts(
            &self.model,
            &self.tokenizer,
            texts,
            self.model_cfg.max_text_len,
            &self.device,
        )
    }

    pub fn evaluate(&self, data: &Dataset) -> Result<RetrievalReport> {
        evaluate(
            &self.model,
            &self.tokenizer,
            data,
            &self.image_config(),
            self.model_cfg.max_text_len,
            &self.device,
        )
    }
}
