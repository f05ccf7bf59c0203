// Flash attention (bf16 tensor cores, f32 accumulation), causal and grouped-query; CPU
// twin: backend/cpu/attention.rs. The host side is backend/cuda/attention/flash.rs.
//
// Forward (FlashAttention-2): one block of 8 warps per 128 query rows of one (sequence,
// KV head), the heads of the group packed into the rows (fa::Group), so K/V tiles are
// read once for the whole group. Each warp owns 16 rows: S = Q K^T on mma.sync, online
// softmax in registers (2^x with the scale folded into one fma per score; maxima of the
// raw scores), O += P V with P kept in registers.
// K/V tiles of 64 keys are double-buffered in shared memory; the next tile's global reads
// are issued before the current tile's products (bf16 K/V by cp.async, `KvCopier`; f32
// ones through registers, `fa::Stager`). Causal: a block visits only key tiles up
// to its last row's position and masks only tiles that cross a row's diagonal (or tk).
// It writes O and the row log-sum-exp (natural log of the scaled scores): O(T) saved state.
//
// Backward (recompute): flash_bwd_delta computes D = rowsum(dO * O); flash_bwd_dkdv runs
// one block per 128 keys (8 warps x 16 keys) and sweeps the query rows of every head of
// the group, so dK and dV are sums over the group accumulated in registers in a fixed
// order; flash_bwd_dq runs one block per 128 query rows and sweeps the key tiles. No
// atomics: every output element is written once by one thread, so results are
// deterministic. (dQ in its own pass costs two extra products, QK^T and dO V^T, instead
// of FlashAttention-2's float atomics.) The rows of dS = P (dP - D) sum to zero, so dK
// summed over positions (as KFAC's reduce factors sum it) cancels; dS rounded to bf16
// would break that, so the dK product takes dS as two bf16 halves (one more mma). Given
// the RoPE table q and k were rotated by (head dims 64 and 128, the builds' own), dQ and dK
// leave through RoPE's inverse in registers (`unrotate`): the gradients of the unrotated
// q and k, without the pass over them the model would otherwise run.
//
// q, k and v are f32, rounded to bf16 as their tiles are staged into shared memory, or
// bf16 (the projections' outputs with bf16 base weights: copied as they are, half the
// bytes read; the forward's and dQ's K/V tiles and dK/dV's Q/dO tiles global -> shared by
// cp.async); dO is stored as q/k/v are (every read of it rounds it to bf16 for the
// products, and D's sum too); O and the LSE are f32; dQ, dK and dV are f32, or bf16 (the
// f32 results rounded once) with bf16 base weights, unless KFAC reduce sums them. Kernels are
// built for head dims 64 and 128 (D); a smaller multiple of 16 runs zero-padded in the
// next one (`hd` is the real dim).
#include "common.cuh"
#include "flash_attention.cuh"

using fa::bf16;

constexpr int THREADS = 256;  // 8 warps
constexpr int ROWS = 128;     // query rows per block (forward, dQ): 16 per warp
constexpr int KEYS = 128;     // keys per block (dK/dV): 16 per warp

// Copies tiles of ROWS keys of bf16 K and V (row stride ld, the tile's first row at
// `kv0`) global -> shared by cp.async, 16 bytes at a time with no registers in between:
// each thread keeps the addresses of its chunks and steps them a tile per `issue`, so the
// tiles must be issued in order. Rows from tk on and columns from hd on (a head dim padded
// up to D) are zero-filled. Needs 16-byte aligned rows (hd a multiple of 8 and K, V 16-byte
// aligned; flash.rs checks).
template <int ROWS, int D>
struct KvCopier {
    static constexpr int PER_ROW = D / 8, N = ROWS * PER_ROW / THREADS;
    static_assert(N >= 1 && ROWS * PER_ROW % THREADS == 0, "tile must split evenly over the threads");
    const bf16 *k[N], *v[N];
    size_t step;

    __device__ __forceinline__ KvCopier(const bf16* kb, const bf16* vb, size_t kv0, size_t ld) : step(ROWS * ld) {
#pragma unroll
        for (int c = 0; c < N; ++c) {
            const int i = threadIdx.x + c * THREADS;
            const size_t at = kv0 + (size_t)(i / PER_ROW) * ld + (i % PER_ROW) * 8;
            k[c] = kb + at;
            v[c] = vb + at;
        }
    }

    // Keys [key0, key0 + ROWS) into kdst and vdst (rows D + 8 apart), as one group.
    __device__ __forceinline__ void issue(int key0, int tk, int hd, bf16* kdst, bf16* vdst) {
#pragma unroll
        for (int c = 0; c < N; ++c) {
            const int i = threadIdx.x + c * THREADS, r = i / PER_ROW, col = (i % PER_ROW) * 8;
            const bool in = key0 + r < tk && col < hd;
            const int at = r * (D + 8) + col;
            cp_async16(kdst + at, in ? k[c] : k[0], in ? 16 : 0);
            cp_async16(vdst + at, in ? v[c] : v[0], in ? 16 : 0);
            k[c] += step;
            v[c] += step;
        }
        cp_async_commit();
    }
};

