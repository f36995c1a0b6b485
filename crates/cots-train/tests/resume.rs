//! A run interrupted and resumed from its checkpoint follows the loss curve
//! of the uninterrupted run exactly (CPU), and two runs with one seed agree.

use candle_core::Device;
use cots_train::config::RunConfig;
use cots_train::metrics;
use cots_train::trainer::Trainer;

fn config(out: &std::path::Path, steps: u64) -> RunConfig {
    let mut cfg: RunConfig = toml::from_str(
        r#"
        [model]
        preset = "tiny"
        [data]
        kind = "synthetic"
        batch_size = 8
        max_text_len = 20
        [data.synthetic]
        train = 64
        val = 8
        test = 8
        [train]
        log_every = 1
        eval_every = 0
        checkpoint_every = 3
        [objectives.queue]
        size = 32
        [objectives.amf]
        enabled = true
        warmup_steps = 2
        [[objectives.objectives]]
        kind = "itc"
        [[objectives.objectives]]
        kind = "kl"
        "#,
    )
    .unwrap();
    cfg.train.steps = steps;
    cfg.train.out = out.to_path_buf();
    cfg
}

fn losses(out: &std::path::Path) -> Vec<(u64, f64)> {
    metrics::read(&out.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r["loss/total"].as_f64()?)))
        .collect()
}

#[test]
fn resumed_run_matches_the_uninterrupted_one() {
    let dev = Device::Cpu;
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    Trainer::new(config(a.path(), 6), &dev, false)
        .unwrap()
        .run(true)
        .unwrap();

    // The "killed" run: stops after its step-3 checkpoint, then resumes.
    Trainer::new(config(b.path(), 3), &dev, false)
        .unwrap()
        .run(true)
        .unwrap();
    Trainer::new(config(b.path(), 6), &dev, true)
        .unwrap()
        .run(true)
        .unwrap();

    let (la, lb) = (losses(a.path()), losses(b.path()));
    assert_eq!(la.len(), 6, "{la:?}");
    assert_eq!(la, lb, "the resumed loss curve differs");
}

#[test]
fn a_fresh_run_refuses_to_overwrite_and_resume_needs_a_checkpoint() {
    let dev = Device::Cpu;
    let a = tempfile::tempdir().unwrap();
    let e = Trainer::new(config(a.path(), 2), &dev, true)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no complete checkpoint"), "{e}");
    Trainer::new(config(a.path(), 3), &dev, false)
        .unwrap()
        .run(true)
        .unwrap();
    let e = Trainer::new(config(a.path(), 3), &dev, false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--resume"), "{e}");
}

#[test]
fn a_diverging_run_stops_with_a_clear_error_and_keeps_its_checkpoint() {
    let dev = Device::Cpu;
    let a = tempfile::tempdir().unwrap();
    let mut cfg = config(a.path(), 40);
    cfg.train.checkpoint_every = 1;
    // An absurd learning rate without clipping makes the weights overflow.
    cfg.optim.lr = 1e30;
    cfg.optim.grad_clip = 0.0;
    cfg.schedule.warmup_steps = 0;
    let err = Trainer::new(cfg, &dev, false)
        .unwrap()
        .run(true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("training stopped"), "{err}");
    let last = cots_train::checkpoint::latest(&a.path().join("checkpoints")).unwrap();
    let last = last.expect("the last good checkpoint is kept");
    assert!(
        err.contains(&last.display().to_string()),
        "{err} should name {}",
        last.display()
    );
    let (tensors, _) = cots_train::checkpoint::load(&last).unwrap();
    for (name, t) in tensors {
        let v = t
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name} in the kept checkpoint is not finite"
        );
    }
}
