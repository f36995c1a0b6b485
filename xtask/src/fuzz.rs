//! `cargo xtask fuzz`: runs the dataset parsers' fuzz targets (docs/fuzzing.md).
//!
//! Each target in `fuzz/fuzz_targets/` runs under libFuzzer for a bounded
//! time with `cargo +nightly fuzz run`, installing cargo-fuzz first when it
//! is missing. The committed seeds (`fuzz/corpus/<target>`) and crash
//! regressions (`fuzz/regressions/<target>`) are read but never written:
//! what the fuzzer finds grows `fuzz/corpus-work/<target>` (git-ignored), so
//! a run leaves the tree clean. Needs the nightly toolchain; `cargo xtask
//! ci` never runs this (the stable test `cots-data/tests/fuzz_corpus.rs`
//! replays the committed inputs instead).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::util::{exec, root};

const USAGE: &str = "\
cargo xtask fuzz [--seconds N] [--rss-mb M] [TARGET...]

  --seconds N   how long each target runs (default: 60)
  --rss-mb M    libFuzzer's memory limit; more is reported as an out-of-memory crash (default: 2048)
  TARGET        the targets to run (default: all of fuzz/fuzz_targets/)

Needs the nightly toolchain (`rustup toolchain install nightly`); installs cargo-fuzz
with `cargo +nightly install cargo-fuzz --locked` when it is missing. Crashes are saved
in fuzz/artifacts/<target>/; copy one into fuzz/regressions/<target>/ once fixed so the
stable tests replay it.
";

struct Args {
    seconds: u64,
    rss_mb: u64,
    targets: Vec<String>,
}

fn parse(args: &[String]) -> Result<Option<Args>> {
    let mut out = Args {
        seconds: 60,
        rss_mb: 2048,
        targets: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |flag: &str| -> Result<u64> {
            let v = it.next().with_context(|| format!("{flag} needs a value"))?;
            v.parse()
                .with_context(|| format!("{flag} {v}: not a whole number"))
        };
        match arg.as_str() {
            "--seconds" => out.seconds = value("--seconds")?,
            "--rss-mb" => out.rss_mb = value("--rss-mb")?,
            "-h" | "--help" => return Ok(None),
            flag if flag.starts_with('-') => bail!("unknown option `{flag}`\n\n{USAGE}"),
            target => out.targets.push(target.to_string()),
        }
    }
    if out.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    Ok(Some(out))
}

/// The fuzz targets: the stems of `fuzz/fuzz_targets/*.rs`, sorted.
fn targets(fuzz: &Path) -> Result<Vec<String>> {
    let dir = fuzz.join("fuzz_targets");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "rs") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                out.push(stem.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `cargo +nightly <args>`, through rustup's proxy so that `+nightly` works
/// even though `cargo xtask` itself runs under the stable cargo.
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .current_dir(root());
    cmd
}

/// Whether `cargo +nightly <args>` runs and succeeds, quietly.
fn works(args: &[&str]) -> bool {
    nightly_cargo()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Files and bytes of a corpus folder.
fn corpus_size(dir: &Path) -> Result<(usize, u64)> {
    let (mut files, mut bytes) = (0, 0);
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let meta = entry
            .and_then(|e| e.metadata())
            .with_context(|| format!("reading {}", dir.display()))?;
        if meta.is_file() {
            files += 1;
            bytes += meta.len();
        }
    }
    Ok((files, bytes))
}

pub fn run(args: &[String]) -> Result<()> {
    let Some(args) = parse(args)? else {
        print!("{USAGE}");
        return Ok(());
    };
    let fuzz = root().join("fuzz");
    let all = targets(&fuzz)?;
    let chosen = if args.targets.is_empty() {
        all.clone()
    } else {
        for t in &args.targets {
            if !all.contains(t) {
                bail!("no fuzz target `{t}` (there are: {})", all.join(", "));
            }
        }
        args.targets.clone()
    };
    if !works(&["--version"]) {
        bail!("`cargo +nightly` does not run: install the nightly toolchain with `rustup toolchain install nightly`");
    }
    if !works(&["fuzz", "--version"]) {
        let mut install = nightly_cargo();
        install.args(["install", "cargo-fuzz", "--locked"]);
        exec(install).context("installing cargo-fuzz")?;
    }

    let mut summary = Vec::new();
    let mut failed = Vec::new();
    for target in &chosen {
        let work = fuzz.join("corpus-work").join(target);
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let mut corpora: Vec<PathBuf> = vec![work.clone(), fuzz.join("corpus").join(target)];
        let regressions = fuzz.join("regressions").join(target);
        if regressions.is_dir() {
            corpora.push(regressions);
        }
        let mut cmd = nightly_cargo();
        cmd.args(["fuzz", "run", "--fuzz-dir"])
            .arg(&fuzz)
            .arg(target)
            .args(&corpora)
            .arg("--")
            .arg(format!("-max_total_time={}", args.seconds))
            .arg(format!("-rss_limit_mb={}", args.rss_mb))
            .arg(format!("-dict={}", fuzz.join("parsers.dict").display()))
            .args(["-timeout=10", "-print_final_stats=1"]);
        let start = Instant::now();
        let outcome = exec(cmd);
        let secs = start.elapsed().as_secs_f64();
        let (files, bytes) = corpus_size(&work)?;
        let verdict = match &outcome {
            Ok(()) => "no crash",
            Err(_) => "FAILED (see fuzz/artifacts/)",
        };
        summary.push(format!(
            "{target:<16} {secs:>7.1} s  working corpus {files:>5} files {bytes:>9} bytes  {verdict}"
        ));
        if outcome.is_err() {
            failed.push(target.clone());
        }
    }
    eprintln!(
        "\nfuzz summary ({} s a target; wall time includes building):",
        args.seconds
    );
    for line in &summary {
        eprintln!("  {line}");
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (the crashing inputs are in fuzz/artifacts/<target>/)",
            failed.join(", ")
        );
    }
    Ok(())
}
