//! `cargo xtask`: how the project is built, checked and benchmarked.
//!
//! One file per command; anyhow throughout; few dependencies (serde_json to
//! read tools' JSON, atomic-write-file for downloads) so that `cargo xtask`
//! itself builds in seconds.

mod bench;
mod check_cuda;
mod ci;
mod data;
mod fuzz;
mod kernels;
mod layers;
mod speedup;
mod util;

use anyhow::{bail, Result};

const HELP: &str = "\
cargo xtask <command> [args]

Commands:
  ci                 layers, fmt check, clippy -D warnings, then the whole test suite (cheapest first)
  layers             fails when a crate's library depends on a crate outside its layer
                     (the allowed edges are listed in xtask/src/layers.rs)
  bench [--quick]    criterion benchmarks and the speedup comparison; --quick is the
                     few-minute version CI runs (fails on a broken benchmark, never on a slow machine)
  speedup [args]     two-stream vs single-stream retrieval time (the paper's 10,800x claim);
                     args go to the speedup binary (try `cargo xtask speedup --help`)
  data emoji [args]  download, verify and build the multi-style emoji retrieval benchmark
                     into data/emoji (try `cargo xtask data emoji --help`)
  data emoji-video [args]
                     the same for the animated emoji text-to-video benchmark (data/emoji-video)
  kernels [--skip-without-toolkit]
                     compiles every kernels/*.cu to PTX with nvcc 13.0 (-Werror all-warnings);
                     downloads nvcc from PyPI into ~/.cache/cots/cuda on first use
  check-cuda [--clippy] [--test]
                     cargo check (clippy, test) of cots-ops with the `cuda` feature, without a
                     CUDA install: candle patched as in the shared notes (slow: ~10 min cold)
  fuzz [--seconds N] [TARGET...]
                     runs the dataset parsers' fuzz targets for N seconds each (nightly,
                     cargo-fuzz; see docs/fuzzing.md and `cargo xtask fuzz --help`)
";

fn main() {
    if let Err(err) = run() {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        print!("{HELP}");
        return Ok(());
    };
    match cmd.as_str() {
        "ci" => ci::run(rest),
        "bench" => bench::run(rest),
        "speedup" => speedup::run(rest),
        "data" => data::run(rest),
        "fuzz" => fuzz::run(rest),
        "kernels" => kernels::run(rest),
        "layers" => layers::run(rest),
        "check-cuda" => check_cuda::run(rest),
        "-h" | "--help" | "help" => {
            print!("{HELP}");
            Ok(())
        }
        other => bail!("unknown command `{other}`\n\n{HELP}"),
    }
}
