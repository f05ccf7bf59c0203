//! Attention on CUDA: materialised attention (`materialised`), f32 cuBLAS products and
//! softmax kernels with the probabilities kept for backward.
//!
//! The forward returns which state it saved (`AttnSaved`), and the backward follows it.

mod materialised;

use super::{CudaBackend, DevBuf};
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
        let (out, probs) = self.attention_materialised(q, k, v, s)?;
        Ok((out, AttnSaved::Probs(probs)))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_backward_auto(
        &self,
        dout: &DevBuf<f32>,
        q: &DevBuf<f32>,
        k: &DevBuf<f32>,
        v: &DevBuf<f32>,
        _out: &DevBuf<f32>,
        saved: &AttnSaved<DevBuf<f32>>,
        s: &AttnShape,
    ) -> Result<(DevBuf<f32>, DevBuf<f32>, DevBuf<f32>)> {
        let probs = saved.probs("cuda")?;
        self.attention_materialised_backward(dout, q, k, v, probs, s)
    }
}
