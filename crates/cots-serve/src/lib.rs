//! # cots-serve: how do people search a gallery over HTTP?
//!
//! A small search service over a [`cots_index::Index`]: a JSON API (text and
//! image queries, items by id, their thumbnails and originals), a web page
//! embedded in the binary, Prometheus metrics and an OpenAPI description.
//! `cots serve` wires it to a run and an index directory.
//!
//! ## Where the work happens
//! The model and the index are CPU-bound and blocking, so neither runs on the
//! async workers. Text queries go to a [`batch::Batcher`]: one dedicated
//! thread that gathers the queries arriving within a short window (2 ms by
//! default, at most 32), encodes them in one `embed_texts` call (which costs
//! little more than encoding one) and searches each group that shares `k`
//! and options in one pass over the index. Image queries, their searches and
//! the per-request text path (`--no-batching`) run on tokio's blocking pool,
//! bounded by a semaphore so a burst queues instead of spawning hundreds of
//! threads.
//!
//! ## Safety defaults
//! `cots serve` binds loopback unless told otherwise. With a token, every
//! `/api/*` route and `/metrics` want `Authorization: Bearer <token>`
//! (compared in constant time); the page, `/healthz` and `/openapi.json`
//! stay open. Bodies and image dimensions are bounded (413), queries are
//! validated (400), files are served by id only: an id is looked up in the
//! index and the path comes from the index, never from the request. A panic
//! in a handler answers 500 and the server goes on. Every error is JSON:
//! `{"error": "..."}`.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use cots_index::Index;
use tokio::net::TcpListener;

mod api;
pub mod batch;
mod conn;
pub mod encoder;
pub mod metrics;
mod web;

pub use encoder::QueryEncoder;
pub use metrics::Metrics;

/// The OpenAPI 3 description of every route, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Errors of the service: at start-up (a model that does not match the
/// index, an address that cannot be bound) and from the encoder.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the index {index} was built with another checkpoint (weights {index_hash}) than the run \
         {run} (weights {run_hash}): rebuild the index with this run, serve the run it was built \
         with, or pass --allow-model-mismatch"
    )]
    ModelMismatch {
        index: String,
        index_hash: String,
        run: String,
        run_hash: String,
    },
    #[error("the run {run} embeds into {run_dim} dimensions but the index {index} holds {index_dim}-dimensional vectors")]
    DimMismatch {
        index: String,
        index_dim: usize,
        run: String,
        run_dim: usize,
    },
    #[error("encoding {what}: {message}")]
    Encode { what: String, message: String },
    #[error("the encoder panicked: {0}")]
    Panicked(String),
    #[error("the server is busy ({queued} queries are waiting); try again shortly")]
    Busy { queued: usize },
    #[error("the server is shutting down")]
    Stopped,
    #[error("starting the batching thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("invalid service configuration: {0}")]
    Config(String),
    #[error("{addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Index(#[from] cots_index::Error),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl From<cots_infer::Error> for Error {
    fn from(e: cots_infer::Error) -> Self {
        Error::Encode {
            what: e.what,
            message: e.message,
        }
    }
}

impl Error {
    /// The same failure again, for each of the queries of a failed batch.
    fn duplicate(&self) -> Error {
        match self {
            Error::Encode { what, message } => Error::Encode {
                what: what.clone(),
                message: message.clone(),
            },
            Error::Panicked(m) => Error::Panicked(m.clone()),
            Error::Busy { queued } => Error::Busy { queued: *queued },
            Error::Stopped => Error::Stopped,
            other => Error::Encode {
                what: "a text query".into(),
                message: other.to_string(),
            },
        }
    }
}

/// How concurrent text queries are grouped into encoder calls.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchConfig {
    /// How long the first query of a batch waits for others.
    pub window: Duration,
    /// The most queries one encoder call takes.
    pub max_batch: usize,
    /// Queries waiting beyond this many are refused with 503.
    pub queue: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_millis(2),
            max_batch: 32,
            queue: 1024,
        }
    }
}

/// Bounds on what one request may ask for.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Longest text query, in characters.
    pub max_query_chars: usize,
    /// Largest `k`.
    pub max_k: usize,
    /// Largest JSON body, in bytes.
    pub max_json_bytes: usize,
    /// Largest upload (the whole multipart body), in bytes.
    pub max_upload_bytes: usize,
    /// Longest side of an uploaded image, in pixels.
    pub max_image_side: u32,
    /// Most pixels (width times height) of an uploaded raster image, read
    /// from its header before anything is decoded. With `max_blocking`
    /// this bounds the memory all decodes in flight can take together
    /// (a 16-bit RGBA decode takes 8 bytes a pixel, its 8-bit copies a few
    /// more).
    pub max_image_pixels: u64,
    /// Largest uploaded SVG, in bytes: an SVG is parsed into a tree before
    /// it is drawn, so it gets a tighter bound than raster uploads.
    pub max_svg_bytes: usize,
    /// Image encodes and searches running at once on the blocking pool.
    pub max_blocking: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_query_chars: 1000,
            max_k: 100,
            max_json_bytes: 64 * 1024,
            max_upload_bytes: 16 * 1024 * 1024,
            max_image_side: 8192,
            max_image_pixels: 1 << 24,
            max_svg_bytes: 1 << 20,
            max_blocking: std::thread::available_parallelism().map_or(2, |n| n.get() * 2),
        }
    }
}

