//! The materialised cuBLAS products and the SIMT kernels that the tensor-core curvature
//! kernels are benchmarked against (benches/cuda.rs); the model never runs them. (The
//! projection groups' cuBLAS sequence, which the model runs, is `cublas_sequence.rs`.)

use super::blas::{N, Operand, T};
use super::runtime::{Arg, LaunchConfig};
use super::{Act, CudaBackend, MAX_RANK, THREADS};
use crate::backend::Segment;
use crate::error::{Error, Result};

impl CudaBackend {
    /// Wait for all queued work (for timing).
    pub fn synchronize(&self) -> Result<()> {
        self.rt.synchronize()
    }

    /// The diagonal Fisher by materialising each sequence's gradient block `G_n^T Y_n`
    /// (cuBLAS) and squaring it, instead of forming it in registers.
    #[allow(clippy::too_many_arguments)]
    pub fn sq_grad_materialized(
        &self,
        g: &Act,
        dg: usize,
        y: &Act,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut Act,
    ) -> Result<()> {
        let (g, y, out) = (g.f32()?, y.f32()?, out.f32_mut()?);
        let per_seq = self.uninit::<f32>(segments.len() * dg * dy)?;
        for (i, s) in segments.iter().enumerate() {
            // row-major tmp (dg, dy) = G^T Y  <=>  column-major tmp^T (dy, dg) = Y^T G
            self.gemm(
                N,
                T,
                dy,
                dg,
                s.len,
                1.0,
                Operand::f32(y.ptr(), dy).offset(s.start * dy),
                Operand::f32(g.ptr(), dg).offset(s.start * dg),
                0.0,
                Operand::f32(per_seq.ptr(), dy).offset(i * dg * dy),
            )?;
        }
        for i in 0..segments.len() {
            let n = dg * dy;
            let src = per_seq.ptr() + (i * n * 4) as u64;
            self.launch(
                "sq_accumulate",
                Self::packed(n, 4),
                &[
                    Arg::U64(src),
                    Arg::U64(out.ptr()),
                    Arg::F32(alpha),
                    Arg::U64(n as u64),
                ],
            )?;
        }
        Ok(())
    }

    /// KFAC factor accumulation `out += alpha X^T Y` as one cuBLAS GEMM.
    #[allow(clippy::too_many_arguments)]
    pub fn gram_cublas(
        &self,
        x: &Act,
        dx: usize,
        y: &Act,
        dy: usize,
        rows: usize,
        alpha: f32,
        out: &mut Act,
    ) -> Result<()> {
        let (x, y, out) = (x.f32()?, y.f32()?, out.f32_mut()?);
        // row-major out (dx, dy) = X^T Y  <=>  column-major out^T (dy, dx) = Y^T X
        self.gemm(
            N,
            T,
            dy,
            dx,
            rows,
            alpha,
            Operand::f32(y.ptr(), dy),
            Operand::f32(x.ptr(), dx),
            1.0,
            Operand::f32(out.ptr(), dy),
        )
    }

    /// `out += alpha * sum_seg X_seg^T Y_seg` with the SIMT FP32 kernel (`gram_simt`: 64 x 64
    /// output tiles, 4 x 4 per thread, one launch per run of adjacent segments; upper
    /// tiles then a mirror when `x` is `y`): what `gram_accumulate` does on tensor cores.
    #[allow(clippy::too_many_arguments)]
    pub fn gram_simt(
        &self,
        x: &Act,
        dx: usize,
        y: &Act,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut Act,
    ) -> Result<()> {
        let (x, y, out) = (x.f32()?, y.f32()?, out.f32_mut()?);
        let symmetric = x.ptr() == y.ptr() && dx == dy;
        let mut merged: Vec<Segment> = Vec::new();
        for s in segments.iter().filter(|s| s.len > 0) {
            match merged.last_mut() {
                Some(l) if l.start + l.len == s.start => l.len += s.len,
                _ => merged.push(*s),
            }
        }
        let cfg = LaunchConfig {
            grid: [dy.div_ceil(64) as u32, dx.div_ceil(64) as u32, 1],
            block: [THREADS, 1, 1],
            shared_bytes: 0,
        };
        for s in merged {
            let args = [
                Arg::U64(x.ptr()),
                Arg::U64(y.ptr()),
                Arg::U64(out.ptr()),
                Arg::I32(s.start as i32),
                Arg::I32(s.len as i32),
                Arg::I32(dx as i32),
                Arg::I32(dy as i32),
                Arg::F32(alpha),
                Arg::I32(symmetric as i32),
            ];
            self.launch("gram_simt", cfg, &args)?;
        }
        if symmetric {
            self.mirror_upper_impl(out, dx)?;
        }
        Ok(())
    }

    /// Per-sample squaring with the SIMT kernel (`sq_grad_simt`: one thread per wide
    /// column, r accumulators in registers, sequences in order): what
    /// `sq_grad_accumulate` does on tensor cores.
    #[allow(clippy::too_many_arguments)]
    pub fn sq_grad_simt(
        &self,
        g: &Act,
        dg: usize,
        y: &Act,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut Act,
    ) -> Result<()> {
        let (g, y, out) = (g.f32()?, y.f32()?, out.f32_mut()?);
        // The rank-sized side stays in registers; the other side gets one thread per column.
        let (narrow, wide, r, wide_dim, narrow_first) = if dg <= MAX_RANK && dg <= dy {
            (g, y, dg, dy, 1i32)
        } else if dy <= MAX_RANK {
            (y, g, dy, dg, 0i32)
        } else {
            return Err(Error::Device(format!(
                "per-sample squaring needs one side <= {MAX_RANK} (got {dg} x {dy})"
            )));
        };
        let (st, ln) = self.segments(segments)?;
        let cfg = LaunchConfig {
            grid: [wide_dim.div_ceil(THREADS as usize) as u32, 1, 1],
            block: [THREADS, 1, 1],
            shared_bytes: 0,
        };
        let args = [
            Arg::U64(narrow.ptr()),
            Arg::U64(wide.ptr()),
            Arg::U64(st.ptr()),
            Arg::U64(ln.ptr()),
            Arg::I32(segments.len() as i32),
            Arg::I32(r as i32),
            Arg::I32(wide_dim as i32),
            Arg::F32(alpha),
            Arg::I32(narrow_first),
            Arg::U64(out.ptr()),
        ];
        self.launch("sq_grad_simt", cfg, &args)
    }
}
