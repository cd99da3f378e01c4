// Kernels that test the emulation itself (not part of the product; compiled only into the
// emulation, launched by the unit tests in src/backend/emulated/). Each exercises one promise of
// include/cuda_emu.h against expectations computed independently on the Rust side.

typedef unsigned long long u64;

// Conversions: f64 -> f16 / bf16 / f32 with one rounding to nearest even, and f16 -> float.
extern "C" __global__ void emu_selftest_convert(const double* in, unsigned short* f16_out,
                                                unsigned short* bf16_out, float* f32_out,
                                                float* f16_back, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        f16_out[i] = __half_as_ushort(__double2half(in[i]));
        bf16_out[i] = __bfloat16_as_ushort(__double2bfloat16(in[i]));
        f32_out[i] = __double2float_rn(in[i]);
        f16_back[i] = __half2float(__ushort_as_half((unsigned short)(i & 0xffff)));
    }
}

// Warp calls: every lane writes what each shuffle variant, a ballot and a vote gave it (8 words a
// thread), and each block the sum of its values through shared memory and barriers.
extern "C" __global__ void emu_selftest_warp(const u64* in, u64* out, u64* block_sums) {
    __shared__ u64 partial[1024];
    const unsigned tid = threadIdx.x;
    const u64 g = (u64)blockIdx.x * blockDim.x + tid;
    const u64 v = in[g];
    u64* o = out + g * 8;
    o[0] = __shfl_down_sync(0xffffffffu, v, 5);
    o[1] = __shfl_up_sync(0xffffffffu, v, 3);
    o[2] = __shfl_xor_sync(0xffffffffu, v, 9);
    o[3] = __shfl_sync(0xffffffffu, v, 7);
    o[4] = __shfl_down_sync(0xffffffffu, v, 3, 16);
    o[5] = __ballot_sync(0xffffffffu, (int)(v & 1));
    o[6] = (u64)__all_sync(0xffffffffu, v != 12345) | ((u64)__any_sync(0xffffffffu, v == in[g & ~31ull]) << 1);
    o[7] = (u64)__shfl_down_sync(0xffffffffu, (float)(v % 1000), 1);
    partial[tid] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s /= 2) {
        if (tid < s) partial[tid] += partial[tid + s];
        __syncthreads();
    }
    if (tid == 0) block_sums[blockIdx.x] = partial[0];
}

// Atomics from every thread of every block (blocks may run concurrently).
extern "C" __global__ void emu_selftest_atomics(u64* counters) {
    const u64 g = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    atomicAdd(&counters[0], 1ull);
    atomicMax(&counters[1], g);
    atomicOr(&counters[2], 1ull << (g % 64));
    atomicAdd((double*)&counters[3], 0.5);
    __threadfence();
}

// Bugs the emulation must report as errors.
extern "C" __global__ void emu_selftest_divergent_barrier(u64* out) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

extern "C" __global__ void emu_selftest_partial_warp_call(u64* out) {
    if (threadIdx.x % 32 >= 16) return;
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, (u64)threadIdx.x, 1);
}

// Legal on a GPU (lanes 16..31 skip the shuffle and wait at the barrier), refused by the emulation.
extern "C" __global__ void emu_selftest_partial_mask(u64* out) {
    u64 v = threadIdx.x;
    if (threadIdx.x % 32 < 16) v = __shfl_down_sync(0x0000ffffu, v, 1);
    __syncthreads();
    out[threadIdx.x] = v;
}

extern "C" __global__ void emu_selftest_deadlock(u64* out) {
    u64 v = threadIdx.x;
    if (threadIdx.x == 0) v = __shfl_sync(0xffffffffu, v, 1);
    __syncthreads();
    out[threadIdx.x] = v;
}
