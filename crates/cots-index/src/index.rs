//! [`Index`]: the directory, its commit point (`index.json`), the mapped
//! segments, thumbnails and the approximate-search graph, and every change.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::ann::{AnnParams, Graph};
use crate::exact::{self, Cand, Rows};
use crate::mapped::{self, MappedFile, Segment};
use crate::store::{self, TensorOut};
use crate::{
    quant, Error, Filter, Hit, Item, Mode, Model, Result, SearchOptions, FORMAT_VERSION, META_FILE,
};

/// The type of a thumbnail, sniffed from its first bytes when it is added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ThumbType {
    Jpeg,
    Png,
    Webp,
    Gif,
    Other,
}

impl ThumbType {
    fn sniff(b: &[u8]) -> Self {
        if b.starts_with(&[0xff, 0xd8, 0xff]) {
            Self::Jpeg
        } else if b.starts_with(b"\x89PNG\r\n\x1a\n") {
            Self::Png
        } else if b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP" {
            Self::Webp
        } else if b.starts_with(b"GIF8") {
            Self::Gif
        } else {
            Self::Other
        }
    }

    fn mime(self) -> &'static str {
        match self {
            Self::Jpeg => "image/jpeg",
            Self::Png => "image/png",
            Self::Webp => "image/webp",
            Self::Gif => "image/gif",
            Self::Other => "application/octet-stream",
        }
    }
}

/// Where a row's thumbnail lies in the packed thumbnail file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ThumbRef {
    offset: u64,
    len: u64,
    #[serde(rename = "type")]
    kind: ThumbType,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SegmentMeta {
    /// The `f32 [rows, dim]` safetensors file.
    file: String,
    rows: usize,
    /// The int8 codes of the same rows, when the index is quantized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    int8: Option<String>,
}

/// The persisted approximate-search graph.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct AnnMeta {
    params: AnnParams,
    /// The graph's file in the index directory.
    file: String,
    /// Points in the graph.
    points: usize,
    /// The graph holds the items whose key is below this; rows added later
    /// (higher keys) are searched exactly.
    key_end: u64,
    /// Keys in the graph whose items were removed since it was built.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tombstones: Vec<u64>,
}

/// `index.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    format: u32,
    model: Model,
    #[serde(default)]
    root: Option<String>,
    /// Bumped by every commit.
    generation: u64,
    /// Number for the next data file's name.
    next_file: u64,
    /// Key for the next added item. Keys never repeat; the graph is keyed by them.
    next_key: u64,
    /// Row order.
    items: Vec<Item>,
    /// Per row, the item's key (increasing).
    keys: Vec<u64>,
    /// Per row, its thumbnail in `thumbs_file`.
    thumbs: Vec<Option<ThumbRef>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    thumbs_file: Option<String>,
    /// The size, in pixels, the caller made every thumbnail at (the longer
    /// side), recorded so that a later build or add does not mix sizes.
    /// Absent in indexes written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    thumb_size: Option<u32>,
    /// The rows, in order, as safetensors files.
    segments: Vec<SegmentMeta>,
    /// Every segment has int8 codes, and added rows get them too.
    #[serde(default)]
    quantized: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ann: Option<AnnMeta>,
}

/// Just the version, read first so that a newer format is reported as such.
#[derive(Deserialize)]
struct Probe {
    format: u32,
}

impl Meta {
    fn file_name(&mut self, prefix: &str, suffix: &str) -> String {
        let n = self.next_file;
        self.next_file += 1;
        format!("{prefix}.{n:06}{suffix}")
    }
}

/// A summary of an index (`cots index info`).
#[derive(Clone, Debug, Serialize)]
pub struct IndexInfo {
    pub dir: PathBuf,
    pub format: u32,
    pub model: Model,
    pub root: Option<String>,
    pub items: usize,
    pub generation: u64,
    pub segments: usize,
    pub vector_bytes: u64,
    pub int8_bytes: Option<u64>,
    pub thumbnails: usize,
    pub thumbnail_bytes: u64,
    /// The recorded thumbnail size in pixels ([`Index::thumb_size`]).
    pub thumb_size: Option<u32>,
    pub ann: Option<AnnInfo>,
    /// Items per `kind`.
    pub kinds: std::collections::BTreeMap<String, usize>,
}

/// The approximate-search graph in [`IndexInfo`].
#[derive(Clone, Debug, Serialize)]
pub struct AnnInfo {
    pub params: AnnParams,
    pub points: usize,
    pub bytes: u64,
    /// Rows added after the graph was built (searched exactly).
    pub unindexed_rows: usize,
    /// Points whose items were removed (skipped).
    pub tombstones: usize,
}

