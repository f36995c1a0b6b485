//! The lockstep queue invariant, the adaptive momentum filter's precision and
//! recall against their derivation, and the config/registry/composition.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use cots_objectives::amf::{AdaptiveMomentumFilter, AmfConfig, AmfRule};
use cots_objectives::*;
use cots_ops::queue::EMPTY_SLOT;
use rand::Rng;

/// The queue against a plain ring buffer: after many enqueues with
/// wraparound and filtered rows, slot k of the image queue, the text queue
/// and the ids all describe the same pair.
#[test]
fn queues_stay_in_lockstep_through_wraparound_and_filtering() {
    let (k, b) = (12usize, 4usize);
    let mut q = LockstepQueue::new(
        &QueueConfig {
            size: k,
            seed: 3,
            ..Default::default()
        },
        3,
        DType::F32,
        &Device::Cpu,
    )
    .expect("queue");
    let mut r = rng(21);
    // Reference ring buffer of pair numbers.
    let mut reference: Vec<Option<u32>> = vec![None; k];
    let mut ptr = 0usize;
    let mut next = 0u32;
    let mut saved = None;
    for step in 0..25 {
        let pairs: Vec<u32> = (0..b as u32).map(|i| next + i).collect();
        next += b as u32;
        // Pair p: image key [p, 1, 0], text key [0, p, 2]; p identifies it in both.
        let img: Vec<f32> = pairs.iter().flat_map(|&p| [p as f32, 1.0, 0.0]).collect();
        let txt: Vec<f32> = pairs.iter().flat_map(|&p| [0.0, p as f32, 2.0]).collect();
        let w: Vec<f32> = (0..b)
            .map(|_| if r.random::<f64>() < 0.3 { 0.0 } else { 1.0 })
            .collect();
        let dev = Device::Cpu;
        q.enqueue(
            &Tensor::from_vec(img, (b, 3), &dev).expect("t"),
            &Tensor::from_vec(txt, (b, 3), &dev).expect("t"),
            &Tensor::from_vec(pairs.clone(), b, &dev).expect("t"),
            Some(&w),
        )
        .expect("enqueue");
        for (p, wi) in pairs.iter().zip(&w) {
            if *wi > 0.0 {
                reference[ptr] = Some(*p);
                ptr = (ptr + 1) % k;
            }
        }
        assert_eq!(q.ptr(), ptr);
        let v = q.view();
        let (im, tx, ids) = (
            v.image.to_vec2::<f32>().expect("i"),
            v.text.to_vec2::<f32>().expect("t"),
            v.ids.to_vec1::<u32>().expect("ids"),
        );
        for slot in 0..k {
            match reference[slot] {
                Some(p) => {
                    assert_eq!(
                        (ids[slot], im[slot][0], tx[slot][1]),
                        (p, p as f32, p as f32),
                        "slot {slot} at step {step}"
                    );
                    assert_eq!((im[slot][1], tx[slot][2]), (1.0, 2.0));
                }
                None => {
                    assert_eq!(ids[slot], EMPTY_SLOT);
                    // Unfilled slots hold random unit vectors.
                    let n: f32 = im[slot].iter().map(|x| x * x).sum();
                    assert!((n - 1.0).abs() < 1e-5);
                }
            }
        }
        if step == 10 {
            saved = Some((q.state().expect("state"), reference.clone(), ptr));
        }
    }
    assert!(
        next as usize > 3 * k,
        "the test must wrap around several times"
    );
    // Restoring the saved state brings back exactly that moment, and the saved
    // tensors were copies that later in-place writes did not touch.
    let (state, ref_then, ptr_then) = saved.expect("saved");
    q.load_state(&state).expect("load");
    assert_eq!(q.ptr(), ptr_then);
    let ids = q.view().ids.to_vec1::<u32>().expect("ids");
    let want: Vec<u32> = ref_then.iter().map(|p| p.unwrap_or(EMPTY_SLOT)).collect();
    assert_eq!(ids, want);
}

