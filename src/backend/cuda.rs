//! The CUDA back end (feature `cuda`): fused multi-tensor kernels from `kernels/grad_clip.cu`.
//!
//! # Launches
//! Every operation describes all gradients in one table of segments (device pointer, length,
//! dtype, first chunk) and covers them with one launch, whatever their number and dtypes:
//! - norm: `grad_clip_reduce_*` (one launch; a second, `grad_clip_reduce_pow` in rescue mode, only
//!   when a sum of powers may leave the `f64` range: F64 gradients or `p > 6`, as on the CPU);
//! - scale: `grad_clip_apply`, which reads the coefficient from device memory and returns at once
//!   when it is `>= 1`;
//! - clamp: `grad_clip_apply` too.
//!
//! So `clip_grad_norm_` is 2 launches (3 for F64 gradients or `p > 6`) and one host-to-device copy
//! of the table, for 1 or 10,000 gradients. Slow paths, each an extra launch per tensor: a
//! non-contiguous gradient is read through a `.contiguous()` copy (made by candle) for the norm and
//! written by `grad_clip_apply_strided`.
//!
//! # Determinism
//! Each segment is cut into chunks of [`CHUNK`] elements counted from its first element, and one
//! warp reduces one chunk into an `f64` partial in an order fixed by the element indices only. The
//! partials are added on the device into the superaccumulator of `exact_sum.rs` with integer
//! atomics (exact, so order-independent), and the last block rounds the sum once like
//! `ExactSum::value`. The norm is therefore bitwise the same run to run and for any order of
//! `vars`. It is not bitwise the CPU's norm (the CPU's partials cover other element sets).
//!
//! # No host synchronisation
//! The norm and the coefficient are written by the device (the 0-d norm tensor, and the
//! coefficient in a scratch buffer that the scale kernel reads). The only host wait is the read of
//! the norm that `error_if_nonfinite(true)` needs. The table goes to the device with
//! `cuMemcpyHtoDAsync` from page-locked memory (a ring of pinned staging buffers, each reused only
//! once the event recorded after its copy has completed), which does not wait for the device.
//! Pinned allocations (and frees) may wait for the device; they happen only when a thread first
//! uses a device, when a table outgrows the staging buffers, or when more than 4 calls of one
//! thread have copies still queued on the device (the ring grows to 16 buffers; beyond that a call
//! waits for the oldest copy). CUDA graph capture of these calls is not supported (the table
//! copy reads host memory that later calls reuse).
//!
//! # Scratch and streams
//! candle's `Device::new_cuda` uses the per-thread default stream: work from one host thread is
//! ordered, work from two threads is not. The scratch (superaccumulator state, coefficient, device
//! table, pinned staging) is therefore thread-local, per device: everything a call enqueues on it
//! is ordered on the calling thread's stream, after the previous call of the same thread. With
//! `Device::new_cuda_with_stream` the stream is shared, which orders even more. The
//! superaccumulator is reset to zero by the block that consumes it, so no memset is needed.
//!
//! Limitation: the kernels write the gradients through pointers taken under candle's read locks,
//! so when cudarc tracks events across streams (once a context has more than one stream), it
//! records our writes as reads. Work that reads the gradients on *another* stream (another host
//! thread's per-thread stream, or a `new_cuda_with_stream` device) is then not ordered after the
//! clip by cudarc: order it yourself (`device.synchronize()`, or use one stream). The usual
//! set-up, one device used from one thread, is unaffected. Calls under CUDA graph capture are
//! refused with an error (see `refuse_graph_capture`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    LaunchConfig, PinnedHostSlice, PushKernelArg, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice, DeviceId, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaStorage, DType, Layout, Result, Storage, StorageRef, Tensor};
use half::{bf16, f16};

use crate::backend::{nonfinite_error, ClipSettings};
use crate::gradients::{GradientSet, StorageGroups};
use crate::layout_runs::union_of_runs;
use crate::NormType;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/grad_clip.ptx"));
/// Module name in candle's per-device cache of custom modules.
const MODULE: &str = "candle_grad_clip";

/// Elements per chunk (`CHUNK_ELEMS` in the kernel). Fixes the summation order: never make it
/// depend on the launch.
const CHUNK: u64 = 4096;
const BLOCK: u32 = 256;
const WARPS_PER_BLOCK: u64 = (BLOCK / 32) as u64;
/// Words of the kernel's `Scratch` struct: 68 digits, flags, max, counter, pending, scale,
/// coefficient.
const STATE_WORDS: usize = 74;
/// Words per table entry (the kernel's `Segment`).
const SEGMENT_WORDS: usize = 4;
/// The strided kernel takes at most this many (coalesced) dimensions.
const MAX_RANK: usize = 8;
/// Pinned staging buffers per thread and device before a call waits for the oldest copy.
const MAX_STAGING: usize = 16;
/// Staging buffers allocated with the scratch.
const INITIAL_STAGING: usize = 4;

