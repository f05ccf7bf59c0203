// SwiGLU activation silu(gate) * up and its backward (CPU twin: ops::swiglu), one 128-bit
// access per four f32 or eight bf16 elements where the operands are 16-byte aligned.
#include "common.cuh"

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// The output is the down projection's input: f32, or bf16 with bf16 base weights (eight
// elements per 128-bit store).
template <typename To>
__device__ __forceinline__ void swiglu_fwd(const float* gate, const float* up, To* out, size_t n) {
    for_each_pack<PackOf<To>::value>(n, aligned16(gate, up, out), [=](auto w, size_t i) {
        constexpr int W = decltype(w)::value;
        const Pack<W> g = load<W>(gate, i), u = load<W>(up, i);
        Pack<W> o;
#pragma unroll
        for (int k = 0; k < W; ++k) o.v[k] = g.v[k] * sigmoid(g.v[k]) * u.v[k];
        store(out, i, o);
    });
}

extern "C" __global__ void swiglu_forward_f32(const float* gate, const float* up, float* out, size_t n) {
    swiglu_fwd(gate, up, out, n);
}
extern "C" __global__ void swiglu_forward_bf16(const float* gate, const float* up, __nv_bfloat16* out, size_t n) {
    swiglu_fwd(gate, up, out, n);
}

// d silu(g)/dg = sig(g) (1 + g (1 - sig(g))).
extern "C" __global__ void swiglu_backward(const float* dact, const float* gate, const float* up, float* dgate, float* dup, size_t n) {
    for_each_pack<4>(n, aligned16(dact, gate, up, dgate, dup), [=](auto w, size_t i) {
        constexpr int W = decltype(w)::value;
        const Pack<W> d = load<W>(dact, i), g = load<W>(gate, i), u = load<W>(up, i);
        Pack<W> dg, du;
#pragma unroll
        for (int k = 0; k < W; ++k) {
            const float s = sigmoid(g.v[k]);
            dg.v[k] = d.v[k] * u.v[k] * s * (1.f + g.v[k] * (1.f - s));
            du.v[k] = d.v[k] * g.v[k] * s;
        }
        store(dgate, i, dg);
        store(dup, i, du);
    });
}
