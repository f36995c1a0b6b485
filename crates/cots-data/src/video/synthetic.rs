//! Can a model tell the order of events apart? An embedded synthetic video set.
//!
//! Short clips (8 frames of 64 px by default) of one shape that moves
//! (left to right, right to left, top to bottom, bottom to top), grows,
//! shrinks, appears, vanishes or changes colour, with captions in which the
//! ORDER matters: "a red circle moves from left to right" against "... from
//! right to left", "a square turns from blue to green" against "from green
//! to blue".
//!
//! Every clip has a twin whose frames are exactly its frames in reverse
//! order and whose caption describes the opposite event. The two hold the
//! same multiset of frames, so temporal mean pooling gives them the same
//! vector and cannot rank the right caption first; an order-aware aggregator
//! (`cots_encoders::temporal`, transformer mode) can. Twins always share a
//! split, so every test clip meets its hard negative in the test gallery.
//!
//! The split is fixed by a stable hash of the twin pair, stratified per kind
//! of event so that each kind has test pairs; the seed only changes the
//! drawings (background, position, size). Clips are listed cheaply and
//! rendered on demand.

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::msrvtt::Split;

/// The shapes drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

/// The colours drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
}

const SHAPES: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];
const COLOURS: [Colour; 4] = [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow];

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

impl Colour {
    fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
        }
    }

    fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 40, 40],
            Colour::Green => [40, 190, 60],
            Colour::Blue => [40, 80, 230],
            Colour::Yellow => [235, 210, 40],
        }
    }
}

/// What happens in a clip.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Event {
    LeftToRight,
    RightToLeft,
    TopToBottom,
    BottomToTop,
    Grows,
    Shrinks,
    Appears,
    Vanishes,
    /// The shape is `from` in the first half and `to` in the second.
    Turns {
        from: Colour,
        to: Colour,
    },
}

impl Event {
    /// The event seen in a time-reversed clip.
    pub fn reversed(self) -> Event {
        match self {
            Event::LeftToRight => Event::RightToLeft,
            Event::RightToLeft => Event::LeftToRight,
            Event::TopToBottom => Event::BottomToTop,
            Event::BottomToTop => Event::TopToBottom,
            Event::Grows => Event::Shrinks,
            Event::Shrinks => Event::Grows,
            Event::Appears => Event::Vanishes,
            Event::Vanishes => Event::Appears,
            Event::Turns { from, to } => Event::Turns { from: to, to: from },
        }
    }

    /// The family of events a twin pair belongs to (the split's strata).
    pub fn family(self) -> &'static str {
        match self {
            Event::LeftToRight | Event::RightToLeft => "horizontal",
            Event::TopToBottom | Event::BottomToTop => "vertical",
            Event::Grows | Event::Shrinks => "size",
            Event::Appears | Event::Vanishes => "visibility",
            Event::Turns { .. } => "colour",
        }
    }

    /// Whether this is the member of its twin pair that is rendered directly
    /// (the other is its reversal).
    fn is_canonical(self) -> bool {
        match self {
            Event::LeftToRight | Event::TopToBottom | Event::Grows | Event::Appears => true,
            Event::Turns { from, to } => (from as u8) < (to as u8),
            _ => false,
        }
    }

    fn slug(self) -> String {
        match self {
            Event::LeftToRight => "left-to-right".into(),
            Event::RightToLeft => "right-to-left".into(),
            Event::TopToBottom => "top-to-bottom".into(),
            Event::BottomToTop => "bottom-to-top".into(),
            Event::Grows => "grows".into(),
            Event::Shrinks => "shrinks".into(),
            Event::Appears => "appears".into(),
            Event::Vanishes => "vanishes".into(),
            Event::Turns { from, to } => format!("turns-{}-{}", from.name(), to.name()),
        }
    }
}

/// One clip of the set, before rendering.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClipSpec {
    pub id: String,
    pub shape: Shape,
    /// The shape's colour (the first colour of a [`Event::Turns`]).
    pub colour: Colour,
    pub event: Event,
    /// Which drawing of the concept (position, size, background) this is.
    pub variant: u32,
    /// The id of the time-reversed clip.
    pub twin: String,
    pub split: Split,
    pub captions: Vec<String>,
}

/// Size and seed of the set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticVideoConfig {
    pub frames: usize,
    pub size: u32,
    /// Drawings per concept.
    pub variants: u32,
    pub seed: u64,
}

impl Default for SyntheticVideoConfig {
    fn default() -> Self {
        Self {
            frames: 8,
            size: 64,
            variants: 2,
            seed: 0,
        }
    }
}

