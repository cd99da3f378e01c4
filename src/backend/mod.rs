//! The back ends: the code that runs an operation (defined in `ops`) on one kind of device.
//!
//! - [`cpu`]: the CPU twin, on the host, with rayon;
//! - [`kernels`]: the kernel plan, plain Rust: what the multi-tensor kernels of
//!   `kernels/grad_clip.cu` are asked to do (segment tables, launches, their arguments), for any
//!   device that runs them;
//! - `cuda` (feature `cuda`): a GPU runs the plan, through cudarc;
//! - `emulated` (feature `emulation`): the kernels compiled for the host run the plan, for
//!   testing them without a GPU.
//!
//! A back end imports definitions (`ops`) and, for `cuda` and `emulated`, the kernel plan; never
//! the dispatch above it (`dispatch` picks the back end) nor the public layers.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "emulation")]
pub(crate) mod emulated;
#[cfg(any(feature = "cuda", feature = "emulation"))]
pub(crate) mod kernels;
