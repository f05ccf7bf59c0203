//! The fused classifier on the CPU (`Backend::classifier`): the LM head, softmax
//! cross-entropy and its backward over vocabulary chunks, each chunk's two products on the
//! blocked GEMM and the row work on rayon. The reference of `kernels/classifier.cu`.

use rayon::prelude::*;

use super::gemm::{Mat, gemm, gemm_new};
use super::vmath;
use crate::backend::{CLASSIFIER_CHUNK, CeTargets, ClassifierOut, sample_uniform};

/// Columns per partial sum: the blocking of `ops::cross_entropy`, so each chunk's sum
/// rounds as the materialised path's does.
const PARTIAL: usize = 256;

/// What one sweep over the vocabulary leaves per row.
#[derive(Clone, Copy)]
struct RowState {
    /// The largest logit.
    max: f32,
    /// `sum_j exp(z_j - max)`.
    sum: f64,
    /// The target's logit (active rows).
    target_logit: f32,
}

impl RowState {
    fn lse(&self) -> f32 {
        self.max + self.sum.ln() as f32
    }
}

/// See `Backend::classifier`; `w` is the head `(vocab, dim)`. Ignored rows have loss 0
/// and gradient 0 whatever their logits, so only the active rows go through the head (a
/// prompt/response batch with answer-only labels skips most of the work).
pub fn classifier(
    h: &[f32],
    w: &[f32],
    dim: usize,
    vocab: usize,
    targets: CeTargets<'_>,
    grad_scale: Option<f32>,
) -> ClassifierOut<Vec<f32>> {
    let (tg, seed) = match targets {
        CeTargets::Labels(t) => (t, None),
        CeTargets::Sample { mask, seed } => (mask, Some(seed)),
    };
    let rows = tg.len();
    let active: Vec<usize> = (0..rows).filter(|&r| tg[r] >= 0).collect();
    let compact = active.len() < rows;
    let gathered: Vec<f32>;
    let ha = if compact {
        gathered = active
            .iter()
            .flat_map(|&r| h[r * dim..(r + 1) * dim].iter().copied())
            .collect();
        &gathered[..]
    } else {
        h
    };
    let given: Vec<i32> = active.iter().map(|&r| tg[r]).collect();
    let la = match seed {
        None => given,
        Some(seed) => {
            let st = sweep(ha, w, dim, vocab, &given, None);
            draw(ha, w, dim, vocab, &active, seed, &st)
        }
    };
    let mut acc = grad_scale.map(|_| vec![0f32; active.len() * dim]);
    let st = sweep(ha, w, dim, vocab, &la, acc.as_deref_mut());
    let mut losses = vec![0f32; rows];
    let mut labels = vec![-100; rows];
    for (i, &r) in active.iter().enumerate() {
        losses[r] = st[i].lse() - st[i].target_logit;
        labels[r] = la[i];
    }
    if seed.is_none() {
        // Data labels are returned as given, whatever negative value ignores a row.
        labels.copy_from_slice(tg);
    }
    let dhidden = match (acc, grad_scale) {
        (Some(mut acc), Some(scale)) => {
            acc.par_chunks_mut(dim)
                .zip(st.par_iter().zip(la.par_iter()))
                .for_each(|(a, (s, &t))| {
                    let inv = 1.0 / s.sum as f32;
                    let p_t = (s.target_logit - s.lse()).exp();
                    let wt = &w[t as usize * dim..(t as usize + 1) * dim];
                    for (a, &wv) in a.iter_mut().zip(wt) {
                        *a = scale * (*a * inv + (p_t - 1.0) * wv);
                    }
                });
            Some(if compact {
                let mut full = vec![0f32; rows * dim];
                for (i, &r) in active.iter().enumerate() {
                    full[r * dim..(r + 1) * dim].copy_from_slice(&acc[i * dim..(i + 1) * dim]);
                }
                full
            } else {
                acc
            })
        }
        _ => None,
    };
    ClassifierOut {
        losses,
        labels,
        dhidden,
    }
}

/// `z (rows, n) = h W[j0..j0+n]^T` in the first `rows * n` elements of `z`, returned.
/// The first chunk allocates `z` by its own product, which writes every element: a
/// zero-filled buffer cost a memset of 32 MB a sweep at SmolLM2's shapes.
fn logits<'z>(
    h: &[f32],
    w: &[f32],
    dim: usize,
    j0: usize,
    n: usize,
    z: &'z mut Vec<f32>,
) -> &'z mut [f32] {
    let rows = h.len() / dim;
    let (hv, wv) = (
        Mat::rows(h, dim),
        Mat::rows(&w[j0 * dim..(j0 + n) * dim], dim).t(),
    );
    if z.len() < rows * n {
        *z = gemm_new(rows, n, dim, hv, wv, 1.0, true);
    } else {
        gemm(rows, n, dim, z, n, false, hv, wv, 1.0, true);
    }
    &mut z[..rows * n]
}

