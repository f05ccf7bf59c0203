//! `Reference`: every `Backend` op written as plain scalar loops in f64, one formula per
//! op, with no blocking, threading or fusion. It is what `selftest --device cpu` holds the
//! CPU backend to (comparing the CPU backend with itself could not fail), and it documents
//! what each op means. Inputs and outputs are f32, as on the real backends; everything in
//! between is f64, so the reference's own rounding is far below any bound it checks.
//!
//! Slow by design (naive loops, one thread): only the selftest's small shapes run on it.

mod attention;
mod curvature;
mod rows;

use crate::backend::group::GradFeeds;
use crate::backend::{
    AdamHyper, AttnSaved, AttnShape, Backend, CeTargets, ClassifierOut, DiagPenalty, LoraDims,
    RopeTable, Segment, unrotate_attention_grads,
};
use crate::error::{Error, Result};

pub use self::attention::lse as attention_lse;

pub struct Reference;

/// f32 -> f64, the only conversion the formulas need.
fn f(x: f32) -> f64 {
    x as f64
}

/// Rounds an f64 result to the f32 the trait returns.
fn to_f32(v: Vec<f64>) -> Vec<f32> {
    v.into_iter().map(|x| x as f32).collect()
}

/// `x += d` elementwise, for ops whose contract is "accumulate into the output".
fn add_into(x: &mut [f32], d: &[f64]) {
    for (o, v) in x.iter_mut().zip(d) {
        *o = (f(*o) + v) as f32;
    }
}

impl Backend for Reference {
    type Buf = Vec<f32>;
    type Weight = Vec<f32>;

    fn describe(&self) -> String {
        "plain f64 reference (selftest)".into()
    }

    fn buf(&self, host: Vec<f32>) -> Result<Vec<f32>> {
        Ok(host)
    }

    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn to_host(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn weight(&self, host: Vec<f32>, rows: usize, cols: usize) -> Result<Vec<f32>> {
        if host.len() != rows * cols {
            return Err(Error::usage(format!(
                "reference: weight of {} values is not {rows} x {cols}",
                host.len()
            )));
        }
        Ok(host)
    }

    fn copy_into(&self, dst: &mut Vec<f32>, offset: usize, src: &Vec<f32>) -> Result<()> {
        if offset + src.len() > dst.len() {
            return Err(Error::usage("reference: copy_into past the end"));
        }
        for (i, &v) in src.iter().enumerate() {
            dst[offset + i] = v;
        }
        Ok(())
    }

    fn slice(&self, src: &Vec<f32>, offset: usize, len: usize) -> Result<Vec<f32>> {
        if offset + len > src.len() {
            return Err(Error::usage("reference: slice past the end"));
        }
        Ok((offset..offset + len).map(|i| src[i]).collect())
    }

    fn embedding(&self, table: &Vec<f32>, ids: &[u32], dim: usize) -> Result<Vec<f32>> {
        Ok(rows::embedding(table, ids, dim))
    }

    fn rmsnorm(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(rows::rmsnorm(x, w, rows, dim, eps))
    }

    fn rmsnorm_backward(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rstd: &Vec<f32>,
        rows: usize,
        dim: usize,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        rows::rmsnorm_backward(dy, x, w, rstd, rows, dim, dx);
        Ok(())
    }

    fn linear(&self, x: &Vec<f32>, w: &Vec<f32>, m: usize, k: usize, n: usize) -> Result<Vec<f32>> {
        // y[i, o] = sum_c x[i, c] W[o, c]
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for o in 0..n {
                y[i * n + o] = (0..k).map(|c| f(x[i * k + c]) * f(w[o * k + c])).sum();
            }
        }
        Ok(to_f32(y))
    }

