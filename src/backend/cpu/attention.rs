//! Causal grouped-query attention on the CPU, parallel over (sequence, KV head): the query
//! heads sharing a KV head run in one task so `dk`/`dv` need no cross-thread reduction.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::gemm::{Mat, Out, gemm, gemm_ptr, zeros_par};
use super::vmath;
use crate::backend::AttnShape;

/// Number of keys query `i` may attend to.
fn visible(s: &AttnShape, i: usize) -> usize {
    (s.q_offset + i + 1).min(s.tk)
}

/// Queries per causal block: the products of a block of queries stop at the last key its
/// last query sees, so the masked upper triangle is mostly never computed (at 256
/// positions, 62 % of the full products). Larger blocks waste more of the triangle,
/// smaller ones give the GEMM too few rows to run well.
const CAUSAL_BLOCK: usize = 64;

/// `(first query, queries, keys visible to the block)` for each causal block.
fn row_blocks(s: &AttnShape) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    (0..s.tq).step_by(CAUSAL_BLOCK).map(|i0| {
        let rows = CAUSAL_BLOCK.min(s.tq - i0);
        (i0, rows, visible(s, i0 + rows - 1))
    })
}

/// `(first key, keys, first query that sees them)` for each block of keys: the queries
/// before the first that sees the block's first key contribute nothing to its gradients.
fn key_blocks(s: &AttnShape) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    (0..s.tk).step_by(CAUSAL_BLOCK).map(|j0| {
        let keys = CAUSAL_BLOCK.min(s.tk - j0);
        (j0, keys, j0.saturating_sub(s.q_offset).min(s.tq))
    })
}

/// Causal attention's output and its probabilities `(batch, heads, tq, tk)`, kept for the
/// backward.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape) -> (Vec<f32>, Vec<f32>) {
    let n_probs = s.probs_len();
    let mut probs: Vec<f32> = Vec::with_capacity(n_probs);
    let out = attend(q, k, v, s, Some(&mut probs.spare_capacity_mut()[..n_probs]));
    // SAFETY: `attend` wrote every element of the probabilities it was given (below).
    unsafe { probs.set_len(n_probs) };
    (out, probs)
}

/// Causal attention's output alone: each task's probabilities go to a scratch block of
/// one query block's rows, reused, which stays in cache, instead of to memory.
pub fn attention_out(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape) -> Vec<f32> {
    attend(q, k, v, s, None)
}

