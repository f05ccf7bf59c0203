// Curvature primitives on tensor cores (CPU twin: backend/cpu/curvature.rs; the SIMT
// kernels they replace, kept as benchmarked baselines, are in curvature.cu).
//
// Both primitives are products C = A^T B over a list of row tiles (positions), with A the
// row-major (rows, M) and B the row-major (rows, N) activations or gradients:
//   gram_*:    out += alpha * C over all tiles (KFAC factors, kfac-tri cross factors);
//   sq_grad_*: out += sum_n (alpha * C_n)^2 with C_n the product over sequence n's tiles
//              (per-sample gradient squaring for `diag`; C_n never leaves registers).
//
// Operands: each of A and B is stored as f32 or as bf16 (the bf16 engine's activations,
// and its gate/up and q/k/v gradients unless KFAC reduce sums them, read by the dB Gram,
// KFAC expand's g^T g and diag's squaring), read as stored: a bf16 tile is staged in shared
// memory as bf16 (half the bytes). Where one operand is f32 a lane widens its bf16 values
// as it loads its fragment; a bf16 value is exact in tf32, so the product is bit for bit
// that of the operand widened to f32 beforehand. Two bf16 operands in 128 x 128 tiles
// take bf16 mma instead (Cfg::BF16_MMA): the same exact products, summed in another order.
//
// Tensor cores: mma.sync m16n8k8 with tf32 inputs and f32 accumulators, or m16n8k16 with
// bf16 inputs where both operands are bf16 (precision as stored). Precision follows
// the engine's base dtype: PASSES = 1 rounds each input to tf32, to nearest with ties
// away, in shared memory as its tile lands (10-bit mantissa, about 5e-4 relative error
// per product: the bf16 engine's precision); PASSES = 3 is 3xTF32,
// x = big + small with big = tf32(x), small = tf32(x - big), and
// a b ~= small_a big_b + big_a small_b + big_a big_b (the dropped small_a small_b is
// 2^-22 relative), which reproduces f32 products for the f32 engine.
//
// Tiling: a block owns a BM x BN tile of C and streams BK = 32 rows of A (BK x BM) and of
// B (BK x BN) per stage through shared memory with cp.async, STAGES deep. Each warp owns
// 16*MS x 8*NS of C: MS x NS mma tiles. The rows and columns of C within a warp's tile are
// permuted so that a lane's operands for one k row come in vector loads of up to 128 bits
// instead of 2*MS + NS scalar ones: logical element e of a lane with group g (lane / 4)
// sits at column (e / V) * 8V + V g + e % V of the shared tile (V = 4, or the element
// count when smaller; 2 for A and 1 for B where f32 values are rounded in shared memory,
// Cfg::ROUND_A/B); the epilogue maps the accumulators back the same way. The row strides
// (smem_stride) keep these loads free of bank conflicts.
//
// Reduction order, fixed (deterministic, no atomics): within a block the tiles are summed
// in list order, the mma chain restarting every SLICE tiles (256 rows) and its partial
// sums folded into a second accumulator, so no f32 chain covers thousands of positions.
// Blocks that split the rows of one C tile (gram: a split of the tile list; sq_grad: a
// group of whole sequences) write partials that gram_reduce_splits adds in split order.
#include "common.cuh"
#include "flash_attention.cuh"

namespace {

constexpr int BK = 32;
constexpr int STAGES = 3;
constexpr int SLICE = 8;
// A tile's `meta`: its row count (<= BK) and, for sq_grad, whether it ends a sequence.
constexpr int ROWS_MASK = 0xff;
constexpr int SEQ_END = 0x100;

using bf16 = __nv_bfloat16;

// Shared row stride, in elements of T, of a tile `w` columns wide (a power of two >= 8).
// f32: 8 or 24 words (mod 32), so the four rows a quarter warp's 16-byte fragment loads
// touch start 32 bytes apart (mod 128), as do those of a half warp's 8-byte loads and a
// warp's 4-byte ones; bf16: 16 or 48 halves (mod 64), the same 32 bytes apart for a half
// warp's 8-byte loads. With LDSM (bf16 tiles read by ldmatrix, w >= 16): w + 8 halves, so
// the eight 16-byte rows of an ldmatrix phase start 16 bytes apart (mod 128), in eight
// different bank groups. All keep rows a multiple of 16 bytes (cp.async).
template <class T, bool LDSM = false>
__host__ __device__ constexpr int smem_stride(int w) {
    return LDSM ? w + 8 : sizeof(T) == 4 ? (w < 16 ? 16 : w) + 8 : (w < 32 ? 32 : w) + 16;
}

__device__ __forceinline__ uint32_t tf32(float x) {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 4 bytes global -> shared (cp_async16 in common.cuh for 16), zero-filled past `src_bytes`.
__device__ __forceinline__ void cp_async4(float* dst, const float* src, int src_bytes) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes));
}