/// One sweep over the vocabulary (every row active: `labels[r] >= 0`): per row the max,
/// the sum of exponentials and the target's logit; with `acc`, also
/// `acc_r = sum_{j != t_r} exp(z_rj - max_r) W_j` (rescaled as the max grows).
fn sweep(
    h: &[f32],
    w: &[f32],
    dim: usize,
    vocab: usize,
    labels: &[i32],
    mut acc: Option<&mut [f32]>,
) -> Vec<RowState> {
    let rows = labels.len();
    let chunk = CLASSIFIER_CHUNK.min(vocab);
    let mut z: Vec<f32> = Vec::new();
    let mut st = vec![
        RowState {
            max: f32::NEG_INFINITY,
            sum: 0.0,
            target_logit: 0.0,
        };
        rows
    ];
    let mut rescale = vec![1f32; rows];
    for j0 in (0..vocab).step_by(chunk) {
        let n = chunk.min(vocab - j0);
        let z = logits(h, w, dim, j0, n, &mut z);
        z.par_chunks_mut(n)
            .zip(st.par_iter_mut().zip(rescale.par_iter_mut()))
            .zip(labels.par_iter())
            .for_each(|((zr, (s, alpha)), &t)| {
                let local = (t as usize).checked_sub(j0).filter(|&j| j < n);
                if let Some(j) = local {
                    s.target_logit = zr[j];
                }
                let m = vmath::max(zr, s.max);
                vmath::exp_shifted(zr, m);
                let mut part = 0f64;
                for block in zr.chunks(PARTIAL) {
                    part += vmath::sum(block) as f64;
                }
                *alpha = (s.max - m).exp();
                s.sum = s.sum * *alpha as f64 + part;
                s.max = m;
                if let Some(j) = local {
                    zr[j] = 0.0;
                }
            });
        if let Some(acc) = acc.as_deref_mut() {
            acc.par_chunks_mut(dim)
                .zip(rescale.par_iter())
                .filter(|(_, alpha)| **alpha != 1.0)
                .for_each(|(a, &alpha)| a.iter_mut().for_each(|v| *v *= alpha));
            let wc = &w[j0 * dim..(j0 + n) * dim];
            gemm(
                rows,
                dim,
                n,
                acc,
                dim,
                true,
                Mat::rows(z, n),
                Mat::rows(wc, dim),
                1.0,
                true,
            );
        }
    }
    st
}

