//! `cots build-emoji` and `cots build-emoji-video`: the multi-style emoji
//! benchmark and its animated twin from unpacked npm packages. `cargo xtask
//! data emoji` (`emoji-video`) downloads and verifies the packages and then
//! runs these; the work lives in `cots_datasets::emoji` (`cots_datasets::emoji_video`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use cots_datasets::emoji::{self, BuildOptions};
use cots_datasets::emoji_video::{self, Progress, VideoBuildOptions};

#[derive(Debug, Args)]
pub struct BuildEmojiArgs {
    /// Folder of unpacked npm packages, each under its npm name
    /// (`emojibase-data/`, `@iconify-json/fluent-emoji/`, ...).
    #[arg(long)]
    pub packages: PathBuf,
    /// Output folder: manifest.jsonl, test-<style>.jsonl, images/, stats.json,
    /// LICENSES.md.
    #[arg(long, default_value = "data/emoji")]
    pub out: PathBuf,
    /// Side of every output image in pixels (the demo-sized model reads 64).
    #[arg(long, default_value_t = 64)]
    pub size: u32,
}

pub fn build_emoji(quiet: bool, a: BuildEmojiArgs) -> Result<()> {
    let opts = BuildOptions {
        size: a.size,
        ..BuildOptions::default()
    };
    let started = std::time::Instant::now();
    let stats = emoji::build(&a.packages, &a.out, &opts, &mut |line| {
        tracing::info!("{line}")
    })
    .with_context(|| {
        format!(
            "building the emoji benchmark from {} into {}",
            a.packages.display(),
            a.out.display()
        )
    })?;
    for f in &stats.failures {
        tracing::warn!("left out {} {}: {}", f.style, f.key, f.error);
    }
    if !quiet {
        let images: usize = stats.styles.iter().map(|s| s.images).sum();
        outln!(
            "{}: {} concepts in {} families (train/val/test {}/{}/{}), {} styles ({} held out: {}), \
             {} images, manifest items train/val/test {}/{}/{}, {} failures, {:.0} s",
            a.out.display(),
            stats.concepts,
            stats.families,
            stats.concepts_by_split.train,
            stats.concepts_by_split.val,
            stats.concepts_by_split.test,
            stats.styles.len(),
            stats.held_out_styles.len(),
            stats.held_out_styles.join(", "),
            images,
            stats.manifest_items.train,
            stats.manifest_items.val,
            stats.manifest_items.test,
            stats.failures.len(),
            started.elapsed().as_secs_f64()
        )?;
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct BuildEmojiVideoArgs {
    /// Folder of unpacked npm packages, each under its npm name
    /// (`emojibase-data/`, `@lobehub/fluent-emoji-anim-1/`, ...).
    #[arg(long)]
    pub packages: PathBuf,
    /// Output folder: manifest.jsonl, test.jsonl, eval-test.toml, videos/,
    /// stats.json, LICENSES.md.
    #[arg(long, default_value = "data/emoji-video")]
    pub out: PathBuf,
    /// Side of every frame in pixels (the emoji image model reads 64).
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// At most this many evenly spaced frames per video (the first is always kept).
    #[arg(long, default_value_t = emoji_video::DEFAULT_MAX_FRAMES)]
    pub frames: usize,
}

pub fn build_emoji_video(quiet: bool, a: BuildEmojiVideoArgs) -> Result<()> {
    let opts = VideoBuildOptions {
        size: a.size,
        max_frames: a.frames,
    };
    let started = std::time::Instant::now();
    let bar = cots_train::metrics::progress_bar("animations ", 0, quiet);
    let progress = |p: Progress<'_>| match p {
        Progress::Stage(line) => bar.suspend(|| tracing::info!("{line}")),
        Progress::Start { total } => bar.set_length(total as u64),
        Progress::Done => bar.inc(1),
    };
    let stats = emoji_video::build(&a.packages, &a.out, &opts, &progress).with_context(|| {
        format!(
            "building the animated emoji benchmark from {} into {}",
            a.packages.display(),
            a.out.display()
        )
    })?;
    bar.finish_and_clear();
    for f in &stats.failures {
        tracing::warn!("left out {}: {}", f.key, f.error);
    }
    if !quiet {
        outln!(
            "{}: {} videos of {} concepts with an animation ({} stills left out, {} failures), \
             {} families, train/val/test videos {}/{}/{}, {}-{} source frames cut to {}-{}, \
             {} written, {:.0} s",
            a.out.display(),
            stats.videos,
            stats.animation_files,
            stats.stills,
            stats.failures.len(),
            stats.families,
            stats.videos_by_split.train,
            stats.videos_by_split.val,
            stats.videos_by_split.test,
            stats.source_frames.min,
            stats.source_frames.max,
            stats.frames.min,
            stats.frames.max,
            stats.written,
            started.elapsed().as_secs_f64()
        )?;
    }
    Ok(())
}
