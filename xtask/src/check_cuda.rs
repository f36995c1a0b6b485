//! `cargo xtask check-cuda`: type-checks (and optionally lints or tests) the
//! `cuda` feature of cots-ops on a machine without a CUDA install.
//!
//! Stock candle-core 0.11.1 asks cudarc for `cuda-version-from-build-system`
//! and `dynamic-linking` (link-time `-lcuda`, which the PyPI wheels do not
//! ship) and candle-kernels links the shared cudart. As in the shared notes
//! (cuda.md; upstream candle issue 3900 / PR 3916), a copy of both crates'
//! registry sources is patched to `cuda-13000` + `dynamic-loading` and a
//! static cudart, and handed to cargo with `--config patch.crates-io...`, so
//! no third-party source is committed. Cargo rewrites Cargo.lock for the
//! patch; the original is put back afterwards.
//!
//! Slow: the first run builds candle's own kernels with nvcc (about 10
//! minutes on 2 cores). Not part of `cargo xtask ci`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::kernels::{target_dir, toolkit, with_cuda_path};
use crate::util::{cargo, exec, root};

const USAGE: &str = "\
cargo xtask check-cuda [--clippy] [--test]

  cargo check -p cots-ops --features cuda --tests, against candle patched as in the
  shared notes (cuda.md), with nvcc from the CUDA 13.0 wheels (see `cargo xtask kernels`).

  --clippy   also cargo clippy -p cots-ops --features cuda --all-targets -- -D warnings
  --test     also cargo test -p cots-ops --features cuda (the GPU tests skip without a GPU;
             the NVRTC test needs libnvrtc on LD_LIBRARY_PATH, which this sets)
";

/// The patched crates, with the edits that make them build without a CUDA
/// install: (crate, file, original text, replacement).
const EDITS: &[(&str, &str, &str, &str)] = &[
    (
        "candle-core",
        "Cargo.toml",
        "\"cuda-version-from-build-system\"",
        "\"cuda-13000\"",
    ),
    (
        "candle-core",
        "Cargo.toml",
        "\"dynamic-linking\"",
        "\"dynamic-loading\"",
    ),
    (
        "candle-kernels",
        "build.rs",
        "println!(\"cargo:rustc-link-lib=dylib=cudart\");",
        "println!(\"cargo:rustc-link-search=native={}/lib\", std::env::var(\"CUDA_HOME\").unwrap_or_default()); \
         println!(\"cargo:rustc-link-lib=static=cudart_static\"); \
         println!(\"cargo:rustc-link-lib=dylib=dl\"); \
         println!(\"cargo:rustc-link-lib=dylib=rt\");",
    ),
];

pub fn run(args: &[String]) -> Result<()> {
    let (mut clippy, mut test) = (false, false);
    for arg in args {
        match arg.as_str() {
            "--clippy" => clippy = true,
            "--test" => test = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown option `{other}`\n\n{USAGE}"),
        }
    }
    let cuda_home = toolkit()?;
    exec(cargo(["fetch"]))?;
    let patch_dir = target_dir().join("cuda-patch");
    let mut config = Vec::new();
    for name in ["candle-core", "candle-kernels"] {
        let dir = patched_copy(name, &patch_dir)?;
        config.push("--config".to_string());
        config.push(format!(
            "patch.crates-io.{name}.path={:?}",
            dir.to_string_lossy()
        ));
    }

    let lock = root().join("Cargo.lock");
    let saved = std::fs::read(&lock).with_context(|| format!("reading {}", lock.display()))?;
    let result = (|| -> Result<()> {
        // The `--config` flags go right after the subcommand, before any `--`.
        let run_cargo = |args: &[&str]| -> Result<()> {
            let (sub, rest) = args.split_first().context("cargo subcommand")?;
            let mut cmd = cargo([sub]);
            cmd.args(&config)
                .args(rest)
                .env("CUDA_HOME", &cuda_home)
                .env("PATH", with_cuda_path(&cuda_home))
                .env("CUDA_COMPUTE_CAP", "90")
                .env("LD_LIBRARY_PATH", library_path(&cuda_home));
            exec(cmd)
        };
        run_cargo(&["check", "-p", "cots-ops", "--features", "cuda", "--tests"])?;
        if clippy {
            run_cargo(&[
                "clippy",
                "-p",
                "cots-ops",
                "--features",
                "cuda",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])?;
        }
        if test {
            run_cargo(&["test", "-p", "cots-ops", "--features", "cuda"])?;
        }
        Ok(())
    })();
    std::fs::write(&lock, saved).with_context(|| format!("restoring {}", lock.display()))?;
    result
}

