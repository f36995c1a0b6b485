//! `cots demo --video`: text-to-video on the embedded synthetic clips, mean
//! pooling against the temporal transformer.
//!
//! The same run config (configs/demo-video.toml, embedded) is trained twice,
//! once per temporal head, and both runs are evaluated on the test split.
//! Every test clip meets its time-reversed twin there: the twin holds the
//! same frames in the opposite order and its caption describes the opposite
//! event, so mean pooling, blind to order, can at best rank the right clip
//! first half of the time, and scores 50% on "caption above its twin".

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use cots_data::Split;
use cots_encoders::temporal::{Mode, Readout};
use cots_eval::RetrievalReport;
use cots_train::config::RunConfig;
use cots_train::run_dir::RunDir;
use cots_train::trainer::Trainer;

use crate::commands::{clear_earlier_demo, write_reports, Ctx, DemoArgs};

/// The video demo's run config, embedded so the demo needs no file.
const DEMO_VIDEO_CONFIG: &str = include_str!("../../../configs/demo-video.toml");

/// The temporal transformer of the demo's second row.
const TRANSFORMER: Mode = Mode::Transformer {
    layers: 2,
    heads: 4,
    readout: Readout::Mean,
};

pub fn demo_video(ctx: &Ctx, a: &DemoArgs) -> Result<()> {
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs/demo-video"));
    let base: RunConfig =
        toml::from_str(DEMO_VIDEO_CONFIG).context("the embedded video demo config")?;
    let rows = [
        ("mean pooling", "mean", Mode::Mean),
        ("temporal transformer", "transformer", TRANSFORMER),
    ];
    let mut reports = Vec::new();
    for (name, dir, mode) in rows {
        let mut cfg = base.clone();
        cfg.model.temporal = mode;
        cfg.train.out = out.join(dir);
        if let Some(s) = a.steps {
            cfg.train.steps = s;
        }
        clear_earlier_demo(&cfg.train.out)?;
        outln!(
            "COTS video demo, {name}: {} steps of {} clips ({} frames of {} px) with captions",
            cfg.train.steps,
            cfg.data.batch_size,
            cfg.data.image.frames.unwrap_or(1),
            cfg.data.image.size
        )?;
        let run_dir = cfg.train.out.clone();
        let mut trainer = Trainer::new(cfg, &ctx.device, false)?;
        let summary = trainer.run(ctx.quiet)?;
        outln!(
            "  trained in {:.0} s, final loss {:.3}; run saved in {}",
            summary.seconds,
            summary.final_loss,
            run_dir.display()
        )?;
        let report = trainer.evaluate(Split::Test)?;
        let dir = RunDir::new(&run_dir);
        write_reports(&report, &dir.eval_json(), &dir.eval_markdown())?;
        reports.push((name, report));
    }
    let table = comparison_table(&reports);
    outln!("\n{table}")?;
    let md = out.join("comparison.md");
    std::fs::write(&md, &table).with_context(|| format!("writing {}", md.display()))?;
    outln!("(written to {})", md.display())?;
    Ok(())
}

/// The Markdown table of the demo: one row per temporal head.
fn comparison_table(reports: &[(&str, RetrievalReport)]) -> String {
    let mut s = String::from(
        "| temporal head | t2v R@1 | t2v R@5 | t2v R@10 | t2v MedR | v2t R@1 | v2t R@5 | v2t R@10 | caption above its twin |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    let pct = |r: Option<f64>| r.map_or("-".into(), |v| format!("{v:.1}"));
    for (name, r) in reports {
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {}% |",
            pct(r.t2i.at(1)),
            pct(r.t2i.at(5)),
            pct(r.t2i.at(10)),
            r.t2i.median_rank,
            pct(r.i2t.at(1)),
            pct(r.i2t.at(5)),
            pct(r.i2t.at(10)),
            pct(r.hard_negative_accuracy),
        );
    }
    if let Some((_, r)) = reports.first() {
        let _ = write!(
            s,
            "\nTest split: {} clips (each with its time-reversed twin) and {} captions; \
             chance text-to-video R@1 is {:.1}%, chance twin accuracy 50%.\n",
            r.n_images,
            r.n_texts,
            100.0 / r.n_images.max(1) as f64
        );
    }
    s
}
