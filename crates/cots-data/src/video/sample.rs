//! Which frames of a video does the model see?
//!
//! Segment-based sampling from TSN (Wang et al., "Temporal Segment Networks",
//! ECCV 2016), as used for text-to-video retrieval by COTS and CLIP4Clip: the
//! video's `F` frames are cut into `n` equal segments and one frame is taken
//! from each, a random one in training and the centre one in evaluation. A
//! video shorter than `n` frames repeats frames, in order.
//!
//! Sampling is a pure function of `(frame_count, n, mode)`; the training draw
//! is seeded by `(seed, epoch, sample index)` so a resumed run, or a loader
//! worker on another thread, sees exactly the frames the first run saw.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Training (random frame per segment) or evaluation (centre frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleMode {
    /// A random frame in each segment, drawn from a generator seeded by the
    /// triple: the same triple always gives the same frames.
    Train { seed: u64, epoch: u64, index: u64 },
    /// The centre frame of each segment.
    Eval,
}

/// SplitMix64's finaliser: a bijective mix so that neighbouring triples
/// (epoch 3 and 4, say) give unrelated seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The generator seed of one training draw.
fn draw_seed(seed: u64, epoch: u64, index: u64) -> u64 {
    mix(mix(mix(seed) ^ epoch) ^ index)
}

/// The half-open frame range `[start, end)` of segment `k` of `n` over `f` frames.
fn segment(f: usize, n: usize, k: usize) -> (usize, usize) {
    // u128 so that `k * f` cannot overflow for any frame count.
    let start = (k as u128 * f as u128 / n as u128) as usize;
    let end = ((k as u128 + 1) * f as u128 / n as u128) as usize;
    (start, end)
}

/// The `n` frame indices (ascending, each `< frame_count`) to decode.
///
/// Segment `k` is `[floor(k F / n), floor((k+1) F / n))`. Evaluation takes
/// `start + len / 2` (TSN's centre, the upper middle of an even segment);
/// training takes a uniform frame of the segment. When `F < n` some segments
/// are empty and take their start frame, so frames repeat in order.
/// Returns an empty vector when `frame_count` or `n` is zero.
pub fn sample_indices(frame_count: usize, n: usize, mode: SampleMode) -> Vec<usize> {
    if frame_count == 0 || n == 0 {
        return Vec::new();
    }
    let mut rng = match mode {
        SampleMode::Train { seed, epoch, index } => {
            Some(ChaCha8Rng::seed_from_u64(draw_seed(seed, epoch, index)))
        }
        SampleMode::Eval => None,
    };
    (0..n)
        .map(|k| {
            let (start, end) = segment(frame_count, n, k);
            let len = end - start;
            if len == 0 {
                return start.min(frame_count - 1);
            }
            match rng.as_mut() {
                Some(rng) => start + rng.random_range(0..len),
                None => start + len / 2,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train(seed: u64, epoch: u64, index: u64) -> SampleMode {
        SampleMode::Train { seed, epoch, index }
    }

    #[test]
    fn eval_takes_segment_centres() {
        // 16 frames, 4 segments of 4: centres 2, 6, 10, 14.
        assert_eq!(sample_indices(16, 4, SampleMode::Eval), vec![2, 6, 10, 14]);
        // 10 frames, 4 segments [0,2) [2,5) [5,7) [7,10): 1, 3, 6, 8.
        assert_eq!(sample_indices(10, 4, SampleMode::Eval), vec![1, 3, 6, 8]);
        // As many frames as samples: every frame once.
        assert_eq!(sample_indices(5, 5, SampleMode::Eval), vec![0, 1, 2, 3, 4]);
        assert_eq!(sample_indices(1, 1, SampleMode::Eval), vec![0]);
    }

    #[test]
    fn short_videos_repeat_frames_in_order() {
        assert_eq!(
            sample_indices(3, 8, SampleMode::Eval),
            vec![0, 0, 0, 1, 1, 1, 2, 2]
        );
        assert_eq!(sample_indices(1, 4, SampleMode::Eval), vec![0, 0, 0, 0]);
        // Training has nothing to choose in a one-frame segment.
        assert_eq!(
            sample_indices(3, 8, train(1, 2, 3)),
            vec![0, 0, 0, 1, 1, 1, 2, 2]
        );
    }

    #[test]
    fn empty_inputs_give_no_indices() {
        assert!(sample_indices(0, 8, SampleMode::Eval).is_empty());
        assert!(sample_indices(100, 0, train(0, 0, 0)).is_empty());
    }

    #[test]
    fn train_draws_stay_in_their_segment_and_cover_it() {
        let (f, n) = (37, 5);
        let mut seen = vec![vec![false; f]; n];
        for epoch in 0..400 {
            let idx = sample_indices(f, n, train(9, epoch, 17));
            assert_eq!(idx.len(), n);
            for (k, &i) in idx.iter().enumerate() {
                // Reference segment bounds in floating point.
                let lo = (k as f64 * f as f64 / n as f64).floor() as usize;
                let hi = ((k + 1) as f64 * f as f64 / n as f64).floor() as usize;
                assert!(lo <= i && i < hi, "segment {k}: {i} not in [{lo}, {hi})");
                seen[k][i] = true;
            }
        }
        // Over 400 epochs every frame of every segment (7 or 8 frames each) is drawn.
        for (k, s) in seen.iter().enumerate() {
            let (lo, hi) = segment(f, n, k);
            assert!(s[lo..hi].iter().all(|&b| b), "segment {k} not covered");
        }
    }

    #[test]
    fn train_draws_are_reproducible_and_depend_on_every_seed_part() {
        let a = sample_indices(1000, 8, train(1, 2, 3));
        assert_eq!(a, sample_indices(1000, 8, train(1, 2, 3)));
        assert_ne!(a, sample_indices(1000, 8, train(2, 2, 3)));
        assert_ne!(a, sample_indices(1000, 8, train(1, 3, 3)));
        assert_ne!(a, sample_indices(1000, 8, train(1, 2, 4)));
        // Training does not degenerate to the evaluation centres.
        assert_ne!(a, sample_indices(1000, 8, SampleMode::Eval));
    }

    #[test]
    fn huge_frame_counts_do_not_overflow() {
        let f = usize::MAX / 2;
        let idx = sample_indices(f, 3, SampleMode::Eval);
        assert!(idx.windows(2).all(|w| w[0] < w[1]) && idx[2] < f);
    }
}
