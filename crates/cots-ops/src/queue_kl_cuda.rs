//! CUDA forward pass of the fused task-level KL
//! ([`crate::queue_fused::QueueKlOp`] is the CPU reference).
//!
//! The kernels live in `kernels/queue_kl.cu`; like [`crate::queue_cuda`],
//! this file embeds that source, compiles it to PTX with NVRTC once per
//! process, loads it through candle's module cache and launches two kernels:
//! 1. `queue_kl_partial` streams each of a fixed number of queue ranges
//!    ("splits") of both queues for 8 rows per block with two online
//!    softmaxes and writes one partial state per (row, split);
//! 2. `queue_kl_combine` merges each row's partial states with column 0 (the
//!    row's own momentum keys) and writes the `[B, 5 + n D]` output.
//!
//! The workspace holds `B * splits * (6 + n D)` floats (`n` = 4 blocks for one
//! direction, 6 for both), bounded by the batch size, never by `K`.
//!
//! Only the forward pass runs here; the backward pass is written in candle
//! tensor ops from this output.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{bail, Layout, Result, Shape, Storage, Tensor};
use cudarc::driver::PushKernelArg;

use crate::queue::KlDirection;
use crate::queue_cuda::{compile_once, matrix, SplitPlan};
use crate::queue_fused::{kl_width, KlBlock};

/// The kernel source, compiled at run time.
const SOURCE: &str = include_str!("../../../kernels/queue_kl.cu");
/// Name of the module in candle's per-device cache of custom modules.
const MODULE: &str = "cots_queue_kl";
const OP: &str = "queue_kl";

/// Largest embedding width: 32 lanes x `DIMS_PER_LANE` registers in the
/// kernel, which holds two queries and six accumulators per lane.
pub(crate) const MAX_DIM: usize = 32 * 16;
/// Floats in one partial-state record before the blocks.
const RECORD_STATS: usize = 6;

/// PTX of [`SOURCE`], compiled once per process.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    compile_once(&PTX, SOURCE, "queue_kl.cu", OP)
}

/// The storage of a constant tensor of the op, which must be on CUDA.
fn cuda_storage<R>(
    name: &str,
    t: &Tensor,
    f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        bail!("{OP} (CUDA): `{name}` is not on a CUDA device")
    };
    f(s, layout)
}

/// The forward pass of the KL op on CUDA.
///
/// # Shapes
/// - `fs` = `f / tau`, `ts` = `t / tau`, `t_m`, `f_m`: `[B, D]`; `queue_t`,
///   `queue_i`: `[K, D]`; all contiguous f32 on one device, `D <= 512`, `K`
///   may be 0.
/// - returns `[B, 5 + n D]` in the layout of [`crate::queue_fused::QueueKlOp`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn kl_fwd(
    fs: &CudaStorage,
    lf: &Layout,
    ts: &CudaStorage,
    lt: &Layout,
    t_m: &Tensor,
    queue_t: &Tensor,
    f_m: &Tensor,
    queue_i: &Tensor,
    direction: KlDirection,
) -> Result<(CudaStorage, Shape)> {
    cuda_storage("t_m", t_m, |tm, ltm| {
        cuda_storage("queue_t", queue_t, |qt, lqt| {
            cuda_storage("f_m", f_m, |fm, lfm| {
                cuda_storage("queue_i", queue_i, |qi, lqi| {
                    launch(
                        [
                            (fs, lf),
                            (ts, lt),
                            (tm, ltm),
                            (qt, lqt),
                            (fm, lfm),
                            (qi, lqi),
                        ],
                        direction,
                    )
                })
            })
        })
    })
}

