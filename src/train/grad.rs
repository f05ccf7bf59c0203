//! LoRA gradients of the token cross-entropy.

use crate::backend::{Backend, CeTargets};
use crate::data::Batch;
use crate::error::Result;
use crate::model::{Llama, LoraWeights};

#[derive(Debug, Clone, Copy, Default)]
pub struct GradSummary {
    /// Sum of the token losses of the batch.
    pub loss_sum: f64,
    pub n_targets: usize,
}

/// Forward + backward on one batch, *adding* `grad_scale * d(loss_sum)/d(theta)` to `grads`.
/// `grad_scale = 1` gives the summed-loss gradient; `1/n_targets` the mean-loss one.
pub fn accumulate_gradients<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: &LoraWeights<B::Buf>,
    batch: &Batch,
    grad_scale: f32,
    grads: &mut LoraWeights<B::Buf>,
) -> Result<GradSummary> {
    let acts = model.forward(be, Some(lora), batch, true)?;
    let out = model.classify(
        be,
        &acts,
        CeTargets::Labels(&batch.targets),
        Some(grad_scale),
    )?;
    let dxn = out
        .dhidden
        .ok_or_else(|| crate::error::Error::usage("the classifier returned no gradient"))?;
    model.backward(be, Some(lora), &acts, &dxn, Some(grads), None)?;
    Ok(GradSummary {
        loss_sum: out.losses.iter().map(|&l| l as f64).sum(),
        n_targets: batch.n_targets,
    })
}