// Operand values of a fragment as tf32: `hi` always, `lo` (the rounding remainder) for 3xTF32.
// EXACT: the values are tf32 already (widened bf16, which tf32 holds exactly: 8 bits of
// exponent, 7 of 10 of mantissa; or f32 values round_stage rounded in shared memory), so
// they go in as they are, with no remainder. (sm_90 has no instruction for cvt.rna.tf32;
// ptxas emulates it, and per fragment that cost about 8 instructions per mma.)
template <int PASSES, int N, bool EXACT = false>
struct Frag {
    uint32_t hi[N], lo[N];
    __device__ __forceinline__ void set(int i, float x) {
        if (EXACT) {
            hi[i] = __float_as_uint(x);
            if (PASSES == 3) lo[i] = 0u;
            return;
        }
        hi[i] = tf32(x);
        if (PASSES == 3) lo[i] = tf32(x - __uint_as_float(hi[i]));
    }
};

// One block configuration: WM x WN warps, each owning MS x NS mma tiles (16 x 8 each),
// with A stored as TA and B as TB (float or bf16). BF16_MMA (both operands bf16, PASSES
// = 1): the products are mma.sync m16n8k16 with bf16 inputs, whose fragments ldmatrix
// loads from tiles in their natural order (no permutation: V = 1), instead of m16n8k8
// tf32 ones on widened values. The same products: a bf16 product is exact in f32 either
// way; only the order of the f32 additions within an mma differs.
template <int WM_, int WN_, int MS_, int NS_, int PASSES_, class TA_, class TB_, bool BF16_MMA_ = false>
struct Cfg {
    static constexpr int WM = WM_, WN = WN_, MS = MS_, NS = NS_, PASSES = PASSES_;
    static constexpr bool BF16_MMA = BF16_MMA_;
    using TA = TA_;
    using TB = TB_;
    static_assert(!BF16_MMA || (sizeof(TA) == 2 && sizeof(TB) == 2 && PASSES == 1 && NS % 2 == 0),
                  "bf16 mma: bf16 operands, one pass, n8 tiles in pairs (one ldmatrix.x4 each)");
    static constexpr int THREADS = 32 * WM * WN;
    static constexpr int BM = WM * 16 * MS, BN = WN * 8 * NS;
    static constexpr int SA = smem_stride<TA, BF16_MMA>(BM), SB = smem_stride<TB, BF16_MMA>(BN);
    static constexpr int A_BYTES = BK * SA * (int)sizeof(TA);  // A's part of a stage
    static constexpr int STAGE = A_BYTES + BK * SB * (int)sizeof(TB);  // bytes per stage
    // Single tf32 rounds an f32 operand in shared memory (round_stage) where a lane's values
    // of one k row span several mma tiles: loaded per fragment, the vector loads landed
    // them in the wrong registers for the mma, and ptxas moved each one. Rounded already,
    // they are loaded by pairs (A) or singly (B), straight into the fragment registers.
    static constexpr bool ROUND_A = PASSES == 1 && sizeof(TA) == 4 && MS > 1;
    static constexpr bool ROUND_B = PASSES == 1 && sizeof(TB) == 4 && NS > 1;
    static constexpr int VA = BF16_MMA || ROUND_A ? (BF16_MMA ? 1 : 2) : (2 * MS < 4 ? 2 * MS : 4);
    static constexpr int VB = BF16_MMA || ROUND_B ? 1 : (NS < 4 ? NS : 4);
    using Acc = float[MS][NS][4];

    // Shared column, within the warp's slice, of a group-g lane's A element e = 2s + h
    // (row g + 8h of mma tile s) and of its B element e (column g of mma tile e).
    __device__ static constexpr int col_a(int e, int g) { return (e / VA) * 8 * VA + VA * g + e % VA; }
    __device__ static constexpr int col_b(int e, int g) { return (e / VB) * 8 * VB + VB * g + e % VB; }
};

