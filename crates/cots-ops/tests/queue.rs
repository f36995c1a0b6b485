//! The fused queue ops against the naive composition (full logits, candle's
//! own autograd) on fresh random inputs, and against finite differences.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use cots_ops::queue::{
    queue_contrastive, queue_contrastive_naive, queue_kl, queue_kl_naive, KlDirection, PositiveIds,
    EMPTY_SLOT,
};
use cots_ops::queue_fused::TILE;
use rand::{Rng, SeedableRng};

fn unit(
    rows: usize,
    d: usize,
    scale: f64,
    dtype: DType,
    rng: &mut rand::rngs::StdRng,
) -> Result<Tensor> {
    let v: Vec<f64> = (0..rows * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    let t = Tensor::from_vec(v, (rows, d), &Device::Cpu)?;
    let n = t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    (t.broadcast_div(&n)? * scale)?.to_dtype(dtype)
}

fn max_rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    assert_eq!(a.len(), b.len());
    // Outputs that are exactly zero in theory (K = 0) are compared absolutely.
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-6);
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / scale)
        .fold(0.0, f64::max))
}

struct Case {
    b: usize,
    k: usize,
    d: usize,
    tau: f64,
    /// Norm of q and k rows (large norms with a tiny tau stress overflow).
    scale: f64,
    ids: Option<(Vec<u32>, Vec<u32>)>,
}

/// Loss, lse and the gradients of (sum loss + 0.3 sum lse) w.r.t. q, k, tau.
fn contrastive(case: &Case, dtype: DType, fused: bool, seed: u64) -> Result<Vec<Tensor>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let q = Var::from_tensor(&unit(case.b, case.d, case.scale, dtype, &mut rng)?)?;
    let k = Var::from_tensor(&unit(case.b, case.d, case.scale, dtype, &mut rng)?)?;
    let queue = unit(case.k, case.d, 1.0, dtype, &mut rng)?;
    let tau = Var::from_tensor(&Tensor::new(case.tau, &Device::Cpu)?.to_dtype(dtype)?)?;
    let id_t = case.ids.as_ref().map(|(r, s)| {
        (
            Tensor::new(r.as_slice(), &Device::Cpu).unwrap(),
            Tensor::new(s.as_slice(), &Device::Cpu).unwrap(),
        )
    });
    let ids = id_t
        .as_ref()
        .map(|(r, s)| PositiveIds { rows: r, queue: s });
    let f = if fused {
        queue_contrastive
    } else {
        queue_contrastive_naive
    };
    let out = f(q.as_tensor(), k.as_tensor(), &queue, ids, tau.as_tensor())?;
    let obj = (out.loss.sum_all()? + (out.lse.sum_all()? * 0.3)?)?;
    let g = obj.backward()?;
    Ok(vec![
        out.loss,
        out.lse,
        g.get(q.as_tensor()).expect("q grad").clone(),
        g.get(k.as_tensor()).expect("k grad").clone(),
        g.get(tau.as_tensor()).expect("tau grad").clone(),
    ])
}

fn ids(b: usize, k: usize, same: bool, rng: &mut rand::rngs::StdRng) -> (Vec<u32>, Vec<u32>) {
    let rows: Vec<u32> = (0..b)
        .map(|i| if same { 7 } else { (i % 5) as u32 })
        .collect();
    let slots: Vec<u32> = (0..k)
        .map(|_| match rng.random_range(0..8) {
            0 => EMPTY_SLOT,
            _ if same => 7,
            x => (x % 6) as u32,
        })
        .collect();
    (rows, slots)
}

#[test]
fn contrastive_matches_naive_in_f64_and_f32() -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let cases = [
        Case {
            b: 6,
            k: 2 * TILE + 300,
            d: 16,
            tau: 0.07,
            scale: 1.0,
            ids: None,
        },
        Case {
            b: 1,
            k: 700,
            d: 8,
            tau: 0.1,
            scale: 1.0,
            ids: None,
        },
        Case {
            b: 5,
            k: 0,
            d: 8,
            tau: 0.07,
            scale: 1.0,
            ids: None,
        },
        Case {
            b: 4,
            k: 600,
            d: 32,
            tau: 0.01,
            scale: 30.0,
            ids: None,
        },
        Case {
            b: 7,
            k: TILE + 30,
            d: 16,
            tau: 0.07,
            scale: 1.0,
            ids: Some(ids(7, TILE + 30, false, &mut rng)),
        },
        Case {
            b: 3,
            k: 515,
            d: 16,
            tau: 0.07,
            scale: 1.0,
            ids: Some(ids(3, 515, true, &mut rng)),
        },
    ];
    for (n, case) in cases.iter().enumerate() {
        let seed = 100 + n as u64;
        let want = contrastive(case, DType::F64, false, seed)?;
        // With tau 0.01 and dot products of 900 the logits reach 9e4, where
        // f32 itself resolves only ~1e-2: there f32 must stay finite and
        // close, and f64 carries the tight check.
        let f32_tol = if case.scale > 1.0 { 1e-2 } else { 1e-4 };
        for (dtype, tol) in [(DType::F64, 1e-5), (DType::F32, f32_tol)] {
            let got = contrastive(case, dtype, true, seed)?;
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let finite = g
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?
                    .iter()
                    .all(|x| x.is_finite());
                assert!(finite, "case {n} output {i} {dtype:?} is not finite");
                let err = max_rel(g, w)?;
                assert!(
                    err < tol,
                    "case {n} output {i} {dtype:?}: relative error {err}"
                );
            }
        }
    }
    Ok(())
}

