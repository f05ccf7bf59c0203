//! Stage II on the tiny fixture: the penalty's gradient for every scheme (finite
//! differences), the fused diagonal step, lambda = 0 equals plain LoRA, a huge lambda
//! pins theta*, a resumed run is bit-identical to an uninterrupted one and a resume of a
//! different run is refused; non-finite numbers and data without targets stop the work.

mod common;

use common::*;
use lalora_engine::backend::cpu::CpuBackend;
use lalora_engine::backend::{AdamHyper, Backend};
use lalora_engine::curvature::{Curvature, Fisher, KfacApprox, Scheme, Spec, estimate};
use lalora_engine::data::Example;
use lalora_engine::eval::mean_nll;
use lalora_engine::model::{HostLora, Llama};
use lalora_engine::train::checkpoint;
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

/// The penalties' strength and prior precision in the two tests below.
const LAMBDA: f32 = 3.0;
const DELTA: f32 = 1e-2;

/// A curvature of `scheme` on the tiny fixture, its penalty, a point `theta` away from
/// theta*, and the penalty's value and (kfac schemes) gradient there.
fn penalty_point(
    t: &Tiny,
    be: &CpuBackend,
    scheme: Scheme,
) -> (Curvature, Penalty<CpuBackend>, HostLora, f64, Vec<Vec<f32>>) {
    let c = curvature(t, scheme);
    let pen = Penalty::new(be, c.clone(), DELTA).unwrap();
    let theta = perturbed(&c.mean, 0.05, 1);
    let mut grads = Vec::new();
    let value = pen
        .value_and_grad(be, &theta, LAMBDA, Some(&mut grads))
        .unwrap();
    (c, pen, theta, value, grads)
}

/// `F v` for `F = P (x) Q` (Kronecker product, column-stacking `vec` as DESIGN §5 states
/// it: `(P (x) Q)[(i q + a), (j q' + b)] = P[i, j] Q[a, b]`) with `P` of `pr x pc`, `Q` of
/// `qr x qc`, and `v` the column-stacked `qc x pc` matrix, stored row-major as the LoRA
/// tensors are. Written element by element in f64, independent of the penalty's `tr(...)`
/// products.
fn kron_matvec(
    p: &[f32],
    (pr, pc): (usize, usize),
    q: &[f32],
    (qr, qc): (usize, usize),
    v: &[f32],
) -> Vec<f64> {
    let mut out = vec![0.0f64; pr * qr];
    for i in 0..pr {
        for a in 0..qr {
            let mut acc = 0.0f64;
            for j in 0..pc {
                for b in 0..qc {
                    // v's element of column j, row b (row-major `qc x pc`).
                    acc += p[i * pc + j] as f64 * q[a * qc + b] as f64 * v[b * pc + j] as f64;
                }
            }
            // out's element of column i, row a, row-major `qr x pr`.
            out[a * pr + i] = acc;
        }
    }
    out
}

