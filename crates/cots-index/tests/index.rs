//! The index against slow, obviously-correct references on fresh random
//! inputs: exact search against a full sort, filters, add/remove/reopen round
//! trips, damaged files, failed writes, int8 re-ranking, the ANN graph.

use std::collections::BTreeMap;
use std::path::Path;

use cots_index::{
    AnnParams, Error, Filter, Hit, Index, Item, ItemKind, Mode, Model, SearchOptions,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn model(dim: usize) -> Model {
    Model {
        weights_hash: "abc123".into(),
        run: "runs/test".into(),
        dim,
    }
}

fn item(id: &str, split: &str) -> Item {
    Item {
        id: id.into(),
        kind: ItemKind::Image,
        path: Some(format!("{id}.png")),
        captions: vec![format!("a picture of {id}")],
        metadata: BTreeMap::from([("split".to_string(), split.to_string())]),
    }
}

/// Vectors whose values are multiples of 1/4 in [-1, 1]: every dot product
/// of them is exact in f32 whatever the summation order, and ties are common.
fn grid_vectors(rng: &mut ChaCha8Rng, n: usize, dim: usize) -> Vec<f32> {
    (0..n * dim)
        .map(|_| rng.random_range(-4i32..=4) as f32 / 4.0)
        .collect()
}

fn unit_vectors(rng: &mut ChaCha8Rng, n: usize, dim: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n * dim).map(|_| rng.random_range(-1.0..1.0)).collect();
    for row in v.chunks_mut(dim) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// The reference: score every row with a plain sum, sort by score
/// (descending) then row, keep the rows `allow` accepts, take k.
fn brute_force(
    vectors: &[f32],
    dim: usize,
    q: &[f32],
    k: usize,
    allow: impl Fn(usize) -> bool,
) -> Vec<(usize, f32)> {
    let mut all: Vec<(usize, f32)> = vectors
        .chunks(dim)
        .enumerate()
        .filter(|(r, _)| allow(*r))
        .map(|(r, v)| (r, v.iter().zip(q).map(|(a, b)| a * b).sum::<f32>()))
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

fn rows_scores(hits: &[Hit]) -> Vec<(usize, f32)> {
    hits.iter().map(|h| (h.row, h.score)).collect()
}

/// An index of `n` grid vectors added in `chunks` calls (so it has several
/// segments), items `item{i}` with split train/test alternating.
fn build(dir: &Path, n: usize, dim: usize, chunks: usize, seed: u64) -> (Index, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let vectors = grid_vectors(&mut rng, n, dim);
    let mut index = Index::create(dir, model(dim)).unwrap();
    let per = n.div_ceil(chunks);
    for (c, vs) in vectors.chunks(per * dim).enumerate() {
        let rows = vs.len() / dim;
        let items = (0..rows)
            .map(|i| {
                let r = c * per + i;
                item(
                    &format!("item{r}"),
                    if r.is_multiple_of(2) { "train" } else { "test" },
                )
            })
            .collect();
        index.add(items, vs, vec![None; rows]).unwrap();
    }
    (index, vectors)
}

#[test]
fn exact_search_equals_a_full_sort_including_ties_and_k_beyond_len() {
    let tmp = tempfile::tempdir().unwrap();
    let dim = 24;
    let (index, vectors) = build(tmp.path(), 3000, dim, 5, 1);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for k in [1, 7, 100, 2999, 3000, 5000] {
        let q = grid_vectors(&mut rng, 1, dim);
        let hits = index.search(&q, k, &SearchOptions::default()).unwrap();
        assert_eq!(
            rows_scores(&hits),
            brute_force(&vectors, dim, &q, k, |_| true),
            "k = {k}"
        );
        for h in &hits {
            assert_eq!(h.id, format!("item{}", h.row));
        }
    }
    // Ties really occur with these vectors: the test exercises the tie-break.
    let q = grid_vectors(&mut rng, 1, dim);
    let all = brute_force(&vectors, dim, &q, 3000, |_| true);
    assert!(all.windows(2).any(|w| w[0].1 == w[1].1));
    assert!(index
        .search(&q, 0, &SearchOptions::default())
        .unwrap()
        .is_empty());
}

#[test]
fn exact_search_on_unit_vectors_matches_within_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    let dim = 64;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let vectors = unit_vectors(&mut rng, 5000, dim);
    let mut index = Index::create(tmp.path(), model(dim)).unwrap();
    let items = (0..5000).map(|i| item(&format!("u{i}"), "x")).collect();
    index.add(items, &vectors, vec![None; 5000]).unwrap();
    for _ in 0..5 {
        let q = unit_vectors(&mut rng, 1, dim);
        let hits = index.search(&q, 20, &SearchOptions::default()).unwrap();
        let want = brute_force(&vectors, dim, &q, 20, |_| true);
        for (h, (r, s)) in hits.iter().zip(&want) {
            assert!((h.score - s).abs() < 1e-5);
            // Rows may swap only where the scores are within rounding.
            if h.row != *r {
                assert!((h.score - s).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn search_batch_equals_one_search_per_query() {
    let tmp = tempfile::tempdir().unwrap();
    let dim = 16;
    let (index, _) = build(tmp.path(), 2500, dim, 3, 7);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let queries = grid_vectors(&mut rng, 9, dim);
    let opts = SearchOptions {
        filter: Filter {
            equals: BTreeMap::from([("split".into(), "test".into())]),
        },
        ..Default::default()
    };
    for opts in [SearchOptions::default(), opts] {
        let batch = index.search_batch(&queries, 13, &opts).unwrap();
        assert_eq!(batch.len(), 9);
        for (q, hits) in queries.chunks(dim).zip(&batch) {
            assert_eq!(hits, &index.search(q, 13, &opts).unwrap());
        }
    }
}

#[test]
fn filters_keep_only_matching_items() {
    let tmp = tempfile::tempdir().unwrap();
    let dim = 16;
    let (index, vectors) = build(tmp.path(), 1500, dim, 2, 11);
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let q = grid_vectors(&mut rng, 1, dim);
    let filter = |split: &str| SearchOptions {
        filter: Filter {
            equals: BTreeMap::from([("split".into(), split.into())]),
        },
        ..Default::default()
    };
    let hits = index.search(&q, 50, &filter("test")).unwrap();
    assert_eq!(
        rows_scores(&hits),
        brute_force(&vectors, dim, &q, 50, |r| r % 2 == 1)
    );
    assert!(index.search(&q, 50, &filter("nowhere")).unwrap().is_empty());
    // Two conditions: both must hold.
    let mut both = filter("test");
    both.filter.equals.insert("kind".into(), "x".into());
    assert!(index.search(&q, 5, &both).unwrap().is_empty());
}

#[test]
fn add_remove_and_reopen_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dim = 8;
    let (mut index, vectors) = build(tmp.path(), 300, dim, 6, 21);
    let thumb = |i: usize| format!("\u{89}PNG fake thumbnail {i}").into_bytes();
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let more = grid_vectors(&mut rng, 4, dim);
    index
        .add(
            (300..304)
                .map(|i| item(&format!("item{i}"), "new"))
                .collect(),
            &more,
            (0..4).map(|i| (i != 2).then(|| thumb(i))).collect(),
        )
        .unwrap();
    assert!(matches!(
        index.add(vec![item("item5", "dup")], &more[..dim], vec![None]),
        Err(Error::DuplicateId(id)) if id == "item5"
    ));
    let removed = index
        .remove(&[
            "item0".into(),
            "item150".into(),
            "item301".into(),
            "item0".into(),
        ])
        .unwrap();
    assert_eq!(removed, 3);
    assert!(matches!(index.remove(&["nope".into()]), Err(Error::UnknownId(id)) if id == "nope"));

    let mut all = vectors.clone();
    all.extend_from_slice(&more);
    let expect_ids: Vec<String> = (0..304)
        .filter(|i| ![0, 150, 301].contains(i))
        .map(|i| format!("item{i}"))
        .collect();
    let expect_vecs: Vec<f32> = (0..304)
        .filter(|i| ![0, 150, 301].contains(i))
        .flat_map(|i| all[i * dim..(i + 1) * dim].to_vec())
        .collect();
    drop(index);

    let index = Index::open(tmp.path()).unwrap();
    assert_eq!(index.len(), expect_ids.len());
    assert_eq!(index.model(), &model(dim));
    let ids: Vec<&str> = index.items().iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, expect_ids);
    for row in 0..index.len() {
        assert_eq!(
            index.vector(row).unwrap(),
            &expect_vecs[row * dim..(row + 1) * dim]
        );
    }
    assert_eq!(index.item("item302").unwrap().0, index.len() - 2);
    assert_eq!(index.item("item302").unwrap().1.metadata["split"], "new");
    assert!(index.item("item301").is_none());
    let (bytes, mime) = index.thumbnail("item303").unwrap().unwrap();
    assert_eq!((bytes, mime), (thumb(3), "application/octet-stream"));
    assert_eq!(index.thumbnail("item302").unwrap(), None);
    assert_eq!(index.thumbnail("item7").unwrap(), None);
    assert!(matches!(
        index.thumbnail("item301"),
        Err(Error::UnknownId(_))
    ));
    // Search after reopening equals the reference over the remaining rows.
    let q = grid_vectors(&mut rng, 1, dim);
    let hits = index.search(&q, 40, &SearchOptions::default()).unwrap();
    assert_eq!(
        rows_scores(&hits),
        brute_force(&expect_vecs, dim, &q, 40, |_| true)
    );
    // Only the files index.json names are left behind.
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with(".tmp")), "{names:?}");
    let meta = std::fs::read_to_string(tmp.path().join("index.json")).unwrap();
    for n in &names {
        assert!(
            n == "index.json" || meta.contains(n.as_str()),
            "stale file {n}"
        );
    }
}

#[test]
fn segments_stay_logarithmic_under_many_small_adds() {
    let tmp = tempfile::tempdir().unwrap();
    let dim = 4;
    let (index, vectors) = build(tmp.path(), 512, dim, 128, 31);
    assert!(index.info().segments <= 10, "{}", index.info().segments);
    let expect: Vec<f32> = (0..512)
        .flat_map(|r| index.vector(r).unwrap().to_vec())
        .collect();
    assert_eq!(expect, vectors);
}

#[test]
fn thumbnails_keep_their_bytes_and_type() {
    let tmp = tempfile::tempdir().unwrap();
    let mut index = Index::create(tmp.path(), model(2)).unwrap();
    let png = b"\x89PNG\r\n\x1a\nrest".to_vec();
    let jpeg = vec![0xff, 0xd8, 0xff, 0xe0, 1, 2, 3];
    index
        .add(
            vec![item("a", "x"), item("b", "x")],
            &[1.0, 0.0, 0.0, 1.0],
            vec![Some(png.clone()), Some(jpeg.clone())],
        )
        .unwrap();
    assert_eq!(index.thumbnail("a").unwrap(), Some((png, "image/png")));
    assert_eq!(index.thumbnail("b").unwrap(), Some((jpeg, "image/jpeg")));
}

#[test]
fn create_refuses_a_non_empty_directory_and_open_a_non_index() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("something"), "x").unwrap();
    assert!(matches!(
        Index::create(tmp.path(), model(4)),
        Err(Error::NotEmpty(_))
    ));
    assert!(matches!(Index::open(tmp.path()), Err(Error::NotAnIndex(_))));
}

