// Host emulation of the CUDA built-ins that kernels/*.cu and the emulation's self-tests
// (selftest.cu) use, and no others, so that the unchanged kernel sources compile with the system C++
// compiler and run on the CPU (feature `emulation` of candle-grad-clip). A kernel that needs another
// built-in fails to compile here: add it then, with a self-test.
//
// Model: a launch runs its blocks one after another (or several at a time, one per OS thread), and
// the threads of a block as fibers on one OS thread: a fiber runs until it reaches __syncthreads, a
// warp-synchronous call (shuffle, ballot, __syncwarp) or its end, and then the next runnable one
// continues. So:
//   - __shared__ is per block: `static thread_local` (one OS thread runs one block at a time);
//   - __syncthreads is a real barrier over the block's live threads (threads that returned no longer
//     count, as on Volta and later); threads waiting at different __syncthreads are an error;
//   - warp shuffles really exchange values between the 32 lanes of a warp; the mask must name exactly
//     the warp's live lanes, and each of them must reach the call: anything else is an error (a mask
//     naming a lane that does not arrive is undefined behaviour on a GPU; partial-mask calls that
//     some live lanes skip are legal there, but not emulated);
//   - atomics are sequentially consistent (GCC __atomic builtins): blocks may run concurrently;
//   - conversions to f32/f16/bf16 round to nearest even directly from f64, as CUDA's _rn forms do.
// What it does not model: the memory model and timing of a GPU (fibers switch only at barriers and
// warp calls, so a missing barrier between threads of one warp may go unnoticed), and CUDA's own
// math library (pow, exp, ... are glibc's; sqrt and + - * / are IEEE on both).
//
// Include order matters: every system header is included here, before the macros below redefine
// names such as __noinline__ that libstdc++ uses in its own attributes.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------
// The runtime (emulation/runtime.cpp).

struct uint3 {
    unsigned int x, y, z;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};

namespace cge {

// The state of the emulated CUDA thread that is running on this OS thread.
struct ThreadState {
    uint3 thread_idx;
};
extern thread_local ThreadState* tl_thread;
extern thread_local uint3 tl_block_idx;
extern thread_local uint3 tl_block_dim;
extern thread_local uint3 tl_grid_dim;

// Stops the launch with an error (reported to the host as the launch's failure); never returns.
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Block-wide barrier over the live threads; `line` identifies the call site.
void syncthreads(int line);

// Warp-synchronous exchange: deposits `bits` for the calling lane and returns, once every lane in
// `mask` has arrived at the same call site, the 32 deposited values (index = lane). The pointer stays
// valid until the calling lane's next warp-synchronous call.
const uint64_t* warp_exchange(unsigned mask, uint64_t bits, int line);

inline unsigned lane_id() { return tl_thread->thread_idx.x % 32u; }

template <typename T> inline uint64_t to_bits64(T v) {
    static_assert(sizeof(T) <= 8, "warp shuffles of at most 8 bytes");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}

template <typename T> inline T from_bits64(uint64_t b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}

// The shuffle family: lane `lane` reads the value of lane `src` (CUDA's rule within `width`).
template <typename T> inline T shfl_from(unsigned mask, T var, int src_in_segment, bool use_own, int width, int line) {
    const uint64_t* slots = warp_exchange(mask, to_bits64(var), line);
    if (use_own) return var;
    const unsigned lane = lane_id();
    const unsigned src = (lane & ~(unsigned)(width - 1)) + ((unsigned)src_in_segment & (unsigned)(width - 1));
    if (!((mask >> src) & 1u)) fail("warp shuffle in lane %u reads lane %u, which is not in the mask %08x", lane, src, mask);
    return from_bits64<T>(slots[src]);
}

} // namespace cge

// ---------------------------------------------------------------------------------------------
// Qualifiers and built-in variables.

#define __global__
#define __device__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ static thread_local
// __restrict__ is a GCC keyword already.

#define threadIdx (::cge::tl_thread->thread_idx)
#define blockIdx (::cge::tl_block_idx)
#define blockDim (::cge::tl_block_dim)
#define gridDim (::cge::tl_grid_dim)

#define __syncthreads() ::cge::syncthreads(__LINE__)

