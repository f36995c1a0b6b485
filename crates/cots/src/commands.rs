//! The subcommands: flags in, one validated request, library calls out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use cots_data::{Dataset, ImageSource, Split};
use cots_encoders::decomposed::Pooling;
use cots_encoders::dvae;
use cots_eval::{top_k, EvalOptions};
use cots_objectives::bimodal::BimodalConfig;
use cots_train::config::RunConfig;
use cots_train::cross::{CrossRun, CrossTrainConfig};
use cots_train::decompose::DecomposeConfig;
use cots_train::inference::Run;
use cots_train::run_dir::{RunDir, RunKind};
use cots_train::trainer::{load_dataset, Trainer};

/// What every command gets.
pub struct Ctx {
    pub device: Device,
    pub quiet: bool,
}

/// The demo's run config, embedded so the demo needs no file.
const DEMO_CONFIG: &str = include_str!("../../../configs/demo.toml");

/// Picks the device, saying which and why.
pub fn select_device(spec: &str) -> Result<Device> {
    let cuda_built = cfg!(feature = "cuda");
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if cuda_built && cuda_driver_present() {
                tracing::info!("device: cuda:0 (a CUDA driver was found)");
                Ok(Device::new_cuda(0)?)
            } else {
                let why = if cuda_built {
                    "no CUDA driver (libcuda.so.1) was found"
                } else {
                    "this build has no CUDA support"
                };
                tracing::info!("device: cpu ({why})");
                Ok(Device::Cpu)
            }
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n: usize = s
                .strip_prefix("cuda:")
                .unwrap_or("0")
                .parse()
                .with_context(|| format!("bad device `{s}`"))?;
            if !cuda_built {
                bail!("`--device {s}`: this binary was built without CUDA (build with `--features cuda`)");
            }
            if !cuda_driver_present() {
                bail!("`--device {s}`: no CUDA driver (libcuda.so.1) was found on this machine");
            }
            Ok(Device::new_cuda(n)?)
        }
        other => bail!("unknown device `{other}` (auto, cpu, cuda or cuda:N)"),
    }
}

/// cudarc panics without a driver, so look for the library first.
fn cuda_driver_present() -> bool {
    [
        "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
        "/usr/lib64/libcuda.so.1",
        "/usr/lib/libcuda.so.1",
    ]
    .iter()
    .any(|p| Path::new(p).exists())
        || std::env::var_os("LD_LIBRARY_PATH").is_some_and(|paths| {
            std::env::split_paths(&paths).any(|d| d.join("libcuda.so.1").exists())
        })
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the demo run is written (replaced if it holds an earlier demo);
    /// default `runs/demo`, or `runs/demo-video` with `--video`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Training steps (the default, 400, fits in a few minutes on two cores;
    /// the queue starts at the same fraction of the run, half way).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Text-to-video instead: train on the embedded synthetic clips with mean
    /// pooling and with the temporal transformer, and compare them on the
    /// test split, where every clip meets its time-reversed twin.
    #[arg(long)]
    pub video: bool,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Run config (TOML); see configs/demo.toml for every section.
    #[arg(long)]
    pub config: PathBuf,
    /// Continue the run in the config's output directory from its newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Override train.out.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override train.steps.
    #[arg(long)]
    pub steps: Option<u64>,
}

