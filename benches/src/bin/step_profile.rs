//! Where does a training step's time go? (issue #23)
//!
//! - `step_profile time --size demo`: median ms per real step
//!   (`Loop::train_step_on`) after warm-up, and the peak RSS; one JSON line
//!   on stdout (benches/train_step.sh reads it). `--forward-only` times the
//!   forward half alone; `--perf-ctl FIFO[,ACK]` enables a
//!   `perf record --control=fifo:...  -D -1` run only around the timed steps.
//! - `step_profile phases --size demo`: a Markdown table of the median time
//!   of each part of the step (forward, backward, clip, AdamW, EMA, enqueue).
//! - `step_profile spec --size demo`: the JSON the PyTorch reference reads
//!   (benches/reference/train_step.py) to build the same model and step.
//! - `step_profile fold perf.txt`: folds `perf report --no-children --sort
//!   symbol --stdio` output into a table by kind of op (matmul, softmax,
//!   GELU, LayerNorm, elementwise, copies, ...) plus the top symbols.
//!
//! benches/step_profile.sh runs the whole profile; docs/perf-training.md
//! describes the tables.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use cots_benches::train_step::{median, peak_rss_mib, Phases, Rig, Size};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Time and profile the COTS training step")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Median ms per real step and peak RSS, as one JSON line.
    Time {
        #[arg(long, default_value = "demo")]
        size: String,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Time the forward half only (no backward, optimizer or EMA).
        #[arg(long)]
        forward_only: bool,
        /// perf's control FIFO (and optional ack FIFO, `ctl,ack`): `enable`
        /// is written before the timed steps and `disable` after them.
        #[arg(long)]
        perf_ctl: Option<String>,
        /// Also write the size's spec (as `spec` prints it) to this file.
        #[arg(long)]
        spec_out: Option<PathBuf>,
    },
    /// Median time of each part of the step, as a Markdown table.
    Phases {
        #[arg(long, default_value = "demo")]
        size: String,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
    },
    /// The JSON spec of a size for benches/reference/train_step.py.
    Spec {
        #[arg(long, default_value = "demo")]
        size: String,
    },
    /// Folds a `perf report --no-children --sort symbol --stdio` text.
    Fold {
        report: PathBuf,
        /// Symbols listed below the category table.
        #[arg(long, default_value_t = 25)]
        top: usize,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Time {
            size,
            warmup,
            steps,
            forward_only,
            perf_ctl,
            spec_out,
        } => time(
            Size::parse(&size)?,
            warmup,
            steps,
            forward_only,
            perf_ctl,
            spec_out,
        ),
        Cmd::Phases {
            size,
            warmup,
            steps,
        } => phases(Size::parse(&size)?, warmup, steps),
        Cmd::Spec { size } => {
            let rig = Rig::new(Size::parse(&size)?)?;
            println!("{}", serde_json::to_string_pretty(&rig.spec()?)?);
            Ok(())
        }
        Cmd::Fold { report, top } => {
            let text = std::fs::read_to_string(&report)
                .with_context(|| format!("reading {}", report.display()))?;
            print!("{}", fold::table(&fold::parse(&text), top));
            Ok(())
        }
    }
}

fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// Talks to `perf record --control=fifo:CTL[,ACK]`.
struct PerfCtl {
    ctl: std::fs::File,
    ack: Option<std::io::BufReader<std::fs::File>>,
}

impl PerfCtl {
    fn open(spec: &str) -> Result<Self> {
        let mut parts = spec.splitn(2, ',');
        let ctl_path = parts.next().unwrap_or_default();
        let ctl = std::fs::OpenOptions::new()
            .write(true)
            .open(ctl_path)
            .with_context(|| format!("opening perf's control FIFO {ctl_path}"))?;
        let ack = match parts.next() {
            Some(p) => Some(std::io::BufReader::new(
                std::fs::File::open(p).with_context(|| format!("opening perf's ack FIFO {p}"))?,
            )),
            None => None,
        };
        Ok(Self { ctl, ack })
    }

    fn send(&mut self, cmd: &str) -> Result<()> {
        writeln!(self.ctl, "{cmd}")?;
        self.ctl.flush()?;
        if let Some(ack) = &mut self.ack {
            let mut line = String::new();
            std::io::BufRead::read_line(ack, &mut line)?;
        }
        Ok(())
    }
}

