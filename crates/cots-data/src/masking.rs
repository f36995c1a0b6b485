//! Which tokens and patches are masked for masked vision-language modeling?
//!
//! BERT's MLM recipe for text (15 % of real tokens; of those 80 % become
//! `[MASK]`, 10 % a random token, 10 % stay) and BEiT's blockwise masking for
//! patches. Both draw from the generator they are given, so a seeded run
//! masks the same positions every time.

use cots_text::SpecialTokens;
use rand::Rng;

/// Label of a position that is not predicted (PyTorch's ignore index).
pub const IGNORE: i64 = -100;

/// BERT masking over a row-major `[B, L]` batch.
///
/// Returns `(masked ids, labels)`: labels hold the original id at masked
/// positions and [`IGNORE`] elsewhere. Special tokens and padding
/// (`attention_mask == 0`) are never masked.
pub fn mlm_mask<R: Rng>(
    ids: &[u32],
    attention_mask: &[u32],
    special: &SpecialTokens,
    vocab_size: usize,
    prob: f64,
    rng: &mut R,
) -> (Vec<u32>, Vec<i64>) {
    let specials = [
        special.pad,
        special.unk,
        special.cls,
        special.sep,
        special.mask,
    ];
    let mut masked = ids.to_vec();
    let mut labels = vec![IGNORE; ids.len()];
    for (i, (&id, &keep)) in ids.iter().zip(attention_mask).enumerate() {
        if keep == 0 || specials.contains(&id) || !rng.random_bool(prob) {
            continue;
        }
        labels[i] = i64::from(id);
        let roll: f64 = rng.random();
        masked[i] = if roll < 0.8 {
            special.mask
        } else if roll < 0.9 {
            rng.random_range(0..vocab_size as u32)
        } else {
            id
        };
    }
    (masked, labels)
}

/// BEiT blockwise masking of a `grid_h x grid_w` patch grid: rectangles of
/// random size and aspect are masked until about `ratio` of the patches are.
/// Returns one byte per patch (row-major), 1 = masked.
pub fn block_mask<R: Rng>(grid_h: usize, grid_w: usize, ratio: f64, rng: &mut R) -> Vec<u8> {
    let n = grid_h * grid_w;
    let target = ((n as f64) * ratio).round() as usize;
    let mut mask = vec![0u8; n];
    let mut count = 0;
    let min_block = 2usize.min(n.max(1));
    let mut attempts = 0;
    while count < target && attempts < 100 * n + 100 {
        attempts += 1;
        let remaining = target - count;
        let area = rng.random_range(min_block.min(remaining).max(1)..=remaining.max(1));
        let aspect = (rng.random_range((0.3f64).ln()..(1.0f64 / 0.3).ln())).exp();
        let h = (((area as f64) * aspect).sqrt().round() as usize).clamp(1, grid_h);
        let w = (((area as f64) / aspect).sqrt().round() as usize).clamp(1, grid_w);
        let top = rng.random_range(0..=grid_h - h);
        let left = rng.random_range(0..=grid_w - w);
        for y in top..top + h {
            for x in left..left + w {
                let p = y * grid_w + x;
                if mask[p] == 0 && count < target {
                    mask[p] = 1;
                    count += 1;
                }
            }
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn special() -> SpecialTokens {
        SpecialTokens {
            pad: 0,
            unk: 1,
            cls: 2,
            sep: 3,
            mask: 4,
        }
    }

    #[test]
    fn mlm_never_masks_specials_or_padding_and_labels_originals() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (b, l) = (64, 32);
        let mut ids = Vec::new();
        let mut att = Vec::new();
        for r in 0..b {
            let len = 5 + r % 20;
            for p in 0..l {
                let (id, keep) = match p {
                    0 => (2, 1),
                    p if p == len - 1 => (3, 1),
                    p if p < len => (10 + (p as u32 * 7 + r as u32) % 90, 1),
                    _ => (0, 0),
                };
                ids.push(id);
                att.push(keep);
            }
        }
        let (masked, labels) = mlm_mask(&ids, &att, &special(), 100, 0.15, &mut rng);
        let mut chosen = 0usize;
        let mut real = 0usize;
        let mut as_mask = 0usize;
        for i in 0..ids.len() {
            if att[i] == 0 || ids[i] < 5 {
                assert_eq!(labels[i], IGNORE);
                assert_eq!(masked[i], ids[i]);
                continue;
            }
            real += 1;
            if labels[i] != IGNORE {
                chosen += 1;
                assert_eq!(labels[i], i64::from(ids[i]));
                as_mask += usize::from(masked[i] == 4);
            } else {
                assert_eq!(masked[i], ids[i]);
            }
        }
        // Binomial(real, 0.15): mean 0.15 real, sd sqrt(real*0.15*0.85); allow 5 sd.
        let (mean, sd) = (0.15 * real as f64, (real as f64 * 0.15 * 0.85).sqrt());
        assert!(
            (chosen as f64 - mean).abs() < 5.0 * sd,
            "{chosen} of {real}"
        );
        // Of the chosen, 80 % become [MASK] (a random draw may also hit id 4, rarely).
        let (m2, sd2) = (0.8 * chosen as f64, (chosen as f64 * 0.8 * 0.2).sqrt());
        assert!(
            (as_mask as f64 - m2).abs() < 5.0 * sd2 + 2.0,
            "{as_mask} of {chosen}"
        );
        // Same seed, same masks.
        let again = mlm_mask(
            &ids,
            &att,
            &special(),
            100,
            0.15,
            &mut ChaCha8Rng::seed_from_u64(0),
        );
        assert_eq!(again, (masked, labels));
    }

    #[test]
    fn block_mask_hits_the_ratio_in_blocks() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for (h, w) in [(8, 8), (14, 14), (4, 4)] {
            let m = block_mask(h, w, 0.4, &mut rng);
            assert_eq!(m.len(), h * w);
            let count = m.iter().filter(|&&v| v == 1).count();
            assert_eq!(count, ((h * w) as f64 * 0.4).round() as usize);
            // Blockwise: most masked patches have a masked 4-neighbour.
            let with_neighbour = (0..h * w)
                .filter(|&p| m[p] == 1)
                .filter(|&p| {
                    let (y, x) = (p / w, p % w);
                    (x > 0 && m[p - 1] == 1)
                        || (x + 1 < w && m[p + 1] == 1)
                        || (y > 0 && m[p - w] == 1)
                        || (y + 1 < h && m[p + w] == 1)
                })
                .count();
            assert!(
                with_neighbour * 10 >= count * 7,
                "{with_neighbour} of {count}"
            );
        }
    }
}
