// LoRA inside the GEMMs (host side: backend/cuda/lora_gemm.rs; CPU twin: the per-projection
// `linear` + `lora_forward` / `lora_backward` sequence of backend/group.rs).
//
// One kernel, a grouped GEMM with a segmented K dimension on bf16 tensor cores (mma.sync
// m16n8k16, f32 accumulation):
//   out_p (m, n_p) (+)= sum over segments s of problem p: alpha_s X_s (m, k_s) op(W_s)
// with X_s a row-major activation or gradient (f32, or bf16: the normed hidden states, the
// SwiGLU output, the gate/up and q/k/v gradients and o_proj's dx with bf16 base weights)
// and W_s a bf16 or f32 weight, stored n-major
// (W[n][k], lora_gemm_nt: y = x W^T) or k-major (W[k][n], lora_gemm_nn: dx = g W). Every
// problem of a launch shares the row count m; a block owns one BM x BN tile of one
// problem's output (one grid dimension runs over the problems' column tiles in order, the
// other over row tiles), so a projection group is one launch whatever its widths (GQA:
// k/v narrower than q), and each output element is written once by one thread: no
// atomics, deterministic. The u and gA launches, r columns wide and so few blocks, may split K over
// blockIdx.z (the host picks the split count from the shapes alone and adds the partial
// sums in split order: still deterministic). An output is f32, or bf16 (the f32 sum rounded once: the q/k/v and
// gate/up outputs with bf16 base weights, which only kernels read). The LoRA uses of it (the model's projections, four launches per group, and
// a reduction per u or gA output where K is split):
//   forward   u_p = x A_p^T                          problems u_p, one segment each
//             y_p = [x | s u_p] [W_p | B_p]^T       problems y_p, the low-rank part a
//                                                   second K segment of r columns
//   backward  gA_p = s g_p B_p                       problems gA_p
//             dx (+)= [g_1 .. g_P | gA_1 ..] [W_1; ..; W_P; A_1; ..]   one problem
// so the low-rank path adds about r / d of the base work (the u and gA products, and r more
// K columns per output tile), and A and B are read per tile, not per token. The forward's
// q and k leave rotated by RoPE when their head dim is a multiple of 16 dividing a warp's
// 64 columns (`rope_epilogue`): the f32 sums rotated, then stored (rounded once where bf16).
// A problem may carry an f32 addend, added to its sums before RoPE: the base product from
// cuBLAS, when only the LoRA segments run here (`ProjectionGemm::Hybrid`).
//
// Precision. Operands are staged into shared memory as bf16, each value v as P pieces
// (P = 1..3 per operand and segment): v0 = bf16(v), v1 = bf16(v - v0), v2 = bf16(v - v0 -
// v1). Three pieces hold all 24 bits of an f32 significand, and the products of pieces
// (i, j) with i + j < max(P_x, P_w) leave out terms below 2^-24 relative: f32 products
// from 6 bf16 ones (3 when one side is a bf16 weight, whose one piece is exact). The
// bf16 engine's base segments take one piece per side, rounding X to bf16 as cuBLAS is fed
// there; the LoRA segments take three pieces of each f32 operand and one of an X stored as
// bf16, which that piece holds exactly (their K is r, about r/d of the base work, so the
// low-rank path, u and gA keep f32 values, as the curvature estimators read them); the
// f32 engine's base segments take three (f32 results on tensor cores, 6 bf16 products per
// f32 one, still cheaper than f32 SIMT).
//
// Tiling (`Tiling` below; one pair of entries per tiling): 8 warps, each owning WTM x 64
// of a BM x BN output tile (2 x 8 mma tiles at 128 x 128, 4 x 8 at 128 x 256 and
// 256 x 128), K swept BK at a time through max(STAGES, 3) shared buffers per operand. A
// bf16 weight (the base products with bf16 base weights: nearly all the work) is copied
// global -> shared by cp.async in 16-byte chunks, STAGES - 1 steps ahead of the products,
// the buffers being the stages of the pipeline; so is X where it is bf16 (the activations
// and gradients the model stores so), while an f32 X (attention output, residual
// gradient, the gradients KFAC reduce sums) is loaded into registers a step ahead and stored
// as one bf16 piece. Any other segment (f32 weights: the LoRA segments and the f32 engine)
// is loaded into registers one step of at most 32 ahead, scaled and split into pieces in
// the first 3 buffers. Staging both operands through registers had cost about 18
// instructions per mma (ncu, H200, 2026-11-29: 592 per warp per 32-mma step, IPC 0.8).
// Tails in m, n and k are zero-filled when staged (16-byte loads where the layout allows,
// else scalar), and a step's products stop at the last 16 columns of K that hold data (a
// LoRA segment of r = 16 takes one k16 step, not BK / 16). Blocks take the output tiles
// column tiles first (blockIdx.x; blockIdx.y the row tiles), or row tiles first when
// `rows_fastest` (then the blocks resident at once share a few weights' column tiles
// rather than one row tile of X, which favours L2 when W is the larger operand).
// lora_gemm.cu instantiates the tiling the engine runs; lora_gemm_tiles.cu the others,
// for `benches/cuda.rs` to time side by side.
#pragma once
#include "common.cuh"
#include "flash_attention.cuh"

