//! Every loss against a direct formula written with plain loops over f64,
//! values and gradients (finite differences of the direct formula), on fresh
//! seeded random inputs.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use cots_objectives::bimodal::BimodalConfig;
use cots_objectives::clip::{Clip, ClipConfig};
use cots_objectives::itc::{Itc, ItcConfig, KeySource};
use cots_objectives::itm::{Itm, ItmConfig};
use cots_objectives::kl::{Kl, KlConfig};
use cots_objectives::mvlm::{self, Mvlm, MvlmConfig};
use cots_objectives::vse::{Vse, VseConfig};
use cots_objectives::*;
use cots_ops::queue::KlDirection;

const B: usize = 4;
const E: usize = 5;
const K: usize = 8;

/// Online and momentum embeddings, ids, and a half-filled lockstep queue.
struct Fix {
    f: Mat,
    t: Mat,
    fm: Mat,
    tm: Mat,
    ids: Vec<u32>,
    tau: f64,
    qi: Mat,
    qt: Mat,
    qids: Vec<u32>,
    queue: SharedQueue,
}

fn fixture(seed: u64) -> Fix {
    let mut r = rng(seed);
    let (f, t, fm, tm) = (
        unit_rows(&mut r, B, E),
        unit_rows(&mut r, B, E),
        unit_rows(&mut r, B, E),
        unit_rows(&mut r, B, E),
    );
    // Rows 1 and 2 are two captions of image 1.
    let ids = vec![0, 1, 1, 2];
    let mut q = LockstepQueue::new(
        &QueueConfig {
            size: K,
            seed,
            ..Default::default()
        },
        E,
        DType::F64,
        &Device::Cpu,
    )
    .expect("queue");
    // One past batch: slots 0..4 get ids that match some rows; 4..8 stay empty.
    let past_ids = Tensor::new(&[1u32, 7, 2, 0], &Device::Cpu).expect("ids");
    q.enqueue(
        &tensor(&unit_rows(&mut r, B, E)),
        &tensor(&unit_rows(&mut r, B, E)),
        &past_ids,
        None,
    )
    .expect("enqueue");
    let v = q.view();
    Fix {
        f,
        t,
        fm,
        tm,
        ids,
        tau: 0.05 + 0.1 * rand::Rng::random::<f64>(&mut r),
        qi: mat(&v.image),
        qt: mat(&v.text),
        qids: v.ids.to_vec1::<u32>().expect("ids"),
        queue: SharedQueue::new(q),
    }
}

/// Step features with online embeddings only (no momentum, weights or side inputs).
fn online_only(f: &Tensor, t: &Tensor, ids: &Tensor, tau: &Tensor) -> StepFeatures {
    StepFeatures::new(f.clone(), t.clone(), ids.clone(), tau.clone())
}

/// Momentum features from detached keys and optional pair weights.
fn momentum(fm: &Tensor, tm: &Tensor, w: Option<&Tensor>) -> MomentumFeatures {
    MomentumFeatures {
        image: fm.clone(),
        text: tm.clone(),
        pair_weights: w.cloned(),
    }
}

fn ids_tensor(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu).expect("ids")
}

/// Flat positions with a non-negative label and those labels, in order (what
/// the trainer uploads with a batch).
fn masked_positions(labels: &[i64]) -> (Vec<u32>, Vec<u32>) {
    labels
        .iter()
        .enumerate()
        .filter(|(_, &lab)| lab >= 0)
        .map(|(i, &lab)| (i as u32, lab as u32))
        .unzip()
}

/// Runs `obj` on the fixture with `f`, `t`, `tau` as variables; checks each
/// term against `reference(f, t, tau)` and the gradient of the terms' sum
/// against finite differences of the reference's sum.
fn check(
    obj: &mut dyn Objective,
    fx: &Fix,
    weights: Option<&[f32]>,
    reference: impl Fn(&Mat, &Mat, f64) -> Vec<f64>,
) {
    let (fv, tv) = (var(&fx.f), var(&fx.t));
    let tau = Var::from_tensor(&Tensor::new(fx.tau, &Device::Cpu).expect("tau")).expect("tau");
    let (fm, tm, ids) = (tensor(&fx.fm), tensor(&fx.tm), ids_tensor(&fx.ids));
    let w = weights.map(|w| Tensor::new(w, &Device::Cpu).expect("weights"));
    let x = online_only(fv.as_tensor(), tv.as_tensor(), &ids, tau.as_tensor())
        .with_momentum(momentum(&fm, &tm, w.as_ref()));
    let terms = obj.losses(&x).expect("losses");
    let got: Vec<f64> = terms.iter().map(|t| scalar(&t.value)).collect();
    let want = reference(&fx.f, &fx.t, fx.tau);
    assert_close(&got, &want, 1e-10, obj.name());
    let mut sum = terms[0].value.clone();
    for t in &terms[1..] {
        sum = (sum + &t.value).expect("sum");
    }
    let grads = sum.backward().expect("backward");
    let n = B * E;
    let mut p = fx.f.concat();
    p.extend(fx.t.concat());
    p.push(fx.tau);
    let fd = fd_grad(&p, |p| {
        reference(
            &unflat(&p[..n], B, E),
            &unflat(&p[n..2 * n], B, E),
            p[2 * n],
        )
        .iter()
        .sum()
    });
    assert_close(&grad_of(&grads, fv.as_tensor()), &fd[..n], 1e-5, "d/df");
    assert_close(
        &grad_of(&grads, tv.as_tensor()),
        &fd[n..2 * n],
        1e-5,
        "d/dt",
    );
    assert_close(
        &grad_of(&grads, tau.as_tensor()),
        &fd[2 * n..],
        1e-5,
        "d/dtau",
    );
}

/// `lse(l) - mean_{p in P} l[p]` with `l = [q.k, q.keys] / tau`, column 0 and
/// same-id keys positive.
fn queue_row(q: &[f64], k: &[f64], keys: &Mat, key_ids: Option<(&[u32], u32)>, tau: f64) -> f64 {
    let mut l = vec![dot(q, k) / tau];
    let mut pos = vec![l[0]];
    for (j, key) in keys.iter().enumerate() {
        let v = dot(q, key) / tau;
        l.push(v);
        if let Some((kid, id)) = key_ids {
            if kid[j] == id {
                pos.push(v);
            }
        }
    }
    lse(&l) - pos.iter().sum::<f64>() / pos.len() as f64
}

fn ref_itc(fx: &Fix, f: &Mat, t: &Mat, tau: f64, cfg: &ItcConfig, w: Option<&[f64]>) -> Vec<f64> {
    let (mut ki, mut kt, mut kid) = (fx.qi.clone(), fx.qt.clone(), fx.qids.clone());
    if cfg.in_batch_negatives {
        ki = [fx.fm.clone(), ki].concat();
        kt = [fx.tm.clone(), kt].concat();
        kid = [fx.ids.clone(), kid].concat();
    }
    let ids = |i: usize| cfg.use_ids.then_some((kid.as_slice(), fx.ids[i]));
    let i2t: Vec<f64> = (0..B)
        .map(|i| queue_row(&f[i], &fx.tm[i], &kt, ids(i), tau))
        .collect();
    let t2i: Vec<f64> = (0..B)
        .map(|i| queue_row(&t[i], &fx.fm[i], &ki, ids(i), tau))
        .collect();
    vec![wmean(&i2t, w), wmean(&t2i, w)]
}

