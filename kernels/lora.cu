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
