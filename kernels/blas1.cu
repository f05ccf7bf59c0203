// Vector helpers (CPU twins in backend/cpu/mod.rs).
#include "common.cuh"

// Elementwise kernels read and write four floats per access where every operand is
// 16-byte aligned (whole device buffers always are), one at a time for the tail.

extern "C" __global__ void add_assign(float* a, const float* b, size_t n) {
    for_each_pack<4>(n, aligned16(a, b), [=](auto w, size_t i) {
        constexpr int W = decltype(w)::value;
        Pack<W> x = load<W>(a, i);
        const Pack<W> y = load<W>(b, i);
#pragma unroll
        for (int k = 0; k < W; ++k) x.v[k] += y.v[k];
        store(a, i, x);
    });
}

extern "C" __global__ void axpy(float alpha, const float* x, float* y, size_t n) {
    for_each_pack<4>(n, aligned16(x, y), [=](auto w, size_t i) {
        constexpr int W = decltype(w)::value;
        const Pack<W> a = load<W>(x, i);
        Pack<W> b = load<W>(y, i);
#pragma unroll
        for (int k = 0; k < W; ++k) b.v[k] += alpha * a.v[k];
        store(y, i, b);
    });
}

extern "C" __global__ void scale(float* x, float k, size_t n) {
    for_each_pack<4>(n, aligned16(x), [=](auto w, size_t i) {
        constexpr int W = decltype(w)::value;
        Pack<W> a = load<W>(x, i);
#pragma unroll
        for (int j = 0; j < W; ++j) a.v[j] *= k;
        store(x, i, a);
    });
}

extern "C" __global__ void mul_assign(float* a, const float* b, size_t n) {
    for_each_pack<4>(n, aligned16(a, b), [=](auto w, size_t i) {
        constexpr int W = decltype(w)::value;
        Pack<W> x = load<W>(a, i);
        const Pack<W> y = load<W>(b, i);
#pragma unroll
        for (int k = 0; k < W; ++k) x.v[k] *= y.v[k];
        store(a, i, x);
    });
}

// One partial dot product (in f64) per block; the host adds the partials in order.
extern "C" __global__ void dot_partial(const float* x, const float* y, double* partial, size_t n) {
    __shared__ double scratch[32];
    double s = 0.0;
    for_each_pack<4>(n, aligned16(x, y), [&](auto w, size_t i) {
        constexpr int W = decltype(w)::value;
        const Pack<W> a = load<W>(x, i), b = load<W>(y, i);
#pragma unroll
        for (int k = 0; k < W; ++k) s += (double)a.v[k] * (double)b.v[k];
    });
    s = block_sum_d(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// Many dot products at once (Backend::dots): blockIdx.x is the pair k, blockIdx.y one of
// gridDim.y chunks; table holds the x pointers, then the y pointers, then the lengths, one
// 64-bit word per pair each. partial[k * gridDim.y + chunk] is the f64 sum of that chunk's
// grid-strided elements; the host adds a pair's partials in chunk order.
extern "C" __global__ void dots_partial(const unsigned long long* table, int pairs, double* partial) {
    __shared__ double scratch[32];
    const int k = blockIdx.x;
    const float* x = (const float*)table[k];
    const float* y = (const float*)table[pairs + k];
    const size_t n = (size_t)table[2 * pairs + k];
    double s = 0.0;
    for (size_t i = (size_t)blockIdx.y * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.y * blockDim.x) {
        s += (double)x[i] * (double)y[i];
    }
    s = block_sum_d(s, scratch);
    if (threadIdx.x == 0) partial[(size_t)k * gridDim.y + blockIdx.y] = s;
}

// out += (alpha x)^2, for the materialised per-sequence-gradient variant the benchmarks
// compare per-sample squaring against.
extern "C" __global__ void sq_accumulate(const float* x, float* out, float alpha, size_t n) {
    for_each_pack<4>(n, aligned16(x, out), [=](auto w, size_t i) {
        constexpr int W = decltype(w)::value;
        const Pack<W> a = load<W>(x, i);
        Pack<W> o = load<W>(out, i);
#pragma unroll
        for (int k = 0; k < W; ++k) o.v[k] += (alpha * a.v[k]) * (alpha * a.v[k]);
        store(out, i, o);
    });
}
