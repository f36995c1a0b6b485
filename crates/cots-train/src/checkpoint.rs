//! How is a run saved so that nothing is lost on a crash or a full disk?
//!
//! A checkpoint is one safetensors file (every tensor: model, momentum model,
//! objective state, optimizer moments) plus a JSON sidecar (config, step, RNG
//! states, data position). Both are written to a temporary file in the same
//! directory, fsynced and renamed into place, and the JSON goes LAST: a
//! checkpoint without its JSON is incomplete and never picked up by
//! [`latest`]. Older checkpoints are deleted only after the new one is
//! complete, so a failed write always leaves the previous one intact.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::{Error, Result};

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync dir).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        if let Ok(d) = std::fs::File::open(dir) {
            // Directory fsync makes the rename durable; not every filesystem supports it.
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn stem(step: u64) -> String {
    format!("step-{step:08}")
}

/// Saves a checkpoint for `step` in `dir` and keeps the newest `keep_last`.
pub fn save(
    dir: &Path,
    step: u64,
    tensors: &HashMap<String, Tensor>,
    meta: &serde_json::Value,
    keep_last: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let weights = dir.join(format!("{}.safetensors", stem(step)));
    let bytes = safetensors_bytes(tensors)
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", weights.display())))?;
    write_atomic(&weights, &bytes)?;
    let json = dir.join(format!("{}.json", stem(step)));
    let text = serde_json::to_vec_pretty(meta).map_err(|e| Error::Checkpoint(e.to_string()))?;
    write_atomic(&json, &text)?;
    prune(dir, keep_last.max(1))?;
    Ok(json)
}

/// Creates the output directory `out` of a single-model training command,
/// refusing one that already holds a model (`marker` and `weights` both
/// exist): a second run never replaces the first. A directory with the
/// marker but no weights is a run that stopped before its first save, which
/// holds nothing to lose, so it is reused. `what` names the model in the
/// error.
pub(crate) fn claim_output_dir(out: &Path, marker: &str, weights: &str, what: &str) -> Result<()> {
    if out.join(marker).exists() && out.join(weights).exists() {
        return Err(Error::Config(format!(
            "{} already holds {what}: choose another output directory or remove it",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(io(out))
}

/// Writes every variable of `map` to `weights`, then `meta` as JSON to
/// `record`, each atomically: a crash leaves the previous pair readable (a
/// crash between the two leaves new weights beside the previous record).
/// The single-file saves of `train-cross` and `decompose`.
pub(crate) fn save_model<M: serde::Serialize>(
    weights: &Path,
    map: &candle_nn::VarMap,
    record: &Path,
    meta: &M,
) -> Result<()> {
    let tensors: HashMap<String, Tensor> = crate::model::sorted_vars(map)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let bytes = safetensors_bytes(&tensors)
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", weights.display())))?;
    write_atomic(weights, &bytes)?;
    let text = serde_json::to_vec_pretty(meta).map_err(|e| Error::Checkpoint(e.to_string()))?;
    write_atomic(record, &text)
}

pub(crate) fn safetensors_bytes(tensors: &HashMap<String, Tensor>) -> candle_core::Result<Vec<u8>> {
    // candle writes through a path; serialise in memory so the atomic writer
    // owns every byte that reaches the disk.
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let views: Vec<(String, Tensor)> = names
        .into_iter()
        .map(|n| Ok((n.clone(), tensors[n].contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    safetensors::tensor::serialize(views.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(candle_core::Error::wrap)
}

/// Completed checkpoints in `dir` (those with their JSON), oldest first.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.strip_suffix(".json"))
        {
            if let Ok(step) = step.parse::<u64>() {
                if dir.join(format!("{}.safetensors", stem(step))).exists() {
                    out.push((step, dir.join(name)));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint in `dir` (its JSON path).
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(dir)?.pop().map(|(_, p)| p))
}

fn prune(dir: &Path, keep: usize) -> Result<()> {
    let all = list(dir)?;
    let n = all.len();
    for (step, json) in all.into_iter().take(n.saturating_sub(keep)) {
        // JSON first: a half-deleted checkpoint is then an incomplete one.
        std::fs::remove_file(&json).map_err(io(&json))?;
        let w = dir.join(format!("{}.safetensors", stem(step)));
        std::fs::remove_file(&w).map_err(io(&w))?;
    }
    Ok(())
}

/// Loads a checkpoint from its JSON path: `(tensors, meta)`.
pub fn load(json: &Path) -> Result<(HashMap<String, Tensor>, serde_json::Value)> {
    let text = std::fs::read_to_string(json).map_err(io(json))?;
    let meta: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", json.display())))?;
    let weights = json.with_extension("safetensors");
    let tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu)
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", weights.display())))?;
    Ok((tensors, meta))
}

/// The tensors whose names start with `prefix.`, with the prefix removed.
pub fn strip(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    let p = format!("{prefix}.");
    tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(&p).map(|s| (s.to_string(), v.clone())))
        .collect()
}

/// A short hash of tensors (names and bytes), FNV-1a 64: identifies the
/// weights an index or an embedding file was made with.
pub fn weights_hash(tensors: &HashMap<String, Tensor>) -> Result<String> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for n in names {
        eat(n.as_bytes());
        let v: Vec<f32> = tensors[n]
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        for x in v {
            eat(&x.to_le_bytes());
        }
    }
    Ok(format!("{h:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensors(v: f32) -> HashMap<String, Tensor> {
        [(
            "model.w".to_string(),
            Tensor::new(&[v, 2.0], &Device::Cpu).unwrap(),
        )]
        .into()
    }

    #[test]
    fn an_output_dir_is_refused_only_when_it_holds_a_saved_model() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        claim_output_dir(&out, "m.json", "m.safetensors", "a model").unwrap();
        // A run that wrote its config and then stopped before its first save.
        std::fs::write(out.join("m.json"), "{}").unwrap();
        claim_output_dir(&out, "m.json", "m.safetensors", "a model").unwrap();
        std::fs::write(out.join("m.safetensors"), "x").unwrap();
        let err = claim_output_dir(&out, "m.json", "m.safetensors", "a model")
            .unwrap_err()
            .to_string();
        assert!(err.contains("already holds a model"), "{err}");
    }

    #[test]
    fn saves_loads_and_keeps_the_last_n() {
        let dir = tempfile::tempdir().unwrap();
        for step in [10, 20, 30] {
            save(
                dir.path(),
                step,
                &tensors(step as f32),
                &serde_json::json!({"step": step}),
                2,
            )
            .unwrap();
        }
        let all = list(dir.path()).unwrap();
        assert_eq!(all.iter().map(|x| x.0).collect::<Vec<_>>(), vec![20, 30]);
        let (t, meta) = load(&latest(dir.path()).unwrap().unwrap()).unwrap();
        assert_eq!(meta["step"], 30);
        assert_eq!(t["model.w"].to_vec1::<f32>().unwrap(), vec![30.0, 2.0]);
        assert_eq!(
            strip(&t, "model")["w"].to_vec1::<f32>().unwrap(),
            vec![30.0, 2.0]
        );
    }

    #[test]
    fn a_failed_write_keeps_the_previous_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        save(
            dir.path(),
            1,
            &tensors(1.0),
            &serde_json::json!({"step": 1}),
            3,
        )
        .unwrap();
        // A directory where the temporary file should go makes the write fail
        // like a full disk would: after some checkpoint files exist.
        std::fs::create_dir(dir.path().join("step-00000002.tmp")).unwrap();
        let e = save(
            dir.path(),
            2,
            &tensors(2.0),
            &serde_json::json!({"step": 2}),
            3,
        )
        .unwrap_err();
        assert!(e.to_string().contains("step-00000002"), "{e}");
        let (t, meta) = load(&latest(dir.path()).unwrap().unwrap()).unwrap();
        assert_eq!(meta["step"], 1);
        assert_eq!(t["model.w"].to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn a_checkpoint_without_json_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), 5, &tensors(5.0), &serde_json::json!({}), 3).unwrap();
        std::fs::write(dir.path().join("step-00000009.safetensors"), b"partial").unwrap();
        assert!(latest(dir.path())
            .unwrap()
            .unwrap()
            .ends_with("step-00000005.json"));
    }

    #[test]
    fn hash_changes_with_the_weights() {
        assert_eq!(
            weights_hash(&tensors(1.0)).unwrap(),
            weights_hash(&tensors(1.0)).unwrap()
        );
        assert_ne!(
            weights_hash(&tensors(1.0)).unwrap(),
            weights_hash(&tensors(1.5)).unwrap()
        );
    }
}
