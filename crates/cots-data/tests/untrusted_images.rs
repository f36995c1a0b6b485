//! Images from users: SVGs must not reach the file system or run unbounded,
//! and transparent pixels take the configured background on every path.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use cots_data::image_io::{self, Background, ImageConfig};
use cots_data::video::SampleMode;
use cots_data::ImageSource;
use image::{Rgb, RgbImage, Rgba, RgbaImage};
use rand::{Rng, SeedableRng};

/// A guard against a hang, not a performance bound: a decode that blocks
/// (a FIFO) or never ends (`/dev/zero`) fails the test instead of stalling
/// the suite.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// Decodes `svg` on its own thread, so that a decode that blocks forever
/// fails the test rather than hanging it.
fn decode_guarded(svg: String) -> cots_data::Result<RgbImage> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(image_io::decode_bytes(
            svg.as_bytes(),
            Path::new("query.svg"),
        ));
    });
    rx.recv_timeout(HANG_GUARD)
        .expect("the SVG decode did not finish: it is reading an external resource")
}

fn svg_with_image(href: &str) -> String {
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" viewBox="0 0 10 10"><image x="0" y="0" width="10" height="10" href="{href}"/><image x="0" y="0" width="10" height="10" xlink:href="{href}"/></svg>"#
    )
}

fn all_white(img: &RgbImage) -> bool {
    img.pixels().all(|p| p.0 == [255, 255, 255])
}

/// A red PNG the test controls: before the fix the renderer loaded it
/// through `<image href>` and drew it.
fn red_png(dir: &Path) -> PathBuf {
    let path = dir.join("secret.png");
    RgbImage::from_pixel(8, 8, Rgb([255, 0, 0]))
        .save(&path)
        .unwrap();
    path
}

