//! The adaptive momentum filter's rank rule: against a slow reference, on
//! constructed momentum keys where the noisy pairs are known, and on a clean
//! batch.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use cots_objectives::amf::{detection, mean_ranks, AdaptiveMomentumFilter, AmfConfig, AmfRule};
use cots_objectives::queue::QueueView;
use cots_ops::queue::EMPTY_SLOT;
use rand::Rng;

fn gaussian_unit(r: &mut impl Rng, e: usize) -> Vec<f64> {
    let v: Vec<f64> = (0..e)
        .map(|_| r.sample::<f64, _>(rand_distr::StandardNormal))
        .collect();
    let n = dot(&v, &v).sqrt();
    v.into_iter().map(|x| x / n).collect()
}

/// A unit vector at cosine exactly `c` to the unit vector `f`.
fn at_cosine(r: &mut impl Rng, f: &[f64], c: f64) -> Vec<f64> {
    let g = gaussian_unit(r, f.len());
    let gf = dot(&g, f);
    let u: Vec<f64> = g.iter().zip(f).map(|(x, y)| x - gf * y).collect();
    let un = dot(&u, &u).sqrt();
    f.iter()
        .zip(&u)
        .map(|(x, y)| c * x + (1.0 - c * c).sqrt() * y / un)
        .collect()
}

/// Fraction of `neg` below `s`, ties one half, 1 without negatives.
fn slow_rank(s: f64, neg: &[f64]) -> f64 {
    if neg.is_empty() {
        return 1.0;
    }
    let below: f64 = neg
        .iter()
        .map(|&v| {
            if v < s {
                1.0
            } else if v == s {
                0.5
            } else {
                0.0
            }
        })
        .sum();
    below / neg.len() as f64
}

/// The rank rule spelled out: every dot product on its own, every negative
/// listed explicitly.
fn slow_mean_ranks(f: &Mat, t: &Mat, ids: &[u32], qi: &Mat, qt: &Mat, qids: &[u32]) -> Vec<f64> {
    (0..f.len())
        .map(|i| {
            let s = dot(&f[i], &t[i]);
            let (mut i2t, mut t2i) = (Vec::new(), Vec::new());
            for j in 0..f.len() {
                if j != i && ids[j] != ids[i] {
                    i2t.push(dot(&f[i], &t[j]));
                    t2i.push(dot(&t[i], &f[j]));
                }
            }
            for k in 0..qids.len() {
                if qids[k] != EMPTY_SLOT && qids[k] != ids[i] {
                    i2t.push(dot(&f[i], &qt[k]));
                    t2i.push(dot(&t[i], &qi[k]));
                }
            }
            0.5 * (slow_rank(s, &i2t) + slow_rank(s, &t2i))
        })
        .collect()
}

fn view(qi: &Mat, qt: &Mat, qids: &[u32], dtype: DType) -> QueueView {
    QueueView {
        image: tensor(qi).to_dtype(dtype).expect("qi"),
        text: tensor(qt).to_dtype(dtype).expect("qt"),
        ids: Tensor::new(qids, &Device::Cpu).expect("ids"),
    }
}

/// Random keys, repeated ids in the batch, a queue with empty slots and
/// slots of the batch's own ids: the ranks equal the reference's, in f64
/// exactly and in f32 up to one near-tie per row; and the filter drops
/// exactly the rows below the quantile when the median is high enough.
#[test]
fn mean_ranks_match_a_slow_reference() {
    let mut r = rng(31);
    for trial in 0..6 {
        let (b, e, k) = (10 + trial, 8, 24);
        let f = unit_rows(&mut r, b, e);
        // Partly aligned texts, so the ranks spread over [0, 1].
        let t: Mat = f
            .iter()
            .map(|fi| {
                let c = r.random::<f64>();
                at_cosine(&mut r, fi, c)
            })
            .collect();
        let ids: Vec<u32> = (0..b).map(|_| r.random_range(0..6u32)).collect();
        let qi = unit_rows(&mut r, k, e);
        let qt = unit_rows(&mut r, k, e);
        let qids: Vec<u32> = (0..k)
            .map(|_| match r.random_range(0..4) {
                0 => EMPTY_SLOT,
                _ => r.random_range(0..10u32),
            })
            .collect();
        let want = slow_mean_ranks(&f, &t, &ids, &qi, &qt, &qids);
        let idt = Tensor::new(ids.as_slice(), &Device::Cpu).expect("ids");
        for dtype in [DType::F64, DType::F32] {
            let (ft, tt) = (
                tensor(&f).to_dtype(dtype).expect("f"),
                tensor(&t).to_dtype(dtype).expect("t"),
            );
            let q = view(&qi, &qt, &qids, dtype);
            let got = mean_ranks(&ft, &tt, Some(&idt), Some(&q)).expect("ranks");
            // One near-tie flipped by f32 rounding moves a rank by at most
            // 1 / (number of negatives) >= 1 / (b + k); allow one per row.
            let tol = match dtype {
                DType::F64 => 1e-12,
                _ => 1.0 / ((b + k) as f64 - 20.0).max(1.0),
            };
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= tol, "{dtype:?}: rank {g}, reference {w}");
            }
            // Without ids or queue: every other row is a negative.
            let got = mean_ranks(&ft, &tt, None, None).expect("ranks");
            let all: Vec<u32> = (0..b as u32).collect();
            let want = slow_mean_ranks(&f, &t, &all, &qi, &qt, &[]);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= tol.max(1e-12) * 2.0, "{g} vs {w}");
            }
        }
        // The decision: rows below the quantile, only on a ready batch.
        for ready_median in [0.0, 1.0] {
            let mut amf = AdaptiveMomentumFilter::new(&AmfConfig {
                enabled: true,
                quantile: 0.4,
                ready_median,
                ..AmfConfig::default()
            })
            .expect("amf");
            let q = view(&qi, &qt, &qids, DType::F64);
            let out = amf
                .filter_with(&tensor(&f), &tensor(&t), Some(&idt), Some(&q))
                .expect("filter");
            let w = out.weights.to_vec1::<f32>().expect("w");
            let mut sorted = want.clone();
            sorted.sort_by(f64::total_cmp);
            let active = ready_median == 0.0;
            assert_eq!(out.stats.active, active);
            for (i, p) in want.iter().enumerate() {
                let drop = active && *p < 0.4;
                assert_eq!(w[i] == 0.0, drop, "row {i}: rank {p}");
                assert_eq!(out.stats.dropped[i], drop);
                assert!((out.stats.row_scores[i] - p).abs() < 1e-12);
            }
        }
    }
}

