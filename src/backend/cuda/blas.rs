//! cuBLAS calls for the dense products the hand-written kernels leave to the vendor
//! library: base-weight GEMMs (bf16 operands, f32 accumulation and output), small f32
//! GEMMs, and the per-head attention products (strided batched).
//!
//! cuBLAS is column-major: a row-major `(rows, cols)` matrix with row stride `ld` is the
//! column-major `(cols, rows)` matrix with leading dimension `ld`, so every row-major
//! product `C = A B` is issued as the column-major `C^T = B^T A^T`.

use std::ffi::c_void;

use cudarc::cublas::result::{gemm_ex, gemm_strided_batched_ex};
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasHandle_t, cublasOperation_t, cudaDataType,
};

use crate::error::{Error, Result};

pub const N: cublasOperation_t = cublasOperation_t::CUBLAS_OP_N;
pub const T: cublasOperation_t = cublasOperation_t::CUBLAS_OP_T;

/// A device matrix operand: pointer, element type, leading dimension (column-major view).
#[derive(Clone, Copy)]
pub struct Operand {
    pub ptr: u64,
    pub ty: cudaDataType,
    pub ld: i32,
}

impl Operand {
    pub fn f32(ptr: u64, ld: usize) -> Self {
        Operand {
            ptr,
            ty: cudaDataType::CUDA_R_32F,
            ld: ld as i32,
        }
    }
    pub fn bf16(ptr: u64, ld: usize) -> Self {
        Operand {
            ptr,
            ty: cudaDataType::CUDA_R_16BF,
            ld: ld as i32,
        }
    }
    /// The same matrix `elems` elements further on.
    pub fn offset(self, elems: usize) -> Self {
        let size = if self.ty == cudaDataType::CUDA_R_16BF {
            2
        } else {
            4
        };
        Operand {
            ptr: self.ptr + (elems * size) as u64,
            ..self
        }
    }
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Cuda(format!("cuBLAS: {e}"))
}

/// Column-major `C (m, n) = alpha op(A) op(B) + beta C`, f32 accumulation, f32 `C`.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    h: cublasHandle_t,
    ta: cublasOperation_t,
    tb: cublasOperation_t,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Operand,
    b: Operand,
    beta: f32,
    c: Operand,
) -> Result<()> {
    // SAFETY: callers pass live device allocations sized for these extents.
    unsafe {
        gemm_ex(
            h,
            ta,
            tb,
            m as i32,
            n as i32,
            k as i32,
            &alpha as *const f32 as *const c_void,
            a.ptr as *const c_void,
            a.ty,
            a.ld,
            b.ptr as *const c_void,
            b.ty,
            b.ld,
            &beta as *const f32 as *const c_void,
            c.ptr as *mut c_void,
            c.ty,
            c.ld,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(err)
}

/// `batch` independent column-major products with fixed element strides between them.
#[allow(clippy::too_many_arguments)]
pub fn gemm_batched(
    h: cublasHandle_t,
    ta: cublasOperation_t,
    tb: cublasOperation_t,
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
    // SAFETY: as `gemm`, for every one of the `batch` strided operands.
    unsafe {
        gemm_strided_batched_ex(
            h,
            ta,
            tb,
            m as i32,
            n as i32,
            k as i32,
            &alpha as *const f32 as *const c_void,
            a.ptr as *const c_void,
            a.ty,
            a.ld,
            stride_a as i64,
            b.ptr as *const c_void,
            b.ty,
            b.ld,
            stride_b as i64,
            &beta as *const f32 as *const c_void,
            c.ptr as *mut c_void,
            c.ty,
            c.ld,
            stride_c as i64,
            batch as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(err)
}
