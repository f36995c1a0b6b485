//! `cots index`: build, grow, inspect, export and search a persistent
//! retrieval index (crates/cots-index) with a trained run's encoders.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::{Args, Subcommand};
use cots_data::image_io::{self, ImageConfig};
use cots_data::video::MissingPolicy;
use cots_data::ImageSource;
use cots_encoders::dual::DualEncoder;
use cots_index::{AnnParams, Filter, Index, Item, ItemKind, Mode, Model, SearchOptions};
use cots_train::config::RunConfig;
use cots_train::inference::Run;
use rayon::prelude::*;

use crate::commands::Ctx;

#[derive(Debug, Args)]
pub struct IndexArgs {
    #[command(subcommand)]
    pub action: IndexAction,
}

#[derive(Debug, Subcommand)]
pub enum IndexAction {
    /// Embed a folder, a JSONL image or video manifest or a run config's
    /// dataset into a new index. Resumable: rerun the same command after an interruption and
    /// the items already saved are not embedded again.
    Build(BuildArgs),
    /// Embed more images into an existing index (same run).
    Add(AddArgs),
    /// Remove items by id.
    Remove(RemoveArgs),
    /// Summarise an index: items, model, files, graph.
    Info(InfoArgs),
    /// Write the index as one Parquet file (id, kind, path, captions,
    /// metadata, vector) for vector databases and dataframes.
    Export(ExportArgs),
    /// Search an index with a text (or --image) query.
    Search(IndexSearchArgs),
}

/// Where the items come from (exactly one).
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// Every image under this folder (PNG, JPEG, WebP, GIF, SVG), recursively;
    /// the id is the path below the folder without its extension, `/` as `_`.
    /// With a video run (`data.image.frames` set) videos are taken too (MP4,
    /// WebM, AVI, MKV, MOV through ffmpeg; GIF and WebP as animations).
    #[arg(long, conflicts_with_all = ["manifest", "video_manifest", "data_config"])]
    pub folder: Option<PathBuf>,
    /// A JSONL manifest (`{"image", "captions", "split", "id", "category"}`
    /// per line; images relative to the manifest's folder).
    #[arg(long, conflicts_with_all = ["video_manifest", "data_config"])]
    pub manifest: Option<PathBuf>,
    /// A JSONL video manifest (`{"id", "video", "captions", "split"}` per
    /// line; videos relative to the manifest's folder); needs a video run.
    /// The item ids are the manifest's video ids.
    #[arg(long, conflicts_with = "data_config")]
    pub video_manifest: Option<PathBuf>,
    /// The dataset of a run config (its `[data]` section; synthetic data too).
    #[arg(long)]
    pub data_config: Option<PathBuf>,
    /// With a manifest or --data-config: only this split (train, val, test).
    #[arg(long)]
    pub split: Option<String>,
    /// Skip images and videos that fail to decode, and videos a manifest
    /// names that are missing (counted and listed at the end), instead of
    /// stopping at the first.
    #[arg(long)]
    pub skip_bad: bool,
    /// Items embedded and saved per step (a crash loses at most one step).
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Thumbnail size in pixels (longer side; JPEG). Default: the size the
    /// index already records, else 96. An index keeps one size: resuming or
    /// adding with another is refused.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub thumb_size: Option<u32>,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The trained run whose image encoder embeds the gallery.
    #[arg(long)]
    pub run: PathBuf,
    /// The index directory (created; or resumed when it holds an unfinished
    /// build of the same run).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub source: SourceArgs,
    /// Also build the approximate-search (HNSW) graph.
    #[arg(long)]
    pub ann: bool,
    /// HNSW links per node.
    #[arg(long, default_value_t = AnnParams::default().m)]
    pub ann_m: usize,
    /// HNSW candidates kept while building.
    #[arg(long, default_value_t = AnnParams::default().ef_construction)]
    pub ann_ef_construction: usize,
    /// Also store int8 codes (`cots index search --int8`).
    #[arg(long)]
    pub int8: bool,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The index directory to add to (`cots index build` writes one).
    #[arg(long)]
    pub index: PathBuf,
    /// The run the index was built with.
    #[arg(long)]
    pub run: PathBuf,
    #[command(flatten)]
    pub source: SourceArgs,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// The index directory to remove items from.
    #[arg(long)]
    pub index: PathBuf,
    /// Ids of the items to remove.
    #[arg(required = true)]
    pub ids: Vec<String>,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The index directory to summarise.
    #[arg(long)]
    pub index: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The index directory to export.
    #[arg(long)]
    pub index: PathBuf,
    /// The Parquet file to write.
    #[arg(long)]
    pub parquet: PathBuf,
}

