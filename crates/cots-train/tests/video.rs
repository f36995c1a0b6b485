//! Text-to-video training end to end at tiny size: clips of sampled frames
//! through the image tower and a temporal head, the image objectives, exact
//! resume (temporal weights, their momentum copy, queues), evaluation with
//! the time-reversed twins, and a gradient for every trainable variable.

use candle_core::{DType, Device, Tensor};
use cots_encoders::temporal::{self, Mode, Readout};
use cots_encoders::two_stream;
use cots_objectives::ObjectivesConfig;
use cots_ops::SeededRng;
use cots_train::config::{DataKind, RunConfig};
use cots_train::inference::Run;
use cots_train::metrics;
use cots_train::model::{Freeze, MaskedTextBatch, StepBatch, System};
use cots_train::trainer::{load_dataset, Trainer};

const TRANSFORMER: Mode = Mode::Transformer {
    layers: 1,
    heads: 2,
    readout: Readout::Mean,
};

fn config(out: &std::path::Path, steps: u64, temporal: Mode) -> RunConfig {
    let mut cfg: RunConfig = toml::from_str(
        r#"
        [model]
        preset = "tiny"
        [data]
        kind = "synthetic_video"
        batch_size = 8
        max_text_len = 16
        [data.image]
        size = 32
        frames = 3
        # Nine frames in three segments of three: the centre frames of a
        # clip and of its reversed twin are the same frames, reversed.
        [data.synthetic_video]
        frames = 9
        variants = 1
        [train]
        log_every = 1
        eval_every = 0
        checkpoint_every = 2
        [objectives.queue]
        size = 32
        [objectives.amf]
        enabled = false
        [[objectives.objectives]]
        kind = "itc"
        [[objectives.objectives]]
        kind = "kl"
        "#,
    )
    .unwrap();
    cfg.model.temporal = temporal;
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
fn a_video_run_trains_resumes_exactly_and_evaluates() {
    let dev = Device::Cpu;
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    Trainer::new(config(a.path(), 4, TRANSFORMER), &dev, false)
        .unwrap()
        .run(true)
        .unwrap();
    // Interrupted after its step-2 checkpoint, then resumed.
    Trainer::new(config(b.path(), 2, TRANSFORMER), &dev, false)
        .unwrap()
        .run(true)
        .unwrap();
    Trainer::new(config(b.path(), 4, TRANSFORMER), &dev, true)
        .unwrap()
        .run(true)
        .unwrap();
    let (la, lb) = (losses(a.path()), losses(b.path()));
    assert_eq!(la.len(), 4, "{la:?}");
    assert_eq!(la, lb, "the resumed loss curve differs");

    // The temporal head and its momentum copy are in the checkpoint.
    let ckpt = cots_train::checkpoint::latest(&b.path().join("checkpoints"))
        .unwrap()
        .unwrap();
    let (tensors, _) = cots_train::checkpoint::load(&ckpt).unwrap();
    for side in ["online", "momentum"] {
        let key = format!("{side}.model.temporal.frame_position_embeddings.weight");
        assert_eq!(tensors[&key].dims(), &[3, 64], "{key}");
        assert!(tensors
            .keys()
            .any(|k| k.starts_with(&format!("{side}.model.temporal.encoder.layer.0."))));
    }

    let run = Run::open(b.path(), &dev).unwrap();
    assert_eq!(run.cfg.data.image.frames, Some(3));
    let test = load_dataset(&run.cfg)
        .unwrap()
        .split(cots_data::Split::Test)
        .unwrap();
    let report = run.evaluate(&test).unwrap();
    assert_eq!(report.modality, "video");
    assert_eq!(report.n_images, test.items.len());
    assert_eq!(report.n_texts, 2 * test.items.len());
    let twin = report
        .hard_negative_accuracy
        .expect("twins are in the test split");
    assert!((0.0..=100.0).contains(&twin), "{twin}");
    assert!(report.t2i.at(1).is_some() && report.i2t.at(10).is_some());
}

/// Mean pooling cannot tell a clip from its time-reversed twin (the same
/// frames, so the embeddings agree to rounding); the temporal transformer
/// can, even untrained (its frame positions start small, so the gap does too).
#[test]
fn only_the_temporal_transformer_separates_twins() {
    let dev = Device::Cpu;
    for (mode, separates) in [(Mode::Mean, false), (TRANSFORMER, true)] {
        let dir = tempfile::tempdir().unwrap();
        let trainer = Trainer::new(config(dir.path(), 1, mode), &dev, false).unwrap();
        let cfg = &trainer.task.cfg;
        let test = load_dataset(cfg)
            .unwrap()
            .split(cots_data::Split::Test)
            .unwrap();
        let twins = test.twins().expect("every test clip has its twin");
        let sources: Vec<_> = test.items.iter().map(|i| i.source.clone()).collect();
        let emb = cots_train::inference::embed_images(
            &trainer.task.system.model,
            &sources,
            &cfg.data.image,
            &dev,
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
        let gap = (0..emb.len())
            .map(|i| {
                emb[i]
                    .iter()
                    .zip(&emb[twins[i]])
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max)
            })
            .fold(0f32, f32::max);
        if separates {
            assert!(gap > 1e-4, "{mode:?}: twins embed alike ({gap})");
        } else {
            assert!(gap < 1e-5, "{mode:?}: twins differ by {gap}");
        }
    }
}

#[test]
fn every_trainable_variable_gets_a_gradient_in_video_mode() {
    let dev = Device::Cpu;
    let vocab = 30;
    let base = two_stream::Config::tiny(vocab);
    let (b, t, l) = (4, 3, 8);
    let cfg = two_stream::Config {
        temporal: Some(temporal::Config {
            mode: Mode::Transformer {
                layers: 2,
                heads: 2,
                readout: Readout::Cls,
            },
            num_frames: t,
            hidden: base.vision.hidden_size,
            ..temporal::Config::default()
        }),
        max_text_len: l,
        ..base
    };
    let objectives: ObjectivesConfig = toml::from_str(
        r#"
        [queue]
        size = 8
        [amf]
        enabled = false
        [[objectives]]
        kind = "itc"
        [[objectives]]
        kind = "mvlm"
        mvm = false
        [[objectives]]
        kind = "kl"
        "#,
    )
    .unwrap();
    let mut system = System::new(&cfg, &objectives, None, Freeze::default(), &dev, 3).unwrap();
    let rng = SeededRng::new(5);
    let s = cfg.vision.image_size;
    let pixels: Vec<f32> = rng
        .uniform(b * t * 3 * s * s)
        .into_iter()
        .map(|u| 2.0 * u - 1.0)
        .collect();
    // Token ids 5.. are words; 1 is [CLS], 2 [SEP] and 4 [MASK] here.
    let ids: Vec<u32> = (0..b * l)
        .map(|i| match i % l {
            0 => 1,
            x if x == l - 1 => 2,
            x => 5 + ((i * 7 + x) % (vocab - 5)) as u32,
        })
        .collect();
    let (mut masked, mut labels) = (ids.clone(), vec![-100i64; b * l]);
    for row in 0..b {
        let j = row * l + 2 + row % 3;
        labels[j] = i64::from(ids[j]);
        masked[j] = 4;
    }
    let batch = StepBatch {
        pixels: Tensor::from_vec(pixels, (b, t, 3, s, s), &dev).unwrap(),
        input_ids: Tensor::from_vec(ids, (b, l), &dev).unwrap(),
        attention_mask: Tensor::ones((b, l), DType::U32, &dev).unwrap(),
        image_ids: Tensor::from_vec((0..b as u32).collect::<Vec<_>>(), b, &dev).unwrap(),
        mlm: Some(MaskedTextBatch::from_host(masked, &labels, (b, l), vocab, &dev).unwrap()),
        mvm: None,
    };
    let out = system.forward(&batch, Some(&rng)).unwrap();
    let grads = out.losses.total.backward().unwrap();
    let vars = system.trainable();
    assert!(vars
        .iter()
        .any(|(n, _)| n == "model.temporal.frame_position_embeddings.weight"));
    assert!(vars.iter().any(|(n, _)| n == "model.temporal.cls_token"));
    let mut bad = Vec::new();
    for (name, var) in &vars {
        // The ViT's mask token only enters masked vision modeling, which
        // video training does not run.
        if name == "model.vision.embeddings.mask_token" {
            continue;
        }
        match grads.get(var.as_tensor()) {
            None => bad.push(format!("{name}: no gradient")),
            Some(g) => {
                let g = g
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                if g.iter().any(|v| !v.is_finite()) {
                    bad.push(format!("{name}: non-finite"));
                } else if g.iter().all(|&v| v == 0.0) {
                    bad.push(format!("{name}: zero"));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "variables without a usable gradient: {bad:#?}"
    );
}

#[test]
fn video_configs_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1, Mode::Mean);
    cfg.data.image.frames = None;
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("data.image.frames"), "{e}");
    let mut cfg = config(dir.path(), 1, TRANSFORMER);
    cfg.data.kind = DataKind::Synthetic;
    // The embedded clips' settings belong to `synthetic_video` only.
    cfg.data.synthetic_video = Default::default();
    cfg.data.image.frames = None;
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("model.temporal"), "{e}");
    // Masked vision modeling has no meaning on clips here.
    let mut cfg = config(dir.path(), 1, Mode::Mean);
    cfg.objectives = toml::from_str(
        r#"
        [[objectives]]
        kind = "mvlm"
        mlm = false
        "#,
    )
    .unwrap();
    let e = Trainer::new(cfg, &Device::Cpu, false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("masked vision modeling") || e.contains("visual tokenizer"),
        "{e}"
    );
}

