// Fused softmax cross-entropy over (rows, vocab) logits, one block per row (CPU twin:
// ops::cross_entropy). targets[row] < 0 ignores the row. With `sample`, the label is drawn
// from the row's softmax by inverting its CDF at sample_uniform(seed, row) (Monte-Carlo
// Fisher). Writes the row loss and, with `write_grad`, dlogits = scale (softmax - onehot).
// The max and the gradient sweep move 128-bit packs when vocab is a multiple of 4 (rows
// then start 16-byte aligned); the sum keeps one contiguous chunk per thread, as the CDF
// inversion needs.
#include "common.cuh"

extern "C" __global__ void cross_entropy(const float* logits, const int* targets, float* losses, float* dlogits, int vocab,
                                         float grad_scale, int write_grad, unsigned long long seed, int sample) {
    __shared__ float scratch[32];
    __shared__ double dscratch[32];
    __shared__ double prefix[1024];
    __shared__ int picked;
    const size_t row = blockIdx.x;
    const float* z = logits + row * vocab;
    float* d = dlogits + row * vocab;
    const bool vec = vocab % 4 == 0 && aligned16(logits, dlogits);
    if (targets[row] < 0) {
        if (threadIdx.x == 0) losses[row] = 0.f;
        if (write_grad)
            row_packs<4>(vocab, vec, [&](auto w, size_t j) { store(d, j, Pack<decltype(w)::value>{}); });
        return;
    }
    float m = -INFINITY;
    row_packs<4>(vocab, vec, [&](auto w, size_t j) {
        constexpr int W = decltype(w)::value;
        const Pack<W> a = load<W>(z, j);
#pragma unroll
        for (int k = 0; k < W; ++k) m = fmaxf(m, a.v[k]);
    });
    m = block_max(m, scratch);
    // Each thread owns a contiguous chunk so the CDF can be inverted chunk by chunk.
    const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
    const int c0 = min(vocab, (int)threadIdx.x * chunk), c1 = min(vocab, c0 + chunk);
    double part = 0.0;
    for (int j = c0; j < c1; ++j) part += (double)expf(z[j] - m);
    const double total = block_sum_d(part, dscratch);
    const float lse = m + (float)log(total);
    int target = targets[row];
    if (sample) {
        prefix[threadIdx.x] = part;
        __syncthreads();
        if (threadIdx.x == 0) {
            double acc = 0.0;
            for (int t = 0; t < (int)blockDim.x; ++t) {
                const double p = prefix[t];
                prefix[t] = acc;
                acc += p;
            }
            picked = vocab - 1;
        }
        __syncthreads();
        const double u = (double)sample_uniform(seed, row) * total;
        if (prefix[threadIdx.x] <= u && u < prefix[threadIdx.x] + part) {
            double acc = prefix[threadIdx.x];
            for (int j = c0; j < c1; ++j) {
                acc += (double)expf(z[j] - m);
                if (acc > u) {
                    picked = j;
                    break;
                }
            }
        }
        __syncthreads();
        target = picked;
    }
    if (threadIdx.x == 0) losses[row] = lse - z[target];
    if (write_grad)
        row_packs<4>(vocab, vec, [&](auto w, size_t j) {
            constexpr int W = decltype(w)::value;
            Pack<W> a = load<W>(z, j);
#pragma unroll
            for (int k = 0; k < W; ++k) a.v[k] = grad_scale * (expf(a.v[k] - lse) - (j + k == (size_t)target ? 1.f : 0.f));
            store(d, j, a);
        });
}
