//! The approximate path: an HNSW graph (usearch) keyed by the items' stable
//! keys, saved as one file and memory-mapped (`view`) when searched, so an
//! opened graph costs page cache, not heap.
//!
//! usearch was chosen over hnsw_rs by measuring both on the same clustered
//! data (docs/index-format.md, "Choosing the graph crate"): at equal recall
//! it searched several times faster, built faster and used a third of the
//! memory. Its inner-product metric is `1 - dot`; the index re-scores every
//! candidate with the `f32` rows anyway, so results carry exact dot products.

use std::path::Path;
use std::sync::{Condvar, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use usearch::{IndexOptions, MetricKind, ScalarKind};

use crate::exact::Rows;
use crate::{Error, Result};

/// Parameters of the HNSW graph.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnParams {
    /// Links per node (usearch's `connectivity`, HNSW's M).
    pub m: usize,
    /// Candidates kept while inserting (`expansion_add`).
    pub ef_construction: usize,
    /// Candidates kept while searching when the caller does not say
    /// (`Mode::Approximate { ef }` does).
    pub ef_search: usize,
}

impl Default for AnnParams {
    fn default() -> Self {
        Self {
            m: 16,
            ef_construction: 128,
            ef_search: 128,
        }
    }
}

impl AnnParams {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.m < 2 || self.ef_construction == 0 || self.ef_search == 0 {
            return Err(Error::Invalid(format!(
                "bad ANN parameters {self:?}: need m >= 2 and ef_construction, ef_search >= 1"
            )));
        }
        Ok(())
    }
}

/// A built or loaded graph.
pub(crate) struct Graph {
    index: usearch::Index,
    /// The `expansion_search` the graph is set to. Searches hold it for
    /// reading; changing it (another `ef`) takes it for writing, so a search
    /// never sees the setting change under it.
    ef: RwLock<usize>,
    /// usearch keeps one search context per thread it was sized for and
    /// fails a search that finds none free; callers beyond that wait here.
    slots: Slots,
}

/// A counting semaphore over usearch's search contexts.
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    /// usearch sizes a loaded graph for `std::thread::hardware_concurrency()`
    /// contexts; `available_parallelism` is never more.
    fn new() -> Self {
        Self {
            free: Mutex::new(std::thread::available_parallelism().map_or(1, |n| n.get())),
            freed: Condvar::new(),
        }
    }

    fn run<T>(&self, f: impl FnOnce() -> T) -> std::result::Result<T, String> {
        {
            let mut free = self.free.lock().map_err(|e| e.to_string())?;
            while *free == 0 {
                free = self.freed.wait(free).map_err(|e| e.to_string())?;
            }
            *free -= 1;
        }
        let out = f();
        let mut free = self.free.lock().map_err(|e| e.to_string())?;
        *free += 1;
        self.freed.notify_one();
        Ok(out)
    }
}

fn ann_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Ann {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| ann_err(path, "the path is not UTF-8 (usearch needs a UTF-8 path)"))
}

impl Graph {
    /// Inserts every row under its key, one at a time in row order.
    ///
    /// Sequential on purpose: usearch draws each point's level from a
    /// generator per thread context (seeded by the context's number) and
    /// links it to whatever is already in the graph, so parallel insertion
    /// makes the graph depend on thread timing. One thread, one context and
    /// a fixed order make two builds of the same rows with the same
    /// parameters byte-identical (docs/index-format.md, "Reproducible
    /// graphs"), at the cost of using one core while building.
    pub fn build(
        parts: &[Rows<'_>],
        keys: &[u64],
        dim: usize,
        params: &AnnParams,
        dir: &Path,
    ) -> Result<Graph> {
        let opts = IndexOptions {
            dimensions: dim,
            metric: MetricKind::IP,
            quantization: ScalarKind::F32,
            connectivity: params.m,
            expansion_add: params.ef_construction,
            expansion_search: params.ef_search,
            multi: false,
        };
        let index = usearch::Index::new(&opts).map_err(|e| ann_err(dir, e))?;
        index
            .reserve_capacity_and_threads(keys.len().max(1), 1)
            .map_err(|e| ann_err(dir, e))?;
        for p in parts {
            for (i, v) in p.vectors.chunks(dim).enumerate() {
                index
                    .add(keys[p.first_row + i], v)
                    .map_err(|e| ann_err(dir, e))?;
            }
        }
        Ok(Graph {
            index,
            ef: RwLock::new(params.ef_search),
            slots: Slots::new(),
        })
    }

    /// Writes the graph to `dir/name` atomically.
    pub fn save(&self, dir: &Path, name: &str) -> Result<()> {
        let path = dir.join(name);
        let tmp = crate::store::temp_in(dir)?;
        self.index
            .save(path_str(tmp.path())?)
            .map_err(|e| ann_err(&path, e))?;
        // usearch wrote through its own handle; reopen to flush it to disk.
        std::fs::File::open(tmp.path())
            .and_then(|f| f.sync_all())
            .map_err(Error::io(&path))?;
        tmp.persist(&path).map_err(|e| Error::Io {
            path: path.clone(),
            source: e.error,
        })?;
        Ok(())
    }

    /// Maps the graph in `path`, checking its header against what the index
    /// expects (usearch would otherwise read another layout as garbage).
    pub fn load(path: &Path, dim: usize, points: usize, ef_search: usize) -> Result<Graph> {
        let p = path_str(path)?;
        let meta = usearch::Index::metadata(p).map_err(|e| ann_err(path, e))?;
        if meta.dimensions != dim as u64
            || meta.metric != MetricKind::IP
            || meta.quantization != ScalarKind::F32
            || meta.multi
        {
            return Err(ann_err(
                path,
                format!(
                    "header says {} dimensions, metric {:?}, {:?} values, multi {}; \
                     expected {dim}, IP, F32, single",
                    meta.dimensions, meta.metric, meta.quantization, meta.multi
                ),
            ));
        }
        let index = usearch::Index::restore_view(p).map_err(|e| ann_err(path, e))?;
        if index.size() != points {
            return Err(ann_err(
                path,
                format!("holds {} points, index.json says {points}", index.size()),
            ));
        }
        index.change_expansion_search(ef_search);
        Ok(Graph {
            index,
            ef: RwLock::new(ef_search),
            slots: Slots::new(),
        })
    }

    /// Keys of up to `k` nearest points, keeping `ef` candidates, restricted
    /// to keys passing `ok` when given.
    pub fn search(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        ok: Option<&(dyn Fn(u64) -> bool + Sync)>,
    ) -> std::result::Result<Vec<u64>, String> {
        loop {
            {
                let current = self.ef.read().map_err(|e| e.to_string())?;
                if *current == ef {
                    let found = self.slots.run(|| match ok {
                        Some(f) => self.index.filtered_search(q, k, f),
                        None => self.index.search(q, k),
                    })?;
                    return found.map(|m| m.keys).map_err(|e| e.to_string());
                }
            }
            let mut current = self.ef.write().map_err(|e| e.to_string())?;
            if *current != ef {
                self.index.change_expansion_search(ef);
                *current = ef;
            }
        }
    }
}
