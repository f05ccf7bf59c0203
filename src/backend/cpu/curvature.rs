//! CPU reference for the curvature primitives.

use rayon::prelude::*;

use super::gemm::{Mat, gemm, gemm_ptr};
use crate::backend::Segment;

/// Adjacent segments (no padding between them) merged, so a dense batch is one GEMM.
fn merged(segments: &[Segment]) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::with_capacity(segments.len());
    for s in segments.iter().filter(|s| s.len > 0) {
        match out.last_mut() {
            Some(last) if last.start + last.len == s.start => last.len += s.len,
            _ => out.push(*s),
        }
    }
    out
}

/// `out (dx, dy) += alpha * sum_seg X_seg^T Y_seg`. When `X` is `Y` the product is
/// symmetric: only its upper-triangle tiles are computed (in parallel), then mirrored.
pub fn gram_accumulate(
    x: &[f32],
    dx: usize,
    y: &[f32],
    dy: usize,
    segments: &[Segment],
    alpha: f32,
    out: &mut [f32],
) {
    if std::ptr::eq(x, y) && dx == dy {
        gram_accumulate_upper(x, dx, segments, alpha, out);
        mirror_upper(out, dx);
        return;
    }
    for s in merged(segments) {
        let xs = &x[s.start * dx..(s.start + s.len) * dx];
        let ys = &y[s.start * dy..(s.start + s.len) * dy];
        gemm(
            dx,
            dy,
            s.len,
            out,
            dy,
            true,
            Mat::rows(xs, dx).t(),
            Mat::rows(ys, dy),
            alpha,
            true,
        );
    }
}

/// `out (d, d) += alpha * sum_seg X_seg^T X_seg` on the tiles of the upper triangle (the
/// diagonal tiles whole): elements below those tiles are left as they were, for
/// [`mirror_upper`] once every batch is in.
pub fn gram_accumulate_upper(
    x: &[f32],
    d: usize,
    segments: &[Segment],
    alpha: f32,
    out: &mut [f32],
) {
    for s in merged(segments) {
        syrk_upper(&x[s.start * d..(s.start + s.len) * d], d, s.len, alpha, out);
    }
}

/// Side of the square blocks the mirror copies: a block's source columns are 32 lines of
/// 128 bytes, which stay in L1 while its rows are written.
const MIRROR_BLOCK: usize = 32;

/// `out[i, j] = out[j, i]` for `j < i`: the lower triangle from the upper, block by block.
/// Why blocks: a plain row-by-row copy reads the upper triangle down its columns, a new
/// cache line (and, past 1024 columns, a new page) per element. For 1536 x 1536 (1024
/// rows) it took 2.1 ms in rows and 0.5 ms in blocks, beside the tiles' 6.7 ms.
///
/// Each block row is a task on the rayon pool: it writes only elements below the diagonal
/// of its own rows and reads only elements above it, which no task writes. (One thread
/// took 0.30 s of a KFAC estimate of SmolLM2-135M, 750 calls; see BENCHMARKS.md.)
pub fn mirror_upper(out: &mut [f32], d: usize) {
    assert!(
        out.len() >= d * d,
        "mirror_upper: {d} x {d} in {}",
        out.len()
    );
    let base = OutPtr(out.as_mut_ptr());
    (0..d.div_ceil(MIRROR_BLOCK))
        .into_par_iter()
        .for_each(|bi| {
            let i0 = bi * MIRROR_BLOCK;
            for j0 in (0..=i0).step_by(MIRROR_BLOCK) {
                for i in i0..(i0 + MIRROR_BLOCK).min(d) {
                    for j in j0..(j0 + MIRROR_BLOCK).min(i) {
                        // SAFETY: `i, j < d` and `out` holds `d * d`; `(i, j)` with `j < i` is
                        // written by the task of `i`'s block alone, and `(j, i)` lies above
                        // the diagonal, where no task writes.
                        unsafe { *base.at(i * d + j) = *base.at(j * d + i) };
                    }
                }
            }
        });
}

/// Tile size of the symmetric product.
const SYRK_BLOCK: usize = 128;

