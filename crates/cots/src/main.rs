//! `cots`: train, evaluate, embed and search with collaborative two-stream
//! vision-language models (COTS, Lu et al., CVPR 2022).
//!
//! A small `main` in the ripgrep style: flags become one validated request
//! before any work starts, the work lives in the library crates, and an error
//! prints its whole chain and exits non-zero.

use std::io::IsTerminal;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// `println!` that hands the write error back instead of panicking, so that
/// a reader that goes away (`cots index search ... | head -1`) ends the
/// command quietly: `main` treats a broken pipe as a normal end.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

mod commands;
mod demo_video;
mod emoji;
mod index_cmd;
mod serve_cmd;

/// Collaborative two-stream vision-language retrieval (COTS).
///
/// Two encoders, one for images (ViT) and one for text (BERT), trained so that
/// matching pairs land close together. A gallery is encoded once; a query is
/// one encoder pass plus a dot product.
#[derive(Debug, Parser)]
#[command(name = "cots", version, propagate_version = true)]
pub struct Cli {
    /// Where to run: `auto` (CUDA when a driver and a CUDA build are present,
    /// else CPU), `cpu`, or `cuda[:N]`.
    #[arg(long, global = true, default_value = "auto")]
    pub device: String,

    /// Only print errors and final results (no progress bars).
    #[arg(long, short, global = true)]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a small COTS on the embedded synthetic dataset, evaluate it on the
    /// held-out test split, and show a few searches. Needs no download; about
    /// five to ten minutes on two CPU cores. With `--video`: text-to-video on
    /// synthetic clips, mean pooling against the temporal transformer.
    Demo(commands::DemoArgs),
    /// Train from a run config (TOML). Checkpoints atomically, resumes with
    /// `--resume`, stops with a clear message on a NaN loss.
    Train(commands::TrainArgs),
    /// Train the dVAE visual tokenizer that masked vision modeling predicts.
    TrainTokenizer(commands::TrainTokenizerArgs),
    /// Train the single-stream cross-encoder baseline (UNITER-style, image-text
    /// matching with hard negatives mined by a trained two-stream run).
    TrainCross(commands::TrainCrossArgs),
    /// Decompose a trained cross-encoder into two fast encoders (VLDeformer):
    /// its joint transformer runs on each modality alone, trained with
    /// bimodal-negative contrastive learning. The output is a run that eval,
    /// embed and search use like a COTS run.
    Decompose(commands::DecomposeArgs),
    /// Single-stream, VLDeformer, COTS and the two-stage hybrid side by side on
    /// one test split: recall, retrieval time, speed ratio, recall drop. Trains
    /// the cross-encoder and the decomposition first if their directories are
    /// empty.
    Compare(commands::CompareArgs),
    /// Evaluate a trained run: R@1/5/10 both ways, RSUM, median and mean rank.
    Eval(commands::EvalArgs),
    /// Embed the images and captions of a dataset split into a safetensors file.
    Embed(commands::EmbedArgs),
    /// Search embeddings written by `cots embed` with a text or an image query.
    Search(commands::SearchArgs),
    /// Build the multi-style emoji retrieval benchmark from unpacked npm
    /// packages (`cargo xtask data emoji` downloads them and runs this).
    BuildEmoji(emoji::BuildEmojiArgs),
    /// Build the animated emoji text-to-video benchmark from unpacked npm
    /// packages (`cargo xtask data emoji-video` downloads them and runs this).
    BuildEmojiVideo(emoji::BuildEmojiVideoArgs),
    /// Build, grow, inspect, export and search a persistent retrieval index
    /// (memory-mapped vectors, exact or approximate search, thumbnails).
    Index(index_cmd::IndexArgs),
    /// Serve an index over HTTP: a JSON search API (text and image queries),
    /// a web page, Prometheus metrics. Loopback only unless told otherwise.
    Serve(serve_cmd::ServeArgs),
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.quiet);
    if let Err(err) = run(cli) {
        if is_broken_pipe(&err) {
            // Whoever read the results has all they wanted: not an error.
            std::process::exit(0);
        }
        eprintln!("error: {err}");
        for cause in err.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}

/// Whether `err` is a write to a closed pipe (the reader of our standard
/// output exited).
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn init_logging(quiet: bool) {
    let default = if quiet { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour codes only for a person at a terminal: redirected to a file or
    // a pipe, the log must stay plain text. (Any file writer added later
    // must keep `with_ansi(false)`.)
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

fn run(cli: Cli) -> Result<()> {
    let device = commands::select_device(&cli.device)?;
    let ctx = commands::Ctx {
        device,
        quiet: cli.quiet,
    };
    match cli.command {
        Command::Demo(a) => commands::demo(&ctx, a),
        Command::Train(a) => commands::train(&ctx, a),
        Command::TrainTokenizer(a) => commands::train_tokenizer(&ctx, a),
        Command::TrainCross(a) => commands::train_cross(&ctx, a),
        Command::Decompose(a) => commands::decompose(&ctx, a),
        Command::Compare(a) => commands::compare(&ctx, a),
        Command::Eval(a) => commands::eval(&ctx, a),
        Command::Embed(a) => commands::embed(&ctx, a),
        Command::Search(a) => commands::search(&ctx, a),
        Command::BuildEmoji(a) => emoji::build_emoji(ctx.quiet, a),
        Command::BuildEmojiVideo(a) => emoji::build_emoji_video(ctx.quiet, a),
        Command::Index(a) => index_cmd::index(&ctx, a),
        Command::Serve(a) => serve_cmd::serve(&ctx, a),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every flag and argument of every subcommand, with the subcommand's path.
    fn all_args(cmd: &clap::Command, path: &str, out: &mut Vec<(String, clap::Arg)>) {
        for a in cmd.get_arguments() {
            out.push((path.to_string(), a.clone()));
        }
        for sub in cmd.get_subcommands() {
            all_args(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_flag_of_every_subcommand_has_help_text() {
        let cmd = super::Cli::command();
        let mut args = Vec::new();
        all_args(&cmd, "cots", &mut args);
        let missing: Vec<String> = args
            .iter()
            .filter(|(_, a)| !["help", "version"].contains(&a.get_id().as_str()))
            .filter(|(_, a)| a.get_help().is_none_or(|h| h.to_string().trim().is_empty()))
            .map(|(path, a)| format!("{path} --{}", a.get_id()))
            .collect();
        assert!(missing.is_empty(), "flags without help text: {missing:#?}");
    }
}