#[test]
fn itc_matches_the_formula_in_every_mode() {
    for (seed, in_batch, use_ids, weights) in [
        (1, false, true, None),
        (2, true, true, None),
        (3, false, false, Some([1.0f32, 0.0, 1.0, 1.0])),
        (4, true, true, Some([0.0, 1.0, 1.0, 1.0])),
    ] {
        let fx = fixture(seed);
        let cfg = ItcConfig {
            weight: 1.0,
            in_batch_negatives: in_batch,
            use_ids,
            ..ItcConfig::default()
        };
        let w64 = weights.map(|w| w.map(f64::from));
        // The fixture must contain same-id queue slots, or the id path is untested.
        assert!(fx.qids.iter().any(|q| fx.ids.contains(q)));
        let mut itc = Itc::new(&cfg, fx.queue.clone());
        check(
            &mut itc,
            &fx,
            weights.as_ref().map(|w| &w[..]),
            |f, t, tau| ref_itc(&fx, f, t, tau, &cfg, w64.as_ref().map(|w| &w[..])),
        );
    }
}

/// One row of the in-batch formulation written out with loops: the batch
/// keys (all of them when `all_pairs`, same-id ones positive; only the
/// row's own key otherwise), then the queue's keys when given.
#[allow(clippy::too_many_arguments)]
fn batch_row(
    q: &[f64],
    i: usize,
    keys: &Mat,
    ids: &[u32],
    all_pairs: bool,
    use_ids: bool,
    queue: Option<(&Mat, &[u32])>,
    tau: f64,
) -> f64 {
    let (mut l, mut pos) = (Vec::new(), Vec::new());
    for (j, k) in keys.iter().enumerate() {
        let same = j == i || (use_ids && ids[j] == ids[i]);
        if !all_pairs && j != i {
            continue;
        }
        l.push(dot(q, k) / tau);
        if same {
            pos.push(dot(q, k) / tau);
        }
    }
    if let Some((qk, qids)) = queue {
        for (k, &id) in qk.iter().zip(qids) {
            l.push(dot(q, k) / tau);
            if use_ids && id == ids[i] {
                pos.push(dot(q, k) / tau);
            }
        }
    }
    lse(&l) - pos.iter().sum::<f64>() / pos.len() as f64
}

fn ref_itc_batch(fx: &Fix, f: &Mat, t: &Mat, tau: f64, cfg: &ItcConfig) -> Vec<f64> {
    // Online keys are the other tower's online embeddings: the very
    // arguments, so the finite differences see the key side move too.
    let (fk, tk) = match cfg.keys {
        KeySource::Online => (f.clone(), t.clone()),
        KeySource::Momentum => (fx.fm.clone(), fx.tm.clone()),
    };
    let all = cfg.keys == KeySource::Online || cfg.in_batch_negatives;
    let q = |m: &'_ Mat| -> Option<(Mat, Vec<u32>)> {
        cfg.queue_negatives.then(|| (m.clone(), fx.qids.clone()))
    };
    let (qt, qi) = (q(&fx.qt), q(&fx.qi));
    let i2t: Vec<f64> = (0..B)
        .map(|i| {
            let qv = qt.as_ref().map(|(m, ids)| (m, ids.as_slice()));
            batch_row(&f[i], i, &tk, &fx.ids, all, cfg.use_ids, qv, tau)
        })
        .collect();
    let t2i: Vec<f64> = (0..B)
        .map(|i| {
            let qv = qi.as_ref().map(|(m, ids)| (m, ids.as_slice()));
            batch_row(&t[i], i, &fk, &fx.ids, all, cfg.use_ids, qv, tau)
        })
        .collect();
    vec![wmean(&i2t, None), wmean(&t2i, None)]
}

/// Online keys (with and without the queue, with and without ids) and
/// momentum keys without the queue, values and gradients (keys included)
/// against the loops above.
#[test]
fn itc_key_sources_and_queue_switch_match_the_formula() {
    for (seed, keys, queue_negatives, in_batch, use_ids) in [
        (11, KeySource::Online, true, false, true),
        (12, KeySource::Online, true, false, false),
        (13, KeySource::Online, false, false, true),
        (14, KeySource::Momentum, false, true, true),
        (15, KeySource::Momentum, false, true, false),
    ] {
        let fx = fixture(seed);
        let cfg = ItcConfig {
            weight: 1.0,
            in_batch_negatives: in_batch,
            use_ids,
            keys,
            queue_negatives,
        };
        cfg.validate().expect("valid");
        let mut itc = Itc::new(&cfg, fx.queue.clone());
        check(&mut itc, &fx, None, |f, t, tau| {
            ref_itc_batch(&fx, f, t, tau, &cfg)
        });
    }
}

/// Online keys without the queue are CLIP, term by term.
#[test]
fn itc_with_online_keys_and_no_queue_is_clip() {
    let fx = fixture(21);
    let (f, t) = (tensor(&fx.f), tensor(&fx.t));
    let tau = Tensor::new(fx.tau, &Device::Cpu).expect("tau");
    let x = online_only(&f, &t, &ids_tensor(&fx.ids), &tau);
    let cfg = ItcConfig {
        keys: KeySource::Online,
        queue_negatives: false,
        ..ItcConfig::default()
    };
    let itc: Vec<f64> = Itc::new(&cfg, fx.queue.clone())
        .losses(&x)
        .expect("itc")
        .iter()
        .map(|t| scalar(&t.value))
        .collect();
    let clip: Vec<f64> = Clip::new(&ClipConfig::default())
        .losses(&x)
        .expect("clip")
        .iter()
        .map(|t| scalar(&t.value))
        .collect();
    assert_close(&itc, &clip, 1e-12, "itc(online, no queue) vs clip");
}

/// Momentum keys with neither in-batch nor queue negatives leave every row
/// without a negative: rejected when the objectives are built.
#[test]
fn itc_without_any_negative_is_rejected() {
    let cfg = ItcConfig {
        queue_negatives: false,
        ..ItcConfig::default()
    };
    assert!(matches!(cfg.validate(), Err(Error::Config(m)) if m.contains("queue_negatives")));
    let toml = "[[objectives]]\nkind = \"itc\"\nqueue_negatives = false\n";
    let parsed: ObjectivesConfig = toml::from_str(toml).expect("parses");
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    let dims = Dims {
        embed: E,
        text_hidden: E,
        vision_hidden: E,
        vocab: 8,
        codebook: 8,
    };
    assert!(build(&parsed, dims, vb).is_err());
}

/// `KL(softmax(a) || softmax(b))`.
fn kl_rows(a: &[f64], b: &[f64]) -> f64 {
    let (la, lb) = (log_softmax(a), log_softmax(b));
    la.iter().zip(&lb).map(|(x, y)| x.exp() * (x - y)).sum()
}

/// Per-row logits of `D_i2t` and `D_t2i`.
fn kl_logits(fx: &Fix, f: &Mat, t: &Mat, tau: f64, i: usize) -> (Vec<f64>, Vec<f64>) {
    let p: Vec<f64> = std::iter::once(dot(&f[i], &fx.tm[i]))
        .chain(fx.qt.iter().map(|k| dot(&f[i], k)))
        .map(|v| v / tau)
        .collect();
    let q: Vec<f64> = std::iter::once(dot(&t[i], &fx.fm[i]))
        .chain(fx.qi.iter().map(|k| dot(&t[i], k)))
        .map(|v| v / tau)
        .collect();
    (p, q)
}