impl fmt::Display for IndexInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        writeln!(
            f,
            "index       {} (format {})",
            self.dir.display(),
            self.format
        )?;
        writeln!(
            f,
            "model       run {}, weights {}, dim {}",
            self.model.run, self.model.weights_hash, self.model.dim
        )?;
        if let Some(r) = &self.root {
            writeln!(f, "root        {r}")?;
        }
        let kinds: Vec<String> = self.kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        writeln!(f, "items       {} ({})", self.items, kinds.join(", "))?;
        writeln!(
            f,
            "vectors     {:.1} MiB f32 in {} segment(s), generation {}",
            mib(self.vector_bytes),
            self.segments,
            self.generation
        )?;
        match self.int8_bytes {
            Some(b) => writeln!(f, "int8        {:.1} MiB", mib(b))?,
            None => writeln!(f, "int8        none")?,
        }
        let px = self
            .thumb_size
            .map(|p| format!(", {p} px"))
            .unwrap_or_default();
        writeln!(
            f,
            "thumbnails  {} ({:.1} MiB{px})",
            self.thumbnails,
            mib(self.thumbnail_bytes)
        )?;
        match &self.ann {
            Some(a) => write!(
                f,
                "ann         HNSW M={} ef_construction={} ef_search={}: {} points, {:.1} MiB, \
                 {} rows added since (searched exactly), {} tombstones",
                a.params.m,
                a.params.ef_construction,
                a.params.ef_search,
                a.points,
                mib(a.bytes),
                a.unindexed_rows,
                a.tombstones
            ),
            None => write!(f, "ann         none"),
        }
    }
}

/// A retrieval index opened from (or created in) a directory.
///
/// Reads need `&self` and may run from many threads; changes need `&mut self`
/// and are committed to disk before they return.
pub struct Index {
    dir: PathBuf,
    meta: Meta,
    segments: Vec<Segment>,
    /// First row of each segment.
    seg_start: Vec<usize>,
    thumbs: Option<MappedFile>,
    by_id: HashMap<String, usize>,
    by_key: HashMap<u64, usize>,
    /// The approximate-search graph, memory-mapped.
    graph: Option<Graph>,
}

impl Index {
    /// A new, empty index in `dir` (created if missing; it must be empty).
    pub fn create(dir: &Path, model: Model) -> Result<Index> {
        if model.dim == 0 {
            return Err(Error::Invalid(
                "the model's dim is 0: vectors need at least one value".into(),
            ));
        }
        if dir.exists() {
            let mut entries = std::fs::read_dir(dir).map_err(Error::io(dir))?;
            if entries.next().is_some() {
                return Err(Error::NotEmpty(dir.to_path_buf()));
            }
        } else {
            std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        }
        let meta = Meta {
            format: FORMAT_VERSION,
            model,
            root: None,
            generation: 0,
            next_file: 0,
            next_key: 0,
            items: Vec::new(),
            keys: Vec::new(),
            thumbs: Vec::new(),
            thumbs_file: None,
            thumb_size: None,
            segments: Vec::new(),
            quantized: false,
            ann: None,
        };
        let index = Self::from_meta(dir, meta)?;
        index.write_meta()?;
        Ok(index)
    }

    /// Opens the index in `dir`, memory-mapping its vectors: RAM holds the
    /// items' metadata, not the vectors. Damaged files are errors naming them.
    pub fn open(dir: &Path) -> Result<Index> {
        let path = dir.join(META_FILE);
        if !path.exists() {
            return Err(Error::NotAnIndex(dir.to_path_buf()));
        }
        let text = std::fs::read(&path).map_err(Error::io(&path))?;
        let meta: Meta = match serde_json::from_slice(&text) {
            Ok(m) => m,
            Err(e) => {
                return Err(match serde_json::from_slice::<Probe>(&text) {
                    Ok(p) if p.format != FORMAT_VERSION => Error::Version {
                        path,
                        found: p.format,
                        supported: FORMAT_VERSION,
                    },
                    _ => Error::corrupt(&path, e.to_string()),
                });
            }
        };
        if meta.format != FORMAT_VERSION {
            return Err(Error::Version {
                path,
                found: meta.format,
                supported: FORMAT_VERSION,
            });
        }
        Self::from_meta(dir, meta)
    }