/// Captions of a concept; every one states the order of events.
fn captions(shape: Shape, colour: Colour, event: Event) -> Vec<String> {
    let (s, c) = (shape.name(), colour.name());
    match event {
        Event::LeftToRight => vec![
            format!("a {c} {s} moves from left to right"),
            format!("a {c} {s} slides across to the right"),
        ],
        Event::RightToLeft => vec![
            format!("a {c} {s} moves from right to left"),
            format!("a {c} {s} slides across to the left"),
        ],
        Event::TopToBottom => vec![
            format!("a {c} {s} moves from top to bottom"),
            format!("a {c} {s} falls down"),
        ],
        Event::BottomToTop => vec![
            format!("a {c} {s} moves from bottom to top"),
            format!("a {c} {s} rises up"),
        ],
        Event::Grows => vec![format!("a {c} {s} grows"), format!("a {c} {s} gets bigger")],
        Event::Shrinks => vec![
            format!("a {c} {s} shrinks"),
            format!("a {c} {s} gets smaller"),
        ],
        Event::Appears => vec![
            format!("a {c} {s} appears"),
            format!("a {c} {s} pops into view"),
        ],
        Event::Vanishes => vec![
            format!("a {c} {s} vanishes"),
            format!("a {c} {s} disappears from view"),
        ],
        Event::Turns { from, to } => vec![
            format!("a {} {s} turns {}", from.name(), to.name()),
            format!("a {s} changes colour from {} to {}", from.name(), to.name()),
        ],
    }
}

/// FNV-1a, 64 bit: a hash that never changes between Rust versions.
fn fnv1a(s: &str) -> u64 {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(s.as_bytes());
    h.finish()
}

/// The embedded synthetic text-to-video set.
#[derive(Clone, Debug)]
pub struct SyntheticVideoSet {
    cfg: SyntheticVideoConfig,
    clips: Vec<ClipSpec>,
}

impl SyntheticVideoSet {
    /// Lists every clip (no rendering): 3 shapes x 4 colours x 8 motion
    /// events, plus 3 shapes x 12 ordered colour changes, times `variants`.
    /// About one twin pair in five of each family goes to test.
    pub fn new(cfg: &SyntheticVideoConfig) -> Self {
        let mut concepts = Vec::new();
        for shape in SHAPES {
            for colour in COLOURS {
                for event in [
                    Event::LeftToRight,
                    Event::RightToLeft,
                    Event::TopToBottom,
                    Event::BottomToTop,
                    Event::Grows,
                    Event::Shrinks,
                    Event::Appears,
                    Event::Vanishes,
                ] {
                    concepts.push((shape, colour, event));
                }
                for to in COLOURS.into_iter().filter(|&t| t != colour) {
                    concepts.push((shape, colour, Event::Turns { from: colour, to }));
                }
            }
        }
        let pair_key = |shape: Shape, colour: Colour, event: Event| {
            let (colour, event) = if event.is_canonical() {
                (colour, event)
            } else {
                let r = event.reversed();
                let c = match r {
                    Event::Turns { from, .. } => from,
                    _ => colour,
                };
                (c, r)
            };
            format!("{}-{}-{}", shape.name(), colour.name(), event.slug())
        };
        // Stratified split: within each family, the pairs with the smallest
        // hashes (one in five, rounded up) are the test pairs.
        let mut families: std::collections::BTreeMap<&str, Vec<(u64, String)>> = Default::default();
        for &(shape, colour, event) in &concepts {
            if event.is_canonical() {
                let key = pair_key(shape, colour, event);
                families
                    .entry(event.family())
                    .or_default()
                    .push((fnv1a(&key), key));
            }
        }
        let mut test_pairs = std::collections::HashSet::new();
        for pairs in families.values_mut() {
            pairs.sort();
            let n = pairs.len().div_ceil(5);
            test_pairs.extend(pairs.iter().take(n).map(|(_, k)| k.clone()));
        }
        let id = |shape: Shape, colour: Colour, event: Event, v: u32| {
            let c = match event {
                Event::Turns { .. } => String::new(),
                _ => format!("{}-", colour.name()),
            };
            format!("{c}{}-{}-v{v}", shape.name(), event.slug())
        };
        let mut clips = Vec::new();
        for v in 0..cfg.variants {
            for &(shape, colour, event) in &concepts {
                let twin_event = event.reversed();
                let twin_colour = match twin_event {
                    Event::Turns { from, .. } => from,
                    _ => colour,
                };
                let split = if test_pairs.contains(&pair_key(shape, colour, event)) {
                    Split::Test
                } else {
                    Split::Train
                };
                clips.push(ClipSpec {
                    id: id(shape, colour, event, v),
                    shape,
                    colour,
                    event,
                    variant: v,
                    twin: id(shape, twin_colour, twin_event, v),
                    split,
                    captions: captions(shape, colour, event),
                });
            }
        }
        Self {
            cfg: cfg.clone(),
            clips,
        }
    }

