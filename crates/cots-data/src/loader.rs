//! How do batches reach the trainer, fast, bounded and resumable?
//!
//! The order of an epoch is a seeded shuffle of every (image, caption) pair,
//! a pure function of `(seed, epoch)`; batch `b` of epoch `e` is always the
//! same pairs, whatever the number of threads. A worker thread decodes and
//! tokenises batches ahead of the trainer into a bounded channel (memory stays
//! at `prefetch` batches whatever the dataset size), decoding the images of a
//! batch in parallel. [`Loader::position`] names the next batch to be handed
//! out; a loader built from a saved position hands out exactly the batches
//! the uninterrupted run would have.
//!
//! Before the first batch, [`Loader::new`] probes every image file once
//! ([`check_images`]: headers and dimensions, SVG budgets, in parallel), so
//! a missing or corrupt file is found at load, named with its manifest line,
//! rather than when its batch is drawn. Under [`SkipPolicy::Skip`] the
//! files it refuses are left out of the order, and every unreadable file,
//! refused up front or failing later, is reported exactly once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use cots_text::TextTokenizer;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::image_io::{self, load_clip, load_rgb, random_resized_crop, to_chw, ImageConfig};
use crate::video::SampleMode;
use crate::{Dataset, Error, ImageSource, Result};

/// Batch size, order and input shapes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub seed: u64,
    /// Longest tokenised caption, `[CLS]` and `[SEP]` included.
    pub max_text_len: usize,
    /// Batches decoded ahead of the trainer.
    pub prefetch: usize,
    pub image: ImageConfig,
    /// Random resized crop `(min, max)` area fractions for training; `None`
    /// (the default) uses resize + centre crop, which keeps "left of" true.
    /// Images only: clips are always fitted by resize + centre crop.
    pub random_crop: Option<(f32, f32)>,
    /// What to do with an image that cannot be read.
    pub on_bad_input: SkipPolicy,
}

/// What the loader does with an unreadable image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SkipPolicy {
    /// Stop with an error naming the file (the default).
    #[default]
    Fail,
    /// Replace the sample by the next readable item, deterministically, and
    /// record it; [`Loader::skipped`] lists every skip for the run's report.
    Skip,
}

/// One skipped sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub source: String,
    pub reason: String,
}

/// An image file [`check_images`] could not read.
#[derive(Debug)]
pub struct BadImage {
    /// Every item that names the file, in dataset order.
    pub items: Vec<usize>,
    /// Why, naming the manifest entry of the first of `items` and the file.
    pub error: Error,
}

/// Probes every image file of `data` once (several items may share a file)
/// without decoding pixels: a raster file's header and dimensions, an SVG's
/// budgets and structure ([`image_io::probe`]). Files are probed in
/// parallel; `progress(done, total)` is called after each, from any thread.
/// Videos and synthetic sources are not probed. Returns the unreadable
/// files in dataset order.
pub fn check_images(data: &Dataset, progress: &(dyn Fn(usize, usize) + Sync)) -> Vec<BadImage> {
    let mut files: Vec<(&std::path::Path, Vec<usize>)> = Vec::new();
    let mut index: std::collections::HashMap<&std::path::Path, usize> = Default::default();
    for (i, item) in data.items.iter().enumerate() {
        if let ImageSource::Path(p) = &item.source {
            let k = *index.entry(p.as_path()).or_insert_with(|| {
                files.push((p.as_path(), Vec::new()));
                files.len() - 1
            });
            files[k].1.push(i);
        }
    }
    let done = AtomicUsize::new(0);
    let total = files.len();
    let errors: Vec<Option<Error>> = files
        .par_iter()
        .map(|(path, _)| {
            let result = image_io::probe(path).err();
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
            result
        })
        .collect();
    files
        .into_iter()
        .zip(errors)
        .filter_map(|((_, items), error)| {
            error.map(|e| BadImage {
                error: data.items[items[0]].locate(e),
                items,
            })
        })
        .collect()
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 32,
            seed: 0,
            max_text_len: 32,
            prefetch: 4,
            image: ImageConfig::default(),
            random_crop: None,
            on_bad_input: SkipPolicy::Fail,
        }
    }
}

/// Where a loader stands: the next batch it will hand out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderPosition {
    pub epoch: u64,
    pub batch: u64,
}

