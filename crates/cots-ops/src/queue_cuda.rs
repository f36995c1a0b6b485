//! CUDA forward pass of the fused queue contrastive softmax
//! ([`crate::queue_fused::QueueContrastiveOp`] is the CPU reference).
//!
//! The kernels live in `kernels/queue_contrastive.cu`; this file embeds that
//! source, compiles it to PTX with NVRTC the first time it is needed (once
//! per process), loads it on the tensors' device through candle's module
//! cache, and launches the two kernels:
//! 1. `queue_contrastive_partial` streams each of a fixed number of queue
//!    ranges ("splits") for 8 rows per block with an online softmax and writes
//!    one partial state per (row, split) to a workspace;
//! 2. `queue_contrastive_combine` merges each row's partial states with column
//!    0 (the row's own key) and writes the `[B, 3 + 2D]` output.
//!
//! The workspace holds `B * splits * (4 + 2D)` floats, and the number of
//! splits is bounded by the batch size, never by `K`.
//!
//! Only the forward pass runs here; the backward pass is written in candle
//! tensor ops from this output.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{bail, DType, Layout, Result, Shape};
use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::queue::EMPTY_SLOT;

/// The kernel source, compiled at run time.
const SOURCE: &str = include_str!("../../../kernels/queue_contrastive.cu");
/// Name of the module in candle's per-device cache of custom modules.
const MODULE: &str = "cots_queue_contrastive";
/// The op's name in errors.
const OP: &str = "queue_contrastive";

/// Rows per block, one warp each (`ROWS_PER_BLOCK` in the kernel).
pub(crate) const ROWS_PER_BLOCK: usize = 8;
/// Threads per block: one warp per row.
const THREADS: u32 = (32 * ROWS_PER_BLOCK) as u32;
/// Largest embedding width: 32 lanes x `DIMS_PER_LANE` registers in the kernel.
pub(crate) const MAX_DIM: usize = 32 * 32;
/// Queue keys per shared-memory tile at most (`MAX_TILE_KEYS` in the kernel).
const MAX_TILE_KEYS: usize = 32;
/// Shared memory for one key tile: 48 KiB, the most a launch gets without opting in.
const SHARED_FLOATS: usize = 48 * 1024 / 4;
/// Enough (row block, split) pairs to keep every SM of an H100/H200 busy.
const TARGET_BLOCKS: usize = 1024;
/// A split streams at least this many keys, so short queues are not cut finer
/// than the per-split overhead is worth.
const MIN_KEYS_PER_SPLIT: usize = 256;
/// Number of output columns before the two `D`-wide blocks.
const STAT_COLS: usize = 3;
/// Floats in one partial-state record before the two `D`-wide blocks.
const RECORD_STATS: usize = 4;

/// PTX of [`SOURCE`], compiled once per process.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    compile_once(&PTX, SOURCE, "queue_contrastive.cu", "queue_contrastive")
}

/// PTX of a kernel `source` (file name `file` under `kernels/`), compiled on
/// the first call and kept in `cell`; the error is kept as text so that
/// every later call reports it too. `op` names the op in errors.
pub(crate) fn compile_once(
    cell: &'static OnceLock<std::result::Result<String, String>>,
    source: &str,
    file: &str,
    op: &str,
) -> Result<&'static str> {
    let compiled = cell.get_or_init(|| {
        // cudarc loads libnvrtc on first use and panics if it is missing.
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err("libnvrtc (CUDA 13) was not found; put the CUDA libraries \
                        (e.g. PyTorch's site-packages/nvidia/cu13/lib) on LD_LIBRARY_PATH"
                .to_string());
        }
        let opts = cudarc::nvrtc::CompileOptions {
            name: Some(file.to_string()),
            ..Default::default()
        };
        cudarc::nvrtc::compile_ptx_with_opts(source, opts)
            .map(|ptx| ptx.to_src())
            .map_err(|e| format!("NVRTC could not compile kernels/{file}: {e}"))
    });
    match compiled {
        Ok(ptx) => Ok(ptx.as_str()),
        Err(msg) => bail!("{op} (CUDA): {msg}"),
    }
}

/// Checks that `s` (input `name` of `op`) is a contiguous f32 matrix and
/// returns its `(rows, cols)` and the element range it covers in its storage.
pub(crate) fn matrix(
    op: &str,
    name: &str,
    s: &CudaStorage,
    l: &Layout,
) -> Result<((usize, usize), std::ops::Range<usize>)> {
    if s.dtype() != DType::F32 {
        bail!(
            "{op} (CUDA): `{name}` is {:?}; the CUDA kernel runs in f32 only",
            s.dtype()
        )
    }
    let dims = l.shape().dims2().map_err(|_| {
        candle_core::Error::Msg(format!(
            "{op} (CUDA): `{name}` must be a matrix, got shape {:?}",
            l.shape()
        ))
    })?;
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("{op} (CUDA): `{name}` must be contiguous")
    };
    Ok((dims, start..end))
}

