// Fused multi-tensor kernels for candle-grad-clip (feature `cuda`).
//
// Four kernels, each one launch for any number of gradients:
//   grad_clip_reduce_*        global norm of every gradient (all dtypes in one launch), finalised
//                             on the device: writes the 0-d norm and the clipping coefficient, and
//                             optionally every chunk's partial (for per-tensor norms).
//   grad_clip_segment_norms   per-tensor norms from those chunk partials (grad_norms).
//   grad_clip_apply           in-place scale by the coefficient (skipped when it is >= 1), or clamp.
//   grad_clip_apply_strided   the same for one non-contiguous view (slow path, one launch per view).
//   grad_clip_accumulate      gradient accumulation: (buffer, gradient) pairs, added in place (at the
//                             end of this file).
//
// Work is described by a table of segments (pointer, length, dtype, first chunk). Each segment is
// cut into chunks of CHUNK_ELEMS elements counted from the segment's first element, and one warp
// reduces one chunk in a fixed order into one f64 partial. Each warp takes a contiguous range of
// chunks and walks the table along it (one binary search per warp, not per chunk). The partials
// are added into a superaccumulator (the digit layout of src/ops/exact_sum.rs) with integer atomics,
// which are exact and commutative, so the norm is bitwise independent of the segment order, the
// grid size and the scheduling. The last block to finish rounds the sum once to f64 exactly like
// ExactSum::value.
//
// The arithmetic is written so that no compiler may contract it (the square is an explicit fma),
// so the host emulation (emulation/, compiled with -ffp-contract=off) computes the same bits as
// the GPU for L1, L2 and the max; only `pow` (glibc's versus CUDA's) may differ.
//
// Must stay in sync with src/backend/kernels/ (CHUNK_ELEMS and dtype codes in abi.rs, Segment,
// Scratch, modes, the argument lists) and with the definitions in src/ops/ (clip.rs:
// clip_coefficient; norm.rs: the norm and its rescue; element.rs: the element arithmetic), which
// the CPU twin (src/backend/cpu/) runs.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef unsigned long long u64;
typedef unsigned int u32;

// Gradient dtype codes (kernels/launch.rs `DT_*`).
#define DT_F32 0
#define DT_F64 1
#define DT_F16 2
#define DT_BF16 3

// Reduction modes (kernels/launch.rs `MODE_*`).
#define MODE_INF 0 // max |x|
#define MODE_ABS 1 // sum |x|
#define MODE_SQ 2  // sum x*x
#define MODE_POW 3 // sum (|x| / divisor)^p

#define CHUNK_ELEMS 4096
#define WARP 32
#define DIGITS 68

// Below this, sums of powers of F64 gradients may have lost bits to underflow (cpu.rs TINY_SUM).
#define TINY_SUM 1e-270

struct Segment {
    u64 ptr;         // device address of element 0
    u64 len;         // elements, > 0
    u64 chunk_start; // global index of the segment's first chunk (strictly increasing)
    u64 dtype;       // DT_*
};

// Per-thread, per-device scratch (kernels/launch.rs `STATE_WORDS`); all zero between calls: the finalising
// block resets what it consumed.
struct Scratch {
    u64 digits[DIGITS]; // superaccumulator digits, 32 payload bits in each u64
    u64 flags;          // bit 0: +inf partial seen, bit 1: NaN partial seen
    u64 max_bits;       // max |x| as f64 bits (non-negative doubles order as integers; NaN wins);
                        // grad_clip_agc: its "some unit was clipped" flag (reset by its last block)
    u64 counter;        // blocks of the current launch that are done (last_block)
    u64 pending;        // 1 between a reduction that asked for the rescue pass and that pass
    // Not reset between calls:
    double scale;       // divisor for the rescue pass: the largest |x|
    double coefficient; // min(1, max_norm / (norm + eps)) of the last norm, read by the passes;
                        // grad_clip_zclip overwrites it with ZClip's; grad_clip_agc leaves 0 (some
                        // unit clipped) or 1 there, the fused step's verdict
    u64 nonfinite;      // 1 when the last norm (in f64) was NaN or infinite
};

struct Bounds {
    double b[4]; // clamp bound per dtype code, already rounded towards zero in that dtype
};

#define MAX_RANK 8
struct StridedView {
    u64 dims[MAX_RANK];
    u64 strides[MAX_RANK];
};

// ---------------------------------------------------------------------------------------------
// Element access by dtype: raw bits in, f64 out (exact for all four), f64 in, raw bits out (one
// rounding to nearest even, as half's from_f64 and `as f32` on the host).

template <int DT> struct Tr;

template <> struct Tr<DT_F32> {
    typedef u32 raw;
    static const int V = 4;
    static __device__ __forceinline__ double to_f64(raw u) { return (double)__uint_as_float(u); }
    static __device__ __forceinline__ raw from_f64(double d) {
        return __float_as_uint(__double2float_rn(d));
    }
};

template <> struct Tr<DT_F64> {
    typedef u64 raw;
    static const int V = 2;
    static __device__ __forceinline__ double to_f64(raw u) { return __longlong_as_double((long long)u); }
    static __device__ __forceinline__ raw from_f64(double d) { return (raw)__double_as_longlong(d); }
};

template <> struct Tr<DT_F16> {
    typedef unsigned short raw;
    static const int V = 8;
    static __device__ __forceinline__ double to_f64(raw u) {
        return (double)__half2float(__ushort_as_half(u));
    }
    static __device__ __forceinline__ raw from_f64(double d) { return __half_as_ushort(__double2half(d)); }
};

template <> struct Tr<DT_BF16> {
    typedef unsigned short raw;
    static const int V = 8;
    static __device__ __forceinline__ double to_f64(raw u) {
        return (double)__uint_as_float(((u32)u) << 16);
    }
    static __device__ __forceinline__ raw from_f64(double d) {
        return __bfloat16_as_ushort(__double2bfloat16(d));
    }
};

// 16 bytes of elements.
template <int DT> union Vec16 {
    uint4 v;
    typename Tr<DT>::raw r[Tr<DT>::V];
};

// GradScaler's one-read path (src/ops/grad_scaler.rs `unscale`, the reference): an element
// multiplied by inv_scale as it is read. F64: the f64 product with inv widened; the others: the
// f32 product, rounded once to their dtype (exact for F32). Spelled as intrinsics: no contraction.
template <int DT, bool PRE>
__device__ __forceinline__ double read_elem(typename Tr<DT>::raw r, float inv) {
    if (!PRE) return Tr<DT>::to_f64(r);
    if (DT == DT_F64) return __dmul_rn(Tr<DT>::to_f64(r), (double)inv);
    const float u = __fmul_rn((float)Tr<DT>::to_f64(r), inv);
    if (DT == DT_F32) return (double)u;
    return Tr<DT>::to_f64(Tr<DT>::from_f64((double)u));
}

// The general power is rare and large: one out-of-line copy keeps the PTX (JIT-compiled by the
// driver on first use) small.
__device__ __noinline__ double pow_outlined(double a, double p) { return pow(a, p); }

// Loads per lane in flight in the unrolled loops (reduction and apply) of the common modes.
#ifndef GRAD_CLIP_UNROLL
#define GRAD_CLIP_UNROLL 4
#endif

// ---------------------------------------------------------------------------------------------
// Per-lane accumulation. Element j of a 16-byte vector goes to slot j % 4; the slots are combined
// in a fixed order. Max is kept as f64 bits so that NaN (bits above +inf) propagates.

template <int MODE, bool WANT_MAX> struct Acc {
    double s[4];
    u64 m;
    double p, scale;
    __device__ __forceinline__ Acc(double p_, double scale_) : m(0), p(p_), scale(scale_) {
        s[0] = s[1] = s[2] = s[3] = 0.0;
    }
    __device__ __forceinline__ void add(int j, double x) {
        double a = fabs(x);
        if (MODE == MODE_INF || WANT_MAX) {
            u64 b = (u64)__double_as_longlong(a);
            m = b > m ? b : m;
        }
        if (MODE == MODE_ABS) {
            s[j & 3] += a;
        } else if (MODE == MODE_SQ) {
            s[j & 3] = fma(x, x, s[j & 3]); // explicit: the same rounding on every compiler
        } else if (MODE == MODE_POW) {
            s[j & 3] += pow_outlined(a / scale, p);
        }
    }
    __device__ __forceinline__ double sum() const { return (s[0] + s[1]) + (s[2] + s[3]); }
};

// Adds the V elements of one 16-byte vector.
template <int DT, int MODE, bool WANT_MAX, bool PRE>
__device__ __forceinline__ void add_vector(Acc<MODE, WANT_MAX>& acc, const Vec16<DT>& r, float inv) {
#pragma unroll
    for (int j = 0; j < Tr<DT>::V; ++j) acc.add(j, read_elem<DT, PRE>(r.r[j], inv));
}