// A packed query row r = position * group + head (fa::Group) as its position and head,
// stepped a tile of rows at a time with no division: the dK/dV sweep moves through its
// rows a tile at a time, and a runtime division costs about twenty instructions.
struct RowWalk {
    int pos, head;
    __device__ __forceinline__ RowWalk() : pos(0), head(0) {}
    __device__ __forceinline__ RowWalk(int r, int group) : pos(r / group), head(r % group) {}
    // Forward by a tile of tile_pos * group + tile_head rows.
    __device__ __forceinline__ void step(int group, int tile_pos, int tile_head) {
        pos += tile_pos;
        head += tile_head;
        if (head >= group) {
            head -= group;
            ++pos;
        }
    }
};

// Copies tiles of ROWS packed query rows of bf16 Q and dO into qdst and ddst (rows D + 8
// apart) global -> shared by cp.async, 16 bytes at a time, as one group: the dK/dV sweep's
// next query tile, with no registers in between. Each thread walks its chunks' rows from
// tile to tile (`RowWalk`); Q and dO share them, so each chunk's offset is computed once.
// Rows past the sequence and columns from hd on are zero-filled. Needs 16-byte aligned
// rows (flash.rs checks).
template <int ROWS, int D>
struct QueryCopier {
    static constexpr int PER_ROW = D / 8, N = ROWS * PER_ROW / THREADS;
    static_assert(N >= 1 && ROWS * PER_ROW % THREADS == 0, "tile must split evenly over the threads");
    RowWalk w[N];

    // Ready to copy the tile of rows from r0.
    __device__ __forceinline__ QueryCopier(const fa::Group& gr, int r0) {
#pragma unroll
        for (int c = 0; c < N; ++c) w[c] = RowWalk(r0 + (threadIdx.x + c * THREADS) / PER_ROW, gr.group);
    }

    // This tile into qdst and ddst; then on to the next (ROWS = tile_pos * group + tile_head).
    __device__ __forceinline__ void issue(const bf16* q, const bf16* dout, const fa::Group& gr, int tile_pos,
                                          int tile_head, bf16* qdst, bf16* ddst) {
        // The group's first row, from the block's indices read anew (an asm the compiler
        // cannot merge with the first reads): hoisted out of the sweep as 64-bit pointers,
        // it spilled at head dim 128.
        unsigned by, bz;
        asm volatile("mov.u32 %0, %%ctaid.y;" : "=r"(by));
        asm volatile("mov.u32 %0, %%ctaid.z;" : "=r"(bz));
        const size_t q0 = gr.first_row(bz, by);
#pragma unroll
        for (int c = 0; c < N; ++c) {
            const int i = threadIdx.x + c * THREADS, r = i / PER_ROW, col = (i % PER_ROW) * 8;
            const bool in = w[c].pos < gr.tq && col < gr.hd;
            const size_t at = in ? q0 + ((size_t)w[c].pos * gr.n_heads + w[c].head) * gr.hd + col : 0;
            const int to = r * (D + 8) + col, bytes = in ? 16 : 0;
            cp_async16(qdst + to, q + at, bytes);
            cp_async16(ddst + to, dout + at, bytes);
            w[c].step(gr.group, tile_pos, tile_head);
        }
        cp_async_commit();
    }
};

// The K/V tiles of a sweep over keys (the forward and dQ), double-buffered in shared
// memory (kbuf, vbuf: [2][BN][D + 8]). bf16 K/V are copied global -> shared by cp.async
// (KvCopier); f32 ones are loaded into registers and stored rounded (fa::Stager), K stored
// before V is loaded so that one tile's registers are live at a time. While tile kt is
// read from buffer kt & 1, tile kt + 1 moves into the other (`buf`): `next` at the top of
// the iteration, `k_read` once K's products are issued, `v_read` once V's are, `landed`
// before the closing barrier.
template <int BN, int D, typename T>
struct KvTiles {
    static constexpr bool COPY = sizeof(T) == 2;
    static constexpr int TILE = BN * (D + 8);
    const T *k, *v;
    size_t kv0, ld;
    int tk, hd;
    bf16 *kbuf, *vbuf;
    fa::Stager<BN, D, THREADS> st;
    KvCopier<BN, D> cp;

    __device__ __forceinline__ KvTiles(const T* k_, const T* v_, size_t kv0_, size_t ld_, int tk_, int hd_,
                                       bf16* kbuf_, bf16* vbuf_)
        : k(k_), v(v_), kv0(kv0_), ld(ld_), tk(tk_), hd(hd_), kbuf(kbuf_), vbuf(vbuf_),
          cp(reinterpret_cast<const bf16*>(k_), reinterpret_cast<const bf16*>(v_), kv0_, ld_) {}

