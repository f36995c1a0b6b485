//! `cots serve`: the search service (JSON API, web page, metrics) over an
//! index built by `cots index build`, with the run that built it encoding
//! the queries. The service itself lives in crates/cots-serve.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use cots_index::Index;
use cots_serve::{AppState, BatchConfig, Config, ConnectionLimits, Limits};
use cots_train::inference::Run;
use cots_train::query::RunEncoder;

use crate::commands::Ctx;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The index directory (`cots index build` writes one).
    #[arg(long)]
    pub index: PathBuf,
    /// The run whose model encodes the queries: the one that built the index.
    #[arg(long)]
    pub run: PathBuf,
    /// Where to listen. Loopback by default: to serve other machines, bind
    /// their interface and set a token.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// A file holding the bearer token every API call must carry (else the
    /// COTS_TOKEN environment variable; neither: no token).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// How long the first text query of a batch waits for others, in ms.
    #[arg(long, default_value_t = 2.0)]
    pub batch_window_ms: f64,
    /// The most text queries one encoder call takes.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Encode every text query on its own.
    #[arg(long)]
    pub no_batching: bool,
    /// Serve even if the index was built with another checkpoint.
    #[arg(long)]
    pub allow_model_mismatch: bool,
    /// The largest k a request may ask for.
    #[arg(long, default_value_t = 100)]
    pub max_k: usize,
    /// The largest image upload, in MiB.
    #[arg(long, default_value_t = 16)]
    pub max_upload_mib: usize,
    /// The most pixels (width x height, read from the header before
    /// decoding) of an uploaded image; larger ones get 413. With the
    /// blocking-pool size this bounds the memory of the decodes in flight.
    #[arg(long, default_value_t = Limits::default().max_image_pixels)]
    pub max_image_pixels: u64,
    /// Seconds a connection may take to send a complete request head (and
    /// may wait between requests on a kept-alive connection).
    #[arg(long, default_value_t = ConnectionLimits::default().header_read_timeout.as_secs_f64())]
    pub header_timeout_s: f64,
    /// Seconds a connection may move no byte while none of its requests is
    /// being answered.
    #[arg(long, default_value_t = ConnectionLimits::default().idle_timeout.as_secs_f64())]
    pub idle_timeout_s: f64,
    /// Open connections at most; those beyond get 503 and are closed.
    #[arg(long, default_value_t = ConnectionLimits::default().max_connections)]
    pub max_connections: usize,
}

/// `secs` as a positive duration, or an error naming `flag`.
fn seconds(flag: &str, secs: f64) -> Result<Duration> {
    if !(secs.is_finite() && secs > 0.0) {
        bail!("{flag} must be a positive number of seconds; got {secs}");
    }
    Duration::try_from_secs_f64(secs).with_context(|| format!("{flag}: {secs} s"))
}

/// The token from `--token-file` or COTS_TOKEN, trimmed.
fn token(a: &ServeArgs) -> Result<Option<String>> {
    let (token, origin) = match &a.token_file {
        Some(p) => {
            warn_if_readable_by_others(p);
            let t = std::fs::read_to_string(p)
                .with_context(|| format!("reading the token file {}", p.display()))?;
            (t, p.display().to_string())
        }
        None => match std::env::var("COTS_TOKEN") {
            Ok(t) => (t, "COTS_TOKEN".to_string()),
            Err(_) => return Ok(None),
        },
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        bail!("{origin} holds an empty token");
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("{origin}: the token must be one word (no spaces or control characters)");
    }
    Ok(Some(token))
}

#[cfg(unix)]
fn warn_if_readable_by_others(p: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(p) {
        if m.permissions().mode() & 0o004 != 0 {
            tracing::warn!(
                "{} is readable by every user of this machine (chmod 600 it)",
                p.display()
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &std::path::Path) {}

pub fn serve(ctx: &Ctx, a: ServeArgs) -> Result<()> {
    if !(a.batch_window_ms.is_finite() && a.batch_window_ms >= 0.0) {
        bail!("--batch-window-ms must be a non-negative number of milliseconds");
    }
    if a.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    if a.max_image_pixels == 0 {
        bail!("--max-image-pixels must be at least 1");
    }
    if a.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    let connections = ConnectionLimits {
        header_read_timeout: seconds("--header-timeout-s", a.header_timeout_s)?,
        idle_timeout: seconds("--idle-timeout-s", a.idle_timeout_s)?,
        max_connections: a.max_connections,
    };
    let token = token(&a)?;
    let index = Index::open(&a.index)
        .with_context(|| format!("opening the index {}", a.index.display()))?;
    let run = Run::open(&a.run, &ctx.device)
        .with_context(|| format!("opening the run {}", a.run.display()))?;
    let encoder = RunEncoder::new(run).context("warming up the query encoder")?;
    let config = Config {
        token: token.clone(),
        batching: (!a.no_batching).then(|| BatchConfig {
            window: Duration::from_secs_f64(a.batch_window_ms / 1e3),
            max_batch: a.max_batch,
            ..BatchConfig::default()
        }),
        limits: Limits {
            max_k: a.max_k,
            max_upload_bytes: a.max_upload_mib.max(1) << 20,
            max_image_pixels: a.max_image_pixels,
            ..Limits::default()
        },
        connections,
        allow_model_mismatch: a.allow_model_mismatch,
    };
    let (items, dim) = (index.len(), index.dim());
    let state = AppState::new(index, Arc::new(encoder), config)?;
    if !a.addr.ip().is_loopback() && token.is_none() {
        tracing::warn!(
            "listening on {} without a token: anyone who can reach this port can search \
             the index and fetch its files (set --token-file or COTS_TOKEN)",
            a.addr
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cots-serve")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = cots_serve::bind(a.addr).await?;
        let addr = listener.local_addr().unwrap_or(a.addr);
        tracing::info!(
            "serving {items} items ({dim}-d) from {} on http://{addr}/ ({}, {})",
            a.index.display(),
            if a.no_batching {
                "no batching".to_string()
            } else {
                format!(
                    "batching up to {} queries within {} ms",
                    a.max_batch, a.batch_window_ms
                )
            },
            if token.is_some() {
                "token required"
            } else {
                "no token"
            }
        );
        cots_serve::serve(listener, state, shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

/// Resolves on ctrl-c or SIGTERM; the server then stops accepting and lets
/// requests in flight finish.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for ctrl-c: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: finishing the requests in flight");
}