fn time(
    size: Size,
    warmup: usize,
    steps: usize,
    forward_only: bool,
    perf_ctl: Option<String>,
    spec_out: Option<PathBuf>,
) -> Result<()> {
    let t = Instant::now();
    let mut rig = Rig::new(size)?;
    let setup_s = t.elapsed().as_secs_f64();
    if let Some(path) = spec_out {
        std::fs::write(&path, serde_json::to_string_pretty(&rig.spec()?)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let run = |rig: &mut Rig| -> Result<()> {
        if forward_only {
            rig.forward_only()?;
        } else {
            rig.step()?;
        }
        Ok(())
    };
    for _ in 0..warmup {
        run(&mut rig)?;
    }
    let mut ctl = perf_ctl.as_deref().map(PerfCtl::open).transpose()?;
    if let Some(c) = &mut ctl {
        c.send("enable")?;
    }
    let mut ms = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        run(&mut rig)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    if let Some(c) = &mut ctl {
        c.send("disable")?;
    }
    let min = ms.iter().copied().fold(f64::INFINITY, f64::min);
    let med = median(&mut ms);
    let rec = json!({
        "impl": "cots",
        "size": size.name(),
        "what": if forward_only { "forward" } else { "step" },
        "threads": threads(),
        "warmup": warmup,
        "steps": steps,
        "ms_median": med,
        "ms_min": min,
        "peak_rss_mib": peak_rss_mib(),
        "setup_s": setup_s,
    });
    println!("{rec}");
    Ok(())
}

fn phases(size: Size, warmup: usize, steps: usize) -> Result<()> {
    let mut rig = Rig::new(size)?;
    let mut adamw = rig.adamw()?;
    for _ in 0..warmup {
        rig.timed_step(&mut adamw)?;
    }
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); Phases::NAMES.len()];
    let mut totals = Vec::new();
    for _ in 0..steps {
        let p = rig.timed_step(&mut adamw)?;
        let mut total = 0.0;
        for (i, d) in p.as_array().iter().enumerate() {
            let ms = d.as_secs_f64() * 1e3;
            per[i].push(ms);
            total += ms;
        }
        totals.push(total);
    }
    let total = median(&mut totals);
    println!(
        "Step phases, size {size}, {} threads, median of {steps} steps after {warmup} warm-up:\n",
        threads()
    );
    println!("| phase | ms | share |\n|---|---:|---:|");
    for (name, xs) in Phases::NAMES.iter().zip(per.iter_mut()) {
        let m = median(xs);
        println!("| {name} | {m:.1} | {:.1}% |", 100.0 * m / total.max(1e-9));
    }
    println!("| total (median of sums) | {total:.1} | 100% |");
    Ok(())
}

/// Folding a perf symbol report into kinds of op.
mod fold {
    /// One line of `perf report --no-children --sort symbol --stdio`.
    #[derive(Debug, PartialEq)]
    pub struct Row {
        pub percent: f64,
        pub kernel: bool,
        pub symbol: String,
    }

    /// The rows of a report (comment and blank lines skipped).
    pub fn parse(text: &str) -> Vec<Row> {
        text.lines()
            .filter_map(|line| {
                let line = line.trim();
                let (pct, rest) = line.split_once('%')?;
                let percent: f64 = pct.trim().parse().ok()?;
                let rest = rest.trim_start();
                let (kernel, symbol) = if let Some(s) = rest.strip_prefix("[k]") {
                    (true, s)
                } else if let Some(s) = rest.strip_prefix("[.]") {
                    (false, s)
                } else {
                    return None;
                };
                // perf may append columns (IPC) after two or more spaces;
                // a symbol has single spaces only (`<A as B>::f`).
                let symbol = symbol.trim();
                let symbol = symbol.split("  ").next().unwrap_or(symbol);
                Some(Row {
                    percent,
                    kernel,
                    symbol: symbol.to_string(),
                })
            })
            .collect()
    }

    /// The kinds of op, tried in order; the first whose pattern occurs in
    /// the symbol (case-insensitive) takes it.
    const KINDS: &[(&str, &[&str])] = &[
        ("matmul (gemm)", &["gemm", "matmul"]),
        (
            "queue op (fused ITC / KL)",
            &["queue_fused", "queue_contrastive", "queue_kl"],
        ),
        ("softmax", &["softmax"]),
        (
            "candle Map1 / Map2 (inlined: affine, reduce, compare, where)",
            &["utils::map1", "utils::map2"],
        ),
        ("GELU / erf", &["gelu", "::erf", "erff"]),
        ("LayerNorm", &["layer_norm", "layernorm"]),
        ("dropout", &["dropout"]),
        (
            "copies (strided / cat / index)",
            &[
                "copy_strided",
                "copy2d",
                "memcpy",
                "memmove",
                "index_select",
                "gather",
                "concat",
                "::cat",
            ],
        ),
        (
            "elementwise binary (add, mul, broadcast)",
            &[
                "binary_map",
                "binaryop",
                "vs_add",
                "vs_mul",
                "vd_add",
                "vd_mul",
            ],
        ),
        (
            "elementwise unary / affine",
            &["unary_map", "affine", "powf", "sqrt", "exp", "clamp"],
        ),
        (
            "reductions (sum, max)",
            &["reduce", "sum", "fast_max", "argmax"],
        ),
        (
            "allocation, zeroing, page faults",
            &[
                "malloc",
                "_int_free",
                "cfree",
                "realloc",
                "__rust_alloc",
                "__rdl_alloc",
                "__rust_dealloc",
                "memset",
                "clear_page",
                "page_fault",
                "mmap",
                "munmap",
            ],
        ),
        (
            "iterator loops (inlined maps, unattributed)",
            &["from_iter", "spec_extend", "::fold", "for_each"],
        ),
        (
            "thread pool (rayon, futex, spin)",
            &[
                "barrier",
                "__rust_begin_short_backtrace",
                "rayon",
                "crossbeam",
                "futex",
                "sched",
                "spin",
                "pthread",
                "yield",
                "park",
                "wake",
            ],
        ),
    ];

