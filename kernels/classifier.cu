// The fused classifier's row kernels (Backend::classifier; CPU twin:
// backend/cpu/classifier.rs). The host sweeps the vocabulary in chunks of n columns
// [j0, j0 + n): cuBLAS writes the chunk's logits z (rows, n) in f32, a kernel here folds
// them into per-row state, and cuBLAS adds the gradient product E W_c into acc. The full
// (rows, vocab) logits never exist. One block per row. Every row here has a target: the
// host gathers those rows first (ignored rows have loss 0 and gradient 0 whatever their
// logits) and classifier_scatter_rows puts their gradients back.
//
// Per-row state: m, the largest logit so far; s = sum exp(z - m) in f64; zt, the target's
// logit; acc (rows, dim) = sum_{j != t} exp(z_j - m) W_j over the columns so far.
#include "common.cuh"

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// Fold chunk z into (m, s, zt): m' = max(m, max_j z_j), s' = s exp(m - m') + sum_j
// exp(z_j - m'). With e (the gradient), write e_j = exp(z_j - m') in the head's type for
// the product, 0 at the target (its term is added exactly by classifier_finish, not
// through a bf16 rounding of p_t ~ 1); and rescale acc's row by
// exp(m - m') so that the product adds terms of the same scale. `first`: no state yet.
template <typename E>
__device__ void fold(const float* z, int n, int j0, const int* labels, float* m, double* s, float* zt,
                     E* e, float* acc, int dim, int first) {
    __shared__ float fscratch[32];
    __shared__ double dscratch[32];
    const size_t row = blockIdx.x;
    const float* zr = z + row * n;
    const int t = labels[row];
    float mc = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) mc = fmaxf(mc, zr[j]);
    mc = block_max(mc, fscratch);
    const float m_old = first ? -INFINITY : m[row];
    const float m_new = fmaxf(m_old, mc);
    double part = 0.0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float v = expf(zr[j] - m_new);
        part += (double)v;
        if (e) store(e + row * n + j, j0 + j == t ? 0.f : v);
    }
    // The block sum ends in a barrier: every thread has read m[row] before it is written.
    const double total = block_sum_d(part, dscratch);
    const float alpha = expf(m_old - m_new);
    if (threadIdx.x == 0) {
        s[row] = (first ? 0.0 : s[row] * (double)alpha) + total;
        m[row] = m_new;
        if (t >= j0 && t < j0 + n) zt[row] = zr[t - j0];
    }
    if (acc && !first && alpha != 1.f)
        for (int d = threadIdx.x; d < dim; d += blockDim.x) acc[row * dim + d] *= alpha;
}

extern "C" __global__ void classifier_fold_f32(const float* z, int n, int j0, const int* labels, float* m, double* s,
                                               float* zt, float* e, float* acc, int dim, int first) {
    fold(z, n, j0, labels, m, s, zt, e, acc, dim, first);
}

extern "C" __global__ void classifier_fold_bf16(const float* z, int n, int j0, const int* labels, float* m,
                                                double* s, float* zt, __nv_bfloat16* e, float* acc, int dim,
                                                int first) {
    fold(z, n, j0, labels, m, s, zt, e, acc, dim, first);
}

// Monte-Carlo labels, chunk by chunk in vocabulary order, after a complete fold: the
// first column whose cumulative mass sum_{i <= j} exp(z_i - m) exceeds
// sample_uniform(seed, row) * s, as cross_entropy draws. cum carries the mass of the
// earlier chunks; picked stays -1 until found (the host then takes the last label).
// Row `row` is batch row ids[row], whose uniform it draws. Each thread owns a contiguous
// piece of the chunk so the CDF is inverted piece by piece.
extern "C" __global__ void classifier_draw(const float* z, int n, int j0, const int* ids, const float* m,
                                           const double* s, double* cum, int* picked, unsigned long long seed) {
    __shared__ double prefix[1024];
    const size_t row = blockIdx.x;
    if (picked[row] >= 0) return;
    const float* zr = z + row * n;
    const float mr = m[row];
    const int piece = (n + blockDim.x - 1) / blockDim.x;
    const int c0 = min(n, (int)threadIdx.x * piece), c1 = min(n, c0 + piece);
    double part = 0.0;
    for (int j = c0; j < c1; ++j) part += (double)expf(zr[j] - mr);
    prefix[threadIdx.x] = part;
    __syncthreads();
    __shared__ double before;
    if (threadIdx.x == 0) {
        double a = cum[row];
        for (int i = 0; i < (int)blockDim.x; ++i) {
            const double p = prefix[i];
            prefix[i] = a;
            a += p;
        }
        before = a;
    }
    __syncthreads();
    const double u = (double)sample_uniform(seed, ids[row]) * s[row];
    if (prefix[threadIdx.x] <= u && u < prefix[threadIdx.x] + part) {
        double a = prefix[threadIdx.x];
        for (int j = c0; j < c1; ++j) {
            a += (double)expf(zr[j] - mr);
            if (a > u) {
                picked[row] = j0 + j;
                break;
            }
        }
    }
    if (threadIdx.x == 0) cum[row] = before;
}

// loss = lse - zt with lse = m + ln s; with acc, in place:
// dhidden = scale (acc / s + (p_t - 1) W_t), p_t = exp(zt - lse).
template <typename W>
__device__ void finish(const int* labels, const float* m, const double* s, const float* zt, float* losses,
                       float* acc, const W* w, int dim, float scale) {
    const size_t row = blockIdx.x;
    const int t = labels[row];
    const double sr = s[row];
    const float lse = m[row] + (float)log(sr);
    const float z_t = zt[row];
    if (threadIdx.x == 0) losses[row] = lse - z_t;
    if (!acc) return;
    const float inv = 1.f / (float)sr, pt1 = expf(z_t - lse) - 1.f;
    const W* wt = w + (size_t)t * dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float* a = acc + row * dim + d;
        *a = scale * (*a * inv + pt1 * load(wt + d));
    }
}

extern "C" __global__ void classifier_finish_f32(const int* labels, const float* m, const double* s,
                                                 const float* zt, float* losses, float* acc, const float* w,
                                                 int dim, float scale) {
    finish(labels, m, s, zt, losses, acc, w, dim, scale);
}

extern "C" __global__ void classifier_finish_bf16(const int* labels, const float* m, const double* s,
                                                  const float* zt, float* losses, float* acc,
                                                  const __nv_bfloat16* w, int dim, float scale) {
    finish(labels, m, s, zt, losses, acc, w, dim, scale);
}

// dst[ids[row]] = src[row] for rows of width dim: the gathered rows' gradients back to
// their batch rows (the others stay as allocated, zero).
extern "C" __global__ void classifier_scatter_rows(const float* src, const int* ids, float* dst, int dim) {
    const size_t row = blockIdx.x;
    const size_t to = (size_t)ids[row] * dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) dst[to + d] = src[row * dim + d];
}
