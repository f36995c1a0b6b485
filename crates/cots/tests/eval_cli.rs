//! `cots eval` end to end on a tiny run trained through the CLI: the plain
//! report, and the dual-softmax row (`--dual-softmax`), checked against the
//! library's re-normalisation applied to the embeddings `cots embed` writes.

use std::path::Path;

mod common;
use common::{cots, ok};

use candle_core::Device;
use cots_eval::{dual_softmax, evaluate_scorer, EmbeddingScorer, EvalOptions, RetrievalReport};

const CONFIG: &str = r#"
[model]
preset = "tiny"
[data]
kind = "synthetic"
batch_size = 8
max_text_len = 20
[data.synthetic]
train = 24
val = 4
test = 10
[train]
steps = 2
log_every = 1
eval_every = 0
checkpoint_every = 2
[objectives.queue]
size = 16
[[objectives.objectives]]
kind = "itc"
"#;

fn report(path: &Path) -> RetrievalReport {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn eval_reports_a_dual_softmax_row_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, run) = (dir.path().join("run.toml"), dir.path().join("run"));
    std::fs::write(&cfg, CONFIG).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    ok(&["train", "--config", &s(&cfg), "--out", &s(&run)]);

    let plain_json = dir.path().join("plain.json");
    let out = ok(&["eval", "--run", &s(&run), "--json", &s(&plain_json)]);
    assert!(!out.contains("dual softmax"), "{out}");
    let plain = report(&plain_json);
    assert!(plain.dual_softmax.is_none());

    let dual_json = dir.path().join("dual.json");
    let out = ok(&[
        "eval",
        "--run",
        &s(&run),
        "--json",
        &s(&dual_json),
        "--dual-softmax",
        "30",
    ]);
    assert!(
        out.contains("dual softmax (inverse temperature 30"),
        "{out}"
    );
    let dual = report(&dual_json);
    let (t, revised) = dual.dual_softmax.clone().expect("a dual-softmax row");
    assert_eq!(t, 30.0);
    assert_eq!(
        RetrievalReport {
            dual_softmax: None,
            ..dual
        },
        plain,
        "the plain rows do not change"
    );

    // The reference: the same re-normalisation on the embeddings `cots embed`
    // writes for that split.
    let emb = dir.path().join("emb.safetensors");
    ok(&["embed", "--run", &s(&run), "--out", &s(&emb)]);
    let t = candle_core::safetensors::load(&emb, &Device::Cpu).unwrap();
    let targets: Vec<usize> = t["text_to_image"]
        .to_vec1::<u32>()
        .unwrap()
        .into_iter()
        .map(|x| x as usize)
        .collect();
    let scorer = EmbeddingScorer::new(&t["image_embeddings"], &t["text_embeddings"]).unwrap();
    let (for_i2t, for_t2i) = dual_softmax(&scorer, 30.0).unwrap();
    let opts = EvalOptions::default();
    let want_i2t = evaluate_scorer(&for_i2t, &targets, &opts, "image").unwrap();
    let want_t2i = evaluate_scorer(&for_t2i, &targets, &opts, "image").unwrap();
    assert_eq!(revised.i2t, want_i2t.i2t);
    assert_eq!(revised.t2i, want_t2i.t2i);

    // Bare flag: the default inverse temperature; a bad one is refused.
    let out = ok(&["eval", "--run", &s(&run), "--dual-softmax"]);
    assert!(out.contains("inverse temperature 100"), "{out}");
    let bad = cots(&["eval", "--run", &s(&run), "--dual-softmax", "0"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("must be positive"), "{err}");
}
