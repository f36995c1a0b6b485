//! Exact vs approximate search on a cots-index: recall@10 of the HNSW path
//! against the exact one, single-query queries/s of each, build times, files
//! and process memory. Two distributions of unit vectors: clustered (Gaussian
//! clusters around random centres) and uniform on the sphere; queries are
//! fresh draws from the same distribution, never gallery members.
//!
//! `cargo run --release -p cots-benches --bin ann -- --n 1000000`
//! (`--n 20000` is the quick version; `--dist clustered` or `uniform` runs one.)

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use cots_index::{AnnParams, Index, Item, ItemKind, Mode, Model, SearchOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Parser)]
struct Args {
    /// Gallery size.
    #[arg(long, default_value_t = 1_000_000)]
    n: usize,
    #[arg(long, default_value_t = 256)]
    dim: usize,
    /// Clusters of the clustered set (default: n / 1000, at least 10).
    #[arg(long)]
    clusters: Option<usize>,
    /// Norm of the Gaussian noise around a (unit) centre before normalising.
    #[arg(long, default_value_t = 1.0)]
    noise: f32,
    /// clustered, uniform or both.
    #[arg(long, default_value = "both")]
    dist: String,
    /// Queries for recall and approximate queries/s.
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    /// Queries timed on the exact path (it is the slow one).
    #[arg(long, default_value_t = 100)]
    exact_queries: usize,
    #[arg(long, default_value_t = AnnParams::default().m)]
    m: usize,
    #[arg(long, default_value_t = AnnParams::default().ef_construction)]
    ef_construction: usize,
    /// ef values to measure.
    #[arg(long, value_delimiter = ',', default_value = "32,64,128,256")]
    ef: Vec<usize>,
    /// int8 short-list lengths to measure (timed on `--exact-queries` queries).
    #[arg(long, value_delimiter = ',', default_value = "50,200")]
    shortlist: Vec<usize>,
    /// Where the indexes are built (default: a temp dir, removed after).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
}

