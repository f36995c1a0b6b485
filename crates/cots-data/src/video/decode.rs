//! How does a video file become the few frames the model sees?
//!
//! Four sources: a folder of frame images (sorted by name, digits compared
//! numerically so `frame_10` follows `frame_9`), animated GIF and animated
//! WebP (the `image` crate's `AnimationDecoder`), and anything ffmpeg reads
//! (MP4, WebM, AVI, MKV, MOV, ...) through the `ffmpeg` program run as a
//! subprocess that pipes raw RGB frames already scaled to the model's size.
//!
//! Memory does not grow with the video's length: the frames are counted
//! first without decoding pixels (GIF blocks and WebP chunks are walked,
//! ffprobe counts packets, a folder is listed), the sampled indices are
//! chosen, and a single decoding pass keeps only the sampled frames. A
//! ten-minute video costs the memory of a ten-second one plus `n` frames.
//!
//! Every frame is fitted to `width x height` the way image pipelines crop:
//! scaled so it covers the target, then centre-cropped. Transparent pixels
//! (GIF, WebP, PNG) are composited over [`DecodeOptions::background`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use candle_core::{Device, Tensor};
use image::codecs::gif::GifDecoder;
use image::codecs::webp::WebPDecoder;
use image::imageops::FilterType;
use image::{AnimationDecoder, RgbImage, RgbaImage};

use super::error::{io_err, Error, Result};
use super::sample::{sample_indices, SampleMode};

/// Extensions read as single frames inside a frame folder.
const FRAME_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// A decoder whose stream ends this close to the counted length is trusted
/// and resampled; further short is treated as truncation. Packet counts and
/// decoded frame counts differ by a few frames in some codecs.
const SHORT_STREAM_TOLERANCE: f64 = 0.9;

/// The kind of source a path is, decided by [`SourceKind::of`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Frames,
    Gif,
    WebP,
    Ffmpeg,
}

impl SourceKind {
    /// A directory is a frame folder; `.gif` and `.webp` are decoded in
    /// process; every other file goes to ffmpeg.
    pub fn of(path: &Path) -> SourceKind {
        if path.is_dir() {
            return SourceKind::Frames;
        }
        match extension(path).as_deref() {
            Some("gif") => SourceKind::Gif,
            Some("webp") => SourceKind::WebP,
            _ => SourceKind::Ffmpeg,
        }
    }
}

fn extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
}

/// Output size and external programs.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeOptions {
    pub width: u32,
    pub height: u32,
    /// RGB that transparent pixels are composited over.
    pub background: [u8; 3],
    pub ffmpeg: PathBuf,
    pub ffprobe: PathBuf,
}

impl DecodeOptions {
    /// Square frames of `size` pixels over white, with `ffmpeg`/`ffprobe` from `PATH`.
    pub fn square(size: u32) -> Self {
        Self {
            width: size,
            height: size,
            background: [255, 255, 255],
            ffmpeg: "ffmpeg".into(),
            ffprobe: "ffprobe".into(),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.width == 0 || self.height == 0 {
            return Err(Error::Config(format!(
                "output size {}x{} must be positive",
                self.width, self.height
            )));
        }
        Ok(())
    }
}

/// The sampled frames of one video.
#[derive(Clone, Debug, PartialEq)]
pub struct Clip {
    /// One fitted frame per sampled index, in sampling order.
    pub frames: Vec<RgbImage>,
    /// The source frame index of each entry of `frames`.
    pub indices: Vec<usize>,
    /// How many frames the source has.
    pub frame_count: usize,
}

impl Clip {
    /// The frames as a tensor with values in `[0, 1]`; normalisation is the
    /// image pipeline's job.
    ///
    /// # Shapes
    /// - output: `[T, 3, H, W]` f32.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let Some(first) = self.frames.first() else {
            return Err(Error::Config("a clip with no frames has no tensor".into()));
        };
        let (w, h) = first.dimensions();
        let mut data = Vec::with_capacity(self.frames.len() * 3 * (w * h) as usize);
        for frame in &self.frames {
            // HWC bytes to CHW floats, one channel plane at a time.
            for c in 0..3 {
                data.extend(frame.pixels().map(|p| p.0[c] as f32 / 255.0));
            }
        }
        Ok(Tensor::from_vec(
            data,
            (self.frames.len(), 3, h as usize, w as usize),
            device,
        )?)
    }
}