#[test]
fn bad_inputs_are_errors_that_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut index = Index::create(tmp.path(), model(3)).unwrap();
    let err = index
        .add(vec![item("a", "x")], &[1.0, f32::NAN, 0.0], vec![None])
        .unwrap_err();
    assert!(err.to_string().contains("`a`"), "{err}");
    assert!(index.add(vec![item("a", "x")], &[1.0], vec![None]).is_err());
    assert!(index
        .add(
            vec![item("a", "x"), item("a", "y")],
            &[0.0; 6],
            vec![None, None]
        )
        .is_err());
    assert!(index
        .search(&[1.0, 2.0], 3, &SearchOptions::default())
        .is_err());
    assert!(index.is_empty());
    assert!(Index::open(tmp.path()).unwrap().is_empty());
}

/// The path of the first file in `dir` whose name starts with `prefix` and
/// ends with `suffix`.
fn file_like(dir: &Path, prefix: &str, suffix: &str) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n.starts_with(prefix) && n.ends_with(suffix)
        })
        .unwrap()
}

#[test]
fn damaged_files_are_errors_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dim = 8;
    let (mut index, _) = build(tmp.path(), 100, dim, 1, 41);
    index
        .add(
            vec![item("t", "x")],
            &[0.5; 8],
            vec![Some(b"\x89PNG\r\n\x1a\nthumbnail".to_vec())],
        )
        .unwrap();
    drop(index);
    let seg = file_like(tmp.path(), "vectors.", ".safetensors");
    let thumbs = file_like(tmp.path(), "thumbs.", ".bin");
    let meta = tmp.path().join("index.json");
    let expect_error_naming = |damaged: &Path| {
        let err = Index::open(tmp.path()).err().expect("opening should fail");
        let name = damaged.file_name().unwrap().to_str().unwrap();
        assert!(err.to_string().contains(name), "{err} does not name {name}");
    };

    let good = std::fs::read(&seg).unwrap();
    std::fs::write(&seg, &good[..good.len() - 5]).unwrap();
    expect_error_naming(&seg);
    std::fs::write(&seg, &good[..6]).unwrap();
    expect_error_naming(&seg);
    std::fs::write(&seg, &good).unwrap();

    let good_thumbs = std::fs::read(&thumbs).unwrap();
    std::fs::write(&thumbs, &good_thumbs[..3]).unwrap();
    expect_error_naming(&thumbs);
    std::fs::write(&thumbs, &good_thumbs).unwrap();

    let good_meta = std::fs::read(&meta).unwrap();
    std::fs::write(&meta, &good_meta[..good_meta.len() / 2]).unwrap();
    expect_error_naming(&meta);
    std::fs::write(&meta, &good_meta).unwrap();

    std::fs::remove_file(&seg).unwrap();
    expect_error_naming(&seg);
    std::fs::write(&seg, &good).unwrap();

    let mut index = Index::open(tmp.path()).unwrap();
    assert_eq!(index.len(), 101);
    index.build_ann(AnnParams::default()).unwrap();
    drop(index);
    let graph = file_like(tmp.path(), "ann.", ".usearch");
    let good_graph = std::fs::read(&graph).unwrap();
    std::fs::write(&graph, &good_graph[..good_graph.len() / 2]).unwrap();
    expect_error_naming(&graph);
    std::fs::write(&graph, &good_graph[..10]).unwrap();
    expect_error_naming(&graph);
    std::fs::write(&graph, &good_graph).unwrap();
    assert_eq!(Index::open(tmp.path()).unwrap().len(), 101);
}

