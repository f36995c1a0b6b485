//! Token-level masked vision-language modeling (COTS level 2) without a
//! fusion module.
//!
//! - MLM: each masked text token's hidden state (from the masked text pass),
//!   concatenated with the paired image's clean online embedding, goes through
//!   `Linear -> GELU -> LayerNorm -> Linear(vocab)`; cross-entropy over masked
//!   positions only. Term `mlm`.
//! - MVM: each masked patch's hidden state (from the masked image pass),
//!   concatenated with the paired text's clean online embedding, goes through
//!   the same head shape ending in `Linear(codebook)`; cross-entropy against
//!   the frozen dVAE's visual token of that patch. Term `mvm`.
//!
//! The global feature is not detached: the token-level loss is how each
//! stream learns from the other. Only masked positions are gathered before
//! the heads, so the vocabulary projection costs `masked x vocab`, not
//! `B x L x vocab`. Each position counts with its pair's AMF weight; the loss
//! is normalised by the total weight of the counted positions.
//!
//! Nothing is read back to the host: the masked positions arrive as `[M]`
//! index tensors that the trainer computed from its host-side masks when it
//! built the batch ([`crate::MaskedText`], [`crate::MaskedImage`]), so a step
//! is `index_select`s, the heads and a device-side normalisation. The pair of
//! a position is `position / L` (or `/ N`), an integer division on the
//! device. The builder guarantees the positions and targets are in range
//! (candle's CPU backend reports an out-of-range index as an error; a GPU
//! cannot check without a synchronisation). A batch with no masked position
//! gives an exact zero that stays connected to the graph.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::{weighted_mean, Error, LossTerm, Needs, Objective, Result, StepFeatures};

/// Dimensions of the encoders the objectives are built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dims {
    /// Joint embedding width `E`.
    pub embed: usize,
    /// Text encoder hidden width `Dt`.
    pub text_hidden: usize,
    /// Image encoder hidden width `Dv`.
    pub vision_hidden: usize,
    /// Text vocabulary size.
    pub vocab: usize,
    /// dVAE codebook size.
    pub codebook: usize,
}

/// User settings of the MVLM objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MvlmConfig {
    pub weight: f64,
    /// Masked language modeling on.
    pub mlm: bool,
    /// Masked vision modeling on.
    pub mvm: bool,
    pub layer_norm_eps: f64,
}

impl Default for MvlmConfig {
    fn default() -> Self {
        Self {
            weight: 1.0,
            mlm: true,
            mvm: true,
            layer_norm_eps: 1e-12,
        }
    }
}

/// Everything the MVLM heads are built from: the settings and the encoder dims.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub settings: MvlmConfig,
    pub dims: Dims,
}

/// `concat(token, context) -> Linear -> GELU -> LayerNorm -> Linear(classes)`.
#[derive(Clone, Debug)]
struct Head {
    dense: Linear,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eps: f64,
    decoder: Linear,
}

impl Head {
    fn new(input: usize, hidden: usize, classes: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let dense = candle_nn::linear(input, hidden, vb.pp("dense"))?;
        let ln = vb.pp("layer_norm");
        let ln_weight = ln.get_with_hints(hidden, "weight", Init::Const(1.0))?;
        let ln_bias = ln.get_with_hints(hidden, "bias", Init::Const(0.0))?;
        let decoder = candle_nn::linear(hidden, classes, vb.pp("decoder"))?;
        Ok(Self {
            dense,
            ln_weight,
            ln_bias,
            eps,
            decoder,
        })
    }

    /// # Shapes
    /// - `x`: `[n, input]`; returns logits `[n, classes]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.dense.forward(x)?.gelu()?;
        let h = cots_ops::layer_norm(&h, &self.ln_weight, &self.ln_bias, self.eps)?;
        Ok(self.decoder.forward(&h)?)
    }
}

/// Weighted cross-entropy through a head of the gathered masked positions.
///
/// Runs on the device from end to end: the context of each position is the
/// global feature of its pair (`rows`), its weight that pair's AMF weight,
/// and the weighted sum is normalised by the clamped weight sum on the device.
///
/// # Shapes
/// - `tokens`: `[M, D]`; `global`: `[B, E]`; `rows`, `targets`: `[M]` u32;
///   `pair_weights`: `[B]`; returns a scalar. `M > 0`.
fn head_loss(
    head: &Head,
    tokens: &Tensor,
    global: &Tensor,
    rows: &Tensor,
    targets: &Tensor,
    pair_weights: Option<&Tensor>,
) -> Result<Tensor> {
    let dtype = tokens.dtype();
    let context = global.index_select(rows, 0)?.to_dtype(dtype)?;
    let logits = head.forward(&Tensor::cat(&[tokens, &context], 1)?)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let nll = logp
        .gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()?;
    let weights = match pair_weights {
        Some(w) => Some(w.index_select(rows, 0)?),
        None => None,
    };
    weighted_mean(&nll, weights.as_ref())
}

/// The loss of a step without masked positions: an exact zero (for finite
/// inputs) that still depends on the masked pass and the global feature, so
/// the graph stays connected and the step is a no-op for these terms.
///
/// The product with a zero tensor, not `* 0.0`: candle prunes a scaling by
/// the constant 0 from the backward graph.
fn empty_loss(hidden: &Tensor, global: &Tensor) -> Result<Tensor> {
    let sum = (hidden.sum_all()? + global.sum_all()?.to_dtype(hidden.dtype())?)?;
    let zero = Tensor::zeros((), sum.dtype(), sum.device())?;
    Ok(sum.mul(&zero)?)
}

