//! `Backend` for CUDA: each op launches its hand-written kernel (or cuBLAS for the dense
//! products); the CPU twin of each is in `backend/cpu`.

use half::bf16;

use super::blas::{N, Operand, T};
use super::runtime::{Arg, DType, LaunchConfig};
use super::{Act, BaseDtype, CudaBackend, MAX_RANK, THREADS, Weight};
use crate::backend::group::{GradFeeds, LoraGroup, ProjBwd, ProjFwd, Projected};
use crate::backend::{
    AdamHyper, AttnSaved, AttnShape, Backend, CeTargets, ClassifierOut, DiagPenalty, LoraDims,
    RopeTable, Segment,
};
use crate::error::{Error, Result};

impl Backend for CudaBackend {
    type Buf = Act;
    type Weight = Weight;

    fn describe(&self) -> String {
        format!("{}, base weights {}", self.rt.describe(), self.base.name())
    }

    fn buf(&self, host: Vec<f32>) -> Result<Self::Buf> {
        Ok(self.upload(&host)?.into())
    }

    fn zeros(&self, n: usize) -> Result<Self::Buf> {
        Ok(self.zeroed(n)?.into())
    }

    fn to_host(&self, x: &Self::Buf) -> Result<Vec<f32>> {
        match x {
            Act::F32(b) => self.download(b),
            // Widening is exact: the values the device holds, as f32.
            Act::Bf16(b) => Ok(self
                .download(b)?
                .into_iter()
                .map(|h| bf16::from_bits(h).to_f32())
                .collect()),
        }
    }

    fn weight(&self, host: Vec<f32>, _rows: usize, _cols: usize) -> Result<Self::Weight> {
        Ok(match self.base {
            BaseDtype::Bf16 => {
                let b: Vec<u16> = host.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
                Weight {
                    buf: self.upload(bytemuck::cast_slice::<u16, u8>(&b))?,
                    ty: DType::Bf16,
                }
            }
            BaseDtype::F32 => Weight {
                buf: self.upload(bytemuck::cast_slice::<f32, u8>(&host))?,
                ty: DType::F32,
            },
        })
    }

    fn copy_into(&self, dst: &mut Self::Buf, offset: usize, src: &Self::Buf) -> Result<()> {
        if offset + src.len() > dst.len() || src.dtype() != dst.dtype() {
            return Err(Error::Device(format!(
                "copy of {} {:?} elements at {offset} into a buffer of {} {:?}",
                src.len(),
                src.dtype(),
                dst.len(),
                dst.dtype()
            )));
        }
        let e = src.elem_bytes();
        self.rt
            .dtod(dst.addr() + (offset * e) as u64, src.addr(), src.len() * e)
    }

    fn slice(&self, src: &Self::Buf, offset: usize, len: usize) -> Result<Self::Buf> {
        if offset + len > src.len() {
            return Err(Error::Device(format!(
                "slice of {len} elements at {offset} from a buffer of {}",
                src.len()
            )));
        }
        let out = self.uninit_act(len, src.dtype())?;
        let e = src.elem_bytes();
        self.rt
            .dtod(out.addr(), src.addr() + (offset * e) as u64, len * e)?;
        Ok(out)
    }

    fn embedding(&self, table: &Self::Weight, ids: &[u32], dim: usize) -> Result<Self::Buf> {
        let ids_d = self.upload(ids)?;
        let n = ids.len() * dim;
        let out = self.uninit::<f32>(n)?;
        // Rows of whole 128-bit packs (8 bf16 or 4 f32 values) go a pack per thread.
        let (kernel, width) = match table.ty {
            DType::Bf16 => ("embedding_gather", 8),
            DType::F32 => ("embedding_gather_f32", 4),
        };
        let width = if dim.is_multiple_of(width) { width } else { 1 };
        let args = [
            Arg::U64(table.ptr()),
            Arg::U64(ids_d.ptr()),
            Arg::U64(out.ptr()),
            Arg::I32(ids.len() as i32),
            Arg::I32(dim as i32),
        ];
        self.launch(kernel, Self::packed(n, width), &args)?;
        Ok(out.into())
    }