// Reduces `n` (<= CHUNK_ELEMS) elements at `base` with one warp. Lane `lane` takes the 16-byte
// vectors lane, lane + 32, lane + 64, ... (vector index vi covers elements vi*V .. vi*V+V-1), in
// that order. Misaligned data and the partial last vector are read element by element with the
// same mapping, so the result only depends on the values, never on the address. With PRE, each
// element is first unscaled by `inv` (read_elem).
template <int DT, int MODE, bool WANT_MAX, bool PRE>
__device__ __forceinline__ void warp_reduce_chunk(const void* base, u64 n, int lane, double p,
                                                  double scale, float inv, double* out_sum, u64* out_max) {
    typedef typename Tr<DT>::raw raw;
    const int V = Tr<DT>::V;
    const raw* xs = (const raw*)base;
    Acc<MODE, WANT_MAX> acc(p, scale);
    const bool aligned = (((u64)base) & 15) == 0;
    const u64 per_round = (u64)WARP * V;
    // The general power is rare and each element costs a pow call: the element-by-element loop
    // below (same mapping, same order), not unrolled, keeps its code small.
    const u64 rounds = aligned && MODE != MODE_POW ? n / per_round : 0;
    const uint4* vs = (const uint4*)base;
    u64 k = 0;
    const int UNROLL = GRAD_CLIP_UNROLL;
    for (; k + UNROLL <= rounds; k += UNROLL) {
        Vec16<DT> r[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) r[u].v = __ldg(vs + (k + u) * WARP + lane);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) add_vector<DT, MODE, WANT_MAX, PRE>(acc, r[u], inv);
    }
    for (; k < rounds; ++k) {
        Vec16<DT> r;
        r.v = __ldg(vs + k * WARP + lane);
        add_vector<DT, MODE, WANT_MAX, PRE>(acc, r, inv);
    }
    if (MODE == MODE_POW) {
        for (u64 vi = lane; vi * V < n; vi += WARP) {
            const u64 e = vi * V;
#pragma unroll 1
            for (int j = 0; j < V; ++j) {
                if (e + j < n) acc.add(j, read_elem<DT, PRE>(xs[e + j], inv));
            }
        }
    } else {
        for (u64 vi = k * WARP + lane; vi * V < n; vi += WARP) {
            const u64 e = vi * V;
            if (aligned && e + V <= n) {
                Vec16<DT> r;
                r.v = __ldg(vs + vi);
                add_vector<DT, MODE, WANT_MAX, PRE>(acc, r, inv);
            } else {
#pragma unroll
                for (int j = 0; j < V; ++j) {
                    if (e + j < n) acc.add(j, read_elem<DT, PRE>(xs[e + j], inv));
                }
            }
        }
    }
    // Fixed-shape tree over the lanes.
    double s = acc.sum();
    u64 m = acc.m;
#pragma unroll
    for (int off = WARP / 2; off > 0; off /= 2) {
        s += __shfl_down_sync(0xffffffffu, s, off);
        u64 o = __shfl_down_sync(0xffffffffu, m, off);
        m = o > m ? o : m;
    }
    *out_sum = s;
    *out_max = m;
}

template <int MODE, bool WANT_MAX, bool PRE>
__device__ __forceinline__ void reduce_chunk_dt(u64 dtype, const void* base, u64 n, int lane, double p,
                                                double scale, float inv, double* s, u64* m) {
    switch (dtype) {
    case DT_F32: warp_reduce_chunk<DT_F32, MODE, WANT_MAX, PRE>(base, n, lane, p, scale, inv, s, m); break;
    case DT_F64: warp_reduce_chunk<DT_F64, MODE, WANT_MAX, PRE>(base, n, lane, p, scale, inv, s, m); break;
    case DT_F16: warp_reduce_chunk<DT_F16, MODE, WANT_MAX, PRE>(base, n, lane, p, scale, inv, s, m); break;
    default: warp_reduce_chunk<DT_BF16, MODE, WANT_MAX, PRE>(base, n, lane, p, scale, inv, s, m); break;
    }
}

// The reduction of one chunk, on the elements as read or (`prescale`) unscaled as read.
template <int MODE, bool WANT_MAX>
__device__ __forceinline__ void reduce_chunk_any(u64 dtype, const void* base, u64 n, int lane, double p,
                                                 double scale, bool pre, float inv, double* s, u64* m) {
    if (pre) reduce_chunk_dt<MODE, WANT_MAX, true>(dtype, base, n, lane, p, scale, inv, s, m);
    else reduce_chunk_dt<MODE, WANT_MAX, false>(dtype, base, n, lane, p, scale, inv, s, m);
}

// ---------------------------------------------------------------------------------------------
// Superaccumulator (src/ops/exact_sum.rs).

// Adds a non-negative f64, +inf or NaN with atomics: `digits` and `flags` are shared or global
// memory used by several threads.
__device__ __forceinline__ void exact_add(u64* digits, u32* flags, double x) {
    if (isnan(x)) {
        atomicOr(flags, 2u);
        return;
    }
    if (isinf(x)) {
        atomicOr(flags, 1u);
        return;
    }
    u64 bits = (u64)__double_as_longlong(x);
    u32 exponent = (u32)((bits >> 52) & 0x7ff);
    u64 fraction = bits & ((1ull << 52) - 1);
    u64 mantissa;
    u32 position;
    if (exponent == 0) {
        mantissa = fraction;
        position = 0;
    } else {
        mantissa = fraction | (1ull << 52);
        position = exponent - 1;
    }
    if (mantissa == 0) return;
    u32 digit = position / 32;
    u32 shift = position % 32;
    // mantissa < 2^53, shift < 32: the shifted value has < 85 bits.
    u64 lo = mantissa << shift;                        // bits 0..63
    u64 hi = shift == 0 ? 0 : (mantissa >> (64 - shift)); // bits 64..84
    atomicAdd(&digits[digit], lo & 0xffffffffull);
    atomicAdd(&digits[digit + 1], lo >> 32);
    if (hi != 0) atomicAdd(&digits[digit + 2], hi);
}

// 2^k for -1074 <= k <= 1023.
__device__ __forceinline__ double pow2(int k) {
    if (k >= -1022) return __longlong_as_double((long long)((u64)(k + 1023) << 52));
    return __longlong_as_double((long long)(1ull << (k + 1074)));
}

// The exact sum rounded once to the nearest f64 (ties to even), as ExactSum::value. `d` holds
// the digits and is modified (carries propagated).
__device__ double exact_value(u64* d, u32 flags) {
    if (flags & 2u) return __longlong_as_double(0x7ff8000000000000ll);
    if (flags & 1u) return __longlong_as_double(0x7ff0000000000000ll);
    u64 carry = 0;
    for (int i = 0; i < DIGITS; ++i) {
        u64 v = d[i] + carry;
        d[i] = v & 0xffffffffull;
        carry = v >> 32;
    }
    int top = -1;
    for (int i = DIGITS - 1; i >= 0; --i) {
        if (d[i] != 0) {
            top = i;
            break;
        }
    }
    if (top < 0) return 0.0;
    int low = top >= 2 ? top - 2 : 0;
    // 96-bit window of the three top digits: whi holds bits 64..95, wlo bits 0..63.
    u64 whi = 0, wlo = 0;
    for (int i = top; i >= low; --i) {
        whi = (whi << 32) | (wlo >> 32);
        wlo = (wlo << 32) | d[i];
    }
    bool sticky = false;
    for (int i = 0; i < low; ++i) sticky |= d[i] != 0;
    if (sticky) wlo |= 1;
    // Round the window to 53 bits, to nearest even (what `u128 as f64` does on the host).
    int nb = whi != 0 ? 128 - __clzll((long long)whi) : 64 - __clzll((long long)wlo);
    double w;
    if (nb <= 53) {
        w = __ull2double_rn(wlo); // exact
    } else {
        int sh = nb - 53; // 1 ..= 43
        u64 mant, rem, half;
        if (sh < 64) {
            mant = (wlo >> sh) | (sh == 0 ? 0 : (whi << (64 - sh)));
            rem = wlo & ((1ull << sh) - 1);
            half = 1ull << (sh - 1);
        } else { // unreachable: nb <= 96
            mant = whi >> (sh - 64);
            rem = 0;
            half = 1;
        }
        if (rem > half || (rem == half && (mant & 1))) mant += 1; // may reach 2^53: still exact
        w = __ull2double_rn(mant) * pow2(sh);
    }
    // Exact scaling by a power of two (overflow gives +inf, as on the host).
    return w * pow2(low * 32 - 1074);
}

__device__ __forceinline__ double root(double sum, double p) {
    if (p == 1.0) return sum;
    if (p == 2.0) return sqrt(sum);
    return pow_outlined(sum, 1.0 / p);
}

// clip_coefficient in src/backend/mod.rs: NaN or negative norm -> NaN (a negative "norm" given to
// clip_grads_with_norm_ poisons the gradients instead of flipping their signs; it is not read back);
// max_norm = inf -> 1; 0/0 -> 0; min(1, ...).
__device__ __forceinline__ double clip_coefficient(double norm, double max_norm, double eps) {
    if (isnan(norm) || norm < 0.0) return __longlong_as_double(0x7ff8000000000000ll);
    if (isinf(max_norm)) return 1.0;
    double c = max_norm / (norm + eps);
    if (isnan(c)) return 0.0;
    return c < 1.0 ? c : 1.0;
}


