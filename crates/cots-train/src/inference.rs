//! How is a trained run used? Opening a run directory, embedding images and
//! texts in batches, and evaluating retrieval on a dataset split.
//!
//! A COTS run directory holds `config.toml` (the resolved run config),
//! `model.json` (the two-stream config), `tokenizer.json`, `checkpoints/`
//! and `metrics.jsonl`. The newest complete checkpoint's online weights are
//! the model. A decomposed run (`cots decompose`, see [`crate::decompose`])
//! holds `decomposed.json` and `decomposed.safetensors` instead of
//! `model.json` and `checkpoints/`; [`Run::open`] serves either through the
//! same [`DualEncoder`] interface.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cots_data::image_io::{load_pixels, resize_center_crop, to_chw, ImageConfig};
use cots_data::{Dataset, ImageSource};
use cots_encoders::decomposed::{self, Decomposed};
use cots_encoders::dual::DualEncoder;
use cots_encoders::two_stream::{self, TwoStream};
use cots_eval::{
    evaluate_scorer, hard_negative_accuracy, EmbeddingScorer, EvalOptions, RetrievalReport,
};
use cots_text::TextTokenizer;
use image::RgbImage;
use rayon::prelude::*;

use crate::config::RunConfig;
use crate::model::MODEL_PREFIX;
use crate::run_dir::{RunDir, RunKind};
use crate::{checkpoint, Error, Result};

/// Images per encoder batch at inference.
const BATCH: usize = 64;

/// L2-normalised image embeddings `[N, E]` of `sources`, in order; video
/// embeddings when `image.frames` is set (each source a clip of that many
/// centre-sampled frames).
pub fn embed_images<M: DualEncoder + ?Sized>(
    model: &M,
    sources: &[ImageSource],
    image: &ImageConfig,
    device: &Device,
) -> Result<Tensor> {
    embed_image_batches(model, sources, image, device, |s| load_pixels(s, image))
}

/// L2-normalised embeddings `[N, E]` of images already decoded (an upload
/// to the search service, say), with the same resize, centre crop and
/// normalisation as [`embed_images`] applies to a file. A video model sees
/// each image as a still clip (`frames` copies of it), as it sees an image
/// file.
pub fn embed_decoded_images<M: DualEncoder + ?Sized>(
    model: &M,
    images: &[RgbImage],
    image: &ImageConfig,
    device: &Device,
) -> Result<Tensor> {
    embed_image_batches(model, images, image, device, |img| {
        Ok(to_chw(&resize_center_crop(img, image.size), image).repeat(image.frames.unwrap_or(1)))
    })
}

