//! Loader throughput: images/s decoded and transformed to 224 px from PNG and
//! JPEG files (2 threads), and synthetic scenes rendered at 64 px.

use std::sync::Arc;

use cots_data::image_io::{load_pixels, ImageConfig};
use cots_data::synthetic::{vocabulary, SyntheticConfig};
use cots_data::{Dataset, ImageSource, Item, Loader, LoaderConfig, LoaderPosition, Split};
use cots_text::TextTokenizer;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join("cots-loader-bench");
    std::fs::create_dir_all(&dir).unwrap();
    let n = 64;
    let mut items = Vec::new();
    for i in 0..n {
        let mut img = image::RgbImage::new(500, 375);
        for (x, y, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb([(x * 7 + i) as u8, (y * 3) as u8, (x ^ y) as u8]);
        }
        let path = dir.join(if i % 2 == 0 {
            format!("{i}.png")
        } else {
            format!("{i}.jpg")
        });
        if !path.exists() {
            img.save(&path).unwrap();
        }
        items.push(Item {
            id: i,
            source: ImageSource::Path(path),
            captions: vec!["a generated photo".into()],
            split: Split::Train,
            category: None,
            origin: None,
        });
    }
    let tok = Arc::new(TextTokenizer::from_words(&vocabulary()).unwrap());
    let cfg = LoaderConfig {
        batch_size: 32,
        image: ImageConfig {
            size: 224,
            ..ImageConfig::default()
        },
        ..LoaderConfig::default()
    };
    let data = Arc::new(Dataset { items });
    let mut group = c.benchmark_group("loader");
    group.sample_size(10);
    group.throughput(Throughput::Elements(32));
    let mut loader = Loader::new(data, tok.clone(), cfg, LoaderPosition::default()).unwrap();
    group.bench_function("png_jpeg_500x375_to_224_batch32", |b| {
        b.iter(|| loader.next_batch().unwrap())
    });
    let synth = Dataset::synthetic(&SyntheticConfig {
        train: 256,
        val: 1,
        test: 1,
        ..SyntheticConfig::default()
    });
    let small = ImageConfig::default();
    group.throughput(Throughput::Elements(synth.items.len() as u64));
    group.bench_function("synthetic_64px_render", |b| {
        b.iter(|| {
            for it in &synth.items {
                load_pixels(&it.source, &small).unwrap();
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
