//! Attention on CUDA, two paths:
//! - flash attention (`flash`): bf16 tensor cores with f32 accumulation, O(T) saved state
//!   (the row log-sum-exps); the path with bf16 base weights (the default);
//! - materialised attention (`materialised`): f32 cuBLAS products and softmax kernels, the
//!   probabilities kept for backward; the path with f32 base weights (which reproduces the
//!   f32 references to 1e-4), for shapes flash does not run, and the benchmarked baseline.
//!
//! The forward returns which state it saved (`AttnSaved`), and the backward follows it.
//! Given the RoPE table, the backward's dq and dk leave unrotated: flash attention does it
//! in its epilogues at head dims 64 and 128, rope passes after it do it otherwise.
//! q, k and v may be stored bf16 (the projections' outputs with bf16 base weights): flash
//! attention reads them as they are; the materialised path reads f32 and gets exact
//! widened copies.

mod flash;
mod materialised;

use super::runtime::DType;
use super::{Act, BaseDtype, CudaBackend};
use crate::backend::group::GradFeeds;
use crate::backend::{AttnSaved, AttnShape, RopeTable, unrotate_attention_grads};
use crate::error::Result;

impl CudaBackend {
    /// `Backend::attention_dout`: bf16 where flash attention's backward reads dO (with
    /// bf16 base weights, whose q/k/v are bf16), which rounds every read of it to bf16;
    /// f32 for the materialised path.
    pub(super) fn attention_dout_impl(&self, saved: &AttnSaved<Act>, n: usize) -> Result<Act> {
        Ok(match saved {
            AttnSaved::Lse(_) if self.base == BaseDtype::Bf16 => Act::Bf16(self.zeroed(n)?),
            _ => Act::F32(self.zeroed(n)?),
        })
    }

    pub(super) fn attention_auto(
        &self,
        q: &Act,
        k: &Act,
        v: &Act,
        s: &AttnShape,
    ) -> Result<(Act, AttnSaved<Act>)> {
        if self.base == BaseDtype::Bf16 && flash::unsupported(s).is_none() {
            let (out, lse) = self.flash_attention(q, k, v, s)?;
            Ok((out.into(), AttnSaved::Lse(lse.into())))
        } else {
            let (q, k, v) = (self.wide(q)?, self.wide(k)?, self.wide(v)?);
            let (out, probs) = self.attention_materialised(&q, &k, &v, s)?;
            Ok((out.into(), AttnSaved::Probs(probs.into())))
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_backward_auto(
        &self,
        dout: &Act,
        q: &Act,
        k: &Act,
        v: &Act,
        out: &Act,
        saved: &AttnSaved<Act>,
        rope: Option<&RopeTable<Act>>,
        feeds: GradFeeds,
        s: &AttnShape,
    ) -> Result<(Act, Act, Act)> {
        match saved {
            AttnSaved::Probs(p) => {
                let (q, k, v) = (self.wide(q)?, self.wide(k)?, self.wide(v)?);
                let dout = self.wide(dout)?;
                let (dq, dk, dv) =
                    self.attention_materialised_backward(&dout, &q, &k, &v, p.f32()?, s)?;
                let (mut dq, mut dk) = (Act::from(dq), Act::from(dk));
                if let Some(rope) = rope {
                    unrotate_attention_grads(self, &mut dq, &mut dk, rope, s)?;
                }
                Ok((dq, dk, dv.into()))
            }
            AttnSaved::Lse(lse) => {
                let fused = rope.filter(|_| flash::fuses_rope(s));
                // Unless a reduction sums them over positions first (`GradFeeds::Summed`),
                // the gradients are stored bf16, rounded once: the q/k/v group's base GEMM
                // rounds them to bf16 anyway, and its gA and dB (and KFAC expand's Grams,
                // diag's squaring) read them as stored. `Summed` keeps them f32, and so do
                // head dims whose RoPE inverse runs as passes after (rotating a stored bf16
                // dq would round it twice).
                let grads = match (feeds, rope.is_some() && fused.is_none()) {
                    (GradFeeds::Backward, false) => self.act_dtype(),
                    _ => DType::F32,
                };
                let (out, lse) = (out.f32()?, lse.f32()?);
                let (mut dq, mut dk, dv) =
                    self.flash_attention_backward(dout, q, k, v, out, lse, fused, grads, s)?;
                if let (Some(rope), None) = (rope, fused) {
                    unrotate_attention_grads(self, &mut dq, &mut dk, rope, s)?;
                }
                Ok((dq, dk, dv))
            }
        }
    }
}
