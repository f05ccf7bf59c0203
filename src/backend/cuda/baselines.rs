//! The plain cuBLAS sequences and the SIMT kernels that the fused and tensor-core kernels
//! are benchmarked against (benches/cuda.rs). The model runs the projection groups' cuBLAS
//! sequence when asked (`ProjectionGemm::Cublas`), and none of the rest.

use super::blas::{N, Operand, T};
use super::lora_gemm::{check_len, weight_elems};
use super::runtime::{Arg, DType, LaunchConfig};
use super::{Act, CudaBackend, MAX_RANK, THREADS};
use crate::backend::group::{self, Feeds, LoraGroup, ProjBwd, ProjFwd, Projected};
use crate::backend::{LoraDims, Segment};
use crate::error::{Error, Result};

/// The cuBLAS sequence's name in shape errors.
const OP: &str = "cuBLAS sequence";

impl CudaBackend {
    /// Wait for all queued work (for timing).
    pub fn synchronize(&self) -> Result<()> {
        self.rt.synchronize()
    }

    /// `u = x A^T`, `y += s u B^T` as two cuBLAS GEMMs (u round-trips through memory). A
    /// bf16 `x` is widened to f32 first (cuBLAS multiplies like types; the LoRA weights are
    /// f32).
    pub fn lora_forward_unfused(
        &self,
        x: &Act,
        a: &Act,
        b: &Act,
        d: LoraDims,
        y: &mut Act,
    ) -> Result<Act> {
        let x = self.wide(x)?;
        let (a, b, y) = (a.f32()?, b.f32()?, y.f32_mut()?);
        let u = self.uninit::<f32>(d.m * d.r)?;
        self.gemm(
            T,
            N,
            d.r,
            d.m,
            d.d_in,
            1.0,
            Operand::f32(a.ptr(), d.d_in),
            Operand::f32(x.ptr(), d.d_in),
            0.0,
            Operand::f32(u.ptr(), d.r),
        )?;
        self.gemm(
            T,
            N,
            d.d_out,
            d.m,
            d.r,
            d.scale,
            Operand::f32(b.ptr(), d.r),
            Operand::f32(u.ptr(), d.r),
            1.0,
            Operand::f32(y.ptr(), d.d_out),
        )?;
        Ok(u.into())
    }

