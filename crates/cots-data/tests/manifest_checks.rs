//! Manifests: string or numeric ids, items that remember their line, and
//! unreadable images found at load (named with the manifest line) and, under
//! the skip policy, counted once.

use std::path::Path;
use std::sync::Arc;

use cots_data::loader::{check_images, SkipPolicy};
use cots_data::manifest::{load_jsonl, parse_jsonl, parse_karpathy};
use cots_data::synthetic::vocabulary;
use cots_data::{image_io::ImageConfig, Loader, LoaderConfig, LoaderPosition};
use cots_text::TextTokenizer;
use image::{Rgb, RgbImage};

#[test]
fn jsonl_and_karpathy_take_string_and_numeric_ids() {
    let text = [
        r#"{"image": "a.png", "captions": ["a"], "id": "cat-1"}"#,
        r#"{"image": "b.png", "captions": ["b"], "id": 12}"#,
        r#"{"image": "c.png", "captions": ["c"], "id": "dog"}"#,
        r#"{"image": "a2.png", "captions": ["a again"], "id": "cat-1"}"#,
        r#"{"image": "d.png", "captions": ["d"]}"#,
    ]
    .join("\n");
    let d = parse_jsonl(&text, Path::new("m.jsonl"), Path::new("/data")).unwrap();
    let ids: Vec<u32> = d.items.iter().map(|i| i.id).collect();
    // Numbers are kept, the default is the position, and each distinct
    // string gets a number above all of them, shared by equal strings.
    assert_eq!(ids, [13, 12, 14, 13, 4]);
    let lines: Vec<Option<usize>> = d
        .items
        .iter()
        .map(|i| i.origin.as_ref().and_then(|o| o.line))
        .collect();
    assert_eq!(lines, [Some(1), Some(2), Some(3), Some(4), Some(5)]);
    for bad in [
        r#"{"image": "a.png", "captions": ["a"], "id": " "}"#,
        r#"{"image": "a.png", "captions": ["a"], "id": [1]}"#,
    ] {
        let e = parse_jsonl(bad, Path::new("m.jsonl"), Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.jsonl:1"), "{e}");
    }

    let karpathy = r#"{"images": [
        {"filename": "x.jpg", "split": "train", "sentences": [{"raw": "x"}], "id": "x-1"},
        {"filename": "y.jpg", "split": "test", "sentences": [{"raw": "y"}], "id": 7},
        {"filename": "z.jpg", "split": "test", "sentences": [{"raw": "z"}]}
    ]}"#;
    let k = parse_karpathy(karpathy, Path::new("dataset.json"), Path::new("/coco")).unwrap();
    let ids: Vec<u32> = k.items.iter().map(|i| i.id).collect();
    assert_eq!(ids, [8, 7, 2]);
    assert_eq!(
        k.items[2].origin.as_ref().unwrap().to_string(),
        "dataset.json: images[2]"
    );
}

fn tokenizer() -> Arc<TextTokenizer> {
    Arc::new(TextTokenizer::from_words(&vocabulary()).unwrap())
}

fn loader_cfg(policy: SkipPolicy) -> LoaderConfig {
    LoaderConfig {
        batch_size: 4,
        image: ImageConfig {
            size: 8,
            ..ImageConfig::default()
        },
        on_bad_input: policy,
        ..LoaderConfig::default()
    }
}

/// Eight good images and, on line 3, a corrupt one with two captions.
fn manifest_with_a_corrupt_image(dir: &Path, corrupt: &[u8]) -> std::path::PathBuf {
    let mut lines = Vec::new();
    for i in 0..8 {
        RgbImage::from_pixel(8, 8, Rgb([i * 30, 0, 0]))
            .save(dir.join(format!("{i}.png")))
            .unwrap();
        lines.push(format!(
            r#"{{"image": "{i}.png", "captions": ["a red circle"]}}"#
        ));
    }
    std::fs::write(dir.join("broken.png"), corrupt).unwrap();
    lines.insert(
        2,
        r#"{"image": "broken.png", "captions": ["a blue square", "a small blue square"]}"#.into(),
    );
    let path = dir.join("train.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[test]
fn a_corrupt_image_is_found_at_load_naming_the_manifest_line() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = manifest_with_a_corrupt_image(dir.path(), b"\x89PNG not really");
    let data = load_jsonl(&manifest, dir.path()).unwrap();
    let progress = std::sync::Mutex::new(Vec::new());
    let bad = check_images(&data, &|done, total| {
        progress.lock().unwrap().push((done, total))
    });
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].items, [2]);
    // Every file was probed once, and the last report says so.
    let mut seen = progress.into_inner().unwrap();
    seen.sort_unstable();
    assert_eq!(seen.last(), Some(&(9, 9)));

    // The loader fails before any batch, naming file, line and image.
    let e = Loader::new(
        Arc::new(data),
        tokenizer(),
        loader_cfg(SkipPolicy::Fail),
        LoaderPosition::default(),
    )
    .err()
    .expect("a corrupt image fails the loader at load")
    .to_string();
    assert!(
        e.contains("train.jsonl:3") && e.contains("broken.png"),
        "{e}"
    );
}

#[test]
fn under_skip_each_bad_file_is_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    // Refused by the up-front probe.
    let manifest = manifest_with_a_corrupt_image(dir.path(), b"not an image");
    let data = Arc::new(load_jsonl(&manifest, dir.path()).unwrap());
    let mut l = Loader::new(
        data.clone(),
        tokenizer(),
        loader_cfg(SkipPolicy::Skip),
        LoaderPosition::default(),
    )
    .unwrap();
    for _ in 0..3 * l.batches_per_epoch() {
        let b = l.next_batch().unwrap();
        assert!(!b.item_indices.contains(&2), "{:?}", b.item_indices);
    }
    let skipped = l.skipped();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(skipped[0].source.contains("broken.png"));
    assert!(
        skipped[0].reason.contains("train.jsonl:3"),
        "{}",
        skipped[0].reason
    );

    // A file whose header passes the probe but whose pixels are cut off is
    // met in batches, over several epochs and for both of its captions, and
    // still counted once.
    let mut png = Vec::new();
    RgbImage::from_pixel(64, 64, Rgb([1, 2, 3]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png.truncate(60);
    let dir = tempfile::tempdir().unwrap();
    let manifest = manifest_with_a_corrupt_image(dir.path(), &png);
    let data = Arc::new(load_jsonl(&manifest, dir.path()).unwrap());
    assert!(check_images(&data, &|_, _| {}).is_empty());
    let mut l = Loader::new(
        data,
        tokenizer(),
        loader_cfg(SkipPolicy::Skip),
        LoaderPosition::default(),
    )
    .unwrap();
    let mut met = 0;
    for _ in 0..3 * l.batches_per_epoch() {
        met += l.next_batch().unwrap().skipped.len();
    }
    assert!(met > 1, "the truncated file was met {met} times");
    let skipped = l.skipped();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(
        skipped[0].reason.contains("train.jsonl:3"),
        "{}",
        skipped[0].reason
    );
}
