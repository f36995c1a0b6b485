//! The embedded synthetic dataset: which pairs can the demo train on with no
//! download?
//!
//! Scenes of one or two coloured shapes, rendered directly into an RGB buffer,
//! with several paraphrased captions each. Two-shape scenes carry a spatial
//! relation, so a caption binds colours and sizes to shapes and shapes to
//! places: "a red circle left of a blue square" and "a blue circle left of a
//! red square" use the same words.
//!
//! Splits are made by *family*: the scenes that share their multiset of
//! shapes, multiset of colours, sizes and relation axis. A test family holds
//! every colour swap and position swap of its scenes, so each test scene has
//! hard negatives in the test gallery that differ from it in one binding and
//! that bag-of-words cannot tell apart; no member of a test family is ever
//! seen in training. Everything is a pure function of the seed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::Split;

pub const COLORS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 180, 60]),
    ("blue", [50, 80, 230]),
    ("yellow", [235, 215, 40]),
    ("purple", [150, 60, 200]),
    ("white", [240, 240, 240]),
];
pub const SHAPES: [&str; 5] = ["circle", "square", "triangle", "diamond", "cross"];
pub const SIZES: [&str; 2] = ["small", "large"];
const BACKGROUND: [u8; 3] = [30, 30, 36];

/// One shape of a scene.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Object {
    pub shape: u8,
    pub color: u8,
    pub size: u8,
}

impl Object {
    fn words(&self) -> (&'static str, &'static str, &'static str) {
        (
            SIZES[self.size as usize],
            COLORS[self.color as usize].0,
            SHAPES[self.shape as usize],
        )
    }
    fn phrase(&self) -> String {
        let (s, c, h) = self.words();
        format!("{s} {c} {h}")
    }
}

/// Where the second object is relative to the first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Relation {
    /// `a` is left of `b`.
    LeftOf,
    /// `a` is above `b`.
    Above,
}

/// What a scene shows; rendering adds seeded jitter on top.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scene {
    One(Object),
    Two { a: Object, b: Object, rel: Relation },
}

impl Scene {
    /// The key shared by every colour swap and position swap of this scene.
    pub fn family(&self) -> String {
        match self {
            Scene::One(o) => format!("one:{}:{}:{}", o.shape, o.color, o.size),
            Scene::Two { a, b, rel } => {
                let mut shapes = [a.shape, b.shape];
                shapes.sort();
                let mut colors = [a.color, b.color];
                colors.sort();
                let mut sizes = [a.size, b.size];
                sizes.sort();
                format!("two:{shapes:?}:{colors:?}:{sizes:?}:{rel:?}")
            }
        }
    }

    /// Captions: several paraphrases of the same content.
    pub fn captions(&self) -> Vec<String> {
        match self {
            Scene::One(o) => {
                let (s, c, h) = o.words();
                vec![
                    format!("a {s} {c} {h}"),
                    format!("one {c} {h}, {s}"),
                    format!("a single {s} {h} in {c}"),
                ]
            }
            Scene::Two { a, b, rel } => {
                let (pa, pb) = (a.phrase(), b.phrase());
                let (ha, hb) = (SHAPES[a.shape as usize], SHAPES[b.shape as usize]);
                let (ca, cb) = (COLORS[a.color as usize].0, COLORS[b.color as usize].0);
                let (fwd, back, side) = match rel {
                    Relation::LeftOf => ("left of", "right of", "left"),
                    Relation::Above => ("above", "below", "top"),
                };
                vec![
                    format!("a {pa} {fwd} a {pb}"),
                    format!("a {pb} {back} a {pa}"),
                    format!("a {ca} {ha} and a {cb} {hb}, the {ca} one on the {side}"),
                ]
            }
        }
    }
}