/// A JSONL video manifest becomes a dataset of video items; a missing video
/// is an error naming the manifest, or, under `on_bad_input = "skip"`, is
/// left out.
#[test]
fn a_video_manifest_loads_and_missing_files_are_named() {
    use cots_data::video::encode::write_gif;
    use cots_data::ImageSource;
    let dir = tempfile::tempdir().unwrap();
    let frames: Vec<_> = (0..4u8)
        .map(|i| image::RgbImage::from_pixel(8, 8, image::Rgb([40 * i, 0, 0])))
        .collect();
    for name in ["a", "b"] {
        write_gif(&dir.path().join(format!("{name}.gif")), &frames, 10).unwrap();
    }
    let manifest = dir.path().join("videos.jsonl");
    std::fs::write(
        &manifest,
        concat!(
            r#"{"video": "a.gif", "captions": ["a red fade"], "split": "train"}"#,
            "\n",
            r#"{"video": "b.gif", "captions": ["another red fade"], "split": "test"}"#,
            "\n",
            r#"{"video": "gone.mp4", "captions": ["never written"], "split": "test"}"#,
            "\n"
        ),
    )
    .unwrap();
    let mut cfg = config(dir.path(), 1, Mode::Mean);
    cfg.data.kind = DataKind::VideoManifest;
    // The embedded clips' settings belong to `synthetic_video` only.
    cfg.data.synthetic_video = Default::default();
    cfg.data.path = Some(manifest.clone());
    cfg.validate().unwrap();
    let e = load_dataset(&cfg).unwrap_err().to_string();
    assert!(e.contains("videos.jsonl") && e.contains("gone.mp4"), "{e}");
    cfg.data.on_bad_input = cots_data::loader::SkipPolicy::Skip;
    let data = load_dataset(&cfg).unwrap();
    assert_eq!(data.items.len(), 2);
    assert!(matches!(&data.items[1].source, ImageSource::Video(p) if p.ends_with("b.gif")));
    assert_eq!(data.items[1].split, cots_data::Split::Test);
}

