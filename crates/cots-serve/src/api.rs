//! The JSON API and the middleware around every route.
//!
//! Handlers validate first (400/404/413 with a message that says what to
//! change), then hand the model and the index to blocking threads. Files are
//! served by id only: the id is looked up in the index and the path comes
//! from the index, so no request string ever reaches the filesystem; and the
//! file that path opens must still lie in the gallery once every link on
//! the way is followed.

use std::collections::{BTreeMap, HashSet};
use std::io::Cursor;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Multipart, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cots_index::{Filter, Item, ItemKind, Mode, SearchOptions};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;
use tower::ServiceExt;

use crate::batch::{self, panic_message};
use crate::{AppState, Error, Limits, Metrics, TextPath, OPENAPI};

/// The API routes (all behind the token when there is one).
pub(crate) fn routes(state: &AppState) -> Router<AppState> {
    let limits = &state.0.limits;
    Router::new()
        .route(
            "/api/search",
            post(search_text).layer(DefaultBodyLimit::max(limits.max_json_bytes)),
        )
        .route(
            "/api/search/image",
            post(search_image).layer(DefaultBodyLimit::max(limits.max_upload_bytes)),
        )
        .route("/api/info", get(info))
        .route("/api/items/{id}", get(item))
        .route("/api/items/{id}/thumbnail", get(thumbnail))
        .route("/api/items/{id}/original", get(original))
}

/// An error answer: a status and `{"error": message}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    /// A failure that is the server's, not the client's: logged in full,
    /// answered without internals (paths, tensor shapes).
    fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!("{detail}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error (the server log has the details)",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(self.status, &self.message)
    }
}

fn error_response(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Busy { .. } | Error::Stopped => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            Error::Index(cots_index::Error::UnknownId(id)) => {
                Self::not_found(format!("no item with id `{id}`"))
            }
            Error::Index(cots_index::Error::NoAnn(_)) => Self::bad_request(
                "approximate search is not available: this index has no approximate-search graph",
            ),
            other => Self::internal(other),
        }
    }
}

fn join_error(e: tokio::task::JoinError) -> ApiError {
    match e.try_into_panic() {
        Ok(payload) => ApiError::internal(format!(
            "a blocking task panicked: {}",
            panic_message(payload.as_ref())
        )),
        Err(e) => ApiError::internal(format!("a blocking task failed: {e}")),
    }
}

/// A duration in milliseconds, rounded to 0.01 ms: finer digits are clock
/// noise, and a rounded value prints as few digits in JSON.
pub(crate) fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 1e2
}

/// Whether a `Content-Type` names JSON (`application/json` or
/// `application/*+json`, parameters aside), as axum's `Json` wants it.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Any JSON value, read only to find an object that repeats a key: serde
/// (into a map or a `Value`) keeps the last of them silently, so a body
/// such as `{"k": 1, "k": 100}` would mean whatever the last one says.
struct NoDuplicateKeys;

impl<'de> Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeysVisitor)
    }
}

struct NoDuplicateKeysVisitor;

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeysVisitor {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(NoDuplicateKeys)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                return Err(serde::de::Error::custom(format!(
                    "duplicate key `{key}` (send each key once)"
                )));
            }
            map.next_value::<NoDuplicateKeys>()?;
            seen.insert(key);
        }
        Ok(NoDuplicateKeys)
    }
}

/// Refuses JSON text in which an object repeats a key, naming the key and
/// the object it is in (`what` says which part of the request it is).
fn reject_duplicate_keys(json: &[u8], what: &str) -> Result<(), ApiError> {
    let mut de = serde_json::Deserializer::from_slice(json);
    serde_path_to_error::deserialize::<_, NoDuplicateKeys>(&mut de)
        .map(|_| ())
        .map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            ApiError::bad_request(if path == "." {
                format!("{what}: {inner}")
            } else {
                format!("{what}: in {path}: {inner}")
            })
        })
}

/// Characters an id keeps in a URL path segment; everything else
/// (slashes included) is percent-encoded.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn item_url(id: &str, what: &str) -> String {
    format!("/api/items/{}/{what}", utf8_percent_encode(id, SEGMENT))
}

