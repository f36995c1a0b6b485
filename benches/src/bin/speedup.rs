//! Two-stream vs single-stream retrieval, like for like: `cargo xtask speedup`.
//!
//! Both models are built at the same width and depth (`cots_encoders::cross::
//! Config::matching`), on the same device, batch size and precision (f32),
//! and timed on random inputs of the real shapes (weights and pixel values
//! do not change the cost of a forward pass):
//!
//! 1. a COCO-5K-shaped problem (5,000 images x 25,000 texts): the two-stream
//!    model measured in full (encode gallery, encode queries, similarity,
//!    top-k both ways); the cross-encoder from a per-pair rate measured on a
//!    sample, extrapolated to every pair (labelled as such);
//! 2. a small problem measured in full for BOTH models, compared with what
//!    the rates predict, so the extrapolation is checked against reality;
//!    VLDeformer's decomposed encoders (same stack, one modality at a time)
//!    are timed beside them: per-item rates from a sample, scaled to the
//!    large problem (labelled), and the small problem in full;
//! 3. with `--two-stream RUN --cross RUN` (and optionally `--decomposed
//!    RUN`), the accuracy of the trained models and of the two-stage hybrid
//!    (two-stream top-k re-scored by the cross-encoder) on the same test
//!    split, with their measured times (`cots_train::compare`).
//!
//! Results go to a JSON file and a Markdown summary on stdout.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use cots_data::{Dataset, Split};
use cots_encoders::cross::{self, CrossEncoder};
use cots_encoders::decomposed::{self, Decomposed};
use cots_encoders::dual::DualEncoder;
use cots_encoders::two_stream::{self, TwoStream};
use cots_encoders::weights::frozen;
use cots_eval::top_k;
use cots_train::compare::{compare, Contenders};
use cots_train::cross::CrossRun;
use cots_train::inference::Run;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    about = "Time retrieval with the two-stream model against a single-stream cross-encoder of the same size",
    long_about = "Builds both models at the same width and depth, times a full retrieval evaluation on a \
COCO-5K-shaped problem (two-stream measured in full, single-stream extrapolated from a measured per-pair \
rate), checks the extrapolation on a small problem measured in full, and (with --two-stream and --cross) \
measures both models' accuracy and the two-stage hybrid on the same test split."
)]
struct Args {
    /// Size of both models: tiny, small or base (12 layers, 768 wide, ViT-B/16).
    #[arg(long, default_value = "base")]
    preset: String,
    /// CI mode: tiny preset and small problems; finishes in a minute or two.
    #[arg(long)]
    quick: bool,
    /// Gallery images of the large problem.
    #[arg(long, default_value_t = 5000)]
    images: usize,
    /// Query texts of the large problem.
    #[arg(long, default_value_t = 25000)]
    texts: usize,
    /// Images of the problem measured in full for both models (default: 20
    /// with --quick, 40 at small size, 8 at base size where a pair costs
    /// ~0.3 s on a CPU).
    #[arg(long)]
    small_images: Option<usize>,
    /// Texts of the problem measured in full (default: 5 per image).
    #[arg(long)]
    small_texts: Option<usize>,
    /// Pairs timed to measure the cross-encoder's per-pair rate.
    #[arg(long)]
    pair_sample: Option<usize>,
    /// Batch size of every encoder pass, both models.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Tokens per text, [CLS] and [SEP] included.
    #[arg(long, default_value_t = 32)]
    text_len: usize,
    /// A trained two-stream run (for the accuracy comparison).
    #[arg(long)]
    two_stream: Option<PathBuf>,
    /// A cross-encoder trained by `cots train-cross` (for the accuracy comparison).
    #[arg(long)]
    cross: Option<PathBuf>,
    /// A decomposed model from `cots decompose` (adds VLDeformer to the
    /// accuracy comparison).
    #[arg(long)]
    decomposed: Option<PathBuf>,
    /// Use only the first N test images (and their captions) for the
    /// accuracy comparison: the cross-encoder scores every pair, so the cost
    /// grows with images x captions.
    #[arg(long)]
    test_images: Option<usize>,
    /// Candidates per query re-scored by the cross-encoder in the hybrid.
    #[arg(long, value_delimiter = ',', default_value = "16,128")]
    rerank_k: Vec<usize>,
    /// Where the JSON goes (default runs/speedup/<preset>.json).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Random-weight models of one size, and inputs of the real shapes.
struct Bench {
    ts: TwoStream,
    ce: CrossEncoder,
    /// VLDeformer: the cross-encoder's stack run on one modality at a time.
    dec: Decomposed,
    image_size: usize,
    vocab: usize,
    batch: usize,
    text_len: usize,
    dev: Device,
}

impl Bench {
    fn new(preset: &str, batch: usize, text_len: usize) -> Result<Self> {
        let ts_cfg = match preset {
            "tiny" => two_stream::Config::tiny(1000),
            "small" => two_stream::Config::small(1000),
            "base" => two_stream::Config::base(),
            other => bail!("unknown preset `{other}`: use tiny, small or base"),
        };
        let ce_cfg = cross::Config::matching(&ts_cfg);
        if text_len > ce_cfg.joint.max_position_embeddings || text_len < 3 {
            bail!("--text-len {text_len} does not fit the {preset} text encoder");
        }
        let dev = Device::Cpu;
        // Random weights, then frozen (plain tensors): inference records no
        // autograd graph, as `cots` inference does.
        let m1 = VarMap::new();
        TwoStream::new(&ts_cfg, VarBuilder::from_varmap(&m1, DType::F32, &dev))?;
        let ts = TwoStream::new(&ts_cfg, frozen(&m1, DType::F32, &dev))?;
        let m2 = VarMap::new();
        CrossEncoder::new(&ce_cfg, VarBuilder::from_varmap(&m2, DType::F32, &dev))?;
        let ce = CrossEncoder::new(&ce_cfg, frozen(&m2, DType::F32, &dev))?;
        let dec_cfg = decomposed::Config::new(&ce_cfg, ts_cfg.embed_dim, 2, 3);
        let m3 = VarMap::new();
        Decomposed::new(&dec_cfg, VarBuilder::from_varmap(&m3, DType::F32, &dev))?;
        let dec = Decomposed::new(&dec_cfg, frozen(&m3, DType::F32, &dev))?;
        Ok(Self {
            ts,
            ce,
            dec,
            image_size: ts_cfg.vision.image_size,
            vocab: ts_cfg.text.vocab_size,
            batch,
            text_len,
            dev,
        })
    }