    fn linear_backward(
        &self,
        dy: &Vec<f32>,
        w: &Vec<f32>,
        m: usize,
        k: usize,
        n: usize,
        dx: &mut Vec<f32>,
        accumulate: bool,
    ) -> Result<()> {
        // dx[i, c] (+)= sum_o dy[i, o] W[o, c]
        let mut d = vec![0f64; m * k];
        for i in 0..m {
            for c in 0..k {
                d[i * k + c] = (0..n).map(|o| f(dy[i * n + o]) * f(w[o * k + c])).sum();
            }
        }
        if !accumulate {
            dx[..m * k].fill(0.0);
        }
        add_into(dx, &d);
        Ok(())
    }

    fn lora_forward(
        &self,
        x: &Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        d: LoraDims,
        y: &mut Vec<f32>,
    ) -> Result<Vec<f32>> {
        Ok(rows::lora_forward(x, a, b, d, y))
    }

    fn lora_backward(
        &self,
        g: &Vec<f32>,
        x: &Vec<f32>,
        u: &Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        d: LoraDims,
        dx: &mut Vec<f32>,
        grads: Option<(&mut Vec<f32>, &mut Vec<f32>)>,
    ) -> Result<Vec<f32>> {
        Ok(rows::lora_backward(g, x, u, a, b, d, dx, grads))
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        table: &RopeTable<Vec<f32>>,
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()> {
        rows::rope(x, table, rows, n_heads, head_dim, inverse);
        Ok(())
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        s: &AttnShape,
    ) -> Result<(Vec<f32>, AttnSaved<Vec<f32>>)> {
        let (out, probs) = attention::forward(q, k, v, s);
        Ok((out, AttnSaved::Probs(probs)))
    }

    fn attention_backward(
        &self,
        dout: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        _out: &Vec<f32>,
        saved: &AttnSaved<Vec<f32>>,
        rope: Option<&RopeTable<Vec<f32>>>,
        _feeds: GradFeeds,
        s: &AttnShape,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let probs = saved.probs("reference")?;
        let (mut dq, mut dk, dv) = attention::backward(dout, q, k, v, probs, s);
        if let Some(rope) = rope {
            unrotate_attention_grads(self, &mut dq, &mut dk, rope, s)?;
        }
        Ok((dq, dk, dv))
    }

    fn swiglu(&self, gate: &Vec<f32>, up: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(rows::swiglu(gate, up))
    }

    fn swiglu_backward(
        &self,
        dact: &Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        _feeds: GradFeeds,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(rows::swiglu_backward(dact, gate, up))
    }

    fn add_assign(&self, a: &mut Vec<f32>, b: &Vec<f32>) -> Result<()> {
        let d: Vec<f64> = b.iter().map(|&v| f(v)).collect();
        add_into(a, &d);
        Ok(())
    }

    fn cross_entropy(
        &self,
        logits: &Vec<f32>,
        rows: usize,
        vocab: usize,
        targets: CeTargets<'_>,
        grad_scale: Option<f32>,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let (losses, grad, _) = rows::cross_entropy(logits, rows, vocab, targets, grad_scale);
        Ok((losses, grad))
    }

    /// Unfused: the logits, the cross-entropy over them, the product back through the head.
    fn classifier(
        &self,
        hidden: &Vec<f32>,
        head: &Vec<f32>,
        rows: usize,
        dim: usize,
        vocab: usize,
        targets: CeTargets<'_>,
        grad_scale: Option<f32>,
    ) -> Result<ClassifierOut<Vec<f32>>> {
        let logits = self.linear(hidden, head, rows, dim, vocab)?;
        let (losses, dlogits, labels) =
            rows::cross_entropy(&logits, rows, vocab, targets, grad_scale);
        let dhidden = match dlogits {
            Some(d) => {
                let mut dh = vec![0f32; rows * dim];
                self.linear_backward(&d, head, rows, dim, vocab, &mut dh, false)?;
                Some(dh)
            }
            None => None,
        };
        Ok(ClassifierOut {
            losses,
            labels,
            dhidden,
        })
    }

    fn gram_accumulate(
        &self,
        x: &Vec<f32>,
        dx: usize,
        y: &Vec<f32>,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        curvature::gram_accumulate(x, dx, y, dy, segments, alpha, out);
        Ok(())
    }

    fn mirror_upper(&self, out: &mut Vec<f32>, n: usize) -> Result<()> {
        curvature::mirror_upper(out, n);
        Ok(())
    }

    fn segment_sum(
        &self,
        x: &Vec<f32>,
        dim: usize,
        segments: &[Segment],
        mean: bool,
    ) -> Result<Vec<f32>> {
        Ok(curvature::segment_sum(x, dim, segments, mean))
    }

    fn sq_grad_accumulate(
        &self,
        g: &Vec<f32>,
        dg: usize,
        y: &Vec<f32>,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        curvature::sq_grad_accumulate(g, dg, y, dy, segments, alpha, out);
        Ok(())
    }

    fn matmul(
        &self,
        a: &Vec<f32>,
        b: &Vec<f32>,
        m: usize,
        k: usize,
        n: usize,
        ta: bool,
        tb: bool,
    ) -> Result<Vec<f32>> {
        // op(A)[i, l] is A[l, i] of the stored (k, m) matrix when transposed, else A[i, l]
        // of the stored (m, k); likewise op(B)[l, j] from (n, k) or (k, n).
        let op_a = |i: usize, l: usize| f(if ta { a[l * m + i] } else { a[i * k + l] });
        let op_b = |l: usize, j: usize| f(if tb { b[j * k + l] } else { b[l * n + j] });
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| op_a(i, l) * op_b(l, j)).sum();
            }
        }
        Ok(to_f32(c))
    }

    fn dup(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn mul_assign(&self, a: &mut Vec<f32>, b: &Vec<f32>) -> Result<()> {
        for (x, &y) in a.iter_mut().zip(b) {
            *x = (f(*x) * f(y)) as f32;
        }
        Ok(())
    }

    fn scale(&self, x: &mut Vec<f32>, k: f32) -> Result<()> {
        for v in x.iter_mut() {
            *v = (f(*v) * f(k)) as f32;
        }
        Ok(())
    }

    fn axpy(&self, alpha: f32, x: &Vec<f32>, y: &mut Vec<f32>) -> Result<()> {
        let d: Vec<f64> = x.iter().map(|&v| f(alpha) * f(v)).collect();
        add_into(y, &d);
        Ok(())
    }

    fn dot(&self, x: &Vec<f32>, y: &Vec<f32>) -> Result<f64> {
        Ok(x.iter().zip(y).map(|(&a, &b)| f(a) * f(b)).sum())
    }

    fn adamw_step(
        &self,
        p: &mut Vec<f32>,
        g: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        h: &AdamHyper,
        grad_scale: f32,
        penalty: Option<DiagPenalty<'_, Self>>,
    ) -> Result<()> {
        // PyTorch's AdamW with the Laplace penalty gradient added to the scaled loss
        // gradient (taken at the weights before the step):
        //   g' = grad_scale g + lambda prec (p - mean)
        //   p <- p (1 - lr wd)                               (decoupled weight decay)
        //   m <- b1 m + (1 - b1) g',   v <- b2 v + (1 - b2) g'^2
        //   p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
        let (b1, b2) = (f(h.beta1), f(h.beta2));
        let t = h.step as i32;
        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for i in 0..p.len() {
            let mut gi = f(grad_scale) * f(g[i]);
            if let Some(pen) = &penalty {
                gi += f(pen.lambda) * f(pen.precision[i]) * (f(p[i]) - f(pen.mean[i]));
            }
            let mi = b1 * f(m[i]) + (1.0 - b1) * gi;
            let vi = b2 * f(v[i]) + (1.0 - b2) * gi * gi;
            let decayed = f(p[i]) * (1.0 - f(h.lr) * f(h.weight_decay));
            let step = f(h.lr) * (mi / bc1) / ((vi / bc2).sqrt() + f(h.eps));
            p[i] = (decayed - step) as f32;
            m[i] = mi as f32;
            v[i] = vi as f32;
        }
        Ok(())
    }
}
