//! Tries the security holes of issue #22 against a real server on a loopback
//! port and says, one line each, whether each is closed:
//!
//! ```text
//! PASS|FAIL <hole>: <what happened>
//! ```
//!
//! It exits non-zero if any hole is open. Run it with
//! `cargo run --release -p cots-serve --example attack`.
//!
//! The server runs in this process, on a temporary gallery of three PNGs,
//! with the service's default limits except a cap of 100 connections (so
//! the flood below crosses it without running out of file descriptors). No
//! model: the query encoder embeds an image as its mean colour, which is
//! enough to tell whether an SVG drew a file it should not have read.
//!
//! - `svg-file-read`: SVG uploads whose `<image href>` points at a PNG
//!   outside the gallery (drawn: the search finds the green item), at
//!   `/etc/passwd`, at `/dev/zero` (a read that never ends) and at a FIFO
//!   (an open that never returns). Each must be answered within a bound,
//!   without drawing the file or growing memory.
//! - `dropped-decode-memory`: twelve uploads of an 8000 x 8000 PNG whose
//!   clients hang up 20 ms after sending; the peak RSS of this process
//!   (server included) must stay within 1 GiB of where it was.
//! - `slowloris`: 300 connections that send nothing or a header a byte a
//!   second; every one must be closed or refused by the header-read timeout
//!   plus five seconds.
//! - `gallery-symlink`: a gallery file replaced by a link to `/etc/passwd`
//!   must not be served.
//!
//! Everything is bounded in time; the probes take about 15 seconds.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cots_index::{Index, Item, ItemKind, Model};
use cots_serve::{AppState, Config, ConnectionLimits, QueryEncoder};
use image::RgbImage;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one probe request may take before it counts as a hang.
const ANSWER_BOUND: Duration = Duration::from_secs(8);
/// How far this process's resident memory may grow during a probe.
const MEMORY_BUDGET_MIB: u64 = 1024;
/// Connections the server takes at once in this run.
const MAX_CONNECTIONS: usize = 100;
/// Connections the slowloris probe opens.
const SLOW_CONNECTIONS: usize = 300;

/// Embeds an image as its mean colour (unit length), a text as grey.
struct MeanColour;

fn unit(v: [f32; 3]) -> [f32; 3] {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.map(|x| x / n)
}

impl QueryEncoder for MeanColour {
    fn embed_texts(&self, texts: &[String]) -> cots_infer::Result<Vec<f32>> {
        Ok(texts.iter().flat_map(|_| unit([1.0; 3])).collect())
    }
    fn embed_images(&self, images: &[RgbImage]) -> cots_infer::Result<Vec<f32>> {
        Ok(images
            .iter()
            .flat_map(|img| {
                let mut sum = [0f64; 3];
                for p in img.pixels() {
                    for (s, c) in sum.iter_mut().zip(p.0) {
                        *s += f64::from(c);
                    }
                }
                unit(sum.map(|s| s as f32))
            })
            .collect())
    }
    fn dim(&self) -> usize {
        3
    }
    fn weights_hash(&self) -> &str {
        "mean-colour"
    }
    fn describe(&self) -> String {
        "the attack script's mean-colour encoder".into()
    }
}

fn png(colour: [u8; 3], w: u32, h: u32) -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    RgbImage::from_pixel(w, h, image::Rgb(colour)).write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// The issue's upload: 8000 x 8000 pixels that compress to a few hundred
/// kilobytes.
fn huge_png() -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    let enc = image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::NoFilter,
    );
    image::GrayImage::new(8000, 8000).write_with_encoder(enc)?;
    Ok(out.into_inner())
}

/// The temporary gallery: `white`, `green` and `photo` under `root`, a
/// green PNG outside it, an index of the three.
struct Gallery {
    dir: tempfile::TempDir,
    root: PathBuf,
    /// A PNG outside the gallery that no upload may make the server read.
    outside_png: PathBuf,
}