/// Counts the frames of a video without decoding its pixels.
pub fn count_frames(path: &Path, opts: &DecodeOptions) -> Result<usize> {
    let n = match SourceKind::of(path) {
        SourceKind::Frames => list_frames(path)?.len(),
        SourceKind::Gif => count_gif_frames(path)?,
        SourceKind::WebP => count_webp_frames(path)?,
        SourceKind::Ffmpeg => count_ffmpeg_frames(path, opts)?,
    };
    if n == 0 {
        return Err(Error::NoFrames {
            path: path.to_path_buf(),
        });
    }
    Ok(n)
}

/// Decodes the frames at `indices` (any order, repeats allowed, each below
/// the frame count) in one pass, fitted to the output size.
pub fn decode_frames(
    path: &Path,
    indices: &[usize],
    opts: &DecodeOptions,
) -> Result<Vec<RgbImage>> {
    opts.validate()?;
    let mut wanted = Wanted::new(indices);
    match SourceKind::of(path) {
        SourceKind::Frames => decode_folder(path, &mut wanted, opts)?,
        SourceKind::Gif => {
            let file = File::open(path).map_err(io_err(path))?;
            let decoder = GifDecoder::new(BufReader::new(file)).map_err(|e| decode_err(path, e))?;
            decode_animation(path, decoder.into_frames(), &mut wanted, opts)?;
        }
        SourceKind::WebP => {
            let file = File::open(path).map_err(io_err(path))?;
            let decoder =
                WebPDecoder::new(BufReader::new(file)).map_err(|e| decode_err(path, e))?;
            decode_animation(path, decoder.into_frames(), &mut wanted, opts)?;
        }
        SourceKind::Ffmpeg => decode_ffmpeg(path, &mut wanted, opts)?,
    }
    wanted.finish(path)
}

/// Counts, samples `n` frames with `mode` and decodes them.
///
/// If a decoder's stream ends early but within 10% of the counted length
/// (packet counts and decoded frames can differ by a few), the frames are
/// resampled from the decoded length and decoded again; shorter streams are
/// an [`Error::Decode`] naming the file.
pub fn decode_sampled(
    path: &Path,
    n: usize,
    mode: SampleMode,
    opts: &DecodeOptions,
) -> Result<Clip> {
    if n == 0 {
        return Err(Error::Config("cannot sample zero frames".into()));
    }
    let frame_count = count_frames(path, opts)?;
    let indices = sample_indices(frame_count, n, mode);
    match decode_frames(path, &indices, opts) {
        Ok(frames) => Ok(Clip {
            frames,
            indices,
            frame_count,
        }),
        Err(Error::ShortStream { decoded, .. })
            if decoded > 0 && decoded as f64 >= SHORT_STREAM_TOLERANCE * frame_count as f64 =>
        {
            let indices = sample_indices(decoded, n, mode);
            let frames = decode_frames(path, &indices, opts)?;
            Ok(Clip {
                frames,
                indices,
                frame_count: decoded,
            })
        }
        Err(Error::ShortStream { decoded, .. }) => Err(Error::Decode {
            path: path.to_path_buf(),
            message: format!(
                "the stream ended after {decoded} frames, {frame_count} were counted (truncated?)"
            ),
        }),
        Err(e) => Err(e),
    }
}

