//! The CUDA kernels, run on the CPU through the host emulation (feature `emulation`, on in this
//! crate's tests), driven by the crate's own CUDA host code: the clipping kernels against the CPU
//! back end, with the determinism claim of the CUDA path ([`clip`]), and the fused optimizer step
//! kernel against its CPU twin ([`fused_step`]). The kernels of AGC, ZClip and `GradScaler` are
//! tested with their areas (`tests/clip`, `tests/policy`, `tests/grad_scaler`).

#[path = "../common/mod.rs"]
mod common;

mod clip;
mod fused_step;