namespace lg {

using fa::bf16;

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int PIECES = 3;  // bf16 pieces an operand may be staged as

// One tiling: output tile BM x BN, K step BK, STAGES cp.async stages. Each warp owns
// WTM x WTN of the tile (WTN = 64: the RoPE epilogue's heads divide it).
template <int BM_, int BN_, int BK_, int STAGES_>
struct Tiling {
    static constexpr int BM = BM_, BN = BN_, BK = BK_, STAGES = STAGES_;
    static constexpr int WTN = 64;
    static constexpr int WARPS_N = BN / WTN, WARPS_M = WARPS / WARPS_N;
    static constexpr int WTM = BM / WARPS_M;
    static constexpr int MT = WTM / 16, NT = WTN / 8;
    // K step of the register path: 32 at 128 x 128, 16 for the larger tiles (their
    // 64 x 64 warp tiles hold 128 accumulators, which leaves fewer registers for staging).
    static constexpr int WIDEST = BM > BN ? BM : BN;
    static constexpr int RK = 128 * 32 / WIDEST < BK ? 128 * 32 / WIDEST : BK;
    static constexpr int LDX = BK + 8;    // X tile [BM][BK]
    static constexpr int LD_NT = BK + 8;  // n-major W tile [BN][BK]
    static constexpr int LD_NN = BN + 8;  // k-major W tile [BK][BN]
    static constexpr int XTILE = BM * LDX;
    static constexpr int BUFFERS = STAGES > PIECES ? STAGES : PIECES;
    static constexpr int X_CHUNKS = BM * RK / 4 / THREADS;  // register path, 4 elements each
    static constexpr int W_CHUNKS = BN * RK / 4 / THREADS;
    static constexpr int XH_CHUNKS = BM * BK / 4 / THREADS;  // an f32 X beside a copied W
    static constexpr int X_COPIES = BM * BK / 8 / THREADS;   // 16-byte cp.async chunks
    static constexpr int W_COPIES = BN * BK / 8 / THREADS;
    static_assert(WARPS_M * WARPS_N == WARPS && WTM % 16 == 0, "8 warps tile the output");
    static_assert(BK % RK == 0 && BK % 16 == 0 && STAGES >= 2, "K steps");
    static_assert(X_CHUNKS * 4 * THREADS == BM * RK && W_CHUNKS * 4 * THREADS == BN * RK, "register chunks");
    static_assert(X_COPIES * 8 * THREADS == BM * BK && W_COPIES * 8 * THREADS == BN * BK, "copy chunks");
};

// Must match `Seg` and `Prob` of lora_gemm.rs (repr(C)).
struct Seg {
    const void* x;
    const void* w;
    int ld_x, k, ld_w, w_bf16;
    float alpha;
    int pieces_x, pieces_w, x_bf16;
};
struct Prob {
    void* out;
    const float* rope_cos;  // RoPE table (period, rope_hd / 2), when rope_hd > 0
    const float* rope_sin;
    const float* addend;  // an f32 (m, n) matrix added to the sums before RoPE, or null
    int n, accumulate, tile_start, seg_begin, seg_end, out_bf16, rope_hd, rope_period;
};
// A launch's problems and their segments, passed by value as a `__grid_constant__`
// parameter: no table to allocate and copy to the device per launch (a copy from pageable
// memory may wait for the queue), and every block reads the same few entries from the
// constant bank. Must match `Table` of lora_gemm.rs; the largest launch is the q/k/v
// backward's dx (one problem, six segments).
constexpr int MAX_PROBS = 8, MAX_SEGS = 16;
struct Table {
    Prob probs[MAX_PROBS];
    Seg segs[MAX_SEGS];
};

// 4 consecutive elements of row r, columns c..c+3, of a (rows, cols) row-major matrix
// with row stride ld; zeros outside. `vec`: the 4 can be read with one aligned load.
__device__ __forceinline__ float4 load4(const void* base, bool bf, int ld, int r, int c, int rows, int cols,
                                        bool vec) {
    float v[4] = {0.f, 0.f, 0.f, 0.f};
    if (r < rows && c < cols) {
        const size_t at = (size_t)r * ld + c;
        if (bf) {
            const uint16_t* p = static_cast<const uint16_t*>(base) + at;
            if (vec && c + 4 <= cols) {
                const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
                v[0] = __uint_as_float(u.x << 16), v[1] = __uint_as_float(u.x & 0xffff0000u);
                v[2] = __uint_as_float(u.y << 16), v[3] = __uint_as_float(u.y & 0xffff0000u);
            } else {
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    if (c + j < cols) v[j] = __uint_as_float((uint32_t)__ldg(p + j) << 16);
            }
        } else {
            const float* p = static_cast<const float*>(base) + at;
            if (vec && c + 4 <= cols) {
                const float4 f = __ldg(reinterpret_cast<const float4*>(p));
                v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
            } else {
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    if (c + j < cols) v[j] = __ldg(p + j);
            }
        }
    }
    return make_float4(v[0], v[1], v[2], v[3]);
}

// alpha * v as `pieces` bf16 pieces, piece i at dst + i * stride (8 bytes each).
__device__ __forceinline__ void store4(bf16* dst, int stride, float4 v, float alpha, int pieces) {
    float a[4] = {alpha * v.x, alpha * v.y, alpha * v.z, alpha * v.w};
    for (int i = 0; i < pieces; ++i) {
        const uint2 h = make_uint2(fa::pack(a[0], a[1]), fa::pack(a[2], a[3]));
        *reinterpret_cast<uint2*>(dst + i * stride) = h;
        a[0] -= __uint_as_float(h.x << 16), a[1] -= __uint_as_float(h.x & 0xffff0000u);
        a[2] -= __uint_as_float(h.y << 16), a[3] -= __uint_as_float(h.y & 0xffff0000u);
    }
}

__device__ __forceinline__ bool aligned(const void* p, int ld, int bytes) {
    return ((uintptr_t)p % bytes) == 0 && ld % 4 == 0;
}

// The columns of K from k0 that a step of at most `step` holds data for, rounded up to
// the mma's 16.
__device__ __forceinline__ int k_span(int k, int k0, int step) { return min(step, (k - k0 + 15) & ~15); }

template <bool KMAJOR, class T>
struct Gemm {
    static constexpr int BM = T::BM, BN = T::BN, BK = T::BK, RK = T::RK;
    static constexpr int LDW = KMAJOR ? T::LD_NN : T::LD_NT;
    static constexpr int WTILE = KMAJOR ? BK * T::LD_NN : BN * T::LD_NT;
    static constexpr int XR = T::XH_CHUNKS > T::X_CHUNKS ? T::XH_CHUNKS : T::X_CHUNKS;

