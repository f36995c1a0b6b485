//! The video pipeline end to end on generated files: frame counting agrees
//! with full decoding, the sampled frames are the right ones for every
//! source kind, bad files are errors naming the file, annotation formats
//! parse, and the synthetic set's twins are exact time reversals.

use cots_data::video;

use std::path::{Path, PathBuf};
use std::process::Command;

use image::{AnimationDecoder, Rgb, RgbImage};
use video::decode::{count_gif_frames, count_webp_frames, fit_rgb, list_frames};
use video::encode::{write_gif, write_webp};
use video::msrvtt::{self, MissingPolicy, Split, VideoRecord};
use video::synthetic::{SyntheticVideoConfig, SyntheticVideoSet};
use video::{count_frames, decode_frames, decode_sampled, DecodeOptions, Error, SampleMode};

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Frame `i` is a flat grey of level `16 * i` with a white marker square
/// whose column also encodes `i`, so a wrong index shows in both.
fn numbered_frames(n: usize, w: u32, h: u32) -> Vec<RgbImage> {
    (0..n)
        .map(|i| {
            let g = (16 * i).min(255) as u8;
            RgbImage::from_pixel(w, h, Rgb([g, g, g]))
        })
        .collect()
}

fn mean_grey(img: &RgbImage) -> f64 {
    let s: u64 = img
        .pixels()
        .map(|p| p.0.iter().map(|&c| c as u64).sum::<u64>())
        .sum();
    s as f64 / (3 * img.width() * img.height()) as f64
}

fn assert_levels(frames: &[RgbImage], indices: &[usize], tol: f64) {
    assert_eq!(frames.len(), indices.len());
    for (f, &i) in frames.iter().zip(indices) {
        let want = (16 * i).min(255) as f64;
        let got = mean_grey(f);
        assert!(
            (got - want).abs() <= tol,
            "frame {i}: grey {got}, want {want}"
        );
    }
}

/// The slow reference: decode every frame with `image` and count.
fn reference_count(path: &Path) -> usize {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    match path.extension().and_then(|e| e.to_str()) {
        Some("gif") => image::codecs::gif::GifDecoder::new(file)
            .unwrap()
            .into_frames()
            .count(),
        _ => image::codecs::webp::WebPDecoder::new(file)
            .unwrap()
            .into_frames()
            .count(),
    }
}

#[test]
fn gif_and_webp_count_without_decoding_and_decode_the_sampled_frames() -> TestResult {
    let dir = tempfile::tempdir()?;
    let frames = numbered_frames(14, 40, 24);
    let opts = DecodeOptions::square(16);
    for (name, tol) in [("a.gif", 3.0), ("a.webp", 0.0)] {
        let path = dir.path().join(name);
        if name.ends_with("gif") {
            write_gif(&path, &frames, 40)?;
            assert_eq!(count_gif_frames(&path)?, 14);
        } else {
            write_webp(&path, &frames, 40)?;
            assert_eq!(count_webp_frames(&path)?, 14);
        }
        assert_eq!(reference_count(&path), 14, "{name}");
        assert_eq!(count_frames(&path, &opts)?, 14);
        let indices = [13, 0, 5, 5];
        let out = decode_frames(&path, &indices, &opts)?;
        assert!(out.iter().all(|f| f.dimensions() == (16, 16)));
        assert_levels(&out, &indices, tol);
        let clip = decode_sampled(&path, 4, SampleMode::Eval, &opts)?;
        // Segments [0,3) [3,7) [7,10) [10,14): centres 1, 5, 8, 12.
        assert_eq!(clip.indices, vec![1, 5, 8, 12]);
        assert_eq!(clip.frame_count, 14);
        assert_levels(&clip.frames, &clip.indices, tol);
        let t = clip.to_tensor(&candle_core::Device::Cpu)?;
        assert_eq!(t.dims(), &[4, 3, 16, 16]);
    }
    Ok(())
}

#[test]
fn lossless_webp_round_trips_exactly() -> TestResult {
    let dir = tempfile::tempdir()?;
    let set = SyntheticVideoSet::new(&SyntheticVideoConfig::default());
    let clip = &set.clips()[0];
    let frames = set.render(clip);
    let path = dir.path().join("clip.webp");
    write_webp(&path, &frames, 100)?;
    let out = decode_frames(
        &path,
        &(0..frames.len()).collect::<Vec<_>>(),
        &DecodeOptions::square(64),
    )?;
    assert_eq!(out, frames);
    Ok(())
}

