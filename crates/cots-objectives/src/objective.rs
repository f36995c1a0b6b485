//! The [`Objective`] trait: step features in, named loss terms out, own state out.
//!
//! Encoders only produce features; every training signal is its own type that
//! turns the features of one step into named scalar loss terms (the open_clip
//! shape). The trainer never looks inside an objective: it asks the
//! composition ([`crate::Objectives`]) which forward passes to run
//! ([`Needs`]), hands it the resulting tensors ([`StepFeatures`]), and
//! back-propagates the weighted total.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::{Error, Result};

/// Which forward passes and side inputs the trainer must provide.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Momentum (EMA) encoders: [`StepFeatures::momentum`].
    pub momentum: bool,
    /// A second text pass with masked tokens: [`StepFeatures::masked_text`].
    pub masked_text: bool,
    /// A second image pass with masked patches: the hidden part of
    /// [`StepFeatures::masked_image`].
    pub masked_image: bool,
    /// Visual token codes from the frozen dVAE: [`MaskedImage::codes`].
    pub dvae_codes: bool,
    /// Match logits of a single-stream cross-encoder: [`StepFeatures::matching`].
    pub cross_encoder: bool,
}

impl Needs {
    /// Everything either side needs.
    pub fn union(self, o: Needs) -> Needs {
        Needs {
            momentum: self.momentum || o.momentum,
            masked_text: self.masked_text || o.masked_text,
            masked_image: self.masked_image || o.masked_image,
            dvae_codes: self.dvae_codes || o.dvae_codes,
            cross_encoder: self.cross_encoder || o.cross_encoder,
        }
    }
}

/// Global embeddings of the momentum (EMA) towers and the AMF pair weights
/// computed from them. Detached.
///
/// Whoever builds it (the trainer) detaches the tensors: they are keys and
/// targets, never trained through. Objectives may detach again; it is free.
#[derive(Clone, Debug)]
pub struct MomentumFeatures {
    /// `[B, E]`: momentum image embeddings, L2-normalised.
    pub image: Tensor,
    /// `[B, E]`: momentum text embeddings, L2-normalised.
    pub text: Tensor,
    /// `[B]` f32: per-pair weights of the adaptive momentum filter
    /// (`1` kept, `0` dropped), `None` when the filter is off.
    pub pair_weights: Option<Tensor>,
}

/// Masked language modeling: hidden states of the masked-text pass and the
/// masked positions' targets.
///
/// The positions are computed on the host when the batch is built (the masks
/// are drawn there) and uploaded with it, so reading them costs the device no
/// synchronisation.
#[derive(Clone, Debug)]
pub struct MaskedText {
    /// `[B, L, Dt]`: last hidden states of the text encoder on the MASKED text.
    pub hidden: Tensor,
    /// `[M]` u32: the masked positions, flat `b * L + l`.
    pub positions: Tensor,
    /// `[M]` u32: the original token id at each of `positions`.
    pub targets: Tensor,
}

/// Masked vision modeling: hidden states of the masked-image pass, masked
/// patches, dVAE codes of the clean image.
#[derive(Clone, Debug)]
pub struct MaskedImage {
    /// `[B, 1 + N, Dv]`: last hidden states of the image encoder on the MASKED
    /// image, `[CLS]` first, then the `N` patches in row-major grid order.
    pub hidden: Tensor,
    /// `[M]` u32: the masked patches, flat `b * N + n` (patch index, `[CLS]`
    /// not counted).
    pub positions: Tensor,
    /// `[B, N]` u32: visual token of every patch from the frozen dVAE on the
    /// CLEAN image (same grid order as the patches).
    pub codes: Tensor,
}

/// Image-text matching logits of a cross-encoder and their labels.
#[derive(Clone, Debug)]
pub struct MatchLogits {
    /// `[B', 2]`: cross-encoder logits (column 1 = "match").
    pub logits: Tensor,
    /// `[B']` u32: 1 for a matching pair, 0 for a sampled negative.
    pub labels: Tensor,
}

