//! The animated emoji benchmark: text-to-video retrieval on real animations.
//!
//! Microsoft's Fluent Emoji are also published animated: LobeHub packages
//! them as animated WebP files (256 px, about 72 frames at 24 fps) in the npm
//! packages `@lobehub/fluent-emoji-anim-1` to `-4` ([`ANIM_PACKAGES`]), one
//! file per emoji under `assets/`, named by codepoint like the static sets.
//! This module turns them into a video-text benchmark with the text, the
//! captions, the families and the split of the static emoji benchmark
//! ([`crate::emoji`]): the concepts are joined by [`emoji::normalize_codepoints`],
//! captioned by [`emoji::captions`], and a whole family goes to train, val or
//! test by [`emoji::split_of_family`], so the test concepts are unseen in
//! training here too, and a concept has the same id in both benchmarks.
//!
//! Each animation is decoded, composited over white, fitted to `size x size`
//! and cut to at most [`VideoBuildOptions::max_frames`] evenly spaced frames
//! ([`keep_indices`]: frame `floor(i F / k)` for `i < k`, so the first frame
//! is always kept), then written as a small lossless animated WebP
//! ([`cots_data::video::encode::write_webp`]) whose frame delay keeps the
//! original duration. A file that is not animated (one frame: many of the
//! packages' files are stills) is left out and counted in
//! [`VideoStats::stills`]; a file that cannot be decoded, holds no frame or
//! renders as one flat colour is left out and listed in
//! [`VideoStats::failures`] with the error naming it.
//!
//! ## Output layout
//! ```text
//! out/
//!   manifest.jsonl       the JSONL video manifest (`data.kind = "video_manifest"`):
//!                        every video, split by family (train / val / test)
//!   test.jsonl           the test split alone: one video per unseen test concept
//!   eval-test.toml       a run config naming test.jsonl, for `cots eval --data-config`
//!   videos/<key>.webp    animated WebP, RGB over white, size x size, <= max_frames frames
//!   stats.json           counts per split, frames, stills, packages and checksums, failures
//!   LICENSES.md          license and attribution of the animations and the text
//! ```
//! A line is `{"video": "videos/1f600.webp", "captions": [...], "split":
//! "test", "id": "26"}`; the id is the concept's index (as a string, the
//! video manifest's id type), the same index as in the static benchmark.
//!
//! The build is idempotent: a video already on disk with the expected size
//! and frame count is kept, every file is written under a temporary name and
//! renamed, and the manifests are rewritten each time.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use image::codecs::webp::WebPDecoder;
use image::{AnimationDecoder, RgbImage};
use rayon::prelude::*;
use serde::Serialize;

use crate::emoji::{
    self, io_err, package_version, plan, read_integrity, split_name, write_atomic, PackageStats,
    Planned, SplitCounts, TextSources, DATASOURCE, EMOJIBASE, OPENMOJI, TEXT_SOURCES,
};
use cots_data::video::decode::{count_webp_frames, fit_rgba};
use cots_data::video::{self, DecodeOptions};
use cots_data::{Error, Result, Split};

/// The npm packages of the animations, searched in this order (a key found
/// in an earlier package wins).
pub const ANIM_PACKAGES: [&str; 4] = [
    "@lobehub/fluent-emoji-anim-1",
    "@lobehub/fluent-emoji-anim-2",
    "@lobehub/fluent-emoji-anim-3",
    "@lobehub/fluent-emoji-anim-4",
];

/// The folder of each package that holds the animations.
pub const ANIM_DIR: &str = "assets";

/// SPDX identifier of the animations' license.
pub const ANIM_LICENSE: &str = "MIT";

/// Who made the animations.
pub const ANIM_ATTRIBUTION: &str = "Fluent Emoji by Microsoft Corporation \
     (https://github.com/microsoft/fluentui-emoji), animated renders packaged by LobeHub \
     (https://github.com/lobehub/fluent-emoji)";

/// At most this many frames per video by default: 16 of the usual 72 keep
/// every fourth or fifth frame, more than a video model samples (4 or 8).
pub const DEFAULT_MAX_FRAMES: usize = 16;

