//! How do the model families compare on the same test set?
//!
//! Single-stream cross-encoder (every pair through the joint transformer),
//! VLDeformer (the same transformer decomposed into two encoders), COTS
//! (two towers trained collaboratively), and the two-stage hybrid (COTS
//! top-k re-scored by the cross-encoder), each evaluated on one split with
//! R@1/5/10 both ways, RSUM, measured retrieval wall time, the speed ratio
//! against the single-stream model and the recall drop from it. Used by
//! `cots compare` and by `cargo xtask speedup --two-stream .. --cross ..`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use cots_data::Dataset;
use cots_eval::{evaluate_embeddings, RetrievalReport};
use plotters::prelude::*;
use serde::Serialize;
use serde_json::{json, Value};

use crate::cross::{hybrid_evaluate, CrossRun};
use crate::inference::Run;
use crate::{Error, Result};

/// One model's line of the comparison.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub name: String,
    pub report: RetrievalReport,
    /// Wall time of the whole retrieval evaluation (encoding, scoring, ranking).
    pub seconds: f64,
    /// Encoder (or joint transformer) passes.
    pub passes: usize,
    /// Where the model came from, and its training step.
    pub source: String,
    pub step: u64,
}

/// Every row on one test set; the first row is the single-stream reference.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub images: usize,
    pub texts: usize,
    pub rows: Vec<Row>,
}

/// The models to compare.
pub struct Contenders<'a> {
    pub cross: &'a CrossRun,
    pub decomposed: Option<&'a Run>,
    pub cots: &'a Run,
    /// Candidates per query re-scored in the hybrid (one row per k).
    pub rerank_k: &'a [usize],
}

/// Mean over the six recalls of `reference - r`, in percentage points.
pub fn mean_recall_drop(reference: &RetrievalReport, r: &RetrievalReport) -> f64 {
    let all = |x: &RetrievalReport| -> Vec<f64> {
        x.i2t
            .recall
            .iter()
            .chain(&x.t2i.recall)
            .map(|p| p.1)
            .collect()
    };
    let (a, b) = (all(reference), all(r));
    a.iter().zip(&b).map(|(x, y)| x - y).sum::<f64>() / a.len().max(1) as f64
}

/// Evaluates every contender on `data`, timing each.
pub fn compare(c: &Contenders, data: &Dataset) -> Result<Comparison> {
    let (texts, targets) = data.queries();
    let (n, m) = (data.items.len(), texts.len());
    let mut rows = Vec::new();

    let t = Instant::now();
    let report = c.cross.evaluate(data)?;
    rows.push(Row {
        name: "single-stream cross-encoder (all pairs)".into(),
        report,
        seconds: t.elapsed().as_secs_f64(),
        passes: n * m,
        source: c.cross.dir.display().to_string(),
        step: c.cross.step,
    });
    if let Some(d) = c.decomposed {
        let t = Instant::now();
        let report = d.evaluate(data)?;
        rows.push(Row {
            name: "VLDeformer (decomposed from it)".into(),
            report,
            seconds: t.elapsed().as_secs_f64(),
            passes: n + m,
            source: d.dir.display().to_string(),
            step: d.step,
        });
    }
    let t = Instant::now();
    let sources: Vec<_> = data.items.iter().map(|i| i.source.clone()).collect();
    let img = c.cots.embed_images(&sources)?;
    let txt = c.cots.embed_texts(&texts)?;
    let report = evaluate_embeddings(&img, &txt, &targets, &Default::default())?;
    let t_cots = t.elapsed().as_secs_f64();
    rows.push(Row {
        name: "COTS two-stream".into(),
        report,
        seconds: t_cots,
        passes: n + m,
        source: c.cots.dir.display().to_string(),
        step: c.cots.step,
    });
    if !c.rerank_k.is_empty() {
        let sim = img.matmul(&txt.t()?)?;
        let scorer = c.cross.scorer(data, 256)?;
        for &k in c.rerank_k {
            let t = Instant::now();
            let (report, passes) = hybrid_evaluate(&sim, |p| scorer.score_pairs(p), &targets, k)?;
            rows.push(Row {
                name: format!("COTS top-{k} re-scored by the cross-encoder"),
                report,
                // The hybrid pays for the two-stream pass too.
                seconds: t.elapsed().as_secs_f64() + t_cots,
                passes: n + m + passes,
                source: format!("{} + {}", c.cots.dir.display(), c.cross.dir.display()),
                step: c.cots.step,
            });
        }
    }
    Ok(Comparison {
        images: n,
        texts: m,
        rows,
    })
}

