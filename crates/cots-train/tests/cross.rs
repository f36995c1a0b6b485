//! The single-stream baseline: training writes a model that reopens with the
//! same scores, all-pairs evaluation agrees with scoring pairs one by one,
//! the two-stage hybrid ranks exactly as a brute-force re-ranking does, and
//! a decomposition (VLDeformer) starts from the cross-encoder's exact weights
//! and serves as a run.

use candle_core::{Device, Tensor};
use cots_data::Split;
use cots_eval::{evaluate_scorer, EvalOptions, MatrixScorer};
use cots_train::config::RunConfig;
use cots_train::cross::{hybrid_evaluate, train_cross, CrossRun, CrossTrainConfig};
use cots_train::inference::Run;
use cots_train::trainer::{load_dataset, Trainer};

fn two_stream_run(out: &std::path::Path) -> Run {
    let mut cfg: RunConfig = toml::from_str(
        r#"
        [model]
        preset = "tiny"
        [data]
        kind = "synthetic"
        batch_size = 8
        max_text_len = 16
        [data.synthetic]
        train = 32
        val = 4
        test = 6
        [train]
        steps = 2
        eval_every = 0
        checkpoint_every = 2
        [objectives.queue]
        size = 16
        [[objectives.objectives]]
        kind = "clip"
        "#,
    )
    .unwrap();
    cfg.train.out = out.to_path_buf();
    Trainer::new(cfg, &Device::Cpu, false)
        .unwrap()
        .run(true)
        .unwrap();
    Run::open(out, &Device::Cpu).unwrap()
}

#[test]
fn a_trained_cross_encoder_reopens_and_scores_every_pair_consistently() {
    let ts_dir = tempfile::tempdir().unwrap();
    let ce_dir = tempfile::tempdir().unwrap();
    let run = two_stream_run(ts_dir.path());
    let tc = CrossTrainConfig {
        steps: 3,
        batch_size: 8,
        save_every: 2,
        ..CrossTrainConfig::default()
    };
    let trained = train_cross(&run, ce_dir.path(), &tc, true, false).unwrap();
    assert_eq!(trained.step, 3);
    assert!(trained.loss.is_some_and(f64::is_finite));
    // A second run into the same directory must not replace the first.
    let err = train_cross(&run, ce_dir.path(), &tc, true, false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("already holds a cross-encoder"), "{err}");
    let reopened = CrossRun::open(ce_dir.path(), &Device::Cpu).unwrap();

    let data = load_dataset(&run.cfg).unwrap().split(Split::Test).unwrap();
    let (texts, targets) = data.queries();
    // Gallery embeddings must not hold the autograd graph of their batch
    // (the weights are variables): a large gallery would exhaust memory.
    assert!(!run.embed_texts(&texts).unwrap().track_op());
    let (n, m) = (data.items.len(), texts.len());
    let a = trained.scorer(&data, 7).unwrap();
    let b = reopened.scorer(&data, 64).unwrap();
    let all: Vec<(usize, usize)> = (0..n).flat_map(|i| (0..m).map(move |t| (i, t))).collect();
    // One pair per batch is the obviously correct reference.
    let one_by_one: Vec<f32> = all
        .iter()
        .map(|&p| a.score_pairs(&[p]).unwrap()[0])
        .collect();
    let batched = b.score_pairs(&all).unwrap();
    for (x, y) in one_by_one.iter().zip(&batched) {
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }
    // Full evaluation equals evaluating the brute-force score matrix.
    let report = reopened.evaluate(&data).unwrap();
    let reference = evaluate_scorer(
        &MatrixScorer::new(one_by_one, n, m).unwrap(),
        &targets,
        &EvalOptions::default(),
        "image",
    )
    .unwrap();
    assert_eq!(report.i2t.recall, reference.i2t.recall);
    assert_eq!(report.t2i.recall, reference.t2i.recall);
    // A damaged weights file is an error naming it, not a panic.
    std::fs::write(
        ce_dir.path().join("cross.safetensors"),
        b"not a tensor file",
    )
    .unwrap();
    let err = CrossRun::open(ce_dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("cross.safetensors"), "{err}");
}

/// 1-based rank of the first relevant item when `order` lists item indices best first.
fn first_hit(order: &[usize], relevant: impl Fn(usize) -> bool) -> usize {
    1 + order.iter().position(|&j| relevant(j)).unwrap()
}

/// Brute-force two-stage ranking of one query: top `k` by `sim`, re-sorted by
/// `cross`, then the others in `sim` order (ties to the lower index).
fn rerank(sim: &[f32], cross: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sim.len()).collect();
    order.sort_by(|&a, &b| sim[b].total_cmp(&sim[a]).then(a.cmp(&b)));
    let k = k.min(order.len());
    order[..k].sort_by(|&a, &b| cross[b].total_cmp(&cross[a]).then(a.cmp(&b)));
    order
}

