//! The fused per-row ops of cots-ops (`cots_ops::fused`) against their
//! compositions of candle primitives (`cots_ops::nn::*_reference`; for GELU
//! also candle's own `gelu_erf`), forward + backward, f32, at the demo model's
//! shapes (ViT 3x128 on 64 px: 65 tokens, 4 heads, batch 32) and the base
//! model's (ViT-B/16: 197 tokens, 12 heads, 768 wide, batch 8).
//!
//! Attention (`cots_ops::attention`, one fused op forward and one backward)
//! is compared with the composition the encoders ran before it: batched
//! matmul, fused softmax, batched matmul, each matmul one gemm call per head;
//! `attention_packed` on `[B, L, H * D]` projections (what the encoders run
//! now) with that composition plus the head split and merge copies around it.
//!
//! The fused linear (`cots_ops::linear`: bias folded into the product, one
//! op each way) is compared with candle-nn's `Linear` (a 2-D matmul and a
//! broadcast bias add).
//!
//! Run: `cargo bench -p cots-benches --bench fused_ops`. On shared cores
//! only the ratio of fused to reference in the same run means anything;
//! repeat the run before trusting it.

use candle_core::{DType, Device, Result, Tensor, Var};
use cots_ops::{fused, nn};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

type Op = fn(&[Tensor]) -> Result<Tensor>;

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).expect("randn")
}

/// One forward + backward; the upstream gradient is all ones (what
/// `backward` seeds a non-scalar output with).
fn step(op: Op, vars: &[Var]) {
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = op(&ts).expect("forward");
    let grads = y.backward().expect("backward");
    std::hint::black_box(grads);
}

fn ln(t: &[Tensor]) -> Result<Tensor> {
    fused::layer_norm(&t[0], &t[1], &t[2], 1e-12)
}
fn ln_ref(t: &[Tensor]) -> Result<Tensor> {
    nn::layer_norm_reference(&t[0], &t[1], &t[2], 1e-12)
}
fn softmax(t: &[Tensor]) -> Result<Tensor> {
    fused::softmax_last_dim(&t[0])
}
fn softmax_ref(t: &[Tensor]) -> Result<Tensor> {
    nn::softmax_last_dim_reference(&t[0])
}
fn gelu(t: &[Tensor]) -> Result<Tensor> {
    fused::gelu_erf(&t[0])
}
fn gelu_candle(t: &[Tensor]) -> Result<Tensor> {
    t[0].gelu_erf()
}
fn bias_gelu(t: &[Tensor]) -> Result<Tensor> {
    fused::bias_gelu_erf(&t[0], &t[1])
}
fn bias_gelu_candle(t: &[Tensor]) -> Result<Tensor> {
    t[0].broadcast_add(&t[1])?.gelu_erf()
}

/// Self-attention with scale `1 / sqrt(Dh)`; inputs q, k, v.
fn attn(t: &[Tensor]) -> Result<Tensor> {
    let scale = 1.0 / (t[0].dim(3)? as f64).sqrt();
    cots_ops::attention(&t[0], &t[1], &t[2], None, scale)
}
fn attn_composed(t: &[Tensor]) -> Result<Tensor> {
    let scale = 1.0 / (t[0].dim(3)? as f64).sqrt();
    let scores = (t[0].matmul(&t[1].t()?)? * scale)?;
    nn::softmax_last_dim(&scores)?.matmul(&t[2])
}

/// `[B, L, H, D]` inputs viewed as `[B, L, H * D]` projections.
fn packed(t: &Tensor) -> Result<(Tensor, usize)> {
    let (b, l, h, d) = t.dims4()?;
    Ok((t.reshape((b, l, h * d))?, h))
}
fn attn_packed(t: &[Tensor]) -> Result<Tensor> {
    let ((q, h), (k, _), (v, _)) = (packed(&t[0])?, packed(&t[1])?, packed(&t[2])?);
    let scale = 1.0 / (t[0].dim(3)? as f64).sqrt();
    cots_ops::attention_packed(&q, &k, &v, h, None, scale)
}
fn attn_split_composed_merge(t: &[Tensor]) -> Result<Tensor> {
    let (b, l, h, d) = t[0].dims4()?;
    // The encoders' split: `[B, L, H * D]` viewed as `[B, L, H, D]`, heads
    // to the front, copied.
    let split = |x: &Tensor| x.transpose(1, 2)?.contiguous();
    let heads = [split(&t[0])?, split(&t[1])?, split(&t[2])?];
    attn_composed(&heads)?
        .transpose(1, 2)?
        .reshape((b, l, h * d))
}

