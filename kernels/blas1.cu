// Vector helpers (CPU twins in backend/cpu/mod.rs).
#include "common.cuh"

extern "C" __global__ void add_assign(float* a, const float* b, size_t n) {
    GRID_STRIDE(i, n) { a[i] += b[i]; }
}

extern "C" __global__ void axpy(float alpha, const float* x, float* y, size_t n) {
    GRID_STRIDE(i, n) { y[i] += alpha * x[i]; }
}

extern "C" __global__ void scale(float* x, float k, size_t n) {
    GRID_STRIDE(i, n) { x[i] *= k; }
}

extern "C" __global__ void mul_assign(float* a, const float* b, size_t n) {
    GRID_STRIDE(i, n) { a[i] *= b[i]; }
}

// One partial dot product (in f64) per block; the host adds the partials in order.
extern "C" __global__ void dot_partial(const float* x, const float* y, double* partial, size_t n) {
    __shared__ double scratch[32];
    double s = 0.0;
    GRID_STRIDE(i, n) { s += (double)x[i] * (double)y[i]; }
    s = block_sum_d(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// out += (alpha x)^2, for the materialised per-sequence-gradient variant the benchmarks
// compare per-sample squaring against.
extern "C" __global__ void sq_accumulate(const float* x, float* out, float alpha, size_t n) {
    GRID_STRIDE(i, n) { out[i] += (alpha * x[i]) * (alpha * x[i]); }
}