    /// LoRA backward as cuBLAS GEMMs: gA = s g B, dx += gA A and, when `grads` is given,
    /// dA += gA^T x, dB += s g^T u (bf16 `g` and `x` widened to f32 first).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_backward_unfused(
        &self,
        g: &Act,
        x: &Act,
        u: &Act,
        a: &Act,
        b: &Act,
        d: LoraDims,
        dx: &mut Act,
        grads: Option<(&mut Act, &mut Act)>,
    ) -> Result<Act> {
        let (g, x) = (self.wide(g)?, self.wide(x)?);
        let (u, a, b) = (u.f32()?, a.f32()?, b.f32()?);
        let dx = dx.f32_mut()?;
        let ga = self.uninit::<f32>(d.m * d.r)?;
        self.gemm(
            N,
            N,
            d.r,
            d.m,
            d.d_out,
            d.scale,
            Operand::f32(b.ptr(), d.r),
            Operand::f32(g.ptr(), d.d_out),
            0.0,
            Operand::f32(ga.ptr(), d.r),
        )?;
        self.gemm(
            N,
            N,
            d.d_in,
            d.m,
            d.r,
            1.0,
            Operand::f32(a.ptr(), d.d_in),
            Operand::f32(ga.ptr(), d.r),
            1.0,
            Operand::f32(dx.ptr(), d.d_in),
        )?;
        let Some((da, db)) = grads else {
            return Ok(ga.into());
        };
        let (da, db) = (da.f32_mut()?, db.f32_mut()?);
        self.gemm(
            N,
            T,
            d.d_in,
            d.r,
            d.m,
            1.0,
            Operand::f32(x.ptr(), d.d_in),
            Operand::f32(ga.ptr(), d.r),
            1.0,
            Operand::f32(da.ptr(), d.d_in),
        )?;
        self.gemm(
            N,
            T,
            d.r,
            d.d_out,
            d.m,
            d.scale,
            Operand::f32(u.ptr(), d.r),
            Operand::f32(g.ptr(), d.d_out),
            1.0,
            Operand::f32(db.ptr(), d.r),
        )?;
        Ok(ga.into())
    }

    /// A bf16 `x` widened to f32 once for a whole group's LoRA products (each would widen
    /// it again), when `needed`; `None` where `x` is f32 already or nothing needs it.
    fn widened_once(&self, x: &Act, needed: bool) -> Result<Option<Act>> {
        Ok(match x {
            Act::Bf16(b) if needed => Some(self.widened(b.ptr(), b.len())?.into()),
            _ => None,
        })
    }

    /// `Backend::project_group` as the plain cuBLAS sequence LoRA inside the GEMMs
    /// replaces: per projection the base GEMM (`linear`: bf16 operands with bf16 base
    /// weights, f32 sums), then `u = x A^T` and `y += s u B^T` as two more f32 GEMMs, then
    /// RoPE where asked (a bf16 `x` widened once for the group's LoRA products). Each `y`
    /// is stored in the fused path's type: bf16 where it feeds kernels with bf16 base
    /// weights (`Feeds::Kernels`), rounded once after RoPE (as the fused epilogue rounds
    /// at head dims 16, 32 and 64; at others the fused path rounds before RoPE and again
    /// after it); f32 otherwise.
    pub(super) fn project_group_cublas(
        &self,
        x: &Act,
        m: usize,
        d_in: usize,
        l: LoraGroup,
        projs: &[ProjFwd<'_, Self>],
    ) -> Result<Vec<Projected<Act>>> {
        check_len(OP, "x", x.len(), m * d_in)?;
        for p in projs {
            check_len(OP, "W", weight_elems(p.w), p.d_out * d_in)?;
            if let Some((a, b)) = p.lora {
                check_len(OP, "A", a.len(), l.r * d_in)?;
                check_len(OP, "B", b.len(), p.d_out * l.r)?;
            }
            if let Some(r) = p.rope {
                check_len(OP, "rotated output", p.d_out, r.n_heads * r.head_dim)?;
            }
        }
        let adapted = projs.iter().any(|p| p.lora.is_some());
        let wide = self.widened_once(x, adapted)?;
        let out = group::unfused_forward(self, x, m, d_in, l, projs, |x, a, b, d, y| {
            self.lora_forward_unfused(wide.as_ref().unwrap_or(x), a, b, d, y)
        })?;
        let bf16_feeds = self.act_dtype() == DType::Bf16;
        out.into_iter()
            .zip(projs)
            .map(|((y, u), p)| {
                let y = if bf16_feeds && p.feeds == Feeds::Kernels {
                    Act::Bf16(self.to_bf16(y.f32()?)?)
                } else {
                    y
                };
                Ok((y, u))
            })
            .collect()
    }

    /// `Backend::project_group_backward` as the plain cuBLAS sequence: per projection
    /// `linear_backward`, then `lora_backward_unfused`. cuBLAS adds into f32, so a bf16 `dx`
    /// (o_proj's, which flash attention reads) is summed in an f32 copy (widened from it
    /// when adding to it) and rounded back once, as the fused path's epilogue rounds.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn project_group_backward_cublas(
        &self,
        x: &Act,
        m: usize,
        d_in: usize,
        l: LoraGroup,
        projs: Vec<ProjBwd<'_, Self>>,
        dx: &mut Act,
        accumulate: bool,
    ) -> Result<Vec<Option<Act>>> {
        check_len(OP, "x", x.len(), m * d_in)?;
        check_len(OP, "dx", dx.len(), m * d_in)?;
        for p in &projs {
            check_len(OP, "W", weight_elems(p.w), p.d_out * d_in)?;
            check_len(OP, "g", p.g.len(), m * p.d_out)?;
            if let Some(lb) = &p.lora {
                check_len(OP, "A", lb.a.len(), l.r * d_in)?;
                check_len(OP, "B", lb.b.len(), p.d_out * l.r)?;
                check_len(OP, "u", lb.u.len(), m * l.r)?;
            }
        }
        if projs.is_empty() {
            // Nothing to add, and a fresh bf16 dx is left as it is, as the fused path leaves it.
            return Ok(Vec::new());
        }
        // x is read only for the LoRA weight gradients dA.
        let grads = projs
            .iter()
            .any(|p| p.lora.as_ref().is_some_and(|l| l.grads.is_some()));
        let wide_x = self.widened_once(x, grads)?;
        let mut wide: Option<Act> = match &*dx {
            Act::F32(_) => None,
            Act::Bf16(b) if accumulate => Some(self.widened(b.ptr(), b.len())?.into()),
            Act::Bf16(b) => Some(self.uninit::<f32>(b.len())?.into()),
        };
        let sums: &mut Act = match wide.as_mut() {
            Some(w) => w,
            None => &mut *dx,
        };
        let out = group::unfused_backward(
            self,
            x,
            m,
            d_in,
            l,
            projs,
            sums,
            accumulate,
            |g, x, u, a, b, d, dx, grads| {
                let x = wide_x.as_ref().unwrap_or(x);
                self.lora_backward_unfused(g, x, u, a, b, d, dx, grads)
            },
        )?;
        if let (Some(w), Act::Bf16(b)) = (&wide, &*dx) {
            self.round_into(w.f32()?, b)?;
        }
        Ok(out)
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
            self.mirror_upper(out, dx)?;
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
