//! Which videos and captions does a video-text set hold, and where are the files?
//!
//! Readers for the annotation files users of MSR-VTT (Xu et al., "MSR-VTT: A
//! Large Video Description Dataset for Bridging Video and Language", CVPR
//! 2016) have: `train_val_videodatainfo.json` / `MSRVTT_data.json`
//! (`videos[]` with `video_id` and `split`, `sentences[]` with `video_id` and
//! `caption`), the 1k-A test list `MSRVTT_JSFUSION_test.csv` (`key, vid_key,
//! video_id, sentence`; Yu et al., ECCV 2018) and the `MSRVTT_train.9k.csv` /
//! `7k` training lists (a `video_id` column). Also the project's own JSONL
//! video manifest, one object a line:
//! `{"video": "clips/a.mp4", "captions": ["..."], "split": "train", "id": "a"}`.
//!
//! An annotated video without a file is an error naming the annotation file,
//! or, under [`MissingPolicy::Skip`], is left out and listed in
//! [`Resolved::skipped`]; nothing is dropped silently.
//!
//! Each `read_*` has a `parse_*` twin that takes the file's contents and
//! gives the same values and errors; the fuzz targets (docs/fuzzing.md) drive
//! those.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{io_err, Error, Result};

/// Extensions tried, in order, when looking for `<video_dir>/<id>.<ext>`.
pub const VIDEO_EXTENSIONS: [&str; 7] = ["mp4", "webm", "avi", "mkv", "mov", "gif", "webp"];

/// Which part of a dataset a video belongs to.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    #[default]
    Train,
    /// MSR-VTT spells it `validate`.
    #[serde(alias = "validate", alias = "valid", alias = "validation")]
    Val,
    Test,
}

/// One video with its captions, resolved to a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoRecord {
    pub id: String,
    /// A video file or a folder of frames.
    pub video: PathBuf,
    pub captions: Vec<String>,
    pub split: Split,
}

/// An annotated video left out under [`MissingPolicy::Skip`], and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub id: String,
    pub reason: String,
}

/// What to do with an annotated video whose file is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MissingPolicy {
    /// Fail with an error naming the annotation file and the video.
    #[default]
    Error,
    /// Leave the video out and list it in [`Resolved::skipped`].
    Skip,
}

/// Records whose files exist, and those left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub records: Vec<VideoRecord>,
    pub skipped: Vec<Skipped>,
}

impl Resolved {
    /// Records of one split.
    pub fn split(&self, split: Split) -> impl Iterator<Item = &VideoRecord> {
        self.records.iter().filter(move |r| r.split == split)
    }
}

/// One video of an MSR-VTT JSON file with its captions, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Annotation {
    pub id: String,
    pub split: Option<Split>,
    pub captions: Vec<String>,
}

#[derive(Deserialize)]
struct MsrvttJson {
    videos: Vec<MsrvttVideo>,
    #[serde(default)]
    sentences: Vec<MsrvttSentence>,
}

#[derive(Deserialize)]
struct MsrvttVideo {
    video_id: String,
    #[serde(default)]
    split: Option<Split>,
}

#[derive(Deserialize)]
struct MsrvttSentence {
    video_id: String,
    caption: String,
}