#[test]
fn svg_image_hrefs_never_reach_the_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let red = red_png(dir.path());
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let mut hrefs = vec![
        red.display().to_string(),
        format!("file://{}", red.display()),
        "secret.png".to_string(),
        "/etc/passwd".to_string(),
        "file:///etc/hostname".to_string(),
        "/dev/zero".to_string(),
        "http://127.0.0.1:9/x.png".to_string(),
    ];
    if made {
        hrefs.push(fifo.display().to_string());
    } else {
        eprintln!("mkfifo is unavailable: the FIFO case is not run");
    }
    for href in hrefs {
        let img = decode_guarded(svg_with_image(&href)).unwrap_or_else(|e| panic!("{href}: {e}"));
        // Nothing was drawn: the external image was never loaded.
        assert!(all_white(&img), "{href}: the SVG drew an external image");
    }
    // A manifest naming a FIFO or a device as the image itself is refused
    // without being read.
    if made {
        let e = image_io::decode(&fifo).unwrap_err().to_string();
        assert!(
            e.contains("not a regular file") && e.contains("fifo"),
            "{e}"
        );
    }
    let e = image_io::decode(Path::new("/dev/zero"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a regular file"), "{e}");
}

/// Minimal base64 (standard alphabet, padded) for `data:` URIs.
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn png_bytes(img: &RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn svg_data_uris_are_decoded_only_within_budget() {
    // A small embedded PNG is still drawn.
    let small = base64(&png_bytes(&RgbImage::from_pixel(8, 8, Rgb([255, 0, 0]))));
    let img = decode_guarded(svg_with_image(&format!("data:image/png;base64,{small}"))).unwrap();
    assert_eq!(img.get_pixel(128, 128).0, [255, 0, 0]);
    // An embedded PNG larger than the budget is not decoded.
    let side = image_io::MAX_EMBEDDED_SIDE + 1;
    let big = base64(&png_bytes(&RgbImage::from_pixel(side, 1, Rgb([255, 0, 0]))));
    let img = decode_guarded(svg_with_image(&format!("data:image/png;base64,{big}"))).unwrap();
    assert!(all_white(&img));
    // An embedded SVG (a second document, itself able to embed) is not drawn.
    let inner = r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 1 1"><rect width="1" height="1" fill="#ff0000"/></svg>"##;
    let img = decode_guarded(svg_with_image(&format!(
        "data:image/svg+xml;base64,{}",
        base64(inner.as_bytes())
    )))
    .unwrap();
    assert!(all_white(&img));
}

fn refused(svg: &[u8], want: &str) {
    let e = image_io::decode_bytes(svg, Path::new("huge.svg"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("huge.svg") && e.contains(want), "{e}");
}

#[test]
fn oversized_svgs_are_refused_with_a_clear_error() {
    let open = r#"<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" viewBox="0 0 10 10">"#;
    // Bytes: refused before parsing, as bytes and as a file.
    let mut big = open.to_string();
    while big.len() as u64 <= image_io::MAX_SVG_BYTES {
        big.push_str("<!-- padding padding padding padding padding padding -->");
    }
    big.push_str("</svg>");
    refused(big.as_bytes(), "bytes, above the limit");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("huge.svg");
    std::fs::write(&file, &big).unwrap();
    let e = image_io::decode(&file).unwrap_err().to_string();
    assert!(e.contains("bytes, above the limit"), "{e}");
    // Gzip: the inflated size is unknown.
    refused(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0], "gzip");
    // Elements.
    let many = format!(
        "{open}{}</svg>",
        "<rect width=\"1\" height=\"1\"/>".repeat(image_io::MAX_SVG_ELEMENTS + 1)
    );
    refused(many.as_bytes(), "elements, above the limit");
    // Nesting.
    let depth = image_io::MAX_SVG_DEPTH + 5;
    let deep = format!(
        "{open}{}<rect/>{}</svg>",
        "<g>".repeat(depth),
        "</g>".repeat(depth)
    );
    refused(deep.as_bytes(), "nest deeper");
    // `<use>` amplification: ten levels of ten uses each draw 10^10 rects.
    let mut defs = String::from("<defs><rect id=\"l0\" width=\"1\" height=\"1\"/>");
    for level in 1..=10 {
        defs.push_str(&format!("<g id=\"l{level}\">"));
        for _ in 0..10 {
            defs.push_str(&format!("<use xlink:href=\"#l{}\"/>", level - 1));
        }
        defs.push_str("</g>");
    }
    let laughs = format!("{open}{defs}</defs><use xlink:href=\"#l10\"/></svg>");
    refused(laughs.as_bytes(), "elements once references are expanded");
    // Recursion through `<use>`.
    let cycle = format!("{open}<g id=\"a\"><use href=\"#a\"/></g></svg>");
    refused(cycle.as_bytes(), "references itself");
    // Markers are drawn at every vertex.
    let coords = "1 1 ".repeat(40_000);
    let marker = format!(
        "{open}<defs><marker id=\"m\">{}</marker></defs><path d=\"M0 0 L{coords}\" marker-mid=\"url(#m)\"/></svg>",
        "<rect width=\"1\" height=\"1\"/>".repeat(20)
    );
    refused(marker.as_bytes(), "expanded");
    // An absurd declared size still renders on a bounded canvas.
    let vast = r##"<svg xmlns="http://www.w3.org/2000/svg" width="100000000" height="1" viewBox="0 0 100000000 1"><rect width="100000000" height="1" fill="#0000ff"/></svg>"##;
    let img = image_io::decode_bytes(vast.as_bytes(), Path::new("vast.svg")).unwrap();
    assert!(img.width() <= image_io::SVG_RENDER_SIDE && img.height() <= image_io::SVG_RENDER_SIDE);
}

/// The reference: `c * a + bg * (1 - a)` in f64, rounded to nearest.
fn over_reference(p: Rgba<u8>, bg: [u8; 3]) -> [u8; 3] {
    let a = f64::from(p[3]) / 255.0;
    std::array::from_fn(|c| (f64::from(p[c]) * a + f64::from(bg[c]) * (1.0 - a)).round() as u8)
}

fn save_rgba(img: &RgbaImage, path: &Path) {
    img.save(path).unwrap();
}

#[test]
fn transparent_pixels_take_the_background_on_every_read_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(22);
    // Fully transparent pixels holding garbage colour.
    let garbage = RgbaImage::from_fn(16, 16, |_, _| {
        Rgba([rng.random(), rng.random(), rng.random(), 0])
    });
    let path = dir.path().join("garbage.png");
    save_rgba(&garbage, &path);
    assert!(image_io::decode(&path)
        .unwrap()
        .pixels()
        .all(|p| p.0 == [255, 255, 255]));
    let bg = Background([12, 140, 250]);
    assert!(image_io::decode_over(&path, bg)
        .unwrap()
        .pixels()
        .all(|p| p.0 == bg.0));
    let bytes = std::fs::read(&path).unwrap();
    assert!(image_io::decode_bytes_over(&bytes, &path, bg)
        .unwrap()
        .pixels()
        .all(|p| p.0 == bg.0));

    // Partial alpha on random data, against the f64 reference, through the
    // decoders and through the training / evaluation path (`load_rgb` at
    // the image's own size, so no resampling).
    let random = RgbaImage::from_fn(16, 16, |_, _| {
        Rgba([rng.random(), rng.random(), rng.random(), rng.random()])
    });
    let path = dir.path().join("random.png");
    save_rgba(&random, &path);
    let cfg = ImageConfig {
        size: 16,
        background: bg,
        ..ImageConfig::default()
    };
    let via_config = image_io::load_rgb(&ImageSource::Path(path.clone()), &cfg).unwrap();
    let via_clip = image_io::load_clip_frames(
        &ImageSource::Path(path.clone()),
        1,
        SampleMode::Eval,
        &ImageConfig {
            frames: Some(1),
            ..cfg.clone()
        },
    )
    .unwrap();
    for background in [Background::WHITE, bg, Background([0, 0, 0])] {
        let got = image_io::decode_over(&path, background).unwrap();
        for (x, y, p) in random.enumerate_pixels() {
            assert_eq!(
                got.get_pixel(x, y).0,
                over_reference(*p, background.0),
                "({x}, {y})"
            );
        }
    }
    for (x, y, p) in random.enumerate_pixels() {
        assert_eq!(via_config.get_pixel(x, y).0, over_reference(*p, bg.0));
        assert_eq!(via_clip[0].get_pixel(x, y).0, over_reference(*p, bg.0));
    }

    // A transparent SVG is drawn over the configured colour too.
    let svg = dir.path().join("empty.svg");
    std::fs::write(
        &svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 4 4"/>"#,
    )
    .unwrap();
    let img = image_io::load_rgb(&ImageSource::Path(svg), &cfg).unwrap();
    assert!(img.pixels().all(|p| p.0 == bg.0));
}

#[test]
fn transparent_video_frames_take_the_configured_background() {
    use image::codecs::gif::GifEncoder;
    use image::{Delay, Frame};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clear.gif");
    {
        let mut enc = GifEncoder::new(std::fs::File::create(&path).unwrap());
        for k in 0..3u8 {
            // Left half transparent (over garbage colour), right half opaque.
            let f = RgbaImage::from_fn(8, 8, |x, _| {
                if x < 4 {
                    Rgba([200, 10 * k, 90, 0])
                } else {
                    Rgba([0, 60 * k, 0, 255])
                }
            });
            enc.encode_frame(Frame::from_parts(
                f,
                0,
                0,
                Delay::from_numer_denom_ms(40, 1),
            ))
            .unwrap();
        }
    }
    let bg = Background([30, 40, 220]);
    let cfg = ImageConfig {
        size: 8,
        frames: Some(3),
        background: bg,
        ..ImageConfig::default()
    };
    let frames =
        image_io::load_clip_frames(&ImageSource::Video(path), 3, SampleMode::Eval, &cfg).unwrap();
    for f in &frames {
        assert_eq!(f.get_pixel(0, 4).0, bg.0);
        assert_eq!(f.get_pixel(1, 1).0, bg.0);
    }
}

#[test]
fn the_background_is_configured_as_hex_or_rgb_and_validated() {
    let hex: ImageConfig = serde_json::from_str(r##"{"background": "#0c8cFA"}"##).unwrap();
    let rgb: ImageConfig = serde_json::from_str(r#"{"background": [12, 140, 250]}"#).unwrap();
    assert_eq!(hex.background, Background([12, 140, 250]));
    assert_eq!(hex, rgb);
    assert_eq!(ImageConfig::default().background, Background::WHITE);
    // Written as hex, and not at all when white.
    assert!(serde_json::to_string(&hex)
        .unwrap()
        .contains(r##""background":"#0c8cfa""##));
    assert!(!serde_json::to_string(&ImageConfig::default())
        .unwrap()
        .contains("background"));
    let back: ImageConfig = serde_json::from_str(&serde_json::to_string(&hex).unwrap()).unwrap();
    assert_eq!(back, hex);
    for bad in [
        r##"{"background": "#12345"}"##,
        r##"{"background": "white"}"##,
        r##"{"background": "#gg0000"}"##,
        r#"{"background": [256, 0, 0]}"#,
        r#"{"background": [1, 2]}"#,
        r#"{"background": [1, 2, 3, 4]}"#,
        r#"{"background": [-1, 0, 0]}"#,
    ] {
        assert!(
            serde_json::from_str::<ImageConfig>(bad).is_err(),
            "{bad} was accepted"
        );
    }
}
