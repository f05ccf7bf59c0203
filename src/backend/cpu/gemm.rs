//! Safe, bounds-checked wrapper over the `gemm` crate's strided f32 GEMM.

use std::mem::MaybeUninit;

use gemm::Parallelism;
use rayon::prelude::*;

use super::vmath;

/// A strided read-only matrix: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major matrix with `cols` columns (row stride `cols`).
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// A row-major view with an explicit row stride (a column block of a wider matrix).
    pub fn strided(data: &'a [f32], rs: usize) -> Self {
        Mat { data, rs, cs: 1 }
    }
    /// The transpose of this view.
    pub fn t(self) -> Self {
        Mat {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "gemm: {what} view out of bounds");
        }
    }
}

/// Products smaller than this many multiply-adds run on one thread.
const PARALLEL_MACS: usize = 1 << 18;

/// `C (m, n) = [C +] alpha * A (m, k) B (k, n)`, C row-major with row stride `c_rs`.
/// `parallel` lets large products use the rayon pool; pass `false` inside parallel loops.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    alpha: f32,
    parallel: bool,
) {
    if m > 0 && n > 0 {
        assert!((m - 1) * c_rs + n <= c.len(), "gemm: dst out of bounds");
    }
    // SAFETY: `c` is a unique borrow covering every element written.
    unsafe {
        gemm_ptr(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_rs,
            accumulate,
            a,
            b,
            alpha,
            parallel,
        )
    }
}

/// As [`gemm()`], writing through a raw pointer: for tasks that fill interleaved column
/// blocks of one matrix, where disjoint `&mut` slices cannot be formed.
///
/// # Safety
/// `c` must be valid for writes at `i * c_rs + j` for `i < m`, `j < n`, and no other
/// thread may access those elements during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_ptr(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    alpha: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    unsafe { *c.add(i * c_rs + j) = 0.0 };
                }
            }
        }
        return;
    }
    a.check(m, k, "lhs");
    b.check(k, n, "rhs");
    let threads = rayon::current_num_threads();
    let bands = if parallel && m * n * k >= PARALLEL_MACS {
        row_bands(m, n, threads)
    } else {
        None
    };
    match bands {
        // One band of rows per thread, each a single-threaded product. Why: the crate
        // parallelises over its own tiles of the output's columns (64 wide on AVX-512),
        // which split SmolLM2's 576 columns 5 to 4 between two threads; bands of rows split
        // even. Measured on 1024 rows, 2 threads (30 layers' weights cycled, Intel AVX-512;
        // BENCHMARKS.md), GFLOP/s of the crate's split, then of bands: 576 -> 576 279-299,
        // 308-340; 576 -> 192 276-283, 320-333; 1536 -> 576 282-291, 309-320; 576 -> 1536
        // 330-334 either way.
        Some(bands) => {
            let c = Out(c);
            bands.into_par_iter().for_each(|(r0, rows)| {
                let a = Mat {
                    data: &a.data[r0 * a.rs..],
                    ..a
                };
                // SAFETY: bands are disjoint row ranges of the caller's destination, and
                // `a`'s band was bounds-checked with the whole view above.
                unsafe {
                    gemm_one(
                        rows,
                        n,
                        k,
                        c.at(r0 * c_rs),
                        c_rs,
                        accumulate,
                        a,
                        b,
                        alpha,
                        Parallelism::None,
                    )
                };
            });
        }
        None => {
            let par = if parallel && m * n * k >= PARALLEL_MACS && threads > 1 {
                Parallelism::Rayon(0)
            } else {
                Parallelism::None
            };
            // SAFETY: as for this function.
            unsafe { gemm_one(m, n, k, c, c_rs, accumulate, a, b, alpha, par) };
        }
    }
}

/// Rows per thread below which a product is not banded: the crate's own parallel split
/// takes it (a narrower band would repack all of `b` for a few rows).
const SPLIT_MIN_ROWS: usize = 72;

/// The bands of rows, `(first, rows)`, that `threads` tasks take of an `(m, n)` product,
/// or None where it is too small to band: sizes within 4 of each other, every boundary a
/// multiple of 4 (the row groups of the low-rank kernels, `banded`), at least
/// `SPLIT_MIN_ROWS - 4` rows each.
///
/// Why the bounds: a band is then the same sums as the whole product, bit for bit. The
/// crate takes `k` in blocks whose size depends on `k` and the caches alone, except for
/// products of at most 64 by 64 (its small-product path blocks `k` by 512) and of at most
/// 256 outputs (its dot-product kernels). Every band here has more than 64 rows and more
/// than 256 outputs, as the whole product does (tested with pools of 1-4 threads).
pub fn row_bands(m: usize, n: usize, threads: usize) -> Option<Vec<(usize, usize)>> {
    if threads < 2 || m / threads < SPLIT_MIN_ROWS || n < 4 {
        return None;
    }
    let edge = |i: usize| {
        if i == threads {
            m
        } else {
            i * m / threads / 4 * 4
        }
    };
    Some(
        (0..threads)
            .map(|i| (edge(i), edge(i + 1) - edge(i)))
            .collect(),
    )
}

