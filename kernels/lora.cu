// LoRA, fused (CPU twin: CpuBackend::lora_forward / lora_backward).
//
// Forward, one block per row: u = A x is reduced warp by warp into shared memory and
// used there for y += s B u, so the low-rank intermediate never makes a round trip
// through device memory on the way to y (it is still written once, for backward).
// Backward, one block per row: gA = s g B (shared memory), dx += gA A. The weight
// gradients dA = gA^T x and dB = s g^T u are reductions over rows: each block owns a
// column and a chunk of rows with r accumulators in registers; chunk partials are summed
// in a fixed order by reduce_partials (deterministic, no atomics).
#include "common.cuh"

#define MAX_R 64

__device__ __forceinline__ float as_f32(float v) { return v; }
__device__ __forceinline__ float as_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// x is the layer input as stored (f32, or a bf16 activation: `_f32` / `_bf16`); y is f32.
template <typename Tx>
__device__ __forceinline__ void lora_forward(const Tx* x, const float* A, const float* B, float* y, float* u_out, int d_in,
                                             int r, int d_out, float scale) {
    __shared__ float u[MAX_R];
    const size_t row = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const Tx* xr = x + row * d_in;
    for (int k = warp; k < r; k += nw) {
        float s = 0.f;
        for (int j = lane; j < d_in; j += 32) s += A[(size_t)k * d_in + j] * as_f32(xr[j]);
        s = warp_sum(s);
        if (lane == 0) u[k] = s;
    }
    __syncthreads();
    if (threadIdx.x < r) u_out[row * r + threadIdx.x] = u[threadIdx.x];
    for (int o = threadIdx.x; o < d_out; o += blockDim.x) {
        float acc = 0.f;
        for (int k = 0; k < r; ++k) acc += B[(size_t)o * r + k] * u[k];
        y[row * d_out + o] += scale * acc;
    }
}

extern "C" __global__ void lora_forward_fused_f32(const float* x, const float* A, const float* B, float* y, float* u_out,
                                                  int d_in, int r, int d_out, float scale) {
    lora_forward(x, A, B, y, u_out, d_in, r, d_out, scale);
}
extern "C" __global__ void lora_forward_fused_bf16(const __nv_bfloat16* x, const float* A, const float* B, float* y,
                                                   float* u_out, int d_in, int r, int d_out, float scale) {
    lora_forward(x, A, B, y, u_out, d_in, r, d_out, scale);
}

extern "C" __global__ void lora_backward_rows(const float* g, const float* A, const float* B, float* ga_out, float* dx,
                                              int d_in, int r, int d_out, float scale) {
    __shared__ float ga[MAX_R];
    const size_t row = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const float* gr = g + row * d_out;
    for (int k = warp; k < r; k += nw) {
        float s = 0.f;
        for (int o = lane; o < d_out; o += 32) s += gr[o] * B[(size_t)o * r + k];
        s = warp_sum(s);
        if (lane == 0) ga[k] = scale * s;
    }
    __syncthreads();
    if (threadIdx.x < r) ga_out[row * r + threadIdx.x] = ga[threadIdx.x];
    for (int j = threadIdx.x; j < d_in; j += blockDim.x) {
        float acc = 0.f;
        for (int k = 0; k < r; ++k) acc += ga[k] * A[(size_t)k * d_in + j];
        dx[row * d_in + j] += acc;
    }
}

// partial[chunk][k][col] (layout_kc = 1) or partial[chunk][col][k] (layout_kc = 0) =
// alpha * sum over the chunk's rows of narrow[row][k] * wide[row][col]; grid (cols / block,
// chunks). dA: narrow = gA, wide = x, layout (k, col). dB: narrow = u, wide = g, layout
// (col, k), alpha = s.
extern "C" __global__ void lora_grad_chunk(const float* narrow, const float* wide, float* partial, int rows, int cols, int r,
                                           int rows_per_chunk, float alpha, int layout_kc) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    const int chunk = blockIdx.y;
    if (col >= cols) return;
    float acc[MAX_R];