template <typename Seg>
__device__ __forceinline__ u32 find_segment(const Seg* segs, u32 n_segs, u64 chunk) {
    u32 lo = 0, hi = n_segs - 1; // largest s with chunk_start <= chunk
    while (lo < hi) {
        u32 mid = (lo + hi + 1) / 2;
        if (segs[mid].chunk_start <= chunk) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

// The chunks of the calling warp: a contiguous range [chunk, end) of the n_chunks (the ranges of
// all warps of the grid differ in length by at most one), walked in order along the table. Only
// the first chunk's segment is searched for; the next ones are found by stepping forward.
// `Seg` is any table entry with `len` and `chunk_start` (Segment, UpdateSegment).
template <typename Seg> struct WarpChunks {
    const Seg* segs;
    u32 n_segs;
    u32 s;
    u64 chunk, end;
    __device__ __forceinline__ WarpChunks(const Seg* segs_, u32 n_segs_, u64 n_chunks) : segs(segs_), n_segs(n_segs_), s(0) {
        const u64 warps_per_block = blockDim.x / WARP;
        const u64 total = (u64)gridDim.x * warps_per_block;
        const u64 w = (u64)blockIdx.x * warps_per_block + threadIdx.x / WARP;
        const u64 base = n_chunks / total, extra = n_chunks % total;
        chunk = w * base + (w < extra ? w : extra);
        end = chunk + base + (w < extra ? 1 : 0);
        if (chunk < end) s = find_segment(segs, n_segs, chunk);
    }
    __device__ __forceinline__ bool more() const { return chunk < end; }
    // The segment of the current chunk, and the chunk's first element and length in it.
    __device__ __forceinline__ Seg current(u64* start, u64* n) {
        while (s + 1 < n_segs && segs[s + 1].chunk_start <= chunk) ++s;
        const Seg seg = segs[s];
        *start = (chunk - seg.chunk_start) * CHUNK_ELEMS;
        const u64 left = seg.len - *start;
        *n = left < CHUNK_ELEMS ? left : CHUNK_ELEMS;
        return seg;
    }
    __device__ __forceinline__ void next() { ++chunk; }
};

__device__ __forceinline__ int elem_bytes(u64 dtype) { return dtype == DT_F64 ? 8 : (dtype == DT_F32 ? 4 : 2); }

// Called once by every thread of every block after the block's last global write; true (in every
// thread of that block) for the last block to get here, which then sees every other block's
// writes (each fenced before counting) and has reset `counter` to zero for the next launch.
__device__ __forceinline__ bool last_block(u64* counter) {
    __shared__ int s_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        u64 done = atomicAdd(counter, 1ull);
        s_last = done == (u64)gridDim.x - 1;
        if (s_last) atomicExch(counter, 0ull); // every block has counted: none reads it again
    }
    __syncthreads();
    if (!s_last) return false;
    __threadfence();
    return true;
}

// ---------------------------------------------------------------------------------------------
// The reduction, one entry point per MODE_*. Pass 0 is the normal reduction; pass 1 is the overflow
// rescue, launched as grad_clip_reduce_pow right after pass 0 and returning at once unless pass 0
// left `pending` set (it then computes sum (|x| / max)^p). `rescue` != 0 lets
// pass 0 ask for the rescue (F64 gradients or p > 6, as on the host): it then also tracks max |x|.
// The last block writes the norm to `out` (f32 when out_f64 == 0, else f64) and the coefficient
// to scratch, unless it asked for the rescue pass, which then does it. When `partials` is not
// null (pass 0 only), every chunk's partial (its sum, or its max |x| for MODE_INF) is also stored
// at partials[chunk], for grad_clip_segment_norms. When `prescale` is not null (GradScaler's
// one-read path), it is the address of the f32 inv_scale: every element is unscaled as it is read
// (read_elem), so the norm and the non-finite flag are those of the unscaled gradients; nothing is
// written to them.
template <int MODE>
__device__ __forceinline__ void reduce_body(const Segment* __restrict__ segs, u32 n_segs, u64 n_chunks,
                                            Scratch* scratch, void* out, u32 out_f64, double p, u32 pass,
                                            u32 rescue, double max_norm, double eps, double* partials,
                                            const float* prescale) {
    __shared__ u64 s_digits[DIGITS];
    __shared__ u64 s_max;
    __shared__ u32 s_flags;

    if (pass == 1) {
        // Written by the previous launch on this stream: visible at kernel start.
        if (scratch->pending == 0) return; // uniform over the grid: no block counts, none finalises
        rescue = 0;
    }
    const double scale = pass == 1 ? scratch->scale : 1.0;
    const bool pre = prescale != nullptr;
    const float inv = pre ? *prescale : 1.0f;
    const int tid = threadIdx.x;
    for (int i = tid; i < DIGITS; i += blockDim.x) s_digits[i] = 0;
    if (tid == 0) {
        s_max = 0;
        s_flags = 0;
    }
    __syncthreads();

    const int lane = tid % WARP;
    const bool want_max = rescue != 0;
    if (pass == 1) partials = nullptr;
    for (WarpChunks<Segment> w(segs, n_segs, n_chunks); w.more(); w.next()) {
        u64 start, n;
        const Segment seg = w.current(&start, &n);
        const void* base = (const void*)(seg.ptr + start * elem_bytes(seg.dtype));
        double s = 0.0;
        u64 m = 0;
        if (MODE == MODE_INF || want_max) {
            reduce_chunk_any<MODE, true>(seg.dtype, base, n, lane, p, scale, pre, inv, &s, &m);
        } else {
            reduce_chunk_any<MODE, false>(seg.dtype, base, n, lane, p, scale, pre, inv, &s, &m);
        }
        if (lane == 0) {
            if (MODE != MODE_INF) exact_add(s_digits, &s_flags, s);
            if (MODE == MODE_INF || want_max) atomicMax(&s_max, m);
            if (partials) partials[w.chunk] = MODE == MODE_INF ? __longlong_as_double((long long)m) : s;
        }
    }
    __syncthreads();

    // Flush the block's accumulator into the global one (exact, order-independent).
    for (int i = tid; i < DIGITS; i += blockDim.x) {
        if (s_digits[i] != 0) atomicAdd(&scratch->digits[i], s_digits[i]);
    }
    if (tid == 0) {
        if (s_flags != 0) atomicOr(&scratch->flags, (u64)s_flags);
        if (s_max != 0) atomicMax(&scratch->max_bits, s_max);
    }
    if (!last_block(&scratch->counter)) return;

    // Last block: every other block's atomics are done. Read and reset the accumulator for the
    // next call.
    for (int i = tid; i < DIGITS; i += blockDim.x) s_digits[i] = atomicExch(&scratch->digits[i], 0ull);
    if (tid == 0) {
        s_flags = (u32)atomicExch(&scratch->flags, 0ull);
        s_max = atomicExch(&scratch->max_bits, 0ull);
    }
    __syncthreads();
    if (tid != 0) return;

    double norm;
    if (MODE == MODE_INF) {
        norm = __longlong_as_double((long long)s_max);
    } else {
        const double sum = exact_value(s_digits, s_flags);
        if (pass == 0 && rescue && !isnan(sum) && (isinf(sum) || sum < TINY_SUM)) {
            const double mx = __longlong_as_double((long long)s_max);
            if (mx == 0.0 || isinf(mx) || isnan(mx)) {
                norm = mx;
            } else {
                scratch->scale = mx;
                scratch->pending = 1;
                return;
            }
        } else if (pass == 1) {
            // The largest term is exactly 1, so the sum lies in [1, n] for any p.
            norm = root(sum, p) * scale;
            scratch->pending = 0;
        } else {
            norm = root(sum, p);
        }
    }
    // Pass 0 always leaves `pending` clear when it finalises (even if an earlier call's rescue
    // launch never ran), so that a later rescue pass cannot act on a stale request.
    if (pass == 0) scratch->pending = 0;
    if (out_f64) *(double*)out = norm;
    else *(float*)out = __double2float_rn(norm);
    scratch->coefficient = clip_coefficient(norm, max_norm, eps);
    scratch->nonfinite = isfinite(norm) ? 0 : 1;
}

// One entry point per mode, so that the common L2 path gets the registers it needs and no more.
#define REDUCE_ENTRY(NAME, MODE)                                                                            \
    extern "C" __global__ void NAME(const Segment* __restrict__ segs, u32 n_segs,      \
                                                           u64 n_chunks, Scratch* scratch, void* out,        \
                                                           u32 out_f64, double p, u32 pass, u32 rescue,      \
                                                           double max_norm, double eps, double* partials,   \
                                                           const float* prescale) {                         \
        reduce_body<MODE>(segs, n_segs, n_chunks, scratch, out, out_f64, p, pass, rescue, max_norm, eps,     \
                          partials, prescale);                                                             \
    }
REDUCE_ENTRY(grad_clip_reduce_inf, MODE_INF)
REDUCE_ENTRY(grad_clip_reduce_abs, MODE_ABS)
REDUCE_ENTRY(grad_clip_reduce_sq, MODE_SQ)
REDUCE_ENTRY(grad_clip_reduce_pow, MODE_POW)

// ---------------------------------------------------------------------------------------------
// In-place element-wise passes.

#define OP_SCALE 0
#define OP_CLAMP 1

// Where the scale coefficient comes from: COEF_SCRATCH reads Scratch::coefficient; COEF_NORM_* read
// a 0-d norm of that dtype and compute clip_coefficient(norm, max_norm, eps) (clip_grads_with_norm_).
#define COEF_SCRATCH 0
#define COEF_NORM_F32 1
#define COEF_NORM_F64 2
#define COEF_NORM_F16 3
#define COEF_NORM_BF16 4

// A 0-d norm of kind COEF_NORM_* at `src`, exactly, as f64.
__device__ __forceinline__ double load_norm(const void* src, u32 kind) {
    switch (kind) {
    case COEF_NORM_F32: return (double)*(const float*)src;
    case COEF_NORM_F64: return *(const double*)src;
    case COEF_NORM_F16: return Tr<DT_F16>::to_f64(*(const unsigned short*)src);
    default: return Tr<DT_BF16>::to_f64(*(const unsigned short*)src);
    }
}

__device__ __forceinline__ double load_coefficient(const void* src, u32 kind, double max_norm, double eps) {
    if (kind == COEF_SCRATCH) return ((const Scratch*)src)->coefficient;
    return clip_coefficient(load_norm(src, kind), max_norm, eps);
}

template <int DT> struct ElemOp {
    typedef typename Tr<DT>::raw raw;
    u32 op;
    double c;     // OP_SCALE: the coefficient
    double bound; // OP_CLAMP: the bound, representable in DT
    raw hi, lo;
    __device__ __forceinline__ ElemOp(u32 op_, double c_, double bound_) : op(op_), c(c_), bound(bound_) {
        hi = Tr<DT>::from_f64(bound_);
        lo = Tr<DT>::from_f64(-bound_);
    }
    __device__ __forceinline__ raw operator()(raw u) const {
        const double v = Tr<DT>::to_f64(u);
        if (op == OP_SCALE) return Tr<DT>::from_f64(__dmul_rn(v, c)); // one rounding to DT
        // Comparisons with NaN are false: NaN stays NaN.
        if (v > bound) return hi;
        if (v < -bound) return lo;
        return u;
    }
    // Applies the operation to the element at `x` in place: scaling always stores, clamping only a
    // changed value.
    __device__ __forceinline__ void apply(raw* x) const {
        const raw old = *x;
        const raw nu = (*this)(old);
        if (nu != old || op == OP_SCALE) *x = nu;
    }
};

// The new value of a 16-byte vector; true when some element changed.
template <int DT>
__device__ __forceinline__ bool apply_vector(const ElemOp<DT>& f, Vec16<DT>& r) {
    Vec16<DT> old = r;
#pragma unroll
    for (int j = 0; j < Tr<DT>::V; ++j) r.r[j] = f(r.r[j]);
    return r.v.x != old.v.x || r.v.y != old.v.y || r.v.z != old.v.z || r.v.w != old.v.w;
}

// Applies the operation to `n` (<= CHUNK_ELEMS) elements at `base` with one warp, lanes mapped to
// 16-byte vectors as in warp_reduce_chunk, GRAD_CLIP_UNROLL loads in flight per lane. Scaling
// rewrites every element; clamping stores only the vectors it changed (most values lie inside the
// bounds).
template <int DT>
__device__ __forceinline__ void warp_apply_chunk(void* base, u64 n, int lane, u32 op, double c, double bound) {
    typedef typename Tr<DT>::raw raw;
    const int V = Tr<DT>::V;
    const ElemOp<DT> f(op, c, bound);
    raw* xs = (raw*)base;
    uint4* vs = (uint4*)base;
    const bool aligned = (((u64)base) & 15) == 0;
    const u64 rounds = aligned ? n / ((u64)WARP * V) : 0;
    u64 k = 0;
    for (; k + GRAD_CLIP_UNROLL <= rounds; k += GRAD_CLIP_UNROLL) {
        Vec16<DT> r[GRAD_CLIP_UNROLL];
#pragma unroll
        for (int u = 0; u < GRAD_CLIP_UNROLL; ++u) r[u].v = vs[(k + u) * WARP + lane];
#pragma unroll
        for (int u = 0; u < GRAD_CLIP_UNROLL; ++u) {
            if (apply_vector<DT>(f, r[u]) || f.op == OP_SCALE) vs[(k + u) * WARP + lane] = r[u].v;
        }
    }
    for (u64 vi = k * WARP + lane; vi * V < n; vi += WARP) {
        const u64 e = vi * V;
        if (aligned && e + V <= n) {
            Vec16<DT> r;
            r.v = vs[vi];
            if (apply_vector<DT>(f, r) || f.op == OP_SCALE) vs[vi] = r.v;
        } else {
#pragma unroll 1
            for (int j = 0; j < V; ++j) {
                if (e + j < n) f.apply(xs + e + j);
            }
        }
    }
}

// Applies OP_SCALE (with the coefficient from `coef_src`; nothing at all when it is >= 1, so a NaN
// coefficient does scale) or OP_CLAMP to every element of every segment. The segments are disjoint
// (merged per storage on the host), so each element is written once.
extern "C" __global__ void grad_clip_apply(const Segment* __restrict__ segs, u32 n_segs, u64 n_chunks, u32 op,
                                           const void* coef_src, u32 coef_kind, double max_norm, double eps,
                                           Bounds bounds) {
    double c = 1.0;
    if (op == OP_SCALE) {
        c = load_coefficient(coef_src, coef_kind, max_norm, eps);
        if (c >= 1.0) return;
    }
    const int lane = threadIdx.x % WARP;
    for (WarpChunks<Segment> w(segs, n_segs, n_chunks); w.more(); w.next()) {
        u64 start, n;
        const Segment seg = w.current(&start, &n);
        void* base = (void*)(seg.ptr + start * elem_bytes(seg.dtype));
        switch (seg.dtype) {
        case DT_F32: warp_apply_chunk<DT_F32>(base, n, lane, op, c, bounds.b[DT_F32]); break;
        case DT_F64: warp_apply_chunk<DT_F64>(base, n, lane, op, c, bounds.b[DT_F64]); break;
        case DT_F16: warp_apply_chunk<DT_F16>(base, n, lane, op, c, bounds.b[DT_F16]); break;
        default: warp_apply_chunk<DT_BF16>(base, n, lane, op, c, bounds.b[DT_BF16]); break;
        }
    }
}

template <int DT>
__device__ __forceinline__ void strided_apply(void* base, u64 n, u32 rank, const StridedView& view, u32 op,
                                              double c, double bound) {
    typedef typename Tr<DT>::raw raw;
    const ElemOp<DT> f(op, c, bound);
    raw* xs = (raw*)base;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 rem = i, off = 0;
        for (int d = (int)rank - 1; d >= 0; --d) {
            const u64 dim = view.dims[d];
            off += (rem % dim) * view.strides[d];
            rem /= dim;
        }
        f.apply(xs + off);
    }
}

