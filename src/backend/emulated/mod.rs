//! The host emulation of the CUDA back end (feature `emulation`): the kernels of `kernels/*.cu`,
//! compiled unchanged for the CPU (`emulation/`, built by `build.rs`), driven by the same host code
//! as a GPU ([`kernels`](super::kernels)): the same segment tables, launches and arguments.
//!
//! While a [`KernelEmulation`] runs a closure, every operation of this crate on CPU gradients on
//! that thread goes through this device instead of the CPU back end. Each call copies every
//! storage it uses into "device memory" of its own (256-byte aligned, as CUDA allocations; a view
//! at an offset is as misaligned as on a GPU), between guard zones of NaN bytes, runs the kernels on
//! it, checks that no kernel wrote outside its buffers or into a read-only input and that the
//! scratch came back to zero, and copies written storages back into the tensors. The copy keeps the
//! emulation honest: the kernels write through raw pointers into memory no Rust reference points to,
//! as on a GPU.

mod ffi;
#[cfg(test)]
mod selftest;

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{bail, CpuStorage, DType, InplaceOp1, Layout, Result, Storage, Tensor};
use half::{bf16, f16};

use super::kernels::abi::{
    BLOCK, DT_BF16, DT_F16, DT_F32, DT_F64, DT_I64, STATE_WORDS, STATE_ZERO_WORDS,
};
use super::kernels::launch::Launch;
use super::kernels::{Base, Buffer, KernelDevice, Session};
use crate::ops::gradients::{repeats_elements, storage_key};

/// The order in which the blocks of each emulated launch run.
///
/// ```
/// use candle_grad_clip::{BlockOrder, KernelEmulation};
/// let stress = KernelEmulation::new().grid(7).block_order(BlockOrder::Concurrent { threads: 3 });
/// # let _ = stress;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOrder {
    /// Block 0, 1, 2, … one after another on the calling thread.
    InOrder,
    /// The last block first.
    Reversed,
    /// A seeded random order; the threads of each block also resume from every barrier in a
    /// random order.
    Shuffled,
    /// Shuffled, and run by `threads` OS threads at once (blocks really overlap).
    Concurrent {
        /// OS threads running blocks (at least 1).
        threads: u32,
    },
}

/// Runs this crate's CUDA kernels on the CPU, for testing them without a GPU (feature
/// `emulation`, which needs a C++17 compiler).
///
/// Inside [`run`](Self::run), every function of this crate called on that thread with CPU
/// gradients (`clip_grad_norm_`, `total_norm`, `clip_grad_value_`, `clip_grads_with_norm_`,
/// `grad_norms`, `Clipped`, …) takes the CUDA back end's code path: the same segment tables and
/// launch sequences a GPU would get, with the kernels of `kernels/grad_clip.cu` compiled for the
/// host and run block by block, each block's 256 threads as fibers with real `__syncthreads`
/// barriers and warp shuffles. Results are the GPU's, bit for bit, for the L1, L2 and max norms
/// and for every element-wise pass (general `p` uses glibc's `pow`, not CUDA's). It does not model
/// the GPU's memory model or timing: a race that needs two threads of one warp to interleave
/// between barriers goes unseen.
///
/// A kernel that deadlocks at a barrier, makes a warp call some lanes miss or whose mask leaves
/// out live lanes (partial masks are not emulated), is launched with arguments that do not match
/// its parameters, writes outside its buffers or into a read-only input, or leaves the scratch
/// dirty turns the call into an error.
///
/// ```
/// use candle_core::{backprop::GradStore, Device, Tensor, Var};
/// use candle_grad_clip::{clip_grad_norm_, BlockOrder, KernelEmulation};
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::zeros(2, candle_core::DType::F32, &Device::Cpu)?;
/// let mut grads = GradStore::default();
/// grads.insert(&w, Tensor::new(&[3f32, 4.], &Device::Cpu)?);
/// let emulation = KernelEmulation::new().grid(3).block_order(BlockOrder::Reversed);
/// let (norm, log) = emulation.run(|| clip_grad_norm_(&[w.clone()], &mut grads, 1.0))?;
/// assert_eq!(norm.to_scalar::<f32>()?, 5.0);
/// let kernels: Vec<_> = log.launches.iter().map(|l| l.kernel).collect();
/// assert_eq!(kernels, ["grad_clip_reduce_sq", "grad_clip_apply"]);
/// assert_eq!(log.launches[0].grid, 3);
/// let clipped = grads.get(&w).unwrap().to_vec1::<f32>()?;
/// assert!((clipped[0] - 0.6).abs() < 1e-6 && (clipped[1] - 0.8).abs() < 1e-6);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct KernelEmulation {
    grid: Option<u32>,
    order: BlockOrder,
    seed: u64,
}

