//! Materialised attention: the per-head products run as cuBLAS strided-batched GEMMs (one
//! batch over the KV heads for each sequence and in-group offset, so grouped-query heads
//! share their K/V), the masking and softmax as the hand-written kernels of
//! `attention.cu`; the f32 probabilities `(batch, n_heads, tq, tk)` are kept for backward.

use crate::backend::AttnShape;
use crate::backend::cuda::blas::{N, Operand, T};
use crate::backend::cuda::runtime::Arg;
use crate::backend::cuda::{CudaBackend, DevBuf};
use crate::error::Result;

struct HeadOffsets {
    q: usize,
    q_stride: usize,
    k: usize,
    k_stride: usize,
    p: usize,
    p_stride: usize,
}

impl CudaBackend {
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

    /// Run `f` for each batch of per-head products: one per sequence and in-group offset.
    fn each_head_batch(
        &self,
        s: &AttnShape,
        mut f: impl FnMut(HeadOffsets) -> Result<()>,
    ) -> Result<()> {
        for b in 0..s.batch {
            for gi in 0..s.n_heads / s.n_kv_heads {
                f(self.head_operands(s, b, gi))?;
            }
        }
        Ok(())
    }

    /// Attention through materialised scores; returns `(out, probs)`.
    pub fn attention_materialised(
        &self,
        q: &DevBuf<f32>,
        k: &DevBuf<f32>,
        v: &DevBuf<f32>,
        s: &AttnShape,
    ) -> Result<(DevBuf<f32>, DevBuf<f32>)> {
        let (hd, kvh) = (s.head_dim, s.n_kv_heads);
        let (qw, kw) = (s.n_heads * hd, kvh * hd);
        let probs = self.uninit(s.probs_len())?;
        let out = self.uninit(s.batch * s.tq * qw)?;
        let scale = 1.0 / (hd as f32).sqrt();
        let (pq, pk, pv, pp, po) = (q.ptr(), k.ptr(), v.ptr(), probs.ptr(), out.ptr());
        self.each_head_batch(s, |o| {
            // S^T (tk, tq) = K (tk, hd) . Q^T, per KV head.
            self.gemm_batched(
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
            Ok(())
        })?;
        let rows = s.batch * s.n_heads * s.tq;
        let args = [
            Arg::U64(pp),
            Arg::I32(s.tq as i32),
            Arg::I32(s.tk as i32),
            Arg::I32(s.q_offset as i32),
        ];
        self.launch("attn_softmax_forward", Self::per_row(rows), &args)?;
        self.each_head_batch(s, |o| {
            // out^T (hd, tq) = V^T (hd, tk) . P^T (tk, tq)
            self.gemm_batched(
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
            Ok(())
        })?;
        Ok((out, probs))
    }

    /// Backward of `attention_materialised` from its probabilities; returns `(dq, dk, dv)`.
    pub fn attention_materialised_backward(
        &self,
        dout: &DevBuf<f32>,
        q: &DevBuf<f32>,
        k: &DevBuf<f32>,
        v: &DevBuf<f32>,
        probs: &DevBuf<f32>,
        s: &AttnShape,
    ) -> Result<(DevBuf<f32>, DevBuf<f32>, DevBuf<f32>)> {
        let (hd, kvh) = (s.head_dim, s.n_kv_heads);
        let (qw, kw) = (s.n_heads * hd, kvh * hd);
        let scale = 1.0 / (hd as f32).sqrt();
        let dq = self.uninit(s.batch * s.tq * qw)?;
        // dk and dv accumulate over the heads of a group, and rows past tk stay zero.
        let dk = self.zeroed(s.batch * s.tk_stride * kw)?;
        let dv = self.zeroed(s.batch * s.tk_stride * kw)?;
        let dp = self.uninit::<f32>(s.probs_len())?;
        let (pq, pk, pv, pp, pdo) = (q.ptr(), k.ptr(), v.ptr(), probs.ptr(), dout.ptr());
        let (pdq, pdk, pdv, pdp) = (dq.ptr(), dk.ptr(), dv.ptr(), dp.ptr());
        self.each_head_batch(s, |o| {
            // dP^T (tk, tq) = V (tk, hd) . dO^T
            self.gemm_batched(
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
            Ok(())
        })?;
        let rows = s.batch * s.n_heads * s.tq;
        let args = [Arg::U64(pp), Arg::U64(pdp), Arg::I32(s.tk as i32)];
        self.launch("attn_softmax_backward", Self::per_row(rows), &args)?;
        self.each_head_batch(s, |o| {
            let ds = (Operand::f32(pdp, s.tk).offset(o.p), o.p_stride);
            // dQ^T (hd, tq) = scale K^T (hd, tk) . dS^T
            self.gemm_batched(
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
            self.gemm_batched(
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
            self.gemm_batched(
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
            Ok(())
        })?;
        Ok((dq, dk, dv))
    }
}
