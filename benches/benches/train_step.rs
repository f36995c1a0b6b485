//! The whole COTS training step (forward, backward, clipping, AdamW, EMA,
//! enqueue) at three sizes, on batches prepared before timing (issue #23):
//! the demo model at batch 32, the `small` preset at batch 32, and ViT-B/16 +
//! BERT-base at batch 8 with the 65,536-slot queue. See
//! `cots_benches::train_step` for what is and is not in the step, and
//! docs/perf-training.md for the PyTorch comparison (benches/train_step.sh).
//!
//! `cargo bench -p cots-benches --bench train_step -- demo` runs one size;
//! threads: `RAYON_NUM_THREADS` (candle's matmul and its parallel ops, and
//! the loader's decoding, share rayon's global pool).

use cots_benches::train_step::{Rig, Size};
use criterion::{criterion_group, criterion_main, Criterion};
use std::time::Duration;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_step");
    for size in Size::ALL {
        // The base step takes seconds on two cores: the fewest samples
        // criterion accepts, in a short measurement window.
        match size {
            Size::Base => group
                .sample_size(10)
                .warm_up_time(Duration::from_secs(1))
                .measurement_time(Duration::from_secs(20)),
            _ => group
                .sample_size(20)
                .warm_up_time(Duration::from_secs(3))
                .measurement_time(Duration::from_secs(15)),
        };
        // Built on first use, so a filtered-out size costs nothing.
        let mut rig: Option<Rig> = None;
        group.bench_function(size.name(), |b| {
            let rig = rig.get_or_insert_with(|| {
                let mut r = Rig::new(size).expect("build the training rig");
                // One step outside the timing: the loader's worker fills
                // its prefetch channel meanwhile, then sleeps.
                r.step().expect("warm-up step");
                r
            });
            b.iter(|| rig.step().expect("training step"));
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
