//! Attention on CUDA, two paths:
//! - flash attention (`flash`): bf16 tensor cores with f32 accumulation, O(T) saved state
//!   (the row log-sum-exps); the path with bf16 base weights (the default);
//! - materialised attention (`materialised`): f32 cuBLAS products and softmax kernels, the
//!   probabilities kept for backward; the path with f32 base weights (which reproduces the
//!   f32 references to 1e-4), for shapes flash does not run, and the benchmarked baseline.
//!
//! The forward returns which state it saved (`AttnSaved`), and the backward follows it.
//! q, k and v may be stored bf16 (the projections' outputs with bf16 base weights): flash
//! attention reads them as they are; the materialised path reads f32 and gets exact
//! widened copies.

mod flash;
mod materialised;

use super::{Act, BaseDtype, CudaBackend};
use crate::backend::{AttnSaved, AttnShape};
use crate::error::Result;

impl CudaBackend {
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
        s: &AttnShape,
    ) -> Result<(Act, Act, Act)> {
        let dout = dout.f32()?;
        let (dq, dk, dv) = match saved {
            AttnSaved::Probs(p) => {
                let (q, k, v) = (self.wide(q)?, self.wide(k)?, self.wide(v)?);
                self.attention_materialised_backward(dout, &q, &k, &v, p.f32()?, s)?
            }
            AttnSaved::Lse(lse) => {
                self.flash_attention_backward(dout, q, k, v, out.f32()?, lse.f32()?, s)?
            }
        };
        Ok((dq.into(), dk.into(), dv.into()))
    }
}