/// `out[I, J] += alpha X[:, I]^T X[:, J]` for the tiles with `I <= J`.
fn syrk_upper(x: &[f32], d: usize, rows: usize, alpha: f32, out: &mut [f32]) {
    let nb = d.div_ceil(SYRK_BLOCK);
    let tiles: Vec<(usize, usize)> = (0..nb).flat_map(|i| (i..nb).map(move |j| (i, j))).collect();
    let base = OutPtr(out.as_mut_ptr());
    tiles.into_par_iter().for_each(|(bi, bj)| {
        let (i0, j0) = (bi * SYRK_BLOCK, bj * SYRK_BLOCK);
        let (m, n) = (SYRK_BLOCK.min(d - i0), SYRK_BLOCK.min(d - j0));
        let xi = Mat::rows(&x[i0..], d).t();
        let xj = Mat::rows(&x[j0..], d);
        // SAFETY: tile (bi, bj) of `out` is written by this task only and lies inside it.
        unsafe {
            gemm_ptr(
                m,
                n,
                rows,
                base.at(i0 * d + j0),
                d,
                true,
                xi,
                xj,
                alpha,
                false,
            )
        };
    });
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (see `syrk_upper` and `mirror_upper`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn at(self, off: usize) -> *mut f32 {
        // SAFETY: callers stay inside the buffer.
        unsafe { self.0.add(off) }
    }
}

pub fn segment_sum(x: &[f32], dim: usize, segments: &[Segment], mean: bool) -> Vec<f32> {
    let mut out = vec![0f32; segments.len() * dim];
    out.par_chunks_mut(dim).zip(segments).for_each(|(o, s)| {
        for row in x[s.start * dim..(s.start + s.len) * dim].chunks(dim) {
            o.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
        if mean && s.len > 0 {
            let k = 1.0 / s.len as f32;
            o.iter_mut().for_each(|a| *a *= k);
        }
    });
    out
}

/// For each segment: `tmp = alpha * G_seg^T Y_seg` (one scratch matrix per thread),
/// then `out += tmp^2`. Segments are reduced in order, so the result is deterministic.
pub fn sq_grad_accumulate(
    g: &[f32],
    dg: usize,
    y: &[f32],
    dy: usize,
    segments: &[Segment],
    alpha: f32,
    out: &mut [f32],
) {
    let mut tmp = vec![0f32; dg * dy];
    for s in segments.iter().filter(|s| s.len > 0) {
        let gs = &g[s.start * dg..(s.start + s.len) * dg];
        let ys = &y[s.start * dy..(s.start + s.len) * dy];
        gemm(
            dg,
            dy,
            s.len,
            &mut tmp,
            dy,
            false,
            Mat::rows(gs, dg).t(),
            Mat::rows(ys, dy),
            alpha,
            true,
        );
        out.par_iter_mut()
            .zip(tmp.par_iter())
            .for_each(|(o, t)| *o += t * t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocked mirror writes exactly what the element-by-element one does, at sizes
    /// below, at and around multiples of the block, its block rows shared among 1 to 4
    /// threads.
    #[test]
    fn mirror_is_the_transpose_of_the_upper_triangle() {
        let sizes = [1, 2, 31, 32, 33, 64, 95, 130];
        for (d, threads) in sizes.iter().flat_map(|&d| (1..=4).map(move |t| (d, t))) {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let upper: Vec<f32> = (0..d * d).map(|i| i as f32).collect();
            let mut out = upper.clone();
            pool.install(|| mirror_upper(&mut out, d));
            for i in 0..d {
                for j in 0..d {
                    let want = upper[i.min(j) * d + i.max(j)];
                    assert_eq!(out[i * d + j], want, "d {d}, {threads} threads, ({i}, {j})");
                }
            }
        }
    }

    /// A factor summed over batches on its upper triangle and mirrored once at the end has
    /// the same bits as one mirrored after every batch: the upper triangle's sums never
    /// read the lower one. 300 columns: three tiles of the product, the last partial.
    #[test]
    fn one_mirror_at_the_end_gives_the_bits_of_one_per_batch() {
        let (d, rows) = (300, 70);
        let segs = [
            Segment { start: 0, len: 30 },
            Segment { start: 33, len: 37 },
        ];
        let batches: Vec<Vec<f32>> = (0..3)
            .map(|b| {
                (0..rows * d)
                    .map(|i| (((i * 7919 + b * 104729) % 2001) as f32 - 1000.0) * 1e-3)
                    .collect()
            })
            .collect();
        let (mut each, mut once) = (vec![0f32; d * d], vec![0f32; d * d]);
        for x in &batches {
            gram_accumulate(x, d, x, d, &segs, 0.5, &mut each);
            gram_accumulate_upper(x, d, &segs, 0.5, &mut once);
        }
        mirror_upper(&mut once, d);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&each), bits(&once));
        assert!(each.iter().any(|&v| v != 0.0));
    }
}
