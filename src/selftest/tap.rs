//! `Tap`: a backend that forwards every op to another, except that it records the
//! Monte-Carlo labels the wrapped backend draws, or replays recorded labels instead of
//! drawing. A sampled label is a discontinuous function of the logits: where device and
//! reference logits differ by rounding (bf16 base weights above all), a uniform near a CDF
//! boundary picks different labels and the two Monte-Carlo curvatures are no longer
//! comparable. The end-to-end check therefore records the device's draws and replays them
//! to the reference; the draws themselves are checked per kernel (`cross_entropy.labels`).

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::backend::{Backend, CeTargets, ClassifierOut};
use crate::error::{Error, Result};

pub struct Tap<'a, B: Backend> {
    inner: &'a B,
    replay: bool,
    /// Labels per sampled `cross_entropy` or `classifier` call, in call order; `-100` on
    /// masked rows.
    labels: Mutex<VecDeque<Vec<i32>>>,
}

impl<'a, B: Backend> Tap<'a, B> {
    /// Records the labels `inner` draws (see `take`).
    pub fn record(inner: &'a B) -> Self {
        Self::new(inner, false)
    }

    /// Draws nothing: each sampled call uses the next labels given to `feed`.
    pub fn replay(inner: &'a B) -> Self {
        Self::new(inner, true)
    }

    fn new(inner: &'a B, replay: bool) -> Self {
        Tap {
            inner,
            replay,
            labels: Mutex::new(VecDeque::new()),
        }
    }

    /// The labels recorded so far, leaving none.
    pub fn take(&self) -> VecDeque<Vec<i32>> {
        std::mem::take(&mut *self.log())
    }

    pub fn feed(&self, labels: VecDeque<Vec<i32>>) {
        self.log().extend(labels);
    }

    /// Labels fed but not yet used.
    pub fn pending(&self) -> usize {
        self.log().len()
    }

    fn log(&self) -> std::sync::MutexGuard<'_, VecDeque<Vec<i32>>> {
        // The queue is never left half-updated: take it as it is after a panic elsewhere.
        self.labels.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The label each active row drew, read off `dlogits = scale (softmax - onehot)` (the one
/// negative entry for a positive scale); `-100` for masked rows.
pub fn drawn_labels(dlogits: &[f32], vocab: usize, mask: &[i32]) -> Vec<i32> {
    dlogits
        .chunks(vocab)
        .zip(mask)
        .map(|(row, &m)| {
            let argmin = (0..row.len()).min_by(|&a, &b| row[a].total_cmp(&row[b]));
            match argmin {
                Some(j) if m >= 0 => j as i32,
                _ => -100,
            }
        })
        .collect()
}

impl<B: Backend> Backend for Tap<'_, B> {
    type Buf = B::Buf;
    type Weight = B::Weight;

    fn cross_entropy(
        &self,
        logits: &B::Buf,
        rows: usize,
        vocab: usize,
        targets: CeTargets<'_>,
        grad_scale: Option<f32>,
    ) -> Result<(Vec<f32>, Option<B::Buf>)> {
        let CeTargets::Sample { mask, .. } = targets else {
            return self
                .inner
                .cross_entropy(logits, rows, vocab, targets, grad_scale);
        };
        if self.replay {
            let labels = self.log().pop_front().ok_or_else(|| {
                Error::usage("selftest: more sampled cross-entropy calls than were recorded")
            })?;
            let t = CeTargets::Labels(&labels);
            return self.inner.cross_entropy(logits, rows, vocab, t, grad_scale);
        }
        let out = self
            .inner
            .cross_entropy(logits, rows, vocab, targets, grad_scale)?;
        let dlogits = match (&out.1, grad_scale) {
            (Some(d), Some(s)) if s > 0.0 => self.inner.to_host(d)?,
            _ => {
                return Err(Error::usage(
                    "selftest: sampled labels are read off a gradient with a positive scale",
                ));
            }
        };
        self.log().push_back(drawn_labels(&dlogits, vocab, mask));
        Ok(out)
    }

    fn classifier(
        &self,
        hidden: &B::Buf,
        head: &B::Weight,
        rows: usize,
        dim: usize,
        vocab: usize,
        targets: CeTargets<'_>,
        grad_scale: Option<f32>,
    ) -> Result<ClassifierOut<B::Buf>> {
        let CeTargets::Sample { .. } = targets else {
            return self
                .inner
                .classifier(hidden, head, rows, dim, vocab, targets, grad_scale);
        };
        if self.replay {
            let labels = self.log().pop_front().ok_or_else(|| {
                Error::usage("selftest: more sampled classifier calls than were recorded")
            })?;
            let t = CeTargets::Labels(&labels);
            return self
                .inner
                .classifier(hidden, head, rows, dim, vocab, t, grad_scale);
        }
        let out = self
            .inner
            .classifier(hidden, head, rows, dim, vocab, targets, grad_scale)?;
        self.log().push_back(out.labels.clone());
        Ok(out)
    }

    // Everything else is forwarded unchanged.
    crate::delegate_backend!(B;
        describe, device_memory, reset_device_peak, buf, zeros, to_host, take_host, weight, weight_stored, copy_into, slice, embedding, rmsnorm,
        add_rmsnorm, rmsnorm_backward, linear, linear_backward, lora_forward, lora_backward,
        project_group, project_group_backward, rope, attention, attention_out, attention_dout, attention_backward, swiglu,
        swiglu_backward, add_assign, gram_accumulate, gram_accumulate_upper, mirror_upper, segment_sum,
        sq_grad_accumulate, matmul, dup, mul_assign, scale, axpy, dot, dots, adamw_step,
    );
}
