//! `Index::export_parquet`: one row per item with columns `id`, `kind`,
//! `path`, `captions` (list of strings), `metadata` (a JSON object as a
//! string) and `vector` (fixed-size list of `dim` f32), written in record
//! batches so that memory stays bounded, atomically (temp file + rename).

use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;

use crate::{Error, Index, Result};

/// Rows per record batch (and row group chunk).
const BATCH: usize = 8192;

pub(crate) fn export(index: &Index, path: &Path) -> Result<()> {
    let err = |msg: String| Error::Parquet {
        path: path.to_path_buf(),
        msg,
    };
    let dim = index.dim();
    let vector_item = Arc::new(Field::new("item", DataType::Float32, false));
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("path", DataType::Utf8, true),
        Field::new(
            "captions",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            true,
        ),
        Field::new("metadata", DataType::Utf8, false),
        Field::new(
            "vector",
            DataType::FixedSizeList(vector_item.clone(), dim as i32),
            false,
        ),
    ]));
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = crate::store::temp_in(dir)?;
    let mut writer = ArrowWriter::try_new(tmp.as_file(), schema.clone(), None)
        .map_err(|e| err(e.to_string()))?;
    let items = index.items();
    for start in (0..items.len()).step_by(BATCH) {
        let end = (start + BATCH).min(items.len());
        let part = &items[start..end];
        let mut captions = ListBuilder::new(StringBuilder::new());
        for it in part {
            for c in &it.captions {
                captions.values().append_value(c);
            }
            captions.append(true);
        }
        let metadata: Vec<String> = part
            .iter()
            .map(|it| serde_json::to_string(&it.metadata).map_err(|e| err(e.to_string())))
            .collect::<Result<_>>()?;
        let mut values = Vec::with_capacity(part.len() * dim);
        for row in start..end {
            let v = index
                .vector(row)
                .ok_or_else(|| err(format!("row {row} has no vector")))?;
            values.extend_from_slice(v);
        }
        let vectors = FixedSizeListArray::try_new(
            vector_item.clone(),
            dim as i32,
            Arc::new(Float32Array::from(values)),
            None,
        )
        .map_err(|e| err(e.to_string()))?;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(part.iter().map(|i| &i.id))),
            Arc::new(StringArray::from_iter_values(
                part.iter().map(|i| i.kind.as_str()),
            )),
            Arc::new(StringArray::from_iter(
                part.iter().map(|i| i.path.as_deref()),
            )),
            Arc::new(captions.finish()),
            Arc::new(StringArray::from(metadata)),
            Arc::new(vectors),
        ];
        let batch =
            RecordBatch::try_new(schema.clone(), columns).map_err(|e| err(e.to_string()))?;
        writer.write(&batch).map_err(|e| err(e.to_string()))?;
    }
    writer.close().map_err(|e| err(e.to_string()))?;
    tmp.as_file().sync_all().map_err(Error::io(path))?;
    tmp.persist(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}