fn decode_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Decode {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// The sampled indices and the slots they fill, so that each source frame is
/// looked at once however often it was sampled.
struct Wanted {
    slots: BTreeMap<usize, Vec<usize>>,
    out: Vec<Option<RgbImage>>,
    /// How many source frames the decoder produced.
    seen: usize,
}

impl Wanted {
    fn new(indices: &[usize]) -> Self {
        let mut slots: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (slot, &i) in indices.iter().enumerate() {
            slots.entry(i).or_default().push(slot);
        }
        Self {
            slots,
            out: vec![None; indices.len()],
            seen: 0,
        }
    }

    fn wants(&self, i: usize) -> bool {
        self.slots.contains_key(&i)
    }

    /// The largest wanted index; decoding may stop after it.
    fn last(&self) -> Option<usize> {
        self.slots.keys().next_back().copied()
    }

    fn done_after(&self, i: usize) -> bool {
        self.last().is_none_or(|last| i >= last)
    }

    fn put(&mut self, i: usize, frame: RgbImage) {
        if let Some(slots) = self.slots.get(&i) {
            if let Some((&last, rest)) = slots.split_last() {
                for &s in rest {
                    self.out[s] = Some(frame.clone());
                }
                self.out[last] = Some(frame);
            }
        }
    }

    fn finish(self, path: &Path) -> Result<Vec<RgbImage>> {
        let decoded = self.seen;
        self.out
            .into_iter()
            .map(|f| {
                f.ok_or_else(|| Error::ShortStream {
                    path: path.to_path_buf(),
                    decoded,
                })
            })
            .collect()
    }
}

/// Composites over `bg`, scales to cover `w x h` and centre-crops.
pub fn fit_rgba(img: &RgbaImage, opts: &DecodeOptions) -> RgbImage {
    let [br, bgc, bb] = opts.background.map(u32::from);
    let rgb = RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let [r, g, b, a] = img.get_pixel(x, y).0.map(u32::from);
        // Integer "over" compositing with rounding: c*a + bg*(255-a), / 255.
        let mix = |c: u32, bgv: u32| ((c * a + bgv * (255 - a) + 127) / 255) as u8;
        image::Rgb([mix(r, br), mix(g, bgc), mix(b, bb)])
    });
    fit_rgb(rgb, opts)
}

/// Scales an RGB frame to cover `w x h` and centre-crops it.
pub fn fit_rgb(img: RgbImage, opts: &DecodeOptions) -> RgbImage {
    let (w, h) = (opts.width, opts.height);
    let (iw, ih) = img.dimensions();
    if (iw, ih) == (w, h) {
        return img;
    }
    let s = (w as f64 / iw.max(1) as f64).max(h as f64 / ih.max(1) as f64);
    let nw = ((iw as f64 * s).ceil() as u32).max(w);
    let nh = ((ih as f64 * s).ceil() as u32).max(h);
    let scaled = image::imageops::resize(&img, nw, nh, FilterType::Triangle);
    image::imageops::crop_imm(&scaled, (nw - w) / 2, (nh - h) / 2, w, h).to_image()
}

fn decode_animation(
    path: &Path,
    frames: image::Frames<'_>,
    wanted: &mut Wanted,
    opts: &DecodeOptions,
) -> Result<()> {
    for (i, frame) in frames.enumerate() {
        // Every frame must be decoded (later frames are composited onto
        // earlier ones), but only the wanted ones are kept.
        let frame = frame.map_err(|e| decode_err(path, format!("frame {i}: {e}")))?;
        wanted.seen = i + 1;
        if wanted.wants(i) {
            wanted.put(i, fit_rgba(frame.buffer(), opts));
        }
        if wanted.done_after(i) {
            break;
        }
    }
    Ok(())
}

/// Natural order: digit runs compare by value, so `f2` < `f10`.
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (&a[..da], &b[..db]);
                let ta = &na[na.iter().take_while(|&&c| c == b'0').count()..];
                let tb = &nb[nb.iter().take_while(|&&c| c == b'0').count()..];
                let ord = ta.len().cmp(&tb.len()).then(ta.cmp(tb)).then(da.cmp(&db));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

/// The frame images of a folder in natural name order (hidden files and
/// other extensions ignored).
pub fn list_frames(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let p = entry.path();
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        let is_frame = extension(&p).is_some_and(|e| FRAME_EXTENSIONS.contains(&e.as_str()));
        if !hidden && is_frame && p.is_file() {
            files.push(p);
        }
    }
    files.sort_by(|a, b| {
        let name = |p: &PathBuf| p.file_name().map(|n| n.to_string_lossy().into_owned());
        natural_cmp(&name(a).unwrap_or_default(), &name(b).unwrap_or_default())
    });
    Ok(files)
}