#[test]
fn a_newer_format_is_reported_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    build(tmp.path(), 10, 4, 1, 43);
    let meta = tmp.path().join("index.json");
    let text = std::fs::read_to_string(&meta).unwrap();
    std::fs::write(&meta, text.replacen("\"format\":1", "\"format\":99", 1)).unwrap();
    assert!(matches!(
        Index::open(tmp.path()),
        Err(Error::Version { found: 99, .. })
    ));
}

/// The names the next few data files will get (from the counter in index.json).
fn next_file_names(dir: &Path, prefix: &str, suffix: &str) -> Vec<String> {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let n = meta["next_file"].as_u64().unwrap();
    (n..n + 4)
        .map(|i| format!("{prefix}.{i:06}{suffix}"))
        .collect()
}

#[test]
fn a_failed_write_leaves_the_old_index_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let dim = 8;
    let (mut index, vectors) = build(tmp.path(), 200, dim, 2, 51);
    let before: Vec<String> = index.items().iter().map(|i| i.id.clone()).collect();
    // Block the names the next segment can be renamed to: the write fails
    // after its temp file is complete (and after the thumbnails were
    // appended), the way a full disk or a crash would stop it before the
    // commit.
    let blockers: Vec<_> = next_file_names(tmp.path(), "vectors", ".safetensors")
        .into_iter()
        .map(|n| tmp.path().join(n))
        .collect();
    for b in &blockers {
        std::fs::create_dir(b).unwrap();
        std::fs::write(b.join("keep"), "x").unwrap();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(52);
    let more = grid_vectors(&mut rng, 3, dim);
    let err = index
        .add(
            (0..3).map(|i| item(&format!("new{i}"), "x")).collect(),
            &more,
            vec![Some(b"thumb".to_vec()); 3],
        )
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(index.remove(&["item3".into()]).is_err());
    // The handle and a fresh open both still see the old index.
    for idx in [&index, &Index::open(tmp.path()).unwrap()] {
        let ids: Vec<String> = idx.items().iter().map(|i| i.id.clone()).collect();
        assert_eq!(ids, before);
        let q = &vectors[..dim];
        let hits = idx.search(q, 5, &SearchOptions::default()).unwrap();
        assert_eq!(
            rows_scores(&hits),
            brute_force(&vectors, dim, q, 5, |_| true)
        );
    }
    // Once the obstacle is gone the same change succeeds.
    for b in &blockers {
        std::fs::remove_dir_all(b).unwrap();
    }
    index
        .add(
            (0..3).map(|i| item(&format!("new{i}"), "x")).collect(),
            &more,
            vec![Some(b"thumb".to_vec()); 3],
        )
        .unwrap();
    let reopened = Index::open(tmp.path()).unwrap();
    assert_eq!(reopened.len(), 203);
    assert_eq!(reopened.thumbnail("new2").unwrap().unwrap().0, b"thumb");
}