fn ref_kl(fx: &Fix, f: &Mat, t: &Mat, tau: f64, dir: KlDirection, w: Option<&[f64]>) -> f64 {
    let rows: Vec<f64> = (0..B)
        .map(|i| {
            let (p, q) = kl_logits(fx, f, t, tau, i);
            match dir {
                KlDirection::I2tToT2i => kl_rows(&p, &q),
                KlDirection::T2iToI2t => kl_rows(&q, &p),
                KlDirection::Symmetric => 0.5 * (kl_rows(&p, &q) + kl_rows(&q, &p)),
            }
        })
        .collect();
    wmean(&rows, w)
}

#[test]
fn kl_matches_the_formula_in_every_direction() {
    for (seed, dir) in [
        (5, KlDirection::Symmetric),
        (6, KlDirection::I2tToT2i),
        (7, KlDirection::T2iToI2t),
    ] {
        let fx = fixture(seed);
        let cfg = KlConfig {
            weight: 1.0,
            direction: dir,
            stop_grad_target: false,
        };
        let w = [1.0f32, 1.0, 0.0, 1.0];
        let w64 = w.map(f64::from);
        check(
            &mut Kl::new(&cfg, fx.queue.clone()),
            &fx,
            Some(&w),
            |f, t, tau| vec![ref_kl(&fx, f, t, tau, dir, Some(&w64))],
        );
    }
}

#[test]
fn kl_stop_gradient_moves_only_the_non_target_side() {
    let fx = fixture(8);
    for dir in [
        KlDirection::Symmetric,
        KlDirection::I2tToT2i,
        KlDirection::T2iToI2t,
    ] {
        let cfg = KlConfig {
            weight: 1.0,
            direction: dir,
            stop_grad_target: true,
        };
        let (fv, tv) = (var(&fx.f), var(&fx.t));
        let tau = Tensor::new(fx.tau, &Device::Cpu).expect("tau");
        let (fm, tm, ids) = (tensor(&fx.fm), tensor(&fx.tm), ids_tensor(&fx.ids));
        let x = online_only(fv.as_tensor(), tv.as_tensor(), &ids, &tau)
            .with_momentum(momentum(&fm, &tm, None));
        let terms = Kl::new(&cfg, fx.queue.clone()).losses(&x).expect("kl");
        assert_close(
            &[scalar(&terms[0].value)],
            &[ref_kl(&fx, &fx.f, &fx.t, fx.tau, dir, None)],
            1e-10,
            "value",
        );
        let grads = terms[0].value.backward().expect("backward");
        // The gradient of KL(P_target || Q) with P held fixed, by finite
        // differences of the formula in the live side only.
        let half = |target_is_i2t: bool| -> (Vec<f64>, Vec<f64>) {
            let mean_kl = |f: &Mat, t: &Mat| -> f64 {
                (0..B)
                    .map(|i| {
                        let (p0, q0) = kl_logits(&fx, &fx.f, &fx.t, fx.tau, i);
                        let (p, q) = kl_logits(&fx, f, t, fx.tau, i);
                        if target_is_i2t {
                            kl_rows(&p0, &q)
                        } else {
                            kl_rows(&q0, &p)
                        }
                    })
                    .sum::<f64>()
                    / B as f64
            };
            let g_f = fd_grad(&fx.f.concat(), |p| mean_kl(&unflat(p, B, E), &fx.t));
            let g_t = fd_grad(&fx.t.concat(), |p| mean_kl(&fx.f, &unflat(p, B, E)));
            (g_f, g_t)
        };
        let (want_f, want_t) = match dir {
            KlDirection::I2tToT2i => half(true),
            KlDirection::T2iToI2t => half(false),
            KlDirection::Symmetric => {
                let (a_f, a_t) = half(true);
                let (b_f, b_t) = half(false);
                (
                    a_f.iter().zip(&b_f).map(|(a, b)| 0.5 * (a + b)).collect(),
                    a_t.iter().zip(&b_t).map(|(a, b)| 0.5 * (a + b)).collect(),
                )
            }
        };
        assert_close(&grad_of(&grads, fv.as_tensor()), &want_f, 1e-5, "d/df");
        assert_close(&grad_of(&grads, tv.as_tensor()), &want_t, 1e-5, "d/dt");
        // The target's query must receive nothing from its own half.
        if dir == KlDirection::I2tToT2i {
            assert!(grad_of(&grads, fv.as_tensor()).iter().all(|&g| g == 0.0));
        }
    }
}

fn ref_clip(ids: &[u32], f: &Mat, t: &Mat, tau: f64, use_ids: bool, w: Option<&[f64]>) -> Vec<f64> {
    let pos = |i: usize, j: usize| if use_ids { ids[i] == ids[j] } else { i == j };
    let row = |l: Vec<f64>, i: usize| {
        let lp = log_softmax(&l);
        let p: Vec<f64> = (0..B).filter(|&j| pos(i, j)).map(|j| lp[j]).collect();
        -p.iter().sum::<f64>() / p.len() as f64
    };
    let i2t: Vec<f64> = (0..B)
        .map(|i| row((0..B).map(|j| dot(&f[i], &t[j]) / tau).collect(), i))
        .collect();
    let t2i: Vec<f64> = (0..B)
        .map(|j| row((0..B).map(|i| dot(&f[i], &t[j]) / tau).collect(), j))
        .collect();
    vec![wmean(&i2t, w), wmean(&t2i, w)]
}

#[test]
fn clip_matches_the_formula() {
    for (seed, use_ids) in [(9, true), (10, false)] {
        let fx = fixture(seed);
        let w = [1.0f32, 1.0, 1.0, 0.0];
        let w64 = w.map(f64::from);
        let mut clip = Clip::new(&ClipConfig {
            weight: 1.0,
            use_ids,
        });
        check(&mut clip, &fx, Some(&w), |f, t, tau| {
            ref_clip(&fx.ids, f, t, tau, use_ids, Some(&w64))
        });
    }
}

fn ref_vse(ids: &[u32], f: &Mat, t: &Mat, cfg: &VseConfig) -> Vec<f64> {
    let neg = |i: usize, j: usize| {
        if cfg.use_ids {
            ids[i] != ids[j]
        } else {
            i != j
        }
    };
    let agg = |c: Vec<f64>| {
        if cfg.hardest_negative {
            c.into_iter().fold(0.0, f64::max)
        } else {
            c.into_iter().sum()
        }
    };
    let s = |i: usize, j: usize| dot(&f[i], &t[j]);
    let i2t: Vec<f64> = (0..B)
        .map(|i| {
            agg((0..B)
                .filter(|&j| neg(i, j))
                .map(|j| (cfg.margin - s(i, i) + s(i, j)).max(0.0))
                .collect())
        })
        .collect();
    let t2i: Vec<f64> = (0..B)
        .map(|j| {
            agg((0..B)
                .filter(|&i| neg(i, j))
                .map(|i| (cfg.margin - s(j, j) + s(i, j)).max(0.0))
                .collect())
        })
        .collect();
    vec![wmean(&i2t, None), wmean(&t2i, None)]
}

