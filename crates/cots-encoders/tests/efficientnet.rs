//! EfficientNet-Lite0: the depthwise kernel against an obvious f64 loop,
//! the whole model against one composed from candle's generic grouped
//! `conv2d` with explicit BatchNorm, and parity with PyTorch on the real
//! ImageNet weights (when `COTS_EFFNET_PTH` names the `.pth` file).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cots_encoders::efficientnet::{
    depthwise_conv2d, depthwise_reference, load_weights, Config, EfficientNetLite,
};
use rand::Rng;

mod common;
use common::TestResult;

fn random(rng: &mut impl Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// "Same" padding before the first row/column, TensorFlow's rule.
fn pad_before(size: usize, k: usize, s: usize) -> usize {
    let out = size.div_ceil(s);
    ((out - 1) * s + k).saturating_sub(size) / 2
}

/// Depthwise convolution, six nested loops in f64, NHWC in and out.
#[allow(clippy::too_many_arguments)]
fn depthwise_f64(
    x: &[f32],
    (b, h, w, c): (usize, usize, usize, usize),
    weight: &[f32], // [C, k, k]
    bias: &[f32],
    k: usize,
    s: usize,
    relu6: bool,
) -> Vec<f64> {
    let (ho, wo) = (h.div_ceil(s), w.div_ceil(s));
    let (top, left) = (pad_before(h, k, s), pad_before(w, k, s));
    let mut out = vec![0f64; b * ho * wo * c];
    for n in 0..b {
        for oy in 0..ho {
            for ox in 0..wo {
                for ch in 0..c {
                    let mut acc = f64::from(bias[ch]);
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * s + ky) as isize - top as isize;
                            let ix = (ox * s + kx) as isize - left as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            let xv = x[((n * h + iy as usize) * w + ix as usize) * c + ch];
                            acc += f64::from(xv) * f64::from(weight[(ch * k + ky) * k + kx]);
                        }
                    }
                    if relu6 {
                        acc = acc.clamp(0.0, 6.0);
                    }
                    out[((n * ho + oy) * wo + ox) * c + ch] = acc;
                }
            }
        }
    }
    out
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn to_f64(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

#[test]
fn depthwise_matches_the_f64_loops() -> TestResult {
    let mut rng = rand::rng();
    let dev = Device::Cpu;
    for &(b, h, w, c) in &[(2, 9, 11, 5), (1, 7, 6, 17), (3, 1, 2, 8), (1, 13, 13, 33)] {
        for k in [3, 5] {
            for s in [1, 2] {
                for relu6 in [false, true] {
                    let x = random(&mut rng, b * h * w * c, -3.0, 3.0);
                    let wt = random(&mut rng, c * k * k, -1.0, 1.0);
                    let bias = random(&mut rng, c, -1.0, 1.0);
                    let want = depthwise_f64(&x, (b, h, w, c), &wt, &bias, k, s, relu6);
                    let xt = Tensor::from_vec(x, (b, h, w, c), &dev)?;
                    let w4 = Tensor::from_vec(wt, (c, 1, k, k), &dev)?;
                    let bt = Tensor::from_vec(bias, c, &dev)?;
                    let w_taps = w4.reshape((c, k * k))?.t()?.contiguous()?;
                    let fast = depthwise_conv2d(&xt, &w_taps, &bt, s, relu6)?;
                    assert_eq!(fast.dims(), &[b, h.div_ceil(s), w.div_ceil(s), c]);
                    let slow = depthwise_reference(&xt, &w4, &bt, s, relu6)?;
                    let what = format!("b{b} h{h} w{w} c{c} k{k} s{s} relu6 {relu6}");
                    let e = max_abs_diff(&to_f64(&fast)?, &want);
                    assert!(e < 1e-4, "fast kernel, {what}: max error {e}");
                    let e = max_abs_diff(&to_f64(&slow)?, &want);
                    assert!(e < 1e-4, "candle conv2d fallback, {what}: max error {e}");
                }
            }
        }
    }
    Ok(())
}

/// Overwrites every variable with random values of the right kind
/// (positive running variances, BN scales near 1, He-scaled kernels) and
/// returns them by name.
fn randomise(vm: &VarMap, rng: &mut impl Rng) -> candle_core::Result<HashMap<String, Tensor>> {
    let vars = vm.data().lock().expect("VarMap lock");
    let mut out = HashMap::new();
    for (name, var) in vars.iter() {
        let n = var.elem_count();
        let values = if name.ends_with("running_var") {
            random(rng, n, 0.5, 2.0)
        } else if name.ends_with("running_mean") || name.ends_with(".bias") {
            random(rng, n, -0.5, 0.5)
        } else if name.contains("_bn") && name.ends_with(".weight") {
            random(rng, n, 0.5, 1.5)
        } else {
            let fan_in = (n / var.dims()[0]) as f32;
            let a = (6.0 / fan_in).sqrt();
            random(rng, n, -a, a)
        };
        let t = Tensor::from_vec(values, var.shape(), var.device())?;
        var.set(&t)?;
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// TF "same" padding then candle's generic (grouped) conv2d, NCHW.
fn conv_same(x: &Tensor, w: &Tensor, stride: usize, groups: usize) -> candle_core::Result<Tensor> {
    let (_, _, h, wd) = x.dims4()?;
    let k = w.dim(3)?;
    let pad = |size: usize| {
        let out = size.div_ceil(stride);
        let total = ((out - 1) * stride + k).saturating_sub(size);
        (total / 2, total - total / 2)
    };
    let ((t, b), (l, r)) = (pad(h), pad(wd));
    x.pad_with_zeros(2, t, b)?
        .pad_with_zeros(3, l, r)?
        .conv2d(w, 0, stride, 1, groups)
}

/// BatchNorm in eval mode, written out.
fn bn(x: &Tensor, p: &HashMap<String, Tensor>, prefix: &str) -> candle_core::Result<Tensor> {
    let get = |n: &str| p[&format!("{prefix}.{n}")].reshape((1, (), 1, 1));
    let (g, b, m, v) = (
        get("weight")?,
        get("bias")?,
        get("running_mean")?,
        get("running_var")?,
    );
    x.broadcast_sub(&m)?
        .broadcast_div(&(v + 1e-3)?.sqrt()?)?
        .broadcast_mul(&g)?
        .broadcast_add(&b)
}

fn relu6(x: &Tensor) -> candle_core::Result<Tensor> {
    x.clamp(0f32, 6f32)
}

/// EfficientNet-Lite from the block list, NCHW, generic candle ops only.
fn reference_pooled(
    cfg: &Config,
    p: &HashMap<String, Tensor>,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    let mut h = relu6(&bn(
        &conv_same(x, &p["_conv_stem.weight"], 2, 1)?,
        p,
        "_bn0",
    )?)?;
    let mut i = 0;
    for st in &cfg.stages {
        for r in 0..st.repeats {
            let stride = if r == 0 { st.stride } else { 1 };
            let pre = format!("_blocks.{i}");
            let w = |n: &str| &p[&format!("{pre}.{n}.weight")];
            let input = h.clone();
            let mut y = h;
            if st.expand_ratio != 1 {
                y = relu6(&bn(
                    &conv_same(&y, w("_expand_conv"), 1, 1)?,
                    p,
                    &format!("{pre}._bn0"),
                )?)?;
            }
            let c = y.dim(1)?;
            y = relu6(&bn(
                &conv_same(&y, w("_depthwise_conv"), stride, c)?,
                p,
                &format!("{pre}._bn1"),
            )?)?;
            y = bn(
                &conv_same(&y, w("_project_conv"), 1, 1)?,
                p,
                &format!("{pre}._bn2"),
            )?;
            if stride == 1 && input.dim(1)? == y.dim(1)? {
                y = (y + input)?;
            }
            h = y;
            i += 1;
        }
    }
    let h = relu6(&bn(
        &conv_same(&h, &p["_conv_head.weight"], 1, 1)?,
        p,
        "_bn1",
    )?)?;
    h.mean((2, 3))
}

#[test]
fn lite0_with_random_weights_matches_generic_convolutions() -> TestResult {
    let mut rng = rand::rng();
    let dev = Device::Cpu;
    let cfg = Config::lite0_imagenet();
    let vm = VarMap::new();
    let model = EfficientNetLite::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    // Weights set after construction must be used (BN is folded per forward).
    let params = randomise(&vm, &mut rng)?;
    assert_eq!(params.len(), 1 + 4 + 2 + 16 * 15 - 5 + 1 + 4);
    let x = Tensor::from_vec(
        random(&mut rng, 3 * 40 * 40, -1.0, 1.0),
        (1, 3, 40, 40),
        &dev,
    )?;

    let want = to_f64(&reference_pooled(&cfg, &params, &x)?)?;
    let pooled = model.forward(&x)?;
    assert_eq!(pooled.dims(), &[1, cfg.out_dim()]);
    let got = to_f64(&pooled)?;
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let e = max_abs_diff(&got, &want);
    assert!(
        scale > 0.0 && e <= 1e-4 * scale.max(1.0),
        "max error {e}, scale {scale}"
    );

    let map = model.forward_map(&x)?;
    // 40 -> 20 -> 10 -> 5 -> 3 -> 2.
    assert_eq!(map.dims(), &[1, 1280, 2, 2]);
    let e = max_abs_diff(&to_f64(&map.mean((2, 3))?)?, &got);
    assert!(e < 1e-5, "forward_map disagrees with forward: {e}");

    let logits = model.logits(&pooled)?;
    let want_logits = to_f64(
        &pooled
            .matmul(&params["_fc.weight"].t()?)?
            .broadcast_add(&params["_fc.bias"])?,
    )?;
    assert!(max_abs_diff(&to_f64(&logits)?, &want_logits) < 1e-4);

    let headless = EfficientNetLite::new(
        &Config::lite0(),
        VarBuilder::from_tensors(params, DType::F32, &dev),
    )?;
    assert!(headless.logits(&pooled).is_err());
    let e = max_abs_diff(&to_f64(&headless.forward(&x)?)?, &got);
    assert!(e < 1e-6, "{e}");
    Ok(())
}

#[test]
fn config_rejects_broken_stage_lists() {
    let mut cfg = Config::lite0();
    cfg.stages[3].input_filters = 41;
    assert!(cfg.validate().is_err());
    let mut cfg = Config::lite0();
    cfg.stages[0].kernel = 4;
    assert!(cfg.validate().is_err());
    assert!(Config::lite0().validate().is_ok());
    assert_eq!(Config::lite0().out_dim(), 1280);
}

#[derive(serde::Deserialize)]
struct Parity {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    side: usize,
    map_shape: Vec<usize>,
    pooled_first16: Vec<f64>,
    pooled_top16_index: Vec<usize>,
    pooled_top16_value: Vec<f64>,
    pooled_sum: f64,
    pooled_sum_sq: f64,
    top5_classes: Vec<usize>,
    top5_logits: Vec<f64>,
}

fn real_weights() -> Option<PathBuf> {
    let Some(p) = std::env::var_os("COTS_EFFNET_PTH") else {
        // .ci/run downloads the weights; under CI their absence is a failure.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but COTS_EFFNET_PTH is not set"
        );
        println!("skipped: set COTS_EFFNET_PTH to efficientnet-lite0-57934424.pth to run");
        return None;
    };
    let p = PathBuf::from(p);
    if !p.is_file() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but COTS_EFFNET_PTH={} is not a file",
            p.display()
        );
        println!("skipped: COTS_EFFNET_PTH={} is not a file", p.display());
        return None;
    }
    Some(p)
}

