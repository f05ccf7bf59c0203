//! The LaLoRA penalty `(lambda/2) * sum_layers Q(D)`, `D = theta - theta*`, with
//! `Q = D^T (F/N + delta I) D` (DESIGN §6):
//! - diag: `Q = sum_i (F_i/N + delta) D_i^2`, gradient `lambda (F/N + delta) D`, which the
//!   optimiser step applies fused;
//! - kfac: per A and B `Q = tr(D^T G D C)/N + delta |D|^2`, gradient
//!   `lambda (G D C / N + delta D)`;
//! - kfac-tri: plus `2 tr(DA^T G_AB DB C_AB^T)/N` per layer, gradients
//!   `lambda/N G_AB DB C_AB^T` (A) and `lambda/N G_AB^T DA C_AB` (B). Not PSD in general:
//!   when the total `Q` is negative the penalty and its gradient are clamped to zero.

use super::finite::first_non_finite;
use super::identity::curvature_digest;
use crate::backend::{Backend, DiagPenalty};
use crate::curvature::{Curvature, Scheme};
use crate::error::{Error, Result};
use crate::model::LoraWeights;

struct KfacDev<B: Backend> {
    a_in: B::Buf,
    a_out: B::Buf,
    b_in: B::Buf,
    b_out: B::Buf,
    cross: Option<(B::Buf, B::Buf)>,
}

enum Kind<B: Backend> {
    /// `F/N + delta` per tensor, in `LoraWeights` order.
    Diag(LoraWeights<B::Buf>),
    Kfac(Vec<KfacDev<B>>),
    /// Not on the backend: runs only at lambda 0 (plain LoRA from theta*), which need only
    /// the curvature's identity (on a GPU, GBs of device memory not taken).
    Unloaded,
}

/// A curvature made ready for training: its theta* and (where some run is above lambda 0,
/// [`Self::for_lambdas`]) its factors on the backend, built once and shared by every lambda
/// of a sweep (lambda is an argument of each use). Building it consumes the [`Curvature`],
/// so a run holds its factors once: on the CPU they are moved, not copied. What the runs
/// still need of the file is kept beside them.
pub struct Penalty<B: Backend> {
    delta: f32,
    inv_n: f32,
    /// theta*
    pub mean: LoraWeights<B::Buf>,
    kind: Kind<B>,
    scheme: Scheme,
    /// [`curvature_digest`] of the curvature, for the run identity.
    digest: String,
    /// [`Curvature::value_bytes`].
    state_bytes: u64,
}

impl<B: Backend> Penalty<B> {
    /// The penalty of curvature `c` with prior precision `delta`, at any lambda.
    pub fn new(be: &B, c: Curvature, delta: f32) -> Result<Self> {
        Self::build(be, c, delta, true)
    }

    /// As [`Self::new`] for runs at `lambdas`; when none is above 0 the factors are not
    /// put on the backend, the penalty then only naming its curvature.
    pub fn for_lambdas(be: &B, c: Curvature, delta: f32, lambdas: &[f32]) -> Result<Self> {
        Self::build(be, c, delta, lambdas.iter().any(|&l| l > 0.0))
    }

