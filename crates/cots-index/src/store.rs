//! Atomic file writes: a temp file in the target directory, fsync, rename,
//! fsync of the directory. Safetensors files are streamed from borrowed
//! chunks (old mapped rows followed by new ones), so rewriting a segment never
//! holds it whole in RAM.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use crate::{Error, Result};

/// One tensor to write: its data given as consecutive byte chunks.
pub(crate) struct TensorOut<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub chunks: Vec<&'a [u8]>,
}

/// A temp file in `dir` with the permissions an ordinary new file gets
/// (tempfile's default, 0600, would hide the index from other users).
pub(crate) fn temp_in(dir: &Path) -> Result<tempfile::NamedTempFile> {
    let mut b = tempfile::Builder::new();
    b.prefix(".tmp-");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(std::fs::Permissions::from_mode(0o644));
    }
    b.tempfile_in(dir).map_err(Error::io(dir))
}

/// Writes `dir/name` atomically with `write` filling the file.
pub(crate) fn write_atomic(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut BufWriter<&File>) -> std::io::Result<()>,
) -> Result<()> {
    let path = dir.join(name);
    let tmp = temp_in(dir)?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
        write(&mut w).map_err(Error::io(&path))?;
        w.flush().map_err(Error::io(&path))?;
    }
    tmp.as_file().sync_all().map_err(Error::io(&path))?;
    tmp.persist(&path).map_err(|e| Error::Io {
        path: path.clone(),
        source: e.error,
    })?;
    Ok(())
}

/// Makes the renames in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(dir))
}

/// Writes a safetensors file `dir/name` holding `tensors`, in the given order.
pub(crate) fn write_safetensors(dir: &Path, name: &str, tensors: &[TensorOut<'_>]) -> Result<()> {
    let path = dir.join(name);
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0;
    for t in tensors {
        let n: usize = t.chunks.iter().map(|c| c.len()).sum();
        let expected = t.shape.iter().product::<usize>() * t.dtype.bitsize() / 8;
        if n != expected {
            return Err(Error::Invalid(format!(
                "{}: tensor `{}` of shape {:?} got {n} bytes, expected {expected}",
                path.display(),
                t.name,
                t.shape
            )));
        }
        infos.push((
            t.name.to_string(),
            TensorInfo {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data_offsets: (offset, offset + n),
            },
        ));
        offset += n;
    }
    let meta = Metadata::new(None, infos)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    let mut header = serde_json::to_vec(&meta)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    // The safetensors convention: pad the header with spaces to 8 bytes, so
    // that the data (and each f32 tensor placed first) is aligned.
    header.resize(header.len().next_multiple_of(8), b' ');
    write_atomic(dir, name, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for t in tensors {
            for c in &t.chunks {
                w.write_all(c)?;
            }
        }
        Ok(())
    })
}