/// The number of queue splits for `b` rows and `k` queue slots: enough blocks
/// to fill the GPU, at least [`MIN_KEYS_PER_SPLIT`] keys per split, at least one.
pub(crate) fn split_count(b: usize, k: usize) -> usize {
    let row_blocks = b.div_ceil(ROWS_PER_BLOCK).max(1);
    TARGET_BLOCKS
        .div_ceil(row_blocks)
        .min(k.div_ceil(MIN_KEYS_PER_SPLIT))
        .max(1)
}

/// How a split kernel pair covers `B` rows and `K` queue slots: the number of
/// splits, keys per split and keys per shared-memory tile, the kernels'
/// 32-bit arguments, and the two launch shapes. Shared by every launcher.
pub(crate) struct SplitPlan {
    pub(crate) splits: usize,
    pub(crate) b: i32,
    pub(crate) k: i32,
    pub(crate) d: i32,
    pub(crate) splits_arg: i32,
    pub(crate) keys_per_split: i32,
    pub(crate) tile_keys: i32,
    row_blocks: u32,
    shared_bytes: u32,
}

impl SplitPlan {
    /// `queues`: how many `[tile, D]` key tiles the partial kernel stages in
    /// shared memory at once (one per queue it streams).
    pub(crate) fn new(op: &str, b: usize, k: usize, d: usize, queues: usize) -> Result<Self> {
        let splits = split_count(b, k);
        let keys_per_split = k.div_ceil(splits);
        let tile_keys = (SHARED_FLOATS / (queues * d.max(1))).clamp(1, MAX_TILE_KEYS);
        Ok(Self {
            splits,
            b: to_i32(op, "B", b)?,
            k: to_i32(op, "K", k)?,
            d: to_i32(op, "D", d)?,
            splits_arg: to_i32(op, "splits", splits)?,
            keys_per_split: to_i32(op, "keys per split", keys_per_split)?,
            tile_keys: to_i32(op, "tile keys", tile_keys)?,
            row_blocks: b.div_ceil(ROWS_PER_BLOCK) as u32,
            shared_bytes: (queues * tile_keys * d * std::mem::size_of::<f32>()) as u32,
        })
    }

    /// The partial kernel: one block per (row block, split), its key tiles in
    /// shared memory.
    pub(crate) fn partial(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.row_blocks, self.splits as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: self.shared_bytes,
        }
    }

    /// The combine kernel: one block per row block.
    pub(crate) fn combine(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.row_blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// A device buffer of the ids, padded to at least one element (a zero-length
/// allocation is an error in CUDA).
fn upload_ids(
    dev: &candle_core::CudaDevice,
    ids: &[u32],
) -> Result<cudarc::driver::CudaSlice<u32>> {
    if ids.is_empty() {
        dev.clone_htod(&[EMPTY_SLOT][..])
    } else {
        dev.clone_htod(ids)
    }
}

/// `v` as the kernels' 32-bit index type (`name` of `op` in the error).
pub(crate) fn to_i32(op: &str, name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        candle_core::Error::Msg(format!(
            "{op} (CUDA): {name} = {v} does not fit the kernel's 32-bit indices"
        ))
    })
}

