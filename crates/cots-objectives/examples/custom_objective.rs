//! A new objective in one file: alignment and uniformity (Wang & Isola,
//! "Understanding Contrastive Representation Learning through Alignment and
//! Uniformity on the Hypersphere", ICML 2020), added to the CLIP preset
//! through the composition and trained for a few steps on a toy pair of
//! linear towers.
//!
//! Run: `cargo run -p cots-objectives --example custom_objective`

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use cots_objectives::{build, Dims, LossTerm, Needs, Objective, ObjectivesConfig, StepFeatures};

/// `align = mean_i |f_i - t_i|^2`, `uniform = log mean_{i != j} exp(-t |x_i - x_j|^2)`
/// averaged over both modalities.
struct AlignUniform {
    t: f64,
}

impl AlignUniform {
    /// # Shapes
    /// - `x`: `[B, E]` L2-normalised; returns a scalar.
    fn uniformity(&self, x: &Tensor) -> cots_objectives::Result<Tensor> {
        let b = x.dim(0)?;
        // |x_i - x_j|^2 = 2 - 2 x_i . x_j for unit vectors.
        let sq = x.matmul(&x.t()?)?.affine(-2.0, 2.0)?;
        let off_diag = Tensor::eye(b, x.dtype(), x.device())?.affine(-1.0, 1.0)?;
        let mean = ((sq * -self.t)?.exp()? * off_diag)?.sum_all()? / ((b * b - b) as f64);
        Ok(mean?.log()?)
    }
}

impl Objective for AlignUniform {
    fn name(&self) -> &str {
        "align_uniform"
    }

    fn needs(&self) -> Needs {
        Needs::default()
    }

    fn losses(&mut self, x: &StepFeatures) -> cots_objectives::Result<Vec<LossTerm>> {
        let align = (&x.image_embed - &x.text_embed)?
            .sqr()?
            .sum(D::Minus1)?
            .mean_all()?;
        let uniform =
            ((self.uniformity(&x.image_embed)? + self.uniformity(&x.text_embed)?)? * 0.5)?;
        Ok(vec![
            LossTerm::new("align", align),
            LossTerm::new("uniform", uniform),
        ])
    }
}

fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let (b, d_in, e) = (16, 12, 8);
    let dims = Dims {
        embed: e,
        text_hidden: d_in,
        vision_hidden: d_in,
        vocab: 2,
        codebook: 2,
    };
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let image_tower = candle_nn::linear(d_in, e, vb.pp("image"))?;
    let text_tower = candle_nn::linear(d_in, e, vb.pp("text"))?;

    // The preset from the run config, plus the new objective with weight 0.5.
    let mut objectives = build(&ObjectivesConfig::clip_default(), dims, vb.pp("objectives"))?;
    objectives.push(0.5, Box::new(AlignUniform { t: 2.0 }))?;
    println!(
        "objectives: {:?}, needs {:?}",
        objectives.names(),
        objectives.needs()
    );

    // Paired toy data: the text of pair i is a noisy copy of its image.
    let images = Tensor::randn(0f32, 1.0, (b, d_in), &dev)?;
    let texts = (&images + Tensor::randn(0f32, 0.3, (b, d_in), &dev)?)?;
    let ids = Tensor::arange(0u32, b as u32, &dev)?;
    let tau = Tensor::new(0.1f32, &dev)?;
    let mut opt = AdamW::new(
        vm.all_vars(),
        ParamsAdamW {
            lr: 1e-2,
            ..Default::default()
        },
    )?;
    for step in 0..5 {
        let f = l2_normalize(&image_tower.forward(&images)?)?;
        let t = l2_normalize(&text_tower.forward(&texts)?)?;
        let x = StepFeatures::new(f, t, ids.clone(), tau.clone());
        let losses = objectives.losses(&x)?;
        let kept = x.detached()?;
        opt.backward_step(&losses.total)?;
        objectives.after_step(&kept)?;
        let terms: Vec<String> = losses
            .terms
            .iter()
            .map(|t| Ok(format!("{} {:.4}", t.name, t.value.to_scalar::<f32>()?)))
            .collect::<candle_core::Result<_>>()?;
        println!(
            "step {step}: total {:.4} | {}",
            losses.total.to_scalar::<f32>()?,
            terms.join(", ")
        );
    }
    Ok(())
}
