//! # cots-ops: which tensor operations can the models and objectives rely on?
//!
//! The lowest layer of the workspace. It holds
//! - [`nn`]: differentiable building blocks (LayerNorm, softmax, seeded dropout)
//!   written from primitive candle ops, because candle's fused versions have no
//!   backward pass and silently cut gradients;
//! - [`queue`]: the contrastive softmax over negative queues (COTS instance
//!   level) and the KL between the two retrieval distributions (task level),
//!   as a naive reference composition and as fused, tiled custom ops;
//! - `queue_cuda` (feature `cuda`): the CUDA forward kernel of the fused queue
//!   contrastive op (`kernels/queue_contrastive.cu`).
//!
//! Nothing here knows about models, data or training.

pub mod nn;
pub mod queue;
#[cfg(feature = "cuda")]
pub mod queue_cuda;
pub mod queue_fused;

pub use nn::{dropout, layer_norm, softmax_last_dim, SeededRng};