    // Row r of the tile of keys from key0 of `base`, or null past tk.
    __device__ __forceinline__ auto rows(const T* base, int key0) const {
        const size_t at = kv0, stride = ld;
        const int end = tk;
        return [=](int r) -> const T* { return key0 + r < end ? base + at + (key0 + r) * stride : nullptr; };
    }

    // Tile 0 into buffer 0, landed (the caller's barrier publishes it).
    __device__ __forceinline__ void first() {
        if constexpr (COPY) {
            cp.issue(0, tk, hd, kbuf, vbuf);
            cp_async_wait<0>();
        } else {
            st.load(rows(k, 0), hd);
            st.store(kbuf);
            st.load(rows(v, 0), hd);
            st.store(vbuf);
        }
    }
    // Tile key0 (the next one) starts on its way to buffer `buf`, last read by the previous
    // tile before its closing barrier.
    __device__ __forceinline__ void next(int key0, int buf) {
        if constexpr (COPY)
            cp.issue(key0, tk, hd, kbuf + buf * TILE, vbuf + buf * TILE);
        else
            st.load(rows(k, key0), hd);
    }
    __device__ __forceinline__ void k_read(int key0, int buf) {
        if constexpr (!COPY) {
            st.store(kbuf + buf * TILE);
            st.load(rows(v, key0), hd);
        }
    }
    __device__ __forceinline__ void v_read(int buf) {
        if constexpr (!COPY) st.store(vbuf + buf * TILE);
    }
    // This thread's part of the next tile, if one was started, has landed.
    __device__ __forceinline__ void landed() {
        if constexpr (COPY) cp_async_wait<0>();
    }
};

// ---------------------------------------------------------------------------------------
// Forward

template <int D, typename T>
__device__ __forceinline__ void fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                    float* __restrict__ out,
                                    float* __restrict__ lse, int tq, int tk, int tk_stride, int n_heads,
                                    int n_kv, int hd, int q_offset, float scale) {
    constexpr int BN = 64, LD = D + 8;
    extern __shared__ uint4 smem[];
    bf16* kbuf = reinterpret_cast<bf16*>(smem);  // [2][BN][LD]
    bf16* vbuf = kbuf + 2 * BN * LD;             // [2][BN][LD]

    const fa::Group gr(tq, n_heads, n_kv, hd, blockIdx.z, blockIdx.y);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    // Later rows see more keys: launch them first so the longest blocks do not trail.
    const int r0 = (gridDim.x - 1 - blockIdx.x) * ROWS;
    const int row[2] = {r0 + warp * 16 + g, r0 + warp * 16 + g + 8};

    // Keys [0, kend) are visible to some row of the block, [0, full) to all of them.
    const int last = min(r0 + ROWS, gr.rows) - 1;
    const int kend = min(tk, q_offset + gr.pos(last) + 1);
    const int full = min(tk, q_offset + gr.pos(r0) + 1);
    const int n_tiles = (kend + BN - 1) / BN;

    // Row state: the last key each of this thread's two rows sees; Q as A fragments.
    int lim[2];
    uint32_t qa[D / 16][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const bool ok = row[h] < gr.rows;
        lim[h] = min(tk - 1, q_offset + gr.pos(ok ? row[h] : gr.rows - 1));
        const T* qr = q + gr.q_at(ok ? row[h] : 0);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                float2 x = make_float2(0.f, 0.f);
                if (ok && kk * 16 < hd) x = fa::load2(qr + kk * 16 + half * 8 + 2 * t);
                qa[kk][h + 2 * half] = fa::pack(x.x, x.y);
            }
        }
    }

    const size_t kv0 = ((size_t)blockIdx.z * tk_stride * n_kv + blockIdx.y) * hd;
    const size_t kv_ld = (size_t)n_kv * hd;
    // The next tile's copies (bf16) or loads (f32) are in flight during this tile's products.
    KvTiles<BN, D, T> kv(k, v, kv0, kv_ld, tk, hd, kbuf, vbuf);
    if (n_tiles > 0) kv.first();
    __syncthreads();

    const float sl2 = scale * fa::LOG2E;
    float o[D / 8][4] = {};
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    for (int kt = 0; kt < n_tiles; ++kt) {
        const int cur = kt & 1, key0 = kt * BN;
        const bool more = kt + 1 < n_tiles;
        const fa::Tile<LD> ks{kbuf + cur * BN * LD}, vs{vbuf + cur * BN * LD};
        if (more) kv.next(key0 + BN, cur ^ 1);

        float s[BN / 8][4] = {};
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                uint32_t b[4];
                ks.b_nk(b, np * 16, kk * 16);
                fa::mma(s[2 * np], qa[kk], b[0], b[1]);
                fa::mma(s[2 * np + 1], qa[kk], b[2], b[3]);
            }
        }
        if (more) kv.k_read(key0 + BN, cur ^ 1);

        // Raw scores (the scale goes inside the exponential, one fma each); keys past a
        // row's diagonal or past tk get -inf.
        const bool masked = key0 + BN > full;
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = key0 + nt * 8 + 2 * t + (e & 1);
                s[nt][e] = masked && j > lim[e >> 1] ? -INFINITY : s[nt][e];
            }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            // m: the row's running maximum of raw scores (scale > 0 keeps their order).
            float mx = m[h];
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
            mx = fa::quad_max(mx);
            // Every row sees key 0 in tile 0, so mx is finite from then on.
            const float ms = mx * sl2;
            const float alpha = fa::ex2(m[h] * sl2 - ms);
            m[h] = mx;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
                s[nt][2 * h] = fa::ex2(fmaf(s[nt][2 * h], sl2, -ms));
                s[nt][2 * h + 1] = fa::ex2(fmaf(s[nt][2 * h + 1], sl2, -ms));
                sum += s[nt][2 * h] + s[nt][2 * h + 1];
            }
            l[h] = l[h] * alpha + sum;
