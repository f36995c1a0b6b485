//! # Where do video-text pairs come from? (text-to-video retrieval)
//!
//! COTS (Lu et al., CVPR 2022) extends to text-to-video retrieval by encoding
//! a few sampled frames per video with the image stream and aggregating them
//! over time (`cots_encoders::temporal`). This module supplies the frames and
//! captions:
//!
//! - [`decode`]: frame folders, animated GIF/WebP, and MP4/WebM/AVI through
//!   the `ffmpeg` program, keeping only the sampled frames in memory;
//! - [`sample`]: TSN segment sampling, random in training and centred in
//!   evaluation, a pure function of `(frame_count, n, mode)`;
//! - [`msrvtt`]: MSR-VTT annotations (JSON, the 1k-A test CSV, the 9k/7k
//!   training lists) and the JSONL video manifest;
//! - [`synthetic`]: an embedded set of moving-shape clips whose captions
//!   depend on temporal order, with time-reversed hard negatives;
//! - [`encode`]: animated GIF/WebP writers for exports, tests and benchmarks.
//!
//! Errors are [`Error`], each naming the file (and line) at fault.

pub mod decode;
pub mod encode;
mod error;
pub mod msrvtt;
pub mod sample;
pub mod synthetic;

pub use decode::{count_frames, decode_frames, decode_sampled, Clip, DecodeOptions, SourceKind};
pub use error::{Error, Result};
/// The frame type of a [`Clip`], re-exported so callers need no `image` dependency.
pub use image::RgbImage;
pub use msrvtt::{MissingPolicy, Resolved, Skipped, Split, VideoRecord};
pub use sample::{sample_indices, SampleMode};