/// Batches of `pixels(item)` (CHW values at the configured size, `frames`
/// of them per item for a video model) through the image tower.
fn embed_image_batches<T: Sync, M: DualEncoder + ?Sized>(
    model: &M,
    items: &[T],
    image: &ImageConfig,
    device: &Device,
    pixels: impl Fn(&T) -> cots_data::Result<Vec<f32>> + Sync,
) -> Result<Tensor> {
    let mut out = Vec::new();
    for chunk in items.chunks(BATCH) {
        let pixels: Vec<Vec<f32>> = chunk
            .par_iter()
            .map(&pixels)
            .collect::<std::result::Result<_, _>>()?;
        let n = chunk.len();
        let s = image.size;
        let t = match image.frames {
            Some(f) => Tensor::from_vec(pixels.concat(), (n, f, 3, s, s), device)?,
            None => Tensor::from_vec(pixels.concat(), (n, 3, s, s), device)?,
        };
        // Detached: validation during training passes the online model, whose
        // weights are variables; an attached output would keep every batch's
        // activations alive through the autograd graph. (A `Run`'s model is
        // frozen and records no graph.)
        out.push(model.embed_images(&t)?.detach());
    }
    if out.is_empty() {
        return Err(Error::Config("no images to embed".into()));
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// L2-normalised text embeddings `[M, E]` of `texts`, in order.
pub fn embed_texts<M: DualEncoder + ?Sized>(
    model: &M,
    tokenizer: &TextTokenizer,
    texts: &[String],
    max_len: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut out = Vec::new();
    for chunk in texts.chunks(BATCH * 4) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let (ids, mask) = tokenizer.encode_batch(&refs, max_len)?.to_tensors(device)?;
        out.push(model.embed_texts(&ids, &mask)?.detach());
    }
    if out.is_empty() {
        return Err(Error::Config("no texts to embed".into()));
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// Retrieval metrics of `model` on every image (or video) and caption of
/// `data`. On a set of synthetic clips with their time-reversed twins the
/// report also holds the caption-versus-twin accuracy
/// ([`cots_eval::hard_negative_accuracy`]). `opts` chooses the recall
/// cut-offs and the optional dual-softmax row.
pub fn evaluate<M: DualEncoder + ?Sized>(
    model: &M,
    tokenizer: &TextTokenizer,
    data: &Dataset,
    image: &ImageConfig,
    max_len: usize,
    device: &Device,
    opts: &EvalOptions,
) -> Result<RetrievalReport> {
    let sources: Vec<ImageSource> = data.items.iter().map(|i| i.source.clone()).collect();
    let (texts, targets) = data.queries();
    let img = embed_images(model, &sources, image, device)?;
    let txt = embed_texts(model, tokenizer, &texts, max_len, device)?;
    let modality = if image.frames.is_some() {
        "video"
    } else {
        "image"
    };
    let scorer = EmbeddingScorer::new(&img, &txt)?;
    let mut report = evaluate_scorer(&scorer, &targets, opts, modality)?;
    if let Some(twins) = data.twins() {
        report.hard_negative_accuracy = Some(hard_negative_accuracy(&img, &txt, &targets, &twins)?);
    }
    Ok(report)
}

/// The two encoders a run serves.
// One value per opened run: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Encoders {
    /// COTS's ViT and BERT towers.
    Cots(TwoStream),
    /// VLDeformer: the single-stream model's stack run on one modality at a time.
    Decomposed(Decomposed),
}

impl DualEncoder for Encoders {
    fn embed_images(&self, pixels: &Tensor) -> cots_encoders::Result<Tensor> {
        match self {
            Self::Cots(m) => m.embed_images(pixels),
            Self::Decomposed(m) => m.embed_images(pixels),
        }
    }
    fn embed_texts(&self, ids: &Tensor, mask: &Tensor) -> cots_encoders::Result<Tensor> {
        match self {
            Self::Cots(m) => m.embed_texts(ids, mask),
            Self::Decomposed(m) => m.embed_texts(ids, mask),
        }
    }
    fn max_text_len(&self) -> usize {
        match self {
            Self::Cots(m) => m.max_text_len(),
            Self::Decomposed(m) => m.max_text_len(),
        }
    }
}

/// A trained run, opened for inference.
pub struct Run {
    pub dir: PathBuf,
    pub cfg: RunConfig,
    pub tokenizer: TextTokenizer,
    pub model: Encoders,
    pub device: Device,
    /// Hash of the model weights: embeddings of two runs never mix silently.
    pub weights_hash: String,
    pub step: u64,
}

impl Run {
    /// Opens `dir`: a COTS run (newest complete checkpoint's online weights)
    /// or a decomposed one.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        let run_dir = RunDir::new(dir);
        let cfg = run_dir.read_config()?;
        let tokenizer = TextTokenizer::from_dir(dir)?;
        let (model, weights, step) = if run_dir.kind() == Some(RunKind::Decomposed) {
            let model_cfg = decomposed::Config::load(run_dir.decomposed_config())?;
            let path = run_dir.decomposed_weights();
            let weights = cots_encoders::weights::read_safetensors(&path)?;
            let model = load_frozen(&weights, &path, device, |vb| {
                Decomposed::new(&model_cfg, vb)
            })?;
            let step = crate::decompose::saved_step(&run_dir)?;
            (Encoders::Decomposed(model), weights, step)
        } else {
            let model_cfg = two_stream::Config::load(run_dir.model_config())?;
            let ckpt = run_dir.latest_checkpoint()?.ok_or_else(|| {
                Error::Checkpoint(format!(
                    "{} has no complete checkpoint (train it first, or check the path)",
                    dir.display()
                ))
            })?;
            let (tensors, meta) = checkpoint::load(&ckpt)?;
            let weights = checkpoint::strip(&checkpoint::strip(&tensors, "online"), MODEL_PREFIX);
            let model = load_frozen(&weights, &ckpt, device, |vb| TwoStream::new(&model_cfg, vb))?;
            let step = meta["step"].as_u64().unwrap_or(0);
            (Encoders::Cots(model), weights, step)
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            weights_hash: checkpoint::weights_hash(&weights)?,
            step,
            cfg,
            tokenizer,
            model,
            device: device.clone(),
        })
    }

    /// The COTS towers, or an error saying this run holds another kind of
    /// model (`what` names the caller's need).
    pub fn two_stream(&self, what: &str) -> Result<&TwoStream> {
        match &self.model {
            Encoders::Cots(m) => Ok(m),
            Encoders::Decomposed(_) => Err(Error::Config(format!(
                "{what} needs a COTS two-stream run; {} holds a decomposed single-stream model",
                self.dir.display()
            ))),
        }
    }

    /// The image transform the model was trained with.
    pub fn image_config(&self) -> ImageConfig {
        self.cfg.data.image.clone()
    }

    pub fn embed_images(&self, sources: &[ImageSource]) -> Result<Tensor> {
        embed_images(&self.model, sources, &self.image_config(), &self.device)
    }

    /// Embeddings of decoded images; see [`embed_decoded_images`].
    pub fn embed_decoded_images(&self, images: &[RgbImage]) -> Result<Tensor> {
        embed_decoded_images(&self.model, images, &self.image_config(), &self.device)
    }

    pub fn embed_texts(&self, texts: &[String]) -> Result<Tensor> {
        embed_texts(
            &self.model,
            &self.tokenizer,
            texts,
            self.model.max_text_len(),
            &self.device,
        )
    }

    pub fn evaluate(&self, data: &Dataset) -> Result<RetrievalReport> {
        self.evaluate_with(data, &EvalOptions::default())
    }

    /// [`Self::evaluate`] with other options (e.g. the dual-softmax row).
    pub fn evaluate_with(&self, data: &Dataset, opts: &EvalOptions) -> Result<RetrievalReport> {
        evaluate(
            &self.model,
            &self.tokenizer,
            data,
            &self.image_config(),
            self.model.max_text_len(),
            &self.device,
            opts,
        )
    }
}

