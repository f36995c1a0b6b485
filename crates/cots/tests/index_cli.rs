//! `cots index` end to end on a tiny run trained for two steps: build from a
//! run config's dataset (resumable), search (exact, approximate, int8, with
//! filters) against scores computed here from the run and the stored
//! vectors, add a folder with a corrupt image, remove, export, and the
//! refusal to search with another checkpoint.

use std::path::Path;

mod common;
use common::{fails, ok};

use candle_core::Device;
use cots_index::Index;
use cots_train::config::RunConfig;
use cots_train::inference::Run;
use cots_train::trainer::Trainer;

fn tiny_run(out: &Path) {
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
        val = 4
        test = 12
        [train]
        log_every = 1
        eval_every = 0
        checkpoint_every = 2
        [objectives.queue]
        size = 16
        [[objectives.objectives]]
        kind = "itc"
        "#,
    )
    .unwrap();
    cfg.train.steps = 2;
    cfg.train.out = out.to_path_buf();
    Trainer::new(cfg, &Device::Cpu, false)
        .unwrap()
        .run(true)
        .unwrap();
}

fn hits(json: &str) -> Vec<(String, f32)> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["id"].as_str().unwrap().to_string(),
                h["score"].as_f64().unwrap() as f32,
            )
        })
        .collect()
}

#[test]
fn build_search_add_remove_export() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    tiny_run(&run_dir);
    let run_s = run_dir.to_str().unwrap();
    let idx = tmp.path().join("idx");
    let idx_s = idx.to_str().unwrap();
    let config = run_dir.join("config.toml");
    let config_s = config.to_str().unwrap();

    let build = [
        "index",
        "build",
        "--run",
        run_s,
        "--out",
        idx_s,
        "--data-config",
        config_s,
        "--split",
        "test",
        "--chunk",
        "5",
        "--ann",
        "--int8",
    ];
    ok(&build);
    let index = Index::open(&idx).unwrap();
    assert_eq!(index.len(), 12);
    assert!(index.is_quantized() && index.ann_params().is_some());
    let first = index.items()[0].clone();
    assert_eq!(first.metadata["split"], "test");
    assert!(!first.captions.is_empty());
    assert!(index.thumbnail(&first.id).unwrap().is_some());

    // Resumable: with items gone (as if the build had stopped early) the
    // same command embeds only the missing ones.
    let gone: Vec<String> = index.items()[7..].iter().map(|i| i.id.clone()).collect();
    drop(index);
    let mut index = Index::open(&idx).unwrap();
    index.remove(&gone).unwrap();
    drop(index);
    let out = ok(&build);
    assert!(out.contains("resuming: 7 of 12 items"), "{out}");
    assert_eq!(Index::open(&idx).unwrap().len(), 12);

    // Search: the scores are the dot products of the run's query embedding
    // with the stored vectors, and the exact ranking is their full sort.
    let run = Run::open(&run_dir, &Device::Cpu).unwrap();
    let query = first.captions[0].clone();
    let q: Vec<f32> = run
        .embed_texts(std::slice::from_ref(&query))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let index = Index::open(&idx).unwrap();
    let mut want: Vec<(String, f32)> = (0..index.len())
        .map(|r| {
            let v = index.vector(r).unwrap();
            (
                index.items()[r].id.clone(),
                v.iter().zip(&q).map(|(a, b)| a * b).sum(),
            )
        })
        .collect();
    want.sort_by(|a, b| b.1.total_cmp(&a.1));
    let got = hits(&ok(&[
        "index", "search", "--index", idx_s, "--run", run_s, &query, "-k", "4", "--json",
    ]));
    assert_eq!(got.len(), 4);
    for ((id, s), (wid, ws)) in got.iter().zip(&want) {
        assert!((s - ws).abs() < 1e-4, "{id} {s} vs {wid} {ws}");
    }
    // On 12 items the graph and a 12-row int8 short list find the same top 4.
    for extra in [&["--approx"][..], &["--int8", "12"][..]] {
        let mut args = vec![
            "index", "search", "--index", idx_s, "--run", run_s, &query, "-k", "4", "--json",
        ];
        args.extend_from_slice(extra);
        let other = hits(&ok(&args));
        let ids = |h: &[(String, f32)]| h.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&other), ids(&got), "{extra:?}");
    }
    let filtered = hits(&ok(&[
        "index",
        "search",
        "--index",
        idx_s,
        "--run",
        run_s,
        &query,
        "--filter",
        "split=train",
        "--json",
    ]));
    assert!(filtered.is_empty());
    let text = ok(&[
        "index", "search", "--index", idx_s, "--run", run_s, &query, "-k", "2",
    ]);
    assert!(text.contains("top 2 of 12 items"), "{text}");

    // A folder with one corrupt image: an error naming it, or skipped.
    let folder = tmp.path().join("more");
    std::fs::create_dir_all(folder.join("sub")).unwrap();
    for (i, name) in ["a.png", "sub/b.png", "c.png"].iter().enumerate() {
        let img = image::RgbImage::from_fn(40, 30, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 8) as u8, (i * 90) as u8])
        });
        img.save(folder.join(name)).unwrap();
    }
    std::fs::write(folder.join("broken.jpg"), b"not a jpeg").unwrap();
    let folder_s = folder.to_str().unwrap();
    let err = fails(&[
        "index", "add", "--index", idx_s, "--run", run_s, "--folder", folder_s,
    ]);
    assert!(err.contains("broken.jpg"), "{err}");
    let out = ok(&[
        "index",
        "add",
        "--index",
        idx_s,
        "--run",
        run_s,
        "--folder",
        folder_s,
        "--skip-bad",
    ]);
    assert!(out.contains("skipped 1 image"), "{out}");
    let index = Index::open(&idx).unwrap();
    assert_eq!(index.len(), 15);
    let (_, b) = index.item("sub_b").unwrap();
    assert_eq!(b.metadata["folder"], "sub");
    // The image query of an indexed image finds it first.
    let img_hits = hits(&ok(&[
        "index",
        "search",
        "--index",
        idx_s,
        "--run",
        run_s,
        "--image",
        folder.join("c.png").to_str().unwrap(),
        "-k",
        "1",
        "--json",
    ]));
    assert_eq!(img_hits[0].0, "c");
    assert!((img_hits[0].1 - 1.0).abs() < 1e-3);

    ok(&["index", "remove", "--index", idx_s, "a", "c"]);
    let err = fails(&["index", "remove", "--index", idx_s, "nope"]);
    assert!(err.contains("nope"), "{err}");
    let info = ok(&["index", "info", "--index", idx_s, "--json"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["items"], 13);

    let parquet = tmp.path().join("gallery.parquet");
    ok(&[
        "index",
        "export",
        "--index",
        idx_s,
        "--parquet",
        parquet.to_str().unwrap(),
    ]);
    assert!(std::fs::metadata(&parquet).unwrap().len() > 0);

    // Another checkpoint: refused unless asked.
    let meta = idx.join("index.json");
    let text = std::fs::read_to_string(&meta).unwrap();
    std::fs::write(&meta, text.replace(&run.weights_hash, "0000feed")).unwrap();
    let err = fails(&["index", "search", "--index", idx_s, "--run", run_s, &query]);
    assert!(
        err.contains("--allow-model-mismatch") && err.contains("0000feed"),
        "{err}"
    );
    ok(&[
        "index",
        "search",
        "--index",
        idx_s,
        "--run",
        run_s,
        &query,
        "--allow-model-mismatch",
    ]);
}

