//! Attention on CUDA, two paths:
//! - flash attention (`flash`): bf16 tensor cores with f32 accumulation, O(T) saved state
//!   (the row log-sum-exps); the path with bf16 base weights (the default);
//! - materialised attention (`materialised`): f32 cuBLAS products and softmax kernels, the
//!   probabilities kept for backward; the path with f32 base weights (which reproduces the
//!   f32 references to 1e-4), for shapes flash does not run, and the benchmarked baseline.
//!
//! The forward returns which state it saved (`AttnSaved`), and the backward follows it.

mod flash;
mod materialised;

use super::{BaseDtype, CudaBackend, DevBuf};
use crate::backend::{AttnSaved, AttnShape};
use crate::error::Result;

impl CudaBackend {
    pub(super) fn attention_auto(
        &self,
        q: &DevBuf<f32>,
        k: &DevBuf<f32>,
        v: &DevBuf<f32>,
        s: &AttnShape,
    ) -> Result<(DevBuf<f32>, AttnSaved<DevBuf<f32>>)> {
        if self.base == BaseDtype::Bf16 && flash::unsupported(s).is_none() {
            let (out, lse) = self.flash_attention(q, k, v, s)?;
            Ok((out, AttnSaved::Lse(lse)))
        } else {
            let (out, probs) = self.attention_materialised(q, k, v, s)?;
            Ok((out, AttnSaved::Probs(probs)))
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_backward_auto(
        &self,
        dout: &DevBuf<f32>,
        q: &DevBuf<f32>,
        k: &DevBuf<f32>,
        v: &DevBuf<f32>,
        out: &DevBuf<f32>,
        saved: &AttnSaved<DevBuf<f32>>,
        s: &AttnShape,
    ) -> Result<(DevBuf<f32>, DevBuf<f32>, DevBuf<f32>)> {
        match saved {
            AttnSaved::Probs(p) => self.attention_materialised_backward(dout, q, k, v, p, s),
            AttnSaved::Lse(lse) => self.flash_attention_backward(dout, q, k, v, out, lse, s),
        }
    }
}
