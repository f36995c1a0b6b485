//! Features of frozen towers, remembered by input.
//!
//! A frozen tower (the pretrained CNN image tower, a locked text tower) maps
//! the same input to the same features every time, and without
//! augmentation an epoch shows it the same inputs again. [`FeatureCache`]
//! keeps each row's output under a 64-bit hash of the row's input values
//! (pixels, or a text's unpadded token ids), so that only unseen rows go
//! through the tower. Training then costs the trained heads and objectives
//! alone after the first epoch, which is what makes LiT-style runs cheap on
//! a CPU.
//!
//! Rows are computed in batches of the unseen ones. The towers work row by
//! row, so a row's features do not depend on the other rows of its batch,
//! except that a text padded to a longer batch sums its attention over more
//! (zero-weighted) slots, which can move the last bits; `tests/frozen_towers.rs`
//! checks cached against uncached training. Under random crops images never
//! repeat, so the trainer turns the image cache off.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use candle_core::{DType, Tensor};
use cots_encoders::two_stream::TwoStream;

use crate::Result;

/// At most this many floats per cache (1 GiB); rows beyond are computed and
/// not kept.
const MAX_FLOATS: usize = 1 << 28;

/// Remembered rows of one tower's output.
#[derive(Debug)]
pub struct FeatureCache {
    /// Off: every row is computed and nothing is kept (the trainer turns
    /// the image cache off under random crops, where inputs never repeat).
    pub enabled: bool,
    rows: HashMap<u64, Vec<f32>>,
    floats: usize,
    pub hits: u64,
    pub misses: u64,
}

impl Default for FeatureCache {
    fn default() -> Self {
        Self {
            enabled: true,
            rows: HashMap::new(),
            floats: 0,
            hits: 0,
            misses: 0,
        }
    }
}

/// A tower whose weights never change during training, seen through its
/// pooled output: the pretrained CNN image tower, or a locked text tower
/// (`model.lock_text`). The trained projection on top (and its momentum
/// copy) reads the pooled features, remembered per input in `cache`.
#[derive(Debug, Default)]
pub struct FrozenTower {
    pub cache: FeatureCache,
}

impl FrozenTower {
    /// The `[B, D]` pooled features of the CNN image tower for `[B, 3, H, W]`
    /// pixels.
    pub fn image(&mut self, model: &TwoStream, pixels: &Tensor) -> Result<Tensor> {
        let device = pixels.device().clone();
        self.cache.features(
            pixels.dim(0)?,
            || pixel_keys(pixels),
            |picked| {
                let rows = pixels.index_select(&row_index(picked, &device)?, 0)?;
                let hidden = model.encode_image(&rows, None, None)?.hidden;
                Ok(hidden.get_on_dim(1, 0)?)
            },
            &device,
        )
    }

    /// The `[B, D]` pooled states of the locked text tower (no dropout,
    /// detached) for `[B, L]` ids and attention mask.
    pub fn text(&mut self, model: &TwoStream, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let device = ids.device().clone();
        self.cache.features(
            ids.dim(0)?,
            || text_keys(ids, mask),
            |picked| {
                let idx = row_index(picked, &device)?;
                let (ids, mask) = (ids.index_select(&idx, 0)?, mask.index_select(&idx, 0)?);
                let hidden = model.text().forward(&ids, None, Some(&mask), None)?;
                Ok(model.pool_text(&hidden, Some(&mask))?.detach())
            },
            &device,
        )
    }
}

fn row_index(picked: &[usize], device: &candle_core::Device) -> Result<Tensor> {
    let idx: Vec<u32> = picked.iter().map(|&i| i as u32).collect();
    Ok(Tensor::new(idx, device)?)
}

/// A fixed-seed hash of 32-bit values, so that keys are the same in every
/// process.
fn hash_row(values: &[u32]) -> u64 {
    let mut h = ahash::RandomState::with_seeds(
        0x243f_6a88_85a3_08d3,
        0x1319_8a2e_0370_7344,
        0xa409_3822_299f_31d0,
        0x082e_fa98_ec4e_6c89,
    )
    .build_hasher();
    h.write_usize(values.len());
    h.write(bytemuck::cast_slice(values));
    h.finish()
}

/// One key per image, from its pixel values.
///
/// # Shapes
/// - `pixels`: `[B, ...]` (f32 or convertible).
pub fn pixel_keys(pixels: &Tensor) -> Result<Vec<u64>> {
    Ok(pixels
        .flatten_from(1)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?
        .into_iter()
        .map(|r| hash_row(&r.into_iter().map(f32::to_bits).collect::<Vec<_>>()))
        .collect())
}

/// One key per text: its token ids where the attention mask is 1, so that
/// a caption has one key whatever its batch was padded to.
///
/// # Shapes
/// - `ids`, `attention_mask`: `[B, L]` u32.
pub fn text_keys(ids: &Tensor, attention_mask: &Tensor) -> Result<Vec<u64>> {
    let ids = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let mask = attention_mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    Ok(ids
        .iter()
        .zip(&mask)
        .map(|(row, m)| {
            let kept: Vec<u32> = row
                .iter()
                .zip(m)
                .filter(|(_, &k)| k != 0)
                .map(|(&t, _)| t)
                .collect();
            hash_row(&kept)
        })
        .collect())
}

