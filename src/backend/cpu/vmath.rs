//! The exponentials of the row ops (softmax, cross-entropy, SiLU), vectorised. glibc's
//! `expf` is a scalar call per element, and the hundreds of millions a training step takes
//! cost as much as a fifth of the forward pass on two cores; the same formula written as a
//! plain loop body vectorises to 8 (AVX2) or 16 (AVX-512) lanes.
//!
//! The sums and dot products of those rows are vectorised too, as 16 interleaved partial
//! sums added pairwise at the end; so are the products of a few rows with a weight matrix
//! that decoding takes ([`dot_block`]), where reading the weights once is what counts. For
//! a weight stored transposed, [`axpy_rows`] streams its rows instead: 16 contiguous blocks
//! of them, each block's sums one chain, the blocks added pairwise ([`total_lanes`]).
//!
//! `exp` here is within 2 ulp of the exact exponential over f32's normal range (the
//! Taylor polynomial's truncation error is below 1e-8 relative; the rest is rounding).
//! Results below f32's smallest normal flush to 0 (glibc returns subnormals there; the
//! difference is below 1.2e-38). Every SIMD level computes the same bits: lane-wise FMAs
//! round as the scalar `mul_add` does, and no sum is reordered.

/// `e^x`: `x = n ln2 + r` with `|r| <= ln2 / 2`, `e^r` by its degree-7 Taylor polynomial,
/// times `2^n`.
#[inline(always)]
fn exp(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds an f32 of magnitude below 2^22 to an integer.
    const ROUND: f32 = 12_582_912.0;
    // ln 2 in two parts: the high part has 10 significant bits, so `n * LN2_HI` is exact
    // for |n| < 2^14 and `x - n * LN2_HI` loses nothing.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // ln of the smallest normal and of the largest finite f32.
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.722_83;
    let xc = x.clamp(LO, HI);
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    let mut p: f32 = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p.mul_add(r, c);
    }
    // 2^n as two normal powers of two (n reaches 128, one past the largest exponent).
    // `t` and ROUND lie in one binade whose ulp is 1, so their bit patterns differ by
    // exactly n: integer arithmetic that vectorises. `n as i32` saturates, which compiles
    // to one scalar conversion per lane (`exp_shifted` took 6.1 % of a SmolLM2 forward
    // with it, 1.7 % without; BENCHMARKS.md).
    let n = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let y = p * pow2(n >> 1) * pow2(n - (n >> 1));
    if x.is_nan() {
        x
    } else if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Runs a loop body compiled for the widest vector level the CPU and the build allow.
macro_rules! dispatch {
    ($name:ident ($($arg:ident : $ty:ty),*) -> $ret:ty $body:block) => {
        pub fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn plain($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
            unsafe fn v4($($arg: $ty),*) -> $ret {
                plain($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn v3($($arg: $ty),*) -> $ret {
                plain($($arg),*)
            }
            // `super` is the CPU backend for every module that uses this (its children).
            match super::simd() {
                // SAFETY: `simd` reports only features the CPU has.
                #[cfg(target_arch = "x86_64")]
                super::Simd::Avx512 => unsafe { v4($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                super::Simd::Avx2 => unsafe { v3($($arg),*) },
                _ => plain($($arg),*),
            }
        }
    };
}
pub(super) use dispatch;

/// Partial sums per reduction: a fixed count, so that every SIMD level adds the same
/// numbers in the same order (a sequential f32 sum is one long chain of dependent adds,
/// four cycles each, and cannot be vectorised without changing its rounding anyway).
pub const LANES: usize = 16;

/// The lanes' partial sums added pairwise.
#[inline(always)]
pub(super) fn total(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

/// The largest of `init` and the lanes, folded pairwise as [`total`] adds: one
/// `max` after another is a chain of 16 dependent scalar instructions, as long as the
/// vector loop itself on a row of a few hundred. `max` is exact, so the order changes
/// nothing but the sign of a zero maximum (which no caller can tell from the other).
#[inline(always)]
fn lanes_max(mut acc: [f32; LANES], init: f32) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] = acc[l].max(acc[l + w]);
        }
        w /= 2;
    }
    acc[0].max(init)
}

/// `sum_i f(a_i, b_i)` over equal-length slices, in `LANES` interleaved partial sums.
#[inline(always)]
fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let full = ac.len() * LANES;
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += f(x[l], y[l]);
        }
    }
    for (l, a_l) in acc.iter_mut().enumerate().take(n - full) {
        *a_l += f(a[full + l], b[full + l]);
    }
    total(acc)
}

