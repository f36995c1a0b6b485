//! # cots-encoders: what turns an image or a text into a vector?
//!
//! The two towers of the two-stream model and everything that builds them:
//! [`vit`] and [`bert`] (Hugging Face architectures and tensor names),
//! [`tokenizer`], [`two_stream`] (towers + projections + temperature, with
//! presets), [`momentum`] (EMA copies), [`dvae`] (the visual tokenizer for
//! masked vision modeling), [`cross`] (the single-stream cross-encoder
//! baseline), [`decomposed`] (VLDeformer: the cross-encoder's stack run on
//! one modality at a time), [`dual`] (the interface both two-encoder models
//! offer to retrieval), [`efficientnet`] (a frozen EfficientNet-Lite0
//! ImageNet backbone for the image tower), [`torch_file`] (reading PyTorch
//! `.pth` checkpoints, legacy and zip formats) and [`weights`] (loading
//! checkpoints into trainable variables).

pub mod bert;
pub mod cross;
pub mod decomposed;
pub mod dual;
pub mod dvae;
pub mod efficientnet;
mod error;
mod files;
pub mod momentum;
pub mod temporal;
pub mod torch_file;
pub mod two_stream;
pub mod vit;
pub mod weights;

pub use error::{Error, Result};
