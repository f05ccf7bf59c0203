// Rotate-half RoPE in place (CPU twin: ops::rope). Row r uses angle table row r % period;
// sign = -1 applies the inverse rotation (backward).
#include "common.cuh"

extern "C" __global__ void rope(float* x, const float* cos_t, const float* sin_t, int rows, int n_heads, int hd, int period, float sign) {
    const int half = hd / 2;
    GRID_STRIDE(idx, (size_t)rows * n_heads * half) {
        const int i = idx % half;
        const size_t h = (idx / half) % n_heads;
        const size_t r = idx / ((size_t)half * n_heads);
        const size_t t = r % period;
        const float c = cos_t[t * half + i], s = sign * sin_t[t * half + i];
        float* p = x + r * n_heads * hd + h * hd;
        const float a = p[i], b = p[i + half];
        p[i] = a * c - b * s;
        p[i + half] = b * c + a * s;
    }
}