impl Comparison {
    /// The single-stream reference row.
    fn reference(&self) -> &Row {
        &self.rows[0]
    }

    /// A Markdown table: recalls, RSUM, recall drop and speed ratio against
    /// the single-stream model, time, passes.
    pub fn to_markdown(&self) -> String {
        let f = |v: &[(usize, f64)]| {
            v.iter()
                .map(|x| format!("{:.1}", x.1))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let reference = self.reference();
        let mut md = format!(
            "Test split: {} images x {} captions ({} pairs).\n\n\
             | model | i2t R@1 / 5 / 10 | t2i R@1 / 5 / 10 | RSUM | recall drop vs single-stream (mean of six; negative = better) | retrieval time | speed vs single-stream | passes |\n\
             |---|---|---|---|---|---|---|---|\n",
            self.images,
            self.texts,
            self.images * self.texts
        );
        for r in &self.rows {
            md += &format!(
                "| {} | {} | {} | {:.1} | {:+.1} pp | {:.2} s | {:.1}x | {} |\n",
                r.name,
                f(&r.report.i2t.recall),
                f(&r.report.t2i.recall),
                r.report.rsum,
                mean_recall_drop(&reference.report, &r.report),
                r.seconds,
                reference.seconds / r.seconds.max(1e-9),
                r.passes
            );
        }
        md
    }

    pub fn to_json(&self) -> Value {
        let reference = self.reference();
        json!({
            "images": self.images,
            "texts": self.texts,
            "rows": self.rows.iter().map(|r| json!({
                "name": r.name,
                "i2t": r.report.i2t.recall.iter().map(|x| x.1).collect::<Vec<_>>(),
                "t2i": r.report.t2i.recall.iter().map(|x| x.1).collect::<Vec<_>>(),
                "rsum": r.report.rsum,
                "mean_recall_drop_vs_single_stream": mean_recall_drop(&reference.report, &r.report),
                "seconds": r.seconds,
                "speed_vs_single_stream": reference.seconds / r.seconds.max(1e-9),
                "passes": r.passes,
                "source": r.source,
                "step": r.step,
            })).collect::<Vec<_>>(),
        })
    }

    /// An SVG plot of RSUM against retrieval time (log scale), one labelled
    /// point per model.
    pub fn plot(&self, out: &Path) -> Result<()> {
        let err = |e: String| Error::Io {
            path: out.to_path_buf(),
            source: std::io::Error::other(e),
        };
        let (t0, t1) = self.rows.iter().fold((f64::MAX, f64::MIN), |(lo, hi), r| {
            (lo.min(r.seconds), hi.max(r.seconds))
        });
        let top = self.rows.iter().fold(0.0f64, |a, r| a.max(r.report.rsum));
        let root = SVGBackend::new(out, (860, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "accuracy vs retrieval time, {} images x {} captions",
                    self.images, self.texts
                ),
                ("sans-serif", 18),
            )
            .margin(20)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(
                ((t0 / 2.0).max(1e-4)..t1 * 4.0).log_scale(),
                0.0..(top * 1.15).max(1.0),
            )
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("retrieval wall time (s, log scale)")
            .y_desc("RSUM")
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (i, r) in self.rows.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let p = (r.seconds.max(1e-4), r.report.rsum);
            chart
                .draw_series(std::iter::once(Circle::new(p, 6, color.filled())))
                .map_err(|e| err(e.to_string()))?
                .label(format!(
                    "{} ({:.1}, {:.2} s)",
                    r.name, r.report.rsum, r.seconds
                ))
                .legend(move |(x, y)| Circle::new((x + 8, y), 5, color.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
        Ok(())
    }

    /// Writes `compare.md`, `compare.json` and `compare.svg` into `dir`.
    pub fn write(&self, dir: &Path, header: &str) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let md = dir.join("compare.md");
        let js = dir.join("compare.json");
        let svg = dir.join("compare.svg");
        crate::checkpoint::write_atomic(&md, format!("{header}{}", self.to_markdown()).as_bytes())?;
        let text = serde_json::to_vec_pretty(&self.to_json()).map_err(|e| Error::Format {
            path: js.clone(),
            message: e.to_string(),
        })?;
        crate::checkpoint::write_atomic(&js, &text)?;
        self.plot(&svg)?;
        Ok(vec![md, js, svg])
    }
}
