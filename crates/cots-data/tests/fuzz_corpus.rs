//! Replays the fuzz targets' committed inputs on the stable toolchain.
//!
//! Every file of `fuzz/corpus/<target>/` (the seeds) and of
//! `fuzz/regressions/<target>/` (inputs that once broke a parser) goes
//! through the same check the libFuzzer target runs
//! (`cots_data::fuzzing`), so a regression fails `cargo test` without
//! nightly or cargo-fuzz. Also checks that `fuzz/` and the list of checks
//! name the same targets.

use std::path::{Path, PathBuf};

use cots_data::fuzzing::{Check, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `dir`, sorted; none when it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.expect("a readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// Runs `check` on every file of `dir`, naming the file that panics.
fn replay(name: &str, check: Check, dir: &Path) -> usize {
    let inputs = files(dir);
    for path in &inputs {
        let data = std::fs::read(path).expect("a readable corpus file");
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "{name}: {} breaks the check (replay it with `cargo +nightly fuzz run {name} {}`)",
            path.display(),
            path.display()
        );
    }
    inputs.len()
}

#[test]
fn every_seed_passes_its_check() {
    for &(name, check) in TARGETS {
        let n = replay(name, check, &fuzz_dir().join("corpus").join(name));
        assert!(n >= 2, "fuzz/corpus/{name} holds {n} seeds, want a few");
    }
}

#[test]
fn every_crash_regression_passes_its_check() {
    for &(name, check) in TARGETS {
        let dir = fuzz_dir().join("regressions").join(name);
        // A missing folder must not pass as "nothing to replay".
        assert!(dir.is_dir(), "{} does not exist", dir.display());
        let n = replay(name, check, &dir);
        assert!(
            n >= 3,
            "fuzz/regressions/{name} holds {n} inputs, want the hostile set"
        );
    }
}

#[test]
fn fuzz_targets_and_checks_agree() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    let mut on_disk: Vec<String> = files(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter_map(|p| p.file_stem()?.to_str().map(str::to_string))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(
        on_disk, listed,
        "fuzz/fuzz_targets vs cots_data::fuzzing::TARGETS"
    );
    for name in &listed {
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no [[bin]] {name}"
        );
        let source = std::fs::read_to_string(fuzz_dir().join(format!("fuzz_targets/{name}.rs")))
            .expect("a fuzz target source");
        assert!(
            source.contains(&format!("check_{name}(")),
            "fuzz_targets/{name}.rs does not call check_{name}"
        );
    }
}
