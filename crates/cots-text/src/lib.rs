//! Which token ids does a text become? WordPiece tokenisation for the BERT
//! text stream, below both the data pipeline (which masks and batches
//! tokens) and the encoders (which embed them), so that neither has to
//! import the other.

mod tokenizer;

pub use tokenizer::*;

use std::path::PathBuf;

/// Errors of tokenisation; each names the file at fault where there is one.
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
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
