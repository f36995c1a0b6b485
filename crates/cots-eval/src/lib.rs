//! # cots-eval: how good is a model at retrieval?
//!
//! Image-text retrieval metrics with the COCO / Flickr30K protocol: for
//! image-to-text an image is a hit at K if ANY of its captions is in the top
//! K; for text-to-image the caption's one image must be. R@K, median and mean
//! rank, RSUM, and top-k search.
//!
//! Similarities are computed in tiles of `block` rows, so a 5K x 25K
//! evaluation never holds more than a `block x N` slab: per query we only need
//! the score of its true match(es) and the number of gallery items that beat
//! it.
//!
//! Ties are broken deterministically: among equal scores the lower gallery
//! index ranks first, so the rank of the true item is
//! `1 + #{score > s} + #{score == s and index < true index}`.
//!
//! A NaN or infinite embedding or score is an error naming its row or pair:
//! every comparison with NaN is false, so the rule above would rank a NaN
//! first and count it as a hit.

use std::fmt;

use candle_core::{DType, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Errors of the evaluation harness.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("caption {caption} points at image {image}, but there are only {n_images} images")]
    BadTarget {
        caption: usize,
        image: usize,
        n_images: usize,
    },
    #[error("image {0} has no caption: image-to-text recall is undefined for it")]
    NoCaption(usize),
    #[error("{0}")]
    Shape(String),
    #[error("pair scorer: {0}")]
    Scorer(String),
    #[error("{what} row {row} is not finite (value {value} in column {column})")]
    NonFiniteEmbedding {
        what: &'static str,
        row: usize,
        column: usize,
        value: f32,
    },
    #[error("the score of image {image} and caption {caption} is not finite ({value})")]
    NonFiniteScore {
        image: usize,
        caption: usize,
        value: f32,
    },
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Options of an evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalOptions {
    /// The K of R@K.
    pub ks: Vec<usize>,
    /// Query rows per similarity tile.
    pub block: usize,
    /// Also report retrieval after dual-softmax re-normalisation with this
    /// inverse temperature ([`dual_softmax`]; off by default), as
    /// [`RetrievalReport::dual_softmax`].
    pub dual_softmax: Option<f32>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            ks: vec![1, 5, 10],
            block: 1024,
            dual_softmax: None,
        }
    }
}

/// Recall and rank statistics of one retrieval direction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DirectionReport {
    /// `(K, recall in percent)`.
    pub recall: Vec<(usize, f64)>,
    pub median_rank: f64,
    pub mean_rank: f64,
    pub queries: usize,
}

impl DirectionReport {
    fn from_ranks(ranks: &[usize], ks: &[usize]) -> Self {
        let n = ranks.len().max(1) as f64;
        let recall = ks
            .iter()
            .map(|&k| {
                (
                    k,
                    100.0 * ranks.iter().filter(|&&r| r <= k).count() as f64 / n,
                )
            })
            .collect();
        let mut sorted = ranks.to_vec();
        sorted.sort_unstable();
        let median_rank = match sorted.len() {
            0 => 0.0,
            len if len % 2 == 1 => sorted[len / 2] as f64,
            len => (sorted[len / 2 - 1] + sorted[len / 2]) as f64 / 2.0,
        };
        let mean_rank = sorted.iter().sum::<usize>() as f64 / n;
        Self {
            recall,
            median_rank,
            mean_rank,
            queries: ranks.len(),
        }
    }

    /// Recall at `k` in percent, if `k` was evaluated.
    pub fn at(&self, k: usize) -> Option<f64> {
        self.recall.iter().find(|(kk, _)| *kk == k).map(|(_, r)| *r)
    }
}

/// Both directions of an image (or video) - text retrieval evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetrievalReport {
    /// "image" or "video": what the gallery holds.
    pub modality: String,
    pub n_images: usize,
    pub n_texts: usize,
    /// Image (video) to text.
    pub i2t: DirectionReport,
    /// Text to image (video).
    pub t2i: DirectionReport,
    /// Sum of every recall of both directions.
    pub rsum: f64,
    /// On galleries where each item has a designated hard negative (the
    /// synthetic video set's time-reversed twins): see
    /// [`hard_negative_accuracy`]. Filled by the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_negative_accuracy: Option<f64>,
    /// The same evaluation after dual-softmax re-normalisation, when asked
    /// for ([`EvalOptions::dual_softmax`]): the inverse temperature and the
    /// report. It uses every test query at once, so it is not the score of
    /// a query answered alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dual_softmax: Option<(f32, Box<RetrievalReport>)>,
}

impl RetrievalReport {
    fn new(
        modality: &str,
        n_images: usize,
        n_texts: usize,
        i2t: DirectionReport,
        t2i: DirectionReport,
    ) -> Self {
        let rsum = i2t.recall.iter().chain(&t2i.recall).map(|(_, r)| r).sum();
        Self {
            modality: modality.to_string(),
            n_images,
            n_texts,
            i2t,
            t2i,
            rsum,
            hard_negative_accuracy: None,
            dual_softmax: None,
        }
    }

