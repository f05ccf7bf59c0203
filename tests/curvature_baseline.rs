//! The data study's curvatures without direction (`curvature::baseline`), checked through
//! the penalty the trainer uses rather than through the formulas they are built from:
//! `sum_i Q(e_i)` over the unit vectors is `tr(F)/N + P delta`, so the isotropic curvature
//! must give the same sum as the one it is made from, and `none` must give `delta |D|^2`.

mod common;

use common::*;
use lalora_engine::backend::Backend;
use lalora_engine::backend::cpu::CpuBackend;
use lalora_engine::curvature::baseline::{fisher_trace, isotropic, none};
use lalora_engine::curvature::{Curvature, Fisher, KfacApprox, Scheme, Spec, estimate};
use lalora_engine::model::HostLora;
use lalora_engine::train::penalty::Penalty;

fn estimated(be: &CpuBackend, t: &Tiny, scheme: Scheme) -> Curvature {
    let model = tiny_model(be);
    let spec = Spec {
        scheme,
        fisher: Fisher::Empirical,
        approx: KfacApprox::Expand,
        seed: 1,
    };
    let lora = t.adapter.map(|v| be.buf(v.clone())).unwrap();
    estimate(be, &model, &lora, &t.examples, 4, spec, || {}).unwrap()
}

/// `Q(D)`: the penalty `(lambda/2) Q` at `theta* + D` with lambda 2.
fn q(be: &CpuBackend, p: &Penalty<CpuBackend>, c: &Curvature, d: &HostLora) -> f64 {
    let mut at = c.mean.clone();
    for (m, dm) in at.modules.iter_mut().zip(&d.modules) {
        m.a.iter_mut().zip(&dm.a).for_each(|(x, y)| *x += y);
        m.b.iter_mut().zip(&dm.b).for_each(|(x, y)| *x += y);
    }
    let lora = at.map(|v| be.buf(v.clone())).unwrap();
    let mut grad = Vec::new();
    p.value_and_grad(be, &lora, 2.0, Some(&mut grad)).unwrap()
}

/// Entry `i` of module `k`'s A (or B with `b`).
fn entry(e: &mut HostLora, k: usize, b: bool, i: usize) -> &mut f32 {
    let m = &mut e.modules[k];
    if b { &mut m.b[i] } else { &mut m.a[i] }
}

/// `sum_i Q(e_i)` over every LoRA parameter's unit vector, with `delta` 0: `tr(F)/N`.
fn unit_sum(be: &CpuBackend, c: &Curvature) -> f64 {
    let p = Penalty::new(be, c.clone(), 0.0).unwrap();
    let mut e = c.mean.zeros_like();
    let mut total = 0.0;
    for k in 0..e.modules.len() {
        for b in [false, true] {
            let len = if b {
                e.modules[k].b.len()
            } else {
                e.modules[k].a.len()
            };
            for i in 0..len {
                *entry(&mut e, k, b, i) = 1.0;
                total += q(be, &p, c, &e);
                *entry(&mut e, k, b, i) = 0.0;
            }
        }
    }
    total
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

#[test]
fn isotropic_keeps_the_trace_of_every_scheme() {
    let be = cpu();
    let t = tiny();
    for scheme in [Scheme::Diag, Scheme::Kfac, Scheme::KfacTri] {
        let c = estimated(&be, &t, scheme);
        let n = c.meta.n_sequences as f64;
        let want = unit_sum(&be, &c);
        assert!(want > 0.0, "{scheme}: a zero curvature tests nothing");
        let trace = fisher_trace(&c) / n;
        assert!(
            rel(trace, want) < 1e-4,
            "{scheme}: tr F/N {trace} vs sum Q(e_i) {want}"
        );
        let iso = isotropic(&c);
        assert!(iso.diag.is_some() && iso.kfac.is_none());
        let got = unit_sum(&be, &iso);
        assert!(rel(got, want) < 1e-4, "{scheme}: isotropic {got} vs {want}");
        // Evenly spread: every unit vector costs the same.
        let d = iso.diag.as_ref().unwrap();
        let first = d.modules[0].a[0];
        assert!(
            d.modules
                .iter()
                .all(|m| m.a.iter().chain(&m.b).all(|&x| x == first))
        );
        assert_eq!(iso.mean.modules[0].a, c.mean.modules[0].a, "theta* kept");
    }
}

#[test]
fn none_is_the_prior_alone() {
    let be = cpu();
    let t = tiny();
    let c = none(&estimated(&be, &t, Scheme::Kfac));
    // A displacement with every entry different: D_j = sin(j).
    let mut d = c.mean.zeros_like();
    let mut j = 0f32;
    let mut norm2 = 0f64;
    for m in &mut d.modules {
        for x in m.a.iter_mut().chain(m.b.iter_mut()) {
            j += 1.0;
            *x = j.sin();
            norm2 += f64::from(*x) * f64::from(*x);
        }
    }
    let delta = 0.25;
    let with_prior = Penalty::new(&be, c.clone(), delta).unwrap();
    let got = q(&be, &with_prior, &c, &d);
    assert!(
        rel(got, f64::from(delta) * norm2) < 1e-5,
        "{got} vs {}",
        0.25 * norm2
    );
    let without = Penalty::new(&be, c.clone(), 0.0).unwrap();
    assert_eq!(q(&be, &without, &c, &d), 0.0);
}