/// An item as the API shows it: no filesystem path, URLs instead.
#[derive(Serialize)]
pub(crate) struct ItemJson {
    id: String,
    kind: ItemKind,
    captions: Vec<String>,
    metadata: BTreeMap<String, String>,
    thumbnail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    original: Option<String>,
}

impl ItemJson {
    fn new(item: &Item) -> Self {
        Self {
            id: item.id.clone(),
            kind: item.kind,
            captions: item.captions.clone(),
            metadata: item.metadata.clone(),
            thumbnail: item_url(&item.id, "thumbnail"),
            original: item.path.as_ref().map(|_| item_url(&item.id, "original")),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct HitJson {
    score: f32,
    #[serde(flatten)]
    item: ItemJson,
}

/// Hits as the API shows them, looked up under the same lock as the search.
pub(crate) fn hits_json(index: &cots_index::Index, hits: Vec<cots_index::Hit>) -> Vec<HitJson> {
    hits.into_iter()
        .filter_map(|h| {
            let item = index.items().get(h.row)?;
            Some(HitJson {
                score: h.score,
                item: ItemJson::new(item),
            })
        })
        .collect()
}

#[derive(Serialize)]
struct SearchResponse {
    hits: Vec<HitJson>,
    /// Server time from the request to the answer, in milliseconds rounded
    /// to 0.01 ([`millis`]), as are the two below.
    took_ms: f64,
    /// Of which: waiting for and running the encoder.
    encode_ms: f64,
    /// Of which: the index search.
    search_ms: f64,
}

fn default_k() -> usize {
    10
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchRequest {
    text: String,
    #[serde(default = "default_k")]
    k: usize,
    #[serde(default)]
    filter: BTreeMap<String, String>,
    #[serde(default)]
    approximate: bool,
}

impl AppState {
    fn check_k(&self, k: usize) -> Result<usize, ApiError> {
        let max = self.0.limits.max_k;
        if k == 0 || k > max {
            return Err(ApiError::bad_request(format!(
                "k must be between 1 and {max}; got {k}"
            )));
        }
        Ok(k)
    }

    fn options(
        &self,
        filter: BTreeMap<String, String>,
        approximate: bool,
        k: usize,
    ) -> Result<SearchOptions, ApiError> {
        // A key no item has matches nothing: refuse it rather than answer
        // an empty list that looks like a search that found nothing.
        if let Some(key) = filter.keys().find(|k| !self.0.filters.contains_key(*k)) {
            let known: Vec<&str> = self.0.filters.keys().map(String::as_str).collect();
            return Err(ApiError::bad_request(if known.is_empty() {
                format!("unknown filter key `{key}`: the items of this index have no metadata to filter on")
            } else {
                format!(
                    "unknown filter key `{key}`; the accepted keys are: {}",
                    known.join(", ")
                )
            }));
        }
        let mode = if approximate {
            let index = self.0.index.read().unwrap_or_else(PoisonError::into_inner);
            let params = index.ann_params().ok_or_else(|| {
                ApiError::bad_request(
                    "approximate search is not available: this index has no approximate-search \
                     graph (build it with `cots index build --ann`); search without \
                     \"approximate\"",
                )
            })?;
            Mode::Approximate {
                ef: params.ef_search.max(k),
            }
        } else {
            Mode::Exact
        };
        Ok(SearchOptions {
            mode,
            filter: Filter { equals: filter },
        })
    }

    /// Runs `work` on the blocking pool once a permit is free. The permit
    /// moves into the blocking closure, so it is held until `work` ends
    /// even if the request is dropped first (its client went away): the
    /// work already started still holds its memory until then, and later
    /// requests must wait for it.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = self
            .0
            .blocking
            .clone()
            .acquire_owned()
            .await
            .map_err(ApiError::internal)?;
        let slot = Slot::new(permit, self.0.metrics.clone());
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            work()
        })
        .await
        .map_err(join_error)?
    }

    /// The query's vector from one encoder call of its own (without
    /// batching).
    async fn embed_text(&self, text: String) -> Result<Vec<f32>, ApiError> {
        let (encoder, metrics) = (self.0.encoder.clone(), self.0.metrics.clone());
        self.blocking(move || {
            metrics.observe_batch(1);
            encoder
                .embed_texts(&[text])
                .map_err(|e| ApiError::from(Error::from(e)))
        })
        .await
    }

    /// The best `k` items for `query`, searched on a blocking thread.
    async fn search(
        &self,
        query: Vec<f32>,
        k: usize,
        opts: SearchOptions,
    ) -> Result<Vec<HitJson>, ApiError> {
        let index = self.0.index.clone();
        self.blocking(move || {
            let index = index.read().unwrap_or_else(PoisonError::into_inner);
            let hits = index.search(&query, k, &opts).map_err(Error::Index)?;
            Ok(hits_json(&index, hits))
        })
        .await
    }

    /// Searches with an encoded query (or passes its error on) and times
    /// the encoding (from `start`) and the search.
    async fn answer(
        &self,
        start: Instant,
        query: Result<Vec<f32>, ApiError>,
        k: usize,
        opts: SearchOptions,
    ) -> Result<Json<SearchResponse>, ApiError> {
        let query = query?;
        let encoded = Instant::now();
        let hits = self.search(query, k, opts).await?;
        let done = Instant::now();
        Ok(Json(SearchResponse {
            hits,
            took_ms: millis(done - start),
            encode_ms: millis(encoded - start),
            search_ms: millis(done - encoded),
        }))
    }
}

/// The request body as a [`SearchRequest`]: a JSON object (serde would take
/// an array for a struct too), every error naming the field at fault.
fn search_request(body: serde_json::Value) -> Result<SearchRequest, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the body must be a JSON object such as {\"text\": \"a red circle\", \"k\": 10}",
        ));
    }
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        ApiError::bad_request(if path == "." {
            format!("bad request body: {inner}")
        } else {
            format!("bad request body: {path}: {inner}")
        })
    })
}