#[derive(Debug, Args)]
pub struct TrainTokenizerArgs {
    /// Run config whose data section names the images (default: the demo's synthetic data).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// ViT preset the codes must match: tiny, small or base.
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// A dvae.json to use instead of the preset (shape and the `vq` codebook
    /// remedies; e.g. `"vq": {"kmeans_iters": 0, "restart_after": 0}` for the
    /// plain VQ-VAE that collapses).
    #[arg(long, conflicts_with = "preset")]
    pub dvae_config: Option<PathBuf>,
    /// Training steps.
    #[arg(long, default_value_t = 300)]
    pub steps: u64,
    /// Output directory (dvae.json, dvae.safetensors, report.json).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct TrainCrossArgs {
    /// The trained two-stream run whose data, tokenizer and size the
    /// cross-encoder shares, and whose similarities mine its hard negatives.
    #[arg(long)]
    pub from: PathBuf,
    /// Output directory (cross.json, cross.safetensors, tokenizer.json,
    /// checkpoints/, metrics.jsonl).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue a killed or interrupted training in --out from its newest
    /// checkpoint (same --from and settings).
    #[arg(long)]
    pub resume: bool,
    /// Training steps.
    #[arg(long, default_value_t = 400)]
    pub steps: u64,
    /// Positive pairs per step; each brings a hard negative caption and a
    /// hard negative image.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Seed of the initialisation, the data order and the negatives drawn.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Checkpoint (and refresh the model files) every this many steps; 0:
    /// only at the end.
    #[arg(long, default_value_t = 100)]
    pub save_every: u64,
}

#[derive(Debug, Args)]
pub struct DecomposeArgs {
    /// The single-stream cross-encoder to decompose (a `cots train-cross` directory).
    #[arg(long)]
    pub from: PathBuf,
    /// Output run directory (config.toml, decomposed.json, decomposed.safetensors,
    /// tokenizer.json, checkpoints/, metrics.jsonl).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue a killed or interrupted decomposition in --out from its
    /// newest checkpoint (same --from and settings).
    #[arg(long)]
    pub resume: bool,
    /// Train on this run's data instead of the data the cross-encoder
    /// recorded (needed for cross-encoders trained before it was recorded).
    #[arg(long)]
    pub data_from: Option<PathBuf>,
    /// Training steps.
    #[arg(long, default_value_t = 300)]
    pub steps: u64,
    /// Pairs per step.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Width of the shared embedding space.
    #[arg(long, default_value_t = 256)]
    pub embed_dim: usize,
    /// Pooling of each side's output: mean (the paper's) or cls.
    #[arg(long, default_value = "mean")]
    pub pooling: String,
    /// Keep only the k hardest negatives of each modality per query (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Weight negatives by exp(beta * similarity), mean 1 (0: uniform).
    #[arg(long, default_value_t = 0.0)]
    pub beta: f64,
    /// Drop the same-modality negatives (plain in-batch InfoNCE; the ablation).
    #[arg(long)]
    pub no_intra_modal: bool,
    /// Keep the embeddings of this many past pairs as extra negatives of
    /// both modalities (0: in-batch only).
    #[arg(long, default_value_t = 0)]
    pub queue: usize,
    /// Train on the first N training images only (the paper's small target set; 0: all).
    #[arg(long, default_value_t = 0)]
    pub target_items: usize,
    /// Seed of the initialisation and the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Checkpoint (and refresh the model files) every this many steps; 0:
    /// only at the end.
    #[arg(long, default_value_t = 100)]
    pub save_every: u64,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The trained COTS run; its data's test split is the common test set.
    #[arg(long)]
    pub run: PathBuf,
    /// Single-stream cross-encoder directory; trained from --run (`cots
    /// train-cross` defaults) if it holds none.
    #[arg(long)]
    pub cross: PathBuf,
    /// Decomposed model directory; decomposed from --cross (`cots decompose`
    /// defaults) if it holds none.
    #[arg(long)]
    pub decomposed: PathBuf,
    /// The split of the run's data to compare on (train, val or test).
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Use only the first N images of the split (and their captions): the
    /// cross-encoder scores every pair, so its cost grows with images x captions.
    #[arg(long)]
    pub test_images: Option<usize>,
    /// Candidates per query re-scored by the cross-encoder in the hybrid rows.
    #[arg(long, value_delimiter = ',', default_value = "16,128")]
    pub rerank_k: Vec<usize>,
    /// Where compare.md, compare.json and compare.svg go.
    #[arg(long, default_value = "runs/compare")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A run directory written by `cots train` or `cots demo`.
    #[arg(long)]
    pub run: PathBuf,
    /// Split to evaluate.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Evaluate on this dataset instead of the run's own (a run config whose
    /// data section names it).
    #[arg(long)]
    pub data_config: Option<PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also write the report as Markdown here.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Evaluate this single-stream cross-encoder (from `cots train-cross`)
    /// instead of the two-stream model of `--run`: every pair is scored.
    #[arg(long)]
    pub cross: Option<PathBuf>,
    /// Also report retrieval after dual-softmax re-normalisation, in a
    /// separate row: each score is weighted by its softmax over the other
    /// side's test queries at this inverse temperature (100 when the flag is
    /// given bare). Off by default: it uses every test query at once, so it
    /// is not the score of one query answered alone.
    #[arg(long, value_name = "INV_TEMP", num_args = 0..=1, default_missing_value = "100")]
    pub dual_softmax: Option<f32>,
}

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// The trained run whose encoders embed the data.
    #[arg(long)]
    pub run: PathBuf,
    /// The split to embed (train, val or test).
    #[arg(long, default_value = "test")]
    pub split: String,
    /// A run config naming another dataset (default: the run's own).
    #[arg(long)]
    pub data_config: Option<PathBuf>,
    /// Output safetensors file (a JSON sidecar with paths and captions is written beside it).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct SearchArgs {
    /// The text query (omit with --image or --video).
    pub query: Option<String>,
    /// The run whose encoders embed the query: the one that wrote --index.
    #[arg(long)]
    pub run: PathBuf,
    /// Embeddings written by `cots embed`.
    #[arg(long)]
    pub index: PathBuf,
    /// Search captions with this image instead of a text query.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Search captions with this video (a file ffmpeg reads, an animated
    /// GIF or WebP, or a folder of frames) instead of a text query; a video
    /// run samples its frames, an image run takes the centre frame.
    #[arg(long)]
    pub video: Option<PathBuf>,
    /// How many results to print (at least 1).
    #[arg(short, long, default_value_t = 5, value_parser = crate::index_cmd::parse_k)]
    pub k: usize,
    /// Search even if the index was built by another checkpoint.
    #[arg(long)]
    pub allow_model_mismatch: bool,
}

