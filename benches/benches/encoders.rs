//! Forward throughput of the base-size towers on random weights, no gradient:
//! ViT-B/16 at 224 px (batch 8, images/s) and BERT-base on 32-token texts
//! (batch 32, texts/s). The PyTorch figures to compare with come from
//! `/work/shared/notes/candle.md` (same kind of 2-core machine): 3.9 images/s
//! and 21.5 texts/s; a claim needs both measured in one run.
//!
//! Run: `cargo bench -p cots-benches --bench encoders`.

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cots_encoders::weights::frozen;
use cots_encoders::{bert, vit};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn encoders(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("encoders");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(3));
    group.measurement_time(Duration::from_secs(20));

    let vm = VarMap::new();
    let cfg = vit::Config::base();
    vit::VisionTransformer::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).expect("vit");
    // Frozen (plain tensors), as inference runs: no autograd graph recorded.
    let model =
        vit::VisionTransformer::new(&cfg, frozen(&vm, DType::F32, &dev)).expect("build ViT-B/16");
    let batch = 8;
    let pixels = Tensor::randn(0f32, 1.0, (batch, 3, 224, 224), &dev).expect("pixels");
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function("vit_b16_224_forward_batch8", |b| {
        b.iter(|| model.forward(&pixels, None, None).expect("forward"))
    });
    drop(model);

    let vm = VarMap::new();
    let cfg = bert::Config::base();
    bert::BertModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).expect("bert");
    let model = bert::BertModel::new(&cfg, frozen(&vm, DType::F32, &dev)).expect("build BERT-base");
    let (batch, len) = (32, 32);
    let ids = Tensor::rand(0f32, cfg.vocab_size as f32, (batch, len), &dev)
        .and_then(|t| t.to_dtype(DType::U32))
        .expect("ids");
    let mask = Tensor::ones((batch, len), DType::U32, &dev).expect("mask");
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function("bert_base_forward_batch32_len32", |b| {
        b.iter(|| {
            model
                .forward(&ids, None, Some(&mask), None)
                .expect("forward")
        })
    });
    group.finish();
}

criterion_group!(benches, encoders);
criterion_main!(benches);