fn format_err(path: &Path, line: usize, message: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

/// Reads `train_val_videodatainfo.json` / `test_videodatainfo.json` /
/// `MSRVTT_data.json`. A sentence naming a video missing from `videos[]` is
/// an error (the file is inconsistent).
pub fn read_msrvtt_json(path: &Path) -> Result<Vec<Annotation>> {
    let file = BufReader::new(File::open(path).map_err(io_err(path))?);
    let data: MsrvttJson =
        serde_json::from_reader(file).map_err(|e| format_err(path, e.line(), e.to_string()))?;
    annotations(data, path)
}

/// Parses the bytes of an MSR-VTT annotation JSON exactly as
/// [`read_msrvtt_json`] reads a file; `path` names it in errors. Bytes, not
/// text, and through the same `io::Read` deserializer as the file, so that
/// invalid UTF-8 and the columns in messages come out as the reader's do.
pub fn parse_msrvtt_json(bytes: &[u8], path: &Path) -> Result<Vec<Annotation>> {
    let data: MsrvttJson =
        serde_json::from_reader(bytes).map_err(|e| format_err(path, e.line(), e.to_string()))?;
    annotations(data, path)
}

/// Gathers each video's sentences, in file order.
fn annotations(data: MsrvttJson, path: &Path) -> Result<Vec<Annotation>> {
    let mut index: HashMap<String, usize> = HashMap::with_capacity(data.videos.len());
    let mut out = Vec::with_capacity(data.videos.len());
    for v in data.videos {
        if index.contains_key(&v.video_id) {
            return Err(format_err(
                path,
                0,
                format!("video `{}` is listed twice in videos[]", v.video_id),
            ));
        }
        index.insert(v.video_id.clone(), out.len());
        out.push(Annotation {
            id: v.video_id,
            split: v.split,
            captions: Vec::new(),
        });
    }
    for (i, s) in data.sentences.into_iter().enumerate() {
        let Some(&k) = index.get(&s.video_id) else {
            return Err(format_err(
                path,
                0,
                format!(
                    "sentences[{i}] names video `{}`, which is not in videos[]",
                    s.video_id
                ),
            ));
        };
        out[k].captions.push(s.caption);
    }
    Ok(out)
}

/// Splits CSV text into records (RFC 4180 through the `csv` crate: quoted
/// fields, `""` escapes, newlines inside quotes; blank lines skipped), each
/// with the 1-based line it starts on.
///
/// The `csv` crate reads a quote that is never closed as running to the end
/// of the input; such a file is refused here instead, since its last rows
/// would silently become one field. A quoted field that is closed adds an
/// even number of `"` characters, so an odd count means a quote was left
/// open (or a stray one stands in an unquoted field, equally malformed).
fn parse_csv(path: &Path, text: &str) -> Result<Vec<(usize, Vec<String>)>> {
    let text = text.trim_start_matches('\u{feff}');
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    // The reader's own line count lags after a `\r\n` ending, so lines are
    // counted here from each record's byte offset (past any line ending
    // the offset still points at), incrementally.
    let bytes = text.as_bytes();
    let (mut seen, mut line) = (0usize, 1usize);
    let mut line_at = |byte: u64| {
        let mut b = (byte as usize).min(bytes.len());
        while matches!(bytes.get(b), Some(b'\r' | b'\n')) {
            b += 1;
        }
        if b > seen {
            line += bytes[seen..b].iter().filter(|&&c| c == b'\n').count();
            seen = b;
        }
        line
    };
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(1, |p| p.line() as usize);
            format_err(path, line, e.to_string())
        })?;
        let line = record.position().map_or(1, |p| line_at(p.byte()));
        rows.push((line, record.iter().map(str::to_string).collect()));
    }
    if text.bytes().filter(|&b| b == b'"').count() % 2 == 1 {
        let line = rows.last().map_or(1, |r| r.0);
        return Err(format_err(
            path,
            line,
            "a quoted field is never closed (an odd number of `\"` in the file)",
        ));
    }
    Ok(rows)
}

/// CSV text's rows as maps from header name to value, with line numbers;
/// the named columns must exist and every row must have the header's width.
fn csv_records(
    text: &str,
    path: &Path,
    required: &[&str],
) -> Result<Vec<(usize, HashMap<String, String>)>> {
    let mut rows = parse_csv(path, text)?.into_iter();
    let Some((_, header)) = rows.next() else {
        return Err(format_err(path, 1, "empty file (expected a header row)"));
    };
    let header: Vec<String> = header.into_iter().map(|h| h.trim().to_string()).collect();
    for col in required {
        if !header.iter().any(|h| h == col) {
            return Err(format_err(
                path,
                1,
                format!("no `{col}` column in header {header:?}"),
            ));
        }
    }
    rows.map(|(line, row)| {
        if row.len() != header.len() {
            return Err(format_err(
                path,
                line,
                format!("{} fields, the header has {}", row.len(), header.len()),
            ));
        }
        Ok((line, header.iter().cloned().zip(row).collect()))
    })
    .collect()
}

/// A row of `MSRVTT_JSFUSION_test.csv`: one test video and its one query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsfusionRow {
    pub key: String,
    pub video_id: String,
    pub sentence: String,
    /// 1-based line in the CSV.
    pub line: usize,
}

/// Reads the 1k-A test list (`key, vid_key, video_id, sentence`).
pub fn read_jsfusion_csv(path: &Path) -> Result<Vec<JsfusionRow>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    parse_jsfusion_csv(&text, path)
}

