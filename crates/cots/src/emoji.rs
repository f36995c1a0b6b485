//! `cots build-emoji`: the multi-style emoji benchmark from unpacked npm
//! packages. `cargo xtask data emoji` downloads and verifies the packages and
//! then runs this; the work lives in `cots_data::emoji`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use cots_data::emoji::{self, BuildOptions};

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
        println!(
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
        );
    }
    Ok(())
}