/// The penalty against the dense quadratic form `(lambda/2) vec(D)^T (F/N + delta I) vec(D)`
/// built entry by entry from the curvature's factors (DESIGN §5-6): `F_A = C_A (x) G_A`,
/// `F_B = C_B (x) G_B` and, for kfac-tri, the off-diagonal block `C_AB (x) G_AB` between a
/// module's `vec(DA)` and `vec(DB)` (counted twice, as the symmetric matrix has it). Its
/// value and its gradient `lambda (F/N + delta I) vec(D)` for kfac and kfac-tri, and the
/// value for diag. This checks every factor entry and the cross block's orientation,
/// which a finite difference of the penalty's own value cannot.
#[test]
fn penalty_equals_the_dense_quadratic_form() {
    let t = tiny();
    let be = CpuBackend::new(2);
    let (lambda, delta) = (LAMBDA, DELTA);
    for scheme in [Scheme::Diag, Scheme::Kfac, Scheme::KfacTri] {
        let (c, _, theta, value, grads) = penalty_point(&t, &be, scheme);
        let inv_n = 1.0 / c.meta.n_sequences as f64;
        let d: Vec<Vec<f32>> = theta
            .named_tensors()
            .into_iter()
            .zip(c.mean.named_tensors())
            .map(|((_, _, p), (_, _, m))| p.iter().zip(m).map(|(p, m)| p - m).collect())
            .collect();
        let dot =
            |x: &[f64], y: &[f32]| -> f64 { x.iter().zip(y).map(|(a, b)| a * *b as f64).sum() };
        let mut q = 0.0f64;
        match scheme {
            Scheme::Diag => {
                for ((_, _, f), d) in c.diag.as_ref().unwrap().named_tensors().into_iter().zip(&d) {
                    q += f
                        .iter()
                        .zip(d)
                        .map(|(f, d)| (*f as f64 * inv_n + delta as f64) * (*d as f64).powi(2))
                        .sum::<f64>();
                }
            }
            _ => {
                let r = c.mean.cfg.r;
                let factors = c.kfac.as_ref().unwrap();
                assert_eq!(factors.len(), c.mean.modules.len());
                for (i, (m, f)) in c.mean.modules.iter().zip(factors).enumerate() {
                    let (da, db) = (&d[2 * i], &d[2 * i + 1]);
                    let (di, dout) = (m.d_in, m.d_out);
                    // (F/N) vec(D) per block; D_A is r x d_in, D_B d_out x r.
                    let mut fa = kron_matvec(&f.a_in, (di, di), &f.a_out, (r, r), da);
                    let mut fb = kron_matvec(&f.b_in, (r, r), &f.b_out, (dout, dout), db);
                    if let Some((c_ab, g_ab)) = &f.cross {
                        // The block (C_AB (x) G_AB) maps vec(D_B) to A's rows, its
                        // transpose (C_AB^T (x) G_AB^T) vec(D_A) to B's.
                        let t = |x: &[f32], rows: usize, cols: usize| -> Vec<f32> {
                            (0..cols * rows)
                                .map(|k| x[(k % rows) * cols + k / rows])
                                .collect()
                        };
                        let to_a = kron_matvec(c_ab, (di, r), g_ab, (r, dout), db);
                        let to_b =
                            kron_matvec(&t(c_ab, di, r), (r, di), &t(g_ab, r, dout), (dout, r), da);
                        fa.iter_mut().zip(to_a).for_each(|(x, y)| *x += y);
                        fb.iter_mut().zip(to_b).for_each(|(x, y)| *x += y);
                    } else {
                        assert!(scheme == Scheme::Kfac, "kfac-tri has cross factors");
                    }
                    for (fd, dd, g, what) in [
                        (fa, da, &grads[2 * i], "A"),
                        (fb, db, &grads[2 * i + 1], "B"),
                    ] {
                        let full: Vec<f64> = fd
                            .iter()
                            .zip(dd.iter())
                            .map(|(f, d)| f * inv_n + delta as f64 * *d as f64)
                            .collect();
                        q += dot(&full, dd);
                        let want: Vec<f32> =
                            full.iter().map(|v| (lambda as f64 * v) as f32).collect();
                        close(
                            &format!("{scheme}: module {i} gradient of {what}"),
                            g,
                            &want,
                            1e-4,
                        );
                    }
                }
            }
        }
        assert!(q > 0.0, "{scheme}: the test point must not be clamped");
        let want = lambda as f64 / 2.0 * q;
        let e = (value - want).abs() / want;
        assert!(e < 1e-4, "{scheme}: penalty {value:e}, dense form {want:e}");
    }
}