#[derive(Debug, Args)]
pub struct IndexSearchArgs {
    /// The text query (omit with --image).
    pub query: Option<String>,
    /// The index directory to search (`cots index build` writes one).
    #[arg(long)]
    pub index: PathBuf,
    /// The run whose encoders embed the query.
    #[arg(long)]
    pub run: PathBuf,
    /// Search with this image instead of a text.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// How many results to return (at least 1).
    #[arg(short, long, default_value_t = 10, value_parser = parse_k)]
    pub k: usize,
    /// Use the approximate-search graph (`build --ann`).
    #[arg(long, conflicts_with = "int8")]
    pub approx: bool,
    /// Graph candidates kept per search (default: the index's ef_search).
    #[arg(long)]
    pub ef: Option<usize>,
    /// Scan the int8 codes for this many candidates, re-ranked exactly (`build --int8`).
    #[arg(long)]
    pub int8: Option<usize>,
    /// Only items whose metadata has key=value (repeatable; all must hold).
    #[arg(long, value_parser = parse_filter)]
    pub filter: Vec<(String, String)>,
    /// Search even if the index was built by another checkpoint.
    #[arg(long)]
    pub allow_model_mismatch: bool,
    /// Print JSON hits.
    #[arg(long)]
    pub json: bool,
}

/// `-k`: a count of results, which must be at least one (`-k 0` would
/// succeed with nothing to show, which is never what was meant).
pub fn parse_k(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("k must be at least 1 (the number of results to return)".into()),
        Ok(k) => Ok(k),
        Err(e) => Err(format!("`{s}` is not a count of results: {e}")),
    }
}

fn parse_filter(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not key=value")),
    }
}

pub fn index(ctx: &Ctx, args: IndexArgs) -> Result<()> {
    match args.action {
        IndexAction::Build(a) => build(ctx, a),
        IndexAction::Add(a) => add(ctx, a),
        IndexAction::Remove(a) => remove(a),
        IndexAction::Info(a) => info(a),
        IndexAction::Export(a) => export(a),
        IndexAction::Search(a) => search(ctx, a),
    }
}

/// Refuses videos when `run` embeds single images.
fn check_sources(run: &Run, pending: &[Pending]) -> Result<()> {
    if run.image_config().frames.is_none() {
        if let Some(p) = pending.iter().find(|p| p.source.is_video()) {
            bail!(
                "{} is a video, and {} embeds single images: index videos with a video run \
                 (`data.image.frames` set, see configs/demo-video.toml)",
                p.source.describe(),
                run.dir.display()
            );
        }
    }
    Ok(())
}

/// One item to embed: its index entry and where its pixels come from.
struct Pending {
    item: Item,
    source: ImageSource,
}