/// What to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VideoBuildOptions {
    /// Side of every frame, in pixels.
    pub size: u32,
    /// At most this many evenly spaced frames per video.
    pub max_frames: usize,
}

impl Default for VideoBuildOptions {
    fn default() -> Self {
        Self {
            size: 64,
            max_frames: DEFAULT_MAX_FRAMES,
        }
    }
}

impl VideoBuildOptions {
    fn validate(&self) -> Result<()> {
        if self.size < 8 {
            return Err(Error::Config(format!(
                "frame size {} is below 8 px",
                self.size
            )));
        }
        if self.max_frames < 2 {
            return Err(Error::Config(format!(
                "max_frames {} keeps no motion: a video needs at least 2 frames",
                self.max_frames
            )));
        }
        Ok(())
    }
}

/// What the build reports as it goes; the `cots build-emoji-video` command
/// draws a progress bar from it. Called from several threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress<'a> {
    /// A line about a stage.
    Stage(&'a str),
    /// The animations start; `total` of them will each report [`Progress::Done`].
    Start { total: usize },
    /// One animation is done (written, kept, or left out).
    Done,
}

/// The frames to keep of an animation of `frame_count` frames: `k =
/// min(frame_count, max_frames)` indices `floor(i * frame_count / k)`,
/// ascending, evenly spaced and starting at frame 0.
pub fn keep_indices(frame_count: usize, max_frames: usize) -> Vec<usize> {
    let k = frame_count.min(max_frames);
    (0..k)
        .map(|i| (i as u128 * frame_count as u128 / k as u128) as usize)
        .collect()
}

/// The animation file of each concept key found in the packages (each under
/// its npm name in `packages`), in [`ANIM_PACKAGES`] order: the first file
/// with a key wins. Files whose stem is not codepoints, and keys not in
/// `keys`, are ignored.
pub fn animation_files(packages: &Path, keys: &HashSet<&str>) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for name in ANIM_PACKAGES {
        let dir = packages.join(name).join(ANIM_DIR);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .map_err(io_err(&dir))?;
        // Sorted, so that of two files with one key the choice is stable.
        files.sort();
        for path in files {
            if !path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("webp"))
            {
                continue;
            }
            let Some(key) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(emoji::normalize_codepoints)
            else {
                continue;
            };
            if keys.contains(key.as_str()) {
                out.entry(key).or_insert(path);
            }
        }
    }
    Ok(out)
}

/// The kept frames of one animation.
#[derive(Clone, Debug, PartialEq)]
pub struct Animation {
    /// The frames at [`keep_indices`], fitted and over white.
    pub frames: Vec<RgbImage>,
    /// How many frames the source has.
    pub source_frames: usize,
    /// The source's total duration, in milliseconds.
    pub duration_ms: u64,
}

fn image_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Decodes an animated WebP and keeps at most `max_frames` evenly spaced
/// frames ([`keep_indices`]) at `size x size` over white. Every frame is
/// decoded (a WebP frame is drawn onto the ones before it), only the kept
/// ones are held. Errors name the file: unreadable or corrupt, no frames,
/// fewer frames decoded than its chunks announce, or every kept frame one
/// flat colour.
pub fn decode_animation(path: &Path, size: u32, max_frames: usize) -> Result<Animation> {
    let source_frames = count_webp_frames(path)?;
    if source_frames == 0 {
        return Err(video::Error::NoFrames {
            path: path.to_path_buf(),
        }
        .into());
    }
    let keep = keep_indices(source_frames, max_frames);
    let opts = DecodeOptions::square(size);
    let file = File::open(path).map_err(io_err(path))?;
    let decoder =
        WebPDecoder::new(BufReader::new(file)).map_err(|e| image_err(path, e.to_string()))?;
    let mut frames = Vec::with_capacity(keep.len());
    let mut duration_ms = 0u64;
    let mut decoded = 0;
    for (i, frame) in decoder.into_frames().enumerate() {
        let frame = frame.map_err(|e| image_err(path, format!("frame {i}: {e}")))?;
        let (num, den) = frame.delay().numer_denom_ms();
        duration_ms += u64::from(num) / u64::from(den.max(1));
        if keep.binary_search(&i).is_ok() {
            frames.push(fit_rgba(frame.buffer(), &opts));
        }
        decoded = i + 1;
    }
    if decoded != source_frames {
        return Err(image_err(
            path,
            format!("its chunks announce {source_frames} frames, {decoded} decoded (corrupt?)"),
        ));
    }
    let Some(first) = frames.first().map(|f| *f.get_pixel(0, 0)) else {
        return Err(video::Error::NoFrames {
            path: path.to_path_buf(),
        }
        .into());
    };
    if frames.iter().all(|f| f.pixels().all(|p| *p == first)) {
        return Err(image_err(
            path,
            format!("renders as one flat colour {:?}", first.0),
        ));
    }
    Ok(Animation {
        frames,
        source_frames,
        duration_ms,
    })
}