impl Default for KernelEmulation {
    fn default() -> Self {
        Self::new()
    }
}

/// Blocks per launch unless [`KernelEmulation::grid`] says otherwise: what a launch wants, at
/// most this many (the kernels loop over their work; fewer blocks emulate faster).
const DEFAULT_MAX_GRID: u32 = 8;

impl KernelEmulation {
    /// Launches of at most 8 blocks (each what its work wants, as on a GPU with 8 resident
    /// blocks), in order, seed 0.
    ///
    /// ```
    /// let emulation = candle_grad_clip::KernelEmulation::new();
    /// # let _ = emulation;
    /// ```
    pub fn new() -> Self {
        Self {
            grid: None,
            order: BlockOrder::InOrder,
            seed: 0,
        }
    }

    /// Every launch gets exactly `blocks` blocks (at least 1), however much work it has.
    ///
    /// ```
    /// let one_block = candle_grad_clip::KernelEmulation::new().grid(1);
    /// # let _ = one_block;
    /// ```
    pub fn grid(mut self, blocks: u32) -> Self {
        self.grid = Some(blocks);
        self
    }

    /// The order in which the blocks of each launch run.
    ///
    /// ```
    /// use candle_grad_clip::{BlockOrder, KernelEmulation};
    /// let shuffled = KernelEmulation::new().block_order(BlockOrder::Shuffled).seed(7);
    /// # let _ = shuffled;
    /// ```
    pub fn block_order(mut self, order: BlockOrder) -> Self {
        self.order = order;
        self
    }

    /// The seed of the shuffled orders (each launch of a run uses the next seed).
    ///
    /// ```
    /// let emulation = candle_grad_clip::KernelEmulation::new().seed(42);
    /// # let _ = emulation;
    /// ```
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Runs `f` with the emulated CUDA device standing in for the CPU back end on this thread,
    /// and returns its result with the log of what the kernels were given. Nested runs are an
    /// error.
    ///
    /// ```
    /// use candle_grad_clip::KernelEmulation;
    /// let (answer, log) = KernelEmulation::new().run(|| Ok(42))?;
    /// assert_eq!(answer, 42);
    /// assert!(log.launches.is_empty());
    /// assert!(KernelEmulation::new().grid(0).run(|| Ok(())).is_err());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn run<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<(R, EmulationLog)> {
        if self.grid == Some(0) {
            bail!("KernelEmulation: a grid needs at least one block")
        }
        if let BlockOrder::Concurrent { threads: 0 } = self.order {
            bail!("KernelEmulation: BlockOrder::Concurrent needs at least one thread")
        }
        ACTIVE.with(|a| -> Result<()> {
            let mut a = a.borrow_mut();
            if a.is_some() {
                bail!("KernelEmulation::run: already running on this thread (runs do not nest)")
            }
            *a = Some(Active {
                config: self.clone(),
                log: EmulationLog::default(),
                launches: 0,
            });
            Ok(())
        })?;
        // Clears the state even if `f` panics.
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                ACTIVE.with(|a| a.borrow_mut().take());
            }
        }
        let reset = Reset;
        let result = f();
        let log = ACTIVE.with(|a| a.borrow_mut().take().map(|a| a.log).unwrap_or_default());
        drop(reset);
        Ok((result?, log))
    }
}

/// What the emulated device was given during a [`KernelEmulation::run`].
///
/// ```
/// let log = candle_grad_clip::EmulationLog::default();
/// assert!(log.launches.is_empty() && log.table_uploads.is_empty());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EmulationLog {
    /// Every launch, in order.
    pub launches: Vec<EmulatedLaunch>,
    /// The length in 64-bit words of every segment table copied to the device (4 words a
    /// segment), in order: one per call that needs a table.
    pub table_uploads: Vec<usize>,
}

/// One kernel launch of an emulated run.
///
/// ```
/// let l = candle_grad_clip::EmulatedLaunch { kernel: "grad_clip_apply", grid: 2, block: 256 };
/// assert_eq!(l.block, 256);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmulatedLaunch {
    /// The kernel's name in `kernels/*.cu`.
    pub kernel: &'static str,
    /// Blocks.
    pub grid: u32,
    /// Threads per block.
    pub block: u32,
}

