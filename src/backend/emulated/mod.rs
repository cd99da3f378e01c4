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
//!
//! Files: this one holds the public face ([`KernelEmulation`], [`BlockOrder`], [`EmulationLog`]);
//! `device` the emulated device that runs the kernel plan; `memory` its device memory; `ffi` the
//! calls into the compiled kernels.

pub(crate) mod device;
mod ffi;
mod memory;
#[cfg(test)]
mod selftest;

use std::cell::RefCell;

use candle_core::{bail, Result};

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
pub(super) const DEFAULT_MAX_GRID: u32 = 8;

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

pub(super) struct Active {
    pub(super) config: KernelEmulation,
    pub(super) log: EmulationLog,
    /// Launches so far: each gets its own seed.
    pub(super) launches: u64,
}

thread_local! {
    pub(super) static ACTIVE: RefCell<Option<Active>> = const { RefCell::new(None) };
}

/// Whether a [`KernelEmulation`] is running on this thread.
pub(crate) fn active() -> bool {
    ACTIVE.with(|a| a.borrow().is_some())
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
