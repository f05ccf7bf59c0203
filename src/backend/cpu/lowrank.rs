//! LoRA's rank-r products: `u = x A^T` and `y += s u B^T` forward; `g_A = s g B`,
//! `dx += g_A A`, `dA += g_A^T x` and `dB += s g^T u` backward.
//!
//! Why not the gemm crate: each is a GEMM with one side r wide (8 to 64, against
//! hundreds or thousands), so it does 2r flops per element of the activation it streams
//! (`x`, `y`, `g`: megabytes) and is bound by that stream, not by the FMAs. The crate packs
//! and tiles these as it does large products; they took 0.085 s of a 1.26 s SmolLM2
//! forward and 0.29 s of a 2.7 s forward + backward (4 x 256 tokens, r = 8 on all seven
//! projections, 2 threads, Intel AVX-512; BENCHMARKS.md). Here each task reads its block
//! of the activation once, with the rank-sized operand in L1, and a projection group's
//! ranks are stacked so that the input it shares (`x` of q/k/v, of gate/up) and `dx` are
//! read once for the group ([`group_forward`], [`group_backward`]): the forward ran 4.5 %
//! faster and the training step 2.7 % (`benches/peers/ab.py`, 14 rounds).
//!
//! Every output is one fixed sum in a fixed order on any number of threads: tasks split
//! the rows, or, for the sums over rows, the columns (`dA`) or fixed blocks of rows whose
//! sums are added in block order (`dB`, [`project_outer`]), never by the pool's size. The
//! kernels are plain loops over 16 lanes that compile for AVX-512 or AVX2 (`vmath`'s
//! dispatch); every level computes the same bits.

use rayon::prelude::*;

use super::gemm::transpose;
use super::vmath::{LANES, ROW_GROUP, dispatch, dot1, dots4};

/// Rows per task of the row-wise products (`project`, `add_product`).
const ROWS: usize = 64;

/// Columns per task of [`outer`]: eight 16-lane strips.
const COLS: usize = 128;

/// Ranks [`outer`] sums together in one pass over a column block: four by 16 columns are
/// 4 zmm or 8 ymm accumulators (eight ranks spilled half of AVX2's to the stack).
const RANKS: usize = 4;

/// `out (m, r) = scale * x (m, k) W^T` for `w (r, k)` row-major: each output the 16-lane
/// dot product of `vmath` (lanes added pairwise), times `scale`.
pub fn project(x: &[f32], m: usize, k: usize, w: &[f32], scale: f32) -> Vec<f32> {
    let r = w.len().checked_div(k).unwrap_or(0);
    let mut out = vec![0f32; m * r];
    if r == 0 {
        return out;
    }
    out.par_chunks_mut(ROWS * r)
        .zip(x[..m * k].par_chunks(ROWS * k))
        .for_each(|(o, xb)| project_rows(o, xb, w, k, scale));
    out
}

dispatch!(project_rows(out: &mut [f32], x: &[f32], w: &[f32], k: usize, scale: f32) -> () {
    // A group of four rows stays in L1 while every row of `w` passes over it.
    let r = w.len() / k;
    let mut groups = x.chunks_exact(ROW_GROUP * k);
    let mut outs = out.chunks_exact_mut(ROW_GROUP * r);
    for (g, o) in (&mut groups).zip(&mut outs) {
        let rows: [&[f32]; ROW_GROUP] = std::array::from_fn(|q| &g[q * k..(q + 1) * k]);
        for (p, wp) in w.chunks_exact(k).enumerate() {
            for (q, d) in dots4(wp, rows).into_iter().enumerate() {
                o[q * r + p] = scale * d;
            }
        }
    }
    let rest = outs.into_remainder().chunks_exact_mut(r);
    for (xi, oi) in groups.remainder().chunks_exact(k).zip(rest) {
        for (o, wp) in oi.iter_mut().zip(w.chunks_exact(k)) {
            *o = scale * dot1(wp, xi);
        }
    }
});