// The elements of a BK x W shared tile of T (row stride smem_stride<T>(W)) that this
// thread copies (load_tile) and, for single tf32, then rounds (round_tile). With `vec`:
// 16-byte chunks of one column chunk, in rows r0, r0 + RSTEP, ... (chunk j, while has(j));
// else single elements c = threadIdx.x, + THREADS, ... (row c / W, column c % W).
template <int W, int S_, int THREADS, class T>
struct Share {
    static constexpr int S = S_, E = 16 / (int)sizeof(T);
    static_assert(W % E == 0, "a tile row is whole 16-byte chunks");
    static constexpr int CH = W / E, RSTEP = THREADS / CH, CHUNKS = (BK + RSTEP - 1) / RSTEP;
    static_assert(THREADS % CH == 0, "a whole number of rows per pass");
    __device__ static int r0() { return threadIdx.x / CH; }
    __device__ static int col() { return (threadIdx.x % CH) * E; }
    // Chunk j's row lies in the tile (always, where RSTEP divides BK).
    __device__ static bool has(int j) { return RSTEP * j + RSTEP <= BK || r0() + j * RSTEP < BK; }
    // Chunk j's place in the tile, in elements.
    __device__ static int chunk_at(int j) { return (r0() + j * RSTEP) * S + col(); }
};

// Rows [row0, row0 + rows) x columns [col0, col0 + W) of the row-major (.., dim) matrix
// `g` into a BK x W shared tile (Share); zeros outside the rows and beyond column dim.
// `vec` (dim a multiple of 16 bytes' elements, 16-byte aligned base): 16 bytes per copy;
// else (any dim) one element per copy: cp.async of 4 bytes for f32; for bf16, below
// cp.async's 4-byte minimum, a plain load and store, which the __syncthreads before the
// tile's use orders like the copies.
template <int W, int S, int THREADS, class T>
__device__ __forceinline__ void load_tile(T* s, const T* g, int dim, int col0, int row0, int rows, bool vec) {
    using Sh = Share<W, S, THREADS, T>;
    if (vec) {
        // Chunk 0's source, stepped RSTEP rows at a time (no 64-bit multiply per copy); a
        // column beyond dim reads no row.
        const T* src = g + ((size_t)row0 + Sh::r0()) * dim + col0 + Sh::col();
        const size_t step = (size_t)Sh::RSTEP * dim;
        const int lim = col0 + Sh::col() < dim ? rows : 0;
#pragma unroll
        for (int j = 0; j < Sh::CHUNKS; ++j) {
            if (Sh::has(j)) {
                const bool in = Sh::r0() + j * Sh::RSTEP < lim;
                cp_async16(s + Sh::chunk_at(j), in ? src : g, in ? 16 : 0);
            }
            src += step;
        }
    } else {
#pragma unroll 1
        for (int c = threadIdx.x; c < BK * W; c += THREADS) {
            const int r = c / W, col = c % W;
            const bool in = r < rows && col0 + col < dim;
            const T* src = g + (size_t)(row0 + r) * dim + col0 + col;
            if constexpr (sizeof(T) == 4)
                cp_async4(s + r * Sh::S + col, in ? src : g, in ? 4 : 0);
            else
                s[r * Sh::S + col] = in ? *src : T();
        }
    }
}

// Rounds to tf32 (ties away) the f32 values this thread copied into a tile with load_tile
// (its Share), once its copies have landed and before the barrier that shows the tile to
// the other warps. Every value is rounded once per block, where a fragment load would
// round it once per warp that reads it, and the fragments then go in as they are (a third
// of the conversions; ptxas emulates each on sm_90 with a compare, a predicated add and a
// mask). Zero-filled values stay zero.
template <int W, int THREADS>
__device__ __forceinline__ void round_tile(float* s, bool vec) {
    using Sh = Share<W, smem_stride<float>(W), THREADS, float>;
    auto round = [](float x) { return __uint_as_float(tf32(x)); };
    if (vec) {
#pragma unroll
        for (int j = 0; j < Sh::CHUNKS; ++j) {
            if (Sh::has(j)) {
                float4* q = reinterpret_cast<float4*>(s + Sh::chunk_at(j));
                const float4 v = *q;
                *q = make_float4(round(v.x), round(v.y), round(v.z), round(v.w));
            }
        }
    } else {
#pragma unroll 1
        for (int c = threadIdx.x; c < BK * W; c += THREADS) {
            float* q = s + (c / W) * Sh::S + c % W;
            *q = round(*q);
        }
    }
}

