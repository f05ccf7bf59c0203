//! The CUDA backend: cudarc with dynamic loading (the binary starts without any CUDA
//! library), the hand-written kernels of `kernels/*.cu` (PTX from build.rs) for every op,
//! cuBLAS for the dense base-weight and attention products. Base weights live in bf16;
//! activations, LoRA weights, gradients, optimiser state and curvature in f32. One stream,
//! in order; each op's CPU twin in `backend/cpu` is its reference.

pub mod blas;
pub mod kernels;

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use half::bf16;

use self::blas::{N, Operand, T, gemm, gemm_batched};
use self::kernels::Kernels;
use super::{AdamHyper, AttnShape, Backend, CeTargets, DiagPenalty, LoraDims, RopeTable, Segment};
use crate::error::{Error, Result};

/// Threads per block for the row and elementwise kernels.
const THREADS: u32 = 256;
/// LoRA ranks the register-blocked kernels support.
pub const MAX_RANK: usize = 64;

pub struct CudaBackend {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    name: String,
}

fn cu<T>(r: std::result::Result<T, impl std::fmt::Display>) -> Result<T> {
    r.map_err(|e| Error::Cuda(e.to_string()))
}

/// Whether a CUDA device can be used: kernels built, driver library present, a device.
pub fn available() -> bool {
    // SAFETY: only probes for the driver library with dlopen.
    kernels::BUILT
        && unsafe { cudarc::driver::sys::is_culib_present() }
        && CudaContext::device_count().is_ok_and(|n| n > 0)
}

