//! `cots train` killed with SIGKILL (not a clean exit) at seeded-random
//! moments and in the middle of checkpoint writes, resumed with `--resume`
//! each time, must log the same loss curve as an uninterrupted run, value
//! for value as printed. Warm-up 0 and a cosine schedule, so the learning
//! rate depends on the run length from the first step; the adaptive momentum
//! filter, the KL term and the queue carry state across the kills.
//!
//! A damaged newest checkpoint (truncated by hand) is skipped by `--resume`
//! and `cots eval` with a warning naming it, and the run carries on from the
//! one before it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{cots, ok};

const STEPS: u64 = 40;

const CONFIG: &str = r#"
[model]
preset = "tiny"
[data]
kind = "synthetic"
batch_size = 8
max_text_len = 20
[data.synthetic]
train = 48
val = 4
test = 8
[train]
steps = 40
log_every = 1
eval_every = 0
checkpoint_every = 3
keep_last = 2
[schedule]
warmup_steps = 0
[objectives.queue]
size = 32
[objectives.amf]
enabled = true
warmup_steps = 2
[[objectives.objectives]]
kind = "itc"
[[objectives.objectives]]
kind = "kl"
"#;

/// No wait in the whole test is longer than this.
const DEADLINE: Duration = Duration::from_secs(300);

/// SplitMix64, seeded: the kill moments are random but the same every run
/// (this crate has no `rand` dependency, and needs no more than this).
struct Seeded(u64);