// The block's operands and where its tile sits.
template <class C>
struct Operands {
    const typename C::TA* a;  // (rows, M)
    const typename C::TB* b;  // (rows, N)
    int M, N, m0, n0;
    bool va, vb;  // 16-byte copies allowed
};

template <class C>
__device__ __forceinline__ void load_stage(char* stage, const Operands<C>& op, int2 tile) {
    const int rows = tile.y & ROWS_MASK;
    load_tile<C::BM, C::SA, C::THREADS>(reinterpret_cast<typename C::TA*>(stage), op.a, op.M, op.m0, tile.x, rows,
                                        op.va);
    load_tile<C::BN, C::SB, C::THREADS>(reinterpret_cast<typename C::TB*>(stage + C::A_BYTES), op.b, op.N, op.n0,
                                        tile.x, rows, op.vb);
}

// With single tf32 (PASSES = 1), the stage's f32 operands rounded in place (round_tile);
// 3xTF32 splits each value per fragment instead, which needs the unrounded one.
template <class C>
__device__ __forceinline__ void round_stage(char* stage, const Operands<C>& op) {
    if constexpr (C::ROUND_A)
        round_tile<C::BM, C::THREADS>(reinterpret_cast<float*>(stage), op.va);
    if constexpr (C::ROUND_B)
        round_tile<C::BN, C::THREADS>(reinterpret_cast<float*>(stage + C::A_BYTES), op.vb);
}