impl CudaBackend {
    pub fn new(ordinal: usize) -> Result<Self> {
        if !kernels::BUILT {
            return Err(Error::Cuda(
                "this build has no CUDA kernels (nvcc was not found at build time)".into(),
            ));
        }
        // SAFETY: as in `available`.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "the NVIDIA driver library (libcuda) is not installed".into(),
            ));
        }
        let count = cu(CudaContext::device_count())?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Cuda(format!(
                "no device cuda:{ordinal} ({count} present)"
            )));
        }
        let ctx = cu(CudaContext::new(ordinal))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let stream = ctx.default_stream();
        let blas = cu(CudaBlas::new(stream.clone()))?;
        Ok(CudaBackend {
            kernels: Kernels::new(ctx),
            stream,
            blas,
            name: format!("cuda:{ordinal} ({name})"),
        })
    }

    fn ptr<U>(&self, s: &CudaSlice<U>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }

    fn h(&self) -> cudarc::cublas::sys::cublasHandle_t {
        *self.blas.handle()
    }

    fn ints(&self, v: &[i32]) -> Result<CudaSlice<i32>> {
        cu(self.stream.clone_htod(v))
    }

    fn alloc(&self, n: usize) -> Result<CudaSlice<f32>> {
        cu(self.stream.alloc_zeros::<f32>(n.max(1)))
    }

    /// Launch `name` with `args` (each a reference to a device pointer or scalar).
    fn launch(&self, name: &str, cfg: LaunchConfig, args: &[&dyn KernelArg]) -> Result<()> {
        let f = self.kernels.function(name)?;
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            a.push(&mut b);
        }
        // SAFETY: each kernel's parameter list matches `args` (see kernels/*.cu), and every
        // pointer refers to a live allocation sized for the launch.
        cu(unsafe { b.launch(cfg) }).map(|_| ())
    }

    fn elementwise(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(THREADS as usize).clamp(1, 4096) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn per_row(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn to_bf16(&self, x: &CudaSlice<f32>) -> Result<CudaSlice<bf16>> {
        let n = x.len();
        let out = cu(self.stream.alloc_zeros::<bf16>(n.max(1)))?;
        self.launch(
            "f32_to_bf16",
            Self::elementwise(n),
            &[&self.ptr(x), &self.ptr(&out), &(n as u64)],
        )?;
        Ok(out)
    }

    fn segments(&self, segs: &[Segment]) -> Result<(CudaSlice<i32>, CudaSlice<i32>)> {
        let starts: Vec<i32> = segs.iter().map(|s| s.start as i32).collect();
        let lens: Vec<i32> = segs.iter().map(|s| s.len as i32).collect();
        Ok((self.ints(&starts)?, self.ints(&lens)?))
    }

    /// Batched per-head products of attention for one sequence `b` and one in-group
    /// offset `gi`: a batch runs over the KV heads.
    fn head_operands(&self, s: &AttnShape, b: usize, gi: usize) -> HeadOffsets {
        let (hd, h, kvh) = (s.head_dim, s.n_heads, s.n_kv_heads);
        let group = h / kvh;
        HeadOffsets {
            q: b * s.tq * h * hd + gi * hd,
            q_stride: group * hd,
            k: b * s.tk_stride * kvh * hd,
            k_stride: hd,
            p: (b * h + gi) * s.tq * s.tk,
            p_stride: group * s.tq * s.tk,
        }
    }
}

/// The plain cuBLAS sequences the fused kernels are benchmarked against (not used by the
/// model).
impl CudaBackend {
    /// Wait for all queued work (for timing).
    pub fn synchronize(&self) -> Result<()> {
        cu(self.stream.synchronize())
    }

    /// `u = x A^T`, `y += s u B^T` as two cuBLAS GEMMs (u round-trips through memory).
    pub fn lora_forward_unfused(
        &self,
        x: &CudaSlice<f32>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        d: LoraDims,
        y: &mut CudaSlice<f32>,
    ) -> Result<CudaSlice<f32>> {
        let u = self.alloc(d.m * d.r)?;
        gemm(
            self.h(),
            T,
            N,
            d.r,
            d.m,
            d.d_in,
            1.0,
            Operand::f32(self.ptr(a), d.d_in),
            Operand::f32(self.ptr(x), d.d_in),
            0.0,
            Operand::f32(self.ptr(&u), d.r),
        )?;
        gemm(
            self.h(),
            T,
            N,
            d.d_out,
            d.m,
            d.r,
            d.scale,
            Operand::f32(self.ptr(b), d.r),
            Operand::f32(self.ptr(&u), d.r),
            1.0,
            Operand::f32(self.ptr(y), d.d_out),
        )?;
        Ok(u)
    }

    /// LoRA backward as four cuBLAS GEMMs: gA = s g B, dx += gA A, dA += gA^T x,
    /// dB += s g^T u.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_backward_unfused(
        &self,
        g: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        d: LoraDims,
        dx: &mut CudaSlice<f32>,
        da: &mut CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
    ) -> Result<CudaSlice<f32>> {
        let ga = self.alloc(d.m * d.r)?;
        let h = self.h();
        gemm(
            h,
            N,
            N,
            d.r,
            d.m,
            d.d_out,
            d.scale,
            Operand::f32(self.ptr(b), d.r),
            Operand::f32(self.ptr(g), d.d_out),
            0.0,
            Operand::f32(self.ptr(&ga), d.r),
        )?;
        gemm(
            h,
            N,
            N,
            d.d_in,
            d.m,
            d.r,
            1.0,
            Operand::f32(self.ptr(a), d.d_in),
            Operand::f32(self.ptr(&ga), d.r),
            1.0,
            Operand::f32(self.ptr(dx), d.d_in),
        )?;
        gemm(
            h,
            N,
            T,
            d.d_in,
            d.r,
            d.m,
            1.0,
            Operand::f32(self.ptr(x), d.d_in),
            Operand::f32(self.ptr(&ga), d.r),
            1.0,
            Operand::f32(self.ptr(da), d.d_in),
        )?;
        gemm(
            h,
            N,
            T,
            d.r,
            d.d_out,
            d.m,
            d.scale,
            Operand::f32(self.ptr(u), d.r),
            Operand::f32(self.ptr(g), d.d_out),
            1.0,
            Operand::f32(self.ptr(db), d.r),
        )?;
        Ok(ga)
    }

    /// The diagonal Fisher by materialising each sequence's gradient block `G_n^T Y_n`
    /// (cuBLAS) and squaring it, instead of forming it in registers.
    #[allow(clippy::too_many_arguments)]
    pub fn sq_grad_materialized(
        &self,
        g: &CudaSlice<f32>,
        dg: usize,
        y: &CudaSlice<f32>,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let per_seq = self.alloc(segments.len() * dg * dy)?;
        for (i, s) in segments.iter().enumerate() {
            // row-major tmp (dg, dy) = G^T Y  <=>  column-major tmp^T (dy, dg) = Y^T G
            gemm(
                self.h(),
                N,
                T,
                dy,
                dg,
                s.len,
                1.0,
                Operand::f32(self.ptr(y), dy).offset(s.start * dy),
                Operand::f32(self.ptr(g), dg).offset(s.start * dg),
                0.0,
                Operand::f32(self.ptr(&per_seq), dy).offset(i * dg * dy),
            )?;
        }
        for i in 0..segments.len() {
            let n = dg * dy;
            let src = self.ptr(&per_seq) + (i * n * 4) as u64;
            self.launch(
                "sq_accumulate",
                Self::elementwise(n),
                &[&src, &self.ptr(out), &alpha, &(n as u64)],
            )?;
        }
        Ok(())
    }

    /// KFAC factor accumulation `out += alpha X^T Y` as one cuBLAS GEMM.
    #[allow(clippy::too_many_arguments)]
    pub fn gram_cublas(
        &self,
        x: &CudaSlice<f32>,
        dx: usize,
        y: &CudaSlice<f32>,
        dy: usize,
        rows: usize,
        alpha: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        // row-major out (dx, dy) = X^T Y  <=>  column-major out^T (dy, dx) = Y^T X
        gemm(
            self.h(),
            N,
            T,
            dy,
            dx,
            rows,
            alpha,
            Operand::f32(self.ptr(y), dy),
            Operand::f32(self.ptr(x), dx),
            1.0,
            Operand::f32(self.ptr(out), dy),
        )
    }
}

