// The kernels of kernels/*.cu, compiled unchanged for the host emulation, and their registry.
// A kernel that is not listed here cannot be launched under emulation (the launch fails with
// "no kernel named ..."), and the host side checks that every kernel it knows is listed.

#include "cuda_emu.h"

#include "grad_clip.cu"

// Tests of the emulation itself (emu_selftest_*), not product kernels.
#include "selftest.cu"

extern "C" const cge::KernelEntry* cge_kernel_table(size_t* count) {
    static const cge::KernelEntry table[] = {
        CGE_KERNEL(grad_clip_reduce_inf),
        CGE_KERNEL(grad_clip_reduce_abs),
        CGE_KERNEL(grad_clip_reduce_sq),
        CGE_KERNEL(grad_clip_reduce_pow),
        CGE_KERNEL(grad_clip_apply),
        CGE_KERNEL(grad_clip_apply_strided),
        CGE_KERNEL(grad_clip_segment_norms),
        CGE_KERNEL(grad_clip_fused_step),
        CGE_KERNEL(grad_clip_zclip),
        CGE_KERNEL(grad_clip_agc),
        CGE_KERNEL(grad_clip_agc_strided),
        CGE_KERNEL(grad_clip_accumulate),
        CGE_KERNEL(emu_selftest_convert),
        CGE_KERNEL(emu_selftest_warp),
        CGE_KERNEL(emu_selftest_atomics),
        CGE_KERNEL(emu_selftest_divergent_barrier),
        CGE_KERNEL(emu_selftest_partial_warp_call),
        CGE_KERNEL(emu_selftest_partial_mask),
        CGE_KERNEL(emu_selftest_deadlock),
    };
    *count = sizeof(table) / sizeof(table[0]);
    return table;
}