    /// The report as a Markdown table.
    pub fn to_markdown(&self) -> String {
        let (a, b) = self.direction_names();
        let ks: Vec<String> = self
            .i2t
            .recall
            .iter()
            .map(|(k, _)| format!("R@{k}"))
            .collect();
        let mut s = format!(
            "| direction | {} | MedR | MeanR |\n|---|{}---|---|\n",
            ks.join(" | "),
            "---|".repeat(ks.len())
        );
        for (name, d) in [(a, &self.i2t), (b, &self.t2i)] {
            let r: Vec<String> = d.recall.iter().map(|(_, r)| format!("{r:.1}")).collect();
            s += &format!(
                "| {name} | {} | {} | {:.1} |\n",
                r.join(" | "),
                d.median_rank,
                d.mean_rank
            );
        }
        s += &format!(
            "\nRSUM {:.1} over {} {}s and {} texts.\n",
            self.rsum, self.n_images, self.modality, self.n_texts
        );
        if let Some(a) = self.hard_negative_accuracy {
            s += &format!(
                "\nCaption scored above its {}'s hard negative: {a:.1}% (50 is chance).\n",
                self.modality
            );
        }
        if let Some((t, r)) = &self.dual_softmax {
            s += &format!(
                "\nAfter dual-softmax re-normalisation (inverse temperature {t}; uses all test queries at once):\n\n{}",
                r.to_markdown()
            );
        }
        s
    }

    fn direction_names(&self) -> (&'static str, &'static str) {
        if self.modality == "video" {
            ("video-to-text", "text-to-video")
        } else {
            ("image-to-text", "text-to-image")
        }
    }
}

impl fmt::Display for RetrievalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (a, b) = self.direction_names();
        write!(f, "{:<15}", "")?;
        for (k, _) in &self.i2t.recall {
            write!(f, "{:>8}", format!("R@{k}"))?;
        }
        writeln!(f, "{:>8}{:>9}", "MedR", "MeanR")?;
        for (name, d) in [(a, &self.i2t), (b, &self.t2i)] {
            write!(f, "{name:<15}")?;
            for (_, r) in &d.recall {
                write!(f, "{r:>8.1}")?;
            }
            writeln!(f, "{:>8}{:>9.1}", d.median_rank, d.mean_rank)?;
        }
        write!(
            f,
            "RSUM {:.1}  ({} {}s, {} texts)",
            self.rsum, self.n_images, self.modality, self.n_texts
        )?;
        if let Some(a) = self.hard_negative_accuracy {
            write!(
                f,
                "\ncaption above its {}'s hard negative: {a:.1}% (50 is chance)",
                self.modality
            )?;
        }
        if let Some((t, r)) = &self.dual_softmax {
            write!(
                f,
                "\n\ndual softmax (inverse temperature {t}; uses all test queries at once):\n{r}"
            )?;
        }
        Ok(())
    }
}

/// Pairwise accuracy against designated hard negatives, in percent: the
/// share of captions `j` whose score with their own item `t = text_to_image[j]`
/// beats their score with `hard_negative[t]`; an exact tie counts one half.
/// On the synthetic video set the hard negative is the time-reversed twin,
/// which holds the same frames: an order-blind model scores 50.
///
/// # Shapes
/// - `images`: `[N, D]`, `texts`: `[M, D]`; `text_to_image` has length `M`
///   and `hard_negative` length `N`, both with values below `N`.
pub fn hard_negative_accuracy(
    images: &Tensor,
    texts: &Tensor,
    text_to_image: &[usize],
    hard_negative: &[usize],
) -> Result<f64> {
    let scorer = EmbeddingScorer::new(images, texts)?;
    let (n, m) = (scorer.n_images(), scorer.n_texts());
    if text_to_image.len() != m || hard_negative.len() != n {
        return Err(Error::Shape(format!(
            "{} caption targets for {m} captions, {} hard negatives for {n} items",
            text_to_image.len(),
            hard_negative.len()
        )));
    }
    if m == 0 {
        return Err(Error::Shape("no captions to score".into()));
    }
    let img = scorer.images.to_vec2::<f32>()?;
    let txt = scorer.texts.to_vec2::<f32>()?;
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let mut wins = 0.0;
    for (j, &t) in text_to_image.iter().enumerate() {
        let Some(&h) = hard_negative.get(t).filter(|&&h| h < n && t < n) else {
            return Err(Error::BadTarget {
                caption: j,
                image: t.max(hard_negative.get(t).copied().unwrap_or(t)),
                n_images: n,
            });
        };
        let (own, other) = (dot(&img[t], &txt[j]), dot(&img[h], &txt[j]));
        wins += if own > other {
            1.0
        } else if own == other {
            0.5
        } else {
            0.0
        };
    }
    Ok(100.0 * wins / m as f64)
}

/// A source of similarity scores between images and texts, by blocks.
///
/// Embedding models answer with dot products; a single-stream cross-encoder
/// answers by scoring pairs.
pub trait PairScorer: Sync {
    fn n_images(&self) -> usize;
    fn n_texts(&self) -> usize;
    /// Scores `[images.len(), texts.len()]`, row-major.
    fn score_block(
        &self,
        images: std::ops::Range<usize>,
        texts: std::ops::Range<usize>,
    ) -> Result<Vec<f32>>;
}

