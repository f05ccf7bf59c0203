// RMSNorm, forward and backward (CPU twin: backend/cpu/ops.rs). One block per row; rows
// move through 128-bit accesses (four f32 or, for a bf16 output, eight elements) when the
// row length is a multiple of the pack and the operands are 16-byte aligned (then every
// row start is), one element at a time otherwise. The forward kernels come in two
// storage types of the output y (`_f32`, `_bf16`: the normed activation the next matmul
// reads); x, w, h and rstd are f32 in both, and all arithmetic is f32.
#include "common.cuh"

// The second half of both forward kernels, given the row's sum of squares `ss` (the same in
// every thread): rstd = 1/sqrt(ss/dim + eps) and y = w * x * rstd over the row.
template <typename Ty>
__device__ __forceinline__ void normalize_row(const float* xr, const float* w, Ty* yr, float* rstd, int dim, bool vec,
                                              float eps, float ss) {
    const float r = 1.f / sqrtf(ss / dim + eps);
    if (threadIdx.x == 0) *rstd = r;
    row_packs<PackOf<Ty>::value>(dim, vec, [&](auto p, size_t i) {
        constexpr int W = decltype(p)::value;
        const Pack<W> a = load<W>(xr, i), ww = load<W>(w, i);
        Pack<W> o;
#pragma unroll
        for (int k = 0; k < W; ++k) o.v[k] = ww.v[k] * (a.v[k] * r);
        store(yr, i, o);
    });
}

// y = w * x * rstd, rstd = 1/sqrt(mean(x^2) + eps).
template <typename Ty>
__device__ __forceinline__ void rmsnorm_fwd(const float* x, const float* w, Ty* y, float* rstd, int dim, float eps) {
    __shared__ float scratch[32];
    constexpr int V = PackOf<Ty>::value;
    const size_t row = blockIdx.x;
    const float* xr = x + row * dim;
    Ty* yr = y + row * dim;
    const bool vec = dim % V == 0 && aligned16(x, w, y);
    float s = 0.f;
    row_packs<V>(dim, vec, [&](auto p, size_t i) {
        constexpr int W = decltype(p)::value;
        const Pack<W> a = load<W>(xr, i);
#pragma unroll
        for (int k = 0; k < W; ++k) s += a.v[k] * a.v[k];
    });
    normalize_row(xr, w, yr, rstd + row, dim, vec, eps, block_sum(s, scratch));
}

// The residual add fused with the RMSNorm after it (Backend::add_rmsnorm): h += delta,
// then y = w * h * rstd of the updated row; one launch and one read of h and delta instead
// of an elementwise add and a norm that reads h back. The second pass reads the elements
// of h this same thread wrote in the first (same packs, same stride), so needs no barrier
// for them.
template <typename Ty>
__device__ __forceinline__ void add_rmsnorm_fwd(float* h, const float* delta, const float* w, Ty* y, float* rstd, int dim,
                                                float eps) {
    __shared__ float scratch[32];
    constexpr int V = PackOf<Ty>::value;
    const size_t row = blockIdx.x;
    float* hr = h + row * dim;
    const float* dr = delta + row * dim;
    Ty* yr = y + row * dim;
    const bool vec = dim % V == 0 && aligned16(h, delta, w, y);
    float s = 0.f;
    row_packs<V>(dim, vec, [&](auto p, size_t i) {
        constexpr int W = decltype(p)::value;
        Pack<W> a = load<W>(hr, i);
        const Pack<W> d = load<W>(dr, i);
#pragma unroll
        for (int k = 0; k < W; ++k) {
            a.v[k] += d.v[k];
            s += a.v[k] * a.v[k];
        }
        store(hr, i, a);
    });
    normalize_row(hr, w, yr, rstd + row, dim, vec, eps, block_sum(s, scratch));
}

extern "C" __global__ void rmsnorm_forward_f32(const float* x, const float* w, float* y, float* rstd, int dim, float eps) {
    rmsnorm_fwd(x, w, y, rstd, dim, eps);
}
extern "C" __global__ void rmsnorm_forward_bf16(const float* x, const float* w, __nv_bfloat16* y, float* rstd, int dim,
                                                float eps) {
    rmsnorm_fwd(x, w, y, rstd, dim, eps);
}
extern "C" __global__ void add_rmsnorm_forward_f32(float* h, const float* delta, const float* w, float* y, float* rstd,
                                                   int dim, float eps) {
    add_rmsnorm_fwd(h, delta, w, y, rstd, dim, eps);
}
extern "C" __global__ void add_rmsnorm_forward_bf16(float* h, const float* delta, const float* w, __nv_bfloat16* y,
                                                    float* rstd, int dim, float eps) {
    add_rmsnorm_fwd(h, delta, w, y, rstd, dim, eps);
}

// dx += r w dy - x r^3/D sum(w dy x).
extern "C" __global__ void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx, int dim) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const float *xr = x + row * dim, *dyr = dy + row * dim;
    float* dxr = dx + row * dim;
    const bool vec = dim % 4 == 0 && aligned16(dy, x, w, dx);
    float s = 0.f;
    row_packs<4>(dim, vec, [&](auto p, size_t i) {
        constexpr int W = decltype(p)::value;
        const Pack<W> d = load<W>(dyr, i), ww = load<W>(w, i), a = load<W>(xr, i);
#pragma unroll
        for (int k = 0; k < W; ++k) s += d.v[k] * ww.v[k] * a.v[k];
    });
    s = block_sum(s, scratch);
    const float r = rstd[row];
    const float c = s * r * r * r / dim;
    row_packs<4>(dim, vec, [&](auto p, size_t i) {
        constexpr int W = decltype(p)::value;
        const Pack<W> d = load<W>(dyr, i), ww = load<W>(w, i), a = load<W>(xr, i);
        Pack<W> o = load<W>(dxr, i);
#pragma unroll
        for (int k = 0; k < W; ++k) o.v[k] += r * ww.v[k] * d.v[k] - a.v[k] * c;
        store(dxr, i, o);
    });
}
