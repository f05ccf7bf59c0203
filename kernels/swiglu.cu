// SwiGLU activation silu(gate) * up and its backward (CPU twin: ops::swiglu), one 128-bit
// access per four f32 or eight bf16 elements where the operands are 16-byte aligned. gate
// and up are f32, or bf16 (the gate/up projections' outputs with bf16 base weights); the
// arithmetic is f32 either way.
#include "common.cuh"

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// The pack width of a kernel over f32 data and data of type T: eight when T is bf16 (one
// 128-bit word of it, two float4s of the f32 operands), else four.
template <typename T>
struct PackWithF32 {
    static constexpr int value = PackOf<T>::value > 4 ? PackOf<T>::value : 4;
};

// The output is the down projection's input: f32, or bf16 with bf16 base weights (eight
// elements per 128-bit store).
template <typename Ti, typename To>
__device__ __forceinline__ void swiglu_fwd(const Ti* gate, const Ti* up, To* out, size_t n) {
    constexpr int V = PackWithF32<Ti>::value > PackWithF32<To>::value ? PackWithF32<Ti>::value : PackWithF32<To>::value;
    for_each_pack<V>(n, aligned16(gate, up, out), [=](auto w, size_t i) {
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
extern "C" __global__ void swiglu_forward_bf16_in(const __nv_bfloat16* gate, const __nv_bfloat16* up, __nv_bfloat16* out,
                                                  size_t n) {
    swiglu_fwd(gate, up, out, n);
}

// d silu(g)/dg = sig(g) (1 + g (1 - sig(g))), in f32. The gradients are stored as TO: f32,
// or bf16 (each f32 result rounded once to nearest even) for bf16 gate and up except in
// KFAC reduce passes (host side: src/backend/cuda/rows.rs, `GradFeeds`).
template <typename TI, typename TO>
__device__ __forceinline__ void swiglu_bwd(const float* dact, const TI* gate, const TI* up, TO* dgate, TO* dup,
                                           size_t n) {
    for_each_pack<PackWithF32<TI>::value>(n, aligned16(dact, gate, up, dgate, dup), [=](auto w, size_t i) {
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

extern "C" __global__ void swiglu_backward(const float* dact, const float* gate, const float* up, float* dgate, float* dup,
                                           size_t n) {
    swiglu_bwd(dact, gate, up, dgate, dup, n);
}
extern "C" __global__ void swiglu_backward_bf16_in(const float* dact, const __nv_bfloat16* gate,
                                                   const __nv_bfloat16* up, float* dgate, float* dup, size_t n) {
    swiglu_bwd(dact, gate, up, dgate, dup, n);
}
extern "C" __global__ void swiglu_backward_bf16(const float* dact, const __nv_bfloat16* gate, const __nv_bfloat16* up,
                                                __nv_bfloat16* dgate, __nv_bfloat16* dup, size_t n) {
    swiglu_bwd(dact, gate, up, dgate, dup, n);
}
