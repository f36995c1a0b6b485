//! The two-stream text vector under both poolings, against a hand-written
//! masked mean and `[CLS]` pick, and independent of padding.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{pad_batch, TestResult};
use cots_encoders::bert::Pooling;
use cots_encoders::two_stream::{self, TwoStream};
use rand::Rng;

fn model(pooling: Pooling, vm: &VarMap, dev: &Device) -> cots_encoders::Result<TwoStream> {
    let cfg = two_stream::Config {
        text_pooling: pooling,
        ..two_stream::Config::tiny(50)
    };
    TwoStream::new(&cfg, VarBuilder::from_varmap(vm, DType::F32, dev))
}

fn rows(t: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
    t.to_vec2::<f32>()
}

#[test]
fn mean_and_cls_pooling_match_a_reference_and_ignore_padding() -> TestResult {
    let dev = Device::Cpu;
    let mut rng = rand::rng();
    let texts: Vec<Vec<u32>> = [3usize, 7, 5]
        .iter()
        .map(|&n| (0..n).map(|_| rng.random_range(1..50)).collect())
        .collect();
    let refs: Vec<&[u32]> = texts.iter().map(|t| t.as_slice()).collect();
    let (ids, mask) = pad_batch(&refs, 9)?;
    for pooling in [Pooling::Mean, Pooling::Cls] {
        let vm = VarMap::new();
        let m = model(pooling, &vm, &dev)?;
        let out = m.encode_text(&ids, Some(&mask), None)?;
        // Reference: loop over the kept positions of each row's states.
        let hidden = out.hidden.to_vec3::<f32>()?;
        let mut want = Vec::new();
        for (b, t) in texts.iter().enumerate() {
            let d = hidden[b][0].len();
            let v: Vec<f32> = match pooling {
                Pooling::Cls => hidden[b][0].clone(),
                Pooling::Mean => (0..d)
                    .map(|j| (0..t.len()).map(|i| hidden[b][i][j]).sum::<f32>() / t.len() as f32)
                    .collect(),
            };
            want.extend(v);
        }
        let d = hidden[0][0].len();
        let pooled = Tensor::from_vec(want, (texts.len(), d), &dev)?;
        let want = m.project_text(&pooled, None)?;
        for (g, w) in rows(&out.embed)?.iter().zip(rows(&want)?) {
            for (a, b) in g.iter().zip(w) {
                assert!((a - b).abs() < 1e-5, "{pooling:?}: {a} vs {b}");
            }
        }
        // Each text alone, unpadded, gives the same vector as in the batch.
        for (b, t) in texts.iter().enumerate() {
            let (one, one_mask) = pad_batch(&[t.as_slice()], t.len())?;
            let alone = rows(&m.encode_text(&one, Some(&one_mask), None)?.embed)?;
            let batched = rows(&out.embed)?;
            for (a, c) in alone[0].iter().zip(&batched[b]) {
                assert!((a - c).abs() < 1e-5, "{pooling:?} row {b}: {a} vs {c}");
            }
        }
    }
    Ok(())
}
