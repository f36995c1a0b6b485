//! How does a file or a scene become the model's input tensor?
//!
//! Decoding (PNG, JPEG, WebP, GIF first frame by content; SVG by extension,
//! rendered with resvg), compositing of transparent pixels over the
//! configured background, resize of the shorter side + centre crop, and
//! per-channel normalisation to CHW f32.
//!
//! # SVG is untrusted input
//! SVGs come from users (queries, galleries, manifests), so rendering one
//! must never reach the file system or the network, and must stay bounded:
//! - no external resources: `<image href>` (and `<feImage>`) naming a path
//!   or a URL resolves to nothing; `data:` URIs are decoded only for PNG,
//!   JPEG, GIF and WebP whose header says at most [`MAX_EMBEDDED_SIDE`]
//!   pixels a side, at most [`MAX_EMBEDDED_IMAGES`] per document; an
//!   embedded SVG is refused (it would be a second, unbounded document);
//! - a size budget: files above [`MAX_SVG_BYTES`] and gzip-compressed SVG
//!   (whose inflated size the header does not tell) are refused before
//!   parsing;
//! - a node budget: at most [`MAX_SVG_ELEMENTS`] elements in the file,
//!   nesting at most [`MAX_SVG_DEPTH`] deep, and at most
//!   [`MAX_SVG_EXPANDED`] elements once every `<use>` and every `url(#id)`
//!   reference (paint servers, clips, masks, filters, markers; markers
//!   charged once per coordinate of the path that carries them) is counted
//!   at each place it is drawn; a recursive reference is refused;
//! - a render budget: the canvas is [`SVG_RENDER_SIDE`] pixels on its
//!   longer side whatever the declared size or `viewBox`.
//!
//! No wall-clock timeout is enforced (a render cannot be interrupted); the
//! budgets above bound the work instead.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use image::{imageops::FilterType, RgbImage, RgbaImage};
use resvg::usvg::roxmltree;
use serde::{Deserialize, Serialize};

use crate::video::synthetic::{render_clip, SyntheticVideoConfig};
use crate::video::{
    count_frames, decode_frames, decode_sampled, sample_indices, DecodeOptions, SampleMode,
};
use crate::{synthetic, Error, ImageSource, Result};

/// SVG files larger than this are refused before parsing.
pub const MAX_SVG_BYTES: u64 = 4 << 20;
/// Most elements an SVG file may hold.
pub const MAX_SVG_ELEMENTS: usize = 50_000;
/// Deepest element nesting, `<use>` indirections included (the renderer
/// recurses on it).
pub const MAX_SVG_DEPTH: usize = 128;
/// Most elements an SVG may draw once references are expanded.
pub const MAX_SVG_EXPANDED: u64 = 200_000;
/// Pixels on the longer side of the canvas an SVG is rendered on.
pub const SVG_RENDER_SIDE: u32 = 256;
/// Largest side of a raster image embedded in an SVG as a `data:` URI.
pub const MAX_EMBEDDED_SIDE: u32 = 1024;
/// Most raster images an SVG may embed.
pub const MAX_EMBEDDED_IMAGES: usize = 8;

/// Input size and normalisation of the image tower.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageConfig {
    pub size: usize,
    /// Per-channel mean and std applied to values in [0, 1]. The default
    /// 0.5 / 0.5 maps pixels to [-1, 1].
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// `Some(n)`: the model takes videos, `n` frames sampled per clip (TSN
    /// segments: random in training, centred in evaluation), and a still
    /// image becomes a clip of `n` copies of itself. `None`: single images.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frames: Option<usize>,
    /// Which frames of a video fill the `frames` slots: TSN segments (the
    /// default) or the first frame only, the single-frame baseline.
    #[serde(skip_serializing_if = "FrameSampling::is_tsn")]
    pub frame_sampling: FrameSampling,
    /// The opaque colour transparent pixels are composited over, in every
    /// image and video frame read (`"#rrggbb"` or `[r, g, b]`; white by
    /// default, which is not written out).
    #[serde(skip_serializing_if = "Background::is_white")]
    pub background: Background,
}

