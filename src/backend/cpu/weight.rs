//! A frozen weight `W (rows, cols)` as the CPU keeps it: row-major as given, or its
//! transpose, whichever the products that read it run faster on.
//!
//! Why: the gemm crate packs its right-hand operand into panels on every call unless that
//! operand is row-major already. `y = x W^T` reads `W^T`, `dx = dy W` reads `W`, so each
//! layout spares one of the two its packing. Measured on SmolLM2's shapes (`cargo bench
//! --bench weight_layout`: 1024 rows, 2 threads, AVX-512; `BENCHMARKS.md`), transposed
//! against as given: down (576 x 1536) forward +21 %, backward +4 %; gate/up (1536 x 576)
//! +5 % and -11 %; q/o (576 x 576) +3 % and -5 %; k/v (192 x 576) +2 % and -23 %; and on
//! Llama-3.2-1B's: k/v (512 x 2048) +37 % and -5 % (13 % less time over both), down
//! (2048 x 8192) +14 % and -11 % (1 % less). So a weight is stored transposed when it has more
//! columns than rows and at least [`TRANSPOSE_MIN_ROWS`] rows: down, of SmolLM2's; k/v and
//! down, of Llama-3.2-1B's. Re-measured since products run as one band of rows per
//! thread (`gemm::gemm_ptr`; same bench, Intel AVX-512), forward + backward, transposed
//! against as given: q/o +2 % time, k/v +2 %, gate/up +1 %, down -4 %, Llama-3.2-1B's k/v
//! -1 % and down +0.3 %: the margins are smaller, and the rule still picks the faster
//! layout or one within 1 %. Above `FEW_ROWS` rows (batched
//! training and evaluation) each output of those products is the same sum in the same
//! order either way (the packing only moves operands), so those results do not depend on
//! the layout. Products of `FEW_ROWS` rows or fewer (decoding, short sequences) take
//! other paths per layout (`gemm::linear_few_rows_t`), which round differently.

use std::borrow::Cow;

use super::gemm::{Mat, transpose};
use super::stored::Compact;

/// Rows below which a wide weight stays as given: the narrowest measured shape that gains
/// (512 rows, Llama-3.2-1B's k/v; the widest that loses has 192, SmolLM2's k/v). Shapes
/// in between (such as SmolLM2-360M's k/v, 320 x 960) are not measured and stay as given.
pub const TRANSPOSE_MIN_ROWS: usize = 512;

/// Whether [`CpuWeight::new`] keeps a `(rows, cols)` weight transposed.
pub fn kept_transposed(rows: usize, cols: usize) -> bool {
    rows < cols && rows >= TRANSPOSE_MIN_ROWS
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `data` is `W`, `(rows, cols)` row-major.
    RowMajor,
    /// `data` is `W^T`, `(cols, rows)` row-major.
    Transposed,
}

pub struct CpuWeight {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
    layout: Layout,
    /// The model file's compact form of the same values, which products of few rows read
    /// instead (`compact`).
    compact: Option<Compact>,
}

impl CpuWeight {
    /// `W (rows, cols)` from its row-major values (`rows * cols` of them, which the caller
    /// has checked), in the layout chosen above.
    pub fn new(w: Vec<f32>, rows: usize, cols: usize) -> Self {
        if kept_transposed(rows, cols) {
            Self::transposed(&w, rows, cols)
        } else {
            Self::row_major(w, rows, cols)
        }
    }

    /// `W` kept as given.
    pub fn row_major(data: Vec<f32>, rows: usize, cols: usize) -> Self {
        CpuWeight {
            data,
            rows,
            cols,
            layout: Layout::RowMajor,
            compact: None,
        }
    }

    /// `W` kept as `W^T`.
    pub fn transposed(w: &[f32], rows: usize, cols: usize) -> Self {
        CpuWeight {
            data: transpose(w, rows, cols),
            rows,
            cols,
            layout: Layout::Transposed,
            compact: None,
        }
    }

    /// This weight with the compact form of its values kept beside them (the caller has
    /// checked its dims).
    pub fn with_compact(self, compact: Compact) -> Self {
        CpuWeight {
            compact: Some(compact),
            ..self
        }
    }

