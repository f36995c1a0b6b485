//! The properties the fuzz targets check, one function per parser.
//!
//! Each `check_*` feeds arbitrary bytes to one real parsing entry point (as
//! text, lossily decoded, where the parser takes text) and panics if a
//! property breaks: a parse never panics or aborts, every error names the
//! file it came from, and a successful parse keeps the promises its reader
//! documents. The fuzz targets in `fuzz/` call these under libFuzzer
//! (`cargo xtask fuzz`); `tests/fuzz_corpus.rs` replays the committed seed
//! corpora and crash regressions through them on the stable toolchain, so a
//! regression fails `cargo test` without nightly. Not a public API: panicking
//! is the point here, and the names follow the fuzz targets.

use std::collections::HashSet;
use std::path::Path;

use crate::manifest;
use crate::video::msrvtt::{self, MissingPolicy};

/// A property check: panics if the input breaks a property.
pub type Check = fn(&[u8]);

/// Every fuzz target: its name (a `fuzz/fuzz_targets/<name>.rs` and a
/// `fuzz/corpus/<name>/` folder) and its check.
pub const TARGETS: &[(&str, Check)] = &[
    ("manifest_jsonl", check_manifest_jsonl),
    ("karpathy_json", check_karpathy_json),
    ("msrvtt_json", check_msrvtt_json),
    ("jsfusion_csv", check_jsfusion_csv),
    ("video_ids_csv", check_video_ids_csv),
    ("video_manifest", check_video_manifest),
];

/// Panics unless the error names the file it came from.
fn assert_names_origin(err: &dyn std::fmt::Display, origin: &str) {
    let message = err.to_string();
    assert!(
        message.contains(origin),
        "the error does not name {origin}: {message}"
    );
}

/// [`manifest::parse_jsonl`]: every item has at least one caption and none
/// is blank.
pub fn check_manifest_jsonl(data: &[u8]) {
    const ORIGIN: &str = "fuzz/manifest.jsonl";
    let text = String::from_utf8_lossy(data);
    match manifest::parse_jsonl(&text, Path::new(ORIGIN), Path::new("/data")) {
        Ok(set) => {
            assert!(set.items.len() <= text.lines().count());
            for item in &set.items {
                assert!(!item.captions.is_empty(), "item {} has no caption", item.id);
                assert!(item.captions.iter().all(|c| !c.trim().is_empty()));
            }
            set.validate().expect("a parsed manifest validates");
        }
        Err(e) => assert_names_origin(&e, ORIGIN),
    }
}

/// [`manifest::parse_karpathy`]: without `id` fields, ids are the images'
/// positions; every image has captions, trimmed and non-empty, and records
/// its position.
pub fn check_karpathy_json(data: &[u8]) {
    const ORIGIN: &str = "fuzz/dataset_coco.json";
    let text = String::from_utf8_lossy(data);
    match manifest::parse_karpathy(&text, Path::new(ORIGIN), Path::new("/coco")) {
        Ok(set) => {
            // Read the way the parser reads it, so that an escaped key
            // (`"\u0069d"`) counts as an id too.
            let has_ids = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| {
                    let images = v.get("images")?.as_array()?.clone();
                    Some(images.iter().any(|im| im.get("id").is_some()))
                })
                .unwrap_or(true);
            for (i, item) in set.items.iter().enumerate() {
                if !has_ids {
                    assert_eq!(item.id as usize, i);
                }
                let origin = item.origin.as_ref().expect("a parsed image has an origin");
                assert_eq!(origin.index, i);
                assert!(!item.captions.is_empty(), "image {i} without captions");
                for c in &item.captions {
                    assert!(!c.is_empty() && c.trim() == c, "caption {c:?}");
                }
            }
            set.validate().expect("a parsed split file validates");
        }
        Err(e) => assert_names_origin(&e, ORIGIN),
    }
}

