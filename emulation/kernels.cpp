// The kernels of kernels/*.cu, compiled unchanged for the host emulation, and their registry.
// A kernel that is not listed here cannot be launched under emulation (the launch fails with
// "no kernel named ..."), and the host side checks that every kernel it knows is listed.

#include "cuda_emu.h"

#include "grad_clip.cu"

extern "C" const cge::KernelEntry* cge_kernel_table(size_t* count) {
    static const cge::KernelEntry table[] = {
        CGE_KERNEL(grad_clip_reduce_inf),
        CGE_KERNEL(grad_clip_reduce_abs),
        CGE_KERNEL(grad_clip_reduce_sq),
        CGE_KERNEL(grad_clip_reduce_pow),
        CGE_KERNEL(grad_clip_apply),
        CGE_KERNEL(grad_clip_apply_strided),
        CGE_KERNEL(grad_clip_segment_norms),
    };
    *count = sizeof(table) / sizeof(table[0]);
    return table;
}