/// The items of `--folder`, `--manifest`, `--video-manifest` or
/// `--data-config`, and the root their relative paths are relative to.
/// `video`: the run takes clips (so `--folder` takes videos too).
fn collect_items(s: &SourceArgs, video: bool) -> Result<(Vec<Pending>, Option<PathBuf>)> {
    let manifest_root = |m: &Path| {
        m.parent()
            .unwrap_or(Path::new("."))
            .canonicalize()
            .with_context(|| format!("resolving the folder of {}", m.display()))
    };
    match (&s.folder, &s.manifest, &s.video_manifest, &s.data_config) {
        (Some(dir), None, None, None) => {
            if s.split.is_some() {
                bail!("--split applies to manifests and --data-config, not --folder");
            }
            let root = dir
                .canonicalize()
                .with_context(|| format!("reading folder {}", dir.display()))?;
            Ok((folder_items(&root, video)?, Some(root)))
        }
        (None, Some(m), None, None) => {
            let root = manifest_root(m)?;
            let data = cots_data::manifest::load_jsonl(m, &root)?;
            Ok((
                dataset_items(data, s.split.as_deref(), Some(&root))?,
                Some(root),
            ))
        }
        (None, None, Some(m), None) => {
            let root = manifest_root(m)?;
            Ok((video_manifest_items(m, s, &root)?, Some(root)))
        }
        (None, None, None, Some(c)) => {
            let cfg = RunConfig::load(c)?;
            let data = cots_train::trainer::load_dataset(&cfg)?;
            Ok((dataset_items(data, s.split.as_deref(), None)?, None))
        }
        _ => bail!(
            "give one of --folder DIR, --manifest FILE.jsonl, --video-manifest FILE.jsonl \
             or --data-config RUN_CONFIG.toml"
        ),
    }
}

/// The videos of a JSONL video manifest, keyed by their video ids.
fn video_manifest_items(m: &Path, s: &SourceArgs, root: &Path) -> Result<Vec<Pending>> {
    let policy = if s.skip_bad {
        MissingPolicy::Skip
    } else {
        MissingPolicy::Error
    };
    let resolved = cots_data::video::msrvtt::read_manifest(m, policy)?;
    if !resolved.skipped.is_empty() {
        outln!(
            "skipped {} video(s) of {} whose files are missing:",
            resolved.skipped.len(),
            m.display()
        )?;
        for k in resolved.skipped.iter().take(20) {
            outln!("  {}: {}", k.id, k.reason)?;
        }
    }
    let split = s
        .split
        .as_deref()
        .map(crate::commands::parse_split)
        .transpose()?;
    Ok(resolved
        .records
        .into_iter()
        .filter(|r| split.is_none_or(|want| cots_data::Split::from(r.split) == want))
        .map(|r| {
            let split = format!("{:?}", cots_data::Split::from(r.split)).to_lowercase();
            Pending {
                item: Item {
                    id: r.id,
                    kind: ItemKind::Video,
                    path: Some(relative(&r.video, Some(root))),
                    captions: r.captions,
                    metadata: BTreeMap::from([("split".to_string(), split)]),
                },
                source: ImageSource::Video(r.video),
            }
        })
        .collect())
}

/// `p` relative to `root` when it lies below it.
fn relative(p: &Path, root: Option<&Path>) -> String {
    root.and_then(|r| p.strip_prefix(r).ok())
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

const IMAGE_EXTENSIONS: [&str; 7] = ["png", "jpg", "jpeg", "webp", "gif", "svg", "bmp"];
/// Taken by `--folder` for a video run (GIF and WebP become animations there).
const VIDEO_EXTENSIONS: [&str; 5] = ["mp4", "webm", "avi", "mkv", "mov"];

/// The images under `root` (and, for a video run, the videos: files ffmpeg
/// reads, animated GIF and WebP).
fn folder_items(root: &Path, video: bool) -> Result<Vec<Pending>> {
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let p = e
                .with_context(|| format!("listing {}", dir.display()))?
                .path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                let e = e.to_ascii_lowercase();
                IMAGE_EXTENSIONS.contains(&e.as_str())
                    || (video && VIDEO_EXTENSIONS.contains(&e.as_str()))
            }) {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut out = Vec::with_capacity(files.len());
    for p in files {
        let rel = p.strip_prefix(root).unwrap_or(&p);
        let id = rel
            .with_extension("")
            .to_string_lossy()
            .replace(['/', '\\'], "_");
        if let Some(other) = seen.insert(id.clone(), p.clone()) {
            bail!(
                "{} and {} would both get the id `{id}`: rename one",
                other.display(),
                p.display()
            );
        }
        let mut metadata = BTreeMap::new();
        if let Some(parent) = rel.parent().filter(|d| !d.as_os_str().is_empty()) {
            metadata.insert("folder".to_string(), parent.to_string_lossy().into_owned());
        }
        let ext = p
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let is_video =
            video && (VIDEO_EXTENSIONS.contains(&ext.as_str()) || ext == "gif" || ext == "webp");
        out.push(Pending {
            item: Item {
                id,
                kind: if is_video {
                    ItemKind::Video
                } else {
                    ItemKind::Image
                },
                path: Some(rel.to_string_lossy().into_owned()),
                captions: Vec::new(),
                metadata,
            },
            source: if is_video {
                ImageSource::Video(p)
            } else {
                ImageSource::Path(p)
            },
        });
    }
    if out.is_empty() {
        let mut exts = IMAGE_EXTENSIONS.to_vec();
        if video {
            exts.extend(VIDEO_EXTENSIONS);
        }
        bail!(
            "{} holds no images or videos ({})",
            root.display(),
            exts.join(", ")
        );
    }
    Ok(out)
}

