//! Few-row products that read a frozen weight in the form its file stores it
//! ([`StoredMatrix`]: the GGUF's Q4_1, Q8_0, ... blocks) instead of its f32 values.
//!
//! Why: a decoding step multiplies one to eight rows by every weight once, so it is bound
//! by the bytes it reads: SmolLM2-135M's f32 weights are 540 MB, its GGUF's Q4_1 and Q8_0
//! blocks 5/32 and 17/64 of that. The blocks of rows and the sums are `linear_few_rows`'s
//! (`vmath::dot_block`: 16 lanes of FMAs, added pairwise), over the values `dequantize`
//! makes, which are the f32 matrix's; so the results are the f32 path's, bit for bit.
//! A weight kept transposed (`weight::CpuWeight`) streams `W^T`, whose rows cut across
//! `W`'s blocks: for Q4_0, Q4_1 and Q4_K it is kept as [`NibbleColumns`] instead, the same
//! nibbles transposed beside each block's scales, and its product sums as
//! `linear_few_rows_t`.

use rayon::prelude::*;

use super::gemm::{ROW_BLOCK, lane_rows, transpose};
use super::vmath;
use crate::model::quant::{GgmlType, StoredMatrix, q4k_scale_min};

/// A weight's compact form as the CPU reads it in products of few rows.
pub enum Compact {
    /// The file's rows of blocks, for a weight kept as given, and the kernel that reads
    /// them on this CPU.
    Rows { s: StoredMatrix, dots: RowsKernel },
    /// Q4_0, Q4_1 or Q4_K transposed, for a weight kept transposed.
    Columns(NibbleColumns),
}

/// `vmath::dot_block(yt, W, x, k)` with `W` the rows of blocks in `bytes` (`k` values a
/// row, in whole blocks): unsafe, for the CPU features it was chosen for ([`rows_kernel`]).
pub type RowsKernel = unsafe fn(&mut [f32], &[u8], &[f32], usize);

/// The form the CPU keeps of `s`, for a weight kept `transposed` or not; `None` where it
/// has no kernel for the type on this CPU, and the f32 weight streams as before.
pub fn compact(s: StoredMatrix, transposed: bool) -> Option<Compact> {
    if transposed {
        NibbleColumns::new(&s).map(Compact::Columns)
    } else {
        let dots = rows_kernel(s.ty())?;
        Some(Compact::Rows { s, dots })
    }
}

impl Compact {
    /// The bytes kept beside the f32 weight.
    pub fn size(&self) -> usize {
        match self {
            Compact::Rows { s, .. } => s.size(),
            Compact::Columns(t) => t.q.len() + 4 * (t.d.len() + t.m.len()),
        }
    }
}

/// `W^T (k, n)` of a Q4_0, Q4_1 or Q4_K `W (n, k)`, as `gemm::linear_few_rows_t` streams it:
/// row `j`'s `n` nibbles (`W[c, j]`'s quant at `q[j * n / 2 + c / 2]`, even `c` in the low
/// half), and per block of 32 rows the `n` scales `d` and offsets `m` in f32. Each value
/// is `d * q + m` as `dequantize` makes it: 0.75 bytes a value where f32 takes 4. Q4_1's
/// `d` and `m` are its f16s; a Q4_K sub-block's are `d * sc` and `-(dmin * min)`, which
/// its `(d * sc) * q - dmin * min` rounds alike. Q4_0's `d * (q - 8)` is `d * q + m` with
/// `m = -8 * d`: an f16 `d` (11 significant bits) times 4-bit integers, every term and
/// the sum exact in f32, so nothing rounds on either side. (Where `d` is zero the f32
/// values below 8 are `-0` and these `+0`; the products' sums start from `+0`, and adding
/// either zero to them gives the same bits.)
pub struct NibbleColumns {
    n: usize,
    k: usize,
    q: Vec<u8>,
    d: Vec<f32>,
    m: Vec<f32>,
}

impl NibbleColumns {
    /// `None` unless `s` is Q4_0, Q4_1 or Q4_K with `n` a multiple of 16, on a CPU that runs
    /// [`linear_few_rows_t`]'s kernels (else the f32 `W^T` streams as before).
    pub fn new(s: &StoredMatrix) -> Option<Self> {
        let (n, k) = s.dims();
        let ty = s.ty();
        if !matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4K)
            || !n.is_multiple_of(16)
            || !columns_kernels()
        {
            return None;
        }
        let blocks = k / 32;
        let mut t = NibbleColumns {
            n,
            k,
            q: vec![0; k * n / 2],
            d: vec![0.0; blocks * n],
            m: vec![0.0; blocks * n],
        };
        for c in 0..n {
            nibble_blocks(ty, s.rows(c, c + 1), |jb, d, m, quants| {
                (t.d[jb * n + c], t.m[jb * n + c]) = (d, m);
                for (j, &nibble) in quants.iter().enumerate() {
                    t.q[(jb * 32 + j) * n / 2 + c / 2] |= nibble << (4 * (c % 2));
                }
            });
        }
        Some(t)
    }
}