dispatch!(sum(xs: &[f32]) -> f32 {
    lane_sum(xs, xs, |x, _| x)
});

dispatch!(dot(a: &[f32], b: &[f32]) -> f32 {
    lane_sum(a, b, |x, y| x * y)
});

dispatch!(max(xs: &[f32], init: f32) -> f32 {
    // `max` ignores NaNs, as a sequential fold with `f32::max` does; its order is free.
    let mut acc = [init; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a = a.max(x);
    }
    lanes_max(acc, init)
});

/// `xs[i] = e^(xs[i] - shift)`, `LANES` at a time: a tail of fewer goes through a padded
/// copy, since the compiler's own tail loop is scalar (about 30 instructions an element),
/// and attention's rows (a few hundred keys) are short enough for a tail to be a good
/// part of the row.
#[inline(always)]
fn exp_shifted_body(xs: &mut [f32], shift: f32) {
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for x in c {
            *x = exp(*x - shift);
        }
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let mut pad = [shift; LANES];
        pad[..tail.len()].copy_from_slice(tail);
        for x in &mut pad {
            *x = exp(*x - shift);
        }
        let n = tail.len();
        tail.copy_from_slice(&pad[..n]);
    }
}

dispatch!(exp_shifted(xs: &mut [f32], shift: f32) -> () {
    exp_shifted_body(xs, shift)
});

dispatch!(causal_softmax_row(row: &mut [f32], n: usize) -> () {
    // Softmax over `row[..n]`, zeros after it: the max, `e^(z - max)`, their lane sum,
    // times its inverse, as four passes over a row that stays in L1, in one dispatch.
    let (live, masked) = row.split_at_mut(n);
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = live.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a = a.max(x);
    }
    let max = lanes_max(acc, f32::NEG_INFINITY);
    exp_shifted_body(live, max);
    let inv = 1.0 / lane_sum(live, live, |x, _| x);
    live.iter_mut().for_each(|x| *x *= inv);
    masked.fill(0.0);
});

dispatch!(swiglu(out: &mut [f32], gate: &[f32], up: &[f32]) -> () {
    // `out = silu(gate) * up`.
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g * sigmoid(g) * u;
    }
});

dispatch!(swiglu_backward(dg: &mut [f32], du: &mut [f32], dact: &[f32], gate: &[f32], up: &[f32]) -> () {
    // `d silu(g)/dg = sig(g) (1 + g (1 - sig(g)))`.
    for ((((dg, du), &d), &g), &u) in dg.iter_mut().zip(du.iter_mut()).zip(dact).zip(gate).zip(up) {
        let s = sigmoid(g);
        *dg = d * u * s * (1.0 + g * (1.0 - s));
        *du = d * g * s;
    }
});

/// Rows of `x` that [`dot_block`] takes together: each lane of `w` it loads feeds this many
/// FMAs, and their 16-lane accumulators fit the registers of either level (4 zmm, or 8 of
/// AVX2's 16 ymm).
pub(super) const ROW_GROUP: usize = 4;

/// `w . x_r` for four rows `x_r` at once (see [`dot_block`]). The accumulators are four
/// named arrays, not one indexed by row, so that the compiler vectorises the lane loop and
/// keeps them in registers.
#[inline(always)]
pub(super) fn dots4(w: &[f32], x: [&[f32]; ROW_GROUP]) -> [f32; ROW_GROUP] {
    let k = w.len();
    let (wc, wt) = w.as_chunks::<LANES>();
    // Every row cut to `w`'s chunks up front, so the loop runs without bounds checks.
    let [x0, x1, x2, x3] = x.map(|xi| &xi[..k].as_chunks::<LANES>().0[..wc.len()]);
    let mut a = [[0f32; LANES]; ROW_GROUP];
    let [a0, a1, a2, a3] = &mut a;
    for (c, wl) in wc.iter().enumerate() {
        let (y0, y1, y2, y3) = (&x0[c], &x1[c], &x2[c], &x3[c]);
        for l in 0..LANES {
            a0[l] = y0[l].mul_add(wl[l], a0[l]);
            a1[l] = y1[l].mul_add(wl[l], a1[l]);
            a2[l] = y2[l].mul_add(wl[l], a2[l]);
            a3[l] = y3[l].mul_add(wl[l], a3[l]);
        }
    }
    let full = k - wt.len();
    std::array::from_fn(|r| {
        for (l, &wl) in wt.iter().enumerate() {
            a[r][l] = x[r][full + l].mul_add(wl, a[r][l]);
        }
        total(a[r])
    })
}