#[test]
fn leftovers_of_an_interrupted_write_are_ignored_then_cleaned() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut index, _) = build(tmp.path(), 50, 4, 1, 61);
    drop(index);
    // What a crash between writing data files and the commit leaves.
    std::fs::write(tmp.path().join("vectors.000900.safetensors"), b"partial").unwrap();
    std::fs::write(tmp.path().join(".tmp-abc"), b"partial").unwrap();
    index = Index::open(tmp.path()).unwrap();
    assert_eq!(index.len(), 50);
    index.remove(&["item1".into()]).unwrap();
    assert!(!tmp.path().join("vectors.000900.safetensors").exists());
    assert!(!tmp.path().join(".tmp-abc").exists());
}

#[test]
fn quantized_search_is_exact_reranking_of_the_int8_short_list() {
    let tmp = tempfile::tempdir().unwrap();
    let dim = 32;
    let mut rng = ChaCha8Rng::seed_from_u64(71);
    let vectors = unit_vectors(&mut rng, 4000, dim);
    let mut index = Index::create(tmp.path(), model(dim)).unwrap();
    let items: Vec<Item> = (0..4000)
        .map(|i| item(&format!("q{i}"), if i % 3 == 0 { "a" } else { "b" }))
        .collect();
    index
        .add(
            items[..2500].to_vec(),
            &vectors[..2500 * dim],
            vec![None; 2500],
        )
        .unwrap();
    let q = unit_vectors(&mut rng, 1, dim);
    let mode = |shortlist| SearchOptions {
        mode: Mode::Quantized { shortlist },
        ..Default::default()
    };
    assert!(matches!(
        index.search(&q, 5, &mode(50)),
        Err(Error::NotQuantized(_))
    ));
    index.quantize().unwrap();
    // Rows added after quantizing get codes too.
    index
        .add(
            items[2500..].to_vec(),
            &vectors[2500 * dim..],
            vec![None; 1500],
        )
        .unwrap();
    let index = Index::open(tmp.path()).unwrap();
    assert!(index.is_quantized());
    for _ in 0..5 {
        let q = unit_vectors(&mut rng, 1, dim);
        // A short list of every row re-ranks to the exact answer.
        let exact = index.search(&q, 10, &SearchOptions::default()).unwrap();
        assert_eq!(index.search(&q, 10, &mode(4000)).unwrap(), exact);
        // A short list of 100: every hit carries its exact f32 score, in
        // order, and the int8 scan finds nearly all of the true top 10.
        let hits = index.search(&q, 10, &mode(100)).unwrap();
        for h in &hits {
            let v = &vectors[h.row * dim..(h.row + 1) * dim];
            let s: f32 = v.iter().zip(&q).map(|(a, b)| a * b).sum();
            assert!((h.score - s).abs() < 1e-5);
        }
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        let found = hits.iter().filter(|h| exact.contains(h)).count();
        assert!(found >= 9, "int8 short list found {found}/10");
        // Filters apply to the short list.
        let mut f = mode(100);
        f.filter.equals.insert("split".into(), "a".into());
        let hits = index.search(&q, 10, &f).unwrap();
        assert!(hits.iter().all(|h| h.row % 3 == 0));
    }
}