/// Parses the text of a 1k-A test list; `path` names it in errors.
pub fn parse_jsfusion_csv(text: &str, path: &Path) -> Result<Vec<JsfusionRow>> {
    csv_records(text, path, &["video_id", "sentence"])?
        .into_iter()
        .map(|(line, mut row)| {
            let video_id = row
                .remove("video_id")
                .unwrap_or_default()
                .trim()
                .to_string();
            let sentence = row
                .remove("sentence")
                .unwrap_or_default()
                .trim()
                .to_string();
            if video_id.is_empty() || sentence.is_empty() {
                return Err(format_err(path, line, "empty video_id or sentence"));
            }
            Ok(JsfusionRow {
                key: row.remove("key").unwrap_or_default(),
                video_id,
                sentence,
                line,
            })
        })
        .collect()
}

/// Reads the `video_id` column of a list such as `MSRVTT_train.9k.csv`, with
/// the line of each id.
pub fn read_video_ids_csv(path: &Path) -> Result<Vec<(usize, String)>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    parse_video_ids_csv(&text, path)
}

/// Parses the text of a video id list; `path` names it in errors.
pub fn parse_video_ids_csv(text: &str, path: &Path) -> Result<Vec<(usize, String)>> {
    csv_records(text, path, &["video_id"])?
        .into_iter()
        .map(|(line, mut row)| {
            let id = row
                .remove("video_id")
                .unwrap_or_default()
                .trim()
                .to_string();
            if id.is_empty() {
                return Err(format_err(path, line, "empty video_id"));
            }
            Ok((line, id))
        })
        .collect()
}

/// The file of video `id` in `dir`: `<id>.<ext>` for the first of
/// [`VIDEO_EXTENSIONS`] that exists, else a frame folder `<id>/`.
pub fn find_video(dir: &Path, id: &str) -> Option<PathBuf> {
    VIDEO_EXTENSIONS
        .iter()
        .map(|ext| dir.join(format!("{id}.{ext}")))
        .find(|p| p.is_file())
        .or_else(|| Some(dir.join(id)).filter(|p| p.is_dir()))
}

/// Applies `policy` to a video without a file.
fn missing(
    policy: MissingPolicy,
    annotations: &Path,
    id: &str,
    expected: PathBuf,
    skipped: &mut Vec<Skipped>,
) -> Result<()> {
    match policy {
        MissingPolicy::Error => Err(Error::MissingVideo {
            annotations: annotations.to_path_buf(),
            id: id.to_string(),
            expected,
        }),
        MissingPolicy::Skip => {
            skipped.push(Skipped {
                id: id.to_string(),
                reason: format!("{}: no file {}", annotations.display(), expected.display()),
            });
            Ok(())
        }
    }
}

/// The MSR-VTT 1k-A protocol (Yu et al., 2018): training videos from a list
/// (`MSRVTT_train.9k.csv` or `7k`) with all their captions from
/// `MSRVTT_data.json`, and the 1,000 test videos of
/// `MSRVTT_JSFUSION_test.csv`, each with its one query sentence. Files are
/// looked up in `video_dir` with [`find_video`].
pub fn msrvtt_1ka(
    data_json: &Path,
    train_list: &Path,
    test_csv: &Path,
    video_dir: &Path,
    policy: MissingPolicy,
) -> Result<Resolved> {
    let captions: HashMap<String, Vec<String>> = read_msrvtt_json(data_json)?
        .into_iter()
        .map(|a| (a.id, a.captions))
        .collect();
    let mut out = Resolved::default();
    for (line, id) in read_video_ids_csv(train_list)? {
        let Some(caps) = captions.get(&id).filter(|c| !c.is_empty()) else {
            return Err(format_err(
                train_list,
                line,
                format!("video `{id}` has no captions in {}", data_json.display()),
            ));
        };
        match find_video(video_dir, &id) {
            Some(video) => out.records.push(VideoRecord {
                id,
                video,
                captions: caps.clone(),
                split: Split::Train,
            }),
            None => {
                let expected = video_dir.join(format!("{id}.mp4"));
                missing(policy, train_list, &id, expected, &mut out.skipped)?
            }
        }
    }
    // Test videos keep file order; a repeated video id gathers its sentences.
    let mut test: BTreeMap<usize, VideoRecord> = BTreeMap::new();
    let mut slot: HashMap<String, usize> = HashMap::new();
    for row in read_jsfusion_csv(test_csv)? {
        if let Some(&k) = slot.get(&row.video_id) {
            if let Some(r) = test.get_mut(&k) {
                r.captions.push(row.sentence);
            }
            continue;
        }
        match find_video(video_dir, &row.video_id) {
            Some(video) => {
                slot.insert(row.video_id.clone(), row.line);
                test.insert(
                    row.line,
                    VideoRecord {
                        id: row.video_id,
                        video,
                        captions: vec![row.sentence],
                        split: Split::Test,
                    },
                );
            }
            None => {
                let expected = video_dir.join(format!("{}.mp4", row.video_id));
                missing(policy, test_csv, &row.video_id, expected, &mut out.skipped)?
            }
        }
    }
    out.records.extend(test.into_values());
    Ok(out)
}