#[test]
fn frame_folders_sort_naturally_and_skip_other_files() -> TestResult {
    let dir = tempfile::tempdir()?;
    for (i, f) in numbered_frames(12, 8, 8).iter().enumerate() {
        f.save(dir.path().join(format!("frame_{}.png", i + 1)))?;
    }
    std::fs::write(dir.path().join("notes.txt"), "not a frame")?;
    std::fs::write(dir.path().join(".hidden.png"), "not a frame")?;
    let files = list_frames(dir.path())?;
    assert_eq!(files.len(), 12);
    assert!(files[9].ends_with("frame_10.png"), "{files:?}");
    let opts = DecodeOptions::square(8);
    assert_eq!(count_frames(dir.path(), &opts)?, 12);
    let out = decode_frames(dir.path(), &[11, 1, 9], &opts)?;
    assert_levels(&out, &[11, 1, 9], 0.0);
    Ok(())
}

#[test]
fn bad_files_are_errors_naming_the_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let opts = DecodeOptions::square(8);
    let names_file = |e: &Error, p: &Path| {
        let msg = e.to_string();
        assert!(
            msg.contains(&*p.to_string_lossy()),
            "`{msg}` does not name {}",
            p.display()
        );
    };
    // A GIF with a header and a trailer but no image.
    let empty = dir.path().join("empty.gif");
    let mut bytes = b"GIF89a".to_vec();
    bytes.extend_from_slice(&[1, 0, 1, 0, 0, 0, 0, 0x3B]);
    std::fs::write(&empty, bytes)?;
    let e = count_frames(&empty, &opts).unwrap_err();
    assert!(matches!(e, Error::NoFrames { .. }), "{e}");
    names_file(&e, &empty);
    // Truncated GIF and WebP.
    let frames = numbered_frames(6, 16, 16);
    for name in ["t.gif", "t.webp"] {
        let p = dir.path().join(name);
        if name.ends_with("gif") {
            write_gif(&p, &frames, 40)?;
        } else {
            write_webp(&p, &frames, 40)?;
        }
        let full = std::fs::read(&p)?;
        std::fs::write(&p, &full[..full.len() * 2 / 3])?;
        let e = count_frames(&p, &opts).unwrap_err();
        names_file(&e, &p);
        let e = decode_sampled(&p, 4, SampleMode::Eval, &opts).unwrap_err();
        names_file(&e, &p);
    }
    // Not an image at all, and an empty folder.
    let junk = dir.path().join("junk.gif");
    std::fs::write(&junk, b"hello world, not a gif")?;
    names_file(&count_frames(&junk, &opts).unwrap_err(), &junk);
    let folder = dir.path().join("nothing");
    std::fs::create_dir(&folder)?;
    let e = count_frames(&folder, &opts).unwrap_err();
    assert!(matches!(e, Error::NoFrames { .. }));
    // A missing ffmpeg is reported as such, naming the video and the program.
    let mp4 = dir.path().join("v.mp4");
    std::fs::write(&mp4, b"whatever")?;
    let mut no_ff = opts.clone();
    no_ff.ffprobe = PathBuf::from("/nonexistent/ffprobe");
    let e = count_frames(&mp4, &no_ff).unwrap_err();
    assert!(matches!(e, Error::ProgramMissing { .. }), "{e}");
    assert!(e.to_string().contains("install ffmpeg"));
    names_file(&e, &mp4);
    Ok(())
}

