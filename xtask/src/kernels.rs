//! `cargo xtask kernels`: compiles every `kernels/*.cu` to PTX with nvcc, so
//! that a syntax or type error in a kernel fails CI although no machine here
//! has a GPU (the kernels themselves only run on a lent one).
//!
//! nvcc 13.0 comes from NVIDIA's PyPI wheels (shared notes, cuda.md), unpacked
//! once into `${XDG_CACHE_HOME:-$HOME/.cache}/cots/cuda`; `CUDA_HOME` points at
//! another toolkit instead. Every warning is an error.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{exec, root};

const USAGE: &str = "\
cargo xtask kernels [--skip-without-toolkit] [FILE.cu...]

  Compiles every kernels/*.cu (or the given files) with `nvcc -arch=sm_90 -ptx -Werror all-warnings` into
  <target>/kernels/*.ptx. nvcc is $CUDA_HOME/bin/nvcc when CUDA_HOME is set, else the
  CUDA 13.0 wheels from PyPI, downloaded once into ${XDG_CACHE_HOME:-$HOME/.cache}/cots/cuda.

  --skip-without-toolkit   when the toolkit cannot be downloaded, warn and succeed (CI:
                           a registry hiccup must not fail the build; a kernel error does)
";

/// The CUDA 13.0 wheels that make a toolkit able to compile kernels to PTX
/// (nvcc, its front end and NVVM, the runtime headers, CCCL) plus NVRTC's
/// library for run-time compilation. Stay on 13.0.x: newer nvcc emits PTX that
/// the GPU machine's driver (580) rejects.
const WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cuda-nvrtc==13.0.88",
];

/// The architecture the kernels are checked for: Hopper (H100, H200).
pub const ARCH: &str = "sm_90";

pub fn run(args: &[String]) -> Result<()> {
    let mut skip_without_toolkit = false;
    let mut files = Vec::new();
    for arg in args {
        match arg.as_str() {
            "--skip-without-toolkit" => skip_without_toolkit = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(());
            }
            flag if flag.starts_with('-') => bail!("unknown option `{flag}`\n\n{USAGE}"),
            file => files.push(PathBuf::from(file)),
        }
    }
    let sources = if files.is_empty() {
        all_sources()?
    } else {
        files
    };
    let cuda_home = match toolkit() {
        Ok(dir) => dir,
        Err(err) if skip_without_toolkit => {
            eprintln!("warning: no CUDA toolkit, the kernels were not compiled: {err:#}");
            return Ok(());
        }
        Err(err) => return Err(err),
    };
    compile_all(&cuda_home, &sources)
}

/// Compiles every source and reports all failures together.
fn compile_all(cuda_home: &Path, sources: &[PathBuf]) -> Result<()> {
    if sources.is_empty() {
        eprintln!("no kernels/*.cu to compile");
        return Ok(());
    }
    let out_dir = target_dir().join("kernels");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut failed = Vec::new();
    for src in sources {
        let name = src.file_stem().unwrap_or_default();
        let ptx = out_dir.join(name).with_extension("ptx");
        let mut cmd = Command::new(cuda_home.join("bin").join("nvcc"));
        cmd.args(["-arch", ARCH, "-ptx", "-Werror", "all-warnings", "-o"])
            .arg(&ptx)
            .arg(src)
            .env("CUDA_HOME", cuda_home)
            .env("PATH", with_cuda_path(cuda_home));
        if let Err(err) = exec(cmd) {
            eprintln!("error: {err:#}");
            failed.push(src.display().to_string());
        }
    }
    if !failed.is_empty() {
        bail!("nvcc rejected {}", failed.join(", "));
    }
    eprintln!(
        "{} kernel(s) compiled for {ARCH} into {}",
        sources.len(),
        out_dir.display()
    );
    Ok(())
}

/// `kernels/*.cu`, sorted.
fn all_sources() -> Result<Vec<PathBuf>> {
    let dir = root().join("kernels");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "cu") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or `<root>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// `PATH` with the toolkit's `bin` first.
pub fn with_cuda_path(cuda_home: &Path) -> std::ffi::OsString {
    let mut paths = vec![cuda_home.join("bin")];
    if let Some(old) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&old));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

/// The CUDA toolkit's root: `$CUDA_HOME`, or the wheels' toolkit in the cache,
/// downloaded and unpacked on first use.
pub fn toolkit() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let home = PathBuf::from(home);
        if !home.join("bin").join("nvcc").is_file() {
            bail!("CUDA_HOME={} has no bin/nvcc", home.display());
        }
        return Ok(home);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .context("neither XDG_CACHE_HOME nor HOME is set")?
        .join("cots")
        .join("cuda");
    let home = cache.join("root").join("nvidia").join("cu13");
    // The marker is written last, so a half-unpacked toolkit is redone.
    let marker = cache.join("root").join(".complete");
    if marker.is_file() {
        return Ok(home);
    }
    download(&cache).context("downloading the CUDA 13.0 wheels from PyPI")?;
    std::fs::write(&marker, WHEELS.join("\n"))?;
    Ok(home)
}

fn download(cache: &Path) -> Result<()> {
    let wheels = cache.join("wheels");
    let unpacked = cache.join("root");
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "download", "--quiet", "--no-deps", "-d"])
        .arg(&wheels)
        .args(WHEELS);
    exec(pip)?;
    if unpacked.exists() {
        std::fs::remove_dir_all(&unpacked)
            .with_context(|| format!("removing {}", unpacked.display()))?;
    }
    for wheel in WHEELS {
        let (name, version) = wheel.split_once("==").context("wheel pin")?;
        let prefix = format!("{}-{version}-", name.replace('-', "_"));
        let file = std::fs::read_dir(&wheels)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
            })
            .with_context(|| format!("pip left no {prefix}*.whl in {}", wheels.display()))?;
        let mut unzip = Command::new("python3");
        unzip
            .args(["-m", "zipfile", "-e"])
            .arg(&file)
            .arg(&unpacked);
        exec(unzip)?;
    }
    // Wheels do not keep the executable bit.
    let home = unpacked.join("nvidia").join("cu13");
    for dir in ["bin", "bin/crt", "nvvm/bin"] {
        let dir = home.join(dir);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.is_file() {
                make_executable(&path)?;
            }
        }
    }
    if !home.join("bin").join("nvcc").is_file() {
        bail!("the wheels unpacked without {}/bin/nvcc", home.display());
    }
    Ok(())
}

#[cfg(unix)]
fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut perm = std::fs::metadata(path)?.permissions();
    perm.set_mode(perm.mode() | 0o755);
    std::fs::set_permissions(path, perm).with_context(|| format!("chmod {}", path.display()))
}

#[cfg(not(unix))]
fn make_executable(_: &Path) -> Result<()> {
    Ok(())
}