impl Seeded {
    /// A number in `[lo, hi)`.
    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        lo + (hi - lo) * (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Starts `cots train` on `out`, resuming when it holds a checkpoint;
/// `pause_ms` sets the checkpoint-write pause of the test hook.
fn spawn_train(cfg: &Path, out: &Path, pause_ms: Option<u64>) -> Child {
    let resume = cots_train::checkpoint::latest(&out.join("checkpoints"))
        .unwrap()
        .is_some();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cots"));
    cmd.args(["--quiet", "--device", "cpu", "train", "--config"])
        .arg(cfg)
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env_remove(cots_train::checkpoint::PAUSE_ENV);
    if resume {
        cmd.arg("--resume");
    }
    if let Some(ms) = pause_ms {
        cmd.env(cots_train::checkpoint::PAUSE_ENV, ms.to_string());
    }
    cmd.spawn().unwrap()
}

/// Sends SIGKILL and reaps the child; whether it was still running.
fn kill(mut child: Child) -> bool {
    let running = child.try_wait().unwrap().is_none();
    // An error here only means that it had already exited.
    let _ = child.kill();
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    running && status.signal() == Some(9)
}

/// The checkpoint files of `out` with names ending in `suffix`.
fn files(out: &Path, suffix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(out.join("checkpoints")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect()
}

/// Polls until `ready` holds or `child` exits (`false` then).
fn wait_for(child: &mut Child, ready: impl Fn() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < DEADLINE {
        if ready() {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("nothing happened within {DEADLINE:?}");
}

/// Each metrics record as printed, without the throughput (a timing).
fn curve(out: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let start = l.find(",\"pairs_per_s\":").expect("a pairs_per_s field");
            let rest = &l[start + 1..];
            let end = rest.find([',', '}']).unwrap();
            format!("{}{}", &l[..start], &rest[end..])
        })
        .collect()
}

#[test]
fn killed_runs_resume_onto_the_uninterrupted_loss_curve() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let (reference, killed) = (dir.path().join("reference"), dir.path().join("killed"));

    let t0 = Instant::now();
    ok(&["train", "--config", &s(&cfg), "--out", &s(&reference)]);
    let full = t0.elapsed();
    let want = curve(&reference);
    assert_eq!(want.len(), STEPS as usize, "{want:#?}");

    // Kills at seeded-random moments within the first third of a run's
    // length: mid-step most of the time, wherever the process happens to be
    // (loading, a forward or backward pass, a log line, a checkpoint).
    let mut rng = Seeded(22);
    let has_checkpoint = || {
        cots_train::checkpoint::latest(&killed.join("checkpoints"))
            .unwrap()
            .is_some()
    };
    let (mut killed_running, mut killed_resumed) = (0, 0);
    let mut random_kill = |killed_running: &mut usize, killed_resumed: &mut usize| {
        let resumed = has_checkpoint();
        let child = spawn_train(&cfg, &killed, None);
        std::thread::sleep(full.mul_f64(rng.between(0.1, 0.3)));
        let hit = kill(child);
        *killed_running += usize::from(hit);
        *killed_resumed += usize::from(hit && resumed);
    };
    random_kill(&mut killed_running, &mut killed_resumed);
    random_kill(&mut killed_running, &mut killed_resumed);

    // A kill while the weights of a checkpoint sit complete in their
    // temporary file, before the rename.
    let mut child = spawn_train(&cfg, &killed, Some(60_000));
    assert!(
        wait_for(&mut child, || !files(&killed, ".tmp").is_empty()),
        "the run ended before writing a checkpoint"
    );
    assert!(kill(child));
    // A kill after the weights' rename, while the JSON that completes the
    // checkpoint waits in its temporary file.
    let mut child = spawn_train(&cfg, &killed, Some(1_000));
    // Temporary files are named `<target>.<random>.tmp`.
    let json_pending = || {
        files(&killed, ".tmp").iter().any(|tmp| {
            let name = tmp.file_name().unwrap().to_string_lossy().into_owned();
            let Some((stem, _)) = name.split_once(".json.") else {
                return false;
            };
            let dir = tmp.parent().unwrap();
            dir.join(format!("{stem}.safetensors")).exists()
                && !dir.join(format!("{stem}.json")).exists()
        })
    };
    assert!(
        wait_for(&mut child, json_pending),
        "the run ended before a checkpoint's JSON write"
    );
    assert!(kill(child));

    for _ in 0..3 {
        random_kill(&mut killed_running, &mut killed_resumed);
    }
    // Most random kills find the run still going (a late one may find it
    // finished, which is fine too).
    assert!(
        killed_running >= 3,
        "only {killed_running} of 5 random kills hit a running process"
    );
    // And some of them hit a run that had itself been resumed.
    assert!(
        killed_resumed >= 2,
        "only {killed_resumed} kills hit a resumed run"
    );
    assert!(has_checkpoint());

    // Then to the end, uninterrupted.
    let mut child = spawn_train(&cfg, &killed, None);
    assert!(!wait_for(&mut child, || false));
    assert!(child.wait().unwrap().success());
    let got = curve(&killed);
    assert_eq!(got.len(), want.len(), "{got:#?}");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w, "the resumed loss curve differs");
    }
    // Nothing a killed write left behind survives the next checkpoint.
    assert!(files(&killed, ".tmp").is_empty());
}

#[test]
fn a_truncated_newest_checkpoint_is_skipped_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let run = dir.path().join("run");
    let args = [
        "train",
        "--config",
        &s(&cfg),
        "--out",
        &s(&run),
        "--steps",
        "6",
    ];
    ok(&args);
    let want = curve(&run);

    let newest = run.join("checkpoints").join("step-00000006.safetensors");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap();
    f.set_len(f.metadata().unwrap().len() / 2).unwrap();
    drop(f);

    let eval = cots(&["eval", "--run", &s(&run)]);
    let err = String::from_utf8_lossy(&eval.stderr);
    assert!(eval.status.success(), "{err}");
    assert!(
        err.contains("step-00000006.safetensors") && err.contains("truncated"),
        "the warning should name the skipped file: {err}"
    );

    let mut resume = args.to_vec();
    resume.push("--resume");
    let out = cots(&resume);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("step-00000006.safetensors"), "{err}");
    // It went on from step 4 and wrote step 6 again, whole this time, on
    // the same curve.
    assert_eq!(curve(&run), want);
    let newest_json = newest.with_extension("json");
    cots_train::checkpoint::check(&newest_json).unwrap();
}
