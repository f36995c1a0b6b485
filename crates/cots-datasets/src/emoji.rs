//! The multi-style emoji benchmark: a real image-text retrieval set built from
//! openly licensed emoji artwork published on npm.
//!
//! About 1,950 base emoji concepts, each drawn in up to thirteen independent
//! art styles, with CLDR names and keywords as text. `cargo xtask data emoji`
//! downloads and verifies the packages; [`build`] turns the unpacked packages
//! into a JSONL manifest ([`cots_data::manifest`]) and per-style test galleries.
//!
//! ## Sources, joined by codepoint
//! - Concepts and text: `emojibase-data` (`en/data.json`: the CLDR `label`,
//!   `tags`, group and subgroup; skin-tone variants, listed under `skins`, are
//!   left out), `emoji-datasource` (`emoji.json`: `short_names`,
//!   `subcategory`) and `openmoji` (`data/openmoji.json`: `annotation`,
//!   `tags`, `openmoji_tags`). Every key goes through
//!   [`normalize_codepoints`]: lowercase hex of at least four digits, joined
//!   by `-`, with the variation selector `fe0f` removed.
//! - Artwork: the [`STYLES`] table. Raster files (PNG, WebP) are composited
//!   over white; SVG files and Iconify bodies are rendered with resvg through
//!   [`cots_data::image_io`]. Iconify sets are matched through `chars.json`, then
//!   by the slug of the label (`flag-for-…` for flags), then by the slugs of
//!   the emoji-datasource short names; each icon serves one concept at most.
//!
//! ## Captions, families and the split
//! Captions ([`captions`]): the label; the label plus the keywords not already
//! in it (`hibiscus: flower, plant`); the label plus the OpenMoji tags; the
//! short name with spaces plus the subcategory (`hibiscus, plant flower`).
//! Empty and repeated captions are dropped, and so is any keyword or caption
//! that names an art style: the text describes the concept, never the style.
//!
//! A split that cannot be memorised ([`family`], [`split_of_family`]):
//! concepts are grouped into families by their label without gender words
//! (man, woman, person, …), the skin-tone suffix and the `facing right`
//! direction, so `man running` and `woman running facing right` are one
//! family. A family goes whole to test (4 in 20), val (1 in 20) or train, by
//! the FNV-1a hash of its name. Flags, keycaps, regional indicators and
//! components have reserved family names in brackets (`[flag]`) that always
//! go to train. The held-out styles (`Style::held_out`) never appear in
//! training at all.
//!
//! ## Output layout
//! ```text
//! out/
//!   manifest.jsonl                   train: train concepts x training styles;
//!                                    val, test: their concepts in the default style
//!   test-<style>.jsonl               one image per test concept of that style,
//!                                    every style (held-out ones too), split "test"
//!   eval-<style>.toml                a run config whose data is test-<style>.jsonl,
//!                                    for `cots eval --data-config`
//!   images/<style>/<codepoints>.png  RGB, size x size, over white
//!   stats.json                       counts per split and style, held-out styles,
//!                                    package versions and checksums, failures
//!   LICENSES.md                      license and attribution per style and source
//! ```
//! Every line is `{"image": "images/<style>/<key>.png", "captions": [...],
//! "split": ..., "id": <concept index>}`; paths are relative to the manifest.
//! The id names the concept, so the images of one concept in different styles
//! share it and the objectives treat them as positives of each other.
//!
//! The build is idempotent: an image already on disk at the requested size is
//! kept, every file is written under a temporary name and renamed, and the
//! manifests are rewritten each time (they take milliseconds).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use image::RgbImage;
use rayon::prelude::*;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use cots_data::{image_io, Error, Result, Split};

/// The npm package with the concepts, CLDR labels and keywords.
pub const EMOJIBASE: &str = "emojibase-data";
/// The npm package with short names and subcategories.
pub const DATASOURCE: &str = "emoji-datasource";
/// The npm package with OpenMoji tags (and the `openmoji` style's artwork).
pub const OPENMOJI: &str = "openmoji";

/// The style whose images make the `val` and `test` items of `manifest.jsonl`.
pub const DEFAULT_TEST_STYLE: &str = "google";

/// The file, next to the unpacked packages, where `cargo xtask data emoji`
/// records `name version integrity` per line.
pub const INTEGRITY_FILE: &str = "integrity.txt";

/// At most this many keywords or tags in one caption.
const MAX_KEYWORDS: usize = 6;

/// Words that name an artwork vendor or style; a keyword holding one is
/// dropped so that no caption gives the style away.
const STYLE_WORDS: &[&str] = &[
    "google",
    "noto",
    "twitter",
    "twemoji",
    "openmoji",
    "fluent",
    "microsoft",
    "lobehub",
    "iconify",
    "emojione",
    "joypixels",
    "streamline",
    "fxemoji",
    "firefox",
    "mozilla",
];

/// Words a family name leaves out: who is shown, not what is done.
const PERSON_WORDS: &[&str] = &[
    "man", "woman", "men", "women", "person", "people", "boy", "girl", "male", "female", "adult",
    "child",
];

/// The skin tones of the `<tone> skin tone` label suffix.
const SKIN_TONES: &[&str] = &["light", "medium-light", "medium", "medium-dark", "dark"];

/// Where a style's artwork lies in its package.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Artwork {
    /// One file per emoji in `dir`, named by its codepoints (`1f600.png`,
    /// `1F600.svg`, `39-fe0f-20e3.webp`). SVG files are rendered; raster files
    /// are composited over white.
    Files {
        dir: &'static str,
        ext: &'static str,
    },
    /// An Iconify JSON set (`icons.json`, `chars.json`). `mono` sets draw in
    /// `currentColor`, which is set to black.
    Iconify { mono: bool },
}

/// One art style of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Style {
    /// The folder name under `images/` and the `test-<name>.jsonl` suffix.
    pub name: &'static str,
    /// The npm package (a folder of the same name under `--packages`).
    pub package: &'static str,
    pub artwork: Artwork,
    /// Never in training: evaluated only, to measure style generalisation.
    pub held_out: bool,
    /// SPDX identifier of the artwork's license.
    pub license: &'static str,
    pub attribution: &'static str,
}