fn gallery() -> Result<Gallery> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("gallery");
    std::fs::create_dir_all(root.join("images"))?;
    let outside_png = dir.path().join("outside-green.png");
    std::fs::write(&outside_png, png([0, 255, 0], 64, 64)?)?;
    let items = [
        ("white", [255, 255, 255]),
        ("green", [0, 255, 0]),
        ("photo", [255, 0, 0]),
    ];
    let mut vectors = Vec::new();
    let mut rows = Vec::new();
    for (id, colour) in items {
        let rel = format!("images/{id}.png");
        std::fs::write(root.join(&rel), png(colour, 64, 64)?)?;
        vectors.extend(unit(colour.map(f32::from)));
        rows.push(Item {
            id: id.into(),
            kind: ItemKind::Image,
            path: Some(rel),
            captions: vec![format!("a {id} square")],
            metadata: BTreeMap::new(),
        });
    }
    let mut index = Index::create(
        &dir.path().join("index"),
        Model {
            weights_hash: "mean-colour".into(),
            run: "attack".into(),
            dim: 3,
        },
    )?;
    index.set_root(Some(&root))?;
    index.add(rows, &vectors, vec![None, None, None])?;
    Ok(Gallery {
        dir,
        root,
        outside_png,
    })
}

/// This process's resident memory now and at its peak since the last
/// [`reset_peak`], in MiB.
fn rss_mib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Starts the peak (VmHWM) over from the current resident size.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`): the
/// status code and body, or why there is none within `bound`.
async fn request(
    addr: SocketAddr,
    head: &str,
    body: &[u8],
    bound: Duration,
) -> Result<(u16, Vec<u8>)> {
    let exchange = async {
        let mut c = TcpStream::connect(addr).await?;
        c.write_all(head.as_bytes()).await?;
        c.write_all(body).await?;
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).await?;
        anyhow::Ok(answer)
    };
    let answer = tokio::time::timeout(bound, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {bound:?}"))??;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| {
            format!(
                "not an HTTP answer: {:?}",
                text.chars().take(80).collect::<String>()
            )
        })?;
    let body = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or_else(Vec::new, |i| answer[i + 4..].to_vec());
    Ok((status, body))
}

fn upload_head(addr: SocketAddr, len: usize) -> String {
    format!(
        "POST /api/search/image HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: multipart/form-data; boundary=attack-boundary\r\n\
         Content-Length: {len}\r\n\r\n"
    )
}

fn upload_body(name: &str, bytes: &[u8]) -> Vec<u8> {
    let mut body = format!(
        "--attack-boundary\r\nContent-Disposition: form-data; name=\"image\"; \
         filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(b"\r\n--attack-boundary--\r\n");
    body
}

/// Uploads `bytes` and says what came back, watching this process's memory
/// meanwhile: a decode that eats memory without end is stopped by ending
/// the process (the verdict is printed first).
async fn upload(addr: SocketAddr, name: &str, bytes: &[u8], what: &str) -> String {
    let body = upload_body(name, bytes);
    let head = upload_head(addr, body.len());
    let (before, _) = rss_mib();
    let started = Instant::now();
    let call = request(addr, &head, &body, ANSWER_BOUND);
    let mut call = std::pin::pin!(call);
    let answer = loop {
        tokio::select! {
            answer = &mut call => break answer,
            () = tokio::time::sleep(Duration::from_millis(10)) => {
                let (now, _) = rss_mib();
                if now.saturating_sub(before) > MEMORY_BUDGET_MIB {
                    println!(
                        "FAIL svg-file-read: {what}: resident memory grew by {} MiB while the \
                         server decoded it; stopping here",
                        now - before
                    );
                    std::process::exit(1);
                }
            }
        }
    };
    let took = started.elapsed();
    match answer {
        Ok((status, body)) => {
            let top = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| {
                    v["hits"][0]["id"]
                        .as_str()
                        .map(str::to_string)
                        .or_else(|| v["error"].as_str().map(|e| format!("error: {e}")))
                })
                .unwrap_or_default();
            format!("{status} in {} ms ({top})", took.as_millis())
        }
        Err(e) => format!("HANG ({e})"),
    }
}

/// Standard base64 with padding, for a `data:` URL.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn svg_probes(addr: SocketAddr, g: &Gallery) -> Result<(bool, String)> {
    let svg = |href: &str| {
        format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="64" height="64"><rect width="64" height="64" fill="white"/><image x="0" y="0" width="64" height="64" href="{href}" xlink:href="{href}"/></svg>"#
        )
    };
    let fifo = g.dir.path().join("fifo.png");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .context("running mkfifo")?;
    if !made.success() {
        bail!("mkfifo {} failed", fifo.display());
    }
    // The control: the same green picture embedded in the SVG itself is
    // drawn, which shows that a green first hit is what a drawn file gives.
    let embedded = format!(
        "data:image/png;base64,{}",
        base64(&std::fs::read(&g.outside_png)?)
    );
    let control = upload(addr, "x.svg", svg(&embedded).as_bytes(), "an embedded PNG").await;
    let outside = g.outside_png.display().to_string();
    let drawn = upload(addr, "x.svg", svg(&outside).as_bytes(), "an outside PNG").await;
    let passwd = upload(addr, "x.svg", svg("/etc/passwd").as_bytes(), "/etc/passwd").await;
    let zero = upload(addr, "x.svg", svg("/dev/zero").as_bytes(), "/dev/zero").await;
    let pipe = upload(
        addr,
        "x.svg",
        svg(&fifo.display().to_string()).as_bytes(),
        "a FIFO",
    )
    .await;
    // The outside PNG is green: a green first hit means the server drew it.
    let leaked = drawn.contains("(green)");
    let hung = [&control, &drawn, &passwd, &zero, &pipe]
        .iter()
        .any(|a| a.starts_with("HANG"));
    let detail = format!(
        "outside PNG: {drawn}{}; /etc/passwd: {passwd}; /dev/zero: {zero}; FIFO: {pipe}; \
         control, the same PNG embedded in the SVG: {control}",
        if leaked {
            " = the file was read and drawn"
        } else {
            ""
        }
    );
    Ok((!leaked && !hung, detail))
}

async fn dropped_decodes(addr: SocketAddr, state: &AppState) -> Result<(bool, String)> {
    let png = huge_png()?;
    let body = upload_body("huge.png", &png);
    let head = upload_head(addr, body.len());
    // The PNG buffers above are freed or kept; either way they are in the
    // baseline, not in the growth.
    let (before, _) = rss_mib();
    reset_peak();
    // One client after another, each hanging up 20 ms after its upload
    // (the decode it started has begun by then, and takes longer): a
    // server that frees a permit when its client goes has as many decodes
    // running at once as there were clients.
    for _ in 0..12 {
        let mut c = TcpStream::connect(addr).await?;
        c.write_all(head.as_bytes()).await?;
        c.write_all(&body).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(c);
    }
    // Let the server finish whatever the dropped requests started: wait
    // until no blocking task runs, a while, then once more.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut quiet_since = None;
    while Instant::now() < deadline {
        if state.blocking_in_use() == 0 {
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_millis(1500) {
                break;
            }
        } else {
            quiet_since = None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (after, peak) = rss_mib();
    let grew = peak.saturating_sub(before);
    let detail = format!(
        "12 dropped uploads of an 8000 x 8000 PNG ({} KB): resident {before} MiB before, \
         peak {peak} MiB (+{grew} MiB; budget {MEMORY_BUDGET_MIB} MiB), {after} MiB after; \
         blocking tasks still running: {}",
        png.len() / 1024,
        state.blocking_in_use()
    );
    Ok((grew <= MEMORY_BUDGET_MIB, detail))
}

/// How one slow connection ended.
enum Slow {
    /// Closed or reset by the server, after this long.
    Closed(Duration),
    /// Still open at the deadline.
    Open,
}

async fn slowloris(addr: SocketAddr, limits: &ConnectionLimits) -> Result<(bool, String)> {
    let started = Instant::now();
    let deadline = started + limits.header_read_timeout + Duration::from_secs(5);
    let mut conns = Vec::new();
    for i in 0..SLOW_CONNECTIONS {
        let mut c = TcpStream::connect(addr).await?;
        conns.push(tokio::spawn(async move {
            let trickle = i % 2 == 1;
            if trickle {
                // Half of them start a header and send a byte a second.
                let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ").await;
            }
            let mut buf = [0u8; 512];
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    read = c.read(&mut buf) => match read {
                        Ok(0) | Err(_) => return Slow::Closed(started.elapsed()),
                        Ok(_) => {}
                    },
                    _ = tick.tick(), if trickle => {
                        if c.write_all(b"a").await.is_err() {
                            return Slow::Closed(started.elapsed());
                        }
                    }
                    () = tokio::time::sleep_until(deadline.into()) => return Slow::Open,
                }
            }
        }));
    }
    let mut fast = 0;
    let mut timed_out = Vec::new();
    let mut open = 0;
    for c in conns {
        match c.await? {
            Slow::Closed(d) if d < Duration::from_secs(1) => fast += 1,
            Slow::Closed(d) => timed_out.push(d),
            Slow::Open => open += 1,
        }
    }
    let latest = timed_out.iter().max().copied().unwrap_or_default();
    let detail = format!(
        "{SLOW_CONNECTIONS} connections (half silent, half a header byte a second): {fast} \
         closed within a second (cap {MAX_CONNECTIONS}), {} closed later (the last after \
         {:.1} s; header timeout {:?}), {open} still open after {:.1} s",
        timed_out.len(),
        latest.as_secs_f64(),
        limits.header_read_timeout,
        (deadline - started).as_secs_f64()
    );
    Ok((open == 0, detail))
}

async fn symlink_probe(addr: SocketAddr, g: &Gallery) -> Result<(bool, String)> {
    let target = if Path::new("/etc/passwd").exists() {
        PathBuf::from("/etc/passwd")
    } else {
        g.outside_png.clone()
    };
    let photo = g.root.join("images/photo.png");
    std::fs::remove_file(&photo)?;
    std::os::unix::fs::symlink(&target, &photo)?;
    let head = format!(
        "GET /api/items/photo/original HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let (status, body) = request(addr, &head, b"", ANSWER_BOUND).await?;
    let outside = std::fs::read(&target)?;
    let leaked = status == 200 || (!outside.is_empty() && body == outside);
    let detail = format!(
        "images/photo.png -> {}: {status}, {} bytes{}",
        target.display(),
        body.len(),
        if leaked {
            " = the file outside the gallery was served"
        } else {
            ""
        }
    );
    Ok((!leaked, detail))
}

fn verdict(hole: &str, result: Result<(bool, String)>) -> bool {
    match result {
        Ok((closed, detail)) => {
            println!("{} {hole}: {detail}", if closed { "PASS" } else { "FAIL" });
            closed
        }
        Err(e) => {
            println!("FAIL {hole}: the probe itself failed: {e:#}");
            false
        }
    }
}

async fn attack() -> Result<bool> {
    let g = gallery()?;
    let connections = ConnectionLimits {
        max_connections: MAX_CONNECTIONS,
        ..ConnectionLimits::default()
    };
    let state = AppState::new(
        Index::open(&g.dir.path().join("index"))?,
        Arc::new(MeanColour),
        Config {
            connections: connections.clone(),
            ..Config::default()
        },
    )?;
    let listener = cots_serve::bind("127.0.0.1:0".parse()?).await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(cots_serve::serve(
        listener,
        state.clone(),
        std::future::pending(),
    ));
    let mut ok = true;
    // Memory first, while nothing else has touched the peak; the SVG
    // probes last, since an unfixed renderer may leave a thread stuck.
    ok &= verdict("dropped-decode-memory", dropped_decodes(addr, &state).await);
    ok &= verdict("gallery-symlink", symlink_probe(addr, &g).await);
    ok &= verdict("slowloris", slowloris(addr, &connections).await);
    ok &= verdict("svg-file-read", svg_probes(addr, &g).await);
    server.abort();
    Ok(ok)
}

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    let ok = runtime.block_on(attack())?;
    // A renderer stuck on a FIFO never returns its thread; do not wait for it.
    runtime.shutdown_timeout(Duration::from_secs(1));
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
