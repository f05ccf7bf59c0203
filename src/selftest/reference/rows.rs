//! The row-wise model ops of the plain reference: embedding, RMSNorm, LoRA, RoPE, SwiGLU
//! and the softmax cross-entropy. Straight from their definitions, in f64.

use super::{add_into, f, to_f32};
use crate::backend::{CeTargets, LoraDims, RopeTable, sample_uniform};

/// `out[i, :] = table[ids[i], :]`.
pub fn embedding(table: &[f32], ids: &[u32], dim: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(ids.len() * dim);
    for &id in ids {
        let row = id as usize * dim;
        out.extend_from_slice(&table[row..row + dim]);
    }
    out
}

/// `rstd = 1 / sqrt(mean(x^2) + eps)` and `y = w * x * rstd`, per row.
pub fn rmsnorm(x: &[f32], w: &[f32], rows: usize, dim: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0f64; rows * dim];
    let mut rstd = vec![0f64; rows];
    for r in 0..rows {
        let xr = &x[r * dim..(r + 1) * dim];
        let mean_sq = xr.iter().map(|&v| f(v) * f(v)).sum::<f64>() / dim as f64;
        rstd[r] = 1.0 / (mean_sq + f(eps)).sqrt();
        for j in 0..dim {
            y[r * dim + j] = f(w[j]) * f(xr[j]) * rstd[r];
        }
    }
    (to_f32(y), to_f32(rstd))
}

/// `dx += d/dx <dy, w * x * rstd(x)>` using the given `rstd`. With
/// `d rstd / d x_i = -rstd^3 x_i / D`:
/// `dx_i += rstd w_i dy_i - x_i rstd^3 / D * sum_j dy_j w_j x_j`.
pub fn rmsnorm_backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    rows: usize,
    dim: usize,
    dx: &mut [f32],
) {
    let mut d = vec![0f64; rows * dim];
    for (r, &s) in rstd.iter().enumerate().take(rows) {
        let s = f(s);
        let at = |j: usize| r * dim + j;
        let dot: f64 = (0..dim).map(|j| f(dy[at(j)]) * f(w[j]) * f(x[at(j)])).sum();
        for j in 0..dim {
            d[at(j)] = s * f(w[j]) * f(dy[at(j)]) - f(x[at(j)]) * s * s * s / dim as f64 * dot;
        }
    }
    add_into(dx, &d);
}

/// `u = x A^T (m, r)`, `y += s u B^T`.
pub fn lora_forward(x: &[f32], a: &[f32], b: &[f32], d: LoraDims, y: &mut [f32]) -> Vec<f32> {
    let mut u = vec![0f64; d.m * d.r];
    for i in 0..d.m {
        for k in 0..d.r {
            u[i * d.r + k] = (0..d.d_in)
                .map(|c| f(x[i * d.d_in + c]) * f(a[k * d.d_in + c]))
                .sum();
        }
    }
    let mut dy = vec![0f64; d.m * d.d_out];
    for i in 0..d.m {
        for o in 0..d.d_out {
            let bu: f64 = (0..d.r).map(|k| f(b[o * d.r + k]) * u[i * d.r + k]).sum();
            dy[i * d.d_out + o] = f(d.scale) * bu;
        }
    }
    add_into(y, &dy);
    to_f32(u)
}

/// With `g = dL/dy`: `gA = s g B (m, r)`; `dx += gA A`; with grads `dA += gA^T x` and
/// `dB += s g^T u` (`u` as given, the forward's). Returns `gA`.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    g: &[f32],
    x: &[f32],
    u: &[f32],
    a: &[f32],
    b: &[f32],
    d: LoraDims,
    dx: &mut [f32],
    grads: Option<(&mut Vec<f32>, &mut Vec<f32>)>,
) -> Vec<f32> {
    let (m, r, din, dout, s) = (d.m, d.r, d.d_in, d.d_out, f(d.scale));
    let mut ga = vec![0f64; m * r];
    for i in 0..m {
        for k in 0..r {
            let gb: f64 = (0..dout)
                .map(|o| f(g[i * dout + o]) * f(b[o * r + k]))
                .sum();
            ga[i * r + k] = s * gb;
        }
    }
    let mut ddx = vec![0f64; m * din];
    for i in 0..m {
        for c in 0..din {
            ddx[i * din + c] = (0..r).map(|k| ga[i * r + k] * f(a[k * din + c])).sum();
        }
    }
    add_into(dx, &ddx);
    if let Some((da, db)) = grads {
        let mut dda = vec![0f64; r * din];
        for k in 0..r {
            for c in 0..din {
                dda[k * din + c] = (0..m).map(|i| ga[i * r + k] * f(x[i * din + c])).sum();
            }
        }
        add_into(da, &dda);
        let mut ddb = vec![0f64; dout * r];
        for o in 0..dout {
            for k in 0..r {
                let gu: f64 = (0..m).map(|i| f(g[i * dout + o]) * f(u[i * r + k])).sum();
                ddb[o * r + k] = s * gu;
            }
        }
        add_into(db, &ddb);
    }
    to_f32(ga)
}