#pragma unroll
            for (int nd = 0; nd < D / 8; ++nd) {
                o[nd][2 * h] *= alpha;
                o[nd][2 * h + 1] *= alpha;
            }
        }

#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t pa[4];
            fa::c_to_a(pa, s, kk);
#pragma unroll
            for (int np = 0; np < D / 16; ++np) {
                uint32_t b[4];
                vs.b_kn(b, kk * 16, np * 16);
                fa::mma(o[2 * np], pa, b[0], b[1]);
                fa::mma(o[2 * np + 1], pa, b[2], b[3]);
            }
        }
        if (more) kv.v_read(cur ^ 1);
        kv.landed();
        __syncthreads();
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const float sum = fa::quad_sum(l[h]);
        if (row[h] >= gr.rows) continue;
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        float* orow = out + gr.q_at(row[h]);
#pragma unroll
        for (int nd = 0; nd < D / 8; ++nd) {
            if (nd * 8 < hd)
                *reinterpret_cast<float2*>(orow + nd * 8 + 2 * t) =
                    make_float2(o[nd][2 * h] * inv, o[nd][2 * h + 1] * inv);
        }
        if (t == 0) lse[gr.lse_at(row[h])] = sum > 0.f ? (m[h] * sl2 + log2f(sum)) * fa::LN2 : -INFINITY;
    }
}

// ---------------------------------------------------------------------------------------
// Backward: D = rowsum(dO * O), one warp per (sequence, position, head) row. dO is rounded
// to bf16 as the dP = dO V^T products see it, so that the rows of dS = P (dP - D) sum to
// zero as nearly as they can.

__device__ __forceinline__ float bf(float x) { return __bfloat162float(__float2bfloat16(x)); }

// Elements p[0..4) as f32 (16-byte aligned f32; 8-byte aligned bf16, widened exactly).
__device__ __forceinline__ float4 load4(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }
__device__ __forceinline__ float4 load4(const bf16* p) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
    return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
                       __uint_as_float(u.y & 0xffff0000u));
}

template <typename T>
__device__ __forceinline__ void bwd_delta(const T* __restrict__ dout, const float* __restrict__ out,
                                          float* __restrict__ delta, int rows, int tq, int n_heads, int hd) {
    // In 64 bits: the grid has rows / 8 blocks of 256 threads, whose thread count passes
    // 2^32 from 2^27 rows.
    const size_t warp = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= (size_t)rows) return;
    const int r = (int)warp, lane = threadIdx.x & 31;
    const T* a = dout + (size_t)r * hd;
    const float* b = out + (size_t)r * hd;
    float s = 0.f;
    for (int d = lane * 4; d < hd; d += 128) {
        const float4 x = load4(a + d);
        const float4 y = load4(b + d);
        s += bf(x.x) * y.x + bf(x.y) * y.y + bf(x.z) * y.z + bf(x.w) * y.w;
    }
    s = warp_sum(s);
    // r = (b * tq + i) * n_heads + h; delta is (batch, n_heads, tq).
    const int h = r % n_heads, bi = r / n_heads;
    if (lane == 0) delta[((size_t)(bi / tq) * n_heads + h) * tq + bi % tq] = s;
}

extern "C" __global__ void flash_bwd_delta(const float* dout, const float* out, float* delta, int rows, int tq,
                                           int n_heads, int hd) {
    bwd_delta(dout, out, delta, rows, tq, n_heads, hd);
}
// dO stored bf16 (the bf16 entries' dO): the same values as bf() makes of an f32 one.
extern "C" __global__ void flash_bwd_delta_bf16(const bf16* dout, const float* out, float* delta, int rows, int tq,
                                                int n_heads, int hd) {
    bwd_delta(dout, out, delta, rows, tq, n_heads, hd);
}

// Elements at, at + 1 (at even) of a gradient stored f32, or bf16 (rounded to nearest
// even) when `bf`: dQ, dK and dV except in KFAC reduce passes (flash.rs: `GradFeeds`).
__device__ __forceinline__ void store2(void* base, size_t at, float a, float b, int bf) {
    if (bf)
        *reinterpret_cast<uint32_t*>(static_cast<bf16*>(base) + at) = fa::pack(a, b);
    else
        *reinterpret_cast<float2*>(static_cast<float*>(base) + at) = make_float2(a, b);
}

