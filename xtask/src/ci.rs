//! `cargo xtask ci`: the checks CI runs, cheapest first.

use anyhow::Result;

use crate::util::{cargo, exec};

pub fn run(_args: &[String]) -> Result<()> {
    crate::layers::run(&[])?;
    exec(cargo(["fmt", "--all", "--", "--check"]))?;
    exec(cargo([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    exec(cargo(["test", "--workspace"]))?;
    Ok(())
}