fn decode_folder(dir: &Path, wanted: &mut Wanted, opts: &DecodeOptions) -> Result<()> {
    let files = list_frames(dir)?;
    wanted.seen = files.len();
    let needed: Vec<usize> = wanted.slots.keys().copied().collect();
    for i in needed {
        let Some(file) = files.get(i) else { break };
        let img = image::ImageReader::open(file)
            .map_err(io_err(file))?
            .with_guessed_format()
            .map_err(io_err(file))?
            .decode()
            .map_err(|e| decode_err(file, e))?;
        wanted.put(i, fit_rgba(&img.to_rgba8(), opts));
    }
    Ok(())
}

/// Reads exactly `n` bytes or reports how the file ended.
fn read_n<R: Read>(r: &mut R, buf: &mut [u8], path: &Path, what: &str) -> Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            decode_err(path, format!("truncated inside {what}"))
        } else {
            Error::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })
}

fn read_u8<R: Read>(r: &mut R, path: &Path, what: &str) -> Result<u8> {
    let mut b = [0u8; 1];
    read_n(r, &mut b, path, what)?;
    Ok(b[0])
}

/// Skips GIF data sub-blocks (length byte, data) up to the zero terminator.
fn skip_sub_blocks<R: BufRead + Seek>(r: &mut R, path: &Path) -> Result<()> {
    loop {
        let n = read_u8(r, path, "a data sub-block")?;
        if n == 0 {
            return Ok(());
        }
        r.seek_relative(i64::from(n)).map_err(io_err(path))?;
    }
}

/// Counts the image descriptors of a GIF by walking its block structure
/// (no LZW decoding). Errors if the file ends before the trailer.
pub fn count_gif_frames(path: &Path) -> Result<usize> {
    let mut r = BufReader::new(File::open(path).map_err(io_err(path))?);
    let mut header = [0u8; 13];
    read_n(&mut r, &mut header, path, "the GIF header")?;
    if &header[..3] != b"GIF" {
        return Err(decode_err(path, "not a GIF file (bad signature)"));
    }
    let table = |packed: u8| -> i64 {
        if packed & 0x80 != 0 {
            3 * (1i64 << ((packed & 7) + 1))
        } else {
            0
        }
    };
    r.seek_relative(table(header[10])).map_err(io_err(path))?;
    let mut frames = 0;
    loop {
        match read_u8(&mut r, path, "the block list (no trailer)")? {
            0x21 => {
                read_u8(&mut r, path, "an extension label")?;
                skip_sub_blocks(&mut r, path)?;
            }
            0x2C => {
                let mut desc = [0u8; 9];
                read_n(&mut r, &mut desc, path, "an image descriptor")?;
                r.seek_relative(table(desc[8])).map_err(io_err(path))?;
                read_u8(&mut r, path, "the LZW code size")?;
                skip_sub_blocks(&mut r, path)?;
                frames += 1;
            }
            0x3B => return Ok(frames),
            b => {
                return Err(decode_err(
                    path,
                    format!("unknown GIF block 0x{b:02x} after {frames} frames (corrupt?)"),
                ))
            }
        }
    }
}

