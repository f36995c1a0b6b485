//! # cots-infer: how does a query become a vector?
//!
//! The [`QueryEncoder`] trait: texts and decoded images in, unit-normalised
//! rows out. It sits below both `cots-train`, which implements it for a
//! trained run, and `cots-serve`, which only calls it, so the search service
//! never imports the training crate and its tests can put any model (a
//! counter, a slow one, a broken one) in the run's place.

use cots_data::image_io::Background;
use image::RgbImage;

/// A failure to embed queries: what was being embedded, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("encoding {what}: {message}")]
pub struct Error {
    /// The queries, e.g. "3 text queries".
    pub what: String,
    pub message: String,
}

impl Error {
    pub fn new(what: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self {
            what: what.into(),
            message: message.to_string(),
        }
    }
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// A model that embeds queries into an index's space. Calls block (they run
/// the model); a server makes them off its async workers.
pub trait QueryEncoder: Send + Sync + 'static {
    /// Unit-normalised embeddings of `texts`, row-major `[texts.len(), dim]`.
    fn embed_texts(&self, texts: &[String]) -> Result<Vec<f32>>;
    /// Unit-normalised embeddings of decoded images, row-major
    /// `[images.len(), dim]`.
    fn embed_images(&self, images: &[RgbImage]) -> Result<Vec<f32>>;
    /// Width of every embedding.
    fn dim(&self) -> usize;
    /// Hash of the weights, compared with an index's.
    fn weights_hash(&self) -> &str;
    /// How errors and `/api/info` name the model (the run directory).
    fn describe(&self) -> String;
    /// The colour an uploaded image's transparent pixels are composited
    /// over before embedding: the one the model was trained with.
    fn background(&self) -> Background {
        Background::WHITE
    }
}