    float4 xr[XR], wr[T::W_CHUNKS];

    // Global -> registers, register path: RK columns of K from k0 of segment `sg`, for the
    // tile at (m0, n0).
    __device__ __forceinline__ void load(const Seg& sg, int m, int n, int m0, int n0, int k0) {
        load_x<RK, T::X_CHUNKS>(sg, m, m0, k0);
        const bool vw = aligned(sg.w, sg.ld_w, sg.w_bf16 ? 8 : 16);
#pragma unroll
        for (int i = 0; i < T::W_CHUNKS; ++i) {
            const int c = threadIdx.x + i * THREADS;
            if (KMAJOR)
                wr[i] = load4(sg.w, sg.w_bf16, sg.ld_w, k0 + c / (BN / 4), n0 + (c % (BN / 4)) * 4, sg.k, n, vw);
            else
                wr[i] = load4(sg.w, sg.w_bf16, sg.ld_w, n0 + c / (RK / 4), k0 + (c % (RK / 4)) * 4, n, sg.k, vw);
        }
    }

    // The X part: KW columns from k0 in CH chunks (RK: the register path; BK: an f32 X
    // beside a copied W).
    template <int KW, int CH>
    __device__ __forceinline__ void load_x(const Seg& sg, int m, int m0, int k0) {
        const bool vx = aligned(sg.x, sg.ld_x, sg.x_bf16 ? 8 : 16);
#pragma unroll
        for (int i = 0; i < CH; ++i) {
            const int c = threadIdx.x + i * THREADS;
            xr[i] = load4(sg.x, sg.x_bf16, sg.ld_x, m0 + c / (KW / 4), k0 + (c % (KW / 4)) * 4, m, sg.k, vx);
        }
    }

