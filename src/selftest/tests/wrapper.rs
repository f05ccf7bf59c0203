//! A backend for the tests: the CPU backend with, optionally, one op's outputs scaled by
//! `1 + 1e-3` (a wrong kernel) and base weights and base-GEMM inputs rounded to bf16 (a
//! correct bf16 device).

use crate::backend::cpu::CpuBackend;
use crate::backend::cpu::weight::CpuWeight;
use crate::backend::group::{self, GradFeeds, LoraBwd, LoraGroup, ProjBwd, ProjFwd, Projected};
use crate::backend::{
    AdamHyper, AttnSaved, AttnShape, Backend, CeTargets, ClassifierOut, DiagPenalty, LoraDims,
    RopeTable, Segment, unrotate_attention_grads,
};
use crate::error::Result;

/// The relative error a fault puts into its op's outputs: 10x the f32 bound.
const FAULT: f32 = 1e-3;

pub struct Wrapped {
    inner: CpuBackend,
    /// The `Backend` op whose outputs are wrong, or `"sampling"`: the Monte-Carlo labels
    /// of the first two active rows move to the next label (`cross_entropy`'s gradient,
    /// `classifier`'s labels).
    fault: Option<&'static str>,
    bf16: bool,
}

impl Wrapped {
    pub fn faulty(op: &'static str) -> Self {
        Wrapped {
            inner: CpuBackend::new(2),
            fault: Some(op),
            bf16: false,
        }
    }

    pub fn bf16() -> Self {
        Wrapped {
            inner: CpuBackend::new(2),
            fault: None,
            bf16: true,
        }
    }

    fn hit(&self, op: &str, xs: &mut [&mut Vec<f32>]) {
        if self.fault == Some(op) {
            for x in xs.iter_mut() {
                x.iter_mut().for_each(|v| *v *= 1.0 + FAULT);
            }
        }
    }

    /// An input of a bf16 GEMM, as the device would read it.
    fn gemm_input(&self, x: &[f32]) -> Vec<f32> {
        if self.bf16 {
            x.iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect()
        } else {
            x.to_vec()
        }
    }
}

impl Backend for Wrapped {
    type Buf = Vec<f32>;
    type Weight = CpuWeight;

