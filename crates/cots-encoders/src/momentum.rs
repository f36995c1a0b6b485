//! Momentum (exponential moving average) copies of the encoders, as in MoCo
//! (He et al., "Momentum Contrast for Unsupervised Visual Representation
//! Learning", CVPR 2020) and ALBEF, which COTS uses to produce the keys of its
//! instance-level contrastive queues.
//!
//! The momentum model is a second instance of the same module built over its
//! own [`VarMap`]; a list of (online, momentum) variable pairs drives both the
//! initial copy and the EMA. The momentum VarMap must never be handed to the
//! optimizer: its variables change only through [`Momentum::update`].

use candle_core::Var;
use candle_nn::VarMap;

use crate::{Error, Result};

/// Online/momentum variable pairs, matched by name.
#[derive(Clone, Debug)]
pub struct Momentum {
    /// `(online, momentum)`, sorted by name.
    pub pairs: Vec<(Var, Var)>,
    names: Vec<String>,
}

fn snapshot(map: &VarMap) -> Result<std::collections::HashMap<String, Var>> {
    Ok(map
        .data()
        .lock()
        .map_err(|_| Error::Config("a VarMap lock is poisoned".into()))?
        .clone())
}

impl Momentum {
    /// Pairs every variable of `online` with the variable of the same name in
    /// `momentum`. Both maps must hold exactly the same names and shapes;
    /// an [`Error::VarMismatch`] names the first variable that differs.
    pub fn new(online: &VarMap, momentum: &VarMap) -> Result<Self> {
        Self::with_prefix(online, momentum, "")
    }

    /// Like [`Self::new`] but only over variables whose names start with
    /// `prefix` in both maps (e.g. to give only the towers a momentum copy).
    pub fn with_prefix(online: &VarMap, momentum: &VarMap, prefix: &str) -> Result<Self> {
        let on = snapshot(online)?;
        let mo = snapshot(momentum)?;
        let mut names: Vec<String> = on
            .keys()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect();
        names.sort();
        if let Some(extra) = mo
            .keys()
            .filter(|n| n.starts_with(prefix))
            .find(|n| !on.contains_key(*n))
        {
            return Err(Error::VarMismatch {
                name: extra.clone(),
                message: "present in the momentum model but not in the online model".into(),
            });
        }
        let mut pairs = Vec::with_capacity(names.len());
        for name in &names {
            let o = &on[name];
            let Some(m) = mo.get(name) else {
                return Err(Error::VarMismatch {
                    name: name.clone(),
                    message: "present in the online model but not in the momentum model".into(),
                });
            };
            if o.dims() != m.dims() || o.dtype() != m.dtype() {
                return Err(Error::VarMismatch {
                    name: name.clone(),
                    message: format!(
                        "online {:?} {:?} vs momentum {:?} {:?}",
                        o.dims(),
                        o.dtype(),
                        m.dims(),
                        m.dtype()
                    ),
                });
            }
            pairs.push((o.clone(), m.clone()));
        }
        Ok(Self { pairs, names })
    }

    /// Keeps only the pairs whose names pass `keep`: variables that never
    /// change (frozen towers) need no EMA once copied, and skipping them
    /// saves a pass over their weights every step.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        let (names, pairs): (Vec<String>, Vec<(Var, Var)>) = self
            .names
            .drain(..)
            .zip(self.pairs.drain(..))
            .filter(|(n, _)| keep(n))
            .unzip();
        self.names = names;
        self.pairs = pairs;
    }

    /// Variable names, in the order of [`Self::pairs`].
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Sets every momentum variable to its online value (done once at start).
    pub fn copy_from_online(&self) -> Result<()> {
        for (o, m) in &self.pairs {
            m.set(&o.as_tensor().detach().copy()?)?;
        }
        Ok(())
    }

    /// `theta_m <- m * theta_m + (1 - m) * theta` for every pair, on
    /// detached tensors so no graph is kept across steps.
    pub fn update(&self, m: f64) -> Result<()> {
        if !(0.0..=1.0).contains(&m) {
            return Err(Error::Config(format!("momentum {m} is outside [0, 1]")));
        }
        for (o, mv) in &self.pairs {
            let new = ((mv.as_tensor().detach() * m)? + (o.as_tensor().detach() * (1.0 - m))?)?;
            mv.set(&new)?;
        }
        Ok(())
    }
}