fn dataset_items(
    data: cots_data::Dataset,
    split: Option<&str>,
    root: Option<&Path>,
) -> Result<Vec<Pending>> {
    let data = match split {
        Some(s) => data.split(crate::commands::parse_split(s)?)?,
        None => data,
    };
    Ok(data
        .items
        .into_iter()
        .map(|it| {
            let mut metadata = BTreeMap::from([(
                "split".to_string(),
                format!("{:?}", it.split).to_lowercase(),
            )]);
            if let Some(c) = &it.category {
                metadata.insert("category".to_string(), c.clone());
            }
            let path = match &it.source {
                ImageSource::Path(p) | ImageSource::Video(p) => Some(relative(p, root)),
                ImageSource::Synthetic { .. } | ImageSource::SyntheticClip { .. } => None,
            };
            Pending {
                item: Item {
                    id: it.id.to_string(),
                    kind: if it.source.is_video() {
                        ItemKind::Video
                    } else {
                        ItemKind::Image
                    },
                    path,
                    captions: it.captions,
                    metadata,
                },
                source: it.source,
            }
        })
        .collect())
}

/// The run as the index records it.
fn model_of(run: &Run) -> Result<Model> {
    let probe = run.embed_texts(&["a".to_string()])?;
    Ok(Model {
        weights_hash: run.weights_hash.clone(),
        run: run.dir.display().to_string(),
        dim: probe.dim(1)?,
    })
}

/// Refuses (or, when allowed, warns about) searching with another checkpoint.
fn check_model(index: &Index, run: &Run, allow_mismatch: bool) -> Result<()> {
    let built = &index.model().weights_hash;
    if *built != run.weights_hash {
        if allow_mismatch {
            tracing::warn!(
                "{} was built by another checkpoint (weights {built}; {} has {}): \
                 scores mix two embedding spaces",
                index.dir().display(),
                run.dir.display(),
                run.weights_hash
            );
        } else {
            bail!(
                "{} was built by another checkpoint (weights {built}, run {}); {} has weights {}: \
                 rebuild the index with this run, or pass --allow-model-mismatch",
                index.dir().display(),
                index.model().run,
                run.dir.display(),
                run.weights_hash
            );
        }
    }
    Ok(())
}

