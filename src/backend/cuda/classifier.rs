//! The fused classifier on CUDA (`Backend::classifier`): per vocabulary chunk, cuBLAS
//! writes the chunk's logits `(rows, n)` in f32 from the head (bf16 or f32) and the
//! bf16-rounded (or f32) hidden states, as `linear` does; `classifier_fold_*` folds them
//! into each row's running max and sum and writes `E = exp(z - m)` in the head's type;
//! cuBLAS adds `E W_c` into the f32 accumulator. Scratch: `rows x chunk` f32 logits plus
//! `E`, and per-row state; never `rows x vocab`. Only the rows with a target go through
//! the head (gathered first, their gradients scattered back): ignored rows have loss 0
//! and gradient 0 whatever their logits. Kernels in `kernels/classifier.cu`.

use super::blas::{N, Operand, T};
use super::runtime::{Arg, DType};
use super::{Act, CudaBackend, DevBuf, Weight};
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
        hidden: &Act,
        w: &Weight,
        rows: usize,
        dim: usize,
        vocab: usize,
        targets: CeTargets<'_>,
        grad_scale: Option<f32>,
    ) -> Result<ClassifierOut<Act>> {
        let (tg, seed) = match targets {
            CeTargets::Labels(t) => (t, None),
            CeTargets::Sample { mask, seed } => (mask, Some(seed)),
        };
        let active: Vec<u32> = (0..rows as u32).filter(|&r| tg[r as usize] >= 0).collect();
        let na = active.len();
        let mut losses = vec![0f32; rows];
        // Data labels are returned as given, whatever negative value ignores a row.
        let mut labels = match seed {
            None => tg.to_vec(),
            Some(_) => vec![-100; rows],
        };
        let dhidden = match grad_scale {
            Some(_) => Some(self.zeroed::<f32>(rows * dim)?),
            None => None,
        };
        if na == 0 {
            return Ok(ClassifierOut {
                losses,
                labels,
                dhidden: dhidden.map(Act::from),
            });
        }
        let compact = na < rows;
        let ids = self.upload(&active)?;
        let gathered = if compact {
            // The active rows, in the hidden states' storage type.
            let out = self.uninit_act(na * dim, hidden.dtype())?;
            let args = [
                Arg::U64(hidden.addr()),
                Arg::U64(ids.ptr()),
                Arg::U64(out.addr()),
                Arg::I32(na as i32),
                Arg::I32(dim as i32),
            ];
            let (kernel, pack) = match hidden.dtype() {
                DType::F32 => ("embedding_gather_f32", 4),
                DType::Bf16 => ("gather_rows_bf16", 8),
            };
            let width = if dim.is_multiple_of(pack) { pack } else { 1 };
            self.launch(kernel, Self::packed(na * dim, width), &args)?;
            Some(out)
        } else {
            None
        };
        let ha = gathered.as_ref().unwrap_or(hidden);
        // bf16 weights multiply bf16 activations (cuBLAS takes one input type): bf16
        // hidden states as they are stored, f32 ones rounded first.
        let hb = match (w.ty, ha) {
            (DType::Bf16, Act::F32(h)) => Some(self.to_bf16(h)?),
            (DType::Bf16, Act::Bf16(_)) => None,
            (DType::F32, h) => {
                h.f32()?;
                None
            }
        };
        let head = Head {
            h: hb.as_ref().map_or(ha.addr(), |b| b.ptr()),
            w,
            rows: na,
            dim,
            vocab,
        };
        let z = self.uninit::<f32>(na * CLASSIFIER_CHUNK.min(vocab))?;
        let given: Vec<i32> = active.iter().map(|&r| tg[r as usize]).collect();
        let la = match seed {
            None => given,
            Some(seed) => {
                let st = self.sweep(&head, &z, &self.ints(&given)?, None)?;
                self.draw(&head, &z, &ids, &st, seed)?
            }
        };
        let la_d = self.ints(&la)?;
        // Rows are scaled and added into from the first chunk on: zeros, not garbage.
        let acc = match (grad_scale, compact, dhidden) {
            (Some(_), true, _) => Some(self.zeroed::<f32>(na * dim)?),
            (Some(_), false, full) => full,
            (None, ..) => None,
        };
        let st = self.sweep(&head, &z, &la_d, acc.as_ref())?;
        let la_losses = self.uninit::<f32>(na)?;
        let finish = match w.ty {
            DType::Bf16 => "classifier_finish_bf16",
            DType::F32 => "classifier_finish_f32",
        };
        let args = [
            Arg::U64(la_d.ptr()),
            Arg::U64(st.m.ptr()),
            Arg::U64(st.s.ptr()),
            Arg::U64(st.zt.ptr()),
            Arg::U64(la_losses.ptr()),
            Arg::U64(acc.as_ref().map_or(0, |a| a.ptr())),
            Arg::U64(w.ptr()),
            Arg::I32(dim as i32),
            Arg::F32(grad_scale.unwrap_or(0.0)),
        ];
        self.launch(finish, Self::per_row(na), &args)?;
        for ((&r, l), &t) in active.iter().zip(self.download(&la_losses)?).zip(&la) {
            losses[r as usize] = l;
            labels[r as usize] = t;
        }
        let dhidden = match (acc, compact) {
            (Some(acc), true) => {
                let full = self.zeroed::<f32>(rows * dim)?;
                let args = [
                    Arg::U64(acc.ptr()),
                    Arg::U64(ids.ptr()),
                    Arg::U64(full.ptr()),
                    Arg::I32(dim as i32),
                ];
                self.launch("classifier_scatter_rows", Self::per_row(na), &args)?;
                Some(full)
            }
            (acc, _) => acc,
        };
        Ok(ClassifierOut {
            losses,
            labels,
            dhidden: dhidden.map(Act::from),
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

    /// Monte-Carlo labels from a complete sweep's state (`classifier_draw`); row `i` is
    /// batch row `ids[i]`, whose uniform it draws; the last label where rounding left the
    /// CDF short of the uniform.
    fn draw(
        &self,
        hd: &Head<'_>,
        z: &DevBuf<f32>,
        ids: &DevBuf<u32>,
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
                Arg::U64(ids.ptr()),
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
            .map(|p| if p == -1 { vocab as i32 - 1 } else { p })
            .collect())
    }

    /// The materialised softmax cross-entropy (`Backend::cross_entropy`, the fused
    /// classifier's baseline) over f32 logits, one block per row.
    pub(super) fn cross_entropy_impl(
        &self,
        logits: &Act,
        rows: usize,
        vocab: usize,
        targets: CeTargets<'_>,
        grad_scale: Option<f32>,
    ) -> Result<(Vec<f32>, Option<Act>)> {
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
}