async fn search_text(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<SearchResponse>, ApiError> {
    let start = Instant::now();
    if !is_json(&headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the query as JSON, with `Content-Type: application/json`",
        ));
    }
    // The body is read as bytes (the size limit still applies) so that a
    // repeated key can be seen before a map keeps only its last value.
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    reject_duplicate_keys(&body, "bad request body")?;
    let req = search_request(value)?;
    let text = req.text.trim();
    if text.is_empty() {
        return Err(ApiError::bad_request("the query text is empty"));
    }
    let chars = text.chars().count();
    let max = s.0.limits.max_query_chars;
    if chars > max {
        return Err(ApiError::bad_request(format!(
            "the query is {chars} characters long; the limit is {max}"
        )));
    }
    let k = s.check_k(req.k)?;
    let opts = s.options(req.filter, req.approximate, k)?;
    if let TextPath::Batched(b) = &s.0.texts {
        let query = batch::Query {
            text: text.to_string(),
            k,
            options: opts,
        };
        let a = b.search(query).await?;
        return Ok(Json(SearchResponse {
            hits: a.hits,
            took_ms: millis(start.elapsed()),
            encode_ms: millis(a.encode),
            search_ms: millis(a.search),
        }));
    }
    let query = s.embed_text(text.to_string()).await;
    s.answer(start, query, k, opts).await
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    ApiError::new(e.status(), e.body_text())
}

async fn search_image(
    State(s): State<AppState>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<SearchResponse>, ApiError> {
    let start = Instant::now();
    let mut form = multipart.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let mut image: Option<Bytes> = None;
    let mut k = default_k();
    let mut filter = BTreeMap::new();
    let mut approximate = false;
    while let Some(field) = form.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or_default().to_string();
        let value = field.bytes().await.map_err(multipart_error)?;
        let text = || {
            std::str::from_utf8(&value)
                .map(str::trim)
                .map_err(|_| ApiError::bad_request(format!("field `{name}` is not UTF-8 text")))
        };
        match name.as_str() {
            "image" => image = Some(value.clone()),
            "k" => {
                k = text()?.parse().map_err(|_| {
                    ApiError::bad_request("field `k` must be a positive whole number")
                })?
            }
            "filter" => {
                let json = text()?;
                filter = serde_json::from_str(json).map_err(|e| {
                    ApiError::bad_request(format!(
                        "field `filter` must be a JSON object of strings: {e}"
                    ))
                })?;
                reject_duplicate_keys(json.as_bytes(), "field `filter`")?;
            }
            "approximate" => {
                approximate = text()?.parse().map_err(|_| {
                    ApiError::bad_request("field `approximate` must be true or false")
                })?
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown field `{other}` (expected image, k, filter, approximate)"
                )))
            }
        }
    }
    let image = image
        .filter(|b| !b.is_empty())
        .ok_or_else(|| ApiError::bad_request("no image: send the file in a field named `image`"))?;
    let k = s.check_k(k)?;
    let opts = s.options(filter, approximate, k)?;
    check_upload(&image, &s.0.limits)?;
    let query = s.embed_image(image).await;
    s.answer(start, query, k, opts).await
}