// The same for one strided view without repeated elements (`base` points at its start offset).
extern "C" __global__ void grad_clip_apply_strided(u64 base, u32 dtype, u64 n, u32 rank, StridedView view,
                                                   u32 op, const void* coef_src, u32 coef_kind, double max_norm,
                                                   double eps, Bounds bounds) {
    double c = 1.0;
    if (op == OP_SCALE) {
        c = load_coefficient(coef_src, coef_kind, max_norm, eps);
        if (c >= 1.0) return;
    }
    switch (dtype) {
    case DT_F32: strided_apply<DT_F32>((void*)base, n, rank, view, op, c, bounds.b[DT_F32]); break;
    case DT_F64: strided_apply<DT_F64>((void*)base, n, rank, view, op, c, bounds.b[DT_F64]); break;
    case DT_F16: strided_apply<DT_F16>((void*)base, n, rank, view, op, c, bounds.b[DT_F16]); break;
    default: strided_apply<DT_BF16>((void*)base, n, rank, view, op, c, bounds.b[DT_BF16]); break;
    }
}

// ---------------------------------------------------------------------------------------------
// Per-tensor norms (grad_norms): one warp per segment combines the chunk partials that the
// reduction stored (`partials`, indexed by chunk) into that segment's norm, exactly as the total is
// combined (a superaccumulator per warp in shared memory, exact with atomics; the max for
// MODE_INF), and writes it as f32 to out[segment]. Only for plans without the rescue pass (the
// host checks).
#define MAX_WARPS 32
extern "C" __global__ void grad_clip_segment_norms(const Segment* __restrict__ segs, u32 n_segs, u64 n_chunks,
                                                   const double* __restrict__ partials, float* out, u32 mode,
                                                   double p) {
    __shared__ u64 s_digits[MAX_WARPS][DIGITS];
    __shared__ u32 s_flags[MAX_WARPS];
    __shared__ u64 s_max[MAX_WARPS];
    const u64 warps_per_block = blockDim.x / WARP;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    // The same segments for every lane of a warp: the warp calls below are reached by all lanes.
    for (u64 i = (u64)blockIdx.x * warps_per_block + warp; i < n_segs; i += (u64)gridDim.x * warps_per_block) {
        for (int d = lane; d < DIGITS; d += WARP) s_digits[warp][d] = 0;
        if (lane == 0) {
            s_flags[warp] = 0;
            s_max[warp] = 0;
        }
        __syncwarp();
        const u64 first = segs[i].chunk_start;
        const u64 last = i + 1 < n_segs ? segs[i + 1].chunk_start : n_chunks;
        for (u64 c = first + lane; c < last; c += WARP) {
            if (mode == MODE_INF) atomicMax(&s_max[warp], (u64)__double_as_longlong(partials[c]));
            else exact_add(s_digits[warp], &s_flags[warp], partials[c]);
        }
        __syncwarp();
        if (lane == 0) {
            const double norm = mode == MODE_INF ? __longlong_as_double((long long)s_max[warp])
                                                 : root(exact_value(s_digits[warp], s_flags[warp]), p);
            out[i] = __double2float_rn(norm);
        }
        __syncwarp();
    }
}