/// `y (m, n) += scale * c (m, r) W` for `w (r, n)` row-major: each output one chain of FMAs
/// over the ranks in order, onto `y`'s value (`y + (s c_ip) w_pj`, p = 0, 1, ...).
pub fn add_product(y: &mut [f32], m: usize, n: usize, c: &[f32], w: &[f32], scale: f32) {
    let r = w.len().checked_div(n).unwrap_or(0);
    if r == 0 || m == 0 {
        return;
    }
    y[..m * n]
        .par_chunks_mut(ROWS * n)
        .zip(c[..m * r].par_chunks(ROWS * r))
        .for_each(|(yb, cb)| add_product_rows(yb, n, cb, w, scale));
}

dispatch!(add_product_rows(y: &mut [f32], n: usize, c: &[f32], w: &[f32], scale: f32) -> () {
    // Four rows of `y` at a time, 16 columns at a time: each lane of `w` loaded feeds four
    // FMAs, and the four accumulators stay in registers across the ranks.
    let r = w.len() / n;
    let full = n / LANES * LANES;
    let wl: Vec<&[[f32; LANES]]> = w.chunks_exact(n).map(|wp| wp[..full].as_chunks().0).collect();
    let mut sc = vec![0f32; ROW_GROUP * r];
    let mut groups = y.chunks_exact_mut(ROW_GROUP * n);
    let mut cs = c.chunks_exact(ROW_GROUP * r);
    for (yg, cg) in (&mut groups).zip(&mut cs) {
        sc.iter_mut().zip(cg).for_each(|(s, &v)| *s = scale * v);
        let (y0, rest) = yg.split_at_mut(n);
        let (y1, rest) = rest.split_at_mut(n);
        let (y2, y3) = rest.split_at_mut(n);
        let [y0, y1, y2, y3] = [y0, y1, y2, y3].map(|yq| yq[..full].as_chunks_mut::<LANES>().0);
        let (s0, s1, s2, s3) = (&sc[..r], &sc[r..2 * r], &sc[2 * r..3 * r], &sc[3 * r..4 * r]);
        for ch in 0..full / LANES {
            let (mut a0, mut a1, mut a2, mut a3) = (y0[ch], y1[ch], y2[ch], y3[ch]);
            for p in 0..r {
                let wv = &wl[p][ch];
                for l in 0..LANES {
                    a0[l] = s0[p].mul_add(wv[l], a0[l]);
                    a1[l] = s1[p].mul_add(wv[l], a1[l]);
                    a2[l] = s2[p].mul_add(wv[l], a2[l]);
                    a3[l] = s3[p].mul_add(wv[l], a3[l]);
                }
            }
            (y0[ch], y1[ch], y2[ch], y3[ch]) = (a0, a1, a2, a3);
        }
        for (q, yq) in yg.chunks_exact_mut(n).enumerate() {
            for (j, v) in yq.iter_mut().enumerate().skip(full) {
                for p in 0..r {
                    *v = sc[q * r + p].mul_add(w[p * n + j], *v);
                }
            }
        }
    }
    for (yi, ci) in groups.into_remainder().chunks_exact_mut(n).zip(cs.remainder().chunks_exact(r)) {
        for (j, v) in yi.iter_mut().enumerate() {
            for p in 0..r {
                *v = (scale * ci[p]).mul_add(w[p * n + j], *v);
            }
        }
    }
});

