//! The error type of the video pipeline; every variant names the file at fault.

use std::path::PathBuf;

/// Errors of [`crate::video`](super); each names the file (and line, for
/// text formats) at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file could not be decoded as a video (corrupt, truncated, unsupported).
    #[error("{path}: cannot decode video: {message}")]
    Decode { path: PathBuf, message: String },
    /// The video decoded but holds no frame (an empty folder, a GIF without images).
    #[error("{path}: the video has no frames")]
    NoFrames { path: PathBuf },
    /// An annotation or manifest file is malformed; `line` is 1-based (0 when unknown).
    #[error("{path}:{line}: {message}")]
    Format {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// The ffmpeg or ffprobe program could not be started.
    #[error(
        "{path}: decoding this format needs the `{program}` program, which could not be run \
         ({source}); install ffmpeg (e.g. `apt-get install ffmpeg`) or set the program path \
         in DecodeOptions"
    )]
    ProgramMissing {
        program: PathBuf,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// ffmpeg or ffprobe ran and reported failure.
    #[error("{path}: `{program}` failed ({status}): {stderr}")]
    Program {
        program: PathBuf,
        path: PathBuf,
        status: String,
        stderr: String,
    },
    /// An annotation names a video that has no file.
    #[error("{annotations}: video `{id}` has no file (looked for {expected})")]
    MissingVideo {
        annotations: PathBuf,
        id: String,
        expected: PathBuf,
    },
    /// The decoder produced fewer frames than a sampled index needed.
    #[error("{path}: the stream ended after {decoded} frames, before a sampled frame")]
    ShortStream { path: PathBuf, decoded: usize },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("invalid video options: {0}")]
    Config(String),
}

/// The result type of the video pipeline.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
