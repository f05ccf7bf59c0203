//! Mean negative log-likelihood over the labelled tokens of a data set.

use serde::Serialize;

use crate::backend::{Backend, CeTargets};
use crate::data::{Example, batches};
use crate::error::Result;
use crate::model::{Llama, LoraWeights};

#[derive(Debug, Clone, Serialize)]
pub struct NllSummary {
    pub n_sequences: usize,
    /// Predicted (non-ignored) tokens.
    pub n_tokens: usize,
    pub mean_nll: f64,
    pub perplexity: f64,
}

/// Forward-only pass over `examples` in batches; `on_batch` is called after each batch
/// (progress).
pub fn mean_nll<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: Option<&LoraWeights<B::Buf>>,
    examples: &[Example],
    batch_size: usize,
    mut on_batch: impl FnMut(),
) -> Result<NllSummary> {
    let mut sum = 0f64;
    let mut n = 0usize;
    for batch in batches(examples, batch_size) {
        let acts = model.forward(be, lora, &batch, false)?;
        let (losses, _) = be.cross_entropy(
            &acts.logits,
            acts.rows,
            model.cfg.vocab_size,
            CeTargets::Labels(&batch.targets),
            None,
        )?;
        sum += losses.iter().map(|&l| l as f64).sum::<f64>();
        n += batch.n_targets;
        on_batch();
    }
    let mean = if n > 0 { sum / n as f64 } else { f64::NAN };
    Ok(NllSummary {
        n_sequences: examples.len(),
        n_tokens: n,
        mean_nll: mean,
        perplexity: mean.exp(),
    })
}