/// Dot-product scores between L2-normalised embeddings.
pub struct EmbeddingScorer {
    images: Tensor,
    texts: Tensor,
}

impl EmbeddingScorer {
    /// # Shapes
    /// - `images`: `[N, D]`; `texts`: `[M, D]`.
    pub fn new(images: &Tensor, texts: &Tensor) -> Result<Self> {
        Self::named(images, "image embedding", texts, "text embedding")
    }

    /// [`Self::new`], naming the two sides in errors (`"query"`, `"gallery"`).
    fn named(
        images: &Tensor,
        image_what: &'static str,
        texts: &Tensor,
        text_what: &'static str,
    ) -> Result<Self> {
        let (_, d1) = images.dims2()?;
        let (_, d2) = texts.dims2()?;
        if d1 != d2 {
            return Err(Error::Shape(format!(
                "image embeddings are {d1}-dimensional but text embeddings are {d2}-dimensional"
            )));
        }
        let images = images.to_dtype(DType::F32)?.contiguous()?;
        let texts = texts.to_dtype(DType::F32)?.contiguous()?;
        check_finite(&images, image_what)?;
        check_finite(&texts, text_what)?;
        Ok(Self { images, texts })
    }
}

/// Fails on the first non-finite value of a `[N, D]` f32 matrix, naming its
/// row.
fn check_finite(m: &Tensor, what: &'static str) -> Result<()> {
    // `x - x` is 0 for a finite x and NaN otherwise, so a row sums to a
    // finite value exactly when all of it is finite; only one value per
    // row leaves the device.
    let per_row = m.sub(m)?.sum(1)?.to_vec1::<f32>()?;
    let Some(row) = per_row.iter().position(|v| !v.is_finite()) else {
        return Ok(());
    };
    let values = m.get(row)?.to_vec1::<f32>()?;
    let column = values.iter().position(|v| !v.is_finite()).unwrap_or(0);
    Err(Error::NonFiniteEmbedding {
        what,
        row,
        column,
        value: values.get(column).copied().unwrap_or(f32::NAN),
    })
}

/// Fails on the first non-finite score of a row-major block whose rows are
/// images `i0..` and columns captions `j0..`.
fn check_scores(scores: &[f32], cols: usize, i0: usize, j0: usize) -> Result<()> {
    match scores.iter().position(|v| !v.is_finite()) {
        Some(k) => Err(Error::NonFiniteScore {
            image: i0 + k / cols.max(1),
            caption: j0 + k % cols.max(1),
            value: scores[k],
        }),
        None => Ok(()),
    }
}

