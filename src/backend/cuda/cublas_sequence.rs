//! The projection groups as the plain cuBLAS sequence (`ProjectionGemm::Cublas`, the
//! default path: the fastest measured, BENCHMARKS.md): per projection the base GEMM on
//! cuBLAS (`linear`), then the LoRA products `u = x A^T` and `y += s u B^T` as f32 cuBLAS
//! GEMMs, and the backward likewise; outputs stored as the grouped kernel stores them.
//! The per-projection LoRA products are also the benches' baseline for the per-row
//! kernels of `linear.rs`.

use super::blas::{N, Operand, T};
use super::lora_gemm::{check_backward, check_forward};
use super::runtime::DType;
use super::{Act, CudaBackend, DevBuf};
use crate::backend::LoraDims;
use crate::backend::group::{self, Feeds, LoraGroup, ProjBwd, ProjFwd, Projected};
use crate::error::Result;

/// The cuBLAS sequence's name in shape errors.
const OP: &str = "cuBLAS sequence";

impl CudaBackend {
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
        let u = self.lora_u_f32(&x, a.f32()?, d)?;
        self.lora_update_f32(&u, b.f32()?, d, y.f32_mut()?)?;
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
        let ga = self.lora_ga_f32(&g, b.f32()?, d)?;
        self.gemm(
            N,
            N,
            d.d_in,
            d.m,
            d.r,
            1.0,
            Operand::f32(a.f32()?.ptr(), d.d_in),
            Operand::f32(ga.ptr(), d.r),
            1.0,
            Operand::f32(dx.f32_mut()?.ptr(), d.d_in),
        )?;
        if let Some((da, db)) = grads {
            self.lora_da_f32(&x, &ga, d, da.f32_mut()?)?;
            self.lora_db_f32(&g, u.f32()?, d, db.f32_mut()?)?;
        }
        Ok(ga.into())
    }

    /// `u (m, r) = x A^T` in f32 (the plain sequence's, and the folded path's on an f32 `x`).
    pub(super) fn lora_u_f32(
        &self,
        x: &DevBuf<f32>,
        a: &DevBuf<f32>,
        d: LoraDims,
    ) -> Result<DevBuf<f32>> {
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
        Ok(u)
    }

    /// `y (m, d_out) += s u B^T` in f32.
    pub(super) fn lora_update_f32(
        &self,
        u: &DevBuf<f32>,
        b: &DevBuf<f32>,
        d: LoraDims,
        y: &DevBuf<f32>,
    ) -> Result<()> {
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
        )
    }

    /// `gA (m, r) = s g B` in f32.
    pub(super) fn lora_ga_f32(
        &self,
        g: &DevBuf<f32>,
        b: &DevBuf<f32>,
        d: LoraDims,
    ) -> Result<DevBuf<f32>> {
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
        Ok(ga)
    }

    /// `dA (r, d_in) += gA^T x` in f32.
    pub(super) fn lora_da_f32(
        &self,
        x: &DevBuf<f32>,
        ga: &DevBuf<f32>,
        d: LoraDims,
        da: &DevBuf<f32>,
    ) -> Result<()> {
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
        )
    }

    /// `dB (d_out, r) += s g^T u` in f32.
    pub(super) fn lora_db_f32(
        &self,
        g: &DevBuf<f32>,
        u: &DevBuf<f32>,
        d: LoraDims,
        db: &DevBuf<f32>,
    ) -> Result<()> {
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
        )
    }

    /// A bf16 `x` widened to f32 once for a whole group's LoRA products (each would widen
    /// it again), when `needed`; `None` where `x` is f32 already or nothing needs it.
    fn widened_once(&self, x: &Act, needed: bool) -> Result<Option<Act>> {
        Ok(match x {
            Act::Bf16(b) if needed => Some(self.widened(b.ptr(), b.len())?.into()),
            _ => None,
        })
    }

    /// Where cuBLAS, which adds into f32 only, sums into `dx`: `None` for an f32 `dx` (into
    /// it), else an f32 copy of the bf16 one, widened from it when `accumulate` (its values
    /// are added to), left unwritten otherwise (the first product writes it whole). The
    /// caller rounds the copy back once.
    pub(super) fn f32_sums(&self, dx: &Act, accumulate: bool) -> Result<Option<Act>> {
        Ok(match dx {
            Act::F32(_) => None,
            Act::Bf16(b) if accumulate => Some(self.widened(b.ptr(), b.len())?.into()),
            Act::Bf16(b) => Some(self.uninit::<f32>(b.len())?.into()),
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
        check_forward(OP, x, m, d_in, l, projs)?;
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
        check_backward(OP, (x, dx), m, d_in, l, &projs)?;
        if projs.is_empty() {
            // Nothing to add, and a fresh bf16 dx is left as it is, as the fused path leaves it.
            return Ok(Vec::new());
        }
        // x is read only for the LoRA weight gradients dA.
        let grads = projs
            .iter()
            .any(|p| p.lora.as_ref().is_some_and(|l| l.grads.is_some()));
        let wide_x = self.widened_once(x, grads)?;
        let mut wide = self.f32_sums(dx, accumulate)?;
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
}
