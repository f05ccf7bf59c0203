//! Stage II on the tiny fixture: the penalty's gradient for every scheme (finite
//! differences), the fused diagonal step, lambda = 0 equals plain LoRA, a huge lambda
//! pins theta*, and a resumed run is bit-identical to an uninterrupted one.

mod common;

use common::*;
use lalora_engine::backend::cpu::CpuBackend;
use lalora_engine::backend::{AdamHyper, Backend};
use lalora_engine::curvature::{Curvature, Fisher, KfacApprox, Scheme, Spec, estimate};
use lalora_engine::model::HostLora;
use lalora_engine::train::session::{self, SessionOptions};
use lalora_engine::train::{Penalty, TrainConfig};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn curvature(t: &Tiny, scheme: Scheme) -> Curvature {
    let be = cpu();
    let model = tiny_model(&be);
    let spec = Spec {
        scheme,
        fisher: Fisher::Empirical,
        approx: KfacApprox::Expand,
        seed: 0,
    };
    estimate(&be, &model, &t.adapter, &t.examples, 3, spec, || {}).unwrap()
}

fn perturbed(base: &HostLora, scale: f32, seed: u64) -> HostLora {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut w = base.clone();
    for t in w.tensors_mut() {
        t.iter_mut()
            .for_each(|x| *x += scale * (rng.random::<f32>() * 2.0 - 1.0));
    }
    w
}

