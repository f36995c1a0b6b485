//! Video decoding: throughput of each source kind into the model's input size
//! (224 px, 8 frames sampled TSN-style, so every source frame is decoded and
//! 8 are kept), and the peak heap of decoding a short and a ten-times-longer
//! video, which should be the same because only sampled frames are kept.
//!
//! Inputs are generated in a temporary folder: animated GIF and WebP of the
//! synthetic set's frames scaled to 128 px, and `ffmpeg -f lavfi testsrc`
//! videos (320x240, 25 fps). The ffmpeg parts are skipped with a printed
//! reason when ffmpeg is not installed. Peak heap comes from a counting
//! global allocator (this process only; ffmpeg's own memory is a separate
//! process streaming frame by frame).
//!
//! Run: `cargo bench -p cots-benches --bench video`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cots_data::video::encode::{write_gif, write_webp};
use cots_data::video::synthetic::{SyntheticVideoConfig, SyntheticVideoSet};
use cots_data::video::{self, DecodeOptions, RgbImage, SampleMode};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// The system allocator, counting live bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Peak heap above the starting level while `f` runs.
fn peak_heap<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

const SIZE: u32 = 224;
const N: usize = 8;

fn synthetic_frames(n: usize) -> Vec<RgbImage> {
    let set = SyntheticVideoSet::new(&SyntheticVideoConfig {
        frames: 8,
        size: 128,
        ..SyntheticVideoConfig::default()
    });
    set.clips()
        .iter()
        .flat_map(|c| set.render(c))
        .take(n)
        .collect()
}

fn testsrc(path: &Path, seconds: u32) -> bool {
    Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg(format!("testsrc=duration={seconds}:size=320x240:rate=25"))
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
        ])
        .arg(path)
        .status()
        .is_ok_and(|s| s.success())
}

/// A folder under the system temp dir, removed on drop.
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(format!("cots-video-bench-{}", std::process::id()));
        std::fs::create_dir_all(&p).expect("scratch dir");
        Self(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn video(c: &mut Criterion) {
    let dir = ScratchDir::new();
    let opts = DecodeOptions::square(SIZE);
    let has_ffmpeg = video::decode::ffmpeg_available(&opts);
    if !has_ffmpeg {
        println!("ffmpeg/ffprobe not found: skipping the ffmpeg throughput and memory parts");
    }

    let frames = synthetic_frames(64);
    let gif = dir.path().join("clip.gif");
    write_gif(&gif, &frames, 40).expect("write gif");
    let webp = dir.path().join("clip.webp");
    write_webp(&webp, &frames, 40).expect("write webp");
    let mp4 = dir.path().join("clip.mp4");
    let mut sources = vec![("gif_128px_64f", gif.clone()), ("webp_128px_64f", webp)];
    if has_ffmpeg && testsrc(&mp4, 10) {
        sources.push(("mp4_320x240_250f", mp4));
    }

    let mut group = c.benchmark_group("video_decode_224px_8of");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    for (name, path) in &sources {
        let count = video::count_frames(path, &opts).expect("count");
        // Source frames per second: every frame is decoded, 8 are kept.
        group.throughput(Throughput::Elements(count as u64));
        group.bench_function(*name, |b| {
            b.iter(|| video::decode_sampled(path, N, SampleMode::Eval, &opts).expect("decode"))
        });
    }
    group.finish();

    // Peak heap against length: a GIF of 64 vs 640 frames, and videos of
    // 60 s vs 600 s.
    let long_gif = dir.path().join("long.gif");
    write_gif(&long_gif, &synthetic_frames(640), 40).expect("write gif");
    let mut pairs = vec![("gif 64 vs 640 frames", gif, long_gif)];
    let (short, long) = (dir.path().join("60s.mp4"), dir.path().join("600s.mp4"));
    if has_ffmpeg && testsrc(&short, 60) && testsrc(&long, 600) {
        pairs.push(("mp4 60 s vs 600 s (1,500 vs 15,000 frames)", short, long));
    }
    for (name, a, b) in pairs {
        let run = |p: &Path| {
            let t = std::time::Instant::now();
            let (clip, peak) =
                peak_heap(|| video::decode_sampled(p, N, SampleMode::Eval, &opts).expect("decode"));
            (clip.frame_count, peak, t.elapsed().as_secs_f64())
        };
        let (fa, pa, ta) = run(&a);
        let (fb, pb, tb) = run(&b);
        println!(
            "peak heap, {name}: {fa} frames {:.2} MiB in {ta:.2} s; {fb} frames {:.2} MiB in {tb:.2} s",
            pa as f64 / (1 << 20) as f64,
            pb as f64 / (1 << 20) as f64
        );
    }
}

criterion_group!(benches, video);
criterion_main!(benches);