/// One step of constructed momentum keys: clean pairs at cosine `c`,
/// noisy pairs independent; the queue holds earlier such pairs.
struct Constructed {
    f: Mat,
    t: Mat,
    noisy: Vec<bool>,
}

fn constructed(r: &mut impl Rng, b: usize, e: usize, noise: f64, c: f64) -> Constructed {
    let (mut f, mut t, mut noisy) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..b {
        let fi = gaussian_unit(r, e);
        let bad = r.random::<f64>() < noise;
        let ti = if bad {
            gaussian_unit(r, e)
        } else {
            at_cosine(r, &fi, c)
        };
        f.push(fi);
        t.push(ti);
        noisy.push(bad);
    }
    Constructed { f, t, noisy }
}

/// Runs the default filter over `steps` batches with a queue of past pairs
/// and returns pooled (precision, recall, dropped fraction of all pairs).
fn run(noise: f64, steps: usize, seed: u64) -> (Option<f64>, Option<f64>, f64) {
    let (b, e, k, c) = (64usize, 64usize, 512usize, 0.6f64);
    let mut r = rng(seed);
    let mut amf = AdaptiveMomentumFilter::new(&AmfConfig {
        enabled: true,
        ..AmfConfig::default()
    })
    .expect("amf");
    let past = constructed(&mut r, k, e, noise, c);
    let qids: Vec<u32> = (1000..1000 + k as u32).collect();
    let q = view(&past.f, &past.t, &qids, DType::F32);
    let (mut tp, mut dropped, mut noisy, mut pairs) = (0, 0, 0, 0);
    for step in 0..steps {
        let x = constructed(&mut r, b, e, noise, c);
        let ids: Vec<u32> = (0..b as u32).map(|i| i + (step * b) as u32).collect();
        let idt = Tensor::new(ids.as_slice(), &Device::Cpu).expect("ids");
        let out = amf
            .filter_with(
                &tensor(&x.f).to_dtype(DType::F32).expect("f"),
                &tensor(&x.t).to_dtype(DType::F32).expect("t"),
                Some(&idt),
                Some(&q),
            )
            .expect("filter");
        let w = out.weights.to_vec1::<f32>().expect("w");
        let drops: Vec<bool> = w.iter().map(|&v| v == 0.0).collect();
        assert_eq!(drops, out.stats.dropped);
        let d = detection(&drops, &x.noisy).expect("detection");
        tp += d.true_drops;
        dropped += d.dropped;
        noisy += d.noisy;
        pairs += b;
    }
    (
        (dropped > 0).then(|| tp as f64 / dropped as f64),
        (noisy > 0).then(|| tp as f64 / noisy as f64),
        dropped as f64 / pairs as f64,
    )
}

