//! Frozen towers. A locked text tower (`model.lock_text`) and a pretrained
//! CNN image tower (`image_tower = "efficientnet-lite0"`, `model.image_init`)
//! do not move during training while the rest does; the momentum shortcut
//! each takes (a frozen tower is its own momentum copy) gives what the
//! momentum model itself computes; and their remembered features
//! (`cots_train::frozen`) train exactly like recomputed ones. Random weights
//! stand in for the ImageNet ones.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cots_encoders::efficientnet::{self, EfficientNetLite};
use cots_encoders::two_stream::{self, ImageTower};
use cots_ops::SeededRng;
use cots_train::config::RunConfig;
use cots_train::model::sorted_vars;
use cots_train::trainer::Trainer;

fn config(out: &Path, image_init: Option<&Path>) -> RunConfig {
    let mut cfg: RunConfig = toml::from_str(
        r#"
        [model]
        preset = "tiny"
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
    cfg.model.two_stream = Some(two_stream::Config {
        image_tower: ImageTower::EfficientnetLite0,
        ..two_stream::Config::tiny(10)
    });
    cfg.model.image_init = image_init.map(Path::to_path_buf);
    cfg.train.out = out.to_path_buf();
    cfg
}

/// EfficientNet-Lite0 with random weights (positive running variances),
/// saved under the checkpoint's names.
fn random_weights(path: &Path) -> HashMap<String, Vec<f32>> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    EfficientNetLite::new(&efficientnet::Config::lite0(), vb).unwrap();
    let rng = SeededRng::new(7);
    let mut values = HashMap::new();
    for (name, var) in sorted_vars(&vm) {
        let n = var.elem_count();
        let u: Vec<f32> = rng.uniform(n);
        let v: Vec<f32> = if name.ends_with("running_var") {
            u.iter().map(|x| 0.5 + x).collect()
        } else {
            let fan_in = (n / var.dims()[0].max(1)).max(1) as f32;
            u.iter()
                .map(|x| (2.0 * x - 1.0) * (3.0 / fan_in).sqrt())
                .collect()
        };
        var.set(&Tensor::from_vec(v.clone(), var.dims(), &Device::Cpu).unwrap())
            .unwrap();
        values.insert(name, v);
    }
    vm.save(path).unwrap();
    values
}

/// The momentum model's own embeddings and the shortcut's agree.
fn assert_same_embeddings(direct: &Tensor, shortcut: &Tensor) {
    let diff = (direct - shortcut)
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .unwrap();
    assert!(diff < 1e-6, "momentum shortcut differs by {diff}");
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
fn a_pretrained_cnn_tower_is_loaded_and_stays_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("effnet.safetensors");
    let file = random_weights(&weights);
    let mut t = Trainer::new(
        config(&dir.path().join("run"), Some(&weights)),
        &Device::Cpu,
        false,
    )
    .unwrap();

    let all = sorted_vars(&t.task.system.online);
    let vision: Vec<&String> = all
        .iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with("model.vision."))
        .collect();
    assert_eq!(vision.len(), file.len(), "every file tensor is a variable");
    let before = snapshot(&all);
    for n in &vision {
        let key = n.trim_start_matches("model.vision.");
        assert_eq!(before[*n], file[key], "{n} was not loaded from the file");
    }
    let trainable: Vec<String> = t
        .task
        .system
        .trainable()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(trainable.iter().all(|n| !n.starts_with("model.vision.")));
    assert!(trainable
        .iter()
        .any(|n| n.starts_with("model.vision_proj.")));

    for _ in 0..3 {
        t.train_step().unwrap();
    }
    let after = snapshot(&all);
    for n in &vision {
        assert_eq!(
            after[*n], before[*n],
            "{n} moved although the CNN is frozen"
        );
    }
    let moved = |prefix: &str| {
        before
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .any(|(n, v)| after[n] != *v)
    };
    assert!(
        moved("model.vision_proj."),
        "the image projection must train"
    );
    assert!(moved("model.text."), "the text tower must train");

    // The momentum CNN equals the frozen online one, so the shortcut is exact.
    let pixels = Tensor::from_vec(
        SeededRng::new(3).uniform(2 * 3 * 32 * 32),
        (2, 3, 32, 32),
        &Device::Cpu,
    )
    .unwrap()
    .affine(2.0, -1.0)
    .unwrap();
    let direct = t
        .task
        .system
        .model_m
        .encode_image(&pixels, None, None)
        .unwrap()
        .embed;
    let hidden = t
        .task
        .system
        .model
        .encode_image(&pixels, None, None)
        .unwrap()
        .hidden;
    assert_eq!(
        hidden.dims(),
        &[2, 1, efficientnet::Config::lite0().out_dim()]
    );
    let shortcut = t
        .task
        .system
        .model_m
        .project_image(&hidden.get_on_dim(1, 0).unwrap(), None)
        .unwrap();
    assert_same_embeddings(&direct, &shortcut);
}

