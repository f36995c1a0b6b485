//! The emoji benchmark builder on a tiny fake package tree: a few PNGs written
//! here, a few SVGs and an Iconify set. No network.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use cots_data::{image_io, manifest, ImageSource, Split};
use cots_datasets::emoji::{self, BuildOptions, STYLES};

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A 64 px PNG with a transparent background and an opaque disc.
fn write_png(path: &Path, rgb: [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbaImage::from_fn(64, 64, |x, y| {
        let (dx, dy) = (x as f32 - 32.0, y as f32 - 32.0);
        if dx * dx + dy * dy < 20.0 * 20.0 {
            image::Rgba([rgb[0], rgb[1], rgb[2], 255])
        } else {
            image::Rgba([0, 0, 0, 0])
        }
    });
    img.save(path).unwrap();
}

fn svg(fill: &str) -> String {
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 10"><circle cx="5" cy="5" r="4" fill="{fill}"/></svg>"#
    )
}

/// Seven concepts: hibiscus, red heart and a flag (train families), grinning
/// face and the two bearded people (test families: `grinning face`, `beard`),
/// taco (a val family).
fn fake_packages(root: &Path) {
    for (name, version) in [
        ("emojibase-data", "17.0.0"),
        ("emoji-datasource", "16.0.0"),
        ("openmoji", "17.0.0"),
        ("emoji-datasource-google", "16.0.0"),
        ("@iconify-json/fluent-emoji-flat", "1.2.6"),
    ] {
        write(
            &root.join(name).join("package.json"),
            &format!(r#"{{"name": "{name}", "version": "{version}"}}"#),
        );
    }
    write(
        &root.join("integrity.txt"),
        "emojibase-data 17.0.0 sha512-abc==\n",
    );
    write(
        &root.join("emojibase-data/en/data.json"),
        r#"[
          {"label": "grinning face", "hexcode": "1F600", "tags": ["face", "grin"], "group": 0, "subgroup": 0},
          {"label": "man: beard", "hexcode": "1F9D4-200D-2642-FE0F", "tags": ["beard", "man"], "group": 1, "subgroup": 23,
           "skins": [{"label": "man: light skin tone, beard", "hexcode": "1F9D4-1F3FB-200D-2642-FE0F"}]},
          {"label": "woman: beard", "hexcode": "1F9D4-200D-2640-FE0F", "tags": ["beard", "woman"], "group": 1, "subgroup": 23},
          {"label": "hibiscus", "hexcode": "1F33A", "tags": ["flower", "hibiscus", "plant"], "group": 3, "subgroup": 40},
          {"label": "taco", "hexcode": "1F32E", "tags": ["mexican"], "group": 4, "subgroup": 45},
          {"label": "red heart", "hexcode": "2764-FE0F", "tags": ["heart", "love"], "group": 0, "subgroup": 13},
          {"label": "flag: Nepal", "hexcode": "1F1F3-1F1F5", "tags": ["flag"], "group": 9, "subgroup": 99}
        ]"#,
    );
    write(
        &root.join("emojibase-data/meta/groups.json"),
        r#"{"groups": {"0": "smileys-emotion", "1": "people-body", "3": "animals-nature", "4": "food-drink", "9": "flags"},
            "subgroups": {"0": "face-smiling", "13": "heart", "23": "person", "40": "plant-flower", "45": "food-prepared", "99": "country-flag"}}"#,
    );
    write(
        &root.join("emoji-datasource/emoji.json"),
        r#"[
          {"unified": "1F600", "short_names": ["grinning"], "subcategory": "face-smiling"},
          {"unified": "1F33A", "short_names": ["hibiscus"], "subcategory": "plant-flower"},
          {"unified": "2764-FE0F", "short_names": ["heart"], "subcategory": "heart"},
          {"unified": "1F1F3-1F1F5", "short_names": ["flag-np"], "subcategory": "country-flag"}
        ]"#,
    );
    write(
        &root.join("openmoji/data/openmoji.json"),
        r#"[
          {"hexcode": "1F600", "annotation": "grinning face", "tags": "face, grin", "openmoji_tags": "smile, happy"},
          {"hexcode": "1F33A", "annotation": "hibiscus", "tags": "flower", "openmoji_tags": "tropical, google"}
        ]"#,
    );
    let om = root.join("openmoji/color/svg");
    for (file, fill) in [
        ("1F600.svg", "#fc0"),
        ("1F9D4-200D-2640-FE0F.svg", "#a52"),
        ("1F33A.svg", "#e00"),
        ("1F32E.svg", "#fa0"),
    ] {
        write(&om.join(file), &svg(fill));
    }
    let google = root.join("emoji-datasource-google/img/google/64");
    for (file, rgb) in [
        ("1f600.png", [250, 200, 0]),
        ("1f9d4-200d-2642-fe0f.png", [120, 60, 20]),
        ("1f33a.png", [230, 0, 0]),
        ("1f32e.png", [250, 170, 0]),
        ("1f1f3-1f1f5.png", [200, 0, 50]),
        // Not a concept (a skin-tone variant): ignored.
        ("1f9d4-1f3fb-200d-2642-fe0f.png", [1, 2, 3]),
    ] {
        write_png(&google.join(file), rgb);
    }
    // A broken file: its item is left out and listed as a failure.
    write(&google.join("2764-fe0f.png"), "not a png");
    let iconify = root.join("@iconify-json/fluent-emoji-flat");
    write(
        &iconify.join("icons.json"),
        r##"{"prefix": "fluent-emoji-flat", "width": 32, "height": 32, "icons": {
              "hibiscus": {"body": "<circle cx=\"16\" cy=\"16\" r=\"12\" fill=\"#f36\"/>"},
              "smiley": {"body": "<circle cx=\"16\" cy=\"16\" r=\"14\" fill=\"#fd0\"/>"}}}"##,
    );
    write(&iconify.join("chars.json"), r#"{"1f600": "smiley"}"#);
}

