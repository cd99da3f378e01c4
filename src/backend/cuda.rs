//! The CUDA back end (feature `cuda`): the kernels of `kernels/grad_clip.cu` on a GPU, through
//! cudarc. What each operation launches is decided in [`kernels`](super::kernels) (shared with
//! the host emulation); this file supplies the device: storage pointers, the per-thread scratch,
//! pinned staging for the table, and the launches themselves.
//!
//! # No host synchronisation
//! The norm and the coefficient are written by the device (the 0-d norm tensor, and the
//! coefficient in a scratch buffer that the scale kernel reads). The only host wait is the read of
//! the norm that `error_if_nonfinite(true)` needs (and `grad_norms`, which returns host values).
//! The table goes to the device with `cuMemcpyHtoDAsync` from page-locked memory (a ring of pinned
//! staging buffers, each reused only once the event recorded after its copy has completed), which
//! does not wait for the device. Pinned allocations (and frees) may wait for the device; they
//! happen only when a thread first uses a device, when a table outgrows the staging buffers, or
//! when more than 4 calls of one thread have copies still queued on the device (the ring grows to
//! 16 buffers; beyond that a call waits for the oldest copy). CUDA graph capture of these calls is
//! refused (the table copy reads host memory that later calls reuse), before any work is enqueued.
//!
//! # Scratch and streams
//! candle's `Device::new_cuda` uses the per-thread default stream: work from one host thread is
//! ordered, work from two threads is not. The scratch (superaccumulator state, coefficient, device
//! table, pinned staging) is therefore thread-local, per device, for the [`SCRATCH_DEVICES`]
//! devices a thread used last: everything a call enqueues on it is ordered on the calling
//! thread's stream, after the previous call of the same thread. With `Device::new_cuda_with_stream`
//! the stream is shared, which orders even more. The superaccumulator is reset to zero by the block
//! that consumes it, so no memset is needed.
//!
//! Limitation: the kernels write the gradients through pointers taken under candle's read locks,
//! so when cudarc tracks events across streams (once a context has more than one stream), it
//! records our writes as reads. Work that reads the gradients on *another* stream (another host
//! thread's per-thread stream, or a `new_cuda_with_stream` device) is then not ordered after the
//! clip by cudarc: order it yourself (`device.synchronize()`, or use one stream). The usual
//! set-up, one device used from one thread, is unaffected.
//!
//! # The PTX
//! `build.rs` compiles the kernels to PTX for the build's `CUDA_COMPUTE_CAP`; the driver
//! JIT-compiles it when a device first loads it. For experiments on a GPU machine without a Rust
//! toolchain, `CANDLE_GRAD_CLIP_PTX=/path/to/grad_clip.ptx` loads another build of the same source
//! instead (e.g. `nvcc --ptx -DGRAD_CLIP_UNROLL=8 …`); it must define the same kernels with the
//! same parameters.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    LaunchConfig, PinnedHostSlice, PushKernelArg, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice, DeviceId, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaStorage, DType, Result, Storage, StorageRef, Tensor};

use super::kernels::abi::{BLOCK, DT_BF16, DT_F16, DT_F32, DT_F64, DT_I64, STATE_WORDS};
use super::kernels::launch::{Arg, Grid, Kernel, Launch};
use super::kernels::recently_used::RecentlyUsed;
use super::kernels::table::Base;
use super::kernels::{Buffer, KernelDevice, Session};
use crate::ops::gradients::storage_key;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/grad_clip.ptx"));
/// Module name in candle's per-device cache of custom modules.
const MODULE: &str = "candle_grad_clip";
/// Devices per thread whose scratch is kept (least recently used evicted).
const SCRATCH_DEVICES: usize = 4;
/// Pinned staging buffers per thread and device before a call waits for the oldest copy.
const MAX_STAGING: usize = 16;
/// Staging buffers allocated with the scratch.
const INITIAL_STAGING: usize = 4;