/// Builds a model with `build`, loads `weights` into it (every variable must
/// be found with its shape; errors name `origin`), and rebuilds it on frozen
/// tensors, so inference records no autograd graph.
pub(crate) fn load_frozen<M>(
    weights: &std::collections::HashMap<String, Tensor>,
    origin: &Path,
    device: &Device,
    build: impl Fn(VarBuilder<'static>) -> cots_encoders::Result<M>,
) -> Result<M> {
    let map = VarMap::new();
    build(VarBuilder::from_varmap(&map, DType::F32, device))?;
    cots_encoders::weights::load_tensors(&map, weights, origin, "", &[])?;
    Ok(build(cots_encoders::weights::frozen(
        &map,
        DType::F32,
        device,
    ))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// An upload decoded in memory embeds exactly like the same image read
    /// from a file, at a size that needs the resize and the crop.
    #[test]
    fn decoded_images_embed_like_their_files() {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let model = TwoStream::new(&two_stream::Config::tiny(32), vb).unwrap();
        let cfg = ImageConfig {
            size: model.config().vision.image_size,
            ..ImageConfig::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut images = Vec::new();
        let mut sources = Vec::new();
        for (i, (w, h)) in [(50, 37), (cfg.size as u32, cfg.size as u32), (91, 120)]
            .into_iter()
            .enumerate()
        {
            let img = RgbImage::from_fn(w, h, |_, _| image::Rgb(rng.random()));
            let path = dir.path().join(format!("{i}.png"));
            img.save(&path).unwrap();
            images.push(img);
            sources.push(ImageSource::Path(path));
        }
        let from_files = embed_images(&model, &sources, &cfg, &dev).unwrap();
        let decoded = embed_decoded_images(&model, &images, &cfg, &dev).unwrap();
        assert_eq!(decoded.dims(), &[3, model.config().embed_dim]);
        let (a, b) = (
            from_files.to_vec2::<f32>().unwrap(),
            decoded.to_vec2::<f32>().unwrap(),
        );
        assert_eq!(a, b);
    }
}
