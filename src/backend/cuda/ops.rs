//! `Backend` for CUDA: each op launches its hand-written kernel (or cuBLAS for the dense
//! products); the CPU twin of each is in `backend/cpu`.

use cudarc::driver::{CudaSlice, LaunchConfig};
use half::bf16;

use super::blas::{N, Operand, T, gemm};
use super::{CudaBackend, KernelArg, MAX_RANK, THREADS, cu};
use crate::backend::{
    AdamHyper, AttnShape, Backend, CeTargets, DiagPenalty, LoraDims, RopeTable, Segment,
};
use crate::error::{Error, Result};

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;
    type Weight = CudaSlice<bf16>;

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn buf(&self, host: Vec<f32>) -> Result<Self::Buf> {
        if host.is_empty() {
            return self.alloc(0);
        }
        cu(self.stream.clone_htod(&host))
    }

    fn zeros(&self, n: usize) -> Result<Self::Buf> {
        self.alloc(n)
    }

    fn to_host(&self, x: &Self::Buf) -> Result<Vec<f32>> {
        cu(self.stream.clone_dtoh(x))
    }

    fn weight(&self, host: Vec<f32>, _rows: usize, _cols: usize) -> Result<Self::Weight> {
        let b: Vec<bf16> = host.iter().map(|&x| bf16::from_f32(x)).collect();
        cu(self.stream.clone_htod(&b))
    }

    fn copy_into(&self, dst: &mut Self::Buf, offset: usize, src: &Self::Buf) -> Result<()> {
        let mut view = dst.slice_mut(offset..offset + src.len());
        cu(self.stream.memcpy_dtod(src, &mut view))
    }

    fn embedding(&self, table: &Self::Weight, ids: &[u32], dim: usize) -> Result<Self::Buf> {
        let ids = cu(self.stream.clone_htod(ids))?;
        let out = self.alloc(ids.len() * dim)?;
        let n = ids.len() * dim;
        let args: [&dyn KernelArg; 5] = [
            &self.ptr(table),
            &self.ptr(&ids),
            &self.ptr(&out),
            &(ids.len() as i32),
            &(dim as i32),
        ];
        self.launch("embedding_gather", Self::elementwise(n), &args)?;
        Ok(out)
    }

    fn rmsnorm(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(Self::Buf, Self::Buf)> {
        let (y, rstd) = (self.alloc(rows * dim)?, self.alloc(rows)?);
        let args: [&dyn KernelArg; 6] = [
            &self.ptr(x),
            &self.ptr(w),
            &self.ptr(&y),
            &self.ptr(&rstd),
            &(dim as i32),
            &eps,
        ];
        self.launch("rmsnorm_forward", Self::per_row(rows), &args)?;
        Ok((y, rstd))
    }

    fn rmsnorm_backward(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        rows: usize,
        dim: usize,
        dx: &mut Self::Buf,
    ) -> Result<()> {
        let args: [&dyn KernelArg; 6] = [
            &self.ptr(dy),
            &self.ptr(x),
            &self.ptr(w),
            &self.ptr(rstd),
            &self.ptr(dx),
            &(dim as i32),
        ];
        self.launch("rmsnorm_backward", Self::per_row(rows), &args)
    }

    fn linear(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<Self::Buf> {
        let xb = self.to_bf16(x)?;
        let y = self.alloc(m * n)?;
        gemm(
            self.h(),
            T,
            N,
            n,
            m,
            k,
            1.0,
            Operand::bf16(self.ptr(w), k),
            Operand::bf16(self.ptr(&xb), k),
            0.0,
            Operand::f32(self.ptr(&y), n),
        )?;
        Ok(y)
    }

    fn linear_backward(
        &self,
        dy: &Self::Buf,
        w: &Self::Weight,
        m: usize,
        k: usize,
        n: usize,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()> {
        let dyb = self.to_bf16(dy)?;
        let beta = if accumulate { 1.0 } else { 0.0 };
        gemm(
            self.h(),
            N,
            N,
            k,
            m,
            n,
            1.0,
            Operand::bf16(self.ptr(w), k),
            Operand::bf16(self.ptr(&dyb), n),
            beta,
            Operand::f32(self.ptr(dx), k),
        )
    }

    fn lora_forward(
        &self,
        x: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        d: LoraDims,
        y: &mut Self::Buf,
    ) -> Result<Self::Buf> {
        if d.r > MAX_RANK {
            return Err(Error::Cuda(format!(
                "LoRA rank {} exceeds the CUDA kernels' {MAX_RANK}",
                d.r
            )));
        }
        let u = self.alloc(d.m * d.r)?;
        let args: [&dyn KernelArg; 9] = [
            &self.ptr(x),
            &self.ptr(a),
            &self.ptr(b),
            &self.ptr(y),
            &self.ptr(&u),
            &(d.d_in as i32),
            &(d.r as i32),
            &(d.d_out as i32),
            &d.scale,
        ];
        self.launch("lora_forward_fused", Self::per_row(d.m), &args)?;
        Ok(u)
    }

    fn lora_backward(
        &self,
        g: &Self::Buf,
        x: &Self::Buf,
        u: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        d: LoraDims,
        dx: &mut Self::Buf,
        grads: Option<(&mut Self::Buf, &mut Self::Buf)>,
    ) -> Result<Self::Buf> {
        let ga = self.alloc(d.m * d.r)?;
        let args: [&dyn KernelArg; 9] = [
            &self.ptr(g),
            &self.ptr(a),
            &self.ptr(b),
            &self.ptr(&ga),
            &self.ptr(dx),
            &(d.d_in as i32),
            &(d.r as i32),
            &(d.d_out as i32),
            &d.scale,
        ];
        self.launch("lora_backward_rows", Self::per_row(d.m), &args)?;
        if let Some((da, db)) = grads {
            let chunks = d.m.div_ceil(32).clamp(1, 64);
            let rpc = d.m.div_ceil(chunks) as i32;
            for (narrow, wide, cols, alpha, layout_kc, out) in [
                (&ga, x, d.d_in, 1.0f32, 1i32, da),
                (u, g, d.d_out, d.scale, 0i32, db),
            ] {
                let partial = self.alloc(chunks * cols * d.r)?;
                let cfg = LaunchConfig {
                    grid_dim: (cols.div_ceil(THREADS as usize) as u32, chunks as u32, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                let args: [&dyn KernelArg; 9] = [
                    &self.ptr(narrow),
                    &self.ptr(wide),
                    &self.ptr(&partial),
                    &(d.m as i32),
                    &(cols as i32),
                    &(d.r as i32),
                    &rpc,
                    &alpha,
                    &layout_kc,
                ];
                self.launch("lora_grad_chunk", cfg, &args)?;
                let n = cols * d.r;
                let args: [&dyn KernelArg; 4] = [
                    &self.ptr(&partial),
                    &self.ptr(out),
                    &(chunks as i32),
                    &(n as u64),
                ];
                self.launch("reduce_partials", Self::elementwise(n), &args)?;
            }
        }
        Ok(ga)
    }

    fn rope(
        &self,
        x: &mut Self::Buf,
        t: &RopeTable<Self>,
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()> {
        let sign: f32 = if inverse { -1.0 } else { 1.0 };
        let args: [&dyn KernelArg; 8] = [
            &self.ptr(x),
            &self.ptr(&t.cos),
            &self.ptr(&t.sin),
            &(rows as i32),
            &(n_heads as i32),
            &(head_dim as i32),
            &(t.period as i32),
            &sign,
        ];
        self.launch(
            "rope",
            Self::elementwise(rows * n_heads * head_dim / 2),
            &args,
        )
    }

    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        s: &AttnShape,
    ) -> Result<(Self::Buf, Self::Buf)> {
        self.attention_impl(q, k, v, s)
    }

    fn attention_backward(
        &self,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        probs: &Self::Buf,
        s: &AttnShape,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)> {
        self.attention_backward_impl(dout, q, k, v, probs, s)
    }

    fn swiglu(&self, gate: &Self::Buf, up: &Self::Buf) -> Result<Self::Buf> {
        let n = gate.len();
        let out = self.alloc(n)?;
        let args: [&dyn KernelArg; 4] =
            [&self.ptr(gate), &self.ptr(up), &self.ptr(&out), &(n as u64)];
        self.launch("swiglu_forward", Self::elementwise(n), &args)?;
        Ok(out)
    }

    fn swiglu_backward(
        &self,
        dact: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
    ) -> Result<(Self::Buf, Self::Buf)> {
        let n = gate.len();
        let (dg, du) = (self.alloc(n)?, self.alloc(n)?);
        let args: [&dyn KernelArg; 6] = [
            &self.ptr(dact),
            &self.ptr(gate),
            &self.ptr(up),
            &self.ptr(&dg),
            &self.ptr(&du),
            &(n as u64),
        ];
        self.launch("swiglu_backward", Self::elementwise(n), &args)?;
        Ok((dg, du))
    }

    fn add_assign(&self, a: &mut Self::Buf, b: &Self::Buf) -> Result<()> {
        let n = a.len();
        self.launch(
            "add_assign",
            Self::elementwise(n),
            &[&self.ptr(a), &self.ptr(b), &(n as u64)],
        )
    }

    fn cross_entropy(
        &self,
        logits: &Self::Buf,
        rows: usize,
        vocab: usize,
        targets: CeTargets<'_>,
        grad_scale: Option<f32>,
    ) -> Result<(Vec<f32>, Option<Self::Buf>)> {
        let (t, seed, sample) = match targets {
            CeTargets::Labels(t) => (t, 0u64, 0i32),
            CeTargets::Sample { mask, seed } => (mask, seed, 1),
        };
        let t = self.ints(t)?;
        let losses = self.alloc(rows)?;
        let d = self.alloc(if grad_scale.is_some() {
            rows * vocab
        } else {
            1
        })?;
        let args: [&dyn KernelArg; 9] = [
            &self.ptr(logits),
            &self.ptr(&t),
            &self.ptr(&losses),
            &self.ptr(&d),
            &(vocab as i32),
            &grad_scale.unwrap_or(0.0),
            &(grad_scale.is_some() as i32),
            &seed,
            &sample,
        ];
        self.launch("cross_entropy", Self::per_row(rows), &args)?;
        let mut l = self.to_host(&losses)?;
        l.truncate(rows);
        Ok((l, grad_scale.map(|_| d)))
    }

    fn gram_accumulate(
        &self,
        x: &Self::Buf,
        dx: usize,
        y: &Self::Buf,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut Self::Buf,
    ) -> Result<()> {
        let symmetric = self.ptr(x) == self.ptr(y) && dx == dy;
        let mut merged: Vec<Segment> = Vec::new();
        for s in segments.iter().filter(|s| s.len > 0) {
            match merged.last_mut() {
                Some(l) if l.start + l.len == s.start => l.len += s.len,
                _ => merged.push(*s),
            }
        }
        let cfg = LaunchConfig {
            grid_dim: (dy.div_ceil(64) as u32, dx.div_ceil(64) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        for s in merged {
            let args: [&dyn KernelArg; 9] = [
                &self.ptr(x),
                &self.ptr(y),
                &self.ptr(out),
                &(s.start as i32),
                &(s.len as i32),
                &(dx as i32),
                &(dy as i32),
                &alpha,
                &(symmetric as i32),
            ];
            self.launch("gram_accumulate", cfg, &args)?;
        }
        if symmetric {
            self.launch(
                "mirror_upper",
                Self::elementwise(dx * dx),
                &[&self.ptr(out), &(dx as i32)],
            )?;
        }
        Ok(())
    }

    fn segment_sum(
        &self,
        x: &Self::Buf,
        dim: usize,
        segments: &[Segment],
        mean: bool,
    ) -> Result<Self::Buf> {
        let (st, ln) = self.segments(segments)?;
        let out = self.alloc(segments.len() * dim)?;
        let args: [&dyn KernelArg; 7] = [
            &self.ptr(x),
            &self.ptr(&st),
            &self.ptr(&ln),
            &(segments.len() as i32),
            &(dim as i32),
            &(mean as i32),
            &self.ptr(&out),
        ];
        self.launch(
            "segment_sum",
            Self::elementwise(segments.len() * dim),
            &args,
        )?;
        Ok(out)
    }

    fn sq_grad_accumulate(
        &self,
        g: &Self::Buf,
        dg: usize,
        y: &Self::Buf,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut Self::Buf,
    ) -> Result<()> {
        // The rank-sized side stays in registers; the other side gets one thread per column.
        let (narrow, wide, r, wide_dim, narrow_first) = if dg <= MAX_RANK && dg <= dy {
            (g, y, dg, dy, 1i32)
        } else if dy <= MAX_RANK {
            (y, g, dy, dg, 0i32)
        } else {
            return Err(Error::Cuda(format!(
                "per-sample squaring needs one side <= {MAX_RANK} (got {dg} x {dy})"
            )));
        };
        let (st, ln) = self.segments(segments)?;
        let cfg = LaunchConfig {
            grid_dim: (wide_dim.div_ceil(THREADS as usize) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let args: [&dyn KernelArg; 10] = [
            &self.ptr(narrow),
            &self.ptr(wide),
            &self.ptr(&st),
            &self.ptr(&ln),
            &(segments.len() as i32),
            &(r as i32),
            &(wide_dim as i32),
            &alpha,
            &narrow_first,
            &self.ptr(out),
        ];
        self.launch("sq_grad_accumulate", cfg, &args)
    }

    fn matmul(
        &self,
        a: &Self::Buf,
        b: &Self::Buf,
        m: usize,
        k: usize,
        n: usize,
        ta: bool,
        tb: bool,
    ) -> Result<Self::Buf> {
        // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
        let c = self.alloc(m * n)?;
        let (opb, ldb) = if tb { (T, k) } else { (N, n) };
        let (opa, lda) = if ta { (T, m) } else { (N, k) };
        gemm(
            self.h(),
            opb,
            opa,
            n,
            m,
            k,
            1.0,
            Operand::f32(self.ptr(b), ldb),
            Operand::f32(self.ptr(a), lda),
            0.0,
            Operand::f32(self.ptr(&c), n),
        )?;
        Ok(c)
    }

    fn dup(&self, x: &Self::Buf) -> Result<Self::Buf> {
        cu(self.stream.clone_dtod(x))
    }

    fn mul_assign(&self, a: &mut Self::Buf, b: &Self::Buf) -> Result<()> {
        let n = a.len();
        self.launch(
            "mul_assign",
            Self::elementwise(n),
            &[&self.ptr(a), &self.ptr(b), &(n as u64)],
        )
    }

    fn scale(&self, x: &mut Self::Buf, k: f32) -> Result<()> {
        let n = x.len();
        self.launch(
            "scale",
            Self::elementwise(n),
            &[&self.ptr(x), &k, &(n as u64)],
        )
    }

    fn axpy(&self, alpha: f32, x: &Self::Buf, y: &mut Self::Buf) -> Result<()> {
        let n = x.len();
        self.launch(
            "axpy",
            Self::elementwise(n),
            &[&alpha, &self.ptr(x), &self.ptr(y), &(n as u64)],
        )
    }

    fn dot(&self, x: &Self::Buf, y: &Self::Buf) -> Result<f64> {
        let n = x.len();
        let cfg = Self::elementwise(n);
        let blocks = cfg.grid_dim.0 as usize;
        let partial = cu(self.stream.alloc_zeros::<f64>(blocks))?;
        self.launch(
            "dot_partial",
            cfg,
            &[&self.ptr(x), &self.ptr(y), &self.ptr(&partial), &(n as u64)],
        )?;
        Ok(cu(self.stream.clone_dtoh(&partial))?.iter().sum())
    }

    fn adamw_step(
        &self,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        h: &AdamHyper,
        grad_scale: f32,
        penalty: Option<DiagPenalty<'_, Self>>,
    ) -> Result<()> {
        let n = p.len();
        let bc1 = 1.0 - h.beta1.powi(h.step as i32);
        let bc2 = 1.0 - h.beta2.powi(h.step as i32);
        let (mean, prec, lambda, on) = match &penalty {
            Some(d) => (self.ptr(d.mean), self.ptr(d.precision), d.lambda, 1i32),
            None => (self.ptr(g), self.ptr(g), 0.0, 0i32),
        };
        let args: [&dyn KernelArg; 17] = [
            &self.ptr(p),
            &self.ptr(g),
            &self.ptr(m),
            &self.ptr(v),
            &(n as u64),
            &h.lr,
            &h.beta1,
            &h.beta2,
            &h.eps,
            &h.weight_decay,
            &bc1,
            &bc2,
            &grad_scale,
            &mean,
            &prec,
            &lambda,
            &on,
        ];
        self.launch("adamw_step", Self::elementwise(n), &args)
    }
}