fn launch(
    inputs: [(&CudaStorage, &Layout); 6],
    direction: KlDirection,
) -> Result<(CudaStorage, Shape)> {
    let names = ["f / tau", "t / tau", "t_m", "queue_t", "f_m", "queue_i"];
    let mut dims = [(0, 0); 6];
    let mut ranges = Vec::with_capacity(6);
    for (n, ((s, l), name)) in inputs.iter().zip(names).enumerate() {
        let (shape, range) = matrix(OP, name, s, l)?;
        dims[n] = shape;
        ranges.push(range);
    }
    let (b, d) = dims[0];
    let kq = dims[3].0;
    let want = [(b, d), (b, d), (b, d), (kq, d), (b, d), (kq, d)];
    if dims != want {
        bail!("{OP} (CUDA): shapes {dims:?} of {names:?} do not agree")
    }
    if d > MAX_DIM {
        bail!("{OP} (CUDA): D = {d} is above the kernel's limit of {MAX_DIM}")
    }
    let dev = inputs[0].0.device();
    if inputs.iter().any(|(s, _)| s.device().id() != dev.id()) {
        bail!("{OP} (CUDA): the inputs are on different devices")
    }

    let blocks = KlBlock::all(direction).len();
    let out_cols = kl_width(direction, d);
    let shape = Shape::from((b, out_cols));
    // Every output element is written by the combine kernel; zeros keep the
    // (unused) padding element of an empty batch defined.
    let mut out = dev.alloc_zeros::<f32>((b * out_cols).max(1))?;
    if b == 0 {
        return Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape));
    }

    // One tile of each queue in shared memory at once.
    let plan = SplitPlan::new(OP, b, kq, d, 2)?;
    let mut work = dev.alloc_zeros::<f32>(b * plan.splits * (RECORD_STATS + blocks * d))?;
    let (pq, qp) = match direction {
        KlDirection::I2tToT2i => (1i32, 0i32),
        KlDirection::T2iToI2t => (0, 1),
        KlDirection::Symmetric => (1, 1),
    };

    let view = |n: usize| -> Result<_> {
        Ok(inputs[n].0.as_cuda_slice::<f32>()?.slice(ranges[n].clone()))
    };
    let (fs, ts, tm, qt, fm, qi) = (view(0)?, view(1)?, view(2)?, view(3)?, view(4)?, view(5)?);
    let ptx = ptx()?;

    let partial = dev.get_or_load_custom_func("queue_kl_partial", MODULE, ptx)?;
    let mut builder = partial.builder();
    builder.arg(&fs);
    builder.arg(&ts);
    builder.arg(&tm);
    builder.arg(&fm);
    builder.arg(&qt);
    builder.arg(&qi);
    builder.arg(&mut work);
    builder.arg(&plan.b);
    builder.arg(&plan.k);
    builder.arg(&plan.d);
    builder.arg(&plan.splits_arg);
    builder.arg(&plan.keys_per_split);
    builder.arg(&plan.tile_keys);
    builder.arg(&pq);
    builder.arg(&qp);
    // SAFETY: the argument list matches the kernel's signature; every pointer
    // covers the extent the kernel reads or writes for these B, K, D, splits
    // and blocks (checked above), and the shared memory fits one tile of both
    // queues.
    unsafe { builder.launch(plan.partial()) }.w()?;

    let combine = dev.get_or_load_custom_func("queue_kl_combine", MODULE, ptx)?;
    let mut builder = combine.builder();
    builder.arg(&fs);
    builder.arg(&ts);
    builder.arg(&tm);
    builder.arg(&fm);
    builder.arg(&work);
    builder.arg(&mut out);
    builder.arg(&plan.b);
    builder.arg(&plan.d);
    builder.arg(&plan.splits_arg);
    builder.arg(&pq);
    builder.arg(&qp);
    // SAFETY: as above; `out` holds B x (5 + n D) floats.
    unsafe { builder.launch(plan.combine()) }.w()?;

    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded source compiles with NVRTC wherever libnvrtc is present
    /// (no GPU needed).
    #[test]
    fn kernel_compiles_with_nvrtc() {
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            println!("skipped: libnvrtc not found on the library path");
            return;
        }
        let ptx = ptx().expect("NVRTC compiles the kernel");
        assert!(ptx.contains("queue_kl_partial"));
        assert!(ptx.contains("queue_kl_combine"));
    }
}
