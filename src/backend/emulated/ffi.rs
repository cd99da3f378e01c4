//! The C interface of the emulation's launcher (`emulation/runtime.cpp`).

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr, CString};

use candle_core::{bail, Result};

use super::BlockOrder;
use crate::backend::kernels::launch::{Arg, Launch};

unsafe extern "C" {
    fn cge_launch(
        name: *const c_char,
        signature: *const c_char,
        params: *mut *mut c_void,
        grid: c_uint,
        block: c_uint,
        order: c_uint,
        seed: c_ulonglong,
        threads: c_uint,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;

    #[cfg(test)]
    fn cge_kernel_info(i: usize, name: *mut *const c_char, signature: *mut *const c_char) -> c_int;
}

/// Runs `launch` on `grid` blocks of `block` threads; blocks in `order` (shuffles from `seed`).
///
/// # Safety
/// Every device address among the arguments must point to emulated device memory that the kernel
/// may read and write as its parameter's documentation says, and that no Rust reference aliases
/// for the duration of the call.
pub(super) unsafe fn launch(
    launch: &Launch,
    grid: u32,
    block: u32,
    order: BlockOrder,
    seed: u64,
) -> Result<()> {
    // SAFETY: passed on from the caller.
    unsafe { launch_named(launch.kernel.name(), &launch.args, grid, block, order, seed) }
}

/// [`launch`] of a kernel given by name.
///
/// # Safety
/// As [`launch`].
pub(super) unsafe fn launch_named(
    name: &str,
    args: &[Arg],
    grid: u32,
    block: u32,
    order: BlockOrder,
    seed: u64,
) -> Result<()> {
    let name = CString::new(name).expect("kernel names have no NUL");
    // The argument types, as the emulation spells a kernel's parameter list.
    let signature: Vec<&str> = args.iter().map(Arg::token).collect();
    let signature = CString::new(signature.join(",")).expect("signatures have no NUL");
    // One pointer per argument, at the value in the argument's own type (as cuLaunchKernel's
    // kernelParams).
    let mut params: Vec<*mut c_void> = args
        .iter()
        .map(|arg| match arg {
            Arg::Ptr(v) | Arg::U64(v) => v as *const u64 as *mut c_void,
            Arg::U32(v) => v as *const u32 as *mut c_void,
            Arg::F64(v) => v as *const f64 as *mut c_void,
            Arg::F64x4(v) => v.as_ptr() as *mut c_void,
            Arg::U64x16(v) => v.as_ptr() as *mut c_void,
            Arg::F64x8(v) => v.as_ptr() as *mut c_void,
        })
        .collect();
    let (order, threads) = match order {
        BlockOrder::InOrder => (0, 1),
        BlockOrder::Reversed => (1, 1),
        BlockOrder::Shuffled => (2, 1),
        BlockOrder::Concurrent { threads } => (3, threads.max(1)),
    };
    let mut err = vec![0u8; 1024];
    // SAFETY: `name` and `signature` are NUL-terminated and live across the call. The launcher
    // refuses (returns 1) unless `signature` equals the kernel's parameter list, token for token,
    // so each `params[i]` points at a live value of exactly the type the kernel reads from it
    // (u32, u64 or a pointer-sized u64, f64, or a 32/64/128-byte struct of f64/u64: the layouts
    // of `Bounds`, `StepParams` and `StridedView`); the values are borrowed from `args` for the whole call and
    // only read. The device addresses in them are valid for the kernel (this function's contract).
    // `err` has `err.len()` writable bytes;
    // the launcher writes a NUL-terminated message that fits. The launcher catches kernel errors
    // itself (no unwinding crosses the boundary).
    let rc = unsafe {
        cge_launch(
            name.as_ptr(),
            signature.as_ptr(),
            params.as_mut_ptr(),
            grid,
            block,
            order,
            seed,
            threads,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc != 0 {
        let msg = CStr::from_bytes_until_nul(&err)
            .map(|m| m.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown error".into());
        bail!("kernel emulation: {msg}")
    }
    Ok(())
}

/// The names of the kernels compiled into the emulation.
#[cfg(test)]
pub(super) fn kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for i in 0.. {
        let mut name: *const c_char = std::ptr::null();
        let mut signature: *const c_char = std::ptr::null();
        // SAFETY: the out-pointers are valid for writes; the launcher stores pointers to its own
        // static NUL-terminated strings, which live for the whole program.
        let more = unsafe { cge_kernel_info(i, &mut name, &mut signature) };
        if more == 0 {
            break;
        }
        // SAFETY: see above: a static NUL-terminated string.
        names.push(
            unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned(),
        );
    }
    names
}