pub fn parse_split(s: &str) -> Result<Split> {
    Ok(match s {
        "train" => Split::Train,
        "val" => Split::Val,
        "test" => Split::Test,
        other => bail!("unknown split `{other}` (train, val or test)"),
    })
}

pub fn demo(ctx: &Ctx, a: DemoArgs) -> Result<()> {
    if a.video {
        return crate::demo_video::demo_video(ctx, &a);
    }
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from("runs/demo"));
    let mut cfg: RunConfig = toml::from_str(DEMO_CONFIG).context("the embedded demo config")?;
    cfg.train.out = out.clone();
    if let Some(s) = a.steps {
        // The queue starts at the same fraction of a longer or shorter run.
        let q = &mut cfg.objectives.queue;
        q.start_step = q.start_step * s / cfg.train.steps.max(1);
        cfg.train.steps = s;
    }
    clear_earlier_demo(&out)?;
    outln!(
        "COTS demo: training a {} two-stream model on the embedded synthetic scenes ({} steps of {} pairs)",
        cfg.model.preset, cfg.train.steps, cfg.data.batch_size
    )?;
    let mut trainer = Trainer::new(cfg, &ctx.device, false)?;
    let summary = trainer.run(ctx.quiet)?;
    outln!(
        "trained {} steps in {:.0} s, final loss {:.3}; run saved in {}",
        summary.steps,
        summary.seconds,
        summary.final_loss,
        out.display()
    )?;
    let report = trainer.evaluate(Split::Test)?;
    outln!(
        "\nHeld-out test split (unseen scene families, hard negatives in the gallery):\n{report}"
    )?;
    let chance = 100.0 / report.n_images as f64;
    outln!("(chance text-to-image R@1 is {chance:.1}%)")?;
    let dir = RunDir::new(&out);
    write_reports(&report, &dir.eval_json(), &dir.eval_markdown())?;

    let run = Run::open(&out, &ctx.device)?;
    let data = load_dataset(&run.cfg)?.split(Split::Test)?;
    let sources: Vec<ImageSource> = data.items.iter().map(|i| i.source.clone()).collect();
    let gallery = run.embed_images(&sources)?;
    outln!(
        "\nExample searches over the {} test images:",
        data.items.len()
    )?;
    for item in data
        .items
        .iter()
        .step_by((data.items.len() / 3).max(1))
        .take(3)
    {
        let q = &item.captions[0];
        let emb = run.embed_texts(std::slice::from_ref(q))?;
        let hits = &top_k(&emb, &gallery, 3)?[0];
        outln!("  \"{q}\"")?;
        for (rank, (i, score)) in hits.iter().enumerate() {
            let mark = if data.items[*i].id == item.id {
                "  <- the described image"
            } else {
                ""
            };
            outln!(
                "    {}. {:.3}  {}{mark}",
                rank + 1,
                score,
                data.items[*i].captions[0]
            )?;
        }
    }
    Ok(())
}

