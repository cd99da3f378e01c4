//! The emulated CUDA device: a [`KernelDevice`] that copies every storage of a call into its own
//! device memory, runs the launches on the kernels compiled for the host, checks the guard zones,
//! the read-only inputs and the scratch, and copies the written storages back.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{bail, CpuStorage, DType, InplaceOp1, Layout, Result, Tensor};
use half::{bf16, f16};

use super::memory::{copy_from, decode, storage_bytes, Arena, StorageCopy, GUARD_BYTE};
use super::{ffi, EmulatedLaunch, ACTIVE, DEFAULT_MAX_GRID};
use crate::backend::kernels::abi::{BLOCK, STATE_WORDS, STATE_ZERO_WORDS};
use crate::backend::kernels::launch::Launch;
use crate::backend::kernels::table::Base;
use crate::backend::kernels::{Buffer, KernelDevice, Session};
use crate::ops::gradients::{repeats_elements, storage_key};

thread_local! {
    /// The kernels' `Scratch` of this thread's emulated device: zero between calls.
    static SCRATCH: RefCell<Option<Arena>> = const { RefCell::new(None) };
}

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
        let (copies, copy_of_tensor) = copy_storages(tensors)?;
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

        let result = run_with_scratch(f, &bases);

        if !arena.guards_intact() {
            bail!("kernel emulation: a kernel wrote outside the storages of its tensors")
        }
        let written = written_storages(&arena, &copies, &copy_of_tensor, tensors, writable)?;
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

/// A copy of every distinct storage of `tensors` (each read lock taken once, released at once),
/// and the copy each tensor is in.
fn copy_storages(tensors: &[&Tensor]) -> Result<(Vec<StorageCopy>, Vec<usize>)> {
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
    Ok((copies, copy_of_tensor))
}

/// Runs the session's work `f` with the thread's scratch, and checks the scratch after it: its
/// guards intact and its state words zero again (reset after a failure, so that one failure does
/// not fail every later call of the thread).
fn run_with_scratch<R>(
    f: impl FnOnce(&mut dyn Session, &[Base]) -> Result<R>,
    bases: &[Base],
) -> Result<R> {
    SCRATCH.with(|cell| -> Result<R> {
        let mut scratch = cell.borrow_mut();
        let scratch = scratch.get_or_insert_with(|| Arena::new(&[STATE_WORDS * 8]));
        let mut session = EmulatedSession {
            scratch: scratch.ptr(0),
            tables: Vec::new(),
            buffers: Vec::new(),
        };
        let result = f(&mut session, bases);
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
    })
}

/// The storages the kernels changed; a change to a storage of none of the `writable` tensors
/// is an error.
fn written_storages(
    arena: &Arena,
    copies: &[StorageCopy],
    copy_of_tensor: &[usize],
    tensors: &[&Tensor],
    writable: std::ops::Range<usize>,
) -> Result<Vec<usize>> {
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
    Ok(written)
}
