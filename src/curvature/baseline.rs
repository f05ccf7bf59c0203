//! Curvatures that carry no direction from the source data, to tell what the estimated
//! one adds (the demo's data study): `isotropic`, the same total curvature spread evenly
//! over the parameters, and `none`, no curvature at all (the penalty is `delta |D|^2`).

use super::{Curvature, CurvatureMeta, Scheme};
use crate::model::HostLora;

/// The trace of the Fisher a curvature approximates, `tr F = sum_i F_ii` over every LoRA
/// parameter (a sum over the data, as the file stores it):
/// - `diag`: `sum_i F_i`;
/// - `kfac` / `kfac-tri`: per A and per B, `tr(C (x) G) = tr(C) tr(G)`; kfac-tri's A-B cross
///   blocks lie off the diagonal and add nothing.
///
/// In f64, as the sum runs over every parameter.
pub fn fisher_trace(c: &Curvature) -> f64 {
    let sum = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>();
    let trace = |m: &[f32], n: usize| (0..n).map(|i| f64::from(m[i * n + i])).sum::<f64>();
    if let Some(d) = &c.diag {
        return d.modules.iter().map(|m| sum(&m.a) + sum(&m.b)).sum();
    }
    let r = c.mean.cfg.r;
    match &c.kfac {
        Some(k) => c
            .mean
            .modules
            .iter()
            .zip(k)
            .map(|(m, f)| {
                trace(&f.a_in, m.d_in) * trace(&f.a_out, r)
                    + trace(&f.b_in, r) * trace(&f.b_out, m.d_out)
            })
            .sum(),
        None => 0.0,
    }
}

/// A diagonal curvature at `c`'s `theta*` with every entry `tr F / P` (`P` LoRA
/// parameters), over `c`'s sequence count: the penalty `sum_i (tr F / (P N) + delta) D_i^2`
/// has the same total strength as `c`'s at every lambda, in no particular direction.
pub fn isotropic(c: &Curvature) -> Curvature {
    let value = (fisher_trace(c) / c.mean.n_params() as f64) as f32;
    Curvature {
        meta: CurvatureMeta {
            scheme: Scheme::Diag,
            data: format!(
                "isotropic: the trace of the {} curvature on {} ({value:e} per parameter over {} sequences)",
                c.meta.scheme, c.meta.data, c.meta.n_sequences
            ),
            ..c.meta.clone()
        },
        mean: c.mean.clone(),
        diag: Some(filled(&c.mean, value)),
        kfac: None,
    }
}

/// No curvature at `theta*`: a zero diagonal, so the penalty is `lambda/2 delta |D|^2`
/// (the prior alone). One sequence and position stand in for the data, none having been
/// used (the penalty divides zero by them).
pub fn none(c: &Curvature) -> Curvature {
    Curvature {
        meta: CurvatureMeta {
            scheme: Scheme::Diag,
            n_sequences: 1,
            n_positions: 1,
            data: "none: no curvature, the penalty is the prior precision delta alone".into(),
            ..c.meta.clone()
        },
        mean: c.mean.clone(),
        diag: Some(filled(&c.mean, 0.0)),
        kfac: None,
    }
}

/// `mean`'s structure with every entry `value`.
fn filled(mean: &HostLora, value: f32) -> HostLora {
    let mut d = mean.zeros_like();
    for m in &mut d.modules {
        m.a.fill(value);
        m.b.fill(value);
    }
    d
}
