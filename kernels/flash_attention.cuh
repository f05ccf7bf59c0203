// Building blocks of flash_attention.cu: bf16 packing, ldmatrix fragment loads from
// padded shared-memory tiles, mma.sync m16n8k16 (bf16 inputs, f32 accumulation), the
// f32 -> bf16 tile stager, and the geometry of grouped-query rows.
//
// Fragment layouts (PTX ISA 9.7.15.5.8), with g = lane / 4 and t = lane % 4:
//   A 16x16: reg0 = A[g][2t..2t+1], reg1 = A[g+8][2t..], reg2 = A[g][2t+8..], reg3 = A[g+8][2t+8..]
//   B 16x8:  reg0 = B[2t..2t+1][g], reg1 = B[2t+8..2t+9][g]
//   C 16x8:  c0, c1 = C[g][2t..2t+1], c2, c3 = C[g+8][2t..2t+1]
// The C fragments of two adjacent 16x8 tiles are, packed to bf16, the A fragment of their
// 16x16 product with another matrix: probabilities never leave registers.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

namespace fa {

typedef __nv_bfloat16 bf16;

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// Two floats as a bf16x2 register (lo in bits 0..15), rounded to nearest even.
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 bf16 matrices; lane 8j + r gives the address of row r of matrix j.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// d += a b for a 16x16 A and a 16x8 B.
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A shared-memory tile of bf16 rows, LD elements apart. LD = width + 8: the 16-byte pad
// puts the eight rows an ldmatrix phase reads in eight different bank groups.
template <int LD>
struct Tile {
    bf16* p;
    __device__ __forceinline__ uint32_t at(int row, int col) const { return smem_addr(p + row * LD + col); }

    // The A fragment of the 16x16 block at (row0, col0).
    __device__ __forceinline__ void a(uint32_t (&r)[4], int row0, int col0) const {
        const int lane = threadIdx.x & 31;
        ldsm_x4(r, at(row0 + (lane & 7) + ((lane >> 3) & 1) * 8, col0 + (lane >> 4) * 8));
    }
    // B fragments of two 16x8 tiles for a tile stored n-major (row = n, col = k): the
    // block at (n0, k0); r[0..1] for n0..n0+7, r[2..3] for n0+8..n0+15.
    __device__ __forceinline__ void b_nk(uint32_t (&r)[4], int n0, int k0) const {
        const int lane = threadIdx.x & 31;
        ldsm_x4(r, at(n0 + (lane & 7) + (lane >> 4) * 8, k0 + ((lane >> 3) & 1) * 8));
    }
    // B fragments of two 16x8 tiles for a tile stored k-major (row = k, col = n): the
    // block at (k0, n0); r[0..1] for n0..n0+7, r[2..3] for n0+8..n0+15.
    __device__ __forceinline__ void b_kn(uint32_t (&r)[4], int k0, int n0) const {
        const int lane = threadIdx.x & 31;
        ldsm_x4_trans(r, at(k0 + (lane & 7) + ((lane >> 3) & 1) * 8, n0 + (lane >> 4) * 8));
    }
};

// The A fragment for k-step kk of a product whose left operand is the 16 x (16 * steps)
// accumulator `c` (C fragments of 8-column tiles), rounded to bf16.
template <int NT>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c)[NT][4], int kk) {
    a[0] = pack(c[2 * kk][0], c[2 * kk][1]);
    a[1] = pack(c[2 * kk][2], c[2 * kk][3]);
    a[2] = pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[3] = pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// The same fragment split in two, c = hi + lo with both halves bf16: about 16 bits of
// each value, for a product whose result must keep sums that cancel.
template <int NT>
__device__ __forceinline__ void c_to_a_split(uint32_t (&hi)[4], uint32_t (&lo)[4], const float (&c)[NT][4], int kk) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const float* x = &c[2 * kk + (r >> 1)][2 * (r & 1)];
        __nv_bfloat162 h = __floats2bfloat162_rn(x[0], x[1]);
        const float2 f = __bfloat1622float2(h);
        hi[r] = *reinterpret_cast<uint32_t*>(&h);
        lo[r] = pack(x[0] - f.x, x[1] - f.y);
    }
}

