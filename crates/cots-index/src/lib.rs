//! # cots-index: how is a gallery stored and searched?
//!
//! A persistent retrieval index: one row per item (an image, a video or a
//! text), its embedding, its metadata and a small thumbnail, kept in one
//! directory that opens in milliseconds and searches without loading the
//! vectors into RAM. Vectors are plain `f32` rows, unit-normalised by the
//! caller; similarity is the dot product. This crate knows nothing about
//! models: [`Model`] records which checkpoint the vectors came from so that
//! callers can refuse to mix embeddings of two checkpoints.
//!
//! ## On-disk layout (format version 1)
//! ```text
//! DIR/index.json                    the commit point: format version, Model, root,
//!                                   items in row order, per-row keys and thumbnail
//!                                   offsets, the files below, ANN params and tombstones
//! DIR/vectors.<G>.safetensors       one segment: tensor `vectors`, f32 [rows, dim]
//! DIR/vectors.<G>.i8.safetensors    optional int8 codes of that segment:
//!                                   `scales` f32 [rows], `codes` i8 [rows, dim]
//! DIR/thumbs.<G>.bin                thumbnails, packed end to end (offsets in index.json)
//! DIR/ann.<G>.usearch               optional approximate-search graph (usearch HNSW)
//! ```
//! `<G>` is a counter bumped for every data file written. Rows are the
//! concatenation of the segments in the order index.json lists them. See
//! docs/index-format.md for the full description.
//!
//! ## Writes are atomic
//! Every change writes its new files under fresh names (temp file, fsync,
//! rename), then replaces `index.json` the same way; only then are files the
//! new `index.json` no longer names deleted. A crash at any point leaves either
//! the old or the new index, never a mix: the old `index.json` names only old
//! files, which are untouched (thumbnails are appended past the end the old
//! `index.json` knows, never overwritten).
//!
//! ## Search
//! [`Mode::Exact`] scans the memory-mapped rows in parallel blocks (rayon) and
//! keeps a bounded heap per block; ties are broken by row, lower first, so
//! results are deterministic. [`Mode::Approximate`] walks an HNSW graph
//! (usearch, memory-mapped; docs/index-format.md says why this crate) built
//! on demand by [`Index::build_ann`]; rows added after the graph was built are
//! scanned exactly and merged in, and removed rows are skipped. [`Mode::Quantized`]
//! scans int8 codes ([`Index::quantize`]) for a short list and re-ranks it with
//! the `f32` rows. Filters ([`Filter`]) apply in every mode.
//!
//! Only one process should write an index at a time; any number may read it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

mod ann;
mod exact;
mod index;
mod mapped;
#[cfg(feature = "parquet")]
mod parquet_export;
mod quant;
mod store;

pub use ann::AnnParams;
pub use exact::dot;
pub use index::{Index, IndexInfo};

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The name of the commit-point file inside an index directory.
pub const META_FILE: &str = "index.json";

/// Errors of the index. Every variant names the file, id or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: damaged or truncated: {msg}", path.display())]
    Corrupt { path: PathBuf, msg: String },
    #[error("{}: written by index format version {found}; this build reads version {supported}", path.display())]
    Version {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{}: is not an empty directory; refusing to create an index there", .0.display())]
    NotEmpty(PathBuf),
    #[error("{}: holds no index ({META_FILE} is missing)", .0.display())]
    NotAnIndex(PathBuf),
    #[error("item id `{0}` is already in the index")]
    DuplicateId(String),
    #[error("no item with id `{0}`")]
    UnknownId(String),
    #[error("item `{id}`: {msg}")]
    BadItem { id: String, msg: String },
    #[error("{what}: expected {expected} values, got {got}")]
    Shape {
        what: String,
        expected: usize,
        got: usize,
    },
    #[error("{}: has no approximate-search graph; build one first (`cots index build --ann`, or `Index::build_ann`)", .0.display())]
    NoAnn(PathBuf),
    #[error("{}: has no int8 codes; quantize it first (`cots index build --int8`, or `Index::quantize`)", .0.display())]
    NotQuantized(PathBuf),
    #[error("approximate-search graph {}: {msg}", path.display())]
    Ann { path: PathBuf, msg: String },
    #[error("{}: Parquet export: {msg}", path.display())]
    Parquet { path: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
    pub(crate) fn corrupt(path: impl Into<PathBuf>, msg: impl Into<String>) -> Error {
        Error::Corrupt {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// What an item is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ItemKind {
    Image,
    Video,
    Text,
}

impl ItemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Video => "video",
            Self::Text => "text",
        }
    }
}

/// One row of the index, without its vector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Unique in the index and user-visible (a file stem, a manifest id).
    pub id: String,
    pub kind: ItemKind,
    /// The original file: absolute, or relative to [`Index::root`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Known captions (may be empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub captions: Vec<String>,
    /// Free-form key/value pairs, matched by [`Filter`] (e.g. `split`, `style`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// The checkpoint the vectors came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    /// Hash of the weights (`cots_train::inference::Run::weights_hash`).
    pub weights_hash: String,
    /// The run directory, as given when the index was built (informative).
    pub run: String,
    /// Width of every vector.
    pub dim: usize,
}

/// One search result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Hit {
    /// The row of the item at the time of the search.
    pub row: usize,
    pub id: String,
    /// The dot product of the query and the item's `f32` vector.
    pub score: f32,
}

/// Which items a search may return: all `equals` pairs must match the item's
/// metadata exactly. Empty: every item.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    pub equals: BTreeMap<String, String>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.equals.is_empty()
    }

    /// Whether `item` passes.
    pub fn matches(&self, item: &Item) -> bool {
        self.equals
            .iter()
            .all(|(k, v)| item.metadata.get(k) == Some(v))
    }
}

/// How to search.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Every row is scored: the true top k.
    #[default]
    Exact,
    /// The HNSW graph, with `ef` candidates kept during the walk (at least k;
    /// larger is slower and more accurate).
    Approximate { ef: usize },
    /// The int8 codes are scanned for the best `shortlist` rows, which are
    /// re-scored with their `f32` vectors (at least k are kept).
    Quantized { shortlist: usize },
}

/// A phrase for people (`cots index search` prints it above the results).
impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Exact => write!(f, "exact search"),
            Mode::Approximate { ef } => {
                write!(f, "approximate search, HNSW graph keeping {ef} candidates")
            }
            Mode::Quantized { shortlist } => {
                write!(f, "int8 scan for {shortlist} candidates, re-ranked exactly")
            }
        }
    }
}

/// Options of one search.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SearchOptions {
    pub mode: Mode,
    pub filter: Filter,
}