/// Removes an earlier demo run in `out`, refusing to touch a directory that
/// is not a cots run.
pub fn clear_earlier_demo(out: &Path) -> Result<()> {
    let dir = RunDir::new(out);
    if dir.checkpoints().exists() {
        if !dir.config().exists() {
            bail!(
                "{} exists and is not a cots run: choose another --out",
                out.display()
            );
        }
        std::fs::remove_dir_all(out)
            .with_context(|| format!("clearing the earlier demo in {}", out.display()))?;
    }
    Ok(())
}

pub fn write_reports(report: &cots_eval::RetrievalReport, json: &Path, md: &Path) -> Result<()> {
    std::fs::write(json, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    std::fs::write(md, report.to_markdown())
        .with_context(|| format!("writing {}", md.display()))?;
    Ok(())
}

pub fn train(ctx: &Ctx, a: TrainArgs) -> Result<()> {
    let mut cfg = RunConfig::load(&a.config)?;
    if let Some(o) = a.out {
        cfg.train.out = o;
    }
    if let Some(s) = a.steps {
        cfg.train.steps = s;
    }
    let mut trainer = Trainer::new(cfg, &ctx.device, a.resume)?;
    let s = trainer.run(ctx.quiet)?;
    if s.interrupted {
        outln!(
            "interrupted at step {}; checkpoint {}: continue with the same command and --resume",
            s.steps,
            s.checkpoint.display()
        )?;
        return Ok(());
    }
    outln!(
        "trained to step {} in {:.0} s (final loss {:.4}); checkpoint {}",
        s.steps,
        s.seconds,
        s.final_loss,
        s.checkpoint.display()
    )?;
    Ok(())
}

pub fn train_tokenizer(ctx: &Ctx, a: TrainTokenizerArgs) -> Result<()> {
    let cfg = match &a.config {
        Some(p) => RunConfig::load(p)?,
        None => toml::from_str(DEMO_CONFIG)?,
    };
    let dcfg = match (&a.dvae_config, a.preset.as_str()) {
        (Some(p), _) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let c: dvae::Config =
                serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
            c.validate()
                .with_context(|| format!("validating {}", p.display()))?;
            c
        }
        (None, "tiny") => dvae::Config::tiny(),
        (None, "small") => dvae::Config::small(),
        (None, "base") => dvae::Config::base(),
        (None, other) => bail!("unknown preset `{other}` (tiny, small or base)"),
    };
    let r = cots_train::tokenizer_train::train_tokenizer(
        &cfg,
        &dcfg,
        a.steps,
        &a.out,
        &ctx.device,
        ctx.quiet,
    )?;
    outln!(
        "visual tokenizer saved in {}: reconstruction MSE {:.4}, code perplexity {:.1}, {:.0}% of {} codes used ({} dead-code restarts)",
        a.out.display(),
        r.recon_mse,
        r.perplexity,
        100.0 * r.usage,
        r.codebook_size,
        r.restarts
    )?;
    Ok(())
}