/// Derivation. With E = 64, a clean pair scores exactly c = 0.6 while its
/// negatives (independent unit vectors) score ~N(0, 1/64): 0.6 is 4.8 sds
/// up, so a clean pair outranks all of its ~575 negatives (P(a negative
/// above) ~ 1e-6) and p = 1. A noisy pair's score is itself ~N(0, 1/64),
/// exchangeable with its negatives, so each of p_i2t and p_t2i is uniform
/// and, both being monotone in the same score, nearly equal: P(p < q) = q
/// for the default quantile q. Recall pools ~0.2 * 64 * 30 = 384 noisy
/// pairs: binomial sd <= 0.026, so q +- 0.1 is ~4 sds; the dropped share
/// of all pairs is 0.2 q +- 0.04. Precision: no clean pair can be dropped.
/// The batch median is a clean pair's p = 1 (80 % clean) >= 0.9: ready.
#[test]
fn rank_rule_drops_noisy_pairs_and_spares_clean_ones() {
    let q = AmfConfig::default().quantile;
    for seed in [1u64, 2, 3] {
        let (precision, recall, frac) = run(0.2, 30, seed);
        let (precision, recall) = (precision.expect("dropped some"), recall.expect("noisy"));
        eprintln!("seed {seed}: precision {precision:.3} recall {recall:.3} dropped {frac:.3}");
        assert!(precision >= 0.99, "precision {precision}");
        assert!((recall - q).abs() <= 0.1, "recall {recall}, quantile {q}");
        assert!((frac - 0.2 * q).abs() <= 0.04, "dropped fraction {frac}");
    }
}

/// Without noise every pair outranks its negatives: nothing is dropped,
/// where the threshold rule drops its fixed share of the same batches.
#[test]
fn rank_rule_drops_nothing_from_clean_batches() {
    let (_, recall, frac) = run(0.0, 20, 9);
    assert!(recall.is_none());
    assert!(frac <= 0.002, "dropped fraction {frac} on clean data");

    let mut r = rng(10);
    let mut amf = AdaptiveMomentumFilter::new(&AmfConfig {
        enabled: true,
        rule: AmfRule::Threshold,
        warmup_steps: 5,
        ..AmfConfig::default()
    })
    .expect("amf");
    let (mut dropped, mut pairs) = (0usize, 0usize);
    for step in 0..25 {
        // Clean pairs whose cosines vary (as a real model's do).
        let (mut f, mut t) = (Vec::new(), Vec::new());
        for _ in 0..64 {
            let fi = gaussian_unit(&mut r, 64);
            let c = 0.5 + 0.2 * r.random::<f64>();
            t.push(at_cosine(&mut r, &fi, c));
            f.push(fi);
        }
        let out = amf.filter(&tensor(&f), &tensor(&t)).expect("filter");
        if step >= 5 {
            dropped += out.stats.dropped.iter().filter(|&&d| d).count();
            pairs += 64;
        }
    }
    let frac = dropped as f64 / pairs as f64;
    // Uniform cosines on [0.5, 0.7]: mean - sd = 0.6 - 0.0577 drops ~21 %.
    assert!(frac > 0.1, "threshold rule dropped {frac} of clean pairs");
}

/// An untrained model ranks right and wrong captions alike (p uniform,
/// median ~0.5): the rank rule waits.
#[test]
fn rank_rule_waits_for_a_ready_model() {
    let mut r = rng(12);
    let mut amf = AdaptiveMomentumFilter::new(&AmfConfig {
        enabled: true,
        ..AmfConfig::default()
    })
    .expect("amf");
    for _ in 0..10 {
        let f = unit_rows(&mut r, 64, 32);
        let t = unit_rows(&mut r, 64, 32);
        let out = amf.filter(&tensor(&f), &tensor(&t)).expect("filter");
        let m = out.stats.median_rank.expect("median");
        assert!((0.3..0.7).contains(&m), "median rank {m} of random pairs");
        assert!(!out.stats.active && out.stats.kept == 64);
    }
}

/// Precision and recall against labels, and a length mismatch refused.
#[test]
fn detection_counts_against_labels() {
    let d = detection(&[true, true, false, false], &[true, false, true, false]).expect("d");
    assert_eq!((d.dropped, d.noisy, d.true_drops), (2, 2, 1));
    assert_eq!((d.precision, d.recall), (Some(0.5), Some(0.5)));
    let none = detection(&[false, false], &[false, false]).expect("d");
    assert_eq!((none.precision, none.recall), (None, None));
    assert!(detection(&[true], &[true, false]).is_err());
}

/// A config file names the rule; an unknown rule is an error.
#[test]
fn rule_parses_from_toml() {
    let cfg: AmfConfig = toml::from_str("enabled = true\nrule = \"threshold\"\n").expect("toml");
    assert_eq!(cfg.rule, AmfRule::Threshold);
    let cfg: AmfConfig = toml::from_str("enabled = true\n").expect("toml");
    assert_eq!(cfg.rule, AmfRule::Rank);
    assert!(toml::from_str::<AmfConfig>("rule = \"median\"\n").is_err());
    assert!(AdaptiveMomentumFilter::new(&AmfConfig {
        quantile: 1.5,
        ..AmfConfig::default()
    })
    .is_err());
}