#[test]
fn queue_rejects_batches_that_do_not_divide_it() {
    let mut q = LockstepQueue::new(
        &QueueConfig {
            size: 12,
            seed: 0,
            ..Default::default()
        },
        2,
        DType::F32,
        &Device::Cpu,
    )
    .expect("queue");
    let keys = Tensor::zeros((5, 2), DType::F32, &Device::Cpu).expect("t");
    let ids = Tensor::zeros(5, DType::U32, &Device::Cpu).expect("t");
    let err = q
        .enqueue(&keys, &keys, &ids, None)
        .expect_err("5 does not divide 12");
    assert!(
        matches!(
            err,
            Error::QueueBatch {
                queue: 12,
                batch: 5
            }
        ),
        "{err}"
    );
    let wrong = LockstepQueue::new(
        &QueueConfig {
            size: 8,
            seed: 0,
            ..Default::default()
        },
        2,
        DType::F32,
        &Device::Cpu,
    )
    .expect("q");
    assert!(q.load_state(&wrong.state().expect("s")).is_err());
}

fn gaussian(r: &mut impl Rng) -> f64 {
    r.sample(rand_distr::StandardNormal)
}

fn gaussian_unit(r: &mut impl Rng, e: usize) -> Vec<f64> {
    let v: Vec<f64> = (0..e).map(|_| gaussian(r)).collect();
    let n = dot(&v, &v).sqrt();
    v.into_iter().map(|x| x / n).collect()
}