fn ffmpeg(args: &[&str]) -> bool {
    Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-y"])
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn ffmpeg_videos_decode_the_sampled_frames() -> TestResult {
    let opts = DecodeOptions::square(16);
    if !video::decode::ffmpeg_available(&opts) {
        let why = "ffmpeg/ffprobe not on PATH";
        // Under CI a missing dependency is a failure: .ci/run installs ffmpeg.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: {why}"
        );
        eprintln!("SKIPPED ffmpeg_videos_decode_the_sampled_frames: {why}");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let frames_dir = dir.path().join("frames");
    std::fs::create_dir(&frames_dir)?;
    for (i, f) in numbered_frames(16, 64, 48).iter().enumerate() {
        f.save(frames_dir.join(format!("f{i:03}.png")))?;
    }
    let pattern = frames_dir.join("f%03d.png");
    let pattern = pattern.to_string_lossy();
    let codecs: [(&str, &[&str]); 3] = [
        (
            "v.mp4",
            &["-c:v", "libx264", "-crf", "5", "-pix_fmt", "yuv420p"],
        ),
        ("v.webm", &["-c:v", "libvpx", "-crf", "4", "-b:v", "2M"]),
        ("v.avi", &["-c:v", "mpeg4", "-q:v", "2"]),
    ];
    for (name, codec) in codecs {
        let out = dir.path().join(name);
        let out_s = out.to_string_lossy().into_owned();
        let mut args = vec!["-framerate", "8", "-i", &pattern];
        args.extend_from_slice(codec);
        args.push(&out_s);
        if !ffmpeg(&args) {
            // Debian's ffmpeg (what .ci/run installs) encodes all three.
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: this ffmpeg cannot encode {name}"
            );
            eprintln!("SKIPPED {name}: this ffmpeg cannot encode it");
            continue;
        }
        assert_eq!(count_frames(&out, &opts)?, 16, "{name}");
        let indices = [15, 0, 7, 7, 3];
        let got = decode_frames(&out, &indices, &opts)?;
        assert!(got.iter().all(|f| f.dimensions() == (16, 16)));
        // Lossy codecs: grey levels 16 apart stay within 6 of the truth.
        assert_levels(&got, &indices, 6.0);
        let clip = decode_sampled(
            &out,
            4,
            SampleMode::Train {
                seed: 1,
                epoch: 0,
                index: 3,
            },
            &opts,
        )?;
        assert_levels(&clip.frames, &clip.indices, 6.0);
        // A truncated file is an error naming it.
        let bytes = std::fs::read(&out)?;
        let cut = dir.path().join(format!("cut-{name}"));
        std::fs::write(&cut, &bytes[..bytes.len() / 3])?;
        if let Err(e) = decode_sampled(&cut, 4, SampleMode::Eval, &opts) {
            assert!(e.to_string().contains(&*cut.to_string_lossy()), "{e}");
        } else {
            // Some containers stay readable when cut; then the frames that
            // came back must still be the right ones.
            let clip = decode_sampled(&cut, 4, SampleMode::Eval, &opts)?;
            assert_levels(&clip.frames, &clip.indices, 6.0);
        }
    }
    let junk = dir.path().join("junk.mp4");
    std::fs::write(&junk, b"definitely not a video")?;
    let e = count_frames(&junk, &opts).unwrap_err();
    assert!(e.to_string().contains(&*junk.to_string_lossy()), "{e}");
    Ok(())
}

#[test]
fn fit_matches_a_direct_resize_for_same_aspect_inputs() {
    // 32x32 to 16x16 is a plain resize: compare against image's resize.
    let img = RgbImage::from_fn(32, 32, |x, y| Rgb([(x * 8) as u8, (y * 8) as u8, 7]));
    let want = image::imageops::resize(&img, 16, 16, image::imageops::FilterType::Triangle);
    assert_eq!(fit_rgb(img, &DecodeOptions::square(16)), want);
}

fn write(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

#[test]
fn msrvtt_1ka_joins_json_lists_and_files() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let json = d.join("MSRVTT_data.json");
    write(
        &json,
        r#"{"info": {}, "videos": [
            {"video_id": "video0", "split": "train", "id": 0},
            {"video_id": "video1", "split": "validate", "id": 1},
            {"video_id": "video7", "split": "test", "id": 7}],
          "sentences": [
            {"caption": "a man sings", "video_id": "video0", "sen_id": 0},
            {"caption": "someone is singing", "video_id": "video0", "sen_id": 1},
            {"caption": "a cat jumps", "video_id": "video1", "sen_id": 2},
            {"caption": "cars race", "video_id": "video7", "sen_id": 3}]}"#,
    )?;
    let anns = msrvtt::read_msrvtt_json(&json)?;
    assert_eq!(anns.len(), 3);
    assert_eq!(anns[0].captions, vec!["a man sings", "someone is singing"]);
    assert_eq!(anns[1].split, Some(Split::Val));
    let train = d.join("MSRVTT_train.9k.csv");
    write(&train, "video_id\nvideo0\nvideo1\n")?;
    let test = d.join("MSRVTT_JSFUSION_test.csv");
    write(
        &test,
        "key,vid_key,video_id,sentence\nret0,msr7,video7,\"cars race, fast\"\n",
    )?;
    let videos = d.join("videos");
    std::fs::create_dir(&videos)?;
    std::fs::write(videos.join("video0.mp4"), b"")?;
    std::fs::create_dir(videos.join("video7"))?; // a frame folder
                                                 // video1 has no file.
    let e = msrvtt::msrvtt_1ka(&json, &train, &test, &videos, MissingPolicy::Error).unwrap_err();
    assert!(
        matches!(&e, Error::MissingVideo { id, .. } if id == "video1"),
        "{e}"
    );
    assert!(e.to_string().contains("MSRVTT_train.9k.csv"), "{e}");
    let r = msrvtt::msrvtt_1ka(&json, &train, &test, &videos, MissingPolicy::Skip)?;
    assert_eq!(r.skipped.len(), 1);
    assert_eq!(r.skipped[0].id, "video1");
    assert_eq!(r.records.len(), 2);
    assert_eq!(r.records[0].captions.len(), 2);
    assert_eq!(r.records[0].split, Split::Train);
    assert_eq!(r.records[1].captions, vec!["cars race, fast"]);
    assert_eq!(r.records[1].split, Split::Test);
    assert!(r.records[1].video.ends_with("video7"));
    Ok(())
}