/// The openly licensed styles. Iconify's `noto` and `twemoji` sets repeat the
/// `google` and `twitter` artwork and are left out.
pub const STYLES: &[Style] = &[
    Style {
        name: "google",
        package: "emoji-datasource-google",
        artwork: Artwork::Files {
            dir: "img/google/64",
            ext: "png",
        },
        held_out: false,
        license: "Apache-2.0",
        attribution: "Noto Emoji by Google Inc. (https://github.com/googlefonts/noto-emoji), \
                      packaged by emoji-datasource (https://github.com/iamcal/emoji-data)",
    },
    Style {
        name: "twitter",
        package: "emoji-datasource-twitter",
        artwork: Artwork::Files {
            dir: "img/twitter/64",
            ext: "png",
        },
        held_out: true,
        license: "CC-BY-4.0",
        attribution: "Twemoji graphics by Twitter, Inc. and other contributors \
                      (https://github.com/jdecked/twemoji), packaged by emoji-datasource \
                      (https://github.com/iamcal/emoji-data)",
    },
    Style {
        name: "openmoji",
        package: "openmoji",
        artwork: Artwork::Files {
            dir: "color/svg",
            ext: "svg",
        },
        held_out: true,
        license: "CC-BY-SA-4.0",
        attribution: "All emojis designed by OpenMoji - the open-source emoji and icon project \
                      (https://openmoji.org). License: CC BY-SA 4.0",
    },
    Style {
        name: "fluent-3d",
        package: "@lobehub/fluent-emoji-3d",
        artwork: Artwork::Files {
            dir: "assets",
            ext: "webp",
        },
        held_out: false,
        license: "MIT",
        attribution: "Fluent Emoji by Microsoft Corporation \
                      (https://github.com/microsoft/fluentui-emoji), 3D renders packaged by \
                      LobeHub (https://github.com/lobehub/fluent-emoji)",
    },
    Style {
        name: "fluent",
        package: "@iconify-json/fluent-emoji",
        artwork: Artwork::Iconify { mono: false },
        held_out: false,
        license: "MIT",
        attribution: "Fluent Emoji by Microsoft Corporation \
                      (https://github.com/microsoft/fluentui-emoji), via Iconify",
    },
    Style {
        name: "fluent-flat",
        package: "@iconify-json/fluent-emoji-flat",
        artwork: Artwork::Iconify { mono: false },
        held_out: false,
        license: "MIT",
        attribution: "Fluent Emoji Flat by Microsoft Corporation \
                      (https://github.com/microsoft/fluentui-emoji), via Iconify",
    },
    Style {
        name: "fluent-hc",
        package: "@iconify-json/fluent-emoji-high-contrast",
        artwork: Artwork::Iconify { mono: true },
        held_out: false,
        license: "MIT",
        attribution: "Fluent Emoji High Contrast by Microsoft Corporation \
                      (https://github.com/microsoft/fluentui-emoji), via Iconify",
    },
    Style {
        name: "noto-v1",
        package: "@iconify-json/noto-v1",
        artwork: Artwork::Iconify { mono: false },
        held_out: false,
        license: "Apache-2.0",
        attribution: "Noto Emoji (v1) by Google Inc. (https://github.com/googlefonts/noto-emoji), \
                      via Iconify",
    },
    Style {
        name: "emojione",
        package: "@iconify-json/emojione",
        artwork: Artwork::Iconify { mono: false },
        held_out: false,
        license: "CC-BY-4.0",
        attribution: "Emoji One (Colored) by Emoji One (https://github.com/EmojiTwo/emojitwo), \
                      via Iconify",
    },
    Style {
        name: "emojione-v1",
        package: "@iconify-json/emojione-v1",
        artwork: Artwork::Iconify { mono: false },
        held_out: false,
        license: "CC-BY-SA-4.0",
        attribution: "Emoji One (v1) by Emoji One \
                      (https://github.com/joypixels/emojione-legacy), via Iconify",
    },
    Style {
        name: "emojione-mono",
        package: "@iconify-json/emojione-monotone",
        artwork: Artwork::Iconify { mono: true },
        held_out: false,
        license: "CC-BY-4.0",
        attribution: "Emoji One (Monotone) by Emoji One (https://github.com/EmojiTwo/emojitwo), \
                      via Iconify",
    },
    Style {
        name: "streamline",
        package: "@iconify-json/streamline-emojis",
        artwork: Artwork::Iconify { mono: false },
        held_out: false,
        license: "CC-BY-4.0",
        attribution: "Streamline Emojis by Streamline \
                      (https://github.com/webalys-hq/streamline-vectors), via Iconify",
    },
    Style {
        name: "fxemoji",
        package: "@iconify-json/fxemoji",
        artwork: Artwork::Iconify { mono: false },
        held_out: false,
        license: "Apache-2.0",
        attribution: "Firefox OS Emoji by Mozilla (https://github.com/mozilla/fxemoji), \
                      via Iconify",
    },
];

/// The text packages: name, license, attribution.
pub(crate) const TEXT_SOURCES: &[(&str, &str, &str)] = &[
    (
        EMOJIBASE,
        "MIT",
        "Emojibase by Miles Johnson (https://emojibase.dev): labels (CLDR) and keywords",
    ),
    (
        DATASOURCE,
        "MIT",
        "emoji-data by Cal Henderson (https://github.com/iamcal/emoji-data): short names \
         and subcategories",
    ),
    (
        OPENMOJI,
        "CC-BY-SA-4.0",
        "OpenMoji (https://openmoji.org): tags in the OpenMoji-tag captions",
    ),
];

// ---------------------------------------------------------------------------
// Codepoints

/// The join key of an emoji: lowercase hex codepoints of at least four digits,
/// joined by `-`, with `fe0f` removed. Accepts `-`, `_` or space between
/// codepoints and any case; `None` for anything that is not hex codepoints
/// (or is `fe0f` alone).
pub fn normalize_codepoints(hex: &str) -> Option<String> {
    let mut parts = Vec::new();
    for p in hex.trim().split(['-', '_', ' ']) {
        if p.is_empty() || p.len() > 6 || !p.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let cp = u32::from_str_radix(p, 16).ok()?;
        char::from_u32(cp)?;
        if cp != 0xfe0f {
            parts.push(format!("{cp:04x}"));
        }
    }
    (!parts.is_empty()).then(|| parts.join("-"))
}

// ---------------------------------------------------------------------------
// Text sources and the join

/// One file's text and the path that names it in errors.
#[derive(Clone, Debug)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

impl Source {
    /// Reads a file.
    pub fn read(path: PathBuf) -> Result<Self> {
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Self { path, text })
    }
}

/// The four text files the concepts are joined from.
#[derive(Clone, Debug)]
pub struct TextSources {
    /// `emojibase-data/en/data.json`.
    pub emojibase: Source,
    /// `emojibase-data/meta/groups.json` (group and subgroup names).
    pub groups: Source,
    /// `emoji-datasource/emoji.json`.
    pub datasource: Source,
    /// `openmoji/data/openmoji.json`.
    pub openmoji: Source,
}

impl TextSources {
    /// Reads them from a folder of unpacked packages.
    pub fn read(packages: &Path) -> Result<Self> {
        Ok(Self {
            emojibase: Source::read(packages.join(EMOJIBASE).join("en/data.json"))?,
            groups: Source::read(packages.join(EMOJIBASE).join("meta/groups.json"))?,
            datasource: Source::read(packages.join(DATASOURCE).join("emoji.json"))?,
            openmoji: Source::read(packages.join(OPENMOJI).join("data/openmoji.json"))?,
        })
    }
}

/// One emoji concept with its text from all three sources.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Concept {
    /// The join key ([`normalize_codepoints`]).
    pub key: String,
    /// CLDR name from emojibase (`hibiscus`, `flag: Nepal`).
    pub label: String,
    /// Emojibase keywords (OpenMoji's when emojibase has none).
    pub keywords: Vec<String>,
    /// Emojibase group and subgroup names (`flags`, `keycap`).
    pub group: Option<String>,
    pub subgroup: Option<String>,
    /// Emoji-datasource short names (`hibiscus`, `+1`) and subcategory.
    pub short_names: Vec<String>,
    pub subcategory: Option<String>,
    /// OpenMoji's own tags (`openmoji_tags`).
    pub openmoji_tags: Vec<String>,
}

#[derive(Deserialize)]
struct RawBase {
    label: String,
    hexcode: String,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    group: Option<u32>,
    #[serde(default)]
    subgroup: Option<u32>,
}