/// One batch of pairs, on the CPU.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `[B, 3, H, W]` f32, normalised; `[B, T, 3, H, W]` for clips
    /// ([`ImageConfig::frames`]).
    pub pixels: Tensor,
    /// `[B, L]` u32.
    pub input_ids: Tensor,
    /// `[B, L]` u32, 1 keep / 0 pad.
    pub attention_mask: Tensor,
    /// `[B]` u32 image ids.
    pub image_ids: Tensor,
    /// Host copies for masking and logging.
    pub ids_host: Vec<u32>,
    pub mask_host: Vec<u32>,
    pub captions: Vec<String>,
    pub item_indices: Vec<usize>,
    /// Where this batch sits in the order.
    pub position: LoaderPosition,
    /// Items replaced in this batch under [`SkipPolicy::Skip`], in slot order.
    pub skipped: Vec<Skipped>,
}

/// The pairs of epoch `epoch`, shuffled by `(seed, epoch)`.
pub fn epoch_order(pairs: &[(usize, usize)], seed: u64, epoch: u64) -> Vec<(usize, usize)> {
    let mut order = pairs.to_vec();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

/// Pixels of item `i` for slot `slot` of the order, with the configured
/// crop; under [`SkipPolicy::Skip`] an unreadable item is replaced by the next
/// readable one, and every item passed over is returned as a [`Skipped`].
/// Items in `excluded` (refused by [`check_images`], and already reported)
/// are passed over silently. Errors name the item's manifest entry.
fn pixels_for(
    data: &Dataset,
    cfg: &LoaderConfig,
    excluded: &HashSet<usize>,
    i: usize,
    position: LoaderPosition,
    slot: usize,
) -> Result<(usize, Vec<f32>, Vec<Skipped>)> {
    let n = data.items.len();
    let mut err = None;
    let mut skipped = Vec::new();
    for attempt in 0..n {
        let idx = (i + attempt) % n;
        if excluded.contains(&idx) {
            continue;
        }
        let item = &data.items[idx];
        let source = &item.source;
        if let Some(frames) = cfg.image.frames {
            // A clip: TSN sampling seeded by the sample's place in the order.
            let mode = SampleMode::Train {
                seed: cfg.seed,
                epoch: position.epoch,
                index: slot as u64,
            };
            match load_clip(source, frames, mode, &cfg.image).map_err(|e| item.locate(e)) {
                Ok(pixels) => return Ok((idx, pixels, skipped)),
                Err(e) if cfg.on_bad_input == SkipPolicy::Skip => {
                    skipped.push(Skipped {
                        source: source.describe(),
                        reason: e.to_string(),
                    });
                    err = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        let rgb = match (cfg.random_crop, source) {
            (Some(scale), _) => load_rgb(
                source,
                &ImageConfig {
                    size: 2 * cfg.image.size,
                    ..cfg.image.clone()
                },
            )
            .map(|img| {
                // Seeded by the sample's place in the order, not by thread timing.
                let seed = cfg.seed
                    ^ position.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ (slot as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                random_resized_crop(
                    &img,
                    cfg.image.size,
                    scale,
                    &mut ChaCha8Rng::seed_from_u64(seed),
                )
            }),
            (None, _) => load_rgb(source, &cfg.image),
        }
        .map_err(|e| item.locate(e));
        match rgb {
            Ok(img) => return Ok((idx, to_chw(&img, &cfg.image), skipped)),
            Err(e) if cfg.on_bad_input == SkipPolicy::Skip => {
                skipped.push(Skipped {
                    source: source.describe(),
                    reason: e.to_string(),
                });
                err = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(err.unwrap_or(Error::EmptySplit {
        split: crate::Split::Train,
    }))
}

/// Decodes and tokenises the pairs of one batch.
pub fn make_batch(
    data: &Dataset,
    tokenizer: &TextTokenizer,
    cfg: &LoaderConfig,
    pairs: &[(usize, usize)],
    position: LoaderPosition,
) -> Result<Batch> {
    make_batch_excluding(data, tokenizer, cfg, &HashSet::new(), pairs, position)
}

/// [`make_batch`], never substituting an item of `excluded`.
fn make_batch_excluding(
    data: &Dataset,
    tokenizer: &TextTokenizer,
    cfg: &LoaderConfig,
    excluded: &HashSet<usize>,
    pairs: &[(usize, usize)],
    position: LoaderPosition,
) -> Result<Batch> {
    let first_slot = position.batch as usize * cfg.batch_size;
    let loaded: Vec<(usize, Vec<f32>, Vec<Skipped>)> = pairs
        .par_iter()
        .enumerate()
        .map(|(s, &(i, _))| pixels_for(data, cfg, excluded, i, position, first_slot + s))
        .collect::<Result<_>>()?;
    // In slot order, whatever order the threads finished in.
    let skipped: Vec<Skipped> = loaded.iter().flat_map(|l| l.2.clone()).collect();
    // A replaced image brings its own caption, so the pair stays a true pair.
    let pairs: Vec<(usize, usize)> = pairs
        .iter()
        .zip(&loaded)
        .map(|(&(i, c), &(idx, _, _))| if idx == i { (i, c) } else { (idx, 0) })
        .collect();
    let pixels: Vec<Vec<f32>> = loaded.into_iter().map(|(_, p, _)| p).collect();
    let captions: Vec<String> = pairs
        .iter()
        .map(|&(i, c)| data.items[i].captions[c].clone())
        .collect();
    let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
    let tokens = tokenizer.encode_batch(&refs, cfg.max_text_len)?;
    let (input_ids, attention_mask) = tokens.to_tensors(&Device::Cpu)?;
    let b = pairs.len();
    let s = cfg.image.size;
    let pixels = match cfg.image.frames {
        Some(t) => Tensor::from_vec(pixels.concat(), (b, t, 3, s, s), &Device::Cpu)?,
        None => Tensor::from_vec(pixels.concat(), (b, 3, s, s), &Device::Cpu)?,
    };
    let image_ids: Vec<u32> = pairs.iter().map(|&(i, _)| data.items[i].id).collect();
    Ok(Batch {
        pixels,
        input_ids,
        attention_mask,
        image_ids: Tensor::from_vec(image_ids, b, &Device::Cpu)?,
        ids_host: tokens.ids.clone(),
        mask_host: tokens.attention_mask.clone(),
        captions,
        item_indices: pairs.iter().map(|p| p.0).collect(),
        position,
        skipped,
    })
}

/// The prefetching training loader (see the module doc).
pub struct Loader {
    rx: Receiver<Result<Batch>>,
    skipped: Vec<Skipped>,
    /// Sources already in `skipped`: a file is reported once however many
    /// samples it spoils.
    reported: HashSet<String>,
    next: LoaderPosition,
    batches_per_epoch: u64,
    _worker: JoinHandle<()>,
}

impl Loader {
    /// Starts loading at `start`; incomplete final batches are dropped.
    /// Every image file is probed first ([`check_images`]): under
    /// [`SkipPolicy::Fail`] the first unreadable one is an error naming its
    /// manifest entry; under [`SkipPolicy::Skip`] their items leave the
    /// order and each file is reported once in [`Self::skipped`].
    pub fn new(
        data: Arc<Dataset>,
        tokenizer: Arc<TextTokenizer>,
        cfg: LoaderConfig,
        start: LoaderPosition,
    ) -> Result<Self> {
        Self::with_progress(data, tokenizer, cfg, start, &|_, _| {})
    }

    /// [`Self::new`], calling `progress(done, total)` as image files are
    /// probed (for a progress bar on large manifests).
    pub fn with_progress(
        data: Arc<Dataset>,
        tokenizer: Arc<TextTokenizer>,
        cfg: LoaderConfig,
        start: LoaderPosition,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<Self> {
        data.validate()?;
        let mut bad = check_images(&data, progress);
        let mut skipped = Vec::new();
        let mut reported = HashSet::new();
        let mut excluded = HashSet::new();
        if !bad.is_empty() {
            if cfg.on_bad_input == SkipPolicy::Fail {
                return Err(bad.swap_remove(0).error);
            }
            for b in bad {
                let source = data.items[b.items[0]].source.describe();
                reported.insert(source.clone());
                skipped.push(Skipped {
                    source,
                    reason: b.error.to_string(),
                });
                excluded.extend(b.items);
            }
        }
        let mut pairs = data.pairs();
        pairs.retain(|(i, _)| !excluded.contains(i));
        let batches_per_epoch = (pairs.len() / cfg.batch_size.max(1)) as u64;
        if batches_per_epoch == 0 {
            return Err(Error::Manifest {
                path: "<dataset>".into(),
                line: 0,
                message: format!(
                    "{} pairs cannot fill one batch of {}",
                    pairs.len(),
                    cfg.batch_size
                ),
            });
        }
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        let worker = std::thread::spawn(move || {
            let mut pos = start;
            loop {
                let order = epoch_order(&pairs, cfg.seed, pos.epoch);
                while pos.batch < batches_per_epoch {
                    let b0 = (pos.batch as usize) * cfg.batch_size;
                    let batch = make_batch_excluding(
                        &data,
                        &tokenizer,
                        &cfg,
                        &excluded,
                        &order[b0..b0 + cfg.batch_size],
                        pos,
                    );
                    let failed = batch.is_err();
                    // A closed channel means the trainer is done with us.
                    if tx.send(batch).is_err() || failed {
                        return;
                    }
                    pos.batch += 1;
                }
                pos = LoaderPosition {
                    epoch: pos.epoch + 1,
                    batch: 0,
                };
            }
        });
        Ok(Self {
            rx,
            skipped,
            reported,
            next: start,
            batches_per_epoch,
            _worker: worker,
        })
    }

    /// The next batch, in order.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let batch = self.rx.recv().map_err(|_| Error::WorkerGone)??;
        for s in &batch.skipped {
            if self.reported.insert(s.source.clone()) {
                self.skipped.push(s.clone());
            }
        }
        self.next = if batch.position.batch + 1 < self.batches_per_epoch {
            LoaderPosition {
                epoch: batch.position.epoch,
                batch: batch.position.batch + 1,
            }
        } else {
            LoaderPosition {
                epoch: batch.position.epoch + 1,
                batch: 0,
            }
        };
        Ok(batch)
    }

    /// The position of the next batch [`Self::next_batch`] returns.
    pub fn position(&self) -> LoaderPosition {
        self.next
    }

    pub fn batches_per_epoch(&self) -> u64 {
        self.batches_per_epoch
    }

    /// Every unreadable image file under [`SkipPolicy::Skip`], once each:
    /// those [`check_images`] refused at the start, then those that failed
    /// to decode in the batches handed out so far (not those the worker has
    /// prefetched), in the order they were first met.
    pub fn skipped(&self) -> Vec<Skipped> {
        self.skipped.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{vocabulary, SyntheticConfig};
    use crate::Split;

    fn setup() -> (Arc<Dataset>, Arc<TextTokenizer>, LoaderConfig) {
        let cfg = SyntheticConfig {
            train: 40,
            val: 4,
            test: 6,
            image_size: 16,
            seed: 1,
        };
        let data = Dataset::synthetic(&cfg).split(Split::Train).unwrap();
        let tok = TextTokenizer::from_words(&vocabulary()).unwrap();
        let lcfg = LoaderConfig {
            batch_size: 8,
            image: ImageConfig {
                size: 16,
                ..ImageConfig::default()
            },
            ..LoaderConfig::default()
        };
        (Arc::new(data), Arc::new(tok), lcfg)
    }

    #[test]
    fn resumed_loader_yields_the_same_batches() {
        let (data, tok, cfg) = setup();
        let mut full = Loader::new(
            data.clone(),
            tok.clone(),
            cfg.clone(),
            LoaderPosition::default(),
        )
        .unwrap();
        let per_epoch = full.batches_per_epoch();
        assert_eq!(per_epoch, (data.pairs().len() / 8) as u64);
        let all: Vec<Batch> = (0..per_epoch + 3)
            .map(|_| full.next_batch().unwrap())
            .collect();
        let cut = per_epoch as usize - 1;
        let mut resumed = Loader::new(data, tok, cfg, all[cut].position).unwrap();
        for want in &all[cut..] {
            let got = resumed.next_batch().unwrap();
            assert_eq!(got.captions, want.captions);
            assert_eq!(got.item_indices, want.item_indices);
            assert_eq!(
                got.pixels.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.pixels.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        // Epoch 1 is a different order from epoch 0.
        assert_ne!(all[0].item_indices, all[per_epoch as usize].item_indices);
    }

    #[test]
    fn a_corrupt_image_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("broken.png");
        std::fs::write(&bad, b"\x89PNG garbage").unwrap();
        let (_, tok, cfg) = setup();
        let data = Dataset {
            items: (0..8)
                .map(|i| crate::Item {
                    id: i,
                    source: crate::ImageSource::Path(bad.clone()),
                    captions: vec!["a red circle".into()],
                    split: Split::Train,
                    category: None,
                    origin: None,
                })
                .collect(),
        };
        // Found at load, before any batch is drawn.
        let e = Loader::new(
            Arc::new(data.clone()),
            tok.clone(),
            cfg.clone(),
            LoaderPosition::default(),
        )
        .err()
        .expect("a corrupt image fails the loader")
        .to_string();
        assert!(e.contains("broken.png"), "{e}");

        // Under the skip policy a bad item is replaced by the next good one and reported.
        let good = dir.path().join("good.png");
        image::RgbImage::new(20, 20).save(&good).unwrap();
        let mut mixed = data;
        for it in mixed.items.iter_mut().skip(1).step_by(2) {
            it.source = crate::ImageSource::Path(good.clone());
            it.captions = vec!["a good image".into()];
        }
        // The bad items leave the order, so four pairs remain for a batch.
        let skip = LoaderConfig {
            on_bad_input: SkipPolicy::Skip,
            batch_size: 4,
            ..cfg
        };
        let mut l = Loader::new(Arc::new(mixed), tok, skip, LoaderPosition::default()).unwrap();
        let b = l.next_batch().unwrap();
        assert!(
            b.captions.iter().all(|c| c == "a good image"),
            "{:?}",
            b.captions
        );
        // One bad file shared by four items is one skip.
        let skipped = l.skipped();
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped.iter().all(|s| s.source.contains("broken.png")));
    }
}