#[test]
fn vse_matches_the_formula() {
    for (seed, hardest, use_ids) in [(11, true, true), (12, false, true), (13, true, false)] {
        let fx = fixture(seed);
        // A large margin keeps every hinge active, so the losses are non-zero
        // and finite differences never straddle a kink.
        let cfg = VseConfig {
            weight: 1.0,
            margin: 2.5,
            hardest_negative: hardest,
            use_ids,
        };
        let want = ref_vse(&fx.ids, &fx.f, &fx.t, &cfg);
        assert!(want.iter().all(|&v| v > 0.0));
        check(&mut Vse::new(&cfg), &fx, None, |f, t, _| {
            ref_vse(&fx.ids, f, t, &cfg)
        });
    }
}

#[test]
fn itm_is_two_way_cross_entropy() {
    let mut r = rng(14);
    let logits = random_mat(&mut r, 6, 2);
    let labels = [1u32, 0, 0, 1, 0, 1];
    let lv = var(&logits);
    let lab = ids_tensor(&labels);
    let fx = fixture(15);
    let (f, t, tau, ids) = (
        tensor(&fx.f),
        tensor(&fx.t),
        Tensor::new(0.07f64, &Device::Cpu).expect("tau"),
        ids_tensor(&fx.ids),
    );
    let x = online_only(&f, &t, &ids, &tau).with_matching(MatchLogits {
        logits: lv.as_tensor().clone(),
        labels: lab,
    });
    let terms = Itm::new(&ItmConfig::default()).losses(&x).expect("itm");
    let reference = |p: &[f64]| {
        let m = unflat(p, 6, 2);
        (0..6)
            .map(|i| -log_softmax(&m[i])[labels[i] as usize])
            .sum::<f64>()
            / 6.0
    };
    assert_close(
        &[scalar(&terms[0].value)],
        &[reference(&logits.concat())],
        1e-10,
        "itm",
    );
    let grads = terms[0].value.backward().expect("backward");
    assert_close(
        &grad_of(&grads, lv.as_tensor()),
        &fd_grad(&logits.concat(), reference),
        1e-5,
        "d/dlogits",
    );
}

/// `concat(x, ctx) -> dense -> gelu(tanh) -> layer_norm -> decoder` in loops.
fn ref_head(vm: &VarMap, prefix: &str, x: &[f64], ctx: &[f64]) -> Vec<f64> {
    let get = |n: &str| {
        vm.data().lock().expect("lock")[&format!("{prefix}.{n}")]
            .as_tensor()
            .clone()
    };
    let (w1, b1) = (
        mat(&get("dense.weight")),
        get("dense.bias").to_vec1::<f64>().expect("b"),
    );
    let (g, beta) = (
        get("layer_norm.weight").to_vec1::<f64>().expect("g"),
        get("layer_norm.bias").to_vec1::<f64>().expect("b"),
    );
    let (w2, b2) = (
        mat(&get("decoder.weight")),
        get("decoder.bias").to_vec1::<f64>().expect("b"),
    );
    let inp = [x, ctx].concat();
    let h: Vec<f64> = w1
        .iter()
        .zip(&b1)
        .map(|(w, b)| {
            let v = dot(w, &inp) + b;
            0.5 * v
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())
        })
        .collect();
    let mean = h.iter().sum::<f64>() / h.len() as f64;
    let var = h.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / h.len() as f64;
    let hn: Vec<f64> = h
        .iter()
        .enumerate()
        .map(|(i, v)| (v - mean) / (var + 1e-12).sqrt() * g[i] + beta[i])
        .collect();
    w2.iter().zip(&b2).map(|(w, b)| dot(w, &hn) + b).collect()
}

#[test]
fn mvlm_matches_the_formula_and_trains_every_head_weight() {
    let dims = Dims {
        embed: 3,
        text_hidden: 4,
        vision_hidden: 5,
        vocab: 7,
        codebook: 6,
    };
    let (b, l, np) = (3usize, 4usize, 4usize);
    let mut r = rng(16);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    let mut obj = Mvlm::new(
        &mvlm::Config {
            settings: MvlmConfig::default(),
            dims,
        },
        vb,
    )
    .expect("mvlm");
    // Non-trivial LayerNorm parameters, so the reference exercises them.
    for (name, v) in vm.data().lock().expect("lock").iter() {
        if name.contains("layer_norm") {
            let n = v.elem_count();
            v.set(
                &Tensor::from_vec(random_mat(&mut r, 1, n).concat(), n, &Device::Cpu).expect("t"),
            )
            .expect("set");
        }
    }
    let ht = random_mat(&mut r, b * l, dims.text_hidden);
    let hv = random_mat(&mut r, b * (1 + np), dims.vision_hidden);
    let (fe, te) = (
        unit_rows(&mut r, b, dims.embed),
        unit_rows(&mut r, b, dims.embed),
    );
    let labels: Vec<i64> = (0..b * l)
        .map(|i| {
            if i % 3 == 0 {
                -100
            } else {
                r.random_range(0..dims.vocab as i64)
            }
        })
        .collect();
    let mask: Vec<u8> = (0..b * np).map(|i| (i % 2) as u8).collect();
    let codes: Vec<u32> = (0..b * np)
        .map(|_| r.random_range(0..dims.codebook as u32))
        .collect();
    let weights = [1.0f32, 0.0, 1.0];
    use rand::Rng;

    let reference = |ht: &Mat, hv: &Mat, fe: &Mat, te: &Mat| -> Vec<f64> {
        let (mut mlm, mut wm) = (0.0, 0.0);
        for bi in 0..b {
            for li in 0..l {
                let lab = labels[bi * l + li];
                if lab >= 0 {
                    let lp = log_softmax(&ref_head(&vm, "mlm_head", &ht[bi * l + li], &fe[bi]));
                    mlm -= weights[bi] as f64 * lp[lab as usize];
                    wm += weights[bi] as f64;
                }
            }
        }
        let (mut mvm, mut wv) = (0.0, 0.0);
        for bi in 0..b {
            for pi in 0..np {
                if mask[bi * np + pi] != 0 {
                    let lp = log_softmax(&ref_head(
                        &vm,
                        "mvm_head",
                        &hv[bi * (1 + np) + 1 + pi],
                        &te[bi],
                    ));
                    mvm -= weights[bi] as f64 * lp[codes[bi * np + pi] as usize];
                    wv += weights[bi] as f64;
                }
            }
        }
        vec![mlm / wm, mvm / wv]
    };

    let dev = Device::Cpu;
    let htv =
        Var::from_tensor(&tensor(&ht).reshape((b, l, dims.text_hidden)).expect("r")).expect("v");
    let hvv = Var::from_tensor(
        &tensor(&hv)
            .reshape((b, 1 + np, dims.vision_hidden))
            .expect("r"),
    )
    .expect("v");
    let (fv, tv) = (var(&fe), var(&te));
    // Positions and targets as the trainer builds them from its host masks.
    let (text_pos, text_targets) = masked_positions(&labels);
    let (patch_pos, _) = masked_positions(
        &mask
            .iter()
            .map(|&m| if m != 0 { 0 } else { -1 })
            .collect::<Vec<i64>>(),
    );
    let codes_t = Tensor::from_vec(codes.clone(), (b, np), &dev).expect("codes");
    let (ids, tau, w) = (
        ids_tensor(&[0, 1, 2]),
        Tensor::new(0.07f64, &dev).expect("tau"),
        Tensor::new(&weights, &dev).expect("w"),
    );
    let x = online_only(fv.as_tensor(), tv.as_tensor(), &ids, &tau)
        .with_momentum(momentum(
            &fv.as_tensor().detach(),
            &tv.as_tensor().detach(),
            Some(&w),
        ))
        .with_masked_text(MaskedText {
            hidden: htv.as_tensor().clone(),
            positions: ids_tensor(&text_pos),
            targets: ids_tensor(&text_targets),
        })
        .with_masked_image(MaskedImage {
            hidden: hvv.as_tensor().clone(),
            positions: ids_tensor(&patch_pos),
            codes: codes_t,
        });
    let terms = obj.losses(&x).expect("losses");
    assert_eq!(
        terms.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["mlm", "mvm"]
    );
    let got: Vec<f64> = terms.iter().map(|t| scalar(&t.value)).collect();
    assert_close(&got, &reference(&ht, &hv, &fe, &te), 1e-9, "mvlm");
    let grads = (&terms[0].value + &terms[1].value)
        .expect("sum")
        .backward()
        .expect("backward");
    let sum = |v: Vec<f64>| v.iter().sum::<f64>();
    let fd_ht = fd_grad(&ht.concat(), |p| {
        sum(reference(
            &unflat(p, b * l, dims.text_hidden),
            &hv,
            &fe,
            &te,
        ))
    });
    let fd_hv = fd_grad(&hv.concat(), |p| {
        sum(reference(
            &ht,
            &unflat(p, b * (1 + np), dims.vision_hidden),
            &fe,
            &te,
        ))
    });
    let fd_fe = fd_grad(&fe.concat(), |p| {
        sum(reference(&ht, &hv, &unflat(p, b, dims.embed), &te))
    });
    let fd_te = fd_grad(&te.concat(), |p| {
        sum(reference(&ht, &hv, &fe, &unflat(p, b, dims.embed)))
    });
    assert_close(
        &grad_of(&grads, htv.as_tensor()),
        &fd_ht,
        1e-5,
        "d/dhidden_text",
    );
    assert_close(
        &grad_of(&grads, hvv.as_tensor()),
        &fd_hv,
        1e-5,
        "d/dhidden_image",
    );
    assert_close(
        &grad_of(&grads, fv.as_tensor()),
        &fd_fe,
        1e-5,
        "d/dimage_embed",
    );
    assert_close(
        &grad_of(&grads, tv.as_tensor()),
        &fd_te,
        1e-5,
        "d/dtext_embed",
    );
    // Unmasked tokens, [CLS] and the dropped pair get no gradient.
    assert!(grad_of(&grads, hvv.as_tensor())[..dims.vision_hidden]
        .iter()
        .all(|&g| g == 0.0));
    for (name, v) in vm.data().lock().expect("lock").iter() {
        assert!(
            grad_of(&grads, v.as_tensor()).iter().any(|&g| g != 0.0),
            "head weight {name} got no gradient"
        );
    }
    assert_eq!(
        obj.needs(),
        Needs {
            masked_text: true,
            masked_image: true,
            dvae_codes: true,
            ..Needs::default()
        }
    );
}