/// Counts the frames of a WebP from its RIFF chunks: the `ANMF` chunks of an
/// animation, or 1 for a still image.
pub fn count_webp_frames(path: &Path) -> Result<usize> {
    let mut r = BufReader::new(File::open(path).map_err(io_err(path))?);
    let mut header = [0u8; 12];
    read_n(&mut r, &mut header, path, "the RIFF header")?;
    if &header[..4] != b"RIFF" || &header[8..12] != b"WEBP" {
        return Err(decode_err(path, "not a WebP file (bad RIFF header)"));
    }
    let riff_len = u64::from(u32::from_le_bytes([
        header[4], header[5], header[6], header[7],
    ]));
    let file_len = r.get_ref().metadata().map_err(io_err(path))?.len();
    if riff_len + 8 > file_len {
        return Err(decode_err(
            path,
            format!(
                "truncated: RIFF says {} bytes, file has {file_len}",
                riff_len + 8
            ),
        ));
    }
    let (mut animated, mut frames, mut still) = (false, 0usize, false);
    let mut pos = 12u64;
    while pos + 8 <= riff_len + 8 {
        let mut chunk = [0u8; 8];
        read_n(&mut r, &mut chunk, path, "a chunk header")?;
        let size = u64::from(u32::from_le_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]));
        let padded = size + (size & 1);
        match &chunk[..4] {
            b"VP8X" => {
                let flags = read_u8(&mut r, path, "the VP8X flags")?;
                animated = flags & 0x02 != 0;
                r.seek_relative(padded as i64 - 1).map_err(io_err(path))?;
            }
            b"ANMF" => {
                frames += 1;
                r.seek_relative(padded as i64).map_err(io_err(path))?;
            }
            b"VP8 " | b"VP8L" => {
                still = true;
                r.seek_relative(padded as i64).map_err(io_err(path))?;
            }
            _ => r.seek_relative(padded as i64).map_err(io_err(path))?,
        }
        pos += 8 + padded;
    }
    if pos > riff_len + 8 {
        return Err(decode_err(
            path,
            "truncated: the last chunk runs past the end",
        ));
    }
    Ok(if animated { frames } else { usize::from(still) })
}

fn run_program(program: &Path, path: &Path, cmd: &mut Command) -> Result<Child> {
    cmd.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::ProgramMissing {
                program: program.to_path_buf(),
                path: path.to_path_buf(),
                source,
            }
        } else {
            Error::Io {
                path: program.to_path_buf(),
                source,
            }
        }
    })
}