/// A video run started from an image-text run (`model.init`) takes its
/// towers, momentum copy included, and starts the temporal head fresh.
#[test]
fn a_video_run_starts_from_an_image_run() {
    let dev = Device::Cpu;
    let image_dir = tempfile::tempdir().unwrap();
    let mut image: RunConfig = toml::from_str(
        r#"
        [model]
        preset = "tiny"
        [data]
        kind = "synthetic"
        batch_size = 8
        max_text_len = 16
        [data.synthetic]
        train = 16
        val = 4
        test = 4
        [train]
        steps = 1
        eval_every = 0
        [objectives.queue]
        size = 16
        [objectives.amf]
        enabled = false
        [[objectives.objectives]]
        kind = "itc"
        "#,
    )
    .unwrap();
    image.train.out = image_dir.path().to_path_buf();
    Trainer::new(image, &dev, false).unwrap().run(true).unwrap();
    let ckpt = cots_train::checkpoint::latest(&image_dir.path().join("checkpoints"))
        .unwrap()
        .unwrap();
    let (tensors, _) = cots_train::checkpoint::load(&ckpt).unwrap();

    let video_dir = tempfile::tempdir().unwrap();
    let mut cfg = config(video_dir.path(), 1, TRANSFORMER);
    cfg.model.init = Some(image_dir.path().to_path_buf());
    let trainer = Trainer::new(cfg, &dev, false).unwrap();
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let online = cots_train::model::sorted_vars(&trainer.task.system.online);
    let momentum = cots_train::model::sorted_vars(&trainer.task.system.momentum_vars);
    for name in [
        "model.vision.embeddings.cls_token",
        "model.text.embeddings.word_embeddings.weight",
        "model.vision_proj.weight",
    ] {
        let want = values(&tensors[&format!("online.{name}")]);
        let on = online.iter().find(|(n, _)| n == name).unwrap();
        let mo = momentum.iter().find(|(n, _)| n == name).unwrap();
        assert_eq!(values(on.1.as_tensor()), want, "{name}");
        assert_eq!(values(mo.1.as_tensor()), want, "momentum {name}");
    }
    assert!(online
        .iter()
        .any(|(n, _)| n.starts_with("model.temporal.encoder.layer.0.")));
}