// bf16 bits to the f32 of the same value (exact).
__device__ __forceinline__ float widen(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// Loads `n` values from shared memory at p as f32 (n = V or a multiple of 4 split as
// vectors 8V elements apart: the columns of elements e = j*V .. j*V + V-1 of the lane):
// f32 as float4/float2/float, bf16 as 8/4/2-byte words widened.
template <int N, int V>
__device__ __forceinline__ void lds(float (&v)[N], const bf16* p) {
#pragma unroll
    for (int j = 0; j < N / V; ++j) {
        const bf16* q = p + j * 8 * V;
        if (V == 4) {
            const uint2 x = *reinterpret_cast<const uint2*>(q);
            v[4 * j] = widen(x.x & 0xffff), v[4 * j + 1] = widen(x.x >> 16);
            v[4 * j + 2] = widen(x.y & 0xffff), v[4 * j + 3] = widen(x.y >> 16);
        } else if (V == 2) {
            const uint32_t x = *reinterpret_cast<const uint32_t*>(q);
            v[2 * j] = widen(x & 0xffff), v[2 * j + 1] = widen(x >> 16);
        } else {
            v[j] = widen(*reinterpret_cast<const uint16_t*>(q));
        }
    }
}
template <int N, int V>
__device__ __forceinline__ void lds(float (&v)[N], const float* p) {
#pragma unroll
    for (int j = 0; j < N / V; ++j) {
        const float* q = p + j * 8 * V;
        if (V == 4) {
            const float4 x = *reinterpret_cast<const float4*>(q);
            v[4 * j] = x.x, v[4 * j + 1] = x.y, v[4 * j + 2] = x.z, v[4 * j + 3] = x.w;
        } else if (V == 2) {
            const float2 x = *reinterpret_cast<const float2*>(q);
            v[2 * j] = x.x, v[2 * j + 1] = x.y;
        } else {
            v[j] = q[0];
        }
    }
}

// acc += A_stage^T B_stage for this warp's MS x NS mma tiles with bf16 mma (BF16_MMA).
// Both tiles are stored k-major (row = position, column = feature), so ldmatrix.trans
// gives both fragments: A's 16 x 16 block (features m, positions k) is four 8 x 8
// matrices, lanes 8j..8j+7 addressing matrix j's rows: j = 0 (k 0-7, m 0-7), 1 (k 0-7,
// m 8-15), 2 (k 8-15, m 0-7), 3 (k 8-15, m 8-15), which transposed are the registers
// a0..a3 of the mma's A fragment; B's (Tile::b_kn) two n8 tiles' k halves likewise.
template <class C>
__device__ __forceinline__ void mma_stage_bf16(const char* stage, typename C::Acc& acc, int wm, int wn) {
    const int lane = threadIdx.x & 31;
    const fa::Tile<C::SA> ta{reinterpret_cast<fa::bf16*>(const_cast<char*>(stage))};
    const fa::Tile<C::SB> tb{reinterpret_cast<fa::bf16*>(const_cast<char*>(stage) + C::A_BYTES)};
    const int m0 = wm * 16 * C::MS, n0 = wn * 8 * C::NS;
#pragma unroll
    for (int k = 0; k < BK; k += 16) {
        uint32_t a[C::MS][4], b[C::NS / 2][4];
#pragma unroll
        for (int i = 0; i < C::MS; ++i)
            fa::ldsm_x4_trans(a[i], ta.at(k + (lane & 7) + (lane >> 4) * 8, m0 + 16 * i + ((lane >> 3) & 1) * 8));
#pragma unroll
        for (int j = 0; j < C::NS / 2; ++j) tb.b_kn(b[j], k, n0 + 16 * j);
#pragma unroll
        for (int i = 0; i < C::MS; ++i)
#pragma unroll
            for (int j = 0; j < C::NS; ++j) fa::mma(acc[i][j], a[i], b[j / 2][2 * (j % 2)], b[j / 2][2 * (j % 2) + 1]);
    }
}

// acc += A_stage^T B_stage for this warp's MS x NS mma tiles with tf32 mma.
template <class C>
__device__ __forceinline__ void mma_stage_tf32(const char* stage, typename C::Acc& acc, int wm, int wn) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const typename C::TA* sa = reinterpret_cast<const typename C::TA*>(stage) + wm * 16 * C::MS + C::VA * g;
    const typename C::TB* sb = reinterpret_cast<const typename C::TB*>(stage + C::A_BYTES) + wn * 8 * C::NS + C::VB * g;
#pragma unroll
    for (int k = 0; k < BK; k += 8) {
        // rows k + t and k + t + 4 of A (2 MS values each) and B (NS values each)
        float a0[2 * C::MS], a1[2 * C::MS], b0[C::NS], b1[C::NS];
        lds<2 * C::MS, C::VA>(a0, sa + (k + t) * C::SA);
        lds<2 * C::MS, C::VA>(a1, sa + (k + t + 4) * C::SA);
        lds<C::NS, C::VB>(b0, sb + (k + t) * C::SB);
        lds<C::NS, C::VB>(b1, sb + (k + t + 4) * C::SB);
        // Exact: bf16 values, and f32 ones that round_stage rounded.
        Frag<C::PASSES, 4, sizeof(typename C::TA) == 2 || C::ROUND_A> fa[C::MS];
        Frag<C::PASSES, 2, sizeof(typename C::TB) == 2 || C::ROUND_B> fb[C::NS];
#pragma unroll
        for (int s = 0; s < C::MS; ++s) {
            // a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4], a3 = A[g+8][t+4]
            fa[s].set(0, a0[2 * s]);
            fa[s].set(1, a0[2 * s + 1]);
            fa[s].set(2, a1[2 * s]);
            fa[s].set(3, a1[2 * s + 1]);
        }
#pragma unroll
        for (int s = 0; s < C::NS; ++s) {
            // b0 = B[t][g], b1 = B[t+4][g]
            fb[s].set(0, b0[s]);
            fb[s].set(1, b1[s]);
        }
#pragma unroll
        for (int i = 0; i < C::MS; ++i)
#pragma unroll
            for (int j = 0; j < C::NS; ++j) {
                if (C::PASSES == 3) {
                    // the small terms first, then the dominant one
                    mma_tf32(acc[i][j], fa[i].lo, fb[j].hi);
                    mma_tf32(acc[i][j], fa[i].hi, fb[j].lo);
                }
                mma_tf32(acc[i][j], fa[i].hi, fb[j].hi);
            }
    }
}

// acc += A_stage^T B_stage for this warp's MS x NS mma tiles.
template <class C>
__device__ __forceinline__ void mma_stage(const char* stage, typename C::Acc& acc, int wm, int wn) {
    if constexpr (C::BF16_MMA)
        mma_stage_bf16<C>(stage, acc, wm, wn);
    else
        mma_stage_tf32<C>(stage, acc, wm, wn);
}

template <class C>
__device__ __forceinline__ void fold(typename C::Acc& into, typename C::Acc& from) {
#pragma unroll
    for (int i = 0; i < C::MS; ++i)
#pragma unroll
        for (int j = 0; j < C::NS; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                into[i][j][q] += from[i][j][q];
                from[i][j][q] = 0.f;
            }
}