/// The PTX to load: the embedded build, or `CANDLE_GRAD_CLIP_PTX` (read once per process).
fn ptx() -> Result<&'static str> {
    static OVERRIDE: OnceLock<std::result::Result<Option<String>, String>> = OnceLock::new();
    let loaded = OVERRIDE.get_or_init(|| match std::env::var_os("CANDLE_GRAD_CLIP_PTX") {
        None => Ok(None),
        Some(path) => std::fs::read_to_string(&path)
            .map(Some)
            .map_err(|e| format!("CANDLE_GRAD_CLIP_PTX={path:?}: {e}")),
    });
    match loaded {
        Ok(Some(ptx)) => Ok(ptx),
        Ok(None) => Ok(PTX),
        Err(e) => bail!("{e}"),
    }
}

/// A CUDA device as a [`KernelDevice`].
pub(crate) struct Cuda<'d>(pub(crate) &'d CudaDevice);

impl KernelDevice for Cuda<'_> {
    /// Under CUDA graph capture the table copy would become a graph node reading a staging buffer
    /// that later calls overwrite, so every replay would clip with whatever table came last: refuse,
    /// before anything (even a `.contiguous()` copy) is enqueued. (`cuStreamIsCapturing` does not
    /// wait for the device.)
    fn check_ready(&self) -> Result<()> {
        let status = self.0.cuda_stream().capture_status().w()?;
        if status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            bail!(
                "gradient clipping cannot be captured in a CUDA graph (stream capture status {status:?}); call it outside the capture"
            )
        }
        Ok(())
    }

    fn with_session<R>(
        &self,
        tensors: &[&Tensor],
        _writable: std::ops::Range<usize>,
        f: impl FnOnce(&mut dyn Session, &[Base]) -> Result<R>,
    ) -> Result<R> {
        let dev = self.0;
        let locked = Locked::lock(tensors);
        let stream = dev.cuda_stream();
        // cudarc's `SyncOnDrop`s live until every launch is enqueued: with event tracking on they
        // record their (read) events after our kernels.
        let storage_bases = locked.bases(&stream)?;
        let bases: Vec<Base> = locked
            .guard_of
            .iter()
            .map(|&g| storage_bases[g].0)
            .collect();
        let result = SCRATCH.with(|cell| {
            let mut cache = cell.borrow_mut();
            let scratch = cache.get_or_try_insert(dev.id(), || Scratch::new(dev))?;
            let mut session = CudaSession {
                dev,
                stream: stream.clone(),
                scratch,
                buffers: Vec::new(),
            };
            f(&mut session, &bases)
        });
        // The storages stay read-locked (they cannot be freed or swapped) until every launch that
        // uses their pointers is enqueued.
        drop(storage_bases);
        drop(locked);
        result
    }
}

thread_local! {
    static SCRATCH: RefCell<RecentlyUsed<DeviceId, Scratch>> =
        const { RefCell::new(RecentlyUsed::new(SCRATCH_DEVICES)) };
}

struct CudaSession<'a> {
    dev: &'a CudaDevice,
    stream: Arc<CudaStream>,
    scratch: &'a mut Scratch,
    buffers: Vec<Option<DeviceBuffer>>,
}

enum DeviceBuffer {
    F32(CudaSlice<f32>),
    F64(CudaSlice<f64>),
}

impl CudaSession<'_> {
    /// With cudarc's event tracking on, records the buffer's write event now, after the kernels
    /// that wrote it (the pointer given to them was taken without keeping its guard).
    fn record_writes(&mut self, buffer: Buffer) {
        match self.buffers.get_mut(buffer.id).and_then(Option::as_mut) {
            Some(DeviceBuffer::F32(s)) => drop(s.device_ptr_mut(&self.stream)),
            Some(DeviceBuffer::F64(s)) => drop(s.device_ptr_mut(&self.stream)),
            None => {}
        }
    }

    fn take(&mut self, buffer: Buffer) -> Result<DeviceBuffer> {
        match self.buffers.get_mut(buffer.id).and_then(Option::take) {
            Some(b) => Ok(b),
            None => bail!(
                "internal error: device buffer {} used after it was consumed",
                buffer.id
            ),
        }
    }
}

