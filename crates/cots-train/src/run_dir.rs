//! Where does a run keep its files?
//!
//! [`RunDir`] owns the layout of a run folder: it is the only code that
//! names the files in it. Every training task writes the same core (the
//! config, the tokenizer, `checkpoints/`, `metrics.jsonl`, `plot.svg`) and
//! adds its own serving files:
//!
//! | file | written by | read by |
//! |---|---|---|
//! | `config.toml` | every task (the data and image transform) | resume, `Run::open` |
//! | `tokenizer.json` | every task | every reader |
//! | `checkpoints/step-N.{safetensors,json}` | the loop | resume, `Run::open` (COTS) |
//! | `metrics.jsonl`, `plot.svg` | the loop | people, `cots plot` |
//! | `model.json` | COTS | `Run::open` |
//! | `cross.json`, `cross.safetensors` | the cross-encoder | `CrossRun::open` |
//! | `decomposed.json`, `decomposed.safetensors`, `decompose.json` | the decomposition | `Run::open` |
//! | `eval.json`, `eval.md` | `cots demo` (the test split's report) | people |
//!
//! Every file is written atomically (`tempfile`'s persist): a crash leaves
//! the previous version or none, never half of one.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::RunConfig;
use crate::{checkpoint, Error, Result};

const CONFIG: &str = "config.toml";
const MODEL: &str = "model.json";
const CHECKPOINTS: &str = "checkpoints";
const METRICS: &str = "metrics.jsonl";
const PLOT: &str = "plot.svg";
const CROSS_CONFIG: &str = "cross.json";
const CROSS_WEIGHTS: &str = "cross.safetensors";
const DECOMPOSED_CONFIG: &str = "decomposed.json";
const DECOMPOSED_WEIGHTS: &str = "decomposed.safetensors";
const DECOMPOSE_RECORD: &str = "decompose.json";
const EVAL_JSON: &str = "eval.json";
const EVAL_MARKDOWN: &str = "eval.md";

/// What a run folder holds, by the serving files present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunKind {
    /// A two-stream COTS run (`model.json` and checkpoints).
    Cots,
    /// A single-stream cross-encoder (`cross.json`).
    Cross,
    /// A decomposed single-stream model (`decomposed.json`).
    Decomposed,
}

/// A run folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// The run folder at `root` (nothing is read or created).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The run folder at `root`, created with its parents when missing.
    pub fn create(root: impl Into<PathBuf>) -> Result<Self> {
        let dir = Self::new(root);
        std::fs::create_dir_all(&dir.root).map_err(|source| Error::Io {
            path: dir.root.clone(),
            source,
        })?;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The run config: data, image transform, model, objectives.
    pub fn config(&self) -> PathBuf {
        self.root.join(CONFIG)
    }
    /// The two-stream model's architecture.
    pub fn model_config(&self) -> PathBuf {
        self.root.join(MODEL)
    }
    /// The folder of the loop's checkpoints.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join(CHECKPOINTS)
    }
    /// One JSON record per logged step.
    pub fn metrics(&self) -> PathBuf {
        self.root.join(METRICS)
    }
    /// The loss curves drawn at the end of a run.
    pub fn plot(&self) -> PathBuf {
        self.root.join(PLOT)
    }
    /// The cross-encoder's record (model config, training config, step).
    pub fn cross_config(&self) -> PathBuf {
        self.root.join(CROSS_CONFIG)
    }
    pub fn cross_weights(&self) -> PathBuf {
        self.root.join(CROSS_WEIGHTS)
    }
    /// The decomposed model's architecture.
    pub fn decomposed_config(&self) -> PathBuf {
        self.root.join(DECOMPOSED_CONFIG)
    }
    pub fn decomposed_weights(&self) -> PathBuf {
        self.root.join(DECOMPOSED_WEIGHTS)
    }
    /// The decomposition's training record (source, step, loss).
    pub fn decompose_record(&self) -> PathBuf {
        self.root.join(DECOMPOSE_RECORD)
    }

    /// The test-split retrieval report the demo writes, as JSON.
    pub fn eval_json(&self) -> PathBuf {
        self.root.join(EVAL_JSON)
    }
    /// The same report as a Markdown table.
    pub fn eval_markdown(&self) -> PathBuf {
        self.root.join(EVAL_MARKDOWN)
    }

    /// What the folder holds, or `None` when it holds no model yet.
    pub fn kind(&self) -> Option<RunKind> {
        if self.decomposed_config().exists() {
            Some(RunKind::Decomposed)
        } else if self.cross_config().exists() {
            Some(RunKind::Cross)
        } else if self.model_config().exists() {
            Some(RunKind::Cots)
        } else {
            None
        }
    }

    /// The newest complete, undamaged checkpoint (its JSON path).
    pub fn latest_checkpoint(&self) -> Result<Option<PathBuf>> {
        checkpoint::latest(&self.checkpoints())
    }

    /// Whether any checkpoint, complete or not, is in the folder.
    pub fn has_checkpoints(&self) -> Result<bool> {
        Ok(!checkpoint::list(&self.checkpoints())?.is_empty())
    }

    /// Writes the run config.
    pub fn write_config(&self, cfg: &RunConfig) -> Result<()> {
        checkpoint::write_atomic(&self.config(), cfg.to_toml()?.as_bytes())
    }

    /// Reads the run config.
    pub fn read_config(&self) -> Result<RunConfig> {
        RunConfig::load(&self.config())
    }

    /// Writes `value` as pretty JSON to `path` (one of this folder's files).
    pub fn write_json<T: Serialize>(&self, path: &Path, value: &T) -> Result<()> {
        let text = serde_json::to_vec_pretty(value).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        checkpoint::write_atomic(path, &text)
    }

    /// Reads JSON written by [`Self::write_json`]; errors name the file.
    pub fn read_json<T: serde::de::DeserializeOwned>(&self, path: &Path) -> Result<T> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_follows_the_serving_files_and_json_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = RunDir::create(tmp.path().join("a/b")).unwrap();
        assert_eq!(dir.kind(), None);
        dir.write_json(&dir.model_config(), &serde_json::json!({"x": 1}))
            .unwrap();
        assert_eq!(dir.kind(), Some(RunKind::Cots));
        dir.write_json(&dir.cross_config(), &serde_json::json!({"y": [1, 2]}))
            .unwrap();
        assert_eq!(dir.kind(), Some(RunKind::Cross));
        let back: serde_json::Value = dir.read_json(&dir.cross_config()).unwrap();
        assert_eq!(back["y"][1], 2);
        std::fs::write(dir.decomposed_config(), b"{").unwrap();
        assert_eq!(dir.kind(), Some(RunKind::Decomposed));
        let err = dir
            .read_json::<serde_json::Value>(&dir.decomposed_config())
            .unwrap_err()
            .to_string();
        assert!(err.contains("decomposed.json"), "{err}");
        assert!(!dir.has_checkpoints().unwrap());
    }
}
