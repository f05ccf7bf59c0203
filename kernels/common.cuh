// Shared device helpers. Every reduction here runs in a fixed order, so results are
// deterministic for a given launch configuration.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

struct SumOp {
    template <typename T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Reduce over the block (blockDim.x a multiple of 32); `scratch` holds 32 values. Every
// thread gets the result.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, T* scratch, T identity, Op op) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_reduce(v, op);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = threadIdx.x < nw ? scratch[threadIdx.x] : identity;
    if (warp == 0) v = warp_reduce(v, op);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, SumOp()); }
__device__ __forceinline__ float block_sum(float v, float* s) { return block_reduce(v, s, 0.f, SumOp()); }
__device__ __forceinline__ double block_sum_d(double v, double* s) { return block_reduce(v, s, 0.0, SumOp()); }
__device__ __forceinline__ float block_max(float v, float* s) { return block_reduce(v, s, -INFINITY, MaxOp()); }

// The counter-based uniform in [0, 1) of backend::sample_uniform (splitmix64 finaliser),
// so CPU and CUDA draw the same Monte-Carlo labels.
__device__ __forceinline__ float sample_uniform(unsigned long long seed, unsigned long long row) {
    unsigned long long z = seed ^ (row * 0x9e3779b97f4a7c15ULL);
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    return (float)(z >> 40) / 16777216.0f;
}

// One rotate-half RoPE pair (a = x[i], b = x[i + hd/2]) by the angle with cosine c and
// signed sine s (s negated for the inverse, the backward): a' = a c - b s, b' = b c + a s,
// each product and sum rounded on its own as the CPU twin (ops::rope) does, with no FMA
// contraction. Every kernel that rotates (rope.cu, the LoRA GEMM's epilogue, flash
// attention's backward epilogues) goes through this, so a fused rotation gives the same
// bits as the separate pass it replaces.
__device__ __forceinline__ void rope_rotate(float& a, float& b, float c, float s) {
    const float a0 = a;
    a = __fsub_rn(__fmul_rn(a0, c), __fmul_rn(b, s));
    b = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a0, s));
}

#define GRID_STRIDE(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)(n); i += (size_t)gridDim.x * blockDim.x)

// 128-bit memory access. A Pack<W> is W consecutive elements held as f32: W = 1 is the
// scalar fallback (tails, unaligned operands); W a multiple of 4 moves f32 data as
// ld/st.global.v4.f32 and, a multiple of 8, bf16 data as 128-bit words of eight values.
// One wide access instead of four or eight narrow ones cuts the memory instructions of a
// bandwidth-bound kernel by that factor.
template <int W>
struct Pack {
    float v[W];
};

// The pack width as a type, so one generic lambda body serves both widths.
template <int W>
struct Width {
    static constexpr int value = W;
};

// Elements of T in one 128-bit access: the pack width of a kernel that stores T.
template <typename T>
struct PackOf {
    static constexpr int value = 16 / sizeof(T);
};

// Whether every pointer is 16-byte aligned.
template <typename... P>
__device__ __forceinline__ bool aligned16(const P*... p) {
    return ((reinterpret_cast<uintptr_t>(p) % 16 == 0) && ...);
}

// Elements i .. i+W-1 of p (16-byte aligned at p + i when W > 1).
template <int W>
__device__ __forceinline__ Pack<W> load(const float* p, size_t i) {
    Pack<W> r;
    if constexpr (W == 1) {
        r.v[0] = p[i];
    } else {
        static_assert(W % 4 == 0, "f32 packs are whole float4s");
#pragma unroll
        for (int k = 0; k < W; k += 4) {
            const float4 t = *reinterpret_cast<const float4*>(p + i + k);
            r.v[k] = t.x, r.v[k + 1] = t.y, r.v[k + 2] = t.z, r.v[k + 3] = t.w;
        }
    }
    return r;
}

template <int W>
__device__ __forceinline__ void store(float* p, size_t i, const Pack<W>& a) {
    if constexpr (W == 1) {
        p[i] = a.v[0];
    } else {
        static_assert(W % 4 == 0, "f32 packs are whole float4s");
#pragma unroll
        for (int k = 0; k < W; k += 4)
            *reinterpret_cast<float4*>(p + i + k) = make_float4(a.v[k], a.v[k + 1], a.v[k + 2], a.v[k + 3]);
    }
}

// bf16 elements i .. i+W-1 of p, widened to f32 (exactly).
template <int W>
__device__ __forceinline__ Pack<W> load(const __nv_bfloat16* p, size_t i) {
    Pack<W> r;
    if constexpr (W == 1) {
        r.v[0] = __bfloat162float(p[i]);
    } else {
        static_assert(W % 8 == 0, "bf16 packs are whole 128-bit words");
#pragma unroll
        for (int k = 0; k < W; k += 8) {
            const uint4 t = *reinterpret_cast<const uint4*>(p + i + k);
            const uint32_t words[4] = {t.x, t.y, t.z, t.w};
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                // The low half of each word is the element at the lower address.
                r.v[k + 2 * q] = __uint_as_float(words[q] << 16);
                r.v[k + 2 * q + 1] = __uint_as_float(words[q] & 0xffff0000u);
            }
        }
    }
    return r;
}

// Round to bf16 (to nearest, ties to even, as __float2bfloat16) and store.
template <int W>
__device__ __forceinline__ void store(__nv_bfloat16* p, size_t i, const Pack<W>& a) {
    if constexpr (W == 1) {
        p[i] = __float2bfloat16(a.v[0]);
    } else {
        static_assert(W % 8 == 0, "bf16 packs are whole 128-bit words");
#pragma unroll
        for (int k = 0; k < W; k += 8) {
            uint32_t words[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const __nv_bfloat162 two = __floats2bfloat162_rn(a.v[k + 2 * q], a.v[k + 2 * q + 1]);
                words[q] = *reinterpret_cast<const uint32_t*>(&two);
            }
            *reinterpret_cast<uint4*>(p + i + k) = make_uint4(words[0], words[1], words[2], words[3]);
        }
    }
}

// Grid-stride over elements [0, n): f(Width<V>(), i) for i = 0, V, 2V, ... while a whole
// pack fits, when `vec` (the caller has checked alignment), then f(Width<1>(), i) for each
// remaining i (all of [0, n) without `vec`). The launch needs n / V threads, not n.
template <int V, typename F>
__device__ __forceinline__ void for_each_pack(size_t n, bool vec, F f) {
    const size_t packs = vec ? n / V : 0;
    GRID_STRIDE(j, packs) f(Width<V>(), j * V);
    GRID_STRIDE(k, n - packs * V) f(Width<1>(), packs * V + k);
}

// The same over the `dim` elements of one row, by the threads of one block.
template <int V, typename F>
__device__ __forceinline__ void row_packs(int dim, bool vec, F f) {
    const int packs = vec ? dim / V : 0;
    for (int j = threadIdx.x; j < packs; j += blockDim.x) f(Width<V>(), (size_t)j * V);
    for (int i = packs * V + threadIdx.x; i < dim; i += blockDim.x) f(Width<1>(), (size_t)i);
}

// 16 bytes global -> shared without passing through registers; the first `src_bytes` are
// copied, the rest zero-filled (0: a tile's padding past the matrix, nothing read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