// Gradient dtype codes.
const DT_F32: u64 = 0;
const DT_F64: u64 = 1;
const DT_F16: u64 = 2;
const DT_BF16: u64 = 3;

// `grad_clip_apply` operations and coefficient sources.
const OP_SCALE: u32 = 0;
const OP_CLAMP: u32 = 1;
const COEF_SCRATCH: u32 = 0;

fn elem_size(dtype: u64) -> u64 {
    match dtype {
        DT_F64 => 8,
        DT_F32 => 4,
        _ => 2,
    }
}

// ---------------------------------------------------------------------------------------------
// Public operations (called from `backend/mod.rs`).

/// The global norm as a 0-d tensor on the device; nothing is read back.
pub(crate) fn total_norm(
    dev: &CudaDevice,
    set: &GradientSet,
    norm_type: NormType,
) -> Result<Tensor> {
    let plan = NormPlan::new(norm_type, set);
    let copies = contiguous_copies(set)?;
    let locked = Locked::lock(set.grads(), &copies, None);
    with_scratch(dev, |scratch| {
        let stream = dev.cuda_stream();
        let bases = locked.bases(&stream)?;
        let mut table = Table::default();
        table.push_norm_inputs(set.grads(), &copies, &locked, &bases);
        let mut out = NormOut::alloc(dev, set.norm_dtype())?;
        let enqueued = scratch.upload(dev, &stream, &table)?;
        enqueued.reduce(dev, scratch, &stream, &plan, &mut out, f64::INFINITY, 0.0)?;
        drop(bases);
        Ok(out.into_tensor(dev))
    })
}

/// Reduce, then scale in place by the coefficient the reduction left on the device.
pub(crate) fn clip_norm(
    dev: &CudaDevice,
    set: &GradientSet,
    settings: ClipSettings,
) -> Result<Tensor> {
    let plan = NormPlan::new(settings.norm_type, set);
    // Validation first (it fails on gradients that cannot be written), before anything is enqueued.
    let groups = set.storage_groups()?;
    let copies = contiguous_copies(set)?;
    let locked = Locked::lock(set.grads(), &copies, None);
    with_scratch(dev, |scratch| {
        let stream = dev.cuda_stream();
        let bases = locked.bases(&stream)?;
        let mut table = Table::default();
        table.push_norm_inputs(set.grads(), &copies, &locked, &bases);
        let strided = table.push_write_targets(set.grads(), &groups, &locked, &bases);
        let mut out = NormOut::alloc(dev, set.norm_dtype())?;
        let enqueued = scratch.upload(dev, &stream, &table)?;
        enqueued.reduce(
            dev,
            scratch,
            &stream,
            &plan,
            &mut out,
            settings.max_norm,
            settings.eps,
        )?;
        if settings.error_if_nonfinite {
            // The one documented host synchronisation: the norm must be known before any write.
            let norm = out.read(&stream)?;
            if !norm.is_finite() {
                return Err(nonfinite_error(norm, settings.norm_type));
            }
        }
        let coefficient = Coefficient::Scratch(scratch.state_ptr(&stream));
        enqueued.apply(dev, scratch, &stream, OP_SCALE, coefficient, [0.0; 4])?;
        launch_strided(dev, &stream, &strided, OP_SCALE, coefficient, [0.0; 4])?;
        drop(bases);
        Ok(out.into_tensor(dev))
    })
}

/// Scale in place by `min(1, max_norm / (total_norm + eps))`, computed by the scale kernel from the
/// 0-d `total_norm` on the device.
pub(crate) fn scale_with_norm(
    dev: &CudaDevice,
    set: &GradientSet,
    max_norm: f64,
    eps: f64,
    total_norm: &Tensor,
) -> Result<()> {
    let groups = set.storage_groups()?;
    let norm = match total_norm.dtype() {
        DType::F32 | DType::F64 | DType::F16 | DType::BF16 => total_norm.clone(),
        // Other float dtypes (F8…): converted on the device by candle.
        _ => total_norm.to_dtype(DType::F32)?,
    };
    if !matches!(norm.device(), candle_core::Device::Cuda(_)) {
        bail!("clip_grads_with_norm_: total_norm must be on the gradients' CUDA device")
    }
    let locked = Locked::lock(set.grads(), &[], Some(&norm));
    with_scratch(dev, |scratch| {
        let stream = dev.cuda_stream();
        let bases = locked.bases(&stream)?;
        let mut table = Table::default();
        let strided = table.push_write_targets(set.grads(), &groups, &locked, &bases);
        let (norm_base, norm_dtype) = locked.base_of(&bases, locked.extra_index());
        let norm_ptr = norm_base + norm.layout().start_offset() as u64 * elem_size(norm_dtype);
        let coefficient = Coefficient::Norm {
            ptr: norm_ptr,
            kind: 1 + match norm_dtype {
                DT_F32 => 0,
                DT_F64 => 1,
                DT_F16 => 2,
                _ => 3,
            },
            max_norm,
            eps,
        };
        let enqueued = scratch.upload(dev, &stream, &table)?;
        enqueued.apply(dev, scratch, &stream, OP_SCALE, coefficient, [0.0; 4])?;
        launch_strided(dev, &stream, &strided, OP_SCALE, coefficient, [0.0; 4])?;
        drop(bases);
        Ok(())
    })
}