struct Active {
    config: KernelEmulation,
    log: EmulationLog,
    /// Launches so far: each gets its own seed.
    launches: u64,
}

thread_local! {
    static ACTIVE: RefCell<Option<Active>> = const { RefCell::new(None) };
    /// The kernels' `Scratch` of this thread's emulated device: zero between calls.
    static SCRATCH: RefCell<Option<Arena>> = const { RefCell::new(None) };
}

/// Whether a [`KernelEmulation`] is running on this thread.
pub(crate) fn active() -> bool {
    ACTIVE.with(|a| a.borrow().is_some())
}

// ---------------------------------------------------------------------------------------------
// Device memory.

/// Alignment of every allocation, as `cudaMalloc`'s.
const ALIGN: usize = 256;
/// Bytes of guard before every allocation, filled with [`GUARD_BYTE`].
const GUARD: usize = 256;
/// Bytes of guard after the last allocation of an arena: more than a warp's chunk of F64
/// (32 KiB), so that a kernel that overruns a buffer by a whole chunk writes into the guard (and
/// is caught) instead of into the process's heap.
const TAIL_GUARD: usize = 64 << 10;
/// All-ones bytes read as NaN in every float dtype, so that a kernel that reads past a buffer
/// makes the norm NaN; a write there is caught by [`Arena::guards_intact`].
const GUARD_BYTE: u8 = 0xff;

/// Emulated device memory: allocations ("regions") at 256-byte aligned addresses inside one `Vec`
/// that is never resized (so the addresses are stable), each after a guard zone, and a large guard
/// zone at the end. Kernels write it through raw device addresses while no Rust reference to it
/// exists; the host reads it only between launches.
struct Arena {
    bytes: Vec<u8>,
    /// (start, len) of each region, in address order.
    regions: Vec<(usize, usize)>,
}

impl Arena {
    /// Regions of the given lengths, zeroed; everything else is guard.
    fn new(lens: &[usize]) -> Self {
        Self::filled(lens, 0)
    }

    /// Regions of the given lengths filled with `byte`; everything else is guard.
    fn filled(lens: &[usize], byte: u8) -> Self {
        let mut offsets = Vec::with_capacity(lens.len());
        let mut end = 0;
        for &len in lens {
            let start = (end + GUARD).next_multiple_of(ALIGN);
            offsets.push(start);
            end = start + len;
        }
        let mut bytes = vec![GUARD_BYTE; end + TAIL_GUARD + ALIGN];
        // Shift everything so that offset 0 sits at an aligned address.
        let shift = (ALIGN - bytes.as_ptr() as usize % ALIGN) % ALIGN;
        let regions: Vec<(usize, usize)> = offsets
            .iter()
            .zip(lens)
            .map(|(&o, &len)| (o + shift, len))
            .collect();
        for &(start, len) in &regions {
            bytes[start..start + len].fill(byte);
        }
        Self { bytes, regions }
    }

    fn with_data(data: &[&[u8]]) -> Self {
        let lens: Vec<usize> = data.iter().map(|d| d.len()).collect();
        let mut a = Self::new(&lens);
        for (r, d) in data.iter().enumerate() {
            a.data_mut(r).copy_from_slice(d);
        }
        a
    }

    /// The device address of region `r`.
    fn ptr(&mut self, r: usize) -> u64 {
        let (start, _) = self.regions[r];
        self.bytes[start..].as_mut_ptr() as u64
    }

    fn data(&self, r: usize) -> &[u8] {
        let (start, len) = self.regions[r];
        &self.bytes[start..start + len]
    }

    fn data_mut(&mut self, r: usize) -> &mut [u8] {
        let (start, len) = self.regions[r];
        &mut self.bytes[start..start + len]
    }

    fn guards_intact(&self) -> bool {
        let mut from = 0;
        for &(start, len) in &self.regions {
            if self.bytes[from..start].iter().any(|&b| b != GUARD_BYTE) {
                return false;
            }
            from = start + len;
        }
        self.bytes[from..].iter().all(|&b| b == GUARD_BYTE)
    }

    fn words(&self, r: usize) -> Vec<u64> {
        decode(self.data(r), u64::from_ne_bytes).collect()
    }
}