/// Every word a caption can use, for building a vocabulary.
pub fn vocabulary() -> Vec<String> {
    let mut words: Vec<String> = [
        "a", "one", "single", "in", "and", "the", "on", "left", "right", "of", "above", "below",
        "top", ",",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    words.extend(COLORS.iter().map(|c| c.0.to_string()));
    words.extend(SHAPES.iter().map(|s| s.to_string()));
    words.extend(SIZES.iter().map(|s| s.to_string()));
    words
}

/// Which split a family belongs to: a hash of its key, so it never changes
/// with the number of scenes generated.
pub fn family_split(family: &str, seed: u64) -> Split {
    // FNV-1a over the key, its offset basis mixed with the seed.
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::with_key(0xcbf2_9ce4_8422_2325 ^ seed);
    h.write(family.as_bytes());
    match h.finish() % 20 {
        0 | 1 => Split::Test,
        2 => Split::Val,
        _ => Split::Train,
    }
}

fn random_object(rng: &mut ChaCha8Rng) -> Object {
    Object {
        shape: rng.random_range(0..SHAPES.len()) as u8,
        color: rng.random_range(0..COLORS.len()) as u8,
        size: rng.random_range(0..SIZES.len()) as u8,
    }
}

/// A random scene (one object in one of ten scenes).
pub fn random_scene(rng: &mut ChaCha8Rng) -> Scene {
    if rng.random_range(0..10) == 0 {
        return Scene::One(random_object(rng));
    }
    let a = random_object(rng);
    let mut b = random_object(rng);
    // Two identical objects make "left of" symmetric; keep the scene unambiguous.
    while b.shape == a.shape && b.color == a.color {
        b = random_object(rng);
    }
    let rel = if rng.random_bool(0.5) {
        Relation::LeftOf
    } else {
        Relation::Above
    };
    Scene::Two { a, b, rel }
}

/// The scenes that differ from `scene` in exactly one binding: the colours
/// swapped between the two shapes, and the two positions swapped.
pub fn hard_negatives(scene: &Scene) -> Vec<Scene> {
    match scene {
        Scene::One(_) => Vec::new(),
        Scene::Two { a, b, rel } => {
            let mut out = Vec::new();
            if a.color != b.color {
                let (mut a2, mut b2) = (*a, *b);
                std::mem::swap(&mut a2.color, &mut b2.color);
                out.push(Scene::Two {
                    a: a2,
                    b: b2,
                    rel: *rel,
                });
            }
            out.push(Scene::Two {
                a: *b,
                b: *a,
                rel: *rel,
            });
            out
        }
    }
}

/// An RGB image, row-major, 3 bytes per pixel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

fn inside(shape: u8, dx: f32, dy: f32, r: f32) -> bool {
    let (ax, ay) = (dx.abs(), dy.abs());
    match shape {
        0 => dx * dx + dy * dy <= r * r,
        1 => ax <= r * 0.85 && ay <= r * 0.85,
        // Upward triangle: apex at -r, base at +r.
        2 => dy <= r && dy >= -r && ax <= (dy + r) * 0.55,
        3 => ax + ay <= r,
        _ => (ax <= r * 0.3 && ay <= r) || (ay <= r * 0.3 && ax <= r),
    }
}

/// Renders `scene` at `size` x `size` pixels; `seed` picks the jitter.
///
/// Positions respect the relation with a margin, so the caption stays true.
pub fn render(scene: &Scene, size: usize, seed: u64) -> Rgb {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let s = size as f32;
    let mut img = Rgb {
        width: size,
        height: size,
        data: BACKGROUND.repeat(size * size),
    };
    let radius = |o: &Object| if o.size == 0 { 0.12 * s } else { 0.2 * s };
    let mut jitter = |lo: f32, hi: f32| rng.random_range(lo..hi) * s;
    let placed: Vec<(Object, f32, f32)> = match scene {
        Scene::One(o) => vec![(*o, jitter(0.35, 0.65), jitter(0.35, 0.65))],
        Scene::Two { a, b, rel } => {
            let (along_a, along_b) = (jitter(0.22, 0.3), jitter(0.7, 0.78));
            let (cross_a, cross_b) = (jitter(0.3, 0.7), jitter(0.3, 0.7));
            match rel {
                Relation::LeftOf => vec![(*a, along_a, cross_a), (*b, along_b, cross_b)],
                Relation::Above => vec![(*a, cross_a, along_a), (*b, cross_b, along_b)],
            }
        }
    };
    for (o, cx, cy) in placed {
        let r = radius(&o);
        let color = COLORS[o.color as usize].1;
        let (x0, x1) = (
            (cx - r).floor().max(0.0) as usize,
            ((cx + r).ceil() as usize).min(size),
        );
        let (y0, y1) = (
            (cy - r).floor().max(0.0) as usize,
            ((cy + r).ceil() as usize).min(size),
        );
        for y in y0..y1 {
            for x in x0..x1 {
                if inside(o.shape, x as f32 + 0.5 - cx, y as f32 + 0.5 - cy, r) {
                    let p = (y * size + x) * 3;
                    img.data[p..p + 3].copy_from_slice(&color);
                }
            }
        }
    }
    img
}

/// Sizes and seed of the generated dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticConfig {
    pub seed: u64,
    /// Training images (drawn from training families, with repeats of a
    /// scene rendered with different jitter).
    pub train: usize,
    /// Validation images.
    pub val: usize,
    /// Test scenes (each with its hard negatives added to the test gallery).
    pub test: usize,
    pub image_size: usize,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            train: 20_000,
            val: 200,
            test: 300,
            image_size: 64,
        }
    }
}