// RoPE's inverse on the gradient row this thread holds half `h` of (C-fragment layout:
// x[nd][2h..2h+1] are columns nd * 8 + 2t, +1), before it is stored: the backward's pass of
// its own over dQ and dK, fused. For a head dim of D (flash.rs passes the table only then:
// other head dims run padded, and rope.cu rotates after) the partner of column c < D/2 is
// c + D/2, D/16 8-column tiles on, held by the same thread at a compile-time index;
// `cs`/`sn` are the row's table rows.
template <int D>
__device__ __forceinline__ void unrotate(float (&x)[D / 8][4], int h, const float* cs, const float* sn, int t) {
    constexpr int STEP = D / 16;
#pragma unroll
    for (int nd = 0; nd < STEP; ++nd) {
        const int c = nd * 8 + 2 * t;
        const float2 co = fa::load2(cs + c), si = fa::load2(sn + c);
        rope_rotate(x[nd][2 * h], x[nd + STEP][2 * h], co.x, -si.x);
        rope_rotate(x[nd][2 * h + 1], x[nd + STEP][2 * h + 1], co.y, -si.y);
    }
}

// dQ = scale * sum_j dS_ij k_j with dS = P (dP - D), dP = dO V^T; one block per 128 query
// rows as in the forward, sweeping key tiles of BN.
template <int D, int BN, typename T>
__device__ __forceinline__ void bwd_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                       const T* __restrict__ dout,
                                       const float* __restrict__ lse, const float* __restrict__ delta,
                                       void* __restrict__ dq, int tq, int tk, int tk_stride, int n_heads,
                                       int n_kv, int hd, int q_offset, float scale, const float* __restrict__ rope_cos,
                                       const float* __restrict__ rope_sin, int rope_period, int grads_bf16) {
    constexpr int LD = D + 8;
    extern __shared__ uint4 smem[];
    bf16* kbuf = reinterpret_cast<bf16*>(smem);  // [2][BN][LD]
    bf16* vbuf = kbuf + 2 * BN * LD;             // [2][BN][LD]

    const fa::Group gr(tq, n_heads, n_kv, hd, blockIdx.z, blockIdx.y);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int r0 = (gridDim.x - 1 - blockIdx.x) * ROWS;
    const int row[2] = {r0 + warp * 16 + g, r0 + warp * 16 + g + 8};
    const int last = min(r0 + ROWS, gr.rows) - 1;
    const int kend = min(tk, q_offset + gr.pos(last) + 1);
    const int full = min(tk, q_offset + gr.pos(r0) + 1);
    const int n_tiles = (kend + BN - 1) / BN;
    const float sl2 = scale * fa::LOG2E;

    // Per row: last visible key, log2-unit LSE, D; Q and dO as A fragments.
    int lim[2];
    float lse2[2], dd[2];
    uint32_t qa[D / 16][4], da[D / 16][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const bool ok = row[h] < gr.rows;
        const int rr = ok ? row[h] : gr.rows - 1;
        lim[h] = min(tk - 1, q_offset + gr.pos(rr));
        lse2[h] = ok ? lse[gr.lse_at(rr)] * fa::LOG2E : INFINITY;
        dd[h] = ok ? delta[gr.lse_at(rr)] : 0.f;
        const T* qr = q + gr.q_at(rr);
        const T* dr = dout + gr.q_at(rr);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int c = kk * 16 + half * 8 + 2 * t;
                float2 x = make_float2(0.f, 0.f), y = x;
                if (ok && kk * 16 < hd) {
                    x = fa::load2(qr + c);
                    y = fa::load2(dr + c);
                }
                qa[kk][h + 2 * half] = fa::pack(x.x, x.y);
                da[kk][h + 2 * half] = fa::pack(y.x, y.y);
            }
        }
    }

    const size_t kv0 = ((size_t)blockIdx.z * tk_stride * n_kv + blockIdx.y) * hd;
    const size_t kv_ld = (size_t)n_kv * hd;
    // K/V tiles as in the forward.
    KvTiles<BN, D, T> kv(k, v, kv0, kv_ld, tk, hd, kbuf, vbuf);
    if (n_tiles > 0) kv.first();
    __syncthreads();

    float acc[D / 8][4] = {};
    for (int kt = 0; kt < n_tiles; ++kt) {
        const int cur = kt & 1, key0 = kt * BN;
        const bool more = kt + 1 < n_tiles;
        const fa::Tile<LD> ks{kbuf + cur * BN * LD}, vs{vbuf + cur * BN * LD};
        if (more) kv.next(key0 + BN, cur ^ 1);
        float s[BN / 8][4] = {}, dp[BN / 8][4] = {};
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                uint32_t b[4];
                ks.b_nk(b, np * 16, kk * 16);
                fa::mma(s[2 * np], qa[kk], b[0], b[1]);
                fa::mma(s[2 * np + 1], qa[kk], b[2], b[3]);
            }
        }
        if (more) kv.k_read(key0 + BN, cur ^ 1);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                uint32_t b[4];
                vs.b_nk(b, np * 16, kk * 16);
                fa::mma(dp[2 * np], da[kk], b[0], b[1]);
                fa::mma(dp[2 * np + 1], da[kk], b[2], b[3]);
            }
        }
        if (more) kv.v_read(cur ^ 1);

        // dS = P (dP - D), P recomputed from the saved LSE; 0 where masked.
        const bool masked = key0 + BN > full;
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int h = e >> 1, j = key0 + nt * 8 + 2 * t + (e & 1);
                // Masked: 2^-inf = 0, one exponential for both cases (no branches).
                const float p = fa::ex2(masked && j > lim[h] ? -INFINITY : fmaf(s[nt][e], sl2, -lse2[h]));
                s[nt][e] = p * (dp[nt][e] - dd[h]);
            }
        }
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[4];
            fa::c_to_a(a, s, kk);
