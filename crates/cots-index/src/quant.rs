//! Int8 storage: each row is stored as `round(x / s)` with its own scale
//! `s = max|x| / 127`, a quarter of the `f32` bytes. The query is quantized
//! the same way, so a row's approximate score is `s_q * s_r * (codes_q .
//! codes_r)` with an integer dot product. The scan keeps a short list, which
//! the caller re-ranks with the `f32` rows.

use rayon::prelude::*;

use crate::exact::{merge, Cand, TopK, BLOCK_ROWS};

/// Per-row int8 codes and scales of `vectors` (`rows * dim` values).
pub(crate) fn quantize(vectors: &[f32], dim: usize) -> (Vec<i8>, Vec<f32>) {
    let rows = vectors.len() / dim.max(1);
    let mut codes = vec![0i8; rows * dim];
    let mut scales = vec![0f32; rows];
    codes
        .par_chunks_mut(dim.max(1))
        .zip(scales.par_iter_mut())
        .zip(vectors.par_chunks(dim.max(1)))
        .for_each(|((c, s), v)| *s = quantize_row(v, c));
    (codes, scales)
}

/// Writes the codes of `v` into `out` and returns the scale.
pub(crate) fn quantize_row(v: &[f32], out: &mut [i8]) -> f32 {
    let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    if max == 0.0 {
        out.fill(0);
        return 0.0;
    }
    let scale = max / 127.0;
    for (o, x) in out.iter_mut().zip(v) {
        *o = (x / scale).round().clamp(-127.0, 127.0) as i8;
    }
    scale
}

/// The integer dot product of two code rows (AVX2 when the CPU has it).
#[inline]
pub(crate) fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            #[allow(unsafe_code)]
            return unsafe { dot_i8_avx2(a, b) };
        }
    }
    dot_i8_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(unsafe_code)]
unsafe fn dot_i8_avx2(a: &[i8], b: &[i8]) -> i32 {
    dot_i8_lanes(a, b)
}

#[inline(always)]
fn dot_i8_lanes(a: &[i8], b: &[i8]) -> i32 {
    // 32 lanes; each product fits in an i16 (127 * 127), summed in i32.
    const L: usize = 32;
    let mut acc = [0i32; L];
    let ca = a.chunks_exact(L);
    let cb = b.chunks_exact(L);
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..L {
            acc[i] += i32::from(i16::from(x[i]) * i16::from(y[i]));
        }
    }
    let tail: i32 = ta.iter().zip(tb).map(|(x, y)| *x as i32 * *y as i32).sum();
    acc.iter().sum::<i32>() + tail
}

/// A run of quantized rows starting at `first_row`.
pub(crate) struct Codes<'a> {
    pub first_row: usize,
    pub codes: &'a [i8],
    pub scales: &'a [f32],
}

/// The best `n` rows by approximate (int8) score, best first.
pub(crate) fn search(
    parts: &[Codes<'_>],
    dim: usize,
    query: &[f32],
    n: usize,
    allow: Option<&[bool]>,
) -> Vec<Cand> {
    if n == 0 || dim == 0 {
        return Vec::new();
    }
    let mut q = vec![0i8; dim];
    let qs = quantize_row(query, &mut q);
    let blocks: Vec<(usize, &[i8], &[f32])> = parts
        .iter()
        .flat_map(|p| {
            p.codes
                .chunks(BLOCK_ROWS * dim)
                .zip(p.scales.chunks(BLOCK_ROWS))
                .enumerate()
                .map(move |(i, (c, s))| (p.first_row + i * BLOCK_ROWS, c, s))
        })
        .collect();
    let lists: Vec<Vec<Cand>> = blocks
        .par_iter()
        .map(|&(first, codes, scales)| {
            let mut top = TopK::new(n);
            for (i, (row, &s)) in codes.chunks_exact(dim).zip(scales).enumerate() {
                let r = first + i;
                if allow.is_some_and(|a| !a[r]) {
                    continue;
                }
                top.push(Cand {
                    score: qs * s * dot_i8(&q, row) as f32,
                    row: r,
                });
            }
            top.into_sorted()
        })
        .collect();
    merge(lists, n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn codes_reconstruct_within_half_a_step() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let dim = 37;
        let v: Vec<f32> = (0..dim * 5).map(|_| rng.random_range(-2.0..2.0)).collect();
        let (codes, scales) = quantize(&v, dim);
        for r in 0..5 {
            for i in 0..dim {
                let x = v[r * dim + i];
                let back = codes[r * dim + i] as f32 * scales[r];
                assert!(
                    (x - back).abs() <= scales[r] * 0.5 + 1e-6,
                    "row {r} col {i}"
                );
            }
        }
    }

    #[test]
    fn integer_dot_matches_a_plain_sum() {
        let a: Vec<i8> = (0..300).map(|i| ((i * 37) % 255 - 127) as i8).collect();
        let b: Vec<i8> = (0..300).map(|i| ((i * 91) % 255 - 127) as i8).collect();
        let plain: i32 = a.iter().zip(&b).map(|(x, y)| *x as i32 * *y as i32).sum();
        assert_eq!(dot_i8(&a, &b), plain);
    }
}