// ---------------------------------------------------------------------------------------------
// Fused optimizer steps (src/ops/fused_step.rs; the CPU twin is src/backend/cpu/fused_step/): one
// pass over every (parameter, gradient, state) of a table, the clip folded in. The gradient is
// clipped on the way in exactly as grad_clip_apply would write it, and never written.
//
// Arithmetic: F32 and F64 vars compute in their own type with candle's CUDA op sequence, so that
// a step is bitwise candle_nn::AdamW / SGD on CUDA: candle's `tensor * c` and `tensor + c` are its
// affine kernel, which nvcc compiles to one fma (x * c + 0, x * 1 + c); sqr, sqrt, add, sub, div
// are each one IEEE operation. F16 and BF16 vars compute in f32 with f32 state and separate
// roundings (the CPU twin's sequence, so both back ends agree bitwise), and round the new
// parameter once. Every operation is spelled as an intrinsic: no compiler may contract them.

#define RULE_ADAMW 0
#define RULE_SGD 1       // torch.optim.SGD: weight decay, momentum, dampening, Nesterov
#define RULE_SGD_PLAIN 2 // momentum and weight decay off: p - g * lr, as candle's SGD

#define TRANSFORM_NONE 0
#define TRANSFORM_SCALE 1 // by the verdict's coefficient when it is below 1 (or NaN)
#define TRANSFORM_CLAMP 2 // into [-max_norm, max_norm], the bound rounded towards zero per dtype
#define TRANSFORM_AGC 3   // each unit by its coefficient from grad_clip_agc (verdict_src: AgcUnits)

#define VERDICT_NONE 0    // no reduction ran: nothing clipped, nothing non-finite seen
#define VERDICT_SCRATCH 1 // the coefficient and non-finite flag the reduction left in the scratch
#define VERDICT_NORM 2    // a 0-d norm (verdict_src, verdict_kind: COEF_NORM_*)

// The control tensor (I64, src/ops/fused_step.rs): steps, clipped steps, skipped steps, then one
// flag per var: its state has been updated at least once.
#define CONTROL_WORDS 3

struct UpdateSegment {
    u64 param;       // address of the var's first element (dtype `dtype`)
    u64 grad;        // of its gradient's (same dtype, contiguous)
    u64 state0;      // of its state tensors (f32, or f64 for F64 vars); 0 without
    u64 state1;
    u64 len;         // elements (0 for an empty var: listed for its control flag)
    u64 chunk_start; // first chunk (of CHUNK_ELEMS elements), as in Segment
    u64 dtype;       // DT_* of the var and its gradient
    u64 var;         // the var's index: its flag in the control tensor
};

struct StepParams {
    double lr, beta1, beta2, eps, weight_decay, momentum, dampening, nesterov;
};

template <typename C> struct Arith;
template <> struct Arith<float> {
    static __device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
    static __device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
    static __device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
    static __device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
    static __device__ __forceinline__ float sqrt_(float a) { return __fsqrt_rn(a); }
    static __device__ __forceinline__ float fma_(float a, float b, float c) { return __fmaf_rn(a, b, c); }
    static __device__ __forceinline__ float from_f64(double d) { return __double2float_rn(d); }
};
template <> struct Arith<double> {
    static __device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
    static __device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
    static __device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
    static __device__ __forceinline__ double div(double a, double b) { return __ddiv_rn(a, b); }
    static __device__ __forceinline__ double sqrt_(double a) { return __dsqrt_rn(a); }
    static __device__ __forceinline__ double fma_(double a, double b, double c) { return __fma_rn(a, b, c); }
    static __device__ __forceinline__ double from_f64(double d) { return d; }
};

// candle's affine `x * mul + add`: one fma for F32/F64 (candle's CUDA kernel), two roundings for
// the F16/BF16 compute (the CPU twin's).
template <typename C, bool FUSED> __device__ __forceinline__ C affine(C x, C mul, C add) {
    typedef Arith<C> A;
    return FUSED ? A::fma_(x, mul, add) : A::add(A::mul(x, mul), add);
}

// a^b as Rust's f64::powi computes it on the host (compiler-builtins' __powidf2, the same
// multiplications in the same order as libgcc's), so that the bias corrections are bitwise
// candle's.
__device__ __forceinline__ double powi(double a, int b) {
    const bool recip = b < 0;
    unsigned int n = recip ? 0u - (unsigned int)b : (unsigned int)b;
    double r = 1.0;
    for (;;) {
        if (n & 1u) r = __dmul_rn(r, a);
        n >>= 1;
        if (n == 0) break;
        a = __dmul_rn(a, a);
    }
    return recip ? __ddiv_rn(1.0, r) : r;
}

// The rule's constants in the compute type, for step t (as the CPU twin's `Consts::new`).
template <typename C> struct StepConsts {
    C b1, omb1, b2, omb2, scale_m, scale_v, eps, decay, lr, mu, omd, wd, zero, one;
    __device__ __forceinline__ StepConsts(const StepParams& hp, long long t) {
        typedef Arith<C> A;
        b1 = A::from_f64(hp.beta1);
        omb1 = A::from_f64(__dsub_rn(1.0, hp.beta1));
        b2 = A::from_f64(hp.beta2);
        omb2 = A::from_f64(__dsub_rn(1.0, hp.beta2));
        scale_m = A::from_f64(__ddiv_rn(1.0, __dsub_rn(1.0, powi(hp.beta1, (int)t))));
        scale_v = A::from_f64(__ddiv_rn(1.0, __dsub_rn(1.0, powi(hp.beta2, (int)t))));
        eps = A::from_f64(hp.eps);
        decay = A::from_f64(__dsub_rn(1.0, __dmul_rn(hp.lr, hp.weight_decay)));
        lr = A::from_f64(hp.lr);
        mu = A::from_f64(hp.momentum);
        omd = A::from_f64(__dsub_rn(1.0, hp.dampening));
        wd = A::from_f64(hp.weight_decay);
        zero = A::from_f64(0.0);
        one = A::from_f64(1.0);
    }
};

// One chunk of one var, element by element (lane, lane + 32, ...); with `pre` (GradScaler's
// one-read path) each gradient is first unscaled by `inv` (read_elem) and written back; when
// `change`, each gradient goes through the clip (`op`, `c`, the bound for DT).
template <int DT, typename C, bool FUSED>
__device__ __forceinline__ void step_chunk(const UpdateSegment& seg, u64 start, u64 n, int lane, u32 rule,
                                           const StepParams& hp, const StepConsts<C>& k, bool change, u32 op,
                                           double c, const Bounds& bounds, bool has_state,
                                           const double* unit_coefs, u64 unit_len, bool pre, float inv) {
    typedef typename Tr<DT>::raw raw;
    typedef Arith<C> A;
    const ElemOp<DT> clip(op, c, bounds.b[DT]);
    raw* p = (raw*)seg.param + start;
    raw* g = (raw*)seg.grad + start;
    C* s0 = seg.state0 ? (C*)seg.state0 + start : (C*)0;
    C* s1 = seg.state1 ? (C*)seg.state1 + start : (C*)0;
    for (u64 e = lane; e < n; e += WARP) {
        raw gr = g[e];
        if (pre) {
            gr = Tr<DT>::from_f64(read_elem<DT, true>(gr, inv)); // exact: already in DT
            g[e] = gr;
        }
        if (change) gr = clip(gr);
        if (unit_coefs) { // TRANSFORM_AGC: the coefficient of the element's unit, when it clips
            const u64 i = start + e;
            // 32-bit division when both fit (far cheaper on a GPU than 64-bit).
            const u64 unit = ((i | unit_len) >> 32) == 0 ? (u64)((u32)i / (u32)unit_len) : i / unit_len;
            const double cu = unit_coefs[unit];
            if (cu < 1.0) gr = Tr<DT>::from_f64(__dmul_rn(Tr<DT>::to_f64(gr), cu));
        }
        const C gc = (C)Tr<DT>::to_f64(gr);
        const C x = (C)Tr<DT>::to_f64(p[e]);
        C next;
        if (rule == RULE_ADAMW) {
            const C m = A::add(affine<C, FUSED>(s0[e], k.b1, k.zero), affine<C, FUSED>(gc, k.omb1, k.zero));
            const C v = A::add(affine<C, FUSED>(s1[e], k.b2, k.zero),
                               affine<C, FUSED>(A::mul(gc, gc), k.omb2, k.zero));
            const C m_hat = affine<C, FUSED>(m, k.scale_m, k.zero);
            const C v_hat = affine<C, FUSED>(v, k.scale_v, k.zero);
            const C adjusted = A::div(m_hat, affine<C, FUSED>(A::sqrt_(v_hat), k.one, k.eps));
            next = A::sub(affine<C, FUSED>(x, k.decay, k.zero), affine<C, FUSED>(adjusted, k.lr, k.zero));
            s0[e] = m;
            s1[e] = v;
        } else if (rule == RULE_SGD_PLAIN) {
            next = A::sub(x, affine<C, FUSED>(gc, k.lr, k.zero));
        } else {
            C d = gc;
            if (hp.weight_decay != 0.0) d = A::add(d, A::mul(k.wd, x));
            if (hp.momentum != 0.0) {
                const C b = has_state ? A::add(A::mul(s0[e], k.mu), A::mul(k.omd, d)) : d;
                s0[e] = b;
                d = hp.nesterov != 0.0 ? A::add(d, A::mul(k.mu, b)) : b;
            }
            next = A::sub(x, A::mul(k.lr, d));
        }
        p[e] = Tr<DT>::from_f64((double)next);
    }
}