/// What became of one animation.
enum Outcome {
    /// A video of `frames` frames cut from `source_frames`; `written` by this
    /// run, or already on disk with the expected size and frame count.
    Made {
        source_frames: usize,
        frames: usize,
        written: bool,
    },
    /// One frame only: not a video.
    Still,
    Failed(Error),
}

/// Makes `dest` from `src` unless it is already there; a write error is
/// fatal (`Err`), an error of the animation only leaves it out.
fn make_video(src: &Path, dest: &Path, opts: &VideoBuildOptions) -> Result<Outcome> {
    let source_frames = match count_webp_frames(src) {
        Ok(0) => {
            return Ok(Outcome::Failed(
                video::Error::NoFrames {
                    path: src.to_path_buf(),
                }
                .into(),
            ))
        }
        Ok(1) => return Ok(Outcome::Still),
        Ok(n) => n,
        Err(e) => return Ok(Outcome::Failed(e.into())),
    };
    let frames = source_frames.min(opts.max_frames);
    let size = opts.size;
    if count_webp_frames(dest).ok() == Some(frames)
        && image::image_dimensions(dest).ok() == Some((size, size))
    {
        return Ok(Outcome::Made {
            source_frames,
            frames,
            written: false,
        });
    }
    let anim = match decode_animation(src, size, opts.max_frames) {
        Ok(a) => a,
        Err(e) => return Ok(Outcome::Failed(e)),
    };
    // Each kept frame stands for the stretch of source frames up to the
    // next one, so the video plays as long as the original.
    let delay = (anim.duration_ms as f64 / anim.frames.len() as f64).round() as u32;
    let mut tmp = dest.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    video::encode::write_webp(&tmp, &anim.frames, delay.max(1))?;
    std::fs::rename(&tmp, dest).map_err(io_err(dest))?;
    Ok(Outcome::Made {
        source_frames: anim.source_frames,
        frames: anim.frames.len(),
        written: true,
    })
}

/// Smallest, largest and mean of a count over the videos.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Range {
    pub min: usize,
    pub max: usize,
    pub mean: f64,
}

impl Range {
    fn of(values: &[usize]) -> Self {
        Self {
            min: values.iter().copied().min().unwrap_or(0),
            max: values.iter().copied().max().unwrap_or(0),
            mean: values.iter().sum::<usize>() as f64 / values.len().max(1) as f64,
        }
    }
}

/// An animation that could not be used; its concept is left out.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Failure {
    pub key: String,
    pub file: PathBuf,
    pub error: String,
}

/// What a build made: written to `stats.json` and returned.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VideoStats {
    pub size: u32,
    pub max_frames: usize,
    /// Concepts with at least one caption (as in the static benchmark).
    pub concepts: usize,
    /// Of those, concepts with a file in the animation packages.
    pub animation_files: usize,
    /// Files with one frame only, left out: not videos.
    pub stills: usize,
    /// Videos in the benchmark (written by this run or kept).
    pub videos: usize,
    /// Of those, written by this run.
    pub written: usize,
    /// Families of the videos' concepts.
    pub families: usize,
    pub videos_by_split: SplitCounts,
    pub families_by_split: SplitCounts,
    pub captions_per_video: f64,
    /// Frames of the source animations behind the videos.
    pub source_frames: Range,
    /// Frames of the written videos.
    pub frames: Range,
    pub packages: Vec<PackageStats>,
    pub failures: Vec<Failure>,
}

