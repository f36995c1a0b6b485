//! # cots-data: where do the image-text pairs come from?
//!
//! - [`Dataset`]: images with ids, captions, splits and an optional category;
//!   each caption of an image is one training pair, and captions of one image
//!   share its id (the objectives treat them as positives of each other).
//! - [`synthetic`]: the embedded, seeded dataset the demo trains on.
//! - [`manifest`]: the JSONL manifest format users already have.
//! - [`image_io`]: decoding (PNG, JPEG, WebP, GIF, SVG) and transforms.
//! - [`masking`]: MLM and blockwise patch masking, seeded.
//! - [`loader`]: the bounded, prefetching, resumable batch loader.
//! - [`video`]: text-to-video: frame sources (folders, GIF, WebP, ffmpeg), TSN
//!   sampling, MSR-VTT / JSONL video annotations, the synthetic order-sensitive
//!   clip set.

#[doc(hidden)]
pub mod fuzzing;
pub mod image_io;
pub mod loader;
pub mod manifest;
pub mod masking;
pub mod synthetic;
pub mod video;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use loader::{Batch, Loader, LoaderConfig, LoaderPosition};

/// Errors of the data crate; each names the file (and line) at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Manifest {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: cannot decode image: {message}")]
    Image { path: PathBuf, message: String },
    /// An error about an item's image, with the manifest entry it came from.
    #[error("{origin}: {source}")]
    Entry {
        origin: Origin,
        #[source]
        source: Box<Error>,
    },
    #[error("item {id} ({origin}): caption {index} is empty")]
    EmptyCaption {
        id: u32,
        origin: String,
        index: usize,
    },
    #[error("the {split:?} split is empty")]
    EmptySplit { split: Split },
    #[error("invalid data config: {0}")]
    Config(String),
    #[error("the loader's worker stopped unexpectedly")]
    WorkerGone,
    #[error(transparent)]
    Video(#[from] video::Error),
    #[error(transparent)]
    Text(#[from] cots_text::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Dataset split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl From<video::Split> for Split {
    fn from(s: video::Split) -> Self {
        match s {
            video::Split::Train => Split::Train,
            video::Split::Val => Split::Val,
            video::Split::Test => Split::Test,
        }
    }
}

/// Where an item's pixels come from: an image, or a video (a clip of frames).
#[derive(Clone, Debug, PartialEq)]
pub enum ImageSource {
    /// A file (PNG, JPEG, WebP, GIF, SVG).
    Path(PathBuf),
    /// A synthetic scene rendered with the given jitter seed.
    Synthetic { scene: synthetic::Scene, seed: u64 },
    /// A video: a file ffmpeg reads, an animated GIF or WebP, or a folder of
    /// frames (see [`video::decode`]).
    Video(PathBuf),
    /// A clip of the embedded synthetic video set, rendered on demand.
    SyntheticClip {
        clip: Box<video::synthetic::ClipSpec>,
        set: video::synthetic::SyntheticVideoConfig,
    },
}

impl Item {
    /// `err` about this item's image, naming the manifest entry when the
    /// item came from one.
    pub fn locate(&self, err: Error) -> Error {
        match &self.origin {
            Some(origin) => Error::Entry {
                origin: origin.clone(),
                source: Box::new(err),
            },
            None => err,
        }
    }
}

impl ImageSource {
    /// How errors and search results name this image.
    pub fn describe(&self) -> String {
        match self {
            ImageSource::Path(p) => p.display().to_string(),
            ImageSource::Synthetic { seed, .. } => format!("synthetic scene #{seed}"),
            ImageSource::Video(p) => p.display().to_string(),
            ImageSource::SyntheticClip { clip, .. } => format!("synthetic clip {}", clip.id),
        }
    }

    /// Whether the source is a video rather than a still image.
    pub fn is_video(&self) -> bool {
        matches!(
            self,
            ImageSource::Video(_) | ImageSource::SyntheticClip { .. }
        )
    }
}

/// One image with its captions.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    /// Image id; all captions of the image share it.
    pub id: u32,
    pub source: ImageSource,
    pub captions: Vec<String>,
    pub split: Split,
    pub category: Option<String>,
    /// The manifest entry the item was read from, when it came from one.
    pub origin: Option<Origin>,
}

/// Where a manifest item was read: the file, and the entry's line (JSONL)
/// or position (a Karpathy file's `images[]`, which has no line per entry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub manifest: PathBuf,
    /// 1-based line of the entry, where the format has one entry a line.
    pub line: Option<usize>,
    /// 0-based position of the entry among the file's items.
    pub index: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}", self.manifest.display()),
            None => write!(f, "{}: images[{}]", self.manifest.display(), self.index),
        }
    }
}

/// A list of items.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dataset {
    pub items: Vec<Item>,
}

impl Dataset {
    /// The embedded synthetic dataset, all splits.
    pub fn synthetic(cfg: &synthetic::SyntheticConfig) -> Self {
        let mut items = Vec::new();
        for (split, n) in [
            (Split::Train, cfg.train),
            (Split::Val, cfg.val),
            (Split::Test, cfg.test),
        ] {
            for scene in synthetic::scenes(cfg, split, n) {
                let id = items.len() as u32;
                items.push(Item {
                    id,
                    captions: scene.captions(),
                    source: ImageSource::Synthetic {
                        scene,
                        seed: cfg.seed ^ (u64::from(id) << 20),
                    },
                    split,
                    category: None,
                    origin: None,
                });
            }
        }
        Self { items }
    }

