//! `Backend` for CUDA: the trait's entry points, each handing over to the module that
//! launches its hand-written kernels (or cuBLAS for the dense products): `storage`,
//! `rows`, `linear`, `baselines` (the projection groups as the cuBLAS sequence, the
//! default) or `lora_gemm` (`ProjectionGemm`: hybrid and fused), `attention`, `classifier`,
//! `curvature` and `vector`. The CPU twin of each op is in `backend/cpu`.

use super::lora_gemm::Base;
use super::{Act, BaseDtype, CudaBackend, GramGemm, LoraGemmTiling, ProjectionGemm, Weight};
use crate::backend::group::{GradFeeds, LoraGroup, ProjBwd, ProjFwd, Projected};
use crate::backend::{
    AdamHyper, AttnSaved, AttnShape, Backend, CeTargets, ClassifierOut, DiagPenalty, LoraDims,
    RopeTable, Segment,
};
use crate::error::Result;

impl Backend for CudaBackend {
    type Buf = Act;
    type Weight = Weight;

    fn describe(&self) -> String {
        // A projection path other than the default is named, and so is a tiling other than
        // the engine's where the engine's kernel runs, so that figures say what ran.
        let (path, tiling) = (self.projection_gemm(), self.lora_gemm_tiling());
        let mut how = format!("{}, base weights {}", self.rt.describe(), self.base.name());
        if path != ProjectionGemm::default() {
            how += &format!(", projections {}", path.describe());
            if path == ProjectionGemm::Folded && self.base == BaseDtype::F32 {
                // Nothing is stored bf16, so nothing folds: say what runs.
                how += " (with f32 base weights: the cuBLAS sequence)";
            }
        }
        if self.gram_gemm() != GramGemm::default() && self.base == BaseDtype::Bf16 {
            how += &format!(", bf16 Grams {}", self.gram_gemm().describe());
        }
        if matches!(path, ProjectionGemm::Hybrid | ProjectionGemm::Fused)
            && tiling != LoraGemmTiling::ENGINE
        {
            how += &format!(", LoRA GEMM tiling {}", tiling.name());
        }
        how
    }

    fn device_memory(&self) -> Option<(u64, u64)> {
        let m = self.memory();
        Some((m.live as u64, m.peak as u64))
    }

    fn reset_device_peak(&self) {
        self.reset_peak()
    }

    fn buf(&self, host: Vec<f32>) -> Result<Self::Buf> {
        Ok(self.upload(&host)?.into())
    }

    fn zeros(&self, n: usize) -> Result<Self::Buf> {
        Ok(self.zeroed(n)?.into())
    }

    fn to_host(&self, x: &Self::Buf) -> Result<Vec<f32>> {
        self.to_host_impl(x)
    }

    fn weight(&self, host: Vec<f32>, _rows: usize, _cols: usize) -> Result<Self::Weight> {
        self.weight_impl(host, _rows, _cols)
    }

    fn copy_into(&self, dst: &mut Self::Buf, offset: usize, src: &Self::Buf) -> Result<()> {
        self.copy_into_impl(dst, offset, src)
    }

    fn slice(&self, src: &Self::Buf, offset: usize, len: usize) -> Result<Self::Buf> {
        self.slice_impl(src, offset, len)
    }

    fn embedding(&self, table: &Self::Weight, ids: &[u32], dim: usize) -> Result<Self::Buf> {
        self.embedding_impl(table, ids, dim)
    }

