// Token-embedding gather from the bf16 or f32 table, f32 -> bf16 conversion for the f32
// inputs of the bf16 base-weight GEMMs (gradients), and bf16 -> f32 for the bf16
// activations read by f32-only kernels (CPU twin: ops::embedding). 128-bit accesses where
// a row length allows whole packs (8 bf16 or 4 f32 values) and the operands are aligned.
#include "common.cuh"

// Output element i is column i % dim of table row ids[i / dim]; a pack never straddles
// two rows because dim is a multiple of the pack width on the vector path.
template <int V, typename T, typename To>
__device__ __forceinline__ void gather(const T* table, const uint32_t* ids, To* out, int rows, int dim) {
    for_each_pack<V>((size_t)rows * dim, dim % V == 0 && aligned16(table, out), [=](auto w, size_t i) {
        constexpr int W = decltype(w)::value;
        const size_t r = i / dim, c = i % dim;
        store(out, i, load<W>(table, (size_t)ids[r] * dim + c));
    });
}

extern "C" __global__ void embedding_gather(const __nv_bfloat16* table, const uint32_t* ids, float* out, int rows, int dim) {
    gather<8>(table, ids, out, rows, dim);
}

// --base-dtype f32: the table stays f32. Also the classifier's gather of its active rows
// of f32 hidden states.
extern "C" __global__ void embedding_gather_f32(const float* table, const uint32_t* ids, float* out, int rows, int dim) {
    gather<4>(table, ids, out, rows, dim);
}

// The classifier's gather of its active rows of bf16 hidden states, kept bf16.
extern "C" __global__ void gather_rows_bf16(const __nv_bfloat16* x, const uint32_t* ids, __nv_bfloat16* out, int rows,
                                            int dim) {
    gather<8>(x, ids, out, rows, dim);
}

extern "C" __global__ void f32_to_bf16(const float* x, __nv_bfloat16* y, size_t n) {
    for_each_pack<8>(n, aligned16(x, y), [=](auto w, size_t i) {
        constexpr int W = decltype(w)::value;
        store(y, i, load<W>(x, i));
    });
}

// Exact: every bf16 value is an f32 value.
extern "C" __global__ void bf16_to_f32(const __nv_bfloat16* x, float* y, size_t n) {
    for_each_pack<8>(n, aligned16(x, y), [=](auto w, size_t i) {
        constexpr int W = decltype(w)::value;
        store(y, i, load<W>(x, i));
    });
}