/// `w . x` as [`dots4`] computes each of its four.
#[inline(always)]
pub(super) fn dot1(w: &[f32], x: &[f32]) -> f32 {
    let k = w.len();
    let (wc, wt) = w.as_chunks::<LANES>();
    let xc = &x[..k].as_chunks::<LANES>().0[..wc.len()];
    let mut a = [0f32; LANES];
    for (wl, xl) in wc.iter().zip(xc) {
        for l in 0..LANES {
            a[l] = xl[l].mul_add(wl[l], a[l]);
        }
    }
    let full = k - wt.len();
    for (l, &wl) in wt.iter().enumerate() {
        a[l] = x[full + l].mul_add(wl, a[l]);
    }
    total(a)
}

dispatch!(dot_block(yt: &mut [f32], w: &[f32], x: &[f32], k: usize) -> () {
    // `yt[j * m + i] = w_j . x_i` for the rows `w_j` of `w` and the `m = x.len() / k` rows
    // `x_i` of `x`, each as 16 lanes of FMAs added pairwise at the end: which rows share a
    // pass changes no bits.
    let m = x.len() / k;
    for (wj, yj) in w.chunks_exact(k).zip(yt.chunks_exact_mut(m)) {
        let mut groups = x.chunks_exact(ROW_GROUP * k);
        let mut yg = yj.chunks_exact_mut(ROW_GROUP);
        for (g, y) in (&mut groups).zip(&mut yg) {
            let rows: [&[f32]; ROW_GROUP] = std::array::from_fn(|r| &g[r * k..(r + 1) * k]);
            y.copy_from_slice(&dots4(wj, rows));
        }
        for (y, xi) in yg.into_remainder().iter_mut().zip(groups.remainder().chunks_exact(k)) {
            *y = dot1(wj, xi);
        }
    }
});

dispatch!(axpy_rows(y: &mut [f32], wt: &[f32], x: &[f32], k: usize, j0: usize) -> () {
    // `y (m, n) += x[:, j0..j1] Wt[j0..j1, :]` for the rows `Wt[j0..j1]` given as `wt`
    // (row-major, `n` columns) and the `m = x.len() / k` rows of `x (m, k)`: each row of
    // `Wt` is loaded once, in order, and feeds every row of `x`; each output is one chain
    // of FMAs over `j` in order.
    let n = y.len() / (x.len() / k);
    for (jj, wj) in wt.chunks_exact(n).enumerate() {
        for (yi, xi) in y.chunks_exact_mut(n).zip(x.chunks_exact(k)) {
            let xv = xi[j0 + jj];
            yi.iter_mut().zip(wj).for_each(|(yv, &w)| *yv = xv.mul_add(w, *yv));
        }
    }
});