    // Registers -> shared (bf16 pieces, as many as the segment asks), register path.
    __device__ __forceinline__ void store(const Seg& sg, bf16* xs, bf16* ws) const {
        store_x<RK, T::X_CHUNKS>(sg, xs);
#pragma unroll
        for (int i = 0; i < T::W_CHUNKS; ++i) {
            const int c = threadIdx.x + i * THREADS;
            const int wo = KMAJOR ? (c / (BN / 4)) * T::LD_NN + (c % (BN / 4)) * 4
                                  : (c / (RK / 4)) * T::LD_NT + (c % (RK / 4)) * 4;
            store4(ws + wo, WTILE, wr[i], 1.f, sg.pieces_w);
        }
    }

    // The X part of `store`, as `load_x` loaded it.
    template <int KW, int CH>
    __device__ __forceinline__ void store_x(const Seg& sg, bf16* xs) const {
#pragma unroll
        for (int i = 0; i < CH; ++i) {
            const int c = threadIdx.x + i * THREADS;
            store4(xs + (c / (KW / 4)) * T::LDX + (c % (KW / 4)) * 4, T::XTILE, xr[i], sg.alpha, sg.pieces_x);
        }
    }

    // B fragments of the two 8-column tiles at warp column nc, k-step kk.
    __device__ __forceinline__ static void bfrag(uint32_t (&b)[4], const bf16* ws, int nc, int kk) {
        const fa::Tile<LDW> t{const_cast<bf16*>(ws)};
        if (KMAJOR)
            t.b_kn(b, kk, nc);
        else
            t.b_nk(b, nc, kk);
    }

    // acc += the products of the first `kend` (a multiple of 16) columns of a staged step
    // of single bf16 tiles xt (X) and wt (W), for this warp's rows wm and columns wn.
    // A warp whose 64 columns all lie inside the problem (nearly every warp of the base
    // products, and of the y launches' LoRA segments) takes an unconditional form for its
    // count of k16 steps: with no branch between them the compiler issues a k16 step's
    // shared loads ahead of its mma. (Breaking out per 16 columns had left each group of 4
    // mma waiting on its own ldmatrix.)
    __device__ __forceinline__ static void products(float (&acc)[T::MT][T::NT][4], const bf16* xt, const bf16* wt,
                                                    int wm, int wn, int cols_left, int kend) {
        if (cols_left >= (wn + 1) * T::WTN)
            products_whole<BK / 16>(acc, xt, wt, wm, wn, kend);
        else
            products_in<true, BK / 16>(acc, xt, wt, wm, wn, cols_left, kend);
    }

    // The unconditional form for kend = 16 NK, or the largest NK below it.
    template <int NK>
    __device__ __forceinline__ static void products_whole(float (&acc)[T::MT][T::NT][4], const bf16* xt,
                                                          const bf16* wt, int wm, int wn, int kend) {
        if constexpr (NK > 1) {
            if (kend < NK * 16) {
                products_whole<NK - 1>(acc, xt, wt, wm, wn, kend);
                return;
            }
        }
        products_in<false, NK>(acc, xt, wt, wm, wn, T::WTN * (wn + 1), NK * 16);
    }