#[test]
fn malformed_annotations_name_file_and_line() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let json = d.join("bad.json");
    write(
        &json,
        r#"{"videos": [{"video_id": "v0"}], "sentences": [{"video_id": "v9", "caption": "x"}]}"#,
    )?;
    let e = msrvtt::read_msrvtt_json(&json).unwrap_err();
    assert!(
        e.to_string().contains("bad.json") && e.to_string().contains("v9"),
        "{e}"
    );
    write(&json, "{\"videos\": [\n{\"video_id\": 3}]}")?;
    let e = msrvtt::read_msrvtt_json(&json).unwrap_err();
    assert!(matches!(e, Error::Format { line: 2, .. }), "{e}");
    let csv = d.join("test.csv");
    write(
        &csv,
        "key,vid_key,video_id,sentence\nret0,msr1,video1,ok\nret1,msr2\n",
    )?;
    let e = msrvtt::read_jsfusion_csv(&csv).unwrap_err();
    assert!(matches!(e, Error::Format { line: 3, .. }), "{e}");
    assert!(e.to_string().contains("test.csv:3:"), "{e}");
    write(&csv, "key,sentence\nret0,ok\n")?;
    let e = msrvtt::read_jsfusion_csv(&csv).unwrap_err();
    assert!(e.to_string().contains("video_id"), "{e}");
    Ok(())
}

#[test]
fn jsonl_manifest_round_trips_and_reports_bad_lines() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    std::fs::create_dir(d.join("clips"))?;
    std::fs::write(d.join("clips/a.gif"), b"")?;
    std::fs::write(d.join("clips/b.webp"), b"")?;
    let records = vec![
        VideoRecord {
            id: "a".into(),
            video: d.join("clips/a.gif"),
            captions: vec!["a red circle moves".into()],
            split: Split::Train,
        },
        VideoRecord {
            id: "b".into(),
            video: d.join("clips/b.webp"),
            captions: vec!["x".into(), "y".into()],
            split: Split::Test,
        },
    ];
    let manifest = d.join("videos.jsonl");
    msrvtt::write_manifest(&manifest, &records)?;
    let text = std::fs::read_to_string(&manifest)?;
    assert!(
        text.contains("\"clips/a.gif\""),
        "paths are written relative: {text}"
    );
    let back = msrvtt::read_manifest(&manifest, MissingPolicy::Error)?;
    assert_eq!(back.records, records);
    assert!(back.skipped.is_empty());

    write(
        &manifest,
        &format!(
            "{}\n\n{{\"video\": \"clips/gone.mp4\", \"captions\": [\"z\"]}}\n",
            text.lines().next().unwrap_or_default()
        ),
    )?;
    let e = msrvtt::read_manifest(&manifest, MissingPolicy::Error).unwrap_err();
    assert!(
        matches!(&e, Error::MissingVideo { id, .. } if id == "clips/gone.mp4"),
        "{e}"
    );
    let r = msrvtt::read_manifest(&manifest, MissingPolicy::Skip)?;
    assert_eq!((r.records.len(), r.skipped.len()), (1, 1));
    assert!(r.skipped[0].reason.contains("line 3"), "{:?}", r.skipped);

    for (body, line) in [
        ("{\"video\": \"clips/a.gif\", \"captions\": []}\n", 1),
        ("{\"video\": \"clips/a.gif\", \"captions\": [\"x\"]}\nnot json\n", 2),
        ("{\"video\": \"clips/a.gif\", \"captions\": [\"x\"], \"split\": \"dev\"}\n", 1),
        ("{\"video\": \"clips/a.gif\", \"captions\": [\"x\"]}\n{\"video\": \"clips/a.gif\", \"captions\": [\"y\"]}\n", 2),
    ] {
        write(&manifest, body)?;
        let e = msrvtt::read_manifest(&manifest, MissingPolicy::Error).unwrap_err();
        assert!(matches!(e, Error::Format { line: l, .. } if l == line), "{body}: {e}");
        assert!(e.to_string().contains("videos.jsonl"), "{e}");
    }
    Ok(())
}