/// An opaque RGB colour that images with an alpha channel are composited
/// over (`data.image.background`).
///
/// Written as `"#rrggbb"`; read from `"#rrggbb"` or `[r, g, b]` with
/// components in 0..=255, anything else being an error at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Background(pub [u8; 3]);

impl Background {
    pub const WHITE: Background = Background([255, 255, 255]);

    fn is_white(&self) -> bool {
        *self == Self::WHITE
    }

    /// Parses `#rrggbb`.
    pub fn parse_hex(s: &str) -> std::result::Result<Self, String> {
        let hex = s
            .strip_prefix('#')
            .filter(|h| h.len() == 6 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| format!("background `{s}` is not a colour of the form #rrggbb"))?;
        let mut rgb = [0u8; 3];
        for (c, v) in rgb.iter_mut().enumerate() {
            *v = u8::from_str_radix(&hex[2 * c..2 * c + 2], 16)
                .map_err(|e| format!("background `{s}`: {e}"))?;
        }
        Ok(Self(rgb))
    }
}

impl Default for Background {
    fn default() -> Self {
        Self::WHITE
    }
}

impl std::fmt::Display for Background {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [r, g, b] = self.0;
        write!(f, "#{r:02x}{g:02x}{b:02x}")
    }
}

impl Serialize for Background {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Background {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Background;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a colour \"#rrggbb\" or [r, g, b] with components in 0..=255")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> std::result::Result<Background, E> {
                Background::parse_hex(s).map_err(E::custom)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Background, A::Error> {
                let mut rgb = [0u8; 3];
                for (i, v) in rgb.iter_mut().enumerate() {
                    *v = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    return Err(serde::de::Error::invalid_length(4, &self));
                }
                Ok(Background(rgb))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// How the frames of a clip are chosen (`data.image.frame_sampling`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameSampling {
    /// `"tsn"`: one frame per equal segment, random in training and the
    /// centre one in evaluation ([`crate::video::sample_indices`]).
    #[default]
    Tsn,
    /// `"first"`: the video's first frame, in training and in evaluation,
    /// in every slot. With `frames = 1` the model sees one still frame: the
    /// single-frame baseline a temporal model has to beat.
    First,
}

impl FrameSampling {
    fn is_tsn(&self) -> bool {
        *self == FrameSampling::Tsn
    }
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            size: 64,
            mean: [0.5; 3],
            std: [0.5; 3],
            frames: None,
            frame_sampling: FrameSampling::Tsn,
            background: Background::WHITE,
        }
    }
}

/// Composites RGBA over an opaque background: `c * a + bg * (255 - a)`,
/// divided by 255 and rounded to nearest.
pub fn composite(img: &RgbaImage, background: Background) -> RgbImage {
    let (w, h) = img.dimensions();
    let mut out = RgbImage::new(w, h);
    for (o, p) in out.pixels_mut().zip(img.pixels()) {
        let a = u32::from(p[3]);
        for c in 0..3 {
            let bg = u32::from(background.0[c]);
            o[c] = ((u32::from(p[c]) * a + bg * (255 - a) + 127) / 255) as u8;
        }
    }
    out
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn is_svg(bytes: &[u8], origin: &Path) -> bool {
    origin
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("svg") || e.eq_ignore_ascii_case("svgz"))
        || bytes.trim_ascii_start().starts_with(b"<svg")
        || bytes.trim_ascii_start().starts_with(b"<?xml")
}

/// Reads an image file: only a regular file (a FIFO or a device would block
/// or never end), and an SVG no larger than [`MAX_SVG_BYTES`], checked
/// before its bytes are read.
fn read_image_file(path: &Path) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(Error::Image {
            path: path.to_path_buf(),
            message: "not a regular file".into(),
        });
    }
    if is_svg(b"", path) {
        if meta.len() > MAX_SVG_BYTES {
            return Err(svg_too_large(path, meta.len()));
        }
        // The file may grow between the check and the read.
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .map_err(io_err(path))?
            .take(MAX_SVG_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err(path))?;
        return Ok(bytes);
    }
    std::fs::read(path).map_err(io_err(path))
}