/// A two-step run on the synthetic video set (clips of 3 frames at 32 px).
fn tiny_video_run(out: &Path) {
    let mut cfg: RunConfig = toml::from_str(
        r#"
        [model]
        preset = "tiny"
        [model.temporal]
        kind = "transformer"
        layers = 1
        heads = 2
        [data]
        kind = "synthetic_video"
        batch_size = 8
        max_text_len = 16
        [data.image]
        size = 32
        frames = 3
        [data.synthetic_video]
        frames = 9
        variants = 1
        [train]
        log_every = 1
        eval_every = 0
        checkpoint_every = 2
        [objectives.queue]
        size = 16
        [[objectives.objectives]]
        kind = "itc"
        "#,
    )
    .unwrap();
    cfg.train.steps = 2;
    cfg.train.out = out.to_path_buf();
    Trainer::new(cfg, &Device::Cpu, false)
        .unwrap()
        .run(true)
        .unwrap();
}

/// Writes an animated GIF whose frames step through `colours`.
fn write_clip(path: &Path, colours: &[[u8; 3]]) {
    let frames: Vec<_> = colours
        .iter()
        .map(|c| image::RgbImage::from_pixel(24, 16, image::Rgb(*c)))
        .collect();
    cots_data::video::encode::write_gif(path, &frames, 40).unwrap();
}