    fn pixels(&self, n: usize) -> Result<Tensor> {
        let s = self.image_size;
        Ok(Tensor::randn(0f32, 1.0, (n, 3, s, s), &self.dev)?)
    }

    fn ids(&self, n: usize) -> Result<(Tensor, Tensor)> {
        let ids = Tensor::rand(0f32, self.vocab as f32 - 1.0, (n, self.text_len), &self.dev)?
            .to_dtype(DType::U32)?;
        let mask = Tensor::ones((n, self.text_len), DType::U32, &self.dev)?;
        Ok((ids, mask))
    }

    /// Batch sizes that cover `n` items.
    fn chunks(&self, n: usize) -> Vec<usize> {
        (0..n)
            .step_by(self.batch)
            .map(|s| self.batch.min(n - s))
            .collect()
    }

    /// Full two-stream retrieval of `n` images x `m` texts: seconds per stage.
    fn two_stream(&self, n: usize, m: usize) -> Result<Value> {
        self.retrieval(&self.ts, "two-stream", n, m)
    }

    /// Full retrieval of `n` images x `m` texts with any two-encoder model
    /// (encode gallery, encode queries, similarity, top-k both ways):
    /// seconds per stage.
    fn retrieval<M: DualEncoder>(
        &self,
        model: &M,
        what: &str,
        n: usize,
        m: usize,
    ) -> Result<Value> {
        let t0 = Instant::now();
        let mut img = Vec::new();
        for b in self.chunks(n) {
            img.push(model.embed_images(&self.pixels(b)?)?);
        }
        let img = Tensor::cat(&img, 0)?;
        let t_img = t0.elapsed().as_secs_f64();
        eprintln!("  {what}: {n} images encoded in {t_img:.1} s");
        let t1 = Instant::now();
        let mut txt = Vec::new();
        for b in self.chunks(m) {
            let (ids, mask) = self.ids(b)?;
            txt.push(model.embed_texts(&ids, &mask)?);
        }
        let txt = Tensor::cat(&txt, 0)?;
        let t_txt = t1.elapsed().as_secs_f64();
        eprintln!("  {what}: {m} texts encoded in {t_txt:.1} s");
        let t2 = Instant::now();
        let a = top_k(&txt, &img, 10)?;
        let b = top_k(&img, &txt, 10)?;
        let t_rank = t2.elapsed().as_secs_f64();
        anyhow::ensure!(a.len() == m && b.len() == n, "top-k lost queries");
        Ok(json!({
            "images": n, "texts": m,
            "encode_images_s": t_img, "encode_texts_s": t_txt,
            "similarity_topk_s": t_rank,
            "total_s": t_img + t_txt + t_rank,
            "encoder_passes": n + m,
        }))
    }