#pragma unroll
    for (int k = 0; k < MAX_R; ++k) acc[k] = 0.f;
    const int r0 = chunk * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
    for (int row = r0; row < r1; ++row) {
        const float w = wide[(size_t)row * cols + col];
        const float* nr = narrow + (size_t)row * r;
#pragma unroll
        for (int k = 0; k < MAX_R; ++k)
            if (k < r) acc[k] += nr[k] * w;
    }
    float* out = partial + (size_t)chunk * cols * r;
#pragma unroll
    for (int k = 0; k < MAX_R; ++k)
        if (k < r) out[layout_kc ? (size_t)k * cols + col : (size_t)col * r + k] = alpha * acc[k];
}

// out[i] += sum_c partial[c][i], chunks in order.
extern "C" __global__ void reduce_partials(const float* partial, float* out, int chunks, size_t n) {
    GRID_STRIDE(i, n) {
        float s = 0.f;
        for (int c = 0; c < chunks; ++c) s += partial[(size_t)c * n + i];
        out[i] += s;
    }
}

// LoRA's f32 operands against bf16 activations on cuBLAS (`ProjectionGemm::Folded`,
// backend/cuda/folded_sequence.rs). cuBLAS multiplies like types only, so an f32 factor F
// (A, B, u or gA) meets a bf16 activation X as P bf16 pieces: v0 = bf16(v), v1 = bf16(v -
// v0), v2 = bf16(v - v0 - v1) (each difference exact in f32; three pieces hold all 24
// bits of the significand, as lora_gemm.cuh's pieces, for values above about 2^-110,
// where the third piece is still a normal bf16 number). One bf16 GEMM multiplies X by the
// pieces side by side, each product summed in f32, and lora_sum_pieces adds the P partial
// products: X F to f32 accuracy, reading X once, as it is stored (no widened copy).
//
// Element (i, j) of the rows x cols matrix `src` (row stride ld_src) goes to
// dst[i * ld_dst + k * piece_off + j] as piece k < pieces.
extern "C" __global__ void lora_split_pieces(const float* src, __nv_bfloat16* dst, int rows, int cols, int ld_src,
                                             int ld_dst, size_t piece_off, int pieces) {
    const size_t n = (size_t)rows * cols;
    GRID_STRIDE(e, n) {
        const size_t i = e / cols, j = e % cols;
        float rest = src[i * ld_src + j];
        __nv_bfloat16* out = dst + i * ld_dst + j;
        for (int k = 0; k < pieces; ++k) {
            const __nv_bfloat16 p = __float2bfloat16_rn(rest);
            out[k * piece_off] = p;
            rest = __fsub_rn(rest, __bfloat162float(p));
        }
    }
}

// dst[i * ld_dst + j] (+)= alpha * (partial 0 + partial 1 + ...), the P partial products
// of a GEMM against lora_split_pieces' layout: partial k of element (i, j) at
// src[i * ld_src + k * piece_off + j]. Added in piece order, then scaled; `accumulate`
// adds to dst with one rounding (fma).
extern "C" __global__ void lora_sum_pieces(const float* src, float* dst, int rows, int cols, int ld_src,
                                           size_t piece_off, int pieces, int ld_dst, float alpha, int accumulate) {
    const size_t n = (size_t)rows * cols;
    GRID_STRIDE(e, n) {
        const size_t i = e / cols, j = e % cols;
        const float* p = src + i * ld_src + j;
        float s = p[0];
        for (int k = 1; k < pieces; ++k) s = __fadd_rn(s, p[k * piece_off]);
        float* out = dst + i * ld_dst + j;
        *out = accumulate ? __fmaf_rn(alpha, s, *out) : __fmul_rn(alpha, s);
    }
}