impl Session for CudaSession<'_> {
    fn upload(&mut self, words: &[u64]) -> Result<u64> {
        self.scratch.upload(self.dev, &self.stream, words)
    }

    fn scratch(&self) -> u64 {
        // Without event tracking the guard does nothing; with it, the scratch only ever lives on
        // this stream, so there is nothing to record.
        let (p, _sync) = self.scratch.state.device_ptr(&self.stream);
        p
    }

    fn alloc(&mut self, dtype: DType, len: usize) -> Result<Buffer> {
        // SAFETY: the memory is uninitialised until a kernel writes it; every read of it (a later
        // kernel, `read`, or the tensor made by `take_tensor`) is ordered after those kernels on
        // this stream, and the operations only read what the kernels they launched wrote.
        let (buffer, ptr) = match dtype {
            DType::F64 => {
                let mut s = unsafe { self.dev.alloc::<f64>(len) }?;
                let p = s.device_ptr_mut(&self.stream).0;
                (DeviceBuffer::F64(s), p)
            }
            _ => {
                let mut s = unsafe { self.dev.alloc::<f32>(len) }?;
                let p = s.device_ptr_mut(&self.stream).0;
                (DeviceBuffer::F32(s), p)
            }
        };
        self.buffers.push(Some(buffer));
        Ok(Buffer {
            ptr,
            id: self.buffers.len() - 1,
        })
    }

    unsafe fn launch(&mut self, launch: &Launch) -> Result<()> {
        let func = self
            .dev
            .get_or_load_custom_func(launch.kernel.name(), MODULE, ptx()?)?;
        let grid = match launch.grid {
            Grid::Warps(_) => self.scratch.capped_grid(&func, launch.kernel, launch.grid),
            Grid::Threads(_) => launch.grid.wanted(),
        };
        let mut b = func.builder();
        for arg in &launch.args {
            match arg {
                Arg::Ptr(v) | Arg::U64(v) => b.arg(v),
                Arg::U32(v) => b.arg(v),
                Arg::F64(v) => b.arg(v),
                Arg::F64x4(v) => b.arg(v),
                Arg::U64x16(v) => b.arg(v),
                Arg::F64x8(v) => b.arg(v),
            };
        }
        let config = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: by the contract of `Session::launch`, the arguments are those of
        // `kernels::launch` for this session: one `Arg` per kernel parameter in
        // the kernel's own type (the host emulation refuses any launch whose argument list differs
        // from the compiled kernel's parameter list, and its tests build every launch the
        // operations make). Every pointer in them is either
        // - inside a storage read-locked by `with_session` (so neither freed nor swapped) until
        //   the launch is enqueued, of a tensor the caller owns beyond the call; the device frees
        //   memory in stream order (cuMemFreeAsync), after this kernel. The table segments stay
        //   inside their storages (built from candle's layouts, which candle checked against the
        //   storage when the views were made); the write segments are disjoint ranges (merged per
        //   storage), and a strided view repeats no element (`storage_groups` refused those), so
        //   each element is written once. Writing through a pointer taken under a read guard is
        //   sound here: no Rust reference to device memory exists (the guard protects the host-side
        //   `CudaStorage`, which is not modified), and the work is ordered on this thread's stream
        //   after every earlier candle operation of this thread on these tensors. The public API
        //   takes `&mut GradStore`: the caller has handed us the right to modify the gradients, as
        //   candle's own in-place ops would. Other streams: see "Limitation" above;
        // - this thread's scratch for this device (zero on entry, reset by the previous
        //   finaliser; used only by work on this thread's stream), the table just copied to it
        //   (stream-ordered; its chunk prefix ends at the `n_chunks` argument), or a buffer of
        //   this session, sized by the operation for what the kernel writes.
        unsafe { b.launch(config) }.w()?;
        Ok(())
    }

    fn read(&mut self, buffer: Buffer) -> Result<Vec<f64>> {
        self.record_writes(buffer);
        let values = match self.buffers.get(buffer.id).and_then(Option::as_ref) {
            Some(DeviceBuffer::F32(s)) => self
                .stream
                .clone_dtoh(s)
                .w()?
                .into_iter()
                .map(f64::from)
                .collect(),
            Some(DeviceBuffer::F64(s)) => self.stream.clone_dtoh(s).w()?,
            None => bail!("internal error: device buffer {} was consumed", buffer.id),
        };
        self.stream.synchronize().w()?;
        Ok(values)
    }

    fn take_tensor(&mut self, buffer: Buffer, shape: &[usize]) -> Result<Tensor> {
        self.record_writes(buffer);
        let storage = match self.take(buffer)? {
            DeviceBuffer::F32(s) => CudaStorage::wrap_cuda_slice(s, self.dev.clone()),
            DeviceBuffer::F64(s) => CudaStorage::wrap_cuda_slice(s, self.dev.clone()),
        };
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            shape,
            BackpropOp::none(),
            false,
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Locking the storages and taking their device pointers.

/// Read guards on every distinct storage of a call's tensors. Each storage is locked once even
/// when several tensors share it (parking_lot read locks are not re-entrant when a writer waits).
struct Locked<'t> {
    guards: Vec<StorageRef<'t>>,
    /// Index into `guards` for each tensor.
    guard_of: Vec<usize>,
}