struct HeadOffsets {
    q: usize,
    q_stride: usize,
    k: usize,
    k_stride: usize,
    p: usize,
    p_stride: usize,
}

/// Something a kernel takes by value: a device pointer (`u64`) or a scalar.
trait KernelArg {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>);
}

macro_rules! kernel_arg {
    ($($t:ty),*) => {$(
        impl KernelArg for $t {
            fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
                b.arg(self);
            }
        }
    )*};
}
kernel_arg!(u64, i32, f32);

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
        let (hd, kvh) = (s.head_dim, s.n_kv_heads);
        let (qw, kw) = (s.n_heads * hd, kvh * hd);
        let group = s.n_heads / kvh;
        let probs = self.alloc(s.probs_len())?;
        let out = self.alloc(s.batch * s.tq * qw)?;
        let scale = 1.0 / (hd as f32).sqrt();
        let (pq, pk, pv, pp, po) = (
            self.ptr(q),
            self.ptr(k),
            self.ptr(v),
            self.ptr(&probs),
            self.ptr(&out),
        );
        for b in 0..s.batch {
            for gi in 0..group {
                let o = self.head_operands(s, b, gi);
                // S^T (tk, tq) = K (tk, hd) . Q^T, per KV head.
                gemm_batched(
                    self.h(),
                    T,
                    N,
                    s.tk,
                    s.tq,
                    hd,
                    scale,
                    (Operand::f32(pk, kw).offset(o.k), o.k_stride),
                    (Operand::f32(pq, qw).offset(o.q), o.q_stride),
                    0.0,
                    (Operand::f32(pp, s.tk).offset(o.p), o.p_stride),
                    kvh,
                )?;
            }
        }
        let rows = s.batch * s.n_heads * s.tq;
        let args: [&dyn KernelArg; 4] = [&pp, &(s.tq as i32), &(s.tk as i32), &(s.q_offset as i32)];
        self.launch("attn_softmax_forward", Self::per_row(rows), &args)?;
        for b in 0..s.batch {
            for gi in 0..group {
                let o = self.head_operands(s, b, gi);
                // out^T (hd, tq) = V^T (hd, tk) . P^T (tk, tq)
                gemm_batched(
                    self.h(),
                    N,
                    N,
                    hd,
                    s.tq,
                    s.tk,
                    1.0,
                    (Operand::f32(pv, kw).offset(o.k), o.k_stride),
                    (Operand::f32(pp, s.tk).offset(o.p), o.p_stride),
                    0.0,
                    (Operand::f32(po, qw).offset(o.q), o.q_stride),
                    kvh,
                )?;
            }
        }
        Ok((out, probs))
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
        let (hd, kvh) = (s.head_dim, s.n_kv_heads);
        let (qw, kw) = (s.n_heads * hd, kvh * hd);
        let group = s.n_heads / kvh;
        let scale = 1.0 / (hd as f32).sqrt();
        let dq = self.alloc(s.batch * s.tq * qw)?;
        let dk = self.alloc(s.batch * s.tk_stride * kw)?;
        let dv = self.alloc(s.batch * s.tk_stride * kw)?;
        let dp = self.alloc(s.probs_len())?;
        let (pq, pk, pv, pp, pdo) = (
            self.ptr(q),
            self.ptr(k),
            self.ptr(v),
            self.ptr(probs),
            self.ptr(dout),
        );
        let (pdq, pdk, pdv, pdp) = (self.ptr(&dq), self.ptr(&dk), self.ptr(&dv), self.ptr(&dp));
        for b in 0..s.batch {
            for gi in 0..group {
                let o = self.head_operands(s, b, gi);
                // dP^T (tk, tq) = V (tk, hd) . dO^T
                gemm_batched(
                    self.h(),
                    T,
                    N,
                    s.tk,
                    s.tq,
                    hd,
                    1.0,
                    (Operand::f32(pv, kw).offset(o.k), o.k_stride),
                    (Operand::f32(pdo, qw).offset(o.q), o.q_stride),
                    0.0,
                    (Operand::f32(pdp, s.tk).offset(o.p), o.p_stride),
                    kvh,
                )?;
            }
        }
        let rows = s.batch * s.n_heads * s.tq;
        let args: [&dyn KernelArg; 3] = [&pp, &pdp, &(s.tk as i32)];
        self.launch("attn_softmax_backward", Self::per_row(rows), &args)?;
        for b in 0..s.batch {
            for gi in 0..group {
                let o = self.head_operands(s, b, gi);
                let ds = (Operand::f32(pdp, s.tk).offset(o.p), o.p_stride);
                // dQ^T (hd, tq) = scale K^T (hd, tk) . dS^T
                gemm_batched(
                    self.h(),
                    N,
                    N,
                    hd,
                    s.tq,
                    s.tk,
                    scale,
                    (Operand::f32(pk, kw).offset(o.k), o.k_stride),
                    ds,
                    0.0,
                    (Operand::f32(pdq, qw).offset(o.q), o.q_stride),
                    kvh,
                )?;
                // dK^T (hd, tk) += scale Q^T (hd, tq) . dS (tq, tk)
                gemm_batched(
                    self.h(),
                    N,
                    T,
                    hd,
                    s.tk,
                    s.tq,
                    scale,
                    (Operand::f32(pq, qw).offset(o.q), o.q_stride),
                    ds,
                    1.0,
                    (Operand::f32(pdk, kw).offset(o.k), o.k_stride),
                    kvh,
                )?;
                // dV^T (hd, tk) += dO^T (hd, tq) . P (tq, tk)
                gemm_batched(
                    self.h(),
                    N,
                    T,
                    hd,
                    s.tk,
                    s.tq,
                    1.0,
                    (Operand::f32(pdo, qw).offset(o.q), o.q_stride),
                    (Operand::f32(pp, s.tk).offset(o.p), o.p_stride),
                    1.0,
                    (Operand::f32(pdv, kw).offset(o.k), o.k_stride),
                    kvh,
                )?;
            }
        }
        Ok((dq, dk, dv))
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