/// Rotate-half RoPE: row `r` uses angle row `t = r % period`; in every head, for
/// `i < hd/2` the pair `(a, b) = (x_i, x_{i + hd/2})` becomes
/// `(a cos - b sin, b cos + a sin)`, with `sin` negated for the inverse rotation.
pub fn rope(
    x: &mut [f32],
    table: &RopeTable<Vec<f32>>,
    rows: usize,
    n_heads: usize,
    hd: usize,
    inverse: bool,
) {
    let half = hd / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    for r in 0..rows {
        let t = r % table.period;
        for h in 0..n_heads {
            let base = r * n_heads * hd + h * hd;
            for i in 0..half {
                let (c, s) = (
                    f(table.cos[t * half + i]),
                    sign * f(table.sin[t * half + i]),
                );
                let (a, b) = (f(x[base + i]), f(x[base + half + i]));
                x[base + i] = (a * c - b * s) as f32;
                x[base + half + i] = (b * c + a * s) as f32;
            }
        }
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `silu(gate) * up = gate * sigmoid(gate) * up`.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let y = gate
        .iter()
        .zip(up)
        .map(|(&g, &u)| f(g) * sigmoid(f(g)) * f(u));
    to_f32(y.collect())
}

/// `dgate = dact * up * silu'(gate)` with `silu'(g) = sig(g) (1 + g (1 - sig(g)))`;
/// `dup = dact * silu(gate)`.
pub fn swiglu_backward(dact: &[f32], gate: &[f32], up: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = Vec::with_capacity(gate.len());
    let mut du = Vec::with_capacity(gate.len());
    for ((&d, &g), &u) in dact.iter().zip(gate).zip(up) {
        let (d, g, u) = (f(d), f(g), f(u));
        let s = sigmoid(g);
        dg.push(d * u * s * (1.0 + g * (1.0 - s)));
        du.push(d * g * s);
    }
    (to_f32(dg), to_f32(du))
}

/// Softmax cross-entropy per row. Rows whose target (or mask) entry is negative are
/// ignored: loss 0, gradient 0. The loss is `logsumexp(z) - z[t]`; the gradient
/// `grad_scale * (softmax(z) - onehot(t))`. With `Sample`, `t` is drawn from the row's
/// softmax by inverting its CDF at `u = sample_uniform(seed, row)`: the first label whose
/// cumulative probability exceeds `u` (the last label if rounding leaves none). Also
/// returns the label each row used (`-100` on ignored rows).
pub fn cross_entropy(
    logits: &[f32],
    rows: usize,
    vocab: usize,
    targets: CeTargets<'_>,
    grad_scale: Option<f32>,
) -> (Vec<f32>, Option<Vec<f32>>, Vec<i32>) {
    let (active, seed) = match targets {
        CeTargets::Labels(t) => (t, None),
        CeTargets::Sample { mask, seed } => (mask, Some(seed)),
    };
    let mut losses = vec![0f64; rows];
    let mut grad = grad_scale.map(|_| vec![0f64; rows * vocab]);
    let mut labels = vec![-100; rows];
    for r in 0..rows {
        if active[r] < 0 {
            continue;
        }
        let z: Vec<f64> = logits[r * vocab..(r + 1) * vocab]
            .iter()
            .map(|&v| f(v))
            .collect();
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = z.iter().map(|&v| (v - max).exp()).sum();
        let prob = |j: usize| (z[j] - max).exp() / total;
        let target = match seed {
            None => active[r] as usize,
            Some(seed) => {
                let u = f(sample_uniform(seed, r as u64));
                let mut cdf = 0.0;
                (0..vocab)
                    .find(|&j| {
                        cdf += prob(j);
                        cdf > u
                    })
                    .unwrap_or(vocab - 1)
            }
        };
        labels[r] = target as i32;
        losses[r] = max + total.ln() - z[target];
        if let (Some(gr), Some(s)) = (grad.as_mut(), grad_scale) {
            for j in 0..vocab {
                let onehot = if j == target { 1.0 } else { 0.0 };
                gr[r * vocab + j] = f(s) * (prob(j) - onehot);
            }
        }
    }
    (to_f32(losses), grad.map(to_f32), labels)
}