/// Standard normal CDF (Abramowitz-Stegun 7.1.26 erf, error < 1.5e-7).
fn phi(z: f64) -> f64 {
    let x = z.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.3275911 * x);
    let poly = t
        * (0.254829592
            + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let erf = 1.0 - poly * (-x * x).exp();
    if z >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

/// AMF on a mixture of matched and mismatched momentum pairs.
///
/// Derivation. Each pair is mismatched with probability p = 0.3. A matched
/// pair is built as t = c f + sqrt(1 - c^2) u with u a unit vector orthogonal
/// to f, so its score is exactly c = 0.8. A mismatched pair has t independent
/// of f, both uniform on the sphere in E = 64 dimensions, so its score has
/// mean 0 and variance 1/E and is close to N(0, 1/E).
/// The running statistics converge to the mixture's:
///   mu = (1 - p) c,  E[s^2] = (1 - p) c^2 + p / E,
///   sigma^2 = E[s^2] - mu^2 = p (1 - p) c^2 + p / E,
/// giving mu = 0.56, sigma = 0.373 and the threshold T = mu - lambda sigma
/// = 0.187 for lambda = 1.
/// - Recall (dropped mismatched / mismatched) = P(N(0, 1/E) < T)
///   = Phi(T sqrt(E)) = Phi(1.50) = 0.933.
/// - Matched pairs score 0.8 > T: none is dropped unless the running estimate
///   of T errs by 0.6, i.e. by dozens of its standard errors, so precision
///   (dropped mismatched / dropped) is 1.
///
/// Slack. With EMA momentum 0.9 the statistics average about 19 batches of
/// 64 scores (~1200), so the estimated mismatch fraction has a standard
/// error of 0.013 and T (dT/dp = -1.14) one of about 0.015; recall moves
/// by phi(1.50) sqrt(E) = 1.04 per unit of T, i.e. ~0.016. Recall is measured
/// on ~580 mismatched pairs: binomial standard error 0.010. The sphere's dot
/// product is slightly lighter-tailed than the normal (< 0.01 here). The
/// tolerance 0.07 is about 3.5 combined standard errors.
#[test]
fn amf_drops_mismatched_pairs_at_the_rate_the_math_predicts() {
    let (e, b, p, c, lambda) = (64usize, 64usize, 0.3f64, 0.8f64, 1.0f64);
    let (warmup, measured) = (20u64, 30u64);
    let mut amf = AdaptiveMomentumFilter::new(&AmfConfig {
        enabled: true,
        lambda,
        warmup_steps: warmup,
        momentum: 0.9,
        rule: AmfRule::Threshold,
        ..AmfConfig::default()
    })
    .expect("amf");
    let mut r = rng(22);
    let (mut tp, mut fp, mut mismatched) = (0usize, 0usize, 0usize);
    let mut saved = None;
    for step in 0..warmup + measured {
        let mut f = Vec::new();
        let mut t = Vec::new();
        let mut noisy = Vec::new();
        for _ in 0..b {
            let fi = gaussian_unit(&mut r, e);
            let bad = r.random::<f64>() < p;
            let ti = if bad {
                gaussian_unit(&mut r, e)
            } else {
                let g = gaussian_unit(&mut r, e);
                let gf = dot(&g, &fi);
                let u: Vec<f64> = g.iter().zip(&fi).map(|(x, y)| x - gf * y).collect();
                let un = dot(&u, &u).sqrt();
                fi.iter()
                    .zip(&u)
                    .map(|(x, y)| c * x + (1.0 - c * c).sqrt() * y / un)
                    .collect()
            };
            f.push(fi);
            t.push(ti);
            noisy.push(bad);
        }
        let (ft, tt) = (tensor(&f), tensor(&t));
        if step == warmup {
            saved = Some((amf.clone(), ft.clone(), tt.clone()));
        }
        let out = amf.filter(&ft, &tt).expect("filter");
        let w = out.weights.to_vec1::<f32>().expect("w");
        if step < warmup {
            assert!(
                out.stats.threshold.is_none() && w.iter().all(|&x| x == 1.0),
                "dropped during warm-up"
            );
            continue;
        }
        let dropped = w.iter().filter(|&&x| x == 0.0).count();
        assert!((out.stats.filtered_fraction - dropped as f64 / b as f64).abs() < 1e-12);
        for (wi, bad) in w.iter().zip(&noisy) {
            mismatched += *bad as usize;
            if *wi == 0.0 {
                if *bad {
                    tp += 1
                } else {
                    fp += 1
                }
            }
        }
    }
    let mu = (1.0 - p) * c;
    let sigma = (p * (1.0 - p) * c * c + p / e as f64).sqrt();
    let expected_recall = phi((mu - lambda * sigma) * (e as f64).sqrt());
    let recall = tp as f64 / mismatched as f64;
    let precision = tp as f64 / (tp + fp).max(1) as f64;
    assert!(
        (expected_recall - 0.933).abs() < 0.01,
        "derivation drifted: {expected_recall}"
    );
    eprintln!("amf recall {recall:.3} (predicted {expected_recall:.3}), precision {precision:.3}");
    assert!(
        (recall - expected_recall).abs() < 0.07,
        "recall {recall}, predicted {expected_recall}"
    );
    assert!(
        precision >= 0.99,
        "precision {precision} ({fp} matched pairs dropped)"
    );
    // A restored filter decides exactly like the original.
    let (orig, ft, tt) = saved.expect("saved");
    let mut restored = AdaptiveMomentumFilter::new(&AmfConfig {
        enabled: true,
        lambda,
        warmup_steps: warmup,
        momentum: 0.9,
        rule: AmfRule::Threshold,
        ..AmfConfig::default()
    })
    .expect("amf");
    restored
        .load_state(&orig.state().expect("state"))
        .expect("load");
    let mut orig = orig;
    let a = orig.filter(&ft, &tt).expect("a");
    let bb = restored.filter(&ft, &tt).expect("b");
    assert_eq!(
        a.weights.to_vec1::<f32>().expect("a"),
        bb.weights.to_vec1::<f32>().expect("b")
    );
    assert_eq!(a.stats, bb.stats);
}

#[test]
fn configs_parse_from_toml_and_build() {
    let text = r#"
        [queue]
        size = 16
        [amf]
        enabled = true
        warmup_steps = 5
        [[objectives]]
        kind = "itc"
        weight = 1.0
        in_batch_negatives = true
        [[objectives]]
        kind = "kl"
        direction = "i2t_to_t2i"
        weight = 0.5
        [[objectives]]
        kind = "mvlm"
        mvm = false
        [[objectives]]
        kind = "vse"
        margin = 0.1
    "#;
    let cfg: ObjectivesConfig = toml::from_str(text).expect("parse");
    assert_eq!(cfg.objectives.len(), 4);
    assert_eq!(cfg.objectives[1].weight(), 0.5);
    let dims = Dims {
        embed: 4,
        text_hidden: 6,
        vision_hidden: 6,
        vocab: 10,
        codebook: 8,
    };
    let vm = VarMap::new();
    let objs = build(
        &cfg,
        dims,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .expect("build");
    assert_eq!(
        objs.names()
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>(),
        ["itc", "kl", "mvlm", "vse"]
    );
    assert_eq!(
        objs.needs(),
        Needs {
            momentum: true,
            masked_text: true,
            ..Needs::default()
        }
    );
    assert_eq!(objs.queue().expect("queue").lock().size(), 16);
    // Only the MLM head exists when MVM is off.
    assert!(vm
        .data()
        .lock()
        .expect("lock")
        .keys()
        .all(|k| k.starts_with("mlm_head.")));

    // A typo in a parameter is an error, not a silently ignored line.
    let typo = "[[objectives]]\nkind = \"itc\"\nin_batch_negative = true\n";
    assert!(toml::from_str::<ObjectivesConfig>(typo).is_err());
    let unknown = "[[objectives]]\nkind = \"mystery\"\n";
    assert!(toml::from_str::<ObjectivesConfig>(unknown).is_err());
    let twice = "[[objectives]]\nkind = \"clip\"\n[[objectives]]\nkind = \"clip\"\n";
    let twice: ObjectivesConfig = toml::from_str(twice).expect("parse");
    assert!(matches!(
        build(
            &twice,
            dims,
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)
        ),
        Err(Error::Config(_))
    ));

    for preset in [
        ObjectivesConfig::cots_default(),
        ObjectivesConfig::clip_default(),
    ] {
        let back: ObjectivesConfig =
            toml::from_str(&toml::to_string(&preset).expect("write")).expect("read");
        assert_eq!(back, preset);
    }
    let cots = build(
        &ObjectivesConfig {
            queue: QueueConfig {
                size: 64,
                seed: 0,
                ..Default::default()
            },
            ..ObjectivesConfig::cots_default()
        },
        dims,
        VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu),
    )
    .expect("cots");
    assert_eq!(
        cots.needs(),
        Needs {
            momentum: true,
            masked_text: true,
            masked_image: true,
            dvae_codes: true,
            cross_encoder: false
        }
    );
    let clip = build(
        &ObjectivesConfig::clip_default(),
        dims,
        VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu),
    )
    .expect("clip");
    assert_eq!(clip.needs(), Needs::default());
    assert!(clip.queue().is_none());
}