#[derive(Deserialize)]
struct ManifestLine {
    video: PathBuf,
    captions: Vec<String>,
    #[serde(default)]
    split: Split,
    #[serde(default)]
    id: Option<String>,
}

/// Reads a JSONL video manifest. Relative `video` paths are resolved against
/// the manifest's folder; `split` defaults to train and `id` to the `video`
/// string. Blank lines are ignored; a malformed line, a line without
/// captions or a repeated id is an error naming the file and line.
pub fn read_manifest(path: &Path, policy: MissingPolicy) -> Result<Resolved> {
    let reader = BufReader::new(File::open(path).map_err(io_err(path))?);
    let lines = reader.lines().map(|line| line.map_err(io_err(path)));
    manifest_lines(lines, path, policy, |video| video.exists())
}

/// Parses the text of a JSONL video manifest as [`read_manifest`] reads a
/// file at `path` (which names it in errors and whose folder relative paths
/// resolve against); `exists` says whether a resolved video path has a file
/// (`read_manifest` asks the file system).
pub fn parse_manifest(
    text: &str,
    path: &Path,
    policy: MissingPolicy,
    exists: impl FnMut(&Path) -> bool,
) -> Result<Resolved> {
    manifest_lines(text.lines().map(Ok), path, policy, exists)
}

/// The manifest reader over lines as they come, so that a file is checked
/// line by line, in order, without being read whole first.
fn manifest_lines<S: AsRef<str>>(
    lines: impl Iterator<Item = Result<S>>,
    path: &Path,
    policy: MissingPolicy,
    mut exists: impl FnMut(&Path) -> bool,
) -> Result<Resolved> {
    let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
    let mut out = Resolved::default();
    let mut ids: HashMap<String, usize> = HashMap::new();
    for (i, line) in lines.enumerate() {
        let line_no = i + 1;
        let line = line?;
        let line = line.as_ref();
        if line.trim().is_empty() {
            continue;
        }
        let m: ManifestLine =
            serde_json::from_str(line).map_err(|e| format_err(path, line_no, e.to_string()))?;
        if m.captions.is_empty() || m.captions.iter().any(|c| c.trim().is_empty()) {
            return Err(format_err(
                path,
                line_no,
                "a video needs at least one non-empty caption",
            ));
        }
        let id =
            m.id.unwrap_or_else(|| m.video.to_string_lossy().into_owned());
        if let Some(first) = ids.insert(id.clone(), line_no) {
            return Err(format_err(
                path,
                line_no,
                format!("id `{id}` already used on line {first}"),
            ));
        }
        let video = if m.video.is_absolute() {
            m.video
        } else {
            base.join(&m.video)
        };
        if !exists(&video) {
            let reason = format!("line {line_no}");
            missing(policy, path, &id, video, &mut out.skipped)?;
            if let Some(s) = out.skipped.last_mut() {
                s.reason = format!("{} ({reason})", s.reason);
            }
            continue;
        }
        out.records.push(VideoRecord {
            id,
            video,
            captions: m.captions,
            split: m.split,
        });
    }
    Ok(out)
}

