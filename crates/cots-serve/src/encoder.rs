//! What turns a query into a vector? The [`QueryEncoder`] trait, and its
//! implementation for a trained run ([`cots_train::inference::Run`]).
//!
//! The service talks to the model only through this trait, so tests can
//! count, slow down or break the encoder without a different server.

use candle_core::Tensor;
use cots_data::image_io::Background;
use cots_train::inference::Run;
use image::RgbImage;

use crate::{Error, Result};

/// A model that embeds queries into the index's space. Calls block (they run
/// the model); the service makes them off the async workers.
pub trait QueryEncoder: Send + Sync + 'static {
    /// Unit-normalised embeddings of `texts`, row-major `[texts.len(), dim]`.
    fn embed_texts(&self, texts: &[String]) -> Result<Vec<f32>>;
    /// Unit-normalised embeddings of decoded images, row-major
    /// `[images.len(), dim]`.
    fn embed_images(&self, images: &[RgbImage]) -> Result<Vec<f32>>;
    /// Width of every embedding.
    fn dim(&self) -> usize;
    /// Hash of the weights, compared with the index's.
    fn weights_hash(&self) -> &str;
    /// How errors and `/api/info` name the model (the run directory).
    fn describe(&self) -> String;
    /// The colour an uploaded image's transparent pixels are composited
    /// over before embedding: the one the model was trained with.
    fn background(&self) -> Background {
        Background::WHITE
    }
}

/// A trained run as the service's encoder.
pub struct RunEncoder {
    run: Run,
    dim: usize,
}

impl RunEncoder {
    /// Wraps `run`, learning its embedding width from one probe query (which
    /// also warms the model up before the first real request).
    pub fn new(run: Run) -> Result<Self> {
        let probe = run
            .embed_texts(&["a probe query".to_string()])
            .map_err(|e| encode_error("the probe query", e))?;
        let dim = probe.dims().last().copied().unwrap_or(0);
        Ok(Self { run, dim })
    }

    pub fn run(&self) -> &Run {
        &self.run
    }
}

fn encode_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Encode {
        what: what.to_string(),
        message: e.to_string(),
    }
}

fn rows(t: Tensor, what: &str) -> Result<Vec<f32>> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| encode_error(what, e))
}

impl QueryEncoder for RunEncoder {
    fn embed_texts(&self, texts: &[String]) -> Result<Vec<f32>> {
        let what = || format!("{} text queries", texts.len());
        let t = self
            .run
            .embed_texts(texts)
            .map_err(|e| encode_error(&what(), e))?;
        rows(t, &what())
    }

    fn embed_images(&self, images: &[RgbImage]) -> Result<Vec<f32>> {
        let what = || format!("{} query images", images.len());
        let t = self
            .run
            .embed_decoded_images(images)
            .map_err(|e| encode_error(&what(), e))?;
        rows(t, &what())
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn weights_hash(&self) -> &str {
        &self.run.weights_hash
    }

    fn describe(&self) -> String {
        self.run.dir.display().to_string()
    }

    fn background(&self) -> Background {
        self.run.image_config().background
    }
}
