// AdamW with the diagonal Laplace penalty fused in (CPU twin: backend/cpu/optim.rs):
// g' = grad_scale g [+ lambda prec (p - mean)], p *= 1 - lr wd,
// m = b1 m + (1-b1) g', v = b2 v + (1-b2) g'^2, p -= lr (m/bc1) / (sqrt(v/bc2) + eps).
#include "common.cuh"

extern "C" __global__ void adamw_step(float* p, const float* g, float* m, float* v, size_t n, float lr, float b1, float b2,
                                      float eps, float wd, float bc1, float bc2, float grad_scale, const float* mean,
                                      const float* prec, float lambda, int penalty) {
    GRID_STRIDE(i, n) {
        float gi = grad_scale * g[i];
        if (penalty) gi += lambda * prec[i] * (p[i] - mean[i]);
        float pi = p[i] * (1.f - lr * wd);
        const float mi = b1 * m[i] + (1.f - b1) * gi;
        const float vi = b2 * v[i] + (1.f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
    }
}
