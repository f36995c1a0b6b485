//! # cots-train: how is a model trained, checkpointed and resumed?
//!
//! - [`config`]: the run config (TOML), validated before any work;
//! - [`model`]: the trainable system (online and momentum towers, objectives,
//!   frozen visual tokenizer) and the forward half of a step;
//! - [`frozen`]: features of frozen towers (locked text, pretrained CNN)
//!   remembered per input;
//! - [`train_loop`]: the one training loop over a [`train_loop::Task`]:
//!   accumulation, clipping, AdamW, EMA, logging, validation, atomic
//!   checkpoints, exact resume, SIGINT/SIGTERM;
//! - [`trainer`]: the COTS task (and `Trainer`, the loop over it);
//! - [`run_dir`]: the layout of a run folder, the only code naming its files;
//! - [`optim`], [`schedule`]: AdamW with decay groups, warm-up + cosine;
//! - [`checkpoint`], [`metrics`]: what is written to disk;
//! - [`inference`]: loading a trained run to evaluate, embed and search;
//! - [`cross`]: the single-stream baseline: the ITM task with mined hard
//!   negatives, all-pairs scoring, two-stage re-ranking;
//! - [`decompose`]: VLDeformer: the single-stream model taken apart into
//!   two encoders, a task trained with bimodal negatives;
//! - [`compare`]: single-stream, decomposed, COTS and the hybrid on one
//!   test set: recall, time, speed ratio, recall drop.

pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod cross;
pub mod decompose;
pub mod frozen;
pub mod inference;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod query;
pub mod run_dir;
pub mod schedule;
pub mod tokenizer_train;
pub mod train_loop;
pub mod trainer;

use std::path::PathBuf;

/// Errors of training; each names the file or variable at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Config(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("{0}")]
    NonFinite(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Encoders(#[from] cots_encoders::Error),
    #[error(transparent)]
    Text(#[from] cots_text::Error),
    #[error(transparent)]
    Objectives(#[from] cots_objectives::Error),
    #[error(transparent)]
    Data(#[from] cots_data::Error),
    #[error(transparent)]
    Eval(#[from] cots_eval::Error),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