/// Unit vectors around `clusters` random centres.
fn clustered(rng: &mut ChaCha8Rng, n: usize, dim: usize, clusters: usize, noise: f32) -> Vec<f32> {
    let centres = unit_vectors(rng, clusters, dim);
    let mut v = Vec::with_capacity(n * dim);
    for i in 0..n {
        let c = &centres[(i % clusters) * dim..][..dim];
        let mut row: Vec<f32> = c
            .iter()
            .map(|x| x + noise * rng.random_range(-1.0f32..1.0) / (dim as f32).sqrt())
            .collect();
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= norm);
        v.extend(row);
    }
    v
}

#[test]
fn approximate_search_has_high_recall_and_follows_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let dim = 32;
    let n = 5000;
    let mut rng = ChaCha8Rng::seed_from_u64(81);
    let all = clustered(&mut rng, n + 200, dim, 50, 1.5);
    let (vectors, later) = all.split_at(n * dim);
    let mut index = Index::create(tmp.path(), model(dim)).unwrap();
    let items: Vec<Item> = (0..n + 200)
        .map(|i| item(&format!("p{i}"), if i % 2 == 0 { "even" } else { "odd" }))
        .collect();
    index
        .add(items[..n].to_vec(), vectors, vec![None; n])
        .unwrap();
    let approx = SearchOptions {
        mode: Mode::Approximate { ef: 64 },
        ..Default::default()
    };
    assert!(matches!(
        index.search(&vectors[..dim], 10, &approx),
        Err(Error::NoAnn(_))
    ));
    index.build_ann(AnnParams::default()).unwrap();
    let queries = clustered(&mut rng, 100, dim, 50, 1.5);
    let recall = |index: &Index, opts: &SearchOptions| -> f64 {
        let mut exact_opts = opts.clone();
        exact_opts.mode = Mode::Exact;
        let mut found = 0;
        for q in queries.chunks(dim) {
            let want = index.search(q, 10, &exact_opts).unwrap();
            let got = index.search(q, 10, opts).unwrap();
            for h in &got {
                let v = index.vector(h.row).unwrap();
                let s: f32 = v.iter().zip(q).map(|(a, b)| a * b).sum();
                assert!((h.score - s).abs() < 1e-5, "scores are exact dot products");
            }
            found += got
                .iter()
                .filter(|h| want.iter().any(|w| w.row == h.row))
                .count();
        }
        found as f64 / (10 * queries.len() / dim) as f64
    };
    let r = recall(&index, &approx);
    assert!(r >= 0.9, "recall@10 {r}");
    // Reopened: the graph is loaded from disk.
    drop(index);
    let mut index = Index::open(tmp.path()).unwrap();
    assert!(recall(&index, &approx) >= 0.9);
    // Filtered.
    let mut filtered = approx.clone();
    filtered.filter.equals.insert("split".into(), "odd".into());
    assert!(recall(&index, &filtered) >= 0.9);
    for h in index.search(&queries[..dim], 10, &filtered).unwrap() {
        assert_eq!(index.items()[h.row].metadata["split"], "odd");
    }
    // Rows added after the build are found (searched exactly); removed rows never are.
    index
        .add(items[n..].to_vec(), later, vec![None; 200])
        .unwrap();
    let hits = index.search(&later[..dim], 1, &approx).unwrap();
    assert_eq!(hits[0].id, format!("p{n}"));
    let gone: Vec<String> = index
        .search(&queries[..dim], 10, &approx)
        .unwrap()
        .into_iter()
        .map(|h| h.id)
        .collect();
    index.remove(&gone).unwrap();
    let after = index.search(&queries[..dim], 10, &approx).unwrap();
    assert!(after.iter().all(|h| !gone.contains(&h.id)));
    assert!(recall(&index, &approx) >= 0.9);
    assert_eq!(index.info().ann.unwrap().tombstones, 10);
    let index = Index::open(tmp.path()).unwrap();
    assert!(recall(&index, &approx) >= 0.9);
}

