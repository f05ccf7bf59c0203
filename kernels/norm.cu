// RMSNorm, forward and backward (CPU twin: backend/cpu/ops.rs). One block per row.
#include "common.cuh"

// y = w * x * rstd, rstd = 1/sqrt(mean(x^2) + eps).
extern "C" __global__ void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd, int dim, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const float* xr = x + row * dim;
    float s = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += xr[i] * xr[i];
    s = block_sum(s, scratch);
    const float r = 1.f / sqrtf(s / dim + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) y[row * dim + i] = w[i] * (xr[i] * r);
}

// dx += r w dy - x r^3/D sum(w dy x).
extern "C" __global__ void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx, int dim) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const float *xr = x + row * dim, *dyr = dy + row * dim;
    float s = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += dyr[i] * w[i] * xr[i];
    s = block_sum(s, scratch);
    const float r = rstd[row];
    const float c = s * r * r * r / dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dx[row * dim + i] += r * w[i] * dyr[i] - xr[i] * c;
}
