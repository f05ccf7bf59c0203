//! A human-readable account of a curvature estimate: per-layer traces and maxima, the
//! share of exactly-zero entries, the `B = 0` caveat, and for kfac-tri the smallest
//! eigenvalue of each adapted module's full A-B block system (on modules small enough to form it).

use serde::Serialize;

use super::{Curvature, KfacFactors};
use crate::model::LoraModule;

/// Layers whose joint A-B system has at most this many parameters get an eigenvalue.
pub const EIGEN_MAX_DIM: usize = 1024;

#[derive(Debug, Clone, Serialize)]
pub struct ModuleSummary {
    pub module: String,
    /// Trace of A's block (`sum F_A`, or `tr C_A tr G_A`).
    pub trace_a: f64,
    pub trace_b: f64,
    /// Largest entry of the block (diag) or of the Kronecker product (kfac).
    pub max: f64,
    /// Share of exactly-zero entries over both blocks.
    pub zero_share: f64,
    /// Entries of the two blocks (`|A| + |B|` for diag, `n_A^2 + n_B^2` with
    /// `n_A = r d_in`, `n_B = d_out r` for kfac): `zero_share`'s weight in its layer's.
    pub entries: usize,
    /// kfac-tri: smallest and largest eigenvalue of
    /// `[[C_A(x)G_A, C_AB(x)G_AB], [., C_B(x)G_B]]`.
    pub min_eigenvalue: Option<f64>,
    pub max_eigenvalue: Option<f64>,
}

/// One transformer layer: its modules together (a row of the printed table).
#[derive(Debug, Clone, Serialize)]
pub struct LayerSummary {
    /// The layer's index, as in `layers.{i}`.
    pub layer: String,
    /// The modules' traces summed.
    pub trace_a: f64,
    pub trace_b: f64,
    /// The largest module's `max`.
    pub max: f64,
    /// Share of exactly-zero entries over all the layer's blocks (each module weighted by
    /// its `entries`, not a mean of the modules' shares).
    pub zero_share: f64,
    /// kfac-tri: the smallest `min_eigenvalue / |max_eigenvalue|` of its modules.
    pub min_max_eig: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub modules: Vec<ModuleSummary>,
    /// The modules grouped by layer, in order.
    pub layers: Vec<LayerSummary>,
    /// Every A entry is zero: the gradient w.r.t. A vanishes because B = 0.
    pub a_is_zero: bool,
    pub notes: Vec<String>,
}

fn stats(x: &[f32]) -> (f64, f64, usize) {
    let max = x.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let zeros = x.iter().filter(|v| **v == 0.0).count();
    (x.iter().map(|v| *v as f64).sum(), max, zeros)
}

fn diag_of(m: &[f32], n: usize) -> f64 {
    (0..n).map(|i| m[i * n + i] as f64).sum()
}

fn kron_stats(c: &[f32], g: &[f32], nc: usize, ng: usize) -> (f64, f64, f64) {
    let (_, cmax, cz) = stats(c);
    let (_, gmax, gz) = stats(g);
    let nonzero = (1.0 - cz as f64 / c.len() as f64) * (1.0 - gz as f64 / g.len() as f64);
    (diag_of(c, nc) * diag_of(g, ng), cmax * gmax, 1.0 - nonzero)
}

/// Eigenvalues below `-NEGATIVE_TOL * max` count as negative; closer to zero they are
/// within the f32 rounding of the factors.
pub const NEGATIVE_TOL: f64 = 1e-5;

/// Smallest and largest eigenvalue of the joint system in column-stacking vec order:
/// `F[(i + r j), (k + r l)] = C_A[j,l] G_A[i,k]` for A, likewise for B, and the cross block
/// `[(i + r j), (k + d_out l)] = C_AB[j,l] G_AB[i,k]`.
fn eigen_range<T>(m: &LoraModule<T>, r: usize, f: &KfacFactors) -> Option<(f64, f64)> {
    let (din, dout) = (m.d_in, m.d_out);
    let (na, nb) = (r * din, dout * r);
    let n = na + nb;
    let (c, g) = f.cross.as_ref()?;
    if n > EIGEN_MAX_DIM {
        return None;
    }
    let mut mat = nalgebra::DMatrix::<f64>::zeros(n, n);
    for j in 0..din {
        for l in 0..din {
            for i in 0..r {
                for k in 0..r {
                    mat[(i + r * j, k + r * l)] =
                        f.a_in[j * din + l] as f64 * f.a_out[i * r + k] as f64;
                }
            }
        }
    }
    for j in 0..r {
        for l in 0..r {
            for i in 0..dout {
                for k in 0..dout {
                    mat[(na + i + dout * j, na + k + dout * l)] =
                        f.b_in[j * r + l] as f64 * f.b_out[i * dout + k] as f64;
                }
            }
        }
    }
    for j in 0..din {
        for l in 0..r {
            for i in 0..r {
                for k in 0..dout {
                    let v = c[j * r + l] as f64 * g[i * dout + k] as f64;
                    mat[(i + r * j, na + k + dout * l)] = v;
                    mat[(na + k + dout * l, i + r * j)] = v;
                }
            }
        }
    }
    let eig = nalgebra::SymmetricEigen::new(mat);
    let min = eig.eigenvalues.iter().copied().reduce(f64::min)?;
    let max = eig.eigenvalues.iter().copied().reduce(f64::max)?;
    Some((min, max))
}