/// Base pointer of an output that parallel tasks fill at disjoint elements (bands of rows
/// here, attention's interleaved heads).
#[derive(Clone, Copy)]
pub struct Out(pub *mut f32);
// SAFETY: each task writes only its own elements; see the users.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Taking `self` whole keeps closures capturing the `Send` wrapper, not the raw field.
    pub fn at(self, off: usize) -> *mut f32 {
        // SAFETY: callers stay inside the buffer this pointer was taken from.
        unsafe { self.0.add(off) }
    }
}

/// One call of the gemm crate on checked views.
///
/// # Safety
/// As [`gemm_ptr`], with `a` and `b` already checked for `(m, k)` and `(k, n)`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_one(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    alpha: f32,
    par: Parallelism,
) {
    // SAFETY: the input views were bounds-checked for the extents gemm reads; the caller
    // vouches for the destination.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// `C (m, n) = alpha * A (m, k) B (k, n)` in a new row-major buffer that only the GEMM
/// writes: a zero-filled one would cost a single-threaded memset of the whole output first
/// (megabytes per activation), with the other threads idle.
pub fn gemm_new(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    alpha: f32,
    parallel: bool,
) -> Vec<f32> {
    let mut c = Vec::with_capacity(m * n);
    // SAFETY: without `accumulate` the GEMM writes every element of the (m, n) output (k = 0
    // included) and reads none of them, so the length covers initialised values only once
    // it returns.
    unsafe {
        gemm_ptr(m, n, k, c.as_mut_ptr(), n, false, a, b, alpha, parallel);
        c.set_len(m * n);
    }
    c
}

/// A zeroed buffer of `n` elements, filled by the rayon pool (see [`gemm_new`]).
pub fn zeros_par(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()
        .par_chunks_mut(1 << 16)
        .for_each(|c| c.iter_mut().for_each(|x| _ = x.write(0.0)));
    // SAFETY: every element was just written.
    unsafe { v.set_len(n) };
    v
}

/// `w (rows, cols)` row-major as its transpose `(cols, rows)`, row-major.
pub fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    for (i, row) in w[..rows * cols].chunks_exact(cols.max(1)).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            t[j * rows + i] = v;
        }
    }
    t
}

/// `c` zero-filled, as `f32`s: for a parallel task that writes its chunk of a new buffer
/// (`Vec::spare_capacity_mut`), so that the zeros go to the cache lines the task then
/// writes over, instead of a pass of their own over memory first (`zeros_par`).
pub fn zeroed(c: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    for x in c.iter_mut() {
        x.write(0.0);
    }
    // SAFETY: every element was just written.
    unsafe { std::slice::from_raw_parts_mut(c.as_mut_ptr().cast(), c.len()) }
}

/// Plain triple loop, the reference the tests hold `gemm` to.
#[cfg(test)]
pub fn gemm_naive(m: usize, n: usize, k: usize, a: Mat, b: Mat) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for p in 0..k {
                s += a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64;
            }
            c[i * n + j] = s as f32;
        }
    }
    c
}

/// Row counts up to which [`linear_few_rows`] streams `w` through [`vmath::dot_block`]
/// (measured on SmolLM2's shapes, 2 threads: 1.1-4x the gemm crate at 1-8 rows, a half
/// to a third of it at 16-64, where `x` no longer fits the L1 cache beside a row of `w`).
/// [`linear_few_rows_t`] streams up to the same count: on down's shape (30 layers' weights
/// cycled) it takes 121-171 us at 1 row against `dot_block`'s 117-163, and 0.6-0.9 of
/// `dot_block`'s time at 2-8 rows.
pub(super) const STREAM_ROWS: usize = 8;

/// Rows of `w` per streaming task of [`linear_few_rows`]: enough to amortise a task, 768
/// for the LM head.
pub(super) const ROW_BLOCK: usize = 64;

/// `y (m, n) = x (m, k) w (n, k)^T` for a few rows `x` (decoding: a token or a few per
/// sequence), where reading `w` is most of the cost. Asked for `y = x w^T` row-major, the
/// gemm crate would repack all of `w` on every call; asked for `y^T = w x^T` it reads `w`
/// where it lies and packs only `x`, and the small result is transposed back. Up to
/// `STREAM_ROWS` rows, `w` is instead streamed once in blocks on the rayon pool, each
/// lane of it feeding every row of `x` from registers (`vmath::dot_block`), which sums in
/// another order: 16 lanes of FMAs, not the gemm crate's single chain.
pub fn linear_few_rows(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let yt = if m <= STREAM_ROWS && k > 0 {
        let mut yt = vec![0f32; n * m];
        yt.par_chunks_mut(ROW_BLOCK * m.max(1))
            .zip(w[..n * k].par_chunks(ROW_BLOCK * k))
            .for_each(|(yb, wb)| vmath::dot_block(yb, wb, &x[..m * k], k));
        yt
    } else {
        gemm_new(n, m, k, Mat::rows(w, k), Mat::rows(x, k).t(), 1.0, true)
    };
    transpose(&yt, n, m)
}