#[test]
fn index_is_send_and_sync() {
    fn is<T: Send + Sync>() {}
    is::<Index>();
}

#[cfg(feature = "parquet")]
#[test]
fn parquet_export_reads_back_with_the_same_ids_and_vectors() {
    use arrow_array::{Array, FixedSizeListArray, Float32Array, ListArray, StringArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    let tmp = tempfile::tempdir().unwrap();
    let dim = 12;
    let dir = tmp.path().join("index");
    let (mut index, _) = build(&dir, 9000, dim, 2, 91);
    index.remove(&["item4".into()]).unwrap();
    let out = tmp.path().join("gallery.parquet");
    index.export_parquet(&out).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&out).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let mut row = 0;
    for batch in reader {
        let batch = batch.unwrap();
        let col = |name: &str| batch.column_by_name(name).unwrap().clone();
        let ids = col("id");
        let ids = ids.as_any().downcast_ref::<StringArray>().unwrap();
        let vectors = col("vector");
        let vectors = vectors
            .as_any()
            .downcast_ref::<FixedSizeListArray>()
            .unwrap();
        let captions = col("captions");
        let captions = captions.as_any().downcast_ref::<ListArray>().unwrap();
        let metadata = col("metadata");
        let metadata = metadata.as_any().downcast_ref::<StringArray>().unwrap();
        for i in 0..batch.num_rows() {
            let item = &index.items()[row];
            assert_eq!(ids.value(i), item.id);
            let v = vectors.value(i);
            let v = v.as_any().downcast_ref::<Float32Array>().unwrap();
            assert_eq!(v.values().as_ref(), index.vector(row).unwrap());
            let c = captions.value(i);
            let c = c.as_any().downcast_ref::<StringArray>().unwrap();
            assert_eq!(c.value(0), item.captions[0]);
            let m: BTreeMap<String, String> = serde_json::from_str(metadata.value(i)).unwrap();
            assert_eq!(m, item.metadata);
            row += 1;
        }
    }
    assert_eq!(row, index.len());
}

