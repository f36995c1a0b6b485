//! Read-only memory maps of the files an index has written: safetensors
//! segments (typed slices into the mapped bytes, never copied) and the packed
//! thumbnail file.
//!
//! The only `unsafe` of the crate is here. Mapping a file is sound as long as
//! nobody truncates or rewrites it while it is mapped; this crate never
//! modifies a file it has committed (new data goes to new files, thumbnails
//! are appended past the committed end), so only a foreign process editing
//! the index directory could break that.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

/// A whole file, mapped.
pub(crate) struct MappedFile {
    pub path: PathBuf,
    map: Option<Mmap>,
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(Error::io(path))?;
        let len = file.metadata().map_err(Error::io(path))?.len();
        // mmap of an empty file fails on Linux; an empty file maps to no bytes.
        let map = if len == 0 {
            None
        } else {
            // SAFETY: see the module doc: committed files are never modified.
            #[allow(unsafe_code)]
            Some(unsafe { Mmap::map(&file) }.map_err(Error::io(path))?)
        };
        Ok(Self {
            path: path.to_path_buf(),
            map,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

/// A tensor inside a mapped safetensors file: its byte range and shape.
pub(crate) struct MappedTensor {
    pub shape: Vec<usize>,
    start: usize,
    end: usize,
}

impl MappedTensor {
    /// Finds tensor `name` in `file`, checking its dtype and that its data
    /// lies inside the file and is aligned for `dtype`.
    pub fn find(file: &MappedFile, name: &str, dtype: Dtype) -> Result<Self> {
        let bytes = file.bytes();
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            Error::corrupt(&file.path, format!("not a valid safetensors file ({e})"))
        })?;
        let view = st
            .tensor(name)
            .map_err(|_| Error::corrupt(&file.path, format!("has no tensor `{name}`")))?;
        if view.dtype() != dtype {
            return Err(Error::corrupt(
                &file.path,
                format!("tensor `{name}` is {:?}, expected {dtype:?}", view.dtype()),
            ));
        }
        let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
        let end = start + view.data().len();
        let align = dtype.bitsize() / 8;
        if align > 1 && !(bytes.as_ptr() as usize + start).is_multiple_of(align) {
            return Err(Error::corrupt(
                &file.path,
                format!("tensor `{name}` is not aligned to {align} bytes"),
            ));
        }
        Ok(Self {
            shape: view.shape().to_vec(),
            start,
            end,
        })
    }

    pub fn bytes<'a>(&self, file: &'a MappedFile) -> &'a [u8] {
        &file.bytes()[self.start..self.end]
    }
}

/// One segment's rows: `f32 [rows, dim]`, and optionally its int8 codes.
pub(crate) struct Segment {
    pub rows: usize,
    vectors: MappedFile,
    vectors_t: MappedTensor,
    pub int8: Option<Int8Segment>,
}

/// Int8 codes `[rows, dim]` and their per-row scales `[rows]`.
pub(crate) struct Int8Segment {
    file: MappedFile,
    codes: MappedTensor,
    scales: MappedTensor,
}

pub(crate) const VECTORS_TENSOR: &str = "vectors";
pub(crate) const CODES_TENSOR: &str = "codes";
pub(crate) const SCALES_TENSOR: &str = "scales";

impl Segment {
    /// Maps `path` (and `int8`), checking that it holds `rows x dim` values.
    pub fn open(path: &Path, int8: Option<&Path>, rows: usize, dim: usize) -> Result<Self> {
        let vectors = MappedFile::open(path)?;
        let vectors_t = MappedTensor::find(&vectors, VECTORS_TENSOR, Dtype::F32)?;
        if vectors_t.shape != [rows, dim] {
            return Err(Error::corrupt(
                path,
                format!(
                    "`{VECTORS_TENSOR}` has shape {:?}, index.json expects [{rows}, {dim}]",
                    vectors_t.shape
                ),
            ));
        }
        let int8 = int8.map(|p| Int8Segment::open(p, rows, dim)).transpose()?;
        Ok(Self {
            rows,
            vectors,
            vectors_t,
            int8,
        })
    }

    /// All rows, `rows * dim` values.
    pub fn vectors(&self) -> &[f32] {
        // Alignment and length were checked when the segment was opened.
        bytemuck::try_cast_slice(self.vectors_t.bytes(&self.vectors)).unwrap_or(&[])
    }

    pub fn path(&self) -> &Path {
        &self.vectors.path
    }
}

impl Int8Segment {
    pub fn open(path: &Path, rows: usize, dim: usize) -> Result<Self> {
        let file = MappedFile::open(path)?;
        let codes = MappedTensor::find(&file, CODES_TENSOR, Dtype::I8)?;
        let scales = MappedTensor::find(&file, SCALES_TENSOR, Dtype::F32)?;
        if codes.shape != [rows, dim] || scales.shape != [rows] {
            return Err(Error::corrupt(
                path,
                format!(
                    "int8 codes {:?} and scales {:?} do not match [{rows}, {dim}]",
                    codes.shape, scales.shape
                ),
            ));
        }
        Ok(Self {
            file,
            codes,
            scales,
        })
    }

    pub fn codes(&self) -> &[i8] {
        bytemuck::cast_slice(self.codes.bytes(&self.file))
    }

    pub fn scales(&self) -> &[f32] {
        bytemuck::try_cast_slice(self.scales.bytes(&self.file)).unwrap_or(&[])
    }
}