/// [`project`] of `g (m, n)` by `w (r, n)` and, in the same pass over `g`, `c^T g (r, n)`
/// for `c (m, r)`: `(scale * g W^T, c^T g)`. LoRA's backward takes `gA = s g B` and
/// `dB^T = u^T g` (scaled after) from the same output gradient; as two passes, each read
/// `g` from memory (megabytes a projection), where here each task's block of ROWS rows is
/// read for the second product from L2, just after the first. The projection is
/// [`project`]'s, bit for bit; each output of `c^T g` is one chain of FMAs over a block's
/// rows in order, from zero, and the blocks' sums are added in block order: the same bits
/// on any number of threads (tasks own blocks of rows, whatever the pool).
pub fn project_outer(
    g: &[f32],
    m: usize,
    n: usize,
    w: &[f32],
    scale: f32,
    c: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let r = w.len().checked_div(n).unwrap_or(0);
    let mut ga = vec![0f32; m * r];
    let mut sums = vec![0f32; r * n];
    if r == 0 || n == 0 || m == 0 {
        return (ga, sums);
    }
    let mut parts = vec![0f32; m.div_ceil(ROWS) * r * n];
    ga.par_chunks_mut(ROWS * r)
        .zip(parts.par_chunks_mut(r * n))
        .zip(
            g[..m * n]
                .par_chunks(ROWS * n)
                .zip(c[..m * r].par_chunks(ROWS * r)),
        )
        .for_each(|((o, part), (gb, cb))| {
            project_rows(o, gb, w, n, scale);
            outer_cols(part, cb, r, gb, n, 0);
        });
    sums.par_chunks_mut(COLS).enumerate().for_each(|(b, out)| {
        for part in parts.chunks_exact(r * n) {
            for (o, v) in out.iter_mut().zip(&part[b * COLS..]) {
                *o += v;
            }
        }
    });
    (ga, sums)
}

/// `c^T x`, `(r, n)` row-major, for `c (m, r)` and `x (m, n)`: each output one chain of
/// FMAs over the rows in order, from zero.
pub fn outer(c: &[f32], m: usize, r: usize, x: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; r * n];
    if r == 0 || n == 0 || m == 0 {
        return out;
    }
    let (c, x) = (&c[..m * r], &x[..m * n]);
    // Each task's sums as an `(r, width)` tile, scattered into `out` after.
    let mut tiles = vec![0f32; n.div_ceil(COLS) * r * COLS];
    tiles
        .par_chunks_mut(r * COLS)
        .enumerate()
        .for_each(|(b, t)| {
            let j0 = b * COLS;
            let width = COLS.min(n - j0);
            outer_cols(&mut t[..r * width], c, r, x, n, j0);
        });
    for (b, t) in tiles.chunks_exact(r * COLS).enumerate() {
        let j0 = b * COLS;
        let width = COLS.min(n - j0);
        for (p, tp) in t[..r * width].chunks_exact(width).enumerate() {
            out[p * n + j0..p * n + j0 + width].copy_from_slice(tp);
        }
    }
    out
}

dispatch!(outer_cols(out: &mut [f32], c: &[f32], r: usize, x: &[f32], n: usize, j0: usize) -> () {
    // `out (r, width) = c^T x[:, j0..j0 + width]`, summed over the rows in order. RANKS
    // ranks by 16 columns of sums are held in registers (four named accumulators, so that
    // the compiler keeps each in one vector, as `vmath::dots4` does) over a block of BLOCK
    // rows, each row loading its 16 columns once and its RANKS coefficients as broadcasts;
    // then the next 16 columns of the same rows. So a block's rows are read as BLOCK
    // streams of contiguous columns, which the prefetchers follow: a loop down one 16-column
    // strip, rows kilobytes apart, stalled on every load (3.8 % of a training step).
    const BLOCK: usize = 16;
    let width = out.len() / r;
    let m = x.len() / n;
    let strips = width / LANES;
    out.fill(0.0);
    let mut p0 = 0;
    while p0 + RANKS <= r {
        for i0 in (0..m).step_by(BLOCK) {
            let rows = c[i0 * r..].chunks_exact(r).zip(x[i0 * n..].chunks_exact(n)).take(BLOCK);
            for s in 0..strips {
                let at = |q: usize| (p0 + q) * width + s * LANES;
                let load = |q: usize| -> [f32; LANES] { out[at(q)..at(q) + LANES].try_into().unwrap() };
                let (mut a0, mut a1, mut a2, mut a3) = (load(0), load(1), load(2), load(3));
                let col = j0 + s * LANES;
                for (ci, xi) in rows.clone() {
                    let xv: &[f32; LANES] = xi[col..col + LANES].try_into().unwrap();
                    let cv: &[f32; RANKS] = ci[p0..p0 + RANKS].try_into().unwrap();
                    for l in 0..LANES {
                        a0[l] = cv[0].mul_add(xv[l], a0[l]);
                        a1[l] = cv[1].mul_add(xv[l], a1[l]);
                        a2[l] = cv[2].mul_add(xv[l], a2[l]);
                        a3[l] = cv[3].mul_add(xv[l], a3[l]);
                    }
                }
                for (q, a) in [a0, a1, a2, a3].iter().enumerate() {
                    out[at(q)..at(q) + LANES].copy_from_slice(a);
                }
            }
        }
        p0 += RANKS;
    }
    // The columns past the last strip for those ranks, and every column of the ranks past
    // the last group of RANKS: one output at a time, the same chain over the rows.
    for p in 0..r {
        let first = if p < p0 { strips * LANES } else { 0 };
        let o = &mut out[p * width + first..(p + 1) * width];
        for (ci, xi) in c.chunks_exact(r).zip(x.chunks_exact(n)) {
            let cp = ci[p];
            for (v, &xv) in o.iter_mut().zip(&xi[j0 + first..j0 + width]) {
                *v = cp.mul_add(xv, *v);
            }
        }
    }
});

