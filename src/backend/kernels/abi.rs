//! The constants shared with the kernel source `kernels/grad_clip.cu` (its ABI as the host sees
//! it): the chunk that fixes the summation order, the block size, the sizes of the structs the
//! kernels read, and the dtype codes. Change one only together with the kernel source.

/// Elements per chunk (`CHUNK_ELEMS` in the kernel). Fixes the summation order: never make it
/// depend on the launch.
pub(crate) const CHUNK: u64 = 4096;
/// Threads per block of every launch.
pub(crate) const BLOCK: u32 = 256;
/// Warps per block: each warp takes a range of chunks.
pub(crate) const WARPS_PER_BLOCK: u64 = (BLOCK / 32) as u64;
/// Words of the kernel's `Scratch` struct: 68 digits, flags, max, counter, pending, scale,
/// coefficient, non-finite flag.
pub(crate) const STATE_WORDS: usize = 75;
/// The words of `Scratch` that must be zero between calls (digits, flags, max, counter, pending);
/// `scale`, `coefficient` and the non-finite flag keep their last values.
#[cfg_attr(not(feature = "emulation"), allow(dead_code))]
pub(crate) const STATE_ZERO_WORDS: usize = 72;
/// Words per table entry (the kernel's `Segment`: pointer, length, first chunk, dtype).
pub(crate) const SEGMENT_WORDS: usize = 4;
/// The strided kernel takes at most this many (coalesced) dimensions (`MAX_RANK`).
pub(crate) const MAX_RANK: usize = 8;

// Gradient dtype codes (`DT_*`).
pub(crate) const DT_F32: u64 = 0;
pub(crate) const DT_F64: u64 = 1;
pub(crate) const DT_F16: u64 = 2;
pub(crate) const DT_BF16: u64 = 3;
/// Not a gradient dtype: the control tensor of the fused optimizers.
pub(crate) const DT_I64: u64 = 4;

/// Bytes per element of a dtype code.
pub(crate) fn elem_size(dtype: u64) -> u64 {
    match dtype {
        DT_F64 | DT_I64 => 8,
        DT_F32 => 4,
        _ => 2,
    }
}