/// Monte-Carlo labels by inverting each row's CDF in vocabulary order, given its final
/// max and sum (`st`); row `i` is batch row `ids[i]`, whose uniform it draws.
fn draw(
    h: &[f32],
    w: &[f32],
    dim: usize,
    vocab: usize,
    ids: &[usize],
    seed: u64,
    st: &[RowState],
) -> Vec<i32> {
    let chunk = CLASSIFIER_CHUNK.min(vocab);
    let mut z: Vec<f32> = Vec::new();
    // Per row: the mass of the columns before this chunk, the threshold, and the label
    // (-1 while not found).
    let mut scan: Vec<(f64, f64, i32)> = ids
        .iter()
        .zip(st)
        .map(|(&r, s)| (0.0, sample_uniform(seed, r as u64) as f64 * s.sum, -1))
        .collect();
    for j0 in (0..vocab).step_by(chunk) {
        if scan.iter().all(|s| s.2 != -1) {
            break;
        }
        let n = chunk.min(vocab - j0);
        let z = logits(h, w, dim, j0, n, &mut z);
        z.par_chunks_mut(n)
            .zip(scan.par_iter_mut().zip(st.par_iter()))
            .filter(|(_, (sc, _))| sc.2 == -1)
            .for_each(|(zr, ((cum, u, label), s))| {
                // The CDF terms as `ops::cross_entropy`'s sampler computes them.
                vmath::exp_shifted(zr, s.max);
                for (j, &e) in zr.iter().enumerate() {
                    *cum += e as f64;
                    if *cum > *u {
                        *label = (j0 + j) as i32;
                        return;
                    }
                }
            });
    }
    scan.into_iter()
        .map(|(_, _, l)| if l == -1 { vocab as i32 - 1 } else { l })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::cpu::weight::CpuWeight;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rel(got: &[f32], want: &[f32]) -> f64 {
        let num: f64 = got
            .iter()
            .zip(want)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum();
        let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
        (num / den).sqrt()
    }

    /// Two full chunks and a tail of 77 columns; every seventh row ignored; hidden states
    /// and head spread so that the softmaxes are peaked but not one-hot.
    fn inputs(rows: usize, dim: usize, vocab: usize) -> (Vec<f32>, Vec<f32>, Vec<i32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut rnd = |n: usize, s: f32| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * s)
                .collect()
        };
        let (h, w) = (rnd(rows * dim, 1.0), rnd(vocab * dim, 0.5));
        let labels = (0..rows)
            .map(|r| {
                if r % 7 == 3 {
                    -100
                } else {
                    ((r * 7919) % vocab) as i32
                }
            })
            .collect();
        (h, w, labels)
    }

    /// The fused classifier against `linear` + `cross_entropy` + `linear_backward`: f32
    /// sums in another order (chunked, rescaled), so 1e-5 relative.
    #[test]
    fn fused_matches_materialised() {
        let be = CpuBackend::new(2);
        let (rows, dim, vocab) = (37, 48, 2 * CLASSIFIER_CHUNK + 77);
        let (h, w, labels) = inputs(rows, dim, vocab);
        let w = CpuWeight::new(w, vocab, dim);
        let z = be.linear(&h, &w, rows, dim, vocab).unwrap();
        let mask_seed = [
            (CeTargets::Labels(&labels), 0.25),
            (
                CeTargets::Sample {
                    mask: &labels,
                    seed: 11,
                },
                1.0,
            ),
        ];
        for (t, scale) in mask_seed {
            let (lm, dz) = be.cross_entropy(&z, rows, vocab, t, Some(scale)).unwrap();
            let dz = dz.unwrap();
            let mut dhm = vec![0f32; rows * dim];
            be.linear_backward(&dz, &w, rows, dim, vocab, &mut dhm, false)
                .unwrap();
            let o = be
                .classifier(&h, &w, rows, dim, vocab, t, Some(scale))
                .unwrap();
            // The materialised gradient's one negative entry per active row is its label.
            let want_labels: Vec<i32> = dz
                .chunks(vocab)
                .zip(&labels)
                .map(|(row, &l)| {
                    let j = (0..vocab)
                        .min_by(|&a, &b| row[a].total_cmp(&row[b]))
                        .unwrap();
                    if l < 0 { -100 } else { j as i32 }
                })
                .collect();
            let got_labels: Vec<i32> = o.labels.iter().map(|&l| l.max(-100)).collect();
            assert_eq!(got_labels, want_labels, "{t:?}");
            assert!(
                rel(&o.losses, &lm) < 1e-5,
                "losses {:e}",
                rel(&o.losses, &lm)
            );
            let dh = o.dhidden.unwrap();
            assert!(rel(&dh, &dhm) < 1e-5, "dhidden {:e}", rel(&dh, &dhm));
            let lonly = be.classifier(&h, &w, rows, dim, vocab, t, None).unwrap();
            assert!(lonly.dhidden.is_none());
            assert_eq!(lonly.losses, o.losses);
        }
    }

    /// Sampled labels equal the materialised sampler's on many draws: the same uniform,
    /// the same CDF terms `exp(z - max)` in vocabulary order; only the normaliser is
    /// summed in another order, which can move a label only when a uniform falls within
    /// ~1e-7 of a CDF boundary.
    #[test]
    fn sampled_labels_equal_the_materialised_sampler() {
        let be = CpuBackend::new(2);
        let (rows, dim, vocab) = (64, 16, CLASSIFIER_CHUNK + 300);
        let (h, w, mask) = inputs(rows, dim, vocab);
        // Every row active: the path without compaction (the other test has ignored rows).
        let mask: Vec<i32> = mask.iter().map(|&l| l.max(0)).collect();
        let w = CpuWeight::new(w, vocab, dim);
        let z = be.linear(&h, &w, rows, dim, vocab).unwrap();
        for seed in 0..20 {
            let t = CeTargets::Sample { mask: &mask, seed };
            let (lm, _) = be.cross_entropy(&z, rows, vocab, t, None).unwrap();
            let o = be.classifier(&h, &w, rows, dim, vocab, t, None).unwrap();
            // Equal losses row by row: the losses of different labels differ by O(1).
            for (r, (a, b)) in o.losses.iter().zip(&lm).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "seed {seed} row {r}: {a} vs {b}"
                );
            }
        }
    }
}