/// `LD_LIBRARY_PATH` with the toolkit's `lib` first (libnvrtc for the NVRTC test).
fn library_path(cuda_home: &Path) -> std::ffi::OsString {
    let mut paths = vec![cuda_home.join("lib")];
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        paths.extend(std::env::split_paths(&old));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

/// A copy of the locked version of `name` from cargo's registry sources in
/// `patch_dir/<name>`, with [`EDITS`] applied. An existing copy with the same
/// contents is kept as it is: cargo fingerprints path crates by file times,
/// and a fresh copy would rebuild candle's kernels (minutes of nvcc).
fn patched_copy(name: &str, patch_dir: &Path) -> Result<PathBuf> {
    let version = locked_version(name)?;
    let src = registry_source(name, &version)?;
    let dst = patch_dir.join(name);
    let staging = patch_dir.join(format!("{name}.new"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("removing {}", staging.display()))?;
    }
    copy_dir(&src, &staging)?;
    for (krate, file, from, to) in EDITS.iter().filter(|e| e.0 == name) {
        let path = staging.join(file);
        let text = std::fs::read_to_string(&path)?;
        if !text.contains(from) {
            bail!(
                "{krate} {version}: {file} no longer contains {from}; update the patch in xtask/src/check_cuda.rs"
            );
        }
        std::fs::write(&path, text.replace(from, to))?;
    }
    if dst.exists() && same_tree(&staging, &dst)? {
        std::fs::remove_dir_all(&staging)?;
    } else {
        if dst.exists() {
            std::fs::remove_dir_all(&dst).with_context(|| format!("removing {}", dst.display()))?;
        }
        std::fs::rename(&staging, &dst)
            .with_context(|| format!("renaming {} to {}", staging.display(), dst.display()))?;
    }
    Ok(dst)
}

/// Whether every file under `a` exists under `b` with the same bytes, and the
/// other way round.
fn same_tree(a: &Path, b: &Path) -> Result<bool> {
    let (fa, fb) = (files(a, a)?, files(b, b)?);
    if fa != fb {
        return Ok(false);
    }
    for rel in &fa {
        if std::fs::read(a.join(rel))? != std::fs::read(b.join(rel))? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The files under `dir`, relative to `base`, sorted.
fn files(base: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            out.extend(files(base, &entry.path())?);
        } else {
            out.push(entry.path().strip_prefix(base)?.to_path_buf());
        }
    }
    out.sort();
    Ok(out)
}

/// The version of `name` in Cargo.lock.
fn locked_version(name: &str) -> Result<String> {
    let lock = std::fs::read_to_string(root().join("Cargo.lock"))?;
    let needle = format!("name = \"{name}\"\nversion = \"");
    let start = lock
        .find(&needle)
        .with_context(|| format!("{name} is not in Cargo.lock"))?
        + needle.len();
    let len = lock[start..]
        .find('"')
        .context("Cargo.lock: unterminated version")?;
    Ok(lock[start..start + len].to_string())
}

/// `$CARGO_HOME/registry/src/<index>/<name>-<version>`.
fn registry_source(name: &str, version: &str) -> Result<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let src = cargo_home.join("registry").join("src");
    for index in std::fs::read_dir(&src).with_context(|| format!("reading {}", src.display()))? {
        let dir = index?.path().join(format!("{name}-{version}"));
        if dir.join("Cargo.toml").is_file() {
            return Ok(dir);
        }
    }
    bail!(
        "{name}-{version} is not in {} (cargo fetch?)",
        src.display()
    )
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dst = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &dst)?;
        } else {
            std::fs::copy(entry.path(), &dst)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}
