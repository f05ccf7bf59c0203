//! The per-projection products: `linear` and its backward on cuBLAS (bf16 or f32 base
//! weights), LoRA as the per-row kernels of `kernels/lora.cu`, and the f32 `matmul`. The
//! model groups its projections (`lora_gemm.rs`), or runs them through `linear` and its
//! backward as the cuBLAS sequence (`baselines.rs`); these are also the baselines, the
//! KV-cached path's products and the materialised LM head's.

use super::blas::{N, Operand, T};
use super::runtime::{Arg, DType, LaunchConfig};
use super::{Act, CudaBackend, MAX_RANK, THREADS, Weight};
use crate::backend::LoraDims;
use crate::error::{Error, Result};

impl CudaBackend {
    pub(super) fn linear_impl(
        &self,
        x: &Act,
        w: &Weight,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<Act> {
        let y = self.uninit::<f32>(m * n)?;
        self.base_product(x, w, (m, k, n), 0.0, Operand::f32(y.ptr(), n))?;
        Ok(y.into())
    }

    /// `y = x W^T + beta y` for `x (m, k)`, `W (n, k)` into the row-major `(m, n)` operand
    /// `y` (f32, or bf16 with bf16 weights: the f32 sum rounded once).
    pub(super) fn base_product(
        &self,
        x: &Act,
        w: &Weight,
        (m, k, n): (usize, usize, usize),
        beta: f32,
        y: Operand,
    ) -> Result<()> {
        // bf16 weights multiply bf16 activations (cuBLAS takes one input type): a bf16
        // activation as it is stored, an f32 one rounded first.
        let xb = match (w.ty, x) {
            (DType::Bf16, Act::F32(x)) => Some(self.to_bf16(x)?),
            (DType::Bf16, Act::Bf16(_)) => None,
            (DType::F32, x) => {
                x.f32()?;
                None
            }
        };
        let xp = xb.as_ref().map_or(x.addr(), |b| b.ptr());
        self.gemm(
            T,
            N,
            n,
            m,
            k,
            1.0,
            Operand::typed(w.ptr(), w.ty, k),
            Operand::typed(xp, w.ty, k),
            beta,
            y,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear_backward_impl(
        &self,
        dy: &Act,
        w: &Weight,
        m: usize,
        k: usize,
        n: usize,
        dx: &mut Act,
        accumulate: bool,
    ) -> Result<()> {
        let dx = Operand::f32(dx.f32_mut()?.ptr(), k);
        self.base_backward(dy, w, (m, k, n), accumulate, dx)
    }

    /// `dx (+)= dy W` for `dy (m, n)`, `W (n, k)` into the row-major f32 `(m, k)` operand
    /// `dx`.
    pub(super) fn base_backward(
        &self,
        dy: &Act,
        w: &Weight,
        (m, k, n): (usize, usize, usize),
        accumulate: bool,
        dx: Operand,
    ) -> Result<()> {
        // The GEMM reads dy in the weight's type: a bf16 dy as stored (the model's bf16
        // gradients, as the cuBLAS baseline of `project_group_backward` is handed them), an
        // f32 one rounded for bf16 weights, a bf16 one widened for f32 weights.
        let (rounded, widened);
        let dp = match (dy, w.ty) {
            (Act::Bf16(b), DType::Bf16) => b.ptr(),
            (Act::F32(f), DType::Bf16) => {
                rounded = self.to_bf16(f)?;
                rounded.ptr()
            }
            (Act::F32(f), DType::F32) => f.ptr(),
            (Act::Bf16(_), DType::F32) => {
                widened = self.wide(dy)?;
                widened.ptr()
            }
        };
        let beta = if accumulate { 1.0 } else { 0.0 };
        self.gemm(
            N,
            N,
            k,
            m,
            n,
            1.0,
            Operand::typed(w.ptr(), w.ty, k),
            Operand::typed(dp, w.ty, n),
            beta,
            dx,
        )
    }

    pub(super) fn lora_forward_impl(
        &self,
        x: &Act,
        a: &Act,
        b: &Act,
        d: LoraDims,
        y: &mut Act,
    ) -> Result<Act> {
        check_rank(d.r)?;
        let u = self.uninit::<f32>(d.m * d.r)?;
        let args = [
            Arg::U64(x.addr()),
            Arg::U64(a.f32()?.ptr()),
            Arg::U64(b.f32()?.ptr()),
            Arg::U64(y.f32_mut()?.ptr()),
            Arg::U64(u.ptr()),
            Arg::I32(d.d_in as i32),
            Arg::I32(d.r as i32),
            Arg::I32(d.d_out as i32),
            Arg::F32(d.scale),
        ];
        let kernel = match x.dtype() {
            DType::F32 => "lora_forward_fused_f32",
            DType::Bf16 => "lora_forward_fused_bf16",
        };
        self.launch(kernel, Self::per_row(d.m), &args)?;
        Ok(u.into())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn lora_backward_impl(
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
        check_rank(d.r)?;
        let (g, u, a, b) = (g.f32()?, u.f32()?, a.f32()?, b.f32()?);
        let ga = self.uninit::<f32>(d.m * d.r)?;
        let args = [
            Arg::U64(g.ptr()),
            Arg::U64(a.ptr()),
            Arg::U64(b.ptr()),
            Arg::U64(ga.ptr()),
            Arg::U64(dx.f32_mut()?.ptr()),
            Arg::I32(d.d_in as i32),
            Arg::I32(d.r as i32),
            Arg::I32(d.d_out as i32),
            Arg::F32(d.scale),
        ];
        self.launch("lora_backward_rows", Self::per_row(d.m), &args)?;
        if let Some((da, db)) = grads {
            let x = self.wide(x)?;
            let (da, db) = (da.f32_mut()?, db.f32_mut()?);
            let chunks = d.m.div_ceil(32).clamp(1, 64);
            let rpc = d.m.div_ceil(chunks) as i32;
            for (narrow, wide, cols, alpha, layout_kc, out) in [
                (&ga, &*x, d.d_in, 1.0f32, 1i32, da),
                (u, g, d.d_out, d.scale, 0i32, db),
            ] {
                let partial = self.uninit::<f32>(chunks * cols * d.r)?;
                let cfg = LaunchConfig {
                    grid: [cols.div_ceil(THREADS as usize) as u32, chunks as u32, 1],
                    block: [THREADS, 1, 1],
                    shared_bytes: 0,
                };
                let args = [
                    Arg::U64(narrow.ptr()),
                    Arg::U64(wide.ptr()),
                    Arg::U64(partial.ptr()),
                    Arg::I32(d.m as i32),
                    Arg::I32(cols as i32),
                    Arg::I32(d.r as i32),
                    Arg::I32(rpc),
                    Arg::F32(alpha),
                    Arg::I32(layout_kc),
                ];
                self.launch("lora_grad_chunk", cfg, &args)?;
                let n = cols * d.r;
                let args = [
                    Arg::U64(partial.ptr()),
                    Arg::U64(out.ptr()),
                    Arg::I32(chunks as i32),
                    Arg::U64(n as u64),
                ];
                self.launch("reduce_partials", Self::elementwise(n), &args)?;
            }
        }
        Ok(ga.into())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul_impl(
        &self,
        a: &Act,
        b: &Act,
        m: usize,
        k: usize,
        n: usize,
        ta: bool,
        tb: bool,
    ) -> Result<Act> {
        // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
        let c = self.uninit::<f32>(m * n)?;
        let (opb, ldb) = if tb { (T, k) } else { (N, n) };
        let (opa, lda) = if ta { (T, m) } else { (N, k) };
        self.gemm(
            opb,
            opa,
            n,
            m,
            k,
            1.0,
            Operand::f32(b.f32()?.ptr(), ldb),
            Operand::f32(a.f32()?.ptr(), lda),
            0.0,
            Operand::f32(c.ptr(), n),
        )?;
        Ok(c.into())
    }
}

fn check_rank(r: usize) -> Result<()> {
    if r > MAX_RANK {
        return Err(Error::usage(format!(
            "LoRA rank {r} exceeds the CUDA kernels' {MAX_RANK}"
        )));
    }
    Ok(())
}