// The call site's line is a default argument (as for the shuffles below).
inline void __syncwarp(unsigned mask = 0xffffffffu, int line = __builtin_LINE()) {
    (void)::cge::warp_exchange(mask, 0, line);
}

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---------------------------------------------------------------------------------------------
// Warp-synchronous calls. The call site's line is a default argument, so that lanes reaching
// different calls are caught.

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src, int width = 32, int line = __builtin_LINE()) {
    return ::cge::shfl_from(mask, var, src, false, width, line);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, int line = __builtin_LINE()) {
    const unsigned in_seg = ::cge::lane_id() & (unsigned)(width - 1);
    const bool own = in_seg + delta >= (unsigned)width;
    return ::cge::shfl_from(mask, var, (int)(in_seg + delta), own, width, line);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, int line = __builtin_LINE()) {
    const unsigned in_seg = ::cge::lane_id() & (unsigned)(width - 1);
    const bool own = in_seg < delta;
    return ::cge::shfl_from(mask, var, (int)(in_seg - delta), own, width, line);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, int line = __builtin_LINE()) {
    const unsigned in_seg = ::cge::lane_id() & (unsigned)(width - 1);
    const unsigned src = in_seg ^ (unsigned)lane_mask;
    const bool own = src >= (unsigned)width;
    return ::cge::shfl_from(mask, var, (int)src, own, width, line);
}
inline unsigned __ballot_sync(unsigned mask, int predicate, int line = __builtin_LINE()) {
    const uint64_t* slots = ::cge::warp_exchange(mask, predicate != 0, line);
    unsigned r = 0;
    for (unsigned l = 0; l < 32; ++l) {
        if (((mask >> l) & 1u) && slots[l]) r |= 1u << l;
    }
    return r;
}
inline int __any_sync(unsigned mask, int predicate, int line = __builtin_LINE()) {
    return __ballot_sync(mask, predicate, line) != 0;
}
inline int __all_sync(unsigned mask, int predicate, int line = __builtin_LINE()) {
    return __ballot_sync(mask, predicate, line) == mask;
}

// ---------------------------------------------------------------------------------------------
// Atomics (global or shared memory), sequentially consistent; each returns the old value.

#define CGE_ATOMIC_INTEGER(T)                                                                                 \
    inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }                   \
    inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }                     \
    inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }                 \
    inline T atomicMax(T* a, T v) {                                                                         \
        T old = __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                       \
        while (old < v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) { \
        }                                                                                                   \
        return old;                                                                                         \
    }
CGE_ATOMIC_INTEGER(unsigned int)
CGE_ATOMIC_INTEGER(unsigned long long)
#undef CGE_ATOMIC_INTEGER