#[test]
fn the_hybrid_matches_a_brute_force_rerank() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let (n, m, k) = (9usize, 27usize, 4usize);
    let targets: Vec<usize> = (0..m).map(|t| t % n).collect();
    let sim: Vec<f32> = (0..n * m).map(|_| rng.random_range(-1.0..1.0)).collect();
    let cross: Vec<f32> = (0..n * m).map(|_| rng.random_range(-6.0..6.0)).collect();
    let sim_t = Tensor::from_vec(sim.clone(), (n, m), &Device::Cpu).unwrap();
    let score = |pairs: &[(usize, usize)]| -> cots_train::Result<Vec<f32>> {
        Ok(pairs.iter().map(|&(i, t)| cross[i * m + t]).collect())
    };
    let (report, passes) = hybrid_evaluate(&sim_t, score, &targets, k).unwrap();
    assert_eq!(passes, n * k + m * k);

    let i2t_ranks: Vec<usize> = (0..n)
        .map(|i| {
            let order = rerank(&sim[i * m..(i + 1) * m], &cross[i * m..(i + 1) * m], k);
            first_hit(&order, |t| targets[t] == i)
        })
        .collect();
    let t2i_ranks: Vec<usize> = (0..m)
        .map(|t| {
            let col = |v: &[f32]| (0..n).map(|i| v[i * m + t]).collect::<Vec<_>>();
            let order = rerank(&col(&sim), &col(&cross), k);
            first_hit(&order, |i| i == targets[t])
        })
        .collect();
    let recall = |ranks: &[usize], kk: usize| {
        100.0 * ranks.iter().filter(|&&r| r <= kk).count() as f64 / ranks.len() as f64
    };
    for (got, kk) in report.i2t.recall.iter().zip([1, 5, 10]) {
        assert_eq!(got.0, kk);
        assert!((got.1 - recall(&i2t_ranks, kk)).abs() < 1e-9, "i2t R@{kk}");
    }
    for (got, kk) in report.t2i.recall.iter().zip([1, 5, 10]) {
        assert!((got.1 - recall(&t2i_ranks, kk)).abs() < 1e-9, "t2i R@{kk}");
    }
}

#[test]
fn a_decomposition_starts_from_the_cross_encoder_and_serves_as_a_run() {
    use candle_nn::VarMap;
    use cots_encoders::decomposed::Pooling;
    use cots_train::compare::{compare, Contenders};
    use cots_train::decompose::{decompose, decomposed_from, DecomposeConfig};
    use cots_train::inference::Encoders;

    let (ts_dir, ce_dir, dec_dir, out_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let run = two_stream_run(ts_dir.path());
    let tc = CrossTrainConfig {
        steps: 2,
        batch_size: 8,
        ..CrossTrainConfig::default()
    };
    let ce = train_cross(&run, ce_dir.path(), &tc, true, false).unwrap();
    let source =
        candle_core::safetensors::load(ce_dir.path().join("cross.safetensors"), &Device::Cpu)
            .unwrap();
    let bits = |t: &Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    };
    let stack = |vars: &std::collections::HashMap<String, Tensor>| {
        source
            .keys()
            .filter(|k| !k.starts_with("pooler.") && !k.starts_with("itm_head."))
            .map(|k| (k.clone(), bits(&vars[&format!("joint.{k}")])))
            .collect::<Vec<_>>()
    };
    // Before training: the decomposed stack IS the cross-encoder's.
    let map = VarMap::new();
    decomposed_from(&ce, 16, Pooling::Mean, 0, &map).unwrap();
    let start: std::collections::HashMap<String, Tensor> = map
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    for (k, b) in stack(&start) {
        assert_eq!(b, bits(&source[&k]), "{k} is not the source's");
    }

    let dc = DecomposeConfig {
        steps: 3,
        batch_size: 8,
        embed_dim: 16,
        save_every: 2,
        // Past batches as extra negatives: exercises the queue in the loop.
        loss: cots_objectives::bimodal::BimodalConfig {
            queue_size: 16,
            ..Default::default()
        },
        ..DecomposeConfig::default()
    };
    let data_cfg = ce.run_cfg.clone().expect("train-cross records its data");
    let dec = decompose(&ce, &data_cfg, dec_dir.path(), &dc, true, false).unwrap();
    assert_eq!(dec.step, 3);
    assert!(matches!(dec.model, Encoders::Decomposed(_)));
    let trained =
        cots_encoders::weights::read_safetensors(&dec_dir.path().join("decomposed.safetensors"))
            .unwrap();
    assert!(
        stack(&trained).iter().any(|(k, b)| *b != bits(&source[k])),
        "training moved no shared weight"
    );
    // A second decomposition into the same directory must not replace it.
    let err = decompose(&ce, &data_cfg, dec_dir.path(), &dc, true, false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("already holds a decomposed model"), "{err}");

    // It reopens as a run and serves evaluation and embedding.
    let reopened = Run::open(dec_dir.path(), &Device::Cpu).unwrap();
    assert_eq!(reopened.step, 3);
    assert_eq!(reopened.weights_hash, dec.weights_hash);
    let data = load_dataset(&reopened.cfg)
        .unwrap()
        .split(Split::Test)
        .unwrap();
    let (texts, targets) = data.queries();
    let emb = reopened.embed_texts(&texts).unwrap();
    assert_eq!(emb.dims(), &[texts.len(), 16]);
    assert!(!emb.track_op());
    let again = dec.embed_texts(&texts).unwrap();
    let diff: f32 = (&emb - &again)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0);
    let report = reopened.evaluate(&data).unwrap();
    assert_eq!(report.n_texts, targets.len());
    // It cannot stand in for a COTS run where the towers are needed.
    let err = train_cross(&reopened, out_dir.path(), &tc, true, false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("decomposed"), "{err}");

    // The side-by-side comparison: single-stream first, then VLDeformer,
    // COTS and one hybrid row; the reference is 1x itself.
    let cmp = compare(
        &Contenders {
            cross: &ce,
            decomposed: Some(&reopened),
            cots: &run,
            rerank_k: &[2],
        },
        &data,
    )
    .unwrap();
    assert_eq!(cmp.rows.len(), 4);
    assert_eq!(cmp.rows[0].passes, data.items.len() * texts.len());
    assert_eq!(cmp.rows[1].report, report);
    let md = cmp.to_markdown();
    assert!(md.contains("| 1.0x |") && md.contains("VLDeformer") && md.contains("top-2"));
    let files = cmp.write(out_dir.path(), "").unwrap();
    let svg = std::fs::read_to_string(&files[2]).unwrap();
    assert!(svg.contains("VLDeformer"));
}
