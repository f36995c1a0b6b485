//! The animated emoji builder on a tiny fake package tree: animated WebP
//! files written here (moving, still, empty, truncated, blank). No network.

use std::io::BufReader;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use cots_data::video::msrvtt::{read_manifest, Split};
use cots_data::video::{decode_frames, encode, DecodeOptions, MissingPolicy};
use cots_datasets::emoji_video::{self, Progress, VideoBuildOptions, ANIM_PACKAGES};
use image::{AnimationDecoder, RgbImage};

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Frame `j` of a fixture animation: a disc of red level `10 j` on white.
fn disc_frame(j: usize) -> RgbImage {
    RgbImage::from_fn(32, 32, |x, y| {
        let (dx, dy) = (x as f32 - 16.0, y as f32 - 16.0);
        if dx * dx + dy * dy < 12.0 * 12.0 {
            image::Rgb([(10 * j) as u8, 0, 0])
        } else {
            image::Rgb([255, 255, 255])
        }
    })
}

/// An animated WebP of `n` disc frames, 40 ms each.
fn write_anim(path: &Path, n: usize) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let frames: Vec<RgbImage> = (0..n).map(disc_frame).collect();
    encode::write_webp(path, &frames, 40).unwrap();
}

/// The text packages of the static benchmark's test, and four animation
/// packages. Seven concepts: grinning face (test family), man: beard and
/// woman: beard (the test family `beard`), hibiscus and red heart and a flag
/// (train), taco (val).
fn fake_packages(root: &Path) {
    for (name, version) in [
        ("emojibase-data", "17.0.0"),
        ("emoji-datasource", "16.0.0"),
        ("openmoji", "17.0.0"),
    ]
    .into_iter()
    .chain(ANIM_PACKAGES.map(|n| (n, "1.0.0")))
    {
        write(
            &root.join(name).join("package.json"),
            format!(r#"{{"name": "{name}", "version": "{version}"}}"#).as_bytes(),
        );
    }
    write(
        &root.join("integrity.txt"),
        b"emojibase-data 17.0.0 sha512-abc==\n@lobehub/fluent-emoji-anim-2 1.0.0 sha512-def==\n",
    );
    write(
        &root.join("emojibase-data/en/data.json"),
        br#"[
          {"label": "grinning face", "hexcode": "1F600", "tags": ["face", "grin"], "group": 0, "subgroup": 0},
          {"label": "man: beard", "hexcode": "1F9D4-200D-2642-FE0F", "tags": ["beard", "man"], "group": 1, "subgroup": 23},
          {"label": "woman: beard", "hexcode": "1F9D4-200D-2640-FE0F", "tags": ["beard", "woman"], "group": 1, "subgroup": 23},
          {"label": "hibiscus", "hexcode": "1F33A", "tags": ["flower", "hibiscus", "plant"], "group": 3, "subgroup": 40},
          {"label": "taco", "hexcode": "1F32E", "tags": ["mexican"], "group": 4, "subgroup": 45},
          {"label": "red heart", "hexcode": "2764-FE0F", "tags": ["heart", "love"], "group": 0, "subgroup": 13},
          {"label": "flag: Nepal", "hexcode": "1F1F3-1F1F5", "tags": ["flag"], "group": 9, "subgroup": 99}
        ]"#,
    );
    write(
        &root.join("emojibase-data/meta/groups.json"),
        br#"{"groups": {"0": "smileys-emotion", "1": "people-body", "3": "animals-nature", "4": "food-drink", "9": "flags"},
            "subgroups": {"0": "face-smiling", "13": "heart", "23": "person", "40": "plant-flower", "45": "food-prepared", "99": "country-flag"}}"#,
    );
    write(
        &root.join("emoji-datasource/emoji.json"),
        br#"[{"unified": "1F600", "short_names": ["grinning"], "subcategory": "face-smiling"},
             {"unified": "1F33A", "short_names": ["hibiscus"], "subcategory": "plant-flower"}]"#,
    );
    write(
        &root.join("openmoji/data/openmoji.json"),
        br#"[{"hexcode": "1F600", "annotation": "grinning face", "tags": "face, grin", "openmoji_tags": "smile, happy"}]"#,
    );
    let assets = |i: usize| root.join(ANIM_PACKAGES[i]).join("assets");
    // anim-1: a 6-frame animation, a skin-tone variant (no concept) and a
    // file whose name is not codepoints.
    write_anim(&assets(0).join("1f600.webp"), 6);
    write_anim(&assets(0).join("1f9d4-1f3fb-200d-2642-fe0f.webp"), 6);
    write_anim(&assets(0).join("README.webp"), 6);
    // anim-2: 20 frames (more than kept) with FE0F-free and upper-case
    // names, and a still (not a video).
    write_anim(&assets(1).join("1F33A.webp"), 20);
    disc_frame(3)
        .save(assets(1).join("1f9d4-200d-2640-fe0f.webp"))
        .unwrap();
    // anim-3: 4 frames; a second 1f600 (anim-1's wins); an animation
    // header without a single frame.
    write_anim(&assets(2).join("1f32e.webp"), 4);
    write_anim(&assets(2).join("1f600.webp"), 3);
    let mut empty = b"RIFF".to_vec();
    let mut body = b"WEBP".to_vec();
    body.extend_from_slice(b"VP8X");
    body.extend_from_slice(&10u32.to_le_bytes());
    body.extend_from_slice(&[0x02, 0, 0, 0, 15, 0, 0, 15, 0, 0]);
    body.extend_from_slice(b"ANIM");
    body.extend_from_slice(&6u32.to_le_bytes());
    body.extend_from_slice(&[255, 255, 255, 255, 0, 0]);
    empty.extend_from_slice(&(body.len() as u32).to_le_bytes());
    empty.extend_from_slice(&body);
    write(&assets(2).join("2764-fe0f.webp"), &empty);
    // anim-4: a truncated animation and one that is blank in every frame.
    let whole = assets(3).join("whole.tmp");
    write_anim(&whole, 5);
    let bytes = std::fs::read(&whole).unwrap();
    std::fs::remove_file(&whole).unwrap();
    write(
        &assets(3).join("1f9d4-200d-2642-fe0f.webp"),
        &bytes[..bytes.len() / 2],
    );
    let blank = vec![RgbImage::from_pixel(32, 32, image::Rgb([255, 255, 255])); 4];
    encode::write_webp(&assets(3).join("1f1f3-1f1f5.webp"), &blank, 40).unwrap();
}

