// Token-embedding gather from the bf16 or f32 table, and f32 -> bf16 conversion for the
// inputs of the bf16 base-weight GEMMs (CPU twin: ops::embedding).
#include "common.cuh"

extern "C" __global__ void embedding_gather(const __nv_bfloat16* table, const uint32_t* ids, float* out, int rows, int dim) {
    GRID_STRIDE(i, (size_t)rows * dim) {
        const size_t r = i / dim, c = i % dim;
        out[i] = __bfloat162float(table[(size_t)ids[r] * dim + c]);
    }
}

// --base-dtype f32: the table stays f32.
extern "C" __global__ void embedding_gather_f32(const float* table, const uint32_t* ids, float* out, int rows, int dim) {
    GRID_STRIDE(i, (size_t)rows * dim) {
        const size_t r = i / dim, c = i % dim;
        out[i] = table[(size_t)ids[r] * dim + c];
    }
}

extern "C" __global__ void f32_to_bf16(const float* x, __nv_bfloat16* y, size_t n) {
    GRID_STRIDE(i, n) { y[i] = __float2bfloat16(x[i]); }
}
