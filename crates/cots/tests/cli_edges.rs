//! The CLI's rough edges, on the real binary: search modes printed as
//! phrases, `-k 0` refused, a reader that closes the pipe early (`| head`)
//! ends the command quietly, plain-text logs when stderr is not a terminal,
//! and an index that keeps one thumbnail size.

use std::path::Path;
use std::process::{Command, Output, Stdio};

mod common;
use common::{cots, fails, ok};

const CONFIG: &str = r#"
[model]
preset = "tiny"
[data]
kind = "synthetic"
batch_size = 8
max_text_len = 20
[data.synthetic]
train = 24
val = 4
test = 12
[train]
steps = 2
log_every = 1
eval_every = 0
checkpoint_every = 2
[objectives.queue]
size = 16
[[objectives.objectives]]
kind = "itc"
"#;

fn as_str(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Runs `cots --device cpu <args>` with its standard output on a pipe whose
/// reading end is already closed, as `cots ... | head -1` leaves it once
/// `head` has its line: every write fails with EPIPE.
fn into_closed_pipe(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_cots"))
        .args(["--quiet", "--device", "cpu"])
        .args(args)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn rough_edges() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let run = dir.path().join("run");
    let idx = dir.path().join("idx");
    ok(&["train", "--config", &s(&cfg), "--out", &s(&run)]);
    let build = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "index",
            "build",
            "--run",
            &s(&run),
            "--out",
            &s(&idx),
            "--data-config",
            &s(&cfg),
            "--split",
            "test",
            "--ann",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };

    // One thumbnail size per index: a resumed build or an add with another
    // is refused, naming both sizes and the way on.
    let first = build(&["--thumb-size", "64"]);
    ok(&as_str(&first));
    let other = build(&["--thumb-size", "80"]);
    let err = fails(&as_str(&other));
    assert!(
        err.contains("64 px") && err.contains("80 px") && err.contains("--thumb-size 64"),
        "{err}"
    );
    let info = ok(&["index", "info", "--index", &s(&idx)]);
    assert!(info.contains("64 px"), "{info}");
    // Without the flag, the recorded size is used.
    ok(&as_str(&build(&[])));
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    image::RgbImage::from_pixel(40, 30, image::Rgb([200, 10, 10]))
        .save(photos.join("red.png"))
        .unwrap();
    let add = |size: &str| {
        cots(&[
            "index",
            "add",
            "--index",
            &s(&idx),
            "--run",
            &s(&run),
            "--folder",
            &s(&photos),
            "--thumb-size",
            size,
        ])
    };
    let refused = add("80");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("80 px"));
    assert!(add("64").status.success());

    // The search mode is a phrase, not Rust debug text.
    let search = |extra: &[&str]| {
        let mut args = vec![
            "index",
            "search",
            "--index",
            idx.to_str().unwrap(),
            "--run",
            run.to_str().unwrap(),
            "a red circle",
        ];
        args.extend_from_slice(extra);
        ok(&args)
    };
    let exact = search(&[]);
    assert!(exact.contains("(exact search, "), "{exact}");
    let approx = search(&["--approx", "--ef", "32"]);
    assert!(
        approx.contains("approximate search, HNSW graph keeping 32 candidates"),
        "{approx}"
    );
    assert!(
        !approx.contains('{') && !approx.contains("Approximate"),
        "{approx}"
    );

    // `-k 0` is an error, in both search commands.
    let err = fails(&[
        "index",
        "search",
        "--index",
        &s(&idx),
        "--run",
        &s(&run),
        "a red circle",
        "-k",
        "0",
    ]);
    assert!(err.contains("at least 1"), "{err}");
    let emb = dir.path().join("emb.safetensors");
    ok(&["embed", "--run", &s(&run), "--out", &s(&emb)]);
    let err = fails(&[
        "search",
        "--run",
        &s(&run),
        "--index",
        &s(&emb),
        "a red circle",
        "-k",
        "0",
    ]);
    assert!(err.contains("at least 1"), "{err}");

    // A closed pipe: no panic, no error message, status 0.
    for args in [
        vec!["index", "info", "--index", idx.to_str().unwrap()],
        vec![
            "index",
            "search",
            "--index",
            idx.to_str().unwrap(),
            "--run",
            run.to_str().unwrap(),
            "a red circle",
        ],
        vec![
            "index",
            "search",
            "--index",
            idx.to_str().unwrap(),
            "--run",
            run.to_str().unwrap(),
            "a red circle",
            "--json",
        ],
        vec![
            "search",
            "--run",
            run.to_str().unwrap(),
            "--index",
            emb.to_str().unwrap(),
            "a red circle",
        ],
        vec!["eval", "--run", run.to_str().unwrap()],
    ] {
        let out = into_closed_pipe(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(err.trim().is_empty(), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }

    // Logs to a file or a pipe carry no colour codes. (Info level, so that
    // the device line is logged; NO_COLOR unset, so it is not what keeps
    // the codes out.)
    let out = Command::new(env!("CARGO_BIN_EXE_cots"))
        .args(["index", "info", "--index", idx.to_str().unwrap()])
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("device: cpu"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "ANSI codes in a piped log: {err:?}"
    );

    // `--index` says what it wants in every subcommand that takes it (the
    // unit test in main.rs checks every flag; this checks what users see).
    for (sub, phrase) in [
        (&["index", "search"][..], "The index directory to search"),
        (&["index", "add"], "The index directory to add to"),
        (
            &["index", "remove"],
            "The index directory to remove items from",
        ),
        (&["index", "info"], "The index directory to summarise"),
        (&["index", "export"], "The index directory to export"),
        (&["search"], "Embeddings written by `cots embed`"),
    ] {
        let mut args = sub.to_vec();
        args.push("--help");
        let help = ok(&args);
        assert!(help.contains(phrase), "{sub:?}: {help}");
    }
}