// 2^x as the hardware's approximate exponential, subnormal results flushed to zero.
// exp2f compiles to the same ex2.approx but without .ftz, which ptxas wraps in a compare
// and two predicated scalings per call to keep results below 2^-126; a softmax weight
// that small is nothing beside the row's largest, 1. 2^-inf = 0, as masking relies on.
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Sum and max over the four lanes that share a row of a C fragment.
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// Elements p[0], p[1] as f32 (8-byte aligned f32, 4-byte aligned bf16: widened exactly).
__device__ __forceinline__ float2 load2(const float* p) { return __ldg(reinterpret_cast<const float2*>(p)); }
__device__ __forceinline__ float2 load2(const bf16* p) {
    const uint32_t u = __ldg(reinterpret_cast<const unsigned int*>(p));
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}

// Elements p[0..8) as f32 in two float4s (16-byte aligned; bf16 widened exactly).
__device__ __forceinline__ void load8(const float* p, float4& a, float4& b) {
    a = __ldg(reinterpret_cast<const float4*>(p));
    b = __ldg(reinterpret_cast<const float4*>(p + 4));
}
__device__ __forceinline__ void load8(const bf16* p, float4& a, float4& b) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    auto lo = [](uint32_t w) { return __uint_as_float(w << 16); };
    auto hi = [](uint32_t w) { return __uint_as_float(w & 0xffff0000u); };
    a = make_float4(lo(u.x), hi(u.x), lo(u.y), hi(u.y));
    b = make_float4(lo(u.z), hi(u.z), lo(u.w), hi(u.w));
}

// Copies a ROWS x D tile of f32 or bf16 values from global memory into a bf16 Tile through
// registers: `load` issues the global reads (16-byte, coalesced along rows) and `store`
// converts and writes them, so a kernel can overlap the next tile's reads with work on the
// current one. A bf16 source is widened into the f32 registers and packed back exactly
// (half the bytes read). `row(r)` is the address of row r, or null for a row outside the
// matrix; columns from `cols` on (a head dim padded up to D) read as zero, as do null rows.
template <int ROWS, int D, int THREADS>
struct Stager {
    static constexpr int PER_ROW = D / 8;
    static constexpr int N = ROWS * PER_ROW / THREADS;
    static_assert(N >= 1 && ROWS * PER_ROW % THREADS == 0, "tile must split evenly over the threads");
    float4 x[2 * N];

    template <typename Row>
    __device__ __forceinline__ void load(Row row, int cols) {
#pragma unroll
        for (int c = 0; c < N; ++c) {
            const int i = threadIdx.x + c * THREADS, col = (i % PER_ROW) * 8;
            const auto* p = row(i / PER_ROW);
            if (p != nullptr && col < cols) {
                load8(p + col, x[2 * c], x[2 * c + 1]);
            } else {
                x[2 * c] = x[2 * c + 1] = make_float4(0.f, 0.f, 0.f, 0.f);
            }
        }
    }

    __device__ __forceinline__ void store(bf16* tile) const {
#pragma unroll
        for (int c = 0; c < N; ++c) {
            const int i = threadIdx.x + c * THREADS;
            const float4 a = x[2 * c], b = x[2 * c + 1];
            const uint4 w = make_uint4(pack(a.x, a.y), pack(a.z, a.w), pack(b.x, b.y), pack(b.z, b.w));
            *reinterpret_cast<uint4*>(tile + (i / PER_ROW) * (D + 8) + (i % PER_ROW) * 8) = w;
        }
    }
};

// The query rows of one (sequence, KV head): the heads of its group packed as rows
// r = position * group + head-in-group, so that one tile of rows shares every K/V tile it
// reads (grouped-query attention without copying K/V per head). q/out rows are
// (batch * tq, n_heads * hd); lse/delta are (batch, n_heads, tq).
struct Group {
    int group, rows, tq, n_heads, hd;
    size_t q0, lse0;

    __device__ __forceinline__ Group(int tq_, int n_heads_, int n_kv, int hd_, int b, int kvh)
        : group(n_heads_ / n_kv), rows(tq_ * (n_heads_ / n_kv)), tq(tq_), n_heads(n_heads_), hd(hd_) {
        q0 = first_row(b, kvh);
        lse0 = ((size_t)b * n_heads + (size_t)kvh * group) * tq;
    }
    // Offset of the group's first q/out row in sequence b, KV head kvh.
    __device__ __forceinline__ size_t first_row(unsigned b, unsigned kvh) const {
        return ((size_t)b * tq * n_heads + (size_t)kvh * group) * hd;
    }
    __device__ __forceinline__ int pos(int r) const { return r / group; }
    __device__ __forceinline__ size_t q_at(int r) const {
        return q0 + ((size_t)(r / group) * n_heads + r % group) * hd;
    }
    __device__ __forceinline__ size_t lse_at(int r) const { return lse0 + (size_t)(r % group) * tq + r / group; }
};

}  // namespace fa