fn dataset_for(run: &Run, data_config: Option<&Path>, split: &str) -> Result<Dataset> {
    let cfg = match data_config {
        Some(p) => RunConfig::load(p)?,
        None => run.cfg.clone(),
    };
    Ok(load_dataset(&cfg)?.split(parse_split(split)?)?)
}

pub fn train_cross(ctx: &Ctx, a: TrainCrossArgs) -> Result<()> {
    let miner = Run::open(&a.from, &ctx.device)?;
    let tc = CrossTrainConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        seed: a.seed,
        save_every: a.save_every,
        optim: cots_train::optim::OptimConfig {
            lr: a.lr,
            ..CrossTrainConfig::default().optim
        },
        ..CrossTrainConfig::default()
    };
    let ce = cots_train::cross::train_cross(&miner, &a.out, &tc, ctx.quiet, a.resume)?;
    if ce.step < tc.steps {
        outln!(
            "train-cross stopped at step {}/{}: continue with the same command and --resume",
            ce.step,
            tc.steps
        )?;
        return Ok(());
    }
    outln!(
        "cross-encoder trained for {} steps (final ITM loss {:.4}): {} (evaluate it with `cots eval --run {} --cross {}`)",
        ce.step,
        ce.loss.unwrap_or(f64::NAN),
        a.out.display(),
        a.from.display(),
        a.out.display()
    )?;
    Ok(())
}

fn decompose_config(a: &DecomposeArgs) -> Result<DecomposeConfig> {
    let pooling = match a.pooling.as_str() {
        "mean" => Pooling::Mean,
        "cls" => Pooling::Cls,
        other => bail!("unknown pooling `{other}` (mean or cls)"),
    };
    let d = DecomposeConfig::default();
    Ok(DecomposeConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        embed_dim: a.embed_dim,
        pooling,
        loss: BimodalConfig {
            intra_modal: !a.no_intra_modal,
            top_k: a.top_k,
            beta: a.beta,
            queue_size: a.queue,
            ..BimodalConfig::default()
        },
        optim: cots_train::optim::OptimConfig {
            lr: a.lr,
            ..d.optim
        },
        target_items: a.target_items,
        seed: a.seed,
        save_every: a.save_every,
        ..d
    })
}

/// The data a decomposition trains on: `--data-from`'s, else the cross-encoder's record.
fn decompose_data(ce: &CrossRun, data_from: Option<&Path>) -> Result<RunConfig> {
    match data_from {
        Some(dir) => Ok(RunDir::new(dir).read_config()?),
        None => ce.run_cfg.clone().with_context(|| {
            format!(
                "{} does not record its training data (trained by an older version): \
                 pass --data-from RUN, the two-stream run it was trained from",
                ce.dir.display()
            )
        }),
    }
}

pub fn decompose(ctx: &Ctx, a: DecomposeArgs) -> Result<()> {
    let dc = decompose_config(&a)?;
    let ce = CrossRun::open(&a.from, &ctx.device)?;
    let data = decompose_data(&ce, a.data_from.as_deref())?;
    let run = cots_train::decompose::decompose(&ce, &data, &a.out, &dc, ctx.quiet, a.resume)?;
    if run.step < dc.steps {
        outln!(
            "decompose stopped at step {}/{}: continue with the same command and --resume",
            run.step,
            dc.steps
        )?;
        return Ok(());
    }
    outln!(
        "decomposed {} into two encoders ({} steps): {} (evaluate it with `cots eval --run {}`)",
        a.from.display(),
        run.step,
        a.out.display(),
        a.out.display()
    )?;
    Ok(())
}