#[test]
fn a_cnn_tower_without_weights_or_weights_for_a_vit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = Trainer::new(config(dir.path(), None), &Device::Cpu, false)
        .err()
        .expect("no image_init must be refused")
        .to_string();
    assert!(err.contains("image_init"), "{err}");

    let mut cfg = config(dir.path(), Some(&dir.path().join("unused.safetensors")));
    cfg.model.two_stream.as_mut().unwrap().image_tower = ImageTower::Vit;
    let err = Trainer::new(cfg, &Device::Cpu, false)
        .err()
        .expect("image_init on a ViT must be refused")
        .to_string();
    assert!(err.contains("efficientnet-lite0"), "{err}");

    let missing = dir.path().join("missing.pth");
    let err = Trainer::new(config(dir.path(), Some(&missing)), &Device::Cpu, false)
        .err()
        .expect("a missing weights file must be refused")
        .to_string();
    assert!(err.contains("missing.pth"), "{err}");
}

#[test]
fn remembered_frozen_features_train_exactly_like_recomputed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("effnet.safetensors");
    random_weights(&weights);
    let losses = |cache: bool| -> (Vec<f64>, u64, u64) {
        let mut cfg = config(&dir.path().join(format!("run-{cache}")), Some(&weights));
        cfg.model.lock_text = true;
        let mut t = Trainer::new(cfg, &Device::Cpu, false).unwrap();
        let s = &mut t.task.system;
        s.frozen_image.as_mut().unwrap().cache.enabled = cache;
        s.locked_text.as_mut().unwrap().cache.enabled = cache;
        // 32 training pairs in batches of 8: steps 5 and 6 see known inputs.
        let losses = (0..6).map(|_| t.train_step().unwrap().loss).collect();
        let s = &t.task.system;
        let (i, x) = (
            &s.frozen_image.as_ref().unwrap().cache,
            &s.locked_text.as_ref().unwrap().cache,
        );
        // Every row of the 6 batches is either looked up or computed.
        if cache {
            assert_eq!(i.hits + i.misses, 48);
            assert_eq!(x.hits + x.misses, 48);
            assert_eq!(x.misses as usize, x.len());
        }
        (losses, i.hits, x.hits)
    };
    let (cached, image_hits, text_hits) = losses(true);
    let (fresh, no_hits, _) = losses(false);
    // Each image comes back in the second epoch; captions are drawn anew.
    assert!(
        image_hits >= 16 && text_hits >= 1,
        "{image_hits} {text_hits}"
    );
    assert_eq!(no_hits, 0);
    for (s, (a, b)) in cached.iter().zip(&fresh).enumerate() {
        assert!(a.is_finite());
        assert!(
            (a - b).abs() <= 1e-6 * b.abs().max(1.0),
            "step {s}: {a} vs {b}"
        );
    }
}

#[test]
fn a_locked_text_tower_stays_put_and_the_rest_trains() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), None);
    cfg.model.two_stream = None;
    cfg.model.lock_text = true;
    let mut t = Trainer::new(cfg, &Device::Cpu, false).unwrap();
    let all = sorted_vars(&t.task.system.online);
    let trainable: Vec<String> = t
        .task
        .system
        .trainable()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
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
        .task
        .system
        .model_m
        .encode_text(&ids, Some(&mask), None)
        .unwrap()
        .embed;
    let hidden = t
        .task
        .system
        .model
        .text()
        .forward(&ids, None, Some(&mask), None)
        .unwrap();
    let pooled = t
        .task
        .system
        .model_m
        .pool_text(&hidden, Some(&mask))
        .unwrap();
    let shortcut = t.task.system.model_m.project_text(&pooled, None).unwrap();
    assert_same_embeddings(&direct, &shortcut);
}
