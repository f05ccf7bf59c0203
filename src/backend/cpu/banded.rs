//! A projection group's forward in bands of rows, one task per band: each task takes its
//! rows' `u = x A^T` for every adapted projection at once, then for each projection the
//! base product, the low-rank update `y += s u B^T` and RoPE, while the band's `x` and
//! `y` are still in its core's cache.
//!
//! Why: done op by op over all rows (the base products, then `lowrank::group_forward`,
//! then RoPE), each pass after the first reads megabytes of `x` or `y` back from memory.
//! Every output is the same sum as op by op, bit for bit (tested): the gemm crate's sums
//! are the same over such bands as over all rows (`gemm::row_bands`), and the low-rank
//! kernels and RoPE compute each row alone, with bands starting on their row groups.

use rayon::prelude::*;

use super::CpuBackend;
use super::gemm::{Mat, Out, gemm_ptr, transpose};
use super::lowrank::{add_product_rows, project_rows};
use super::ops::rope_rows;
use crate::backend::group::{LoraGroup, ProjFwd, Projected};

/// `project_group`'s forward over `bands` of rows, `(first, rows)`, as
/// `gemm::row_bands` makes them.
pub fn group_forward(
    x: &[f32],
    m: usize,
    d_in: usize,
    lora: LoraGroup,
    projs: &[ProjFwd<'_, CpuBackend>],
    bands: &[(usize, usize)],
) -> Vec<Projected<Vec<f32>>> {
    let r = lora.r;
    // The adapted projections' A stacked `(wide, d_in)`, and each one's `B^T (r, d_out)`.
    let stacked: Vec<f32> = projs
        .iter()
        .filter_map(|p| p.lora)
        .flat_map(|(a, _)| a[..r * d_in].iter().copied())
        .collect();
    let wide = stacked.len() / d_in.max(1);
    let bts: Vec<Option<Vec<f32>>> = projs
        .iter()
        .map(|p| p.lora.map(|(_, b)| transpose(b, p.d_out, r)))
        .collect();
    let mut ys: Vec<Vec<f32>> = projs
        .iter()
        .map(|p| Vec::with_capacity(m * p.d_out))
        .collect();
    let mut us: Vec<Option<Vec<f32>>> = projs
        .iter()
        .map(|p| p.lora.map(|_| Vec::with_capacity(m * r)))
        .collect();
    let y_out: Vec<Out> = ys.iter_mut().map(|y| Out(y.as_mut_ptr())).collect();
    let u_out: Vec<Option<Out>> = us
        .iter_mut()
        .map(|u| u.as_mut().map(|u| Out(u.as_mut_ptr())))
        .collect();
    bands.par_iter().for_each(|&(r0, rows)| {
        let xb = &x[r0 * d_in..(r0 + rows) * d_in];
        let mut ub = vec![0f32; rows * wide];
        if wide > 0 {
            project_rows(&mut ub, xb, &stacked, d_in, 1.0);
        }
        let mut q = 0;
        for (p, ((yo, uo), bt)) in projs.iter().zip(y_out.iter().zip(&u_out).zip(&bts)) {
            let n = p.d_out;
            // SAFETY: this band's rows of `y` are this task's alone; the product writes all
            // of them (no `accumulate`), so the slice formed after is initialised.
            let y = unsafe {
                let at = yo.at(r0 * n);
                gemm_ptr(
                    rows,
                    n,
                    d_in,
                    at,
                    n,
                    false,
                    Mat::rows(xb, d_in),
                    p.w.wt(),
                    1.0,
                    false,
                );
                std::slice::from_raw_parts_mut(at, rows * n)
            };
            if let (Some(uo), Some(bt)) = (uo, bt) {
                // SAFETY: as for `y`: this band's rows of `u`, each written here.
                let u = unsafe {
                    let at = uo.at(r0 * r);
                    for (row, src) in ub.chunks_exact(wide.max(1)).enumerate() {
                        std::ptr::copy_nonoverlapping(src[q * r..].as_ptr(), at.add(row * r), r);
                    }
                    std::slice::from_raw_parts(at, rows * r)
                };
                add_product_rows(y, n, u, bt, lora.scale);
                q += 1;
            }
            if let Some(ro) = &p.rope {
                let t = ro.table;
                rope_rows(
                    y,
                    &t.cos,
                    &t.sin,
                    t.period,
                    ro.n_heads,
                    ro.head_dim,
                    false,
                    r0,
                );
            }
        }
    });
    ys.iter_mut()
        .zip(projs)
        // SAFETY: the bands cover every row; each wrote its rows of every `y` (above).
        .for_each(|(y, p)| unsafe { y.set_len(m * p.d_out) });
    for u in us.iter_mut().flatten() {
        // SAFETY: likewise for every adapted projection's `u`.
        unsafe { u.set_len(m * r) };
    }
    ys.into_iter().zip(us).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::RopeTable;
    use crate::backend::cpu::weight::CpuWeight;
    use crate::backend::group::{Feeds, RopeOut};

    fn vals(n: usize, s: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * s % 1009) as f32 - 504.0) / 700.0)
            .collect()
    }

    /// Bands of 100 and 100 rows (two threads'), of 68 and 132, and one of all 200 rows
    /// give the op-by-op group's outputs bit for bit (bands of 64 and a last of 8 did not:
    /// the crate's small-product path took the 8): an adapted projection with RoPE, one
    /// without an adapter, and an adapted one 24 wide (not a multiple of 16 lanes).
    #[test]
    fn bands_compute_what_the_ops_do_bit_for_bit() {
        let be = CpuBackend::new(0);
        let (m, d_in, r) = (200, 40, 3);
        let (heads, hd, period) = (2, 8, 50);
        let x = vals(m * d_in, 7919);
        let w = |n: usize, s: usize| CpuWeight::new(vals(n * d_in, s), n, d_in);
        let (wq, wk, wv) = (w(16, 31), w(8, 37), w(24, 41));
        let (aq, bq) = (vals(r * d_in, 43), vals(16 * r, 47));
        let (av, bv) = (vals(r * d_in, 53), vals(24 * r, 59));
        let table = RopeTable {
            cos: vals(period * hd / 2, 61),
            sin: vals(period * hd / 2, 67),
            period,
        };
        let projs = [
            ProjFwd {
                w: &wq,
                d_out: 16,
                lora: Some((&aq, &bq)),
                feeds: Feeds::Kernels,
                rope: Some(RopeOut {
                    table: &table,
                    n_heads: heads,
                    head_dim: hd,
                }),
            },
            ProjFwd {
                w: &wk,
                d_out: 8,
                lora: None,
                feeds: Feeds::Kernels,
                rope: None,
            },
            ProjFwd {
                w: &wv,
                d_out: 24,
                lora: Some((&av, &bv)),
                feeds: Feeds::Kernels,
                rope: None,
            },
        ];
        let lora = LoraGroup { r, scale: 1.75 };
        let want = be.project_group_by_op(&x, m, d_in, lora, &projs).unwrap();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let two = crate::backend::cpu::gemm::row_bands(m, 16, 2).unwrap();
        assert_eq!(two, [(0, 100), (100, 100)]);
        for bands in [two, vec![(0, 68), (68, 132)], vec![(0, 200)]] {
            let got = group_forward(&x, m, d_in, lora, &projs, &bands);
            for (i, ((gy, gu), (wy, wu))) in got.iter().zip(&want).enumerate() {
                assert_eq!(bits(gy), bits(wy), "y of projection {i}, bands {bands:?}");
                assert_eq!(
                    gu.as_deref().map(bits),
                    wu.as_deref().map(bits),
                    "u of projection {i}, bands {bands:?}"
                );
            }
        }
    }
}