/// Calls `f(block, d, m, quants)` for each block of 32 values of a Q4_0, Q4_1 or Q4_K row, in
/// order: the values are `d * quants[j] + m`, as `dequantize` rounds them.
fn nibble_blocks(ty: GgmlType, row: &[u8], mut f: impl FnMut(usize, f32, f32, [u8; 32])) {
    let f16 = |b: &[u8], at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    let split = |bytes: &[u8], high: bool| {
        std::array::from_fn(|j| if high { bytes[j] >> 4 } else { bytes[j] & 0xf })
    };
    let low_high = |bytes: &[u8]| {
        let mut q = [0u8; 32];
        for (u, &byte) in bytes.iter().enumerate() {
            (q[u], q[u + 16]) = (byte & 0xf, byte >> 4);
        }
        q
    };
    match ty {
        GgmlType::Q4_0 => {
            for (jb, b) in row.chunks_exact(18).enumerate() {
                let d = f16(b, 0);
                f(jb, d, -8.0 * d, low_high(&b[2..18]));
            }
        }
        GgmlType::Q4_1 => {
            for (jb, b) in row.chunks_exact(20).enumerate() {
                f(jb, f16(b, 0), f16(b, 2), low_high(&b[4..20]));
            }
        }
        GgmlType::Q4K => {
            for (sb, b) in row.chunks_exact(144).enumerate() {
                let (d, dmin) = (f16(b, 0), f16(b, 2));
                for s in 0..8 {
                    let (sc, min) = q4k_scale_min(s, &b[4..16]);
                    let bytes = &b[16 + 32 * (s / 2)..48 + 32 * (s / 2)];
                    let (d, m) = (d * sc as f32, -(dmin * min as f32));
                    f(8 * sb + s, d, m, split(bytes, s % 2 == 1));
                }
            }
        }
        _ => unreachable!("not a type of nibbles and offsets"),
    }
}

/// Whether the CPU runs the kernels of [`linear_few_rows_t`] (AVX2 and FMA at least).
fn columns_kernels() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !matches!(super::simd(), super::Simd::Below)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `gemm::linear_few_rows_t` (`y = x W^T` for a weight kept transposed) on its
/// [`NibbleColumns`], for `1 <= m <= STREAM_ROWS`: the same lanes of rows of `W^T`, one task
/// each, and in each `vmath::axpy_rows`'s sums (one FMA chain per output, in order), the
/// lanes added pairwise.
pub fn linear_few_rows_t(x: &[f32], t: &NibbleColumns, m: usize, k: usize, n: usize) -> Vec<f32> {
    debug_assert_eq!((t.n, t.k), (n, k));
    let mut parts: Vec<Vec<f32>> = (0..vmath::LANES)
        .into_par_iter()
        .map(|b| {
            let (j0, j1) = lane_rows(k, b);
            let mut y = vec![0f32; m * n];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `NibbleColumns::new` checked that the CPU runs these kernels; `j0..j1`
            // are rows of `W^T`, `y` holds `m * n` values and `x` `m * k`.
            unsafe {
                if matches!(super::simd(), super::Simd::Avx512) {
                    x86::axpy_nibbles_avx512(&mut y, t, &x[..m * k], j0, j1);
                } else {
                    x86::axpy_nibbles_avx2(&mut y, t, &x[..m * k], j0, j1);
                }
            }
            y
        })
        .collect();
    vmath::total_lanes(&mut parts);
    parts.swap_remove(0)
}

/// `gemm::linear_few_rows` (`y = x W^T`, `x (m, k)`, `W (n, k)`) on the stored `W` by its
/// kernel `dots`, for `1 <= m <= STREAM_ROWS`: the same blocks of `ROW_BLOCK` rows of `W`,
/// one task each, and in each the sums of `vmath::dot_block`.
pub fn linear_few_rows(
    x: &[f32],
    s: &StoredMatrix,
    dots: RowsKernel,
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    debug_assert_eq!(s.dims(), (n, k));
    let x = &x[..m * k];
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(ROW_BLOCK * m)
        .enumerate()
        .for_each(|(b, yb)| {
            let (r0, r1) = (b * ROW_BLOCK, b * ROW_BLOCK + yb.len() / m);
            // SAFETY: `rows_kernel` chose `dots` for this CPU and `s`'s type; `s.rows`
            // gives whole rows of blocks, one per `m` outputs of `yb`.
            unsafe { dots(yb, s.rows(r0, r1), x, k) };
        });
    transpose(&yt, n, m)
}