    /// Checks `meta` and maps the files it names.
    fn from_meta(dir: &Path, meta: Meta) -> Result<Index> {
        let meta_path = dir.join(META_FILE);
        let bad = |msg: String| Error::corrupt(&meta_path, msg);
        let n = meta.items.len();
        if meta.keys.len() != n || meta.thumbs.len() != n {
            return Err(bad(format!(
                "{n} items but {} keys and {} thumbnail entries",
                meta.keys.len(),
                meta.thumbs.len()
            )));
        }
        if meta.keys.windows(2).any(|w| w[0] >= w[1]) || meta.keys.last() >= Some(&meta.next_key) {
            return Err(bad("item keys are not increasing".into()));
        }
        let seg_rows: usize = meta.segments.iter().map(|s| s.rows).sum();
        if seg_rows != n {
            return Err(bad(format!(
                "{n} items but the segments hold {seg_rows} rows"
            )));
        }
        let mut by_id = HashMap::with_capacity(n);
        for (row, item) in meta.items.iter().enumerate() {
            if by_id.insert(item.id.clone(), row).is_some() {
                return Err(bad(format!("item id `{}` appears twice", item.id)));
            }
        }
        let by_key = meta.keys.iter().enumerate().map(|(r, &k)| (k, r)).collect();
        let dim = meta.model.dim;
        let segments = meta
            .segments
            .par_iter()
            .map(|s| {
                Segment::open(
                    &dir.join(&s.file),
                    s.int8.as_ref().map(|f| dir.join(f)).as_deref(),
                    s.rows,
                    dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        if meta.quantized && meta.segments.iter().any(|s| s.int8.is_none()) {
            return Err(bad("quantized, but a segment has no int8 codes".into()));
        }
        let mut seg_start = Vec::with_capacity(segments.len());
        let mut start = 0;
        for s in &segments {
            seg_start.push(start);
            start += s.rows;
        }
        let thumbs = match &meta.thumbs_file {
            Some(f) => {
                let t = MappedFile::open(&dir.join(f))?;
                let len = t.bytes().len() as u64;
                if let Some((row, _)) = meta.thumbs.iter().enumerate().find(|(_, r)| {
                    r.is_some_and(|r| r.offset.checked_add(r.len).is_none_or(|e| e > len))
                }) {
                    return Err(Error::corrupt(
                        &t.path,
                        format!(
                            "{len} bytes, too short for the thumbnail of item `{}`",
                            meta.items[row].id
                        ),
                    ));
                }
                Some(t)
            }
            None if meta.thumbs.iter().any(Option::is_some) => {
                return Err(bad("thumbnails are listed but no thumbnail file".into()))
            }
            None => None,
        };
        let graph = match &meta.ann {
            Some(a) => Some(Graph::load(
                &dir.join(&a.file),
                dim,
                a.points,
                a.params.ef_search,
            )?),
            None => None,
        };
        Ok(Index {
            dir: dir.to_path_buf(),
            meta,
            segments,
            seg_start,
            thumbs,
            by_id,
            by_key,
            graph,
        })
    }

    /// Writes `index.json` atomically: the commit point of every change.
    fn write_meta(&self) -> Result<()> {
        let json = serde_json::to_vec(&self.meta)
            .map_err(|e| Error::Invalid(format!("serialising {META_FILE}: {e}")))?;
        store::write_atomic(&self.dir, META_FILE, |w| w.write_all(&json))?;
        store::sync_dir(&self.dir)
    }

    /// Commits `next`: its files are already written. The new state is
    /// opened (and so checked) before `index.json` is replaced, and files
    /// the new state does not name are deleted after.
    fn commit(&mut self, mut next: Meta) -> Result<()> {
        next.generation = self.meta.generation + 1;
        store::sync_dir(&self.dir)?;
        let fresh = Self::from_meta(&self.dir, next)?;
        fresh.write_meta()?;
        *self = fresh;
        self.collect_garbage();
        Ok(())
    }

    /// Deletes data files of earlier generations and temp files of writes
    /// that failed. Errors are ignored: a stale file wastes space, nothing else.
    fn collect_garbage(&self) {
        let mut live: HashSet<&str> = HashSet::new();
        live.insert(META_FILE);
        for s in &self.meta.segments {
            live.insert(&s.file);
            if let Some(f) = &s.int8 {
                live.insert(f);
            }
        }
        if let Some(f) = &self.meta.thumbs_file {
            live.insert(f);
        }
        if let Some(a) = &self.meta.ann {
            live.insert(&a.file);
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let ours = ["vectors.", "thumbs.", "ann.", ".tmp-"]
                .iter()
                .any(|p| name.starts_with(p));
            if ours && !live.contains(name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    pub fn model(&self) -> &Model {
        &self.meta.model
    }

    /// The base directory of relative item paths.
    pub fn root(&self) -> Option<&Path> {
        self.meta.root.as_deref().map(Path::new)
    }

    /// Sets the base directory of relative item paths (committed).
    pub fn set_root(&mut self, root: Option<&Path>) -> Result<()> {
        let mut next = self.meta.clone();
        next.root = root.map(|r| r.to_string_lossy().into_owned());
        self.commit(next)
    }

    /// The size, in pixels, the thumbnails were made at, as recorded by
    /// [`Index::set_thumb_size`]; `None` when never recorded.
    pub fn thumb_size(&self) -> Option<u32> {
        self.meta.thumb_size
    }

    /// Records the size the caller makes thumbnails at (committed). The index
    /// stores thumbnails as opaque bytes; callers compare this before adding
    /// more, so that one index never holds two sizes.
    pub fn set_thumb_size(&mut self, px: Option<u32>) -> Result<()> {
        let mut next = self.meta.clone();
        next.thumb_size = px;
        self.commit(next)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn len(&self) -> usize {
        self.meta.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.meta.items.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.meta.model.dim
    }

    /// All items, in row order.
    pub fn items(&self) -> &[Item] {
        &self.meta.items
    }

    /// The row and item of `id`.
    pub fn item(&self, id: &str) -> Option<(usize, &Item)> {
        self.by_id.get(id).map(|&r| (r, &self.meta.items[r]))
    }

    /// The `f32` vector of `row` (`dim` values), read from the mapped file.
    pub fn vector(&self, row: usize) -> Option<&[f32]> {
        if row >= self.len() {
            return None;
        }
        let s = self.seg_start.partition_point(|&start| start <= row) - 1;
        let dim = self.dim();
        let local = row - self.seg_start[s];
        self.segments[s]
            .vectors()
            .get(local * dim..(local + 1) * dim)
    }

    /// Whether the index has int8 codes ([`Mode::Quantized`] works).
    pub fn is_quantized(&self) -> bool {
        self.meta.quantized
    }

    /// The parameters of the approximate-search graph, if there is one.
    pub fn ann_params(&self) -> Option<&AnnParams> {
        self.meta.ann.as_ref().map(|a| &a.params)
    }

    /// Adds `items` with their `vectors` (`items.len() * dim` values, row
    /// after row) and thumbnails (encoded image bytes, one entry per item).
    /// Duplicate ids, non-finite values and wrong lengths are errors, and
    /// nothing is written then. The new rows go to a new segment file (merged
    /// with the last segments when they are not much larger, so that there
    /// are O(log n) segments); thumbnails are appended to the packed file.
    pub fn add(
        &mut self,
        items: Vec<Item>,
        vectors: &[f32],
        thumbnails: Vec<Option<Vec<u8>>>,
    ) -> Result<()> {
        let dim = self.dim();
        let n = items.len();
        if vectors.len() != n * dim {
            return Err(Error::Shape {
                what: format!("vectors of {n} items of dim {dim}"),
                expected: n * dim,
                got: vectors.len(),
            });
        }
        if thumbnails.len() != n {
            return Err(Error::Shape {
                what: format!("thumbnails of {n} items"),
                expected: n,
                got: thumbnails.len(),
            });
        }
        let mut seen = HashSet::with_capacity(n);
        for (item, v) in items.iter().zip(vectors.chunks_exact(dim)) {
            if self.by_id.contains_key(&item.id) || !seen.insert(item.id.as_str()) {
                return Err(Error::DuplicateId(item.id.clone()));
            }
            if item.id.is_empty() {
                return Err(Error::BadItem {
                    id: item.id.clone(),
                    msg: "the id is empty".into(),
                });
            }
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(Error::BadItem {
                    id: item.id.clone(),
                    msg: format!("vector value {i} is {}", v[i]),
                });
            }
        }
        if n == 0 {
            return Ok(());
        }
        let mut next = self.meta.clone();

        // Thumbnails: appended past the end the committed index.json knows.
        let refs = self.append_thumbnails(&mut next, &thumbnails)?;

        // Vectors: the new rows, plus the trailing segments they absorb.
        let mut absorb = 0;
        let mut merged_rows = n;
        while absorb < self.segments.len() {
            let s = &self.segments[self.segments.len() - 1 - absorb];
            if s.rows > 2 * merged_rows {
                break;
            }
            merged_rows += s.rows;
            absorb += 1;
        }
        let keep = self.segments.len() - absorb;
        let absorbed = &self.segments[keep..];
        let mut chunks: Vec<&[u8]> = absorbed
            .iter()
            .map(|s| bytemuck::cast_slice(s.vectors()))
            .collect();
        chunks.push(bytemuck::cast_slice(vectors));
        let file = next.file_name("vectors", ".safetensors");
        store::write_safetensors(
            &self.dir,
            &file,
            &[TensorOut {
                name: mapped::VECTORS_TENSOR,
                dtype: Dtype::F32,
                shape: vec![merged_rows, dim],
                chunks,
            }],
        )?;
        let int8 = if next.quantized {
            let (codes, scales) = quant::quantize(vectors, dim);
            let mut old_codes = Vec::new();
            let mut old_scales = Vec::new();
            for s in absorbed {
                let q = s.int8.as_ref().ok_or_else(|| {
                    Error::corrupt(s.path(), "quantized index, but no int8 codes")
                })?;
                old_codes.push(bytemuck::cast_slice::<i8, u8>(q.codes()));
                old_scales.push(bytemuck::cast_slice::<f32, u8>(q.scales()));
            }
            let name = next.file_name("vectors", ".i8.safetensors");
            write_int8(
                &self.dir,
                &name,
                merged_rows,
                dim,
                old_codes
                    .into_iter()
                    .chain([bytemuck::cast_slice(&codes)])
                    .collect(),
                old_scales
                    .into_iter()
                    .chain([bytemuck::cast_slice(&scales)])
                    .collect(),
            )?;
            Some(name)
        } else {
            None
        };
        next.segments.truncate(keep);
        next.segments.push(SegmentMeta {
            file,
            rows: merged_rows,
            int8,
        });
        for item in items {
            next.keys.push(next.next_key);
            next.next_key += 1;
            next.items.push(item);
        }
        next.thumbs.extend(refs);
        self.commit(next)
    }

    /// Appends the given thumbnails to the packed file (creating it if
    /// needed) and returns where each lies.
    fn append_thumbnails(
        &self,
        next: &mut Meta,
        thumbnails: &[Option<Vec<u8>>],
    ) -> Result<Vec<Option<ThumbRef>>> {
        if thumbnails.iter().all(Option::is_none) {
            return Ok(vec![None; thumbnails.len()]);
        }
        let name = match &next.thumbs_file {
            Some(f) => f.clone(),
            None => {
                let f = next.file_name("thumbs", ".bin");
                store::write_atomic(&self.dir, &f, |_| Ok(()))?;
                next.thumbs_file = Some(f.clone());
                f
            }
        };
        let path = self.dir.join(&name);
        let mut file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(Error::io(&path))?;
        // The true end, past any bytes of an earlier failed append.
        let mut offset = file.metadata().map_err(Error::io(&path))?.len();
        let mut refs = Vec::with_capacity(thumbnails.len());
        let mut w = std::io::BufWriter::new(&mut file);
        for t in thumbnails {
            refs.push(match t {
                Some(bytes) if !bytes.is_empty() => {
                    w.write_all(bytes).map_err(Error::io(&path))?;
                    let r = ThumbRef {
                        offset,
                        len: bytes.len() as u64,
                        kind: ThumbType::sniff(bytes),
                    };
                    offset += bytes.len() as u64;
                    Some(r)
                }
                _ => None,
            });
        }
        w.flush().map_err(Error::io(&path))?;
        drop(w);
        file.sync_all().map_err(Error::io(&path))?;
        Ok(refs)
    }

    /// Removes the items `ids` and returns how many were removed. An unknown
    /// id is an error and nothing is removed. Segments holding removed rows
    /// are rewritten without them; the graph keeps the points as tombstones
    /// (skipped by searches) until it is rebuilt.
    pub fn remove(&mut self, ids: &[String]) -> Result<usize> {
        let mut rows = Vec::with_capacity(ids.len());
        for id in ids {
            let row = *self
                .by_id
                .get(id)
                .ok_or_else(|| Error::UnknownId(id.clone()))?;
            rows.push(row);
        }
        rows.sort_unstable();
        rows.dedup();
        if rows.is_empty() {
            return Ok(0);
        }
        let dim = self.dim();
        let mut next = self.meta.clone();
        let mut segments = Vec::with_capacity(next.segments.len());
        for (s, (seg, meta)) in self.segments.iter().zip(&self.meta.segments).enumerate() {
            let start = self.seg_start[s];
            let end = start + seg.rows;
            let lo = rows.partition_point(|&r| r < start);
            let hi = rows.partition_point(|&r| r < end);
            if lo == hi {
                segments.push(meta.clone());
                continue;
            }
            let kept_rows = seg.rows - (hi - lo);
            if kept_rows == 0 {
                continue;
            }
            // The kept runs of rows between removed ones, as slices of the map.
            let mut runs = Vec::new();
            let mut from = 0;
            for &r in &rows[lo..hi] {
                if r - start > from {
                    runs.push(from..r - start);
                }
                from = r - start + 1;
            }
            if from < seg.rows {
                runs.push(from..seg.rows);
            }
            let v = seg.vectors();
            let file = next.file_name("vectors", ".safetensors");
            store::write_safetensors(
                &self.dir,
                &file,
                &[TensorOut {
                    name: mapped::VECTORS_TENSOR,
                    dtype: Dtype::F32,
                    shape: vec![kept_rows, dim],
                    chunks: runs
                        .iter()
                        .map(|r| bytemuck::cast_slice(&v[r.start * dim..r.end * dim]))
                        .collect(),
                }],
            )?;
            let int8 = match &seg.int8 {
                Some(q) => {
                    let name = next.file_name("vectors", ".i8.safetensors");
                    let (codes, scales) = (q.codes(), q.scales());
                    write_int8(
                        &self.dir,
                        &name,
                        kept_rows,
                        dim,
                        runs.iter()
                            .map(|r| bytemuck::cast_slice(&codes[r.start * dim..r.end * dim]))
                            .collect(),
                        runs.iter()
                            .map(|r| bytemuck::cast_slice(&scales[r.clone()]))
                            .collect(),
                    )?;
                    Some(name)
                }
                None => None,
            };
            segments.push(SegmentMeta {
                file,
                rows: kept_rows,
                int8,
            });
        }
        next.segments = segments;
        if let Some(a) = &mut next.ann {
            a.tombstones.extend(
                rows.iter()
                    .map(|&r| self.meta.keys[r])
                    .filter(|&k| k < a.key_end),
            );
            a.tombstones.sort_unstable();
        }
        let removed: HashSet<usize> = rows.iter().copied().collect();
        next.keys = without(&self.meta.keys, &removed);
        next.thumbs = without(&self.meta.thumbs, &removed);
        next.items = without(&self.meta.items, &removed);
        self.compact_thumbnails(&mut next)?;
        self.commit(next)?;
        Ok(rows.len())
    }

    /// Rewrites the thumbnail file without the bytes of removed items once
    /// they are more than half of it (and over 1 MiB).
    fn compact_thumbnails(&self, next: &mut Meta) -> Result<()> {
        let Some(old) = &self.thumbs else {
            return Ok(());
        };
        let live: u64 = next.thumbs.iter().flatten().map(|r| r.len).sum();
        let total = old.bytes().len() as u64;
        if total - live < (1 << 20) || total - live < live {
            return Ok(());
        }
        let name = next.file_name("thumbs", ".bin");
        let bytes = old.bytes();
        let mut offset = 0;
        let mut slices = Vec::new();
        for r in next.thumbs.iter_mut().flatten() {
            slices.push(&bytes[r.offset as usize..(r.offset + r.len) as usize]);
            r.offset = offset;
            offset += r.len;
        }
        store::write_atomic(&self.dir, &name, |w| {
            for s in &slices {
                w.write_all(s)?;
            }
            Ok(())
        })?;
        next.thumbs_file = Some(name);
        Ok(())
    }

    /// The thumbnail of `id` and its MIME type; `None` when it has none.
    pub fn thumbnail(&self, id: &str) -> Result<Option<(Vec<u8>, &'static str)>> {
        let (row, _) = self
            .item(id)
            .ok_or_else(|| Error::UnknownId(id.to_string()))?;
        let (Some(r), Some(file)) = (self.meta.thumbs[row], &self.thumbs) else {
            return Ok(None);
        };
        // The range was checked against the file when it was opened.
        let bytes = file
            .bytes()
            .get(r.offset as usize..(r.offset + r.len) as usize)
            .ok_or_else(|| Error::corrupt(&file.path, format!("no thumbnail bytes for `{id}`")))?;
        Ok(Some((bytes.to_vec(), r.kind.mime())))
    }

    /// Builds (or rebuilds) the approximate-search graph over every row and
    /// persists it; searches with [`Mode::Approximate`] use it from then on.
    pub fn build_ann(&mut self, params: AnnParams) -> Result<()> {
        params.validate()?;
        let mut next = self.meta.clone();
        let file = next.file_name("ann", ".usearch");
        let graph = Graph::build(
            &self.parts(),
            &self.meta.keys,
            self.dim(),
            &params,
            &self.dir,
        )?;
        graph.save(&self.dir, &file)?;
        drop(graph);
        next.ann = Some(AnnMeta {
            params,
            file,
            points: self.len(),
            key_end: next.next_key,
            tombstones: Vec::new(),
        });
        self.commit(next)
    }

    /// Writes int8 codes for every segment that has none; from then on added
    /// rows get codes too, and [`Mode::Quantized`] works.
    pub fn quantize(&mut self) -> Result<()> {
        let mut next = self.meta.clone();
        let dim = self.dim();
        for (i, seg) in self.segments.iter().enumerate() {
            if next.segments[i].int8.is_some() {
                continue;
            }
            let (codes, scales) = quant::quantize(seg.vectors(), dim);
            let name = next.file_name("vectors", ".i8.safetensors");
            write_int8(
                &self.dir,
                &name,
                seg.rows,
                dim,
                vec![bytemuck::cast_slice(&codes)],
                vec![bytemuck::cast_slice(&scales)],
            )?;
            next.segments[i].int8 = Some(name);
        }
        next.quantized = true;
        self.commit(next)
    }

    /// A summary for `cots index info`.
    pub fn info(&self) -> IndexInfo {
        let size = |f: &str| {
            std::fs::metadata(self.dir.join(f))
                .map(|m| m.len())
                .unwrap_or(0)
        };
        let mut kinds = std::collections::BTreeMap::new();
        for i in &self.meta.items {
            *kinds.entry(i.kind.as_str().to_string()).or_insert(0) += 1;
        }
        IndexInfo {
            dir: self.dir.clone(),
            format: self.meta.format,
            model: self.meta.model.clone(),
            root: self.meta.root.clone(),
            items: self.len(),
            generation: self.meta.generation,
            segments: self.segments.len(),
            vector_bytes: self.meta.segments.iter().map(|s| size(&s.file)).sum(),
            int8_bytes: self.meta.quantized.then(|| {
                self.meta
                    .segments
                    .iter()
                    .filter_map(|s| s.int8.as_deref())
                    .map(size)
                    .sum()
            }),
            thumbnails: self.meta.thumbs.iter().flatten().count(),
            thumbnail_bytes: self.meta.thumbs.iter().flatten().map(|r| r.len).sum(),
            thumb_size: self.meta.thumb_size,
            ann: self.meta.ann.as_ref().map(|a| AnnInfo {
                params: a.params.clone(),
                points: a.points,
                bytes: size(&a.file),
                unindexed_rows: self.unindexed_start().map_or(0, |s| self.len() - s),
                tombstones: a.tombstones.len(),
            }),
            kinds,
        }
    }

    /// The segments as row runs.
    fn parts(&self) -> Vec<Rows<'_>> {
        self.segments
            .iter()
            .zip(&self.seg_start)
            .map(|(s, &first_row)| Rows {
                first_row,
                vectors: s.vectors(),
            })
            .collect()
    }

    /// The first row the graph does not hold (rows are in key order).
    fn unindexed_start(&self) -> Option<usize> {
        let a = self.meta.ann.as_ref()?;
        Some(self.meta.keys.partition_point(|&k| k < a.key_end))
    }

    fn allow_mask(&self, filter: &Filter) -> Option<Vec<bool>> {
        (!filter.is_empty()).then(|| {
            self.meta
                .items
                .par_iter()
                .map(|i| filter.matches(i))
                .collect()
        })
    }

    fn hits(&self, cands: Vec<Cand>) -> Vec<Hit> {
        cands
            .into_iter()
            .map(|c| Hit {
                row: c.row,
                id: self.meta.items[c.row].id.clone(),
                score: c.score,
            })
            .collect()
    }

    fn check_query(&self, what: &str, got: usize, n: usize) -> Result<()> {
        if got != n * self.dim() {
            return Err(Error::Shape {
                what: what.into(),
                expected: n * self.dim(),
                got,
            });
        }
        Ok(())
    }

    /// The best `k` items for `query` (`dim` values), best first.
    pub fn search(&self, query: &[f32], k: usize, opts: &SearchOptions) -> Result<Vec<Hit>> {
        self.check_query("the query vector", query.len(), 1)?;
        let allow = self.allow_mask(&opts.filter);
        let cands = match opts.mode {
            Mode::Exact => exact::search(&self.parts(), self.dim(), query, k, allow.as_deref())
                .pop()
                .unwrap_or_default(),
            Mode::Approximate { ef } => self.search_ann(query, k, ef, allow.as_deref())?,
            Mode::Quantized { shortlist } => {
                self.search_quantized(query, k, shortlist, allow.as_deref())?
            }
        };
        Ok(self.hits(cands))
    }

    /// [`Index::search`] for `queries.len() / dim` queries at once.
    pub fn search_batch(
        &self,
        queries: &[f32],
        k: usize,
        opts: &SearchOptions,
    ) -> Result<Vec<Vec<Hit>>> {
        let dim = self.dim();
        let nq = queries.len() / dim;
        self.check_query("the query vectors", queries.len(), nq)?;
        let allow = self.allow_mask(&opts.filter);
        let lists = match opts.mode {
            Mode::Exact => exact::search(&self.parts(), dim, queries, k, allow.as_deref()),
            Mode::Approximate { ef } => queries
                .par_chunks(dim)
                .map(|q| self.search_ann(q, k, ef, allow.as_deref()))
                .collect::<Result<_>>()?,
            Mode::Quantized { shortlist } => queries
                .par_chunks(dim)
                .map(|q| self.search_quantized(q, k, shortlist, allow.as_deref()))
                .collect::<Result<_>>()?,
        };
        Ok(lists.into_iter().map(|c| self.hits(c)).collect())
    }

    /// The graph's candidates (live, passing the filter), re-scored with the
    /// `f32` rows, merged with an exact scan of the rows added after it.
    fn search_ann(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        allow: Option<&[bool]>,
    ) -> Result<Vec<Cand>> {
        let (Some(graph), Some(a)) = (&self.graph, &self.meta.ann) else {
            return Err(Error::NoAnn(self.dir.clone()));
        };
        if k == 0 {
            return Ok(Vec::new());
        }
        // Removed items' points (tombstones) and filtered-out items are
        // skipped inside the walk, so k live matches come back when they exist.
        let ok = |key: u64| -> bool {
            match self.by_key.get(&key) {
                Some(&row) => allow.is_none_or(|m| m[row]),
                None => false,
            }
        };
        let need_filter = allow.is_some() || !a.tombstones.is_empty();
        let found = graph
            .search(query, k, ef.max(k), need_filter.then_some(&ok as _))
            .map_err(|msg| Error::Ann {
                path: self.dir.join(&a.file),
                msg,
            })?;
        let mut top = exact::TopK::new(k);
        for key in found {
            if let Some(&row) = self.by_key.get(&key) {
                if let Some(v) = self.vector(row) {
                    top.push(Cand {
                        score: exact::dot(query, v),
                        row,
                    });
                }
            }
        }
        let mut lists = vec![top.into_sorted()];
        let tail = self.unindexed_start().unwrap_or(self.len());
        if tail < self.len() {
            let parts = self.tail_parts(tail);
            lists.extend(exact::search(&parts, self.dim(), query, k, allow));
        }
        Ok(exact::merge(lists, k))
    }

    /// The rows from `from` on, as row runs.
    fn tail_parts(&self, from: usize) -> Vec<Rows<'_>> {
        let dim = self.dim();
        self.parts()
            .into_iter()
            .filter_map(|p| {
                let rows = p.vectors.len() / dim;
                if p.first_row + rows <= from {
                    None
                } else if p.first_row >= from {
                    Some(p)
                } else {
                    let skip = from - p.first_row;
                    Some(Rows {
                        first_row: from,
                        vectors: &p.vectors[skip * dim..],
                    })
                }
            })
            .collect()
    }

    /// The int8 scan's best `shortlist` rows, re-scored with the `f32` rows.
    fn search_quantized(
        &self,
        query: &[f32],
        k: usize,
        shortlist: usize,
        allow: Option<&[bool]>,
    ) -> Result<Vec<Cand>> {
        if !self.meta.quantized {
            return Err(Error::NotQuantized(self.dir.clone()));
        }
        let dim = self.dim();
        let mut parts = Vec::with_capacity(self.segments.len());
        for (s, &first_row) in self.segments.iter().zip(&self.seg_start) {
            let q = s
                .int8
                .as_ref()
                .ok_or_else(|| Error::NotQuantized(self.dir.clone()))?;
            parts.push(quant::Codes {
                first_row,
                codes: q.codes(),
                scales: q.scales(),
            });
        }
        let short = quant::search(&parts, dim, query, shortlist.max(k), allow);
        let mut top = exact::TopK::new(k);
        for c in short {
            if let Some(v) = self.vector(c.row) {
                top.push(Cand {
                    score: exact::dot(query, v),
                    row: c.row,
                });
            }
        }
        Ok(top.into_sorted())
    }

    /// Writes the index as one Parquet file: id, kind, path, captions,
    /// metadata (JSON), vector (fixed-size list of f32).
    #[cfg(feature = "parquet")]
    pub fn export_parquet(&self, path: &Path) -> Result<()> {
        crate::parquet_export::export(self, path)
    }
}

/// `v` without the entries at `removed`.
fn without<T: Clone>(v: &[T], removed: &HashSet<usize>) -> Vec<T> {
    v.iter()
        .enumerate()
        .filter(|(r, _)| !removed.contains(r))
        .map(|(_, x)| x.clone())
        .collect()
}

/// Writes an int8 safetensors file from byte chunks of codes and scales.
fn write_int8(
    dir: &Path,
    name: &str,
    rows: usize,
    dim: usize,
    codes: Vec<&[u8]>,
    scales: Vec<&[u8]>,
) -> Result<()> {
    store::write_safetensors(
        dir,
        name,
        &[
            // Scales first: the f32 data then starts at the 8-aligned data offset.
            TensorOut {
                name: mapped::SCALES_TENSOR,
                dtype: Dtype::F32,
                shape: vec![rows],
                chunks: scales,
            },
            TensorOut {
                name: mapped::CODES_TENSOR,
                dtype: Dtype::I8,
                shape: vec![rows, dim],
                chunks: codes,
            },
        ],
    )
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Index>();
}
