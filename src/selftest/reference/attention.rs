//! Causal grouped-query attention of the plain reference.
//!
//! Layouts (see `AttnShape`): `q`/`out` rows are `b * tq + i` with head `h` in columns
//! `h*hd..(h+1)*hd`; `k`/`v` rows are `b * tk_stride + j` (only `j < tk` used) with KV head
//! `g` in columns `g*hd..(g+1)*hd`; query head `h` reads KV head `h / (n_heads /
//! n_kv_heads)`. `probs` is `(batch, n_heads, tq, tk)`, zero where a key is not visible.
//! Query `i` sits at position `q_offset + i` and sees keys `j <= q_offset + i` (and `j < tk`).

use super::{f, to_f32};
use crate::backend::AttnShape;

/// Index helpers for one shape.
struct At<'a>(&'a AttnShape);

impl At<'_> {
    fn q(&self, b: usize, i: usize, h: usize, d: usize) -> usize {
        let s = self.0;
        (b * s.tq + i) * s.n_heads * s.head_dim + h * s.head_dim + d
    }
    fn kv(&self, b: usize, j: usize, h: usize, d: usize) -> usize {
        let s = self.0;
        let g = h / (s.n_heads / s.n_kv_heads);
        (b * s.tk_stride + j) * s.n_kv_heads * s.head_dim + g * s.head_dim + d
    }
    fn p(&self, b: usize, h: usize, i: usize, j: usize) -> usize {
        let s = self.0;
        ((b * s.n_heads + h) * s.tq + i) * s.tk + j
    }
    fn visible(&self, i: usize, j: usize) -> bool {
        j <= self.0.q_offset + i && j < self.0.tk
    }
}

/// Query `i` of head `h` in sequence `b`: its visible keys, their scaled scores
/// `q_i . k_j / sqrt(hd)`, and their log-sum-exp.
struct Row {
    keys: Vec<usize>,
    scores: Vec<f64>,
    lse: f64,
}

fn row(q: &[f32], k: &[f32], s: &AttnShape, b: usize, h: usize, i: usize) -> Row {
    let at = At(s);
    let scale = 1.0 / (s.head_dim as f64).sqrt();
    let keys: Vec<usize> = (0..s.tk).filter(|&j| at.visible(i, j)).collect();
    let scores: Vec<f64> = keys
        .iter()
        .map(|&j| {
            let qk: f64 = (0..s.head_dim)
                .map(|d| f(q[at.q(b, i, h, d)]) * f(k[at.kv(b, j, h, d)]))
                .sum();
            qk * scale
        })
        .collect();
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + scores.iter().map(|&x| (x - max).exp()).sum::<f64>().ln();
    Row { keys, scores, lse }
}

/// `P = softmax_j(q_i . k_j / sqrt(hd))` over visible keys; `out_i = sum_j P_ij v_j`.
pub fn forward(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape) -> (Vec<f32>, Vec<f32>) {
    let at = At(s);
    let mut out = vec![0f64; s.batch * s.tq * s.n_heads * s.head_dim];
    let mut probs = vec![0f64; s.probs_len()];
    for b in 0..s.batch {
        for h in 0..s.n_heads {
            for i in 0..s.tq {
                let r = row(q, k, s, b, h, i);
                for (&j, &x) in r.keys.iter().zip(&r.scores) {
                    probs[at.p(b, h, i, j)] = (x - r.lse).exp();
                }
                for d in 0..s.head_dim {
                    out[at.q(b, i, h, d)] = r
                        .keys
                        .iter()
                        .map(|&j| probs[at.p(b, h, i, j)] * f(v[at.kv(b, j, h, d)]))
                        .sum();
                }
            }
        }
    }
    (to_f32(out), to_f32(probs))
}

/// The log-sum-exp of each row's scaled scores over its visible keys, `(batch, n_heads,
/// tq)`: what flash attention saves for its backward (`AttnSaved::Lse`).
pub fn lse(q: &[f32], k: &[f32], s: &AttnShape) -> Vec<f32> {
    let mut out = Vec::with_capacity(s.rows_len());
    for b in 0..s.batch {
        for h in 0..s.n_heads {
            out.extend((0..s.tq).map(|i| row(q, k, s, b, h, i).lse));
        }
    }
    to_f32(out)
}

/// With the given `P`: `dP_ij = dout_i . v_j`; `dS_ij = P_ij (dP_ij - sum_l dP_il P_il)`;
/// `dq_i = scale sum_j dS_ij k_j`; `dk_j += scale sum_i dS_ij q_i` and
/// `dv_j += sum_i P_ij dout_i`, summed over the query heads sharing the KV head.
pub fn backward(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    s: &AttnShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let at = At(s);
    let scale = 1.0 / (s.head_dim as f64).sqrt();
    let mut dq = vec![0f64; q.len()];
    let mut dk = vec![0f64; s.batch * s.tk_stride * s.n_kv_heads * s.head_dim];
    let mut dv = vec![0f64; dk.len()];
    for b in 0..s.batch {
        for h in 0..s.n_heads {
            for i in 0..s.tq {
                let p = |j: usize| f(probs[at.p(b, h, i, j)]);
                let dp: Vec<f64> = (0..s.tk)
                    .map(|j| {
                        (0..s.head_dim)
                            .map(|d| f(dout[at.q(b, i, h, d)]) * f(v[at.kv(b, j, h, d)]))
                            .sum()
                    })
                    .collect();
                let row_dot: f64 = (0..s.tk).map(|j| dp[j] * p(j)).sum();
                for (j, &dpj) in dp.iter().enumerate() {
                    let ds = p(j) * (dpj - row_dot);
                    for d in 0..s.head_dim {
                        let (qi, kj) = (at.q(b, i, h, d), at.kv(b, j, h, d));
                        dq[qi] += scale * ds * f(k[kj]);
                        dk[kj] += scale * ds * f(q[qi]);
                        dv[kj] += p(j) * f(dout[qi]);
                    }
                }
            }
        }
    }
    (to_f32(dq), to_f32(dk), to_f32(dv))
}