/// `positions / per_row` on the device (integer division): the batch row of
/// each flat position.
///
/// # Shapes
/// - `positions`: `[M]` u32; returns `[M]` u32.
fn row_of(positions: &Tensor, per_row: usize) -> Result<Tensor> {
    let divisor = Tensor::new(per_row as u32, positions.device())?;
    Ok(positions.broadcast_div(&divisor)?)
}

fn bad(input: &'static str, message: String) -> Error {
    Error::BadInput {
        objective: "mvlm".into(),
        input,
        message,
    }
}

/// `[M]` positions as u32, or a [`Error::BadInput`] when not a vector.
fn positions_u32(positions: &Tensor, input: &'static str) -> Result<(Tensor, usize)> {
    let m = positions.dims1().map_err(|_| {
        bad(
            input,
            format!("positions must be a vector [M], got {:?}", positions.dims()),
        )
    })?;
    Ok((positions.to_dtype(DType::U32)?, m))
}

/// The MLM and MVM heads; trainable, scoped under `mlm_head` / `mvm_head`.
#[derive(Clone, Debug)]
pub struct Mvlm {
    settings: MvlmConfig,
    dims: Dims,
    mlm: Option<Head>,
    mvm: Option<Head>,
}

impl Mvlm {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (s, d) = (&cfg.settings, cfg.dims);
        let mlm = match s.mlm {
            true => Some(Head::new(
                d.text_hidden + d.embed,
                d.text_hidden,
                d.vocab,
                s.layer_norm_eps,
                vb.pp("mlm_head"),
            )?),
            false => None,
        };
        let mvm = match s.mvm {
            true => Some(Head::new(
                d.vision_hidden + d.embed,
                d.vision_hidden,
                d.codebook,
                s.layer_norm_eps,
                vb.pp("mvm_head"),
            )?),
            false => None,
        };
        Ok(Self {
            settings: s.clone(),
            dims: d,
            mlm,
            mvm,
        })
    }

    /// MLM: gathers the masked tokens' hidden rows (positions index the
    /// `[B * L, Dt]` flattening), their pairs' image embeddings (row
    /// `position / L`, divided on the device) and targets.
    fn mlm_loss(&self, head: &Head, x: &StepFeatures) -> Result<Tensor> {
        let inp = x.masked_text(self.name())?;
        let (b, l, dt) = inp.hidden.dims3()?;
        let (positions, m) = positions_u32(&inp.positions, "masked_text.positions")?;
        if b != x.batch_size()?
            || dt != self.dims.text_hidden
            || inp.targets.dims() != [m]
            || (l == 0 && m > 0)
        {
            return Err(bad(
                "masked_text",
                format!(
                    "hidden {:?}, positions {:?} and targets {:?} must be [{}, L, {}], [M] and [M]",
                    inp.hidden.dims(),
                    inp.positions.dims(),
                    inp.targets.dims(),
                    x.batch_size()?,
                    self.dims.text_hidden
                ),
            ));
        }
        if m == 0 {
            return empty_loss(&inp.hidden, &x.image_embed);
        }
        let tokens = inp
            .hidden
            .reshape((b * l, dt))?
            .index_select(&positions, 0)?;
        let rows = row_of(&positions, l)?;
        head_loss(
            head,
            &tokens,
            &x.image_embed,
            &rows,
            &inp.targets,
            x.pair_weights(),
        )
    }

    /// MVM: gathers the masked patches' hidden rows, past `[CLS]` (patch
    /// `b * N + n` is row `b * (1 + N) + 1 + n`, i.e. `position + row + 1`),
    /// their pairs' text embeddings (row `position / N`) and the dVAE codes
    /// at the positions.
    fn mvm_loss(&self, head: &Head, x: &StepFeatures) -> Result<Tensor> {
        let inp = x.masked_image(self.name())?;
        let (b, n1, dv) = inp.hidden.dims3()?;
        let np = n1.saturating_sub(1);
        let (positions, m) = positions_u32(&inp.positions, "masked_image.positions")?;
        if b != x.batch_size()?
            || np == 0
            || inp.codes.dims() != [b, np]
            || dv != self.dims.vision_hidden
        {
            return Err(bad(
                "masked_image",
                format!(
                    "hidden {:?} and codes {:?} must be [{}, 1+N, {}] and [B, N] with N > 0",
                    inp.hidden.dims(),
                    inp.codes.dims(),
                    x.batch_size()?,
                    self.dims.vision_hidden
                ),
            ));
        }
        if m == 0 {
            return empty_loss(&inp.hidden, &x.text_embed);
        }
        let rows = row_of(&positions, np)?;
        let one = Tensor::new(1u32, positions.device())?;
        let hidden_rows = (&positions + &rows)?.broadcast_add(&one)?;
        let tokens = inp
            .hidden
            .reshape((b * n1, dv))?
            .index_select(&hidden_rows, 0)?;
        let targets = inp
            .codes
            .to_dtype(DType::U32)?
            .flatten_all()?
            .index_select(&positions, 0)?;
        head_loss(
            head,
            &tokens,
            &x.text_embed,
            &rows,
            &targets,
            x.pair_weights(),
        )
    }
}

impl Objective for Mvlm {
    fn name(&self) -> &str {
        "mvlm"
    }

    fn needs(&self) -> Needs {
        Needs {
            masked_text: self.settings.mlm,
            masked_image: self.settings.mvm,
            dvae_codes: self.settings.mvm,
            ..Needs::default()
        }
    }

    fn losses(&mut self, x: &StepFeatures) -> Result<Vec<LossTerm>> {
        let mut out = Vec::new();
        if let Some(h) = &self.mlm {
            out.push(LossTerm::new("mlm", self.mlm_loss(h, x)?));
        }
        if let Some(h) = &self.mvm {
            out.push(LossTerm::new("mvm", self.mvm_loss(h, x)?));
        }
        Ok(out)
    }
}