fn svg_too_large(path: &Path, len: u64) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        message: format!("SVG refused: {len} bytes, above the limit of {MAX_SVG_BYTES}"),
    }
}

/// Decodes an image file over white, naming it in any error.
pub fn decode(path: &Path) -> Result<RgbImage> {
    decode_over(path, Background::WHITE)
}

/// Decodes an image file, compositing transparent pixels over `background`.
pub fn decode_over(path: &Path, background: Background) -> Result<RgbImage> {
    decode_bytes_over(&read_image_file(path)?, path, background)
}

/// Decodes image bytes over white; `origin` names them in errors.
pub fn decode_bytes(bytes: &[u8], origin: &Path) -> Result<RgbImage> {
    decode_bytes_over(bytes, origin, Background::WHITE)
}

/// Decodes image bytes, compositing transparent pixels over `background`;
/// `origin` names them in errors.
pub fn decode_bytes_over(bytes: &[u8], origin: &Path, background: Background) -> Result<RgbImage> {
    if is_svg(bytes, origin) {
        return render_svg(bytes, origin, background);
    }
    let img = image::load_from_memory(bytes).map_err(|e| Error::Image {
        path: origin.to_path_buf(),
        message: e.to_string(),
    })?;
    // The colour of a transparent pixel is arbitrary (often black, sometimes
    // garbage left by the encoder), so an alpha channel is always applied.
    Ok(if img.color().has_alpha() {
        composite(&img.to_rgba8(), background)
    } else {
        img.to_rgb8()
    })
}

/// Checks that an image file can be read without decoding its pixels: a
/// raster file's header and dimensions, an SVG's budgets and structure.
/// Returns the width and height (an SVG's declared size, rounded up).
pub fn probe(path: &Path) -> Result<(u32, u32)> {
    if is_svg(b"", path) {
        let bytes = read_image_file(path)?;
        let tree = parse_svg(&bytes, path, &AtomicUsize::new(0))?;
        let size = tree.size();
        return Ok((size.width().ceil() as u32, size.height().ceil() as u32));
    }
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(Error::Image {
            path: path.to_path_buf(),
            message: "not a regular file".into(),
        });
    }
    let reader = image::ImageReader::open(path)
        .map_err(io_err(path))?
        .with_guessed_format()
        .map_err(io_err(path))?;
    if reader.format().is_none() {
        // Content that is no known raster format may still be an SVG
        // without the extension.
        let mut head = [0u8; 256];
        let n = std::fs::File::open(path)
            .and_then(|mut f| f.read(&mut head))
            .map_err(io_err(path))?;
        if is_svg(&head[..n], Path::new("")) {
            if meta.len() > MAX_SVG_BYTES {
                return Err(svg_too_large(path, meta.len()));
            }
            let bytes = std::fs::read(path).map_err(io_err(path))?;
            let tree = parse_svg(&bytes, path, &AtomicUsize::new(0))?;
            let size = tree.size();
            return Ok((size.width().ceil() as u32, size.height().ceil() as u32));
        }
    }
    reader.into_dimensions().map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The `href` of an element, plain or `xlink:`.
fn href<'a>(node: &roxmltree::Node<'a, '_>) -> Option<&'a str> {
    node.attribute("href")
        .or_else(|| node.attribute(("http://www.w3.org/1999/xlink", "href")))
}

/// The ids named by `url(#id)` in a property value.
fn url_refs(value: &str) -> impl Iterator<Item = &str> {
    value.split("url(").skip(1).filter_map(|rest| {
        let rest = rest.trim_start().trim_start_matches(['"', '\'']);
        let id = rest.strip_prefix('#')?;
        let end = id.find([')', '"', '\'']).unwrap_or(id.len());
        Some(id[..end].trim())
    })
}

