//! What happened during training? A JSONL log (one flushed line per record,
//! so nothing is lost on a crash; appended to on resume) and an SVG plot of
//! the loss terms and validation recall.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::{Error, Result};

/// A progress bar over `steps` steps, prefixed by `label`, with elapsed
/// time, ETA and a message slot; hidden when `quiet`.
pub fn progress_bar(label: &str, steps: u64, quiet: bool) -> indicatif::ProgressBar {
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(steps)
    };
    let template =
        format!("{label}{{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}");
    bar.set_style(
        indicatif::ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Appends JSON records to a `.jsonl` file.
pub struct MetricsWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsWriter {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, record: &serde_json::Value) -> Result<()> {
        let line = format!("{record}\n");
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })
    }
}

/// Reads a metrics file back, skipping a torn final line.
pub fn read(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Drops records at or after `step` (used on resume, so a run resumed from
/// an earlier checkpoint does not log the same steps twice).
pub fn truncate_from(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // The kept lines are copied as they were written, not re-serialised: a
    // float parsed and printed again may change in its last digit, and a
    // resumed run's log must match an uninterrupted one's exactly. A torn
    // final line (a killed write) does not parse and is dropped.
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .is_ok_and(|r| r["step"].as_u64().is_none_or(|s| s < step))
        })
        .collect();
    let mut text = kept.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    crate::checkpoint::write_atomic(path, text.as_bytes())
}

/// Plots every numeric field named `loss/*` and `val/*` against `step`.
pub fn plot(records: &[serde_json::Value], out: &Path) -> Result<()> {
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in records {
        let Some(step) = r["step"].as_f64() else {
            continue;
        };
        if let Some(obj) = r.as_object() {
            for (k, v) in obj {
                if let (true, Some(v)) =
                    (k.starts_with("loss/") || k.starts_with("val/"), v.as_f64())
                {
                    series.entry(k.clone()).or_default().push((step, v));
                }
            }
        }
    }
    let err = |e: String| Error::Io {
        path: out.to_path_buf(),
        source: std::io::Error::other(e),
    };
    let root = SVGBackend::new(out, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let (losses, vals): (Vec<_>, Vec<_>) = series.iter().partition(|(k, _)| k.starts_with("loss/"));
    let panels = root.split_horizontally(480);
    for ((area, group), title) in [(&panels.0, losses), (&panels.1, vals)]
        .into_iter()
        .zip(["loss terms", "validation recall (%)"])
    {
        let pts: Vec<&(f64, f64)> = group.iter().flat_map(|(_, v)| v.iter()).collect();
        let (x1, y0, y1) = pts
            .iter()
            .fold((1.0f64, f64::MAX, f64::MIN), |(x, lo, hi), p| {
                (x.max(p.0), lo.min(p.1), hi.max(p.1))
            });
        let (y0, y1) = if pts.is_empty() {
            (0.0, 1.0)
        } else {
            (y0.min(0.0), y1 * 1.05 + 1e-9)
        };
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(0f64..x1, y0..y1)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (i, (name, points)) in group.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| err(e.to_string()))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_reads_truncates_and_plots() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.jsonl");
        let mut w = MetricsWriter::open(&p).unwrap();
        for s in 1..=4u64 {
            w.write(
                &serde_json::json!({"step": s, "loss/itc_i2t": 1.0 / s as f64, "val/rsum": s * 10}),
            )
            .unwrap();
        }
        truncate_from(&p, 3).unwrap();
        let back = read(&p).unwrap();
        assert_eq!(back.len(), 2);
        let svg = dir.path().join("plot.svg");
        plot(&back, &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("loss/itc_i2t") && text.contains("val/rsum"));
    }
}