/// [`msrvtt::parse_msrvtt_json`] (on the raw bytes, as the reader sees a
/// file): video ids are unique.
pub fn check_msrvtt_json(data: &[u8]) {
    const ORIGIN: &str = "fuzz/MSRVTT_data.json";
    match msrvtt::parse_msrvtt_json(data, Path::new(ORIGIN)) {
        Ok(annotations) => {
            let mut ids = HashSet::new();
            for a in &annotations {
                assert!(ids.insert(a.id.as_str()), "video {} twice", a.id);
            }
        }
        Err(e) => assert_names_origin(&e, ORIGIN),
    }
}

/// [`msrvtt::parse_jsfusion_csv`]: ids and sentences are trimmed and
/// non-empty; rows come after the header, in file order.
pub fn check_jsfusion_csv(data: &[u8]) {
    const ORIGIN: &str = "fuzz/MSRVTT_JSFUSION_test.csv";
    let text = String::from_utf8_lossy(data);
    match msrvtt::parse_jsfusion_csv(&text, Path::new(ORIGIN)) {
        Ok(rows) => {
            let mut last = 1;
            for row in &rows {
                assert!(row.line > last, "line {} after {last}", row.line);
                last = row.line;
                for field in [&row.video_id, &row.sentence] {
                    assert!(!field.is_empty() && field.trim() == field, "{field:?}");
                }
            }
        }
        Err(e) => assert_names_origin(&e, ORIGIN),
    }
}

/// [`msrvtt::parse_video_ids_csv`]: ids are trimmed and non-empty; rows come
/// after the header, in file order.
pub fn check_video_ids_csv(data: &[u8]) {
    const ORIGIN: &str = "fuzz/MSRVTT_train.9k.csv";
    let text = String::from_utf8_lossy(data);
    match msrvtt::parse_video_ids_csv(&text, Path::new(ORIGIN)) {
        Ok(rows) => {
            let mut last = 1;
            for (line, id) in &rows {
                assert!(*line > last, "line {line} after {last}");
                last = *line;
                assert!(!id.is_empty() && id.trim() == id, "{id:?}");
            }
        }
        Err(e) => assert_names_origin(&e, ORIGIN),
    }
}

/// [`msrvtt::parse_manifest`] under both missing-file policies, with a
/// stand-in file system in which a path exists when its length is even:
/// ids are unique across records and skipped videos, every record has a
/// non-blank caption, and a manifest that reads under
/// [`MissingPolicy::Error`] reads the same under [`MissingPolicy::Skip`].
pub fn check_video_manifest(data: &[u8]) {
    const ORIGIN: &str = "fuzz/videos.jsonl";
    let text = String::from_utf8_lossy(data);
    let exists = |p: &Path| p.as_os_str().len().is_multiple_of(2);
    let strict = msrvtt::parse_manifest(&text, Path::new(ORIGIN), MissingPolicy::Error, exists);
    let lenient = msrvtt::parse_manifest(&text, Path::new(ORIGIN), MissingPolicy::Skip, exists);
    for result in [&strict, &lenient] {
        match result {
            Ok(resolved) => {
                let mut ids = HashSet::new();
                for id in resolved.records.iter().map(|r| &r.id) {
                    assert!(ids.insert(id.as_str()), "id {id} twice");
                }
                for id in resolved.skipped.iter().map(|s| &s.id) {
                    assert!(ids.insert(id.as_str()), "id {id} twice");
                }
                for r in &resolved.records {
                    assert!(exists(&r.video), "{} has no file", r.video.display());
                    assert!(!r.captions.is_empty());
                    assert!(r.captions.iter().all(|c| !c.trim().is_empty()));
                }
                for s in &resolved.skipped {
                    assert_names_origin(&s.reason, ORIGIN);
                }
            }
            Err(e) => assert_names_origin(e, ORIGIN),
        }
    }
    if let Ok(strict) = &strict {
        assert!(strict.skipped.is_empty());
        assert_eq!(lenient.as_ref().ok(), Some(strict));
    }
}