/// `data.kind = "msrvtt"`: the 1k-A join from a run config, through the
/// same missing-file policy as the other video kinds.
#[test]
fn msrvtt_annotations_load_from_a_run_config() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("MSRVTT_data.json"),
        r#"{"videos": [{"video_id": "video0", "split": "train"},
                       {"video_id": "video1", "split": "train"},
                       {"video_id": "video7", "split": "test"}],
            "sentences": [{"caption": "a man sings", "video_id": "video0"},
                          {"caption": "a cat jumps", "video_id": "video1"},
                          {"caption": "cars race", "video_id": "video7"}]}"#,
    )
    .unwrap();
    std::fs::write(d.join("train.csv"), "video_id\nvideo0\nvideo1\n").unwrap();
    std::fs::write(
        d.join("test.csv"),
        "key,vid_key,video_id,sentence\nret0,msr7,video7,cars race\n",
    )
    .unwrap();
    let videos = d.join("videos");
    std::fs::create_dir(&videos).unwrap();
    std::fs::write(videos.join("video0.mp4"), b"").unwrap();
    std::fs::create_dir(videos.join("video7")).unwrap(); // a frame folder
    let mut cfg = config(d, 1, Mode::Mean);
    cfg.data.kind = DataKind::Msrvtt;
    // The embedded clips' settings belong to `synthetic_video` only.
    cfg.data.synthetic_video = Default::default();
    cfg.data.path = Some(d.join("MSRVTT_data.json"));
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("[data.msrvtt]"));
    cfg.data.msrvtt = Some(cots_train::config::MsrvttFiles {
        train_list: d.join("train.csv"),
        test_csv: d.join("test.csv"),
    });
    cfg.data.root = Some(videos);
    let e = load_dataset(&cfg).unwrap_err().to_string();
    assert!(e.contains("train.csv") && e.contains("video1"), "{e}");
    cfg.data.on_bad_input = cots_data::loader::SkipPolicy::Skip;
    let data = load_dataset(&cfg).unwrap();
    assert_eq!(data.items.len(), 2);
    assert_eq!(data.items[1].captions, vec!["cars race"]);
    assert_eq!(data.items[1].split, cots_data::Split::Test);
}