/// Everything one training step produced that an objective may read (owned).
///
/// Online embeddings carry gradients. The paired global feature used by
/// MLM/MVM is the clean online embedding of the other modality
/// (`image_embed` for MLM, `text_embed` for MVM). Tensors are cheap handles,
/// so building one clones no data.
#[derive(Clone, Debug)]
pub struct StepFeatures {
    /// `[B, E]`: online image embeddings, L2-normalised.
    pub image_embed: Tensor,
    /// `[B, E]`: online text embeddings, L2-normalised.
    pub text_embed: Tensor,
    /// `[B]` u32: image id of each pair; captions of one image share it.
    pub image_ids: Tensor,
    /// Scalar (rank 0): the learnable, already clamped temperature.
    pub temperature: Tensor,
    /// The momentum keys and AMF weights (when [`Needs::momentum`]).
    pub momentum: Option<MomentumFeatures>,
    /// The masked text pass (when [`Needs::masked_text`]).
    pub masked_text: Option<MaskedText>,
    /// The masked image pass and dVAE codes (when [`Needs::masked_image`]).
    pub masked_image: Option<MaskedImage>,
    /// Cross-encoder logits (when [`Needs::cross_encoder`]).
    pub matching: Option<MatchLogits>,
}

/// The [`Error::MissingInput`] of `objective` lacking `input`.
fn missing(objective: &str, input: &'static str) -> Error {
    Error::MissingInput {
        objective: objective.to_string(),
        input,
    }
}

impl StepFeatures {
    /// The always-present part; the optional parts start as `None`.
    ///
    /// # Shapes
    /// - `image_embed`, `text_embed`: `[B, E]`; `image_ids`: `[B]` u32;
    ///   `temperature`: scalar.
    pub fn new(
        image_embed: Tensor,
        text_embed: Tensor,
        image_ids: Tensor,
        temperature: Tensor,
    ) -> Self {
        Self {
            image_embed,
            text_embed,
            image_ids,
            temperature,
            momentum: None,
            masked_text: None,
            masked_image: None,
            matching: None,
        }
    }

    /// With the momentum keys and AMF weights.
    pub fn with_momentum(self, m: MomentumFeatures) -> Self {
        Self {
            momentum: Some(m),
            ..self
        }
    }

    /// With the masked text pass.
    pub fn with_masked_text(self, m: MaskedText) -> Self {
        Self {
            masked_text: Some(m),
            ..self
        }
    }

    /// With the masked image pass and dVAE codes.
    pub fn with_masked_image(self, m: MaskedImage) -> Self {
        Self {
            masked_image: Some(m),
            ..self
        }
    }

    /// With cross-encoder logits.
    pub fn with_matching(self, m: MatchLogits) -> Self {
        Self {
            matching: Some(m),
            ..self
        }
    }

    /// The momentum features, or a [`Error::MissingInput`] naming `objective`.
    pub fn momentum(&self, objective: &str) -> Result<&MomentumFeatures> {
        self.momentum
            .as_ref()
            .ok_or_else(|| missing(objective, "momentum"))
    }

    /// The masked text pass, or a [`Error::MissingInput`] naming `objective`.
    pub fn masked_text(&self, objective: &str) -> Result<&MaskedText> {
        self.masked_text
            .as_ref()
            .ok_or_else(|| missing(objective, "masked_text"))
    }

    /// The masked image pass, or a [`Error::MissingInput`] naming `objective`.
    pub fn masked_image(&self, objective: &str) -> Result<&MaskedImage> {
        self.masked_image
            .as_ref()
            .ok_or_else(|| missing(objective, "masked_image"))
    }

    /// The cross-encoder logits, or a [`Error::MissingInput`] naming `objective`.
    pub fn matching(&self, objective: &str) -> Result<&MatchLogits> {
        self.matching
            .as_ref()
            .ok_or_else(|| missing(objective, "matching"))
    }

    /// The AMF pair weights `[B]`, `None` when every pair counts fully (no
    /// momentum features, or the filter is off).
    pub fn pair_weights(&self) -> Option<&Tensor> {
        self.momentum.as_ref().and_then(|m| m.pair_weights.as_ref())
    }

    /// Batch size `B`.
    pub fn batch_size(&self) -> Result<usize> {
        Ok(self.image_embed.dim(0)?)
    }

