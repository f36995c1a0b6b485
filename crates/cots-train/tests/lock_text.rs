//! A locked text tower (`model.lock_text`) does not move during training
//! while the rest does, and the momentum shortcut it takes (the locked tower
//! is its own momentum copy) gives what the momentum model itself computes.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use cots_train::config::RunConfig;
use cots_train::model::sorted_vars;
use cots_train::trainer::Trainer;

fn config(out: &std::path::Path) -> RunConfig {
    let mut cfg: RunConfig = toml::from_str(
        r#"
        [model]
        preset = "tiny"
        lock_text = true
        [data]
        kind = "synthetic"
        batch_size = 8
        max_text_len = 20
        [data.synthetic]
        train = 32
        val = 8
        test = 8
        [train]
        steps = 3
        eval_every = 0
        checkpoint_every = 3
        momentum = 0.5
        [objectives.queue]
        size = 16
        [[objectives.objectives]]
        kind = "itc"
        [[objectives.objectives]]
        kind = "kl"
        "#,
    )
    .unwrap();
    cfg.train.out = out.to_path_buf();
    cfg
}

fn snapshot(vars: &[(String, candle_core::Var)]) -> HashMap<String, Vec<f32>> {
    vars.iter()
        .map(|(n, v)| {
            let t = v.as_tensor().flatten_all().unwrap();
            (
                n.clone(),
                t.to_dtype(DType::F32).unwrap().to_vec1().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_locked_text_tower_stays_put_and_the_rest_trains() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(config(dir.path()), &Device::Cpu, false).unwrap();
    let all = sorted_vars(&t.system.online);
    let trainable: Vec<String> = t.system.trainable().into_iter().map(|(n, _)| n).collect();
    assert!(trainable.iter().all(|n| !n.starts_with("model.text.")));
    assert!(trainable.iter().any(|n| n.starts_with("model.text_proj.")));
    let before = snapshot(&all);
    for _ in 0..3 {
        t.train_step().unwrap();
    }
    let after = snapshot(&all);
    let moved = |prefix: &str| {
        before
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .any(|(n, v)| after[n] != *v)
    };
    let text: Vec<&String> = before
        .keys()
        .filter(|n| n.starts_with("model.text."))
        .collect();
    assert!(!text.is_empty());
    for n in text {
        assert_eq!(
            after[n], before[n],
            "{n} moved although the text tower is locked"
        );
    }
    assert!(moved("model.text_proj."), "the text projection must train");
    assert!(moved("model.vision."), "the image tower must train");

    // The momentum text tower still equals the locked online one, so the
    // shortcut (online states through the momentum projection) is exact.
    let ids = Tensor::new(&[[2u32, 5, 7, 3, 0], [2, 9, 4, 6, 3]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 0], [1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
    let direct = t
        .system
        .model_m
        .encode_text(&ids, Some(&mask), None)
        .unwrap()
        .embed;
    let hidden = t
        .system
        .model
        .text()
        .forward(&ids, None, Some(&mask), None)
        .unwrap();
    let pooled = t.system.model_m.pool_text(&hidden, Some(&mask)).unwrap();
    let shortcut = t.system.model_m.project_text(&pooled).unwrap();
    let diff = (direct - shortcut)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-6, "momentum shortcut differs by {diff}");
}