pub fn compare(ctx: &Ctx, a: CompareArgs) -> Result<()> {
    let cots = Run::open(&a.run, &ctx.device)?;
    let cross_dir = RunDir::new(&a.cross);
    if cross_dir.kind() != Some(RunKind::Cross) {
        // Checkpoints without serving files: a compare killed early.
        let resume = cross_dir.has_checkpoints()?;
        outln!(
            "{} holds no finished cross-encoder: {} one from {} (`cots train-cross` defaults)",
            a.cross.display(),
            if resume { "continuing" } else { "training" },
            a.run.display()
        )?;
        let tc = CrossTrainConfig::default();
        let ce = cots_train::cross::train_cross(&cots, &a.cross, &tc, ctx.quiet, resume)?;
        if ce.step < tc.steps {
            bail!("the cross-encoder's training was interrupted at step {}: run compare again to continue it", ce.step);
        }
    }
    let ce = CrossRun::open(&a.cross, &ctx.device)?;
    if !ce.finished() {
        bail!(
            "{} holds a cross-encoder stopped at step {}: finish it with `cots train-cross --from {} --out {} --resume`",
            a.cross.display(), ce.step, a.run.display(), a.cross.display()
        );
    }
    let dec_dir = RunDir::new(&a.decomposed);
    let dc = DecomposeConfig::default();
    if dec_dir.kind() != Some(RunKind::Decomposed) {
        let resume = dec_dir.has_checkpoints()?;
        outln!(
            "{} holds no finished decomposed model: {} {} (`cots decompose` defaults)",
            a.decomposed.display(),
            if resume {
                "continuing to decompose"
            } else {
                "decomposing"
            },
            a.cross.display()
        )?;
        let dec = cots_train::decompose::decompose(
            &ce,
            &cots.cfg,
            &a.decomposed,
            &dc,
            ctx.quiet,
            resume,
        )?;
        if dec.step < dc.steps {
            bail!(
                "the decomposition was interrupted at step {}: run compare again to continue it",
                dec.step
            );
        }
    }
    if !cots_train::decompose::finished(&dec_dir)? {
        bail!(
            "{} holds a decomposition stopped early: finish it with `cots decompose --from {} --out {} --resume`",
            a.decomposed.display(), a.cross.display(), a.decomposed.display()
        );
    }
    let dec = Run::open(&a.decomposed, &ctx.device)?;
    let mut data = dataset_for(&cots, None, &a.split)?;
    if let Some(n) = a.test_images {
        data.items.truncate(n.max(1));
    }
    let contenders = cots_train::compare::Contenders {
        cross: &ce,
        decomposed: Some(&dec),
        cots: &cots,
        rerank_k: &a.rerank_k,
    };
    let cmp = cots_train::compare::compare(&contenders, &data)?;
    let header = format!(
        "Command: `cots compare --run {} --cross {} --decomposed {}{}`; {} split.\n\n",
        a.run.display(),
        a.cross.display(),
        a.decomposed.display(),
        a.test_images
            .map(|n| format!(" --test-images {n}"))
            .unwrap_or_default(),
        a.split
    );
    let files = cmp.write(&a.out, &header)?;
    outln!("{header}{}", cmp.to_markdown())?;
    for f in files {
        outln!("wrote {}", f.display())?;
    }
    Ok(())
}

