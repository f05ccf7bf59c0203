//! AdamW with the diagonal Laplace penalty gradient fused in (CPU reference).

use rayon::prelude::*;

use crate::backend::AdamHyper;

/// `g' = grad_scale*g [+ lambda*prec*(p - mean)]`; decoupled decay `p *= 1 - lr*wd`;
/// `m = b1 m + (1-b1) g'`, `v = b2 v + (1-b2) g'^2`;
/// `p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)` (PyTorch's AdamW).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    h: &AdamHyper,
    grad_scale: f32,
    penalty: Option<(&[f32], &[f32], f32)>,
) {
    let bc1 = 1.0 - h.beta1.powi(h.step as i32);
    let bc2 = 1.0 - h.beta2.powi(h.step as i32);
    p.par_iter_mut()
        .zip(g.par_iter())
        .zip(m.par_iter_mut())
        .zip(v.par_iter_mut())
        .enumerate()
        .for_each(|(i, (((p, &g), m), v))| {
            let mut gi = grad_scale * g;
            if let Some((mean, prec, lambda)) = penalty {
                gi += lambda * prec[i] * (*p - mean[i]);
            }
            *p *= 1.0 - h.lr * h.weight_decay;
            *m = h.beta1 * *m + (1.0 - h.beta1) * gi;
            *v = h.beta2 * *v + (1.0 - h.beta2) * gi * gi;
            *p -= h.lr * (*m / bc1) / ((*v / bc2).sqrt() + h.eps);
        });
}