    /// Seconds to embed `n` images and `m` texts for the cross-encoder (the
    /// per-item part of its cost), and the embedded tensors.
    fn cross_embed(&self, n: usize, m: usize) -> Result<(f64, Tensor, Tensor, Tensor)> {
        let t0 = Instant::now();
        let mut img = Vec::new();
        for b in self.chunks(n) {
            img.push(self.ce.embed_image(&self.pixels(b)?, None)?);
        }
        let mut txt = Vec::new();
        let mut masks = Vec::new();
        for b in self.chunks(m) {
            let (ids, mask) = self.ids(b)?;
            txt.push(self.ce.embed_text(&ids, None)?);
            masks.push(mask);
        }
        let out = (
            Tensor::cat(&img, 0)?,
            Tensor::cat(&txt, 0)?,
            Tensor::cat(&masks, 0)?,
        );
        Ok((t0.elapsed().as_secs_f64(), out.0, out.1, out.2))
    }

    /// Runs the joint transformer on `pairs` (image, text) in batches; seconds.
    fn cross_pairs(
        &self,
        img: &Tensor,
        txt: &Tensor,
        masks: &Tensor,
        pairs: &[(u32, u32)],
    ) -> Result<f64> {
        let t0 = Instant::now();
        for chunk in pairs.chunks(self.batch) {
            let ii: Vec<u32> = chunk.iter().map(|p| p.0).collect();
            let tt: Vec<u32> = chunk.iter().map(|p| p.1).collect();
            let ii = Tensor::new(ii.as_slice(), &self.dev)?;
            let tt = Tensor::new(tt.as_slice(), &self.dev)?;
            let logits = self.ce.joint(
                &txt.index_select(&tt, 0)?,
                &masks.index_select(&tt, 0)?,
                &img.index_select(&ii, 0)?,
                None,
            )?;
            // Reading the scores back is part of the cost.
            let _scores: Vec<f32> = cross::match_score(&logits)?.to_vec1()?;
        }
        Ok(t0.elapsed().as_secs_f64())
    }

    /// Per-item embedding cost and per-pair joint cost of the cross-encoder.
    fn cross_rates(&self, sample: usize) -> Result<(f64, f64)> {
        let items = self.batch.max(8);
        // Warm-up: first calls allocate.
        let (_, img, txt, masks) = self.cross_embed(items, items)?;
        let warm: Vec<(u32, u32)> = (0..self.batch as u32)
            .map(|i| (i % items as u32, i % items as u32))
            .collect();
        self.cross_pairs(&img, &txt, &masks, &warm)?;
        let (t_embed, img, txt, masks) = self.cross_embed(items, items)?;
        let per_item = t_embed / (2 * items) as f64;
        let pairs: Vec<(u32, u32)> = (0..sample as u32)
            .map(|p| (p % items as u32, (p / items as u32) % items as u32))
            .collect();
        let per_pair = self.cross_pairs(&img, &txt, &masks, &pairs)? / sample as f64;
        Ok((per_item, per_pair))
    }

