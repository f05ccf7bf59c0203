//! Causal grouped-query attention on the CPU, parallel over (sequence, KV head): the query
//! heads sharing a KV head run in one task so `dk`/`dv` need no cross-thread reduction.

use rayon::prelude::*;

use super::gemm::{Mat, gemm, gemm_ptr};
use crate::backend::AttnShape;

/// Base pointer of an output that tasks fill at disjoint (interleaved) elements.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: each task writes only its own (sequence, head) elements; see the callers.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Taking `self` whole keeps closures capturing the `Send` wrapper, not the raw field.
    fn at(self, off: usize) -> *mut f32 {
        // SAFETY: callers stay inside the buffer this pointer was taken from.
        unsafe { self.0.add(off) }
    }
}

/// Number of keys query `i` may attend to.
fn visible(s: &AttnShape, i: usize) -> usize {
    (s.q_offset + i + 1).min(s.tk)
}

pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape) -> (Vec<f32>, Vec<f32>) {
    let (hd, h, kvh) = (s.head_dim, s.n_heads, s.n_kv_heads);
    let (qw, kw) = (h * hd, kvh * hd);
    let group = h / kvh;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; s.batch * s.tq * qw];
    let mut probs = vec![0f32; s.probs_len()];
    let out_p = Out(out.as_mut_ptr());
    // probs blocks of one (sequence, KV group) are contiguous: split them safely.
    probs
        .par_chunks_mut(group * s.tq * s.tk)
        .enumerate()
        .for_each(|(task, pg)| {
            let (b, g) = (task / kvh, task % kvh);
            let kb = &k[b * s.tk_stride * kw + g * hd..];
            let vb = &v[b * s.tk_stride * kw + g * hd..];
            for (hi, p) in pg.chunks_mut(s.tq * s.tk).enumerate() {
                let head = g * group + hi;
                let qb = &q[b * s.tq * qw + head * hd..];
                gemm(
                    s.tq,
                    s.tk,
                    hd,
                    p,
                    s.tk,
                    false,
                    Mat::strided(qb, qw),
                    Mat::strided(kb, kw).t(),
                    scale,
                    false,
                );
                for (i, row) in p.chunks_mut(s.tk).enumerate() {
                    let n = visible(s, i);
                    let max = row[..n].iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for x in row[..n].iter_mut() {
                        *x = (*x - max).exp();
                        sum += *x;
                    }
                    let inv = 1.0 / sum;
                    row[..n].iter_mut().for_each(|x| *x *= inv);
                    row[n..].fill(0.0);
                }
                // SAFETY: column block `head` of sequence b's rows is this task's alone,
                // and lies inside `out`.
                unsafe {
                    let o = out_p.at(b * s.tq * qw + head * hd);
                    gemm_ptr(
                        s.tq,
                        hd,
                        s.tk,
                        o,
                        qw,
                        false,
                        Mat::rows(p, s.tk),
                        Mat::strided(vb, kw),
                        1.0,
                        false,
                    );
                }
            }
        });
    (out, probs)
}

/// `dP = dO V^T`, `dS = P (dP - rowsum(dP P))`, `dQ = scale dS K`, `dK = scale dS^T Q`,
/// `dV = P^T dO`.
pub fn attention_backward(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    s: &AttnShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (hd, h, kvh) = (s.head_dim, s.n_heads, s.n_kv_heads);
    let (qw, kw) = (h * hd, kvh * hd);
    let group = h / kvh;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut dq = vec![0f32; s.batch * s.tq * qw];
    let mut dk = vec![0f32; s.batch * s.tk_stride * kw];
    let mut dv = vec![0f32; s.batch * s.tk_stride * kw];
    let (dq_p, dk_p, dv_p) = (
        Out(dq.as_mut_ptr()),
        Out(dk.as_mut_ptr()),
        Out(dv.as_mut_ptr()),
    );
    (0..s.batch * kvh).into_par_iter().for_each(|task| {
        let (b, g) = (task / kvh, task % kvh);
        let koff = b * s.tk_stride * kw + g * hd;
        let (kb, vb) = (&k[koff..], &v[koff..]);
        let mut ds = vec![0f32; s.tq * s.tk];
        for head in g * group..(g + 1) * group {
            let qoff = b * s.tq * qw + head * hd;
            let (qb, dob) = (&q[qoff..], &dout[qoff..]);
            let p = &probs[(b * h + head) * s.tq * s.tk..][..s.tq * s.tk];
            gemm(
                s.tq,
                s.tk,
                hd,
                &mut ds,
                s.tk,
                false,
                Mat::strided(dob, qw),
                Mat::strided(vb, kw).t(),
                1.0,
                false,
            );
            for (dsr, pr) in ds.chunks_mut(s.tk).zip(p.chunks(s.tk)) {
                let dot: f32 = dsr.iter().zip(pr).map(|(a, b)| a * b).sum();
                for (d, &pv) in dsr.iter_mut().zip(pr) {
                    *d = pv * (*d - dot);
                }
            }
            // SAFETY: dq's (b, head) column block and dk/dv's (b, g) column blocks are
            // written by this task only; all lie inside their buffers.
            unsafe {
                gemm_ptr(
                    s.tq,
                    hd,
                    s.tk,
                    dq_p.at(qoff),
                    qw,
                    false,
                    Mat::rows(&ds, s.tk),
                    Mat::strided(kb, kw),
                    scale,
                    false,
                );
                gemm_ptr(
                    s.tk,
                    hd,
                    s.tq,
                    dk_p.at(koff),
                    kw,
                    true,
                    Mat::rows(&ds, s.tk).t(),
                    Mat::strided(qb, qw),
                    scale,
                    false,
                );
                gemm_ptr(
                    s.tk,
                    hd,
                    s.tq,
                    dv_p.at(koff),
                    kw,
                    true,
                    Mat::rows(p, s.tk).t(),
                    Mat::strided(dob, qw),
                    1.0,
                    false,
                );
            }
        }
    });
    (dq, dk, dv)
}
