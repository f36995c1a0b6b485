//! How are the weights updated? AdamW with decay / no-decay groups, global
//! gradient-norm clipping, and state that checkpoints can save.
//!
//! candle's own AdamW keeps its moments private (a resumed run could not
//! continue exactly) and has no parameter groups, hence this one. The update
//! is PyTorch's `torch.optim.AdamW`: decoupled weight decay
//! `p -= lr * wd * p`, then the bias-corrected Adam step. Variables can
//! carry a learning-rate multiplier by name prefix (`lr_scales`), PyTorch's
//! parameter groups for the common case of a pretrained tower that should
//! move slowly or not at all.

use std::collections::{BTreeMap, HashMap};

use candle_core::{backprop::GradStore, DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// AdamW hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables it.
    pub grad_clip: f64,
    /// Micro-batches whose gradients are averaged before one update.
    pub accumulation: usize,
    /// Learning-rate multipliers by variable-name prefix; the longest
    /// matching prefix wins and unmatched variables use 1. A multiplier of 0
    /// freezes the variables: they get no update and their gradients do not
    /// count towards the clipping norm. Example, a pretrained text tower
    /// that moves ten times slower: `lr_scales = { "model.text." = 0.1 }`.
    pub lr_scales: BTreeMap<String, f64>,
}

impl Default for OptimConfig {
    /// ALBEF's settings.
    fn default() -> Self {
        Self {
            lr: 1e-4,
            weight_decay: 0.02,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_clip: 5.0,
            accumulation: 1,
            lr_scales: BTreeMap::new(),
        }
    }
}