    /// Every pair of `n` images x `m` texts through the cross-encoder, plus
    /// the top-k of both directions; seconds.
    fn cross_full(&self, n: usize, m: usize) -> Result<f64> {
        let (t_embed, img, txt, masks) = self.cross_embed(n, m)?;
        let pairs: Vec<(u32, u32)> = (0..n as u32)
            .flat_map(|i| (0..m as u32).map(move |t| (i, t)))
            .collect();
        let t_pairs = self.cross_pairs(&img, &txt, &masks, &pairs)?;
        Ok(t_embed + t_pairs)
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} threads, CPU f32")
}

/// Accuracy and time of the trained models and the hybrid on one test split
/// (`cots_train::compare`, as `cots compare` reports them).
fn accuracy(
    ts_dir: &Path,
    ce_dir: &Path,
    dec_dir: Option<&PathBuf>,
    ks: &[usize],
    limit: Option<usize>,
) -> Result<(Value, String)> {
    let dev = Device::Cpu;
    let open = |d: &Path| Run::open(d, &dev).with_context(|| format!("opening {}", d.display()));
    let run = open(ts_dir)?;
    let ce =
        CrossRun::open(ce_dir, &dev).with_context(|| format!("opening {}", ce_dir.display()))?;
    let dec = dec_dir.map(|d| open(d)).transpose()?;
    let mut data: Dataset = cots_train::trainer::load_dataset(&run.cfg)?.split(Split::Test)?;
    if let Some(n) = limit {
        data.items.truncate(n.max(1));
    }
    let ts_cfg = run.two_stream("the speedup comparison")?.config();
    let (v, t, j) = (&ts_cfg.vision, &ts_cfg.text, &ce.cfg.joint);
    let md = format!(
        "Trained models: two-stream `{}` (ViT {}x{}, BERT {}x{}, step {}); single-stream `{}` \
         ({} layers x {}, step {}).\n\n",
        ts_dir.display(),
        v.num_hidden_layers,
        v.hidden_size,
        t.num_hidden_layers,
        t.hidden_size,
        run.step,
        ce_dir.display(),
        j.num_hidden_layers,
        j.hidden_size,
        ce.step
    );
    let cmp = compare(
        &Contenders {
            cross: &ce,
            decomposed: dec.as_ref(),
            cots: &run,
            rerank_k: ks,
        },
        &data,
    )?;
    Ok((cmp.to_json(), md + &cmp.to_markdown()))
}

fn main() -> Result<()> {
    let command_line = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let mut a = Args::parse();
    if a.quick {
        a.preset = "tiny".into();
        a.images = a.images.min(500);
        a.texts = a.texts.min(2500);
    }
    let base = a.preset == "base";
    let small_n = a.small_images.unwrap_or(if a.quick {
        20
    } else if base {
        8
    } else {
        40
    });
    let small_m = a.small_texts.unwrap_or(5 * small_n);
    let sample = a.pair_sample.unwrap_or(if a.quick {
        512
    } else if base {
        128
    } else {
        2048
    });
    let bench = Bench::new(&a.preset, a.batch, a.text_len)?;
    let (n, m) = (a.images, a.texts);
    let started = chrono_like_now();
    eprintln!("speedup: preset {} on {}", a.preset, machine());

    // Warm the two-stream path once so allocation is not timed.
    bench.two_stream(bench.batch.min(n), bench.batch.min(m))?;
    eprintln!("two-stream: full retrieval of {n} images x {m} texts ...");
    let ts_large = bench.two_stream(n, m)?;
    let ts_large_s = ts_large["total_s"].as_f64().unwrap_or(f64::NAN);

    eprintln!("single-stream: per-pair rate over {sample} pairs ...");
    let (per_item, per_pair) = bench.cross_rates(sample)?;
    eprintln!(
        "  {:.3} ms per pair, {:.3} ms per embedded item; two-stream took {ts_large_s:.1} s",
        per_pair * 1e3,
        per_item * 1e3
    );
    let predict = |n: usize, m: usize| per_item * (n + m) as f64 + per_pair * (n * m) as f64;
    let ce_large_s = predict(n, m);

    // VLDeformer at the same size: per-item rates from a sample of one
    // batch of images and five of texts, scaled to the large problem, plus
    // the two-stream model's measured similarity and top-k time (the same
    // matrix product at the same embedding width).
    let (dn, dm) = (bench.batch.min(n), (5 * bench.batch).min(m));
    eprintln!("decomposed (VLDeformer): per-item rates over {dn} images and {dm} texts ...");
    bench.retrieval(&bench.dec, "decomposed", dn.min(4), dm.min(4))?;
    let dec_sample = bench.retrieval(&bench.dec, "decomposed", dn, dm)?;
    let per = |k: &str, count: usize| dec_sample[k].as_f64().unwrap_or(f64::NAN) / count as f64;
    let (dec_img, dec_txt) = (per("encode_images_s", dn), per("encode_texts_s", dm));
    let dec_large_s = dec_img * n as f64
        + dec_txt * m as f64
        + ts_large["similarity_topk_s"].as_f64().unwrap_or(f64::NAN);

    eprintln!("small problem, both measured in full: {small_n} x {small_m} ...");
    let ts_small = bench.two_stream(small_n, small_m)?;
    let ts_small_s = ts_small["total_s"].as_f64().unwrap_or(f64::NAN);
    let dec_small = bench.retrieval(&bench.dec, "decomposed", small_n, small_m)?;
    let dec_small_s = dec_small["total_s"].as_f64().unwrap_or(f64::NAN);
    let ce_small_s = bench.cross_full(small_n, small_m)?;
    let ce_small_pred = predict(small_n, small_m);
    eprintln!("  single-stream: {ce_small_s:.1} s measured, {ce_small_pred:.1} s predicted");
    let small_err = (ce_small_pred - ce_small_s).abs() / ce_small_s;

    let ratio = ce_large_s / ts_large_s;
    let mut md = format!(
        "## Speed: {} preset, {} images x {} texts\n\n\
         Measured {} on {}; command: `cargo xtask speedup {}`.\n\n\
         | | two-stream | single-stream |\n|---|---|---|\n\
         | encoder passes | {} | {} (one per pair) |\n\
         | large problem | {:.1} s measured | {:.0} s **extrapolated** from {:.2} ms/pair over {} pairs |\n\
         | small problem {}x{} (all measured) | {:.2} s | {:.2} s measured, {:.2} s predicted ({:.1}% off) |\n\n\
         Speed-up on the large problem: **{:.0}x** (two-stream: images {:.1} s, texts {:.1} s, similarity + top-k {:.2} s).\n\n\
         VLDeformer (the cross-encoder's stack decomposed, same size): {:.2} ms per image and {:.2} ms per text \
         over a sample of {} images and {} texts, so the large problem takes {:.0} s **extrapolated**, \
         {:.0}x faster than the single-stream model; the small problem measured in full: {:.2} s.\n",
        a.preset, n, m, started, machine(), command_line,
        n + m, n * m,
        ts_large_s, ce_large_s, per_pair * 1e3, sample,
        small_n, small_m, ts_small_s, ce_small_s, ce_small_pred, 100.0 * small_err,
        ratio,
        ts_large["encode_images_s"].as_f64().unwrap_or(f64::NAN),
        ts_large["encode_texts_s"].as_f64().unwrap_or(f64::NAN),
        ts_large["similarity_topk_s"].as_f64().unwrap_or(f64::NAN),
        dec_img * 1e3, dec_txt * 1e3, dn, dm, dec_large_s, ce_large_s / dec_large_s, dec_small_s,
    );
    let mut out = json!({
        "date": started, "machine": machine(), "command": command_line, "preset": a.preset, "batch": a.batch,
        "text_len": a.text_len, "precision": "f32",
        "large": {
            "two_stream_measured": ts_large,
            "single_stream_extrapolated": {
                "seconds": ce_large_s, "per_pair_s": per_pair, "per_item_embed_s": per_item,
                "pair_sample": sample, "encoder_passes": n * m,
            },
            "speedup": ratio,
            "decomposed_extrapolated": {
                "seconds": dec_large_s, "per_image_s": dec_img, "per_text_s": dec_txt,
                "sample_images": dn, "sample_texts": dm,
                "speedup_vs_single_stream": ce_large_s / dec_large_s,
            },
        },
        "small": {
            "two_stream_measured_s": ts_small_s,
            "decomposed_measured_s": dec_small_s,
            "single_stream_measured_s": ce_small_s,
            "single_stream_predicted_s": ce_small_pred,
            "relative_error": small_err,
            "images": small_n, "texts": small_m,
        },
    });
    match (&a.two_stream, &a.cross) {
        (Some(t), Some(c)) => {
            eprintln!("accuracy on the test split ...");
            let (acc, table) = accuracy(t, c, a.decomposed.as_ref(), &a.rerank_k, a.test_images)?;
            out["accuracy"] = acc;
            md += "\n## Accuracy, same test split\n\n";
            md += &table;
        }
        (None, None) => {}
        _ => bail!("--two-stream and --cross go together (both trained runs are needed)"),
    }
    let path = a
        .out
        .unwrap_or_else(|| PathBuf::from(format!("runs/speedup/{}.json", a.preset)));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&out)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("{md}\nJSON: {}", path.display());
    Ok(())
}

/// UTC date and time, from `date` (no extra dependency for one string).
fn chrono_like_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown date".into())
}