fn styles() -> Vec<emoji::Style> {
    STYLES
        .iter()
        .filter(|s| ["google", "openmoji", "fluent-flat"].contains(&s.name))
        .copied()
        .collect()
}

#[test]
fn builder_writes_a_manifest_that_load_jsonl_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (packages, out) = (dir.path().join("packages"), dir.path().join("out"));
    fake_packages(&packages);
    let opts = BuildOptions {
        size: 32,
        styles: styles(),
        ..BuildOptions::default()
    };
    let mut lines = Vec::new();
    let stats = emoji::build(&packages, &out, &opts, &mut |l| lines.push(l.to_string())).unwrap();
    assert!(lines.len() >= 4, "a line per stage: {lines:?}");

    assert_eq!(stats.concepts, 7);
    assert_eq!(
        stats.families, 6,
        "man: beard and woman: beard are one family"
    );
    assert_eq!(
        (
            stats.concepts_by_split.train,
            stats.concepts_by_split.val,
            stats.concepts_by_split.test
        ),
        (3, 1, 3)
    );
    assert_eq!(stats.held_out_styles, ["openmoji"]);
    assert_eq!(stats.failures.len(), 1, "{:?}", stats.failures);
    assert_eq!(
        (
            stats.failures[0].style.as_str(),
            stats.failures[0].key.as_str()
        ),
        ("google", "2764")
    );
    let emojibase = &stats.packages[0];
    assert_eq!(emojibase.version, "17.0.0");
    assert_eq!(emojibase.integrity.as_deref(), Some("sha512-abc=="));

    let data = manifest::load_jsonl(&out.join("manifest.jsonl"), &out).unwrap();
    data.validate().unwrap();
    let path_of = |src: &ImageSource| match src {
        ImageSource::Path(p) => p.clone(),
        other => panic!("{other:?}"),
    };
    let rel: Vec<(String, Split, u32)> = data
        .items
        .iter()
        .map(|it| {
            let p = path_of(&it.source);
            let img = image_io::decode(&p).unwrap();
            assert_eq!(img.dimensions(), (32, 32), "{}", p.display());
            let r = p.strip_prefix(&out).unwrap().to_string_lossy().into_owned();
            (r, it.split, it.id)
        })
        .collect();
    let want: HashSet<(&str, Split)> = [
        ("images/google/1f33a.png", Split::Train),
        ("images/fluent-flat/1f33a.png", Split::Train),
        ("images/google/1f1f3-1f1f5.png", Split::Train),
        ("images/google/1f32e.png", Split::Val),
        ("images/google/1f600.png", Split::Test),
        ("images/google/1f9d4-200d-2642.png", Split::Test),
    ]
    .into_iter()
    .collect();
    let got: HashSet<(&str, Split)> = rel.iter().map(|(p, s, _)| (p.as_str(), *s)).collect();
    assert_eq!(got, want);
    assert_eq!(rel.len(), want.len());

    // One id per concept: shared across styles, never across splits.
    let id_of = |path: &str| rel.iter().find(|(p, _, _)| p == path).unwrap().2;
    assert_eq!(
        id_of("images/google/1f33a.png"),
        id_of("images/fluent-flat/1f33a.png")
    );
    let train_ids: BTreeSet<u32> = rel
        .iter()
        .filter(|r| r.1 == Split::Train)
        .map(|r| r.2)
        .collect();
    assert!(rel
        .iter()
        .filter(|r| r.1 != Split::Train)
        .all(|r| !train_ids.contains(&r.2)));

    let hibiscus = data
        .items
        .iter()
        .find(|it| path_of(&it.source).ends_with("google/1f33a.png"))
        .unwrap();
    assert_eq!(
        hibiscus.captions,
        [
            "hibiscus",
            "hibiscus: flower, plant",
            "hibiscus: tropical",
            "hibiscus, plant flower"
        ]
    );
    // The transparent corner of the PNG is composited over white.
    let img = image_io::decode(&path_of(&hibiscus.source)).unwrap();
    assert_eq!(img.get_pixel(0, 0).0, [255, 255, 255]);
    assert_eq!(img.get_pixel(16, 16).0, [230, 0, 0]);

    // Per-style galleries, the held-out style included: test concepts only.
    for (style, n) in [("google", 2), ("openmoji", 2), ("fluent-flat", 1)] {
        let g = manifest::load_jsonl(&out.join(format!("test-{style}.jsonl")), &out).unwrap();
        assert_eq!(g.items.len(), n, "{style}");
        for it in &g.items {
            assert_eq!(it.split, Split::Test);
            assert!(path_of(&it.source).starts_with(out.join("images").join(style)));
            assert!(!train_ids.contains(&it.id));
            assert!(path_of(&it.source).exists());
        }
    }

    let stats_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats_json["manifest_items"]["train"], 3);
    assert_eq!(stats_json["held_out_styles"][0], "openmoji");
    let licenses = std::fs::read_to_string(out.join("LICENSES.md")).unwrap();
    assert!(licenses.contains("| openmoji | `openmoji@17.0.0` | CC-BY-SA-4.0 |"));
    assert!(licenses.contains("emojibase-data@17.0.0"));

    // A second run renders nothing and writes the same manifest.
    let before = std::fs::read(out.join("manifest.jsonl")).unwrap();
    let again = emoji::build(&packages, &out, &opts, &mut |_| {}).unwrap();
    assert!(again.styles.iter().all(|s| s.rendered == 0), "{again:?}");
    assert_eq!(
        again.styles.iter().map(|s| s.images).sum::<usize>(),
        stats.styles.iter().map(|s| s.images).sum::<usize>()
    );
    assert_eq!(std::fs::read(out.join("manifest.jsonl")).unwrap(), before);
}

#[test]
fn missing_packages_and_bad_options_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let e = emoji::build(
        dir.path(),
        &dir.path().join("out"),
        &BuildOptions::default(),
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("emojibase-data"), "{e}");

    fake_packages(dir.path());
    let held_out_default = BuildOptions {
        styles: styles(),
        default_style: "openmoji".into(),
        ..BuildOptions::default()
    };
    let e = emoji::build(
        dir.path(),
        &dir.path().join("out"),
        &held_out_default,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("held out"), "{e}");
    // The full style list needs packages the fake tree lacks; the error names one.
    let e = emoji::build(
        dir.path(),
        &dir.path().join("out"),
        &BuildOptions::default(),
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("emoji-datasource-twitter"), "{e}");
}