/// The bytes of a CPU storage and its dtype code.
fn storage_bytes(storage: &Storage) -> Result<(Vec<u8>, u64)> {
    Ok(match storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            (v.iter().flat_map(|x| x.to_ne_bytes()).collect(), DT_F32)
        }
        Storage::Cpu(CpuStorage::F64(v)) => {
            (v.iter().flat_map(|x| x.to_ne_bytes()).collect(), DT_F64)
        }
        Storage::Cpu(CpuStorage::F16(v)) => (
            v.iter().flat_map(|x| x.to_bits().to_ne_bytes()).collect(),
            DT_F16,
        ),
        Storage::Cpu(CpuStorage::BF16(v)) => (
            v.iter().flat_map(|x| x.to_bits().to_ne_bytes()).collect(),
            DT_BF16,
        ),
        // The fused optimizers' control tensor.
        Storage::Cpu(CpuStorage::I64(v)) => {
            (v.iter().flat_map(|x| x.to_ne_bytes()).collect(), DT_I64)
        }
        other => bail!(
            "the kernel emulation needs F32, F64, F16 or BF16 CPU storage, got {:?} on {:?}",
            other.dtype(),
            other.device().location()
        ),
    })
}

/// One storage copied to the device (region `r` of the session's storage arena).
struct StorageCopy {
    original: Vec<u8>,
    dtype: u64,
    /// A tensor of this storage (the first listed).
    first_tensor: usize,
}

// ---------------------------------------------------------------------------------------------
// The device.

/// The emulated CUDA device (stateless: the state is per thread).
pub(crate) struct Emulated;

impl KernelDevice for Emulated {
    fn check_ready(&self) -> Result<()> {
        Ok(())
    }

    fn with_session<R>(
        &self,
        tensors: &[&Tensor],
        writable: std::ops::Range<usize>,
        f: impl FnOnce(&mut dyn Session, &[Base]) -> Result<R>,
    ) -> Result<R> {
        // Copy every distinct storage to the device (each read lock taken once, released at once).
        let mut copy_of_key: HashMap<usize, usize> = HashMap::new();
        let mut copies: Vec<StorageCopy> = Vec::new();
        let mut copy_of_tensor = Vec::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            let key = storage_key(t);
            let c = match copy_of_key.get(&key) {
                Some(&c) => c,
                None => {
                    let (original, dtype) = storage_bytes(&t.storage_and_layout().0)?;
                    copies.push(StorageCopy {
                        original,
                        dtype,
                        first_tensor: i,
                    });
                    copy_of_key.insert(key, copies.len() - 1);
                    copies.len() - 1
                }
            };
            copy_of_tensor.push(c);
        }
        // One arena for all storages: a kernel that overruns one lands in a guard or a neighbour,
        // where the checks below see it.
        let originals: Vec<&[u8]> = copies.iter().map(|c| c.original.as_slice()).collect();
        let mut arena = Arena::with_data(&originals);
        let storage_bases: Vec<Base> = copies
            .iter()
            .enumerate()
            .map(|(r, c)| Base {
                ptr: arena.ptr(r),
                dtype: c.dtype,
            })
            .collect();
        let bases: Vec<Base> = copy_of_tensor.iter().map(|&c| storage_bases[c]).collect();

        let result = SCRATCH.with(|cell| -> Result<R> {
            let mut scratch = cell.borrow_mut();
            let scratch = scratch.get_or_insert_with(|| Arena::new(&[STATE_WORDS * 8]));
            let mut session = EmulatedSession {
                scratch: scratch.ptr(0),
                tables: Vec::new(),
                buffers: Vec::new(),
            };
            let result = f(&mut session, &bases);
            if result.is_err() {
                // A failed launch may have left partial sums behind: report its own error, and
                // leave a clean scratch for the thread's next call.
                scratch.data_mut(0).fill(0);
                return result;
            }
            session.check_guards()?;
            if !scratch.guards_intact() {
                bail!("kernel emulation: a kernel wrote outside the scratch")
            }
            let words = scratch.words(0);
            if let Some(i) = words[..STATE_ZERO_WORDS].iter().position(|&w| w != 0) {
                // Reset, so that one failure does not fail every later call of the thread.
                scratch.data_mut(0).fill(0);
                bail!(
                    "kernel emulation: the kernels left the scratch dirty (word {i} = {:#x}); it must be zero between calls",
                    words[i]
                )
            }
            result
        });

