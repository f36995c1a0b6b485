//! The cross-encoder's training (`cots train-cross`) and VLDeformer's
//! decomposition (`cots decompose`) run in the same loop as `cots train`,
//! so they resume the same way: each is killed with SIGKILL mid-run after
//! its first checkpoint, stopped with SIGTERM (which must checkpoint and
//! exit cleanly), resumed with `--resume` after each, and must log the same
//! loss curve and write the same final weights, byte for byte, as an
//! uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::ok;

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
steps = 4
log_every = 1
eval_every = 0
checkpoint_every = 4
[[objectives.objectives]]
kind = "itc"
"#;

/// Steps of each resumed task, checkpointing every 2.
const STEPS: &str = "14";

/// No wait in the whole test is longer than this.
const DEADLINE: Duration = Duration::from_secs(300);

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// The arguments of one task into `out`.
fn task_args(task: &str, from: &Path, out: &Path) -> Vec<String> {
    let mut args = vec![
        task.to_string(),
        "--from".into(),
        s(from),
        "--out".into(),
        s(out),
        "--steps".into(),
        STEPS.into(),
        "--batch-size".into(),
        "8".into(),
        "--save-every".into(),
        "2".into(),
    ];
    if task == "decompose" {
        args.extend([
            "--embed-dim".into(),
            "16".into(),
            "--queue".into(),
            "16".into(),
        ]);
    }
    args
}

fn spawn(args: &[String], resume: bool) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cots"));
    cmd.args(["--quiet", "--device", "cpu"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if resume {
        cmd.arg("--resume");
    }
    cmd.spawn().unwrap()
}

/// The step of the newest complete checkpoint of `out` (0: none).
fn checkpointed(out: &Path) -> u64 {
    cots_train::checkpoint::list(&out.join("checkpoints"))
        .unwrap()
        .last()
        .map(|c| c.0)
        .unwrap_or(0)
}

/// Polls until `out` holds a checkpoint past `step` while `child` runs;
/// `false` when the child exited first.
fn wait_for_checkpoint_after(child: &mut Child, out: &Path, step: u64) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < DEADLINE {
        if checkpointed(out) > step {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("no checkpoint past step {step} within {DEADLINE:?}");
}

/// Sends SIGKILL and reaps the child; whether it was still running.
fn kill(mut child: Child) -> bool {
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    running && status.signal() == Some(9)
}

/// Sends SIGTERM and waits for the child: its exit status and standard
/// output.
fn terminate(child: Child) -> (std::process::ExitStatus, String) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: `kill` only sends a signal to our own child, still unreaped
    // (so its pid cannot have been reused).
    let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(sent, 0, "kill(SIGTERM) failed");
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Each metrics record as printed, without the throughput (a timing).
fn curve(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("pairs_per_s");
            v
        })
        .collect()
}

/// Runs `task` uninterrupted into `reference`, then killed, stopped and
/// resumed into `killed`, and compares the two; returns `reference`.
fn check_task(task: &str, from: &Path, root: &Path, weights: &str) -> PathBuf {
    let (reference, killed) = (root.join(format!("{task}-ref")), root.join(task));
    let args: Vec<String> = task_args(task, from, &reference);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let want = curve(&reference);
    assert_eq!(want.len(), STEPS.parse::<usize>().unwrap(), "{want:#?}");

    let args = task_args(task, from, &killed);
    // SIGKILL right after the first checkpoint lands: mid-step.
    let mut child = spawn(&args, false);
    assert!(
        wait_for_checkpoint_after(&mut child, &killed, 0),
        "{task} ended before its first checkpoint"
    );
    assert!(kill(child), "{task} finished before the kill");
    let first = checkpointed(&killed);
    assert!((2..14).contains(&first), "checkpoint at {first}");

    // SIGTERM after the resumed run's next checkpoint: the step under way
    // finishes, a checkpoint is written for it, and the process exits 0.
    let mut child = spawn(&args, true);
    assert!(
        wait_for_checkpoint_after(&mut child, &killed, first),
        "the resumed {task} ended before its next checkpoint"
    );
    let (status, stdout) = terminate(child);
    assert!(status.success(), "{task} on SIGTERM: {status:?} {stdout}");
    // The signal came with steps to go (a step takes far longer than
    // sending the signal), so the run stopped early, said how to go on, and
    // checkpointed the step the signal let finish: the metrics log ends
    // at it too.
    let stopped = checkpointed(&killed);
    assert!(stopped > first && stopped < 14, "stopped at {stopped}");
    assert!(stdout.contains("--resume"), "{stdout}");
    assert_eq!(curve(&killed).len() as u64, stopped);

    // Then to the end.
    let mut child = spawn(&args, true);
    assert!(child.wait().unwrap().success());
    assert_eq!(
        curve(&killed),
        want,
        "the resumed {task} loss curve differs"
    );
    let a = std::fs::read(reference.join(weights)).unwrap();
    let b = std::fs::read(killed.join(weights)).unwrap();
    assert!(a == b, "the resumed {task} ends with other weights");
    reference
}

#[test]
fn cross_encoder_and_decomposition_resume_exactly_after_sigkill_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let base = dir.path().join("cots");
    ok(&["train", "--config", &s(&cfg), "--out", &s(&base)]);

    let cross = check_task("train-cross", &base, dir.path(), "cross.safetensors");
    check_task("decompose", &cross, dir.path(), "decomposed.safetensors");
}
