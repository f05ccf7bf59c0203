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

/// Summed token loss of every sequence of `examples`, in order (forward only, batched);
/// `on_batch` is called after each batch (progress).
pub fn sequence_losses<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: Option<&LoraWeights<B::Buf>>,
    examples: &[Example],
    batch_size: usize,
    mut on_batch: impl FnMut(),
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(examples.len());
    for batch in batches(examples, batch_size) {
        let acts = model.forward(be, lora, &batch, false)?;
        let (losses, _) = be.cross_entropy(
            &acts.logits,
            acts.rows,
            model.cfg.vocab_size,
            CeTargets::Labels(&batch.targets),
            None,
        )?;
        out.extend(
            losses
                .chunks(batch.seq_len.max(1))
                .map(|seq| seq.iter().map(|&l| l as f64).sum::<f64>()),
        );
        on_batch();
    }
    Ok(out)
}

/// Mean NLL over the labelled tokens of `examples`.
pub fn mean_nll<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: Option<&LoraWeights<B::Buf>>,
    examples: &[Example],
    batch_size: usize,
    on_batch: impl FnMut(),
) -> Result<NllSummary> {
    let sum: f64 = sequence_losses(be, model, lora, examples, batch_size, on_batch)?
        .iter()
        .sum();
    let n: usize = examples.iter().map(Example::n_targets).sum();
    let mean = if n > 0 { sum / n as f64 } else { f64::NAN };
    Ok(NllSummary {
        n_sequences: examples.len(),
        n_tokens: n,
        mean_nll: mean,
        perplexity: mean.exp(),
    })
}
