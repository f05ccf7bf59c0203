//! The curvature primitives of the plain reference. A segment is a run of rows of one
//! sequence; rows outside every segment (padding) never contribute.

use super::{add_into, f, to_f32};
use crate::backend::Segment;

fn rows(s: &Segment) -> std::ops::Range<usize> {
    s.start..s.start + s.len
}

/// `out[i, j] += alpha * sum_segments sum_{p in segment} x[p, i] y[p, j]`.
pub fn gram_accumulate(
    x: &[f32],
    dx: usize,
    y: &[f32],
    dy: usize,
    segments: &[Segment],
    alpha: f32,
    out: &mut [f32],
) {
    let mut d = vec![0f64; dx * dy];
    for i in 0..dx {
        for j in 0..dy {
            let sum: f64 = segments
                .iter()
                .flat_map(rows)
                .map(|p| f(x[p * dx + i]) * f(y[p * dy + j]))
                .sum();
            d[i * dy + j] = f(alpha) * sum;
        }
    }
    add_into(out, &d);
}

/// `out[i, j] = out[j, i]` for `i > j`, element by element.
pub fn mirror_upper(out: &mut [f32], n: usize) {
    for i in 0..n {
        for j in 0..i {
            out[i * n + j] = out[j * n + i];
        }
    }
}

/// `out[s, :]` = the sum of segment `s`'s rows, divided by its length with `mean` (an
/// empty segment gives zeros).
pub fn segment_sum(x: &[f32], dim: usize, segments: &[Segment], mean: bool) -> Vec<f32> {
    let mut out = vec![0f64; segments.len() * dim];
    for (s, seg) in segments.iter().enumerate() {
        for c in 0..dim {
            let sum: f64 = rows(seg).map(|p| f(x[p * dim + c])).sum();
            out[s * dim + c] = if mean && seg.len > 0 {
                sum / seg.len as f64
            } else {
                sum
            };
        }
    }
    to_f32(out)
}

/// For every segment `n`: `out[i, j] += (alpha * sum_{p in n} g[p, i] y[p, j])^2` (the
/// square of that sequence's gradient block, summed over sequences).
pub fn sq_grad_accumulate(
    g: &[f32],
    dg: usize,
    y: &[f32],
    dy: usize,
    segments: &[Segment],
    alpha: f32,
    out: &mut [f32],
) {
    let mut d = vec![0f64; dg * dy];
    for seg in segments {
        for i in 0..dg {
            for j in 0..dy {
                let sum: f64 = rows(seg).map(|p| f(g[p * dg + i]) * f(y[p * dy + j])).sum();
                d[i * dy + j] += (f(alpha) * sum).powi(2);
            }
        }
    }
    add_into(out, &d);
}