/// An adapted projection of a forward group: `A (r, d_in)`, `B (d_out, r)` and the base
/// product `y = x W^T (m, d_out)` to add `s u B^T` to.
pub struct FwdPart<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub y: &'a mut [f32],
}

/// The low-rank part of a forward group whose projections all read `x (m, d_in)`:
/// `u_p = x A_p^T` for every part at once (one pass over `x` with the `A_p` stacked), then
/// `y_p += s u_p B_p^T`. Returns the `u_p (m, r)` in order.
pub fn group_forward(
    x: &[f32],
    m: usize,
    d_in: usize,
    r: usize,
    scale: f32,
    parts: Vec<FwdPart<'_>>,
) -> Vec<Vec<f32>> {
    let stacked: Vec<f32> = parts
        .iter()
        .flat_map(|p| p.a[..r * d_in].iter().copied())
        .collect();
    let u_all = project(x, m, d_in, &stacked, 1.0);
    let wide = r * parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(q, p)| {
            let u: Vec<f32> = u_all
                .chunks_exact(wide.max(1))
                .flat_map(|row| row[q * r..(q + 1) * r].iter().copied())
                .collect();
            let d_out = p.b.len() / r.max(1);
            add_product(p.y, m, d_out, &u, &transpose(p.b, d_out, r), scale);
            u
        })
        .collect()
}

/// An adapted projection of a backward group: its output gradient `g (m, d_out)`, `A`,
/// `B`, the forward's `u`, and the `(dA, dB)` to add to when gradients are wanted.
pub struct BwdPart<'a> {
    pub g: &'a [f32],
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub u: &'a [f32],
    pub grads: Option<(&'a mut [f32], &'a mut [f32])>,
}