    pub fn config(&self) -> &SyntheticVideoConfig {
        &self.cfg
    }

    pub fn clips(&self) -> &[ClipSpec] {
        &self.clips
    }

    pub fn split(&self, split: Split) -> impl Iterator<Item = &ClipSpec> {
        self.clips.iter().filter(move |c| c.split == split)
    }

    /// Draws a clip: `frames` RGB images of `size` pixels. A non-canonical
    /// clip is its twin's frames reversed, drawn from the same random state.
    pub fn render(&self, clip: &ClipSpec) -> Vec<RgbImage> {
        render_clip(&self.cfg, clip)
    }
}

/// [`SyntheticVideoSet::render`] without the listing: draws `clip` of the set
/// configured by `cfg`.
pub fn render_clip(cfg: &SyntheticVideoConfig, clip: &ClipSpec) -> Vec<RgbImage> {
    let (event, colour, reverse) = if clip.event.is_canonical() {
        (clip.event, clip.colour, false)
    } else {
        let e = clip.event.reversed();
        let c = match e {
            Event::Turns { from, .. } => from,
            _ => clip.colour,
        };
        (e, c, true)
    };
    // The drawing depends on the twin pair and variant, not on which
    // twin is asked for, so that the twins are exact reversals.
    let pair = format!("{}-{}-{}", clip.shape.name(), colour.name(), event.slug());
    let mut rng =
        ChaCha8Rng::seed_from_u64(cfg.seed ^ fnv1a(&pair) ^ (u64::from(clip.variant) << 48));
    let mut frames = draw(cfg, clip.shape, colour, event, &mut rng);
    if reverse {
        frames.reverse();
    }
    frames
}

/// Renders the canonical (forward) member of a twin pair.
fn draw(
    cfg: &SyntheticVideoConfig,
    shape: Shape,
    colour: Colour,
    event: Event,
    rng: &mut ChaCha8Rng,
) -> Vec<RgbImage> {
    let n = cfg.frames.max(1);
    let size = cfg.size.max(8) as f32;
    let bg: [u8; 3] = [
        rng.random_range(20..70),
        rng.random_range(20..70),
        rng.random_range(20..70),
    ];
    let base_r = size * rng.random_range(0.10..0.14);
    let margin = base_r + 2.0;
    let jitter = |rng: &mut ChaCha8Rng| size / 2.0 + rng.random_range(-0.12..0.12) * size;
    let (cx0, cy0) = (jitter(rng), jitter(rng));
    (0..n)
        .map(|t| {
            let p = if n > 1 {
                t as f32 / (n - 1) as f32
            } else {
                0.0
            };
            let (mut cx, mut cy, mut r) = (cx0, cy0, base_r);
            let mut fill = Some(colour.rgb());
            match event {
                Event::LeftToRight => cx = margin + p * (size - 2.0 * margin),
                Event::TopToBottom => cy = margin + p * (size - 2.0 * margin),
                Event::Grows => r = size * (0.05 + 0.2 * p),
                // Absent in the first half, present in the second.
                Event::Appears if 2 * t < n => fill = None,
                Event::Turns { from, to } => {
                    fill = Some(if 2 * t < n { from.rgb() } else { to.rgb() });
                }
                // Non-canonical events are drawn as reversed canonical ones.
                _ => {}
            }
            let mut img = RgbImage::from_pixel(cfg.size, cfg.size, Rgb(bg));
            if let Some(rgb) = fill {
                paint(&mut img, shape, cx, cy, r, Rgb(rgb));
            }
            img
        })
        .collect()
}

fn paint(img: &mut RgbImage, shape: Shape, cx: f32, cy: f32, r: f32, colour: Rgb<u8>) {
    let (w, h) = img.dimensions();
    let x0 = (cx - r).floor().max(0.0) as u32;
    let y0 = (cy - r).floor().max(0.0) as u32;
    let x1 = ((cx + r).ceil() as u32).min(w);
    let y1 = ((cy + r).ceil() as u32).min(h);
    for y in y0..y1 {
        for x in x0..x1 {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let inside = match shape {
                Shape::Circle => dx * dx + dy * dy <= r * r,
                Shape::Square => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
                // Apex up: the half-width grows linearly from the top edge.
                Shape::Triangle => dy >= -r && dy <= r && dx.abs() <= (dy + r) / 2.0,
            };
            if inside {
                img.put_pixel(x, y, colour);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reversal_is_an_involution_and_changes_the_event() {
        for e in [
            Event::LeftToRight,
            Event::Grows,
            Event::Appears,
            Event::Turns {
                from: Colour::Red,
                to: Colour::Blue,
            },
        ] {
            assert_ne!(e.reversed(), e);
            assert_eq!(e.reversed().reversed(), e);
            assert_ne!(e.is_canonical(), e.reversed().is_canonical());
        }
    }
}