    /// The compact form, if kept.
    pub fn compact(&self) -> Option<&Compact> {
        self.compact.as_ref()
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// `W (rows, cols)` as a view.
    pub fn w(&self) -> Mat<'_> {
        match self.layout {
            Layout::RowMajor => Mat::rows(&self.data, self.cols),
            Layout::Transposed => Mat::rows(&self.data, self.rows).t(),
        }
    }

    /// `W^T (cols, rows)` as a view: the right-hand operand of `y = x W^T`.
    pub fn wt(&self) -> Mat<'_> {
        self.w().t()
    }

    /// `W^T`'s values row-major, when that is how `W` is stored.
    pub fn transposed_values(&self) -> Option<&[f32]> {
        (self.layout == Layout::Transposed).then_some(&self.data)
    }

    /// `W`'s values row-major, for the row gathers of the embedding and the classifier:
    /// borrowed as stored, or transposed back (a table with fewer rows than columns,
    /// which no real vocabulary is, pays a copy per call).
    pub fn row_major_values(&self) -> Cow<'_, [f32]> {
        match self.layout {
            Layout::RowMajor => Cow::Borrowed(&self.data),
            Layout::Transposed => Cow::Owned(transpose(&self.data, self.cols, self.rows)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_layouts_view_the_same_matrix() {
        let (rows, cols) = (3, 5);
        let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        for cw in [
            CpuWeight::row_major(w.clone(), rows, cols),
            CpuWeight::transposed(&w, rows, cols),
        ] {
            let (v, vt) = (cw.w(), cw.wt());
            for i in 0..rows {
                for j in 0..cols {
                    assert_eq!(v.data[i * v.rs + j * v.cs], w[i * cols + j]);
                    assert_eq!(vt.data[j * vt.rs + i * vt.cs], w[i * cols + j]);
                }
            }
            assert_eq!(&*cw.row_major_values(), &w[..]);
        }
        let (r, c) = (TRANSPOSE_MIN_ROWS, TRANSPOSE_MIN_ROWS + 1);
        let wide = vec![0f32; r * c];
        assert!(
            CpuWeight::new(wide.clone(), r, c)
                .transposed_values()
                .is_some()
        );
        assert!(
            CpuWeight::new(wide.clone(), c, r)
                .transposed_values()
                .is_none()
        );
        assert!(CpuWeight::new(w, rows, cols).transposed_values().is_none());
    }

    /// `linear` and `linear_backward` on both layouts of a wide weight: bit for bit above
    /// `FEW_ROWS` rows (the same sums in the same order), within f32 rounding at and below
    /// it, where each layout takes its own few-row path.
    #[test]
    fn layouts_agree_bit_for_bit_above_few_rows() {
        use crate::backend::Backend;
        use crate::backend::cpu::CpuBackend;
        let be = CpuBackend::new(2);
        let (n, k) = (TRANSPOSE_MIN_ROWS, TRANSPOSE_MIN_ROWS + 24);
        let val = |i: usize, s: usize| ((i * s % 1009) as f32 - 504.0) / 700.0;
        let w: Vec<f32> = (0..n * k).map(|i| val(i, 7919)).collect();
        let (rm, tr) = (
            CpuWeight::row_major(w.clone(), n, k),
            CpuWeight::transposed(&w, n, k),
        );
        for m in [1, 8, 9, 64, 65, 200] {
            let x: Vec<f32> = (0..m * k).map(|i| val(i, 104729)).collect();
            let dy: Vec<f32> = (0..m * n).map(|i| val(i, 31337)).collect();
            let fwd = |cw: &CpuWeight| be.linear(&x, cw, m, k, n).unwrap();
            let bwd = |cw: &CpuWeight| {
                let mut dx = vec![0f32; m * k];
                be.linear_backward(&dy, cw, m, k, n, &mut dx, false)
                    .unwrap();
                dx
            };
            for (what, a, b) in [
                ("linear", fwd(&rm), fwd(&tr)),
                ("backward", bwd(&rm), bwd(&tr)),
            ] {
                if m > super::super::FEW_ROWS {
                    assert_eq!(a, b, "{what}, m {m}: layouts differ");
                } else {
                    // Sums of k products of O(1): a few roundings of O(1e-7) each.
                    let err = a
                        .iter()
                        .zip(&b)
                        .map(|(p, q)| (p - q).abs())
                        .fold(0f32, f32::max);
                    assert!(err < 1e-4, "{what}, m {m}: layouts differ by {err}");
                }
            }
        }
    }
}