#[derive(Deserialize)]
struct RawGroups {
    groups: BTreeMap<String, String>,
    subgroups: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawDatasource {
    unified: String,
    #[serde(default)]
    short_names: Vec<String>,
    #[serde(default)]
    subcategory: Option<String>,
}

#[derive(Deserialize)]
struct RawOpenMoji {
    hexcode: String,
    #[serde(default)]
    annotation: String,
    #[serde(default)]
    tags: String,
    #[serde(default)]
    openmoji_tags: String,
}

pub(crate) fn parse_json<T: DeserializeOwned>(src: &Source) -> Result<T> {
    serde_json::from_str(&src.text).map_err(|e| Error::Manifest {
        path: src.path.clone(),
        line: e.line(),
        message: e.to_string(),
    })
}

fn comma_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// Joins the text sources into concepts, in emojibase order. An emojibase
/// entry without a readable codepoint or label is an error naming the file;
/// entries of the other two sources that match no concept are ignored.
pub fn join(src: &TextSources) -> Result<Vec<Concept>> {
    let base: Vec<RawBase> = parse_json(&src.emojibase)?;
    let groups: RawGroups = parse_json(&src.groups)?;
    let datasource: Vec<RawDatasource> = parse_json(&src.datasource)?;
    let openmoji: Vec<RawOpenMoji> = parse_json(&src.openmoji)?;

    let mut ds: HashMap<String, RawDatasource> = HashMap::new();
    for d in datasource {
        if let Some(k) = normalize_codepoints(&d.unified) {
            ds.entry(k).or_insert(d);
        }
    }
    let mut om: HashMap<String, RawOpenMoji> = HashMap::new();
    for o in openmoji {
        if let Some(k) = normalize_codepoints(&o.hexcode) {
            om.entry(k).or_insert(o);
        }
    }

    let mut seen = HashSet::new();
    let mut concepts = Vec::with_capacity(base.len());
    for (i, b) in base.into_iter().enumerate() {
        let bad = |message: String| Error::Manifest {
            path: src.emojibase.path.clone(),
            line: 0,
            message: format!("entry {i}: {message}"),
        };
        let key = normalize_codepoints(&b.hexcode)
            .ok_or_else(|| bad(format!("hexcode `{}` is not codepoints", b.hexcode)))?;
        if !seen.insert(key.clone()) {
            continue;
        }
        let d = ds.get(&key);
        let o = om.get(&key);
        let mut label = b.label.trim().to_string();
        if label.is_empty() {
            label = o
                .map(|o| o.annotation.trim().to_string())
                .unwrap_or_default();
        }
        if label.is_empty() {
            return Err(bad(format!("{key} has no label")));
        }
        let mut keywords: Vec<String> = b
            .tags
            .iter()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        if keywords.is_empty() {
            keywords = o.map(|o| comma_list(&o.tags)).unwrap_or_default();
        }
        concepts.push(Concept {
            key,
            label,
            keywords,
            group: b
                .group
                .and_then(|g| groups.groups.get(&g.to_string()).cloned()),
            subgroup: b
                .subgroup
                .and_then(|g| groups.subgroups.get(&g.to_string()).cloned()),
            short_names: d.map(|d| d.short_names.clone()).unwrap_or_default(),
            subcategory: d.and_then(|d| d.subcategory.clone()),
            openmoji_tags: o.map(|o| comma_list(&o.openmoji_tags)).unwrap_or_default(),
        });
    }
    Ok(concepts)
}

// ---------------------------------------------------------------------------
// Captions

/// Lowercase alphanumeric words.
fn words(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Whether a text names an art style or its vendor.
pub fn mentions_style(text: &str) -> bool {
    let lower = text.to_lowercase();
    words(text)
        .iter()
        .any(|w| STYLE_WORDS.contains(&w.as_str()))
        || STYLES.iter().any(|s| lower.contains(s.name))
}

/// Tags not already said by the label, without style words or repeats.
fn fresh_tags(tags: &[String], label_words: &BTreeSet<String>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    tags.iter()
        .map(|t| t.trim())
        .filter(|t| {
            let w = words(t);
            !w.is_empty() && !w.iter().all(|x| label_words.contains(x)) && !mentions_style(t)
        })
        .filter(|t| seen.insert(t.to_lowercase()))
        .take(MAX_KEYWORDS)
        .map(str::to_string)
        .collect()
}

/// The captions of a concept (see the module doc): never empty strings,
/// never repeated, never naming a style. Empty only if the label itself
/// names a style.
pub fn captions(c: &Concept) -> Vec<String> {
    let label = c.label.trim();
    let label_words: BTreeSet<String> = words(label).into_iter().collect();
    let mut out = vec![label.to_string()];
    let keywords = fresh_tags(&c.keywords, &label_words);
    if !keywords.is_empty() {
        out.push(format!("{label}: {}", keywords.join(", ")));
    }
    let tags = fresh_tags(&c.openmoji_tags, &label_words);
    if !tags.is_empty() {
        out.push(format!("{label}: {}", tags.join(", ")));
    }
    // The first short name with a letter: `+1` says nothing to a tokenizer.
    if let Some(short) = c
        .short_names
        .iter()
        .find(|s| s.chars().any(char::is_alphabetic))
    {
        let short = short.replace(['_', '-'], " ").trim().to_string();
        out.push(match &c.subcategory {
            Some(sub) if !sub.trim().is_empty() => format!("{short}, {}", sub.replace('-', " ")),
            _ => short,
        });
    }
    let mut seen = BTreeSet::new();
    out.into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && !mentions_style(s))
        .filter(|s| seen.insert(s.to_lowercase()))
        .collect()
}

// ---------------------------------------------------------------------------
// Families and the split

/// The family of a label: the label without gender words (also possessive,
/// `woman’s`), a `<tone> skin tone` suffix and the `facing right` direction;
/// `person` when nothing is left (`man`, `girl`).
pub fn family_name(label: &str) -> String {
    let lower = label.to_lowercase().replace('\'', "’");
    let tokens: Vec<&str> = lower
        .split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '’'))
        .filter(|t| !t.is_empty())
        .collect();
    let is_person = |t: &str| PERSON_WORDS.contains(&t.strip_suffix("’s").unwrap_or(t));
    let n = tokens.len();
    let mut keep = vec![true; n];
    for i in 0..n {
        if i + 2 < n
            && SKIN_TONES.contains(&tokens[i])
            && tokens[i + 1] == "skin"
            && tokens[i + 2] == "tone"
        {
            keep[i..i + 3].fill(false);
        }
        if i + 1 < n && tokens[i] == "facing" && tokens[i + 1] == "right" {
            keep[i..i + 2].fill(false);
        }
        if is_person(tokens[i]) {
            keep[i] = false;
        }
        if tokens[i] == "and"
            && i > 0
            && i + 1 < n
            && is_person(tokens[i - 1])
            && is_person(tokens[i + 1])
        {
            keep[i] = false;
        }
    }
    let name: Vec<&str> = tokens
        .iter()
        .zip(&keep)
        .filter(|(_, &k)| k)
        .map(|(t, _)| *t)
        .collect();
    if name.is_empty() {
        "person".into()
    } else {
        name.join(" ")
    }
}

/// The family of a concept: a reserved, bracketed name for the kinds that
/// stay in train (`[flag]`, `[keycap]`, `[regional indicator]`,
/// `[component]`), else [`family_name`] of its label.
pub fn family(c: &Concept) -> String {
    let group = c.group.as_deref();
    if group == Some("flags") {
        "[flag]".into()
    } else if c.subgroup.as_deref() == Some("keycap") || c.label.starts_with("keycap:") {
        "[keycap]".into()
    } else if c.label.to_lowercase().starts_with("regional indicator") {
        "[regional indicator]".into()
    } else if group == Some("component") {
        "[component]".into()
    } else {
        family_name(&c.label)
    }
}