/// One decoded item: the model's input (`[3, S, S]`, or `[frames, 3, S,
/// S]` for a video run, where a still image is a clip of copies of itself)
/// and the JPEG thumbnail (a video's centre frame).
fn prepare(source: &ImageSource, cfg: &ImageConfig, thumb: u32) -> Result<(Vec<f32>, Vec<u8>)> {
    let (pixels, full) = match source {
        ImageSource::Path(p) => {
            let img = image_io::decode_over(p, cfg.background)?;
            let chw = image_io::to_chw(&image_io::resize_center_crop(&img, cfg.size), cfg);
            (chw.repeat(cfg.frames.unwrap_or(1)), img)
        }
        other => {
            let pixels = image_io::load_pixels(other, cfg)?;
            let at_thumb = ImageConfig {
                size: (thumb as usize).max(cfg.size),
                frames: None,
                ..cfg.clone()
            };
            (pixels, image_io::load_rgb(other, &at_thumb)?)
        }
    };
    let small = if full.width().max(full.height()) > thumb {
        image::imageops::thumbnail(&full, thumb, thumb * full.height() / full.width().max(1))
    } else {
        full
    };
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 85)
        .encode_image(&small)
        .with_context(|| format!("encoding the thumbnail of {}", source.describe()))?;
    Ok((pixels, jpeg))
}

/// Embeds `pending` into `index`, `chunk` items at a time, each chunk saved
/// before the next starts. Returns the sources that failed to decode.
fn embed_into(
    ctx: &Ctx,
    run: &Run,
    index: &mut Index,
    pending: Vec<Pending>,
    s: &SourceArgs,
    thumb_size: u32,
) -> Result<Vec<String>> {
    let cfg = run.image_config();
    let bar = cots_train::metrics::progress_bar("embedding ", pending.len() as u64, ctx.quiet);
    let mut bad = Vec::new();
    let chunk = s.chunk.max(1);
    let mut pending = pending.into_iter().peekable();
    while pending.peek().is_some() {
        let part: Vec<Pending> = pending.by_ref().take(chunk).collect();
        let prepared: Vec<Result<(Vec<f32>, Vec<u8>)>> = part
            .par_iter()
            .map(|p| prepare(&p.source, &cfg, thumb_size))
            .collect();
        let mut items = Vec::with_capacity(part.len());
        let mut pixels = Vec::with_capacity(part.len() * 3 * cfg.size * cfg.size);
        let mut thumbs = Vec::with_capacity(part.len());
        for (p, r) in part.into_iter().zip(prepared) {
            match r {
                Ok((px, thumb)) => {
                    pixels.extend(px);
                    thumbs.push(Some(thumb));
                    items.push(p.item);
                }
                Err(e) if s.skip_bad => {
                    tracing::warn!("skipping {}: {e:#}", p.source.describe());
                    bad.push(p.source.describe());
                }
                Err(e) => {
                    return Err(e.context(format!(
                        "embedding {} (pass --skip-bad to skip images that fail to decode)",
                        p.source.describe()
                    )))
                }
            }
        }
        if !items.is_empty() {
            let vectors = embed_pixels(run, pixels, items.len(), &cfg)?;
            let n = items.len() as u64;
            index.add(items, &vectors, thumbs)?;
            bar.inc(n);
        }
    }
    bar.finish_and_clear();
    Ok(bad)
}

