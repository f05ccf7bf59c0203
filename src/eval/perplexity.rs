//! Mean negative log-likelihood over the labelled tokens of a data set.

use std::path::Path;

use serde::Serialize;

use crate::backend::{Backend, CeTargets};
use crate::data::{Example, batches_by_length};
use crate::error::{Error, Result};
use crate::model::{Llama, LoraWeights};
use crate::train::finite::non_finite;

#[derive(Debug, Clone, Serialize)]
pub struct NllSummary {
    pub n_sequences: usize,
    /// Predicted (non-ignored) tokens.
    pub n_tokens: usize,
    pub mean_nll: f64,
    pub perplexity: f64,
}

/// Summed token loss of every sequence of `examples`, in order (forward only, batched
/// shortest first: see [`batches_by_length`]); `on_batch` is called after each batch
/// (progress).
pub fn sequence_losses<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: Option<&LoraWeights<B::Buf>>,
    examples: &[Example],
    batch_size: usize,
    mut on_batch: impl FnMut(),
) -> Result<Vec<f64>> {
    let mut out = vec![0.0; examples.len()];
    for (bi, (idx, batch)) in batches_by_length(examples, batch_size).enumerate() {
        let acts = model.forward(be, lora, &batch, false)?;
        let losses = model
            .classify(be, &acts, CeTargets::Labels(&batch.targets), None)?
            .losses;
        if losses.iter().any(|l| !l.is_finite()) {
            let names: Vec<String> = idx.iter().map(|i| (i + 1).to_string()).collect();
            return Err(non_finite(
                format!("batch {} (sequences {})", bi + 1, names.join(", ")),
                "loss",
            ));
        }
        for (&i, seq) in idx.iter().zip(losses.chunks(batch.seq_len.max(1))) {
            out[i] = seq.iter().map(|&l| l as f64).sum();
        }
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
    let n: usize = examples.iter().map(Example::n_targets).sum();
    if n == 0 {
        return Err(Error::usage(
            "no target tokens to evaluate (every label is -100)",
        ));
    }
    let sum: f64 = sequence_losses(be, model, lora, examples, batch_size, on_batch)?
        .iter()
        .sum();
    let mean = sum / n as f64;
    Ok(NllSummary {
        n_sequences: examples.len(),
        n_tokens: n,
        mean_nll: mean,
        perplexity: mean.exp(),
    })
}

/// A data set with no predicted token has no mean loss (0/0) and no gradient: refuse it
/// (naming the file) rather than report NaN, train on nothing or write zeros.
pub fn require_targets(path: &Path, examples: &[Example]) -> Result<()> {
    if examples.iter().any(|e| e.n_targets() > 0) {
        Ok(())
    } else {
        Err(Error::file(
            path,
            "no target tokens: every label is -100, each row is a single token, or --max-len cut the labelled tokens off",
        ))
    }
}