/// An upper bound on the vertices of a shape: the numbers in its geometry.
fn coordinate_count(node: &roxmltree::Node<'_, '_>) -> u64 {
    let geometry = node.attribute("d").or_else(|| node.attribute("points"));
    geometry.map_or(4, |g| {
        g.split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|t| !t.is_empty())
            .count() as u64
            + 1
    })
}

/// Counts what an SVG document draws once references are expanded, refusing
/// it above the node budget (see the module doc).
struct SvgBudget<'a, 'input> {
    ids: std::collections::HashMap<&'a str, roxmltree::Node<'a, 'input>>,
    /// `url(#id)` references of `<style>` sheets, which a selector may apply
    /// to any element, so each element is charged for them.
    css_refs: Vec<roxmltree::Node<'a, 'input>>,
    /// Per element: (expanded element count, height below it).
    memo: std::collections::HashMap<roxmltree::NodeId, (u64, usize)>,
    active: std::collections::HashSet<roxmltree::NodeId>,
}

impl<'a, 'input> SvgBudget<'a, 'input> {
    fn new(doc: &'a roxmltree::Document<'input>) -> std::result::Result<Self, String> {
        let mut ids = std::collections::HashMap::new();
        let mut elements = 0usize;
        let mut css = String::new();
        for node in doc.descendants().filter(|n| n.is_element()) {
            elements += 1;
            if let Some(id) = node.attribute("id") {
                ids.entry(id).or_insert(node);
            }
            if node.tag_name().name() == "style" {
                css.extend(node.children().filter_map(|c| c.text()));
            }
        }
        if elements > MAX_SVG_ELEMENTS {
            return Err(format!(
                "{elements} elements, above the limit of {MAX_SVG_ELEMENTS}"
            ));
        }
        let css_refs = url_refs(&css)
            .filter_map(|id| ids.get(id).copied())
            .collect();
        Ok(Self {
            ids,
            css_refs,
            memo: Default::default(),
            active: Default::default(),
        })
    }

    /// The expanded element count of `node`'s subtree and the height below
    /// it, checked against the budget at `depth`.
    fn expand(
        &mut self,
        node: roxmltree::Node<'a, 'input>,
        depth: usize,
    ) -> std::result::Result<(u64, usize), String> {
        let too_deep = || {
            format!("elements nest deeper than {MAX_SVG_DEPTH} (with <use> and url() references)")
        };
        if depth > MAX_SVG_DEPTH {
            return Err(too_deep());
        }
        if let Some(&(cost, height)) = self.memo.get(&node.id()) {
            if depth + height > MAX_SVG_DEPTH {
                return Err(too_deep());
            }
            return Ok((cost, height));
        }
        if !self.active.insert(node.id()) {
            return Err(format!(
                "element `{}` references itself",
                node.attribute("id").unwrap_or("?")
            ));
        }
        let mut cost = 1u64;
        let mut height = 0usize;
        let mut add = |this: &mut Self, target, times: u64| -> std::result::Result<(), String> {
            let (c, h) = this.expand(target, depth + 1)?;
            cost = cost.saturating_add(c.saturating_mul(times));
            height = height.max(h + 1);
            if cost > MAX_SVG_EXPANDED {
                return Err(format!(
                    "it draws more than {MAX_SVG_EXPANDED} elements once references are expanded"
                ));
            }
            Ok(())
        };
        for child in node.children().filter(|c| c.is_element()) {
            add(self, child, 1)?;
        }
        if node.tag_name().name() == "use" {
            if let Some(target) = href(&node)
                .and_then(|h| h.strip_prefix('#'))
                .and_then(|id| self.ids.get(id).copied())
            {
                add(self, target, 1)?;
            }
        }
        let vertices = coordinate_count(&node);
        let mut refs: Vec<(roxmltree::Node<'a, 'input>, u64)> = Vec::new();
        for attr in node.attributes() {
            // Markers are drawn at every vertex; other references once.
            let times = if attr.name().starts_with("marker") || attr.name() == "style" {
                vertices
            } else {
                1
            };
            for id in url_refs(attr.value()) {
                if let Some(&target) = self.ids.get(id) {
                    refs.push((target, times));
                }
            }
        }
        if node.tag_name().name() != "style" {
            refs.extend(self.css_refs.iter().map(|&t| (t, vertices)));
        }
        for (target, times) in refs {
            add(self, target, times)?;
        }
        self.active.remove(&node.id());
        self.memo.insert(node.id(), (cost, height));
        Ok((cost, height))
    }
}