/// ITC and KL both read the queue, yet one step enqueues the batch once, and
/// the whole state survives a save/restore.
#[test]
fn composition_enqueues_once_and_restores_its_state() {
    let (b, e) = (4usize, 3usize);
    let cfg: ObjectivesConfig = toml::from_str(
        "[queue]\nsize = 8\n[amf]\nenabled = true\nwarmup_steps = 0\n[[objectives]]\nkind = \"itc\"\n[[objectives]]\nkind = \"kl\"\nweight = 0.5\n",
    )
    .expect("parse");
    let dims = Dims {
        embed: e,
        text_hidden: 2,
        vision_hidden: 2,
        vocab: 2,
        codebook: 2,
    };
    let mut objs = build(
        &cfg,
        dims,
        VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu),
    )
    .expect("build");
    let mut r = rng(23);
    let f32t = |m: &Mat| tensor(m).to_dtype(DType::F32).expect("f32");
    let (f, t, fm, tm) = (
        f32t(&unit_rows(&mut r, b, e)),
        f32t(&unit_rows(&mut r, b, e)),
        f32t(&unit_rows(&mut r, b, e)),
        f32t(&unit_rows(&mut r, b, e)),
    );
    let ids = Tensor::new(&[0u32, 1, 2, 3], &Device::Cpu).expect("ids");
    let tau = Tensor::new(0.07f32, &Device::Cpu).expect("tau");
    let w = Tensor::new(&[1.0f32, 0.0, 1.0, 1.0], &Device::Cpu).expect("w");
    let x = StepFeatures::new(f, t, ids, tau).with_momentum(MomentumFeatures {
        image: fm.clone(),
        text: tm.clone(),
        pair_weights: Some(w),
    });
    let losses = objs.losses(&x).expect("losses");
    let names: Vec<&str> = losses.terms.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["itc_i2t", "itc_t2i", "kl"]);
    let v: Vec<f32> = losses
        .terms
        .iter()
        .map(|t| t.value.to_scalar::<f32>().expect("v"))
        .collect();
    let total = losses.total.to_scalar::<f32>().expect("total");
    assert!(
        (total - (v[0] + v[1] + 0.5 * v[2])).abs() < 1e-5,
        "{total} vs {v:?}"
    );
    let _ = objs.filter(&fm, &tm).expect("amf").expect("amf on");
    let before = objs.state().expect("state");
    objs.after_step(&x.detached().expect("detached"))
        .expect("after");
    // Three kept pairs, written once although two objectives read the queue.
    assert_eq!(objs.queue().expect("q").lock().ptr(), 3);
    let ids_now = objs
        .queue()
        .expect("q")
        .view()
        .ids
        .to_vec1::<u32>()
        .expect("ids");
    assert_eq!(&ids_now[..4], &[0, 2, 3, EMPTY_SLOT]);
    let after = objs.state().expect("state");
    assert!(after.tensors.contains_key("queue.image") && after.meta.get("amf").is_some());
    objs.load_state(&before).expect("load");
    assert_eq!(objs.queue().expect("q").lock().ptr(), 0);
    assert_eq!(
        objs.queue()
            .expect("q")
            .view()
            .ids
            .to_vec1::<u32>()
            .expect("ids"),
        vec![EMPTY_SLOT; 8]
    );
    objs.load_state(&after).expect("load");
    assert_eq!(
        objs.queue()
            .expect("q")
            .view()
            .ids
            .to_vec1::<u32>()
            .expect("ids"),
        ids_now
    );
}