/// A video run indexes the videos of a JSONL video manifest under their
/// ids (a missing one is an error naming it, or skipped on request) and a
/// folder's animations as videos beside its still images; every stored
/// vector is the run's own embedding of that source; an image run refuses
/// videos.
#[test]
fn a_video_run_indexes_videos_from_a_manifest_and_a_folder() {
    use cots_data::ImageSource;
    use cots_index::ItemKind;

    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("video-run");
    tiny_video_run(&run_dir);
    let run = Run::open(&run_dir, &Device::Cpu).unwrap();
    let run_s = run_dir.to_str().unwrap();

    let videos = tmp.path().join("videos");
    std::fs::create_dir_all(&videos).unwrap();
    write_clip(
        &videos.join("fade.gif"),
        &[[200, 0, 0], [100, 0, 0], [0, 0, 0]],
    );
    write_clip(
        &videos.join("turn.gif"),
        &[[0, 0, 200], [0, 200, 0], [0, 200, 0]],
    );
    let manifest = videos.join("videos.jsonl");
    std::fs::write(
        &manifest,
        concat!(
            r#"{"id": "clip-fade", "video": "fade.gif", "captions": ["a red square fades out"], "split": "test"}"#,
            "\n",
            r#"{"id": "clip-turn", "video": "turn.gif", "captions": ["a blue square turns green"], "split": "test"}"#,
            "\n",
            r#"{"id": "clip-gone", "video": "gone.mp4", "captions": ["never written"], "split": "test"}"#,
            "\n"
        ),
    )
    .unwrap();
    let idx = tmp.path().join("idx");
    let idx_s = idx.to_str().unwrap();
    let m_s = manifest.to_str().unwrap();
    let err = fails(&[
        "index",
        "build",
        "--run",
        run_s,
        "--out",
        idx_s,
        "--video-manifest",
        m_s,
    ]);
    assert!(
        err.contains("videos.jsonl") && err.contains("gone.mp4"),
        "{err}"
    );
    let out = ok(&[
        "index",
        "build",
        "--run",
        run_s,
        "--out",
        idx_s,
        "--video-manifest",
        m_s,
        "--skip-bad",
    ]);
    assert!(
        out.contains("skipped 1 video") && out.contains("clip-gone"),
        "{out}"
    );

    // Still images and animations side by side in a folder.
    let folder = tmp.path().join("more");
    std::fs::create_dir_all(&folder).unwrap();
    write_clip(
        &folder.join("blink.gif"),
        &[[250, 250, 0], [0, 0, 0], [250, 250, 0]],
    );
    image::RgbImage::from_pixel(20, 20, image::Rgb([0, 120, 240]))
        .save(folder.join("still.png"))
        .unwrap();
    let folder_s = folder.to_str().unwrap();
    ok(&[
        "index", "add", "--index", idx_s, "--run", run_s, "--folder", folder_s,
    ]);

    let index = Index::open(&idx).unwrap();
    assert_eq!(index.len(), 4);
    for (id, kind, source) in [
        (
            "clip-fade",
            ItemKind::Video,
            ImageSource::Video(videos.join("fade.gif")),
        ),
        (
            "clip-turn",
            ItemKind::Video,
            ImageSource::Video(videos.join("turn.gif")),
        ),
        (
            "blink",
            ItemKind::Video,
            ImageSource::Video(folder.join("blink.gif")),
        ),
        (
            "still",
            ItemKind::Image,
            ImageSource::Path(folder.join("still.png")),
        ),
    ] {
        let (row, item) = index.item(id).unwrap_or_else(|| panic!("{id} missing"));
        assert_eq!(item.kind, kind, "{id}");
        let (thumb, _) = index.thumbnail(id).unwrap().expect("a thumbnail");
        assert!(!thumb.is_empty());
        let want = run.embed_images(&[source]).unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = index.vector(row).unwrap();
        let diff = want
            .iter()
            .zip(got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "{id}: stored vector differs by {diff}");
    }
    // An uploaded image (decoded already, as the search service gets one) is
    // a still clip too: the same vector as the file.
    let decoded = image::open(folder.join("still.png")).unwrap().to_rgb8();
    let up = run.embed_decoded_images(&[decoded]).unwrap();
    let up = up.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (row, _) = index.item("still").unwrap();
    let diff = up
        .iter()
        .zip(index.vector(row).unwrap())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-5, "upload differs by {diff}");
    // A text query scores the stored clip vectors.
    let text_hits = hits(&ok(&[
        "index",
        "search",
        "--index",
        idx_s,
        "--run",
        run_s,
        "a blue square turns green",
        "-k",
        "4",
        "--json",
    ]));
    assert_eq!(text_hits.len(), 4);

    // An image run cannot embed videos.
    let image_run = tmp.path().join("image-run");
    tiny_run(&image_run);
    let err = fails(&[
        "index",
        "build",
        "--run",
        image_run.to_str().unwrap(),
        "--out",
        tmp.path().join("idx2").to_str().unwrap(),
        "--video-manifest",
        m_s,
        "--skip-bad",
    ]);
    assert!(
        err.contains("fade.gif") && err.contains("video run"),
        "{err}"
    );
}