#[test]
fn synthetic_twins_are_exact_reversals_in_the_same_split() -> TestResult {
    let cfg = SyntheticVideoConfig::default();
    let set = SyntheticVideoSet::new(&cfg);
    let by_id: std::collections::HashMap<&str, &video::synthetic::ClipSpec> =
        set.clips().iter().map(|c| (c.id.as_str(), c)).collect();
    assert_eq!(by_id.len(), set.clips().len(), "ids are unique");
    assert_eq!(set.clips().len(), 2 * (3 * 4 * 8 + 3 * 12));
    let mut test_families = std::collections::BTreeSet::new();
    for clip in set.clips() {
        let twin = by_id[clip.twin.as_str()];
        assert_eq!(twin.twin, clip.id);
        assert_eq!(twin.split, clip.split, "{} and its twin", clip.id);
        assert_eq!(twin.event, clip.event.reversed());
        // The captions of twins never coincide: order is the whole difference.
        assert!(clip.captions.iter().all(|c| !twin.captions.contains(c)));
        if clip.split == Split::Test {
            test_families.insert(clip.event.family());
        }
    }
    assert_eq!(test_families.len(), 5, "every kind of event has test pairs");
    let n_test = set.split(Split::Test).count();
    assert!(
        n_test * 7 > set.clips().len() && n_test * 4 < set.clips().len(),
        "{n_test} test clips"
    );

    for clip in set.clips().iter().step_by(7) {
        let frames = set.render(clip);
        assert_eq!(frames.len(), cfg.frames);
        assert!(frames
            .iter()
            .all(|f| f.dimensions() == (cfg.size, cfg.size)));
        // Something happens: the first and last frames differ.
        assert_ne!(frames[0], frames[cfg.frames - 1], "{}", clip.id);
        let mut twin = set.render(by_id[clip.twin.as_str()]);
        twin.reverse();
        assert_eq!(frames, twin, "{} is not its twin reversed", clip.id);
        // Rendering is deterministic.
        assert_eq!(frames, set.render(clip));
    }
    let other = SyntheticVideoSet::new(&SyntheticVideoConfig {
        seed: 1,
        ..cfg.clone()
    });
    assert_ne!(
        set.render(&set.clips()[0]),
        other.render(&other.clips()[0]),
        "the seed changes drawings"
    );
    assert_eq!(
        set.split(Split::Test).map(|c| &c.id).collect::<Vec<_>>(),
        other.split(Split::Test).map(|c| &c.id).collect::<Vec<_>>(),
        "but not the split"
    );
    Ok(())
}

#[test]
fn synthetic_motion_goes_the_way_the_caption_says() {
    // The shape's centre of mass (pixels differing from the background)
    // must move right for "left to right" and down for "top to bottom".
    let set = SyntheticVideoSet::new(&SyntheticVideoConfig::default());
    let centroid = |img: &RgbImage| {
        let bg = *img.get_pixel(0, 0);
        let (mut sx, mut sy, mut n) = (0f64, 0f64, 0f64);
        for (x, y, p) in img.enumerate_pixels() {
            if *p != bg {
                sx += x as f64;
                sy += y as f64;
                n += 1.0;
            }
        }
        (sx / n, sy / n, n)
    };
    for clip in set.clips().iter().filter(|c| c.variant == 0) {
        let f = set.render(clip);
        let (a, b) = (centroid(&f[0]), centroid(&f[f.len() - 1]));
        let text = &clip.captions[0];
        if text.contains("from left to right") {
            assert!(b.0 > a.0 + 10.0, "{}", clip.id);
        } else if text.contains("from right to left") {
            assert!(b.0 + 10.0 < a.0, "{}", clip.id);
        } else if text.contains("from top to bottom") {
            assert!(b.1 > a.1 + 10.0, "{}", clip.id);
        } else if text.contains("from bottom to top") {
            assert!(b.1 + 10.0 < a.1, "{}", clip.id);
        } else if text.ends_with("grows") {
            assert!(b.2 > 2.0 * a.2, "{}", clip.id);
        } else if text.ends_with("shrinks") {
            assert!(a.2 > 2.0 * b.2, "{}", clip.id);
        } else if text.ends_with("appears") {
            assert!(a.2 == 0.0 && b.2 > 0.0, "{}", clip.id);
        } else if text.ends_with("vanishes") {
            assert!(a.2 > 0.0 && b.2 == 0.0, "{}", clip.id);
        }
    }
}

