//! `cots index`: build, grow, inspect, export and search a persistent
//! retrieval index (crates/cots-index) with a trained run's encoders.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::{Args, Subcommand};
use cots_data::image_io::{self, ImageConfig};
use cots_data::ImageSource;
use cots_encoders::dual::DualEncoder;
use cots_index::{AnnParams, Filter, Index, Item, ItemKind, Mode, Model, SearchOptions};
use cots_train::config::RunConfig;
use cots_train::inference::Run;
use image::RgbImage;
use rayon::prelude::*;

use crate::commands::Ctx;

#[derive(Debug, Args)]
pub struct IndexArgs {
    #[command(subcommand)]
    pub action: IndexAction,
}

#[derive(Debug, Subcommand)]
pub enum IndexAction {
    /// Embed a folder, a JSONL manifest or a run config's dataset into a new
    /// index. Resumable: rerun the same command after an interruption and
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
    #[arg(long, conflicts_with_all = ["manifest", "data_config"])]
    pub folder: Option<PathBuf>,
    /// A JSONL manifest (`{"image", "captions", "split", "id", "category"}`
    /// per line; images relative to the manifest's folder).
    #[arg(long, conflicts_with = "data_config")]
    pub manifest: Option<PathBuf>,
    /// The dataset of a run config (its `[data]` section; synthetic data too).
    #[arg(long)]
    pub data_config: Option<PathBuf>,
    /// With --manifest or --data-config: only this split (train, val, test).
    #[arg(long)]
    pub split: Option<String>,
    /// Skip images that fail to decode (counted and listed at the end)
    /// instead of stopping at the first.
    #[arg(long)]
    pub skip_bad: bool,
    /// Items embedded and saved per step (a crash loses at most one step).
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Thumbnail size in pixels (longer side; JPEG).
    #[arg(long, default_value_t = 96)]
    pub thumb_size: u32,
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
    #[arg(long)]
    pub index: PathBuf,
    /// Ids of the items to remove.
    #[arg(required = true)]
    pub ids: Vec<String>,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    #[arg(long)]
    pub index: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
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
    #[arg(long)]
    pub index: PathBuf,
    /// The run whose encoders embed the query.
    #[arg(long)]
    pub run: PathBuf,
    /// Search with this image instead of a text.
    #[arg(long)]
    pub image: Option<PathBuf>,
    #[arg(short, long, default_value_t = 10)]
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

/// One item to embed: its index entry and where its pixels come from.
struct Pending {
    item: Item,
    source: ImageSource,
}

/// The items of `--folder`, `--manifest` or `--data-config`, and the root
/// their relative paths are relative to.
fn collect_items(s: &SourceArgs) -> Result<(Vec<Pending>, Option<PathBuf>)> {
    match (&s.folder, &s.manifest, &s.data_config) {
        (Some(dir), None, None) => {
            if s.split.is_some() {
                bail!("--split applies to --manifest and --data-config, not --folder");
            }
            let root = dir
                .canonicalize()
                .with_context(|| format!("reading folder {}", dir.display()))?;
            Ok((folder_items(&root)?, Some(root)))
        }
        (None, Some(m), None) => {
            let root = m
                .parent()
                .unwrap_or(Path::new("."))
                .canonicalize()
                .with_context(|| format!("resolving the folder of {}", m.display()))?;
            let data = cots_data::manifest::load_jsonl(m, &root)?;
            Ok((
                dataset_items(data, s.split.as_deref(), Some(&root))?,
                Some(root),
            ))
        }
        (None, None, Some(c)) => {
            let cfg = RunConfig::load(c)?;
            let data = cots_train::trainer::load_dataset(&cfg)?;
            Ok((dataset_items(data, s.split.as_deref(), None)?, None))
        }
        _ => bail!(
            "give one of --folder DIR, --manifest FILE.jsonl or --data-config RUN_CONFIG.toml"
        ),
    }
}

const IMAGE_EXTENSIONS: [&str; 7] = ["png", "jpg", "jpeg", "webp", "gif", "svg", "bmp"];

fn folder_items(root: &Path) -> Result<Vec<Pending>> {
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let p = e
                .with_context(|| format!("listing {}", dir.display()))?
                .path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            {
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
        out.push(Pending {
            item: Item {
                id,
                kind: ItemKind::Image,
                path: Some(rel.to_string_lossy().into_owned()),
                captions: Vec::new(),
                metadata,
            },
            source: ImageSource::Path(p),
        });
    }
    if out.is_empty() {
        bail!(
            "{} holds no images ({})",
            root.display(),
            IMAGE_EXTENSIONS.join(", ")
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
                ImageSource::Path(p) | ImageSource::Video(p) => Some(
                    root.and_then(|r| p.strip_prefix(r).ok())
                        .unwrap_or(p)
                        .to_string_lossy()
                        .into_owned(),
                ),
                ImageSource::Synthetic { .. } | ImageSource::SyntheticClip { .. } => None,
            };
            Pending {
                item: Item {
                    id: it.id.to_string(),
                    kind: ItemKind::Image,
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

/// One decoded image: the model's input and the thumbnail.
fn prepare(source: &ImageSource, cfg: &ImageConfig, thumb: u32) -> Result<(Vec<f32>, Vec<u8>)> {
    let (input, full): (RgbImage, Option<RgbImage>) = match source {
        ImageSource::Path(p) => {
            let img = image_io::decode(p)?;
            (image_io::resize_center_crop(&img, cfg.size), Some(img))
        }
        other => (image_io::load_rgb(other, cfg)?, None),
    };
    let full = full.as_ref().unwrap_or(&input);
    let small = if full.width().max(full.height()) > thumb {
        image::imageops::thumbnail(full, thumb, thumb * full.height() / full.width().max(1))
    } else {
        full.clone()
    };
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 85)
        .encode_image(&small)
        .with_context(|| format!("encoding the thumbnail of {}", source.describe()))?;
    Ok((image_io::to_chw(&input, cfg), jpeg))
}

/// Embeds `pending` into `index`, `chunk` items at a time, each chunk saved
/// before the next starts. Returns the sources that failed to decode.
fn embed_into(
    ctx: &Ctx,
    run: &Run,
    index: &mut Index,
    pending: Vec<Pending>,
    s: &SourceArgs,
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
            .map(|p| prepare(&p.source, &cfg, s.thumb_size))
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
            let vectors = embed_pixels(run, pixels, items.len(), cfg.size)?;
            let n = items.len() as u64;
            index.add(items, &vectors, thumbs)?;
            bar.inc(n);
        }
    }
    bar.finish_and_clear();
    Ok(bad)
}

/// Unit-normalised embeddings of `n` images given as CHW pixels.
fn embed_pixels(run: &Run, pixels: Vec<f32>, n: usize, size: usize) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(n * 256);
    // Batches the size inference uses, so memory stays bounded on any device.
    let per = 3 * size * size;
    for batch in pixels.chunks(64 * per) {
        let b = batch.len() / per;
        let t = Tensor::from_slice(batch, (b, 3, size, size), &run.device)?;
        let e = run.model.embed_images(&t)?;
        out.extend(e.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

fn report_bad(bad: &[String]) {
    if !bad.is_empty() {
        println!("skipped {} image(s) that failed to decode:", bad.len());
        for b in bad.iter().take(20) {
            println!("  {b}");
        }
        if bad.len() > 20 {
            println!("  ... and {} more", bad.len() - 20);
        }
    }
}

fn build(ctx: &Ctx, a: BuildArgs) -> Result<()> {
    let run = Run::open(&a.run, &ctx.device)?;
    let (pending, root) = collect_items(&a.source)?;
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
    let total = pending.len();
    let todo: Vec<Pending> = pending
        .into_iter()
        .filter(|p| index.item(&p.item.id).is_none())
        .collect();
    if todo.len() < total {
        println!(
            "resuming: {} of {total} items are already in {}",
            total - todo.len(),
            a.out.display()
        );
    }
    if a.int8 && !index.is_quantized() {
        // Before embedding: every added chunk then gets its codes as it is saved.
        index.quantize()?;
    }
    let bad = embed_into(ctx, &run, &mut index, todo, &a.source)?;
    report_bad(&bad);
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
            println!("built the HNSW graph in {:.1} s", t.elapsed().as_secs_f64());
        }
    }
    println!("{}", index.info());
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
    let (pending, _) = collect_items(&a.source)?;
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
    let bad = embed_into(ctx, &run, &mut index, pending, &a.source)?;
    report_bad(&bad);
    println!(
        "added {} items to {} (now {})",
        index.len() - before,
        a.index.display(),
        index.len()
    );
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
    println!(
        "removed {n} items from {} (now {})",
        a.index.display(),
        index.len()
    );
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let index = Index::open(&a.index)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&index.info())?);
    } else {
        println!("{}", index.info());
    }
    Ok(())
}

fn export(a: ExportArgs) -> Result<()> {
    let index = Index::open(&a.index)?;
    index.export_parquet(&a.parquet)?;
    println!("wrote {} items to {}", index.len(), a.parquet.display());
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
        println!("{}", serde_json::to_string_pretty(&hits)?);
        return Ok(());
    }
    println!(
        "top {} of {} items ({:?}, {:.2} ms):",
        hits.len(),
        index.len(),
        mode,
        took.as_secs_f64() * 1e3
    );
    for (rank, h) in hits.iter().enumerate() {
        let item = &index.items()[h.row];
        let label = item
            .captions
            .first()
            .map(|c| format!("  \"{c}\""))
            .unwrap_or_default();
        let path = item.path.as_deref().unwrap_or("");
        println!("{:>3}. {:.4}  {}  {path}{label}", rank + 1, h.score, h.id);
    }
    Ok(())
}