/// A blocking-pool permit and its gauge: dropped (where the blocking work
/// ends) it frees the permit and counts the task as ended.
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Slot {
    fn new(permit: tokio::sync::OwnedSemaphorePermit, metrics: Arc<Metrics>) -> Self {
        metrics.blocking_started();
        Self {
            _permit: permit,
            metrics,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.blocking_ended();
    }
}

/// Whether an upload is text that may be an SVG: the decoder takes XML for
/// SVG, so anything that starts like markup is bounded as one.
fn looks_like_markup(bytes: &[u8]) -> bool {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    bytes.trim_ascii_start().starts_with(b"<")
}

/// Refuses an upload whose decode would cost more than the limits allow,
/// before any of it is decoded: a raster image by the dimensions in its
/// header (a small PNG can claim 8000 x 8000 pixels, a quarter of a
/// gigabyte once decoded), an SVG by its size in bytes.
fn check_upload(bytes: &[u8], limits: &Limits) -> Result<(), ApiError> {
    if looks_like_markup(bytes) {
        let max = limits.max_svg_bytes;
        if bytes.len() > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the SVG is {} bytes; the limit for SVG uploads is {max} bytes",
                    bytes.len()
                ),
            ));
        }
        return Ok(());
    }
    let (w, h) = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()
        .and_then(|r| r.into_dimensions().ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "could not read the image (its header names no known format or size); send a \
                 PNG, JPEG, WebP, GIF or SVG",
            )
        })?;
    let max_side = limits.max_image_side;
    if w > max_side || h > max_side {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the image is {w} x {h} pixels; the limit is {max_side} on each side"),
        ));
    }
    let (pixels, max_pixels) = (u64::from(w) * u64::from(h), limits.max_image_pixels);
    if pixels > max_pixels {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the image is {w} x {h} = {pixels} pixels; the limit is {max_pixels} pixels \
                 (scale it down: the model sees it at a few hundred pixels a side anyway)"
            ),
        ));
    }
    Ok(())
}

impl AppState {
    /// Decodes an upload (already checked by [`check_upload`]) and embeds
    /// it on a blocking thread.
    async fn embed_image(&self, bytes: Bytes) -> Result<Vec<f32>, ApiError> {
        let encoder = self.0.encoder.clone();
        self.blocking(move || {
            // Transparent pixels take the colour the model was trained
            // against, as in training, evaluation and indexing.
            let background = encoder.background();
            let img =
                cots_data::image_io::decode_bytes_over(&bytes, Path::new("the upload"), background)
                    .map_err(|e| {
                        ApiError::bad_request(format!(
                            "could not read the image ({e}); send a PNG, JPEG, WebP, GIF or SVG"
                        ))
                    })?;
            encoder
                .embed_images(&[img])
                .map_err(|e| ApiError::from(Error::from(e)))
        })
        .await
    }
}

async fn item(
    State(s): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<ItemJson>, ApiError> {
    let index = s.0.index.read().unwrap_or_else(PoisonError::into_inner);
    let (_, item) = index
        .item(&id)
        .ok_or_else(|| ApiError::not_found(format!("no item with id `{id}`")))?;
    Ok(Json(ItemJson::new(item)))
}

/// Headers that keep a served file from running as a page of this origin
/// (an SVG original can hold a script).
fn file_headers(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; sandbox"),
    );
}