    fn build(be: &B, c: Curvature, delta: f32, load: bool) -> Result<Self> {
        if delta.is_nan() || delta < 0.0 {
            return Err(Error::usage("--delta must be >= 0"));
        }
        if let Some(name) = first_non_finite(c.named_tensors()) {
            return Err(Error::usage(format!(
                "the curvature holds non-finite values in `{name}`"
            )));
        }
        let (digest, state_bytes) = (curvature_digest(&c), c.value_bytes());
        let (scheme, inv_n) = (c.meta.scheme, 1.0 / c.meta.n_sequences.max(1) as f32);
        let kind = match (load, c.diag, c.kfac) {
            (_, None, None) => {
                return Err(Error::usage(
                    "curvature holds neither diag nor kfac factors",
                ));
            }
            (false, ..) => Kind::Unloaded,
            (true, Some(d), _) => {
                Kind::Diag(d.map(|f| be.buf(f.iter().map(|x| x * inv_n + delta).collect()))?)
            }
            (true, None, Some(k)) => Kind::Kfac(
                k.into_iter()
                    .map(|f| {
                        Ok(KfacDev {
                            a_in: be.buf(f.a_in)?,
                            a_out: be.buf(f.a_out)?,
                            b_in: be.buf(f.b_in)?,
                            b_out: be.buf(f.b_out)?,
                            cross: match f.cross {
                                Some((c, g)) => Some((be.buf(c)?, be.buf(g)?)),
                                None => None,
                            },
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
        };
        let mean = c.mean.map(|v| be.buf(v.clone()))?;
        Ok(Penalty {
            delta,
            inv_n,
            mean,
            kind,
            scheme,
            digest,
            state_bytes,
        })
    }

    pub fn delta(&self) -> f32 {
        self.delta
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The curvature's digest (metadata and every tensor), as [`curvature_digest`] gives it.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// What the penalty keeps beside plain LoRA, in bytes ([`Curvature::value_bytes`]); `None`
    /// when its factors were not loaded.
    pub fn state_bytes(&self) -> Option<u64> {
        self.loaded().then_some(self.state_bytes)
    }

    /// Whether its factors are on the backend (see [`Self::for_lambdas`]).
    pub fn loaded(&self) -> bool {
        !matches!(self.kind, Kind::Unloaded)
    }

    /// The fused diagonal penalty at `lambda` for tensor `t` (A of module t/2 or B), if
    /// diag.
    pub fn fused(&self, t: usize, lambda: f32) -> Option<DiagPenalty<'_, B>> {
        let Kind::Diag(prec) = &self.kind else {
            return None;
        };
        let (mm, pm) = (&self.mean.modules[t / 2], &prec.modules[t / 2]);
        let (mean, precision) = if t.is_multiple_of(2) {
            (&mm.a, &pm.a)
        } else {
            (&mm.b, &pm.b)
        };
        Some(DiagPenalty {
            mean,
            precision,
            lambda,
        })
    }

    /// The penalty `(lambda/2) Q` at `lora`; for kfac schemes also writes its gradient
    /// into `grad` (in `LoraWeights` order; diag's gradient is applied fused instead).
    pub fn value_and_grad(
        &self,
        be: &B,
        lora: &LoraWeights<B::Buf>,
        lambda: f32,
        grad: Option<&mut Vec<B::Buf>>,
    ) -> Result<f64> {
        let terms = self.terms(be, lora)?;
        let dots = be.dots(&terms.pairs())?;
        self.finish(be, terms, &dots, lambda, grad)
    }

    /// The device half of [`Self::value_and_grad`]: `D = theta - theta*` and the products
    /// whose dot products with `D` make up `Q` (see [`PenaltyTerms::pairs`]), queued but
    /// not read back, so that the trainer can fetch them with its own reductions in one
    /// `Backend::dots` call.
    pub fn terms(&self, be: &B, lora: &LoraWeights<B::Buf>) -> Result<PenaltyTerms<B>> {
        let diff = |p: &B::Buf, q: &B::Buf| -> Result<B::Buf> {
            let mut x = be.dup(p)?;
            be.axpy(-1.0, q, &mut x)?;
            Ok(x)
        };
        let r = lora.cfg.r;
        let modules = lora.modules.iter().zip(&self.mean.modules);
        Ok(match &self.kind {
            Kind::Diag(prec) => {
                let mut terms = Vec::with_capacity(2 * lora.modules.len());
                for ((m, mu), pm) in modules.zip(&prec.modules) {
                    for (p, q, f) in [(&m.a, &mu.a, &pm.a), (&m.b, &mu.b, &pm.b)] {
                        let dx = diff(p, q)?;
                        let mut w = be.dup(&dx)?;
                        be.mul_assign(&mut w, f)?;
                        terms.push((dx, w));
                    }
                }
                PenaltyTerms::Diag(terms)
            }
            Kind::Kfac(fs) => {
                let mut out = Vec::with_capacity(fs.len());
                for ((m, mu), f) in modules.zip(fs) {
                    let (din, dout) = (m.d_in, m.d_out);
                    let (da, db) = (diff(&m.a, &mu.a)?, diff(&m.b, &mu.b)?);
                    // G_A D_A C_A (r, d_in) and G_B D_B C_B (d_out, r)
                    let ga = be.matmul(
                        &be.matmul(&f.a_out, &da, r, r, din, false, false)?,
                        &f.a_in,
                        r,
                        din,
                        din,
                        false,
                        false,
                    )?;
                    let gb = be.matmul(
                        &be.matmul(&f.b_out, &db, dout, dout, r, false, false)?,
                        &f.b_in,
                        dout,
                        r,
                        r,
                        false,
                        false,
                    )?;
                    let cross = match &f.cross {
                        // M_A = G_AB D_B C_AB^T (r, d_in); M_B = G_AB^T D_A C_AB (d_out, r)
                        Some((c, g)) => Some((
                            be.matmul(
                                &be.matmul(g, &db, r, dout, r, false, false)?,
                                c,
                                r,
                                r,
                                din,
                                false,
                                true,
                            )?,
                            be.matmul(
                                &be.matmul(g, &da, dout, r, din, true, false)?,
                                c,
                                dout,
                                din,
                                r,
                                false,
                                false,
                            )?,
                        )),
                        None => None,
                    };
                    out.push(KfacTerms {
                        da,
                        db,
                        ga,
                        gb,
                        cross,
                    });
                }
                PenaltyTerms::Kfac(out)
            }
            Kind::Unloaded => return Err(not_loaded()),
        })
    }

    /// The host half of [`Self::value_and_grad`]: `(lambda/2) Q` from `dots`, the dot
    /// products of `terms.pairs()` in order, and for kfac schemes the gradient into `grad`.
    pub fn finish(
        &self,
        be: &B,
        terms: PenaltyTerms<B>,
        dots: &[f64],
        lambda: f32,
        grad: Option<&mut Vec<B::Buf>>,
    ) -> Result<f64> {
        let n_pairs = terms.pairs().len();
        if dots.len() != n_pairs {
            return Err(Error::Device(format!(
                "penalty: {} dot products for {n_pairs} pairs",
                dots.len()
            )));
        }
        let q = match terms {
            PenaltyTerms::Diag(_) => dots.iter().sum(),
            PenaltyTerms::Kfac(modules) => {
                let (inv_n, delta) = (self.inv_n as f64, self.delta as f64);
                let mut q = 0f64;
                let mut k = 0;
                for m in &modules {
                    let [a_ga, b_gb, a_a, b_b] = [dots[k], dots[k + 1], dots[k + 2], dots[k + 3]];
                    q += (a_ga + b_gb) * inv_n + delta * (a_a + b_b);
                    k += 4;
                    if m.cross.is_some() {
                        q += 2.0 * dots[k] * inv_n;
                        k += 1;
                    }
                }
                if let Some(out) = grad {
                    out.clear();
                    // Clamp: a negative total (kfac-tri) contributes nothing.
                    let lambda = if q > 0.0 { lambda } else { 0.0 };
                    for m in modules {
                        let (mut gra, mut grb) = (m.ga, m.gb);
                        be.scale(&mut gra, self.inv_n)?;
                        be.scale(&mut grb, self.inv_n)?;
                        be.axpy(self.delta, &m.da, &mut gra)?;
                        be.axpy(self.delta, &m.db, &mut grb)?;
                        if let Some((ma, mb)) = &m.cross {
                            be.axpy(self.inv_n, ma, &mut gra)?;
                            be.axpy(self.inv_n, mb, &mut grb)?;
                        }
                        be.scale(&mut gra, lambda)?;
                        be.scale(&mut grb, lambda)?;
                        out.push(gra);
                        out.push(grb);
                    }
                }
                q
            }
        };
        Ok(0.5 * lambda as f64 * q.max(0.0))
    }
}

/// A penalty built for lambda 0 used at a lambda above it: the caller's mistake.
pub(super) fn not_loaded() -> Error {
    Error::usage("the penalty's factors were not loaded: it was prepared for runs at lambda 0 only")
}

/// The penalty's quadratic form before its dot products are read back (see
/// [`Penalty::terms`]), with what its gradient is assembled from.
pub enum PenaltyTerms<B: Backend> {
    /// Per tensor `D` and `(F/N + delta) D`: `Q = sum_t <D_t, (F/N + delta) D_t>`.
    Diag(Vec<(B::Buf, B::Buf)>),
    /// Per module, see [`KfacTerms`].
    Kfac(Vec<KfacTerms<B>>),
}

/// One kfac module: `Q_m = (<D_A, G_A D_A C_A> + <D_B, G_B D_B C_B>)/N
/// + delta (|D_A|^2 + |D_B|^2) [+ 2 <D_A, M_A>/N]`.
pub struct KfacTerms<B: Backend> {
    da: B::Buf,
    db: B::Buf,
    /// `G_A D_A C_A`, `G_B D_B C_B`.
    ga: B::Buf,
    gb: B::Buf,
    /// kfac-tri: `M_A = G_AB D_B C_AB^T`, `M_B = G_AB^T D_A C_AB`.
    cross: Option<(B::Buf, B::Buf)>,
}

impl<B: Backend> PenaltyTerms<B> {
    /// The pairs whose dot products [`Penalty::finish`] takes, in order: diag
    /// `(D_t, (F/N + delta) D_t)` per tensor; kfac per module `(D_A, G_A D_A C_A)`,
    /// `(D_B, G_B D_B C_B)`, `(D_A, D_A)`, `(D_B, D_B)` and for kfac-tri `(D_A, M_A)`.
    pub fn pairs(&self) -> Vec<(&B::Buf, &B::Buf)> {
        match self {
            PenaltyTerms::Diag(t) => t.iter().map(|(d, w)| (d, w)).collect(),
            PenaltyTerms::Kfac(ms) => ms
                .iter()
                .flat_map(|m| {
                    let base = [
                        (&m.da, &m.ga),
                        (&m.db, &m.gb),
                        (&m.da, &m.da),
                        (&m.db, &m.db),
                    ];
                    base.into_iter()
                        .chain(m.cross.iter().map(|(ma, _)| (&m.da, ma)))
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::curvature::{CurvatureMeta, Fisher, KfacApprox, KfacFactors};
    use crate::model::{LoraConfig, LoraModule, Proj};

    /// A kfac-tri curvature of one q_proj module (r 2, 3 -> 4).
    fn small_curvature() -> Curvature {
        let (r, d_in, d_out) = (2, 3, 4);
        let v = |n: usize| (0..n).map(|i| i as f32 * 0.25).collect::<Vec<f32>>();
        let mean = LoraWeights {
            cfg: LoraConfig {
                r,
                alpha: 4.0,
                use_rslora: false,
                targets: vec![Proj::Q],
            },
            modules: vec![LoraModule {
                layer: 0,
                proj: Proj::Q,
                d_in,
                d_out,
                a: v(r * d_in),
                b: v(d_out * r),
            }],
        };
        Curvature {
            meta: CurvatureMeta {
                scheme: Scheme::KfacTri,
                fisher: Fisher::Empirical,
                approx: KfacApprox::Expand,
                n_sequences: 2,
                n_positions: 8,
                model: "m".into(),
                data: String::new(),
            },
            mean,
            diag: None,
            kfac: Some(vec![KfacFactors {
                a_in: v(d_in * d_in),
                a_out: v(r * r),
                b_in: v(r * r),
                b_out: v(d_out * d_out),
                cross: Some((v(d_in * r), v(r * d_out))),
            }]),
        }
    }

    /// On the CPU the penalty holds the curvature's own Kronecker factors: a run with a
    /// KFAC curvature (1.2 GB on the default model) keeps them once, not twice.
    #[test]
    fn a_cpu_penalty_takes_the_factors_without_copying() {
        let c = small_curvature();
        let f = &c.kfac.as_ref().unwrap()[0];
        let before = addresses([&f.a_in, &f.a_out, &f.b_in, &f.b_out], f.cross.as_ref());
        let p = Penalty::new(&CpuBackend::new(1), c, 0.5).unwrap();
        let Kind::Kfac(fs) = &p.kind else {
            panic!("a kfac-tri curvature gives Kronecker factors")
        };
        let f = &fs[0];
        let after = addresses([&f.a_in, &f.a_out, &f.b_in, &f.b_out], f.cross.as_ref());
        assert_eq!(after.len(), 6);
        assert_eq!(after, before, "the penalty copied the factors");
    }

    /// Runs only at lambda 0 leave the factors off the backend, yet the penalty names the
    /// same curvature (its digest) and refuses to be evaluated.
    #[test]
    fn a_penalty_for_lambda_zero_only_loads_no_factors() {
        let be = CpuBackend::new(1);
        let digest = curvature_digest(&small_curvature());
        let p = Penalty::for_lambdas(&be, small_curvature(), 0.5, &[0.0]).unwrap();
        assert!(!p.loaded());
        assert_eq!(
            p.state_bytes(),
            None,
            "an unloaded penalty keeps no factors"
        );
        assert_eq!(p.digest(), digest);
        let at = small_curvature().mean.map(|v| be.buf(v.clone())).unwrap();
        let e = p.value_and_grad(&be, &at, 1.0, None).unwrap_err();
        assert!(e.to_string().contains("not loaded"), "{e}");
        let p = Penalty::for_lambdas(&be, small_curvature(), 0.5, &[0.0, 3.0]).unwrap();
        assert!(p.loaded());
        assert_eq!(p.state_bytes(), Some(small_curvature().value_bytes()));
        assert_eq!(p.digest(), digest);
        // theta* itself: no movement, no penalty.
        assert_eq!(p.value_and_grad(&be, &at, 3.0, None).unwrap(), 0.0);
    }

    /// Where each factor's values live: four factors, then the cross pair if any.
    fn addresses(factors: [&Vec<f32>; 4], cross: Option<&(Vec<f32>, Vec<f32>)>) -> Vec<*const f32> {
        let pair = cross
            .into_iter()
            .flat_map(|(c, g)| [c.as_ptr(), g.as_ptr()]);
        factors.iter().map(|f| f.as_ptr()).chain(pair).collect()
    }
}