#[derive(Serialize)]
struct Line<'a> {
    video: String,
    captions: &'a [String],
    split: &'static str,
    id: String,
}

/// Builds the animated benchmark from a folder of unpacked npm packages (the
/// three text packages of [`crate::emoji`] and [`ANIM_PACKAGES`], each under
/// its npm name) into `out` (see the module doc for the layout). A bad
/// animation is left out and listed in [`VideoStats::failures`]; a missing
/// package, unreadable text or a failed write is an error.
pub fn build(
    packages: &Path,
    out: &Path,
    opts: &VideoBuildOptions,
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<VideoStats> {
    opts.validate()?;
    let planned = plan(emoji::join(&TextSources::read(packages)?)?);
    let keys: HashSet<&str> = planned.iter().map(|p| p.concept.key.as_str()).collect();
    let files = animation_files(packages, &keys)?;
    progress(Progress::Stage(&format!(
        "{} concepts with captions, {} with an animation file",
        planned.len(),
        files.len()
    )));

    let videos_dir = out.join("videos");
    std::fs::create_dir_all(&videos_dir).map_err(io_err(&videos_dir))?;
    progress(Progress::Start { total: files.len() });
    let results: Vec<(&String, &PathBuf, Result<Outcome>)> = files
        .par_iter()
        .map(|(key, src)| {
            let dest = videos_dir.join(format!("{key}.webp"));
            let outcome = make_video(src, &dest, opts);
            progress(Progress::Done);
            (key, src, outcome)
        })
        .collect();

    let mut made: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let (mut stills, mut written) = (0, 0);
    let mut failures = Vec::new();
    for (key, src, outcome) in results {
        match outcome? {
            Outcome::Made {
                source_frames,
                frames,
                written: w,
            } => {
                written += usize::from(w);
                made.insert(key, (source_frames, frames));
            }
            Outcome::Still => stills += 1,
            Outcome::Failed(e) => failures.push(Failure {
                key: key.clone(),
                file: src.clone(),
                error: e.to_string(),
            }),
        }
    }
    progress(Progress::Stage(&format!(
        "{} videos ({written} written, {} kept), {stills} stills left out, {} failures",
        made.len(),
        made.len() - written,
        failures.len()
    )));

    let line = |p: &Planned| -> Result<String> {
        serde_json::to_string(&Line {
            video: format!("videos/{}.webp", p.concept.key),
            captions: &p.captions,
            split: split_name(p.split),
            id: p.id.to_string(),
        })
        .map_err(|e| Error::Config(format!("cannot serialise a manifest line: {e}")))
    };
    let (mut manifest, mut test) = (String::new(), String::new());
    let mut videos_by_split = SplitCounts::default();
    let mut families: BTreeMap<&str, Split> = BTreeMap::new();
    let mut n_captions = 0;
    for p in planned
        .iter()
        .filter(|p| made.contains_key(p.concept.key.as_str()))
    {
        let l = line(p)?;
        manifest.push_str(&l);
        manifest.push('\n');
        if p.split == Split::Test {
            test.push_str(&l);
            test.push('\n');
        }
        videos_by_split.add(p.split);
        families.insert(&p.family, p.split);
        n_captions += p.captions.len();
    }
    let mut families_by_split = SplitCounts::default();
    families.values().for_each(|&s| families_by_split.add(s));
    write_atomic(&out.join("manifest.jsonl"), manifest.as_bytes())?;
    let test_path = out.join("test.jsonl");
    write_atomic(&test_path, test.as_bytes())?;
    write_atomic(
        &out.join("eval-test.toml"),
        eval_config(&test_path)?.as_bytes(),
    )?;

    let integrity = read_integrity(packages)?;
    let packages_stats = [EMOJIBASE, DATASOURCE, OPENMOJI]
        .into_iter()
        .chain(ANIM_PACKAGES)
        .map(|name| {
            Ok(PackageStats {
                name: name.into(),
                version: package_version(packages, name)?,
                integrity: integrity.get(name).cloned(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let source: Vec<usize> = made.values().map(|v| v.0).collect();
    let kept: Vec<usize> = made.values().map(|v| v.1).collect();
    let stats = VideoStats {
        size: opts.size,
        max_frames: opts.max_frames,
        concepts: planned.len(),
        animation_files: files.len(),
        stills,
        videos: made.len(),
        written,
        families: families.len(),
        videos_by_split,
        families_by_split,
        captions_per_video: n_captions as f64 / made.len().max(1) as f64,
        source_frames: Range::of(&source),
        frames: Range::of(&kept),
        packages: packages_stats,
        failures,
    };
    let json = serde_json::to_string_pretty(&stats)
        .map_err(|e| Error::Config(format!("cannot serialise stats: {e}")))?;
    write_atomic(&out.join("stats.json"), json.as_bytes())?;
    write_atomic(&out.join("LICENSES.md"), licenses_md(&stats).as_bytes())?;
    Ok(stats)
}

/// A run config naming the test split, for `cots eval --data-config`.
pub fn eval_config(test: &Path) -> Result<String> {
    crate::data_config(
        "The test split of the animated emoji benchmark: one video per unseen test concept.\n\
         cots eval --run <video run> --data-config <this file>\n\
         The run's own [data.image] (frames, frame_sampling) decides what the model sees;\n\
         `frames` here only satisfies the check that video data names a frame count.",
        cots_train::config::DataKind::VideoManifest,
        test,
        Some(4),
    )
}

/// `LICENSES.md`: the animations' license and attribution, and the text sources'.
fn licenses_md(stats: &VideoStats) -> String {
    let version = |name: &str| {
        stats
            .packages
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.version.clone())
            .unwrap_or_default()
    };
    let packages: BTreeSet<String> = ANIM_PACKAGES
        .iter()
        .map(|n| format!("`{n}@{}`", version(n)))
        .collect();
    let mut s = format!(
        "# Licenses of the animated emoji benchmark\n\n\
         Every video under `videos/` is a resized, frame-subsampled copy of an animation \
         from {}, composited over white. License: {ANIM_LICENSE}. {ANIM_ATTRIBUTION}.\n\n\
         ## Text\n\n| package | license | used for |\n|---|---|---|\n",
        packages.into_iter().collect::<Vec<_>>().join(", ")
    );
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

    #[test]
    fn kept_frames_are_evenly_spaced_and_start_at_the_first() {
        assert_eq!(
            keep_indices(72, 16),
            [0, 4, 9, 13, 18, 22, 27, 31, 36, 40, 45, 49, 54, 58, 63, 67]
        );
        assert_eq!(keep_indices(5, 16), [0, 1, 2, 3, 4]);
        assert_eq!(keep_indices(16, 16), (0..16).collect::<Vec<_>>());
        assert_eq!(keep_indices(3, 2), [0, 1]);
        assert!(keep_indices(0, 16).is_empty());
        // Against the real-number definition on many lengths.
        for f in 1..200 {
            let idx = keep_indices(f, 16);
            let k = f.min(16);
            assert_eq!(idx.len(), k);
            for (i, &x) in idx.iter().enumerate() {
                assert_eq!(x, (i as f64 * f as f64 / k as f64).floor() as usize);
            }
            assert!(idx.windows(2).all(|w| w[0] < w[1]) && idx[k - 1] < f);
        }
    }

    #[test]
    fn options_reject_tiny_frames_and_single_frame_videos() {
        assert!(VideoBuildOptions::default().validate().is_ok());
        let e = VideoBuildOptions {
            size: 4,
            ..VideoBuildOptions::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("below 8"), "{e}");
        let e = VideoBuildOptions {
            max_frames: 1,
            ..VideoBuildOptions::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("at least 2 frames"), "{e}");
    }
}