#pragma unroll
            for (int np = 0; np < D / 16; ++np) {
                uint32_t b[4];
                ks.b_kn(b, kk * 16, np * 16);
                fa::mma(acc[2 * np], a, b[0], b[1]);
                fa::mma(acc[2 * np + 1], a, b[2], b[3]);
            }
        }
        kv.landed();
        __syncthreads();
    }

#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nd][e] *= scale;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (row[h] >= gr.rows) continue;
        if (rope_cos != nullptr) {
            // dQ's row (sequence b, position p) is row b * tq + p of a (batch * tq)-row pass.
            const size_t tr = ((size_t)blockIdx.z * tq + gr.pos(row[h])) % rope_period * (D / 2);
            unrotate<D>(acc, h, rope_cos + tr, rope_sin + tr, t);
        }
        const size_t at = gr.q_at(row[h]) + 2 * t;
#pragma unroll
        for (int nd = 0; nd < D / 8; ++nd) {
            if (nd * 8 < hd) store2(dq, at + nd * 8, acc[nd][2 * h], acc[nd][2 * h + 1], grads_bf16);
        }
    }
}

// dV = sum_i P_ij dO_i and dK = scale * sum_i dS_ij q_i over the rows of every head of the
// group: one block per 128 keys (each warp owns 16 and their dK/dV rows), sweeping query
// tiles of BM packed rows. Works on transposed tiles: S^T = K Q^T, dP^T = V dO^T.
template <int D, int BM, typename T>
__device__ __forceinline__ void bwd_dkdv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                         const T* __restrict__ dout,
                                         const float* __restrict__ lse, const float* __restrict__ delta,
                                         void* __restrict__ dk, void* __restrict__ dv, int tq, int tk,
                                         int tk_stride, int n_heads, int n_kv, int hd, int q_offset,
                                         float scale, const float* __restrict__ rope_cos,
                                         const float* __restrict__ rope_sin, int rope_period, int grads_bf16) {
    constexpr int LD = D + 8;
    extern __shared__ uint4 smem[];
    bf16* kbuf = reinterpret_cast<bf16*>(smem);  // [KEYS][LD]
    bf16* vbuf = kbuf + KEYS * LD;               // [KEYS][LD]
    bf16* qbuf = vbuf + KEYS * LD;               // [2][BM][LD]
    bf16* dbuf = qbuf + 2 * BM * LD;             // [2][BM][LD]
    float* lse_s = reinterpret_cast<float*>(dbuf + 2 * BM * LD);  // [2][BM], log2 units
    float* dd_s = lse_s + 2 * BM;                                 // [2][BM]
    int* lim_s = reinterpret_cast<int*>(dd_s + 2 * BM);           // [2][BM]

    const fa::Group gr(tq, n_heads, n_kv, hd, blockIdx.z, blockIdx.y);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int k0 = blockIdx.x * KEYS, kw = warp * 16;
    const float sl2 = scale * fa::LOG2E;

    // Keys from k0 on are seen by positions from k0 - q_offset on: earlier tiles are skipped.
    const int first_pos = max(0, k0 - q_offset);
    const int t0 = first_pos < tq ? first_pos * gr.group / BM : 0;
    const int t1 = first_pos < tq ? (gr.rows + BM - 1) / BM : 0;

    const size_t kv0 = ((size_t)blockIdx.z * tk_stride * n_kv + blockIdx.y) * hd;
    const size_t kv_ld = (size_t)n_kv * hd;
    {
        fa::Stager<KEYS, D, THREADS> kv;
        auto rows_of = [&](const T* base) {
            return [=](int r) -> const T* { return k0 + r < tk ? base + kv0 + (k0 + r) * kv_ld : nullptr; };
        };
        kv.load(rows_of(k), hd);
        kv.store(kbuf);
        kv.load(rows_of(v), hd);
        kv.store(vbuf);
    }

    fa::Stager<BM, D, THREADS> st;
    // Q and dO tiles (both T) go through the same stager.
    auto rows_of = [&](auto base, int r0) {
        return [=](int r) -> decltype(base) { return r0 + r < gr.rows ? base + gr.q_at(r0 + r) : nullptr; };
    };
    // Per-row values of a query tile (thread i < BM holds row i, walking from tile to
    // tile): LSE, D, last visible key.
    const int tile_pos = BM / gr.group, tile_head = BM % gr.group;
    float aux_lse = 0.f, aux_dd = 0.f;
    int aux_lim = 0;
    RowWalk aux_row(t0 * BM + threadIdx.x, gr.group);
    auto load_aux = [&]() {
        if (threadIdx.x < BM) {
            const bool ok = aux_row.pos < tq;
            const size_t at = gr.lse0 + (size_t)aux_row.head * tq + aux_row.pos;
            aux_lse = ok ? lse[at] * fa::LOG2E : INFINITY;
            aux_dd = ok ? delta[at] : 0.f;
            aux_lim = ok ? q_offset + aux_row.pos : -1;
            aux_row.step(gr.group, tile_pos, tile_head);
        }
    };
    auto store_aux = [&](int buf) {
        if (threadIdx.x < BM) {
            lse_s[buf * BM + threadIdx.x] = aux_lse;
            dd_s[buf * BM + threadIdx.x] = aux_dd;
            lim_s[buf * BM + threadIdx.x] = aux_lim;
        }
    };
    // bf16 Q and dO tiles go global -> shared by cp.async (the next tile issued at the
    // top of an iteration into the buffers the previous one has finished with, landed
    // before its closing barrier); f32 ones through the stager's registers, converted.
    constexpr bool COPY = sizeof(T) == 2;
    QueryCopier<BM, D> qc(gr, t0 * BM);
    auto copy_tiles = [&](int buf) {
        if constexpr (COPY)
            qc.issue(reinterpret_cast<const bf16*>(q), reinterpret_cast<const bf16*>(dout), gr, tile_pos, tile_head,
                     qbuf + buf * BM * LD, dbuf + buf * BM * LD);
    };
    if (t0 < t1) {
        if constexpr (COPY) {
            copy_tiles(0);
            cp_async_wait<0>();
        } else {
            st.load(rows_of(q, t0 * BM), hd);
            st.store(qbuf);
            st.load(rows_of(dout, t0 * BM), hd);
            st.store(dbuf);
        }
        load_aux();
        store_aux(0);
    }
    __syncthreads();

    const fa::Tile<LD> ks{kbuf}, vs{vbuf};
    float dka[D / 8][4] = {}, dva[D / 8][4] = {};
    for (int it = t0; it < t1; ++it) {
        const int cur = (it - t0) & 1, r0 = it * BM;
        const bool more = it + 1 < t1;
        const fa::Tile<LD> qs{qbuf + cur * BM * LD}, ds{dbuf + cur * BM * LD};
        if (more) {
            if constexpr (COPY)
                copy_tiles(cur ^ 1);
            else
                st.load(rows_of(q, r0 + BM), hd);
            load_aux();
        }
        float s[BM / 8][4] = {}, dp[BM / 8][4] = {};
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t a[4];
            ks.a(a, kw, kk * 16);
#pragma unroll
            for (int np = 0; np < BM / 16; ++np) {
                uint32_t b[4];
                qs.b_nk(b, np * 16, kk * 16);
                fa::mma(s[2 * np], a, b[0], b[1]);
                fa::mma(s[2 * np + 1], a, b[2], b[3]);
            }
        }
        if (more) {
            if constexpr (!COPY) st.store(qbuf + (cur ^ 1) * BM * LD);
            store_aux(cur ^ 1);
            if constexpr (!COPY) st.load(rows_of(dout, r0 + BM), hd);
        }
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t a[4];
            vs.a(a, kw, kk * 16);
#pragma unroll
            for (int np = 0; np < BM / 16; ++np) {
                uint32_t b[4];
                ds.b_nk(b, np * 16, kk * 16);
                fa::mma(dp[2 * np], a, b[0], b[1]);
                fa::mma(dp[2 * np + 1], a, b[2], b[3]);
            }
        }
        if constexpr (!COPY)
            if (more) st.store(dbuf + (cur ^ 1) * BM * LD);

        // P^T and dS^T; a key past a row's diagonal gets P = 0. Keys past tk are computed
        // on zero rows and their dK/dV rows are never stored.
        const bool masked = q_offset + gr.pos(r0) < k0 + KEYS - 1;
        const float* ls = lse_s + cur * BM;
        const float* dsum = dd_s + cur * BM;
        const int* lm = lim_s + cur * BM;
