//! The JSON API over the in-process router (no sockets) and, where the
//! connection matters (graceful shutdown), over loopback; with a tiny run
//! and an index whose answers are known by construction (see common/).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use common::{fixture, multipart, open_index, until, Gated, QUERY, SECRET};
use cots_index::Index;
use cots_serve::{AppState, BatchConfig, Config, Limits, QueryEncoder};
use serde_json::{json, Value};
use tower::ServiceExt;

fn config() -> Config {
    Config {
        batching: Some(BatchConfig::default()),
        ..Config::default()
    }
}

fn app_with(config: Config) -> (AppState, Router) {
    let state = AppState::new(open_index(), Arc::new(common::encoder()), config).unwrap();
    (state.clone(), cots_serve::router(state))
}

fn app() -> Router {
    app_with(config()).1
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    bytes: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.bytes)))
    }
    fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message: {}", self.json()))
            .to_string()
    }
}

async fn send(app: &Router, req: Request<Body>) -> Answer {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
        .await
        .unwrap()
        .to_vec();
    Answer {
        status,
        headers,
        bytes,
    }
}

async fn get(app: &Router, uri: &str) -> Answer {
    send(app, Request::get(uri).body(Body::empty()).unwrap()).await
}

async fn post_json(app: &Router, uri: &str, body: Value) -> Answer {
    post_raw(app, uri, "application/json", body.to_string().into_bytes()).await
}

async fn post_raw(app: &Router, uri: &str, content_type: &str, body: Vec<u8>) -> Answer {
    send(
        app,
        Request::post(uri)
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body))
            .unwrap(),
    )
    .await
}

fn ids(answer: &Value) -> Vec<String> {
    answer["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap().to_string())
        .collect()
}

fn scores(answer: &Value) -> Vec<f32> {
    answer["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["score"].as_f64().unwrap() as f32)
        .collect()
}

/// The slow, obvious search: every item's dot product with `query`, items
/// failing `filter` dropped, best first (ties by row).
fn brute_force(
    index: &Index,
    query: &[f32],
    k: usize,
    filter: &BTreeMap<String, String>,
) -> Vec<(String, f32)> {
    let mut all: Vec<(usize, String, f32)> = index
        .items()
        .iter()
        .enumerate()
        .filter(|(_, item)| filter.iter().all(|(k, v)| item.metadata.get(k) == Some(v)))
        .map(|(row, item)| {
            let v = index.vector(row).unwrap();
            let s: f32 = v.iter().zip(query).map(|(a, b)| a * b).sum();
            (row, item.id.clone(), s)
        })
        .collect();
    all.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
    all.into_iter().take(k).map(|(_, id, s)| (id, s)).collect()
}

fn assert_matches_reference(answer: &Value, reference: &[(String, f32)]) {
    let got: Vec<(String, f32)> = ids(answer).into_iter().zip(scores(answer)).collect();
    assert_eq!(got.len(), reference.len(), "{got:?} vs {reference:?}");
    for ((gi, gs), (ri, rs)) in got.iter().zip(reference) {
        assert!((gs - rs).abs() <= 1e-5, "{got:?} vs {reference:?}");
        // Near-ties may swap; the ids must agree wherever scores differ.
        if gi != ri {
            let twin = reference.iter().find(|(i, _)| i == gi).unwrap();
            assert!((twin.1 - rs).abs() <= 1e-5, "{got:?} vs {reference:?}");
        }
    }
}

#[tokio::test]
async fn text_search_finds_the_expected_item_and_matches_brute_force() {
    let app = app();
    let r = post_json(&app, "/api/search", json!({ "text": QUERY, "k": 5 })).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.bytes)
    );
    let body = r.json();
    assert_eq!(ids(&body)[0], "expected", "{body}");
    assert!((scores(&body)[0] - 1.0).abs() < 1e-4, "{body}");
    let hit = &body["hits"][0];
    assert_eq!(hit["thumbnail"], "/api/items/expected/thumbnail");
    assert_eq!(hit["original"], "/api/items/expected/original");
    assert_eq!(hit["captions"][0], QUERY);
    assert!(body["took_ms"].as_f64().unwrap() >= 0.0);

    // Every hit against the slow reference, for the query and a few others.
    let index = open_index();
    let enc = common::encoder();
    for text in [
        QUERY,
        "small green triangle",
        "a blue cross above a yellow diamond",
    ] {
        let q = enc.embed_texts(&[text.to_string()]).unwrap();
        for k in [1, 4, 100] {
            let r = post_json(&app, "/api/search", json!({ "text": text, "k": k })).await;
            assert_eq!(r.status, StatusCode::OK);
            assert_matches_reference(&r.json(), &brute_force(&index, &q, k, &BTreeMap::new()));
        }
    }
}