/// Bounds on the connections themselves, whatever they ask for: a client
/// that opens a connection and sends nothing, or a header a byte at a
/// time, or keeps an idle connection forever, holds a socket and a task,
/// so each of those ends after a while and their number is capped.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionLimits {
    /// How long a connection may take to send a complete request head,
    /// counted from when the server is ready for it: from the accept for
    /// the first request, from the end of the previous response for the
    /// next ones. It therefore also bounds how long a kept-alive
    /// connection may wait between requests.
    pub header_read_timeout: Duration,
    /// How long a connection may go without a byte in either direction
    /// while no request of it is being answered: a client that stopped
    /// reading its response, or a quiet kept-alive connection. A request
    /// counts as being answered from its head to its response head, so a
    /// body that stalls is not cut off by this (the connection cap bounds
    /// how many such requests there can be).
    pub idle_timeout: Duration,
    /// Open connections at most; the server answers any beyond this with
    /// 503 and closes them at once.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 512,
        }
    }
}

/// Everything the service is told at start-up besides the index and model.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// The bearer token every API call must carry; `None`: no check.
    pub token: Option<String>,
    /// `None`: every text query is encoded on its own (`--no-batching`).
    pub batching: Option<BatchConfig>,
    pub limits: Limits,
    pub connections: ConnectionLimits,
    /// Serve even if the index was built with another checkpoint.
    pub allow_model_mismatch: bool,
}

/// The shared state of every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

struct Shared {
    index: Arc<RwLock<Index>>,
    encoder: Arc<dyn QueryEncoder>,
    texts: TextPath,
    /// Permits for the blocking pool. A permit moves into the blocking
    /// closure it admits, so it is held until that work ends even when the
    /// request that started it is dropped (its client went away).
    blocking: Arc<tokio::sync::Semaphore>,
    metrics: Arc<Metrics>,
    token: Option<Vec<u8>>,
    limits: Limits,
    connections: ConnectionLimits,
    /// Metadata keys and their values (up to [`FILTER_VALUES`] each), for
    /// the page's filter menus.
    filters: BTreeMap<String, Vec<String>>,
    /// A few captions from the index, offered as example queries.
    examples: Vec<String>,
    started: Instant,
}

/// Up to `n` captions spread over the index (first captions of evenly
/// spaced items), distinct.
fn examples(index: &Index, n: usize) -> Vec<String> {
    let items = index.items();
    let mut out: Vec<String> = Vec::new();
    for i in 0..n {
        let Some(item) = items.get(i * items.len() / n) else {
            break;
        };
        if let Some(c) = item.captions.first() {
            if !out.contains(c) {
                out.push(c.clone());
            }
        }
    }
    out
}

/// The most values per metadata key `/api/info` lists.
pub const FILTER_VALUES: usize = 50;

/// Every metadata key with its first [`FILTER_VALUES`] distinct values,
/// sorted. A key with more values than that lists none (an id-like key is
/// no use as a menu).
fn filter_values(index: &Index) -> BTreeMap<String, Vec<String>> {
    let mut seen: BTreeMap<&str, std::collections::BTreeSet<&str>> = BTreeMap::new();
    for item in index.items() {
        for (k, v) in &item.metadata {
            let values = seen.entry(k).or_default();
            if values.len() <= FILTER_VALUES {
                values.insert(v);
            }
        }
    }
    seen.into_iter()
        .map(|(k, v)| {
            let v = if v.len() > FILTER_VALUES {
                Vec::new()
            } else {
                v.into_iter().map(str::to_string).collect()
            };
            (k.to_string(), v)
        })
        .collect()
}

/// How a text query reaches the encoder.
enum TextPath {
    Batched(batch::Batcher<api::HitJson>),
    PerRequest,
}

