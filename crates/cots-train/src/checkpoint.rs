//! How is a run saved so that nothing is lost on a crash or a full disk?
//!
//! A checkpoint is one safetensors file (every tensor: model, momentum model,
//! objective state, optimizer moments) plus a JSON sidecar (config, step, RNG
//! states, data position). Both are written to a temporary file in the same
//! directory, fsynced and renamed into place, and the JSON goes LAST: a
//! checkpoint without its JSON is incomplete and never picked up by
//! [`latest`]. Older checkpoints are deleted only after the new one is
//! complete, so a failed write always leaves the previous one intact.
//!
//! A checkpoint can still be damaged after it was written (a disk that filled
//! up under a copy, a file truncated by hand): [`latest`] checks that the
//! JSON parses and that the safetensors file is as long as its header says,
//! and [`load_latest`] also falls back when loading fails; both skip a
//! damaged checkpoint with a warning naming its file and take the newest
//! complete one before it.
//!
//! Tests kill a run while it writes a checkpoint by setting
//! [`PAUSE_ENV`] to a number of milliseconds: every checkpoint file then
//! waits that long between its fsynced temporary file and the rename.

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

/// The environment variable that makes every checkpoint file wait this many
/// milliseconds between its complete temporary file and the rename, so that
/// a test can kill a run in the middle of a checkpoint write. Unset (the
/// normal case), nothing waits.
pub const PAUSE_ENV: &str = "COTS_TEST_PAUSE_IN_CHECKPOINT_WRITE";

fn test_pause() -> Option<std::time::Duration> {
    let ms: u64 = std::env::var(PAUSE_ENV).ok()?.trim().parse().ok()?;
    Some(std::time::Duration::from_millis(ms))
}

/// Writes `bytes` to `path` atomically: a temporary file beside it
/// (`tempfile`, named `<file name>.<random>.tmp`), fsynced, persisted over
/// `path`, then the directory fsynced. The temporary file is removed on any
/// error; new files get the usual `0644` (`tempfile` would make them `0600`).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_pausing(path, bytes, None)
}

/// [`write_atomic`], sleeping `pause` after the temporary file is complete
/// and before the rename (the test hook of [`PAUSE_ENV`]).
fn write_atomic_pausing(
    path: &Path,
    bytes: &[u8],
    pause: Option<std::time::Duration>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!("{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o644));
    }
    let mut tmp = builder.tempfile_in(dir).map_err(io(dir))?;
    tmp.write_all(bytes).map_err(io(tmp.path()))?;
    tmp.as_file().sync_all().map_err(io(path))?;
    if let Some(p) = pause {
        std::thread::sleep(p);
    }
    tmp.persist(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    if let Ok(d) = std::fs::File::open(dir) {
        // Directory fsync makes the rename durable; not every filesystem supports it.
        let _ = d.sync_all();
    }
    Ok(())
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
    let pause = test_pause();
    write_atomic_pausing(&weights, &bytes, pause)?;
    let json = dir.join(format!("{}.json", stem(step)));
    let text = serde_json::to_vec_pretty(&with_float_bits(meta))
        .map_err(|e| Error::Checkpoint(e.to_string()))?;
    write_atomic_pausing(&json, &text, pause)?;
    prune(dir, keep_last.max(1))?;
    Ok(json)
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

/// The newest complete, undamaged checkpoint in `dir` (its JSON path).
///
/// A newer checkpoint whose JSON does not parse, or whose safetensors file
/// is shorter or longer than its header says, is skipped with a warning
/// naming the file and why; the one before it is taken instead.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    for (_, json) in list(dir)?.into_iter().rev() {
        match check(&json) {
            Ok(()) => return Ok(Some(json)),
            Err(why) => warn_skipped(&why),
        }
    }
    Ok(None)
}

/// Loads the newest checkpoint of `dir` that loads: `(json path, tensors,
/// meta)`. Like [`latest`], and a checkpoint whose files pass the cheap
/// checks but fail to load is skipped with a warning too.
#[allow(clippy::type_complexity)] // one use, and a struct would only name the tuple
pub fn load_latest(
    dir: &Path,
) -> Result<Option<(PathBuf, HashMap<String, Tensor>, serde_json::Value)>> {
    for (_, json) in list(dir)?.into_iter().rev() {
        match check(&json).and_then(|()| load(&json)) {
            Ok((tensors, meta)) => return Ok(Some((json, tensors, meta))),
            Err(why) => warn_skipped(&why),
        }
    }
    Ok(None)
}

fn warn_skipped(why: &Error) {
    tracing::warn!("skipping a damaged checkpoint, falling back to the one before it: {why}");
}