#pragma unroll
        for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = nt * 8 + 2 * t + (e & 1), j = k0 + kw + g + 8 * (e >> 1);
                const float p = fa::ex2(masked && j > lm[c] ? -INFINITY : fmaf(s[nt][e], sl2, -ls[c]));
                s[nt][e] = p;
                dp[nt][e] = p * (dp[nt][e] - dsum[c]);
            }
        }
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
            uint32_t pa[4], sa[4], sl[4];
            fa::c_to_a(pa, s, kk);
            fa::c_to_a_split(sa, sl, dp, kk);
#pragma unroll
            for (int np = 0; np < D / 16; ++np) {
                uint32_t b[4];
                ds.b_kn(b, kk * 16, np * 16);
                fa::mma(dva[2 * np], pa, b[0], b[1]);
                fa::mma(dva[2 * np + 1], pa, b[2], b[3]);
                qs.b_kn(b, kk * 16, np * 16);
                fa::mma(dka[2 * np], sa, b[0], b[1]);
                fa::mma(dka[2 * np + 1], sa, b[2], b[3]);
                fa::mma(dka[2 * np], sl, b[0], b[1]);
                fa::mma(dka[2 * np + 1], sl, b[2], b[3]);
            }
        }
        if constexpr (COPY) cp_async_wait<0>();
        __syncthreads();
    }

