//! # cots-ops: which tensor operations can the models and objectives rely on?
//!
//! The lowest layer of the workspace. It holds
//! - [`nn`]: differentiable building blocks (LayerNorm, softmax, exact GELU,
//!   seeded dropout), because candle's fused versions have no backward pass
//!   and silently cut gradients; each has a composition of primitive candle
//!   ops as its reference;
//! - [`attention`]: multi-head scaled dot-product attention as one fused CPU
//!   op with a backward pass (batch entries split over rayon's pool,
//!   single-threaded gemm per head; heads split `[B, H, L, D]` or packed
//!   `[B, L, H * D]`), and its composition as the reference;
//! - [`linear`]: `x W^T + b` as one fused CPU op with a backward pass (the
//!   bias add folded into the product, `dW` and `db` from the same op);
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

pub mod attention;
pub mod fused;
pub mod linear;
pub mod nn;
pub mod queue;
#[cfg(feature = "cuda")]
pub mod queue_cuda;
pub mod queue_fused;
#[cfg(feature = "cuda")]
pub mod queue_kl_cuda;

pub use attention::{attention, attention_packed, attention_reference};
pub use linear::{linear, linear_reference};
pub use nn::{bias_gelu_erf, dropout, gelu_erf, layer_norm, softmax_last_dim, SeededRng};