/// 64-bit FNV-1a (the `fnv` crate): stable across runs, platforms and Rust
/// versions, so a family's split never moves.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(bytes);
    h.finish()
}

/// The split of a family, a function of its name alone: bracketed
/// (train-only) names go to train; otherwise FNV-1a modulo 20 sends buckets
/// 0-3 to test (one family in five), bucket 4 to val and the rest to train.
pub fn split_of_family(family: &str) -> Split {
    if family.starts_with('[') {
        return Split::Train;
    }
    match fnv1a64(family.as_bytes()) % 20 {
        0..=3 => Split::Test,
        4 => Split::Val,
        _ => Split::Train,
    }
}

// ---------------------------------------------------------------------------
// Iconify

#[derive(Deserialize)]
struct IconSet {
    icons: BTreeMap<String, IconData>,
    #[serde(default)]
    aliases: BTreeMap<String, IconData>,
    #[serde(default)]
    width: Option<f64>,
    #[serde(default)]
    height: Option<f64>,
    #[serde(default)]
    left: Option<f64>,
    #[serde(default)]
    top: Option<f64>,
}

/// An icon (with a `body`) or an alias (with a `parent`); both may carry
/// dimensions and transformations.
#[derive(Deserialize)]
struct IconData {
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    parent: Option<String>,
    #[serde(default)]
    width: Option<f64>,
    #[serde(default)]
    height: Option<f64>,
    #[serde(default)]
    left: Option<f64>,
    #[serde(default)]
    top: Option<f64>,
    #[serde(default, rename = "hFlip")]
    h_flip: bool,
    #[serde(default, rename = "vFlip")]
    v_flip: bool,
    #[serde(default)]
    rotate: u32,
}

/// An icon with its aliases followed: body, box and transformations.
#[derive(Clone, Debug, PartialEq)]
pub struct IconifyIcon {
    pub body: String,
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
    pub h_flip: bool,
    pub v_flip: bool,
    /// Quarter turns clockwise.
    pub rotate: u32,
}

impl IconSet {
    fn has(&self, name: &str) -> bool {
        self.icons.contains_key(name) || self.aliases.contains_key(name)
    }

    /// Follows aliases to the icon; the nearest alias's values win, flips
    /// toggle and rotations add up, as Iconify does.
    fn resolve(&self, name: &str) -> Option<IconifyIcon> {
        let (mut w, mut h, mut l, mut t) = (None, None, None, None);
        let (mut hf, mut vf, mut rot) = (false, false, 0);
        let mut cur = name;
        for _ in 0..8 {
            let (d, is_icon) = match self.icons.get(cur) {
                Some(d) => (d, true),
                None => (self.aliases.get(cur)?, false),
            };
            w = w.or(d.width);
            h = h.or(d.height);
            l = l.or(d.left);
            t = t.or(d.top);
            hf ^= d.h_flip;
            vf ^= d.v_flip;
            rot += d.rotate;
            if is_icon {
                return Some(IconifyIcon {
                    body: d.body.clone()?,
                    left: l.or(self.left).unwrap_or(0.0),
                    top: t.or(self.top).unwrap_or(0.0),
                    width: w.or(self.width).unwrap_or(16.0),
                    height: h.or(self.height).unwrap_or(16.0),
                    h_flip: hf,
                    v_flip: vf,
                    rotate: rot % 4,
                });
            }
            cur = d.parent.as_deref()?;
        }
        None
    }
}

/// A standalone SVG document of an Iconify icon: the view box is padded to a
/// square around the icon's box (so nothing is cropped later), flips and
/// rotations become a transform, and with `mono` the `currentColor` of
/// monochrome sets becomes black.
pub fn iconify_svg(icon: &IconifyIcon, mono: bool) -> String {
    let (l, t, w, h) = (icon.left, icon.top, icon.width, icon.height);
    let s = w.max(h);
    let (vx, vy) = (l - (s - w) / 2.0, t - (s - h) / 2.0);
    let mut transform = Vec::new();
    if !icon.rotate.is_multiple_of(4) {
        transform.push(format!(
            "rotate({} {} {})",
            90 * (icon.rotate % 4),
            l + w / 2.0,
            t + h / 2.0
        ));
    }
    if icon.h_flip {
        transform.push(format!("translate({} 0) scale(-1 1)", 2.0 * l + w));
    }
    if icon.v_flip {
        transform.push(format!("translate(0 {}) scale(1 -1)", 2.0 * t + h));
    }
    let body = if mono {
        icon.body.replace("currentColor", "#000000")
    } else {
        icon.body.clone()
    };
    let inner = if transform.is_empty() {
        body
    } else {
        format!("<g transform=\"{}\">{body}</g>", transform.join(" "))
    };
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" \
         xmlns:xlink=\"http://www.w3.org/1999/xlink\" viewBox=\"{vx} {vy} {s} {s}\">{inner}</svg>"
    )
}

/// An Iconify-style name: lowercase ASCII words joined by `-`, accents folded
/// and apostrophes dropped (`Côte d’Ivoire` -> `cote-divoire`).
fn slug(s: &str) -> String {
    let mut out = String::new();
    let mut gap = false;
    for c in s.chars().flat_map(char::to_lowercase) {
        let c = match c {
            '\'' | '’' => continue,
            'á' | 'à' | 'â' | 'ä' | 'ã' | 'å' => 'a',
            'é' | 'è' | 'ê' | 'ë' => 'e',
            'í' | 'ì' | 'î' | 'ï' => 'i',
            'ó' | 'ò' | 'ô' | 'ö' | 'õ' => 'o',
            'ú' | 'ù' | 'û' | 'ü' => 'u',
            'ñ' => 'n',
            'ç' => 'c',
            c => c,
        };
        if c.is_ascii_alphanumeric() {
            if gap && !out.is_empty() {
                out.push('-');
            }
            gap = false;
            out.push(c);
        } else {
            gap = true;
        }
    }
    out
}

