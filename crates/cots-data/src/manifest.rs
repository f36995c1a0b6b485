//! How are datasets users already have read?
//!
//! - JSONL manifests: one `{"image": path, "captions": [...], "split": ...,
//!   "id": ..., "category": ...}` per line; `split` defaults to train, `id` to
//!   the item's position.
//! - Karpathy split JSON (COCO, Flickr30K): `images[]` with `filepath`
//!   (optional), `filename`, `split` (`restval` counts as train),
//!   `sentences[].raw` and an optional `id` (default: the image's position).
//!
//! An `id` is a number or a string (`"id": 12`, `"id": "abc"`), as in video
//! manifests; entries with equal ids are one image whose captions are
//! positives of each other. Numbers are kept; each distinct string gets a
//! number above every numeric and positional id of the file, in order of
//! first appearance.
//!
//! Relative image paths resolve against `root`. Every item records where it
//! was read ([`crate::Origin`]: the line of a JSONL manifest, the image's
//! position in a Karpathy file), so that a later error about its image can
//! name the manifest entry. Errors name the file and the line (JSONL) or the
//! image's position (Karpathy); counts are never assumed.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use crate::{Dataset, Error, ImageSource, Item, Origin, Result, Split};

/// An item id as written: a number or a string.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum RawId {
    Number(u32),
    Text(String),
}

/// The numeric ids of entries with ids `raw` (`None`: the entry's
/// position), following the rule of the module doc. Errors give the
/// entry's position and a message.
fn assign_ids(raw: &[Option<RawId>]) -> std::result::Result<Vec<u32>, (usize, String)> {
    let mut next = raw
        .iter()
        .enumerate()
        .map(|(i, id)| match id {
            Some(RawId::Number(n)) => u64::from(*n) + 1,
            Some(RawId::Text(_)) => 0,
            None => i as u64 + 1,
        })
        .max()
        .unwrap_or(0);
    let mut strings: HashMap<&str, u32> = HashMap::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, id) in raw.iter().enumerate() {
        out.push(match id {
            Some(RawId::Number(n)) => *n,
            None => u32::try_from(i).map_err(|_| (i, "too many entries".to_string()))?,
            Some(RawId::Text(t)) if t.trim().is_empty() => {
                return Err((i, "the id is an empty string".into()))
            }
            Some(RawId::Text(t)) => match strings.get(t.as_str()) {
                Some(&n) => n,
                None => {
                    let n = u32::try_from(next).map_err(|_| {
                        (
                            i,
                            format!(
                                "no number is left for the string id `{t}` after id {}",
                                next - 1
                            ),
                        )
                    })?;
                    next += 1;
                    strings.insert(t, n);
                    n
                }
            },
        });
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    image: String,
    captions: Vec<String>,
    #[serde(default)]
    split: Option<String>,
    #[serde(default)]
    id: Option<RawId>,
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
    let mut ids = Vec::new();
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
        ids.push(line.id);
        items.push(Item {
            id: 0,
            source: ImageSource::Path(root.join(&line.image)),
            captions: line.captions,
            split,
            category: line.category,
            origin: Some(Origin {
                manifest: path.to_path_buf(),
                line: Some(line_no),
                index: items.len(),
            }),
        });
    }
    let ids = assign_ids(&ids).map_err(|(i, message)| Error::Manifest {
        path: path.to_path_buf(),
        line: items[i].origin.as_ref().and_then(|o| o.line).unwrap_or(0),
        message,
    })?;
    for (item, id) in items.iter_mut().zip(ids) {
        item.id = id;
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
    #[serde(default)]
    id: Option<RawId>,
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
    let mut ids = Vec::with_capacity(file.images.len());
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
        ids.push(img.id);
        items.push(Item {
            id: 0,
            source: ImageSource::Path(root.join(rel)),
            captions,
            split,
            category: None,
            origin: Some(Origin {
                manifest: path.to_path_buf(),
                line: None,
                index: i,
            }),
        });
    }
    let ids = assign_ids(&ids).map_err(|(i, message)| Error::Manifest {
        path: path.to_path_buf(),
        line: 0,
        message: format!("images[{i}]: {message}"),
    })?;
    for (item, id) in items.iter_mut().zip(ids) {
        item.id = id;
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