/// Slot ages against a plain ring buffer of step stamps: after wraparound
/// and filtered rows, the mean and max age of the written slots are those of
/// the reference, and they survive a state round trip into a fresh queue.
#[test]
fn queue_staleness_matches_a_ring_of_step_stamps_and_is_checkpointed() {
    let (k, b) = (12usize, 4usize);
    let cfg = QueueConfig {
        size: k,
        seed: 5,
        ..Default::default()
    };
    let mut q = LockstepQueue::new(&cfg, 3, DType::F32, &Device::Cpu).expect("queue");
    assert!(q.staleness().is_none(), "nothing written yet");
    let mut r = rng(8);
    let mut stamps: Vec<Option<u64>> = vec![None; k];
    let mut ptr = 0usize;
    for step in 0..17u64 {
        q.set_step(step);
        // Ages as the forward pass of this step sees them (before its write).
        let written: Vec<u64> = stamps.iter().flatten().map(|s| step - s).collect();
        match q.staleness() {
            None => assert!(written.is_empty()),
            Some(s) => {
                let mean = written.iter().sum::<u64>() as f64 / written.len() as f64;
                assert!(
                    (s.mean - mean).abs() < 1e-12,
                    "step {step}: {} vs {mean}",
                    s.mean
                );
                assert_eq!(s.max, *written.iter().max().expect("some"));
                assert!((s.filled - written.len() as f64 / k as f64).abs() < 1e-12);
            }
        }
        let w: Vec<f32> = (0..b)
            .map(|_| if r.random::<f64>() < 0.3 { 0.0 } else { 1.0 })
            .collect();
        let keys = Tensor::ones((b, 3), DType::F32, &Device::Cpu).expect("keys");
        let ids = Tensor::from_vec(vec![1u32; b], b, &Device::Cpu).expect("ids");
        q.enqueue(&keys, &keys, &ids, Some(&w)).expect("enqueue");
        for wi in &w {
            if *wi > 0.0 {
                stamps[ptr] = Some(step);
                ptr = (ptr + 1) % k;
            }
        }
    }
    let before = q.staleness().expect("written");
    let state = q.state().expect("state");
    let mut fresh = LockstepQueue::new(&cfg, 3, DType::F32, &Device::Cpu).expect("queue");
    fresh.load_state(&state).expect("load");
    assert_eq!(fresh.staleness(), Some(before));
    // A checkpoint from before the stamps existed still loads: the keys and
    // pointer come back, the ages are unknown.
    let mut old = state.clone();
    old.tensors.remove("stamps");
    let mut fresh = LockstepQueue::new(&cfg, 3, DType::F32, &Device::Cpu).expect("queue");
    fresh.load_state(&old).expect("load an old state");
    assert_eq!(fresh.ptr(), q.ptr());
    assert!(fresh.staleness().is_none());
}