/// Unit-normalised embeddings of `n` images (or clips of `cfg.frames`
/// frames) given as CHW pixels.
fn embed_pixels(run: &Run, pixels: Vec<f32>, n: usize, cfg: &ImageConfig) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(n * 256);
    let s = cfg.size;
    let frames = cfg.frames.unwrap_or(1);
    // Batches the size inference uses, so memory stays bounded on any device.
    let per = frames * 3 * s * s;
    for batch in pixels.chunks(64 * per) {
        let b = batch.len() / per;
        let t = match cfg.frames {
            Some(f) => Tensor::from_slice(batch, (b, f, 3, s, s), &run.device)?,
            None => Tensor::from_slice(batch, (b, 3, s, s), &run.device)?,
        };
        let e = run.model.embed_images(&t)?;
        out.extend(e.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// The thumbnail size when `--thumb-size` is not given.
const DEFAULT_THUMB_SIZE: u32 = 96;

/// The thumbnail size for adding to `index`: the one it records. Another
/// `--thumb-size` is refused, since one index must not mix sizes; an index
/// that records none yet records the one used now.
fn thumb_size_for(index: &mut Index, asked: Option<u32>) -> Result<u32> {
    match (index.thumb_size(), asked) {
        (Some(old), Some(new)) if old != new => bail!(
            "{dir} holds {old} px thumbnails, and --thumb-size asks for {new} px: one index keeps              one size. To continue this index, rerun with --thumb-size {old} (or without the              flag); for {new} px thumbnails, build into another --out, or remove {dir} and              build again",
            dir = index.dir().display()
        ),
        (Some(old), _) => Ok(old),
        (None, asked) => {
            let px = asked.unwrap_or(DEFAULT_THUMB_SIZE);
            if index.is_empty() {
                index.set_thumb_size(Some(px))?;
            } else {
                // Written before sizes were recorded: nothing to compare with,
                // and recording a guess could refuse the right size later.
                tracing::warn!(
                    "{} does not record its thumbnail size (built by an older version):                      the new thumbnails are {px} px",
                    index.dir().display()
                );
            }
            Ok(px)
        }
    }
}

fn report_bad(bad: &[String]) -> Result<()> {
    if !bad.is_empty() {
        outln!("skipped {} image(s) that failed to decode:", bad.len())?;
        for b in bad.iter().take(20) {
            outln!("  {b}")?;
        }
        if bad.len() > 20 {
            outln!("  ... and {} more", bad.len() - 20)?;
        }
    }
    Ok(())
}

fn build(ctx: &Ctx, a: BuildArgs) -> Result<()> {
    let run = Run::open(&a.run, &ctx.device)?;
    let (pending, root) = collect_items(&a.source, run.image_config().frames.is_some())?;
    check_sources(&run, &pending)?;
    let model = model_of(&run)?;
    let mut index = if a.out.join(cots_index::META_FILE).exists() {
        let index = Index::open(&a.out)?;
        if index.model().weights_hash != model.weights_hash {
            bail!(
                "{} holds an index built by another checkpoint (weights {}, run {}): \
                 choose another --out, or remove it first",
                a.out.display(),
                index.model().weights_hash,
                index.model().run
            );
        }
        index
    } else {
        let mut index = Index::create(&a.out, model)?;
        index.set_root(root.as_deref())?;
        index
    };
    let thumb_size = thumb_size_for(&mut index, a.source.thumb_size)?;
    let total = pending.len();
    let todo: Vec<Pending> = pending
        .into_iter()
        .filter(|p| index.item(&p.item.id).is_none())
        .collect();
    if todo.len() < total {
        outln!(
            "resuming: {} of {total} items are already in {}",
            total - todo.len(),
            a.out.display()
        )?;
    }
    if a.int8 && !index.is_quantized() {
        // Before embedding: every added chunk then gets its codes as it is saved.
        index.quantize()?;
    }
    let bad = embed_into(ctx, &run, &mut index, todo, &a.source, thumb_size)?;
    report_bad(&bad)?;
    if a.ann {
        let params = AnnParams {
            m: a.ann_m,
            ef_construction: a.ann_ef_construction,
            ..AnnParams::default()
        };
        let unchanged = index.ann_params() == Some(&params)
            && index
                .info()
                .ann
                .is_some_and(|i| i.unindexed_rows == 0 && i.tombstones == 0);
        if !unchanged {
            let t = std::time::Instant::now();
            index.build_ann(params)?;
            outln!("built the HNSW graph in {:.1} s", t.elapsed().as_secs_f64())?;
        }
    }
    outln!("{}", index.info())?;
    Ok(())
}

fn add(ctx: &Ctx, a: AddArgs) -> Result<()> {
    let run = Run::open(&a.run, &ctx.device)?;
    let mut index = Index::open(&a.index)?;
    if index.model().weights_hash != run.weights_hash {
        bail!(
            "{} was built by another checkpoint (weights {}, run {}); {} has weights {}: \
             vectors of two checkpoints cannot share an index",
            a.index.display(),
            index.model().weights_hash,
            index.model().run,
            run.dir.display(),
            run.weights_hash
        );
    }
    let thumb_size = thumb_size_for(&mut index, a.source.thumb_size)?;
    let (pending, _) = collect_items(&a.source, run.image_config().frames.is_some())?;
    check_sources(&run, &pending)?;
    let before = index.len();
    if let Some(p) = pending.iter().find(|p| index.item(&p.item.id).is_some()) {
        bail!(
            "`{}` ({}) is already in {}: remove it first to replace it",
            p.item.id,
            p.source.describe(),
            a.index.display()
        );
    }
    let pending = relative_to_root(pending, index.root());
    let bad = embed_into(ctx, &run, &mut index, pending, &a.source, thumb_size)?;
    report_bad(&bad)?;
    outln!(
        "added {} items to {} (now {})",
        index.len() - before,
        a.index.display(),
        index.len()
    )?;
    Ok(())
}

/// Item paths relative to the index's root where they lie below it, else absolute.
fn relative_to_root(pending: Vec<Pending>, root: Option<&Path>) -> Vec<Pending> {
    pending
        .into_iter()
        .map(|mut p| {
            if let ImageSource::Path(full) = &p.source {
                let full = full.canonicalize().unwrap_or_else(|_| full.clone());
                let rel = root.and_then(|r| full.strip_prefix(r).ok());
                p.item.path = Some(rel.unwrap_or(&full).to_string_lossy().into_owned());
            }
            p
        })
        .collect()
}

fn remove(a: RemoveArgs) -> Result<()> {
    let mut index = Index::open(&a.index)?;
    let n = index.remove(&a.ids)?;
    outln!(
        "removed {n} items from {} (now {})",
        a.index.display(),
        index.len()
    )?;
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let index = Index::open(&a.index)?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&index.info())?)?;
    } else {
        outln!("{}", index.info())?;
    }
    Ok(())
}