/// One random MVLM input: hidden states, global features, masks, codes and
/// optional pair weights, all on the host.
struct MvlmCase {
    b: usize,
    l: usize,
    np: usize,
    /// `[B * L][Dt]` text hidden states of the masked pass.
    ht: Mat,
    /// `[B * (1 + N)][Dv]` image hidden states, `[CLS]` first in each image.
    hv: Mat,
    /// `[B][E]` image and text embeddings.
    fe: Mat,
    te: Mat,
    /// `[B * L]`: the target id where the token is masked, -1 elsewhere.
    labels: Vec<i64>,
    /// `[B * N]`: 1 where the patch is masked.
    patch_mask: Vec<u8>,
    /// `[B * N]` dVAE codes.
    codes: Vec<u32>,
    weights: Option<Vec<f32>>,
}

/// A random case; row 0 always has a masked token, a masked patch and a
/// positive weight, so some gradient must flow.
fn mvlm_case(r: &mut impl rand::Rng, dims: Dims, weighted: bool) -> MvlmCase {
    let (b, l, np) = (
        r.random_range(2..6usize),
        r.random_range(2..7usize),
        r.random_range(2..6usize),
    );
    let mut labels: Vec<i64> = (0..b * l)
        .map(|_| match r.random_bool(0.35) {
            true => r.random_range(0..dims.vocab as i64),
            false => -1,
        })
        .collect();
    labels[r.random_range(0..l)] = r.random_range(0..dims.vocab as i64);
    let mut patch_mask: Vec<u8> = (0..b * np).map(|_| r.random_bool(0.4) as u8).collect();
    patch_mask[r.random_range(0..np)] = 1;
    let weights = weighted.then(|| {
        let mut w: Vec<f32> = (0..b)
            .map(|_| match r.random_bool(0.25) {
                true => 0.0,
                false => r.random_range(0.1f32..1.0),
            })
            .collect();
        w[0] = r.random_range(0.1f32..1.0);
        w
    });
    MvlmCase {
        b,
        l,
        np,
        ht: random_mat(r, b * l, dims.text_hidden),
        hv: random_mat(r, b * (1 + np), dims.vision_hidden),
        fe: unit_rows(r, b, dims.embed),
        te: unit_rows(r, b, dims.embed),
        labels,
        patch_mask,
        codes: (0..b * np)
            .map(|_| r.random_range(0..dims.codebook as u32))
            .collect(),
        weights,
    }
}

/// `[mlm, mvm]` by loops over every token and patch in f64: each masked one
/// through its head with its pair's global feature, weighted by its pair's
/// weight, normalised by the summed weight (a zero loss when nothing counts).
fn ref_mvlm(vm: &VarMap, c: &MvlmCase, ht: &Mat, hv: &Mat, fe: &Mat, te: &Mat) -> Vec<f64> {
    let w = |bi: usize| c.weights.as_ref().map_or(1.0, |w| w[bi] as f64);
    let ratio = |num: f64, den: f64| if den > 0.0 { num / den } else { 0.0 };
    let (mut mlm, mut wm) = (0.0, 0.0);
    for bi in 0..c.b {
        for li in 0..c.l {
            let lab = c.labels[bi * c.l + li];
            if lab >= 0 {
                let lp = log_softmax(&ref_head(vm, "mlm_head", &ht[bi * c.l + li], &fe[bi]));
                mlm -= w(bi) * lp[lab as usize];
                wm += w(bi);
            }
        }
    }
    let (mut mvm, mut wv) = (0.0, 0.0);
    for bi in 0..c.b {
        for pi in 0..c.np {
            if c.patch_mask[bi * c.np + pi] != 0 {
                let row = &hv[bi * (1 + c.np) + 1 + pi];
                let lp = log_softmax(&ref_head(vm, "mvm_head", row, &te[bi]));
                mvm -= w(bi) * lp[c.codes[bi * c.np + pi] as usize];
                wv += w(bi);
            }
        }
    }
    vec![ratio(mlm, wm), ratio(mvm, wv)]
}