#[tokio::test]
async fn filters_keep_only_matching_items() {
    let app = app();
    let index = open_index();
    let enc = common::encoder();
    let q = enc
        .embed_texts(&["small green triangle".to_string()])
        .unwrap();
    for (key, value) in [("split", "test"), ("split", "train"), ("objects", "two")] {
        let filter = BTreeMap::from([(key.to_string(), value.to_string())]);
        let r = post_json(
            &app,
            "/api/search",
            json!({ "text": "small green triangle", "k": 100, "filter": filter }),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        let body = r.json();
        for hit in body["hits"].as_array().unwrap() {
            assert_eq!(hit["metadata"][key], value, "{hit}");
        }
        assert_matches_reference(&body, &brute_force(&index, &q, 100, &filter));
    }
    // A filter nothing matches is an empty answer, not an error.
    let r = post_json(
        &app,
        "/api/search",
        json!({ "text": "anything", "filter": { "split": "nowhere" } }),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json()["hits"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn an_uploaded_image_finds_itself() {
    let f = fixture();
    let app = app();
    for id in ["scene-03", "scene-07"] {
        let png = std::fs::read(&f.pngs[id]).unwrap();
        let (ct, body) = multipart(&[("image", Some("query.png"), &png), ("k", None, b"3")]);
        let r = post_raw(&app, "/api/search/image", &ct, body).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.bytes)
        );
        let body = r.json();
        assert_eq!(ids(&body)[0], id, "{body}");
        assert!((scores(&body)[0] - 1.0).abs() < 1e-4, "{body}");
        assert_eq!(body["hits"].as_array().unwrap().len(), 3);
    }
    // With a filter that excludes it, it is not found.
    let png = std::fs::read(&f.pngs["scene-03"]).unwrap();
    let (ct, body) = multipart(&[
        ("image", Some("query.png"), &png),
        ("filter", None, br#"{"split": "train"}"#),
    ]);
    let r = post_raw(&app, "/api/search/image", &ct, body).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!ids(&r.json()).contains(&"scene-03".to_string()));
}

#[tokio::test]
async fn items_thumbnails_and_originals_are_served_by_id() {
    let f = fixture();
    let app = app();
    let r = get(&app, "/api/items/scene-05").await;
    assert_eq!(r.status, StatusCode::OK);
    let item = r.json();
    assert_eq!(item["id"], "scene-05");
    assert_eq!(item["kind"], "image");
    assert!(
        item.get("path").is_none(),
        "no filesystem paths in answers: {item}"
    );

    let png = std::fs::read(&f.pngs["scene-05"]).unwrap();
    let r = get(&app, "/api/items/scene-05/thumbnail").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers[header::CONTENT_TYPE], "image/png");
    assert_eq!(r.bytes, png);
    let r = get(&app, "/api/items/scene-05/original").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers[header::CONTENT_TYPE], "image/png");
    assert_eq!(r.bytes, png);
    assert_eq!(r.headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");

    // An id with a slash travels percent-encoded.
    let r = get(&app, "/api/items/folder%2Fnested").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json()["thumbnail"],
        "/api/items/folder%2Fnested/thumbnail"
    );
    let r = get(&app, "/api/items/folder%2Fnested/thumbnail").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.error().contains("no thumbnail"), "{}", r.error());
    let r = get(&app, "/api/items/folder%2Fnested/original").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn traversal_attempts_never_reach_a_file() {
    let f = fixture();
    let app = app();
    let secret = f.secret.display().to_string();
    let enc_secret: String = secret.replace('/', "%2F");
    let attempts = [
        "/api/items/..%2Fsecret.txt/original".to_string(),
        "/api/items/..%2F..%2Fetc%2Fpasswd/original".to_string(),
        "/api/items/..%252F..%252Fetc%252Fpasswd/original".to_string(),
        "/api/items/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd/thumbnail".to_string(),
        "/api/items/..%5C..%5Csecret.txt/original".to_string(),
        "/api/items/%2Fetc%2Fpasswd/original".to_string(),
        format!("/api/items/{enc_secret}/original"),
        format!("/api/items/{enc_secret}"),
        "/api/items/../../secret.txt/original".to_string(),
        "/api/items/scene-01/../../../secret.txt".to_string(),
        "/api/items/images/scene-01.png/original".to_string(),
        "/api/items/scene-01/original/..%2F..%2F..%2Fsecret.txt".to_string(),
        "/api/items/scene-01%00.png/original".to_string(),
        "/../secret.txt".to_string(),
        "/%2E%2E/secret.txt".to_string(),
        "/app.js/..%2F..%2Fsecret.txt".to_string(),
    ];
    for uri in &attempts {
        let r = get(&app, uri).await;
        assert!(
            r.status == StatusCode::NOT_FOUND || r.status == StatusCode::BAD_REQUEST,
            "{uri}: {}",
            r.status
        );
        let text = String::from_utf8_lossy(&r.bytes);
        assert!(
            !text.contains(SECRET) && !text.contains("root:"),
            "{uri}: {text}"
        );
        r.error();
    }
}