/// Generates `n` distinct scenes of `split` (test scenes come with their hard
/// negatives, which are counted in `n`).
pub fn scenes(cfg: &SyntheticConfig, split: Split, n: usize) -> Vec<Scene> {
    let salt = match split {
        Split::Train => 1,
        Split::Val => 2,
        Split::Test => 3,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_mul(31).wrapping_add(salt));
    let mut out: Vec<Scene> = Vec::with_capacity(n);
    let mut seen = std::collections::HashSet::new();
    let mut attempts = 0usize;
    while out.len() < n && attempts < n * 1000 + 10_000 {
        attempts += 1;
        let scene = random_scene(&mut rng);
        if family_split(&scene.family(), cfg.seed) != split {
            continue;
        }
        let group: Vec<Scene> = if split == Split::Train {
            vec![scene]
        } else {
            std::iter::once(scene.clone())
                .chain(hard_negatives(&scene))
                .collect()
        };
        for s in group {
            // Train repeats scenes (new jitter each time); evaluation galleries
            // hold each scene once so that every caption has one right answer.
            if out.len() < n && (split == Split::Train || seen.insert(s.clone())) {
                out.push(s);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The split hash must never change (it decides which scenes are
    /// test): FNV-1a with the seed mixed into its offset basis, written out
    /// byte by byte, on seeded random keys and seeds.
    #[test]
    fn family_split_is_fnv1a_with_a_seeded_basis() {
        use rand::{Rng, SeedableRng};
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..200 {
            let len = rng.random_range(0..24);
            let key: String = (0..len).map(|_| rng.random_range('a'..='z')).collect();
            let seed: u64 = rng.random();
            let h = key.bytes().fold(0xcbf2_9ce4_8422_2325 ^ seed, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            });
            let want = match h % 20 {
                0 | 1 => Split::Test,
                2 => Split::Val,
                _ => Split::Train,
            };
            assert_eq!(family_split(&key, seed), want, "{key} {seed}");
        }
    }

    #[test]
    fn generation_is_deterministic() {
        let cfg = SyntheticConfig::default();
        let a = scenes(&cfg, Split::Test, 50);
        let b = scenes(&cfg, Split::Test, 50);
        assert_eq!(a, b);
        assert_eq!(render(&a[3], 64, 9), render(&b[3], 64, 9));
        assert_ne!(render(&a[3], 64, 9), render(&a[3], 64, 10));
    }

    #[test]
    fn splits_are_disjoint_by_family() {
        let cfg = SyntheticConfig::default();
        let train: std::collections::HashSet<String> = scenes(&cfg, Split::Train, 3000)
            .iter()
            .map(|s| s.family())
            .collect();
        for s in scenes(&cfg, Split::Test, 200) {
            assert!(!train.contains(&s.family()), "{:?} leaks into train", s);
            assert_eq!(family_split(&s.family(), cfg.seed), Split::Test);
        }
    }

    #[test]
    fn hard_negatives_differ_in_one_binding_and_share_the_words() {
        let cfg = SyntheticConfig::default();
        for s in scenes(&cfg, Split::Test, 100) {
            for neg in hard_negatives(&s) {
                assert_ne!(neg, s);
                assert_eq!(neg.family(), s.family());
                let mut w1: Vec<String> = s.captions()[0].split(' ').map(String::from).collect();
                let mut w2: Vec<String> = neg.captions()[0].split(' ').map(String::from).collect();
                w1.sort();
                w2.sort();
                // Same words, different bindings: bag-of-words cannot separate them.
                assert_eq!(w1, w2, "{s:?} vs {neg:?}");
            }
        }
    }

    #[test]
    fn pixels_at_shape_centres_have_the_caption_colours() {
        let a = Object {
            shape: 1,
            color: 0,
            size: 1,
        };
        let b = Object {
            shape: 0,
            color: 2,
            size: 1,
        };
        let scene = Scene::Two {
            a,
            b,
            rel: Relation::LeftOf,
        };
        for seed in 0..20 {
            let img = render(&scene, 64, seed);
            let px = |x: usize, y: usize| {
                let p = (y * 64 + x) * 3;
                [img.data[p], img.data[p + 1], img.data[p + 2]]
            };
            // The left third contains red and no blue; the right third the reverse.
            let left: Vec<[u8; 3]> = (0..64)
                .flat_map(|y| (0..21).map(move |x| (x, y)))
                .map(|(x, y)| px(x, y))
                .collect();
            let right: Vec<[u8; 3]> = (0..64)
                .flat_map(|y| (43..64).map(move |x| (x, y)))
                .map(|(x, y)| px(x, y))
                .collect();
            assert!(left.contains(&COLORS[0].1) && !left.contains(&COLORS[2].1));
            assert!(right.contains(&COLORS[2].1) && !right.contains(&COLORS[0].1));
        }
    }

    #[test]
    fn vocabulary_covers_every_caption() {
        let vocab: std::collections::HashSet<String> = vocabulary().into_iter().collect();
        for s in scenes(&SyntheticConfig::default(), Split::Train, 500) {
            for c in s.captions() {
                for w in c.replace(',', " , ").split_whitespace() {
                    assert!(vocab.contains(w), "`{w}` of `{c}` is not in the vocabulary");
                }
            }
        }
    }
}