async fn thumbnail(
    State(s): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let found = {
        let index = s.0.index.read().unwrap_or_else(PoisonError::into_inner);
        index.thumbnail(&id).map_err(Error::Index)?
    };
    let (bytes, mime) =
        found.ok_or_else(|| ApiError::not_found(format!("item `{id}` has no thumbnail")))?;
    let mut resp = (
        [
            (header::CONTENT_TYPE, mime),
            (header::CACHE_CONTROL, "private, max-age=300"),
        ],
        bytes,
    )
        .into_response();
    file_headers(&mut resp);
    Ok(resp)
}

/// Where an item's file is: an absolute path as the index holds it, or a
/// relative one under the index's root. A relative path that climbs out of
/// the root (`..`) is refused, whatever the index says.
fn resolve(base: &Path, stored: &str) -> Option<PathBuf> {
    let p = Path::new(stored);
    if p.is_absolute() {
        return Some(p.to_path_buf());
    }
    p.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        .then(|| base.join(p))
}

/// Why an item's file is not served.
enum Refused {
    /// It does not exist (or a link on the way leads nowhere).
    Missing,
    /// It resolves outside the gallery, or is not a regular file.
    Outside(String),
}

/// The file `path` (from [`resolve`]) opens, once every symbolic link on
/// the way is followed, provided it is a regular file in the gallery:
///
/// - a path under `base` (every relative one) must resolve under `base`
///   resolved the same way, so a gallery file replaced by a link to
///   `/etc/passwd`, or a linked directory leading out, is refused;
/// - an absolute path the index recorded outside `base` may sit under
///   linked directories (the index named that place), but its last part
///   must not be a link out of the directory it names.
///
/// Pipes and devices are refused too: opening a FIFO would wait for a
/// writer for ever, and `/dev/zero` never ends.
///
/// The answer is served by opening the returned path again; a writer to
/// the gallery who swaps a directory for a link between the check and the
/// open can still win that race.
fn confine(base: &Path, path: &Path) -> Result<PathBuf, Refused> {
    let missing = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => Refused::Missing,
        _ => Refused::Outside(format!("cannot resolve it: {e}")),
    };
    let real = std::fs::canonicalize(path).map_err(missing)?;
    let allowed = if path.starts_with(base) {
        std::fs::canonicalize(base).map_err(missing)?
    } else {
        let parent = path.parent().unwrap_or(path);
        let real_parent = std::fs::canonicalize(parent).map_err(missing)?;
        if path.file_name().map(|n| real_parent.join(n)).as_ref() != Some(&real) {
            return Err(Refused::Outside(format!(
                "it is a link to {}",
                real.display()
            )));
        }
        real_parent
    };
    if !real.starts_with(&allowed) {
        return Err(Refused::Outside(format!(
            "it resolves to {}, outside {}",
            real.display(),
            allowed.display()
        )));
    }
    let meta = std::fs::metadata(&real).map_err(missing)?;
    if !meta.is_file() {
        return Err(Refused::Outside(format!(
            "{} is not a regular file",
            real.display()
        )));
    }
    Ok(real)
}

async fn original(
    State(s): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let (base, path) = {
        let index = s.0.index.read().unwrap_or_else(PoisonError::into_inner);
        let (_, item) = index
            .item(&id)
            .ok_or_else(|| ApiError::not_found(format!("no item with id `{id}`")))?;
        let stored = item
            .path
            .as_deref()
            .ok_or_else(|| ApiError::not_found(format!("item `{id}` has no original file")))?;
        let base = index.root().unwrap_or(index.dir());
        let path = resolve(base, stored).ok_or_else(|| {
            tracing::warn!(
                "item `{id}`: refusing its path `{stored}`, which leaves the index root"
            );
            ApiError::not_found(format!("item `{id}` has no original file"))
        })?;
        (base.to_path_buf(), path)
    };
    let checked = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || confine(&base, &path))
            .await
            .map_err(join_error)?
    };
    let path = match checked {
        Ok(real) => real,
        Err(Refused::Missing) => {
            tracing::warn!("item `{id}`: its original {} is missing", path.display());
            return Err(ApiError::not_found(format!(
                "the original file of item `{id}` is missing"
            )));
        }
        Err(Refused::Outside(why)) => {
            // The client learns only that there is nothing to serve; the
            // log says where the link led.
            tracing::warn!(
                "item `{id}`: refusing its original {}: {why}",
                path.display()
            );
            return Err(ApiError::not_found(format!(
                "item `{id}` has no original file"
            )));
        }
    };
    let resp = tower_http::services::ServeFile::new(&path)
        .oneshot(req)
        .await
        .map_err(ApiError::internal)?;
    if resp.status() == StatusCode::NOT_FOUND {
        tracing::warn!("item `{id}`: its original {} is missing", path.display());
        return Err(ApiError::not_found(format!(
            "the original file of item `{id}` is missing"
        )));
    }
    let mut resp = resp.map(Body::new);
    file_headers(&mut resp);
    Ok(resp)
}

