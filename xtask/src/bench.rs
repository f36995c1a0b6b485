//! `cargo xtask bench [--quick]`: criterion benchmarks plus the speedup comparison.
//!
//! The quick mode is what CI runs: short measurement windows and the tiny
//! speedup problem. It fails when a benchmark errors (a broken benchmark),
//! never because the machine is slow: nothing here compares a time to a bar.
//! When PyTorch is importable, the reference scripts in benches/reference/
//! run beside ours so that speed claims are ratios measured in one run.

use std::process::Command;

use anyhow::Result;

use crate::util::{cargo, exec, root};

pub fn run(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let criterion_args: &[&str] = if quick {
        &[
            "--warm-up-time",
            "0.5",
            "--measurement-time",
            "2",
            "--sample-size",
            "10",
        ]
    } else {
        &[
            "--warm-up-time",
            "2",
            "--measurement-time",
            "10",
            "--sample-size",
            "10",
        ]
    };
    let mut bench = cargo(["bench", "-p", "cots-benches", "--benches", "--"]);
    bench.args(criterion_args);
    if quick {
        bench.env("COTS_BENCH_QUICK", "1");
    }
    exec(bench)?;
    let speedup_args: Vec<String> = if quick {
        vec!["--quick".into()]
    } else {
        vec!["--preset".into(), "small".into()]
    };
    if crate::speedup::available() {
        crate::speedup::run(&speedup_args)?;
    } else {
        eprintln!("skipping the speedup comparison: benches/src/bin/speedup.rs is not built yet");
    }
    if !quick {
        run_pytorch_references()?;
    }
    Ok(())
}

/// Runs every benches/reference/*.py when `import torch` works; says so otherwise.
fn run_pytorch_references() -> Result<()> {
    let has_torch = Command::new("python3")
        .args(["-c", "import torch"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has_torch {
        eprintln!("PyTorch is not installed: skipping benches/reference/*.py");
        return Ok(());
    }
    let dir = root().join("benches/reference");
    let mut scripts: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "py"))
        .collect();
    scripts.sort();
    for script in scripts {
        let mut cmd = Command::new("python3");
        cmd.arg(&script);
        exec(cmd)?;
    }
    Ok(())
}