impl OptimConfig {
    /// The learning-rate multiplier of variable `name` (see `lr_scales`).
    pub fn lr_scale(&self, name: &str) -> f64 {
        self.lr_scales
            .iter()
            .filter(|(prefix, _)| name.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or(1.0, |(_, &s)| s)
    }

    /// Whether variable `name` is trained at all (its multiplier is not 0).
    pub fn trains(&self, name: &str) -> bool {
        self.lr_scale(name) != 0.0
    }
}

/// Whether a variable is exempt from weight decay: biases, normalisation
/// weights, the temperature, and the learned tokens and position tables.
pub fn no_decay(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    last == "bias"
        || last == "temp"
        || name.contains("LayerNorm")
        || name.contains("layernorm")
        || name.contains("layer_norm")
        || name.contains("norm.")
        || last.ends_with("_token")
        || name.contains("position_embeddings")
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    lr_scale: f64,
    m: Tensor,
    v: Tensor,
}

/// AdamW over named variables (frozen ones, multiplier 0, are left out).
pub struct AdamW {
    cfg: OptimConfig,
    slots: Vec<Slot>,
    step: u64,
}

/// Gradients by variable name, as produced by backward or accumulation.
pub type Grads = HashMap<String, Tensor>;

/// Backward on `loss`, gradient clipping at `grad_clip` (0: off), and one
/// AdamW update at `lr`: a whole optimizer step for the loops that have no
/// accumulation (`train-cross`, `decompose`).
pub fn backward_step(
    loss: &Tensor,
    vars: &[(String, Var)],
    adam: &mut AdamW,
    grad_clip: f64,
    lr: f64,
) -> Result<()> {
    let mut grads = collect_grads(&loss.backward()?, vars);
    if grad_clip > 0.0 {
        clip_grad_norm(&mut grads, grad_clip)?;
    }
    adam.step(&grads, lr)?;
    Ok(())
}

/// The gradients of `vars` from a backward pass (variables without one are absent).
pub fn collect_grads(store: &GradStore, vars: &[(String, Var)]) -> Grads {
    vars.iter()
        .filter_map(|(n, v)| store.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
        .collect()
}

/// Adds `other` into `acc` (gradient accumulation over micro-batches).
pub fn accumulate(acc: &mut Grads, other: Grads) -> Result<()> {
    for (name, g) in other {
        match acc.get_mut(&name) {
            Some(a) => *a = (&*a + &g)?,
            None => {
                acc.insert(name, g);
            }
        }
    }
    Ok(())
}

/// Multiplies every gradient by `s` (e.g. `1 / micro_batches`).
pub fn scale(grads: &mut Grads, s: f64) -> Result<()> {
    for g in grads.values_mut() {
        *g = (&*g * s)?;
    }
    Ok(())
}

/// The global L2 norm of `grads`.
pub fn global_norm(grads: &Grads) -> Result<f64> {
    // Summed in name order: a hash map's order changes from process to
    // process, and a norm that differs in its last bit scales the clipped
    // gradients differently, so a resumed run would leave the curve of an
    // uninterrupted one.
    let mut names: Vec<&String> = grads.keys().collect();
    names.sort();
    let mut sq = 0f64;
    for g in names.into_iter().map(|n| &grads[n]) {
        sq += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

/// Scales `grads` so their global norm is at most `max_norm`; returns the
/// norm before clipping. A non-finite norm names the first bad variable.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if !norm.is_finite() {
        let mut names: Vec<&String> = grads.keys().collect();
        names.sort();
        for n in names {
            let s = grads[n]
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
            if !s.is_finite() {
                return Err(Error::NonFinite(format!(
                    "the gradient of `{n}` is not finite"
                )));
            }
        }
    }
    if max_norm > 0.0 && norm > max_norm {
        scale(grads, max_norm / (norm + 1e-6))?;
    }
    Ok(norm)
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: &OptimConfig) -> Result<Self> {
        let slots = vars
            .into_iter()
            .filter(|(name, _)| cfg.trains(name))
            .map(|(name, var)| {
                Ok(Slot {
                    decay: !no_decay(&name),
                    lr_scale: cfg.lr_scale(&name),
                    m: var.zeros_like()?,
                    v: var.zeros_like()?,
                    name,
                    var,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            slots,
            step: 0,
        })
    }

    /// Names of the variables that are decayed and of those that are not.
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        let (d, n): (Vec<&Slot>, Vec<&Slot>) = self.slots.iter().partition(|s| s.decay);
        (
            d.iter().map(|s| s.name.as_str()).collect(),
            n.iter().map(|s| s.name.as_str()).collect(),
        )
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update at learning rate `lr`; variables with no gradient are left
    /// alone (their moments too). Returns how many were updated.
    pub fn step(&mut self, grads: &Grads, lr: f64) -> Result<usize> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let mut updated = 0;
        for s in &mut self.slots {
            let Some(g) = grads.get(&s.name) else {
                continue;
            };
            let g = g.detach();
            let p = s.var.as_tensor().detach();
            let lr = lr * s.lr_scale;
            let p = if s.decay && self.cfg.weight_decay > 0.0 {
                (&p * (1.0 - lr * self.cfg.weight_decay))?
            } else {
                p
            };
            s.m = ((&s.m * b1)? + (&g * (1.0 - b1))?)?;
            s.v = ((&s.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&s.m / bc1)?;
            let v_hat = (&s.v / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + self.cfg.eps)?)?;
            s.var.set(&(p - (update * lr)?)?)?;
            updated += 1;
        }
        Ok(updated)
    }

    /// Moments as named tensors (`<var>.m`, `<var>.v`) for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| {
                [
                    (format!("{}.m", s.name), s.m.clone()),
                    (format!("{}.v", s.name), s.v.clone()),
                ]
            })
            .collect()
    }

    /// Restores [`Self::state`] and the step count; names the first missing
    /// or mis-shaped entry.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for s in &mut self.slots {
            for (suffix, slot) in [("m", &mut s.m), ("v", &mut s.v)] {
                let key = format!("{}.{suffix}", s.name);
                let t = tensors.get(&key).ok_or_else(|| {
                    Error::Checkpoint(format!("optimizer state `{key}` is missing"))
                })?;
                if t.dims() != s.var.dims() {
                    return Err(Error::Checkpoint(format!(
                        "optimizer state `{key}` has shape {:?}, the variable has {:?}",
                        t.dims(),
                        s.var.dims()
                    )));
                }
                *slot = t.to_dtype(s.var.dtype())?.to_device(s.var.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_global_norm_does_not_depend_on_the_map_order() {
        // Magnitudes far apart make the f64 sum depend on its order; every
        // map below has its own hash seed, so its own iteration order.
        let grads: Vec<(String, f64)> = (0..40)
            .map(|i| {
                (
                    format!("v{i:02}"),
                    10f64.powi(i % 9 - 4) * (1.0 + i as f64 / 7.0),
                )
            })
            .collect();
        let norm_of = |order: &[usize]| {
            let map: Grads = order
                .iter()
                .map(|&i| {
                    let (n, v) = &grads[i];
                    (
                        n.clone(),
                        Tensor::new(&[*v as f32, 1.0 / 3.0], &Device::Cpu).unwrap(),
                    )
                })
                .collect();
            global_norm(&map).unwrap()
        };
        let forward: Vec<usize> = (0..grads.len()).collect();
        let want = norm_of(&forward);
        for k in 0..20 {
            let rotated: Vec<usize> = (0..grads.len())
                .map(|i| (i * 7 + k) % grads.len())
                .collect();
            assert_eq!(norm_of(&rotated).to_bits(), want.to_bits());
        }
    }

    /// PyTorch's AdamW written out for one scalar.
    fn reference(p0: f64, grads: &[f64], lr: f64, wd: f64) -> f64 {
        let (b1, b2, eps) = (0.9, 0.999, 1e-8);
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (i, g) in grads.iter().enumerate() {
            let t = (i + 1) as i32;
            p *= 1.0 - lr * wd;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let mh = m / (1.0 - b1.powi(t));
            let vh = v / (1.0 - b2.powi(t));
            p -= lr * mh / (vh.sqrt() + eps);
        }
        p
    }

    #[test]
    fn matches_pytorch_formula_in_both_groups() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, 6, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, 6, &dev).unwrap()).unwrap();
        let (w0, b0) = (w.to_vec1::<f64>().unwrap(), b.to_vec1::<f64>().unwrap());
        let cfg = OptimConfig {
            lr: 0.01,
            weight_decay: 0.1,
            ..OptimConfig::default()
        };
        let mut opt = AdamW::new(
            vec![("x.weight".into(), w.clone()), ("x.bias".into(), b.clone())],
            &cfg,
        )
        .unwrap();
        assert_eq!(opt.groups(), (vec!["x.weight"], vec!["x.bias"]));
        let mut gw_hist = vec![Vec::new(); 6];
        let mut gb_hist = vec![Vec::new(); 6];
        for _ in 0..5 {
            let gw = Tensor::randn(0f64, 1.0, 6, &dev).unwrap();
            let gb = Tensor::randn(0f64, 1.0, 6, &dev).unwrap();
            for (i, g) in gw.to_vec1::<f64>().unwrap().into_iter().enumerate() {
                gw_hist[i].push(g);
            }
            for (i, g) in gb.to_vec1::<f64>().unwrap().into_iter().enumerate() {
                gb_hist[i].push(g);
            }
            let grads: Grads = [("x.weight".to_string(), gw), ("x.bias".to_string(), gb)].into();
            opt.step(&grads, 0.01).unwrap();
        }
        for i in 0..6 {
            let want_w = reference(w0[i], &gw_hist[i], 0.01, 0.1);
            let want_b = reference(b0[i], &gb_hist[i], 0.01, 0.0);
            assert!((w.to_vec1::<f64>().unwrap()[i] - want_w).abs() < 1e-12);
            assert!((b.to_vec1::<f64>().unwrap()[i] - want_b).abs() < 1e-12);
        }
        // Restoring the state continues identically.
        let state: HashMap<String, Tensor> = opt.state().into_iter().collect();
        let mut again = AdamW::new(
            vec![("x.weight".into(), w.clone()), ("x.bias".into(), b.clone())],
            &cfg,
        )
        .unwrap();
        again.load_state(&state, opt.step_count()).unwrap();
        let g: Grads = [(
            "x.weight".to_string(),
            Tensor::ones(6, DType::F64, &dev).unwrap(),
        )]
        .into();
        let before = w.to_vec1::<f64>().unwrap();
        opt.step(&g, 0.01).unwrap();
        let after_a = w.to_vec1::<f64>().unwrap();
        w.set(&Tensor::from_vec(before, 6, &dev).unwrap()).unwrap();
        again.step(&g, 0.01).unwrap();
        assert_eq!(w.to_vec1::<f64>().unwrap(), after_a);
    }

    #[test]
    fn lr_scales_pick_the_longest_prefix_and_zero_freezes() {
        let dev = Device::Cpu;
        let cfg = OptimConfig {
            lr: 0.01,
            weight_decay: 0.1,
            lr_scales: [("m.".to_string(), 0.5), ("m.text.".to_string(), 0.0)].into(),
            ..OptimConfig::default()
        };
        assert_eq!(cfg.lr_scale("m.text.w"), 0.0);
        assert_eq!(cfg.lr_scale("m.vision.w"), 0.5);
        assert_eq!(cfg.lr_scale("other.w"), 1.0);
        let var = |_| Var::from_tensor(&Tensor::randn(0f64, 1.0, 4, &dev).unwrap()).unwrap();
        let (half, frozen, full) = (var(0), var(1), var(2));
        let starts: Vec<Vec<f64>> = [&half, &frozen, &full]
            .iter()
            .map(|v| v.to_vec1::<f64>().unwrap())
            .collect();
        let names = ["m.vision.weight", "m.text.weight", "head.weight"];
        let mut opt = AdamW::new(
            names
                .iter()
                .zip([&half, &frozen, &full])
                .map(|(n, v)| (n.to_string(), v.clone()))
                .collect(),
            &cfg,
        )
        .unwrap();
        assert_eq!(opt.groups().0, vec!["m.vision.weight", "head.weight"]);
        let mut hist = vec![Vec::new(); 4];
        for _ in 0..3 {
            let g = Tensor::randn(0f64, 1.0, 4, &dev).unwrap();
            for (i, x) in g.to_vec1::<f64>().unwrap().into_iter().enumerate() {
                hist[i].push(x);
            }
            let grads: Grads = names.iter().map(|n| (n.to_string(), g.clone())).collect();
            opt.step(&grads, 0.01).unwrap();
        }
        for i in 0..4 {
            let got = |v: &Var| v.to_vec1::<f64>().unwrap()[i];
            assert!((got(&half) - reference(starts[0][i], &hist[i], 0.005, 0.1)).abs() < 1e-12);
            assert_eq!(got(&frozen), starts[1][i]);
            assert!((got(&full) - reference(starts[2][i], &hist[i], 0.01, 0.1)).abs() < 1e-12);
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm_and_names_nan() {
        let dev = Device::Cpu;
        let mut g: Grads = [
            ("a".to_string(), Tensor::new(&[3.0f64, 0.0], &dev).unwrap()),
            ("b".to_string(), Tensor::new(&[0.0f64, 4.0], &dev).unwrap()),
        ]
        .into();
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-12);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
        let mut bad: Grads = [("w".to_string(), Tensor::new(&[f64::NAN], &dev).unwrap())].into();
        let e = clip_grad_norm(&mut bad, 1.0).unwrap_err().to_string();
        assert!(e.contains("`w`"), "{e}");
    }

    #[test]
    fn accumulation_averages() {
        let dev = Device::Cpu;
        let mut acc = Grads::new();
        accumulate(
            &mut acc,
            [("a".to_string(), Tensor::new(&[1.0f64], &dev).unwrap())].into(),
        )
        .unwrap();
        accumulate(
            &mut acc,
            [("a".to_string(), Tensor::new(&[3.0f64], &dev).unwrap())].into(),
        )
        .unwrap();
        scale(&mut acc, 0.5).unwrap();
        assert_eq!(acc["a"].to_vec1::<f64>().unwrap(), vec![2.0]);
    }
}
