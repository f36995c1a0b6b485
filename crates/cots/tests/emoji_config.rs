//! The emoji benchmark's run configs parse as run configs: configs/emoji.toml
//! and the per-style eval configs the builder writes.

use std::path::{Path, PathBuf};

use cots_train::config::RunConfig;

#[test]
fn emoji_config_trains_on_the_manifest_at_64_px() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/emoji.toml");
    let cfg = RunConfig::load(&path).unwrap();
    assert_eq!(cfg.data.kind, "manifest");
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
        let text = cots_data::emoji::eval_config("google", &gallery);
        let cfg: RunConfig = toml::from_str(&text).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.data.kind, "manifest");
        assert_eq!(cfg.data.path.as_deref(), Some(gallery.as_path()));
    }
}
