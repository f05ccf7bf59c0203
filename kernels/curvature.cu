// Curvature primitives (CPU twin: backend/cpu/curvature.rs): segment sums, the mirror of
// symmetric factors, and the SIMT FP32 Gram and per-sample squaring that the tensor-core
// kernels of curvature_tc.cu replace (kept as benchmarked baselines, baselines.rs).
#include "common.cuh"

#define MAX_R 64

// Per-sample gradient squaring for the diagonal Fisher. For every sequence n the
// gradient block G_n = alpha * sum_{p in n} narrow[p][k] * wide[p][w] is formed in
// registers (one thread per wide index w, r accumulators) and only its square is added to
// out: never written out. out is (r, wide) with narrow_first = 1 (A: narrow = gA, wide =
// x) or (wide, r) with narrow_first = 0 (B: narrow = u, wide = g). Sequences run in order
// inside each thread: deterministic, no atomics.
extern "C" __global__ void sq_grad_simt(const float* narrow, const float* wide, const int* seg_start, const int* seg_len,
                                              int n_seg, int r, int wide_dim, float alpha, int narrow_first, float* out) {
    const int w = blockIdx.x * blockDim.x + threadIdx.x;
    if (w >= wide_dim) return;
    float f[MAX_R];
#pragma unroll
    for (int k = 0; k < MAX_R; ++k) f[k] = 0.f;
    for (int s = 0; s < n_seg; ++s) {
        float acc[MAX_R];
#pragma unroll
        for (int k = 0; k < MAX_R; ++k) acc[k] = 0.f;
        const int p1 = seg_start[s] + seg_len[s];
        for (int p = seg_start[s]; p < p1; ++p) {
            const float x = wide[(size_t)p * wide_dim + w];
            const float* nr = narrow + (size_t)p * r;
#pragma unroll
            for (int k = 0; k < MAX_R; ++k)
                if (k < r) acc[k] += nr[k] * x;
        }
#pragma unroll
        for (int k = 0; k < MAX_R; ++k)
            if (k < r) f[k] += (alpha * acc[k]) * (alpha * acc[k]);
    }
#pragma unroll
    for (int k = 0; k < MAX_R; ++k)
        if (k < r) out[narrow_first ? (size_t)k * wide_dim + w : (size_t)w * r + k] += f[k];
}

// KFAC factor accumulation: out (dx, dy) += alpha * sum over rows [row0, row0 + rows) of
// X[p]^T Y[p] (X (M, dx), Y (M, dy) row-major). 64 x 64 output tiles, 256 threads each
// owning 4 x 4 outputs, 16 rows staged through shared memory per step. With `upper`
// (X == Y, a symmetric factor) tiles strictly below the diagonal are skipped and filled
// afterwards by mirror_upper.
#define TILE 64
#define KSTEP 16
extern "C" __global__ void gram_simt(const float* X, const float* Y, float* out, int row0, int rows, int dx, int dy,
                                           float alpha, int upper) {
    if (upper && blockIdx.y > blockIdx.x) return;
    __shared__ float xs[KSTEP][TILE];
    __shared__ float ys[KSTEP][TILE];
    const int ti = threadIdx.x / 16, tj = threadIdx.x % 16;
    const int i0 = blockIdx.y * TILE, j0 = blockIdx.x * TILE;
    float acc[4][4] = {};
    for (int p0 = 0; p0 < rows; p0 += KSTEP) {
        for (int e = threadIdx.x; e < KSTEP * TILE; e += blockDim.x) {
            const int kk = e / TILE, c = e % TILE;
            const int p = row0 + p0 + kk;
            const bool in = p0 + kk < rows;
            xs[kk][c] = in && i0 + c < dx ? X[(size_t)p * dx + i0 + c] : 0.f;
            ys[kk][c] = in && j0 + c < dy ? Y[(size_t)p * dy + j0 + c] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < KSTEP; ++kk) {
            float a[4], b[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                a[q] = xs[kk][ti * 4 + q];
                b[q] = ys[kk][tj * 4 + q];
            }
#pragma unroll
            for (int q = 0; q < 4; ++q)
#pragma unroll
                for (int t = 0; t < 4; ++t) acc[q][t] += a[q] * b[t];
        }
        __syncthreads();
    }
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            const int i = i0 + ti * 4 + q, j = j0 + tj * 4 + t;
            if (i < dx && j < dy && (!upper || i <= j)) out[(size_t)i * dy + j] += alpha * acc[q][t];
        }
}

// out[i][j] = out[j][i] for i > j (after an `upper` Gram), through 32 x 32 tiles in shared
// memory so that both the reads of the upper tile and the writes of the lower one are
// coalesced. Block (bx, by) of 32 x 8 threads fills lower tile (by, bx), by >= bx.
extern "C" __global__ void mirror_upper(float* out, int n) {
    if (blockIdx.y < blockIdx.x) return;
    __shared__ float s[32][33];
    const int r0 = blockIdx.x * 32, c0 = blockIdx.y * 32;  // the upper source tile
    for (int i = threadIdx.y; i < 32; i += 8) {
        const int r = r0 + i, c = c0 + threadIdx.x;
        if (r < n && c < n && r <= c) s[i][threadIdx.x] = out[(size_t)r * n + c];
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += 8) {
        const int r = c0 + i, c = r0 + threadIdx.x;  // out[r][c] = out[c][r]
        if (r < n && c < n && r > c) out[(size_t)r * n + c] = s[threadIdx.x][i];
    }
}

// out[s][d] = sum (or mean) of x's rows in segment s.
template <class T>
__device__ __forceinline__ void segment_sum(const T* x, const int* seg_start, const int* seg_len, int n_seg, int dim,
                                            int mean, float* out) {
    GRID_STRIDE(idx, (size_t)n_seg * dim) {
        const int s = idx / dim, d = idx % dim;
        float acc = 0.f;
        for (int p = seg_start[s]; p < seg_start[s] + seg_len[s]; ++p) acc += load<1>(x, (size_t)p * dim + d).v[0];
        out[idx] = mean && seg_len[s] > 0 ? acc / seg_len[s] : acc;
    }
}
// x stored as f32 or as bf16 (read as stored, widened exactly).
extern "C" __global__ void segment_sum_f32(const float* x, const int* seg_start, const int* seg_len, int n_seg, int dim,
                                           int mean, float* out) {
    segment_sum(x, seg_start, seg_len, n_seg, dim, mean, out);
}
extern "C" __global__ void segment_sum_bf16(const __nv_bfloat16* x, const int* seg_start, const int* seg_len, int n_seg,
                                            int dim, int mean, float* out) {
    segment_sum(x, seg_start, seg_len, n_seg, dim, mean, out);
}