/// The loader's clips are the slow path's: each item rendered, its frames
/// chosen by TSN sampling seeded with `(seed, epoch, slot)`, normalised; a
/// video file in a dataset evaluates on its centre frames; and the synthetic
/// set's drawings of one concept share an id while test keeps one drawing.
#[test]
fn the_loader_batches_clips_sampled_like_the_reference() -> TestResult {
    use cots_data::image_io::{load_pixels, to_chw, ImageConfig};
    use cots_data::{Dataset, ImageSource, Loader, LoaderConfig, LoaderPosition};
    use std::sync::Arc;

    let set = SyntheticVideoConfig {
        frames: 9,
        size: 16,
        variants: 2,
        seed: 4,
    };
    let all = Dataset::synthetic_video(&set);
    let test = all.split(cots_data::Split::Test)?;
    let variants = |d: &Dataset| {
        d.items
            .iter()
            .filter_map(|it| match &it.source {
                ImageSource::SyntheticClip { clip, .. } => Some(clip.variant),
                _ => None,
            })
            .collect::<std::collections::BTreeSet<u32>>()
    };
    assert_eq!(variants(&test), [0].into());
    let train = all.split(cots_data::Split::Train)?;
    assert_eq!(variants(&train), [0, 1].into());
    let ids: std::collections::BTreeSet<u32> = train.items.iter().map(|i| i.id).collect();
    assert_eq!(
        ids.len() * 2,
        train.items.len(),
        "two drawings per concept id"
    );
    assert!(test.twins().is_some());

    let image = ImageConfig {
        size: 16,
        frames: Some(3),
        ..ImageConfig::default()
    };
    let words: Vec<String> = all
        .items
        .iter()
        .flat_map(|i| i.captions.iter())
        .flat_map(|c| c.split(' ').map(str::to_string))
        .collect();
    let tok = Arc::new(cots_text::TextTokenizer::from_words(&words)?);
    let cfg = LoaderConfig {
        batch_size: 4,
        seed: 11,
        image: image.clone(),
        ..LoaderConfig::default()
    };
    let train = Arc::new(train);
    let mut loader = Loader::new(train.clone(), tok, cfg.clone(), LoaderPosition::default())?;
    let _ = loader.next_batch()?;
    let batch = loader.next_batch()?;
    assert_eq!(batch.pixels.dims(), &[4, 3, 3, 16, 16]);
    let got = batch.pixels.flatten_all()?.to_vec1::<f32>()?;
    let per = 3 * 3 * 16 * 16;
    for (s, &i) in batch.item_indices.iter().enumerate() {
        let ImageSource::SyntheticClip { clip, set } = &train.items[i].source else {
            panic!("not a clip");
        };
        let frames = SyntheticVideoSet::new(set).render(clip);
        let slot = (batch.position.batch as usize * cfg.batch_size + s) as u64;
        let mode = SampleMode::Train {
            seed: cfg.seed,
            epoch: batch.position.epoch,
            index: slot,
        };
        let want: Vec<f32> = video::sample_indices(frames.len(), 3, mode)
            .into_iter()
            .flat_map(|k| to_chw(&frames[k], &image))
            .collect();
        assert_eq!(&got[s * per..(s + 1) * per], want.as_slice(), "slot {s}");
    }

    // A GIF item evaluates on its centre frames, like decode_sampled's.
    let dir = tempfile::tempdir()?;
    let gif = dir.path().join("clip.gif");
    write_gif(&gif, &numbered_frames(9, 16, 16), 10)?;
    let pixels = load_pixels(&ImageSource::Video(gif.clone()), &image)?;
    let want: Vec<f32> = decode_sampled(&gif, 3, SampleMode::Eval, &DecodeOptions::square(16))?
        .frames
        .iter()
        .flat_map(|f| to_chw(f, &image))
        .collect();
    assert_eq!(pixels, want);
    Ok(())
}