/// Parses an SVG under the budgets of the module doc, with no access to
/// files or the network; `embedded` counts the raster images it embeds.
fn parse_svg(bytes: &[u8], origin: &Path, embedded: &AtomicUsize) -> Result<resvg::usvg::Tree> {
    use resvg::usvg;
    let refuse = |message: String| Error::Image {
        path: origin.to_path_buf(),
        message: format!("SVG refused: {message}"),
    };
    if bytes.len() as u64 > MAX_SVG_BYTES {
        return Err(svg_too_large(origin, bytes.len() as u64));
    }
    if bytes.starts_with(&[0x1f, 0x8b]) {
        return Err(refuse(
            "gzip-compressed SVG (svgz) is not accepted; send it uncompressed".into(),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| Error::Image {
        path: origin.to_path_buf(),
        message: format!("SVG is not UTF-8: {e}"),
    })?;
    let doc = roxmltree::Document::parse_with_options(
        text,
        roxmltree::ParsingOptions {
            allow_dtd: true,
            // Elements, attributes and text: a generous multiple of the
            // element budget, so that the parser itself stays bounded.
            nodes_limit: (MAX_SVG_ELEMENTS * 8) as u32,
            ..Default::default()
        },
    )
    .map_err(|e| Error::Image {
        path: origin.to_path_buf(),
        message: e.to_string(),
    })?;
    SvgBudget::new(&doc)
        .and_then(|mut b| b.expand(doc.root_element(), 0).map(drop))
        .map_err(refuse)?;
    let opts = usvg::Options {
        resources_dir: None,
        image_href_resolver: usvg::ImageHrefResolver {
            resolve_data: Box::new(move |_mime, data, _opts| embedded_raster(data, embedded)),
            // A path or URL must never be opened.
            resolve_string: Box::new(|_href, _opts| None),
        },
        ..usvg::Options::default()
    };
    usvg::Tree::from_xmltree(&doc, &opts).map_err(|e| Error::Image {
        path: origin.to_path_buf(),
        message: e.to_string(),
    })
}

/// A `data:` image an SVG embeds, if it is a raster within the budgets.
fn embedded_raster(
    data: std::sync::Arc<Vec<u8>>,
    embedded: &AtomicUsize,
) -> Option<resvg::usvg::ImageKind> {
    use resvg::usvg::ImageKind;
    let reader = image::ImageReader::new(std::io::Cursor::new(data.as_slice()))
        .with_guessed_format()
        .ok()?;
    let format = reader.format()?;
    let (w, h) = reader.into_dimensions().ok()?;
    if w > MAX_EMBEDDED_SIDE || h > MAX_EMBEDDED_SIDE {
        return None;
    }
    if embedded.fetch_add(1, Ordering::Relaxed) >= MAX_EMBEDDED_IMAGES {
        return None;
    }
    match format {
        image::ImageFormat::Png => Some(ImageKind::PNG(data)),
        image::ImageFormat::Jpeg => Some(ImageKind::JPEG(data)),
        image::ImageFormat::Gif => Some(ImageKind::GIF(data)),
        image::ImageFormat::WebP => Some(ImageKind::WEBP(data)),
        _ => None,
    }
}

fn render_svg(bytes: &[u8], origin: &Path, background: Background) -> Result<RgbImage> {
    use resvg::tiny_skia;
    let err = |message: String| Error::Image {
        path: origin.to_path_buf(),
        message,
    };
    let tree = parse_svg(bytes, origin, &AtomicUsize::new(0))?;
    // Render at a fixed size on the longer side, whatever the document
    // declares; the transform resizes afterwards.
    let size = tree.size();
    let scale = SVG_RENDER_SIDE as f32 / size.width().max(size.height()).max(1.0);
    let (w, h) = (
        ((size.width() * scale).ceil() as u32).clamp(1, SVG_RENDER_SIDE),
        ((size.height() * scale).ceil() as u32).clamp(1, SVG_RENDER_SIDE),
    );
    let mut pixmap = tiny_skia::Pixmap::new(w, h).ok_or_else(|| err("empty SVG canvas".into()))?;
    let [r, g, b] = background.0;
    pixmap.fill(tiny_skia::Color::from_rgba8(r, g, b, 255));
    resvg::render(
        &tree,
        tiny_skia::Transform::from_scale(scale, scale),
        &mut pixmap.as_mut(),
    );
    // Premultiplied RGBA over an opaque background is already opaque RGB.
    let rgb: Vec<u8> = pixmap
        .data()
        .chunks_exact(4)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    RgbImage::from_raw(w, h, rgb).ok_or_else(|| err("bad SVG raster".into()))
}

/// Resizes the shorter side to `size` and crops the centre square.
pub fn resize_center_crop(img: &RgbImage, size: usize) -> RgbImage {
    let (w, h) = img.dimensions();
    let size = size as u32;
    if w == size && h == size {
        return img.clone();
    }
    let scale = size as f32 / w.min(h).max(1) as f32;
    let (nw, nh) = (
        ((w as f32 * scale).round() as u32).max(size),
        ((h as f32 * scale).round() as u32).max(size),
    );
    let resized = image::imageops::resize(img, nw, nh, FilterType::Triangle);
    image::imageops::crop_imm(&resized, (nw - size) / 2, (nh - size) / 2, size, size).to_image()
}

/// Inception-style random resized crop: a random area fraction in `scale` and
/// aspect ratio in [3/4, 4/3] of the image, resized to `size` x `size`.
pub fn random_resized_crop<R: rand::Rng>(
    img: &RgbImage,
    size: usize,
    scale: (f32, f32),
    rng: &mut R,
) -> RgbImage {
    let (w, h) = img.dimensions();
    let area = (w * h) as f32;
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let ratio = rng.random_range((0.75f32).ln()..=(4.0f32 / 3.0).ln()).exp();
        let cw = (target * ratio).sqrt().round() as u32;
        let ch = (target / ratio).sqrt().round() as u32;
        if cw >= 1 && ch >= 1 && cw <= w && ch <= h {
            let x = rng.random_range(0..=w - cw);
            let y = rng.random_range(0..=h - ch);
            let crop = image::imageops::crop_imm(img, x, y, cw, ch).to_image();
            return image::imageops::resize(&crop, size as u32, size as u32, FilterType::Triangle);
        }
    }
    resize_center_crop(img, size)
}

/// Normalised CHW f32 values of an RGB image.
pub fn to_chw(img: &RgbImage, cfg: &ImageConfig) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let n = (w * h) as usize;
    let mut out = vec![0f32; 3 * n];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * n + i] = (f32::from(p[c]) / 255.0 - cfg.mean[c]) / cfg.std[c];
        }
    }
    out
}