/// Which icon of a set draws each concept: `chars.json` first, then the slug
/// of the label, then `flag-for-<country>` for flags, then the slugs of the
/// short names. Each pass sees only the concepts still unmatched, and an icon
/// serves one concept at most (the first in concept order).
fn match_icons(
    concepts: &[Concept],
    has: impl Fn(&str) -> bool,
    chars: &HashMap<String, String>,
) -> BTreeMap<String, String> {
    let candidates = |c: &Concept, pass: usize| -> Vec<String> {
        match pass {
            0 => chars.get(&c.key).cloned().into_iter().collect(),
            1 => vec![slug(&c.label)],
            2 => c
                .label
                .strip_prefix("flag: ")
                .map(|country| vec![format!("flag-for-{}", slug(country))])
                .unwrap_or_default(),
            _ => c.short_names.iter().map(|s| slug(s)).collect(),
        }
    };
    let mut claimed = HashSet::new();
    let mut out = BTreeMap::new();
    for pass in 0..4 {
        for c in concepts {
            if out.contains_key(&c.key) {
                continue;
            }
            if let Some(name) = candidates(c, pass)
                .into_iter()
                .find(|n| !n.is_empty() && has(n.as_str()) && !claimed.contains(n))
            {
                claimed.insert(name.clone());
                out.insert(c.key.clone(), name);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Artwork

/// Where one image comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// A PNG, WebP or SVG file.
    File(PathBuf),
    /// An SVG document made from an Iconify body; `origin` names it in errors.
    Svg { origin: PathBuf, svg: String },
}

/// The artwork of one style for the given concepts, by concept key.
pub fn style_inputs(
    packages: &Path,
    style: &Style,
    concepts: &[Concept],
) -> Result<BTreeMap<String, Input>> {
    let root = packages.join(style.package);
    let wanted: HashSet<&str> = concepts.iter().map(|c| c.key.as_str()).collect();
    let mut out = BTreeMap::new();
    match style.artwork {
        Artwork::Files { dir, ext } => {
            let dir = root.join(dir);
            let io = |source| Error::Io {
                path: dir.clone(),
                source,
            };
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(io)?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<_>>()
                .map_err(io)?;
            // Sorted, so that of two files with one key the choice is stable.
            files.sort();
            for path in files {
                if !path
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case(ext))
                {
                    continue;
                }
                let Some(key) = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(normalize_codepoints)
                else {
                    continue;
                };
                if wanted.contains(key.as_str()) {
                    out.entry(key).or_insert(Input::File(path));
                }
            }
        }
        Artwork::Iconify { mono } => {
            let icons_path = root.join("icons.json");
            let set: IconSet = parse_json(&Source::read(icons_path.clone())?)?;
            let chars_path = root.join("chars.json");
            let chars: BTreeMap<String, String> = if chars_path.exists() {
                parse_json(&Source::read(chars_path)?)?
            } else {
                BTreeMap::new()
            };
            let chars: HashMap<String, String> = chars
                .into_iter()
                .filter_map(|(k, v)| normalize_codepoints(&k).map(|k| (k, v)))
                .collect();
            for (key, name) in match_icons(concepts, |n| set.has(n), &chars) {
                if let Some(icon) = set.resolve(&name) {
                    out.insert(
                        key,
                        Input::Svg {
                            origin: icons_path.join(format!("{name}.svg")),
                            svg: iconify_svg(&icon, mono),
                        },
                    );
                }
            }
        }
    }
    Ok(out)
}

/// The image of an input at `size` x `size`, RGB over white. An image of one
/// flat colour is an error: the artwork did not render.
pub fn render(input: &Input, size: u32) -> Result<RgbImage> {
    let (rgb, origin) = match input {
        Input::Svg { origin, svg } => (image_io::decode_bytes(svg.as_bytes(), origin)?, origin),
        Input::File(p) if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("svg")) => {
            (image_io::decode(p)?, p)
        }
        Input::File(p) => {
            let bytes = std::fs::read(p).map_err(|source| Error::Io {
                path: p.clone(),
                source,
            })?;
            let img = image::load_from_memory(&bytes).map_err(|e| Error::Image {
                path: p.clone(),
                message: e.to_string(),
            })?;
            (
                image_io::composite(&img.to_rgba8(), image_io::Background::WHITE),
                p,
            )
        }
    };
    let out = image_io::resize_center_crop(&rgb, size as usize);
    let first = out.get_pixel(0, 0);
    if out.pixels().all(|p| p == first) {
        return Err(Error::Image {
            path: origin.clone(),
            message: format!("renders as one flat colour {:?}", first.0),
        });
    }
    Ok(out)
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` through a temporary name, so that no reader (and
/// no later run) ever sees a half-written file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = atomic_write_file::AtomicWriteFile::open(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.commit().map_err(io_err(path))
}

fn write_png(img: &RgbImage, path: &Path) -> Result<()> {
    let mut buf = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)
        .map_err(|e| Error::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    write_atomic(path, &buf)
}

// ---------------------------------------------------------------------------
// The build

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Side of every output image, in pixels.
    pub size: u32,
    /// The styles to build (default: [`STYLES`]).
    pub styles: Vec<Style>,
    /// The training style whose images make the val and test items of
    /// `manifest.jsonl`.
    pub default_style: String,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            size: 64,
            styles: STYLES.to_vec(),
            default_style: DEFAULT_TEST_STYLE.into(),
        }
    }
}

impl BuildOptions {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.size < 8 {
            return bad(format!("image size {} is below 8 px", self.size));
        }
        let mut names = HashSet::new();
        for s in &self.styles {
            if !names.insert(s.name) {
                return bad(format!("style `{}` is listed twice", s.name));
            }
        }
        match self.styles.iter().find(|s| s.name == self.default_style) {
            None => bad(format!(
                "default style `{}` is not built",
                self.default_style
            )),
            Some(s) if s.held_out => bad(format!(
                "default style `{}` is held out of training",
                s.name
            )),
            Some(_) => Ok(()),
        }
    }
}

/// Item counts per split.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SplitCounts {
    pub train: usize,
    pub val: usize,
    pub test: usize,
}

impl SplitCounts {
    pub(crate) fn add(&mut self, split: Split) {
        match split {
            Split::Train => self.train += 1,
            Split::Val => self.val += 1,
            Split::Test => self.test += 1,
        }
    }
}

/// One style in `stats.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StyleStats {
    pub name: String,
    pub package: String,
    pub version: String,
    pub license: String,
    pub held_out: bool,
    /// Images written (or kept) under `images/<name>/`.
    pub images: usize,
    /// Of those, rendered by this run (the rest were already there).
    pub rendered: usize,
    /// Its items in `manifest.jsonl`, per split.
    pub manifest_items: SplitCounts,
    /// Lines of `test-<name>.jsonl`.
    pub test_gallery: usize,
}

/// One npm package in `stats.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PackageStats {
    pub name: String,
    pub version: String,
    /// The registry's `sha512-…` integrity, as recorded by the download.
    pub integrity: Option<String>,
}

/// An image that could not be made; its item is left out.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Failure {
    pub style: String,
    pub key: String,
    pub error: String,
}

/// What a build made: written to `stats.json` and returned.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stats {
    pub size: u32,
    /// Concepts with at least one caption.
    pub concepts: usize,
    pub families: usize,
    pub concepts_by_split: SplitCounts,
    pub families_by_split: SplitCounts,
    /// Captions per concept, on average.
    pub captions_per_concept: f64,
    /// Lines of `manifest.jsonl`, per split.
    pub manifest_items: SplitCounts,
    pub default_test_style: String,
    pub held_out_styles: Vec<String>,
    pub styles: Vec<StyleStats>,
    pub packages: Vec<PackageStats>,
    pub failures: Vec<Failure>,
}

#[derive(Serialize)]
struct Line<'a> {
    image: String,
    captions: &'a [String],
    split: &'static str,
    id: u32,
}

pub(crate) fn split_name(s: Split) -> &'static str {
    match s {
        Split::Train => "train",
        Split::Val => "val",
        Split::Test => "test",
    }
}

#[derive(Deserialize)]
struct PackageJson {
    version: String,
}

pub(crate) fn package_version(packages: &Path, name: &str) -> Result<String> {
    let src = Source::read(packages.join(name).join("package.json"))?;
    Ok(parse_json::<PackageJson>(&src)?.version)
}

/// `name version integrity` lines written by the download, if any.
pub(crate) fn read_integrity(packages: &Path) -> Result<HashMap<String, String>> {
    let path = packages.join(INTEGRITY_FILE);
    if !path.exists() {
        return Ok(HashMap::new());
    }
    let text = Source::read(path)?.text;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (name, _version, integrity) = (f.next()?, f.next()?, f.next()?);
            Some((name.to_string(), integrity.to_string()))
        })
        .collect())
}

/// What became of one image.
enum Outcome {
    /// Already on disk at the requested size.
    Kept,
    Rendered,
    Failed(Error),
}

/// One concept as the build sees it.
pub(crate) struct Planned {
    /// The concept's index among the concepts with captions: the manifest id.
    pub(crate) id: u32,
    pub(crate) concept: Concept,
    pub(crate) captions: Vec<String>,
    pub(crate) family: String,
    pub(crate) split: Split,
}

