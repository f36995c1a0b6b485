//! The web page in a real browser: headless Chromium driven through the
//! system chromedriver (WebDriver), against the server on a loopback port.
//! It types a query, checks the expected item comes first, uploads an image
//! that is in the index and checks it finds itself, checks the keyboard
//! paths and the phone layout, and saves screenshots under
//! `target/browser/`.
//!
//! Needs `chromium` and `chromium-driver` (Debian packages; `.ci/run`
//! installs them). Without them the test says so and passes.

mod common;

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{fixture, open_index, QUERY};
use cots_serve::{AppState, BatchConfig, Config};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};

/// Generous bounds for the page to react: they only decide when a broken
/// page fails, never whether a slow machine passes.
const WAIT: Duration = Duration::from_secs(120);

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// Ends chromedriver (the process this test started) when the test ends.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

async fn connect(driver_port: u16, chromium: &Path, profile: &Path) -> Client {
    let caps = json!({
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-default-apps",
                "--disable-sync",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
                format!("--user-data-dir={}", profile.display()),
            ],
        }
    });
    let caps: fantoccini::wd::Capabilities = caps.as_object().unwrap().clone();
    let url = format!("http://127.0.0.1:{driver_port}");
    // chromedriver takes a moment to listen; retry until it answers.
    let mut last = None;
    for _ in 0..600 {
        match ClientBuilder::new(HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&url)
            .await
        {
            Ok(c) => return c,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not start a WebDriver session: {last:?}");
}

/// Polls `script` (a JS expression) until it is truthy, returning its value.
async fn wait_js(c: &Client, what: &str, script: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = c
            .execute(&format!("return ({script});"), vec![])
            .await
            .unwrap();
        let truthy = match &v {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::String(s) => !s.is_empty(),
            Value::Number(n) => n.as_f64() != Some(0.0),
            _ => true,
        };
        if truthy {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            let status = c
                .execute("return document.body.innerText;", vec![])
                .await
                .unwrap();
            panic!("the page never showed {what}; it shows:\n{status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn screenshot(c: &Client, name: &str) -> PathBuf {
    let dir = target_dir().join("browser");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, c.screenshot().await.unwrap()).unwrap();
    println!("screenshot: {}", path.display());
    path
}

/// Every result thumbnail has loaded (the images arrive as blobs).
const THUMBS_LOADED: &str = "document.querySelectorAll('.card-link').length > 0 && \
     [...document.querySelectorAll('.thumb img')].every(i => i.complete && i.naturalWidth > 0)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_searches_by_text_and_by_image() {
    let (Some(driver), Some(chromium)) = (
        find_program(&["chromedriver"]),
        find_program(&["chromium", "chromium-browser", "google-chrome"]),
    ) else {
        // .ci/run installs them; under CI their absence is a failure.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but chromedriver or chromium is not on PATH"
        );
        println!(
            "skipped: the browser test needs chromedriver and chromium on PATH \
             (apt-get install chromium chromium-driver); .ci/run installs them"
        );
        return;
    };

    let f = fixture();
    let state = AppState::new(
        open_index(),
        Arc::new(common::encoder()),
        Config {
            batching: Some(BatchConfig::default()),
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

    let port = free_port();
    let _driver = Driver(
        Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let profile = tempfile::tempdir().unwrap();
    let c = connect(port, &chromium, profile.path()).await;
    c.set_window_size(1280, 1000).await.unwrap();
    c.goto(&format!("http://{addr}/")).await.unwrap();
    wait_js(
        &c,
        "the index size",
        "document.getElementById('index-info').textContent.includes('items')",
    )
    .await;

    // `/` focuses the search box.
    c.find(Locator::Css("body"))
        .await
        .unwrap()
        .send_keys("/")
        .await
        .unwrap();
    assert_eq!(
        c.execute("return document.activeElement.id;", vec![])
            .await
            .unwrap(),
        "q"
    );

    // Type a query, press Enter.
    let q = c.find(Locator::Id("q")).await.unwrap();
    q.send_keys(&format!("{QUERY}\u{E007}")).await.unwrap();
    wait_js(&c, "results", THUMBS_LOADED).await;
    let first = c
        .execute(
            "return document.querySelector('.card-link').dataset.id;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(first, "expected");
    let status = wait_js(
        &c,
        "the latency",
        "document.getElementById('status').textContent",
    )
    .await;
    assert!(status.as_str().unwrap().contains(" ms"), "{status}");
    let first_score = c
        .execute(
            "return document.querySelector('.card .score .num').textContent;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(first_score, "1.000");
    screenshot(&c, "search.png").await;

    // The results are reachable by Tab from the search box.
    c.execute("document.getElementById('q').focus();", vec![])
        .await
        .unwrap();
    let mut reached = false;
    for _ in 0..12 {
        c.active_element()
            .await
            .unwrap()
            .send_keys("\u{E004}")
            .await
            .unwrap();
        let cls = c
            .execute("return document.activeElement.className;", vec![])
            .await
            .unwrap();
        if cls == "card-link" {
            reached = true;
            break;
        }
    }
    assert!(reached, "Tab never reached a result");
    // Enter on a result opens its details.
    c.active_element()
        .await
        .unwrap()
        .send_keys("\u{E007}")
        .await
        .unwrap();
    wait_js(
        &c,
        "the detail dialog",
        "document.getElementById('detail').open",
    )
    .await;
    screenshot(&c, "detail.png").await;
    c.execute("document.getElementById('detail').close();", vec![])
        .await
        .unwrap();

    // Search with an image that is in the index: it finds itself.
    let input = c.find(Locator::Id("image-input")).await.unwrap();
    input
        .send_keys(&f.pngs["scene-03"].display().to_string())
        .await
        .unwrap();
    wait_js(
        &c,
        "the image results",
        &format!(
            "!document.getElementById('query-image').hidden && \
             document.querySelector('.card-link')?.dataset.id === 'scene-03' && ({THUMBS_LOADED})"
        ),
    )
    .await;
    screenshot(&c, "image-search.png").await;

    // "Find similar" on that result searches with its picture.
    c.find(Locator::Css(".card-link"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(
        &c,
        "the detail dialog",
        "document.getElementById('detail').open",
    )
    .await;
    c.find(Locator::Id("detail-similar"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(
        &c,
        "the similar results",
        &format!(
            "document.getElementById('status').textContent.includes('scene-03 (similar)') && \
             document.querySelector('.card-link')?.dataset.id === 'scene-03' && ({THUMBS_LOADED})"
        ),
    )
    .await;

    // An empty query is refused politely, in the page.
    c.execute("document.getElementById('q').value = '';", vec![])
        .await
        .unwrap();
    c.find(Locator::Id("search-button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let err = wait_js(
        &c,
        "an error message",
        "!document.getElementById('error').hidden && document.getElementById('error').textContent",
    )
    .await;
    assert!(err.as_str().unwrap().contains("Type a few words"), "{err}");

    // A search can be linked to: `?q=` runs it on load, and typing keeps
    // the address up to date (without adding history entries).
    let encoded = percent_encoding::utf8_percent_encode(QUERY, percent_encoding::NON_ALPHANUMERIC);
    c.goto(&format!("http://{addr}/?q={encoded}"))
        .await
        .unwrap();
    wait_js(
        &c,
        "the linked search's results",
        &format!(
            "document.querySelector('.card-link')?.dataset.id === 'expected' && ({THUMBS_LOADED})"
        ),
    )
    .await;
    let typed = c
        .execute("return document.getElementById('q').value;", vec![])
        .await
        .unwrap();
    assert_eq!(typed, QUERY);
    let history = c.execute("return history.length;", vec![]).await.unwrap();
    c.find(Locator::Id("q"))
        .await
        .unwrap()
        .send_keys(" at noon")
        .await
        .unwrap();
    let in_url = wait_js(
        &c,
        "the typed query in the address",
        "new URLSearchParams(location.search).get('q') === document.getElementById('q').value \
         && document.getElementById('q').value.endsWith('at noon') && location.search",
    )
    .await;
    assert!(in_url.as_str().unwrap().contains("noon"), "{in_url}");
    assert_eq!(
        c.execute("return history.length;", vec![]).await.unwrap(),
        history
    );

    // Keyboard hints show where there is a keyboard.
    let hint_display =
        "return getComputedStyle(document.querySelector('#q-hint .key-hint')).display;";
    assert_ne!(c.execute(hint_display, vec![]).await.unwrap(), "none");

    // On a phone-sized window the grid has two columns.
    c.set_window_size(390, 844).await.unwrap();
    c.find(Locator::Id("q"))
        .await
        .unwrap()
        .send_keys(&format!("{QUERY}\u{E007}"))
        .await
        .unwrap();
    wait_js(&c, "results on a phone", THUMBS_LOADED).await;
    let columns = c
        .execute(
            "return getComputedStyle(document.getElementById('grid')).gridTemplateColumns.split(' ').length;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(columns, 2);
    // ... and no keyboard hints: a phone has no `/` key to press.
    assert_eq!(c.execute(hint_display, vec![]).await.unwrap(), "none");
    screenshot(&c, "phone.png").await;
    c.set_window_size(1280, 1000).await.unwrap();

    // A server that wants a token: the page says where to enter it, and
    // the form is where it says.
    let guarded = AppState::new(
        open_index(),
        Arc::new(common::encoder()),
        Config {
            token: Some("browser-test-token".into()),
            ..Config::default()
        },
    )
    .unwrap();
    let listener = cots_serve::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let guarded_addr = listener.local_addr().unwrap();
    let (stop_guarded, guarded_stopped) = tokio::sync::oneshot::channel::<()>();
    let guarded_server = tokio::spawn(cots_serve::serve(listener, guarded, async {
        let _ = guarded_stopped.await;
    }));
    c.goto(&format!("http://{guarded_addr}/")).await.unwrap();
    c.find(Locator::Id("q"))
        .await
        .unwrap()
        .send_keys(&format!("{QUERY}\u{E007}"))
        .await
        .unwrap();
    let err = wait_js(
        &c,
        "the token message",
        "!document.getElementById('error').hidden && !document.getElementById('token-form').hidden \
         && document.getElementById('error').textContent.includes('token') \
         && document.getElementById('error').textContent",
    )
    .await;
    let err = err.as_str().unwrap();
    assert!(err.contains("below") && !err.contains("above"), "{err}");
    let below = c
        .execute(
            "return document.getElementById('token-form').getBoundingClientRect().top >= \
             document.getElementById('error').getBoundingClientRect().bottom;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(below, true, "{err}");
    screenshot(&c, "token.png").await;

    c.close().await.unwrap();
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    stop_guarded.send(()).unwrap();
    guarded_server.await.unwrap().unwrap();
}