    /// The embedded synthetic video set (all splits): one item per clip,
    /// with its captions; a clip and its time-reversed twin share a split.
    ///
    /// Captions name a concept (shape, colour, event), not a drawing, so the
    /// drawings of one concept share an item id (the objectives treat them
    /// as positives of each other), and the validation and test splits keep
    /// one drawing per concept (variant 0): a second one would be a
    /// duplicate no model could rank below the first.
    pub fn synthetic_video(cfg: &video::synthetic::SyntheticVideoConfig) -> Self {
        let set = video::synthetic::SyntheticVideoSet::new(cfg);
        // The first caption names the concept (it differs between any two).
        let mut concepts: std::collections::HashMap<&str, u32> = Default::default();
        let items = set
            .clips()
            .iter()
            .filter(|clip| clip.split == video::Split::Train || clip.variant == 0)
            .map(|clip| Item {
                id: {
                    let next = concepts.len() as u32;
                    *concepts.entry(clip.captions[0].as_str()).or_insert(next)
                },
                captions: clip.captions.clone(),
                split: clip.split.into(),
                category: Some(clip.event.family().to_string()),
                origin: None,
                source: ImageSource::SyntheticClip {
                    clip: Box::new(clip.clone()),
                    set: cfg.clone(),
                },
            })
            .collect();
        Self { items }
    }

    /// Videos resolved from a video manifest or MSR-VTT annotations, one
    /// item per video (ids in record order).
    pub fn from_videos(records: &[video::VideoRecord]) -> Self {
        let items = records
            .iter()
            .enumerate()
            .map(|(i, r)| Item {
                id: i as u32,
                source: ImageSource::Video(r.video.clone()),
                captions: r.captions.clone(),
                split: r.split.into(),
                category: None,
                origin: None,
            })
            .collect();
        Self { items }
    }

    /// For sets of synthetic clips: the index of each item's time-reversed
    /// twin among these items, or `None` when some item is not a synthetic
    /// clip or its twin is not here.
    pub fn twins(&self) -> Option<Vec<usize>> {
        let index: std::collections::HashMap<&str, usize> = self
            .items
            .iter()
            .enumerate()
            .filter_map(|(i, it)| match &it.source {
                ImageSource::SyntheticClip { clip, .. } => Some((clip.id.as_str(), i)),
                _ => None,
            })
            .collect();
        self.items
            .iter()
            .map(|it| match &it.source {
                ImageSource::SyntheticClip { clip, .. } => index.get(clip.twin.as_str()).copied(),
                _ => None,
            })
            .collect()
    }

    /// The items of one split (ids are kept).
    pub fn split(&self, split: Split) -> Result<Self> {
        let items: Vec<Item> = self
            .items
            .iter()
            .filter(|i| i.split == split)
            .cloned()
            .collect();
        if items.is_empty() {
            return Err(Error::EmptySplit { split });
        }
        Ok(Self { items })
    }

    /// Every (item index, caption index): one training pair each.
    pub fn pairs(&self) -> Vec<(usize, usize)> {
        self.items
            .iter()
            .enumerate()
            .flat_map(|(i, it)| (0..it.captions.len()).map(move |c| (i, c)))
            .collect()
    }

    /// The evaluation view: every caption, and the index of its item.
    pub fn queries(&self) -> (Vec<String>, Vec<usize>) {
        let mut texts = Vec::new();
        let mut targets = Vec::new();
        for (i, it) in self.items.iter().enumerate() {
            for c in &it.captions {
                texts.push(c.clone());
                targets.push(i);
            }
        }
        (texts, targets)
    }

    /// Injects noisy correspondences, for robustness experiments such as the
    /// adaptive momentum filter's: `round(rate * n)` items chosen by `seed`
    /// pass their captions around a cycle (each chosen item gets the
    /// captions of the next), so every chosen image is paired with another
    /// image's text, as in noisy-correspondence studies (NCR, Huang et al.,
    /// NeurIPS 2021). Returns the ids of the items whose captions changed.
    ///
    /// Errors: `rate` outside `[0, 1]`.
    pub fn with_noisy_pairs(&mut self, rate: f64, seed: u64) -> Result<Vec<u32>> {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        if !(0.0..=1.0).contains(&rate) {
            return Err(Error::Config(format!(
                "noisy pair rate {rate} is outside [0, 1]"
            )));
        }
        let k = (rate * self.items.len() as f64).round() as usize;
        if k < 2 {
            return Ok(Vec::new());
        }
        let mut order: Vec<usize> = (0..self.items.len()).collect();
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let chosen = &order[..k];
        let first = self.items[chosen[0]].captions.clone();
        for w in chosen.windows(2) {
            self.items[w[0]].captions = self.items[w[1]].captions.clone();
        }
        self.items[chosen[k - 1]].captions = first;
        let mut ids: Vec<u32> = chosen.iter().map(|&i| self.items[i].id).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Checks that no caption is empty, naming the first offender.
    pub fn validate(&self) -> Result<()> {
        for it in &self.items {
            if let Some(index) = it.captions.iter().position(|c| c.trim().is_empty()) {
                return Err(Error::EmptyCaption {
                    id: it.id,
                    origin: it.source.describe(),
                    index,
                });
            }
        }
        Ok(())
    }
}