/// The concepts that have captions, in emojibase order, with their ids
/// (indices among them), captions, families and splits. The animated
/// benchmark (`crate::emoji_video`) plans the same way, so a concept has one
/// id in both.
pub(crate) fn plan(concepts: Vec<Concept>) -> Vec<Planned> {
    concepts
        .into_iter()
        .filter_map(|concept| {
            let captions = captions(&concept);
            if captions.is_empty() {
                return None;
            }
            let family = family(&concept);
            let split = split_of_family(&family);
            Some((concept, captions, family, split))
        })
        .enumerate()
        .map(|(i, (concept, captions, family, split))| Planned {
            id: i as u32,
            concept,
            captions,
            family,
            split,
        })
        .collect()
}

/// Builds the benchmark from a folder of unpacked npm packages (each under
/// its npm name, e.g. `packages/@iconify-json/fluent-emoji/icons.json`) into
/// `out` (see the module doc for the layout). `progress` receives one line
/// per stage. An image that cannot be decoded or renders blank is left out
/// and listed in [`Stats::failures`]; anything else is an error.
pub fn build(
    packages: &Path,
    out: &Path,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Stats> {
    opts.validate()?;
    let concepts = join(&TextSources::read(packages)?)?;
    let planned = plan(concepts);
    let mut concepts_by_split = SplitCounts::default();
    let mut families = BTreeMap::new();
    for p in &planned {
        concepts_by_split.add(p.split);
        families.insert(p.family.as_str(), p.split);
    }
    let mut families_by_split = SplitCounts::default();
    families.values().for_each(|&s| families_by_split.add(s));
    let n_captions: usize = planned.iter().map(|p| p.captions.len()).sum();
    progress(&format!(
        "{} concepts in {} families (train/val/test concepts {}/{}/{})",
        planned.len(),
        families.len(),
        concepts_by_split.train,
        concepts_by_split.val,
        concepts_by_split.test
    ));

    let images_dir = out.join("images");
    let all_concepts: Vec<Concept> = planned.iter().map(|p| p.concept.clone()).collect();
    let mut available: Vec<HashSet<String>> = Vec::new();
    let mut style_stats = Vec::new();
    let mut failures = Vec::new();
    for (si, style) in opts.styles.iter().enumerate() {
        let started = Instant::now();
        let inputs = style_inputs(packages, style, &all_concepts)?;
        let dir = images_dir.join(style.name);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let size = opts.size;
        // Rendering runs in parallel; a write error is fatal, a render error
        // is the artwork's and only leaves its item out.
        let results: Vec<(String, Result<Outcome>)> = inputs
            .par_iter()
            .map(|(key, input)| {
                let path = dir.join(format!("{key}.png"));
                if image::image_dimensions(&path).ok() == Some((size, size)) {
                    return (key.clone(), Ok(Outcome::Kept));
                }
                let outcome = match render(input, size) {
                    Ok(img) => write_png(&img, &path).map(|()| Outcome::Rendered),
                    Err(e) => Ok(Outcome::Failed(e)),
                };
                (key.clone(), outcome)
            })
            .collect();
        let mut ok = HashSet::new();
        let mut rendered = 0;
        for (key, outcome) in results {
            match outcome? {
                Outcome::Kept => {
                    ok.insert(key);
                }
                Outcome::Rendered => {
                    rendered += 1;
                    ok.insert(key);
                }
                Outcome::Failed(e) => failures.push(Failure {
                    style: style.name.into(),
                    key,
                    error: e.to_string(),
                }),
            }
        }
        let failed = inputs.len() - ok.len();
        progress(&format!(
            "[{}/{}] {}: {} images ({} rendered, {} kept, {} failed) in {:.1} s",
            si + 1,
            opts.styles.len(),
            style.name,
            ok.len(),
            rendered,
            ok.len() - rendered,
            failed,
            started.elapsed().as_secs_f64()
        ));
        style_stats.push(StyleStats {
            name: style.name.into(),
            package: style.package.into(),
            version: package_version(packages, style.package)?,
            license: style.license.into(),
            held_out: style.held_out,
            images: ok.len(),
            rendered,
            manifest_items: SplitCounts::default(),
            test_gallery: 0,
        });
        available.push(ok);
    }

    // manifest.jsonl: train concepts in every training style; val and test
    // concepts in the default style only.
    let line = |p: &Planned, style: &str, split: Split| -> Result<String> {
        serde_json::to_string(&Line {
            image: format!("images/{style}/{}.png", p.concept.key),
            captions: &p.captions,
            split: split_name(split),
            id: p.id,
        })
        .map_err(|e| Error::Config(format!("cannot serialise a manifest line: {e}")))
    };
    let mut manifest = String::new();
    let mut manifest_items = SplitCounts::default();
    for p in &planned {
        for (si, style) in opts.styles.iter().enumerate() {
            let wanted = match p.split {
                Split::Train => !style.held_out,
                Split::Val | Split::Test => style.name == opts.default_style,
            };
            if wanted && available[si].contains(&p.concept.key) {
                manifest.push_str(&line(p, style.name, p.split)?);
                manifest.push('\n');
                manifest_items.add(p.split);
                style_stats[si].manifest_items.add(p.split);
            }
        }
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    write_atomic(&out.join("manifest.jsonl"), manifest.as_bytes())?;

    // test-<style>.jsonl: every style's gallery of test concepts.
    for (si, style) in opts.styles.iter().enumerate() {
        let mut text = String::new();
        for p in planned.iter().filter(|p| p.split == Split::Test) {
            if available[si].contains(&p.concept.key) {
                text.push_str(&line(p, style.name, Split::Test)?);
                text.push('\n');
                style_stats[si].test_gallery += 1;
            }
        }
        let gallery = out.join(format!("test-{}.jsonl", style.name));
        write_atomic(&gallery, text.as_bytes())?;
        write_atomic(
            &out.join(format!("eval-{}.toml", style.name)),
            eval_config(style.name, &gallery)?.as_bytes(),
        )?;
    }

    let integrity = read_integrity(packages)?;
    let mut names: Vec<&str> = vec![EMOJIBASE, DATASOURCE, OPENMOJI];
    for s in &opts.styles {
        if !names.contains(&s.package) {
            names.push(s.package);
        }
    }
    let packages_stats = names
        .iter()
        .map(|&name| {
            Ok(PackageStats {
                name: name.into(),
                version: package_version(packages, name)?,
                integrity: integrity.get(name).cloned(),
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let stats = Stats {
        size: opts.size,
        concepts: planned.len(),
        families: families.len(),
        concepts_by_split,
        families_by_split,
        captions_per_concept: n_captions as f64 / planned.len().max(1) as f64,
        manifest_items,
        default_test_style: opts.default_style.clone(),
        held_out_styles: opts
            .styles
            .iter()
            .filter(|s| s.held_out)
            .map(|s| s.name.to_string())
            .collect(),
        styles: style_stats,
        packages: packages_stats,
        failures,
    };
    let json = serde_json::to_string_pretty(&stats)
        .map_err(|e| Error::Config(format!("cannot serialise stats: {e}")))?;
    write_atomic(&out.join("stats.json"), json.as_bytes())?;
    write_atomic(
        &out.join("LICENSES.md"),
        licenses_md(&stats, &opts.styles).as_bytes(),
    )?;
    Ok(stats)
}

/// A run config naming one style's test gallery, for `cots eval --data-config`.
pub fn eval_config(style: &str, gallery: &Path) -> Result<String> {
    crate::data_config(
        &format!(
            "The {style} gallery of the emoji benchmark: one image per test concept.\n\
             cots eval --run <run> --data-config <this file>"
        ),
        cots_train::config::DataKind::Manifest,
        gallery,
        None,
    )
}

/// `LICENSES.md`: the license and attribution of every style and text source.
fn licenses_md(stats: &Stats, styles: &[Style]) -> String {
    let version = |name: &str| {
        stats
            .packages
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.version.clone())
            .unwrap_or_default()
    };
    let mut s = String::from(
        "# Licenses of the emoji benchmark\n\n\
         Every image under `images/<style>/` is a rendering of third-party artwork, resized \
         and composited over white, and keeps the license of its source; the captions are \
         built from the text sources below. Share-alike (CC BY-SA) artwork stays under its \
         license when redistributed, and CC BY artwork needs the attribution given here.\n\n\
         ## Artwork, per style\n\n\
         | style | package | license | attribution |\n|---|---|---|---|\n",
    );
    for st in styles {
        s.push_str(&format!(
            "| {} | `{}@{}` | {} | {} |\n",
            st.name,
            st.package,
            version(st.package),
            st.license,
            st.attribution
        ));
    }
    s.push_str("\n## Text\n\n| package | license | used for |\n|---|---|---|\n");
    for &(name, license, what) in TEXT_SOURCES {
        s.push_str(&format!(
            "| `{name}@{}` | {license} | {what} |\n",
            version(name)
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn concept(label: &str) -> Concept {
        Concept {
            key: "1f600".into(),
            label: label.into(),
            ..Concept::default()
        }
    }

    #[test]
    fn codepoints_are_lowercase_padded_and_without_fe0f() {
        for (raw, want) in [
            ("1F441-FE0F-200D-1F5E8-FE0F", Some("1f441-200d-1f5e8")),
            ("0023-FE0F-20E3", Some("0023-20e3")),
            ("23-fe0f-20e3", Some("0023-20e3")),
            ("2764_fe0f", Some("2764")),
            ("1f600", Some("1f600")),
            ("FE0F", None),
            ("", None),
            ("1f600-", None),
            ("zz", None),
            ("110000", None),
        ] {
            assert_eq!(normalize_codepoints(raw).as_deref(), want, "{raw}");
        }
    }

    fn sources(emojibase: &str, datasource: &str, openmoji: &str) -> TextSources {
        let src = |p: &str, t: &str| Source {
            path: p.into(),
            text: t.into(),
        };
        TextSources {
            emojibase: src("data.json", emojibase),
            groups: src(
                "groups.json",
                r#"{"groups": {"3": "animals-nature", "9": "flags", "2": "component", "8": "symbols"},
                    "subgroups": {"40": "plant-flower", "90": "keycap"}}"#,
            ),
            datasource: src("emoji.json", datasource),
            openmoji: src("openmoji.json", openmoji),
        }
    }

    #[test]
    fn join_matches_codepoints_across_sources() {
        let src = sources(
            r#"[{"label": "hibiscus", "hexcode": "1F33A", "tags": ["flower", "hibiscus", "plant"], "group": 3, "subgroup": 40,
                 "skins": [{"label": "ignored", "hexcode": "1F33A-1F3FB"}]},
                {"label": "red heart", "hexcode": "2764-FE0F", "group": 8},
                {"label": "keycap: 1", "hexcode": "0031-FE0F-20E3", "subgroup": 90}]"#,
            r#"[{"unified": "1F33A", "short_names": ["hibiscus"], "subcategory": "plant-flower"},
                {"unified": "2764-FE0F", "short_names": ["heart"], "subcategory": "heart"},
                {"unified": "9999", "short_names": ["nobody"]}]"#,
            r#"[{"hexcode": "1F33A", "annotation": "hibiscus", "tags": "flower, hibiscus", "openmoji_tags": "tropical, hawaii"},
                {"hexcode": "2764", "annotation": "red heart", "tags": "heart, love", "openmoji_tags": ""},
                {"hexcode": "31-20E3", "annotation": "keycap: 1", "tags": "keycap", "openmoji_tags": ""}]"#,
        );
        let c = join(&src).unwrap();
        assert_eq!(
            c.iter().map(|c| c.key.as_str()).collect::<Vec<_>>(),
            ["1f33a", "2764", "0031-20e3"]
        );
        assert_eq!(c[0].short_names, ["hibiscus"]);
        assert_eq!(c[0].subcategory.as_deref(), Some("plant-flower"));
        assert_eq!(c[0].group.as_deref(), Some("animals-nature"));
        assert_eq!(c[0].subgroup.as_deref(), Some("plant-flower"));
        assert_eq!(c[0].openmoji_tags, ["tropical", "hawaii"]);
        // FE0F on one side only still joins; emojibase without tags borrows OpenMoji's.
        assert_eq!(c[1].short_names, ["heart"]);
        assert_eq!(c[1].keywords, ["heart", "love"]);
        assert_eq!(c[2].subgroup.as_deref(), Some("keycap"));
        assert_eq!(c[2].keywords, ["keycap"]);

        let bad = sources(r#"[{"label": "x", "hexcode": "nope"}]"#, "[]", "[]");
        let e = join(&bad).unwrap_err().to_string();
        assert!(e.contains("data.json") && e.contains("nope"), "{e}");
        let broken = sources("[{", "[]", "[]");
        assert!(join(&broken)
            .unwrap_err()
            .to_string()
            .contains("data.json:1"));
    }

    #[test]
    fn captions_follow_the_recipe() {
        let c = Concept {
            key: "1f33a".into(),
            label: "hibiscus".into(),
            keywords: vec!["flower".into(), "hibiscus".into(), "plant".into()],
            short_names: vec!["hibiscus".into()],
            subcategory: Some("plant-flower".into()),
            openmoji_tags: vec!["tropical".into()],
            ..Concept::default()
        };
        assert_eq!(
            captions(&c),
            [
                "hibiscus",
                "hibiscus: flower, plant",
                "hibiscus: tropical",
                "hibiscus, plant flower"
            ]
        );
        // `+1` is skipped for a short name with letters; underscores become spaces.
        let thumbs = Concept {
            label: "thumbs up".into(),
            keywords: vec!["thumbs".into(), "up".into(), " ".into()],
            short_names: vec!["+1".into(), "thumbs_up".into()],
            ..concept("")
        };
        // The keywords repeat the label, and the short name is the label again.
        assert_eq!(captions(&thumbs), ["thumbs up"]);
    }

    #[test]
    fn no_caption_names_a_style() {
        let c = Concept {
            label: "red apple".into(),
            keywords: vec!["apple".into(), "fruit".into(), "Google".into()],
            openmoji_tags: vec!["twitter".into(), "fluent design".into(), "fxemoji".into()],
            short_names: vec!["apple".into()],
            subcategory: Some("food-fruit".into()),
            ..concept("")
        };
        let caps = captions(&c);
        assert_eq!(caps, ["red apple", "red apple: fruit", "apple, food fruit"]);
        for cap in &caps {
            for st in STYLES {
                assert!(
                    !cap.to_lowercase().contains(st.name),
                    "{cap} names {}",
                    st.name
                );
            }
            for w in words(cap) {
                assert!(!STYLE_WORDS.contains(&w.as_str()), "{cap}");
            }
        }
        // A label that names a style leaves no caption at all.
        assert!(captions(&concept("google logo")).is_empty());
    }

    #[test]
    fn families_drop_gender_skin_tone_and_direction() {
        for (label, want) in [
            ("man running", "running"),
            ("woman running facing right", "running"),
            ("person running", "running"),
            ("woman: beard", "beard"),
            ("waving hand: medium-dark skin tone", "waving hand"),
            ("men’s room", "room"),
            ("women's room", "room"),
            ("man and woman holding hands", "holding hands"),
            ("family: man, woman, boy", "family"),
            ("woman", "person"),
            ("Hibiscus", "hibiscus"),
            ("dark sunglasses", "dark sunglasses"),
            ("rock and roll", "rock and roll"),
        ] {
            assert_eq!(family_name(label), want, "{label}");
        }
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        // Test vectors of the FNV reference implementation.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn about_one_family_in_five_goes_to_test() {
        let n = 20_000;
        let mut counts = SplitCounts::default();
        for i in 0..n {
            counts.add(split_of_family(&format!("family number {i}")));
        }
        let share = |k: usize| k as f64 / n as f64;
        assert!((share(counts.test) - 0.20).abs() < 0.02, "{counts:?}");
        assert!((share(counts.val) - 0.05).abs() < 0.01, "{counts:?}");
    }

    #[test]
    fn split_is_a_function_of_the_family_and_families_never_straddle() {
        let labels: Vec<String> = ["running", "walking", "cook", "juggling", "beard", "zombie"]
            .iter()
            .flat_map(|act| {
                ["man", "woman", "person"]
                    .iter()
                    .map(move |who| format!("{who} {act}"))
            })
            .chain((0..300).map(|i| format!("thing {i}")))
            .collect();
        let concepts: Vec<Concept> = labels.iter().map(|l| concept(l)).collect();
        let mut by_family: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for c in &concepts {
            let split = split_of_family(&family(c));
            by_family
                .entry(family(c))
                .or_default()
                .insert(format!("{split:?}"));
        }
        assert!(by_family.values().all(|s| s.len() == 1), "{by_family:?}");
        assert_eq!(by_family.len(), 6 + 300);
        let splits: BTreeSet<String> = by_family.values().flatten().cloned().collect();
        assert_eq!(splits.len(), 3, "train, val and test all occur");
        // Gender, skin tone and direction variants share the split of the bare activity.
        for act in ["running", "walking", "kneeling"] {
            let want = split_of_family(act);
            for label in [
                format!("man {act}"),
                format!("woman {act} facing right"),
                format!("person {act}: medium-dark skin tone"),
            ] {
                assert_eq!(split_of_family(&family(&concept(&label))), want, "{label}");
            }
        }
    }

    #[test]
    fn flags_keycaps_indicators_and_components_stay_in_train() {
        let kinds = [
            Concept {
                group: Some("flags".into()),
                ..concept("flag: Nepal")
            },
            Concept {
                subgroup: Some("keycap".into()),
                ..concept("keycap: 1")
            },
            concept("regional indicator A"),
            Concept {
                group: Some("component".into()),
                ..concept("red hair")
            },
        ];
        for c in &kinds {
            assert!(family(c).starts_with('['), "{}", c.label);
            assert_eq!(split_of_family(&family(c)), Split::Train, "{}", c.label);
        }
        // Whatever the label's own hash says.
        let test_label = (0..)
            .map(|i| format!("flag {i}"))
            .find(|l| split_of_family(l) == Split::Test)
            .unwrap();
        let flag = Concept {
            group: Some("flags".into()),
            ..concept(&test_label)
        };
        assert_eq!(split_of_family(&family(&flag)), Split::Train);
    }

    #[test]
    fn iconify_svg_pads_to_a_square_and_blackens_current_color() {
        let icon = IconifyIcon {
            body: r#"<rect width="32" height="24" fill="currentColor"/>"#.into(),
            left: 0.0,
            top: 0.0,
            width: 32.0,
            height: 24.0,
            h_flip: false,
            v_flip: false,
            rotate: 0,
        };
        let svg = iconify_svg(&icon, true);
        assert!(svg.contains("viewBox=\"0 -4 32 32\""), "{svg}");
        assert!(!svg.contains("currentColor") && svg.contains("#000000"));
        let img = render(
            &Input::Svg {
                origin: "t.svg".into(),
                svg,
            },
            16,
        )
        .unwrap();
        assert_eq!(img.dimensions(), (16, 16));
        assert_eq!(img.get_pixel(8, 8).0, [0, 0, 0]);
        // The padding rows above and below the 32x24 box stay white.
        assert_eq!(img.get_pixel(8, 0).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(8, 15).0, [255, 255, 255]);
    }

    #[test]
    fn iconify_aliases_flip_and_names_are_claimed_once() {
        let set: IconSet = serde_json::from_str(
            r##"{"width": 16, "height": 16,
                 "icons": {"hand-left": {"body": "<rect width=\"8\" height=\"16\" fill=\"#f00\"/>"},
                           "grinning-face": {"body": "<circle cx=\"8\" cy=\"8\" r=\"8\"/>"},
                           "flag-for-nepal": {"body": "<rect width=\"16\" height=\"16\"/>"}},
                 "aliases": {"hand-right": {"parent": "hand-left", "hFlip": true}}}"##,
        )
        .unwrap();
        let right = set.resolve("hand-right").unwrap();
        assert!(right.h_flip && !set.resolve("hand-left").unwrap().h_flip);
        let img = render(
            &Input::Svg {
                origin: "r.svg".into(),
                svg: iconify_svg(&right, false),
            },
            16,
        )
        .unwrap();
        assert_eq!(img.get_pixel(2, 8).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(13, 8).0, [255, 0, 0]);
        assert!(set.resolve("missing").is_none());

        let concepts = [
            Concept {
                key: "1f600".into(),
                label: "grinning face".into(),
                ..Concept::default()
            },
            // A second concept whose short name slugs to the same icon.
            Concept {
                key: "1f601".into(),
                label: "beaming face".into(),
                short_names: vec!["grinning_face".into()],
                ..Concept::default()
            },
            Concept {
                key: "1f1f3-1f1f5".into(),
                label: "flag: Nepal".into(),
                ..Concept::default()
            },
            Concept {
                key: "270b".into(),
                label: "raised hand".into(),
                ..Concept::default()
            },
        ];
        let chars: HashMap<String, String> = [("270b".to_string(), "hand-right".to_string())]
            .into_iter()
            .collect();
        let m = match_icons(&concepts, |n| set.has(n), &chars);
        assert_eq!(m.get("1f600").map(String::as_str), Some("grinning-face"));
        assert_eq!(m.get("1f601"), None);
        assert_eq!(
            m.get("1f1f3-1f1f5").map(String::as_str),
            Some("flag-for-nepal")
        );
        assert_eq!(m.get("270b").map(String::as_str), Some("hand-right"));
        assert_eq!(slug("Côte d’Ivoire"), "cote-divoire");
        assert_eq!(slug("a button (blood type)"), "a-button-blood-type");
    }

    #[test]
    fn raster_alpha_is_composited_over_white() {
        let mut img = image::RgbaImage::new(2, 1);
        img.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
        img.put_pixel(1, 0, image::Rgba([0, 0, 0, 255]));
        let rgb = image_io::composite(&img, image_io::Background::WHITE);
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 0).0, [0, 0, 0]);
        let mut half = image::RgbaImage::new(1, 1);
        half.put_pixel(0, 0, image::Rgba([0, 0, 0, 128]));
        // 255 * (1 - 128/255) = 127.
        assert_eq!(
            image_io::composite(&half, image_io::Background::WHITE)
                .get_pixel(0, 0)
                .0,
            [127, 127, 127]
        );
    }
}