/// The fused kernel for rows of `ty`'s blocks on this CPU: every quantised type the loader
/// reads (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K), at AVX-512 or at AVX2, with F16C. Why fused: a
/// weight dequantised into a buffer by `dequantize` and summed from there decoded Q4_1 at
/// half the speed of the f32 weights (the compiler vectorised `dequantize`'s loops across
/// blocks, gathering one byte per block).
fn rows_kernel(ty: GgmlType) -> Option<RowsKernel> {
    #[cfg(target_arch = "x86_64")]
    {
        use super::Simd;
        use x86::{Block, Q4_0, Q4_1, Q4K, Q6K, Q8_0};
        fn at<B: Block>(simd: Simd) -> Option<RowsKernel> {
            match simd {
                Simd::Avx512 => Some(x86::dots_avx512::<B>),
                Simd::Avx2 => Some(x86::dots_avx2::<B>),
                Simd::Below => None,
            }
        }
        if !is_x86_feature_detected!("f16c") {
            return None;
        }
        let simd = super::simd();
        match ty {
            GgmlType::Q4_0 => at::<Q4_0>(simd),
            GgmlType::Q4_1 => at::<Q4_1>(simd),
            GgmlType::Q8_0 => at::<Q8_0>(simd),
            GgmlType::Q4K => at::<Q4K>(simd),
            GgmlType::Q6K => at::<Q6K>(simd),
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => None,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        None
    }
}

/// The fused kernels. A block's values are `quant::dequantize`'s (products, and for Q4_1
/// and Q4_K a sum, of the same operands, rounded apart: never fused), made 16 at a time:
/// value `c` of a row lands in lane `c mod 16` of a chunk, as `dot_block` sums it, and each
/// chunk feeds every row of `x` through an FMA in order; the lanes are added pairwise
/// (`vmath::total`). So each output is `dot_block`'s, bit for bit.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::vmath::{self, LANES};
    use super::{NibbleColumns, q4k_scale_min};

    /// `f::<.., M>(args)` with the row count `m` (1 to 8) as the const `M`, so that a
    /// kernel's accumulators for each row are registers.
    macro_rules! with_rows {
        ($m:expr, $f:ident $(::<$($t:ty),*>)? ($($a:expr),*)) => {
            match $m {
                1 => $f::<$($($t,)*)? 1>($($a),*),
                2 => $f::<$($($t,)*)? 2>($($a),*),
                3 => $f::<$($($t,)*)? 3>($($a),*),
                4 => $f::<$($($t,)*)? 4>($($a),*),
                5 => $f::<$($($t,)*)? 5>($($a),*),
                6 => $f::<$($($t,)*)? 6>($($a),*),
                7 => $f::<$($($t,)*)? 7>($($a),*),
                _ => $f::<$($($t,)*)? 8>($($a),*),
            }
        };
    }

    /// A block type: its size, and its values 16 at a time in order (chunk `h` holds
    /// values `16h..16h + 16`, value `16h + l` in lane `l`, as `dot_block` sums a row).
    pub trait Block {
        /// Values a block holds (32; 256 for the K types) and its bytes.
        const VALUES: usize;
        const BYTES: usize;
        /// Calls `f(h, chunk h)` for the chunks of block `b` in order (the block's
        /// scales read once).
        unsafe fn each(b: &[u8], f: impl FnMut(usize, Chunk));
    }

    /// Sixteen values as `dequantize` makes them: `d * (q + offset)`, plus `m` where
    /// there is one, each operation rounded on its own (never fused). `q` is 16 bytes,
    /// signed or not; `q + offset` is exact in f32. `d` and `m` are lane 0 of a register,
    /// as F16C converts them, and are broadcast from there. Why not an `f32`: for a block's
    /// one f16 the compiler then read its two bytes into whatever register it liked
    /// (`vpinsrw` keeps the other lanes), in Q8_0's kernel the accumulator, so each block
    /// waited for the last one's FMAs (the LM head took 30-45 % longer).
    pub struct Chunk {
        q: __m128i,
        signed: bool,
        offset: i32,
        d: __m128,
        m: Option<__m128>,
    }

    impl Chunk {
        #[inline(always)]
        fn new(q: __m128i, signed: bool, offset: i32, d: __m128, m: Option<__m128>) -> Self {
            Chunk {
                q,
                signed,
                offset,
                d,
                m,
            }
        }

        #[inline(always)]
        unsafe fn zmm(self) -> __m512 {
            // SAFETY (caller): AVX-512F.
            unsafe {
                let i = if self.signed {
                    _mm512_cvtepi8_epi32(self.q)
                } else {
                    _mm512_cvtepu8_epi32(self.q)
                };
                let q = _mm512_cvtepi32_ps(_mm512_add_epi32(i, _mm512_set1_epi32(self.offset)));
                let v = _mm512_mul_ps(_mm512_broadcastss_ps(self.d), q);
                match self.m {
                    Some(m) => _mm512_add_ps(v, _mm512_broadcastss_ps(m)),
                    None => v,
                }
            }
        }

        /// As [`Chunk::zmm`], lanes 0-7 and 8-15.
        #[inline(always)]
        unsafe fn ymm(self) -> [__m256; 2] {
            // SAFETY (caller): AVX2.
            unsafe {
                let eight = |q| {
                    let i = if self.signed {
                        _mm256_cvtepi8_epi32(q)
                    } else {
                        _mm256_cvtepu8_epi32(q)
                    };
                    let q = _mm256_cvtepi32_ps(_mm256_add_epi32(i, _mm256_set1_epi32(self.offset)));
                    let v = _mm256_mul_ps(_mm256_broadcastss_ps(self.d), q);
                    match self.m {
                        Some(m) => _mm256_add_ps(v, _mm256_broadcastss_ps(m)),
                        None => v,
                    }
                };
                [eight(self.q), eight(_mm_srli_si128(self.q, 8))]
            }
        }
    }

    /// The f16s at `at` and `at + 2` as f32 (exact) in lanes 0 and 1.
    #[inline(always)]
    unsafe fn f16s(b: &[u8], at: usize) -> __m128 {
        let bits = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        // SAFETY (caller): F16C.
        unsafe { _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)) }
    }

    /// Lane 1 of `v` in lane 0.
    #[inline(always)]
    fn lane1(v: __m128) -> __m128 {
        // SAFETY: SSE3, part of every CPU these kernels run on (AVX2).
        unsafe { _mm_movehdup_ps(v) }
    }

    /// `v * s` in lane 0, rounded as the f32 product.
    #[inline(always)]
    fn times(v: __m128, s: f32) -> __m128 {
        // SAFETY: SSE (x86_64).
        unsafe { _mm_mul_ss(v, _mm_set_ss(s)) }
    }

    /// The 16 bytes at `at`.
    #[inline(always)]
    fn bytes16(b: &[u8], at: usize) -> __m128i {
        // SAFETY: SSE2 (x86_64); the slice checks `at + 16 <= b.len()`.
        unsafe { _mm_loadu_si128(b[at..at + 16].as_ptr().cast()) }
    }

    /// The low (`high` false) or high nibbles of 16 bytes.
    #[inline(always)]
    fn nibbles(v: __m128i, high: bool) -> __m128i {
        // SAFETY: SSE2 (x86_64).
        unsafe {
            let v = if high { _mm_srli_epi16(v, 4) } else { v };
            _mm_and_si128(v, _mm_set1_epi8(0x0f))
        }
    }

    /// 18 bytes: f16 `d`, 16 bytes of nibbles (values 0-15 low, 16-31 high); `d * (q - 8)`.
    pub struct Q4_0;

    impl Block for Q4_0 {
        const VALUES: usize = 32;
        const BYTES: usize = 18;

        #[inline(always)]
        unsafe fn each(b: &[u8], mut f: impl FnMut(usize, Chunk)) {
            // SAFETY (caller): F16C. (The second f16 read is the block's first quants.)
            let d = unsafe { f16s(b, 0) };
            let q = bytes16(b, 2);
            for h in 0..2 {
                f(h, Chunk::new(nibbles(q, h == 1), false, -8, d, None));
            }
        }
    }

    /// 20 bytes: f16 `d`, f16 `m`, 16 bytes of nibbles (values 0-15 low, 16-31 high);
    /// `d * q + m`.
    pub struct Q4_1;

    impl Block for Q4_1 {
        const VALUES: usize = 32;
        const BYTES: usize = 20;

        #[inline(always)]
        unsafe fn each(b: &[u8], mut f: impl FnMut(usize, Chunk)) {
            // SAFETY (caller): F16C.
            let d = unsafe { f16s(b, 0) };
            let q = bytes16(b, 4);
            for h in 0..2 {
                f(
                    h,
                    Chunk::new(nibbles(q, h == 1), false, 0, d, Some(lane1(d))),
                );
            }
        }
    }

    /// 34 bytes: f16 `d`, 32 signed bytes; `d * q`.
    pub struct Q8_0;

    impl Block for Q8_0 {
        const VALUES: usize = 32;
        const BYTES: usize = 34;

        #[inline(always)]
        unsafe fn each(b: &[u8], mut f: impl FnMut(usize, Chunk)) {
            // SAFETY (caller): F16C. (The second f16 read is the block's first quants.)
            let d = unsafe { f16s(b, 0) };
            for h in 0..2 {
                f(h, Chunk::new(bytes16(b, 2 + 16 * h), true, 0, d, None));
            }
        }
    }

    /// 144 bytes for 256 values: f16 `d`, f16 `dmin`, 12 bytes of 6-bit scales and mins
    /// (`quant::q4k_scale_min`), 128 bytes of nibbles. Sub-block `s` (32 values) is
    /// `(d * sc) * q - dmin * min`; the nibbles of bytes `32j..32j + 32` are sub-blocks
    /// `2j` (low) and `2j + 1` (high). The subtraction is the addition of `-(dmin * min)`,
    /// the same bits.
    pub struct Q4K;

    impl Block for Q4K {
        const VALUES: usize = 256;
        const BYTES: usize = 144;

        #[inline(always)]
        unsafe fn each(b: &[u8], mut f: impl FnMut(usize, Chunk)) {
            // SAFETY (caller): F16C.
            let d = unsafe { f16s(b, 0) };
            let scaled = |s: usize| {
                let (sc, min) = q4k_scale_min(s, &b[4..16]);
                // The sign flipped exactly (`-x`, not `0 - x`, which makes -0 +0).
                // SAFETY: SSE (x86_64).
                let m = unsafe { _mm_xor_ps(times(lane1(d), min as f32), _mm_set_ss(-0.0)) };
                (times(d, sc as f32), Some(m))
            };
            for j in 0..4 {
                // Bytes `32j..32j + 32`: sub-block `2j` in their low nibbles, `2j + 1` high.
                let q = [bytes16(b, 16 + 32 * j), bytes16(b, 32 + 32 * j)];
                for (s, high) in [(2 * j, false), (2 * j + 1, true)] {
                    let (d, m) = scaled(s);
                    for (part, &q) in q.iter().enumerate() {
                        f(2 * s + part, Chunk::new(nibbles(q, high), false, 0, d, m));
                    }
                }
            }
        }
    }

    /// 210 bytes for 256 values: 128 bytes of low nibbles, 64 of high bit pairs, 16
    /// signed 8-bit scales, f16 `d`; sub-block `s` (16 values) is `(d * sc[s]) * (q - 32)`.
    /// Each half of 128 values takes 64 low-nibble bytes `ql`, 32 bytes of pairs `qh` and
    /// 8 scales: its value `32t + l` (t < 4, l < 32) has the low (t < 2) or high nibble of
    /// `ql[l + 32 (t % 2)]` and the pair `t` of `qh[l]` above it, and scale `l / 16 + 2t`.
    pub struct Q6K;

    impl Block for Q6K {
        const VALUES: usize = 256;
        const BYTES: usize = 210;

        #[inline(always)]
        unsafe fn each(b: &[u8], mut f: impl FnMut(usize, Chunk)) {
            // SAFETY (caller): F16C. (Lane 0 holds the block's last quants.)
            let d = unsafe { lane1(f16s(b, 206)) };
            for half in 0..2 {
                let at = |i: usize| bytes16(b, 64 * half + 16 * i);
                let ql = [at(0), at(1), at(2), at(3)];
                let qh = [bytes16(b, 128 + 32 * half), bytes16(b, 144 + 32 * half)];
                let sc = &b[192 + 8 * half..200 + 8 * half];
                // Values `32t + 16p..32t + 16p + 16` of the half; written out so that `t`
                // and `p` are constants and the shifts immediates.
                let mut chunk = |t: usize, p: usize| {
                    let low = nibbles(ql[2 * (t % 2) + p], t >= 2);
                    // SAFETY: SSE2 (x86_64); after the 16-bit shift by at most 6 a byte's
                    // two low bits are still its own (only they are kept).
                    let q = unsafe {
                        let pairs = match t {
                            0 => qh[p],
                            1 => _mm_srli_epi16(qh[p], 2),
                            2 => _mm_srli_epi16(qh[p], 4),
                            _ => _mm_srli_epi16(qh[p], 6),
                        };
                        let high = _mm_slli_epi16(_mm_and_si128(pairs, _mm_set1_epi8(3)), 4);
                        _mm_or_si128(low, high)
                    };
                    let d = times(d, sc[p + 2 * t] as i8 as f32);
                    f(8 * half + 2 * t + p, Chunk::new(q, false, -32, d, None));
                };
                chunk(0, 0);
                chunk(0, 1);
                chunk(1, 0);
                chunk(1, 1);
                chunk(2, 0);
                chunk(2, 1);
                chunk(3, 0);
                chunk(3, 1);
            }
        }
    }

    /// `dot_block` over rows of `B` blocks, all `m = x.len() / k` rows of `x` at once.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
    pub unsafe fn dots_avx512<B: Block>(yt: &mut [f32], bytes: &[u8], x: &[f32], k: usize) {
        let m = x.len() / k;
        // SAFETY (caller): as this function's.
        unsafe { with_rows!(m, rows_avx512::<B>(yt, bytes, x, k)) }
    }

    #[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
    unsafe fn rows_avx512<B: Block, const M: usize>(
        yt: &mut [f32],
        bytes: &[u8],
        x: &[f32],
        k: usize,
    ) {
        assert!(M <= 8 && x.len() == M * k);
        for (row, y) in bytes
            .chunks_exact(k / B::VALUES * B::BYTES)
            .zip(yt.chunks_exact_mut(M))
        {
            let mut acc = [_mm512_setzero_ps(); M];
            for (c, b) in row.chunks_exact(B::BYTES).enumerate() {
                // SAFETY: AVX-512F and F16C (this function's features); `b` is one block;
                // the loads read `x[i * k + at..i * k + at + 16]`, inside `x`.
                unsafe {
                    B::each(b, |h, chunk| {
                        let w = chunk.zmm();
                        let at = c * B::VALUES + h * LANES;
                        for (i, a) in acc.iter_mut().enumerate() {
                            let xi = x.as_ptr().add(i * k + at);
                            *a = _mm512_fmadd_ps(_mm512_loadu_ps(xi), w, *a);
                        }
                    })
                }
            }
            for (yi, a) in y.iter_mut().zip(acc) {
                let mut lanes = [0f32; LANES];
                // SAFETY: 16 floats into 16.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), a) };
                *yi = vmath::total(lanes);
            }
        }
    }

    /// `dot_block` over rows of `B` blocks, the rows of `x` four at a time (a row's 16
    /// lanes take two of AVX2's sixteen registers).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dots_avx2<B: Block>(yt: &mut [f32], bytes: &[u8], x: &[f32], k: usize) {
        let m = x.len() / k;
        for g in (0..m).step_by(4) {
            let xs = &x[g * k..(g + 4).min(m) * k];
            // SAFETY (caller): as this function's.
            unsafe { with_rows!(xs.len() / k, rows_avx2::<B>(yt, m, g, bytes, xs, k)) }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_avx2<B: Block, const M: usize>(
        yt: &mut [f32],
        m: usize,
        g: usize,
        bytes: &[u8],
        x: &[f32],
        k: usize,
    ) {
        // Outputs `g..g + M` of each row's `m` in `yt`.
        assert!(g + M <= m && x.len() == M * k);
        for (row, y) in bytes
            .chunks_exact(k / B::VALUES * B::BYTES)
            .zip(yt.chunks_exact_mut(m))
        {
            let y = &mut y[g..g + M];
            // Lanes 0-7 and 8-15 of each row's 16.
            let mut acc = [[_mm256_setzero_ps(); 2]; M];
            for (c, b) in row.chunks_exact(B::BYTES).enumerate() {
                // SAFETY: AVX2 and F16C (this function's features); `b` is one block; the
                // loads read `x[i * k + at..i * k + at + 16]`, inside `x`.
                unsafe {
                    B::each(b, |h, chunk| {
                        let w = chunk.ymm();
                        let at = c * B::VALUES + h * LANES;
                        for (i, a) in acc.iter_mut().enumerate() {
                            let xi = x.as_ptr().add(i * k + at);
                            a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xi), w[0], a[0]);
                            a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(xi.add(8)), w[1], a[1]);
                        }
                    })
                }
            }
            for (yi, a) in y.iter_mut().zip(acc) {
                let mut lanes = [0f32; LANES];
                // SAFETY: 8 + 8 floats into 16.
                unsafe {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), a[0]);
                    _mm256_storeu_ps(lanes[8..].as_mut_ptr(), a[1]);
                }
                *yi = vmath::total(lanes);
            }
        }
    }

    /// Outputs (`m * n` f32) up to which the kernels below update every row's 16 outputs
    /// from each 16 values of `W^T`'s row made in registers; above it they make the whole
    /// row into a buffer and hand it to `vmath::axpy_rows`, which updates one row of
    /// outputs at a time (the same sums). Why: the outputs are reread for every row of
    /// `W^T`, and 8 rows of Llama-3.2-1B's `down` (64 KiB) are eight strided streams from
    /// L2, which ran 0.55-0.65x the f32 product, buffered 0.9-0.95x; its 1 row (8 KiB) ran
    /// 1.4-1.6x fused, 0.8-1.05x buffered (`benches/decode_stored.rs`, Zen 4). SmolLM2's
    /// `down`, 8 rows of 576, is 18 KiB.
    const FUSED_OUTPUT_BYTES: usize = 24 << 10;

    /// The low 8 bytes' nibbles as 16 bytes in column order: byte `u`'s low nibble (column
    /// `2u`), then its high one.
    #[inline(always)]
    fn column_order(b: __m128i) -> __m128i {
        // SAFETY: SSE2 (x86_64).
        unsafe {
            let mask = _mm_set1_epi8(0x0f);
            _mm_unpacklo_epi8(
                _mm_and_si128(b, mask),
                _mm_and_si128(_mm_srli_epi16(b, 4), mask),
            )
        }
    }

    /// `W^T[j, c..c + 16]` from its nibbles `q` (row `j`) and its block's `d` and `m`.
    #[inline(always)]
    unsafe fn nibble_row16(q: &[u8], d: &[f32], m: &[f32], c: usize) -> __m512 {
        // SAFETY (caller): AVX-512F; the slices check `q[c/2..c/2 + 8]`, `d[c..c + 16]` and
        // `m[c..c + 16]`.
        unsafe {
            let b = _mm_loadl_epi64(q[c / 2..c / 2 + 8].as_ptr().cast());
            let f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(column_order(b)));
            _mm512_add_ps(
                _mm512_mul_ps(_mm512_loadu_ps(d[c..c + 16].as_ptr()), f),
                _mm512_loadu_ps(m[c..c + 16].as_ptr()),
            )
        }
    }

    /// [`nibble_row16`] for `c..c + 8`.
    #[inline(always)]
    unsafe fn nibble_row8(q: &[u8], d: &[f32], m: &[f32], c: usize) -> __m256 {
        // SAFETY (caller): AVX2; the slices check `q[c/2..c/2 + 4]`, `d[c..c + 8]` and
        // `m[c..c + 8]`.
        unsafe {
            let bits = u32::from_le_bytes([q[c / 2], q[c / 2 + 1], q[c / 2 + 2], q[c / 2 + 3]]);
            let b = _mm_cvtsi32_si128(bits as i32);
            let f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(column_order(b)));
            _mm256_add_ps(
                _mm256_mul_ps(_mm256_loadu_ps(d[c..c + 8].as_ptr()), f),
                _mm256_loadu_ps(m[c..c + 8].as_ptr()),
            )
        }
    }

    /// Row `j` of `W^T`: its nibbles, and its block's scales and offsets.
    fn columns_row(t: &NibbleColumns, j: usize) -> (&[u8], &[f32], &[f32]) {
        let (n, jb) = (t.n, j / 32);
        (
            &t.q[j * n / 2..(j + 1) * n / 2],
            &t.d[jb * n..(jb + 1) * n],
            &t.m[jb * n..(jb + 1) * n],
        )
    }

    /// `$entry(y, t, x, j0, j1)`: `y (m, n) += x[:, j0..j1] W^T[j0..j1, :]` as
    /// `vmath::axpy_rows` sums it (one FMA chain per output over `j` in order), each row
    /// of `W^T` made from `t`'s nibbles and scales `$lanes` values at a time by `$row`.
    /// One body for both widths, spelled with that width's intrinsics.
    macro_rules! axpy_nibbles {
        ($entry:ident, $kernel:ident, $features:literal, $v:ty, $lanes:literal, $row:ident,
         $set1:ident, $load:ident, $store:ident, $fmadd:ident) => {
            #[target_feature(enable = $features)]
            pub unsafe fn $entry(
                y: &mut [f32],
                t: &NibbleColumns,
                x: &[f32],
                j0: usize,
                j1: usize,
            ) {
                // SAFETY (caller): as this function's.
                unsafe { with_rows!(x.len() / t.k, $kernel(y, t, x, j0, j1)) }
            }

            #[target_feature(enable = $features)]
            unsafe fn $kernel<const M: usize>(
                y: &mut [f32],
                t: &NibbleColumns,
                x: &[f32],
                j0: usize,
                j1: usize,
            ) {
                let (n, k) = (t.n, t.k);
                assert!(M <= 8 && y.len() == M * n && x.len() == M * k && j1 <= k);
                assert!(n % 16 == 0);
                let buffered = 4 * M * n > FUSED_OUTPUT_BYTES;
                let mut row = vec![0f32; if buffered { n } else { 0 }];
                for j in j0..j1 {
                    let (q, d, m) = columns_row(t, j);
                    if !buffered {
                        let xv: [$v; M] = std::array::from_fn(|i| $set1(x[i * k + j]));
                        for c in (0..n).step_by($lanes) {
                            // SAFETY: the features enabled; `y[i * n + c..][..$lanes]` is
                            // inside `y` (`n` a multiple of 16).
                            unsafe {
                                let w = $row(q, d, m, c);
                                for (i, &xi) in xv.iter().enumerate() {
                                    let p = y[i * n + c..i * n + c + $lanes].as_mut_ptr();
                                    $store(p, $fmadd(xi, w, $load(p)));
                                }
                            }
                        }
                        continue;
                    }
                    for c in (0..n).step_by($lanes) {
                        // SAFETY: the features enabled; `row[c..c + $lanes]` is inside `row`.
                        unsafe { $store(row[c..c + $lanes].as_mut_ptr(), $row(q, d, m, c)) };
                    }
                    vmath::axpy_rows(y, &row, x, k, j);
                }
            }
        };
    }

    axpy_nibbles!(
        axpy_nibbles_avx512,
        axpy_avx512,
        "avx512f,avx512vl,avx2,fma",
        __m512,
        16,
        nibble_row16,
        _mm512_set1_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_fmadd_ps
    );
    axpy_nibbles!(
        axpy_nibbles_avx2,
        axpy_avx2,
        "avx2,fma",
        __m256,
        8,
        nibble_row8,
        _mm256_set1_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_fmadd_ps
    );
}

