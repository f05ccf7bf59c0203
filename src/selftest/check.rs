//! How a device result is held to its reference: the error metric, the bounds, and the
//! `Checker` every case runs through (random inputs, upload to both backends, compare).

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::report::{Metric, Row};
use super::{BaseDtype, Options};
use crate::backend::{Backend, RopeTable};
use crate::error::Result;

/// One RoPE table on the device and on the reference (`Checker::up_rope`).
pub type RopeTables<D, R> = (
    RopeTable<<D as Backend>::Buf>,
    RopeTable<<R as Backend>::Buf>,
);

/// What a comparison tolerates; the bound is a function of this and the base dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tolerance {
    /// f32 arithmetic in another summation order.
    F32,
    /// The op reads the frozen base weights, which the device may store as bf16.
    BaseWeights,
    /// The op ran on bf16 tensor cores (flash attention): inputs rounded to bf16, f32
    /// accumulation.
    TensorCores,
    /// f32 arithmetic whose result the device stores as a bf16 activation when the base
    /// weights are bf16 (the normed hidden states, the SwiGLU output): one rounding to
    /// nearest, at most 2^-8 / (1 + 2^-8) = 0.00389 relative per element (bf16 keeps 8
    /// significant bits).
    Activation,
    /// A copy: must be bit for bit.
    Exact,
    /// A whole pass of the tiny model (gradients, curvature, a training step): errors of
    /// many ops compound, and with bf16 every base-weight product rounds its inputs. The
    /// bf16 bound, 5e-2, is not derived: on the simulator (2026-12-01) the worst rows were
    /// 1.1e-2 (gradients), 1.5e-2 (curvature, kfac reduce) and 2.1e-2 (the update of three
    /// steps under the kfac-tri penalty), so it leaves a factor of 2.3.
    EndToEnd,
}

impl Tolerance {
    pub fn bound(self, dtype: BaseDtype) -> f64 {
        match (self, dtype) {
            (Tolerance::Exact, _) => 0.0,
            (Tolerance::F32, _)
            | (Tolerance::BaseWeights | Tolerance::TensorCores, BaseDtype::F32) => 1e-4,
            (Tolerance::BaseWeights | Tolerance::TensorCores, BaseDtype::Bf16) => 1e-2,
            (Tolerance::Activation, BaseDtype::F32) => 1e-4,
            (Tolerance::Activation, BaseDtype::Bf16) => 1.0 / 256.0,
            (Tolerance::EndToEnd, BaseDtype::F32) => 1e-4,
            (Tolerance::EndToEnd, BaseDtype::Bf16) => 5e-2,
        }
    }
}

/// `(||got - want|| / ||want||, max |got - want|)` in f64. A length mismatch, or any
/// difference against an all-zero `want`, is an infinite error; NaN propagates.
pub fn rel_err(got: &[f32], want: &[f32]) -> (f64, f64) {
    if got.len() != want.len() {
        return (f64::INFINITY, f64::INFINITY);
    }
    let (mut num, mut den, mut max_abs) = (0f64, 0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        let d = (g as f64 - w as f64).abs();
        num += d * d;
        den += (w as f64) * (w as f64);
        max_abs = if d.is_nan() || max_abs.is_nan() {
            f64::NAN
        } else {
            max_abs.max(d)
        };
    }
    let rel = if num == 0.0 { 0.0 } else { (num / den).sqrt() };
    (rel, max_abs)
}

/// Runs cases against a device and a reference and collects their rows.
pub struct Checker<'a, D: Backend, R: Backend> {
    pub dev: &'a D,
    pub re: &'a R,
    dtype: BaseDtype,
    rng: ChaCha8Rng,
    pub rows: Vec<Row>,
    progress: &'a mut dyn FnMut(&str),
}

impl<'a, D: Backend, R: Backend> Checker<'a, D, R> {
    pub fn new(dev: &'a D, re: &'a R, opts: &Options, progress: &'a mut dyn FnMut(&str)) -> Self {
        Checker {
            dev,
            re,
            dtype: opts.base_dtype,
            rng: ChaCha8Rng::seed_from_u64(opts.seed),
            rows: Vec::new(),
            progress,
        }
    }

    /// Announce the case about to run (a device fault then names it).
    pub fn case(&mut self, op: &str, shapes: &str) {
        (self.progress)(&format!("{op} [{shapes}]"));
    }

    pub fn bound(&self, tol: Tolerance) -> f64 {
        tol.bound(self.dtype)
    }