    // NK k16 steps; EDGE: stop at kend and at the problem's last column.
    template <bool EDGE, int NK>
    __device__ __forceinline__ static void products_in(float (&acc)[T::MT][T::NT][4], const bf16* xt,
                                                       const bf16* wt, int wm, int wn, int cols_left, int kend) {
        const fa::Tile<T::LDX> x{const_cast<bf16*>(xt)};
#pragma unroll
        for (int kk = 0; kk < NK * 16; kk += 16) {
            if (EDGE && kk >= kend) break;
            uint32_t a[T::MT][4];
#pragma unroll
            for (int mi = 0; mi < T::MT; ++mi) x.a(a[mi], wm * T::WTM + mi * 16, kk);
#pragma unroll
            for (int nj = 0; nj < T::NT / 2; ++nj) {
                const int nc = wn * T::WTN + nj * 16;
                if (EDGE && nc >= cols_left) break;
                uint32_t b[4];
                bfrag(b, wt, nc, kk);
#pragma unroll
                for (int mi = 0; mi < T::MT; ++mi) {
                    fa::mma(acc[mi][2 * nj], a[mi], b[0], b[1]);
                    fa::mma(acc[mi][2 * nj + 1], a[mi], b[2], b[3]);
                }
            }
        }
    }

    // acc += the products of the staged register-path step: pieces (i, j) of X and W for
    // every i < px, j < pw with i + j < max(px, pw), largest first.
    __device__ __forceinline__ static void compute(float (&acc)[T::MT][T::NT][4], const bf16* xs, const bf16* ws,
                                                   int px, int pw, int wm, int wn, int cols_left, int kend) {
        const int top = max(px, pw);
#pragma unroll 1
        for (int t = 0; t < top; ++t)
#pragma unroll 1
            for (int i = 0; i <= t; ++i) {
                const int j = t - i;
                if (i >= px || j >= pw) continue;
                products(acc, xs + i * T::XTILE, ws + j * WTILE, wm, wn, cols_left, kend);
            }
    }

    // Steps [first, end) of segment `sg`, W copied global -> shared by cp.async STAGES - 1
    // steps ahead, the buffers being the stages of a pipeline; X too (COPY_X: bf16 as
    // stored), else loaded into registers a step ahead and stored as one bf16 piece. A
    // template, so that the copy-only loop carries none of the register loop's state.
    template <bool COPY_X>
    __device__ __forceinline__ void pipeline(float (&acc)[T::MT][T::NT][4], const Seg& sg, int m, int n, int m0,
                                             int n0, int first, int end, bf16* xs, bf16* ws, bool active, int wm,
                                             int wn, int cols_left) {
        constexpr int STAGES = T::STAGES;
        __syncthreads();  // the previous segment's products have read the buffers
#pragma unroll
        for (int i = 0; i < STAGES - 1; ++i) {
            if (first + i < end) {
                const int k0 = (first + i) * BK;
                if (COPY_X) issue_x(sg, m, m0, k0, xs + i * T::XTILE);
                issue_w(sg, n, n0, k0, ws + i * WTILE);
            }
            cp_async_commit();
        }
        if (!COPY_X) load_x<BK, T::XH_CHUNKS>(sg, m, m0, first * BK);
        // b: step t's buffer; a: the buffer of step t + STAGES - 1 (the one step t - 1 read).
        int b = 0, a = STAGES - 1;
#pragma unroll 1
        for (int t = first; t < end; ++t) {
            if (!COPY_X) {
                // Buffer b was last read by step t - STAGES, done before the barrier of step
                // t - 1.
                store_x<BK, T::XH_CHUNKS>(sg, xs + b * T::XTILE);
                if (t + 1 < end) load_x<BK, T::XH_CHUNKS>(sg, m, m0, (t + 1) * BK);
            }
            // Step t's group has landed (this thread's copies; the barrier: everyone's, and
            // the X stores), and every warp is done with step t - 1, whose buffer the next
            // issue fills.
            cp_async_wait<STAGES - 2>();
            __syncthreads();
            const int ahead = t + STAGES - 1;
            if (ahead < end) {
                if (COPY_X) issue_x(sg, m, m0, ahead * BK, xs + a * T::XTILE);
                issue_w(sg, n, n0, ahead * BK, ws + a * WTILE);
            }
            cp_async_commit();
            if (active) products(acc, xs + b * T::XTILE, ws + b * WTILE, wm, wn, cols_left, k_span(sg.k, t * BK, BK));
            a = b;
            b = b + 1 == STAGES ? 0 : b + 1;
        }
        cp_async_wait<0>();
    }