    fn rmsnorm(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(Self::Buf, Self::Buf)> {
        self.rmsnorm_impl(x, w, rows, dim, eps)
    }

    fn add_rmsnorm(
        &self,
        h: &mut Self::Buf,
        delta: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(Self::Buf, Self::Buf)> {
        self.add_rmsnorm_impl(h, delta, w, rows, dim, eps)
    }

    fn rmsnorm_backward(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        rows: usize,
        dim: usize,
        dx: &mut Self::Buf,
    ) -> Result<()> {
        self.rmsnorm_backward_impl(dy, x, w, rstd, rows, dim, dx)
    }

    fn linear(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<Self::Buf> {
        self.linear_impl(x, w, m, k, n)
    }

    fn linear_backward(
        &self,
        dy: &Self::Buf,
        w: &Self::Weight,
        m: usize,
        k: usize,
        n: usize,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()> {
        self.linear_backward_impl(dy, w, m, k, n, dx, accumulate)
    }

    fn lora_forward(
        &self,
        x: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        d: LoraDims,
        y: &mut Self::Buf,
    ) -> Result<Self::Buf> {
        self.lora_forward_impl(x, a, b, d, y)
    }

    fn lora_backward(
        &self,
        g: &Self::Buf,
        x: &Self::Buf,
        u: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        d: LoraDims,
        dx: &mut Self::Buf,
        grads: Option<(&mut Self::Buf, &mut Self::Buf)>,
    ) -> Result<Self::Buf> {
        self.lora_backward_impl(g, x, u, a, b, d, dx, grads)
    }

    fn project_group(
        &self,
        x: &Self::Buf,
        m: usize,
        d_in: usize,
        lora: LoraGroup,
        projs: &[ProjFwd<'_, Self>],
    ) -> Result<Vec<Projected<Self::Buf>>> {
        match self.projection_gemm() {
            ProjectionGemm::Hybrid => {
                self.project_group_impl(x, m, d_in, lora, projs, Base::Cublas)
            }
            ProjectionGemm::Fused => self.project_group_impl(x, m, d_in, lora, projs, Base::Kernel),
            ProjectionGemm::Cublas => self.project_group_cublas(x, m, d_in, lora, projs),
            ProjectionGemm::Folded => self.project_group_folded(x, m, d_in, lora, projs),
        }
    }

    fn project_group_backward(
        &self,
        x: &Self::Buf,
        m: usize,
        d_in: usize,
        lora: LoraGroup,
        projs: Vec<ProjBwd<'_, Self>>,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<Vec<Option<Self::Buf>>> {
        let base = match self.projection_gemm() {
            ProjectionGemm::Hybrid => Base::Cublas,
            ProjectionGemm::Fused => Base::Kernel,
            ProjectionGemm::Cublas => {
                return self.project_group_backward_cublas(x, m, d_in, lora, projs, dx, accumulate);
            }
            ProjectionGemm::Folded => {
                return self.project_group_backward_folded(x, m, d_in, lora, projs, dx, accumulate);
            }
        };
        self.project_group_backward_impl(x, m, d_in, lora, projs, dx, accumulate, base)
    }

    fn rope(
        &self,
        x: &mut Self::Buf,
        t: &RopeTable<Act>,
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()> {
        self.rope_impl(x, t, rows, n_heads, head_dim, inverse)
    }

    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        s: &AttnShape,
    ) -> Result<(Self::Buf, AttnSaved<Self::Buf>)> {
        self.attention_auto(q, k, v, s)
    }

    fn attention_dout(&self, saved: &AttnSaved<Act>, n: usize) -> Result<Act> {
        self.attention_dout_impl(saved, n)
    }

    fn attention_backward(
        &self,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        saved: &AttnSaved<Self::Buf>,
        rope: Option<&RopeTable<Act>>,
        feeds: GradFeeds,
        s: &AttnShape,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)> {
        self.attention_backward_auto(dout, q, k, v, out, saved, rope, feeds, s)
    }

    fn swiglu(&self, gate: &Self::Buf, up: &Self::Buf) -> Result<Self::Buf> {
        self.swiglu_impl(gate, up)
    }

    fn swiglu_backward(
        &self,
        dact: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
        feeds: GradFeeds,
    ) -> Result<(Self::Buf, Self::Buf)> {
        self.swiglu_backward_impl(dact, gate, up, feeds)
    }

    fn add_assign(&self, a: &mut Self::Buf, b: &Self::Buf) -> Result<()> {
        self.add_assign_impl(a, b)
    }

    fn cross_entropy(
        &self,
        logits: &Self::Buf,
        rows: usize,
        vocab: usize,
        targets: CeTargets<'_>,
        grad_scale: Option<f32>,
    ) -> Result<(Vec<f32>, Option<Self::Buf>)> {
        self.cross_entropy_impl(logits, rows, vocab, targets, grad_scale)
    }

    fn classifier(
        &self,
        hidden: &Self::Buf,
        head: &Self::Weight,
        rows: usize,
        dim: usize,
        vocab: usize,
        targets: CeTargets<'_>,
        grad_scale: Option<f32>,
    ) -> Result<ClassifierOut<Self::Buf>> {
        self.classifier_impl(hidden, head, rows, dim, vocab, targets, grad_scale)
    }

    fn gram_accumulate(
        &self,
        x: &Self::Buf,
        dx: usize,
        y: &Self::Buf,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut Self::Buf,
    ) -> Result<()> {
        let out = out.f32_mut()?;
        if self.gram_accumulate_impl(x.into(), dx, y.into(), dy, segments, alpha, out)? {
            self.mirror_upper_impl(out, dx)?;
        }
        Ok(())
    }

    fn gram_accumulate_upper(
        &self,
        x: &Self::Buf,
        d: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut Self::Buf,
    ) -> Result<()> {
        self.gram_accumulate_impl(x.into(), d, x.into(), d, segments, alpha, out.f32_mut()?)?;
        Ok(())
    }

    fn mirror_upper(&self, out: &mut Self::Buf, n: usize) -> Result<()> {
        self.mirror_upper_impl(out.f32_mut()?, n)
    }

    fn segment_sum(
        &self,
        x: &Self::Buf,
        dim: usize,
        segments: &[Segment],
        mean: bool,
    ) -> Result<Self::Buf> {
        self.segment_sum_impl(x, dim, segments, mean)
    }

    fn sq_grad_accumulate(
        &self,
        g: &Self::Buf,
        dg: usize,
        y: &Self::Buf,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut Self::Buf,
    ) -> Result<()> {
        self.sq_grad_accumulate_impl(g.into(), dg, y.into(), dy, segments, alpha, out.f32_mut()?)
    }

    fn matmul(
        &self,
        a: &Self::Buf,
        b: &Self::Buf,
        m: usize,
        k: usize,
        n: usize,
        ta: bool,
        tb: bool,
    ) -> Result<Self::Buf> {
        self.matmul_impl(a, b, m, k, n, ta, tb)
    }

    fn dup(&self, x: &Self::Buf) -> Result<Self::Buf> {
        self.dup_impl(x)
    }

    fn mul_assign(&self, a: &mut Self::Buf, b: &Self::Buf) -> Result<()> {
        self.mul_assign_impl(a, b)
    }

    fn scale(&self, x: &mut Self::Buf, k: f32) -> Result<()> {
        self.scale_impl(x, k)
    }

    fn axpy(&self, alpha: f32, x: &Self::Buf, y: &mut Self::Buf) -> Result<()> {
        self.axpy_impl(alpha, x, y)
    }

    fn dot(&self, x: &Self::Buf, y: &Self::Buf) -> Result<f64> {
        self.dot_impl(x, y)
    }

    fn dots(&self, pairs: &[(&Self::Buf, &Self::Buf)]) -> Result<Vec<f64>> {
        self.dots_impl(pairs)
    }

    fn adamw_step(
        &self,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        h: &AdamHyper,
        grad_scale: f32,
        penalty: Option<DiagPenalty<'_, Self>>,
    ) -> Result<()> {
        self.adamw_step_impl(p, g, m, v, h, grad_scale, penalty)
    }
}

#[cfg(test)]
#[path = "ops_tests.rs"]
mod tests;