// The row tiles a product runs over, each (first row, rows | SEQ_END on a sequence's
// last): a table on the device, or (`table` null) the BK-row tiles of the one run of rows
// [start, start + rows), which the host then need not copy to the device per launch (a
// training step's weight gradients reduce over all its rows).
struct Tiles {
    const int2* table;
    int start, rows;
    __device__ __forceinline__ int2 operator[](int i) const {
        if (table) return table[i];
        const int r0 = i * BK, n = min(BK, rows - r0);
        return make_int2(start + r0, n | (r0 + n == rows ? SEQ_END : 0));
    }
    // The tiles from the i-th on.
    __device__ __forceinline__ Tiles from(int i) const {
        return table ? Tiles{table + i, start, rows} : Tiles{nullptr, start + i * BK, rows - i * BK};
    }
};

// Runs the cp.async pipeline over tiles[0, n) (a table, or `Tiles`): after each tile's
// products are in `acc`, calls after(i, meta). Every thread of the block takes part.
template <class C, class TileList, class After>
__device__ __forceinline__ void mainloop(const Operands<C>& op, const TileList& tiles, int n, typename C::Acc& acc,
                                         After after) {
    extern __shared__ float4 smem4[];
    char* smem = reinterpret_cast<char*>(smem4);
    const int warp = threadIdx.x >> 5, wm = warp % C::WM, wn = warp / C::WM;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < n) load_stage<C>(smem + s * C::STAGE, op, tiles[s]);
        cp_async_commit();
    }
    for (int i = 0; i < n; ++i) {
        cp_async_wait<STAGES - 2>();
        // This thread's copies of tile i have landed (visible to it alone until the
        // barrier), so it rounds them here.
        round_stage<C>(smem + (i % STAGES) * C::STAGE, op);
        // Tile i has landed for every thread, and every warp is done with tile i - 1,
        // whose stage the prefetch below overwrites.
        __syncthreads();
        const int next = i + STAGES - 1;
        if (next < n) load_stage<C>(smem + (next % STAGES) * C::STAGE, op, tiles[next]);
        cp_async_commit();
        mma_stage<C>(smem + (i % STAGES) * C::STAGE, acc, wm, wn);
        after(i, tiles[i].y);
    }
}

// Calls f(m, n, v) for each accumulator of this lane with its row and column in C.
template <class C, class F>
__device__ __forceinline__ void for_each_acc(const Operands<C>& op, const typename C::Acc& acc, F f) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int warp = threadIdx.x >> 5;
    const int mw = op.m0 + (warp % C::WM) * 16 * C::MS, nw = op.n0 + (warp / C::WM) * 8 * C::NS;
#pragma unroll
    for (int i = 0; i < C::MS; ++i)
#pragma unroll
        for (int j = 0; j < C::NS; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                // c_q = C[g + 8 (q >> 1)][2t + (q & 1)] of mma tile (i, j)
                const int m = mw + C::col_a(2 * i + (q >> 1), g);
                const int n = nw + C::col_b(j, 2 * t + (q & 1));
                if (m < op.M && n < op.N) f(m, n, acc[i][j][q]);
            }
}

template <class C>
__device__ __forceinline__ void zero(typename C::Acc& a) {
#pragma unroll
    for (int i = 0; i < C::MS; ++i)
#pragma unroll
        for (int j = 0; j < C::NS; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) a[i][j][q] = 0.f;
}