/// The RGB image of a source at the configured size; a video gives its
/// centre frame.
pub fn load_rgb(source: &ImageSource, cfg: &ImageConfig) -> Result<RgbImage> {
    match source {
        ImageSource::Path(p) => Ok(resize_center_crop(
            &decode_over(p, cfg.background)?,
            cfg.size,
        )),
        ImageSource::Video(_) | ImageSource::SyntheticClip { .. } => {
            let mut frames = load_clip_frames(source, 1, SampleMode::Eval, cfg)?;
            Ok(frames.remove(0))
        }
        ImageSource::Synthetic { scene, seed } => {
            let r = synthetic::render(scene, cfg.size, *seed);
            Ok(RgbImage::from_raw(r.width as u32, r.height as u32, r.data)
                .unwrap_or_else(|| RgbImage::new(cfg.size as u32, cfg.size as u32)))
        }
    }
}

/// The model input of a source in evaluation: `[3, size, size]` values, CHW
/// order, or `[frames, 3, size, size]` (centre frames) when the config has
/// [`ImageConfig::frames`].
pub fn load_pixels(source: &ImageSource, cfg: &ImageConfig) -> Result<Vec<f32>> {
    match cfg.frames {
        Some(n) => load_clip(source, n, SampleMode::Eval, cfg),
        None => Ok(to_chw(&load_rgb(source, cfg)?, cfg)),
    }
}

