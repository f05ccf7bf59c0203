// SwiGLU activation silu(gate) * up and its backward (CPU twin: ops::swiglu).
#include "common.cuh"

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

extern "C" __global__ void swiglu_forward(const float* gate, const float* up, float* out, size_t n) {
    GRID_STRIDE(i, n) {
        const float g = gate[i];
        out[i] = g * sigmoid(g) * up[i];
    }
}

// d silu(g)/dg = sig(g) (1 + g (1 - sig(g))).
extern "C" __global__ void swiglu_backward(const float* dact, const float* gate, const float* up, float* dgate, float* dup, size_t n) {
    GRID_STRIDE(i, n) {
        const float g = gate[i], s = sigmoid(g), d = dact[i];
        dgate[i] = d * up[i] * s * (1.f + g * (1.f - s));
        dup[i] = d * g * s;
    }
}