#[test]
fn lite0_matches_pytorch_on_the_imagenet_weights() -> TestResult {
    let Some(pth) = real_weights() else {
        return Ok(());
    };
    let dev = Device::Cpu;
    let weights = load_weights(&pth)?;
    assert_eq!(
        weights.len(),
        296 - 49,
        "tensors without num_batches_tracked"
    );
    let model = EfficientNetLite::new(
        &Config::lite0_imagenet(),
        VarBuilder::from_tensors(weights, DType::F32, &dev),
    )?;
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/effnet_lite0_parity.json");
    let parity: Parity = serde_json::from_str(&std::fs::read_to_string(fixture)?)?;
    for case in &parity.cases {
        let n = 3 * case.side * case.side;
        let x = Tensor::from_vec(
            (0..n)
                .map(|i| (-1.0 + 2.0 * i as f64 / (n - 1) as f64) as f32)
                .collect::<Vec<_>>(),
            (1, 3, case.side, case.side),
            &dev,
        )?;
        assert_eq!(model.forward_map(&x)?.dims(), &case.map_shape[..]);
        let pooled = model.forward(&x)?;
        let p = to_f64(&pooled)?;
        let mut worst: f64 = 0.0;
        for (i, want) in case.pooled_first16.iter().enumerate() {
            worst = worst.max((p[i] - want).abs());
        }
        for (&i, want) in case.pooled_top16_index.iter().zip(&case.pooled_top16_value) {
            worst = worst.max((p[i] - want).abs());
        }
        let sum: f64 = p.iter().sum();
        let sum_sq: f64 = p.iter().map(|v| v * v).sum();
        let logits = to_f64(&model.logits(&pooled)?)?;
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        for (&c, want) in case.top5_classes.iter().zip(&case.top5_logits) {
            worst = worst.max((logits[c] - want).abs());
        }
        println!(
            "{} px: max abs error {worst:.2e} (pooled values, top-5 logits); sum {sum:.6} vs {:.6}, \
             sum of squares {sum_sq:.6} vs {:.6}; top-5 {:?} vs {:?}",
            case.side,
            case.pooled_sum,
            case.pooled_sum_sq,
            &order[..5],
            case.top5_classes
        );
        assert!(worst < 1e-3, "{} px: max abs error {worst}", case.side);
        assert!((sum - case.pooled_sum).abs() < 1e-3 * case.pooled_sum.abs().max(1.0));
        assert!((sum_sq - case.pooled_sum_sq).abs() < 1e-3 * case.pooled_sum_sq.abs().max(1.0));
        assert_eq!(&order[..5], &case.top5_classes[..]);
    }
    Ok(())
}
