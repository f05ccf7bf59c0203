//! Row-wise CPU ops; each is the reference its CUDA kernel is tested against.

use rayon::prelude::*;

use super::gemm::zeroed;
use super::vmath;
use crate::backend::{CeTargets, sample_uniform};

/// Rows per rayon task for cheap elementwise row ops.
const ROW_CHUNK: usize = 16;

pub fn embedding(table: &[f32], ids: &[u32], dim: usize) -> Vec<f32> {
    let mut out = vec![0f32; ids.len() * dim];
    out.par_chunks_mut(dim).zip(ids).for_each(|(row, &id)| {
        let id = id as usize;
        row.copy_from_slice(&table[id * dim..(id + 1) * dim]);
    });
    out
}

pub fn rmsnorm(x: &[f32], w: &[f32], dim: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / dim;
    let mut y = Vec::with_capacity(x.len());
    let mut rstd = vec![0f32; rows];
    y.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(dim * ROW_CHUNK)
        .zip(rstd.par_chunks_mut(ROW_CHUNK))
        .zip(x.par_chunks(dim * ROW_CHUNK))
        .for_each(|((yc, rc), xc)| {
            let yc = zeroed(yc);
            for ((yr, r), xr) in yc.chunks_mut(dim).zip(rc.iter_mut()).zip(xc.chunks(dim)) {
                *r = rmsnorm_row(xr, w, eps, yr);
            }
        });
    // SAFETY: the loop zeroed every chunk of the first `x.len()` elements.
    unsafe { y.set_len(x.len()) };
    (y, rstd)
}

/// One row of `rmsnorm`: writes `y` and returns `rstd`.
fn rmsnorm_row(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for ((o, xi), wi) in y.iter_mut().zip(x).zip(w) {
        *o = wi * (xi * r);
    }
    r
}

/// `h += delta`, then `rmsnorm(h)`, one row at a time while the row is in cache: the same
/// operations in the same order as `add_assign` followed by `rmsnorm`, so bit-identical.
pub fn add_rmsnorm(
    h: &mut [f32],
    delta: &[f32],
    w: &[f32],
    dim: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>) {
    let rows = h.len() / dim;
    let n = h.len();
    let mut y = Vec::with_capacity(n);
    let mut rstd = vec![0f32; rows];
    y.spare_capacity_mut()[..n]
        .par_chunks_mut(dim * ROW_CHUNK)
        .zip(rstd.par_chunks_mut(ROW_CHUNK))
        .zip(h.par_chunks_mut(dim * ROW_CHUNK))
        .zip(delta.par_chunks(dim * ROW_CHUNK))
        .for_each(|(((yc, rc), hc), dc)| {
            let rows = zeroed(yc).chunks_mut(dim).zip(rc.iter_mut());
            for ((yr, r), (hr, dr)) in rows.zip(hc.chunks_mut(dim).zip(dc.chunks(dim))) {
                hr.iter_mut().zip(dr).for_each(|(a, b)| *a += b);
                *r = rmsnorm_row(hr, w, eps, yr);
            }
        });
    // SAFETY: the loop zeroed every chunk of the first `n` elements.
    unsafe { y.set_len(n) };
    (y, rstd)
}

/// `dx += rstd * (w*dy) - x * rstd^3 / D * sum(w*dy*x)`.
pub fn rmsnorm_backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    dim: usize,
    dx: &mut [f32],
) {
    dx.par_chunks_mut(dim)
        .zip(dy.par_chunks(dim))
        .zip(x.par_chunks(dim))
        .zip(rstd.par_iter())
        .for_each(|(((dxr, dyr), xr), &r)| {
            let dot: f32 = dyr.iter().zip(w).zip(xr).map(|((d, w), x)| d * w * x).sum();
            let c = dot * r * r * r / dim as f32;
            for (((o, d), wi), xi) in dxr.iter_mut().zip(dyr).zip(w).zip(xr) {
                *o += r * wi * d - xi * c;
            }
        });
}

/// Rotate-half RoPE: for `i < hd/2`, `(a, b) = (x_i, x_{i+hd/2})` becomes
/// `(a cos - b sin, b cos + a sin)`; `inverse` rotates by the negative angle.
pub fn rope(
    x: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    period: usize,
    n_heads: usize,
    hd: usize,
    inverse: bool,
) {
    let width = n_heads * hd;
    x.par_chunks_mut(width)
        .enumerate()
        .for_each(|(r, row)| rope_rows(row, cos, sin, period, n_heads, hd, inverse, r));
}

/// [`rope`] on rows `first, first + 1, ...` of an activation, on this thread.
#[allow(clippy::too_many_arguments)]
pub fn rope_rows(
    x: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    period: usize,
    n_heads: usize,
    hd: usize,
    inverse: bool,
    first: usize,
) {
    let half = hd / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    for (r, row) in x.chunks_mut(n_heads * hd).enumerate() {
        let t = (first + r) % period;
        let (c, s) = (
            &cos[t * half..(t + 1) * half],
            &sin[t * half..(t + 1) * half],
        );
        for head in row.chunks_mut(hd) {
            let (lo, hi) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                let si = sign * s[i];
                lo[i] = a * c[i] - b * si;
                hi[i] = b * c[i] + a * si;
            }
        }
    }
}

