//! The plain cuBLAS sequences the fused kernels are benchmarked against (benches/cuda.rs);
//! the model never uses them.

use cudarc::driver::CudaSlice;

use super::blas::{N, Operand, T, gemm};
use super::{CudaBackend, cu};
use crate::backend::{LoraDims, Segment};
use crate::error::Result;

impl CudaBackend {
    /// Wait for all queued work (for timing).
    pub fn synchronize(&self) -> Result<()> {
        cu(self.stream.synchronize())
    }

    /// `u = x A^T`, `y += s u B^T` as two cuBLAS GEMMs (u round-trips through memory).
    pub fn lora_forward_unfused(
        &self,
        x: &CudaSlice<f32>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        d: LoraDims,
        y: &mut CudaSlice<f32>,
    ) -> Result<CudaSlice<f32>> {
        let u = self.alloc(d.m * d.r)?;
        gemm(
            self.h(),
            T,
            N,
            d.r,
            d.m,
            d.d_in,
            1.0,
            Operand::f32(self.ptr(a), d.d_in),
            Operand::f32(self.ptr(x), d.d_in),
            0.0,
            Operand::f32(self.ptr(&u), d.r),
        )?;
        gemm(
            self.h(),
            T,
            N,
            d.d_out,
            d.m,
            d.r,
            d.scale,
            Operand::f32(self.ptr(b), d.r),
            Operand::f32(self.ptr(&u), d.r),
            1.0,
            Operand::f32(self.ptr(y), d.d_out),
        )?;
        Ok(u)
    }

    /// LoRA backward as four cuBLAS GEMMs: gA = s g B, dx += gA A, dA += gA^T x,
    /// dB += s g^T u.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_backward_unfused(
        &self,
        g: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        d: LoraDims,
        dx: &mut CudaSlice<f32>,
        da: &mut CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
    ) -> Result<CudaSlice<f32>> {
        let ga = self.alloc(d.m * d.r)?;
        let h = self.h();
        gemm(
            h,
            N,
            N,
            d.r,
            d.m,
            d.d_out,
            d.scale,
            Operand::f32(self.ptr(b), d.r),
            Operand::f32(self.ptr(g), d.d_out),
            0.0,
            Operand::f32(self.ptr(&ga), d.r),
        )?;
        gemm(
            h,
            N,
            N,
            d.d_in,
            d.m,
            d.r,
            1.0,
            Operand::f32(self.ptr(a), d.d_in),
            Operand::f32(self.ptr(&ga), d.r),
            1.0,
            Operand::f32(self.ptr(dx), d.d_in),
        )?;
        gemm(
            h,
            N,
            T,
            d.d_in,
            d.r,
            d.m,
            1.0,
            Operand::f32(self.ptr(x), d.d_in),
            Operand::f32(self.ptr(&ga), d.r),
            1.0,
            Operand::f32(self.ptr(da), d.d_in),
        )?;
        gemm(
            h,
            N,
            T,
            d.r,
            d.d_out,
            d.m,
            d.scale,
            Operand::f32(self.ptr(u), d.r),
            Operand::f32(self.ptr(g), d.d_out),
            1.0,
            Operand::f32(self.ptr(db), d.r),
        )?;
        Ok(ga)
    }

    /// The diagonal Fisher by materialising each sequence's gradient block `G_n^T Y_n`
    /// (cuBLAS) and squaring it, instead of forming it in registers.
    #[allow(clippy::too_many_arguments)]
    pub fn sq_grad_materialized(
        &self,
        g: &CudaSlice<f32>,
        dg: usize,
        y: &CudaSlice<f32>,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let per_seq = self.alloc(segments.len() * dg * dy)?;
        for (i, s) in segments.iter().enumerate() {
            // row-major tmp (dg, dy) = G^T Y  <=>  column-major tmp^T (dy, dg) = Y^T G
            gemm(
                self.h(),
                N,
                T,
                dy,
                dg,
                s.len,
                1.0,
                Operand::f32(self.ptr(y), dy).offset(s.start * dy),
                Operand::f32(self.ptr(g), dg).offset(s.start * dg),
                0.0,
                Operand::f32(self.ptr(&per_seq), dy).offset(i * dg * dy),
            )?;
        }
        for i in 0..segments.len() {
            let n = dg * dy;
            let src = self.ptr(&per_seq) + (i * n * 4) as u64;
            self.launch(
                "sq_accumulate",
                Self::elementwise(n),
                &[&src, &self.ptr(out), &alpha, &(n as u64)],
            )?;
        }
        Ok(())
    }

    /// KFAC factor accumulation `out += alpha X^T Y` as one cuBLAS GEMM.
    #[allow(clippy::too_many_arguments)]
    pub fn gram_cublas(
        &self,
        x: &CudaSlice<f32>,
        dx: usize,
        y: &CudaSlice<f32>,
        dy: usize,
        rows: usize,
        alpha: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        // row-major out (dx, dy) = X^T Y  <=>  column-major out^T (dy, dx) = Y^T X
        gemm(
            self.h(),
            N,
            T,
            dy,
            dx,
            rows,
            alpha,
            Operand::f32(self.ptr(y), dy),
            Operand::f32(self.ptr(x), dx),
            1.0,
            Operand::f32(self.ptr(out), dy),
        )
    }
}