    // Whether segment `sg`'s W can be copied by cp.async (`issue_w`): bf16 taken as one
    // piece in whole 16-byte chunks (rows 16-byte aligned, K a multiple of 8, and for a
    // k-major W the output width n too), so that a chunk is wholly inside the matrix or
    // wholly outside it; and its X likewise (`issue_x`: bf16, one piece, unscaled).
    __device__ __forceinline__ static bool rows16(const void* p, int ld) { return ((uintptr_t)p % 16) == 0 && ld % 8 == 0; }
    __device__ __forceinline__ static bool w_copyable(const Seg& sg, int n) {
        return sg.w_bf16 && sg.pieces_w == 1 && sg.k % 8 == 0 && (!KMAJOR || n % 8 == 0) && rows16(sg.w, sg.ld_w);
    }
    __device__ __forceinline__ static bool x_copyable(const Seg& sg) {
        return sg.x_bf16 && sg.pieces_x == 1 && sg.alpha == 1.f && rows16(sg.x, sg.ld_x);
    }

    // Global -> shared by cp.async, no registers: X of step k0 of a segment into the stage
    // buffer xs (16-byte chunks, zero-filled outside the matrix).
    __device__ __forceinline__ static void issue_x(const Seg& sg, int m, int m0, int k0, bf16* xs) {
        const bf16* x = static_cast<const bf16*>(sg.x);
#pragma unroll
        for (int i = 0; i < T::X_COPIES; ++i) {
            const int c = threadIdx.x + i * THREADS, r = c / (BK / 8), kc = (c % (BK / 8)) * 8;
            const bool in = m0 + r < m && k0 + kc < sg.k;
            cp_async16(xs + r * T::LDX + kc, in ? x + (size_t)(m0 + r) * sg.ld_x + k0 + kc : x, in ? 16 : 0);
        }
    }

    // The same for W into ws.
    __device__ __forceinline__ static void issue_w(const Seg& sg, int n, int n0, int k0, bf16* ws) {
        const bf16* w = static_cast<const bf16*>(sg.w);
#pragma unroll
        for (int i = 0; i < T::W_COPIES; ++i) {
            const int c = threadIdx.x + i * THREADS;
            if (KMAJOR) {
                const int r = c / (BN / 8), nc = (c % (BN / 8)) * 8;
                const bool in = k0 + r < sg.k && n0 + nc < n;
                cp_async16(ws + r * T::LD_NN + nc, in ? w + (size_t)(k0 + r) * sg.ld_w + n0 + nc : w, in ? 16 : 0);
            } else {
                const int r = c / (BK / 8), kc = (c % (BK / 8)) * 8;
                const bool in = n0 + r < n && k0 + kc < sg.k;
                cp_async16(ws + r * T::LD_NT + kc, in ? w + (size_t)(n0 + r) * sg.ld_w + k0 + kc : w, in ? 16 : 0);
            }
        }
    }
};

// RoPE on the warp's WTM x 64 piece of the output before it is stored (q and k: the pass
// of their own it replaces would read and write them once more). Heads of HD columns tile
// the warp's 64 (HD divides 64, and every problem's columns start at a tile), so a column
// c of the lower half of a head and its partner c + HD/2 are the same element of this
// thread's 8-column tiles j and j + HD/16. Row `row` takes table row row % period, as
// rope.cu does over the output's rows.
template <int HD, class T>
__device__ __forceinline__ void rope_epilogue(float (&acc)[T::MT][T::NT][4], const Prob& pr, int m, int m0,
                                              int wm) {
    constexpr int STEP = HD / 16;
    static_assert(T::WTN % HD == 0, "heads tile the warp's columns");
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < T::MT; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + wm * T::WTM + i * 16 + (lane >> 2) + 8 * h;
            if (row >= m) continue;
            const size_t t0 = (size_t)(row % pr.rope_period) * (HD / 2);
#pragma unroll
            for (int j = 0; j < T::NT; ++j) {
                if ((j / STEP) % 2 != 0) continue;  // upper halves: rotated with their partner
                const int c = (j * 8) % HD + 2 * (lane & 3);
                const float2 co = __ldg(reinterpret_cast<const float2*>(pr.rope_cos + t0 + c));
                const float2 si = __ldg(reinterpret_cast<const float2*>(pr.rope_sin + t0 + c));
                rope_rotate(acc[i][j][2 * h], acc[i][j + STEP][2 * h], co.x, si.x);
                rope_rotate(acc[i][j][2 * h + 1], acc[i][j + STEP][2 * h + 1], co.y, si.y);
            }
        }
}

