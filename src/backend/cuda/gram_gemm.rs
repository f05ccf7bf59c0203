//! Which products form the KFAC Grams of two bf16 operands on CUDA (`Backend::gram_accumulate`
//! where the engine would take its bf16-mma entry, `gram_bf16_128x128_bf16_bf16`):
//! - `hand_written`, the default: the engine's tensor-core kernel (`curvature_tc.cu`), upper
//!   tiles only for a symmetric factor;
//! - `cublas`: bf16 cuBLAS GEMMs over the operands as stored (f32 accumulation, the same
//!   exact products), a symmetric factor as the row panels of its upper triangle.
//!
//! Why both: in the third GPU measurement the kfac pass was 2.79x the step, led by its Grams,
//! and a pass within 1.3x needs them near cuBLAS's own rate (BENCHMARKS.md, sixteenth
//! session). `cublas` is the vendor's rate at the price of some redundant products; the
//! kernel is this project's. `gpu-check.sh --benches` times both (`cuda_kfac_factor_*`,
//! `curvature_kfac_pass@gram-cublas`); the default stays the kernel until a GPU says
//! otherwise. Other operand types (f32 gradients, the skinny 256 x 32 shapes) always take
//! the kernel.

use super::blas::{N, Operand, T};
use super::curvature::Input;
use super::{CudaBackend, DevBuf, env_choice};
use crate::backend::Segment;
use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GramGemm {
    /// The engine's tensor-core Gram kernel.
    #[default]
    HandWritten,
    /// bf16 cuBLAS GEMMs, a symmetric factor's upper triangle in row panels.
    Cublas,
}

/// Rows of a symmetric factor per panel. Each panel `i` is one GEMM of the rows
/// `[i P, (i + 1) P)` against the columns from `i P` on: with P = 2048 an 8192-wide factor
/// is four GEMMs (10 of 16 blocks, 1.25x the triangle's products) whose smallest, 2048 x
/// 2048 over the positions, still has 128 or more of cuBLAS's 128 x 256 tiles, about one
/// per multiprocessor of an H200; narrower panels leave the last GEMMs a fraction of the
/// GPU. A factor at most P wide is one full GEMM (twice the triangle's products).
pub(super) const PANEL: usize = 2048;

impl GramGemm {
    pub const ALL: [Self; 2] = [Self::HandWritten, Self::Cublas];

    pub fn name(self) -> &'static str {
        match self {
            Self::HandWritten => "hand_written",
            Self::Cublas => "cublas",
        }
    }

    pub(super) fn index(self) -> usize {
        env_choice::index(&Self::ALL, self)
    }

    /// What the device line says of it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::HandWritten => "on the engine's tensor-core kernel",
            Self::Cublas => "on bf16 cuBLAS GEMMs (upper row panels)",
        }
    }

    /// The path `LALORA_GRAM_GEMM` names, else the default; another name is a usage error.
    pub fn from_env() -> Result<Self> {
        env_choice::from_env("LALORA_GRAM_GEMM", "a Gram path", &Self::ALL, Self::name)
    }
}

/// `(first row, rows)` of each panel of a symmetric `d`-wide factor.
pub(super) fn panels(d: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..d).step_by(PANEL).map(move |p0| (p0, PANEL.min(d - p0)))
}

impl CudaBackend {
    /// `out (dx, dy) += alpha sum_runs X_run^T Y_run` for bf16 `x (rows, dx)` and
    /// `y (rows, dy)` as stored, on cuBLAS: one GEMM per run of adjacent segments (and per
    /// panel), each adding `alpha` times its run's sum to `out` (f32 accumulation, beta 1).
    /// `symmetric` (`x` is `y`, as the caller found): the panels of the upper triangle only,
    /// as the kernel leaves it (the caller mirrors). The sums run in cuBLAS's order, not the
    /// kernel's; the products are the same exact bf16 x bf16 ones.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gram_cublas_bf16(
        &self,
        x: Input,
        dx: usize,
        y: Input,
        dy: usize,
        symmetric: bool,
        runs: &[Segment],
        alpha: f32,
        out: &mut DevBuf<f32>,
    ) -> Result<()> {
        // Row-major out (dx, dy) is column-major out^T (dy, dx) with leading dimension dy;
        // its block (rows i, columns j) is out^T's (rows j, columns i) = Y_j^T-side times
        // X_i: gemm(N, T) of Y's columns j (column-major (dy, rows)) and X's columns i.
        let xm = |p0: usize, start: usize| x.operand(dx).offset(start * dx + p0);
        let ym = |p0: usize, start: usize| y.operand(dy).offset(start * dy + p0);
        let c = Operand::f32(out.ptr(), dy);
        for run in runs {
            if symmetric {
                // Panel (rows [p0, p0 + w), columns [p0, d)): out^T rows [p0, d), columns
                // [p0, p0 + w), at element p0 + p0 d.
                for (p0, w) in panels(dx) {
                    self.gemm(
                        N,
                        T,
                        dx - p0,
                        w,
                        run.len,
                        alpha,
                        ym(p0, run.start),
                        xm(p0, run.start),
                        1.0,
                        c.offset(p0 + p0 * dx),
                    )?;
                }
            } else {
                self.gemm(
                    N,
                    T,
                    dy,
                    dx,
                    run.len,
                    alpha,
                    ym(0, run.start),
                    xm(0, run.start),
                    1.0,
                    c,
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panels_cover_the_factor_once() {
        for d in [1, 576, 2048, 2049, 8192, 10000] {
            let p: Vec<_> = panels(d).collect();
            assert_eq!(p.first().map(|p| p.0), Some(0));
            assert_eq!(p.iter().map(|p| p.1).sum::<usize>(), d, "d = {d}");
            assert!(p.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
            assert_eq!(p.len(), d.div_ceil(PANEL));
        }
    }
}
