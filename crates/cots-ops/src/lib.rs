//! # cots-ops: which tensor operations can the models and objectives rely on?
//!
//! The lowest layer of the workspace. It holds
//! - [`nn`]: differentiable building blocks (LayerNorm, softmax, exact GELU,
//!   seeded dropout), because candle's fused versions have no backward pass
//!   and silently cut gradients; each has a composition of primitive candle
//!   ops as its reference;
//! - [`fused`]: the CPU kernels behind them (one custom op forward, one
//!   backward, rows in parallel on rayon's pool);
//! - [`queue`]: the contrastive softmax over negative queues (COTS instance
//!   level) and the KL between the two retrieval distributions (task level),
//!   as a naive reference composition and as fused, tiled custom ops;
//! - `queue_cuda` and `queue_kl_cuda` (feature `cuda`): the CUDA forward
//!   kernels of the fused queue contrastive op (`kernels/queue_contrastive.cu`)
//!   and of the fused KL (`kernels/queue_kl.cu`).
//!
//! Nothing here knows about models, data or training.

pub mod fused;
pub mod nn;
pub mod queue;
#[cfg(feature = "cuda")]
pub mod queue_cuda;
pub mod queue_fused;
#[cfg(feature = "cuda")]
pub mod queue_kl_cuda;

pub use nn::{bias_gelu_erf, dropout, gelu_erf, layer_norm, softmax_last_dim, SeededRng};