/// Clamp every element into `[-clip_value, clip_value]` in place (bound rounded towards zero in
/// each gradient's dtype; NaN stays NaN), one launch.
pub(crate) fn clamp(dev: &CudaDevice, set: &GradientSet, clip_value: f64) -> Result<()> {
    let groups = set.storage_groups()?;
    let locked = Locked::lock(set.grads(), &[], None);
    let bounds = clamp_bounds(clip_value);
    with_scratch(dev, |scratch| {
        let stream = dev.cuda_stream();
        let bases = locked.bases(&stream)?;
        let mut table = Table::default();
        let strided = table.push_write_targets(set.grads(), &groups, &locked, &bases);
        let enqueued = scratch.upload(dev, &stream, &table)?;
        enqueued.apply(dev, scratch, &stream, OP_CLAMP, Coefficient::None, bounds)?;
        launch_strided(dev, &stream, &strided, OP_CLAMP, Coefficient::None, bounds)?;
        drop(bases);
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Norm plan: which kernel, which power, whether the overflow rescue may be needed.

struct NormPlan {
    kernel: &'static str,
    p: f64,
    /// Mirrors `cpu::norm`: sums of powers of F64 gradients, or powers above 6, may overflow or
    /// underflow `f64`; then a second pass divides every element by `max|g|`.
    rescue: bool,
}

impl NormPlan {
    fn new(norm_type: NormType, set: &GradientSet) -> Self {
        let (kernel, p) = match norm_type.canonical() {
            NormType::Inf => {
                return Self {
                    kernel: "grad_clip_reduce_inf",
                    p: f64::INFINITY,
                    rescue: false,
                }
            }
            NormType::L1 => ("grad_clip_reduce_abs", 1.0),
            NormType::L2 => ("grad_clip_reduce_sq", 2.0),
            NormType::P(p) => ("grad_clip_reduce_pow", p),
        };
        Self {
            kernel,
            p,
            rescue: set.powers_may_leave_f64_range(p),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Locking the storages and taking their device pointers.

/// Read guards on every distinct storage that a call reads or writes: the gradients, the
/// contiguous copies made for the norm, and an extra tensor (the norm of `clip_grads_with_norm_`).
/// Each storage is locked once even when several tensors share it (parking_lot read locks are not
/// re-entrant when a writer waits).
struct Locked<'t> {
    guards: Vec<StorageRef<'t>>,
    /// Index into `guards` for each tensor: gradients, then copies, then the extra tensor.
    guard_of: Vec<usize>,
}

impl<'t> Locked<'t> {
    fn lock(grads: &'t [Tensor], copies: &'t [Option<Tensor>], extra: Option<&'t Tensor>) -> Self {
        let tensors: Vec<&'t Tensor> = grads
            .iter()
            .chain(copies.iter().flatten())
            .chain(extra)
            .collect();
        // Keys first, one lock at a time, then one guard per distinct key.
        let keys: Vec<usize> = tensors.iter().map(|t| storage_key(t)).collect();
        let mut index_of_key: HashMap<usize, usize> = HashMap::with_capacity(keys.len());
        let mut guards = Vec::new();
        let mut guard_of = Vec::with_capacity(keys.len());
        for (t, key) in tensors.iter().zip(keys) {
            let next = guards.len();
            let g = *index_of_key.entry(key).or_insert(next);
            if g == next {
                guards.push(t.storage_and_layout().0);
            }
            guard_of.push(g);
        }
        Self { guards, guard_of }
    }

    /// Device pointer and dtype code of every locked storage. The returned [`SyncOnDrop`]s must
    /// live until every launch that uses the pointers is enqueued (they record cudarc's read
    /// events, when event tracking is on, after those launches).
    fn bases<'a>(&'a self, stream: &'a CudaStream) -> Result<Vec<(u64, u64, SyncOnDrop<'a>)>> {
        self.guards
            .iter()
            .map(|g| match &**g {
                Storage::Cuda(cs) => base_ptr(cs, stream),
                other => bail!(
                    "gradient clipping on CUDA got a tensor on {:?}",
                    other.device().location()
                ),
            })
            .collect()
    }

    fn base_of(&self, bases: &[(u64, u64, SyncOnDrop<'_>)], tensor: usize) -> (u64, u64) {
        let (ptr, dtype, _) = &bases[self.guard_of[tensor]];
        (*ptr, *dtype)
    }

    /// Tensor index of the extra tensor passed to [`lock`](Self::lock).
    fn extra_index(&self) -> usize {
        self.guard_of.len() - 1
    }
}

fn base_ptr<'a>(cs: &'a CudaStorage, stream: &'a CudaStream) -> Result<(u64, u64, SyncOnDrop<'a>)> {
    Ok(match &cs.slice {
        CudaStorageSlice::F32(s) => {
            let (p, sync) = s.device_ptr(stream);
            (p, DT_F32, sync)
        }
        CudaStorageSlice::F64(s) => {
            let (p, sync) = s.device_ptr(stream);
            (p, DT_F64, sync)
        }
        CudaStorageSlice::F16(s) => {
            let (p, sync) = s.device_ptr(stream);
            (p, DT_F16, sync)
        }
        CudaStorageSlice::BF16(s) => {
            let (p, sync) = s.device_ptr(stream);
            (p, DT_BF16, sync)
        }
        _ => bail!("gradient clipping on CUDA needs F32, F64, F16 or BF16 storage"),
    })
}

/// Identity of a tensor's buffer (as in `gradients.rs`); the read guard is released at once.
fn storage_key(tensor: &Tensor) -> usize {
    let (storage, _) = tensor.storage_and_layout();
    std::ptr::from_ref::<Storage>(&storage) as usize
}

/// A contiguous copy of every non-contiguous, non-empty gradient (the slow path of the norm), made
/// by candle on the same stream before anything is locked.
fn contiguous_copies(set: &GradientSet) -> Result<Vec<Option<Tensor>>> {
    set.grads()
        .iter()
        .map(|g| {
            if g.layout().contiguous_offsets().is_some() || g.elem_count() == 0 {
                Ok(None)
            } else {
                g.contiguous().map(Some)
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The segment table.

#[derive(Default)]
struct Table {
    words: Vec<u64>,
    norm: Part,
    write: Part,
}

/// One part of the table: a run of segments whose chunk indices start at 0.
#[derive(Default, Clone, Copy)]
struct Part {
    first_segment: usize,
    segments: u32,
    chunks: u64,
}

impl Table {
    fn push(&mut self, part: Part, ptr: u64, len: u64, dtype: u64) -> Part {
        if len == 0 {
            return part;
        }
        self.words
            .extend_from_slice(&[ptr, len, part.chunks, dtype]);
        Part {
            first_segment: part.first_segment,
            segments: part.segments + 1,
            chunks: part.chunks + len.div_ceil(CHUNK),
        }
    }

    /// The norm's inputs: every gradient view (aliases count as often as they are listed), through
    /// its contiguous copy when it is not contiguous.
    fn push_norm_inputs(
        &mut self,
        grads: &[Tensor],
        copies: &[Option<Tensor>],
        locked: &Locked<'_>,
        bases: &[(u64, u64, SyncOnDrop<'_>)],
    ) {
        let mut part = Part {
            first_segment: self.words.len() / SEGMENT_WORDS,
            ..Part::default()
        };
        let mut copy_index = grads.len();
        for (i, (grad, copy)) in grads.iter().zip(copies).enumerate() {
            let (tensor, index) = match copy {
                Some(c) => {
                    copy_index += 1;
                    (c, copy_index - 1)
                }
                None => (grad, i),
            };
            if let Some((start, end)) = tensor.layout().contiguous_offsets() {
                let (base, dtype) = locked.base_of(bases, index);
                let ptr = base + start as u64 * elem_size(dtype);
                part = self.push(part, ptr, (end - start) as u64, dtype);
            }
        }
        self.norm = part;
    }

    /// The elements every gradient's storage group must have written, exactly once each:
    /// a single contiguous view becomes one segment; a single strided view is returned for the
    /// strided kernel (or, above [`MAX_RANK`] dimensions, becomes its runs); views that share a
    /// storage become the union of their runs, merged into disjoint segments.
    fn push_write_targets(
        &mut self,
        grads: &[Tensor],
        groups: &StorageGroups,
        locked: &Locked<'_>,
        bases: &[(u64, u64, SyncOnDrop<'_>)],
    ) -> Vec<StridedTarget> {
        let mut part = Part {
            first_segment: self.words.len() / SEGMENT_WORDS,
            ..Part::default()
        };
        let mut strided = Vec::new();
        for group in groups.iter() {
            let (base, dtype) = locked.base_of(bases, group[0]);
            let size = elem_size(dtype);
            if let [i] = group {
                let layout = grads[*i].layout();
                if layout.shape().elem_count() == 0 {
                    continue;
                }
                if let Some((start, end)) = layout.contiguous_offsets() {
                    part = self.push(
                        part,
                        base + start as u64 * size,
                        (end - start) as u64,
                        dtype,
                    );
                    continue;
                }
                // `storage_groups` guarantees a lone view does not repeat elements.
                if let Some(target) = StridedTarget::new(layout, base, dtype) {
                    strided.push(target);
                    continue;
                }
            }
            for (s, e) in union_of_runs(group.iter().map(|&i| grads[i].layout())) {
                part = self.push(part, base + s as u64 * size, (e - s) as u64, dtype);
            }
        }
        self.write = part;
        // The common case (every gradient contiguous, none aliasing): the write segments are the
        // norm segments. Send them once.
        let norm_words = self.norm.first_segment * SEGMENT_WORDS
            ..(self.norm.first_segment + self.norm.segments as usize) * SEGMENT_WORDS;
        let write_start = self.write.first_segment * SEGMENT_WORDS;
        if self.norm.segments > 0
            && self.norm.segments == self.write.segments
            && self.words[norm_words.clone()] == self.words[write_start..]
        {
            self.words.truncate(write_start);
            self.write = self.norm;
        }
        strided
    }
}

/// One non-contiguous view without repeated elements, for `grad_clip_apply_strided`.
struct StridedTarget {
    ptr: u64,
    dtype: u64,
    elements: u64,
    rank: u32,
    /// Dims then strides (the kernel's `StridedView`), coalesced, size-1 dims dropped.
    view: [u64; 2 * MAX_RANK],
}

impl StridedTarget {
    fn new(layout: &Layout, base: u64, dtype: u64) -> Option<Self> {
        let mut dims: Vec<u64> = Vec::new();
        let mut strides: Vec<u64> = Vec::new();
        for (&d, &s) in layout.dims().iter().zip(layout.stride()) {
            if d == 1 {
                continue;
            }
            let (d, s) = (d as u64, s as u64);
            match (dims.last_mut(), strides.last_mut()) {
                // The outer dim steps over exactly the inner one: one dim.
                (Some(ld), Some(ls)) if *ls == s * d => {
                    *ld *= d;
                    *ls = s;
                }
                _ => {
                    dims.push(d);
                    strides.push(s);
                }
            }
        }
        if dims.len() > MAX_RANK {
            return None;
        }
        let mut view = [0u64; 2 * MAX_RANK];
        view[..dims.len()].copy_from_slice(&dims);
        view[MAX_RANK..MAX_RANK + strides.len()].copy_from_slice(&strides);
        Some(Self {
            ptr: base + layout.start_offset() as u64 * elem_size(dtype),
            dtype,
            elements: layout.shape().elem_count() as u64,
            rank: dims.len() as u32,
            view,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Coefficient sources and clamp bounds.

#[derive(Clone, Copy)]
enum Coefficient {
    /// Clamping: no coefficient.
    None,
    /// `Scratch::coefficient`, written by the reduction (the pointer is the scratch's).
    Scratch(u64),
    /// Computed by the kernel from a 0-d norm (`kind`: 1 F32, 2 F64, 3 F16, 4 BF16).
    Norm {
        ptr: u64,
        kind: u32,
        max_norm: f64,
        eps: f64,
    },
}

impl Coefficient {
    fn args(self) -> (u64, u32, f64, f64) {
        match self {
            Coefficient::None => (0, COEF_SCRATCH, 0.0, 0.0),
            Coefficient::Scratch(ptr) => (ptr, COEF_SCRATCH, 0.0, 0.0),
            Coefficient::Norm {
                ptr,
                kind,
                max_norm,
                eps,
            } => (ptr, kind, max_norm, eps),
        }
    }
}

/// The clamp bound for each dtype code, rounded towards zero in that dtype (as
/// `cpu::round_toward_zero`), as exact `f64` values.
fn clamp_bounds(v: f64) -> [f64; 4] {
    let f32_bound = {
        let n = v as f32;
        if n as f64 <= v {
            n
        } else {
            f32::from_bits(n.to_bits() - 1)
        }
    };
    let f16_bound = {
        let n = f16::from_f64(v);
        if n.to_f64() <= v {
            n
        } else {
            f16::from_bits(n.to_bits() - 1)
        }
    };
    let bf16_bound = {
        let n = bf16::from_f64(v);
        if n.to_f64() <= v {
            n
        } else {
            bf16::from_bits(n.to_bits() - 1)
        }
    };
    [f32_bound as f64, v, f16_bound.to_f64(), bf16_bound.to_f64()]
}

// ---------------------------------------------------------------------------------------------
// The 0-d norm.

enum NormOut {
    F32(CudaSlice<f32>),
    F64(CudaSlice<f64>),
}

impl NormOut {
    fn alloc(dev: &CudaDevice, dtype: DType) -> Result<Self> {
        // SAFETY: the memory is uninitialised until the finalising block of the reduction writes
        // it; nothing reads it before: the tensor is built only after the launches are enqueued,
        // and every later read is ordered after them on the stream. On a launch error the slice is
        // dropped unread.
        Ok(match dtype {
            DType::F64 => NormOut::F64(unsafe { dev.alloc::<f64>(1) }?),
            _ => NormOut::F32(unsafe { dev.alloc::<f32>(1) }?),
        })
    }

    fn ptr<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, u32, SyncOnDrop<'a>) {
        match self {
            NormOut::F32(s) => {
                let (p, sync) = s.device_ptr_mut(stream);
                (p, 0, sync)
            }
            NormOut::F64(s) => {
                let (p, sync) = s.device_ptr_mut(stream);
                (p, 1, sync)
            }
        }
    }

    /// Reads the norm back: waits for the device.
    fn read(&self, stream: &Arc<CudaStream>) -> Result<f64> {
        let v = match self {
            NormOut::F32(s) => stream.clone_dtoh(s).w()?[0] as f64,
            NormOut::F64(s) => stream.clone_dtoh(s).w()?[0],
        };
        stream.synchronize().w()?;
        Ok(v)
    }

    fn into_tensor(self, dev: &CudaDevice) -> Tensor {
        let storage = match self {
            NormOut::F32(s) => CudaStorage::wrap_cuda_slice(s, dev.clone()),
            NormOut::F64(s) => CudaStorage::wrap_cuda_slice(s, dev.clone()),
        };
        Tensor::from_storage(Storage::Cuda(storage), (), BackpropOp::none(), false)
    }
}

// ---------------------------------------------------------------------------------------------
// Per-thread, per-device scratch.

thread_local! {
    static SCRATCH: RefCell<HashMap<DeviceId, Scratch>> = RefCell::new(HashMap::new());
}

fn with_scratch<R>(dev: &CudaDevice, f: impl FnOnce(&mut Scratch) -> Result<R>) -> Result<R> {
    refuse_graph_capture(dev)?;
    SCRATCH.with(|cell| {
        let mut map = cell.borrow_mut();
        let scratch = match map.entry(dev.id()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(Scratch::new(dev)?),
        };
        f(scratch)
    })
}

/// Under CUDA graph capture the table copy would become a graph node reading a staging buffer
/// that later calls overwrite, so every replay would clip with whatever table came last: refuse,
/// before anything is enqueued. (`cuStreamIsCapturing` does not wait for the device.)
fn refuse_graph_capture(dev: &CudaDevice) -> Result<()> {
    let status = dev.cuda_stream().capture_status().w()?;
    if status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
        bail!(
            "gradient clipping cannot be captured in a CUDA graph (stream capture status {status:?}); call it outside the capture"
        )
    }
    Ok(())
}

struct Scratch {
    /// The kernel's `Scratch` struct: zero between calls.
    state: CudaSlice<u64>,
    /// Device copy of the segment table (grown, never shrunk).
    table: Option<CudaSlice<u64>>,
    staging: Vec<Staging>,
    next_staging: usize,
    sm_count: u32,
    /// Resident blocks per SM, per kernel.
    occupancy: HashMap<&'static str, u32>,
}

/// A pinned host buffer for the table and the event recorded after the copy out of it.
struct Staging {
    host: PinnedHostSlice<u64>,
    copied: CudaEvent,
}

impl Drop for Staging {
    fn drop(&mut self) {
        // The pinned memory is freed after this: the copy out of it must be done.
        let _ = self.copied.synchronize();
    }
}

impl Scratch {
    fn new(dev: &CudaDevice) -> Result<Self> {
        let stream = dev.cuda_stream();
        let sm_count = stream
            .context()
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .w()?
            .max(1) as u32;
        // A few staging buffers up front: allocating pinned memory later may wait for the device.
        let staging = (0..INITIAL_STAGING)
            .map(|_| Staging::new(stream.context(), 0))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            state: dev.alloc_zeros::<u64>(STATE_WORDS)?,
            table: None,
            staging,
            next_staging: 0,
            sm_count,
            occupancy: HashMap::new(),
        })
    }

    fn state_ptr(&self, stream: &CudaStream) -> u64 {
        // Without event tracking the guard does nothing; with it, the scratch only ever lives on
        // this stream, so there is nothing to record.
        let (p, _sync) = self.state.device_ptr(stream);
        p
    }

    /// Grid size for a multi-tensor kernel over `chunks` warp-sized work items.
    fn grid(&mut self, func: &CudaFunction, name: &'static str, chunks: u64) -> u32 {
        let per_sm = *self.occupancy.entry(name).or_insert_with(|| {
            func.occupancy_max_active_blocks_per_multiprocessor(BLOCK, 0, None)
                .unwrap_or(1)
                .max(1)
        });
        let wanted = chunks.div_ceil(WARPS_PER_BLOCK).max(1);
        wanted.min(self.sm_count as u64 * per_sm as u64) as u32
    }

    /// Copies the table to the device without waiting for it: through an idle pinned staging
    /// buffer (an event marks when its last copy is done), asynchronously, on `stream`.
    fn upload(
        &mut self,
        dev: &CudaDevice,
        stream: &Arc<CudaStream>,
        table: &Table,
    ) -> Result<Enqueued> {
        let words = table.words.len();
        let mut enqueued = Enqueued {
            table_ptr: 0,
            norm: table.norm,
            write: table.write,
        };
        if words == 0 {
            return Ok(enqueued);
        }
        let slot = self.staging_slot(stream.context(), words)?;
        let staging = &mut self.staging[slot];
        staging.host.as_mut_slice().w()?[..words].copy_from_slice(&table.words);
        if self.table.as_ref().is_none_or(|t| t.len() < words) {
            // Stream-ordered allocation; the old buffer is freed in stream order after the
            // kernels that used it.
            // SAFETY: uninitialised device memory; the copy below fills the part any kernel reads.
            self.table = Some(unsafe { dev.alloc::<u64>(capacity(words)) }?);
        }
        let table_dev = self.table.as_mut().expect("allocated above");
        {
            let src: &[u64] = &staging.host.as_slice().w()?[..words];
            let mut dst = table_dev.slice_mut(..words);
            // `src` is page-locked: cuMemcpyHtoDAsync returns without waiting for the device. The
            // host buffer is not written again until `copied` (recorded next) has completed.
            stream.memcpy_htod(src, &mut dst).w()?;
        }
        staging.copied.record(stream).w()?;
        let (ptr, _sync) = table_dev.device_ptr(stream);
        enqueued.table_ptr = ptr;
        Ok(enqueued)
    }

    fn staging_slot(&mut self, ctx: &Arc<CudaContext>, words: usize) -> Result<usize> {
        let n = self.staging.len();
        let mut idle_too_small = None;
        for i in 0..n {
            let k = (self.next_staging + i) % n;
            if self.staging[k].copied.try_is_complete().w()? {
                if self.staging[k].host.len() >= words {
                    self.next_staging = k + 1;
                    return Ok(k);
                }
                idle_too_small.get_or_insert(k);
            }
        }
        let k = match idle_too_small {
            Some(k) => k,
            None if n < MAX_STAGING => {
                self.staging.push(Staging::new(ctx, words)?);
                self.next_staging = n + 1;
                return Ok(n);
            }
            None => {
                // Every buffer is still being copied from: the host is MAX_STAGING calls ahead
                // of the device. Wait for the oldest.
                let k = self.next_staging % n;
                self.staging[k].copied.synchronize().w()?;
                if self.staging[k].host.len() >= words {
                    self.next_staging = k + 1;
                    return Ok(k);
                }
                k
            }
        };
        self.staging[k] = Staging::new(ctx, words)?;
        self.next_staging = k + 1;
        Ok(k)
    }
}

impl Staging {
    fn new(ctx: &Arc<CudaContext>, words: usize) -> Result<Self> {
        // SAFETY: uninitialised pinned host memory of `u64`s (any bit pattern is valid); only the
        // prefix written by `upload` is ever copied.
        let host = unsafe { ctx.alloc_pinned::<u64>(capacity(words)) }.w()?;
        let copied = ctx.new_event(None).w()?;
        Ok(Self { host, copied })
    }
}

fn capacity(words: usize) -> usize {
    words.next_power_of_two().max(1024)
}

/// A table on the device, ready for the kernels.
struct Enqueued {
    table_ptr: u64,
    norm: Part,
    write: Part,
}

impl Enqueued {
    fn part_ptr(&self, part: Part) -> u64 {
        self.table_ptr + (part.first_segment * SEGMENT_WORDS * 8) as u64
    }

    /// The norm: one launch, plus the rescue launch when the plan may need it. Writes the norm to
    /// `out` and the coefficient to the scratch, on the device.
    #[allow(clippy::too_many_arguments)]
    fn reduce(
        &self,
        dev: &CudaDevice,
        scratch: &mut Scratch,
        stream: &CudaStream,
        plan: &NormPlan,
        out: &mut NormOut,
        max_norm: f64,
        eps: f64,
    ) -> Result<()> {
        let segs = self.part_ptr(self.norm);
        let n_segs = self.norm.segments;
        let n_chunks = self.norm.chunks;
        let state = scratch.state_ptr(stream);
        let (out_ptr, out_f64, out_sync) = out.ptr(stream);
        let passes: &[(&'static str, u32)] = if plan.rescue {
            &[(plan.kernel, 0), ("grad_clip_reduce_pow", 1)]
        } else {
            &[(plan.kernel, 0)]
        };
        let rescue = plan.rescue as u32;
        for &(name, pass) in passes {
            let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
            let grid = scratch.grid(&func, name, n_chunks);
            let mut b = func.builder();
            b.arg(&segs)
                .arg(&n_segs)
                .arg(&n_chunks)
                .arg(&state)
                .arg(&out_ptr)
                .arg(&out_f64)
                .arg(&plan.p)
                .arg(&pass)
                .arg(&rescue)
                .arg(&max_norm)
                .arg(&eps);
            // SAFETY: the arguments match `REDUCE_ENTRY` in grad_clip.cu one for one (pointers as
            // u64, u32, u64, u64, u64, u32, f64, u32, u32, f64, f64). `segs` points at the
            // `n_segs` segments just copied (stream-ordered) into the scratch table, whose chunk
            // prefix ends at `n_chunks`; each segment lies inside a storage that is read-locked
            // (so it cannot be freed or replaced) until after this call returns, and whose tensors
            // (gradients and copies) are owned by the caller beyond that; the device frees
            // memory in stream order (cuMemFreeAsync), after this kernel. `state` is this
            // thread's scratch for this device, zero on entry (reset by the previous finaliser),
            // used only by work on this thread's stream. `out` is our own 1-element buffer.
            // The kernel only reads the gradients.
            unsafe { b.launch(launch_config(grid)) }.w()?;
        }
        drop(out_sync);
        Ok(())
    }

    /// `grad_clip_apply` over the write part of the table (nothing to do: no launch).
    fn apply(
        &self,
        dev: &CudaDevice,
        scratch: &mut Scratch,
        _stream: &CudaStream,
        op: u32,
        coefficient: Coefficient,
        bounds: [f64; 4],
    ) -> Result<()> {
        if self.write.segments == 0 {
            return Ok(());
        }
        let name = "grad_clip_apply";
        let segs = self.part_ptr(self.write);
        let n_segs = self.write.segments;
        let n_chunks = self.write.chunks;
        let (coef_ptr, coef_kind, max_norm, eps) = coefficient.args();
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let grid = scratch.grid(&func, name, n_chunks);
        let mut b = func.builder();
        b.arg(&segs)
            .arg(&n_segs)
            .arg(&n_chunks)
            .arg(&op)
            .arg(&coef_ptr)
            .arg(&coef_kind)
            .arg(&max_norm)
            .arg(&eps)
            .arg(&bounds);
        // SAFETY: arguments match `grad_clip_apply` (u64, u32, u64, u32, u64, u32, f64, f64,
        // Bounds = 4 f64). The write segments are disjoint ranges (merged per storage on the
        // host), each inside a storage that is read-locked until after the launch is enqueued,
        // of a gradient the caller owns; the kernel writes each element once. Writing through a
        // pointer taken under a read guard is sound here: no Rust reference to the device memory
        // exists (the guard protects the host-side `CudaStorage`, which is not modified), and the
        // device work is ordered on this thread's stream after every earlier candle operation of
        // this thread on these tensors (the read guards keep candle from swapping the storage
        // meanwhile). Work on other streams is ordered only by the caller: see "Limitation" in
        // the module documentation. The public API takes `&mut GradStore`: the
        // caller has handed us the right to modify these gradients, as candle's own in-place
        // ops would. The coefficient pointer is the scratch (written by the reduction earlier on
        // this stream) or the caller's 0-d norm, locked likewise.
        unsafe { b.launch(launch_config(grid)) }.w()?;
        Ok(())
    }
}

/// `grad_clip_apply_strided`, one launch per non-contiguous gradient (slow path).
fn launch_strided(
    dev: &CudaDevice,
    _stream: &CudaStream,
    targets: &[StridedTarget],
    op: u32,
    coefficient: Coefficient,
    bounds: [f64; 4],
) -> Result<()> {
    let (coef_ptr, coef_kind, max_norm, eps) = coefficient.args();
    for t in targets {
        let func = dev.get_or_load_custom_func("grad_clip_apply_strided", MODULE, PTX)?;
        let dtype = t.dtype as u32;
        let blocks = t.elements.div_ceil(BLOCK as u64).clamp(1, 65_535) as u32;
        let mut b = func.builder();
        b.arg(&t.ptr)
            .arg(&dtype)
            .arg(&t.elements)
            .arg(&t.rank)
            .arg(&t.view)
            .arg(&op)
            .arg(&coef_ptr)
            .arg(&coef_kind)
            .arg(&max_norm)
            .arg(&eps)
            .arg(&bounds);
        // SAFETY: arguments match `grad_clip_apply_strided` (u64, u32, u64, u32, StridedView =
        // 16 u64, u32, u64, u32, f64, f64, Bounds). The view (start, coalesced dims and strides)
        // addresses only elements of its storage (candle checked the layout against the storage
        // when the view was made) and repeats none (`storage_groups` rejected views that do), so
        // each element is written by one thread. Locking, lifetimes and stream ordering as for
        // `grad_clip_apply`.
        unsafe { b.launch(launch_config(blocks)) }.w()?;
    }
    Ok(())
}

fn launch_config(grid: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}