// C = A^T B over tiles[split's range] (`Tiles`: the table `tiles`, or when it is null the
// run of `run_rows` rows from `run_start`) for the tile (blockIdx.x) of C, split blockIdx.y of
// gridDim.y. One split: out[m rs + n cs] += alpha C[m][n]. Several: partial[split][m][n] =
// C[m][n], for gram_reduce_splits. With `upper` (A == B, square tiles) blockIdx.x counts
// the tiles on and above the diagonal row by row, and only m <= n is written.
template <class C>
__device__ __forceinline__ void gram(const typename C::TA* a, const typename C::TB* b, int M, int N, const int2* tiles,
                                     int run_start, int run_rows, int ntiles, int tiles_n, int upper, float alpha,
                                     float* out, long long rs, long long cs, float* partial, int va, int vb) {
    int tm = 0, tn = blockIdx.x;
    if (upper) {
        while (tn >= tiles_n - tm) tn -= tiles_n - tm++;
        tn += tm;
    } else {
        tm = tn / tiles_n;
        tn %= tiles_n;
    }
    const Operands<C> op{a, b, M, N, tm * C::BM, tn * C::BN, va != 0, vb != 0};
    const int split = blockIdx.y, nsplit = gridDim.y;
    const int t0 = (int)((long long)ntiles * split / nsplit), t1 = (int)((long long)ntiles * (split + 1) / nsplit);
    typename C::Acc acc, tot;
    zero<C>(acc);
    zero<C>(tot);
    mainloop<C>(op, Tiles{tiles, run_start, run_rows}.from(t0), t1 - t0, acc, [&](int i, int) {
        if ((i + 1) % SLICE == 0) fold<C>(tot, acc);
    });
    fold<C>(tot, acc);
    for_each_acc<C>(op, tot, [&](int m, int n, float v) {
        if (upper && m > n) return;
        if (nsplit == 1)
            out[m * rs + n * cs] += alpha * v;
        else
            partial[((size_t)split * M + m) * N + n] = v;
    });
}

// For each group blockIdx.y of whole sequences (tiles [group[y], group[y+1])), the sum
// over its sequences of (alpha C_n)^2 for the BM x BN tile blockIdx.x of C (BN >= N):
// added to out[m rs + n cs] with one group, else written to partial[group][m][n].
template <class C>
__device__ __forceinline__ void sq_grad(const typename C::TA* a, const typename C::TB* b, int M, int N, const int2* tiles,
                                        const int* group, float alpha, float* out, long long rs, long long cs,
                                        float* partial, int va, int vb) {
    const Operands<C> op{a, b, M, N, (int)blockIdx.x * C::BM, 0, va != 0, vb != 0};
    const int grp = blockIdx.y, t0 = group[grp], t1 = group[grp + 1];
    typename C::Acc acc, seq, sq;
    zero<C>(acc);
    zero<C>(seq);
    zero<C>(sq);
    int since_fold = 0;
    mainloop<C>(op, tiles + t0, t1 - t0, acc, [&](int, int meta) {
        if (++since_fold == SLICE || (meta & SEQ_END)) {
            fold<C>(seq, acc);
            since_fold = 0;
        }
        if (meta & SEQ_END) {
#pragma unroll
            for (int i = 0; i < C::MS; ++i)
#pragma unroll
                for (int j = 0; j < C::NS; ++j)
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        const float v = alpha * seq[i][j][q];
                        sq[i][j][q] += v * v;
                        seq[i][j][q] = 0.f;
                    }
        }
    });
    const bool direct = gridDim.y == 1;
    for_each_acc<C>(op, sq, [&](int m, int n, float v) {
        if (direct)
            out[m * rs + n * cs] += v;
        else
            partial[((size_t)grp * M + m) * N + n] = v;
    });
}

}  // namespace

// Entry names: <kind>_<precision>_<tile or rank>_<A's storage>_<B's storage>, precision
// tf32, 3xtf32 or bf16 (bf16 mma, BF16_MMA). f32 operands at tf32 and 3xtf32; bf16 ones
// (which only the bf16 engine stores) only in the combinations the model makes (every
// entry is a copy of the kernel in each binary's PTX): the host widens a bf16 operand for
// any other (curvature.rs).
#define TF32_F32(ENTRY, name, ...) ENTRY(name##_f32_f32, __VA_ARGS__, 1, float, float)
#define TF32_BF16_A(ENTRY, name, ...) ENTRY(name##_bf16_f32, __VA_ARGS__, 1, bf16, float)

// KFAC Gram out (M, N) += alpha * sum_tiles A_tile^T B_tile (see gram above). 128 x 128
// tiles of 8 warps (2 x 4, 64 x 32 each), or 256 x 32 tiles of 4 warps for a narrow side.
// bf16 operands: 128 x 128 in every combination (x^T x, g^T g of bf16 gradients on bf16
// mma; dA = gA^T x, dB = g^T u and the kfac-tri cross term x^T u at r from 33 to 64 on
// tf32); 256 x 32 with a bf16 wide side (the same at r <= 32, where the narrow side, gA
// or u, is f32).
#define GRAM_ENTRY_CFG(name, ...)                                                                                   \
    using name##_cfg = __VA_ARGS__;                                                                                 \
    extern "C" __global__ void __launch_bounds__(name##_cfg::THREADS, 1)                                            \
        name(const name##_cfg::TA* a, const name##_cfg::TB* b, int M, int N, const int2* tiles, int run_start,      \
             int run_rows, int ntiles, int tiles_n, int upper, float alpha, float* out, long long rs, long long cs,  \
             float* partial, int va, int vb) {                                                                      \
        gram<name##_cfg>(a, b, M, N, tiles, run_start, run_rows, ntiles, tiles_n, upper, alpha, out, rs, cs,        \
                         partial, va, vb);                                                                          \
    }