#[cfg(test)]
mod tests {
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::super::gemm;
    use super::*;
    use crate::model::quant::{GgmlType, dequantize, random_blocks};

    /// The stored product equals the f32 one bit for bit on every quantised type, through
    /// the kernels of the CPU's level and of AVX2 (which any CPU with AVX-512 runs too),
    /// for 1 to 8 rows, with `n` not a multiple of `ROW_BLOCK`, and rows of one and of
    /// several blocks (a K type's 256 values, 96 and 160 values of the others).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn stored_products_equal_the_f32_ones_bit_for_bit() {
        use x86::{Q4_0, Q4_1, Q4K, Q6K, Q8_0};
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let cases: [(GgmlType, usize, usize, RowsKernel); 7] = [
            (GgmlType::Q4_1, 130, 96, x86::dots_avx2::<Q4_1>),
            (GgmlType::Q8_0, 65, 96, x86::dots_avx2::<Q8_0>),
            (GgmlType::Q4_0, 70, 160, x86::dots_avx2::<Q4_0>),
            (GgmlType::Q4K, 65, 256, x86::dots_avx2::<Q4K>),
            (GgmlType::Q4K, 33, 768, x86::dots_avx2::<Q4K>),
            (GgmlType::Q6K, 65, 256, x86::dots_avx2::<Q6K>),
            (GgmlType::Q6K, 33, 512, x86::dots_avx2::<Q6K>),
        ];
        for (ty, n, k, avx2) in cases {
            let bytes = random_blocks(ty, n, k, rng.random());
            let mut w = vec![0f32; n * k];
            dequantize(ty, &bytes, &mut w);
            assert!(w.iter().all(|v| v.is_finite()));
            let s = StoredMatrix::new(ty, n, k, bytes).expect("whole blocks");
            let dots = rows_kernel(ty).expect("a CPU with AVX2, FMA and F16C");
            for m in 1..=gemm::STREAM_ROWS {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1f32..1.0)).collect();
                let want = gemm::linear_few_rows(&x, &w, m, k, n);
                for (level, kernel) in [("the CPU's level", dots), ("AVX2", avx2)] {
                    let got = linear_few_rows(&x, &s, kernel, m, k, n);
                    assert_eq!(got, want, "{ty:?} ({n}, {k}), {m} rows, {level}");
                }
            }
        }
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            assert!(rows_kernel(ty).is_none(), "{ty:?} keeps no blocks");
        }
    }

    /// A Q4_0, Q4_1 or Q4_K weight kept transposed: its [`NibbleColumns`] product equals
    /// `gemm::linear_few_rows_t` on the f32 `W^T` bit for bit, through the kernels of the
    /// CPU's level and of AVX2, for 1 to 8 rows; `k = 96`, `160` and `768` cut the 16
    /// lanes of rows inside blocks of 32 (6, 10 and 48 rows a lane). With `n = 1024` the
    /// outputs of 7 and 8 rows exceed `FUSED_OUTPUT_BYTES` (the buffered loop), those of
    /// 1-6 rows do not (the fused one). `n` not a multiple of 16 is not kept, nor are the
    /// types whose quants are not nibbles (Q8_0, Q6_K).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn transposed_nibbles_sum_as_the_f32_transpose_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let cases = [
            (GgmlType::Q4_1, 64, 96),
            (GgmlType::Q4_1, 48, 160),
            (GgmlType::Q4_1, 272, 96),
            (GgmlType::Q4_0, 48, 160),
            (GgmlType::Q4_0, 1024, 96),
            (GgmlType::Q4K, 32, 256),
            (GgmlType::Q4K, 1024, 256),
            (GgmlType::Q4K, 48, 768),
        ];
        for (ty, n, k) in cases {
            let mut bytes = random_blocks(ty, n, k, rng.random());
            if ty == GgmlType::Q4_0 {
                // Every third block's `d` zero: `-0` values on the f32 side, `+0` here.
                for b in bytes.chunks_exact_mut(18).step_by(3) {
                    b[..2].fill(0);
                }
            }
            let mut w = vec![0f32; n * k];
            dequantize(ty, &bytes, &mut w);
            let wt = transpose(&w, n, k);
            let s = StoredMatrix::new(ty, n, k, bytes).expect("whole blocks");
            let t = NibbleColumns::new(&s).expect("a CPU with AVX2 at least");
            for m in 1..=gemm::STREAM_ROWS {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1f32..1.0)).collect();
                let want = gemm::linear_few_rows_t(&x, &wt, m, k, n);
                assert_eq!(linear_few_rows_t(&x, &t, m, k, n), want, "{ty:?}, {m} rows");
                // One lane through the AVX2 kernel against `axpy_rows` on the f32 rows.
                let (j0, j1) = lane_rows(k, 3);
                let mut lane = vec![0f32; m * n];
                vmath::axpy_rows(&mut lane, &wt[j0 * n..j1 * n], &x, k, j0);
                let mut got = vec![0f32; m * n];
                // SAFETY: `NibbleColumns::new` found AVX2 and FMA; `j0..j1` are rows of `W^T`.
                unsafe { x86::axpy_nibbles_avx2(&mut got, &t, &x, j0, j1) };
                assert_eq!(got, lane, "{ty:?}, {m} rows, AVX2");
            }
        }
        let s = StoredMatrix::new(GgmlType::Q4_1, 24, 32, vec![0; 24 * 20]).expect("blocks");
        assert!(
            NibbleColumns::new(&s).is_none(),
            "24 rows are not whole 16s"
        );
        for ty in [GgmlType::Q8_0, GgmlType::Q6K] {
            let s = StoredMatrix::new(ty, 16, 256, random_blocks(ty, 16, 256, 1)).expect("blocks");
            assert!(
                NibbleColumns::new(&s).is_none(),
                "{ty:?} is not kept transposed"
            );
        }
    }
}