impl PairScorer for EmbeddingScorer {
    fn n_images(&self) -> usize {
        self.images.dim(0).unwrap_or(0)
    }
    fn n_texts(&self) -> usize {
        self.texts.dim(0).unwrap_or(0)
    }
    fn score_block(
        &self,
        images: std::ops::Range<usize>,
        texts: std::ops::Range<usize>,
    ) -> Result<Vec<f32>> {
        let a = self.images.narrow(0, images.start, images.len())?;
        let b = self.texts.narrow(0, texts.start, texts.len())?;
        Ok(a.matmul(&b.t()?)?.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// Scores read from a precomputed row-major `[N, M]` matrix (for example
/// two-stream similarities after a re-ranking stage).
pub struct MatrixScorer {
    scores: Vec<f32>,
    n: usize,
    m: usize,
}

impl MatrixScorer {
    pub fn new(scores: Vec<f32>, n: usize, m: usize) -> Result<Self> {
        if scores.len() != n * m {
            return Err(Error::Shape(format!(
                "{} scores for a {n} x {m} matrix",
                scores.len()
            )));
        }
        Ok(Self { scores, n, m })
    }
}

impl PairScorer for MatrixScorer {
    fn n_images(&self) -> usize {
        self.n
    }
    fn n_texts(&self) -> usize {
        self.m
    }
    fn score_block(
        &self,
        images: std::ops::Range<usize>,
        texts: std::ops::Range<usize>,
    ) -> Result<Vec<f32>> {
        if images.end > self.n || texts.end > self.m {
            return Err(Error::Shape(format!(
                "block {images:?} x {texts:?} outside a {} x {} matrix",
                self.n, self.m
            )));
        }
        Ok(images
            .flat_map(|i| self.scores[i * self.m + texts.start..i * self.m + texts.end].to_vec())
            .collect())
    }
}

/// Rank (1-based) of `target` within `scores` under the documented tie rule.
fn rank_of(scores: &[f32], target: usize) -> usize {
    let s = scores[target];
    1 + scores
        .iter()
        .enumerate()
        .filter(|&(j, &v)| v > s || (v == s && j < target))
        .count()
}

/// Evaluates embeddings: see the crate doc for the protocol.
///
/// # Shapes
/// - `images`: `[N, D]`, `texts`: `[M, D]`; `text_to_image[j]` is the image
///   index of caption `j`.
pub fn evaluate_embeddings(
    images: &Tensor,
    texts: &Tensor,
    text_to_image: &[usize],
    opts: &EvalOptions,
) -> Result<RetrievalReport> {
    evaluate_scorer(
        &EmbeddingScorer::new(images, texts)?,
        text_to_image,
        opts,
        "image",
    )
}

/// Evaluates any [`PairScorer`]; `modality` labels the gallery ("image" or "video").
pub fn evaluate_scorer(
    scorer: &dyn PairScorer,
    text_to_image: &[usize],
    opts: &EvalOptions,
    modality: &str,
) -> Result<RetrievalReport> {
    let (n, m) = (scorer.n_images(), scorer.n_texts());
    if text_to_image.len() != m {
        return Err(Error::Shape(format!(
            "{} caption targets for {m} captions",
            text_to_image.len()
        )));
    }
    let mut captions_of: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (j, &i) in text_to_image.iter().enumerate() {
        if i >= n {
            return Err(Error::BadTarget {
                caption: j,
                image: i,
                n_images: n,
            });
        }
        captions_of[i].push(j);
    }
    if let Some(i) = captions_of.iter().position(|c| c.is_empty()) {
        return Err(Error::NoCaption(i));
    }
    let block = opts.block.max(1);

    // Image-to-text: rows are images, the gallery is every caption.
    let starts: Vec<usize> = (0..n).step_by(block).collect();
    let i2t: Vec<Vec<usize>> = starts
        .par_iter()
        .map(|&r0| -> Result<Vec<usize>> {
            let rows = block.min(n - r0);
            let scores = scorer.score_block(r0..r0 + rows, 0..m)?;
            check_scores(&scores, m, r0, 0)?;
            Ok((0..rows)
                .map(|r| {
                    let row = &scores[r * m..(r + 1) * m];
                    captions_of[r0 + r]
                        .iter()
                        .map(|&j| rank_of(row, j))
                        .min()
                        .unwrap_or(usize::MAX)
                })
                .collect())
        })
        .collect::<Result<_>>()?;
    let i2t: Vec<usize> = i2t.into_iter().flatten().collect();

    // Text-to-image: scores come as [images, texts] tiles; take columns.
    let starts: Vec<usize> = (0..m).step_by(block).collect();
    let t2i: Vec<Vec<usize>> = starts
        .par_iter()
        .map(|&c0| -> Result<Vec<usize>> {
            let cols = block.min(m - c0);
            let scores = scorer.score_block(0..n, c0..c0 + cols)?;
            check_scores(&scores, cols, 0, c0)?;
            Ok((0..cols)
                .map(|c| {
                    let column: Vec<f32> = (0..n).map(|i| scores[i * cols + c]).collect();
                    rank_of(&column, text_to_image[c0 + c])
                })
                .collect())
        })
        .collect::<Result<_>>()?;
    let t2i: Vec<usize> = t2i.into_iter().flatten().collect();

    let mut report = RetrievalReport::new(
        modality,
        n,
        m,
        DirectionReport::from_ranks(&i2t, &opts.ks),
        DirectionReport::from_ranks(&t2i, &opts.ks),
    );
    if let Some(t) = opts.dual_softmax {
        let (for_i2t, for_t2i) = dual_softmax(scorer, t)?;
        let plain = EvalOptions {
            dual_softmax: None,
            ..opts.clone()
        };
        let a = evaluate_scorer(&for_i2t, text_to_image, &plain, modality)?;
        let b = evaluate_scorer(&for_t2i, text_to_image, &plain, modality)?;
        let revised = RetrievalReport::new(modality, n, m, a.i2t, b.t2i);
        report.dual_softmax = Some((t, Box::new(revised)));
    }
    Ok(report)
}

/// Dual-softmax re-normalisation (Cheng et al., "Improving Video-Text
/// Retrieval by Multi-Stream Corpus Alignment and Dual Softmax Loss", 2021),
/// as used at inference on MSR-VTT: a pair's score `s` is multiplied by the
/// softmax of `inv_temp * s` over the other side's queries, so an item that
/// every query likes counts for less. Returns the revised `[images, texts]`
/// scores for image-to-text (softmax over images, per text) and for
/// text-to-image (softmax over texts, per image). Holds the full matrix.
pub fn dual_softmax(
    scorer: &dyn PairScorer,
    inv_temp: f32,
) -> Result<(MatrixScorer, MatrixScorer)> {
    if !(inv_temp.is_finite() && inv_temp > 0.0) {
        return Err(Error::Shape(format!(
            "the dual-softmax inverse temperature must be positive, got {inv_temp}"
        )));
    }
    let (n, m) = (scorer.n_images(), scorer.n_texts());
    let s = scorer.score_block(0..n, 0..m)?;
    // Per text (column): softmax over images, max-subtracted.
    let mut col_max = vec![f32::NEG_INFINITY; m];
    for row in s.chunks(m.max(1)) {
        for (c, &v) in col_max.iter_mut().zip(row) {
            *c = c.max(v);
        }
    }
    let mut col_sum = vec![0f64; m];
    for row in s.chunks(m.max(1)) {
        for ((acc, &v), &mx) in col_sum.iter_mut().zip(row).zip(&col_max) {
            *acc += f64::from((inv_temp * (v - mx)).exp());
        }
    }
    let mut for_i2t = Vec::with_capacity(n * m);
    let mut for_t2i = Vec::with_capacity(n * m);
    for row in s.chunks(m.max(1)) {
        // Per image (row): softmax over texts.
        let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row
            .iter()
            .map(|&v| f64::from((inv_temp * (v - mx)).exp()))
            .sum();
        for (j, &v) in row.iter().enumerate() {
            let over_images = f64::from((inv_temp * (v - col_max[j])).exp()) / col_sum[j];
            let over_texts = f64::from((inv_temp * (v - mx)).exp()) / sum;
            for_i2t.push((f64::from(v) * over_images) as f32);
            for_t2i.push((f64::from(v) * over_texts) as f32);
        }
    }
    Ok((
        MatrixScorer::new(for_i2t, n, m)?,
        MatrixScorer::new(for_t2i, n, m)?,
    ))
}

/// The `k` best gallery items of every query, best first, ties to the lower index.
///
/// # Shapes
/// - `queries`: `[Q, D]`, `gallery`: `[N, D]`; returns `Q` lists of
///   `(gallery index, score)`.
pub fn top_k(queries: &Tensor, gallery: &Tensor, k: usize) -> Result<Vec<Vec<(usize, f32)>>> {
    let scorer = EmbeddingScorer::named(gallery, "gallery embedding", queries, "query embedding")?;
    let (n, q) = (scorer.n_images(), scorer.n_texts());
    let block = 256;
    let starts: Vec<usize> = (0..q).step_by(block).collect();
    let out: Vec<Vec<Vec<(usize, f32)>>> = starts
        .par_iter()
        .map(|&c0| -> Result<Vec<Vec<(usize, f32)>>> {
            let cols = block.min(q - c0);
            let s = scorer.score_block(0..n, c0..c0 + cols)?;
            Ok((0..cols)
                .map(|c| {
                    let mut items: Vec<(usize, f32)> =
                        (0..n).map(|i| (i, s[i * cols + c])).collect();
                    let order = |a: &(usize, f32), b: &(usize, f32)| {
                        b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
                    };
                    let kk = k.min(items.len());
                    if kk > 0 && kk < items.len() {
                        items.select_nth_unstable_by(kk - 1, order);
                        items.truncate(kk);
                    }
                    items.sort_by(order);
                    items.truncate(kk);
                    items
                })
                .collect())
        })
        .collect::<Result<_>>()?;
    Ok(out.into_iter().flatten().collect())
}

/// Mean average precision at R (Musgrave et al., "A Metric Learning Reality
/// Check", 2020) for category-labelled retrieval, in percent.
///
/// For query `q` with `R` relevant gallery items (same label), take the top
/// `R` of its ranking (ties to the lower index) and average, over those `R`
/// positions, the precision at each position that holds a relevant item.
/// Queries with no relevant item are skipped.
///
/// # Shapes
/// - `queries`: `[Q, D]`, `gallery`: `[N, D]`; labels have lengths Q and N.
pub fn map_at_r(
    queries: &Tensor,
    query_labels: &[u32],
    gallery: &Tensor,
    gallery_labels: &[u32],
) -> Result<f64> {
    let scorer = EmbeddingScorer::named(gallery, "gallery embedding", queries, "query embedding")?;
    let (n, q) = (scorer.n_images(), scorer.n_texts());
    if query_labels.len() != q || gallery_labels.len() != n {
        return Err(Error::Shape(format!(
            "{} query labels for {q} queries, {} gallery labels for {n} items",
            query_labels.len(),
            gallery_labels.len()
        )));
    }
    let block = 256;
    let starts: Vec<usize> = (0..q).step_by(block).collect();
    let per_query: Vec<Vec<Option<f64>>> = starts
        .par_iter()
        .map(|&c0| -> Result<Vec<Option<f64>>> {
            let cols = block.min(q - c0);
            let s = scorer.score_block(0..n, c0..c0 + cols)?;
            Ok((0..cols)
                .map(|c| {
                    let label = query_labels[c0 + c];
                    let r = gallery_labels.iter().filter(|&&l| l == label).count();
                    if r == 0 {
                        return None;
                    }
                    let mut order: Vec<usize> = (0..n).collect();
                    order.sort_by(|&a, &b| {
                        s[b * cols + c].total_cmp(&s[a * cols + c]).then(a.cmp(&b))
                    });
                    let mut hits = 0usize;
                    let mut sum = 0.0;
                    for (pos, &g) in order.iter().take(r).enumerate() {
                        if gallery_labels[g] == label {
                            hits += 1;
                            sum += hits as f64 / (pos + 1) as f64;
                        }
                    }
                    Some(sum / r as f64)
                })
                .collect())
        })
        .collect::<Result<_>>()?;
    let scores: Vec<f64> = per_query.into_iter().flatten().flatten().collect();
    if scores.is_empty() {
        return Ok(0.0);
    }
    Ok(100.0 * scores.iter().sum::<f64>() / scores.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    /// The obvious reference: full matrix in f64, full stable sort by
    /// (score descending, index ascending), position of the target.
    fn brute_ranks(img: &[Vec<f32>], txt: &[Vec<f32>], t2i: &[usize]) -> (Vec<usize>, Vec<usize>) {
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let rank = |scores: Vec<f32>, target: usize| {
            let mut idx: Vec<usize> = (0..scores.len()).collect();
            idx.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
            idx.iter().position(|&x| x == target).unwrap() + 1
        };
        let i2t = (0..img.len())
            .map(|i| {
                let s: Vec<f32> = txt.iter().map(|t| dot(&img[i], t)).collect();
                (0..txt.len())
                    .filter(|&j| t2i[j] == i)
                    .map(|j| rank(s.clone(), j))
                    .min()
                    .unwrap()
            })
            .collect();
        let t2i_r = (0..txt.len())
            .map(|j| rank(img.iter().map(|v| dot(v, &txt[j])).collect(), t2i[j]))
            .collect();
        (i2t, t2i_r)
    }

    fn random_case(
        seed: u64,
        n: usize,
        quantise: bool,
    ) -> (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<usize>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let d = 8;
        let vec = |rng: &mut rand::rngs::StdRng| -> Vec<f32> {
            (0..d)
                .map(|_| {
                    let v: f32 = rng.random_range(-1.0..1.0);
                    // Quantised coordinates make exact score ties common.
                    if quantise {
                        (v * 2.0).round() / 2.0
                    } else {
                        v
                    }
                })
                .collect()
        };
        let img: Vec<Vec<f32>> = (0..n).map(|_| vec(&mut rng)).collect();
        let mut txt = Vec::new();
        let mut t2i = Vec::new();
        for i in 0..n {
            for _ in 0..rng.random_range(1..=6) {
                txt.push(vec(&mut rng));
                t2i.push(i);
            }
        }
        // A duplicated caption vector: an exact tie by construction.
        txt.push(txt[0].clone());
        t2i.push(n - 1);
        (img, txt, t2i)
    }

    fn tensor(v: &[Vec<f32>]) -> Tensor {
        let d = v[0].len();
        Tensor::from_vec(v.concat(), (v.len(), d), &Device::Cpu).unwrap()
    }

    /// Dual softmax against a direct f64 transcription of the formula, and
    /// the report it attaches against evaluating those matrices directly.
    #[test]
    fn dual_softmax_matches_the_formula_on_random_scores() {
        for seed in 0..4 {
            let (img, txt, t2i) = random_case(seed, 6 + seed as usize, false);
            let (n, m) = (img.len(), txt.len());
            let s: Vec<Vec<f64>> = img
                .iter()
                .map(|a| {
                    txt.iter()
                        .map(|b| a.iter().zip(b).map(|(x, y)| f64::from(x * y)).sum())
                        .collect()
                })
                .collect();
            let t = 7.5f32;
            let (for_i2t, for_t2i) = dual_softmax(
                &EmbeddingScorer::new(&tensor(&img), &tensor(&txt)).unwrap(),
                t,
            )
            .unwrap();
            let (got_a, got_b) = (
                for_i2t.score_block(0..n, 0..m).unwrap(),
                for_t2i.score_block(0..n, 0..m).unwrap(),
            );
            let t = f64::from(t);
            for i in 0..n {
                for j in 0..m {
                    let over_images =
                        (t * s[i][j]).exp() / (0..n).map(|k| (t * s[k][j]).exp()).sum::<f64>();
                    let over_texts =
                        (t * s[i][j]).exp() / (0..m).map(|k| (t * s[i][k]).exp()).sum::<f64>();
                    let (a, b) = (s[i][j] * over_images, s[i][j] * over_texts);
                    assert!(
                        (f64::from(got_a[i * m + j]) - a).abs() < 1e-5,
                        "{seed} {i} {j}"
                    );
                    assert!(
                        (f64::from(got_b[i * m + j]) - b).abs() < 1e-5,
                        "{seed} {i} {j}"
                    );
                }
            }
            let opts = EvalOptions {
                dual_softmax: Some(7.5),
                ..EvalOptions::default()
            };
            let scorer = EmbeddingScorer::new(&tensor(&img), &tensor(&txt)).unwrap();
            let report = evaluate_scorer(&scorer, &t2i, &opts, "video").unwrap();
            assert_eq!(
                RetrievalReport {
                    dual_softmax: None,
                    ..report.clone()
                },
                evaluate_scorer(&scorer, &t2i, &EvalOptions::default(), "video").unwrap(),
                "the plain rows do not change"
            );
            let (tt, revised) = report.dual_softmax.expect("a dual-softmax row");
            assert_eq!(tt, 7.5);
            let plain = EvalOptions::default();
            assert_eq!(
                revised.i2t,
                evaluate_scorer(&for_i2t, &t2i, &plain, "video")
                    .unwrap()
                    .i2t
            );
            assert_eq!(
                revised.t2i,
                evaluate_scorer(&for_t2i, &t2i, &plain, "video")
                    .unwrap()
                    .t2i
            );
        }
        let (img, txt, _) = random_case(0, 4, false);
        let scorer = EmbeddingScorer::new(&tensor(&img), &tensor(&txt)).unwrap();
        assert!(dual_softmax(&scorer, 0.0).is_err());
        assert!(dual_softmax(&scorer, f32::NAN).is_err());
    }

    /// A hub image that scores a little above the true match for every
    /// caption wins every plain text query; dual softmax hands the queries
    /// back to their own images.
    #[test]
    fn dual_softmax_demotes_a_hub() {
        // Image 0 is the hub; captions 0..3 belong to images 1..4.
        let (n, m) = (4, 3);
        let mut scores = vec![0.0f32; n * m];
        for j in 0..m {
            scores[j] = 0.62; // the hub, for every caption
            scores[(j + 1) * m + j] = 0.6; // the true image
        }
        let targets = [1, 2, 3];
        let scorer = MatrixScorer::new(scores.clone(), n, m).unwrap();
        let (_, for_t2i) = dual_softmax(&scorer, 20.0).unwrap();
        let revised = for_t2i.score_block(0..n, 0..m).unwrap();
        for (j, &t) in targets.iter().enumerate() {
            let col: Vec<f32> = (0..n).map(|i| scores[i * m + j]).collect();
            let rev: Vec<f32> = (0..n).map(|i| revised[i * m + j]).collect();
            assert_eq!(rank_of(&col, t), 2, "plain: the hub comes first");
            assert_eq!(rank_of(&rev, t), 1, "dual softmax: the true image first");
        }
    }

    #[test]
    fn hard_negative_accuracy_matches_a_pairwise_count() {
        for seed in 0..4 {
            // Quantised coordinates: every score is exact, so ties are real.
            let (mut img, txt, t2i) = random_case(seed, 12, true);
            // Items 0 and 1 are identical: an order-blind model's twins.
            img[1] = img[0].clone();
            // 12 items: pairs (0, 1), (2, 3), ... are each other's hard negatives.
            let hard: Vec<usize> = (0..img.len()).map(|i| i ^ 1).collect();
            let sims = tensor(&img)
                .matmul(&tensor(&txt).t().unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let mut want = 0.0;
            for (j, &t) in t2i.iter().enumerate() {
                let (a, b) = (sims[t][j] as f64, sims[hard[t]][j] as f64);
                want += match a.partial_cmp(&b).unwrap() {
                    std::cmp::Ordering::Greater => 1.0,
                    std::cmp::Ordering::Equal => 0.5,
                    std::cmp::Ordering::Less => 0.0,
                };
            }
            want *= 100.0 / t2i.len() as f64;
            let got = hard_negative_accuracy(&tensor(&img), &tensor(&txt), &t2i, &hard).unwrap();
            assert!((got - want).abs() < 1e-9, "seed {seed}: {got} vs {want}");
        }
        // Identical twins score exactly one half.
        let img = vec![vec![1.0, 0.0], vec![1.0, 0.0]];
        let txt = vec![vec![0.6, 0.8], vec![0.0, 1.0]];
        let got = hard_negative_accuracy(&tensor(&img), &tensor(&txt), &[0, 1], &[1, 0]).unwrap();
        assert_eq!(got, 50.0);
        assert!(hard_negative_accuracy(&tensor(&img), &tensor(&txt), &[0, 1], &[1]).is_err());
    }

    #[test]
    fn matches_brute_force_with_ties_and_odd_blocks() {
        for (seed, quantise) in [(1, false), (2, true), (3, true)] {
            let (img, txt, t2i) = random_case(seed, 23, quantise);
            let (bi, bt) = brute_ranks(&img, &txt, &t2i);
            let ks = vec![1, 5, 10];
            let want = RetrievalReport::new(
                "image",
                img.len(),
                txt.len(),
                DirectionReport::from_ranks(&bi, &ks),
                DirectionReport::from_ranks(&bt, &ks),
            );
            for block in [1, 7, 1000] {
                let opts = EvalOptions {
                    ks: ks.clone(),
                    block,
                    dual_softmax: None,
                };
                let got = evaluate_embeddings(&tensor(&img), &tensor(&txt), &t2i, &opts).unwrap();
                assert_eq!(got, want, "seed {seed} block {block}");
            }
        }
    }

    #[test]
    fn matrix_scorer_matches_brute_force_and_checks_its_size() {
        let (img, txt, t2i) = random_case(4, 17, true);
        let (bi, bt) = brute_ranks(&img, &txt, &t2i);
        let ks = vec![1, 5, 10];
        let scores: Vec<f32> = img
            .iter()
            .flat_map(|a| {
                txt.iter()
                    .map(move |b| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>())
            })
            .collect();
        let scorer = MatrixScorer::new(scores, img.len(), txt.len()).unwrap();
        let opts = EvalOptions {
            ks: ks.clone(),
            block: 5,
            dual_softmax: None,
        };
        let got = evaluate_scorer(&scorer, &t2i, &opts, "image").unwrap();
        assert_eq!(got.i2t, DirectionReport::from_ranks(&bi, &ks));
        assert_eq!(got.t2i, DirectionReport::from_ranks(&bt, &ks));
        assert!(MatrixScorer::new(vec![0.0; 5], 2, 3).is_err());
        assert!(scorer.score_block(0..img.len() + 1, 0..1).is_err());
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        // Three identical images: caption 0 belongs to image 2, so two images
        // with equal scores and lower indices rank before it.
        let img = vec![vec![1.0, 0.0]; 3];
        let txt = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![0.0, 1.0]];
        let t2i = vec![2, 0, 1];
        let r = evaluate_embeddings(&tensor(&img), &tensor(&txt), &t2i, &EvalOptions::default())
            .unwrap();
        assert_eq!(r.t2i.at(1), Some(100.0 / 3.0));
        assert_eq!(r.t2i.median_rank, 2.0);
    }

    #[test]
    fn bad_targets_are_named() {
        let img = vec![vec![1.0, 0.0]; 2];
        let txt = vec![vec![1.0, 0.0]];
        let e = evaluate_embeddings(&tensor(&img), &tensor(&txt), &[5], &EvalOptions::default())
            .unwrap_err();
        assert!(e.to_string().contains("caption 0 points at image 5"), "{e}");
        let e = evaluate_embeddings(&tensor(&img), &tensor(&txt), &[0], &EvalOptions::default())
            .unwrap_err();
        assert!(e.to_string().contains("image 1 has no caption"), "{e}");
    }

    #[test]
    fn map_at_r_by_hand() {
        // Gallery on a line; the query points along +x. Scores: 3, 2, 1, -1.
        let gallery = vec![
            vec![3.0, 0.0],
            vec![2.0, 0.0],
            vec![1.0, 0.0],
            vec![-1.0, 0.0],
        ];
        let q = vec![vec![1.0, 0.0]];
        // Label 7 at gallery 0 and 2 (R = 2): top 2 = [0 (hit), 1 (miss)] -> (1/1) / 2.
        let m = map_at_r(&tensor(&q), &[7], &tensor(&gallery), &[7, 1, 7, 1]).unwrap();
        assert!((m - 50.0).abs() < 1e-9, "{m}");
        // Label 1 at gallery 1 and 3 (R = 2): top 2 = [0 miss, 1 hit] -> (1/2) / 2.
        let m = map_at_r(&tensor(&q), &[1], &tensor(&gallery), &[7, 1, 7, 1]).unwrap();
        assert!((m - 25.0).abs() < 1e-9, "{m}");
    }

    #[test]
    fn top_k_matches_full_sort() {
        let (img, txt, _) = random_case(9, 40, true);
        let got = top_k(&tensor(&txt[..5]), &tensor(&img), 7).unwrap();
        for (q, list) in got.iter().enumerate() {
            let mut all: Vec<(usize, f32)> = img
                .iter()
                .enumerate()
                .map(|(i, v)| (i, v.iter().zip(&txt[q]).map(|(a, b)| a * b).sum::<f32>()))
                .collect();
            all.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
            let want: Vec<usize> = all.iter().take(7).map(|x| x.0).collect();
            let have: Vec<usize> = list.iter().map(|x| x.0).collect();
            assert_eq!(have, want);
        }
    }

    /// One NaN image row: before the check every comparison with it was
    /// false, so on this case (image 0 NaN, image 1 matching caption 1)
    /// every query ranked its target first and all recalls were 100.
    #[test]
    fn a_nan_embedding_row_is_an_error_naming_it() {
        let img = tensor(&[vec![f32::NAN, 0.0], vec![1.0, 0.0]]);
        let txt = tensor(&[vec![0.0, 1.0], vec![1.0, 0.0]]);
        let e = evaluate_embeddings(&img, &txt, &[0, 1], &EvalOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("image embedding row 0"), "{e}");
        // The same on the text side, and in search, with the row named.
        let txt = tensor(&[vec![0.0, 1.0], vec![1.0, f32::INFINITY]]);
        let img = tensor(&[vec![0.0, 1.0], vec![1.0, 0.0]]);
        let e = evaluate_embeddings(&img, &txt, &[0, 1], &EvalOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("text embedding row 1"), "{e}");
        let e = top_k(&txt, &img, 1).unwrap_err().to_string();
        assert!(e.contains("query embedding row 1"), "{e}");
        let e = hard_negative_accuracy(&img, &txt, &[0, 1], &[1, 0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("text embedding row 1"), "{e}");
    }

    /// A pair scorer that answers NaN (a cross-encoder gone wrong) is named
    /// by the pair, in both directions of the evaluation.
    #[test]
    fn a_nan_score_is_an_error_naming_the_pair() {
        let mut scores = vec![0.5f32; 3 * 4];
        scores[4 + 2] = f32::NAN;
        let scorer = MatrixScorer::new(scores, 3, 4).unwrap();
        let e = evaluate_scorer(&scorer, &[0, 1, 2, 2], &EvalOptions::default(), "image")
            .unwrap_err()
            .to_string();
        assert!(e.contains("image 1 and caption 2"), "{e}");
    }
}
