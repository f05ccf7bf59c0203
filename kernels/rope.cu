// Rotate-half RoPE in place (CPU twin: ops::rope). Row r uses angle table row r % period;
// sign = -1 applies the inverse rotation (backward). Each work item is one (row, head,
// i < hd/2) pair; when hd/2 is a multiple of 4 (and the operands 16-byte aligned) four
// consecutive i of one head move together through 128-bit accesses.
#include "common.cuh"

extern "C" __global__ void rope(float* x, const float* cos_t, const float* sin_t, int rows, int n_heads, int hd, int period, float sign) {
    const int half = hd / 2;
    const bool vec = half % 4 == 0 && aligned16(x, cos_t, sin_t);
    for_each_pack<4>((size_t)rows * n_heads * half, vec, [=](auto w, size_t idx) {
        constexpr int W = decltype(w)::value;
        const int i = idx % half;
        const size_t h = (idx / half) % n_heads;
        const size_t r = idx / ((size_t)half * n_heads);
        const size_t t = r % period;
        const Pack<W> c = load<W>(cos_t, t * half + i), s = load<W>(sin_t, t * half + i);
        float* p = x + r * n_heads * hd + h * hd;
        Pack<W> a = load<W>(p, i), b = load<W>(p, i + half);
#pragma unroll
        for (int k = 0; k < W; ++k) {
            const float ak = a.v[k], bk = b.v[k], sk = sign * s.v[k];
            a.v[k] = ak * c.v[k] - bk * sk;
            b.v[k] = bk * c.v[k] + ak * sk;
        }
        store(p, i, a);
        store(p, i + half, b);
    });
}