/// The step features of a case on the device path, positions in a random
/// order (the loss must not depend on it).
fn mvlm_features(
    c: &MvlmCase,
    (ht, hv, fe, te): (&Tensor, &Tensor, &Tensor, &Tensor),
    dims: Dims,
    r: &mut impl rand::Rng,
) -> StepFeatures {
    use rand::seq::SliceRandom;
    let dev = Device::Cpu;
    let (text_pos, text_targets) = masked_positions(&c.labels);
    let mut text: Vec<(u32, u32)> = text_pos.into_iter().zip(text_targets).collect();
    text.shuffle(r);
    let (text_pos, text_targets): (Vec<u32>, Vec<u32>) = text.into_iter().unzip();
    let mut patch_pos: Vec<u32> = (0..c.b * c.np)
        .filter(|&i| c.patch_mask[i] != 0)
        .map(|i| i as u32)
        .collect();
    patch_pos.shuffle(r);
    let ids: Vec<u32> = (0..c.b as u32).collect();
    let tau = Tensor::new(0.07f64, &dev)
        .expect("tau")
        .to_dtype(fe.dtype());
    let mut x = StepFeatures::new(fe.clone(), te.clone(), ids_tensor(&ids), tau.expect("tau"))
        .with_masked_text(MaskedText {
            hidden: ht.reshape((c.b, c.l, dims.text_hidden)).expect("ht"),
            positions: ids_tensor(&text_pos),
            targets: ids_tensor(&text_targets),
        })
        .with_masked_image(MaskedImage {
            hidden: hv.reshape((c.b, 1 + c.np, dims.vision_hidden)).expect("hv"),
            positions: ids_tensor(&patch_pos),
            codes: Tensor::from_vec(c.codes.clone(), (c.b, c.np), &dev).expect("codes"),
        });
    if let Some(w) = &c.weights {
        x = x.with_momentum(momentum(
            &fe.detach(),
            &te.detach(),
            Some(&Tensor::new(w.as_slice(), &dev).expect("w")),
        ));
    }
    x
}

/// An MVLM objective in `dtype` whose head weights are those of `vm`
/// (converted), or fresh ones with random LayerNorm parameters when `vm` is
/// `None`.
fn mvlm_in(
    dims: Dims,
    dtype: DType,
    from: Option<&VarMap>,
    r: &mut impl rand::Rng,
) -> (Mvlm, VarMap) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
    let cfg = mvlm::Config {
        settings: MvlmConfig::default(),
        dims,
    };
    let obj = Mvlm::new(&cfg, vb).expect("mvlm");
    for (name, v) in vm.data().lock().expect("lock").iter() {
        let value = match from {
            Some(src) => src.data().lock().expect("lock")[name]
                .as_tensor()
                .to_dtype(dtype)
                .expect("dtype"),
            None if name.contains("layer_norm") => {
                let n = v.elem_count();
                Tensor::from_vec(random_mat(r, 1, n).concat(), n, &Device::Cpu).expect("t")
            }
            None => continue,
        };
        v.set(&value).expect("set");
    }
    (obj, vm)
}

/// The device path (positions gathered on the device, pair of a position by
/// integer division, weights gathered by row, normalisation on the device)
/// against loops over every token and patch, in f64 and in f32, with and
/// without pair weights; gradients against finite differences of the loops.
#[test]
fn mvlm_device_path_matches_a_host_reference_on_random_masks() {
    let dims = Dims {
        embed: 3,
        text_hidden: 4,
        vision_hidden: 5,
        vocab: 9,
        codebook: 6,
    };
    for seed in 0..6u64 {
        let mut r = rng(100 + seed);
        let c = mvlm_case(&mut r, dims, seed % 3 != 0);
        let (mut obj, vm) = mvlm_in(dims, DType::F64, None, &mut r);
        let want = ref_mvlm(&vm, &c, &c.ht, &c.hv, &c.fe, &c.te);

        let (htv, hvv, fv, tv) = (var(&c.ht), var(&c.hv), var(&c.fe), var(&c.te));
        let x = mvlm_features(
            &c,
            (
                htv.as_tensor(),
                hvv.as_tensor(),
                fv.as_tensor(),
                tv.as_tensor(),
            ),
            dims,
            &mut r,
        );
        let terms = obj.losses(&x).expect("losses");
        let got: Vec<f64> = terms.iter().map(|t| scalar(&t.value)).collect();
        assert_close(&got, &want, 1e-9, &format!("seed {seed}: f64 [mlm, mvm]"));

        let grads = (&terms[0].value + &terms[1].value)
            .expect("sum")
            .backward()
            .expect("backward");
        let total = |ht: &Mat, hv: &Mat, fe: &Mat, te: &Mat| -> f64 {
            ref_mvlm(&vm, &c, ht, hv, fe, te).iter().sum()
        };
        let (dt, dv, e) = (dims.text_hidden, dims.vision_hidden, dims.embed);
        let fd_ht = fd_grad(&c.ht.concat(), |p| {
            total(&unflat(p, c.b * c.l, dt), &c.hv, &c.fe, &c.te)
        });
        let fd_hv = fd_grad(&c.hv.concat(), |p| {
            total(&c.ht, &unflat(p, c.b * (1 + c.np), dv), &c.fe, &c.te)
        });
        let fd_fe = fd_grad(&c.fe.concat(), |p| {
            total(&c.ht, &c.hv, &unflat(p, c.b, e), &c.te)
        });
        let fd_te = fd_grad(&c.te.concat(), |p| {
            total(&c.ht, &c.hv, &c.fe, &unflat(p, c.b, e))
        });
        for (what, v, fd) in [
            ("d/dhidden_text", &htv, &fd_ht),
            ("d/dhidden_image", &hvv, &fd_hv),
            ("d/dimage_embed", &fv, &fd_fe),
            ("d/dtext_embed", &tv, &fd_te),
        ] {
            let g = grad_of(&grads, v.as_tensor());
            assert_close(&g, fd, 1e-5, &format!("seed {seed}: {what}"));
            // Row 0 has a counted position of each kind, so both the hidden
            // states and the global features must receive gradient.
            assert!(g.iter().any(|&g| g != 0.0), "seed {seed}: {what} is zero");
        }
        // Unmasked tokens and patches, and every [CLS], get exactly nothing.
        let g_ht = grad_of(&grads, htv.as_tensor());
        for (i, &lab) in c.labels.iter().enumerate() {
            if lab < 0 {
                assert!(g_ht[i * dt..(i + 1) * dt].iter().all(|&g| g == 0.0));
            }
        }
        let g_hv = grad_of(&grads, hvv.as_tensor());
        for bi in 0..c.b {
            for pi in 0..=c.np {
                let masked = pi > 0 && c.patch_mask[bi * c.np + pi - 1] != 0;
                let row = bi * (1 + c.np) + pi;
                if !masked {
                    assert!(g_hv[row * dv..(row + 1) * dv].iter().all(|&g| g == 0.0));
                }
            }
        }

        // The same heads and inputs in f32, the training dtype.
        let (mut obj32, _) = mvlm_in(dims, DType::F32, Some(&vm), &mut r);
        let f32t = |m: &Mat| tensor(m).to_dtype(DType::F32).expect("f32");
        let x32 = mvlm_features(
            &c,
            (&f32t(&c.ht), &f32t(&c.hv), &f32t(&c.fe), &f32t(&c.te)),
            dims,
            &mut r,
        );
        let got32: Vec<f64> = obj32
            .losses(&x32)
            .expect("losses")
            .iter()
            .map(|t| t.value.to_scalar::<f32>().expect("f32") as f64)
            .collect();
        assert_close(&got32, &want, 1e-5, &format!("seed {seed}: f32 [mlm, mvm]"));
    }
}