        if !arena.guards_intact() {
            bail!("kernel emulation: a kernel wrote outside the storages of its tensors")
        }
        let mut written = Vec::new();
        for (c, copy) in copies.iter().enumerate() {
            if arena.data(c) != copy.original.as_slice() {
                // Writable: a storage of one of the `writable` tensors.
                let member = writable.clone().find(|&i| copy_of_tensor[i] == c);
                match member {
                    Some(_) => written.push(c),
                    None => bail!(
                        "kernel emulation: a kernel wrote into read-only tensor #{} (shape {:?})",
                        copy.first_tensor,
                        tensors[copy.first_tensor].dims()
                    ),
                }
            }
        }
        let value = result?;
        for c in written {
            // Any tensor of the storage that candle accepts as an in-place destination.
            let target = (0..tensors.len()).find(|&i| {
                copy_of_tensor[i] == c
                    && tensors[i].elem_count() > 0
                    && !repeats_elements(tensors[i])
            });
            let Some(target) = target else {
                bail!("kernel emulation: internal error: a written storage has no writable view")
            };
            tensors[target].inplace_op1(&CopyBack {
                bytes: arena.data(c),
            })?;
        }
        Ok(value)
    }
}

/// Replaces a whole CPU storage with bytes from the device.
struct CopyBack<'a> {
    bytes: &'a [u8],
}

/// The values of `N` bytes each in `bytes`.
fn decode<'a, T, const N: usize>(
    bytes: &'a [u8],
    from: impl Fn([u8; N]) -> T + 'a,
) -> impl Iterator<Item = T> + 'a {
    bytes
        .chunks_exact(N)
        .map(move |c| from(c.try_into().expect("chunks of N bytes")))
}

fn copy_from<T, const N: usize>(dst: &mut [T], bytes: &[u8], from: impl Fn([u8; N]) -> T) {
    for (x, v) in dst.iter_mut().zip(decode(bytes, from)) {
        *x = v;
    }
}