fn kl_all(
    dir: KlDirection,
    dtype: DType,
    fused: bool,
    b: usize,
    k: usize,
    d: usize,
    seed: u64,
) -> Result<Vec<Tensor>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = Var::from_tensor(&unit(b, d, 1.0, dtype, &mut rng)?)?;
    let t = Var::from_tensor(&unit(b, d, 1.0, dtype, &mut rng)?)?;
    let (fm, tm) = (
        unit(b, d, 1.0, dtype, &mut rng)?,
        unit(b, d, 1.0, dtype, &mut rng)?,
    );
    let (qi, qt) = (
        unit(k, d, 1.0, dtype, &mut rng)?,
        unit(k, d, 1.0, dtype, &mut rng)?,
    );
    let tau = Var::from_tensor(&Tensor::new(0.1f64, &Device::Cpu)?.to_dtype(dtype)?)?;
    let op = if fused { queue_kl } else { queue_kl_naive };
    let out = op(
        f.as_tensor(),
        &tm,
        &qt,
        t.as_tensor(),
        &fm,
        &qi,
        tau.as_tensor(),
        dir,
    )?;
    let weights = Tensor::arange(1.0, (b + 1) as f64, &Device::Cpu)?.to_dtype(dtype)?;
    let g = (&out * weights)?.sum_all()?.backward()?;
    Ok(vec![
        out,
        g.get(f.as_tensor()).expect("f grad").clone(),
        g.get(t.as_tensor()).expect("t grad").clone(),
        g.get(tau.as_tensor()).expect("tau grad").clone(),
    ])
}

#[test]
fn kl_matches_naive_in_every_direction() -> Result<()> {
    for dir in [
        KlDirection::I2tToT2i,
        KlDirection::T2iToI2t,
        KlDirection::Symmetric,
    ] {
        for (b, k) in [(5, 2 * TILE + 100), (1, 3), (4, 0)] {
            let want = kl_all(dir, DType::F64, false, b, k, 12, 5)?;
            for (dtype, tol) in [(DType::F64, 1e-5), (DType::F32, 1e-4)] {
                let got = kl_all(dir, dtype, true, b, k, 12, 5)?;
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let err = max_rel(g, w)?;
                    assert!(
                        err < tol,
                        "{dir:?} b {b} k {k} output {i} {dtype:?}: relative error {err}"
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn finite_differences_agree_with_the_fused_gradients() -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (b, k, d) = (3, 40, 5);
    let q = unit(b, d, 1.0, DType::F64, &mut rng)?;
    let kk = unit(b, d, 1.0, DType::F64, &mut rng)?;
    let queue = unit(k, d, 1.0, DType::F64, &mut rng)?;
    let (fm, tm) = (
        unit(b, d, 1.0, DType::F64, &mut rng)?,
        unit(b, d, 1.0, DType::F64, &mut rng)?,
    );
    let tau = Tensor::new(0.2f64, &Device::Cpu)?;
    let (rows, slots) = ids(b, k, false, &mut rng);
    let (rt, st) = (
        Tensor::new(rows.as_slice(), &Device::Cpu)?,
        Tensor::new(slots.as_slice(), &Device::Cpu)?,
    );
    let loss_of = |q: &Tensor| -> Result<f64> {
        let ids = Some(PositiveIds {
            rows: &rt,
            queue: &st,
        });
        let c = queue_contrastive(q, &kk, &queue, ids, &tau)?
            .loss
            .sum_all()?
            .to_scalar::<f64>()?;
        let kl = queue_kl(
            q,
            &tm,
            &queue,
            &kk,
            &fm,
            &queue,
            &tau,
            KlDirection::Symmetric,
        )?
        .sum_all()?
        .to_scalar::<f64>()?;
        Ok(c + kl)
    };
    let qv = Var::from_tensor(&q)?;
    let ids = Some(PositiveIds {
        rows: &rt,
        queue: &st,
    });
    let total = (queue_contrastive(qv.as_tensor(), &kk, &queue, ids, &tau)?
        .loss
        .sum_all()?
        + queue_kl(
            qv.as_tensor(),
            &tm,
            &queue,
            &kk,
            &fm,
            &queue,
            &tau,
            KlDirection::Symmetric,
        )?
        .sum_all()?)?;
    let grad = total
        .backward()?
        .get(qv.as_tensor())
        .expect("grad")
        .flatten_all()?
        .to_vec1::<f64>()?;
    let base = q.flatten_all()?.to_vec1::<f64>()?;
    let h = 1e-6;
    for i in 0..base.len() {
        let mut up = base.clone();
        up[i] += h;
        let mut down = base.clone();
        down[i] -= h;
        let fd = (loss_of(&Tensor::from_vec(up, (b, d), &Device::Cpu)?)?
            - loss_of(&Tensor::from_vec(down, (b, d), &Device::Cpu)?)?)
            / (2.0 * h);
        assert!(
            (fd - grad[i]).abs() < 1e-5 * (1.0 + fd.abs()),
            "coordinate {i}: fd {fd} vs {}",
            grad[i]
        );
    }
    Ok(())
}