fn export(a: ExportArgs) -> Result<()> {
    let index = Index::open(&a.index)?;
    index.export_parquet(&a.parquet)?;
    outln!("wrote {} items to {}", index.len(), a.parquet.display())?;
    Ok(())
}

fn search(ctx: &Ctx, a: IndexSearchArgs) -> Result<()> {
    let index = Index::open(&a.index)?;
    let run = Run::open(&a.run, &ctx.device)?;
    check_model(&index, &run, a.allow_model_mismatch)?;
    let query = match (&a.query, &a.image) {
        (Some(q), None) => {
            if q.trim().is_empty() {
                bail!("the query is empty");
            }
            run.embed_texts(std::slice::from_ref(q))?
        }
        (None, Some(p)) => run.embed_images(&[ImageSource::Path(p.clone())])?,
        _ => bail!("give either a text query or --image PATH"),
    };
    let query: Vec<f32> = query.flatten_all()?.to_vec1()?;
    if query.len() != index.dim() {
        bail!(
            "the run embeds into {} dimensions, the index holds {}",
            query.len(),
            index.dim()
        );
    }
    let mode = if a.approx {
        let ef =
            a.ef.or(index.ann_params().map(|p| p.ef_search))
                .unwrap_or(AnnParams::default().ef_search);
        Mode::Approximate { ef }
    } else if let Some(shortlist) = a.int8 {
        Mode::Quantized { shortlist }
    } else {
        Mode::Exact
    };
    let opts = SearchOptions {
        mode,
        filter: Filter {
            equals: a.filter.iter().cloned().collect(),
        },
    };
    let t = std::time::Instant::now();
    let hits = index.search(&query, a.k, &opts)?;
    let took = t.elapsed();
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&hits)?)?;
        return Ok(());
    }
    outln!(
        "top {} of {} items ({mode}, {:.2} ms):",
        hits.len(),
        index.len(),
        took.as_secs_f64() * 1e3
    )?;
    for (rank, h) in hits.iter().enumerate() {
        let item = &index.items()[h.row];
        let label = item
            .captions
            .first()
            .map(|c| format!("  \"{c}\""))
            .unwrap_or_default();
        let path = item.path.as_deref().unwrap_or("");
        outln!("{:>3}. {:.4}  {}  {path}{label}", rank + 1, h.score, h.id)?;
    }
    Ok(())
}
