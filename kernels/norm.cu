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

// The residual add fused with the RMSNorm after it (Backend::add_rmsnorm): h += delta,
// then y = w * h * rstd of the updated row; one launch and one read of h and delta instead
// of an elementwise add and a norm that reads h back. The second loop reads the elements
// of h this same thread wrote in the first (same stride), so no barrier is needed for them.
extern "C" __global__ void add_rmsnorm_forward(float* h, const float* delta, const float* w, float* y, float* rstd, int dim,
                                               float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    float* hr = h + row * dim;
    const float* dr = delta + row * dim;
    float s = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = hr[i] + dr[i];
        hr[i] = v;
        s += v * v;
    }
    s = block_sum(s, scratch);
    const float r = 1.f / sqrtf(s / dim + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) y[row * dim + i] = w[i] * (hr[i] * r);
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