impl FeatureCache {
    /// The `[B, D]` features of `rows` inputs whose keys `keys` gives:
    /// remembered ones are looked up; the others are computed together by
    /// `compute`, given their row indices (ascending, each key once), which
    /// must return `[n, D]`. When the cache is off, `compute` gets every row
    /// and no key is made.
    pub fn features(
        &mut self,
        rows: usize,
        keys: impl FnOnce() -> Result<Vec<u64>>,
        compute: impl FnOnce(&[usize]) -> Result<Tensor>,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        if !self.enabled {
            return compute(&(0..rows).collect::<Vec<_>>());
        }
        let keys = keys()?;
        let mut missing = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, k) in keys.iter().enumerate() {
            if !self.rows.contains_key(k) && seen.insert(*k) {
                missing.push(i);
            }
        }
        self.misses += missing.len() as u64;
        self.hits += (keys.len() - missing.len()) as u64;
        let mut fresh: HashMap<u64, Vec<f32>> = HashMap::new();
        if !missing.is_empty() {
            let out = compute(&missing)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (i, row) in missing.iter().zip(out) {
                fresh.insert(keys[*i], row);
            }
        }
        let mut data = Vec::new();
        let mut width = 0;
        for k in &keys {
            let row = fresh.get(k).or_else(|| self.rows.get(k)).ok_or_else(|| {
                crate::Error::Config("feature cache: a computed row went missing".into())
            })?;
            width = row.len();
            data.extend_from_slice(row);
        }
        for (k, row) in fresh {
            if self.floats + row.len() <= MAX_FLOATS {
                self.floats += row.len();
                self.rows.insert(k, row);
            }
        }
        Ok(Tensor::from_vec(data, (keys.len(), width), device)?)
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rows_are_computed_once_and_returned_in_order() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [1.0, 2.0]], &dev)?;
        let keys = pixel_keys(&x)?;
        assert_eq!(keys[0], keys[2]);
        assert_ne!(keys[0], keys[1]);
        let mut cache = FeatureCache::default();
        let mut asked = Vec::new();
        let f = |rows: &[usize]| -> Result<Tensor> {
            asked.push(rows.to_vec());
            let idx = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), &dev)?;
            Ok((x.index_select(&idx, 0)? * 10.0)?)
        };
        let out = cache.features(3, || Ok(keys.clone()), f, &dev)?;
        assert_eq!(
            out.to_vec2::<f32>()?,
            vec![vec![10., 20.], vec![30., 40.], vec![10., 20.]]
        );
        assert_eq!(asked, vec![vec![0, 1]]);
        assert_eq!((cache.hits, cache.misses, cache.len()), (1, 2, 2));

        // A second batch: one known row, one new; only the new one is computed.
        let y = Tensor::new(&[[3f32, 4.0], [5.0, 6.0]], &dev)?;
        let keys = pixel_keys(&y)?;
        let mut asked2 = Vec::new();
        let out = cache.features(
            2,
            || Ok(keys),
            |rows: &[usize]| {
                asked2.push(rows.to_vec());
                Ok(Tensor::new(&[[50f32, 60.0]], &dev)?)
            },
            &dev,
        )?;
        assert_eq!(out.to_vec2::<f32>()?, vec![vec![30., 40.], vec![50., 60.]]);
        assert_eq!(asked2, vec![vec![1]]);

        // Keys see the mask: the same ids under another mask differ.
        let ids = Tensor::new(&[[2u32, 5, 0], [2, 5, 0]], &dev)?;
        let mask = Tensor::new(&[[1u32, 1, 0], [1, 1, 1]], &dev)?;
        let k = text_keys(&ids, &mask)?;
        assert_ne!(k[0], k[1]);

        // Off: every row computed, nothing kept or counted.
        let mut off = FeatureCache {
            enabled: false,
            ..FeatureCache::default()
        };
        let out = off.features(
            2,
            || panic!("no keys when off"),
            |rows: &[usize]| {
                assert_eq!(rows, [0, 1]);
                Ok(y.clone())
            },
            &dev,
        )?;
        assert_eq!(out.to_vec2::<f32>()?, y.to_vec2::<f32>()?);
        assert_eq!((off.hits, off.misses, off.len()), (0, 0, 0));
        // A text's key ignores padding but not its tokens.
        let a = text_keys(
            &Tensor::new(&[[2u32, 5, 3]], &dev)?,
            &Tensor::new(&[[1u32, 1, 1]], &dev)?,
        )?;
        let b = text_keys(
            &Tensor::new(
                &[[2u32, 5, 3, 0, 0], [2, 5, 0, 0, 0], [2, 5, 3, 9, 0]],
                &dev,
            )?,
            &Tensor::new(
                &[[1u32, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]],
                &dev,
            )?,
        )?;
        assert_eq!(a[0], b[0]);
        assert_ne!(b[0], b[1]);
        assert_ne!(b[0], b[2]);
        Ok(())
    }
}