    /// A copy with every tensor detached and the masked/matching parts
    /// dropped: what `after_step` gets (kept across the optimizer step
    /// without holding the graph).
    pub fn detached(&self) -> Result<Self> {
        let momentum = self.momentum.as_ref().map(|m| MomentumFeatures {
            image: m.image.detach(),
            text: m.text.detach(),
            pair_weights: m.pair_weights.as_ref().map(Tensor::detach),
        });
        Ok(Self {
            image_embed: self.image_embed.detach(),
            text_embed: self.text_embed.detach(),
            image_ids: self.image_ids.detach(),
            temperature: self.temperature.detach(),
            momentum,
            masked_text: None,
            masked_image: None,
            matching: None,
        })
    }
}

/// One named scalar loss term, unweighted.
#[derive(Clone, Debug)]
pub struct LossTerm {
    pub name: String,
    /// Rank-0 tensor.
    pub value: Tensor,
}

impl LossTerm {
    pub fn new(name: impl Into<String>, value: Tensor) -> Self {
        Self {
            name: name.into(),
            value,
        }
    }
}

/// Checkpointable state of an objective: named tensors (saved as safetensors)
/// plus small JSON metadata (pointers, counters, running statistics, RNG state).
#[derive(Clone, Debug, Default)]
pub struct ObjectiveState {
    pub tensors: BTreeMap<String, Tensor>,
    pub meta: serde_json::Value,
}

impl ObjectiveState {
    /// The tensor `name`, or a [`Error::State`] naming `owner`.
    pub fn tensor(&self, owner: &str, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::State {
            owner: owner.to_string(),
            message: format!("tensor `{name}` is missing"),
        })
    }
}

/// A training signal.
///
/// The trainer's step order, which every objective may rely on:
/// 1. forward passes (clean, momentum, masked, dVAE codes as [`Needs`] says);
/// 2. AMF weights (`Objectives::filter`) from the momentum embeddings, put
///    into [`MomentumFeatures::pair_weights`];
/// 3. [`Objective::losses`] for every objective, summed with their weights;
/// 4. backward and optimizer step;
/// 5. EMA update of the momentum encoders;
/// 6. [`Objective::after_step`] with [`StepFeatures::detached`] (the
///    composition then enqueues the momentum keys into the lockstep queue,
///    once).
pub trait Objective: Send {
    /// Unique name; also the prefix of this objective's checkpoint state.
    fn name(&self) -> &str;
    /// The forward passes this objective reads.
    fn needs(&self) -> Needs;
    /// Named, unweighted scalar loss terms of this step.
    fn losses(&mut self, x: &StepFeatures) -> Result<Vec<LossTerm>>;
    /// Called once after the optimizer and EMA updates, with the step's
    /// features detached and without the masked and matching parts.
    fn after_step(&mut self, _x: &StepFeatures) -> Result<()> {
        Ok(())
    }
    /// State to checkpoint (trainable weights live in the model's `VarMap`, not here).
    fn state(&self) -> Result<ObjectiveState> {
        Ok(ObjectiveState::default())
    }
    /// Restores what [`Objective::state`] returned.
    fn load_state(&mut self, _s: &ObjectiveState) -> Result<()> {
        Ok(())
    }
}