pub fn eval(ctx: &Ctx, a: EvalArgs) -> Result<()> {
    let run = Run::open(&a.run, &ctx.device)?;
    let data = dataset_for(&run, a.data_config.as_deref(), &a.split)?;
    let opts = EvalOptions {
        dual_softmax: a.dual_softmax,
        ..EvalOptions::default()
    };
    let report = match &a.cross {
        Some(dir) => CrossRun::open(dir, &ctx.device)?.evaluate_with(&data, &opts)?,
        None => run.evaluate_with(&data, &opts)?,
    };
    outln!("{report}")?;
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.markdown {
        std::fs::write(p, report.to_markdown())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

pub fn embed(ctx: &Ctx, a: EmbedArgs) -> Result<()> {
    let run = Run::open(&a.run, &ctx.device)?;
    let data = dataset_for(&run, a.data_config.as_deref(), &a.split)?;
    let sources: Vec<ImageSource> = data.items.iter().map(|i| i.source.clone()).collect();
    let (texts, targets) = data.queries();
    let img = run.embed_images(&sources)?;
    let txt = run.embed_texts(&texts)?;
    let targets: Vec<u32> = targets.iter().map(|&t| t as u32).collect();
    let n = targets.len();
    let tensors: HashMap<String, Tensor> = [
        ("image_embeddings".to_string(), img),
        ("text_embeddings".to_string(), txt),
        (
            "text_to_image".to_string(),
            Tensor::from_vec(targets, n, &Device::Cpu)?,
        ),
    ]
    .into();
    candle_core::safetensors::save(&tensors, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let meta = serde_json::json!({
        "weights_hash": run.weights_hash,
        "run": run.dir,
        "images": data.items.iter().map(|i| i.source.describe()).collect::<Vec<_>>(),
        "image_ids": data.items.iter().map(|i| i.id).collect::<Vec<_>>(),
        "texts": texts,
    });
    let side = a.out.with_extension("json");
    std::fs::write(&side, serde_json::to_string_pretty(&meta)?)
        .with_context(|| format!("writing {}", side.display()))?;
    outln!(
        "embedded {} {} and {} captions into {} (+ {})",
        data.items.len(),
        gallery_noun(&run),
        n,
        a.out.display(),
        side.display()
    )?;
    Ok(())
}

/// What a run's gallery holds: "videos" for a video run, else "images".
fn gallery_noun(run: &Run) -> &'static str {
    if run.cfg.data.image.frames.is_some() {
        "videos"
    } else {
        "images"
    }
}

pub fn search(ctx: &Ctx, a: SearchArgs) -> Result<()> {
    let run = Run::open(&a.run, &ctx.device)?;
    let side = a.index.with_extension("json");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&side).with_context(|| format!("reading {}", side.display()))?,
    )
    .with_context(|| format!("parsing {}", side.display()))?;
    let built_with = meta["weights_hash"].as_str().unwrap_or("");
    if built_with != run.weights_hash && !a.allow_model_mismatch {
        bail!(
            "{} was embedded by another checkpoint (weights {built_with}, this run's are {}): re-embed it, \
             or pass --allow-model-mismatch",
            a.index.display(),
            run.weights_hash
        );
    }
    let tensors = candle_core::safetensors::load(&a.index, &Device::Cpu)
        .with_context(|| format!("reading {}", a.index.display()))?;
    let get = |k: &str| -> Result<Tensor> {
        Ok(tensors
            .get(k)
            .with_context(|| format!("{} has no `{k}`", a.index.display()))?
            .to_dtype(DType::F32)?
            .to_device(&ctx.device)?)
    };
    let names = |key: &str| -> Vec<String> {
        meta[key]
            .as_array()
            .map(|v| {
                v.iter()
                    .map(|x| x.as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let visual = match (&a.image, &a.video) {
        (Some(p), None) => Some(ImageSource::Path(p.clone())),
        (None, Some(p)) => Some(ImageSource::Video(p.clone())),
        (None, None) => None,
        (Some(_), Some(_)) => bail!("give --image or --video, not both"),
    };
    let (query, gallery, labels, what) = match (&a.query, visual) {
        (Some(q), None) => {
            if q.trim().is_empty() {
                bail!("the query is empty");
            }
            (
                run.embed_texts(std::slice::from_ref(q))?,
                get("image_embeddings")?,
                names("images"),
                gallery_noun(&run),
            )
        }
        (None, Some(source)) => (
            run.embed_images(&[source])?,
            get("text_embeddings")?,
            names("texts"),
            "captions",
        ),
        _ => bail!("give either a text query or --image PATH (or --video PATH)"),
    };
    let hits = &top_k(&query, &gallery, a.k)?[0];
    outln!("top {} {what}:", hits.len())?;
    for (rank, (i, s)) in hits.iter().enumerate() {
        let label = labels.get(*i).map(String::as_str).unwrap_or("?");
        outln!("{:>3}. {s:.4}  {label}", rank + 1)?;
    }
    Ok(())
}
