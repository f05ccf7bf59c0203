// Rotate-half RoPE in place (CPU twin: ops::rope). Row r uses angle table row r % period;
// sign = -1 applies the inverse rotation (backward). Each work item is one (row, head,
// i < hd/2) pair; when hd/2 is a whole number of 128-bit packs of x (4 f32 or 8 bf16
// values; the operands 16-byte aligned) that many consecutive i of one head move together.
// x is f32, or bf16 (q and k with bf16 base weights: rotated in f32, rounded once).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void rope_impl(T* x, const float* cos_t, const float* sin_t, int rows, int n_heads, int hd,
                                          int period, float sign) {
    constexpr int V = PackOf<T>::value;
    const int half = hd / 2;
    const bool vec = half % V == 0 && aligned16(x, cos_t, sin_t);
    for_each_pack<V>((size_t)rows * n_heads * half, vec, [=](auto w, size_t idx) {
        constexpr int W = decltype(w)::value;
        const int i = idx % half;
        const size_t h = (idx / half) % n_heads;
        const size_t r = idx / ((size_t)half * n_heads);
        const size_t t = r % period;
        const Pack<W> c = load<W>(cos_t, t * half + i), s = load<W>(sin_t, t * half + i);
        T* p = x + r * n_heads * hd + h * hd;
        Pack<W> a = load<W>(p, i), b = load<W>(p, i + half);
#pragma unroll
        for (int k = 0; k < W; ++k) {
            rope_rotate(a.v[k], b.v[k], c.v[k], sign * s.v[k]);
        }
        store(p, i, a);
        store(p, i + half, b);
    });
}

extern "C" __global__ void rope(float* x, const float* cos_t, const float* sin_t, int rows, int n_heads, int hd, int period, float sign) {
    rope_impl(x, cos_t, sin_t, rows, n_heads, hd, period, sign);
}
extern "C" __global__ void rope_bf16(__nv_bfloat16* x, const float* cos_t, const float* sin_t, int rows, int n_heads, int hd, int period,
                                     float sign) {
    rope_impl(x, cos_t, sin_t, rows, n_heads, hd, period, sign);
}
