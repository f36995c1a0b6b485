//! Reading PyTorch checkpoints (`torch.save` files of a state dict) into
//! named CPU tensors.
//!
//! Two formats exist. The zip archive of PyTorch 1.6 and later (`data.pkl`
//! plus one entry per storage) is read by candle's `pickle` module. The
//! legacy format, still found in older released weights (the EfficientNet
//! checkpoints among them), is a sequence of pickles in one stream: the
//! magic number `0x1950a86a20f9469cfc6c`, the protocol version (1001), a
//! `sys_info` dict, the state dict itself (tensors refer to their storages
//! through persistent ids `('storage', FloatStorage, key, location, numel,
//! ...)`), the list of storage keys, and then for each key a little-endian
//! `u64` element count followed by the raw little-endian elements. Both are
//! told apart by their first bytes (`PK\x03\x04` for zip).
//!
//! Every tensor of the top-level dict comes back with the dtype it was
//! stored in (`ByteStorage` and `BoolStorage` as `u8`), its storage offset,
//! shape and strides applied: views and non-contiguous tensors (transposed
//! weights, channels-last convolution kernels) come back as contiguous
//! copies. Entries that are not tensors (nested dicts, plain numbers) are
//! skipped; integer buffers such as BatchNorm's `num_batches_tracked` are
//! tensors and are returned (as `i64` scalars), callers drop them by name.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use candle_core::pickle::{self, Object, Stack};
use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The first pickle of a legacy file: `0x1950a86a20f9469cfc6c`, little-endian.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const LEGACY_PROTOCOL: i64 = 1001;
const ZIP_MAGIC: [u8; 4] = *b"PK\x03\x04";

/// Reads every tensor of the state dict saved at `path`, in no particular
/// order (candle's pickle reader reverses each batch of dict items).
///
/// Errors name the file and what was wrong with it: neither format, a
/// truncated storage, a storage dtype candle has no type for, a tensor that
/// reaches past its storage.
pub fn read_pth(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut r = BufReader::new(file);
    let head = r.fill_buf().map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if head.starts_with(&ZIP_MAGIC) {
        drop(r);
        read_zip(path)
    } else {
        read_legacy(&mut r).map_err(|message| Error::Format {
            path: path.to_path_buf(),
            message,
        })
    }
}

fn read_zip(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let format = |e: candle_core::Error| Error::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let infos = pickle::read_pth_tensor_info(path, false, None).map_err(format)?;
    let pth = pickle::PthTensors::new(path, None).map_err(format)?;
    let mut out = Vec::with_capacity(infos.len());
    for info in infos {
        let tensor = pth
            .get(&info.name)
            .map_err(|e| Error::Format {
                path: path.to_path_buf(),
                message: format!("tensor `{}`: {e}", info.name),
            })?
            .ok_or_else(|| Error::Format {
                path: path.to_path_buf(),
                message: format!("tensor `{}` vanished between two reads", info.name),
            })?;
        out.push((info.name, tensor));
    }
    Ok(out)
}

