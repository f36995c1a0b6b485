//! How does a file or a scene become the model's input tensor?
//!
//! Decoding (PNG, JPEG, WebP, GIF first frame by content; SVG by extension,
//! rendered with resvg), resize of the shorter side + centre crop, and
//! per-channel normalisation to CHW f32.

use std::path::Path;

use image::{imageops::FilterType, RgbImage};
use serde::{Deserialize, Serialize};

use crate::video::synthetic::{render_clip, SyntheticVideoConfig};
use crate::video::{
    count_frames, decode_frames, decode_sampled, sample_indices, DecodeOptions, SampleMode,
};
use crate::{synthetic, Error, ImageSource, Result};

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
        }
    }
}

/// Decodes an image file, naming it in any error.
pub fn decode(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_bytes(&bytes, path)
}

/// Decodes image bytes; `origin` names them in errors.
pub fn decode_bytes(bytes: &[u8], origin: &Path) -> Result<RgbImage> {
    let is_svg = origin
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("svg"))
        || bytes.trim_ascii_start().starts_with(b"<svg")
        || bytes.trim_ascii_start().starts_with(b"<?xml");
    if is_svg {
        return render_svg(bytes, origin);
    }
    image::load_from_memory(bytes)
        .map(|img| img.to_rgb8())
        .map_err(|e| Error::Image {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })
}

fn render_svg(bytes: &[u8], origin: &Path) -> Result<RgbImage> {
    use resvg::{tiny_skia, usvg};
    let err = |message: String| Error::Image {
        path: origin.to_path_buf(),
        message,
    };
    let tree =
        usvg::Tree::from_data(bytes, &usvg::Options::default()).map_err(|e| err(e.to_string()))?;
    // Render at 256 px on the longer side; the transform resizes afterwards.
    let size = tree.size();
    let scale = 256.0 / size.width().max(size.height()).max(1.0);
    let (w, h) = (
        ((size.width() * scale).ceil() as u32).max(1),
        ((size.height() * scale).ceil() as u32).max(1),
    );
    let mut pixmap = tiny_skia::Pixmap::new(w, h).ok_or_else(|| err("empty SVG canvas".into()))?;
    pixmap.fill(tiny_skia::Color::WHITE);
    resvg::render(
        &tree,
        tiny_skia::Transform::from_scale(scale, scale),
        &mut pixmap.as_mut(),
    );
    // Premultiplied RGBA over a white background is already opaque RGB.
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
        ImageSource::Path(p) => Ok(resize_center_crop(&decode(p)?, cfg.size)),
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
    match source {
        ImageSource::Video(path) if first => {
            let opts = DecodeOptions::square(cfg.size as u32);
            // Counted first so that an empty video is named as such.
            count_frames(path, &opts)?;
            Ok(decode_frames(path, &vec![0; n], &opts)?)
        }
        ImageSource::Video(path) => {
            let opts = DecodeOptions::square(cfg.size as u32);
            Ok(decode_sampled(path, n, mode, &opts)?.frames)
        }
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
