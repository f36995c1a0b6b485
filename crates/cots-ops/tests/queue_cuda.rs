//! The CUDA forward kernel of the queue contrastive op
//! (`kernels/queue_contrastive.cu`) against a slow f64 host reference on
//! fresh random inputs, and the op's backward on CUDA against the CPU.
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

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc;
    use candle_core::{DType, Device, Result, Tensor, Var};
    use cots_ops::queue::{queue_contrastive, PositiveIds, EMPTY_SLOT};
    use cots_ops::queue_fused::queue_contrastive_raw as queue_contrastive_forward;
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
}