impl InplaceOp1 for CopyBack<'_> {
    fn name(&self) -> &'static str {
        "candle-grad-clip-emulation-copy-back"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _layout: &Layout) -> Result<()> {
        match storage {
            CpuStorage::F32(v) => copy_from(v, self.bytes, f32::from_ne_bytes),
            CpuStorage::F64(v) => copy_from(v, self.bytes, f64::from_ne_bytes),
            CpuStorage::F16(v) => {
                copy_from(v, self.bytes, |b| f16::from_bits(u16::from_ne_bytes(b)))
            }
            CpuStorage::BF16(v) => {
                copy_from(v, self.bytes, |b| bf16::from_bits(u16::from_ne_bytes(b)))
            }
            CpuStorage::I64(v) => copy_from(v, self.bytes, i64::from_ne_bytes),
            _ => bail!("kernel emulation: cannot copy back into this storage"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &mut candle_core::CudaStorage, _: &Layout) -> Result<()> {
        bail!("internal error: the emulation's copy-back was called on CUDA storage")
    }
}

struct EmulatedSession {
    scratch: u64,
    tables: Vec<Arena>,
    buffers: Vec<Option<(Arena, DType)>>,
}

impl EmulatedSession {
    fn check_guards(&self) -> Result<()> {
        let tables_ok = self.tables.iter().all(Arena::guards_intact);
        let buffers_ok = self
            .buffers
            .iter()
            .flatten()
            .all(|(a, _)| a.guards_intact());
        if !(tables_ok && buffers_ok) {
            bail!("kernel emulation: a kernel wrote outside a table or output buffer")
        }
        Ok(())
    }

    fn values(&self, buffer: Buffer) -> Result<(Vec<f64>, DType)> {
        let Some(Some((alloc, dtype))) = self.buffers.get(buffer.id) else {
            bail!("internal error: emulated buffer {} was consumed", buffer.id)
        };
        let values = match dtype {
            DType::F64 => decode(alloc.data(0), f64::from_ne_bytes).collect(),
            _ => decode(alloc.data(0), |b| f32::from_ne_bytes(b) as f64).collect(),
        };
        Ok((values, *dtype))
    }
}

impl Session for EmulatedSession {
    fn upload(&mut self, words: &[u64]) -> Result<u64> {
        ACTIVE.with(|a| {
            if let Some(a) = a.borrow_mut().as_mut() {
                a.log.table_uploads.push(words.len());
            }
        });
        if words.is_empty() {
            return Ok(0);
        }
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut table = Arena::with_data(&[&bytes]);
        let ptr = table.ptr(0);
        self.tables.push(table);
        Ok(ptr)
    }

    fn scratch(&self) -> u64 {
        self.scratch
    }

    fn alloc(&mut self, dtype: DType, len: usize) -> Result<Buffer> {
        let size = if dtype == DType::F64 { 8 } else { 4 };
        // Not zero, as `cudaMalloc`'s memory is not: NaN bytes, so that a kernel that fails to
        // write its output is seen.
        let mut alloc = Arena::filled(&[len * size], GUARD_BYTE);
        let ptr = alloc.ptr(0);
        self.buffers.push(Some((alloc, dtype)));
        Ok(Buffer {
            ptr,
            id: self.buffers.len() - 1,
        })
    }

    unsafe fn launch(&mut self, launch: &Launch) -> Result<()> {
        let (config, seed) = ACTIVE.with(|a| match a.borrow_mut().as_mut() {
            Some(a) => {
                a.launches += 1;
                Ok((a.config.clone(), a.config.seed.wrapping_add(a.launches)))
            }
            None => Err(candle_core::Error::Msg(
                "internal error: emulated launch outside KernelEmulation::run".into(),
            )),
        })?;
        let wanted = launch.grid.wanted();
        let grid = config.grid.unwrap_or(wanted.min(DEFAULT_MAX_GRID));
        // SAFETY: by the contract of `Session::launch`, the launch comes from `kernels`
        // (launch.rs) for this session: its device addresses are this session's storage arena (segments built from candle's layouts of those storages, so
        // inside them), its table and buffers (sized by the operation for what the kernel writes),
        // and the thread's scratch, all emulated device memory that no Rust reference aliases
        // while the kernel runs (the host reads it only between launches). A kernel that strays
        // anyway lands in a guard zone, checked after the session.
        unsafe { ffi::launch(launch, grid, BLOCK, config.order, seed) }?;
        ACTIVE.with(|a| {
            if let Some(a) = a.borrow_mut().as_mut() {
                a.log.launches.push(EmulatedLaunch {
                    kernel: launch.kernel.name(),
                    grid,
                    block: BLOCK,
                });
            }
        });
        Ok(())
    }

    fn read(&mut self, buffer: Buffer) -> Result<Vec<f64>> {
        Ok(self.values(buffer)?.0)
    }

    fn take_tensor(&mut self, buffer: Buffer, shape: &[usize]) -> Result<Tensor> {
        let (values, dtype) = self.values(buffer)?;
        self.buffers[buffer.id] = None;
        let cpu = &candle_core::Device::Cpu;
        match dtype {
            DType::F64 => Tensor::from_vec(values, shape, cpu),
            _ => Tensor::from_vec(
                values.into_iter().map(|v| v as f32).collect::<Vec<f32>>(),
                shape,
                cpu,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::kernels::launch::Kernel;

    /// Every kernel defined in `kernels/*.cu` is compiled into the emulation, and every kernel the
    /// host launches is one of them.
    #[test]
    fn every_kernel_source_entry_is_emulated() {
        // The emulation's own tests (emulation/selftest.cu) are not product kernels.
        let emulated: Vec<String> = ffi::kernel_names()
            .into_iter()
            .filter(|n| !n.starts_with("emu_selftest_"))
            .collect();
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels");
        let mut defined = Vec::new();
        for entry in std::fs::read_dir(dir).expect("kernels/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "cu") {
                let source = std::fs::read_to_string(&path).expect("read");
                // `extern "C" __global__ void NAME(` and the `REDUCE_ENTRY(NAME, MODE)` macro.
                for (marker, end) in [("__global__ void ", '('), ("\nREDUCE_ENTRY(", ',')] {
                    for part in source.split(marker).skip(1) {
                        let name: String = part.chars().take_while(|&c| c != end).collect();
                        let name = name.trim().to_string();
                        // Upper case: a macro parameter (the body of `REDUCE_ENTRY` itself).
                        let is_macro_parameter = name.chars().all(|c| !c.is_lowercase());
                        if !is_macro_parameter
                            && name.chars().all(|c| c.is_alphanumeric() || c == '_')
                        {
                            defined.push(name);
                        }
                    }
                }
            }
        }
        defined.sort();
        defined.dedup();
        let mut emulated_sorted = emulated.clone();
        emulated_sorted.sort();
        assert_eq!(
            defined, emulated_sorted,
            "kernels in kernels/*.cu versus emulation/kernels.cpp"
        );
        for k in Kernel::ALL {
            assert!(
                emulated.iter().any(|e| e == k.name()),
                "{} is not emulated",
                k.name()
            );
        }
    }
}