#[tokio::test]
async fn bad_requests_get_400_with_a_json_message() {
    let app = app();
    let long = "x".repeat(1001);
    let cases: Vec<(Value, &str)> = vec![
        (json!({ "text": "" }), "empty"),
        (json!({ "text": "   \n\t" }), "empty"),
        (json!({ "text": long }), "1001 characters"),
        (json!({ "text": "a", "k": 0 }), "k must be"),
        (json!({ "text": "a", "k": 101 }), "k must be"),
        (json!({ "text": "a", "k": -1 }), "k"),
        (json!({ "text": "a", "k": "ten" }), "k"),
        (json!({ "text": "a", "k": 2.5 }), "k"),
        (json!({ "txt": "a" }), "txt"),
        (json!({ "text": "a", "filter": { "split": 3 } }), "filter"),
        (json!({ "text": "a", "approximate": true }), "approximate"),
        (json!(["a"]), "JSON object"),
        (json!("a"), "JSON object"),
    ];
    for (body, hint) in cases {
        let r = post_json(&app, "/api/search", body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(r.error().contains(hint), "{body}: {}", r.error());
    }
    let r = post_raw(
        &app,
        "/api/search",
        "application/json",
        b"{not json".to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    r.error();
    let r = post_raw(&app, "/api/search", "text/plain", b"hello".to_vec()).await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    r.error();

    // Uploads: corrupt, missing, empty, odd fields.
    let forms: Vec<(Vec<common::Field>, &str)> = vec![
        (
            vec![("image", Some("x.png"), b"\x89PNG\r\n\x1a\nbroken")],
            "could not read",
        ),
        (
            vec![("image", Some("x.jpg"), b"not an image at all")],
            "could not read",
        ),
        (vec![("k", None, b"3")], "no image"),
        (vec![("image", Some("x.png"), b"")], "no image"),
        (vec![("picture", Some("x.png"), b"abc")], "unknown field"),
        (
            vec![("image", Some("x.png"), b"abc"), ("k", None, b"zero")],
            "k",
        ),
    ];
    for (fields, hint) in forms {
        let (ct, body) = multipart(&fields);
        let r = post_raw(&app, "/api/search/image", &ct, body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{hint}");
        assert!(r.error().contains(hint), "{hint}: {}", r.error());
    }
    let r = post_raw(
        &app,
        "/api/search/image",
        "application/json",
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    r.error();
}

#[tokio::test]
async fn unknown_ids_and_routes_get_404_and_wrong_methods_405() {
    let app = app();
    for uri in [
        "/api/items/nope",
        "/api/items/nope/thumbnail",
        "/api/items/nope/original",
        "/api/nothing",
        "/nothing",
    ] {
        let r = get(&app, uri).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{uri}");
        r.error();
    }
    let r = get(&app, "/api/search").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(r.headers.contains_key(header::ALLOW));
    r.error();
}

#[tokio::test]
async fn oversized_bodies_and_images_get_413() {
    let f = fixture();
    let (_, app) = app_with(Config {
        limits: Limits {
            max_upload_bytes: 4096,
            ..Limits::default()
        },
        ..config()
    });
    let big = "y".repeat(100 * 1024);
    let r = post_json(&app, "/api/search", json!({ "text": big })).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    r.error();
    let noise = vec![7u8; 10_000];
    let (ct, body) = multipart(&[("image", Some("big.png"), &noise)]);
    let r = post_raw(&app, "/api/search/image", &ct, body).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    r.error();

    // Dimensions are checked from the header, before decoding.
    let (_, app) = app_with(Config {
        limits: Limits {
            max_image_side: 100,
            ..Limits::default()
        },
        ..config()
    });
    let png = std::fs::read(&f.pngs["scene-01"]).unwrap();
    let (ct, body) = multipart(&[("image", Some("q.png"), &png)]);
    let r = post_raw(&app, "/api/search/image", &ct, body).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(r.error().contains("160 x 160"), "{}", r.error());
}

#[tokio::test]
async fn a_token_guards_the_api_but_not_the_page() {
    let (_, app) = app_with(Config {
        token: Some("s3cret-token".into()),
        ..config()
    });
    let search = |auth: Option<&'static str>| {
        let mut req = Request::post("/api/search").header(header::CONTENT_TYPE, "application/json");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        req.body(Body::from(json!({ "text": QUERY }).to_string()))
            .unwrap()
    };
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cret-toke"),
        Some("Bearer s3cret-token-and-more"),
        Some("Basic s3cret-token"),
        Some("s3cret-token"),
    ] {
        let r = send(&app, search(auth)).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(r.headers[header::WWW_AUTHENTICATE], "Bearer");
        r.error();
    }
    let r = send(&app, search(Some("Bearer s3cret-token"))).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = send(&app, search(Some("bearer s3cret-token"))).await;
    assert_eq!(r.status, StatusCode::OK);
    for uri in [
        "/api/items/scene-01",
        "/api/items/scene-01/thumbnail",
        "/metrics",
        "/api/info",
    ] {
        assert_eq!(
            get(&app, uri).await.status,
            StatusCode::UNAUTHORIZED,
            "{uri}"
        );
    }
    for uri in ["/", "/app.js", "/style.css", "/healthz", "/openapi.json"] {
        assert_eq!(get(&app, uri).await.status, StatusCode::OK, "{uri}");
    }
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_with_a_strict_policy() {
    let app = app();
    let r = get(&app, "/").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = r.headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let html = String::from_utf8(r.bytes).unwrap();
    assert!(html.contains("name=\"viewport\""));
    // Nothing is fetched from elsewhere.
    assert!(!html.contains("http://") && !html.contains("https://"));
    for (uri, ct) in [
        ("/app.js", "text/javascript"),
        ("/style.css", "text/css"),
        ("/favicon.svg", "image/svg+xml"),
    ] {
        let r = get(&app, uri).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with(ct));
        let text = String::from_utf8(r.bytes).unwrap();
        assert!(!text.contains("https://"), "{uri} fetches from elsewhere");
    }
    let r = get(&app, "/openapi.json").await;
    assert_eq!(r.json()["openapi"], "3.0.3");
    let r = get(&app, "/api/info").await;
    let info = r.json();
    assert_eq!(info["items"], common::SCENES + 2);
    assert_eq!(info["approximate"], false);
    assert_eq!(info["filters"]["split"], json!(["test", "train"]));
}

#[test]
fn a_run_that_did_not_build_the_index_is_refused_unless_allowed() {
    struct Other(cots_train::query::RunEncoder);
    impl QueryEncoder for Other {
        fn embed_texts(&self, t: &[String]) -> cots_infer::Result<Vec<f32>> {
            self.0.embed_texts(t)
        }
        fn embed_images(&self, i: &[image::RgbImage]) -> cots_infer::Result<Vec<f32>> {
            self.0.embed_images(i)
        }
        fn dim(&self) -> usize {
            self.0.dim()
        }
        fn weights_hash(&self) -> &str {
            "0123456789abcdef"
        }
        fn describe(&self) -> String {
            "runs/other".into()
        }
    }
    let other = || Arc::new(Other(common::encoder()));
    let index = open_index();
    let index_hash = index.model().weights_hash.clone();
    let e = AppState::new(index, other(), config())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("0123456789abcdef") && e.contains(&index_hash),
        "{e}"
    );
    assert!(e.contains("--allow-model-mismatch"), "{e}");
    AppState::new(
        open_index(),
        other(),
        Config {
            allow_model_mismatch: true,
            ..config()
        },
    )
    .unwrap();
}

/// Parses the Prometheus text format strictly (the slow way: line by line,
/// per the exposition format), returning `name{labels} -> value` and the
/// declared type of each family.
fn parse_metrics(text: &str) -> (BTreeMap<String, f64>, BTreeMap<String, String>) {
    let mut samples = BTreeMap::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(
            !line.is_empty() && !line.starts_with('#'),
            "stray line `{line}`"
        );
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in `{line}`"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name in `{line}`"
        );
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap();
            for pair in inner.split("\",") {
                let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("`{line}`"));
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "`{line}`"
                );
                assert!(!v.trim_end_matches('"').contains('"'), "`{line}`");
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "`{line}` has no TYPE line before it"
        );
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "duplicate `{line}`"
        );
    }
    (samples, types)
}

