//! The exact path: dot products over blocks of memory-mapped rows, in
//! parallel, each block keeping its best k in a bounded heap; the blocks'
//! lists are merged at the end. Among equal scores the lower row ranks first.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rayon::prelude::*;

/// Rows per parallel task: 1,024 rows of 256 floats is 1 MiB, about one L2.
pub(crate) const BLOCK_ROWS: usize = 1024;

/// A scored row. Ordered from best to worst: higher score first, then lower row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Cand {
    pub score: f32,
    pub row: usize,
}

impl Cand {
    /// `Less` when `self` ranks before `other`.
    pub fn rank_cmp(&self, other: &Self) -> Ordering {
        other
            .score
            .total_cmp(&self.score)
            .then(self.row.cmp(&other.row))
    }
}

/// Heap entry whose maximum is the worst kept candidate.
#[derive(Clone, Copy, PartialEq)]
struct Worst(Cand);

impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.rank_cmp(&other.0)
    }
}

/// The best `k` candidates seen so far.
pub(crate) struct TopK {
    k: usize,
    heap: BinaryHeap<Worst>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k.min(1 << 16) + 1),
        }
    }

    #[inline]
    pub fn push(&mut self, c: Cand) {
        if self.heap.len() < self.k {
            self.heap.push(Worst(c));
        } else if let Some(mut worst) = self.heap.peek_mut() {
            if c.rank_cmp(&worst.0) == Ordering::Less {
                *worst = Worst(c);
            }
        }
    }

    /// Best first.
    pub fn into_sorted(self) -> Vec<Cand> {
        let mut v: Vec<Cand> = self.heap.into_iter().map(|w| w.0).collect();
        v.sort_by(Cand::rank_cmp);
        v
    }
}

/// Best `k` of several best-first lists (or any lists), best first.
pub(crate) fn merge(lists: impl IntoIterator<Item = Vec<Cand>>, k: usize) -> Vec<Cand> {
    let mut top = TopK::new(k);
    for l in lists {
        for c in l {
            top.push(c);
        }
    }
    top.into_sorted()
}

/// The dot product of two equal-length slices, in 16 independent lanes so
/// that it vectorises (AVX2 and FMA when the CPU has them).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            #[allow(unsafe_code)]
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(unsafe_code)]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; L];
    let ca = a.chunks_exact(L);
    let cb = b.chunks_exact(L);
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..L {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut tail = 0.0;
    for (x, y) in ta.iter().zip(tb) {
        tail += x * y;
    }
    let mut w = L;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0] + tail
}

/// A contiguous run of rows: `vectors` holds `vectors.len() / dim` rows, the
/// first of which is row `first_row` of the index.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a> {
    pub first_row: usize,
    pub vectors: &'a [f32],
}

/// The best `k` rows for each of the `queries.len() / dim` queries among
/// `parts`, skipping rows whose `allow` entry is false, best first.
pub(crate) fn search(
    parts: &[Rows<'_>],
    dim: usize,
    queries: &[f32],
    k: usize,
    allow: Option<&[bool]>,
) -> Vec<Vec<Cand>> {
    let nq = queries.len() / dim.max(1);
    if k == 0 || dim == 0 {
        return vec![Vec::new(); nq];
    }
    let blocks: Vec<Rows<'_>> = parts
        .iter()
        .flat_map(|p| {
            p.vectors
                .chunks(BLOCK_ROWS * dim)
                .enumerate()
                .map(move |(i, v)| Rows {
                    first_row: p.first_row + i * BLOCK_ROWS,
                    vectors: v,
                })
        })
        .collect();
    let per_block: Vec<Vec<Vec<Cand>>> = blocks
        .par_iter()
        .map(|b| {
            let mut tops: Vec<TopK> = (0..nq).map(|_| TopK::new(k)).collect();
            for (i, row) in b.vectors.chunks_exact(dim).enumerate() {
                let r = b.first_row + i;
                if allow.is_some_and(|a| !a[r]) {
                    continue;
                }
                for (q, top) in queries.chunks_exact(dim).zip(&mut tops) {
                    top.push(Cand {
                        score: dot(q, row),
                        row: r,
                    });
                }
            }
            tops.into_iter().map(TopK::into_sorted).collect()
        })
        .collect();
    let mut out: Vec<Vec<Vec<Cand>>> = vec![Vec::with_capacity(per_block.len()); nq];
    for block in per_block {
        for (q, list) in block.into_iter().enumerate() {
            out[q].push(list);
        }
    }
    out.into_iter().map(|lists| merge(lists, k)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn dot_matches_a_plain_sum() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for n in [0, 1, 15, 16, 17, 255, 256, 300] {
            let a: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let plain: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - plain).abs() < 1e-4, "n = {n}");
        }
    }

    #[test]
    fn top_k_keeps_the_best_with_ties_by_row() {
        let scores = [0.5, 0.9, 0.5, 0.1, 0.9, 0.5];
        let mut top = TopK::new(4);
        for (row, &score) in scores.iter().enumerate() {
            top.push(Cand { score, row });
        }
        let rows: Vec<usize> = top.into_sorted().iter().map(|c| c.row).collect();
        assert_eq!(rows, vec![1, 4, 0, 2]);
    }
}
