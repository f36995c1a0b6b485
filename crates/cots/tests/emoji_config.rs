//! The emoji benchmark's run configs parse as run configs: configs/emoji.toml
//! and the per-style eval configs the builder writes.

use std::path::{Path, PathBuf};

use cots_train::config::{DataKind, RunConfig};

#[test]
fn emoji_config_trains_on_the_manifest_at_64_px() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/emoji.toml");
    let cfg = RunConfig::load(&path).unwrap();
    assert_eq!(cfg.data.kind, DataKind::Manifest);
    assert_eq!(
        cfg.data.path.as_deref(),
        Some(Path::new("data/emoji/manifest.jsonl"))
    );
    assert_eq!(cfg.data.image.size, 64);
    let model = cfg.model.two_stream.as_ref().unwrap();
    assert_eq!(model.vision.image_size, 64);
    assert!(
        cfg.model.text_init.is_none(),
        "runnable without the MiniLM download"
    );
}

#[test]
fn per_style_eval_configs_name_their_gallery() {
    for gallery in [
        PathBuf::from("data/emoji/test-google.jsonl"),
        PathBuf::from(r#"C:\odd "dir"\test-openmoji.jsonl"#),
    ] {
        let text = cots_datasets::emoji::eval_config("google", &gallery).unwrap();
        let cfg: RunConfig = toml::from_str(&text).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.data.kind, DataKind::Manifest);
        assert_eq!(cfg.data.path.as_deref(), Some(gallery.as_path()));
    }
}

/// The three animated-emoji runs compare: they differ only in the temporal
/// head and in which frames the model sees, and match the image run they
/// start from.
#[test]
fn emoji_video_configs_differ_only_in_the_temporal_head_and_frames() {
    use cots_data::image_io::FrameSampling;
    use cots_encoders::temporal::Mode;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let load = |name: &str| RunConfig::load(&dir.join(name)).unwrap();
    let image = load("emoji.toml");
    let mean = load("emoji-video.toml");
    let temporal = load("emoji-video-temporal.toml");
    let first = load("emoji-video-first.toml");
    for cfg in [&mean, &temporal, &first] {
        assert!(cfg.is_video());
        assert_eq!(cfg.data.kind, DataKind::VideoManifest);
        assert_eq!(
            cfg.data.path.as_deref(),
            Some(Path::new("data/emoji-video/manifest.jsonl"))
        );
        assert_eq!(cfg.model.init.as_deref(), Some(Path::new("runs/emoji")));
        assert_eq!(cfg.model.two_stream, image.model.two_stream);
        assert_eq!(cfg.data.image.size, image.data.image.size);
        // Same budget and objectives in all three rows.
        assert_eq!(cfg.optim, mean.optim);
        assert_eq!(cfg.schedule, mean.schedule);
        assert_eq!(cfg.objectives, mean.objectives);
        assert_eq!(cfg.train.steps, mean.train.steps);
        assert_eq!(cfg.data.batch_size, mean.data.batch_size);
    }
    assert_eq!(mean.model.temporal, Mode::Mean);
    assert_ne!(temporal.model.temporal, Mode::Mean);
    assert_eq!(mean.data.image.frames, Some(4));
    assert_eq!(temporal.data.image.frames, Some(4));
    assert_eq!(mean.data.image.frame_sampling, FrameSampling::Tsn);
    assert_eq!(first.data.image.frames, Some(1));
    assert_eq!(first.data.image.frame_sampling, FrameSampling::First);
    assert_eq!(first.model.temporal, Mode::Mean);
    let outs: std::collections::BTreeSet<_> = [&mean, &temporal, &first]
        .iter()
        .map(|c| c.train.out.clone())
        .collect();
    assert_eq!(outs.len(), 3, "each row has its own run folder");
}

#[test]
fn the_video_eval_config_names_the_test_split() {
    let test = PathBuf::from("data/emoji-video/test.jsonl");
    let text = cots_datasets::emoji_video::eval_config(&test).unwrap();
    let cfg: RunConfig = toml::from_str(&text).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.data.kind, DataKind::VideoManifest);
    assert_eq!(cfg.data.path.as_deref(), Some(test.as_path()));
}
