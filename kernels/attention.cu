// Causal attention softmax, forward and backward (CPU twin: backend/cpu/attention.rs).
// The score and value products run as cuBLAS batched GEMMs; these kernels own the
// masking and the softmax. One block per (sequence, head, query) row of length tk.
#include "common.cuh"

// In place: scores -> probabilities. Query i sees keys 0..=q_offset+i.
extern "C" __global__ void attn_softmax_forward(float* s, int tq, int tk, int q_offset) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const int i = row % tq;
    const int n = min(q_offset + i + 1, tk);
    float* p = s + row * tk;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, p[j]);
    m = block_max(m, scratch);
    float sum = 0.f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float e = expf(p[j] - m);
        p[j] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    const float inv = 1.f / sum;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) p[j] = j < n ? p[j] * inv : 0.f;
}

// In place on dP: dS = P (dP - rowsum(dP P)).
extern "C" __global__ void attn_softmax_backward(const float* probs, float* dp, int tk) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const float* p = probs + row * tk;
    float* d = dp + row * tk;
    float dot = 0.f;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) dot += d[j] * p[j];
    dot = block_sum(dot, scratch);
    for (int j = threadIdx.x; j < tk; j += blockDim.x) d[j] = p[j] * (d[j] - dot);
}