#[tokio::test]
async fn metrics_parse_and_count_what_happened() {
    let (state, app) = app_with(config());
    let searches = 5;
    for i in 0..searches {
        let r = post_json(&app, "/api/search", json!({ "text": format!("query {i}") })).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(
        get(&app, "/api/items/nope").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        post_json(&app, "/api/search", json!({ "text": "" }))
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    let r = get(&app, "/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let (samples, types) = parse_metrics(std::str::from_utf8(&r.bytes).unwrap());
    assert_eq!(types["cots_http_requests_total"], "counter");
    assert_eq!(types["cots_http_request_duration_seconds"], "histogram");
    assert_eq!(types["cots_text_encoder_batch_size"], "histogram");
    let s = |k: &str| {
        *samples
            .get(k)
            .unwrap_or_else(|| panic!("no {k} in {samples:?}"))
    };
    assert_eq!(
        s(r#"cots_http_requests_total{route="/api/search",method="POST",status="200"}"#),
        searches as f64
    );
    assert_eq!(
        s(r#"cots_http_requests_total{route="/api/search",method="POST",status="400"}"#),
        1.0
    );
    assert_eq!(
        s(r#"cots_http_requests_total{route="/api/items/{id}",method="GET",status="404"}"#),
        1.0
    );
    assert_eq!(
        s(r#"cots_http_request_duration_seconds_count{route="/api/search"}"#),
        (searches + 1) as f64
    );
    assert_eq!(
        s(r#"cots_http_request_duration_seconds_bucket{route="/api/search",le="+Inf"}"#),
        (searches + 1) as f64
    );
    // Buckets are cumulative: ordered by bound, counts never decrease.
    let prefix = r#"cots_http_request_duration_seconds_bucket{route="/api/search",le=""#;
    let mut buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(prefix)?.strip_suffix("\"}")?;
            Some((
                if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                },
                *v,
            ))
        })
        .collect();
    assert_eq!(
        buckets.len(),
        cots_serve::metrics::LATENCY_BUCKETS.len() + 1
    );
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
    assert_eq!(buckets.last().unwrap().1, (searches + 1) as f64);
    // Sequential searches: one encoder call each, all of size 1.
    assert_eq!(s("cots_text_encoder_batch_size_count"), searches as f64);
    assert_eq!(
        s(r#"cots_text_encoder_batch_size_bucket{le="1"}"#),
        searches as f64
    );
    assert_eq!(state.metrics().encoder_calls(), searches as u64);
    assert_eq!(s("cots_index_items"), (common::SCENES + 2) as f64);
    assert_eq!(s("cots_index_dimensions"), open_index().dim() as f64);
}

/// Sends `texts` at once while the encoder is held busy by a first query,
/// so they queue up; returns each answer and the encoder's batch sizes.
async fn concurrent_searches(texts: &[String], batching: bool) -> (Vec<Value>, Vec<usize>) {
    let gated = Gated::new(common::encoder(), false);
    let state = AppState::new(
        open_index(),
        gated.clone(),
        Config {
            batching: batching.then(|| BatchConfig {
                window: Duration::from_millis(2),
                max_batch: 32,
                queue: 1024,
            }),
            // Enough blocking slots for every held per-request call.
            limits: Limits {
                max_blocking: 2 * texts.len(),
                ..Limits::default()
            },
            ..Config::default()
        },
    )
    .unwrap();
    let app = cots_serve::router(state.clone());
    let search = |text: String| {
        let app = app.clone();
        tokio::spawn(async move {
            let r = post_json(&app, "/api/search", json!({ "text": text, "k": 8 })).await;
            assert_eq!(r.status, StatusCode::OK);
            r.json()
        })
    };
    let first = search(texts[0].clone());
    until(|| gated.entered() == 1).await;
    let rest: Vec<_> = texts[1..].iter().map(|t| search(t.clone())).collect();
    if batching {
        until(|| state.queued_text_queries() == texts.len() - 1).await;
    } else {
        until(|| gated.entered() == texts.len()).await;
    }
    gated.open();
    let mut answers = vec![first.await.unwrap()];
    for h in rest {
        answers.push(h.await.unwrap());
    }
    let calls = gated.calls.lock().unwrap().clone();
    (answers, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_queries_share_encoder_calls_and_answer_as_one_by_one() {
    // Texts of different lengths, so a batch pads them differently.
    let texts: Vec<String> = [
        QUERY,
        "small green triangle",
        "a blue cross above a yellow diamond",
        "red",
        "large purple square left of a small orange circle",
        "diamond",
        "a small yellow cross",
        "green circle above red triangle",
        "blue",
        "a large white square",
        "cross",
        "an orange diamond left of a green square",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (batched, calls) = concurrent_searches(&texts, true).await;
    assert_eq!(
        calls,
        vec![1, texts.len() - 1],
        "one call for the first, one for the rest"
    );
    assert!(calls.len() < texts.len());

    let (single, calls) = concurrent_searches(&texts, false).await;
    assert_eq!(calls, vec![1; texts.len()]);

    // The reference: one request at a time, nothing concurrent.
    let app = app_with(Config::default()).1;
    for ((text, b), s) in texts.iter().zip(&batched).zip(&single) {
        let one = post_json(&app, "/api/search", json!({ "text": text, "k": 8 }))
            .await
            .json();
        for other in [b, s] {
            assert_eq!(ids(other), ids(&one), "{text}");
            for (x, y) in scores(other).iter().zip(scores(&one)) {
                assert!((x - y).abs() <= 1e-6, "{text}: {x} vs {y}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_in_flight_request_finish() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    for batching in [true, false] {
        let gated = Gated::new(common::encoder(), false);
        let state = AppState::new(
            open_index(),
            gated.clone(),
            Config {
                batching: batching.then(BatchConfig::default),
                ..Config::default()
            },
        )
        .unwrap();
        let listener = cots_serve::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(cots_serve::serve(listener, state, async {
            let _ = stopped.await;
        }));

        let client: Client<_, Full<axum::body::Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let req = Request::post(format!("http://{addr}/api/search"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::from(json!({ "text": QUERY }).to_string()))
            .unwrap();
        let in_flight = tokio::spawn(async move { client.request(req).await });
        until(|| gated.entered() == 1).await;

        stop.send(()).unwrap();
        // The server waits for the request: it cannot finish while the
        // encoder is held.
        tokio::task::yield_now().await;
        assert!(!server.is_finished());
        gated.open();

        let resp = in_flight.await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(ids(&body)[0], "expected");
        server.await.unwrap().unwrap();
        // And it no longer listens.
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