/// The low-rank part of a backward group reading `x (m, d_in)`, after the base products
/// are in `dx`: `gA_p = s g_p B_p`; `dx += sum_p gA_p A_p` and `dA_p += gA_p^T x` as one
/// product each over the stacked ranks (one pass over `dx` and one over `x` for the
/// group, where the projections one by one took one each: x, the forward's saved input,
/// comes from memory); `dB_p += s g_p^T u_p`, summed in the pass that takes `gA_p` from
/// `g_p` ([`project_outer`]). Returns the `gA_p (m, r)` in order.
pub fn group_backward(
    x: &[f32],
    m: usize,
    d_in: usize,
    r: usize,
    scale: f32,
    dx: &mut [f32],
    parts: Vec<BwdPart<'_>>,
) -> Vec<Vec<f32>> {
    // `gA_p`, and `u_p^T g_p` (dB's sums) from the same pass over `g_p` where wanted.
    let (ga, ug): (Vec<Vec<f32>>, Vec<Option<Vec<f32>>>) = parts
        .iter()
        .map(|p| {
            let d_out = p.b.len() / r.max(1);
            let bt = transpose(p.b, d_out, r);
            if p.grads.is_some() {
                let (ga, ug) = project_outer(p.g, m, d_out, &bt, scale, p.u);
                (ga, Some(ug))
            } else {
                (project(p.g, m, d_out, &bt, scale), None)
            }
        })
        .unzip();
    let wide = r * parts.len();
    let mut c = vec![0f32; m * wide];
    for (q, gq) in ga.iter().enumerate() {
        for (row, gr) in c
            .chunks_exact_mut(wide.max(1))
            .zip(gq.chunks_exact(r.max(1)))
        {
            row[q * r..(q + 1) * r].copy_from_slice(gr);
        }
    }
    let stacked: Vec<f32> = parts
        .iter()
        .flat_map(|p| p.a[..r * d_in].iter().copied())
        .collect();
    add_product(dx, m, d_in, &c, &stacked, 1.0);
    if parts.iter().any(|p| p.grads.is_some()) {
        let sa = outer(&c, m, wide, x, d_in);
        for (q, (p, sb)) in parts.into_iter().zip(ug).enumerate() {
            let (Some((da, db)), Some(sb)) = (p.grads, sb) else {
                continue;
            };
            da.iter_mut()
                .zip(&sa[q * r * d_in..(q + 1) * r * d_in])
                .for_each(|(v, s)| *v += s);
            // `dB^T (r, d_out) = s u^T g`, added to `dB (d_out, r)` transposed.
            let d_out = p.b.len() / r;
            for (j, row) in db.chunks_exact_mut(r).enumerate() {
                for (k, v) in row.iter_mut().enumerate() {
                    *v += scale * sb[k * d_out + j];
                }
            }
        }
    }
    ga
}

#[cfg(test)]
mod tests {
    use super::*;

    fn val(i: usize, s: usize) -> f32 {
        ((i * s % 1009) as f32 - 504.0) / 700.0
    }