#[test]
fn many_threads_can_search_the_graph_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dim = 16;
    let mut rng = ChaCha8Rng::seed_from_u64(101);
    let vectors = unit_vectors(&mut rng, 2000, dim);
    let mut index = Index::create(tmp.path(), model(dim)).unwrap();
    let items = (0..2000).map(|i| item(&format!("c{i}"), "x")).collect();
    index.add(items, &vectors, vec![None; 2000]).unwrap();
    index.build_ann(AnnParams::default()).unwrap();
    let index = Index::open(tmp.path()).unwrap();
    let opts = SearchOptions {
        mode: Mode::Approximate { ef: 64 },
        ..Default::default()
    };
    // More concurrent searches than usearch has contexts (one per core):
    // the surplus waits instead of failing.
    std::thread::scope(|s| {
        for t in 0..16 {
            let (index, opts, vectors) = (&index, &opts, &vectors);
            s.spawn(move || {
                for i in 0..50 {
                    let r = (t * 50 + i) % 2000;
                    let hits = index
                        .search(&vectors[r * dim..(r + 1) * dim], 5, opts)
                        .unwrap();
                    assert_eq!(hits.len(), 5);
                }
            });
        }
    });
}

#[test]
fn two_builds_of_one_graph_are_identical() {
    // Several segments (two adds) and a removal: the build's order must be
    // fixed by the rows, not by how they were added or by thread timing.
    let dim = 16;
    let n = 3000;
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let vectors = clustered(&mut rng, n, dim, 30, 1.0);
    let queries = clustered(&mut rng, 50, dim, 30, 1.0);
    let build_once = |dir: &Path| -> (Vec<u8>, Vec<Vec<Hit>>) {
        let mut index = Index::create(dir, model(dim)).unwrap();
        let items: Vec<Item> = (0..n).map(|i| item(&format!("g{i}"), "test")).collect();
        let half = n / 2;
        index
            .add(
                items[..half].to_vec(),
                &vectors[..half * dim],
                vec![None; half],
            )
            .unwrap();
        index
            .add(
                items[half..].to_vec(),
                &vectors[half * dim..],
                vec![None; n - half],
            )
            .unwrap();
        index.remove(&["g7".to_string()]).unwrap();
        index.build_ann(AnnParams::default()).unwrap();
        let graph = std::fs::read(file_like(dir, "ann.", ".usearch")).unwrap();
        let opts = SearchOptions {
            mode: Mode::Approximate { ef: 16 },
            ..SearchOptions::default()
        };
        let hits = queries
            .chunks(dim)
            .map(|q| index.search(q, 10, &opts).unwrap())
            .collect();
        (graph, hits)
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (graph_a, hits_a) = build_once(a.path());
    let (graph_b, hits_b) = build_once(b.path());
    assert!(graph_a == graph_b, "the two graph files differ");
    assert_eq!(hits_a, hits_b);
}

#[test]
fn the_thumbnail_size_is_recorded_and_survives_reopening() {
    let tmp = tempfile::tempdir().unwrap();
    let mut index = Index::create(tmp.path(), model(4)).unwrap();
    assert_eq!(index.thumb_size(), None);
    index.set_thumb_size(Some(128)).unwrap();
    drop(index);
    let index = Index::open(tmp.path()).unwrap();
    assert_eq!(index.thumb_size(), Some(128));
    assert_eq!(index.info().thumb_size, Some(128));
    assert!(index.info().to_string().contains("128 px"));
}

#[test]
fn search_modes_read_as_phrases() {
    assert_eq!(Mode::Exact.to_string(), "exact search");
    assert_eq!(
        Mode::Approximate { ef: 128 }.to_string(),
        "approximate search, HNSW graph keeping 128 candidates"
    );
    assert_eq!(
        Mode::Quantized { shortlist: 50 }.to_string(),
        "int8 scan for 50 candidates, re-ranked exactly"
    );
}
