// Shared device helpers. Every reduction here runs in a fixed order, so results are
// deterministic for a given launch configuration.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

struct SumOp {
    template <typename T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Reduce over the block (blockDim.x a multiple of 32); `scratch` holds 32 values. Every
// thread gets the result.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, T* scratch, T identity, Op op) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_reduce(v, op);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = threadIdx.x < nw ? scratch[threadIdx.x] : identity;
    if (warp == 0) v = warp_reduce(v, op);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, SumOp()); }
__device__ __forceinline__ float block_sum(float v, float* s) { return block_reduce(v, s, 0.f, SumOp()); }
__device__ __forceinline__ double block_sum_d(double v, double* s) { return block_reduce(v, s, 0.0, SumOp()); }
__device__ __forceinline__ float block_max(float v, float* s) { return block_reduce(v, s, -INFINITY, MaxOp()); }

// The counter-based uniform in [0, 1) of backend::sample_uniform (splitmix64 finaliser),
// so CPU and CUDA draw the same Monte-Carlo labels.
__device__ __forceinline__ float sample_uniform(unsigned long long seed, unsigned long long row) {
    unsigned long long z = seed ^ (row * 0x9e3779b97f4a7c15ULL);
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    return (float)(z >> 40) / 16777216.0f;
}

#define GRID_STRIDE(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)(n); i += (size_t)gridDim.x * blockDim.x)
