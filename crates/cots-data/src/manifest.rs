//! How are datasets users already have read?
//!
//! - JSONL manifests: one `{"image": path, "captions": [...], "split": ...,
//!   "id": ..., "category": ...}` per line; `split` defaults to train, `id` to
//!   the line's position.
//! - Karpathy split JSON (COCO, Flickr30K): `images[]` with `filepath`
//!   (optional), `filename`, `split` (`restval` counts as train) and
//!   `sentences[].raw`.
//!
//! Relative image paths resolve against `root`. Errors name the file and the
//! line (JSONL) or the image's position (Karpathy); counts are never assumed.

use std::path::Path;

use serde::Deserialize;

use crate::{Dataset, Error, ImageSource, Item, Result, Split};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    image: String,
    captions: Vec<String>,
    #[serde(default)]
    split: Option<String>,
    #[serde(default)]
    id: Option<u32>,
    #[serde(default)]
    category: Option<String>,
}

fn parse_split(s: Option<&str>) -> std::result::Result<Split, String> {
    match s.unwrap_or("train") {
        "train" | "restval" => Ok(Split::Train),
        "val" | "valid" | "validation" => Ok(Split::Val),
        "test" => Ok(Split::Test),
        other => Err(format!(
            "unknown split `{other}` (train, restval, val or test)"
        )),
    }
}

/// Reads a JSONL manifest.
pub fn load_jsonl(path: &Path, root: &Path) -> Result<Dataset> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_jsonl(&text, path, root)
}

/// Parses JSONL text; `path` names it in errors.
pub fn parse_jsonl(text: &str, path: &Path, root: &Path) -> Result<Dataset> {
    let mut items = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line_no = n + 1;
        let err = |message: String| Error::Manifest {
            path: path.to_path_buf(),
            line: line_no,
            message,
        };
        if raw.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(raw).map_err(|e| err(e.to_string()))?;
        if line.captions.is_empty() {
            return Err(err("no captions".into()));
        }
        if let Some(i) = line.captions.iter().position(|c| c.trim().is_empty()) {
            return Err(err(format!("caption {i} is empty")));
        }
        let split = parse_split(line.split.as_deref()).map_err(err)?;
        items.push(Item {
            id: line.id.unwrap_or(items.len() as u32),
            source: ImageSource::Path(root.join(&line.image)),
            captions: line.captions,
            split,
            category: line.category,
        });
    }
    Ok(Dataset { items })
}

#[derive(Deserialize)]
struct KarpathyFile {
    images: Vec<KarpathyImage>,
}

#[derive(Deserialize)]
struct KarpathyImage {
    #[serde(default)]
    filepath: Option<String>,
    filename: String,
    split: String,
    sentences: Vec<KarpathySentence>,
}

#[derive(Deserialize)]
struct KarpathySentence {
    raw: String,
}

/// Reads a Karpathy split JSON (dataset_coco.json, dataset_flickr30k.json).
pub fn load_karpathy(path: &Path, root: &Path) -> Result<Dataset> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_karpathy(&text, path, root)
}

/// Parses Karpathy split JSON text; `path` names it in errors.
pub fn parse_karpathy(text: &str, path: &Path, root: &Path) -> Result<Dataset> {
    let file: KarpathyFile = serde_json::from_str(text).map_err(|e| Error::Manifest {
        path: path.to_path_buf(),
        line: e.line(),
        message: e.to_string(),
    })?;
    let mut items = Vec::with_capacity(file.images.len());
    for (i, img) in file.images.into_iter().enumerate() {
        let err = |message: String| Error::Manifest {
            path: path.to_path_buf(),
            line: 0,
            message: format!("images[{i}] ({}): {message}", img.filename),
        };
        let split = parse_split(Some(&img.split)).map_err(err)?;
        let captions: Vec<String> = img
            .sentences
            .iter()
            .map(|s| s.raw.trim().to_string())
            .collect();
        if captions.is_empty() {
            return Err(err("no sentences".into()));
        }
        if let Some(c) = captions.iter().position(|c| c.is_empty()) {
            return Err(err(format!("sentence {c} is empty")));
        }
        let rel = match &img.filepath {
            Some(dir) => Path::new(dir).join(&img.filename),
            None => Path::new(&img.filename).to_path_buf(),
        };
        items.push(Item {
            id: i as u32,
            source: ImageSource::Path(root.join(rel)),
            captions,
            split,
            category: None,
        });
    }
    Ok(Dataset { items })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_errors_name_the_line() {
        let p = Path::new("m.jsonl");
        let ok = "{\"image\": \"a.png\", \"captions\": [\"x\", \"y\"], \"split\": \"test\"}\n\n{\"image\": \"b.png\", \"captions\": [\"z\"]}\n";
        let d = parse_jsonl(ok, p, Path::new("/data")).unwrap();
        assert_eq!(d.items.len(), 2);
        assert_eq!(d.items[0].split, Split::Test);
        assert_eq!(d.items[1].source, ImageSource::Path("/data/b.png".into()));
        for (bad, want) in [
            (
                "{\"image\": \"a.png\", \"captions\": [\"\"]}",
                "m.jsonl:1: caption 0 is empty",
            ),
            (
                "{\"image\": \"a.png\", \"captions\": []}\n{",
                "m.jsonl:1: no captions",
            ),
            (
                "{\"image\": \"a.png\", \"captions\": [\"a\"]}\n{oops",
                "m.jsonl:2:",
            ),
            (
                "{\"image\": \"a.png\", \"captions\": [\"a\"], \"split\": \"dev\"}",
                "unknown split `dev`",
            ),
        ] {
            let e = parse_jsonl(bad, p, Path::new(".")).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should contain {want}");
        }
    }

    #[test]
    fn karpathy_reads_splits_and_paths() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("dataset.json");
        std::fs::write(
            &f,
            r#"{"images": [
              {"filepath": "val2014", "filename": "x.jpg", "split": "restval", "sentences": [{"raw": "a dog "}, {"raw": "a cat"}]},
              {"filename": "y.jpg", "split": "test", "sentences": [{"raw": "a cow"}]}
            ]}"#,
        )
        .unwrap();
        let d = load_karpathy(&f, Path::new("/coco")).unwrap();
        assert_eq!(d.items[0].split, Split::Train);
        assert_eq!(d.items[0].captions, vec!["a dog", "a cat"]);
        assert_eq!(
            d.items[0].source,
            ImageSource::Path("/coco/val2014/x.jpg".into())
        );
        assert_eq!(d.items[1].split, Split::Test);
        let text = std::fs::read_to_string(&f).unwrap();
        assert_eq!(parse_karpathy(&text, &f, Path::new("/coco")).unwrap(), d);
    }

    #[test]
    fn karpathy_errors_name_the_file() {
        let p = Path::new("dataset_flickr30k.json");
        for (bad, want) in [
            (
                "{\"images\": [\n{\"filename\": 3}]}",
                "dataset_flickr30k.json:2:",
            ),
            (
                r#"{"images": [{"filename": "a.jpg", "split": "dev", "sentences": []}]}"#,
                "images[0] (a.jpg): unknown split `dev`",
            ),
            (
                r#"{"images": [{"filename": "a.jpg", "split": "val", "sentences": [{"raw": " "}]}]}"#,
                "sentence 0 is empty",
            ),
            (
                r#"{"images": [{"filename": "a.jpg", "split": "val", "sentences": []}]}"#,
                "images[0] (a.jpg): no sentences",
            ),
        ] {
            let e = parse_karpathy(bad, p, Path::new("."))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(want) && e.contains("dataset_flickr30k.json"),
                "{e}"
            );
        }
    }
}