template <bool KMAJOR, class T>
__device__ __forceinline__ void lora_gemm(const Table& table, int n_probs, int m, int rows_fastest) {
    const Prob* probs = table.probs;
    const Seg* segs = table.segs;
    using G = Gemm<KMAJOR, T>;
    constexpr int BK = T::BK, RK = T::RK;
    extern __shared__ uint4 smem[];
    bf16* xs = reinterpret_cast<bf16*>(smem);  // [BUFFERS][BM][LDX]
    bf16* ws = xs + T::BUFFERS * T::XTILE;     // [BUFFERS][WTILE]

    const int tile_col = rows_fastest ? blockIdx.y : blockIdx.x;
    const int tile_row = rows_fastest ? blockIdx.x : blockIdx.y;
    int p = 0;
    while (p + 1 < n_probs && tile_col >= probs[p + 1].tile_start) ++p;
    const Prob pr = probs[p];
    const int n = pr.n, m0 = tile_row * T::BM, n0 = (tile_col - pr.tile_start) * T::BN;

    float acc[T::MT][T::NT][4] = {};

    // Segment by segment. Where W is copyable (a bf16 weight: the base products, nearly
    // all the work) it streams global -> shared by cp.async, STAGES - 1 steps ahead, the
    // buffers being the stages of a pipeline; X too where it is bf16 (the activations and
    // gradients the model stores so), else X is loaded into registers one step ahead and
    // stored as one bf16 piece (an f32 attention output or residual gradient; the staged
    // values are those of the register path). Any other segment (f32 weights, pieces: the
    // LoRA segments) goes wholly through registers, RK columns at a time, scaled and split
    // into pieces in the buffers. Each segment starts with a barrier: the previous one's
    // products have read the buffers. Warps whose rows or columns lie wholly outside the
    // problem skip the products (uniformly per warp, as ldmatrix and mma require).
    G g;
    const int rows_left = m - m0, cols_left = n - n0;
    const int warp = threadIdx.x >> 5, wm = warp / T::WARPS_N, wn = warp % T::WARPS_N;
    const bool active = wm * T::WTM < rows_left && wn * T::WTN < cols_left;
    // Split K (gridDim.z > 1: the u and gA launches, a few blocks wide): split z of the
    // launch takes the z-th share of the problem's BK steps, counted over its segments in
    // order, and writes its partial sum to its own slice of the output (the host adds the
    // slices in split order).
    int total = 0;
    for (int s = pr.seg_begin; s < pr.seg_end; ++s) total += (max(segs[s].k, 0) + BK - 1) / BK;
    const int lo = (int)((long long)blockIdx.z * total / gridDim.z);
    const int hi = (int)((long long)(blockIdx.z + 1) * total / gridDim.z);
    int before = 0;  // steps of the earlier segments
    for (int s = pr.seg_begin; s < pr.seg_end; ++s) {
        const Seg sg = segs[s];
        if (sg.k <= 0) continue;
        const int steps = (sg.k + BK - 1) / BK;
        const int first = max(lo - before, 0), end = min(hi - before, steps);
        before += steps;
        if (first >= end) continue;
        if (G::w_copyable(sg, n) && G::x_copyable(sg)) {
            g.template pipeline<true>(acc, sg, m, n, m0, n0, first, end, xs, ws, active, wm, wn, cols_left);
        } else if (G::w_copyable(sg, n) && sg.pieces_x == 1) {
            g.template pipeline<false>(acc, sg, m, n, m0, n0, first, end, xs, ws, active, wm, wn, cols_left);
        } else {
            // This split's columns of K, RK at a time (RK divides BK, so no step crosses
            // into another split's share).
            const int k_lo = first * BK, k_hi = min(end * BK, sg.k);
            g.load(sg, m, n, m0, n0, k_lo);
#pragma unroll 1
            for (int k0 = k_lo; k0 < k_hi; k0 += RK) {
                __syncthreads();  // the previous step's products have read the buffers
                g.store(sg, xs, ws);
                __syncthreads();
                if (k0 + RK < k_hi) g.load(sg, m, n, m0, n0, k0 + RK);
                if (active) G::compute(acc, xs, ws, sg.pieces_x, sg.pieces_w, wm, wn, cols_left, k_span(sg.k, k0, RK));
            }
        }
    }

    const int lane = threadIdx.x & 31;
    // The addend (the base product from cuBLAS, when the LoRA segments alone run here:
    // `ProjectionGemm::Hybrid` of lora_gemm.rs) joins the sums before RoPE and the store,
    // so the output is rotated and rounded once, as when the base product runs here. Never
    // with split K (the host refuses it).
    if (pr.addend != nullptr) {
#pragma unroll
        for (int i = 0; i < T::MT; ++i)
#pragma unroll
            for (int j = 0; j < T::NT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = m0 + wm * T::WTM + i * 16 + (lane >> 2) + 8 * (e >> 1);
                    const int col = n0 + wn * T::WTN + j * 8 + 2 * (lane & 3) + (e & 1);
                    if (row < m && col < n) acc[i][j][e] += pr.addend[(size_t)row * n + col];
                }
    }

    // Head dims the epilogue rotates (lora_gemm.rs: ROPE_FUSED_HEAD_DIMS); others get
    // rope.cu after the launch. Only forward products (n-major weights) are rotated.
    if constexpr (!KMAJOR) {
        switch (pr.rope_hd) {
            case 16: rope_epilogue<16, T>(acc, pr, m, m0, wm); break;
            case 32: rope_epilogue<32, T>(acc, pr, m, m0, wm); break;
            case 64: rope_epilogue<64, T>(acc, pr, m, m0, wm); break;
            default: break;
        }
    }

#pragma unroll
    for (int i = 0; i < T::MT; ++i)
#pragma unroll
        for (int j = 0; j < T::NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = m0 + wm * T::WTM + i * 16 + (lane >> 2) + 8 * (e >> 1);
                const int col = n0 + wn * T::WTN + j * 8 + 2 * (lane & 3) + (e & 1);
                if (row < m && col < n) {
                    const size_t at = (size_t)blockIdx.z * m * n + (size_t)row * n + col;
                    if (pr.out_bf16) {
                        // The f32 result rounded once (to nearest even).
                        bf16* o = static_cast<bf16*>(pr.out) + at;
                        *o = __float2bfloat16(pr.accumulate ? __bfloat162float(*o) + acc[i][j][e] : acc[i][j][e]);
                    } else {
                        float* o = static_cast<float*>(pr.out) + at;
                        *o = pr.accumulate ? *o + acc[i][j][e] : acc[i][j][e];
                    }
                }
            }
}

}  // namespace lg

// The pair of entries of one tiling: `lora_gemm_nt<SUFFIX>` (y = x W^T) and
// `lora_gemm_nn<SUFFIX>` (dx = g W).
#define LORA_GEMM_ENTRIES(SUFFIX, BM, BN, BK, STAGES)                                                                \
    extern "C" __global__ void __launch_bounds__(lg::THREADS)                                                        \
        lora_gemm_nt##SUFFIX(const __grid_constant__ lg::Table table, int n_probs, int m, int rows_fastest) {        \
        lg::lora_gemm<false, lg::Tiling<BM, BN, BK, STAGES>>(table, n_probs, m, rows_fastest);                       \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(lg::THREADS)                                                        \
        lora_gemm_nn##SUFFIX(const __grid_constant__ lg::Table table, int n_probs, int m, int rows_fastest) {        \
        lg::lora_gemm<true, lg::Tiling<BM, BN, BK, STAGES>>(table, n_probs, m, rows_fastest);                        \
    }
