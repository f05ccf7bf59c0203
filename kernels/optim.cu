// AdamW with the diagonal Laplace penalty fused in (CPU twin: backend/cpu/optim.rs):
// g' = grad_scale g [+ lambda prec (p - mean)], p *= 1 - lr wd,
// m = b1 m + (1-b1) g', v = b2 v + (1-b2) g'^2, p -= lr (m/bc1) / (sqrt(v/bc2) + eps).
// Four parameters per 128-bit access where every operand is 16-byte aligned.
#include "common.cuh"

extern "C" __global__ void adamw_step(float* p, const float* g, float* m, float* v, size_t n, float lr, float b1, float b2,
                                      float eps, float wd, float bc1, float bc2, float grad_scale, const float* mean,
                                      const float* prec, float lambda, int penalty) {
    for_each_pack<4>(n, aligned16(p, g, m, v, mean, prec), [=](auto w, size_t i) {
        constexpr int W = decltype(w)::value;
        Pack<W> pp = load<W>(p, i), mm = load<W>(m, i), vv = load<W>(v, i);
        const Pack<W> gg = load<W>(g, i);
        Pack<W> mu, pr;
        if (penalty) mu = load<W>(mean, i), pr = load<W>(prec, i);
#pragma unroll
        for (int k = 0; k < W; ++k) {
            float gi = grad_scale * gg.v[k];
            if (penalty) gi += lambda * pr.v[k] * (pp.v[k] - mu.v[k]);
            const float pi = pp.v[k] * (1.f - lr * wd);
            mm.v[k] = b1 * mm.v[k] + (1.f - b1) * gi;
            vv.v[k] = b2 * vv.v[k] + (1.f - b2) * gi * gi;
            pp.v[k] = pi - lr * (mm.v[k] / bc1) / (sqrtf(vv.v[k] / bc2) + eps);
        }
        store(m, i, mm);
        store(v, i, vv);
        store(p, i, pp);
    });
}
