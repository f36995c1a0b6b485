//! The fixture the service tests share: a tiny run trained for one step (its
//! model is untrained, which is all a serving test needs) and a small index
//! built with it, whose expected answers are known by construction:
//!
//! - every scene's vector is the run's embedding of its own PNG, so
//!   uploading that PNG finds it with score 1;
//! - the item `expected` holds the run's embedding of [`QUERY`], so that
//!   text query finds it with score 1.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use candle_core::Device;
use cots_data::synthetic;
use cots_data::ImageSource;
use cots_index::{Index, Item, ItemKind, Model};
use cots_serve::QueryEncoder;
use cots_train::config::RunConfig;
use cots_train::inference::Run;
use cots_train::query::RunEncoder;
use cots_train::trainer::Trainer;
use image::RgbImage;
use rand::SeedableRng;

/// The text query whose answer is `expected`.
pub const QUERY: &str = "a large red circle left of a small blue square";
/// Scenes in the index (plus `expected` and `folder/nested`).
pub const SCENES: usize = 12;
/// Pixels per side of the scene PNGs (the model resizes them to 16).
pub const PNG_SIZE: usize = 160;

pub struct Fixture {
    /// Keeps the files alive for the whole test binary.
    _dir: tempfile::TempDir,
    pub run_dir: PathBuf,
    pub index_dir: PathBuf,
    /// The directory relative item paths are under.
    pub root: PathBuf,
    /// A file next to (not under) the root that no request may reach.
    pub secret: PathBuf,
    /// The scene PNG of each `scene-NN` id.
    pub pngs: BTreeMap<String, PathBuf>,
}

pub const SECRET: &str = "this must never be served";

fn run_config(out: &Path) -> RunConfig {
    let mut cfg: RunConfig = toml::from_str(
        r#"
        [model]
        preset = "tiny"
        [data]
        kind = "synthetic"
        batch_size = 4
        max_text_len = 20
        [data.synthetic]
        train = 16
        val = 4
        test = 4
        [train]
        steps = 1
        log_every = 1
        eval_every = 0
        checkpoint_every = 1
        [objectives.queue]
        size = 8
        [[objectives.objectives]]
        kind = "itc"
        "#,
    )
    .unwrap();
    cfg.train.out = out.to_path_buf();
    cfg
}

/// The shared fixture, built on first use.
pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(build)
}

/// A fresh encoder of the fixture's run (cheap: a tiny model).
pub fn encoder() -> RunEncoder {
    let f = fixture();
    RunEncoder::new(Run::open(&f.run_dir, &Device::Cpu).unwrap()).unwrap()
}

/// The fixture's index, opened anew.
pub fn open_index() -> Index {
    Index::open(&fixture().index_dir).unwrap()
}

