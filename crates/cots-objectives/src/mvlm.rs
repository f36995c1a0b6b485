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

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::{Error, LossTerm, Needs, Objective, Result, StepInputs};

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

/// Weighted cross-entropy of gathered positions through a head.
///
/// `tokens` `[n, D]`, `context` `[n, E]`, `targets` and `weights` of length `n`.
fn head_loss(
    head: &Head,
    tokens: &Tensor,
    context: &Tensor,
    targets: Vec<u32>,
    weights: Vec<f64>,
) -> Result<Tensor> {
    let n = targets.len();
    let dev = tokens.device();
    let dtype = tokens.dtype();
    let logits = head.forward(&Tensor::cat(&[tokens, &context.to_dtype(dtype)?], 1)?)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let targets = Tensor::from_vec(targets, (n, 1), dev)?;
    let nll = logp.gather(&targets, 1)?.squeeze(1)?.neg()?;
    let total: f64 = weights.iter().sum();
    let w = Tensor::from_vec(weights, n, dev)?.to_dtype(dtype)?;
    Ok(((nll * w)?.sum_all()? / total.max(1e-12))?)
}

/// Positions to predict: `(flat row index, batch index, target)` plus weights.
type Picked = (Vec<u32>, Vec<u32>, Vec<u32>, Vec<f64>);

fn bad(input: &'static str, message: String) -> Error {
    Error::BadInput {
        objective: "mvlm".into(),
        input,
        message,
    }
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

    fn zero(x: &StepInputs) -> Result<Tensor> {
        Ok(Tensor::zeros(
            (),
            x.image_embed.dtype(),
            x.image_embed.device(),
        )?)
    }

    fn mlm_loss(&self, head: &Head, x: &StepInputs) -> Result<Tensor> {
        let inp = x.mlm.ok_or_else(|| Error::MissingInput {
            objective: "mvlm".into(),
            input: "mlm",
        })?;
        let (b, l, dt) = inp.hidden.dims3()?;
        if inp.labels.dims() != [b, l] || dt != self.dims.text_hidden {
            return Err(bad(
                "mlm",
                format!(
                    "hidden {:?} and labels {:?} must be [B, L, {}] and [B, L]",
                    inp.hidden.dims(),
                    inp.labels.dims(),
                    self.dims.text_hidden
                ),
            ));
        }
        let labels = inp.labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let pw = x.pair_weights_host()?;
        let mut picked: Picked = Default::default();
        for (bi, row) in labels.iter().enumerate() {
            let w = pw.as_ref().map_or(1.0, |w| w[bi] as f64);
            for (li, &label) in row.iter().enumerate() {
                // Negative labels (-100 by convention) mark unmasked tokens.
                if label < 0 || w <= 0.0 {
                    continue;
                }
                if label as usize >= self.dims.vocab {
                    return Err(bad(
                        "mlm.labels",
                        format!(
                            "label {label} at ({bi}, {li}) is outside the vocabulary of {}",
                            self.dims.vocab
                        ),
                    ));
                }
                picked.0.push((bi * l + li) as u32);
                picked.1.push(bi as u32);
                picked.2.push(label as u32);
                picked.3.push(w);
            }
        }
        if picked.0.is_empty() {
            return Self::zero(x);
        }
        let dev = inp.hidden.device();
        let n = picked.0.len();
        let tokens = inp
            .hidden
            .reshape((b * l, dt))?
            .index_select(&Tensor::from_vec(picked.0, n, dev)?, 0)?;
        let context = x
            .image_embed
            .index_select(&Tensor::from_vec(picked.1, n, dev)?, 0)?;
        head_loss(head, &tokens, &context, picked.2, picked.3)
    }

    fn mvm_loss(&self, head: &Head, x: &StepInputs) -> Result<Tensor> {
        let inp = x.mvm.ok_or_else(|| Error::MissingInput {
            objective: "mvlm".into(),
            input: "mvm",
        })?;
        let (b, n1, dv) = inp.hidden.dims3()?;
        let np = n1.saturating_sub(1);
        if inp.mask.dims() != [b, np]
            || inp.codes.dims() != [b, np]
            || dv != self.dims.vision_hidden
        {
            return Err(bad(
                "mvm",
                format!(
                    "hidden {:?}, mask {:?} and codes {:?} must be [B, 1+N, {}], [B, N] and [B, N]",
                    inp.hidden.dims(),
                    inp.mask.dims(),
                    inp.codes.dims(),
                    self.dims.vision_hidden
                ),
            ));
        }
        let mask = inp.mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let codes = inp.codes.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let pw = x.pair_weights_host()?;
        let mut picked: Picked = Default::default();
        for bi in 0..b {
            let w = pw.as_ref().map_or(1.0, |w| w[bi] as f64);
            for pi in 0..np {
                if mask[bi][pi] == 0.0 || w <= 0.0 {
                    continue;
                }
                let code = codes[bi][pi];
                if code as usize >= self.dims.codebook {
                    return Err(bad(
                        "mvm.codes",
                        format!(
                            "code {code} at ({bi}, {pi}) is outside the codebook of {}",
                            self.dims.codebook
                        ),
                    ));
                }
                // Row of patch `pi` in the flattened hidden states, past [CLS].
                picked.0.push((bi * n1 + 1 + pi) as u32);
                picked.1.push(bi as u32);
                picked.2.push(code);
                picked.3.push(w);
            }
        }
        if picked.0.is_empty() {
            return Self::zero(x);
        }
        let dev = inp.hidden.device();
        let n = picked.0.len();
        let tokens = inp
            .hidden
            .reshape((b * n1, dv))?
            .index_select(&Tensor::from_vec(picked.0, n, dev)?, 0)?;
        let context = x
            .text_embed
            .index_select(&Tensor::from_vec(picked.1, n, dev)?, 0)?;
        head_loss(head, &tokens, &context, picked.2, picked.3)
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

    fn losses(&mut self, x: &StepInputs) -> Result<Vec<LossTerm>> {
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
