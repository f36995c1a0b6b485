//! Tests that need the crate's private parts: the layers around a route that
//! panics, and the OpenAPI description against the router's source.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use axum::Router;
use cots_index::{Index, Model};
use image::RgbImage;
use tower::ServiceExt;

use super::*;

struct Fixed;

impl QueryEncoder for Fixed {
    fn embed_texts(&self, texts: &[String]) -> cots_infer::Result<Vec<f32>> {
        Ok(texts.iter().flat_map(|_| [1.0, 0.0]).collect())
    }
    fn embed_images(&self, images: &[RgbImage]) -> cots_infer::Result<Vec<f32>> {
        Ok(images.iter().flat_map(|_| [0.0, 1.0]).collect())
    }
    fn dim(&self) -> usize {
        2
    }
    fn weights_hash(&self) -> &str {
        "fixed"
    }
    fn describe(&self) -> String {
        "fixed".into()
    }
}

fn state(dir: &std::path::Path) -> AppState {
    let index = Index::create(
        dir,
        Model {
            weights_hash: "fixed".into(),
            run: "fixed".into(),
            dim: 2,
        },
    )
    .unwrap();
    AppState::new(index, Arc::new(Fixed), Config::default()).unwrap()
}

async fn get_status(app: &Router, uri: &str) -> (StatusCode, serde_json::Value) {
    let resp = app
        .clone()
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

#[tokio::test]
async fn a_panicking_handler_answers_500_json_and_the_server_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    let routes = Router::new()
        .route(
            "/boom",
            get(|| async {
                if true {
                    panic!("a handler bug");
                }
                "unreachable"
            }),
        )
        .route("/healthz", get(api::healthz))
        .with_state(s.clone());
    let app = with_layers(routes, s.clone());
    let (status, body) = get_status(&app, "/boom").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        body["error"].as_str().unwrap().contains("internal error"),
        "{body}"
    );
    let (status, _) = get_status(&app, "/healthz").await;
    assert_eq!(status, StatusCode::OK);
    let text = s.metrics().render();
    assert!(
        text.contains("cots_http_requests_total{route=\"/boom\",method=\"GET\",status=\"500\"} 1"),
        "{text}"
    );
}

/// `(method, path)` of every `.route("PATH", METHOD(...))` in the router's
/// source files: a route added without its OpenAPI entry fails here.
fn routes_in_source() -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for src in [
        include_str!("lib.rs"),
        include_str!("api.rs"),
        include_str!("web.rs"),
    ] {
        let flat: String = src.split_whitespace().collect::<Vec<_>>().join(" ");
        for piece in flat.split(".route(").skip(1) {
            let Some(rest) = piece.trim_start().strip_prefix('"') else {
                continue;
            };
            let Some((path, after)) = rest.split_once('"') else {
                continue;
            };
            let after = after.trim_start_matches([',', ' ']);
            let method = after
                .split_once('(')
                .map(|(m, _)| m.rsplit("::").next().unwrap_or(m).trim().to_string())
                .unwrap_or_default();
            out.insert((method, path.to_string()));
        }
    }
    out
}

#[test]
fn every_route_is_in_the_openapi_description_and_back() {
    let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
    let routes = routes_in_source();
    // The page, the API, health, metrics and the description itself.
    assert!(routes.len() >= 13, "{routes:?}");
    let mut documented = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.insert((method.clone(), path.clone()));
        }
    }
    assert_eq!(routes, documented);
}
