//! `cargo xtask speedup`: two-stream vs single-stream retrieval time.
//!
//! Builds and runs the `speedup` binary of the benches package in release
//! mode; every argument is passed through (`--help` lists them).

use anyhow::{bail, Result};

use crate::util::{cargo, exec, root};

/// Whether the comparison binary exists in this checkout.
pub fn available() -> bool {
    root().join("benches/src/bin/speedup.rs").exists()
}

pub fn run(args: &[String]) -> Result<()> {
    if !available() {
        bail!("benches/src/bin/speedup.rs is not in this checkout: the single-stream comparison is not built yet");
    }
    let mut cmd = cargo([
        "run",
        "--release",
        "-p",
        "cots-benches",
        "--bin",
        "speedup",
        "--",
    ]);
    cmd.args(args);
    exec(cmd)
}