    /// `n` values with a random sign and magnitude in `[0.05, 1)`: never zero, so no
    /// product vanishes by accident.
    pub fn random(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let m = 0.05 + 0.95 * self.rng.random::<f32>();
                if self.rng.random::<bool>() { m } else { -m }
            })
            .collect()
    }

    /// `n` values in `[0.05, 1)` (second moments, precisions, Fisher sums).
    pub fn positive(&mut self, n: usize) -> Vec<f32> {
        self.random(n).into_iter().map(f32::abs).collect()
    }

    pub fn below(&mut self, n: usize, bound: usize) -> Vec<usize> {
        (0..n).map(|_| self.rng.random_range(0..bound)).collect()
    }

    /// `v` as the device's base-weight products read it: rounded to bf16 when the base
    /// dtype is bf16. For outputs that are discontinuous in their inputs (sampled labels),
    /// so that device and reference draw from the same logits up to summation order.
    pub fn as_base_input(&self, v: Vec<f32>) -> Vec<f32> {
        match self.dtype {
            BaseDtype::F32 => v,
            BaseDtype::Bf16 => v
                .into_iter()
                .map(|x| half::bf16::from_f32(x).to_f32())
                .collect(),
        }
    }

    /// The same host data on both backends.
    pub fn up(&self, host: &[f32]) -> Result<(D::Buf, R::Buf)> {
        Ok((self.dev.buf(host.to_vec())?, self.re.buf(host.to_vec())?))
    }

    /// `random(n)` on both backends.
    pub fn up_random(&mut self, n: usize) -> Result<(D::Buf, R::Buf)> {
        let host = self.random(n);
        self.up(&host)
    }

    /// A RoPE table of `period` rows of `head_dim / 2` angles in (-3, 3) (cos and sin of
    /// each, so rotations keep lengths) on both backends.
    pub fn up_rope(&mut self, period: usize, head_dim: usize) -> Result<RopeTables<D, R>> {
        let angles: Vec<f32> = self
            .random(period * head_dim / 2)
            .iter()
            .map(|a| 3.0 * a)
            .collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let ((cd, cr), (sd, sr)) = (self.up(&cos)?, self.up(&sin)?);
        Ok((
            RopeTable {
                cos: cd,
                sin: sd,
                period,
            },
            RopeTable {
                cos: cr,
                sin: sr,
                period,
            },
        ))
    }

    /// `positive(n)` on both backends.
    pub fn up_positive(&mut self, n: usize) -> Result<(D::Buf, R::Buf)> {
        let host = self.positive(n);
        self.up(&host)
    }

    /// Compare a device buffer with the reference's.
    pub fn check(
        &mut self,
        kernel: &str,
        shapes: &str,
        got: &D::Buf,
        want: &R::Buf,
        tol: Tolerance,
    ) -> Result<()> {
        let (g, w) = (self.dev.to_host(got)?, self.re.to_host(want)?);
        self.check_host(kernel, shapes, &g, &w, tol);
        Ok(())
    }

    pub fn check_host(
        &mut self,
        kernel: &str,
        shapes: &str,
        got: &[f32],
        want: &[f32],
        tol: Tolerance,
    ) {
        let (rel_err, max_abs) = rel_err(got, want);
        self.push(
            kernel,
            shapes,
            Metric::Rel { rel_err, max_abs },
            self.bound(tol),
        );
    }

    pub fn check_scalar(
        &mut self,
        kernel: &str,
        shapes: &str,
        got: f64,
        want: f64,
        tol: Tolerance,
    ) {
        let abs = (got - want).abs();
        let rel_err = if abs == 0.0 { 0.0 } else { abs / want.abs() };
        let metric = Metric::Rel {
            rel_err,
            max_abs: abs,
        };
        self.push(kernel, shapes, metric, self.bound(tol));
    }

    /// Compare named pairs of tensors; one row, with the worst tensor's error (named in
    /// the shapes column) and the largest absolute difference over all.
    pub fn check_tensors(
        &mut self,
        kernel: &str,
        shapes: &str,
        pairs: &[(String, &[f32], &[f32])],
        tol: Tolerance,
    ) {
        let mut worst = (String::new(), 0f64);
        let mut max_abs = 0f64;
        for (name, got, want) in pairs {
            let (rel, abs) = rel_err(got, want);
            // A NaN is worse than any number, and the first NaN stays the worst.
            let worse =
                worst.0.is_empty() || (!worst.1.is_nan() && (rel.is_nan() || rel > worst.1));
            if worse {
                worst = (name.clone(), rel);
            }
            max_abs = if abs.is_nan() || max_abs.is_nan() {
                f64::NAN
            } else {
                max_abs.max(abs)
            };
        }
        let shapes = format!("{shapes}, {} tensors, worst {}", pairs.len(), worst.0);
        let metric = Metric::Rel {
            rel_err: worst.1,
            max_abs,
        };
        self.push(kernel, &shapes, metric, self.bound(tol));
    }

    pub fn push(&mut self, kernel: &str, shapes: &str, metric: Metric, bound: f64) {
        self.rows.push(Row::new(kernel, shapes, metric, bound));
    }
}