    fn rmsnorm(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(Self::Buf, Self::Buf)> {
        let y = self.uninit_act(rows * dim, self.act_dtype())?;
        let rstd = self.uninit::<f32>(rows)?;
        let args = [
            Arg::U64(x.f32()?.ptr()),
            Arg::U64(w.f32()?.ptr()),
            Arg::U64(y.addr()),
            Arg::U64(rstd.ptr()),
            Arg::I32(dim as i32),
            Arg::F32(eps),
        ];
        let kernel = match y.dtype() {
            DType::F32 => "rmsnorm_forward_f32",
            DType::Bf16 => "rmsnorm_forward_bf16",
        };
        self.launch(kernel, Self::per_row(rows), &args)?;
        Ok((y, rstd.into()))
    }

    fn add_rmsnorm(
        &self,
        h: &mut Self::Buf,
        delta: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(Self::Buf, Self::Buf)> {
        let n = rows * dim;
        if h.len() < n || delta.len() < n || w.len() < dim {
            return Err(Error::Device(format!(
                "add_rmsnorm of {rows}x{dim} on buffers of {}, {} and a weight of {}",
                h.len(),
                delta.len(),
                w.len()
            )));
        }
        let y = self.uninit_act(n, self.act_dtype())?;
        let rstd = self.uninit::<f32>(rows)?;
        let args = [
            Arg::U64(h.f32_mut()?.ptr()),
            Arg::U64(delta.f32()?.ptr()),
            Arg::U64(w.f32()?.ptr()),
            Arg::U64(y.addr()),
            Arg::U64(rstd.ptr()),
            Arg::I32(dim as i32),
            Arg::F32(eps),
        ];
        let kernel = match y.dtype() {
            DType::F32 => "add_rmsnorm_forward_f32",
            DType::Bf16 => "add_rmsnorm_forward_bf16",
        };
        self.launch(kernel, Self::per_row(rows), &args)?;
        Ok((y, rstd.into()))
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
        let args = [
            Arg::U64(dy.f32()?.ptr()),
            Arg::U64(x.f32()?.ptr()),
            Arg::U64(w.f32()?.ptr()),
            Arg::U64(rstd.f32()?.ptr()),
            Arg::U64(dx.f32_mut()?.ptr()),
            Arg::I32(dim as i32),
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
        let y = self.uninit::<f32>(m * n)?;
        // bf16 weights multiply bf16 activations (cuBLAS takes one input type): a bf16
        // activation as it is stored, an f32 one rounded first.
        let xb = match (w.ty, x) {
            (DType::Bf16, Act::F32(x)) => Some(self.to_bf16(x)?),
            (DType::Bf16, Act::Bf16(_)) => None,
            (DType::F32, x) => {
                x.f32()?;
                None
            }
        };
        let xp = xb.as_ref().map_or(x.addr(), |b| b.ptr());
        self.gemm(
            T,
            N,
            n,
            m,
            k,
            1.0,
            Operand::typed(w.ptr(), w.ty, k),
            Operand::typed(xp, w.ty, k),
            0.0,
            Operand::f32(y.ptr(), n),
        )?;
        Ok(y.into())
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
        // dy is f32 here (the model's bf16 gradients go to `project_group_backward`); the
        // bf16 GEMM reads it rounded.
        let dy = dy.f32()?;
        let dyb = match w.ty {
            DType::Bf16 => Some(self.to_bf16(dy)?),
            DType::F32 => None,
        };
        let dp = dyb.as_ref().map_or(dy.ptr(), |b| b.ptr());
        let beta = if accumulate { 1.0 } else { 0.0 };
        self.gemm(
            N,
            N,
            k,
            m,
            n,
            1.0,
            Operand::typed(w.ptr(), w.ty, k),
            Operand::typed(dp, w.ty, n),
            beta,
            Operand::f32(dx.f32_mut()?.ptr(), k),
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
        check_rank(d.r)?;
        let u = self.uninit::<f32>(d.m * d.r)?;
        let args = [
            Arg::U64(x.addr()),
            Arg::U64(a.f32()?.ptr()),
            Arg::U64(b.f32()?.ptr()),
            Arg::U64(y.f32_mut()?.ptr()),
            Arg::U64(u.ptr()),
            Arg::I32(d.d_in as i32),
            Arg::I32(d.r as i32),
            Arg::I32(d.d_out as i32),
            Arg::F32(d.scale),
        ];
        let kernel = match x.dtype() {
            DType::F32 => "lora_forward_fused_f32",
            DType::Bf16 => "lora_forward_fused_bf16",
        };
        self.launch(kernel, Self::per_row(d.m), &args)?;
        Ok(u.into())
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
        check_rank(d.r)?;
        let (g, u, a, b) = (g.f32()?, u.f32()?, a.f32()?, b.f32()?);
        let ga = self.uninit::<f32>(d.m * d.r)?;
        let args = [
            Arg::U64(g.ptr()),
            Arg::U64(a.ptr()),
            Arg::U64(b.ptr()),
            Arg::U64(ga.ptr()),
            Arg::U64(dx.f32_mut()?.ptr()),
            Arg::I32(d.d_in as i32),
            Arg::I32(d.r as i32),
            Arg::I32(d.d_out as i32),
            Arg::F32(d.scale),
        ];
        self.launch("lora_backward_rows", Self::per_row(d.m), &args)?;
        if let Some((da, db)) = grads {
            let x = self.wide(x)?;
            let (da, db) = (da.f32_mut()?, db.f32_mut()?);
            let chunks = d.m.div_ceil(32).clamp(1, 64);
            let rpc = d.m.div_ceil(chunks) as i32;
            for (narrow, wide, cols, alpha, layout_kc, out) in [
                (&ga, &*x, d.d_in, 1.0f32, 1i32, da),
                (u, g, d.d_out, d.scale, 0i32, db),
            ] {
                let partial = self.uninit::<f32>(chunks * cols * d.r)?;
                let cfg = LaunchConfig {
                    grid: [cols.div_ceil(THREADS as usize) as u32, chunks as u32, 1],
                    block: [THREADS, 1, 1],
                    shared_bytes: 0,
                };
                let args = [
                    Arg::U64(narrow.ptr()),
                    Arg::U64(wide.ptr()),
                    Arg::U64(partial.ptr()),
                    Arg::I32(d.m as i32),
                    Arg::I32(cols as i32),
                    Arg::I32(d.r as i32),
                    Arg::I32(rpc),
                    Arg::F32(alpha),
                    Arg::I32(layout_kc),
                ];
                self.launch("lora_grad_chunk", cfg, &args)?;
                let n = cols * d.r;
                let args = [
                    Arg::U64(partial.ptr()),
                    Arg::U64(out.ptr()),
                    Arg::I32(chunks as i32),
                    Arg::U64(n as u64),
                ];
                self.launch("reduce_partials", Self::elementwise(n), &args)?;
            }
        }
        Ok(ga.into())
    }

    fn project_group(
        &self,
        x: &Self::Buf,
        m: usize,
        d_in: usize,
        lora: LoraGroup,
        projs: &[ProjFwd<'_, Self>],
    ) -> Result<Vec<Projected<Self::Buf>>> {
        self.project_group_impl(x, m, d_in, lora, projs)
    }

    fn project_group_backward(
        &self,
        x: &Self::Buf,
        m: usize,
        d_in: usize,
        lora: LoraGroup,
        projs: Vec<ProjBwd<'_, Self>>,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<Vec<Option<Self::Buf>>> {
        self.project_group_backward_impl(x, m, d_in, lora, projs, dx, accumulate)
    }

    fn rope(
        &self,
        x: &mut Self::Buf,
        t: &RopeTable<Act>,
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()> {
        let sign: f32 = if inverse { -1.0 } else { 1.0 };
        // In place on x as stored: q and k with bf16 base weights are bf16.
        let args = [
            Arg::U64(x.addr()),
            Arg::U64(t.cos.f32()?.ptr()),
            Arg::U64(t.sin.f32()?.ptr()),
            Arg::I32(rows as i32),
            Arg::I32(n_heads as i32),
            Arg::I32(head_dim as i32),
            Arg::I32(t.period as i32),
            Arg::F32(sign),
        ];
        // A 128-bit pack of rotations per thread (four f32, eight bf16) when half a head
        // is whole packs (rope.cu).
        let (kernel, pack) = match x.dtype() {
            DType::F32 => ("rope", 4),
            DType::Bf16 => ("rope_bf16", 8),
        };
        let half = head_dim / 2;
        let width = if half.is_multiple_of(pack) { pack } else { 1 };
        self.launch(kernel, Self::packed(rows * n_heads * half, width), &args)
    }

    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        s: &AttnShape,
    ) -> Result<(Self::Buf, AttnSaved<Self::Buf>)> {
        self.attention_auto(q, k, v, s)
    }

    fn attention_backward(
        &self,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        saved: &AttnSaved<Self::Buf>,
        s: &AttnShape,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)> {
        self.attention_backward_auto(dout, q, k, v, out, saved, s)
    }

    fn swiglu(&self, gate: &Self::Buf, up: &Self::Buf) -> Result<Self::Buf> {
        let n = gate.len();
        let ty = swiglu_operand_type(gate, up)?;
        let out = self.uninit_act(n, self.act_dtype())?;
        let args = [
            Arg::U64(gate.addr()),
            Arg::U64(up.addr()),
            Arg::U64(out.addr()),
            Arg::U64(n as u64),
        ];
        // gate and up are bf16 only with bf16 base weights, which store the output bf16.
        let (kernel, width) = match (ty, out.dtype()) {
            (DType::F32, DType::F32) => ("swiglu_forward_f32", 4),
            (DType::F32, DType::Bf16) => ("swiglu_forward_bf16", 8),
            (DType::Bf16, DType::Bf16) => ("swiglu_forward_bf16_in", 8),
            (DType::Bf16, DType::F32) => {
                return Err(Error::Device(
                    "swiglu: bf16 gate and up with f32 activations".into(),
                ));
            }
        };
        self.launch(kernel, Self::packed(n, width), &args)?;
        Ok(out)
    }

    fn swiglu_backward(
        &self,
        dact: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
        feeds: GradFeeds,
    ) -> Result<(Self::Buf, Self::Buf)> {
        let n = gate.len();
        // Outside curvature passes dgate and dup are stored as gate and up are: bf16 with
        // bf16 base weights. The gate/up group's backward reads them and nothing else: its
        // base GEMM dx = g W rounds g to bf16 anyway (the same rounding, so that product
        // is unchanged bit for bit); gA = s g B and the dB Gram read the stored g exactly,
        // so they carry g's one rounding (2^-9 relative per element), as dA carries that
        // of the bf16 x. A curvature pass keeps them f32 (`GradFeeds::Curvature`).
        let ty = swiglu_operand_type(gate, up)?;
        let out = match feeds {
            GradFeeds::Backward => ty,
            GradFeeds::Curvature => DType::F32,
        };
        let (dg, du) = (self.uninit_act(n, out)?, self.uninit_act(n, out)?);
        let args = [
            Arg::U64(dact.f32()?.ptr()),
            Arg::U64(gate.addr()),
            Arg::U64(up.addr()),
            Arg::U64(dg.addr()),
            Arg::U64(du.addr()),
            Arg::U64(n as u64),
        ];
        let (kernel, width) = match (ty, out) {
            (DType::F32, _) => ("swiglu_backward", 4),
            (DType::Bf16, DType::F32) => ("swiglu_backward_bf16_in", 8),
            (DType::Bf16, DType::Bf16) => ("swiglu_backward_bf16", 8),
        };
        self.launch(kernel, Self::packed(n, width), &args)?;
        Ok((dg, du))
    }

    fn add_assign(&self, a: &mut Self::Buf, b: &Self::Buf) -> Result<()> {
        let n = a.len();
        self.launch(
            "add_assign",
            Self::packed(n, 4),
            &[
                Arg::U64(a.f32_mut()?.ptr()),
                Arg::U64(b.f32()?.ptr()),
                Arg::U64(n as u64),
            ],
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
        let losses = self.uninit::<f32>(rows)?;
        // Without a gradient the kernel never touches dlogits: no allocation.
        let d = self.uninit::<f32>(if grad_scale.is_some() {
            rows * vocab
        } else {
            0
        })?;
        let args = [
            Arg::U64(logits.f32()?.ptr()),
            Arg::U64(t.ptr()),
            Arg::U64(losses.ptr()),
            Arg::U64(d.ptr()),
            Arg::I32(vocab as i32),
            Arg::F32(grad_scale.unwrap_or(0.0)),
            Arg::I32(grad_scale.is_some() as i32),
            Arg::U64(seed),
            Arg::I32(sample),
        ];
        self.launch("cross_entropy", Self::per_row(rows), &args)?;
        let l = self.download(&losses)?;
        Ok((l, grad_scale.map(|_| d.into())))
    }

    fn classifier(
        &self,
        hidden: &Self::Buf,
        head: &Self::Weight,
        rows: usize,
        dim: usize,
        vocab: usize,
        targets: CeTargets<'_>,
        grad_scale: Option<f32>,
    ) -> Result<ClassifierOut<Self::Buf>> {
        self.classifier_impl(hidden, head, rows, dim, vocab, targets, grad_scale)
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
        self.gram_accumulate_impl(x.into(), dx, y.into(), dy, segments, alpha, out.f32_mut()?)
    }

    fn segment_sum(
        &self,
        x: &Self::Buf,
        dim: usize,
        segments: &[Segment],
        mean: bool,
    ) -> Result<Self::Buf> {
        let (st, ln) = self.segments(segments)?;
        let out = self.uninit::<f32>(segments.len() * dim)?;
        let args = [
            Arg::U64(x.addr()),
            Arg::U64(st.ptr()),
            Arg::U64(ln.ptr()),
            Arg::I32(segments.len() as i32),
            Arg::I32(dim as i32),
            Arg::I32(mean as i32),
            Arg::U64(out.ptr()),
        ];
        let entry = match x.dtype() {
            DType::F32 => "segment_sum_f32",
            DType::Bf16 => "segment_sum_bf16",
        };
        self.launch(entry, Self::elementwise(segments.len() * dim), &args)?;
        Ok(out.into())
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
        self.sq_grad_accumulate_impl(g.into(), dg, y.into(), dy, segments, alpha, out.f32_mut()?)
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
        let c = self.uninit::<f32>(m * n)?;
        let (opb, ldb) = if tb { (T, k) } else { (N, n) };
        let (opa, lda) = if ta { (T, m) } else { (N, k) };
        self.gemm(
            opb,
            opa,
            n,
            m,
            k,
            1.0,
            Operand::f32(b.f32()?.ptr(), ldb),
            Operand::f32(a.f32()?.ptr(), lda),
            0.0,
            Operand::f32(c.ptr(), n),
        )?;
        Ok(c.into())
    }

    fn dup(&self, x: &Self::Buf) -> Result<Self::Buf> {
        let out = self.uninit_act(x.len(), x.dtype())?;
        self.rt
            .dtod(out.addr(), x.addr(), x.len() * x.elem_bytes())?;
        Ok(out)
    }

    fn mul_assign(&self, a: &mut Self::Buf, b: &Self::Buf) -> Result<()> {
        let n = a.len();
        self.launch(
            "mul_assign",
            Self::packed(n, 4),
            &[
                Arg::U64(a.f32_mut()?.ptr()),
                Arg::U64(b.f32()?.ptr()),
                Arg::U64(n as u64),
            ],
        )
    }

    fn scale(&self, x: &mut Self::Buf, k: f32) -> Result<()> {
        let n = x.len();
        self.launch(
            "scale",
            Self::packed(n, 4),
            &[
                Arg::U64(x.f32_mut()?.ptr()),
                Arg::F32(k),
                Arg::U64(n as u64),
            ],
        )
    }

    fn axpy(&self, alpha: f32, x: &Self::Buf, y: &mut Self::Buf) -> Result<()> {
        let n = x.len();
        self.launch(
            "axpy",
            Self::packed(n, 4),
            &[
                Arg::F32(alpha),
                Arg::U64(x.f32()?.ptr()),
                Arg::U64(y.f32_mut()?.ptr()),
                Arg::U64(n as u64),
            ],
        )
    }

    fn dot(&self, x: &Self::Buf, y: &Self::Buf) -> Result<f64> {
        let n = x.len();
        if n == 0 {
            return Ok(0.0);
        }
        let cfg = Self::packed(n, 4);
        let partial = self.uninit::<f64>(cfg.grid[0] as usize)?;
        self.launch(
            "dot_partial",
            cfg,
            &[
                Arg::U64(x.f32()?.ptr()),
                Arg::U64(y.f32()?.ptr()),
                Arg::U64(partial.ptr()),
                Arg::U64(n as u64),
            ],
        )?;
        Ok(self.download(&partial)?.iter().sum())
    }

    fn dots(&self, pairs: &[(&Self::Buf, &Self::Buf)]) -> Result<Vec<f64>> {
        let longest = pairs.iter().map(|(x, _)| x.len()).max().unwrap_or(0);
        if longest == 0 {
            return Ok(vec![0.0; pairs.len()]);
        }
        for (x, y) in pairs {
            // The table below holds f32 addresses: check each is one.
            x.f32()?;
            y.f32()?;
            if x.len() != y.len() {
                return Err(Error::Device(format!(
                    "dot product of buffers of {} and {} elements",
                    x.len(),
                    y.len()
                )));
            }
        }
        // Chunks per pair: enough blocks to cover the longest buffer once, but no more than
        // `dot`'s 4096 blocks in all unless there are more pairs than that.
        let chunks = longest
            .div_ceil(THREADS as usize)
            .min((4096 / pairs.len()).max(1));
        let k = pairs.len();
        let mut table = Vec::with_capacity(3 * k);
        table.extend(pairs.iter().map(|(x, _)| x.addr()));
        table.extend(pairs.iter().map(|(_, y)| y.addr()));
        table.extend(pairs.iter().map(|(x, _)| x.len() as u64));
        let table = self.upload(&table)?;
        let partial = self.uninit::<f64>(k * chunks)?;
        let cfg = LaunchConfig {
            grid: [k as u32, chunks as u32, 1],
            block: [THREADS, 1, 1],
            shared_bytes: 0,
        };
        self.launch(
            "dots_partial",
            cfg,
            &[
                Arg::U64(table.ptr()),
                Arg::I32(k as i32),
                Arg::U64(partial.ptr()),
            ],
        )?;
        Ok(self
            .download(&partial)?
            .chunks(chunks)
            .map(|c| c.iter().sum())
            .collect())
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
            Some(d) => (
                d.mean.f32()?.ptr(),
                d.precision.f32()?.ptr(),
                d.lambda,
                1i32,
            ),
            None => (g.f32()?.ptr(), g.f32()?.ptr(), 0.0, 0i32),
        };
        let args = [
            Arg::U64(p.f32_mut()?.ptr()),
            Arg::U64(g.f32()?.ptr()),
            Arg::U64(m.f32_mut()?.ptr()),
            Arg::U64(v.f32_mut()?.ptr()),
            Arg::U64(n as u64),
            Arg::F32(h.lr),
            Arg::F32(h.beta1),
            Arg::F32(h.beta2),
            Arg::F32(h.eps),
            Arg::F32(h.weight_decay),
            Arg::F32(bc1),
            Arg::F32(bc2),
            Arg::F32(grad_scale),
            Arg::U64(mean),
            Arg::U64(prec),
            Arg::F32(lambda),
            Arg::I32(on),
        ];
        self.launch("adamw_step", Self::packed(n, 4), &args)
    }
}

/// The storage type of `gate` and `up`, once they are checked to be stored alike and as
/// long (the kernels take one type for both).
fn swiglu_operand_type(gate: &Act, up: &Act) -> Result<DType> {
    if gate.dtype() != up.dtype() || gate.len() != up.len() {
        return Err(Error::Device(format!(
            "swiglu of {} {:?} gate and {} {:?} up elements",
            gate.len(),
            gate.dtype(),
            up.len(),
            up.dtype()
        )));
    }
    Ok(gate.dtype())
}

fn check_rank(r: usize) -> Result<()> {
    if r > MAX_RANK {
        return Err(Error::usage(format!(
            "LoRA rank {r} exceeds the CUDA kernels' {MAX_RANK}"
        )));
    }
    Ok(())
}

#[cfg(test)]
#[path = "ops_tests.rs"]
mod tests;