impl<'t> Locked<'t> {
    fn lock(tensors: &[&'t Tensor]) -> Self {
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
    /// live until every launch that uses the pointers is enqueued.
    fn bases<'a>(&'a self, stream: &'a CudaStream) -> Result<Vec<(Base, SyncOnDrop<'a>)>> {
        self.guards
            .iter()
            .map(|g| match &**g {
                Storage::Cuda(cs) => base_of(cs, stream),
                other => bail!(
                    "gradient clipping on CUDA got a tensor on {:?}",
                    other.device().location()
                ),
            })
            .collect()
    }
}

fn base_of<'a>(cs: &'a CudaStorage, stream: &'a CudaStream) -> Result<(Base, SyncOnDrop<'a>)> {
    let ((ptr, sync), dtype) = match &cs.slice {
        CudaStorageSlice::F32(s) => (s.device_ptr(stream), DT_F32),
        CudaStorageSlice::F64(s) => (s.device_ptr(stream), DT_F64),
        CudaStorageSlice::F16(s) => (s.device_ptr(stream), DT_F16),
        CudaStorageSlice::BF16(s) => (s.device_ptr(stream), DT_BF16),
        // The fused optimizers' control tensor.
        CudaStorageSlice::I64(s) => (s.device_ptr(stream), DT_I64),
        _ => bail!("gradient clipping on CUDA needs F32, F64, F16 or BF16 storage"),
    };
    Ok((Base { ptr, dtype }, sync))
}

// ---------------------------------------------------------------------------------------------
// Per-thread, per-device scratch.

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

impl Drop for Scratch {
    fn drop(&mut self) {
        // cudarc frees a slice on its stream's handle in whatever context is current; the
        // per-thread default stream resolves against the current context, which may be another
        // device's when a scratch is evicted or its thread ends. Make this device current and
        // let its queued work finish before the fields free `state` and `table`.
        let ctx = self.state.context();
        if ctx.bind_to_thread().is_ok() {
            let _ = self.state.stream().synchronize();
        }
    }
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

    /// Blocks for a multi-tensor kernel: what its work wants, at most what can be resident at once.
    fn capped_grid(&mut self, func: &CudaFunction, kernel: Kernel, grid: Grid) -> u32 {
        let per_sm = *self.occupancy.entry(kernel.name()).or_insert_with(|| {
            func.occupancy_max_active_blocks_per_multiprocessor(BLOCK, 0, None)
                .unwrap_or(1)
                .max(1)
        });
        (grid.wanted() as u64).min(self.sm_count as u64 * per_sm as u64) as u32
    }

    /// Copies the table to the device without waiting for it: through an idle pinned staging
    /// buffer (an event marks when its last copy is done), asynchronously, on `stream`.
    fn upload(&mut self, dev: &CudaDevice, stream: &Arc<CudaStream>, table: &[u64]) -> Result<u64> {
        let words = table.len();
        if words == 0 {
            return Ok(0);
        }
        let slot = self.staging_slot(stream.context(), words)?;
        let staging = &mut self.staging[slot];
        staging.host.as_mut_slice().w()?[..words].copy_from_slice(table);
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
        Ok(ptr)
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
