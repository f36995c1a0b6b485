//! How are clips written back out as animated images?
//!
//! Animated GIF (the `image` crate's encoder) and animated lossless WebP. The
//! `image` crate writes still WebP only, so an animation is assembled here
//! from still encodings: each frame's `VP8L` chunk is wrapped in an `ANMF`
//! chunk under a `VP8X` header with the animation flag (the container layout
//! of Google's "WebP Container Specification"). Used to export the synthetic
//! set and to build test and benchmark inputs.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use image::codecs::gif::{GifEncoder, Repeat};
use image::codecs::webp::WebPEncoder;
use image::{Delay, Frame, RgbImage};

use super::error::{io_err, Error, Result};

fn encode_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Decode {
        path: path.to_path_buf(),
        message: format!("cannot encode: {e}"),
    }
}

/// Writes `frames` as a looping animated GIF, `delay_ms` per frame.
pub fn write_gif(path: &Path, frames: &[RgbImage], delay_ms: u32) -> Result<()> {
    let file = BufWriter::new(File::create(path).map_err(io_err(path))?);
    let mut enc = GifEncoder::new_with_speed(file, 10);
    enc.set_repeat(Repeat::Infinite)
        .map_err(|e| encode_err(path, e))?;
    for f in frames {
        let rgba = image::DynamicImage::ImageRgb8(f.clone()).to_rgba8();
        let frame = Frame::from_parts(rgba, 0, 0, Delay::from_numer_denom_ms(delay_ms, 1));
        enc.encode_frame(frame).map_err(|e| encode_err(path, e))?;
    }
    Ok(())
}

fn put_u24(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes()[..3]);
}

fn chunk(out: &mut Vec<u8>, fourcc: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(fourcc);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    if data.len() % 2 == 1 {
        out.push(0);
    }
}

/// The `VP8L` chunk (header and payload) of a still lossless encoding.
fn vp8l_chunk(path: &Path, frame: &RgbImage) -> Result<Vec<u8>> {
    let mut still = Vec::new();
    WebPEncoder::new_lossless(&mut still)
        .encode(
            frame.as_raw(),
            frame.width(),
            frame.height(),
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| encode_err(path, e))?;
    // A still lossless WebP is exactly RIFF header (12 bytes) + one VP8L chunk.
    match still.get(12..16) {
        Some(b"VP8L") => Ok(still[12..].to_vec()),
        _ => Err(encode_err(
            path,
            "the still encoder did not produce a VP8L chunk",
        )),
    }
}

/// Writes `frames` (all the same size) as a looping animated lossless WebP.
pub fn write_webp(path: &Path, frames: &[RgbImage], delay_ms: u32) -> Result<()> {
    let Some(first) = frames.first() else {
        return Err(encode_err(path, "no frames"));
    };
    let (w, h) = first.dimensions();
    if frames.iter().any(|f| f.dimensions() != (w, h)) || w == 0 || h == 0 {
        return Err(encode_err(path, "frames differ in size"));
    }
    let mut body = Vec::new();
    let mut vp8x = vec![0x02u8, 0, 0, 0]; // animation flag, no alpha
    put_u24(&mut vp8x, w - 1);
    put_u24(&mut vp8x, h - 1);
    chunk(&mut body, b"VP8X", &vp8x);
    // Background colour (BGRA) white, loop forever.
    chunk(&mut body, b"ANIM", &[255, 255, 255, 255, 0, 0]);
    for f in frames {
        let mut anmf = Vec::new();
        put_u24(&mut anmf, 0); // x / 2
        put_u24(&mut anmf, 0); // y / 2
        put_u24(&mut anmf, w - 1);
        put_u24(&mut anmf, h - 1);
        put_u24(&mut anmf, delay_ms.min(0xff_ffff));
        // Do not blend (bit 1), do not dispose: each frame replaces the canvas.
        anmf.push(0x02);
        anmf.extend_from_slice(&vp8l_chunk(path, f)?);
        chunk(&mut body, b"ANMF", &anmf);
    }
    let mut file = BufWriter::new(File::create(path).map_err(io_err(path))?);
    let riff_len = (body.len() + 4) as u32;
    file.write_all(b"RIFF")
        .and_then(|_| file.write_all(&riff_len.to_le_bytes()))
        .and_then(|_| file.write_all(b"WEBP"))
        .and_then(|_| file.write_all(&body))
        .and_then(|_| file.flush())
        .map_err(io_err(path))
}