/// Writes records as a JSONL manifest; paths under the manifest's folder are
/// written relative to it so the folder can be moved.
pub fn write_manifest(path: &Path, records: &[VideoRecord]) -> Result<()> {
    let base = path.parent().unwrap_or(Path::new(""));
    let mut w = BufWriter::new(File::create(path).map_err(io_err(path))?);
    for r in records {
        let video = r.video.strip_prefix(base).unwrap_or(&r.video);
        let line = serde_json::json!({
            "video": video,
            "captions": r.captions,
            "split": r.split,
            "id": r.id,
        });
        writeln!(w, "{line}").map_err(io_err(path))?;
    }
    w.flush().map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_handles_quotes_commas_and_newlines() {
        let text = "a,b\r\n1,\"x, \"\"y\"\"\"\n\n2,\"multi\nline\"\n3,last";
        let rows = parse_csv(Path::new("t.csv"), text).unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[1], (2, vec!["1".to_string(), "x, \"y\"".to_string()]));
        assert_eq!(
            rows[2],
            (4, vec!["2".to_string(), "multi\nline".to_string()])
        );
        assert_eq!(rows[3], (6, vec!["3".to_string(), "last".to_string()]));
        assert!(parse_csv(Path::new("t.csv"), "a\n\"open").is_err());
    }

    /// Each reader is its text parser plus reading the file: same values,
    /// same errors, for good and bad inputs alike.
    #[test]
    fn readers_and_text_parsers_agree() {
        fn same<T: PartialEq + std::fmt::Debug>(a: Result<T>, b: Result<T>) {
            match (a, b) {
                (Ok(a), Ok(b)) => assert_eq!(a, b),
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
                (a, b) => panic!("{a:?} vs {b:?}"),
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        let json = [
            r#"{"videos": [{"video_id": "v0", "split": "validate"}], "sentences": [{"video_id": "v0", "caption": "x"}]}"#,
            "{\"videos\": [\n{\"video_id\": 3}]}",
            r#"{"videos": [{"video_id": "v0"}, {"video_id": "v0"}]}"#,
            "",
            "{\"videos\": [{\"video_id\": \"v\u{e9}\"}], \"sentences\": [{\"video_id\": \"v\u{e9}\", \"caption\": \"\u{1f600}\"}]}",
        ];
        for text in json {
            std::fs::write(&f, text).unwrap();
            same(read_msrvtt_json(&f), parse_msrvtt_json(text.as_bytes(), &f));
        }
        let latin1 = b"{\"videos\": [{\"video_id\": \"v\xe9\"}]}";
        std::fs::write(&f, latin1).unwrap();
        same(read_msrvtt_json(&f), parse_msrvtt_json(latin1, &f));
        let csv = [
            "key,vid_key,video_id,sentence\nret0,msr7,video7,\"a, b\"\n",
            "key,vid_key,video_id,sentence\nret0,msr1\n",
            "video_id\nv0\n\"\"\n",
            "",
        ];
        for text in csv {
            std::fs::write(&f, text).unwrap();
            same(read_jsfusion_csv(&f), parse_jsfusion_csv(text, &f));
            same(read_video_ids_csv(&f), parse_video_ids_csv(text, &f));
        }
        std::fs::write(dir.path().join("a.gif"), b"").unwrap();
        let manifests = [
            "{\"video\": \"a.gif\", \"captions\": [\"x\"]}\r\n\n{\"video\": \"gone.mp4\", \"captions\": [\"y\"]}",
            "{\"video\": \"a.gif\", \"captions\": [\"x\"]}\n{\"video\": \"a.gif\", \"captions\": [\"y\"]}\n",
            "not json",
        ];
        for text in manifests {
            std::fs::write(&f, text).unwrap();
            for policy in [MissingPolicy::Error, MissingPolicy::Skip] {
                same(
                    read_manifest(&f, policy),
                    parse_manifest(text, &f, policy, |p| p.exists()),
                );
            }
        }
    }

    #[test]
    fn parse_manifest_asks_the_given_file_system() {
        let text = "{\"video\": \"a.mp4\", \"captions\": [\"x\"]}\n{\"video\": \"/v/b.mp4\", \"captions\": [\"y\"], \"id\": \"b\"}\n";
        let path = Path::new("data/videos.jsonl");
        let only_b = |p: &Path| p == Path::new("/v/b.mp4");
        let r = parse_manifest(text, path, MissingPolicy::Skip, only_b).unwrap();
        assert_eq!(r.records.len(), 1);
        assert_eq!(r.records[0].id, "b");
        assert_eq!(r.skipped[0].id, "a.mp4");
        assert!(
            r.skipped[0].reason.contains("data/a.mp4"),
            "{:?}",
            r.skipped
        );
        let e = parse_manifest(text, path, MissingPolicy::Error, only_b).unwrap_err();
        assert!(
            matches!(&e, Error::MissingVideo { id, .. } if id == "a.mp4"),
            "{e}"
        );
        assert!(e.to_string().starts_with("data/videos.jsonl: "), "{e}");
    }
}
