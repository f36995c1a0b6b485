//! The error type of this crate.

use std::path::PathBuf;

/// Errors of the encoders crate; each names the file or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("tensor `{name}` is missing from {path}")]
    MissingTensor { name: String, path: PathBuf },
    #[error("tensor `{name}` in {path} has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(transparent)]
    Text(#[from] cots_text::Error),
    #[error("invalid config: {0}")]
    Config(String),
    #[error("variable `{name}`: {message}")]
    VarMismatch { name: String, message: String },
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
