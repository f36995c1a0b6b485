//! The CUDA forward kernels of the queue contrastive op
//! (`kernels/queue_contrastive.cu`) and of the task-level KL
//! (`kernels/queue_kl.cu`) against slow f64 host references on fresh random
//! inputs, and both ops' backward passes on CUDA against the CPU.
//!
//! These tests need the `cuda` feature and a GPU with its driver; otherwise
//! they print `skipped: <reason>` and pass. Inputs are seeded from the clock
//! (the seed is printed); set `COTS_TEST_SEED` to replay one.

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_forward_matches_reference() {
    println!("skipped: cots-ops was built without the `cuda` feature");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_backward_matches_cpu() {
    println!("skipped: cots-ops was built without the `cuda` feature");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_kl_forward_matches_reference() {
    println!("skipped: cots-ops was built without the `cuda` feature");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_kl_backward_matches_cpu() {
    println!("skipped: cots-ops was built without the `cuda` feature");
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc;
    use candle_core::{DType, Device, Result, Tensor, Var};
    use cots_ops::queue::{queue_contrastive, queue_kl, KlDirection, PositiveIds, EMPTY_SLOT};
    use cots_ops::queue_fused::queue_contrastive_raw as queue_contrastive_forward;
    use cots_ops::queue_fused::{queue_kl_raw, KlBlock, KL_HEAD};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The first GPU, or why there is none. Loading candle's CUDA device
    /// without a driver panics, so the driver library is probed first.
    fn gpu() -> std::result::Result<Device, String> {
        // SAFETY: only probes whether libcuda can be opened.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("no CUDA driver (libcuda.so) on this machine".into());
        }
        match std::panic::catch_unwind(|| Device::new_cuda(0)) {
            Ok(Ok(dev)) => Ok(dev),
            Ok(Err(e)) => Err(format!("no usable CUDA device 0: {e}")),
            Err(_) => Err("opening CUDA device 0 panicked".into()),
        }
    }

    fn rng() -> StdRng {
        let seed = std::env::var("COTS_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        println!("seed {seed} (COTS_TEST_SEED={seed} replays it)");
        StdRng::seed_from_u64(seed)
    }

    /// `rows` random unit vectors of width `d`, row-major.
    fn unit_rows(rows: usize, d: usize, rng: &mut StdRng) -> Vec<f32> {
        let mut v: Vec<f32> = (0..rows * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        for r in v.chunks_mut(d.max(1)) {
            let n = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            r.iter_mut().for_each(|x| *x /= n);
        }
        v
    }

    /// The contract of the kernel, in f64 with plain loops and the full logits:
    /// per row `loss, lse, cnt, sum_j p_j key_j (D), sum of positive keys (D)`.
    fn reference(
        qs: &[f32],
        k: &[f32],
        queue: &[f32],
        ids: Option<&(Vec<u32>, Vec<u32>)>,
        b: usize,
        d: usize,
    ) -> Vec<f64> {
        let kq = queue.len().checked_div(d).unwrap_or(0);
        let dot = |a: &[f32], c: &[f32]| -> f64 {
            a.iter().zip(c).map(|(x, y)| *x as f64 * *y as f64).sum()
        };
        let mut out = Vec::with_capacity(b * (3 + 2 * d));
        for i in 0..b {
            let qi = &qs[i * d..(i + 1) * d];
            let keys: Vec<&[f32]> = std::iter::once(&k[i * d..(i + 1) * d])
                .chain((0..kq).map(|j| &queue[j * d..(j + 1) * d]))
                .collect();
            let positive: Vec<bool> = (0..keys.len())
                .map(|j| {
                    j == 0
                        || ids.is_some_and(|(rows, slots)| {
                            slots[j - 1] != EMPTY_SLOT && slots[j - 1] == rows[i]
                        })
                })
                .collect();
            let logits: Vec<f64> = keys.iter().map(|key| dot(qi, key)).collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
            let cnt = positive.iter().filter(|&&p| p).count() as f64;
            let pos_sum: f64 = logits
                .iter()
                .zip(&positive)
                .filter(|(_, p)| **p)
                .map(|(l, _)| l)
                .sum();
            out.extend([lse - pos_sum / cnt, lse, cnt]);
            let mut mean = vec![0f64; d];
            let mut pos_keys = vec![0f64; d];
            for ((key, l), pos) in keys.iter().zip(&logits).zip(&positive) {
                let p = (l - lse).exp();
                for ((m, pk), &kx) in mean.iter_mut().zip(&mut pos_keys).zip(key.iter()) {
                    *m += p * kx as f64;
                    if *pos {
                        *pk += kx as f64;
                    }
                }
            }
            out.extend(mean);
            out.extend(pos_keys);
        }
        out
    }

    /// Row ids: all equal (`same`) or from 5 values; slot ids from 6 values
    /// (or all the rows' id) with about one slot in eight empty.
    fn random_ids(b: usize, k: usize, same: bool, rng: &mut StdRng) -> (Vec<u32>, Vec<u32>) {
        let rows = (0..b)
            .map(|_| if same { 7 } else { rng.random_range(0..5) })
            .collect();
        let slots = (0..k)
            .map(|_| match rng.random_range(0..8) {
                0 => EMPTY_SLOT,
                _ if same => 7,
                x => x % 6,
            })
            .collect();
        (rows, slots)
    }

    struct Case {
        name: &'static str,
        b: usize,
        k: usize,
        d: usize,
        tau: f32,
        ids: Option<(Vec<u32>, Vec<u32>)>,
    }

    fn cases(rng: &mut StdRng) -> Vec<Case> {
        let case = |name, b, k, d, tau, ids| Case {
            name,
            b,
            k,
            d,
            tau,
            ids,
        };
        vec![
            case("one row", 1, 300, 16, 0.07, None),
            case("37 rows", 37, 1000, 64, 0.07, None),
            case("empty queue", 37, 0, 32, 0.07, None),
            case(
                "empty queue with ids",
                5,
                0,
                8,
                0.07,
                Some((vec![1, 2, 3, 4, EMPTY_SLOT], vec![])),
            ),
            // 1001 keys: not a multiple of any tile or split size.
            case("odd queue", 9, 1001, 48, 0.05, None),
            // Several splits and a width that is not a multiple of 32.
            case(
                "many splits",
                37,
                4099,
                33,
                0.07,
                Some(random_ids(37, 4099, false, rng)),
            ),
            // Logits of +-100: the exponentials must not overflow.
            case(
                "tau 0.01",
                37,
                777,
                128,
                0.01,
                Some(random_ids(37, 777, false, rng)),
            ),
            case(
                "same id everywhere",
                16,
                300,
                16,
                0.07,
                Some(random_ids(16, 300, true, rng)),
            ),
            case(
                "random ids",
                37,
                2500,
                64,
                0.07,
                Some(random_ids(37, 2500, false, rng)),
            ),
            case(
                "several row blocks",
                300,
                600,
                40,
                0.07,
                Some(random_ids(300, 600, false, rng)),
            ),
            case(
                "widest",
                9,
                333,
                1024,
                0.07,
                Some(random_ids(9, 333, false, rng)),
            ),
            case("width 1", 4, 70, 1, 0.5, None),
        ]
    }

    /// `max |got - want| / max(1, max |want|)` over each output block
    /// (loss, lse, cnt, mean key, positive keys), the worst block.
    fn max_rel_err(got: &[f32], want: &[f64], b: usize, d: usize) -> f64 {
        let cols = 3 + 2 * d;
        let blocks = [(0, 1), (1, 2), (2, 3), (3, 3 + d), (3 + d, 3 + 2 * d)];
        blocks
            .iter()
            .map(|&(c0, c1)| {
                let idx = (0..b).flat_map(|i| (c0..c1).map(move |c| i * cols + c));
                let scale = idx.clone().fold(1f64, |m, e| m.max(want[e].abs()));
                idx.map(|e| (got[e] as f64 - want[e]).abs() / scale)
                    .fold(0.0, f64::max)
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn cuda_forward_matches_reference() -> Result<()> {
        let dev = match gpu() {
            Ok(dev) => dev,
            Err(why) => {
                println!("skipped: {why}");
                return Ok(());
            }
        };
        let mut rng = rng();
        for case in cases(&mut rng) {
            let Case { b, k, d, tau, .. } = case;
            let qs: Vec<f32> = unit_rows(b, d, &mut rng).iter().map(|x| x / tau).collect();
            let kk = unit_rows(b, d, &mut rng);
            let queue = unit_rows(k, d, &mut rng);
            let want = reference(&qs, &kk, &queue, case.ids.as_ref(), b, d);
            let out = (|| {
                queue_contrastive_forward(
                    &Tensor::from_slice(&qs, (b, d), &dev)?,
                    &Tensor::from_slice(&kk, (b, d), &dev)?,
                    &Tensor::from_slice(&queue, (k, d), &dev)?,
                    case.ids.clone(),
                )
            })()
            .map_err(|e| e.context(format!("case `{}`", case.name)))?;
            assert_eq!(out.dims(), [b, 3 + 2 * d], "{}", case.name);
            let got = out.flatten_all()?.to_vec1::<f32>()?;
            assert!(
                got.iter().all(|x| x.is_finite()),
                "{}: non-finite output",
                case.name
            );
            let err = max_rel_err(&got, &want, b, d);
            println!(
                "{}: B={b} K={k} D={d} tau={tau}: max relative error {err:.2e}",
                case.name
            );
            assert!(err < 1e-4, "{}: max relative error {err:.2e}", case.name);
        }
        Ok(())
    }

    #[test]
    fn cuda_forward_rejects_what_it_cannot_run() -> Result<()> {
        let dev = match gpu() {
            Ok(dev) => dev,
            Err(why) => {
                println!("skipped: {why}");
                return Ok(());
            }
        };
        let f64s = Tensor::zeros((2, 4), DType::F64, &dev)?;
        let err = queue_contrastive_forward(&f64s, &f64s, &f64s, None).unwrap_err();
        assert!(err.to_string().contains("f32"), "{err}");
        let wide = Tensor::zeros((2, 1025), DType::F32, &dev)?;
        let err = queue_contrastive_forward(&wide, &wide, &wide, None).unwrap_err();
        assert!(err.to_string().contains("1024"), "{err}");
        let q = Tensor::zeros((2, 4), DType::F32, &dev)?;
        let err = queue_contrastive_forward(&q, &q, &q, Some((vec![0], vec![0, 1]))).unwrap_err();
        assert!(err.to_string().contains("ids"), "{err}");
        Ok(())
    }

    /// Loss, lse and the gradients of `sum loss + 0.3 sum lse` w.r.t. q, k and
    /// tau through `queue_contrastive` on `dev`.
    fn contrastive_with_grads(
        dev: &Device,
        q: &[f32],
        k: &[f32],
        queue: &[f32],
        ids: Option<&(Vec<u32>, Vec<u32>)>,
        (b, kq, d): (usize, usize, usize),
        tau: f32,
    ) -> Result<Vec<Vec<f32>>> {
        let qv = Var::from_tensor(&Tensor::from_slice(q, (b, d), dev)?)?;
        let kv = Var::from_tensor(&Tensor::from_slice(k, (b, d), dev)?)?;
        let tv = Var::from_tensor(&Tensor::new(tau, dev)?)?;
        let queue = Tensor::from_slice(queue, (kq, d), dev)?;
        let id_t = match ids {
            Some((rows, slots)) => Some((
                Tensor::from_slice(rows, b, dev)?,
                Tensor::from_slice(slots, kq, dev)?,
            )),
            None => None,
        };
        let ids = id_t
            .as_ref()
            .map(|(r, s)| PositiveIds { rows: r, queue: s });
        let out = queue_contrastive(qv.as_tensor(), kv.as_tensor(), &queue, ids, tv.as_tensor())?;
        let obj = (out.loss.sum_all()? + (out.lse.sum_all()? * 0.3)?)?;
        let grads = obj.backward()?;
        let grad = |v: &Var| -> Result<Vec<f32>> {
            match grads.get(v.as_tensor()) {
                Some(g) => g.flatten_all()?.to_vec1(),
                None => candle_core::bail!("no gradient"),
            }
        };
        Ok(vec![
            out.loss.to_vec1()?,
            out.lse.to_vec1()?,
            grad(&qv)?,
            grad(&kv)?,
            grad(&tv)?,
        ])
    }

    #[test]
    fn cuda_backward_matches_cpu() -> Result<()> {
        let dev = match gpu() {
            Ok(dev) => dev,
            Err(why) => {
                println!("skipped: {why}");
                return Ok(());
            }
        };
        let mut rng = rng();
        for case in cases(&mut rng) {
            let Case { b, k, d, tau, .. } = case;
            let q = unit_rows(b, d, &mut rng);
            let kk = unit_rows(b, d, &mut rng);
            let queue = unit_rows(k, d, &mut rng);
            let shape = (b, k, d);
            let ids = case.ids.as_ref();
            let context = |e: candle_core::Error| e.context(format!("case `{}`", case.name));
            let cpu = contrastive_with_grads(&Device::Cpu, &q, &kk, &queue, ids, shape, tau)
                .map_err(context)?;
            let gpu =
                contrastive_with_grads(&dev, &q, &kk, &queue, ids, shape, tau).map_err(context)?;
            for (what, (g, c)) in ["loss", "lse", "dq", "dk", "dtau"]
                .iter()
                .zip(gpu.iter().zip(&cpu))
            {
                let scale = c.iter().fold(1f32, |m, x| m.max(x.abs()));
                let err = g
                    .iter()
                    .zip(c)
                    .map(|(x, y)| (x - y).abs() / scale)
                    .fold(0f32, f32::max);
                println!("{} {what}: max relative error {err:.2e}", case.name);
                assert!(
                    err < 1e-4,
                    "{} {what}: max relative error {err:.2e}",
                    case.name
                );
            }
        }
        Ok(())
    }

    const DIRECTIONS: [KlDirection; 3] = [
        KlDirection::I2tToT2i,
        KlDirection::T2iToI2t,
        KlDirection::Symmetric,
    ];

    /// The inputs of one KL case: `fs`, `ts` (queries over tau), `t_m`, `f_m`
    /// `[B, D]` and `queue_t`, `queue_i` `[K, D]`, unit rows.
    struct KlInputs {
        fs: Vec<f32>,
        ts: Vec<f32>,
        tm: Vec<f32>,
        qt: Vec<f32>,
        fm: Vec<f32>,
        qi: Vec<f32>,
    }

    fn kl_inputs(b: usize, k: usize, d: usize, tau: f32, rng: &mut StdRng) -> KlInputs {
        let mut scaled = |n| -> Vec<f32> { unit_rows(n, d, rng).iter().map(|x| x / tau).collect() };
        let (fs, ts) = (scaled(b), scaled(b));
        KlInputs {
            fs,
            ts,
            tm: unit_rows(b, d, rng),
            qt: unit_rows(k, d, rng),
            fm: unit_rows(b, d, rng),
            qi: unit_rows(k, d, rng),
        }
    }

    /// The contract of the KL kernel, in f64 with plain loops and the full
    /// logits: per row `KL, lse(a), lse(b), E_P[c] - c_0, E_Q[c] - c_0`, then
    /// the blocks of `KlBlock::all(direction)` (`c` centred at `c_0` there too).
    fn kl_reference(x: &KlInputs, b: usize, d: usize, direction: KlDirection) -> Vec<f64> {
        let kq = x.qt.len().checked_div(d).unwrap_or(0);
        let dot = |a: &[f32], c: &[f32]| -> f64 {
            a.iter().zip(c).map(|(u, v)| *u as f64 * *v as f64).sum()
        };
        let lse = |l: &[f64]| {
            let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            m + l.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
        };
        let mut out = Vec::new();
        for i in 0..b {
            let row = |v: &[f32]| v[i * d..(i + 1) * d].to_vec();
            let keys = |first: &[f32], queue: &[f32]| -> Vec<Vec<f32>> {
                std::iter::once(row(first))
                    .chain((0..kq).map(|j| queue[j * d..(j + 1) * d].to_vec()))
                    .collect()
            };
            let (kt, ki) = (keys(&x.tm, &x.qt), keys(&x.fm, &x.qi));
            let a: Vec<f64> = kt.iter().map(|key| dot(&row(&x.fs), key)).collect();
            let bl: Vec<f64> = ki.iter().map(|key| dot(&row(&x.ts), key)).collect();
            let (lse_a, lse_b) = (lse(&a), lse(&bl));
            let p: Vec<f64> = a.iter().map(|v| (v - lse_a).exp()).collect();
            let q: Vec<f64> = bl.iter().map(|v| (v - lse_b).exp()).collect();
            let c: Vec<f64> = a.iter().zip(&bl).map(|(u, v)| u - v).collect();
            // log P_j - log Q_j, without dividing probabilities that underflow.
            let ratio: Vec<f64> = (0..=kq).map(|j| (a[j] - lse_a) - (bl[j] - lse_b)).collect();
            let kl_pq: f64 = (0..=kq).map(|j| p[j] * ratio[j]).sum();
            let kl_qp: f64 = (0..=kq).map(|j| -q[j] * ratio[j]).sum();
            out.push(match direction {
                KlDirection::I2tToT2i => kl_pq,
                KlDirection::T2iToI2t => kl_qp,
                KlDirection::Symmetric => 0.5 * (kl_pq + kl_qp),
            });
            out.extend([lse_a, lse_b]);
            // Centred at the row's own pair, like the kernel's output.
            let c: Vec<f64> = c.iter().map(|v| v - c[0]).collect();
            out.push(p.iter().zip(&c).map(|(u, v)| u * v).sum());
            out.push(q.iter().zip(&c).map(|(u, v)| u * v).sum());
            for blk in KlBlock::all(direction) {
                let mut sum = vec![0f64; d];
                for j in 0..=kq {
                    let (w, key) = match blk {
                        KlBlock::PKeyT => (p[j], &kt[j]),
                        KlBlock::QKeyI => (q[j], &ki[j]),
                        KlBlock::PcKeyT => (p[j] * c[j], &kt[j]),
                        KlBlock::PKeyI => (p[j], &ki[j]),
                        KlBlock::QKeyT => (q[j], &kt[j]),
                        KlBlock::QcKeyI => (q[j] * c[j], &ki[j]),
                    };
                    for (s, v) in sum.iter_mut().zip(key) {
                        *s += w * *v as f64;
                    }
                }
                out.extend(sum);
            }
        }
        out
    }

    /// `(name, B, K, D, tau)` of the KL cases.
    const KL_CASES: [(&str, usize, usize, usize, f32); 8] = [
        ("one row", 1, 300, 16, 0.07),
        ("empty queue", 37, 0, 32, 0.07),
        ("odd queue", 9, 1001, 48, 0.05),
        ("many splits", 37, 4099, 33, 0.07),
        ("tau 0.01", 37, 777, 128, 0.01),
        ("several row blocks", 300, 600, 40, 0.07),
        ("widest", 9, 333, 512, 0.07),
        ("width 1", 4, 70, 1, 0.5),
    ];

    #[test]
    fn cuda_kl_forward_matches_reference() -> Result<()> {
        let dev = match gpu() {
            Ok(dev) => dev,
            Err(why) => {
                println!("skipped: {why}");
                return Ok(());
            }
        };
        let mut rng = rng();
        for (name, b, k, d, tau) in KL_CASES {
            let x = kl_inputs(b, k, d, tau, &mut rng);
            for direction in DIRECTIONS {
                let want = kl_reference(&x, b, d, direction);
                let t = |v: &[f32], rows: usize| Tensor::from_slice(v, (rows, d), &dev);
                let out = (|| {
                    queue_kl_raw(
                        &t(&x.fs, b)?,
                        &t(&x.tm, b)?,
                        &t(&x.qt, k)?,
                        &t(&x.ts, b)?,
                        &t(&x.fm, b)?,
                        &t(&x.qi, k)?,
                        direction,
                    )
                })()
                .map_err(|e| e.context(format!("case `{name}` {direction:?}")))?;
                let cols = KL_HEAD + KlBlock::all(direction).len() * d;
                assert_eq!(out.dims(), [b, cols], "{name}");
                let got = out.flatten_all()?.to_vec1::<f32>()?;
                assert!(
                    got.iter().all(|v| v.is_finite()),
                    "{name} {direction:?}: non-finite output"
                );
                // Each head column and each block against its own largest value.
                let mut spans: Vec<(usize, usize)> = (0..KL_HEAD).map(|c| (c, c + 1)).collect();
                spans.extend((KL_HEAD..cols).step_by(d).map(|c| (c, c + d)));
                let err = spans
                    .iter()
                    .map(|&(c0, c1)| {
                        let idx = (0..b).flat_map(|i| (c0..c1).map(move |c| i * cols + c));
                        let scale = idx.clone().fold(1f64, |m, e| m.max(want[e].abs()));
                        idx.map(|e| (got[e] as f64 - want[e]).abs() / scale)
                            .fold(0.0, f64::max)
                    })
                    .fold(0.0, f64::max);
                println!("{name} {direction:?}: B={b} K={k} D={d} tau={tau}: max relative error {err:.2e}");
                assert!(
                    err < 1e-4,
                    "{name} {direction:?}: max relative error {err:.2e}"
                );
            }
        }
        Ok(())
    }

    /// The KL and the gradients of `sum_i (i + 1) KL_i` w.r.t. f, t and tau
    /// through `queue_kl` on `dev`.
    fn kl_with_grads(
        dev: &Device,
        x: &KlInputs,
        (b, k, d): (usize, usize, usize),
        tau: f32,
        direction: KlDirection,
    ) -> Result<Vec<Vec<f32>>> {
        let t = |v: &[f32], rows: usize| Tensor::from_slice(v, (rows, d), dev);
        // The inputs hold f / tau; the op divides by tau itself.
        let f = Var::from_tensor(&(t(&x.fs, b)? * tau as f64)?)?;
        let tt = Var::from_tensor(&(t(&x.ts, b)? * tau as f64)?)?;
        let tv = Var::from_tensor(&Tensor::new(tau, dev)?)?;
        let out = queue_kl(
            f.as_tensor(),
            &t(&x.tm, b)?,
            &t(&x.qt, k)?,
            tt.as_tensor(),
            &t(&x.fm, b)?,
            &t(&x.qi, k)?,
            tv.as_tensor(),
            direction,
        )?;
        let weights = Tensor::arange(1f32, (b + 1) as f32, dev)?;
        let grads = (&out * weights)?.sum_all()?.backward()?;
        let grad = |v: &Var| -> Result<Vec<f32>> {
            match grads.get(v.as_tensor()) {
                Some(g) => g.flatten_all()?.to_vec1(),
                None => candle_core::bail!("no gradient"),
            }
        };
        Ok(vec![out.to_vec1()?, grad(&f)?, grad(&tt)?, grad(&tv)?])
    }

    /// Through `queue_kl` (the fused op on both devices; for D above the
    /// kernel's limit, the naive composition on CUDA).
    #[test]
    fn cuda_kl_backward_matches_cpu() -> Result<()> {
        let dev = match gpu() {
            Ok(dev) => dev,
            Err(why) => {
                println!("skipped: {why}");
                return Ok(());
            }
        };
        let mut rng = rng();
        let cases =
            KL_CASES
                .iter()
                .copied()
                .chain([("above the kernel's width", 5, 200, 600, 0.07)]);
        for (name, b, k, d, tau) in cases {
            let x = kl_inputs(b, k, d, tau, &mut rng);
            for direction in DIRECTIONS {
                let context =
                    |e: candle_core::Error| e.context(format!("case `{name}` {direction:?}"));
                let cpu =
                    kl_with_grads(&Device::Cpu, &x, (b, k, d), tau, direction).map_err(context)?;
                let gpu = kl_with_grads(&dev, &x, (b, k, d), tau, direction).map_err(context)?;
                for (what, (g, c)) in ["kl", "df", "dt", "dtau"].iter().zip(gpu.iter().zip(&cpu)) {
                    let scale = c.iter().fold(1f32, |m, v| m.max(v.abs()));
                    let err = g
                        .iter()
                        .zip(c)
                        .map(|(u, v)| (u - v).abs() / scale)
                        .fold(0f32, f32::max);
                    println!("{name} {direction:?} {what}: max relative error {err:.2e}");
                    assert!(
                        err < 1e-4,
                        "{name} {direction:?} {what}: max relative error {err:.2e}"
                    );
                }
            }
        }
        Ok(())
    }
}