/// `LANES` partial products added pairwise, as [`total`] adds a dot product's lanes:
/// `lanes[0]` ends as the sum.
pub fn total_lanes(lanes: &mut [Vec<f32>]) {
    assert_eq!(
        lanes.len(),
        LANES,
        "total_lanes: one partial product per lane"
    );
    let mut w = LANES / 2;
    while w > 0 {
        let (lo, hi) = lanes.split_at_mut(w);
        for (a, b) in lo.iter_mut().zip(hi.iter()) {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
        w /= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within 2 ulp of the f64 exponential over f32's normal range, from every SIMD
    /// level (the dispatched loop) and the scalar body alike; 0 below, inf above, NaN kept.
    #[test]
    fn exp_is_within_two_ulp() {
        let xs: Vec<f32> = (0..400_001)
            .map(|i| -87.3 + 176.0 * i as f32 / 400_000.0)
            .chain([-1e-30, 0.0, 1e-30, 1e-7, -1e-7])
            .collect();
        let mut v = xs.clone();
        exp_shifted(&mut v, 0.0);
        for (&x, &y) in xs.iter().zip(&v) {
            assert_eq!(
                y.to_bits(),
                exp(x).to_bits(),
                "x {x}: vector and scalar differ"
            );
            let want = (x as f64).exp();
            let ulp = (want as f32).abs() * f32::EPSILON;
            let err = (y as f64 - want).abs() / ulp as f64;
            assert!(err <= 2.0, "x {x}: {y} vs {want} ({err} ulp)");
        }
        let mut edge = [
            -90.0,
            -1e4,
            89.0,
            1e4,
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::NAN,
        ];
        exp_shifted(&mut edge, 0.0);
        assert_eq!(
            &edge[..6],
            &[0.0, 0.0, f32::INFINITY, f32::INFINITY, 0.0, f32::INFINITY]
        );
        assert!(edge[6].is_nan());
    }

    #[test]
    fn causal_softmax_row_is_the_separate_ops() {
        // The fused row against the scalar exponential and a plain f64 softmax; its
        // max/exp/sum are the ops tested above, so the bits must be theirs.
        for n in [0, 1, 2, 15, 16, 17, 31, 64, 100, 255, 256] {
            let z: Vec<f32> = (0..300)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 5.0)
                .collect();
            let mut row = z[..256.max(n)].to_vec();
            causal_softmax_row(&mut row, n);
            let m = z[..n].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = z[..n].iter().map(|&x| exp(x - m)).collect();
            let inv = 1.0 / sum(&e);
            // The exact softmax of the f32 differences `z - max` (each rounded once).
            let exact = |x: f32| ((x - m) as f64).exp();
            let total: f64 = z[..n].iter().map(|&x| exact(x)).sum();
            for j in 0..n {
                assert_eq!(row[j].to_bits(), (e[j] * inv).to_bits(), "n {n}, key {j}");
                let want = exact(z[j]) / total;
                assert!(
                    (row[j] as f64 - want).abs() <= 1e-6 * want,
                    "n {n}, key {j}"
                );
            }
            assert!(row[n..].iter().all(|&p| p == 0.0), "n {n}: masked keys");
        }
    }

    /// The lane sums against f64 sums, on lengths around the lane count; max exact.
    #[test]
    fn reductions_match_f64() {
        for n in [0, 1, 15, 16, 17, 255, 256, 1000] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 11 % 13) as f32 - 6.0) / 3.0).collect();
            let close = |got: f32, want: f64, scale: f64| {
                assert!(
                    (got as f64 - want).abs() <= 1e-6 * scale.max(1.0),
                    "n {n}: {got} vs {want}"
                );
            };
            let abs: f64 = a.iter().map(|&x| (x as f64).abs()).sum();
            close(sum(&a), a.iter().map(|&x| x as f64).sum(), abs);
            let ab: Vec<f64> = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| x as f64 * y as f64)
                .collect();
            close(
                dot(&a, &b),
                ab.iter().sum(),
                ab.iter().map(|v| v.abs()).sum(),
            );
            let want = a.iter().copied().fold(-1e30, f32::max);
            assert_eq!(max(&a, -1e30), want);
        }
    }

    /// `dot_block` gives, bit for bit, the scalar sum it documents (16 lanes of FMAs,
    /// added pairwise), whichever rows share its passes and at whatever SIMD level runs;
    /// and that sum is the f64 dot product to rounding.
    #[test]
    fn dot_block_sums_in_its_documented_order() {
        let lanes_fma = |w: &[f32], x: &[f32]| {
            let mut acc = [0f32; LANES];
            for (p, (&wp, &xp)) in w.iter().zip(x).enumerate() {
                acc[p % LANES] = xp.mul_add(wp, acc[p % LANES]);
            }
            total(acc)
        };
        for k in [1, 15, 16, 17, 579] {
            let n = 5;
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            for m in 1..=9 {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 11 % 13) as f32 - 6.0) / 3.0)
                    .collect();
                let mut yt = vec![f32::NAN; n * m];
                dot_block(&mut yt, &w, &x, k);
                for j in 0..n {
                    for i in 0..m {
                        let (wj, xi) = (&w[j * k..(j + 1) * k], &x[i * k..(i + 1) * k]);
                        let got = yt[j * m + i];
                        assert_eq!(got.to_bits(), lanes_fma(wj, xi).to_bits(), "k {k} m {m}");
                        let exact: f64 =
                            wj.iter().zip(xi).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let scale: f64 = wj
                            .iter()
                            .zip(xi)
                            .map(|(&a, &b)| (a as f64 * b as f64).abs())
                            .sum();
                        assert!(
                            (got as f64 - exact).abs() <= 1e-6 * scale.max(1.0),
                            "k {k}: {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}