#[test]
fn penalty_gradients_match_finite_differences() {
    let t = tiny();
    let be = CpuBackend::new(2);
    let (lambda, delta) = (LAMBDA, DELTA);
    for scheme in [Scheme::Diag, Scheme::Kfac, Scheme::KfacTri] {
        let (c, pen, theta, value, grads) = penalty_point(&t, &be, scheme);
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
                pen.value_and_grad(&be, &w, lambda, None).unwrap()
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
        ..SessionOptions::default()
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

/// The penalty of `c` at [`cfg`]'s delta, as `train` builds it from a curvature file.
fn penalty(be: &CpuBackend, c: &Curvature) -> Penalty<CpuBackend> {
    Penalty::new(be, c.clone(), cfg(0.0).delta).unwrap()
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
        Some(&penalty(&be, &c)),
        &c.mean,
        &opts(None, None, false),
    )
    .unwrap();
    assert_eq!(
        plain.lora.named_tensors(),
        zero.lora.named_tensors(),
        "lambda = 0 must train exactly as plain LoRA"
    );
    // A penalty prepared for lambda 0 only (`train --lambda 0 --curvature`) leaves its
    // factors off the backend: the same run, and refused above lambda 0.
    let unloaded = Penalty::for_lambdas(&be, c.clone(), cfg(0.0).delta, &[0.0]).unwrap();
    let quiet = opts(None, None, false);
    let run = |lambda, p| session::run(&be, &model, &t.examples, &long(lambda), p, &c.mean, &quiet);
    let zero_unloaded = run(0.0, Some(&unloaded)).unwrap();
    assert_eq!(
        plain.lora.named_tensors(),
        zero_unloaded.lora.named_tensors()
    );
    let e = run(1.0, Some(&unloaded))
        .err()
        .expect("an unloaded penalty was used");
    assert_eq!(e.exit_code(), 2, "{e}");
    let moved = max_move(&plain.lora, &c.mean);
    for scheme in [Scheme::Diag, Scheme::Kfac, Scheme::KfacTri] {
        let c = curvature(&t, scheme);
        let pinned = session::run(
            &be,
            &model,
            &t.examples,
            &long(1e9),
            Some(&penalty(&be, &c)),
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
    let _alone = one_child_at_a_time();
    let t = tiny();
    let be = cpu();
    let model = tiny_model(&be);
    let c = curvature(&t, Scheme::Kfac);
    let pc = penalty(&be, &c);
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("straight"), d.path().join("resumed"));
    let run = |o: &SessionOptions| {
        session::run(&be, &model, &t.examples, &cfg(10.0), Some(&pc), &c.mean, o).unwrap()
    };
    let straight = run(&opts(Some(a.clone()), None, false));
    let first = run(&opts(Some(b.clone()), Some(3), false));
    assert_eq!(first.metrics.len(), 3);
    assert!(
        !b.join("adapter_model.safetensors").exists(),
        "no final adapter before the end"
    );
    let resumed = run(&opts(Some(b.clone()), None, true));
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
}

/// A checkpoint of a build that digested its run with FNV-1a (16 hex digits, no
/// `xxh3-` prefix) cannot be compared: `--resume` says so instead of naming the model
/// (whose configuration digest would differ first) as changed.
#[test]
fn resume_recognises_an_older_builds_checkpoint() {
    let _alone = one_child_at_a_time();
    let t = tiny();
    let be = cpu();
    let model = tiny_model(&be);
    let c = curvature(&t, Scheme::Kfac);
    let pc = penalty(&be, &c);
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let run = |o: &SessionOptions| {
        session::run(&be, &model, &t.examples, &cfg(10.0), Some(&pc), &c.mean, o)
    };
    run(&opts(Some(out.clone()), Some(3), false)).unwrap();
    let path = std::fs::canonicalize(out.join("checkpoint"))
        .unwrap()
        .join("trainer_state.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let identity = state["run"].as_object_mut().unwrap();
    for key in ["model", "data", "curvature", "init"] {
        let v = identity[key].as_str().unwrap();
        assert!(v.contains("xxh3-"), "{key}: {v}");
        identity[key] = v.replace("xxh3-", "").into();
    }
    std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
    let e = run(&opts(Some(out), None, true))
        .err()
        .expect("an older build's checkpoint was resumed");
    assert_eq!(e.exit_code(), 2, "{e}");
    assert!(e.to_string().contains("older lalora-engine"), "{e}");
}

/// One input of a run, changed for a resume; `names` is what the refusal must say.
struct Changed<'a> {
    names: &'a str,
    data: &'a [Example],
    cfg: TrainConfig,
    penalty: Option<&'a Penalty<CpuBackend>>,
    init: &'a HostLora,
    base_model: &'a str,
}

/// `--resume` continues only the run the checkpoint belongs to: each input that defines
/// the run, changed, is refused (exit 2) with a message naming it, and the checkpoint is
/// left as it was.
#[test]
fn resume_refuses_a_different_run_naming_the_difference() {
    let _alone = one_child_at_a_time();
    let t = tiny();
    let be = cpu();
    let model = tiny_model(&be);
    let c = curvature(&t, Scheme::Kfac);
    let other_c = curvature(&t, Scheme::Diag);
    let (pc, other_pc) = (penalty(&be, &c), penalty(&be, &other_c));
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    session::run(
        &be,
        &model,
        &t.examples,
        &cfg(10.0),
        Some(&pc),
        &c.mean,
        &opts(Some(out.clone()), Some(3), false),
    )
    .unwrap();
    let state = || std::fs::read(out.join("checkpoint/trainer_state.json")).unwrap();
    let before = state();
    let moved = perturbed(&c.mean, 1e-3, 3);
    let same = |names| Changed {
        names,
        data: &t.examples,
        cfg: cfg(10.0),
        penalty: Some(&pc),
        init: &c.mean,
        base_model: "tiny",
    };
    let cases = [
        Changed {
            cfg: TrainConfig {
                lr: 2e-3,
                ..cfg(10.0)
            },
            // The f32 settings as given, not widened (`0.0020000000949949026`).
            ..same("training setting `lr`: `0.002` now, `0.001` in the checkpoint")
        },
        Changed {
            data: &t.examples[..5],
            ..same("training data")
        },
        Changed {
            penalty: Some(&other_pc),
            ..same("different curvature")
        },
        Changed {
            penalty: None,
            ..same("without the curvature")
        },
        Changed {
            init: &moved,
            ..same("initial LoRA weights")
        },
        Changed {
            base_model: "other-model",
            ..same("different model")
        },
    ];
    for x in cases {
        let mut o = opts(Some(out.clone()), None, true);
        o.base_model = x.base_model.into();
        let e = session::run(&be, &model, x.data, &x.cfg, x.penalty, x.init, &o)
            .err()
            .unwrap_or_else(|| panic!("resume with a changed {} was accepted", x.names));
        assert_eq!(e.exit_code(), 2, "{e}");
        assert!(
            e.to_string().contains(x.names),
            "`{e}` does not name {}",
            x.names
        );
        assert_eq!(state(), before, "a refused resume changed the checkpoint");
    }
    // The LoRA shape (checked before the weights), on a run without curvature.
    let plain = d.path().join("plain");
    session::run(
        &be,
        &model,
        &t.examples,
        &cfg(0.0),
        None,
        &t.adapter,
        &opts(Some(plain.clone()), Some(2), false),
    )
    .unwrap();
    let mut cfg_r2 = t.adapter.cfg.clone();
    cfg_r2.r = 2;
    let r2 = HostLora::init(&t.loaded.cfg, cfg_r2, 0);
    let e = session::run(
        &be,
        &model,
        &t.examples,
        &cfg(0.0),
        None,
        &r2,
        &opts(Some(plain), None, true),
    )
    .err()
    .expect("resume with another rank was accepted");
    assert!(e.to_string().contains("LoRA setting `r`"), "{e}");
}

/// The fixture model with every final-norm weight set to `w`: `f32::MAX` is finite (it
/// passes any check of the file) but makes the logits overflow to infinity.
fn model_with_final_norm<B: Backend>(be: &B, w: f32) -> Llama<B> {
    let mut m = lalora_engine::model::load(&fixture("tiny-gqa/model"), None).unwrap();
    m.weights.final_norm.iter_mut().for_each(|x| *x = w);
    Llama::new(be, m.cfg, m.weights).unwrap()
}

/// A NaN or infinity in the loss, the penalty or the weights ends the run (exit 3) naming
/// the step and the quantity; nothing is written from non-finite weights and the last good
/// checkpoint stays.
#[test]
fn non_finite_numbers_stop_the_run() {
    let _alone = one_child_at_a_time();
    let t = tiny();
    let be = cpu();
    let model = tiny_model(&be);
    let d = tempfile::tempdir().unwrap();
    let fails = |model: &Llama<CpuBackend>,
                 c: &TrainConfig,
                 curv: Option<&Penalty<CpuBackend>>,
                 o: &SessionOptions| {
        let e = session::run(&be, model, &t.examples, c, curv, &t.adapter, o)
            .err()
            .unwrap_or_else(|| {
                panic!(
                    "a non-finite run must fail: lr {} lambda {}",
                    c.lr, c.lambda
                )
            });
        assert_eq!(e.exit_code(), 3, "{e}");
        e.to_string()
    };
    // An infinite learning rate: the first update leaves non-finite weights.
    let out = d.path().join("inf-lr");
    let inf_lr = TrainConfig {
        lr: f32::INFINITY,
        ..cfg(0.0)
    };
    let msg = fails(&model, &inf_lr, None, &opts(Some(out.clone()), None, false));
    assert!(msg.starts_with("step 1: non-finite weights"), "{msg}");
    assert_eq!(
        entries(&out),
        ["train.log"],
        "a failed fresh run leaves only its log"
    );
    assert!(
        std::fs::read_to_string(out.join("train.log"))
            .unwrap()
            .contains(&msg)
    );
    // lr 1e30: finite weights after step 1 (checkpointed), overflowing logits at step 2.
    let out = d.path().join("diverges");
    let huge_lr = TrainConfig {
        lr: 1e30,
        warmup_steps: 0,
        ..cfg(0.0)
    };
    let mut every = opts(Some(out.clone()), None, false);
    every.checkpoint_every = 1;
    let msg = fails(&model, &huge_lr, None, &every);
    assert!(msg.starts_with("step 2: non-finite"), "{msg}");
    let ck = checkpoint::load(&out, &t.loaded.cfg).unwrap();
    assert_eq!(ck.state.step, 1, "the last good checkpoint is kept");
    assert!(!out.join("adapter_model.safetensors").exists());
    assert!(!out.join("metrics.jsonl").exists());
    // Overflowing logits at the first step: the loss is named.
    let hot = model_with_final_norm(&be, f32::MAX);
    let msg = fails(&hot, &cfg(0.0), None, &opts(None, None, false));
    assert_eq!(msg, "step 1: non-finite loss");
    // An infinite lambda: the penalty.
    let c = curvature(&t, Scheme::Diag);
    let msg = fails(
        &model,
        &cfg(f32::INFINITY),
        Some(&penalty(&be, &c)),
        &opts(None, None, false),
    );
    assert_eq!(msg, "step 1: non-finite penalty");
    // Evaluation and curvature estimation stop too, naming the batch.
    // Evaluation batches the shortest sequences first; the first batch names them.
    let e = mean_nll(&be, &hot, None, &t.examples, 4, || {}).unwrap_err();
    let mut by_length: Vec<usize> = (0..t.examples.len()).collect();
    by_length.sort_by_key(|&i| t.examples[i].ids.len());
    let first: Vec<String> = by_length[..4].iter().map(|i| (i + 1).to_string()).collect();
    assert_eq!(
        (e.exit_code(), e.to_string()),
        (
            3,
            format!("batch 1 (sequences {}): non-finite loss", first.join(", "))
        )
    );
    let spec = Spec {
        scheme: Scheme::Diag,
        fisher: Fisher::Empirical,
        approx: KfacApprox::Expand,
        seed: 0,
    };
    let lora = t.adapter.map(|v| be.buf(v.clone())).unwrap();
    let e = estimate(&be, &hot, &lora, &t.examples, 3, spec, || {})
        .err()
        .unwrap();
    assert_eq!(
        (e.exit_code(), e.to_string().as_str()),
        (3, "curvature batch 1: non-finite loss")
    );
}

/// NaN in the inputs of a run (initial adapter, curvature) is refused before it starts.
#[test]
fn non_finite_inputs_are_refused_naming_the_tensor() {
    let t = tiny();
    let be = cpu();
    let model = tiny_model(&be);
    let mut init = t.adapter.clone();
    init.modules[1].b[2] = f32::NAN;
    let e = session::run(
        &be,
        &model,
        &t.examples,
        &cfg(0.0),
        None,
        &init,
        &opts(None, None, false),
    )
    .err()
    .unwrap();
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains(&init.modules[1].b_name()), "{e}");
    let mut c = curvature(&t, Scheme::Diag);
    c.diag.as_mut().unwrap().modules[0].a[0] = f32::INFINITY;
    let e = Penalty::new(&be, c.clone(), cfg(1.0).delta)
        .err()
        .expect("a non-finite curvature was accepted");
    assert_eq!(e.exit_code(), 2);
    let name = format!("diag.{}", c.mean.modules[0].a_name());
    assert!(e.to_string().contains(&name), "{e}");
}

/// A data set whose labels are all -100 has no loss to average: an error (exit 2) naming
/// the file, not NaN (eval), loss 0 and an adapter (train) or zeros (grad, curvature).
#[test]
fn data_without_target_tokens_is_an_error() {
    let _alone = one_child_at_a_time();
    let t = tiny();
    let be = cpu();
    let model = tiny_model(&be);
    let mut none = t.examples.clone();
    none.iter_mut()
        .for_each(|e| e.labels.iter_mut().for_each(|l| *l = -100));
    let e = session::run(
        &be,
        &model,
        &none,
        &cfg(0.0),
        None,
        &t.adapter,
        &opts(None, None, false),
    )
    .err()
    .unwrap();
    assert_eq!(e.exit_code(), 2, "{e}");
    let e = mean_nll(&be, &model, None, &none, 4, || {}).unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("no-labels.jsonl");
    let rows: String = none
        .iter()
        .map(|e| serde_json::json!({"input_ids": e.ids, "labels": e.labels}).to_string() + "\n")
        .collect();
    std::fs::write(&data, &rows).unwrap();
    let m = fixture("tiny-gqa/model");
    let out = d.path().join("out");
    for cmd in ["eval", "grad", "curvature", "train"] {
        let mut c = bin();
        c.args([
            cmd,
            "--quiet",
            "--device",
            "cpu",
            "--threads",
            "2",
            "--model",
        ])
        .arg(&m)
        .arg("--data")
        .arg(&data);
        if cmd != "eval" {
            c.arg("--out").arg(out.join(cmd));
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{cmd}: {err}");
        assert!(
            err.contains("no-labels.jsonl") && err.contains("no target tokens"),
            "{cmd}: {err}"
        );
    }
    assert!(!out.exists(), "nothing is written");
    // Beside labelled rows they train, and the run says how many add nothing.
    let some = d.path().join("some-labels.jsonl");
    let labelled = std::fs::read_to_string(fixture("tiny-gqa/batch.jsonl")).unwrap();
    let n = labelled.lines().count();
    std::fs::write(&some, labelled + &rows).unwrap();
    let o = bin()
        .args(["train", "--device", "cpu", "--steps", "1", "--model"])
        .arg(&m)
        .arg("--data")
        .arg(&some)
        .arg("--out")
        .arg(out.join("some"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let said = format!(
        "some-labels.jsonl: {} of {} rows have no target token",
        none.len(),
        n + none.len()
    );
    assert!(err.contains(&said), "`{said}` not in: {err}");
}