/// Whether `ffmpeg` and `ffprobe` can be run (tests and benchmarks skip without them).
pub fn ffmpeg_available(opts: &DecodeOptions) -> bool {
    [&opts.ffmpeg, &opts.ffprobe].iter().all(|p| {
        Command::new(p)
            .arg("-version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Counts the video packets of the first video stream with ffprobe (demuxing
/// only; one packet is one frame for the codecs of MP4, WebM and AVI).
fn count_ffmpeg_frames(path: &Path, opts: &DecodeOptions) -> Result<usize> {
    if !path.is_file() {
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let child = run_program(
        &opts.ffprobe,
        path,
        Command::new(&opts.ffprobe)
            .args(["-v", "error", "-select_streams", "v:0", "-count_packets"])
            .args(["-show_entries", "stream=nb_read_packets", "-of", "csv=p=0"])
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    let out = child.wait_with_output().map_err(io_err(&opts.ffprobe))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(Error::Program {
            program: opts.ffprobe.clone(),
            path: path.to_path_buf(),
            status: out.status.to_string(),
            stderr: tail(&stderr),
        });
    }
    let text = stdout.trim().trim_end_matches(',');
    if text.is_empty() {
        return Err(decode_err(
            path,
            format!("no video stream ({})", tail(&stderr)),
        ));
    }
    text.parse::<usize>()
        .map_err(|_| decode_err(path, format!("ffprobe printed `{text}`, not a frame count")))
}

/// The last few hundred characters of a program's error output.
fn tail(s: &str) -> String {
    let s = s.trim();
    let start = s.char_indices().rev().nth(600).map(|(i, _)| i).unwrap_or(0);
    s[start..].to_string()
}

fn decode_ffmpeg(path: &Path, wanted: &mut Wanted, opts: &DecodeOptions) -> Result<()> {
    let (w, h) = (opts.width, opts.height);
    // Cover-scale then centre-crop, the same fit as `fit_rgb`, done by ffmpeg
    // so that full-size frames never cross the pipe.
    let filter = format!("scale={w}:{h}:force_original_aspect_ratio=increase,crop={w}:{h}");
    let mut child = run_program(
        &opts.ffmpeg,
        path,
        Command::new(&opts.ffmpeg)
            .args(["-nostdin", "-v", "error", "-i"])
            .arg(path)
            // One output frame per decoded frame: without passthrough the
            // rawvideo muxer duplicates or drops frames to a constant rate,
            // and indices would no longer match the counted packets.
            .args(["-map", "0:v:0", "-fps_mode", "passthrough", "-vf", &filter])
            .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    // stderr is drained on its own thread so a chatty ffmpeg cannot block on
    // a full pipe while we wait on stdout.
    let stderr_thread = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = e.read_to_string(&mut s);
            s
        })
    });
    let result = read_raw_frames(path, &mut child, wanted, w, h);
    let finished_early = matches!(result, Ok(true));
    if finished_early {
        // Every wanted frame is in: stop decoding the rest of the video.
        let _ = child.kill();
    }
    let status = child.wait().map_err(io_err(&opts.ffmpeg))?;
    let stderr = stderr_thread
        .and_then(|t| t.join().ok())
        .unwrap_or_default();
    result?;
    if !finished_early && !status.success() {
        return Err(Error::Program {
            program: opts.ffmpeg.clone(),
            path: path.to_path_buf(),
            status: status.to_string(),
            stderr: tail(&stderr),
        });
    }
    Ok(())
}

/// Reads `w x h` RGB frames from ffmpeg's stdout into one reused buffer,
/// keeping the wanted ones. Returns whether it stopped early.
fn read_raw_frames(
    path: &Path,
    child: &mut Child,
    wanted: &mut Wanted,
    w: u32,
    h: u32,
) -> Result<bool> {
    let Some(stdout) = child.stdout.take() else {
        return Err(decode_err(path, "ffmpeg's output pipe is missing"));
    };
    let mut stdout = BufReader::with_capacity(1 << 16, stdout);
    let mut buf = vec![0u8; 3 * w as usize * h as usize];
    let mut i = 0usize;
    loop {
        match read_full(&mut stdout, &mut buf) {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(e) => {
                return Err(Error::Io {
                    path: path.to_path_buf(),
                    source: e,
                })
            }
        }
        wanted.seen = i + 1;
        if wanted.wants(i) {
            if let Some(frame) = RgbImage::from_raw(w, h, buf.clone()) {
                wanted.put(i, frame);
            }
        }
        if wanted.done_after(i) {
            return Ok(true);
        }
        i += 1;
    }
}

/// Fills `buf` completely (`true`) or reports a clean end of stream
/// (`false`); a partial last frame counts as the end.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => return Ok(false),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_compares_digit_runs_by_value() {
        let mut names = vec!["f10.png", "f2.png", "f1.png", "f02.png", "a.png", "f1b.png"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            vec!["a.png", "f1.png", "f1b.png", "f2.png", "f02.png", "f10.png"]
        );
    }

    #[test]
    fn fit_covers_and_centre_crops() {
        // A 4x2 image whose left half is red and right half blue, fitted to
        // 2x2: scaled to 4x2 (no change), crop keeps the middle columns 1..3.
        let img = RgbImage::from_fn(4, 2, |x, _| {
            if x < 2 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let out = fit_rgb(img, &DecodeOptions::square(2));
        assert_eq!(out.dimensions(), (2, 2));
        assert_eq!(out.get_pixel(0, 0).0, [255, 0, 0]);
        assert_eq!(out.get_pixel(1, 1).0, [0, 0, 255]);
    }

    #[test]
    fn transparent_pixels_take_the_background() {
        let img = RgbaImage::from_fn(2, 1, |x, _| {
            if x == 0 {
                image::Rgba([0, 0, 0, 0])
            } else {
                image::Rgba([10, 20, 30, 255])
            }
        });
        let mut opts = DecodeOptions::square(1);
        opts.width = 2;
        opts.background = [200, 100, 50];
        let out = fit_rgba(&img, &opts);
        assert_eq!(out.get_pixel(0, 0).0, [200, 100, 50]);
        assert_eq!(out.get_pixel(1, 0).0, [10, 20, 30]);
    }
}
