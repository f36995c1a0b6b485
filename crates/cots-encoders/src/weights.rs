//! Loading safetensors checkpoints into trainable variables.
//!
//! A model is built first (its `VarBuilder` over a [`VarMap`] creates every
//! variable with its init), then a checkpoint overwrites the variables by
//! name. This keeps the loaded weights trainable, which a `VarBuilder` over
//! the file itself would not. Every variable under the chosen prefix must be
//! found with the right shape (errors name the tensor and the file);
//! checkpoint tensors nobody asked for are reported, not fatal, because
//! Hugging Face checkpoints carry heads (pooler, MLM) the towers do not use.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::bert;
use crate::{Error, Result};
use cots_text::TextTokenizer;

/// What a load did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// VarMap names that were overwritten.
    pub loaded: Vec<String>,
    /// Checkpoint keys that matched no variable (sorted).
    pub unexpected: Vec<String>,
}

/// Reads every tensor of a safetensors file onto the CPU.
/// A `VarBuilder` over detached copies of `map`'s current values, for
/// inference. Modules built from it hold plain tensors, not variables, so
/// their forward passes record no autograd graph: each intermediate is freed
/// as soon as it is used (built from the `VarMap` itself, a ViT-B forward at
/// batch 32 keeps every layer's activations alive, gigabytes, until its
/// output is dropped).
pub fn frozen(map: &VarMap, dtype: DType, device: &Device) -> VarBuilder<'static> {
    let data = map.data().lock().unwrap_or_else(|e| e.into_inner());
    let tensors: HashMap<String, Tensor> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    VarBuilder::from_tensors(tensors, dtype, device)
}

pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
        });
    }
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Checkpoint keys that may hold the variable whose name (without the
/// VarMap prefix) is `key`: the key itself, each accepted file prefix before
/// it, and the TF-era `LayerNorm.gamma`/`beta` spellings of old BERT
/// checkpoints.
fn candidates(key: &str, file_prefixes: &[&str]) -> Vec<String> {
    let mut spellings = vec![key.to_string()];
    if let Some(stem) = key.strip_suffix("LayerNorm.weight") {
        spellings.push(format!("{stem}LayerNorm.gamma"));
    } else if let Some(stem) = key.strip_suffix("LayerNorm.bias") {
        spellings.push(format!("{stem}LayerNorm.beta"));
    }
    let mut out = spellings.clone();
    for p in file_prefixes {
        out.extend(spellings.iter().map(|s| format!("{p}{s}")));
    }
    out
}

/// Overwrites the variables of `varmap` whose names start with `var_prefix`
/// from the safetensors file at `path`.
///
/// The variable `"{var_prefix}{key}"` is read from the checkpoint key `key`,
/// or failing that `"{p}{key}"` for each `p` in `file_prefixes` (e.g.
/// `["bert."]`). Tensors are converted to the variable's dtype and device.
/// Variables outside `var_prefix` are untouched.
///
/// Errors: [`Error::MissingTensor`] or [`Error::ShapeMismatch`] naming the
/// key and the file; nothing is written unless every variable was found.
pub fn load_safetensors(
    varmap: &VarMap,
    path: &Path,
    var_prefix: &str,
    file_prefixes: &[&str],
) -> Result<LoadReport> {
    let tensors = read_safetensors(path)?;
    load_tensors(varmap, &tensors, path, var_prefix, file_prefixes)
}

/// [`load_safetensors`] over tensors already in memory; `origin` names
/// their file in errors.
pub fn load_tensors(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    origin: &Path,
    var_prefix: &str,
    file_prefixes: &[&str],
) -> Result<LoadReport> {
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| Error::Config("the VarMap lock is poisoned".into()))?;
    let mut names: Vec<&String> = vars.keys().filter(|n| n.starts_with(var_prefix)).collect();
    names.sort();
    // All lookups happen before any write so a failed load leaves the
    // model as it was.
    let mut plan = Vec::with_capacity(names.len());
    let mut used = BTreeSet::new();
    for name in names {
        let key = &name[var_prefix.len()..];
        let var = &vars[name];
        let found = candidates(key, file_prefixes)
            .into_iter()
            .find(|c| tensors.contains_key(c));
        let Some(file_key) = found else {
            return Err(Error::MissingTensor {
                name: key.to_string(),
                path: origin.to_path_buf(),
            });
        };
        let t = &tensors[&file_key];
        if t.dims() != var.dims() {
            return Err(Error::ShapeMismatch {
                name: file_key,
                path: origin.to_path_buf(),
                expected: var.dims().to_vec(),
                found: t.dims().to_vec(),
            });
        }
        plan.push((name.clone(), var.clone(), t));
        used.insert(file_key);
    }
    let mut report = LoadReport::default();
    for (name, var, t) in plan {
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        report.loaded.push(name);
    }
    let mut unexpected: Vec<String> = tensors
        .keys()
        .filter(|k| !used.contains(*k))
        .cloned()
        .collect();
    unexpected.sort();
    report.unexpected = unexpected;
    Ok(report)
}

/// A Hugging Face BERT-family model directory: `config.json`,
/// `model.safetensors` and `tokenizer.json` or `vocab.txt`.
#[derive(Clone, Debug)]
pub struct HfBertDir {
    pub dir: PathBuf,
    pub config: bert::Config,
    pub tokenizer: TextTokenizer,
    pub weights: PathBuf,
}

/// Checkpoint parts of Hugging Face BERT models that the text tower does not
/// have; they are dropped from [`LoadReport::unexpected`].
const IGNORED_PREFIXES: [&str; 4] = ["pooler.", "bert.pooler.", "cls.", "classifier."];
const IGNORED_KEYS: [&str; 2] = ["embeddings.position_ids", "bert.embeddings.position_ids"];

impl HfBertDir {
    /// Reads the config and tokenizer and locates the weights.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config = bert::Config::from_json_file(&dir.join("config.json"))?;
        let tokenizer = TextTokenizer::from_dir(&dir)?;
        let weights = dir.join("model.safetensors");
        if !weights.exists() {
            return Err(Error::Format {
                path: dir.clone(),
                message: "model.safetensors not found (PyTorch .bin checkpoints are not read; \
                          convert them to safetensors)"
                    .into(),
            });
        }
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(Error::Format {
                path: dir.clone(),
                message: format!(
                    "the tokenizer has {} tokens but config.json says vocab_size {}",
                    tokenizer.vocab_size(),
                    config.vocab_size
                ),
            });
        }
        Ok(Self {
            dir,
            config,
            tokenizer,
            weights,
        })
    }

    /// Fills the text tower's variables (those named `"{var_prefix}..."`,
    /// e.g. `"text."`) from `model.safetensors`, accepting keys with or
    /// without a `bert.` prefix. Pooler and head tensors are ignored.
    pub fn load_into(&self, varmap: &VarMap, var_prefix: &str) -> Result<LoadReport> {
        let mut report = load_safetensors(varmap, &self.weights, var_prefix, &["bert."])?;
        report.unexpected.retain(|k| {
            !IGNORED_KEYS.contains(&k.as_str())
                && !IGNORED_PREFIXES.iter().any(|p| k.starts_with(p))
        });
        Ok(report)
    }
}