    /// The kind of op a symbol belongs to.
    pub fn kind(symbol: &str, kernel: bool) -> &'static str {
        let s = symbol.to_lowercase();
        for (name, pats) in KINDS {
            if pats.iter().any(|p| s.contains(p)) {
                return name;
            }
        }
        if kernel {
            "kernel, other"
        } else {
            "other"
        }
    }

    /// The category table and the top symbols, as Markdown.
    pub fn table(rows: &[Row], top: usize) -> String {
        let mut sums: Vec<(&'static str, f64, usize)> = Vec::new();
        for r in rows {
            let k = kind(&r.symbol, r.kernel);
            match sums.iter_mut().find(|(n, _, _)| *n == k) {
                Some(e) => {
                    e.1 += r.percent;
                    e.2 += 1;
                }
                None => sums.push((k, r.percent, 1)),
            }
        }
        sums.sort_by(|a, b| b.1.total_cmp(&a.1));
        let total: f64 = rows.iter().map(|r| r.percent).sum();
        let mut out =
            String::from("| kind of op | share of samples | symbols |\n|---|---:|---:|\n");
        for (k, p, n) in &sums {
            out.push_str(&format!("| {k} | {p:.1}% | {n} |\n"));
        }
        out.push_str(&format!(
            "| (all listed) | {total:.1}% | {} |\n",
            rows.len()
        ));
        out.push_str("\n| top symbols | share | kind |\n|---|---:|---|\n");
        let mut by_share: Vec<&Row> = rows.iter().collect();
        by_share.sort_by(|a, b| b.percent.total_cmp(&a.percent));
        for r in by_share.into_iter().take(top) {
            let mut s = r.symbol.clone();
            if s.len() > 100 {
                let mut cut = 97;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                s.truncate(cut);
                s.push_str("...");
            }
            out.push_str(&format!(
                "| `{}` | {:.1}% | {} |\n",
                s.replace('|', "\\|"),
                r.percent,
                kind(&r.symbol, r.kernel)
            ));
        }
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const REPORT: &str = "\
# Samples: 10K of event 'cpu-clock:pppH'
#
# Overhead  Symbol
# ........  ......
#
    41.20%  [.] gemm_f32::microkernel::fma::f32::x3x4
     9.10%  [.] candle_nn::ops::softmax_last_dim::cpu_fwd
     5.00%  [.] candle_core::cpu_backend::utils::binary_map
     4.00%  [k] clear_page_erms
     3.50%  [.] cots_ops::nn::layer_norm_fwd
     2.00%  [.] __memmove_avx_unaligned_erms
     1.00%  [.] some_unknown_thing                      -      -
";

        #[test]
        fn parses_the_rows_of_a_report() {
            let rows = parse(REPORT);
            assert_eq!(rows.len(), 7);
            assert_eq!(
                rows[0],
                Row {
                    percent: 41.2,
                    kernel: false,
                    symbol: "gemm_f32::microkernel::fma::f32::x3x4".into()
                }
            );
            assert!(rows[3].kernel);
        }

        #[test]
        fn symbols_fall_into_their_kinds() {
            let kinds: Vec<&str> = parse(REPORT)
                .iter()
                .map(|r| kind(&r.symbol, r.kernel))
                .collect();
            assert_eq!(
                kinds,
                [
                    "matmul (gemm)",
                    "softmax",
                    "elementwise binary (add, mul, broadcast)",
                    "allocation, zeroing, page faults",
                    "LayerNorm",
                    "copies (strided / cat / index)",
                    "other"
                ]
            );
        }

        #[test]
        fn the_table_sums_each_kind() {
            let t = table(&parse(REPORT), 3);
            assert!(t.contains("| matmul (gemm) | 41.2% | 1 |"), "{t}");
            assert!(t.contains("| (all listed) | 65.8% | 7 |"), "{t}");
            assert_eq!(t.matches("| `").count(), 3);
        }
    }
}