    fn describe(&self) -> String {
        format!("cpu, fault {:?}, bf16 {}", self.fault, self.bf16)
    }
    fn buf(&self, host: Vec<f32>) -> Result<Vec<f32>> {
        self.inner.buf(host)
    }
    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        self.inner.zeros(n)
    }
    fn to_host(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        self.inner.to_host(x)
    }
    fn weight(&self, host: Vec<f32>, rows: usize, cols: usize) -> Result<CpuWeight> {
        self.inner.weight(self.gemm_input(&host), rows, cols)
    }
    fn copy_into(&self, dst: &mut Vec<f32>, offset: usize, src: &Vec<f32>) -> Result<()> {
        self.inner.copy_into(dst, offset, src)?;
        self.hit("copy_into", &mut [dst]);
        Ok(())
    }
    fn slice(&self, src: &Vec<f32>, offset: usize, len: usize) -> Result<Vec<f32>> {
        let mut y = self.inner.slice(src, offset, len)?;
        self.hit("slice", &mut [&mut y]);
        Ok(y)
    }
    fn embedding(&self, table: &CpuWeight, ids: &[u32], dim: usize) -> Result<Vec<f32>> {
        let mut y = self.inner.embedding(table, ids, dim)?;
        self.hit("embedding", &mut [&mut y]);
        Ok(y)
    }
    fn rmsnorm(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut y, mut r) = self.inner.rmsnorm(x, w, rows, dim, eps)?;
        self.hit("rmsnorm", &mut [&mut y, &mut r]);
        Ok((y, r))
    }
    fn add_rmsnorm(
        &self,
        h: &mut Vec<f32>,
        delta: &Vec<f32>,
        w: &Vec<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut y, mut r) = self.inner.add_rmsnorm(h, delta, w, rows, dim, eps)?;
        self.hit("add_rmsnorm", &mut [h, &mut y, &mut r]);
        Ok((y, r))
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
        self.inner.rmsnorm_backward(dy, x, w, rstd, rows, dim, dx)?;
        self.hit("rmsnorm_backward", &mut [dx]);
        Ok(())
    }
    fn linear(
        &self,
        x: &Vec<f32>,
        w: &CpuWeight,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<Vec<f32>> {
        let mut y = self.inner.linear(&self.gemm_input(x), w, m, k, n)?;
        self.hit("linear", &mut [&mut y]);
        Ok(y)
    }
    fn linear_backward(
        &self,
        dy: &Vec<f32>,
        w: &CpuWeight,
        m: usize,
        k: usize,
        n: usize,
        dx: &mut Vec<f32>,
        accumulate: bool,
    ) -> Result<()> {
        self.inner
            .linear_backward(&self.gemm_input(dy), w, m, k, n, dx, accumulate)?;
        self.hit("linear_backward", &mut [dx]);
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
        let mut u = self.inner.lora_forward(x, a, b, d, y)?;
        self.hit("lora_forward", &mut [y, &mut u]);
        Ok(u)
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
        match grads {
            Some((da, db)) => {
                let mut ga =
                    self.inner
                        .lora_backward(g, x, u, a, b, d, dx, Some((&mut *da, &mut *db)))?;
                self.hit("lora_backward", &mut [&mut ga, dx, da, db]);
                Ok(ga)
            }
            None => {
                let mut ga = self.inner.lora_backward(g, x, u, a, b, d, dx, None)?;
                self.hit("lora_backward", &mut [&mut ga, dx]);
                Ok(ga)
            }
        }
    }
    /// The per-projection sequence on this backend (so that a fault in `linear` or
    /// `lora_forward` reaches the group, as it would a device's fused group built from
    /// them), then the group's own fault on every output.
    fn project_group(
        &self,
        x: &Vec<f32>,
        m: usize,
        d_in: usize,
        lora: LoraGroup,
        projs: &[ProjFwd<'_, Self>],
    ) -> Result<Vec<Projected<Vec<f32>>>> {
        let mut out = group::unfused_forward(self, x, m, d_in, lora, projs, |x, a, b, d, y| {
            self.lora_forward(x, a, b, d, y)
        })?;
        for (y, u) in &mut out {
            self.hit("project_group", &mut [y]);
            if let Some(u) = u {
                self.hit("project_group", &mut [u]);
            }
        }
        Ok(out)
    }
    /// The per-projection sequence on this backend, then the group's own fault on `dx`,
    /// every `gA` and the weight gradients.
    fn project_group_backward(
        &self,
        x: &Vec<f32>,
        m: usize,
        d_in: usize,
        lora: LoraGroup,
        mut projs: Vec<ProjBwd<'_, Self>>,
        dx: &mut Vec<f32>,
        accumulate: bool,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let reborrowed: Vec<ProjBwd<'_, Self>> = projs
            .iter_mut()
            .map(|p| ProjBwd {
                w: p.w,
                d_out: p.d_out,
                g: p.g,
                lora: p.lora.as_mut().map(|l| LoraBwd {
                    a: l.a,
                    b: l.b,
                    u: l.u,
                    grads: l.grads.as_mut().map(|(da, db)| (&mut **da, &mut **db)),
                }),
            })
            .collect();
        let mut gas = group::unfused_backward(
            self,
            x,
            m,
            d_in,
            lora,
            reborrowed,
            dx,
            accumulate,
            |g, x, u, a, b, d, dx, grads| self.lora_backward(g, x, u, a, b, d, dx, grads),
        )?;
        let mut outs: Vec<&mut Vec<f32>> = vec![dx];
        outs.extend(gas.iter_mut().flatten());
        for p in &mut projs {
            if let Some(LoraBwd {
                grads: Some((da, db)),
                ..
            }) = p.lora.as_mut()
            {
                outs.push(&mut **da);
                outs.push(&mut **db);
            }
        }
        self.hit("project_group_backward", &mut outs);
        Ok(gas)
    }
    fn rope(
        &self,
        x: &mut Vec<f32>,
        t: &RopeTable<Vec<f32>>,
        rows: usize,
        heads: usize,
        hd: usize,
        inverse: bool,
    ) -> Result<()> {
        self.inner.rope(x, t, rows, heads, hd, inverse)?;
        self.hit("rope", &mut [x]);
        Ok(())
    }
    fn attention(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        s: &AttnShape,
    ) -> Result<(Vec<f32>, AttnSaved<Vec<f32>>)> {
        let (mut o, mut saved) = self.inner.attention(q, k, v, s)?;
        let (AttnSaved::Probs(p) | AttnSaved::Lse(p)) = &mut saved;
        self.hit("attention", &mut [&mut o, p]);
        Ok((o, saved))
    }
    /// The backward, then RoPE's inverse on this backend (so that a fault in `rope`
    /// reaches dq and dk, as it would a device's fused unrotation), then its own fault.
    fn attention_backward(
        &self,
        dout: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &Vec<f32>,
        saved: &AttnSaved<Vec<f32>>,
        rope: Option<&RopeTable<Vec<f32>>>,
        feeds: GradFeeds,
        s: &AttnShape,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (mut dq, mut dk, mut dv) = self
            .inner
            .attention_backward(dout, q, k, v, out, saved, None, feeds, s)?;
        if let Some(rope) = rope {
            unrotate_attention_grads(self, &mut dq, &mut dk, rope, s)?;
        }
        self.hit("attention_backward", &mut [&mut dq, &mut dk, &mut dv]);
        Ok((dq, dk, dv))
    }
    fn swiglu(&self, gate: &Vec<f32>, up: &Vec<f32>) -> Result<Vec<f32>> {
        let mut y = self.inner.swiglu(gate, up)?;
        self.hit("swiglu", &mut [&mut y]);
        Ok(y)
    }
    fn swiglu_backward(
        &self,
        dact: &Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        feeds: GradFeeds,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut dg, mut du) = self.inner.swiglu_backward(dact, gate, up, feeds)?;
        self.hit("swiglu_backward", &mut [&mut dg, &mut du]);
        Ok((dg, du))
    }
    fn add_assign(&self, a: &mut Vec<f32>, b: &Vec<f32>) -> Result<()> {
        self.inner.add_assign(a, b)?;
        self.hit("add_assign", &mut [a]);
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
        let (mut l, mut d) = self
            .inner
            .cross_entropy(logits, rows, vocab, targets, grad_scale)?;
        match d.as_mut() {
            Some(d) => self.hit("cross_entropy", &mut [&mut l, d]),
            None => self.hit("cross_entropy", &mut [&mut l]),
        }
        if let (Some("sampling"), CeTargets::Sample { mask, .. }, Some(d), Some(s)) =
            (self.fault, targets, d.as_mut(), grad_scale)
        {
            for r in (0..rows).filter(|&r| mask[r] >= 0).take(2) {
                let row = &mut d[r * vocab..(r + 1) * vocab];
                let t = (0..vocab)
                    .min_by(|&a, &b| row[a].total_cmp(&row[b]))
                    .unwrap_or(0);
                row[t] += s;
                row[(t + 1) % vocab] -= s;
            }
        }
        Ok((l, d))
    }
    fn classifier(
        &self,
        hidden: &Vec<f32>,
        head: &CpuWeight,
        rows: usize,
        dim: usize,
        vocab: usize,
        targets: CeTargets<'_>,
        grad_scale: Option<f32>,
    ) -> Result<ClassifierOut<Vec<f32>>> {
        let mut out = self.inner.classifier(
            &self.gemm_input(hidden),
            head,
            rows,
            dim,
            vocab,
            targets,
            grad_scale,
        )?;
        match out.dhidden.as_mut() {
            Some(d) => self.hit("classifier", &mut [&mut out.losses, d]),
            None => self.hit("classifier", &mut [&mut out.losses]),
        }
        if let (Some("sampling"), CeTargets::Sample { .. }) = (self.fault, targets) {
            for l in out.labels.iter_mut().filter(|l| **l >= 0).take(2) {
                *l = (*l + 1) % vocab as i32;
            }
        }
        Ok(out)
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
        self.inner
            .gram_accumulate(x, dx, y, dy, segments, alpha, out)?;
        self.hit("gram_accumulate", &mut [out]);
        Ok(())
    }
    fn gram_accumulate_upper(
        &self,
        x: &Vec<f32>,
        d: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        self.inner
            .gram_accumulate_upper(x, d, segments, alpha, out)?;
        self.hit("gram_accumulate_upper", &mut [out]);
        Ok(())
    }
    fn mirror_upper(&self, out: &mut Vec<f32>, n: usize) -> Result<()> {
        self.inner.mirror_upper(out, n)?;
        self.hit("mirror_upper", &mut [out]);
        Ok(())
    }
    fn segment_sum(
        &self,
        x: &Vec<f32>,
        dim: usize,
        segments: &[Segment],
        mean: bool,
    ) -> Result<Vec<f32>> {
        let mut y = self.inner.segment_sum(x, dim, segments, mean)?;
        self.hit("segment_sum", &mut [&mut y]);
        Ok(y)
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
        self.inner
            .sq_grad_accumulate(g, dg, y, dy, segments, alpha, out)?;
        self.hit("sq_grad_accumulate", &mut [out]);
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
        let mut c = self.inner.matmul(a, b, m, k, n, ta, tb)?;
        self.hit("matmul", &mut [&mut c]);
        Ok(c)
    }
    fn dup(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        let mut y = self.inner.dup(x)?;
        self.hit("dup", &mut [&mut y]);
        Ok(y)
    }
    fn mul_assign(&self, a: &mut Vec<f32>, b: &Vec<f32>) -> Result<()> {
        self.inner.mul_assign(a, b)?;
        self.hit("mul_assign", &mut [a]);
        Ok(())
    }
    fn scale(&self, x: &mut Vec<f32>, k: f32) -> Result<()> {
        self.inner.scale(x, k)?;
        self.hit("scale", &mut [x]);
        Ok(())
    }
    fn axpy(&self, alpha: f32, x: &Vec<f32>, y: &mut Vec<f32>) -> Result<()> {
        self.inner.axpy(alpha, x, y)?;
        self.hit("axpy", &mut [y]);
        Ok(())
    }
    fn dot(&self, x: &Vec<f32>, y: &Vec<f32>) -> Result<f64> {
        let d = self.inner.dot(x, y)?;
        Ok(if self.fault == Some("dot") {
            d * (1.0 + FAULT as f64)
        } else {
            d
        })
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
        let pen = penalty.map(|d| DiagPenalty::<CpuBackend> {
            mean: d.mean,
            precision: d.precision,
            lambda: d.lambda,
        });
        self.inner.adamw_step(p, g, m, v, h, grad_scale, pen)?;
        self.hit("adamw_step", &mut [p, m, v]);
        Ok(())
    }
}