/// No masked position at all (`M = 0`) gives exact zeros that stay connected
/// to the graph (zero gradients, no error); masked positions whose pairs all
/// have weight 0 give exact zeros too.
#[test]
fn mvlm_without_counted_positions_is_a_connected_zero() {
    let dims = Dims {
        embed: 3,
        text_hidden: 4,
        vision_hidden: 5,
        vocab: 9,
        codebook: 6,
    };
    let mut r = rng(120);
    let mut c = mvlm_case(&mut r, dims, true);
    let (mut obj, _) = mvlm_in(dims, DType::F64, None, &mut r);
    // M = 0 in both modalities.
    let mut empty = MvlmCase {
        labels: vec![-1; c.b * c.l],
        patch_mask: vec![0; c.b * c.np],
        ..mvlm_case(&mut r, dims, true)
    };
    for case in [&mut empty, &mut c] {
        if case.labels.iter().any(|&l| l >= 0) {
            // Masked positions, but every pair dropped by the filter.
            case.weights = Some(vec![0.0; case.b]);
        }
        let (htv, hvv, fv, tv) = (var(&case.ht), var(&case.hv), var(&case.fe), var(&case.te));
        let x = mvlm_features(
            case,
            (
                htv.as_tensor(),
                hvv.as_tensor(),
                fv.as_tensor(),
                tv.as_tensor(),
            ),
            dims,
            &mut r,
        );
        let terms = obj.losses(&x).expect("losses");
        assert_eq!(
            terms.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["mlm", "mvm"]
        );
        for t in &terms {
            assert_eq!(t.value.dims(), &[] as &[usize], "{} is a scalar", t.name);
            assert_eq!(scalar(&t.value), 0.0, "{} is exactly zero", t.name);
        }
        let grads = (&terms[0].value + &terms[1].value)
            .expect("sum")
            .backward()
            .expect("backward");
        for (what, v) in [
            ("hidden_text", &htv),
            ("hidden_image", &hvv),
            ("image_embed", &fv),
            ("text_embed", &tv),
        ] {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{what} is not connected to the loss"));
            let g = g.flatten_all().expect("g").to_vec1::<f64>().expect("g");
            assert!(g.iter().all(|&g| g == 0.0), "{what} got a gradient");
        }
    }
}

#[test]
fn missing_inputs_are_named() {
    let fx = fixture(17);
    let (f, t, ids) = (tensor(&fx.f), tensor(&fx.t), ids_tensor(&fx.ids));
    let tau = Tensor::new(0.07f64, &Device::Cpu).expect("tau");
    let x = online_only(&f, &t, &ids, &tau);
    let named = |err: Error, obj: &str, inp: &str| {
        assert!(
            matches!(&err, Error::MissingInput { objective, input } if objective == obj && *input == inp),
            "{err}"
        );
    };
    let err = Itc::new(&ItcConfig::default(), fx.queue.clone())
        .losses(&x)
        .expect_err("no momentum");
    named(err, "itc", "momentum");
    let err = Kl::new(&KlConfig::default(), fx.queue.clone())
        .losses(&x)
        .expect_err("no momentum");
    named(err, "kl", "momentum");
    let err = Itm::new(&ItmConfig::default())
        .losses(&x)
        .expect_err("no logits");
    named(err, "itm", "matching");
    let dims = Dims {
        embed: E,
        text_hidden: 2,
        vision_hidden: 2,
        vocab: 3,
        codebook: 3,
    };
    let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F64, &Device::Cpu);
    let mvlm_with = |mlm: bool, mvm: bool| {
        let settings = MvlmConfig {
            mlm,
            mvm,
            ..MvlmConfig::default()
        };
        Mvlm::new(&mvlm::Config { settings, dims }, vb.clone()).expect("mvlm")
    };
    let err = mvlm_with(true, false)
        .losses(&x)
        .expect_err("no masked text");
    named(err, "mvlm", "masked_text");
    let err = mvlm_with(false, true)
        .losses(&x)
        .expect_err("no masked image");
    named(err, "mvlm", "masked_image");
}

/// Negative weights over `[other modality | own modality]` candidates,
/// written out directly: the candidates of each modality are the batch then
/// any queued items (`p_all`, `q_all`, ids `all_ids`); for query `i`, the
/// negatives are those with another image id, the `k` most similar of each
/// modality when `top_k > 0`, weighted `n exp(beta s) / sum exp(beta s)`
/// over all kept ones; the positive is candidate `i` of the other modality.
fn ref_bimodal_weights(
    ids: &[u32],
    q: &Mat,
    p_all: &Mat,
    q_all: &Mat,
    all_ids: &[u32],
    cfg: &BimodalConfig,
) -> Mat {
    let c = all_ids.len();
    let mut out = vec![vec![0.0; 2 * c]; B];
    for i in 0..B {
        let mut kept = Vec::new();
        for (offset, side) in [(0, p_all), (c, q_all)] {
            if offset == c && !cfg.intra_modal {
                continue;
            }
            let mut cands: Vec<(usize, f64)> = (0..c)
                .filter(|&j| all_ids[j] != ids[i])
                .map(|j| (offset + j, dot(&q[i], &side[j])))
                .collect();
            cands.sort_by(|a, b| b.1.partial_cmp(&a.1).expect("finite"));
            if cfg.top_k > 0 {
                cands.truncate(cfg.top_k);
            }
            kept.extend(cands);
        }
        let z: f64 = kept.iter().map(|(_, s)| (cfg.beta * s).exp()).sum();
        for (col, s) in &kept {
            out[i][*col] = kept.len() as f64 * (cfg.beta * s).exp() / z;
        }
        out[i][i] = 1.0;
    }
    out
}

/// `-l(q_i, p_i) + ln sum_c w_ic exp l_ic` over `[p_all | q_all]`, with the
/// weights held fixed (they carry no gradient).
fn ref_bimodal_rows(q: &Mat, p_all: &Mat, q_all: &Mat, tau: f64, w: &Mat) -> Vec<f64> {
    let c = p_all.len();
    (0..B)
        .map(|i| {
            let mut z = 0.0;
            for j in 0..c {
                z += w[i][j] * (dot(&q[i], &p_all[j]) / tau).exp();
                z += w[i][c + j] * (dot(&q[i], &q_all[j]) / tau).exp();
            }
            z.ln() - dot(&q[i], &p_all[i]) / tau
        })
        .collect()
}

/// Rows of `a` then rows of `b`.
fn stack(a: &Mat, b: &Mat) -> Mat {
    a.iter().chain(b).cloned().collect()
}

#[test]
fn bimodal_matches_the_formula_in_every_mode() {
    let modes = [
        BimodalConfig::default(),
        BimodalConfig {
            top_k: 1,
            ..BimodalConfig::default()
        },
        BimodalConfig {
            beta: 3.0,
            ..BimodalConfig::default()
        },
        BimodalConfig {
            top_k: 2,
            beta: 1.5,
            ..BimodalConfig::default()
        },
        BimodalConfig {
            intra_modal: false,
            ..BimodalConfig::default()
        },
    ];
    for (n, cfg) in modes.iter().enumerate() {
        let fx = fixture(40 + n as u64);
        let w = [1.0f32, 0.5, 1.0, 0.0];
        let w64 = w.map(f64::from);
        let (f0, t0) = (&fx.f, &fx.t);
        let wi = ref_bimodal_weights(&fx.ids, f0, t0, f0, &fx.ids, cfg);
        let wt = ref_bimodal_weights(&fx.ids, t0, f0, t0, &fx.ids, cfg);
        let mut obj = cots_objectives::bimodal::Bimodal::new(cfg).expect("config");
        check(&mut obj, &fx, Some(&w), |f, t, tau| {
            vec![
                wmean(&ref_bimodal_rows(f, t, f, tau, &wi), Some(&w64)),
                wmean(&ref_bimodal_rows(t, f, t, tau, &wt), Some(&w64)),
            ]
        });
    }
}

