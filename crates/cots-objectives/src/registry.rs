//! Run-config driven construction: which objectives, with which weights.
//!
//! ```toml
//! [queue]
//! size = 65536
//!
//! [amf]
//! enabled = true
//! warmup_steps = 1000
//!
//! [[objectives]]
//! kind = "itc"
//! weight = 1.0
//!
//! [[objectives]]
//! kind = "mvlm"
//!
//! [[objectives]]
//! kind = "kl"
//! direction = "symmetric"
//! ```
//!
//! A new kind is one file (its config struct and [`crate::Objective`] impl)
//! plus one variant in [`ObjectiveConfig`] and one arm in [`build`].

use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::amf::{AdaptiveMomentumFilter, AmfConfig};
use crate::bimodal::{Bimodal, BimodalConfig};
use crate::clip::{Clip, ClipConfig};
use crate::itc::{Itc, ItcConfig};
use crate::itm::{Itm, ItmConfig};
use crate::kl::{Kl, KlConfig};
use crate::mvlm::{self, Dims, Mvlm, MvlmConfig};
use crate::queue::{LockstepQueue, QueueConfig, SharedQueue};
use crate::vse::{Vse, VseConfig};
use crate::{Error, Objective, Objectives, Result};

/// One objective of the run, tagged by `kind`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ObjectiveConfig {
    Itc(ItcConfig),
    Mvlm(MvlmConfig),
    Kl(KlConfig),
    Clip(ClipConfig),
    Vse(VseConfig),
    Itm(ItmConfig),
    Bimodal(BimodalConfig),
}

impl ObjectiveConfig {
    pub fn weight(&self) -> f64 {
        match self {
            Self::Itc(c) => c.weight,
            Self::Mvlm(c) => c.weight,
            Self::Kl(c) => c.weight,
            Self::Clip(c) => c.weight,
            Self::Vse(c) => c.weight,
            Self::Itm(c) => c.weight,
            Self::Bimodal(c) => c.weight,
        }
    }

    /// Whether this objective reads the lockstep queue.
    fn uses_queue(&self) -> bool {
        matches!(self, Self::Itc(_) | Self::Kl(_))
    }
}

/// The objectives of a run, the shared queue and the filter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectivesConfig {
    /// Used only when an objective reads the queue (`itc`, `kl`).
    pub queue: QueueConfig,
    pub amf: AmfConfig,
    pub objectives: Vec<ObjectiveConfig>,
}

impl Default for ObjectivesConfig {
    fn default() -> Self {
        Self::cots_default()
    }
}

impl ObjectivesConfig {
    /// COTS: ITC over a 65,536-slot lockstep queue + MVLM + symmetric KL, all
    /// weight 1, with the adaptive momentum filter ON (it is part of COTS;
    /// its default rank rule acts once the batch's median rank shows a
    /// trained momentum model).
    pub fn cots_default() -> Self {
        Self {
            queue: QueueConfig::default(),
            amf: AmfConfig {
                enabled: true,
                ..AmfConfig::default()
            },
            objectives: vec![
                ObjectiveConfig::Itc(ItcConfig::default()),
                ObjectiveConfig::Mvlm(MvlmConfig::default()),
                ObjectiveConfig::Kl(KlConfig::default()),
            ],
        }
    }

    /// CLIP: in-batch symmetric InfoNCE only, no queue, no filter.
    pub fn clip_default() -> Self {
        Self {
            queue: QueueConfig::default(),
            amf: AmfConfig::default(),
            objectives: vec![ObjectiveConfig::Clip(ClipConfig::default())],
        }
    }
}

/// Builds the weighted objectives of `cfg` for encoders of size `dims`.
///
/// Trainable heads (MVLM) are created under `vb` (scoped `mlm_head`,
/// `mvm_head`); the queue lives on `vb`'s device with `vb`'s dtype.
pub fn build(cfg: &ObjectivesConfig, dims: Dims, vb: VarBuilder) -> Result<Objectives> {
    if cfg.objectives.is_empty() {
        return Err(Error::Config(
            "`objectives` is empty: list at least one `[[objectives]]`".into(),
        ));
    }
    let queue = match cfg.objectives.iter().any(ObjectiveConfig::uses_queue) {
        true => Some(SharedQueue::new(LockstepQueue::new(
            &cfg.queue,
            dims.embed,
            vb.dtype(),
            vb.device(),
        )?)),
        false => None,
    };
    let amf = match cfg.amf.enabled {
        true => Some(AdaptiveMomentumFilter::new(&cfg.amf)?),
        false => None,
    };
    let mut out = Objectives::new(queue.clone(), amf);
    for oc in &cfg.objectives {
        // `uses_queue` guarantees the queue exists for the kinds that read it.
        let q = || {
            queue
                .clone()
                .ok_or_else(|| Error::Config("internal: queue missing".into()))
        };
        let obj: Box<dyn Objective> = match oc {
            ObjectiveConfig::Itc(c) => {
                c.validate()?;
                Box::new(Itc::new(c, q()?))
            }
            ObjectiveConfig::Kl(c) => Box::new(Kl::new(c, q()?)),
            ObjectiveConfig::Mvlm(c) => Box::new(Mvlm::new(
                &mvlm::Config {
                    settings: c.clone(),
                    dims,
                },
                vb.clone(),
            )?),
            ObjectiveConfig::Clip(c) => Box::new(Clip::new(c)),
            ObjectiveConfig::Vse(c) => Box::new(Vse::new(c)),
            ObjectiveConfig::Itm(c) => Box::new(Itm::new(c)),
            ObjectiveConfig::Bimodal(c) => Box::new(Bimodal::new(c)?),
        };
        out.push(oc.weight(), obj)?;
    }
    Ok(out)
}
