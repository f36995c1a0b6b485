//! Times `EfficientNetLite::forward` (Lite0, batch 32) at 64, 128 and 224 px
//! on the CPU. Weights come from `COTS_EFFNET_PTH` when set, random
//! otherwise (the timing does not depend on them).
//!
//! ```text
//! cargo run --release -p cots-encoders --example effnet_timing
//! ```

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cots_encoders::efficientnet::{load_weights, Config, EfficientNetLite};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let cfg = Config::lite0();
    let vm = VarMap::new();
    let model = match std::env::var_os("COTS_EFFNET_PTH") {
        Some(p) => EfficientNetLite::new(
            &cfg,
            VarBuilder::from_tensors(load_weights(p.as_ref())?, DType::F32, &dev),
        )?,
        None => EfficientNetLite::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?,
    };
    let batch = 32;
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    println!("threads {}", candle_core::utils::get_num_threads());
    for side in [64, 128, 224] {
        let x = Tensor::randn(0f32, 1f32, (batch, 3, side, side), &dev)?;
        model.forward(&x)?; // warm-up
        let mut times = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            let y = model.forward(&x)?;
            y.sum_all()?.to_scalar::<f32>()?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        println!(
            "batch {batch} at {side} px: median {:.3} s, min {:.3} s over {reps} runs ({:.1} images/s)",
            times[reps / 2],
            times[0],
            batch as f64 / times[reps / 2]
        );
    }
    Ok(())
}