    /// `|got - want| <= 1e-5 sum |terms|` per output, with `want` and the term sums in f64
    /// (`terms[i]` is `(exact, sum of |products|)`): at most ~130 f32 roundings of partial
    /// sums bounded by the absolute sum, 130 x 6e-8 = 7.8e-6 of it.
    fn close(what: &str, got: &[f32], want: &[(f64, f64)]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&g, &(w, abs))) in got.iter().zip(want).enumerate() {
            let err = (g as f64 - w).abs();
            assert!(err <= 1e-5 * abs.max(1e-30), "{what}[{i}]: {g} vs {w}");
        }
    }

    /// Every shape the kernels split unevenly: rows not a multiple of 4 or 64, columns not
    /// a multiple of 16 or 32, ranks not a multiple of 8, and the degenerate ones.
    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (3, 17, 3),
        (4, 16, 8),
        (5, 33, 8),
        (67, 100, 12),
        (130, 64, 16),
        (64, 15, 1),
        (9, 40, 9),
        (70, 300, 8),
    ];

    #[test]
    fn project_is_x_w_transposed() {
        for &(m, k, r) in SHAPES {
            let x: Vec<f32> = (0..m * k).map(|i| val(i, 7919)).collect();
            let w: Vec<f32> = (0..r * k).map(|i| val(i, 104729)).collect();
            let got = project(&x, m, k, &w, 0.75);
            let want: Vec<(f64, f64)> = (0..m * r)
                .map(|o| {
                    let (i, p) = (o / r, o % r);
                    (0..k).fold((0.0, 0.0), |(s, a), l| {
                        let t = 0.75 * x[i * k + l] as f64 * w[p * k + l] as f64;
                        (s + t, a + t.abs())
                    })
                })
                .collect();
            close(&format!("project {m}x{k} r {r}"), &got, &want);
        }
        assert!(project(&[], 0, 0, &[], 1.0).is_empty());
    }

    #[test]
    fn add_product_adds_c_w() {
        for &(m, n, r) in SHAPES {
            let y0: Vec<f32> = (0..m * n).map(|i| val(i, 31337)).collect();
            let c: Vec<f32> = (0..m * r).map(|i| val(i, 7919)).collect();
            let w: Vec<f32> = (0..r * n).map(|i| val(i, 104729)).collect();
            let mut y = y0.clone();
            add_product(&mut y, m, n, &c, &w, -1.5);
            let want: Vec<(f64, f64)> = (0..m * n)
                .map(|o| {
                    let (i, j) = (o / n, o % n);
                    (0..r).fold((y0[o] as f64, (y0[o] as f64).abs()), |(s, a), p| {
                        let t = -1.5 * c[i * r + p] as f64 * w[p * n + j] as f64;
                        (s + t, a + t.abs())
                    })
                })
                .collect();
            close(&format!("add_product {m}x{n} r {r}"), &y, &want);
        }
    }

    #[test]
    fn outer_is_c_transposed_x() {
        for &(m, n, r) in SHAPES {
            let c: Vec<f32> = (0..m * r).map(|i| val(i, 7919)).collect();
            let x: Vec<f32> = (0..m * n).map(|i| val(i, 31337)).collect();
            let got = outer(&c, m, r, &x, n);
            let want: Vec<(f64, f64)> = (0..r * n)
                .map(|o| {
                    let (p, j) = (o / n, o % n);
                    (0..m).fold((0.0, 0.0), |(s, a), i| {
                        let t = c[i * r + p] as f64 * x[i * n + j] as f64;
                        (s + t, a + t.abs())
                    })
                })
                .collect();
            close(&format!("outer {m}x{n} r {r}"), &got, &want);
        }
    }

    #[test]
    fn project_outer_is_project_and_c_transposed_g() {
        for &(m, n, r) in SHAPES {
            let g: Vec<f32> = (0..m * n).map(|i| val(i, 31337)).collect();
            let w: Vec<f32> = (0..r * n).map(|i| val(i, 104729)).collect();
            let c: Vec<f32> = (0..m * r).map(|i| val(i, 7919)).collect();
            let (ga, sums) = project_outer(&g, m, n, &w, -0.5, &c);
            let same = project(&g, m, n, &w, -0.5);
            assert!(
                ga.iter()
                    .zip(&same)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
                    && ga.len() == same.len(),
                "project_outer's projection {m}x{n} r {r}"
            );
            let want: Vec<(f64, f64)> = (0..r * n)
                .map(|o| {
                    let (p, j) = (o / n, o % n);
                    (0..m).fold((0.0, 0.0), |(s, a), i| {
                        let t = c[i * r + p] as f64 * g[i * n + j] as f64;
                        (s + t, a + t.abs())
                    })
                })
                .collect();
            close(&format!("project_outer {m}x{n} r {r}"), &sums, &want);
        }
    }

    /// The same bits on 1 and 3 threads (every output is one ordered chain).
    #[test]
    fn results_do_not_depend_on_the_threads() {
        let (m, k, n, r) = (200, 72, 96, 16);
        let x: Vec<f32> = (0..m * k).map(|i| val(i, 7919)).collect();
        let a: Vec<f32> = (0..r * k).map(|i| val(i, 104729)).collect();
        let bt: Vec<f32> = (0..r * n).map(|i| val(i, 31337)).collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let u = project(&x, m, k, &a, 0.5);
                let mut y: Vec<f32> = (0..m * n).map(|i| val(i, 13)).collect();
                add_product(&mut y, m, n, &u, &bt, 2.0);
                let d = outer(&u, m, r, &y, n);
                let (ga, ug) = project_outer(&y, m, n, &bt, 0.25, &u);
                (u, y, d, ga, ug)
            })
        };
        assert_eq!(run(1), run(3));
    }
}