#define GRAM_ENTRY(name, WM, WN, PASSES, TA, TB) GRAM_ENTRY_CFG(name, Cfg<WM, WN, 4, 4, PASSES, TA, TB>)
TF32_F32(GRAM_ENTRY, gram_tf32_128x128, 2, 4)
TF32_BF16_A(GRAM_ENTRY, gram_tf32_128x128, 2, 4)
GRAM_ENTRY(gram_tf32_128x128_f32_bf16, 2, 4, 1, float, bf16)
GRAM_ENTRY_CFG(gram_bf16_128x128_bf16_bf16, Cfg<2, 4, 4, 4, 1, bf16, bf16, true>)
TF32_F32(GRAM_ENTRY, gram_tf32_256x32, 4, 1)
TF32_BF16_A(GRAM_ENTRY, gram_tf32_256x32, 4, 1)
GRAM_ENTRY(gram_3xtf32_128x128_f32_f32, 2, 4, 3, float, float)
GRAM_ENTRY(gram_3xtf32_256x32_f32_f32, 4, 1, 3, float, float)

// Per-sample squaring out += sum_n (alpha * A_n^T B_n)^2 with B the rank side (N <= 8 NS):
// 64-row tiles of the wide side, 4 warps each owning 16 rows and all N columns. bf16
// operands: the wide side only (x; the rank side, gA or u, is f32).
#define SQ_ENTRY(name, NS, PASSES, TA, TB)                                                                          \
    extern "C" __global__ void __launch_bounds__(128)                                                               \
        name(const TA* a, const TB* b, int M, int N, const int2* tiles, const int* group, float alpha, float* out,  \
             long long rs, long long cs, float* partial, int va, int vb) {                                          \
        sq_grad<Cfg<4, 1, 1, NS, PASSES, TA, TB>>(a, b, M, N, tiles, group, alpha, out, rs, cs, partial, va, vb);   \
    }
TF32_F32(SQ_ENTRY, sq_grad_tf32_r8, 1)
TF32_F32(SQ_ENTRY, sq_grad_tf32_r16, 2)
TF32_F32(SQ_ENTRY, sq_grad_tf32_r32, 4)
TF32_F32(SQ_ENTRY, sq_grad_tf32_r64, 8)
TF32_BF16_A(SQ_ENTRY, sq_grad_tf32_r8, 1)
TF32_BF16_A(SQ_ENTRY, sq_grad_tf32_r16, 2)
TF32_BF16_A(SQ_ENTRY, sq_grad_tf32_r32, 4)
TF32_BF16_A(SQ_ENTRY, sq_grad_tf32_r64, 8)
SQ_ENTRY(sq_grad_3xtf32_r8_f32_f32, 1, 3, float, float)
SQ_ENTRY(sq_grad_3xtf32_r16_f32_f32, 2, 3, float, float)
SQ_ENTRY(sq_grad_3xtf32_r32_f32_f32, 4, 3, float, float)
SQ_ENTRY(sq_grad_3xtf32_r64_f32_f32, 8, 3, float, float)

// out[m rs + n cs] (+)= alpha * sum_{s < nsplit} partial[s][m][n], splits in order (only
// m <= n with `upper`); without `accumulate` out is written, not read (the LoRA GEMM's
// split-K outputs).
extern "C" __global__ void gram_reduce_splits(const float* partial, int nsplit, int M, int N, int upper, float alpha,
                                              float* out, long long rs, long long cs, int accumulate) {
    GRID_STRIDE(idx, (size_t)M * N) {
        const int m = idx / N, n = idx % N;
        if (upper && m > n) continue;
        float s = 0.f;
        for (int k = 0; k < nsplit; ++k) s += partial[(size_t)k * M * N + idx];
        float* o = out + m * rs + n * cs;
        *o = accumulate ? *o + alpha * s : alpha * s;
    }
}