/// A tensor of the legacy state dict before its storage is read.
struct TensorRef {
    name: String,
    key: String,
    dtype: DType,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// What a storage's persistent id says about it.
#[derive(Clone, Copy)]
struct StorageInfo {
    dtype: DType,
    numel: usize,
}

type Msg<T> = std::result::Result<T, String>;

fn read_legacy<R: BufRead>(r: &mut R) -> Msg<Vec<(String, Tensor)>> {
    read_magic(r)?;
    let protocol = read_pickle(r, "protocol version")?;
    match protocol.clone().int_or_long() {
        Ok(LEGACY_PROTOCOL) => {}
        _ => {
            return Err(format!(
                "unsupported legacy protocol version {protocol:?} (expected {LEGACY_PROTOCOL})"
            ))
        }
    }
    let sys_info = read_pickle(r, "sys_info")?;
    if let Object::Dict(entries) = sys_info {
        let big_endian = entries.iter().any(|(k, v)| {
            *k == Object::Unicode("little_endian".into()) && *v == Object::Bool(false)
        });
        if big_endian {
            return Err("saved on a big-endian machine; only little-endian files are read".into());
        }
    }

    let main = read_pickle(r, "state dict")?;
    let Object::Dict(entries) = main else {
        return Err(format!(
            "the saved object is not a dict of tensors but {}",
            describe(&main)
        ));
    };
    let mut refs = Vec::new();
    let mut storages: HashMap<String, StorageInfo> = HashMap::new();
    for (name, value) in entries {
        // Keys that are not strings and values that are not tensors (the
        // state dict's `_metadata`, plain numbers) are not weights.
        let Object::Unicode(name) = name else {
            continue;
        };
        if let Some((tref, info)) = tensor_ref(name, value)? {
            storages.insert(tref.key.clone(), info);
            refs.push(tref);
        }
    }

    let keys = read_pickle(r, "storage key list")?;
    let Object::List(keys) = keys else {
        return Err(format!(
            "the storage key list is {} instead of a list",
            describe(&keys)
        ));
    };
    let mut data: HashMap<String, Vec<u8>> = HashMap::new();
    for key in keys {
        let Object::Unicode(key) = key else {
            return Err(format!("storage key {key:?} is not a string"));
        };
        let Some(info) = storages.get(&key).copied() else {
            return Err(format!(
                "storage `{key}` is used by no tensor of the state dict, so its element size is unknown"
            ));
        };
        let mut count = [0u8; 8];
        r.read_exact(&mut count)
            .map_err(|e| format!("truncated: the header of storage `{key}` is missing ({e})"))?;
        let count = u64::from_le_bytes(count) as usize;
        if count != info.numel {
            return Err(format!(
                "storage `{key}` holds {count} elements, its tensors announced {}",
                info.numel
            ));
        }
        let nbytes = count * info.dtype.size_in_bytes();
        let mut bytes = Vec::with_capacity(nbytes);
        let got = r
            .by_ref()
            .take(nbytes as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("storage `{key}`: {e}"))?;
        if got != nbytes {
            return Err(format!(
                "truncated: storage `{key}` needs {nbytes} bytes, the file ends after {got}"
            ));
        }
        data.insert(key, bytes);
    }

    let mut out = Vec::with_capacity(refs.len());
    for t in refs {
        let bytes = data.get(&t.key).ok_or_else(|| {
            format!(
                "storage `{}` of tensor `{}` is not in the file's storage list",
                t.key, t.name
            )
        })?;
        let es = t.dtype.size_in_bytes();
        let raw = gather(bytes, es, t.offset, &t.shape, &t.stride).ok_or_else(|| {
            format!(
                "tensor `{}` (offset {}, shape {:?}, stride {:?}) reaches past its storage of {} elements",
                t.name,
                t.offset,
                t.shape,
                t.stride,
                bytes.len() / es
            )
        })?;
        let tensor = Tensor::from_raw_buffer(&raw, t.dtype, &t.shape, &Device::Cpu)
            .map_err(|e| format!("tensor `{}`: {e}", t.name))?;
        out.push((t.name, tensor));
    }
    Ok(out)
}

/// Checks the magic-number pickle: PROTO n, LONG1 10 bytes, STOP. Read by
/// hand because candle's LONG1 decoder only takes up to 8 bytes.
fn read_magic<R: BufRead>(r: &mut R) -> Msg<()> {
    let mut head = [0u8; 15];
    r.read_exact(&mut head)
        .map_err(|_| "too short to be a torch.save file".to_string())?;
    let ok = head[0] == 0x80
        && head[2] == 0x8a
        && head[3] == 10
        && head[4..14] == LEGACY_MAGIC
        && head[14] == b'.';
    if ok {
        Ok(())
    } else {
        Err("neither a zip archive nor a legacy torch.save file (bad magic number)".into())
    }
}

/// Parses one pickle, up to and including its STOP opcode.
fn read_pickle<R: BufRead>(r: &mut R, what: &str) -> Msg<Object> {
    let mut stack = Stack::empty();
    stack
        .read_loop(r)
        .and_then(|()| stack.finalize())
        .map_err(|e| format!("truncated or malformed {what} pickle: {e}"))
}

fn describe(o: &Object) -> String {
    let s = format!("{o:?}");
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// The tensor a state-dict value rebuilds, or `None` when it is not a tensor.
///
/// Accepts `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
/// ...)` and the wrappers `_rebuild_parameter(tensor, ...)` and
/// `torch._tensor._rebuild_from_type_v2(fn, type, args, ...)`.
fn tensor_ref(name: String, value: Object) -> Msg<Option<(TensorRef, StorageInfo)>> {
    let Object::Reduce { callable, args } = value else {
        return Ok(None);
    };
    let (module, class) = match *callable {
        Object::Class {
            module_name,
            class_name,
        } => (module_name, class_name),
        _ => return Ok(None),
    };
    let bad = |what: &str| format!("tensor `{name}`: {what}");
    let Object::Tuple(mut args) = *args else {
        return Err(bad("rebuild arguments are not a tuple"));
    };
    match (module.as_str(), class.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2") => {}
        ("torch._utils", "_rebuild_parameter") if !args.is_empty() => {
            return tensor_ref(name, args.swap_remove(0));
        }
        ("torch._tensor", "_rebuild_from_type_v2") if args.len() >= 3 => {
            let inner = std::mem::replace(&mut args[0], Object::None);
            let inner_args = std::mem::replace(&mut args[2], Object::None);
            return tensor_ref(
                name,
                Object::Reduce {
                    callable: Box::new(inner),
                    args: Box::new(inner_args),
                },
            );
        }
        _ => return Ok(None),
    }
    if args.len() < 4 {
        return Err(bad("fewer than 4 rebuild arguments"));
    }
    let dims = |o: &Object, what: &str| -> Msg<Vec<usize>> {
        match o {
            Object::Tuple(v) => v
                .iter()
                .map(|d| match d.clone().int_or_long() {
                    Ok(d) if d >= 0 => Ok(d as usize),
                    _ => Err(bad(&format!("{what} {o:?} is not a tuple of sizes"))),
                })
                .collect(),
            _ => Err(bad(&format!("{what} {o:?} is not a tuple"))),
        }
    };
    let shape = dims(&args[2], "size")?;
    let stride = dims(&args[3], "stride")?;
    if shape.len() != stride.len() {
        return Err(bad("size and stride differ in rank"));
    }
    let offset = match args[1].clone().int_or_long() {
        Ok(o) if o >= 0 => o as usize,
        _ => return Err(bad("storage offset is not a non-negative integer")),
    };
    let Object::PersistentLoad(pid) = std::mem::replace(&mut args[0], Object::None) else {
        return Err(bad("storage is not a persistent id"));
    };
    let Object::Tuple(pid) = *pid else {
        return Err(bad("storage persistent id is not a tuple"));
    };
    if pid.len() < 5 || pid[0] != Object::Unicode("storage".into()) {
        return Err(bad(&format!("unexpected storage persistent id {pid:?}")));
    }
    let storage_type = match &pid[1] {
        Object::Class { class_name, .. } => class_name.clone(),
        other => return Err(bad(&format!("storage type {other:?} is not a class"))),
    };
    let dtype = storage_dtype(&storage_type)
        .ok_or_else(|| bad(&format!("unsupported storage dtype {storage_type}")))?;
    let key = match &pid[2] {
        Object::Unicode(k) => k.clone(),
        other => return Err(bad(&format!("storage key {other:?} is not a string"))),
    };
    let numel = match pid[4].clone().int_or_long() {
        Ok(n) if n >= 0 => n as usize,
        _ => return Err(bad("storage size is not a non-negative integer")),
    };
    Ok(Some((
        TensorRef {
            name,
            key,
            dtype,
            offset,
            shape,
            stride,
        },
        StorageInfo { dtype, numel },
    )))
}

/// The candle dtype of a PyTorch storage class; bools are bytes 0/1.
fn storage_dtype(class: &str) -> Option<DType> {
    Some(match class {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "ByteStorage" | "BoolStorage" => DType::U8,
        "ShortStorage" => DType::I16,
        "IntStorage" => DType::I32,
        "LongStorage" => DType::I64,
        _ => return None,
    })
}

/// Copies the `shape`/`stride` view at element `offset` of `storage` (bytes,
/// `es` per element) into row-major order; `None` if the view reaches past
/// the storage.
fn gather(
    storage: &[u8],
    es: usize,
    offset: usize,
    shape: &[usize],
    stride: &[usize],
) -> Option<Vec<u8>> {
    let numel: usize = shape.iter().product();
    if numel == 0 {
        return Some(Vec::new());
    }
    let last = shape.iter().zip(stride).try_fold(offset, |acc, (&d, &s)| {
        acc.checked_add((d - 1).checked_mul(s)?)
    })?;
    if (last + 1) * es > storage.len() {
        return None;
    }
    let contiguous = {
        let mut expected = 1;
        let mut ok = true;
        for (&d, &s) in shape.iter().zip(stride).rev() {
            if d != 1 && s != expected {
                ok = false;
            }
            expected *= d;
        }
        ok
    };
    if contiguous {
        return Some(storage[offset * es..(offset + numel) * es].to_vec());
    }
    let mut out = Vec::with_capacity(numel * es);
    let mut index = vec![0usize; shape.len()];
    for _ in 0..numel {
        let at: usize = offset + index.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(&storage[at * es..(at + 1) * es]);
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::gather;

    #[test]
    fn gather_follows_offset_and_strides() {
        // Storage 0..12 as bytes, element size 1.
        let s: Vec<u8> = (0..12).collect();
        assert_eq!(gather(&s, 1, 2, &[3], &[1]), Some(vec![2, 3, 4]));
        // The transpose of a 3x4 row-major matrix.
        assert_eq!(
            gather(&s, 1, 0, &[4, 3], &[1, 4]),
            Some(vec![0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11])
        );
        assert_eq!(gather(&s, 1, 0, &[], &[]), Some(vec![0]));
        assert_eq!(gather(&s, 1, 10, &[3], &[1]), None);
        assert_eq!(gather(&s, 2, 0, &[2, 3], &[3, 1]), Some(s.clone()));
    }
}