/// Whether the checkpoint of `json` is whole: its JSON parses as an
/// object, and its safetensors file holds exactly the bytes its header
/// declares (a truncated or partly copied file does not). Reads only
/// the JSON and the safetensors header, so it is cheap on large runs.
pub fn check(json: &Path) -> Result<()> {
    let damaged =
        |path: &Path, why: String| Error::Checkpoint(format!("{}: {why}", path.display()));
    let text = std::fs::read(json).map_err(io(json))?;
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&text)
        .map_err(|e| damaged(json, format!("not a JSON object ({e})")))?;
    let weights = json.with_extension("safetensors");
    let want = safetensors_len(&weights)?;
    let got = std::fs::metadata(&weights).map_err(io(&weights))?.len();
    if got != want {
        return Err(damaged(
            &weights,
            format!("{got} bytes on disk, but its header describes {want} (truncated?)"),
        ));
    }
    Ok(())
}

/// The length a safetensors file must have according to its header:
/// 8 bytes of header size, the JSON header, then every tensor's bytes.
fn safetensors_len(path: &Path) -> Result<u64> {
    use std::io::Read;
    let damaged = |why: String| Error::Checkpoint(format!("{}: {why}", path.display()));
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|e| damaged(format!("no safetensors header ({e})")))?;
    let n = u64::from_le_bytes(n);
    let on_disk = f.metadata().map_err(io(path))?.len();
    if n > on_disk.saturating_sub(8) {
        return Err(damaged(format!(
            "the header claims {n} bytes but the file has {on_disk} (truncated?)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| damaged(format!("the header is cut short ({e})")))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| damaged(format!("the header is not valid JSON ({e})")))?;
    let mut end = 0u64;
    for (name, t) in &header {
        if name == "__metadata__" {
            continue;
        }
        let stop = t["data_offsets"][1]
            .as_u64()
            .ok_or_else(|| damaged(format!("tensor `{name}` has no data offsets")))?;
        end = end.max(stop);
    }
    Ok(8 + n + end)
}

/// Removes what a killed save left behind: temporary files and weights
/// whose JSON never arrived. Called right after a save completed, when no
/// other write is under way in `dir`.
fn remove_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("step-") {
            continue;
        }
        let orphan = name.ends_with(".safetensors") && !path.with_extension("json").exists();
        if name.ends_with(".tmp") || orphan {
            // Best effort: a leftover costs disk space, never correctness.
            let _ = std::fs::remove_file(&path);
        }
    }
}

fn prune(dir: &Path, keep: usize) -> Result<()> {
    remove_leftovers(dir);
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

/// The key under which [`save`] records the exact bits of every float of a
/// checkpoint's record. serde_json, built without its `float_roundtrip`
/// feature, parses some 17-digit floats one unit in the last place off
/// (about one in ten in a test), and the state in the record (the adaptive
/// momentum filter's running statistics, the config) must come back bit for
/// bit for a resumed run to follow an uninterrupted one exactly.
const FLOAT_BITS: &str = "float_bits";

/// `meta` with [`FLOAT_BITS`]: a map from the JSON pointer of each float to
/// its bits in hex.
fn with_float_bits(meta: &serde_json::Value) -> serde_json::Value {
    fn walk(v: &serde_json::Value, at: &str, out: &mut serde_json::Map<String, serde_json::Value>) {
        match v {
            serde_json::Value::Number(n) if n.is_f64() => {
                if let Some(f) = n.as_f64() {
                    out.insert(at.to_string(), format!("{:016x}", f.to_bits()).into());
                }
            }
            serde_json::Value::Array(items) => {
                for (i, x) in items.iter().enumerate() {
                    walk(x, &format!("{at}/{i}"), out);
                }
            }
            serde_json::Value::Object(map) => {
                for (k, x) in map {
                    let k = k.replace('~', "~0").replace('/', "~1");
                    walk(x, &format!("{at}/{k}"), out);
                }
            }
            _ => {}
        }
    }
    let mut bits = serde_json::Map::new();
    walk(meta, "", &mut bits);
    let mut out = meta.clone();
    if let (false, Some(obj)) = (bits.is_empty(), out.as_object_mut()) {
        obj.insert(FLOAT_BITS.into(), bits.into());
    }
    out
}

/// Puts the exact floats of [`FLOAT_BITS`] back in place and removes it.
fn restore_float_bits(
    mut meta: serde_json::Value,
) -> std::result::Result<serde_json::Value, String> {
    let Some(bits) = meta.as_object_mut().and_then(|m| m.remove(FLOAT_BITS)) else {
        return Ok(meta);
    };
    let bits = bits
        .as_object()
        .ok_or_else(|| format!("`{FLOAT_BITS}` is not an object"))?
        .clone();
    for (at, hex) in bits {
        let value = hex
            .as_str()
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .map(f64::from_bits)
            .ok_or_else(|| format!("`{FLOAT_BITS}` holds a bad entry for `{at}`"))?;
        let slot = meta
            .pointer_mut(&at)
            .ok_or_else(|| format!("`{FLOAT_BITS}` names `{at}`, which the record lacks"))?;
        *slot = serde_json::Value::from(value);
    }
    Ok(meta)
}

/// Loads a checkpoint from its JSON path: `(tensors, meta)`.
pub fn load(json: &Path) -> Result<(HashMap<String, Tensor>, serde_json::Value)> {
    let text = std::fs::read_to_string(json).map_err(io(json))?;
    let meta: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", json.display())))?;
    let meta = restore_float_bits(meta)
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
    let mut h = fnv::FnvHasher::default();
    for n in names {
        std::hash::Hasher::write(&mut h, n.as_bytes());
        let v: Vec<f32> = tensors[n]
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        for x in v {
            std::hash::Hasher::write(&mut h, &x.to_le_bytes());
        }
    }
    Ok(format!("{:016x}", std::hash::Hasher::finish(&h)))
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
        // A non-empty directory where the weights should go makes the
        // rename fail like a full disk would, after the temporary file was
        // written; the temporary file must not stay behind.
        std::fs::create_dir_all(dir.path().join("step-00000002.safetensors/x")).unwrap();
        let e = save(
            dir.path(),
            2,
            &tensors(2.0),
            &serde_json::json!({"step": 2}),
            3,
        )
        .unwrap_err();
        assert!(e.to_string().contains("step-00000002"), "{e}");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
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

    fn truncate(path: &Path, by: u64) {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len - by).unwrap();
    }

    #[test]
    fn a_truncated_newest_checkpoint_falls_back_to_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        for step in [1, 2, 3] {
            let meta = serde_json::json!({"step": step});
            save(dir.path(), step, &tensors(step as f32), &meta, 5).unwrap();
        }
        assert!(check(&dir.path().join("step-00000003.json")).is_ok());
        // The weights of step 3 lose their last byte, the JSON of step 2 its end.
        truncate(&dir.path().join("step-00000003.safetensors"), 1);
        let why = check(&dir.path().join("step-00000003.json"))
            .unwrap_err()
            .to_string();
        assert!(
            why.contains("step-00000003.safetensors") && why.contains("truncated"),
            "{why}"
        );
        assert!(latest(dir.path())
            .unwrap()
            .unwrap()
            .ends_with("step-00000002.json"));
        truncate(&dir.path().join("step-00000002.json"), 3);
        let (json, t, meta) = load_latest(dir.path()).unwrap().unwrap();
        assert!(json.ends_with("step-00000001.json"), "{}", json.display());
        assert_eq!(meta["step"], 1);
        assert_eq!(t["model.w"].to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        // Only the header's first bytes left: still a clean refusal.
        truncate(&dir.path().join("step-00000001.safetensors"), 40);
        assert!(latest(dir.path()).unwrap().is_none());
        assert!(load_latest(dir.path()).unwrap().is_none());
    }

    #[test]
    fn a_save_removes_what_a_killed_save_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("step-00000004.safetensors.x1y2z3.tmp"),
            b"half",
        )
        .unwrap();
        std::fs::write(dir.path().join("step-00000004.safetensors"), b"x").unwrap();
        save(
            dir.path(),
            2,
            &tensors(2.0),
            &serde_json::json!({"step": 2}),
            3,
        )
        .unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["step-00000002.json", "step-00000002.safetensors"]);
    }

    #[test]
    fn floats_in_the_record_come_back_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = 0x1234_5678_9abc_def0u64;
        let vals: Vec<f64> = (0..5000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 11) as f64 / (1u64 << 53) as f64 * 3.7
            })
            .collect();
        // Nested, in an array, under a key with the pointer's special characters.
        let meta = serde_json::json!({"step": 1, "a/b~c": {"v": vals}, "n": 3});
        save(dir.path(), 1, &tensors(1.0), &meta, 2).unwrap();
        let (_, back) = load(&latest(dir.path()).unwrap().unwrap()).unwrap();
        assert_eq!(
            back, meta,
            "the record comes back without the bits it carried"
        );
        let bad = vals
            .iter()
            .zip(back["a/b~c"]["v"].as_array().unwrap())
            .filter(|(a, b)| a.to_bits() != b.as_f64().unwrap().to_bits())
            .count();
        assert_eq!(bad, 0);
    }

    #[test]
    fn hash_is_fnv1a_over_sorted_names_and_bytes() {
        // The value is stored in indexes, so it must never change: compare
        // with FNV-1a written out byte by byte.
        let t = tensors(1.25);
        let mut names: Vec<&String> = t.keys().collect();
        names.sort();
        let mut bytes = Vec::new();
        for n in names {
            bytes.extend_from_slice(n.as_bytes());
            for x in t[n].flatten_all().unwrap().to_vec1::<f32>().unwrap() {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
        }
        let want = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        assert_eq!(weights_hash(&t).unwrap(), format!("{want:016x}"));
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