#[test]
fn penalty_gradients_match_finite_differences() {
    let t = tiny();
    let be = CpuBackend::new(2);
    let (lambda, delta) = (3.0f32, 1e-2f32);
    for scheme in [Scheme::Diag, Scheme::Kfac, Scheme::KfacTri] {
        let c = curvature(&t, scheme);
        let pen = Penalty::new(&be, &c, lambda, delta).unwrap();
        let theta = perturbed(&c.mean, 0.05, 1);
        let mut grads = Vec::new();
        let value = pen.value_and_grad(&be, &theta, Some(&mut grads)).unwrap();
        assert!(value > 0.0, "{scheme}: the test point must not be clamped");
        let analytic: Vec<Vec<f32>> = match scheme {
            // diag's gradient is applied fused in the step: lambda (F/N + delta) D.
            Scheme::Diag => {
                let n = c.meta.n_sequences as f32;
                let f = c.diag.as_ref().unwrap().named_tensors();
                theta
                    .named_tensors()
                    .iter()
                    .zip(c.mean.named_tensors())
                    .zip(f)
                    .map(|(((_, _, p), (_, _, m)), (_, _, fi))| {
                        p.iter()
                            .zip(m)
                            .zip(fi)
                            .map(|((p, m), f)| lambda * (f / n + delta) * (p - m))
                            .collect()
                    })
                    .collect()
            }
            _ => grads.clone(),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for (ti, g) in analytic.iter().enumerate() {
            let dir: Vec<f32> = (0..g.len()).map(|_| rng.random::<f32>() - 0.5).collect();
            let eps = 1e-3f32;
            let at = |sign: f32| {
                let mut w = theta.clone();
                let p = w.tensors_mut().nth(ti).unwrap();
                p.iter_mut()
                    .zip(&dir)
                    .for_each(|(x, v)| *x += sign * eps * v);
                pen.value_and_grad(&be, &w, None).unwrap()
            };
            let numeric = (at(1.0) - at(-1.0)) / (2.0 * eps as f64);
            let exact: f64 = g.iter().zip(&dir).map(|(a, b)| (*a * *b) as f64).sum();
            let err = (numeric - exact).abs() / exact.abs().max(1e-3);
            assert!(
                err < 1e-2,
                "{scheme} tensor {ti}: numeric {numeric:e} analytic {exact:e}"
            );
        }
    }
}

#[test]
fn fused_diag_step_equals_explicit_gradient() {
    let be = CpuBackend::new(2);
    let n = 257;
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut r = |s: f32| {
        (0..n)
            .map(|_| s * (rng.random::<f32>() - 0.5))
            .collect::<Vec<f32>>()
    };
    let (p0, g, mean) = (r(1.0), r(1.0), r(1.0));
    let prec: Vec<f32> = r(2.0).iter().map(|x| x.abs() + 0.1).collect();
    let h = AdamHyper {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 3,
    };
    let (lambda, gs) = (5.0f32, 0.7f32);
    let (mut pa, mut ma, mut va) = (
        p0.clone(),
        r(0.1),
        r(0.1).iter().map(|x| x.abs()).collect::<Vec<_>>(),
    );
    let (mut pb, mut mb, mut vb) = (pa.clone(), ma.clone(), va.clone());
    let pen = lalora_engine::backend::DiagPenalty {
        mean: &mean,
        precision: &prec,
        lambda,
    };
    be.adamw_step(&mut pa, &g, &mut ma, &mut va, &h, gs, Some(pen))
        .unwrap();
    let explicit: Vec<f32> = (0..n)
        .map(|i| gs * g[i] + lambda * prec[i] * (p0[i] - mean[i]))
        .collect();
    be.adamw_step(&mut pb, &explicit, &mut mb, &mut vb, &h, 1.0, None)
        .unwrap();
    assert!(rel_err(&pa, &pb) < 1e-6);
}

fn opts(out: Option<std::path::PathBuf>, stop: Option<usize>, resume: bool) -> SessionOptions {
    SessionOptions {
        out,
        checkpoint_every: 2,
        resume,
        quiet: true,
        base_model: "tiny".into(),
        stop_after: stop,
        curvature_path: None,
    }
}

fn cfg(lambda: f32) -> TrainConfig {
    TrainConfig {
        steps: 8,
        batch_size: 2,
        lr: 1e-3,
        warmup_steps: 2,
        seed: 5,
        lambda,
        delta: 1e-4,
        ..TrainConfig::default()
    }
}

fn max_move(a: &HostLora, b: &HostLora) -> f32 {
    a.named_tensors()
        .iter()
        .zip(b.named_tensors())
        .flat_map(|((_, _, x), (_, _, y))| {
            x.iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .collect::<Vec<_>>()
        })
        .fold(0.0, f32::max)
}

#[test]
fn lambda_zero_is_plain_lora_and_huge_lambda_pins_theta_star() {
    let t = tiny();
    let be = cpu();
    let model = tiny_model(&be);
    let c = curvature(&t, Scheme::Diag);
    // 30 steps at a constant lr: plain LoRA drifts ~tens of lr from theta*.
    let long = |lambda| TrainConfig {
        steps: 30,
        schedule: lalora_engine::train::Schedule::Constant,
        ..cfg(lambda)
    };
    let plain = session::run(
        &be,
        &model,
        &t.examples,
        &long(0.0),
        None,
        &c.mean,
        &opts(None, None, false),
    )
    .unwrap();
    let zero = session::run(
        &be,
        &model,
        &t.examples,
        &long(0.0),
        Some(&c),
        &c.mean,
        &opts(None, None, false),
    )
    .unwrap();
    assert_eq!(
        plain.lora.named_tensors(),
        zero.lora.named_tensors(),
        "lambda = 0 must train exactly as plain LoRA"
    );
    let moved = max_move(&plain.lora, &c.mean);
    for scheme in [Scheme::Diag, Scheme::Kfac, Scheme::KfacTri] {
        let c = curvature(&t, scheme);
        let pinned = session::run(
            &be,
            &model,
            &t.examples,
            &long(1e9),
            Some(&c),
            &c.mean,
            &opts(None, None, false),
        )
        .unwrap();
        let stay = max_move(&pinned.lora, &c.mean);
        // Adam moves each weight by about lr per step whatever the gradient's size, so a
        // pinned run oscillates within a few lr of theta* while plain LoRA drifts away.
        assert!(
            stay < 3e-3,
            "{scheme}: max |theta - theta*| = {stay} with lambda = 1e9"
        );
        assert!(
            stay < moved / 4.0,
            "{scheme}: pinned {stay} vs plain {moved}"
        );
    }
}

#[test]
fn resumed_run_is_bit_identical() {
    let t = tiny();
    let be = cpu();
    let model = tiny_model(&be);
    let c = curvature(&t, Scheme::Kfac);
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("straight"), d.path().join("resumed"));
    let straight = session::run(
        &be,
        &model,
        &t.examples,
        &cfg(10.0),
        Some(&c),
        &c.mean,
        &opts(Some(a.clone()), None, false),
    )
    .unwrap();
    let first = session::run(
        &be,
        &model,
        &t.examples,
        &cfg(10.0),
        Some(&c),
        &c.mean,
        &opts(Some(b.clone()), Some(3), false),
    )
    .unwrap();
    assert_eq!(first.metrics.len(), 3);
    assert!(
        !b.join("adapter_model.safetensors").exists(),
        "no final adapter before the end"
    );
    let resumed = session::run(
        &be,
        &model,
        &t.examples,
        &cfg(10.0),
        Some(&c),
        &c.mean,
        &opts(Some(b.clone()), None, true),
    )
    .unwrap();
    assert_eq!(resumed.metrics.first().map(|m| m.step), Some(4));
    assert_eq!(straight.lora.named_tensors(), resumed.lora.named_tensors());
    for f in [
        "adapter_model.safetensors",
        "checkpoint/optimizer.safetensors",
    ] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f} differs"
        );
    }
    let lines = |p: &std::path::Path| {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        lines(&a),
        lines(&b),
        "metrics log (losses) of the resumed run"
    );
    // A changed setting is refused rather than silently mixed.
    let mut other = cfg(10.0);
    other.lr = 2e-3;
    let err = session::run(
        &be,
        &model,
        &t.examples,
        &other,
        Some(&c),
        &c.mean,
        &opts(Some(b), None, true),
    );
    assert!(err.is_err());
}