#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[nd][e] *= scale;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int j = k0 + kw + g + 8 * h;
        if (j >= tk) continue;
        if (rope_cos != nullptr) {
            // dK's row (sequence b, key j) is row b * tk_stride + j of the cache-shaped pass.
            const size_t tr = ((size_t)blockIdx.z * tk_stride + j) % rope_period * (D / 2);
            unrotate<D>(dka, h, rope_cos + tr, rope_sin + tr, t);
        }
        const size_t at = kv0 + j * kv_ld + 2 * t;
#pragma unroll
        for (int nd = 0; nd < D / 8; ++nd) {
            if (nd * 8 < hd) {
                store2(dk, at + nd * 8, dka[nd][2 * h], dka[nd][2 * h + 1], grads_bf16);
                store2(dv, at + nd * 8, dva[nd][2 * h], dva[nd][2 * h + 1], grads_bf16);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Entries, one per head dim the kernels are built for. Grids: forward and dQ
// (ceil(tq * group / 128), n_kv_heads, batch); dK/dV (ceil(tk / 128), n_kv_heads, batch).

#define FWD_ARGS(T)                                                                                 \
    const T *q, const T *k, const T *v, float *out, float *lse, int tq, int tk, int tk_stride, int n_heads, \
        int n_kv, int hd, int q_offset, float scale
#define BWD_ARGS(T)                                                                                      \
    const T *q, const T *k, const T *v, const T *dout, const float *lse, const float *delta, int tq, int tk, \
        int tk_stride, int n_heads, int n_kv, int hd, int q_offset, float scale
#define SHAPE tq, tk, tk_stride, n_heads, n_kv, hd, q_offset, scale
// The backward's RoPE table for head dim D (null: dQ and dK are stored as computed).
#define ROPE_ARGS const float *rope_cos, const float *rope_sin, int rope_period
#define ROPE rope_cos, rope_sin, rope_period
// The gradients' storage: f32, or bf16 when grads_bf16 (flash.rs).
#define GRAD_ARGS ROPE_ARGS, int grads_bf16
#define GRAD ROPE, grads_bf16

// Each entry for f32 q/k/v (and dO) and (suffix _bf16) for bf16 ones: the projections'
// outputs with bf16 base weights, staged as they are, and dO as o_proj's backward stores it
// for flash attention (every read of dO rounds it to bf16, so a bf16 dO is the same
// values, read in half the bytes). The head-dim-64 forward fits in 128 registers (no
// spill on sm_90): two blocks per SM.
#define ENTRIES(SUFFIX, T)                                                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS, 2) flash_fwd_64##SUFFIX(FWD_ARGS(T)) {                 \
        fwd<64>(q, k, v, out, lse, SHAPE);                                                                       \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) flash_fwd_128##SUFFIX(FWD_ARGS(T)) {                \
        fwd<128>(q, k, v, out, lse, SHAPE);                                                                      \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS, 1)                                                     \
        flash_bwd_dq_64##SUFFIX(BWD_ARGS(T), void* dq, GRAD_ARGS) {                                              \
        bwd_dq<64, 64>(q, k, v, dout, lse, delta, dq, SHAPE, GRAD);                                              \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS, 1)                                                     \
        flash_bwd_dq_128##SUFFIX(BWD_ARGS(T), void* dq, GRAD_ARGS) {                                             \
        bwd_dq<128, 32>(q, k, v, dout, lse, delta, dq, SHAPE, GRAD);                                             \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS, 1)                                                     \
        flash_bwd_dkdv_64##SUFFIX(BWD_ARGS(T), void* dk, void* dv, GRAD_ARGS) {                                  \
        bwd_dkdv<64, 64>(q, k, v, dout, lse, delta, dk, dv, SHAPE, GRAD);                                        \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS, 1)                                                     \
        flash_bwd_dkdv_128##SUFFIX(BWD_ARGS(T), void* dk, void* dv, GRAD_ARGS) {                                 \
        bwd_dkdv<128, 32>(q, k, v, dout, lse, delta, dk, dv, SHAPE, GRAD);                                       \
    }

ENTRIES(, float)
ENTRIES(_bf16, bf16)
