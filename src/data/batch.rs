//! Right-padded batches. Causal attention means real positions never see the padding, so
//! no attention mask is needed beyond the segments that say which rows are real.

use super::jsonl::{Example, IGNORE};
use crate::backend::Segment;

#[derive(Debug, Clone)]
pub struct Batch {
    /// `(batch, seq_len)` token ids, padding rows filled with id 0.
    pub ids: Vec<u32>,
    /// Next-token target per row: `labels[t + 1]`, or `-100` (ignored, padding, last).
    pub targets: Vec<i32>,
    pub batch: usize,
    pub seq_len: usize,
    /// The real (non-padding) rows of each sequence.
    pub segments: Vec<Segment>,
    pub n_targets: usize,
}

impl Batch {
    pub fn new(examples: &[&Example]) -> Self {
        let batch = examples.len();
        let seq_len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut ids = vec![0u32; batch * seq_len];
        let mut targets = vec![IGNORE; batch * seq_len];
        let mut segments = Vec::with_capacity(batch);
        for (b, e) in examples.iter().enumerate() {
            let row = b * seq_len;
            ids[row..row + e.ids.len()].copy_from_slice(&e.ids);
            // position t predicts label t + 1 (HF's shift)
            let shifted = e.labels.get(1..).unwrap_or(&[]);
            targets[row..row + shifted.len()].copy_from_slice(shifted);
            segments.push(Segment {
                start: row,
                len: e.ids.len(),
            });
        }
        let n_targets = targets.iter().filter(|&&t| t >= 0).count();
        Batch {
            ids,
            targets,
            batch,
            seq_len,
            segments,
            n_targets,
        }
    }

    pub fn rows(&self) -> usize {
        self.batch * self.seq_len
    }

    /// Which sequence row `r` belongs to.
    pub fn sequence_of(&self, r: usize) -> usize {
        r / self.seq_len.max(1)
    }
}

/// Batches of `batch_size` examples taken shortest first (a stable sort by length), each
/// with the indices of its examples: a batch is padded to its longest sequence, so
/// evaluating sets of mixed lengths this way computes far fewer padding positions.
pub fn batches_by_length(
    examples: &[Example],
    batch_size: usize,
) -> impl Iterator<Item = (Vec<usize>, Batch)> + '_ {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| examples[i].ids.len());
    let groups: Vec<Vec<usize>> = order
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect();
    groups.into_iter().map(move |idx| {
        let batch = Batch::new(&idx.iter().map(|&i| &examples[i]).collect::<Vec<_>>());
        (idx, batch)
    })
}

/// Consecutive batches of `batch_size` examples in the given order.
pub fn batches(examples: &[Example], batch_size: usize) -> impl Iterator<Item = Batch> + '_ {
    examples
        .chunks(batch_size.max(1))
        .map(|c| Batch::new(&c.iter().collect::<Vec<_>>()))
}