/// Elements per rayon task for the elementwise SwiGLU ops.
const ELEM_CHUNK: usize = 1 << 14;

pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let n = gate.len();
    let mut out = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(ELEM_CHUNK)
        .zip(gate.par_chunks(ELEM_CHUNK).zip(up.par_chunks(ELEM_CHUNK)))
        .for_each(|(o, (g, u))| vmath::swiglu(zeroed(o), g, u));
    // SAFETY: the loop zeroed every chunk of the first `n` elements.
    unsafe { out.set_len(n) };
    out
}

/// `d silu(g)/dg = sig(g) (1 + g (1 - sig(g)))`.
pub fn swiglu_backward(dact: &[f32], gate: &[f32], up: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = gate.len();
    let (mut dg, mut du) = (Vec::with_capacity(n), Vec::with_capacity(n));
    dg.spare_capacity_mut()[..n]
        .par_chunks_mut(ELEM_CHUNK)
        .zip(du.spare_capacity_mut()[..n].par_chunks_mut(ELEM_CHUNK))
        .zip(dact.par_chunks(ELEM_CHUNK))
        .zip(gate.par_chunks(ELEM_CHUNK).zip(up.par_chunks(ELEM_CHUNK)))
        .for_each(|(((dg, du), d), (g, u))| {
            vmath::swiglu_backward(zeroed(dg), zeroed(du), d, g, u)
        });
    // SAFETY: the loop zeroed every chunk of the first `n` elements of both.
    unsafe {
        dg.set_len(n);
        du.set_len(n);
    }
    (dg, du)
}

/// Fused softmax cross-entropy, one row per position (see `Backend::cross_entropy`).
pub fn cross_entropy(
    logits: &[f32],
    vocab: usize,
    targets: CeTargets<'_>,
    grad_scale: Option<f32>,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let rows = logits.len() / vocab;
    let (tg, seed) = match targets {
        CeTargets::Labels(t) => (t, None),
        CeTargets::Sample { mask, seed } => (mask, Some(seed)),
    };
    let mut losses = vec![0f32; rows];
    let mut dlogits = grad_scale.map(|_| vec![0f32; logits.len()]);
    // One pass of f32 exponentials, kept in `d` (the gradient row) when there is one;
    // the row sum accumulates in f64.
    let row_loss = |r: usize, z: &[f32], d: Option<&mut [f32]>| -> f32 {
        if tg[r] < 0 {
            return 0.0;
        }
        let max = vmath::max(z, f32::NEG_INFINITY);
        let mut scratch = Vec::new();
        let write_grad = d.is_some();
        let e: &mut [f32] = match d {
            Some(d) => d,
            None => {
                scratch.resize(z.len(), 0.0);
                &mut scratch
            }
        };
        e.copy_from_slice(z);
        vmath::exp_shifted(e, max);
        let mut sum = 0f64;
        for ec in e.chunks(256) {
            sum += vmath::sum(ec) as f64;
        }
        let lse = max + sum.ln() as f32;
        let target = match seed {
            None => tg[r] as usize,
            Some(seed) => {
                let u = sample_uniform(seed, r as u64) as f64 * sum;
                let mut acc = 0f64;
                e.iter()
                    .position(|&p| {
                        acc += p as f64;
                        acc > u
                    })
                    .unwrap_or(vocab - 1)
            }
        };
        if let Some(s) = grad_scale.filter(|_| write_grad) {
            let k = s / sum as f32;
            e.iter_mut().for_each(|o| *o *= k);
            e[target] -= s;
        }
        lse - z[target]
    };
    match dlogits.as_mut() {
        Some(d) => losses
            .par_iter_mut()
            .zip(logits.par_chunks(vocab))
            .zip(d.par_chunks_mut(vocab))
            .enumerate()
            .for_each(|(r, ((l, z), dr))| *l = row_loss(r, z, Some(dr))),
        None => losses
            .par_iter_mut()
            .zip(logits.par_chunks(vocab))
            .enumerate()
            .for_each(|(r, (l, z))| *l = row_loss(r, z, None)),
    }
    (losses, dlogits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The fused add + norm is the unfused pair to the bit (the model's figures on the CPU
    /// do not move), over more rows than one rayon chunk and an odd row length.
    #[test]
    fn add_rmsnorm_is_add_then_rmsnorm_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut rnd =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect() };
        for (rows, dim) in [(37, 33), (3, 1030), (1, 1)] {
            let (h0, delta, w) = (rnd(rows * dim), rnd(rows * dim), rnd(dim));
            let mut h = h0.clone();
            let (y, rstd) = add_rmsnorm(&mut h, &delta, &w, dim, 1e-5);
            let sum: Vec<f32> = h0.iter().zip(&delta).map(|(a, b)| a + b).collect();
            let (y_ref, rstd_ref) = rmsnorm(&sum, &w, dim, 1e-5);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&h), bits(&sum), "h, {rows}x{dim}");
            assert_eq!(bits(&y), bits(&y_ref), "y, {rows}x{dim}");
            assert_eq!(bits(&rstd), bits(&rstd_ref), "rstd, {rows}x{dim}");
        }
    }
}
