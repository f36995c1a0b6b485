//! # cots-datasets: how is a benchmark built from published packages?
//!
//! Builders that read unpacked npm packages (fetched and checksummed by
//! `cargo xtask data`), render or cut every item, and write what the runtime
//! crates read: a JSONL manifest ([`cots_data::manifest`]), per-style test
//! galleries, and the run configs that name them, serialised from
//! [`cots_train::config`]'s types rather than formatted by hand.
//!
//! - [`emoji`]: the multi-style emoji benchmark (docs/data-emoji.md).
//! - [`emoji_video`]: its animated twin, text-to-video on animated emoji.
//!
//! The builders fail for the data crate's reasons (a file, an image, a
//! manifest line), so they report [`cots_data::Error`].

pub mod emoji;
pub mod emoji_video;

use std::path::Path;

use cots_data::{Error, Result};
use cots_train::config::{DataKind, DataSection};

/// A run config holding only a `[data]` section that reads `path` as
/// `kind`, with `comment` lines on top: what `cots eval --data-config` takes.
/// `frames` makes it video data (the evaluated run's own frame settings
/// decide what the model sees; this only names a count).
pub(crate) fn data_config(
    comment: &str,
    kind: DataKind,
    path: &Path,
    frames: Option<usize>,
) -> Result<String> {
    #[derive(serde::Serialize)]
    struct DataOnly<'a> {
        data: &'a DataSection,
    }
    let mut data = DataSection {
        kind,
        path: Some(path.to_path_buf()),
        ..DataSection::default()
    };
    data.image.frames = frames;
    let body = toml::to_string_pretty(&DataOnly { data: &data })
        .map_err(|e| Error::Config(format!("cannot serialise a data config: {e}")))?;
    let mut text: String = comment.lines().map(|l| format!("# {l}\n")).collect();
    text.push_str(&body);
    Ok(text)
}
