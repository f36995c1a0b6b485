//! Fused queue contrastive loss vs the naive candle composition, forward +
//! backward, at B = 256, D = 256, K in {4,096, 65,536}; plus the peak extra
//! heap of one forward + backward of each (a counting allocator), printed and
//! written to target/queue-memory.json.
//!
//! PyTorch's naive version of the same work: benches/reference/queue_loss.py.
//! Then the task-level KL (symmetric), fused vs naive candle, forward +
//! backward at the same sizes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Device, Tensor, Var, D};
use cots_ops::queue::{
    queue_contrastive, queue_contrastive_naive, queue_kl, queue_kl_naive, KlDirection,
    QueueContrastiveOutput,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

type Op = fn(
    &Tensor,
    &Tensor,
    &Tensor,
    Option<cots_ops::queue::PositiveIds>,
    &Tensor,
) -> candle_core::Result<QueueContrastiveOutput>;

fn unit(rows: usize, d: usize) -> Tensor {
    let t = Tensor::randn(0f32, 1.0, (rows, d), &Device::Cpu).unwrap();
    t.broadcast_div(
        &t.sqr()
            .unwrap()
            .sum_keepdim(D::Minus1)
            .unwrap()
            .sqrt()
            .unwrap(),
    )
    .unwrap()
}

fn step(op: Op, q: &Var, k: &Tensor, queue: &Tensor, tau: &Var) {
    let out = op(q.as_tensor(), k, queue, None, tau.as_tensor()).unwrap();
    let grads = out.loss.mean_all().unwrap().backward().unwrap();
    assert!(grads.get(q.as_tensor()).is_some());
}

fn bench(c: &mut Criterion) {
    let quick = std::env::var_os("COTS_BENCH_QUICK").is_some();
    let ks: &[usize] = if quick { &[4096] } else { &[4096, 65_536] };
    let (b, d) = (256, 256);
    let mut memory = Vec::new();
    let mut group = c.benchmark_group("queue_contrastive_fwd_bwd");
    group.sample_size(10);
    for &k in ks {
        let q = Var::from_tensor(&unit(b, d)).unwrap();
        let key = unit(b, d);
        let queue = unit(k, d);
        let tau = Var::from_tensor(&Tensor::new(0.07f32, &Device::Cpu).unwrap()).unwrap();
        for (name, op) in [
            ("fused", queue_contrastive as Op),
            ("naive", queue_contrastive_naive as Op),
        ] {
            let base = LIVE.load(Ordering::Relaxed);
            PEAK.store(base, Ordering::Relaxed);
            step(op, &q, &key, &queue, &tau);
            let extra = PEAK.load(Ordering::Relaxed).saturating_sub(base);
            println!(
                "peak extra heap, {name}, K = {k}: {:.1} MiB",
                extra as f64 / (1 << 20) as f64
            );
            memory.push(format!(
                "{{\"op\": \"{name}\", \"k\": {k}, \"peak_extra_bytes\": {extra}}}"
            ));
            group.bench_with_input(BenchmarkId::new(name, k), &k, |bch, _| {
                bch.iter(|| step(op, &q, &key, &queue, &tau))
            });
        }
    }
    group.finish();
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/queue-memory.json");
    let _ = std::fs::write(out, format!("[{}]\n", memory.join(",\n ")));
}

type KlOp = fn(
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    KlDirection,
) -> candle_core::Result<Tensor>;

/// The task-level KL (symmetric), forward + backward, fused vs naive; no
/// bar, printed beside the contrastive op.
fn bench_kl(c: &mut Criterion) {
    let quick = std::env::var_os("COTS_BENCH_QUICK").is_some();
    let ks: &[usize] = if quick { &[4096] } else { &[4096, 65_536] };
    let (b, d) = (256, 256);
    let mut group = c.benchmark_group("queue_kl_fwd_bwd");
    group.sample_size(10);
    for &k in ks {
        let f = Var::from_tensor(&unit(b, d)).unwrap();
        let t = Var::from_tensor(&unit(b, d)).unwrap();
        let (t_m, f_m) = (unit(b, d), unit(b, d));
        let (queue_t, queue_i) = (unit(k, d), unit(k, d));
        let tau = Var::from_tensor(&Tensor::new(0.07f32, &Device::Cpu).unwrap()).unwrap();
        for (name, op) in [
            ("fused", queue_kl as KlOp),
            ("naive", queue_kl_naive as KlOp),
        ] {
            group.bench_with_input(BenchmarkId::new(name, k), &k, |bch, _| {
                bch.iter(|| {
                    let kl = op(
                        f.as_tensor(),
                        &t_m,
                        &queue_t,
                        t.as_tensor(),
                        &f_m,
                        &queue_i,
                        tau.as_tensor(),
                        KlDirection::Symmetric,
                    )
                    .unwrap();
                    let grads = kl.mean_all().unwrap().backward().unwrap();
                    assert!(grads.get(f.as_tensor()).is_some());
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench, bench_kl);
criterion_main!(benches);