/// `n` frames of a source sampled with `mode` (or the first frame, under
/// [`FrameSampling::First`]), fitted to the configured size. Only the
/// sampled frames of a video file are decoded; a still image is repeated `n`
/// times.
pub fn load_clip_frames(
    source: &ImageSource,
    n: usize,
    mode: SampleMode,
    cfg: &ImageConfig,
) -> Result<Vec<RgbImage>> {
    if n == 0 {
        return Err(Error::Config("a clip needs at least one frame".into()));
    }
    let first = cfg.frame_sampling == FrameSampling::First;
    // Transparent frames (GIF, WebP) take the configured background.
    let opts = DecodeOptions {
        background: cfg.background.0,
        ..DecodeOptions::square(cfg.size as u32)
    };
    match source {
        ImageSource::Video(path) if first => {
            // Counted first so that an empty video is named as such.
            count_frames(path, &opts)?;
            Ok(decode_frames(path, &vec![0; n], &opts)?)
        }
        ImageSource::Video(path) => Ok(decode_sampled(path, n, mode, &opts)?.frames),
        ImageSource::SyntheticClip { clip, set } => {
            // Drawn at the model's size, so no frame is resampled.
            let set = SyntheticVideoConfig {
                size: cfg.size as u32,
                ..set.clone()
            };
            let frames = render_clip(&set, clip);
            if frames.is_empty() {
                return Err(Error::Config(format!(
                    "synthetic clip `{}` has no frames",
                    clip.id
                )));
            }
            let indices = if first {
                vec![0; n]
            } else {
                sample_indices(frames.len(), n, mode)
            };
            Ok(indices
                .into_iter()
                .map(|i| resize_center_crop(&frames[i], cfg.size))
                .collect())
        }
        ImageSource::Path(_) | ImageSource::Synthetic { .. } => Ok(vec![load_rgb(source, cfg)?; n]),
    }
}

