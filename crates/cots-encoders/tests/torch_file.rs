//! Reading `torch.save` files: the legacy stream format and the zip format,
//! against fixtures written by tests/fixtures/make_torch_fixtures.py.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use cots_encoders::torch_file::read_pth;
use cots_encoders::Error;

mod common;
use common::TestResult;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torch")
        .join(name)
}

fn f64s(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// The values make_torch_fixtures.py saves, whatever the format.
fn check_state(path: &Path) -> TestResult {
    let list = read_pth(path)?;
    let names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), 7, "{names:?}");
    let map: HashMap<String, Tensor> = list.into_iter().collect();
    let get = |n: &str| map.get(n).ok_or(format!("no `{n}` in {}", path.display()));

    let a = get("a")?;
    assert_eq!((a.dtype(), a.dims()), (DType::F32, &[2, 3][..]));
    assert_eq!(
        a.to_vec2::<f32>()?,
        vec![vec![0., 1., 2.], vec![3., 4., 5.]]
    );

    let b = get("b")?;
    assert_eq!(b.dtype(), DType::I64);
    assert_eq!(b.to_vec1::<i64>()?, vec![1, 2, 3]);

    // base = arange(10) * 0.5 - 1; c = base[3:7] (storage offset 3).
    let base: Vec<f32> = (0..10).map(|i| i as f32 * 0.5 - 1.0).collect();
    assert_eq!(get("base")?.to_vec1::<f32>()?, base);
    assert_eq!(get("c")?.to_vec1::<f32>()?, base[3..7].to_vec());

    // t = arange(12).reshape(3, 4).t(): shape [4, 3], stride (1, 4).
    let t = get("t")?;
    assert_eq!((t.dtype(), t.dims()), (DType::F64, &[4, 3][..]));
    let expected: Vec<f64> = (0..4)
        .flat_map(|i| (0..3).map(move |j| (j * 4 + i) as f64))
        .collect();
    assert_eq!(f64s(t)?, expected);

    let h = get("h")?;
    assert_eq!(h.dtype(), DType::F16);
    assert_eq!(f64s(h)?, vec![0.5, -2.0]);

    let n = get("n")?;
    assert_eq!((n.dtype(), n.dims()), (DType::I64, &[][..]));
    assert_eq!(n.to_scalar::<i64>()?, 7);
    Ok(())
}

#[test]
fn legacy_format_values_offsets_and_strides() -> TestResult {
    check_state(&fixture("legacy.pth"))
}

#[test]
fn zip_format_values_offsets_and_strides() -> TestResult {
    check_state(&fixture("zip.pth"))
}

#[test]
fn truncated_legacy_file_names_the_file_and_the_storage() -> TestResult {
    let bytes = std::fs::read(fixture("legacy.pth"))?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cut.pth");
    std::fs::write(&path, &bytes[..bytes.len() - 5])?;
    let err = read_pth(&path).expect_err("a truncated file must not load");
    let msg = err.to_string();
    assert!(matches!(err, Error::Format { .. }), "{msg}");
    assert!(
        msg.contains("cut.pth") && msg.contains("truncated"),
        "{msg}"
    );

    // Cut inside the state-dict pickle.
    std::fs::write(&path, &bytes[..200])?;
    let msg = read_pth(&path).expect_err("must fail").to_string();
    assert!(msg.contains("cut.pth") && msg.contains("pickle"), "{msg}");
    Ok(())
}

#[test]
fn not_a_checkpoint_and_missing_file_are_clear_errors() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("notes.pth");
    std::fs::write(&path, b"hello, this is not a checkpoint")?;
    let msg = read_pth(&path).expect_err("must fail").to_string();
    assert!(msg.contains("notes.pth") && msg.contains("magic"), "{msg}");

    let missing = dir.path().join("missing.pth");
    let err = read_pth(&missing).expect_err("must fail");
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("missing.pth"));
    Ok(())
}
