//! A trained run as a [`QueryEncoder`]: what the search service embeds
//! queries with. The trait lives below this crate (`cots-infer`), so the
//! service never imports training code.

use candle_core::Tensor;
use cots_data::image_io::Background;
use cots_infer::QueryEncoder;
use image::RgbImage;

use crate::inference::Run;

/// A trained run as a query encoder (what `cots serve` searches with).
pub struct RunEncoder {
    run: Run,
    dim: usize,
}

impl RunEncoder {
    /// Wraps `run`, learning its embedding width from one probe query (which
    /// also warms the model up before the first real request).
    pub fn new(run: Run) -> cots_infer::Result<Self> {
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

fn encode_error(what: &str, e: impl std::fmt::Display) -> cots_infer::Error {
    cots_infer::Error::new(what, e)
}

fn rows(t: Tensor, what: &str) -> cots_infer::Result<Vec<f32>> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| encode_error(what, e))
}

impl QueryEncoder for RunEncoder {
    fn embed_texts(&self, texts: &[String]) -> cots_infer::Result<Vec<f32>> {
        let what = || format!("{} text queries", texts.len());
        let t = self
            .run
            .embed_texts(texts)
            .map_err(|e| encode_error(&what(), e))?;
        rows(t, &what())
    }

    fn embed_images(&self, images: &[RgbImage]) -> cots_infer::Result<Vec<f32>> {
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
