//! cuBLAS-style GEMMs for the dense products the hand-written kernels leave to the vendor
//! library: base-weight GEMMs (bf16 or f32 operands, f32 accumulation; an f32 output, or a
//! bf16 one from bf16 operands, as the folded projection path writes), small f32 GEMMs,
//! and the per-head attention products (strided batched). They run on cuBLAS
//! on a GPU and on its twin in the simulator.
//!
//! cuBLAS is column-major: a row-major `(rows, cols)` matrix with row stride `ld` is the
//! column-major `(cols, rows)` matrix with leading dimension `ld`, so every row-major
//! product `C = A B` is issued as the column-major `C^T = B^T A^T`.

use super::CudaBackend;
use super::runtime::{DType, Gemm, Mat};
use crate::error::Result;

use super::runtime::Trans;
pub use super::runtime::Trans::{N, T};

/// A device matrix operand: pointer, element type, leading dimension (column-major view).
#[derive(Clone, Copy)]
pub struct Operand {
    pub ptr: u64,
    pub ty: DType,
    pub ld: usize,
}

impl Operand {
    pub fn f32(ptr: u64, ld: usize) -> Self {
        Operand {
            ptr,
            ty: DType::F32,
            ld,
        }
    }
    pub fn typed(ptr: u64, ty: DType, ld: usize) -> Self {
        Operand { ptr, ty, ld }
    }
    /// The same matrix `elems` elements further on.
    pub fn offset(self, elems: usize) -> Self {
        let size = if self.ty == DType::Bf16 { 2 } else { 4 };
        Operand {
            ptr: self.ptr + (elems * size) as u64,
            ..self
        }
    }
    fn mat(self, stride: usize) -> Mat {
        Mat {
            ptr: self.ptr,
            ty: self.ty,
            ld: self.ld as i64,
            stride: stride as i64,
        }
    }
}

impl CudaBackend {
    /// Column-major `C (m, n) = alpha op(A) op(B) + beta C`, f32 accumulation; `C` f32, or
    /// bf16 for bf16 `A` and `B` (the sum formed in f32, rounded once).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        &self,
        ta: Trans,
        tb: Trans,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: Operand,
        b: Operand,
        beta: f32,
        c: Operand,
    ) -> Result<()> {
        self.gemm_batched(ta, tb, m, n, k, alpha, (a, 0), (b, 0), beta, (c, 0), 1)
    }

    /// `batch` independent column-major products with fixed element strides between them.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_batched(
        &self,
        ta: Trans,
        tb: Trans,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        (a, stride_a): (Operand, usize),
        (b, stride_b): (Operand, usize),
        beta: f32,
        (c, stride_c): (Operand, usize),
        batch: usize,
    ) -> Result<()> {
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        self.rt.gemm(&Gemm {
            ta,
            tb,
            m: m as i64,
            n: n as i64,
            k: k as i64,
            alpha,
            a: a.mat(stride_a),
            b: b.mat(stride_b),
            beta,
            c: c.mat(stride_c),
            batch: batch as i64,
        })
    }
}