fn build() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    Trainer::new(run_config(&run_dir), &Device::Cpu, false)
        .unwrap()
        .run(true)
        .unwrap();
    let run = Run::open(&run_dir, &Device::Cpu).unwrap();

    let root = dir.path().join("gallery");
    std::fs::create_dir_all(root.join("images")).unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, SECRET).unwrap();

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut items = Vec::new();
    let mut sources = Vec::new();
    let mut thumbs = Vec::new();
    let mut pngs = BTreeMap::new();
    for i in 0..SCENES {
        let scene = synthetic::random_scene(&mut rng);
        let r = synthetic::render(&scene, PNG_SIZE, i as u64);
        let img = RgbImage::from_raw(r.width as u32, r.height as u32, r.data).unwrap();
        let id = format!("scene-{i:02}");
        let rel = format!("images/{id}.png");
        let path = root.join(&rel);
        img.save(&path).unwrap();
        thumbs.push(Some(std::fs::read(&path).unwrap()));
        pngs.insert(id.clone(), path.clone());
        sources.push(ImageSource::Path(path));
        items.push(Item {
            id,
            kind: ItemKind::Image,
            path: Some(rel),
            captions: scene.captions(),
            metadata: BTreeMap::from([
                (
                    "split".to_string(),
                    if i % 3 == 0 { "test" } else { "train" }.to_string(),
                ),
                ("objects".to_string(), scene_objects(&scene).to_string()),
            ]),
        });
    }
    let mut vectors = run
        .embed_images(&sources)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();

    // The text query's own embedding, with a picture of what it says.
    let pictured = synthetic::Scene::Two {
        a: synthetic::Object {
            shape: 0,
            color: 0,
            size: 1,
        },
        b: synthetic::Object {
            shape: 1,
            color: 2,
            size: 0,
        },
        rel: synthetic::Relation::LeftOf,
    };
    let r = synthetic::render(&pictured, PNG_SIZE, 99);
    let expected_png = root.join("images/expected.png");
    RgbImage::from_raw(r.width as u32, r.height as u32, r.data)
        .unwrap()
        .save(&expected_png)
        .unwrap();
    let text = run
        .embed_texts(&[QUERY.to_string()])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    vectors.extend_from_slice(&text);
    items.push(Item {
        id: "expected".into(),
        kind: ItemKind::Image,
        path: Some("images/expected.png".into()),
        captions: vec![
            QUERY.to_string(),
            "the item the test query must find".into(),
        ],
        metadata: BTreeMap::from([("split".to_string(), "test".to_string())]),
    });
    thumbs.push(Some(std::fs::read(&expected_png).unwrap()));

    // An id with a slash, which URLs carry as %2F; a vector of its own.
    let dim = text.len();
    let mut nested = vec![0.0f32; dim];
    nested[0] = 1.0;
    vectors.extend_from_slice(&nested);
    items.push(Item {
        id: "folder/nested".into(),
        kind: ItemKind::Text,
        path: None,
        captions: vec!["an item whose id has a slash".into()],
        metadata: BTreeMap::new(),
    });
    thumbs.push(None);

    let index_dir = dir.path().join("index");
    let mut index = Index::create(
        &index_dir,
        Model {
            weights_hash: run.weights_hash.clone(),
            run: run_dir.display().to_string(),
            dim,
        },
    )
    .unwrap();
    index.set_root(Some(&root)).unwrap();
    index.add(items, &vectors, thumbs).unwrap();

    Fixture {
        _dir: dir,
        run_dir,
        index_dir,
        root,
        secret,
        pngs,
    }
}

fn scene_objects(scene: &synthetic::Scene) -> &'static str {
    match scene {
        synthetic::Scene::One(_) => "one",
        synthetic::Scene::Two { .. } => "two",
    }
}

/// An encoder wrapper that records each text call's batch size and can hold
/// calls at a gate until the test opens it, so tests can line requests up
/// behind a busy encoder without relying on timing.
pub struct Gated<E> {
    pub inner: E,
    pub calls: Mutex<Vec<usize>>,
    open: Mutex<bool>,
    opened: Condvar,
    entered: Mutex<usize>,
}

impl<E: QueryEncoder> Gated<E> {
    pub fn new(inner: E, open: bool) -> Arc<Self> {
        Arc::new(Self {
            inner,
            calls: Mutex::new(Vec::new()),
            open: Mutex::new(open),
            opened: Condvar::new(),
            entered: Mutex::new(0),
        })
    }

    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    /// Text calls that have started.
    pub fn entered(&self) -> usize {
        *self.entered.lock().unwrap()
    }

    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }
}

impl<E: QueryEncoder> QueryEncoder for Gated<E> {
    fn embed_texts(&self, texts: &[String]) -> cots_infer::Result<Vec<f32>> {
        self.calls.lock().unwrap().push(texts.len());
        *self.entered.lock().unwrap() += 1;
        self.wait();
        self.inner.embed_texts(texts)
    }
    fn embed_images(&self, images: &[RgbImage]) -> cots_infer::Result<Vec<f32>> {
        self.inner.embed_images(images)
    }
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn weights_hash(&self) -> &str {
        self.inner.weights_hash()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Waits (yielding to the runtime) until `cond` holds.
pub async fn until(mut cond: impl FnMut() -> bool) {
    while !cond() {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// One form field: name, file name (for a file), bytes.
pub type Field<'a> = (&'a str, Option<&'a str>, &'a [u8]);

/// A multipart/form-data body with the given fields and its content type.
pub fn multipart(fields: &[Field]) -> (String, Vec<u8>) {
    let boundary = "cots-test-boundary-7d9f2c";
    let mut body = Vec::new();
    for (name, file, bytes) in fields {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match file {
            Some(f) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}