#[test]
fn bimodal_same_modality_negatives_change_the_loss() {
    // The point of the objective: with other images as negatives, an image
    // query close to another image pays for it.
    let fx = fixture(50);
    let run = |intra_modal| {
        let mut obj = cots_objectives::bimodal::Bimodal::new(&BimodalConfig {
            intra_modal,
            ..BimodalConfig::default()
        })
        .expect("config");
        let (f, t, ids) = (tensor(&fx.f), tensor(&fx.t), ids_tensor(&fx.ids));
        let tau = Tensor::new(fx.tau, &Device::Cpu).expect("tau");
        let x = online_only(&f, &t, &ids, &tau);
        obj.losses(&x)
            .expect("losses")
            .iter()
            .map(|t| scalar(&t.value))
            .collect::<Vec<_>>()
    };
    let (with, without) = (run(true), run(false));
    for (a, b) in with.iter().zip(&without) {
        assert!(a > b, "extra negatives must raise the loss: {a} vs {b}");
    }
}

#[test]
fn bimodal_queue_adds_past_batches_as_negatives_and_resumes_exactly() {
    use cots_objectives::bimodal::Bimodal;
    let fx = fixture(60);
    let mut r = rng(61);
    // Three past batches; a queue of 8 keeps the last two. Their ids
    // overlap the current batch's (0, 1, 1, 2), so some queued items are
    // neither positive nor negative.
    let past: Vec<(Mat, Mat, Vec<u32>)> = [[9u32, 1, 7, 8], [0, 5, 6, 7], [2, 3, 4, 9]]
        .into_iter()
        .map(|ids| {
            (
                unit_rows(&mut r, B, E),
                unit_rows(&mut r, B, E),
                ids.to_vec(),
            )
        })
        .collect();
    for cfg in [
        BimodalConfig {
            queue_size: 8,
            ..BimodalConfig::default()
        },
        BimodalConfig {
            queue_size: 8,
            top_k: 3,
            beta: 2.0,
            ..BimodalConfig::default()
        },
    ] {
        let mut obj = Bimodal::new(&cfg).expect("config");
        for (pf, pt, ids) in &past {
            let (f, t, ids) = (tensor(pf), tensor(pt), ids_tensor(ids));
            let tau = Tensor::new(0.07f64, &Device::Cpu).expect("tau");
            obj.after_step(&online_only(&f, &t, &ids, &tau))
                .expect("enqueue");
        }
        let st = obj.state().expect("state");
        assert_eq!(st.tensors.len(), 6, "two batches of three tensors");
        let qf = stack(&past[1].0, &past[2].0);
        let qt = stack(&past[1].1, &past[2].1);
        let all_ids: Vec<u32> = fx
            .ids
            .iter()
            .chain(&past[1].2)
            .chain(&past[2].2)
            .copied()
            .collect();
        let (f0, t0) = (&fx.f, &fx.t);
        let wi = ref_bimodal_weights(
            &fx.ids,
            f0,
            &stack(t0, &qt),
            &stack(f0, &qf),
            &all_ids,
            &cfg,
        );
        let wt = ref_bimodal_weights(
            &fx.ids,
            t0,
            &stack(f0, &qf),
            &stack(t0, &qt),
            &all_ids,
            &cfg,
        );
        let reference = |f: &Mat, t: &Mat, tau: f64| {
            vec![
                wmean(
                    &ref_bimodal_rows(f, &stack(t, &qt), &stack(f, &qf), tau, &wi),
                    None,
                ),
                wmean(
                    &ref_bimodal_rows(t, &stack(f, &qf), &stack(t, &qt), tau, &wt),
                    None,
                ),
            ]
        };
        check(&mut obj, &fx, None, reference);
        // A fresh objective restored from the state computes the same loss.
        let mut back = Bimodal::new(&cfg).expect("config");
        back.load_state(&st).expect("load");
        check(&mut back, &fx, None, reference);
    }
}

/// Before the queue's `start_step` ITC with momentum keys is in-batch
/// momentum contrast (the `in_batch_negatives`, no-queue formulation, itself
/// checked against the direct formula above) and KL is zero; from the start
/// step on both read the queue as usual.
#[test]
fn queue_start_step_switches_the_queue_readers_on() {
    let fx = fixture(31);
    let start = 3;
    // The same queue contents, read from a queue that starts at `start`.
    let late = {
        let q = fx.queue.lock();
        let mut late = LockstepQueue::new(
            &QueueConfig {
                size: K,
                seed: 31,
                start_step: start,
            },
            E,
            DType::F64,
            &Device::Cpu,
        )
        .expect("queue");
        late.load_state(&q.state().expect("state")).expect("load");
        SharedQueue::new(late)
    };
    let (f, t) = (tensor(&fx.f), tensor(&fx.t));
    let (fm, tm) = (tensor(&fx.fm), tensor(&fx.tm));
    let tau = Tensor::new(fx.tau, &Device::Cpu).expect("tau");
    let x = online_only(&f, &t, &ids_tensor(&fx.ids), &tau).with_momentum(momentum(&fm, &tm, None));
    let values = |obj: &mut dyn Objective| -> Vec<f64> {
        obj.losses(&x)
            .expect("losses")
            .iter()
            .map(|t| scalar(&t.value))
            .collect()
    };
    let in_batch = ItcConfig {
        in_batch_negatives: true,
        queue_negatives: false,
        ..ItcConfig::default()
    };
    let want_early = values(&mut Itc::new(&in_batch, fx.queue.clone()));
    for step in 0..start {
        late.lock().set_step(step);
        assert!(!late.active(), "step {step} is before the start");
        let got = values(&mut Itc::new(&ItcConfig::default(), late.clone()));
        assert_close(&got, &want_early, 1e-12, "itc before the queue starts");
        let kl = values(&mut Kl::new(&KlConfig::default(), late.clone()));
        assert_eq!(kl, vec![0.0], "kl before the queue starts");
    }
    late.lock().set_step(start);
    assert!(late.active());
    for (cfg, what) in [(ItcConfig::default(), "itc"), (in_batch, "itc in-batch")] {
        let got = values(&mut Itc::new(&cfg, late.clone()));
        let want = values(&mut Itc::new(&cfg, fx.queue.clone()));
        assert_close(&got, &want, 1e-12, what);
    }
    // The queue formulation differs from the in-batch one on this fixture, so
    // the comparisons above tell the two apart.
    let queue_itc = values(&mut Itc::new(&ItcConfig::default(), late.clone()));
    assert!(queue_itc
        .iter()
        .zip(&want_early)
        .any(|(a, b)| (a - b).abs() > 1e-6));
    let got = values(&mut Kl::new(&KlConfig::default(), late.clone()));
    let want = values(&mut Kl::new(&KlConfig::default(), fx.queue.clone()));
    assert_close(&got, &want, 1e-12, "kl from the start step");
    assert!(got[0] > 0.0, "kl over the queue is positive here");
}