/// The forward pass of the queue contrastive op on CUDA.
///
/// # Shapes
/// - `qs` (queries divided by the temperature), `k`: `[B, D]`; `queue`: `[K, D]`;
///   all contiguous f32 on one device, `D <= 1024`, `K` may be 0.
/// - `ids`: `(rows [B], slots [K])`; slot `j` is an extra positive for row `i`
///   when `slots[j] == rows[i] != u32::MAX`.
/// - returns `[B, 3 + 2D]`: per row `loss, lse, cnt`, then the softmax-weighted
///   mean key `sum_j p_ij key_j` (`D`), then the sum of the positive keys (`D`).
pub(crate) fn contrastive_fwd(
    qs: &CudaStorage,
    lq: &Layout,
    k: &CudaStorage,
    lk: &Layout,
    queue: &CudaStorage,
    lqu: &Layout,
    ids: Option<(&[u32], &[u32])>,
) -> Result<(CudaStorage, Shape)> {
    let ((b, d), q_range) = matrix(OP, "q / tau", qs, lq)?;
    let ((bk, dk), k_range) = matrix(OP, "k", k, lk)?;
    let ((kq, dq), queue_range) = matrix(OP, "queue", queue, lqu)?;
    if (bk, dk) != (b, d) || dq != d {
        bail!(
            "queue_contrastive (CUDA): shapes q [{b}, {d}], k [{bk}, {dk}], queue [{kq}, {dq}] \
             do not agree"
        )
    }
    if d > MAX_DIM {
        bail!("queue_contrastive (CUDA): D = {d} is above the kernel's limit of {MAX_DIM}")
    }
    if let Some((rows, slots)) = ids {
        if rows.len() != b || slots.len() != kq {
            bail!(
                "queue_contrastive (CUDA): {} row ids for {b} rows and {} slot ids for {kq} slots",
                rows.len(),
                slots.len()
            )
        }
    }
    let dev = qs.device();
    if k.device().id() != dev.id() || queue.device().id() != dev.id() {
        bail!("queue_contrastive (CUDA): q, k and queue are on different devices")
    }

    let out_cols = STAT_COLS + 2 * d;
    let shape = Shape::from((b, out_cols));
    // Every output element is written by the combine kernel; zeros keep the
    // (unused) padding element of an empty batch defined.
    let mut out = dev.alloc_zeros::<f32>((b * out_cols).max(1))?;
    if b == 0 {
        return Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape));
    }

    let plan = SplitPlan::new(OP, b, kq, d, 1)?;
    let mut work = dev.alloc_zeros::<f32>(b * plan.splits * (RECORD_STATS + 2 * d))?;
    let (rows, slots, use_ids) = match ids {
        Some((rows, slots)) => (upload_ids(dev, rows)?, upload_ids(dev, slots)?, 1i32),
        None => (upload_ids(dev, &[])?, upload_ids(dev, &[])?, 0i32),
    };

    let q_view = qs.as_cuda_slice::<f32>()?.slice(q_range);
    let k_view = k.as_cuda_slice::<f32>()?.slice(k_range);
    let queue_view = queue.as_cuda_slice::<f32>()?.slice(queue_range);
    let ptx = ptx()?;

    let partial = dev.get_or_load_custom_func("queue_contrastive_partial", MODULE, ptx)?;
    let mut launch = partial.builder();
    launch.arg(&q_view);
    launch.arg(&queue_view);
    launch.arg(&rows);
    launch.arg(&slots);
    launch.arg(&mut work);
    launch.arg(&plan.b);
    launch.arg(&plan.k);
    launch.arg(&plan.d);
    launch.arg(&plan.splits_arg);
    launch.arg(&plan.keys_per_split);
    launch.arg(&plan.tile_keys);
    launch.arg(&use_ids);
    // SAFETY: the argument list matches the kernel's signature; every pointer
    // covers the extent the kernel reads or writes for these B, K, D and
    // splits (checked above), and the shared memory fits one key tile.
    unsafe { launch.launch(plan.partial()) }.w()?;

    let combine = dev.get_or_load_custom_func("queue_contrastive_combine", MODULE, ptx)?;
    let mut launch = combine.builder();
    launch.arg(&q_view);
    launch.arg(&k_view);
    launch.arg(&work);
    launch.arg(&mut out);
    launch.arg(&plan.b);
    launch.arg(&plan.d);
    launch.arg(&plan.splits_arg);
    // SAFETY: as above; `out` holds B x (3 + 2D) floats.
    unsafe { launch.launch(plan.combine()) }.w()?;

    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_bounded_by_the_batch_not_the_queue() {
        assert_eq!(split_count(1, 0), 1);
        assert_eq!(split_count(37, 100), 1);
        assert_eq!(split_count(37, 65_536), 205);
        assert_eq!(split_count(256, 65_536), 32);
        assert_eq!(split_count(256, 10_000_000), 32);
        // The workspace stays near TARGET_BLOCKS x ROWS_PER_BLOCK records whatever K is.
        for b in [1, 8, 37, 256, 4096] {
            assert!(b * split_count(b, usize::MAX / 2) <= TARGET_BLOCKS * ROWS_PER_BLOCK + b);
        }
    }

    /// The embedded source compiles with NVRTC wherever libnvrtc is present
    /// (no GPU needed): e.g. with the nvidia-cuda-nvrtc wheel's lib directory
    /// on LD_LIBRARY_PATH.
    #[test]
    fn kernel_compiles_with_nvrtc() {
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            println!("skipped: libnvrtc not found on the library path");
            return;
        }
        let ptx = ptx().expect("NVRTC compiles the kernel");
        assert!(ptx.contains("queue_contrastive_partial"));
        assert!(ptx.contains("queue_contrastive_combine"));
    }
}