fn build(
    packages: &Path,
    out: &Path,
    opts: &VideoBuildOptions,
) -> (emoji_video::VideoStats, usize) {
    let done = AtomicUsize::new(0);
    let total = AtomicUsize::new(0);
    let stats = emoji_video::build(packages, out, opts, &|p| match p {
        Progress::Start { total: t } => total.store(t, Ordering::SeqCst),
        Progress::Done => {
            done.fetch_add(1, Ordering::SeqCst);
        }
        Progress::Stage(_) => {}
    })
    .unwrap();
    assert_eq!(
        done.load(Ordering::SeqCst),
        total.load(Ordering::SeqCst),
        "one Done per announced animation"
    );
    (stats, done.load(Ordering::SeqCst))
}

#[test]
fn builder_writes_a_video_manifest_split_by_family() {
    let dir = tempfile::tempdir().unwrap();
    let (packages, out) = (dir.path().join("packages"), dir.path().join("out"));
    fake_packages(&packages);
    let opts = VideoBuildOptions {
        size: 16,
        max_frames: 8,
    };
    let (stats, done) = build(&packages, &out, &opts);

    assert_eq!(stats.concepts, 7);
    assert_eq!(stats.animation_files, 7, "{stats:#?}");
    assert_eq!(done, 7);
    assert_eq!(stats.stills, 1);
    assert_eq!((stats.videos, stats.written), (3, 3));
    let mut failed: Vec<(&str, &str)> = stats
        .failures
        .iter()
        .map(|f| (f.key.as_str(), f.error.as_str()))
        .collect();
    failed.sort();
    assert_eq!(failed.len(), 3, "{failed:?}");
    assert_eq!(failed[0].0, "1f1f3-1f1f5");
    assert!(failed[0].1.contains("flat colour"), "{}", failed[0].1);
    assert_eq!(failed[1].0, "1f9d4-200d-2642");
    assert!(
        failed[1].1.contains("1f9d4-200d-2642-fe0f.webp") && failed[1].1.contains("truncated"),
        "{}",
        failed[1].1
    );
    assert_eq!(failed[2].0, "2764");
    assert!(
        failed[2].1.contains("2764-fe0f.webp") && failed[2].1.contains("no frames"),
        "{}",
        failed[2].1
    );
    assert_eq!(
        (
            stats.videos_by_split.train,
            stats.videos_by_split.val,
            stats.videos_by_split.test
        ),
        (1, 1, 1)
    );
    assert_eq!((stats.source_frames.min, stats.source_frames.max), (4, 20));
    assert_eq!((stats.frames.min, stats.frames.max), (4, 8));
    assert_eq!(stats.packages.len(), 7);
    assert_eq!(stats.packages[3].name, "@lobehub/fluent-emoji-anim-1");
    assert_eq!(stats.packages[4].integrity.as_deref(), Some("sha512-def=="));

    // The manifest is what `data.kind = "video_manifest"` reads: ids are the
    // concept indices, splits follow the families.
    let m = read_manifest(&out.join("manifest.jsonl"), MissingPolicy::Error).unwrap();
    assert!(m.skipped.is_empty());
    let got: Vec<(&str, Split, &str)> = m
        .records
        .iter()
        .map(|r| {
            (
                r.id.as_str(),
                r.split,
                r.video.file_name().unwrap().to_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("0", Split::Test, "1f600.webp"),
            ("3", Split::Train, "1f33a.webp"),
            ("4", Split::Val, "1f32e.webp"),
        ]
    );
    assert_eq!(m.records[0].captions[0], "grinning face");
    let test = read_manifest(&out.join("test.jsonl"), MissingPolicy::Error).unwrap();
    assert_eq!(test.records.len(), 1);
    assert_eq!(test.records[0].id, "0");
    let eval = std::fs::read_to_string(out.join("eval-test.toml")).unwrap();
    assert!(eval.contains("kind = \"video_manifest\"") && eval.contains("test.jsonl"));
    let licenses = std::fs::read_to_string(out.join("LICENSES.md")).unwrap();
    assert!(licenses.contains("MIT") && licenses.contains("LobeHub"));
    assert!(licenses.contains("`@lobehub/fluent-emoji-anim-4@1.0.0`"));

    // The 20-frame hibiscus keeps frames 0, 2, 5, 7, 10, 12, 15, 17 (red
    // levels 10 j), fitted to 16 px, and plays 800 ms like the source.
    let video = out.join("videos/1f33a.webp");
    let frames = decode_frames(
        &video,
        &(0..8).collect::<Vec<_>>(),
        &DecodeOptions::square(16),
    )
    .unwrap();
    let levels: Vec<i32> = frames
        .iter()
        .map(|f| {
            assert_eq!(f.dimensions(), (16, 16));
            i32::from(f.get_pixel(8, 8).0[0])
        })
        .collect();
    for (got, j) in levels.iter().zip([0, 2, 5, 7, 10, 12, 15, 17]) {
        assert!((got - 10 * j).abs() <= 2, "{levels:?}");
    }
    let decoder =
        image::codecs::webp::WebPDecoder::new(BufReader::new(std::fs::File::open(&video).unwrap()))
            .unwrap();
    let delays: Vec<u32> = decoder
        .into_frames()
        .map(|f| {
            let (n, d) = f.unwrap().delay().numer_denom_ms();
            n / d
        })
        .collect();
    assert_eq!(delays, [100; 8]);
    // anim-1's 1f600 (6 frames) won over anim-3's (3 frames).
    let first = decode_frames(
        &out.join("videos/1f600.webp"),
        &[5],
        &DecodeOptions::square(16),
    )
    .unwrap();
    assert!((i32::from(first[0].get_pixel(8, 8).0[0]) - 50).abs() <= 2);

    // A second build keeps every video and writes the same manifest.
    let before = std::fs::read(out.join("manifest.jsonl")).unwrap();
    let (again, _) = build(&packages, &out, &opts);
    assert_eq!((again.videos, again.written), (3, 0));
    assert_eq!(std::fs::read(out.join("manifest.jsonl")).unwrap(), before);
    // A different frame budget rewrites the videos it changes.
    let (fewer, _) = build(
        &packages,
        &out,
        &VideoBuildOptions {
            size: 16,
            max_frames: 5,
        },
    );
    assert_eq!((fewer.videos, fewer.written), (3, 2), "taco has 4 frames");
    assert!(!std::fs::read_dir(out.join("videos")).unwrap().any(|e| e
        .unwrap()
        .path()
        .to_string_lossy()
        .ends_with(".tmp")));
}

#[test]
fn a_missing_animation_package_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let packages = dir.path().join("packages");
    fake_packages(&packages);
    std::fs::remove_dir_all(packages.join(ANIM_PACKAGES[2])).unwrap();
    let e = emoji_video::build(
        &packages,
        &dir.path().join("out"),
        &VideoBuildOptions::default(),
        &|_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("fluent-emoji-anim-3"), "{e}");
}
