// Rotate-half RoPE in place (CPU twin: ops::rope). Row r uses angle table row r % period;
// sign = -1 applies the inverse rotation (backward). Each work item is one (row, head,
// i < hd/2) pair; when hd/2 is a whole number of 128-bit packs of x (4 f32 or 8 bf16
// values; the operands 16-byte aligned) that many consecutive i of one head move together.
// x is f32, or bf16 (q and k with bf16 base weights: rotated in f32, rounded once), or f32
// rotated into a bf16 y (rope_f32_to_bf16).
#include "common.cuh"

// Reads x, writes y (the same buffer for the in-place entries). Packs of the wider of the
// two types' 128-bit widths (8 where either is bf16: two float4 reads of an f32 x).
template <typename Tin, typename Tout>
__device__ __forceinline__ void rope_impl(const Tin* x, Tout* y, const float* cos_t, const float* sin_t, int rows,
                                          int n_heads, int hd, int period, float sign) {
    constexpr int V = PackOf<Tin>::value > PackOf<Tout>::value ? PackOf<Tin>::value : PackOf<Tout>::value;
    const int half = hd / 2;
    const bool vec = half % V == 0 && aligned16(x, y, cos_t, sin_t);
    for_each_pack<V>((size_t)rows * n_heads * half, vec, [=](auto w, size_t idx) {
        constexpr int W = decltype(w)::value;
        const int i = idx % half;
        const size_t h = (idx / half) % n_heads;
        const size_t r = idx / ((size_t)half * n_heads);
        const size_t t = r % period;
        const Pack<W> c = load<W>(cos_t, t * half + i), s = load<W>(sin_t, t * half + i);
        const size_t head = r * n_heads * hd + h * hd;
        Pack<W> a = load<W>(x + head, i), b = load<W>(x + head, i + half);
#pragma unroll
        for (int k = 0; k < W; ++k) {
            rope_rotate(a.v[k], b.v[k], c.v[k], sign * s.v[k]);
        }
        store(y + head, i, a);
        store(y + head, i + half, b);
    });
}

extern "C" __global__ void rope(float* x, const float* cos_t, const float* sin_t, int rows, int n_heads, int hd, int period, float sign) {
    rope_impl(x, x, cos_t, sin_t, rows, n_heads, hd, period, sign);
}
extern "C" __global__ void rope_bf16(__nv_bfloat16* x, const float* cos_t, const float* sin_t, int rows, int n_heads, int hd, int period,
                                     float sign) {
    rope_impl(x, x, cos_t, sin_t, rows, n_heads, hd, period, sign);
}
// f32 sums rotated and stored bf16, rounded once: `rope` then f32_to_bf16 in one pass (the
// folded projection path's q and k).
extern "C" __global__ void rope_f32_to_bf16(const float* x, __nv_bfloat16* y, const float* cos_t, const float* sin_t, int rows,
                                            int n_heads, int hd, int period, float sign) {
    rope_impl(x, y, cos_t, sin_t, rows, n_heads, hd, period, sign);
}