impl AppState {
    /// Checks that `encoder` is the model the index was built with (unless
    /// `config.allow_model_mismatch`) and that their widths agree, and
    /// starts the batching thread.
    pub fn new(index: Index, encoder: Arc<dyn QueryEncoder>, config: Config) -> Result<Self> {
        let model = index.model();
        if model.weights_hash != encoder.weights_hash() {
            let err = Error::ModelMismatch {
                index: index.dir().display().to_string(),
                index_hash: model.weights_hash.clone(),
                run: encoder.describe(),
                run_hash: encoder.weights_hash().to_string(),
            };
            if !config.allow_model_mismatch {
                return Err(err);
            }
            tracing::warn!("serving anyway (--allow-model-mismatch): {err}");
        }
        let run_dim = encoder.dim();
        if run_dim != index.dim() {
            return Err(Error::DimMismatch {
                index: index.dir().display().to_string(),
                index_dim: index.dim(),
                run: encoder.describe(),
                run_dim,
            });
        }
        let limits = config.limits;
        if limits.max_k == 0
            || limits.max_query_chars == 0
            || limits.max_blocking == 0
            || limits.max_image_pixels == 0
        {
            return Err(Error::Config(format!(
                "max_k, max_query_chars, max_image_pixels and max_blocking must be positive: \
                 {limits:?}"
            )));
        }
        let connections = config.connections;
        // The shutdown waits for every connection by taking all their
        // permits at once, which a u32 must be able to count.
        if connections.max_connections == 0
            || connections.max_connections > tokio::sync::Semaphore::MAX_PERMITS
            || connections.max_connections > u32::MAX as usize
            || connections.header_read_timeout.is_zero()
            || connections.idle_timeout.is_zero()
        {
            return Err(Error::Config(format!(
                "max_connections must be between 1 and {} and both timeouts positive: \
                 {connections:?}",
                u32::MAX
            )));
        }
        let metrics = Arc::new(Metrics::new());
        metrics.set_index(index.len(), index.dim());
        let filters = filter_values(&index);
        let examples = examples(&index, 4);
        let index = Arc::new(RwLock::new(index));
        let texts = match config.batching {
            Some(cfg) => {
                let index = index.clone();
                let search: Arc<batch::SearchFn<api::HitJson>> =
                    Arc::new(move |queries, k, options| {
                        let index = index.read().unwrap_or_else(PoisonError::into_inner);
                        let lists = index.search_batch(queries, k, options)?;
                        Ok(lists
                            .into_iter()
                            .map(|hits| api::hits_json(&index, hits))
                            .collect())
                    });
                TextPath::Batched(batch::Batcher::spawn(
                    encoder.clone(),
                    search,
                    cfg,
                    metrics.clone(),
                )?)
            }
            None => TextPath::PerRequest,
        };
        Ok(Self(Arc::new(Shared {
            filters,
            examples,
            index,
            encoder,
            texts,
            blocking: Arc::new(tokio::sync::Semaphore::new(limits.max_blocking)),
            metrics,
            token: config
                .token
                .filter(|t| !t.is_empty())
                .map(String::into_bytes),
            limits,
            connections,
            started: Instant::now(),
        })))
    }

    /// The index, shared with the handlers (write-lock it to add or remove
    /// items while serving).
    pub fn index(&self) -> Arc<RwLock<Index>> {
        self.0.index.clone()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// Blocking tasks (image decodes and encodes, searches, per-request
    /// text encodes) running now or admitted to run: the permits taken.
    pub fn blocking_in_use(&self) -> usize {
        self.0
            .limits
            .max_blocking
            .saturating_sub(self.0.blocking.available_permits())
    }

    /// Text queries waiting for the batching thread (0 without batching).
    pub fn queued_text_queries(&self) -> usize {
        match &self.0.texts {
            TextPath::Batched(b) => b.queued(),
            TextPath::PerRequest => 0,
        }
    }
}

/// The whole service: API, page, health, metrics and OpenAPI routes, with
/// access logs, metrics, JSON errors, panic recovery and (with a token)
/// authentication.
pub fn router(state: AppState) -> Router {
    let protected = api::routes(&state)
        .merge(Router::new().route("/metrics", axum::routing::get(api::metrics)));
    let protected = protected.route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        api::require_token,
    ));
    let open = Router::new()
        .route("/healthz", axum::routing::get(api::healthz))
        .route("/openapi.json", axum::routing::get(api::openapi))
        .merge(web::routes());
    with_layers(open.merge(protected).with_state(state.clone()), state)
}

/// The layers every route shares, outermost first: access log and metrics,
/// JSON errors, panic recovery.
fn with_layers(routes: Router, state: AppState) -> Router {
    routes
        .fallback(api::not_found)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            api::panic_response,
        ))
        .layer(axum::middleware::from_fn(api::json_errors))
        .layer(axum::middleware::from_fn_with_state(state, api::observe))
}

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind {
        addr: addr.to_string(),
        source,
    })
}

/// Serves [`router`] on `listener` until `shutdown` completes; requests
/// already in flight then finish before this returns.
///
/// Each connection is bounded by the state's [`ConnectionLimits`]: a
/// request head must arrive within the header-read timeout, a connection
/// that moves no byte for the idle timeout (while none of its requests is
/// being answered) is closed, and connections beyond the cap are answered
/// 503 and closed.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let limits = state.0.connections.clone();
    let metrics = state.0.metrics.clone();
    conn::serve(listener, router(state), limits, metrics, shutdown).await;
    Ok(())
}

#[cfg(test)]
mod tests;
