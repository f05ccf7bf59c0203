//! The fused classifier on CUDA (`Backend::classifier`): per vocabulary chunk, cuBLAS
//! writes the chunk's logits `(rows, n)` in f32 from the head (bf16 or f32) and the
//! bf16-rounded (or f32) hidden states, as `linear` does; `classifier_fold_*` folds them
//! into each row's running max and sum and writes `E = exp(z - m)` in the head's type;
//! cuBLAS adds `E W_c` into the f32 accumulator. Scratch: `rows x chunk` f32 logits plus
//! `E`, and per-row state; never `rows x vocab`. Kernels in `kernels/classifier.cu`.

use super::blas::{N, Operand, T};
use super::runtime::{Arg, DType};
use super::{CudaBackend, DevBuf, Weight};
use crate::backend::{CLASSIFIER_CHUNK, CeTargets, ClassifierOut};
use crate::error::Result;

/// Per-row state of one sweep (`kernels/classifier.cu`): max, sum, target logit.
struct Sweep {
    m: DevBuf<f32>,
    s: DevBuf<f64>,
    zt: DevBuf<f32>,
}

/// The operands every pass reads: the hidden states as the head's GEMM takes them.
struct Head<'a> {
    h: u64,
    w: &'a Weight,
    rows: usize,
    dim: usize,
    vocab: usize,
}

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn classifier_impl(
        &self,
        hidden: &DevBuf<f32>,
        w: &Weight,
        rows: usize,
        dim: usize,
        vocab: usize,
        targets: CeTargets<'_>,
        grad_scale: Option<f32>,
    ) -> Result<ClassifierOut<DevBuf<f32>>> {
        // bf16 weights multiply bf16-rounded activations (cuBLAS takes one input type).
        let hb = match w.ty {
            DType::Bf16 => Some(self.to_bf16(hidden)?),
            DType::F32 => None,
        };
        let head = Head {
            h: hb.as_ref().map_or(hidden.ptr(), |b| b.ptr()),
            w,
            rows,
            dim,
            vocab,
        };
        let z = self.uninit::<f32>(rows * CLASSIFIER_CHUNK.min(vocab))?;
        let labels = match targets {
            CeTargets::Labels(t) => t.to_vec(),
            CeTargets::Sample { mask, seed } => {
                let mask_d = self.ints(mask)?;
                let st = self.sweep(&head, &z, &mask_d, None)?;
                self.draw(&head, &z, mask, &mask_d, &st, seed)?
            }
        };
        let labels_d = self.ints(&labels)?;
        // Rows are scaled and added into from the first chunk on: zeros, not garbage.
        let acc = match grad_scale {
            Some(_) => Some(self.zeroed::<f32>(rows * dim)?),
            None => None,
        };
        let st = self.sweep(&head, &z, &labels_d, acc.as_ref())?;
        let losses = self.uninit::<f32>(rows)?;
        let finish = match w.ty {
            DType::Bf16 => "classifier_finish_bf16",
            DType::F32 => "classifier_finish_f32",
        };
        let args = [
            Arg::U64(labels_d.ptr()),
            Arg::U64(st.m.ptr()),
            Arg::U64(st.s.ptr()),
            Arg::U64(st.zt.ptr()),
            Arg::U64(losses.ptr()),
            Arg::U64(acc.as_ref().map_or(0, |a| a.ptr())),
            Arg::U64(w.ptr()),
            Arg::I32(dim as i32),
            Arg::F32(grad_scale.unwrap_or(0.0)),
        ];
        self.launch(finish, Self::per_row(rows), &args)?;
        Ok(ClassifierOut {
            losses: self.download(&losses)?,
            labels,
            dhidden: acc,
        })
    }

    /// `z (rows, n) = h W[j0..j0+n]^T` in f32.
    fn logits_chunk(&self, hd: &Head<'_>, j0: usize, n: usize, z: &DevBuf<f32>) -> Result<()> {
        self.gemm(
            T,
            N,
            n,
            hd.rows,
            hd.dim,
            1.0,
            Operand::typed(hd.w.ptr(), hd.w.ty, hd.dim).offset(j0 * hd.dim),
            Operand::typed(hd.h, hd.w.ty, hd.dim),
            0.0,
            Operand::f32(z.ptr(), n),
        )
    }

    /// One sweep over the vocabulary; with `acc`, also accumulates
    /// `acc_r = sum_{j != t_r} exp(z_rj - m_r) W_j`.
    fn sweep(
        &self,
        hd: &Head<'_>,
        z: &DevBuf<f32>,
        labels: &DevBuf<i32>,
        acc: Option<&DevBuf<f32>>,
    ) -> Result<Sweep> {
        let (rows, vocab) = (hd.rows, hd.vocab);
        let chunk = CLASSIFIER_CHUNK.min(vocab);
        let st = Sweep {
            m: self.uninit(rows)?,
            s: self.uninit(rows)?,
            zt: self.uninit(rows)?,
        };
        let (fold, esize) = match hd.w.ty {
            DType::Bf16 => ("classifier_fold_bf16", 2),
            DType::F32 => ("classifier_fold_f32", 4),
        };
        let e = match acc {
            Some(_) => Some(self.uninit::<u8>(rows * chunk * esize)?),
            None => None,
        };
        for j0 in (0..vocab).step_by(chunk) {
            let n = chunk.min(vocab - j0);
            self.logits_chunk(hd, j0, n, z)?;
            let args = [
                Arg::U64(z.ptr()),
                Arg::I32(n as i32),
                Arg::I32(j0 as i32),
                Arg::U64(labels.ptr()),
                Arg::U64(st.m.ptr()),
                Arg::U64(st.s.ptr()),
                Arg::U64(st.zt.ptr()),
                Arg::U64(e.as_ref().map_or(0, |e| e.ptr())),
                Arg::U64(acc.map_or(0, |a| a.ptr())),
                Arg::I32(hd.dim as i32),
                Arg::I32((j0 == 0) as i32),
            ];
            self.launch(fold, Self::per_row(rows), &args)?;
            if let (Some(acc), Some(e)) = (acc, e.as_ref()) {
                // acc (rows, dim) += E (rows, n) W_c (n, dim), as `linear_backward`.
                self.gemm(
                    N,
                    N,
                    hd.dim,
                    rows,
                    n,
                    1.0,
                    Operand::typed(hd.w.ptr(), hd.w.ty, hd.dim).offset(j0 * hd.dim),
                    Operand::typed(e.ptr(), hd.w.ty, n),
                    1.0,
                    Operand::f32(acc.ptr(), hd.dim),
                )?;
            }
        }
        Ok(st)
    }

    /// Monte-Carlo labels from a complete sweep's state (`classifier_draw`); `-100` on
    /// masked rows, the last label where rounding left the CDF short of the uniform.
    fn draw(
        &self,
        hd: &Head<'_>,
        z: &DevBuf<f32>,
        mask: &[i32],
        mask_d: &DevBuf<i32>,
        st: &Sweep,
        seed: u64,
    ) -> Result<Vec<i32>> {
        let (rows, vocab) = (hd.rows, hd.vocab);
        let chunk = CLASSIFIER_CHUNK.min(vocab);
        let cum = self.zeroed::<f64>(rows)?;
        let picked = self.ints(&vec![-1; rows])?;
        for j0 in (0..vocab).step_by(chunk) {
            let n = chunk.min(vocab - j0);
            self.logits_chunk(hd, j0, n, z)?;
            let args = [
                Arg::U64(z.ptr()),
                Arg::I32(n as i32),
                Arg::I32(j0 as i32),
                Arg::U64(mask_d.ptr()),
                Arg::U64(st.m.ptr()),
                Arg::U64(st.s.ptr()),
                Arg::U64(cum.ptr()),
                Arg::U64(picked.ptr()),
                Arg::U64(seed),
            ];
            self.launch("classifier_draw", Self::per_row(rows), &args)?;
        }
        let picked = self.download(&picked)?;
        Ok(picked
            .into_iter()
            .zip(mask)
            .map(|(p, &m)| match (m < 0, p) {
                (true, _) => -100,
                (false, -1) => vocab as i32 - 1,
                (false, p) => p,
            })
            .collect())
    }
}