/// Mean of `per_row` weighted by the pair weights, normalised by the weight sum.
///
/// Everything stays on the device: the weight sum is clamped to `1e-12` and
/// divided there, never read back. With all weights zero the result is an
/// exact zero that still depends on `per_row`, so the graph stays connected
/// and the step is a no-op.
///
/// # Shapes
/// - `per_row`: `[B]`; `weights`: `[B]` or `None`; returns a scalar.
pub fn weighted_mean(per_row: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
    match weights {
        None => Ok(per_row.mean_all()?),
        Some(w) => {
            let w = w.to_dtype(per_row.dtype())?;
            let total = (per_row * &w)?.sum_all()?;
            let sum = w.sum_all()?.maximum(1e-12)?;
            Ok(total.div(&sum)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;

    fn t(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu).expect("tensor")
    }

    /// The detached copy holds no graph: a loss of its embedding gives the
    /// original variable no gradient, while the same loss of the original
    /// does; the masked and matching parts are gone, the rest is equal.
    #[test]
    fn detached_features_hold_no_graph() -> Result<()> {
        let v = Var::new(&[[0.6f64, 0.8], [1.0, 0.0]], &Device::Cpu)?;
        let w = Var::new(&[0.5f64, 1.0], &Device::Cpu)?;
        let embed = (v.as_tensor() * 2.0)?;
        let key = (v.as_tensor() * 3.0)?;
        let x = StepFeatures::new(embed.clone(), embed.clone(), t(&[0.0, 1.0]), t(&[0.07]))
            .with_momentum(MomentumFeatures {
                image: key.clone(),
                text: key,
                pair_weights: Some(w.as_tensor().clone()),
            })
            .with_masked_text(MaskedText {
                hidden: embed.unsqueeze(0)?,
                positions: Tensor::new(&[0u32], &Device::Cpu)?,
                targets: Tensor::new(&[1u32], &Device::Cpu)?,
            })
            .with_matching(MatchLogits {
                logits: embed.clone(),
                labels: Tensor::new(&[1u32, 0], &Device::Cpu)?,
            });
        let d = x.detached()?;
        assert!(d.masked_text.is_none() && d.masked_image.is_none() && d.matching.is_none());
        assert_eq!(d.image_embed.to_vec2::<f64>()?, embed.to_vec2::<f64>()?);
        assert_eq!(d.batch_size()?, 2);

        let online = x.image_embed.sum_all()?.backward()?;
        assert!(
            online.get(v.as_tensor()).is_some(),
            "control: the original is connected"
        );
        let m = d.momentum("test")?;
        let loss = (d.image_embed.sum_all()?
            + d.text_embed.sum_all()?
            + m.image.sum_all()?
            + m.text.sum_all()?
            + d.pair_weights().expect("weights kept").sum_all()?
            + d.temperature.sum_all()?)?;
        let grads = loss.backward()?;
        assert!(
            grads.get(v.as_tensor()).is_none(),
            "the detached copy reached v"
        );
        assert!(
            grads.get(w.as_tensor()).is_none(),
            "the detached copy reached w"
        );
        Ok(())
    }

    #[test]
    fn missing_parts_name_the_objective_and_the_part() {
        let x = StepFeatures::new(t(&[1.0]), t(&[1.0]), t(&[0.0]), t(&[0.07]));
        assert!(x.pair_weights().is_none());
        let errs = [
            (x.momentum("a").err(), "momentum"),
            (x.masked_text("a").err(), "masked_text"),
            (x.masked_image("a").err(), "masked_image"),
            (x.matching("a").err(), "matching"),
        ];
        for (err, part) in errs {
            assert!(
                matches!(&err, Some(Error::MissingInput { objective, input }) if objective == "a" && *input == part),
                "{err:?}"
            );
        }
    }

    /// `sum_i w_i x_i / sum_i w_i` against a loop; all-zero weights give an
    /// exact zero that is still connected to `per_row`.
    #[test]
    fn weighted_mean_matches_the_formula_and_survives_zero_weights() -> Result<()> {
        let x = [0.3f64, -1.2, 2.5, 0.7];
        let w = [0.5f32, 0.0, 1.0, 0.25];
        let want = x.iter().zip(&w).map(|(x, w)| x * *w as f64).sum::<f64>()
            / w.iter().map(|&w| w as f64).sum::<f64>();
        let wt = Tensor::new(&w, &Device::Cpu)?;
        let got = weighted_mean(&t(&x), Some(&wt))?.to_scalar::<f64>()?;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        let plain = weighted_mean(&t(&x), None)?.to_scalar::<f64>()?;
        assert!((plain - x.iter().sum::<f64>() / 4.0).abs() < 1e-12);

        let v = Var::new(&x, &Device::Cpu)?;
        let zero = weighted_mean(
            v.as_tensor(),
            Some(&Tensor::zeros(4, DType::F32, &Device::Cpu)?),
        )?;
        assert_eq!(zero.to_scalar::<f64>()?, 0.0);
        let g = zero.backward()?;
        let g = g.get(v.as_tensor()).expect("connected").to_vec1::<f64>()?;
        assert!(g.iter().all(|&g| g == 0.0));
        Ok(())
    }
}