/// The forward, parallel over (sequence, KV group); with `probs`, writes every element of
/// it (the first GEMM of a block and the zeros after its keys).
fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &AttnShape,
    probs: Option<&mut [MaybeUninit<f32>]>,
) -> Vec<f32> {
    let (hd, h, kvh) = (s.head_dim, s.n_heads, s.n_kv_heads);
    let (qw, kw) = (h * hd, kvh * hd);
    // Every head must belong to a KV group for the tasks below to write all of `out`.
    assert!(
        kvh > 0 && h % kvh == 0,
        "attention: {h} heads in {kvh} KV groups"
    );
    let group = h / kvh;
    let scale = 1.0 / (hd as f32).sqrt();
    // Neither output is zero-filled first: every element of both is written below (a
    // fill would be one more pass over the probabilities, 9 MB a layer on SmolLM2).
    let n_out = s.batch * s.tq * qw;
    let mut out: Vec<f32> = Vec::with_capacity(n_out);
    let out_p = Out(out.as_mut_ptr());
    let task = |task: usize, mut pg: Option<&mut [MaybeUninit<f32>]>| {
        let (b, g) = (task / kvh, task % kvh);
        let kb = &k[b * s.tk_stride * kw + g * hd..];
        let vb = &v[b * s.tk_stride * kw + g * hd..];
        let mut scratch: Vec<f32> = Vec::new();
        if pg.is_none() {
            scratch.reserve_exact(CAUSAL_BLOCK * s.tk);
        }
        for hi in 0..group {
            let head = g * group + hi;
            for (i0, rows, nk) in row_blocks(s) {
                let qb = &q[(b * s.tq + i0) * qw + head * hd..];
                let pb = match pg.as_deref_mut() {
                    Some(p) => &mut p[(hi * s.tq + i0) * s.tk..(hi * s.tq + i0 + rows) * s.tk],
                    None => &mut scratch.spare_capacity_mut()[..rows * s.tk],
                };
                // SAFETY: the (rows, nk) block at row stride tk lies inside `pb`, which
                // this task alone holds.
                unsafe {
                    gemm_ptr(
                        rows,
                        nk,
                        hd,
                        pb.as_mut_ptr().cast(),
                        s.tk,
                        false,
                        Mat::strided(qb, qw),
                        Mat::strided(kb, kw).t(),
                        scale,
                        false,
                    );
                }
                for (i, row) in pb.chunks_mut(s.tk).enumerate() {
                    row[nk..].iter_mut().for_each(|x| _ = x.write(0.0));
                    // SAFETY: the GEMM wrote `row[..nk]`, the line above the rest.
                    let row = unsafe { &mut *(row as *mut [_] as *mut [f32]) };
                    // Past the block's keys the row is zero already: the softmax
                    // zeroes only its own masked keys, up to nk.
                    vmath::causal_softmax_row(&mut row[..nk], visible(s, i0 + i));
                }
                // SAFETY: every element of `pb` is initialised now (above).
                let pb = unsafe { &*(pb as *const [_] as *const [f32]) };
                // SAFETY: column block `head` of sequence b's rows is this task's
                // alone, and lies inside `out`'s allocation.
                unsafe {
                    let o = out_p.at((b * s.tq + i0) * qw + head * hd);
                    gemm_ptr(
                        rows,
                        hd,
                        nk,
                        o,
                        qw,
                        false,
                        Mat::rows(pb, s.tk),
                        Mat::strided(vb, kw),
                        1.0,
                        false,
                    );
                }
            }
        }
    };
    match probs {
        // probs blocks of one (sequence, KV group) are contiguous: split them safely.
        Some(p) => p
            .par_chunks_mut(group * s.tq * s.tk)
            .enumerate()
            .for_each(|(t, pg)| task(t, Some(pg))),
        None => (0..s.batch * kvh)
            .into_par_iter()
            .for_each(|t| task(t, None)),
    }
    // SAFETY: the tasks cover every (sequence, head) (every head is in a group: asserted
    // above) and every row block: the second GEMM wrote all of `out` (without
    // `accumulate`, reading none of it).
    unsafe { out.set_len(n_out) };
    out
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
    let mut dq = zeros_par(s.batch * s.tq * qw);
    let mut dk = zeros_par(s.batch * s.tk_stride * kw);
    let mut dv = zeros_par(s.batch * s.tk_stride * kw);
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
            for (i0, rows, nk) in row_blocks(s) {
                let dsb = &mut ds[i0 * s.tk..(i0 + rows) * s.tk];
                gemm(
                    rows,
                    nk,
                    hd,
                    dsb,
                    s.tk,
                    false,
                    Mat::strided(&dob[i0 * qw..], qw),
                    Mat::strided(vb, kw).t(),
                    1.0,
                    false,
                );
                let pb = &p[i0 * s.tk..(i0 + rows) * s.tk];
                for (i, (dsr, pr)) in dsb.chunks_mut(s.tk).zip(pb.chunks(s.tk)).enumerate() {
                    // Masked keys have p = 0, so dS = 0 there (the key blocks below read
                    // some of them).
                    let n = visible(s, i0 + i);
                    let dot = vmath::dot(&dsr[..n], pr);
                    for (d, &pv) in dsr[..n].iter_mut().zip(pr) {
                        *d = pv * (*d - dot);
                    }
                    dsr[n..].fill(0.0);
                }
                // SAFETY: dq's (b, head) column block is written by this task only, and
                // lies inside dq.
                unsafe {
                    gemm_ptr(
                        rows,
                        hd,
                        nk,
                        dq_p.at(qoff + i0 * qw),
                        qw,
                        false,
                        Mat::rows(dsb, s.tk),
                        Mat::strided(kb, kw),
                        scale,
                        false,
                    );
                }
            }
            for (j0, keys, i0) in key_blocks(s) {
                let rows = s.tq - i0;
                if rows == 0 {
                    continue;
                }
                let (dst, pst) = (&ds[i0 * s.tk + j0..], &p[i0 * s.tk + j0..]);
                // SAFETY: dk/dv's (b, g) column blocks are written by this task only; all
                // lie inside their buffers.
                unsafe {
                    gemm_ptr(
                        keys,
                        hd,
                        rows,
                        dk_p.at(koff + j0 * kw),
                        kw,
                        true,
                        Mat::rows(dst, s.tk).t(),
                        Mat::strided(&qb[i0 * qw..], qw),
                        scale,
                        false,
                    );
                    gemm_ptr(
                        keys,
                        hd,
                        rows,
                        dv_p.at(koff + j0 * kw),
                        kw,
                        true,
                        Mat::rows(pst, s.tk).t(),
                        Mat::strided(&dob[i0 * qw..], qw),
                        1.0,
                        false,
                    );
                }
            }
        }
    });
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The output alone (probabilities in a scratch block) is the kept forward's output,
    /// bit for bit: the same products and softmax rows, only stored elsewhere. Shapes with
    /// a query tail past the 64-row blocks, GQA, keys padded past `tk`, and queries
    /// offset into the keys (decoding with a cache).
    #[test]
    fn output_alone_is_the_kept_forwards() {
        let val = |i: usize, s: usize| ((i * s % 1009) as f32 - 504.0) / 300.0;
        for (batch, tq, tk, tk_stride, q_offset) in [
            (2, 130, 130, 130, 0),
            (1, 7, 70, 80, 63),
            (3, 64, 64, 64, 0),
        ] {
            let s = AttnShape {
                batch,
                tq,
                tk,
                tk_stride,
                n_heads: 6,
                n_kv_heads: 2,
                head_dim: 16,
                q_offset,
            };
            let q: Vec<f32> = (0..batch * tq * 6 * 16).map(|i| val(i, 7919)).collect();
            let kv = batch * tk_stride * 2 * 16;
            let k: Vec<f32> = (0..kv).map(|i| val(i, 104729)).collect();
            let v: Vec<f32> = (0..kv).map(|i| val(i, 31337)).collect();
            let (out, probs) = attention(&q, &k, &v, &s);
            assert_eq!(probs.len(), s.probs_len());
            assert_eq!(attention_out(&q, &k, &v, &s), out, "{s:?}");
        }
    }
}