// GradScaler's one-read path on a skipped step: one chunk of a gradient unscaled in place.
template <int DT> __device__ __forceinline__ void unscale_chunk(u64 grad, u64 start, u64 n, int lane, float inv) {
    typedef typename Tr<DT>::raw raw;
    raw* g = (raw*)grad + start;
    for (u64 e = lane; e < n; e += WARP) g[e] = Tr<DT>::from_f64(read_elem<DT, true>(g[e], inv));
}

// One step over the table: `rule` with `hp`; the gradients clipped by `transform` according to
// the verdict; nothing changes (but the skipped-step count) when `skip_nonfinite` and the verdict
// saw a non-finite norm. With `prescale` (GradScaler's one-read path: the address of the f32
// inv_scale), every gradient element is unscaled as it is read and written back, on a skipped step
// too. The step count t (bias corrections) and SGD's "state exists" flags come
// from the control tensor; the last block to finish updates it, after every block has read it.
extern "C" __global__ void grad_clip_fused_step(const UpdateSegment* __restrict__ segs, u32 n_segs, u64 n_chunks,
                                                u32 rule, StepParams hp, u32 transform, u32 verdict,
                                                const void* verdict_src, u32 verdict_kind, double max_norm,
                                                double eps, Bounds bounds, u32 skip_nonfinite, Scratch* scratch,
                                                long long* control, const float* prescale) {
    const bool pre = prescale != nullptr;
    const float inv = pre ? *prescale : 1.0f;
    double c = 1.0, norm = 0.0;
    bool nonfinite = false;
    if (verdict == VERDICT_SCRATCH) {
        c = scratch->coefficient;
        nonfinite = scratch->nonfinite != 0;
    } else if (verdict == VERDICT_NORM) {
        norm = load_norm(verdict_src, verdict_kind);
        c = clip_coefficient(norm, max_norm, eps);
        nonfinite = !isfinite(norm);
    }
    const bool skip = skip_nonfinite != 0 && nonfinite;
    const bool clipped = transform == TRANSFORM_SCALE || transform == TRANSFORM_AGC ? !(c >= 1.0)
                         : transform == TRANSFORM_CLAMP ? !(norm <= max_norm)
                                                        : false;
    // Clamp always; scale only below 1 (as clip_grad_norm_, which writes nothing otherwise).
    const bool change = transform == TRANSFORM_CLAMP || (transform == TRANSFORM_SCALE && clipped);
    const u32 op = transform == TRANSFORM_CLAMP ? OP_CLAMP : OP_SCALE;
    const long long t = control[0] + 1;
    if (!skip) {
        const StepConsts<float> kf(hp, t);
        const StepConsts<double> kd(hp, t);
        const int lane = threadIdx.x % WARP;
        for (WarpChunks<UpdateSegment> w(segs, n_segs, n_chunks); w.more(); w.next()) {
            u64 start, n;
            const UpdateSegment seg = w.current(&start, &n);
            const bool has_state = control[CONTROL_WORDS + seg.var] != 0;
            // TRANSFORM_AGC: verdict_src is the AgcUnits of the table (coefficient buffer, then
            // each segment's unit length and first unit).
            const double* unit_coefs = 0;
            u64 unit_len = 1;
            if (transform == TRANSFORM_AGC && seg.len > 0) {
                const u64* units = (const u64*)verdict_src;
                unit_len = units[1 + 2 * w.s];
                unit_coefs = (const double*)units[0] + units[2 + 2 * w.s];
            }
            switch (seg.dtype) {
            case DT_F32: step_chunk<DT_F32, float, true>(seg, start, n, lane, rule, hp, kf, change, op, c, bounds, has_state, unit_coefs, unit_len, pre, inv); break;
            case DT_F64: step_chunk<DT_F64, double, true>(seg, start, n, lane, rule, hp, kd, change, op, c, bounds, has_state, unit_coefs, unit_len, pre, inv); break;
            case DT_F16: step_chunk<DT_F16, float, false>(seg, start, n, lane, rule, hp, kf, change, op, c, bounds, has_state, unit_coefs, unit_len, pre, inv); break;
            default: step_chunk<DT_BF16, float, false>(seg, start, n, lane, rule, hp, kf, change, op, c, bounds, has_state, unit_coefs, unit_len, pre, inv); break;
            }
        }
    } else if (pre) {
        // A skipped step leaves the store unscaled too (as the CPU twin), and nothing else changed.
        const int lane = threadIdx.x % WARP;
        for (WarpChunks<UpdateSegment> w(segs, n_segs, n_chunks); w.more(); w.next()) {
            u64 start, n;
            const UpdateSegment seg = w.current(&start, &n);
            switch (seg.dtype) {
            case DT_F32: unscale_chunk<DT_F32>(seg.grad, start, n, lane, inv); break;
            case DT_F64: unscale_chunk<DT_F64>(seg.grad, start, n, lane, inv); break;
            case DT_F16: unscale_chunk<DT_F16>(seg.grad, start, n, lane, inv); break;
            default: unscale_chunk<DT_BF16>(seg.grad, start, n, lane, inv); break;
            }
        }
    }
    if (!last_block(&scratch->counter)) return;
    const bool has_state_rule = rule == RULE_ADAMW || (rule == RULE_SGD && hp.momentum != 0.0);
    if (!skip && has_state_rule) {
        for (u64 i = threadIdx.x; i < n_segs; i += blockDim.x) control[CONTROL_WORDS + segs[i].var] = 1;
    }
    if (threadIdx.x == 0) {
        if (skip) {
            control[2] += 1;
        } else {
            control[0] = t;
            control[1] += clipped ? 1 : 0;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ZClip (src/policy/zclip.rs; its CPU twin `update` there is the reference): one thread reads the
// norm the reduction left in `norm_src`, copies the statistics from `state_in` to `state_out` and
// updates them there, and leaves the coefficient in Scratch::coefficient for the scaling pass or
// the fused step that follows on the stream. Every operation is spelled as an intrinsic, in the
// twin's order: no compiler may contract or reorder them.

#define ZCLIP_READY 0
#define ZCLIP_COLLECTED 1
#define ZCLIP_MEAN 2
#define ZCLIP_VAR 3
#define ZCLIP_LAST_COEFFICIENT 4
#define ZCLIP_HEADER 5
#define ZCLIP_EPS 1e-6

extern "C" __global__ void grad_clip_zclip(const double* __restrict__ state_in, double* __restrict__ state_out,
                                           u32 words, const void* norm_src, u32 norm_kind, Scratch* scratch,
                                           double alpha, double z_threshold, u32 mean_mode, double max_grad_norm) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double* s = state_out;
    for (u32 i = 0; i < words; ++i) s[i] = state_in[i];
    const u32 warmup = words - ZCLIP_HEADER;
    double norm = load_norm(norm_src, norm_kind);
    // An F32 norm of finite gradients (the reduction's f64 norm was finite) that overflowed: a
    // spike at f32's largest value, not a non-finite step (zclip::input).
    if (norm_kind == COEF_NORM_F32 && isinf(norm) && scratch->nonfinite == 0) norm = 3.4028234663852886e38; // f32::MAX, exactly
    double c;
    if (!isfinite(norm)) {
        // Neither enters the statistics nor counts as a warm-up step.
        c = clip_coefficient(norm, max_grad_norm, ZCLIP_EPS);
    } else if (s[ZCLIP_READY] == 0.0) {
        const u32 k = (u32)s[ZCLIP_COLLECTED];
        s[ZCLIP_HEADER + k] = norm;
        s[ZCLIP_COLLECTED] = (double)(k + 1);
        if (k + 1 >= warmup) {
            double sum = 0.0;
            for (u32 i = 0; i < warmup; ++i) sum = __dadd_rn(sum, s[ZCLIP_HEADER + i]);
            const double mean = __ddiv_rn(sum, (double)warmup);
            double squares = 0.0;
            for (u32 i = 0; i < warmup; ++i) {
                const double d = __dsub_rn(s[ZCLIP_HEADER + i], mean);
                squares = __dadd_rn(squares, __dmul_rn(d, d));
            }
            s[ZCLIP_MEAN] = mean;
            s[ZCLIP_VAR] = __ddiv_rn(squares, (double)warmup);
            s[ZCLIP_READY] = 1.0;
        }
        c = clip_coefficient(norm, max_grad_norm, ZCLIP_EPS);
    } else {
        const double mean = s[ZCLIP_MEAN];
        const double sd = __dsqrt_rn(s[ZCLIP_VAR]);
        const double z = __ddiv_rn(__dsub_rn(norm, mean), __dadd_rn(sd, ZCLIP_EPS));
        double x = norm;
        if (z > z_threshold) {
            x = mean_mode ? mean
                          : __dadd_rn(mean, __ddiv_rn(__dmul_rn(z_threshold, sd), __ddiv_rn(z, z_threshold)));
        }
        const double effective = max_grad_norm < x ? max_grad_norm : x;
        const double one_minus_alpha = __dsub_rn(1.0, alpha);
        const double new_mean = __dadd_rn(__dmul_rn(alpha, mean), __dmul_rn(one_minus_alpha, x));
        const double d = __dsub_rn(x, new_mean);
        s[ZCLIP_MEAN] = new_mean;
        s[ZCLIP_VAR] = __dadd_rn(__dmul_rn(alpha, s[ZCLIP_VAR]), __dmul_rn(one_minus_alpha, __dmul_rn(d, d)));
        c = norm > effective ? __ddiv_rn(effective, __dadd_rn(norm, ZCLIP_EPS)) : 1.0;
    }
    s[ZCLIP_LAST_COEFFICIENT] = c;
    scratch->coefficient = c;
}

// ---------------------------------------------------------------------------------------------
// Adaptive gradient clipping (AGC, src/ops/agc.rs; the CPU twin is src/backend/cpu/agc.rs).
// A unit is a slice along dim 0 of a var of rank >= 2, the whole var for rank <= 1. One warp per
// unit: lane l sums x*x of the unit's elements l, l + 32, ... of the parameter and the gradient in
// element order (one rounding each), the lanes are combined by the shuffle-down tree, and the unit's
// clip follows (agc_coefficient). The gradient sums enter the superaccumulator (the global L2
// norm, as the reduction's); the last block writes the norm, the flag "some unit was clipped"
// (Scratch::coefficient = 0 when clipped, else 1, for the fused step's VERDICT_SCRATCH) and
// Scratch::nonfinite.

#define AGC_GRAD_NORM_FLOOR 1e-6

struct AgcSegment {
    u64 param;      // address of the var's first element (a contiguous view)
    u64 grad;       // of its gradient's (contiguous: the gradient itself, or a copy when write == 0)
    u64 unit_len;   // elements per unit (> 0)
    u64 units;      // units (> 0)
    u64 unit_start; // global index of the var's first unit (strictly increasing)
    u64 dtype;      // DT_* of the var and its gradient
    u64 write;      // 1: scale the clipped units of `grad` in place; 0: only read
    u64 reserved;
};

// ops::agc::unit_coefficient: the unit's coefficient when it is clipped (*clipped), else 1.
__device__ __forceinline__ double agc_coefficient(double psq, double gsq, double clipping, double eps,
                                                  bool* clipped) {
    const double w = __dsqrt_rn(psq);
    const double g = __dsqrt_rn(gsq);
    const double floor_ = (isnan(w) || w > eps) ? w : eps; // max(w, eps), NaN propagating
    const double max_norm = __dmul_rn(clipping, floor_);
    *clipped = g > max_norm;
    if (!*clipped) return 1.0;
    return __ddiv_rn(max_norm, g > AGC_GRAD_NORM_FLOOR ? g : AGC_GRAD_NORM_FLOOR);
}

// (sum p^2, sum g^2) of one unit of n elements, in every lane of the warp.
template <int DT>
__device__ __forceinline__ void agc_unit_sums(const void* p, const void* g, u64 n, int lane, double* sp,
                                              double* sg) {
    typedef typename Tr<DT>::raw raw;
    const raw* ps = (const raw*)p;
    const raw* gs = (const raw*)g;
    double a = 0.0, b = 0.0;
    u64 e = lane;
    // Four elements per lane in flight, accumulated in element order (the same sums as one at a time).
    for (; e + 3 * WARP < n; e += 4 * WARP) {
        raw xr[4], yr[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            xr[u] = __ldg(ps + e + u * WARP);
            yr[u] = gs[e + u * WARP];
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const double x = Tr<DT>::to_f64(xr[u]);
            const double y = Tr<DT>::to_f64(yr[u]);
            a = __dadd_rn(a, __dmul_rn(x, x));
            b = __dadd_rn(b, __dmul_rn(y, y));
        }
    }
    for (; e < n; e += WARP) {
        const double x = Tr<DT>::to_f64(__ldg(ps + e));
        const double y = Tr<DT>::to_f64(gs[e]);
        a = __dadd_rn(a, __dmul_rn(x, x));
        b = __dadd_rn(b, __dmul_rn(y, y));
    }
#pragma unroll
    for (int off = WARP / 2; off > 0; off /= 2) {
        a = __dadd_rn(a, __shfl_down_sync(0xffffffffu, a, off));
        b = __dadd_rn(b, __shfl_down_sync(0xffffffffu, b, off));
    }
    *sp = __shfl_sync(0xffffffffu, a, 0);
    *sg = __shfl_sync(0xffffffffu, b, 0);
}

template <int DT> __device__ __forceinline__ void agc_scale_unit(void* g, u64 n, int lane, double c) {
    typedef typename Tr<DT>::raw raw;
    raw* gs = (raw*)g;
    for (u64 e = lane; e < n; e += WARP) gs[e] = Tr<DT>::from_f64(__dmul_rn(Tr<DT>::to_f64(gs[e]), c));
}

__device__ __forceinline__ u32 agc_find_segment(const AgcSegment* segs, u32 n_segs, u64 unit) {
    u32 lo = 0, hi = n_segs - 1; // largest s with unit_start <= unit
    while (lo < hi) {
        u32 mid = (lo + hi + 1) / 2;
        if (segs[mid].unit_start <= unit) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

// Every unit of the table: the clip of the units whose segment has `write`, each unit's coefficient
// (1 when untouched) to coefs[unit] when `coefs` is not null, and from the last block the global L2
// norm to `out` (f64 when out_f64, else f32), 1 or 0 to *clipped_out when not null, and the scratch's
// verdict. Each warp takes a contiguous range of units.
extern "C" __global__ void grad_clip_agc(const AgcSegment* __restrict__ segs, u32 n_segs, u64 n_units,
                                         double clipping, double eps, Scratch* scratch, void* out, u32 out_f64,
                                         double* coefs, float* clipped_out) {
    __shared__ u64 s_digits[DIGITS];
    __shared__ u32 s_flags;
    __shared__ u32 s_clipped;
    const int tid = threadIdx.x;
    for (int i = tid; i < DIGITS; i += blockDim.x) s_digits[i] = 0;
    if (tid == 0) {
        s_flags = 0;
        s_clipped = 0;
    }
    __syncthreads();

    const int lane = tid % WARP;
    const u64 warps_per_block = blockDim.x / WARP;
    const u64 total = (u64)gridDim.x * warps_per_block;
    const u64 w = (u64)blockIdx.x * warps_per_block + tid / WARP;
    const u64 base = n_units / total, extra = n_units % total;
    const u64 first = w * base + (w < extra ? w : extra);
    const u64 end = first + base + (w < extra ? 1 : 0);
    u32 s = first < end ? agc_find_segment(segs, n_segs, first) : 0;
    for (u64 unit = first; unit < end; ++unit) {
        while (s + 1 < n_segs && segs[s + 1].unit_start <= unit) ++s;
        const AgcSegment seg = segs[s];
        const u64 offset = (unit - seg.unit_start) * seg.unit_len * (u64)elem_bytes(seg.dtype);
        const void* p = (const void*)(seg.param + offset);
        void* g = (void*)(seg.grad + offset);
        double sp, sg;
        switch (seg.dtype) {
        case DT_F32: agc_unit_sums<DT_F32>(p, g, seg.unit_len, lane, &sp, &sg); break;
        case DT_F64: agc_unit_sums<DT_F64>(p, g, seg.unit_len, lane, &sp, &sg); break;
        case DT_F16: agc_unit_sums<DT_F16>(p, g, seg.unit_len, lane, &sp, &sg); break;
        default: agc_unit_sums<DT_BF16>(p, g, seg.unit_len, lane, &sp, &sg); break;
        }
        bool clipped;
        const double c = agc_coefficient(sp, sg, clipping, eps, &clipped);
        if (lane == 0) {
            exact_add(s_digits, &s_flags, sg);
            if (clipped) atomicOr(&s_clipped, 1u);
            if (coefs) coefs[unit] = c;
        }
        if (clipped && seg.write) {
            switch (seg.dtype) {
            case DT_F32: agc_scale_unit<DT_F32>(g, seg.unit_len, lane, c); break;
            case DT_F64: agc_scale_unit<DT_F64>(g, seg.unit_len, lane, c); break;
            case DT_F16: agc_scale_unit<DT_F16>(g, seg.unit_len, lane, c); break;
            default: agc_scale_unit<DT_BF16>(g, seg.unit_len, lane, c); break;
            }
        }
    }
    __syncthreads();

    for (int i = tid; i < DIGITS; i += blockDim.x) {
        if (s_digits[i] != 0) atomicAdd(&scratch->digits[i], s_digits[i]);
    }
    if (tid == 0) {
        if (s_flags != 0) atomicOr(&scratch->flags, (u64)s_flags);
        if (s_clipped != 0) atomicOr(&scratch->max_bits, 1ull); // the "some unit clipped" flag
    }
    if (!last_block(&scratch->counter)) return;

    for (int i = tid; i < DIGITS; i += blockDim.x) s_digits[i] = atomicExch(&scratch->digits[i], 0ull);
    if (tid == 0) {
        s_flags = (u32)atomicExch(&scratch->flags, 0ull);
        s_clipped = (u32)atomicExch(&scratch->max_bits, 0ull);
    }
    __syncthreads();
    if (tid != 0) return;
    const double norm = __dsqrt_rn(exact_value(s_digits, s_flags));
    if (out_f64) *(double*)out = norm;
    else *(float*)out = __double2float_rn(norm);
    if (clipped_out) *clipped_out = s_clipped ? 1.0f : 0.0f;
    scratch->coefficient = s_clipped ? 0.0 : 1.0;
    scratch->nonfinite = isfinite(norm) ? 0 : 1;
}

// The clipped units of one non-contiguous gradient, from the coefficients grad_clip_agc stored:
// logical element i belongs to unit i / unit_len (the view's dims are coalesced in row-major order,
// which keeps the logical order); `coefs` points at the var's first unit.
extern "C" __global__ void grad_clip_agc_strided(u64 base, u32 dtype, u64 n, u32 rank, StridedView view,
                                                 u64 unit_len, const double* coefs) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const double c = coefs[i / unit_len];
        if (!(c < 1.0)) continue;
        u64 rem = i, off = 0;
        for (int d = (int)rank - 1; d >= 0; --d) {
            const u64 dim = view.dims[d];
            off += (rem % dim) * view.strides[d];
            rem /= dim;
        }
        switch (dtype) {
        case DT_F32: { u32* x = (u32*)base + off; *x = Tr<DT_F32>::from_f64(__dmul_rn(Tr<DT_F32>::to_f64(*x), c)); break; }
        case DT_F64: { u64* x = (u64*)base + off; *x = Tr<DT_F64>::from_f64(__dmul_rn(Tr<DT_F64>::to_f64(*x), c)); break; }
        case DT_F16: { unsigned short* x = (unsigned short*)base + off; *x = Tr<DT_F16>::from_f64(__dmul_rn(Tr<DT_F16>::to_f64(*x), c)); break; }
        default: { unsigned short* x = (unsigned short*)base + off; *x = Tr<DT_BF16>::from_f64(__dmul_rn(Tr<DT_BF16>::to_f64(*x), c)); break; }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Gradient accumulation (GradAccumulator): one pass over (buffer, source) pairs, in place in the
// buffers; src/ops/accumulate.rs `accumulate` is the reference, which the CPU twin
// (src/backend/cpu/accumulate.rs) runs. Every value goes through f64 (exact for all four dtypes)
// and is rounded once per operation to the buffer's dtype.
#define ACC_ADD 0        // dst = dst + src
#define ACC_ADD_SCALED 1 // dst = dst + round(src * alpha): the product rounded once, then the sum
#define ACC_ROUND 2      // dst = round(src): a wide buffer rounded to the var's dtype
#define ACC_ZERO 3       // dst = +0 (src is not read)

// One table entry (kernels/table.rs `PairEntry`).
struct PairSegment {
    u64 dst;         // device address of the buffer's element 0
    u64 src;         // device address of the source's element 0 (0 for ACC_ZERO)
    u64 len;         // elements, > 0
    u64 chunk_start; // global index of the pair's first chunk (strictly increasing)
    u64 dst_dtype;   // DT_*
    u64 src_dtype;   // DT_*
};

// The new buffer element: the operation's exact (or f64-rounded) value, rounded once to AD at the
// end (ACC_ADD_SCALED rounds its product to AD first).
template <int AD, int GD>
__device__ __forceinline__ typename Tr<AD>::raw accumulate_elem(typename Tr<AD>::raw a, typename Tr<GD>::raw g,
                                                                u32 op, double alpha) {
    double x;
    switch (op) {
    case ACC_ADD: x = __dadd_rn(Tr<AD>::to_f64(a), Tr<GD>::to_f64(g)); break;
    case ACC_ADD_SCALED: {
        const double product = Tr<AD>::to_f64(Tr<AD>::from_f64(__dmul_rn(Tr<GD>::to_f64(g), alpha)));
        x = __dadd_rn(Tr<AD>::to_f64(a), product);
        break;
    }
    case ACC_ROUND: x = Tr<GD>::to_f64(g); break;
    default: x = 0.0; break;
    }
    return Tr<AD>::from_f64(x);
}

// Loads per lane in flight in the accumulation loop.
#ifndef ACC_UNROLL
#define ACC_UNROLL 8
#endif

// `n` (<= CHUNK_ELEMS) elements of one pair with one warp: lane l takes elements l, l + 32, ...
// (coalesced for any pair of dtypes), ACC_UNROLL of each array in flight.
template <int AD, int GD>
__device__ __forceinline__ void warp_accumulate_chunk(void* dst, const void* src, u64 n, int lane, u32 op,
                                                      double alpha) {
    typedef typename Tr<AD>::raw A;
    typedef typename Tr<GD>::raw G;
    A* d = (A*)dst;
    const G* s = (const G*)src;
    const bool read_dst = op == ACC_ADD || op == ACC_ADD_SCALED;
    const bool read_src = op != ACC_ZERO;
    u64 i = lane;
    for (; i + (ACC_UNROLL - 1) * WARP < n; i += ACC_UNROLL * WARP) {
        A a[ACC_UNROLL];
        G g[ACC_UNROLL];
#pragma unroll
        for (int u = 0; u < ACC_UNROLL; ++u) {
            a[u] = read_dst ? d[i + u * WARP] : (A)0;
            g[u] = read_src ? s[i + u * WARP] : (G)0;
        }
#pragma unroll
        for (int u = 0; u < ACC_UNROLL; ++u) d[i + u * WARP] = accumulate_elem<AD, GD>(a[u], g[u], op, alpha);
    }
    for (; i < n; i += WARP) {
        const A a = read_dst ? d[i] : (A)0;
        const G g = read_src ? s[i] : (G)0;
        d[i] = accumulate_elem<AD, GD>(a, g, op, alpha);
    }
}

#define ACC_CASE(AD, GD)                                                                                     \
    case AD * 4 + GD: warp_accumulate_chunk<AD, GD>(d, s, n, lane, op, alpha); break;

// Every pair of the table, each element read and written once; one launch for any number of vars.
extern "C" __global__ void grad_clip_accumulate(const PairSegment* __restrict__ segs, u32 n_segs, u64 n_chunks,
                                                u32 op, double alpha) {
    const int lane = threadIdx.x % WARP;
    for (WarpChunks<PairSegment> w(segs, n_segs, n_chunks); w.more(); w.next()) {
        u64 start, n;
        const PairSegment seg = w.current(&start, &n);
        void* d = (void*)(seg.dst + start * elem_bytes(seg.dst_dtype));
        const void* s = (const void*)(seg.src + start * elem_bytes(seg.src_dtype));
        switch (seg.dst_dtype * 4 + seg.src_dtype) {
            ACC_CASE(DT_F32, DT_F32)
            ACC_CASE(DT_F32, DT_F64)
            ACC_CASE(DT_F32, DT_F16)
            ACC_CASE(DT_F32, DT_BF16)
            ACC_CASE(DT_F64, DT_F32)
            ACC_CASE(DT_F64, DT_F64)
            ACC_CASE(DT_F64, DT_F16)
            ACC_CASE(DT_F64, DT_BF16)
            ACC_CASE(DT_F16, DT_F32)
            ACC_CASE(DT_F16, DT_F64)
            ACC_CASE(DT_F16, DT_F16)
            ACC_CASE(DT_F16, DT_BF16)
            ACC_CASE(DT_BF16, DT_F32)
            ACC_CASE(DT_BF16, DT_F64)
            ACC_CASE(DT_BF16, DT_F16)
            ACC_CASE(DT_BF16, DT_BF16)
        default: break; // never sent by the host
        }
    }
}