pub fn summarize(c: &Curvature) -> Summary {
    let r = c.mean.cfg.r;
    let mut modules = Vec::new();
    let mut a_zero = true;
    for (i, m) in c.mean.modules.iter().enumerate() {
        let name = format!("layers.{}.{}", m.layer, m.proj.hf_path());
        let s = if let Some(d) = &c.diag {
            let (ta, ma, za) = stats(&d.modules[i].a);
            let (tb, mb, zb) = stats(&d.modules[i].b);
            a_zero &= ma == 0.0;
            let n = d.modules[i].a.len() + d.modules[i].b.len();
            ModuleSummary {
                module: name,
                trace_a: ta,
                trace_b: tb,
                max: ma.max(mb),
                zero_share: (za + zb) as f64 / n as f64,
                entries: n,
                min_eigenvalue: None,
                max_eigenvalue: None,
            }
        } else if let Some(k) = &c.kfac {
            let f = &k[i];
            let (ta, ma, za) = kron_stats(&f.a_in, &f.a_out, m.d_in, r);
            let (tb, mb, zb) = kron_stats(&f.b_in, &f.b_out, r, m.d_out);
            a_zero &= ma == 0.0;
            let (na, nb) = ((r * m.d_in) as f64, (r * m.d_out) as f64);
            let eig = eigen_range(m, r, f);
            ModuleSummary {
                module: name,
                trace_a: ta,
                trace_b: tb,
                max: ma.max(mb),
                zero_share: (za * na * na + zb * nb * nb) / (na * na + nb * nb),
                entries: (r * m.d_in).pow(2) + (r * m.d_out).pow(2),
                min_eigenvalue: eig.map(|e| e.0),
                max_eigenvalue: eig.map(|e| e.1),
            }
        } else {
            continue;
        };
        modules.push(s);
    }
    let mut notes = Vec::new();
    if a_zero {
        notes.push(
            "A's curvature is exactly zero: at the fresh init B = 0, so every gradient w.r.t. A vanishes; only the prior precision --delta constrains A (estimate after --warmup-steps or at a trained --adapter to change that)."
                .into(),
        );
    }
    if c.kfac
        .as_ref()
        .is_some_and(|k| k.iter().any(|f| f.cross.is_some()))
    {
        let ratios: Vec<f64> = modules
            .iter()
            .filter_map(|m| {
                Some(m.min_eigenvalue? / m.max_eigenvalue?.abs().max(f64::MIN_POSITIVE))
            })
            .collect();
        let neg = ratios.iter().filter(|&&q| q < -NEGATIVE_TOL).count();
        notes.push(match ratios.iter().copied().reduce(f64::min) {
            Some(worst) => format!(
                "kfac-tri is not positive semi-definite in general: {neg} of {} adapted modules small enough to check (<= {EIGEN_MAX_DIM} parameters) have min/max eigenvalue below -{NEGATIVE_TOL:e} (worst {worst:.2e}; closer to 0 is f32 rounding); the training penalty is clamped at >= 0.",
                ratios.len()
            ),
            None => format!(
                "kfac-tri is not positive semi-definite in general; no adapted module is small enough (<= {EIGEN_MAX_DIM} parameters) to check its eigenvalues; the training penalty is clamped at >= 0."
            ),
        });
    }
    Summary {
        layers: layers(&modules),
        modules,
        a_is_zero: a_zero,
        notes,
    }
}

/// The modules' rows grouped by layer (consecutive modules of the same `layers.{i}`).
fn layers(modules: &[ModuleSummary]) -> Vec<LayerSummary> {
    let mut groups: Vec<(String, Vec<&ModuleSummary>)> = Vec::new();
    for m in modules {
        let layer = m.module.split('.').nth(1).unwrap_or("?").to_string();
        match groups.last_mut() {
            Some((l, v)) if *l == layer => v.push(m),
            _ => groups.push((layer, vec![m])),
        }
    }
    groups
        .into_iter()
        .map(|(layer, ms)| {
            let entries: usize = ms.iter().map(|m| m.entries).sum();
            LayerSummary {
                layer,
                trace_a: ms.iter().map(|m| m.trace_a).sum(),
                trace_b: ms.iter().map(|m| m.trace_b).sum(),
                max: ms.iter().map(|m| m.max).fold(0.0, f64::max),
                zero_share: ms
                    .iter()
                    .map(|m| m.zero_share * m.entries as f64)
                    .sum::<f64>()
                    / entries.max(1) as f64,
                min_max_eig: ms
                    .iter()
                    .filter_map(|m| {
                        Some(m.min_eigenvalue? / m.max_eigenvalue?.abs().max(f64::MIN_POSITIVE))
                    })
                    .reduce(f64::min),
            }
        })
        .collect()
}

impl Summary {
    /// One line per layer (`layers`), then the notes.
    pub fn print(&self) {
        println!(
            "{:<6} {:>14} {:>14} {:>12} {:>8} {:>14}",
            "layer", "trace A", "trace B", "max", "zeros", "min/max eig"
        );
        for l in &self.layers {
            let eig = l
                .min_max_eig
                .map(|e| format!("{e:.3e}"))
                .unwrap_or_else(|| "-".into());
            println!(
                "{:<6} {:>14.4e} {:>14.4e} {:>12.4e} {:>7.1}% {eig:>14}",
                l.layer,
                l.trace_a,
                l.trace_b,
                l.max,
                100.0 * l.zero_share
            );
        }
        for n in &self.notes {
            println!("note: {n}");
        }
    }
}
