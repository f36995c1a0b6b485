//! What every two-encoder retrieval model offers: an image alone to a
//! vector, a text alone to a vector, in one shared L2-normalised space.
//! Because neither side sees the other, a gallery is embedded once and a
//! query costs one encoder pass plus a dot product.
//!
//! Implemented by COTS's two towers ([`crate::two_stream::TwoStream`]) and by
//! VLDeformer's decomposed single-stream model
//! ([`crate::decomposed::Decomposed`]); evaluation, embedding and search take
//! either.

use candle_core::Tensor;

use crate::two_stream::TwoStream;
use crate::Result;

/// Inference-mode (no dropout) embedding of images and texts.
pub trait DualEncoder {
    /// # Shapes
    /// - `pixels`: `[B, C, H, W]`, or `[B, T, C, H, W]` clips for a model
    ///   with a temporal head (a COTS video model); output `[B, E]`,
    ///   L2-normalised.
    fn embed_images(&self, pixels: &Tensor) -> Result<Tensor>;
    /// # Shapes
    /// - `ids`, `mask`: `[B, L]` (mask 1 keep, 0 pad); output `[B, E]`.
    fn embed_texts(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor>;
    /// Longest tokenised text, `[CLS]` and `[SEP]` included.
    fn max_text_len(&self) -> usize;
}

impl DualEncoder for TwoStream {
    fn embed_images(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.encode_image(pixels, None, None)?.embed)
    }
    fn embed_texts(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        Ok(self.encode_text(ids, Some(mask), None)?.embed)
    }
    fn max_text_len(&self) -> usize {
        self.config().max_text_len
    }
}