inline double atomicAdd(double* a, double v) {
    uint64_t* p = reinterpret_cast<uint64_t*>(a);
    uint64_t old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    for (;;) {
        double cur;
        memcpy(&cur, &old, sizeof(double));
        const double next = cur + v;
        uint64_t nb;
        memcpy(&nb, &next, sizeof(double));
        if (__atomic_compare_exchange_n(p, &old, nb, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return cur;
    }
}

// ---------------------------------------------------------------------------------------------
// Loads, bit casts, integer intrinsics, IEEE arithmetic with explicit rounding.

template <typename T> inline T __ldg(const T* p) { return *p; }

namespace cge {
template <typename To, typename From> inline To bit_cast(From f) {
    static_assert(sizeof(To) == sizeof(From), "bit_cast of equal sizes");
    To t;
    memcpy(&t, &f, sizeof(To));
    return t;
}
} // namespace cge

inline float __uint_as_float(unsigned int u) { return ::cge::bit_cast<float>(u); }
inline unsigned int __float_as_uint(float f) { return ::cge::bit_cast<unsigned int>(f); }
inline double __longlong_as_double(long long u) { return ::cge::bit_cast<double>(u); }
inline long long __double_as_longlong(double d) { return ::cge::bit_cast<long long>(d); }

inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }

// Compiled with -ffp-contract=off: each of these is one IEEE operation, rounded to nearest even.
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return sqrt(a); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __ull2double_rn(unsigned long long u) { return (double)u; }
inline float __double2float_rn(double d) { return (float)d; }

// ---------------------------------------------------------------------------------------------
// f16 and bf16 (cuda_fp16.h / cuda_bf16.h are stubs that include this file).

struct __half {
    unsigned short __x;
};
struct __nv_bfloat16 {
    unsigned short __x;
};

namespace cge {
// `d` rounded to nearest even in a binary format with `mant` fraction bits and exponent bias
// `bias` (f16: 10, 15; bf16: 7, 127), directly from the double's bits (one rounding). NaN gives
// the canonical NaN 0x7fff, as CUDA's conversions do.
inline unsigned short round_f64_to_half_format(double d, int mant, int bias) {
    const uint64_t b = bit_cast<uint64_t>(d);
    const unsigned short sign = (unsigned short)((b >> 63) << 15);
    const uint64_t a = b & 0x7fffffffffffffffull;
    const unsigned exp_all_ones = (unsigned)((1 << (15 - mant)) - 1);
    const unsigned short inf = (unsigned short)(exp_all_ones << mant);
    if (a > 0x7ff0000000000000ull) return 0x7fff;
    if (a == 0x7ff0000000000000ull) return sign | inf;
    if (a == 0) return sign;
    const int e_biased = (int)(a >> 52);
    // Significand with the implicit bit (53 bits) and the unbiased exponent of its leading bit.
    const uint64_t sig = e_biased == 0 ? (a & ((1ull << 52) - 1)) : ((a & ((1ull << 52) - 1)) | (1ull << 52));
    const int e = e_biased == 0 ? -1074 + 52 : e_biased - 1023; // value = sig * 2^(e - 52)
    const int emin = 1 - bias;
    // Units of the result's last place: 2^(max(e, emin) - mant).
    int shift = 52 - mant + (e < emin ? emin - e : 0);
    uint64_t q, rem, half;
    if (shift >= 64) {
        q = 0;
        rem = sig; // < 2^53 <= half of the unit: below the midpoint
        half = 1ull << 63;
    } else {
        q = sig >> shift;
        rem = sig & ((1ull << shift) - 1);
        half = 1ull << (shift - 1);
    }
    if (rem > half || (rem == half && (q & 1))) q += 1;
    uint64_t bits;
    if (e < emin) {
        bits = q; // subnormal (q may reach 2^mant: the smallest normal, encoded the same way)
    } else {
        // q in [2^mant, 2^(mant+1)]: the carry into the exponent is the right encoding.
        bits = ((uint64_t)(e + bias - 1) << mant) + q;
    }
    if (bits >= inf) bits = inf;
    return (unsigned short)(sign | (unsigned short)bits);
}

// Exact value of a half-format number as a double.
inline double half_format_to_f64(unsigned short h, int mant, int bias) {
    const int exp_bits = 15 - mant;
    const unsigned e = (h >> mant) & ((1u << exp_bits) - 1);
    const unsigned m = h & ((1u << mant) - 1);
    double v;
    if (e == (1u << exp_bits) - 1) v = m ? NAN : INFINITY;
    else if (e == 0) v = ldexp((double)m, 1 - bias - mant);
    else v = ldexp((double)(m | (1u << mant)), (int)e - bias - mant);
    return (h & 0x8000) ? -v : v;
}
} // namespace cge

inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline float __half2float(__half h) { return (float)::cge::half_format_to_f64(h.__x, 10, 15); }
inline __half __double2half(double d) { return __half{::cge::round_f64_to_half_format(d, 10, 15)}; }

inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __double2bfloat16(double d) { return __nv_bfloat16{::cge::round_f64_to_half_format(d, 7, 127)}; }

// ---------------------------------------------------------------------------------------------
// Kernel registration (emulation/kernels.cpp): name, argument signature, and a thunk that calls the
// kernel with arguments read from an array of pointers, as cuLaunchKernel's `kernelParams`.

namespace cge {

struct KernelEntry {
    const char* name;
    const char* signature;
    void (*call)(void** params);
};

// One token per parameter: u (32-bit unsigned), U (64-bit unsigned), d (double), p (pointer),
// sN (a struct of N bytes, passed by value). The host side builds the same string from its
// arguments, and a launch whose arguments do not match is refused.
template <typename T> struct ArgToken {
    static void append(char* out) {
        if constexpr (std::is_pointer<T>::value) strcat(out, "p,");
        else if constexpr (std::is_same<T, unsigned int>::value) strcat(out, "u,");
        else if constexpr (std::is_same<T, unsigned long long>::value) strcat(out, "U,");
        else if constexpr (std::is_same<T, double>::value) strcat(out, "d,");
        else if constexpr (std::is_class<T>::value) {
            char buf[32];
            snprintf_token(buf, sizeof(T));
            strcat(out, buf);
        } else {
            static_assert(std::is_pointer<T>::value, "kernel parameter type without a host-side token");
        }
    }
    static void snprintf_token(char* buf, size_t n) {
        // "s<n>," without printf, to keep this header free of <cstdio>.
        char digits[24];
        int k = 0;
        do {
            digits[k++] = (char)('0' + n % 10);
            n /= 10;
        } while (n);
        int i = 0;
        buf[i++] = 's';
        while (k) buf[i++] = digits[--k];
        buf[i++] = ',';
        buf[i] = 0;
    }
};

template <auto F> struct Kernel;
template <typename... A, void (*F)(A...)> struct Kernel<F> {
    template <size_t... I> static void call_with(void** params, std::index_sequence<I...>) {
        F(*static_cast<typename std::remove_cv<A>::type*>(params[I])...);
    }
    static void call(void** params) { call_with(params, std::index_sequence_for<A...>{}); }
    static const char* signature() {
        static char sig[256] = {0};
        if (!sig[0]) {
            (ArgToken<typename std::remove_cv<A>::type>::append(sig), ...);
            const size_t n = strlen(sig);
            if (n) sig[n - 1] = 0; // drop the last comma
        }
        return sig;
    }
};

} // namespace cge

#define CGE_KERNEL(name) ::cge::KernelEntry{#name, ::cge::Kernel<&name>::signature(), &::cge::Kernel<&name>::call}