/// `y (m, n) = x (m, k) Wt (k, n)` for a few rows `x`, with the weight stored transposed
/// (`weight::CpuWeight`). Up to `STREAM_ROWS` rows, `Wt` is cut into `LANES` blocks of
/// whole rows, one task each on the rayon pool, which streams its block once
/// (`vmath::axpy_rows`, one chain of FMAs per output); the blocks' partial products are
/// added pairwise (`vmath::total_lanes`). That is the shape of [`linear_few_rows`]'s sums
/// (16 chains added pairwise), over contiguous blocks of `k` instead of interleaved lanes,
/// so that each task reads one contiguous stream. Above, the gemm crate reads `Wt` where
/// it lies.
pub fn linear_few_rows_t(x: &[f32], wt: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    if m > STREAM_ROWS || k == 0 || m == 0 || n == 0 {
        return gemm_new(m, n, k, Mat::rows(x, k), Mat::rows(wt, n), 1.0, true);
    }
    let mut parts: Vec<Vec<f32>> = (0..vmath::LANES)
        .into_par_iter()
        .map(|b| {
            let mut y = vec![0f32; m * n];
            let (j0, j1) = lane_rows(k, b);
            vmath::axpy_rows(&mut y, &wt[j0 * n..j1 * n], &x[..m * k], k, j0);
            y
        })
        .collect();
    vmath::total_lanes(&mut parts);
    parts.swap_remove(0)
}

/// The rows `j0..j1` of `Wt (k, n)` that lane `b` of [`linear_few_rows_t`] streams.
pub(super) fn lane_rows(k: usize, b: usize) -> (usize, usize) {
    let chunk = k.div_ceil(vmath::LANES);
    ((b * chunk).min(k), ((b + 1) * chunk).min(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_transposed_gemm_matches_naive() {
        let (m, n, k) = (37, 29, 53);
        let a: Vec<f32> = (0..k * m)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let b: Vec<f32> = (0..k * 2 * n)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
            .collect();
        // A read transposed from (k, m); B a column block of a (k, 2n) matrix.
        let av = Mat::rows(&a, m).t();
        let bv = Mat::strided(&b[n..], 2 * n);
        let mut c = vec![1f32; m * n];
        gemm(m, n, k, &mut c, n, false, av, bv, 1.0, true);
        let want = gemm_naive(m, n, k, av, bv);
        let err: f32 = c
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-4, "max abs error {err}");
    }

    /// A product split into bands of rows, one per thread, computes the same bits as one
    /// single-threaded call with every pool size (bands of 200, of 132, 132 and 136, of
    /// 100), on a `k` the crate blocks in two, 72 columns and 16 (under the crate's 64 of a
    /// small product, which blocks `k` otherwise); and it agrees with the naive loop.
    #[test]
    fn row_bands_compute_the_same_bits_on_any_thread_count() {
        assert_eq!(
            row_bands(400, 16, 3),
            Some(vec![(0, 132), (132, 132), (264, 136)])
        );
        assert_eq!(row_bands(143, 16, 2), None);
        assert_eq!(row_bands(400, 3, 2), None);
        for (m, n, k) in [(400, 72, 600), (400, 16, 600)] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
                .collect();
            let b: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
                .collect();
            let (av, bv) = (Mat::rows(&a, k), Mat::rows(&b, k).t());
            let mut one = vec![0f32; m * n];
            gemm(m, n, k, &mut one, n, false, av, bv, 1.0, false);
            let want = gemm_naive(m, n, k, av, bv);
            let err = one
                .iter()
                .zip(&want)
                .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
                .fold(0.0, f32::max);
            assert!(err < 1e-4, "relative error {err}");
            for threads in [2, 3, 4] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut banded = vec![0f32; m * n];
                pool.install(|| gemm(m, n, k, &mut banded, n, false, av, bv, 1.0, true));
                assert!(
                    one.iter()
                        .zip(&banded)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{m}x{n}x{k}, {threads} threads"
                );
            }
        }
    }

    /// The few-row products against the naive triple loop at every row count around the
    /// paths' thresholds (streamed up to `STREAM_ROWS`, the gemm crate above), with the
    /// weight row-major (`linear_few_rows`) and transposed (`linear_few_rows_t`). k = 53 is
    /// 16 blocks of 4 rows at most for the transposed stream: the 14th has 1 row and the
    /// last two none; k = 5 leaves 11 blocks empty.
    #[test]
    fn few_rows_linear_matches_naive() {
        for (k, n, transposed) in [(53, 41, false), (53, 141, true), (5, 17, true)] {
            // `W (n, k)` row-major, or `W^T (k, n)` row-major.
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
                .collect();
            for m in [1, 3, 4, 7, 8, 9, 64] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
                    .collect();
                let (got, wv) = if transposed {
                    (linear_few_rows_t(&x, &w, m, k, n), Mat::rows(&w, n))
                } else {
                    (linear_few_rows(&x, &w, m, k, n), Mat::rows(&w, k).t())
                };
                let want = gemm_naive(m, n, k, Mat::rows(&x, k), wv);
                let err: f32 = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(
                    err < 1e-4,
                    "k {k}, m {m}, transposed {transposed}: error {err}"
                );
            }
        }
    }
}
