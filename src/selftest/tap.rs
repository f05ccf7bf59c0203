//! `Tap`: a backend that forwards every op to another, except that it records the
//! Monte-Carlo labels the wrapped backend draws, or replays recorded labels instead of
//! drawing. A sampled label is a discontinuous function of the logits: where device and
//! reference logits differ by rounding (bf16 base weights above all), a uniform near a CDF
//! boundary picks different labels and the two Monte-Carlo curvatures are no longer
//! comparable. The end-to-end check therefore records the device's draws and replays them
//! to the reference; the draws themselves are checked per kernel (`cross_entropy.labels`).

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::backend::group::{LoraBwd, LoraGroup, ProjBwd, ProjFwd, Projected};
use crate::backend::{
    AdamHyper, AttnSaved, AttnShape, Backend, CeTargets, ClassifierOut, DiagPenalty, LoraDims,
    RopeTable, Segment,
};
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

    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn buf(&self, host: Vec<f32>) -> Result<B::Buf> {
        self.inner.buf(host)
    }
    fn zeros(&self, n: usize) -> Result<B::Buf> {
        self.inner.zeros(n)
    }
    fn to_host(&self, x: &B::Buf) -> Result<Vec<f32>> {
        self.inner.to_host(x)
    }
    fn weight(&self, host: Vec<f32>, rows: usize, cols: usize) -> Result<B::Weight> {
        self.inner.weight(host, rows, cols)
    }
    fn copy_into(&self, dst: &mut B::Buf, offset: usize, src: &B::Buf) -> Result<()> {
        self.inner.copy_into(dst, offset, src)
    }
    fn slice(&self, src: &B::Buf, offset: usize, len: usize) -> Result<B::Buf> {
        self.inner.slice(src, offset, len)
    }
    fn embedding(&self, table: &B::Weight, ids: &[u32], dim: usize) -> Result<B::Buf> {
        self.inner.embedding(table, ids, dim)
    }
    fn rmsnorm(
        &self,
        x: &B::Buf,
        w: &B::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(B::Buf, B::Buf)> {
        self.inner.rmsnorm(x, w, rows, dim, eps)
    }
    fn add_rmsnorm(
        &self,
        h: &mut B::Buf,
        delta: &B::Buf,
        w: &B::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(B::Buf, B::Buf)> {
        self.inner.add_rmsnorm(h, delta, w, rows, dim, eps)
    }
    fn rmsnorm_backward(
        &self,
        dy: &B::Buf,
        x: &B::Buf,
        w: &B::Buf,
        rstd: &B::Buf,
        rows: usize,
        dim: usize,
        dx: &mut B::Buf,
    ) -> Result<()> {
        self.inner.rmsnorm_backward(dy, x, w, rstd, rows, dim, dx)
    }
    fn linear(&self, x: &B::Buf, w: &B::Weight, m: usize, k: usize, n: usize) -> Result<B::Buf> {
        self.inner.linear(x, w, m, k, n)
    }
    fn linear_backward(
        &self,
        dy: &B::Buf,
        w: &B::Weight,
        m: usize,
        k: usize,
        n: usize,
        dx: &mut B::Buf,
        accumulate: bool,
    ) -> Result<()> {
        self.inner.linear_backward(dy, w, m, k, n, dx, accumulate)
    }
    fn lora_forward(
        &self,
        x: &B::Buf,
        a: &B::Buf,
        b: &B::Buf,
        dims: LoraDims,
        y: &mut B::Buf,
    ) -> Result<B::Buf> {
        self.inner.lora_forward(x, a, b, dims, y)
    }
    fn lora_backward(
        &self,
        g: &B::Buf,
        x: &B::Buf,
        u: &B::Buf,
        a: &B::Buf,
        b: &B::Buf,
        dims: LoraDims,
        dx: &mut B::Buf,
        grads: Option<(&mut B::Buf, &mut B::Buf)>,
    ) -> Result<B::Buf> {
        self.inner.lora_backward(g, x, u, a, b, dims, dx, grads)
    }
    fn project_group(
        &self,
        x: &B::Buf,
        m: usize,
        d_in: usize,
        lora: LoraGroup,
        projs: &[ProjFwd<'_, Self>],
    ) -> Result<Vec<Projected<B::Buf>>> {
        let projs: Vec<ProjFwd<'_, B>> = projs
            .iter()
            .map(|p| ProjFwd {
                w: p.w,
                d_out: p.d_out,
                lora: p.lora,
                feeds: p.feeds,
            })
            .collect();
        self.inner.project_group(x, m, d_in, lora, &projs)
    }
    fn project_group_backward(
        &self,
        x: &B::Buf,
        m: usize,
        d_in: usize,
        lora: LoraGroup,
        projs: Vec<ProjBwd<'_, Self>>,
        dx: &mut B::Buf,
        accumulate: bool,
    ) -> Result<Vec<Option<B::Buf>>> {
        let projs: Vec<ProjBwd<'_, B>> = projs
            .into_iter()
            .map(|p| ProjBwd {
                w: p.w,
                d_out: p.d_out,
                g: p.g,
                lora: p.lora.map(|l| LoraBwd {
                    a: l.a,
                    b: l.b,
                    u: l.u,
                    grads: l.grads,
                }),
            })
            .collect();
        self.inner
            .project_group_backward(x, m, d_in, lora, projs, dx, accumulate)
    }
    fn rope(
        &self,
        x: &mut B::Buf,
        table: &RopeTable<Self>,
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()> {
        // The same buffers typed for the inner backend (a table is a few KB).
        let t = RopeTable::<B> {
            cos: self.inner.dup(&table.cos)?,
            sin: self.inner.dup(&table.sin)?,
            period: table.period,
        };
        self.inner.rope(x, &t, rows, n_heads, head_dim, inverse)
    }
    fn attention(
        &self,
        q: &B::Buf,
        k: &B::Buf,
        v: &B::Buf,
        s: &AttnShape,
    ) -> Result<(B::Buf, AttnSaved<B::Buf>)> {
        self.inner.attention(q, k, v, s)
    }
    fn attention_backward(
        &self,
        dout: &B::Buf,
        q: &B::Buf,
        k: &B::Buf,
        v: &B::Buf,
        out: &B::Buf,
        saved: &AttnSaved<B::Buf>,
        s: &AttnShape,
    ) -> Result<(B::Buf, B::Buf, B::Buf)> {
        self.inner.attention_backward(dout, q, k, v, out, saved, s)
    }
    fn swiglu(&self, gate: &B::Buf, up: &B::Buf) -> Result<B::Buf> {
        self.inner.swiglu(gate, up)
    }
    fn swiglu_backward(
        &self,
        dact: &B::Buf,
        gate: &B::Buf,
        up: &B::Buf,
    ) -> Result<(B::Buf, B::Buf)> {
        self.inner.swiglu_backward(dact, gate, up)
    }
    fn add_assign(&self, a: &mut B::Buf, b: &B::Buf) -> Result<()> {
        self.inner.add_assign(a, b)
    }
    fn reduction_input(&self, x: &B::Buf) -> Result<Option<B::Buf>> {
        self.inner.reduction_input(x)
    }
    fn gram_accumulate(
        &self,
        x: &B::Buf,
        dx: usize,
        y: &B::Buf,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut B::Buf,
    ) -> Result<()> {
        self.inner
            .gram_accumulate(x, dx, y, dy, segments, alpha, out)
    }
    fn segment_sum(
        &self,
        x: &B::Buf,
        dim: usize,
        segments: &[Segment],
        mean: bool,
    ) -> Result<B::Buf> {
        self.inner.segment_sum(x, dim, segments, mean)
    }
    fn sq_grad_accumulate(
        &self,
        g: &B::Buf,
        dg: usize,
        y: &B::Buf,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut B::Buf,
    ) -> Result<()> {
        self.inner
            .sq_grad_accumulate(g, dg, y, dy, segments, alpha, out)
    }
    fn matmul(
        &self,
        a: &B::Buf,
        b: &B::Buf,
        m: usize,
        k: usize,
        n: usize,
        ta: bool,
        tb: bool,
    ) -> Result<B::Buf> {
        self.inner.matmul(a, b, m, k, n, ta, tb)
    }
    fn dup(&self, x: &B::Buf) -> Result<B::Buf> {
        self.inner.dup(x)
    }
    fn mul_assign(&self, a: &mut B::Buf, b: &B::Buf) -> Result<()> {
        self.inner.mul_assign(a, b)
    }
    fn scale(&self, x: &mut B::Buf, k: f32) -> Result<()> {
        self.inner.scale(x, k)
    }
    fn axpy(&self, alpha: f32, x: &B::Buf, y: &mut B::Buf) -> Result<()> {
        self.inner.axpy(alpha, x, y)
    }
    fn dot(&self, x: &B::Buf, y: &B::Buf) -> Result<f64> {
        self.inner.dot(x, y)
    }
    fn dots(&self, pairs: &[(&B::Buf, &B::Buf)]) -> Result<Vec<f64>> {
        self.inner.dots(pairs)
    }
    fn adamw_step(
        &self,
        p: &mut B::Buf,
        g: &B::Buf,
        m: &mut B::Buf,
        v: &mut B::Buf,
        h: &AdamHyper,
        grad_scale: f32,
        penalty: Option<DiagPenalty<'_, Self>>,
    ) -> Result<()> {
        let penalty = penalty.map(|d| DiagPenalty::<B> {
            mean: d.mean,
            precision: d.precision,
            lambda: d.lambda,
        });
        self.inner.adamw_step(p, g, m, v, h, grad_scale, penalty)
    }
}