fn lin(t: &[Tensor]) -> Result<Tensor> {
    cots_ops::linear(&t[0], &t[1], Some(&t[2]))
}
fn lin_candle(t: &[Tensor]) -> Result<Tensor> {
    use candle_core::Module;
    candle_nn::Linear::new(t[1].clone(), Some(t[2].clone())).forward(&t[0])
}

/// Linear layers `[B, L, in] -> [B, L, out]`: `(label, [B, L, in], out)`.
fn bench_linear(c: &mut Criterion, cases: &[(&str, [usize; 3], usize)]) {
    let mut g = c.benchmark_group("linear");
    g.sample_size(20);
    for (size, x_shape, out) in cases {
        let vars = [randn(x_shape), randn(&[*out, x_shape[2]]), randn(&[*out])]
            .map(|t| Var::from_tensor(&t).expect("var"));
        for (name, op) in [("fused", lin as Op), ("candle-nn Linear", lin_candle)] {
            g.bench_with_input(BenchmarkId::new(name, size), &vars, |b, v| {
                b.iter(|| step(op, v))
            });
        }
    }
    g.finish();
}

fn bench_group(c: &mut Criterion, group: &str, cases: &[(&str, Vec<usize>)], ops: &[(&str, Op)]) {
    let mut g = c.benchmark_group(group);
    g.sample_size(20);
    for (size, shape) in cases {
        let d = shape[shape.len() - 1];
        // Inputs beyond the first are the `[D]` parameters the op takes.
        let n_params = match group {
            "layer_norm" => 2,
            "bias_gelu" => 1,
            _ => 0,
        };
        let mut vars = vec![Var::from_tensor(&randn(shape)).expect("var")];
        for _ in 0..n_params {
            vars.push(Var::from_tensor(&randn(&[d])).expect("var"));
        }
        if group.starts_with("attention") {
            // k and v have q's shape.
            for _ in 0..2 {
                vars.push(Var::from_tensor(&randn(shape)).expect("var"));
            }
        }
        for &(name, op) in ops {
            g.bench_with_input(BenchmarkId::new(name, size), &vars, |b, v| {
                b.iter(|| step(op, v))
            });
        }
    }
    g.finish();
}

fn fused_ops(c: &mut Criterion) {
    assert_eq!(randn(&[1]).dtype(), DType::F32);
    bench_group(
        c,
        "attention",
        &[
            ("demo 32x4x65x32", vec![32, 4, 65, 32]),
            ("base 8x12x197x64", vec![8, 12, 197, 64]),
        ],
        &[("fused", attn), ("composition", attn_composed)],
    );
    bench_group(
        c,
        "attention_packed",
        &[
            ("demo 32x65x4x32", vec![32, 65, 4, 32]),
            ("base 8x197x12x64", vec![8, 197, 12, 64]),
        ],
        &[
            ("fused packed", attn_packed),
            ("split + composition + merge", attn_split_composed_merge),
        ],
    );
    bench_linear(
        c,
        &[
            ("demo 32x65x128 -> 128", [32, 65, 128], 128),
            ("demo 32x65x128 -> 512", [32, 65, 128], 512),
            ("base 8x197x768 -> 768", [8, 197, 768], 768),
        ],
    );
    bench_group(
        c,
        "layer_norm",
        &[
            ("demo 32x65x128", vec![32, 65, 128]),
            ("base 8x197x768", vec![8, 197, 768]),
        ],
        &[("fused", ln), ("reference", ln_ref)],
    );
    bench_group(
        c,
        "softmax",
        &[
            ("demo 32x4x65x65", vec![32, 4, 65, 65]),
            ("base 8x12x197x197", vec![8, 12, 197, 197]),
        ],
        &[("fused", softmax), ("reference", softmax_ref)],
    );
    bench_group(
        c,
        "gelu",
        &[
            ("demo 32x65x512", vec![32, 65, 512]),
            ("base 8x197x3072", vec![8, 197, 3072]),
        ],
        &[("fused", gelu), ("candle gelu_erf", gelu_candle)],
    );
    bench_group(
        c,
        "bias_gelu",
        &[
            ("demo 32x65x512", vec![32, 65, 512]),
            ("base 8x197x3072", vec![8, 197, 3072]),
        ],
        &[
            ("fused", bias_gelu),
            ("candle add + gelu_erf", bias_gelu_candle),
        ],
    );
}

criterion_group!(benches, fused_ops);
criterion_main!(benches);