/// The model input of [`load_clip_frames`]: `[n, 3, size, size]` values.
pub fn load_clip(
    source: &ImageSource,
    n: usize,
    mode: SampleMode,
    cfg: &ImageConfig,
) -> Result<Vec<f32>> {
    Ok(load_clip_frames(source, n, mode, cfg)?
        .iter()
        .flat_map(|f| to_chw(f, cfg))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_png_and_svg_and_names_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("a.png");
        let mut img = RgbImage::new(40, 20);
        img.put_pixel(20, 10, image::Rgb([255, 0, 0]));
        img.save(&png).unwrap();
        let back = decode(&png).unwrap();
        assert_eq!(back.dimensions(), (40, 20));
        assert_eq!(resize_center_crop(&back, 16).dimensions(), (16, 16));

        let svg = dir.path().join("b.svg");
        std::fs::write(
            &svg,
            r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 10"><rect width="10" height="10" fill="#0000ff"/></svg>"##,
        )
        .unwrap();
        let s = decode(&svg).unwrap();
        assert_eq!(s.get_pixel(5, 5).0, [0, 0, 255]);

        let bad = dir.path().join("c.jpg");
        std::fs::write(&bad, b"not an image").unwrap();
        let e = decode(&bad).unwrap_err().to_string();
        assert!(e.contains("c.jpg"), "{e}");
        let e = decode(&dir.path().join("missing.png"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.png"), "{e}");
    }

    #[test]
    fn random_resized_crop_is_seeded_and_sized() {
        use rand::SeedableRng;
        let mut img = RgbImage::new(50, 30);
        for (x, y, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb([x as u8 * 5, y as u8 * 8, 7]);
        }
        let a = random_resized_crop(
            &img,
            16,
            (0.3, 1.0),
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(4),
        );
        let b = random_resized_crop(
            &img,
            16,
            (0.3, 1.0),
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(4),
        );
        let c = random_resized_crop(
            &img,
            16,
            (0.3, 1.0),
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(5),
        );
        assert_eq!(a.dimensions(), (16, 16));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    /// `frame_sampling = "first"` gives the first frame in every slot, in
    /// training and in evaluation; the default TSN sampling does not.
    #[test]
    fn first_frame_sampling_takes_frame_zero_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clip.webp");
        // Eight frames, frame k a flat grey of level 30 k.
        let frames: Vec<RgbImage> = (0..8u8)
            .map(|k| RgbImage::from_pixel(8, 8, image::Rgb([30 * k; 3])))
            .collect();
        crate::video::encode::write_webp(&path, &frames, 40).unwrap();
        let source = ImageSource::Video(path);
        let first = ImageConfig {
            size: 8,
            frames: Some(3),
            frame_sampling: FrameSampling::First,
            ..ImageConfig::default()
        };
        let level = |f: &RgbImage| f.get_pixel(4, 4).0[0];
        for mode in [
            SampleMode::Eval,
            SampleMode::Train {
                seed: 3,
                epoch: 1,
                index: 5,
            },
        ] {
            let got = load_clip_frames(&source, 3, mode, &first).unwrap();
            assert_eq!(got.iter().map(level).collect::<Vec<_>>(), [0, 0, 0]);
        }
        // TSN's evaluation centres of [0, 2), [2, 5), [5, 8): frames 1, 3, 6.
        let tsn = ImageConfig {
            frame_sampling: FrameSampling::Tsn,
            ..first.clone()
        };
        let got = load_clip_frames(&source, 3, SampleMode::Eval, &tsn).unwrap();
        assert_eq!(got.iter().map(level).collect::<Vec<_>>(), [30, 90, 180]);
        // The model input of one first frame is that frame, normalised.
        let one = ImageConfig {
            frames: Some(1),
            ..first.clone()
        };
        assert_eq!(
            load_pixels(&source, &one).unwrap(),
            to_chw(&frames[0], &one)
        );

        // The config spelling, and TSN as the default that is not written out.
        let parsed: ImageConfig =
            serde_json::from_str(r#"{"frames": 1, "frame_sampling": "first"}"#).unwrap();
        assert_eq!(parsed.frame_sampling, FrameSampling::First);
        let default: ImageConfig = serde_json::from_str(r#"{"frames": 4}"#).unwrap();
        assert_eq!(default.frame_sampling, FrameSampling::Tsn);
        assert!(!serde_json::to_string(&default)
            .unwrap()
            .contains("frame_sampling"));
        assert!(serde_json::from_str::<ImageConfig>(r#"{"frame_sampling": "last"}"#).is_err());
    }

    #[test]
    fn normalisation_maps_to_minus_one_one() {
        let mut img = RgbImage::new(2, 1);
        img.put_pixel(0, 0, image::Rgb([0, 255, 0]));
        img.put_pixel(1, 0, image::Rgb([255, 0, 255]));
        let v = to_chw(&img, &ImageConfig::default());
        assert_eq!(v, vec![-1.0, 1.0, 1.0, -1.0, -1.0, 1.0]);
    }
}