async fn info(State(s): State<AppState>) -> Json<serde_json::Value> {
    let index = s.0.index.read().unwrap_or_else(PoisonError::into_inner);
    let l = &s.0.limits;
    Json(json!({
        "items": index.len(),
        "dim": index.dim(),
        "index_model": index.model(),
        "encoder": {
            "run": s.0.encoder.describe(),
            "weights_hash": s.0.encoder.weights_hash(),
        },
        "approximate": index.ann_params().is_some(),
        "batching": match &s.0.texts {
            TextPath::Batched(b) => json!({
                "window_ms": millis(b.window()),
                "max_batch": b.max_batch(),
            }),
            TextPath::PerRequest => serde_json::Value::Null,
        },
        "filters": s.0.filters,
        "examples": s.0.examples,
        "limits": {
            "max_k": l.max_k,
            "max_query_chars": l.max_query_chars,
            "max_upload_bytes": l.max_upload_bytes,
            "max_image_side": l.max_image_side,
            "max_image_pixels": l.max_image_pixels,
            "max_svg_bytes": l.max_svg_bytes,
        },
        "uptime_s": (s.0.started.elapsed().as_secs_f64() * 1e3).round() / 1e3,
    }))
}

pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

pub(crate) async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

pub(crate) async fn metrics(State(s): State<AppState>) -> Response {
    {
        let index = s.0.index.read().unwrap_or_else(PoisonError::into_inner);
        s.0.metrics.set_index(index.len(), index.dim());
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.0.metrics.render(),
    )
        .into_response()
}

pub(crate) async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

/// Lets a request through only with `Authorization: Bearer <token>` when a
/// token is configured; the comparison takes the same time wherever the
/// first differing byte is.
pub(crate) async fn require_token(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = &s.0.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim().as_bytes());
        let ok = given.is_some_and(|g| bool::from(g.ct_eq(token)));
        if !ok {
            let mut resp = error_response(
                StatusCode::UNAUTHORIZED,
                "this server wants a token: send `Authorization: Bearer <token>`",
            );
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return resp;
        }
    }
    next.run(req).await
}

/// Turns every error answer that is not JSON yet (axum's own 404, 405 and
/// 413 answers, a missing file) into `{"error": ...}`, keeping its headers.
pub(crate) async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error").to_string(),
        t => t.to_string(),
    };
    let mut out = error_response(status, &message);
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// What a panicking handler answers; the server goes on.
pub(crate) fn panic_response(payload: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a handler panicked: {}", panic_message(payload.as_ref()));
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error (the server log has the details)",
    )
}

/// Counts and logs every request: one line with method, route (the
/// router's pattern), status and latency.
pub(crate) async fn observe(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let method = match *req.method() {
        Method::GET
        | Method::POST
        | Method::HEAD
        | Method::PUT
        | Method::DELETE
        | Method::OPTIONS
        | Method::PATCH => req.method().as_str().to_string(),
        _ => "other".to_string(),
    };
    let start = Instant::now();
    let resp = next.run(req).await;
    let latency = start.elapsed();
    let status = resp.status().as_u16();
    s.0.metrics
        .observe_request(&route, &method, status, latency);
    tracing::info!(
        target: "cots_serve::access",
        method = %method,
        route = %route,
        status,
        latency_ms = format!("{:.2}", latency.as_secs_f64() * 1e3),
        "request"
    );
    resp
}