/// A standard normal draw (Box-Muller), so no extra crate is needed.
fn gauss(rng: &mut ChaCha8Rng) -> f32 {
    let u: f32 = rng.random_range(f32::EPSILON..1.0);
    let v: f32 = rng.random();
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

/// `n` unit vectors from the named distribution; `centres` fixes the clusters.
fn draw(
    rng: &mut ChaCha8Rng,
    n: usize,
    dim: usize,
    centres: Option<&[f32]>,
    noise: f32,
) -> Vec<f32> {
    let mut out = vec![0f32; n * dim];
    let scale = noise / (dim as f32).sqrt();
    for row in out.chunks_mut(dim) {
        match centres {
            Some(c) => {
                let k = rng.random_range(0..c.len() / dim);
                for (x, m) in row.iter_mut().zip(&c[k * dim..(k + 1) * dim]) {
                    *x = m + scale * gauss(rng);
                }
            }
            None => row.iter_mut().for_each(|x| *x = gauss(rng)),
        }
        normalize(row);
    }
    out
}

fn run(a: &Args, name: &str, clustered: bool, root: &std::path::Path) -> Result<()> {
    let dim = a.dim;
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed ^ u64::from(clustered));
    let centres = clustered.then(|| {
        let k = a.clusters.unwrap_or((a.n / 1000).max(10));
        draw(&mut rng, k, dim, None, 0.0)
    });
    let dir = root.join(name);
    let mut index = Index::create(
        &dir,
        Model {
            weights_hash: "benchmark".into(),
            run: "none".into(),
            dim,
        },
    )?;
    let t = Instant::now();
    let chunk = 100_000;
    for start in (0..a.n).step_by(chunk) {
        let n = chunk.min(a.n - start);
        let vectors = draw(&mut rng, n, dim, centres.as_deref(), a.noise);
        let items = (start..start + n)
            .map(|i| Item {
                id: format!("v{i}"),
                kind: ItemKind::Image,
                path: None,
                captions: Vec::new(),
                metadata: BTreeMap::new(),
            })
            .collect();
        index.add(items, &vectors, vec![None; n])?;
    }
    let add_s = t.elapsed().as_secs_f64();
    let params = AnnParams {
        m: a.m,
        ef_construction: a.ef_construction,
        ..AnnParams::default()
    };
    let t = Instant::now();
    index.build_ann(params.clone())?;
    let ann_s = t.elapsed().as_secs_f64();
    drop(index);
    // Reopen: what a server does; the graph loads on the first approximate query.
    let rss_before = status_kib("VmRSS:");
    let t = Instant::now();
    let index = Index::open(&dir)?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let queries = draw(&mut rng, a.queries, dim, centres.as_deref(), a.noise);
    let k = 10;

    let exact = SearchOptions::default();
    let t = Instant::now();
    let nq_exact = a.exact_queries.min(a.queries).max(1);
    for q in queries.chunks(dim).take(nq_exact) {
        std::hint::black_box(index.search(q, k, &exact)?);
    }
    let exact_qps = nq_exact as f64 / t.elapsed().as_secs_f64();
    let truth = index.search_batch(&queries, k, &exact)?;

    let info = index.info();
    let ann_bytes = info.ann.as_ref().map_or(0, |i| i.bytes);
    println!(
        "\n## {name}: n={} dim={dim}{} ({} queries, k={k})",
        a.n,
        if clustered {
            format!(
                ", {} clusters, noise {}",
                centres.as_ref().map_or(0, |c| c.len() / dim),
                a.noise
            )
        } else {
            String::new()
        },
        a.queries
    );
    println!(
        "index: add {add_s:.1} s, vectors {:.0} MiB; HNSW M={} ef_construction={}: build {ann_s:.1} s, {:.0} MiB on disk; open {open_ms:.1} ms",
        mib(info.vector_bytes),
        params.m,
        params.ef_construction,
        mib(ann_bytes)
    );
    println!("exact: {exact_qps:.1} single-query queries/s (multi-threaded block scan)");
    println!("| mode | recall@10 | queries/s (one at a time) | x exact |");
    println!("|---|---|---|---|");
    println!("| exact | 1.0000 | {exact_qps:.1} | 1.0 |");
    for &ef in &a.ef {
        let opts = SearchOptions {
            mode: Mode::Approximate { ef },
            ..Default::default()
        };
        // The first query loads the graph; keep it out of the timing.
        index.search(&queries[..dim], k, &opts)?;
        let t = Instant::now();
        let mut found = 0;
        for (q, want) in queries.chunks(dim).zip(&truth) {
            let got = index.search(q, k, &opts)?;
            found += got
                .iter()
                .filter(|h| want.iter().any(|w| w.row == h.row))
                .count();
        }
        let qps = a.queries as f64 / t.elapsed().as_secs_f64();
        let recall = found as f64 / (k * a.queries) as f64;
        println!(
            "| approximate ef={ef} | {recall:.4} | {qps:.1} | {:.1} |",
            qps / exact_qps
        );
    }
    // The int8 path: codes scanned for a short list, re-ranked in f32.
    drop(index);
    let mut index = Index::open(&dir)?;
    let t = Instant::now();
    index.quantize()?;
    let quant_s = t.elapsed().as_secs_f64();
    let int8_bytes = index.info().int8_bytes.unwrap_or(0);
    for &shortlist in &a.shortlist {
        let opts = SearchOptions {
            mode: Mode::Quantized { shortlist },
            ..Default::default()
        };
        let t = Instant::now();
        let mut found = 0;
        let nq = nq_exact.max(1);
        for (q, want) in queries.chunks(dim).zip(&truth).take(nq) {
            let got = index.search(q, k, &opts)?;
            found += got
                .iter()
                .filter(|h| want.iter().any(|w| w.row == h.row))
                .count();
        }
        let qps = nq as f64 / t.elapsed().as_secs_f64();
        println!(
            "| int8 short list {shortlist} | {:.4} | {qps:.1} | {:.1} |",
            found as f64 / (k * nq) as f64,
            qps / exact_qps
        );
    }
    println!(
        "int8 codes: {:.0} MiB ({:.0}% of the f32 vectors), written in {quant_s:.1} s",
        mib(int8_bytes),
        100.0 * int8_bytes as f64 / info.vector_bytes.max(1) as f64
    );
    println!(
        "memory: process RSS {:.0} MiB after the searches ({:.0} MiB before opening; peak {:.0} MiB); mapped vector pages count toward RSS once touched",
        status_kib("VmRSS:") as f64 / 1024.0,
        rss_before as f64 / 1024.0,
        status_kib("VmHWM:") as f64 / 1024.0
    );
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    let tmp;
    let root = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile_dir()?;
            tmp.clone()
        }
    };
    println!(
        "cots-index exact vs approximate; {} rayon threads",
        rayon_threads()
    );
    let which: Vec<(&str, bool)> = match a.dist.as_str() {
        "clustered" => vec![("clustered", true)],
        "uniform" => vec![("uniform", false)],
        "both" => vec![("clustered", true), ("uniform", false)],
        other => anyhow::bail!("unknown --dist `{other}` (clustered, uniform or both)"),
    };
    for (name, clustered) in which {
        run(&a, name, clustered, &root)?;
        if a.dir.is_none() {
            std::fs::remove_dir_all(root.join(name)).ok();
        }
    }
    if a.dir.is_none() {
        std::fs::remove_dir_all(&root).ok();
    }
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("cots-ann-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
