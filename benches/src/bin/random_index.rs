//! A large index of random unit vectors stamped with a run's weights hash,
//! for loading `cots serve` (benches/serve/load.sh). The vectors are noise,
//! so the answers mean nothing; what a load test measures is the query path,
//! which is the same for any vectors: the text encoder of the run plus an
//! exact search over every row.
//!
//! `cargo run --release -p cots-benches --bin random_index -- --run runs/demo --out DIR --items 100000`

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Parser;
use cots_index::{Index, Item, ItemKind, Model};
use cots_train::inference::Run;
use rand::{Rng, SeedableRng};

#[derive(Parser)]
struct Args {
    /// The run whose weights hash and width the index takes.
    #[arg(long)]
    run: PathBuf,
    /// The index directory (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 100_000)]
    items: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let run =
        Run::open(&a.run, &Device::Cpu).with_context(|| format!("opening {}", a.run.display()))?;
    let dim = run
        .embed_texts(&["a probe".to_string()])?
        .dims()
        .last()
        .copied()
        .context("the run's text embedding has no width")?;
    let mut index = Index::create(
        &a.out,
        Model {
            weights_hash: run.weights_hash.clone(),
            run: a.run.display().to_string(),
            dim,
        },
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
    // Added in chunks, as `cots index build` does: segments and atomic commits.
    let chunk = 20_000;
    for start in (0..a.items).step_by(chunk) {
        let n = chunk.min(a.items - start);
        let mut vectors = Vec::with_capacity(n * dim);
        for _ in 0..n {
            let v: Vec<f32> = (0..dim).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            vectors.extend(v.iter().map(|x| x / norm));
        }
        let items = (start..start + n)
            .map(|i| Item {
                id: format!("r{i:07}"),
                kind: ItemKind::Image,
                path: None,
                captions: vec![format!("random item {i}")],
                metadata: BTreeMap::from([("shard".to_string(), (i % 10).to_string())]),
            })
            .collect();
        index.add(items, &vectors, vec![None; n])?;
    }
    println!(
        "{}: {} random unit vectors of width {dim}, weights {}",
        a.out.display(),
        index.len(),
        run.weights_hash
    );
    Ok(())
}
