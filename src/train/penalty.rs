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
use crate::backend::{Backend, DiagPenalty};
use crate::curvature::Curvature;
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
}

pub struct Penalty<B: Backend> {
    pub lambda: f32,
    delta: f32,
    inv_n: f32,
    /// theta*
    pub mean: LoraWeights<B::Buf>,
    kind: Kind<B>,
}

impl<B: Backend> Penalty<B> {
    pub fn new(be: &B, c: &Curvature, lambda: f32, delta: f32) -> Result<Self> {
        if !(lambda >= 0.0 && delta >= 0.0) {
            return Err(Error::usage("--lambda and --delta must be >= 0"));
        }
        if let Some(name) = first_non_finite(c.named_tensors()) {
            return Err(Error::usage(format!(
                "the curvature holds non-finite values in `{name}`"
            )));
        }
        let inv_n = 1.0 / c.meta.n_sequences.max(1) as f32;
        let mean = c.mean.map(|v| be.buf(v.clone()))?;
        let kind = if let Some(d) = &c.diag {
            Kind::Diag(d.map(|f| be.buf(f.iter().map(|x| x * inv_n + delta).collect()))?)
        } else if let Some(k) = &c.kfac {
            Kind::Kfac(
                k.iter()
                    .map(|f| {
                        Ok(KfacDev {
                            a_in: be.buf(f.a_in.clone())?,
                            a_out: be.buf(f.a_out.clone())?,
                            b_in: be.buf(f.b_in.clone())?,
                            b_out: be.buf(f.b_out.clone())?,
                            cross: match &f.cross {
                                Some((c, g)) => Some((be.buf(c.clone())?, be.buf(g.clone())?)),
                                None => None,
                            },
                        })
                    })
                    .collect::<Result<_>>()?,
            )
        } else {
            return Err(Error::usage(
                "curvature holds neither diag nor kfac factors",
            ));
        };
        Ok(Penalty {
            lambda,
            delta,
            inv_n,
            mean,
            kind,
        })
    }

    /// The fused diagonal penalty for tensor `t` (A of module t/2 or B), if diag.
    pub fn fused(&self, t: usize) -> Option<DiagPenalty<'_, B>> {
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
            lambda: self.lambda,
        })
    }

    /// The penalty `(lambda/2) Q` at `lora`; for kfac schemes also writes its gradient
    /// into `grad` (in `LoraWeights` order; diag's gradient is applied fused instead).
    pub fn value_and_grad(
        &self,
        be: &B,
        lora: &LoraWeights<B::Buf>,
        grad: Option<&mut Vec<B::Buf>>,
    ) -> Result<f64> {
        let mut d = Vec::with_capacity(2 * lora.modules.len());
        for (m, mu) in lora.modules.iter().zip(&self.mean.modules) {
            for (p, q) in [(&m.a, &mu.a), (&m.b, &mu.b)] {
                let mut x = be.dup(p)?;
                be.axpy(-1.0, q, &mut x)?;
                d.push(x);
            }
        }
        let r = lora.cfg.r;
        let q = match &self.kind {
            Kind::Diag(prec) => {
                let mut q = 0f64;
                for (t, dx) in d.iter().enumerate() {
                    let pm = &prec.modules[t / 2];
                    let mut w = be.dup(dx)?;
                    be.mul_assign(&mut w, if t % 2 == 0 { &pm.a } else { &pm.b })?;
                    q += be.dot(dx, &w)?;
                }
                q
            }
            Kind::Kfac(fs) => {
                let mut q = 0f64;
                let mut grads = Vec::with_capacity(d.len());
                for (i, (m, f)) in lora.modules.iter().zip(fs).enumerate() {
                    let (din, dout) = (m.d_in, m.d_out);
                    let (da, db) = (&d[2 * i], &d[2 * i + 1]);
                    // G_A D_A C_A (r, d_in) and G_B D_B C_B (d_out, r)
                    let ga = be.matmul(
                        &be.matmul(&f.a_out, da, r, r, din, false, false)?,
                        &f.a_in,
                        r,
                        din,
                        din,
                        false,
                        false,
                    )?;
                    let gb = be.matmul(
                        &be.matmul(&f.b_out, db, dout, dout, r, false, false)?,
                        &f.b_in,
                        dout,
                        r,
                        r,
                        false,
                        false,
                    )?;
                    q += (be.dot(da, &ga)? + be.dot(db, &gb)?) * self.inv_n as f64
                        + self.delta as f64 * (be.dot(da, da)? + be.dot(db, db)?);
                    let (mut gra, mut grb) = (ga, gb);
                    be.scale(&mut gra, self.inv_n)?;
                    be.scale(&mut grb, self.inv_n)?;
                    be.axpy(self.delta, da, &mut gra)?;
                    be.axpy(self.delta, db, &mut grb)?;
                    if let Some((c, g)) = &f.cross {
                        // M_A = G_AB D_B C_AB^T (r, d_in); M_B = G_AB^T D_A C_AB (d_out, r)
                        let ma = be.matmul(
                            &be.matmul(g, db, r, dout, r, false, false)?,
                            c,
                            r,
                            r,
                            din,
                            false,
                            true,
                        )?;
                        let mb = be.matmul(
                            &be.matmul(g, da, dout, r, din, true, false)?,
                            c,
                            dout,
                            din,
                            r,
                            false,
                            false,
                        )?;
                        q += 2.0 * be.dot(da, &ma)? * self.inv_n as f64;
                        be.axpy(self.inv_n, &ma, &mut gra)?;
                        be.axpy(self.inv_n, &mb, &mut grb)?;
                    }
                    grads.push(gra);
                    grads.push(grb);
                }
                if let Some(out) = grad {
                    out.clear();
                    for mut g in grads {
                        // Clamp: a negative total (kfac-tri) contributes nothing.
                        be.scale(&mut g, if q > 0.0 { self.lambda } else { 0.0 })?;
                        out.push(g);
                    }
                }
                q
            }
        };
        Ok(0.5 * self.lambda as f64 * q.max(0.0))
    }
}
