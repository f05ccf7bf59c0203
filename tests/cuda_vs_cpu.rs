//! Every CUDA op against its CPU twin on random, non-zero inputs; then a whole curvature
//! pass and a training step on the tiny fixture. f32 kernels agree to ~1e-4 (relative);
//! ops through the bf16 base weights to ~1e-2. Every test runs on the PTX simulator (with
//! all its checks) and, when there is one, on the GPU; `LALORA_REQUIRE_GPU=1` makes a
//! missing GPU a failure.

mod common;

use common::*;
use lalora_engine::backend::cpu::CpuBackend;
use lalora_engine::backend::cuda::{self, BaseDtype, CudaBackend, DevBuf};
use lalora_engine::backend::{
    AdamHyper, AttnShape, Backend, CeTargets, DiagPenalty, LoraDims, RopeTable, Segment,
};
use lalora_engine::curvature::{Fisher, KfacApprox, Scheme, Spec, estimate};
use lalora_engine::model::{self, Llama};
use lalora_engine::train::TrainConfig;
use lalora_engine::train::session::{self, SessionOptions};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const F32: f64 = 1e-4;
const BF16: f64 = 1e-2;

/// The simulator, and the GPU when there is one (required with `LALORA_REQUIRE_GPU=1`).
fn devices_with(base: BaseDtype) -> Vec<CudaBackend> {
    let mut v = vec![CudaBackend::sim(2, base).expect("the simulator starts")];
    if cuda::available() {
        v.push(CudaBackend::new(0, base).expect("CUDA device initialises"));
    } else {
        assert!(
            std::env::var("LALORA_REQUIRE_GPU").as_deref() != Ok("1"),
            "LALORA_REQUIRE_GPU=1 but no CUDA device is usable"
        );
    }
    v
}

fn devices() -> Vec<CudaBackend> {
    devices_with(BaseDtype::Bf16)
}

fn rnd(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0 + 1e-3)
        .collect()
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    assert!(e < tol, "{what}: relative error {e:e} (bound {tol:e})");
}

struct Pair<'a> {
    g: &'a CudaBackend,
    c: CpuBackend,
}

impl Pair<'_> {
    fn up(&self, v: &[f32]) -> DevBuf<f32> {
        self.g.buf(v.to_vec()).unwrap()
    }
    fn down(&self, b: &DevBuf<f32>) -> Vec<f32> {
        self.g.to_host(b).unwrap()
    }
}

#[test]
fn row_ops_match_cpu() {
    for g in devices() {
        let g = &g;
        let p = Pair {
            g,
            c: CpuBackend::new(2),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (rows, dim) = (37, 96);
        let (x, w, dy) = (
            rnd(&mut rng, rows * dim),
            rnd(&mut rng, dim),
            rnd(&mut rng, rows * dim),
        );
        let (yc, rc) = p.c.rmsnorm(&x, &w, rows, dim, 1e-5).unwrap();
        let (yg, rg) = g.rmsnorm(&p.up(&x), &p.up(&w), rows, dim, 1e-5).unwrap();
        close("rmsnorm y", &p.down(&yg), &yc, F32);
        close("rmsnorm rstd", &p.down(&rg), &rc, F32);
        let mut dxc = rnd(&mut rng, rows * dim);
        let mut dxg = p.up(&dxc);
        p.c.rmsnorm_backward(&dy, &x, &w, &rc, rows, dim, &mut dxc)
            .unwrap();
        g.rmsnorm_backward(&p.up(&dy), &p.up(&x), &p.up(&w), &rg, rows, dim, &mut dxg)
            .unwrap();
        close("rmsnorm backward", &p.down(&dxg), &dxc, F32);

        let (heads, hd, period) = (4, 24, 5);
        let half = hd / 2;
        let (cos, sin) = (rnd(&mut rng, period * half), rnd(&mut rng, period * half));
        for inverse in [false, true] {
            let mut xc = rnd(&mut rng, rows * heads * hd);
            let mut xg = p.up(&xc);
            let tc = RopeTable::<CpuBackend> {
                cos: cos.clone(),
                sin: sin.clone(),
                period,
            };
            let tg = RopeTable::<CudaBackend> {
                cos: p.up(&cos),
                sin: p.up(&sin),
                period,
            };
            p.c.rope(&mut xc, &tc, rows, heads, hd, inverse).unwrap();
            g.rope(&mut xg, &tg, rows, heads, hd, inverse).unwrap();
            close("rope", &p.down(&xg), &xc, F32);
        }

        let (ga, up, d) = (
            rnd(&mut rng, 1000),
            rnd(&mut rng, 1000),
            rnd(&mut rng, 1000),
        );
        close(
            "swiglu",
            &p.down(&g.swiglu(&p.up(&ga), &p.up(&up)).unwrap()),
            &p.c.swiglu(&ga, &up).unwrap(),
            F32,
        );
        let (dgc, duc) = p.c.swiglu_backward(&d, &ga, &up).unwrap();
        let (dgg, dug) = g
            .swiglu_backward(&p.up(&d), &p.up(&ga), &p.up(&up))
            .unwrap();
        close("swiglu dgate", &p.down(&dgg), &dgc, F32);
        close("swiglu dup", &p.down(&dug), &duc, F32);

        let table = rnd(&mut rng, 50 * dim);
        let ids: Vec<u32> = (0..rows).map(|_| rng.random_range(0..50)).collect();
        let want = p.c.embedding(&table, &ids, dim).unwrap();
        let got = g
            .embedding(&g.weight(table.clone(), 50, dim).unwrap(), &ids, dim)
            .unwrap();
        close("embedding (bf16 table)", &p.down(&got), &want, BF16);
    }
}

#[test]
fn blas1_and_adamw_match_cpu() {
    for g in devices() {
        let g = &g;
        let p = Pair {
            g,
            c: CpuBackend::new(2),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let n = 3001;
        let (a, b) = (rnd(&mut rng, n), rnd(&mut rng, n));
        let mut ac = a.clone();
        let mut ag = p.up(&a);
        p.c.add_assign(&mut ac, &b).unwrap();
        g.add_assign(&mut ag, &p.up(&b)).unwrap();
        p.c.axpy(0.3, &b, &mut ac).unwrap();
        g.axpy(0.3, &p.up(&b), &mut ag).unwrap();
        p.c.scale(&mut ac, -1.7).unwrap();
        g.scale(&mut ag, -1.7).unwrap();
        p.c.mul_assign(&mut ac, &b).unwrap();
        g.mul_assign(&mut ag, &p.up(&b)).unwrap();
        close("add/axpy/scale/mul", &p.down(&ag), &ac, F32);
        let (dc, dg) = (
            p.c.dot(&a, &b).unwrap(),
            g.dot(&p.up(&a), &p.up(&b)).unwrap(),
        );
        assert!(
            (dc - dg).abs() < 1e-9 * dc.abs().max(1.0),
            "dot {dc} vs {dg}"
        );
        let mut dst = p.up(&a);
        g.copy_into(&mut dst, 100, &p.up(&b[..50])).unwrap();
        let mut want = a.clone();
        want[100..150].copy_from_slice(&b[..50]);
        assert_eq!(p.down(&dst), want);

        let h = AdamHyper {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step: 4,
        };
        let (mean, prec) = (
            rnd(&mut rng, n),
            rnd(&mut rng, n).iter().map(|x| x.abs()).collect::<Vec<_>>(),
        );
        for pen in [false, true] {
            let (mut pc, mut mc, mut vc) = (a.clone(), b.clone(), prec.clone());
            let (mut pg, mut mg, mut vg) = (p.up(&pc), p.up(&mc), p.up(&vc));
            let (mean_g, prec_g) = (p.up(&mean), p.up(&prec));
            let pc_pen = pen.then_some(DiagPenalty::<CpuBackend> {
                mean: &mean,
                precision: &prec,
                lambda: 3.0,
            });
            let pg_pen = pen.then_some(DiagPenalty::<CudaBackend> {
                mean: &mean_g,
                precision: &prec_g,
                lambda: 3.0,
            });
            p.c.adamw_step(&mut pc, &b, &mut mc, &mut vc, &h, 0.5, pc_pen)
                .unwrap();
            g.adamw_step(&mut pg, &p.up(&b), &mut mg, &mut vg, &h, 0.5, pg_pen)
                .unwrap();
            close("adamw p", &p.down(&pg), &pc, F32);
            close("adamw m", &p.down(&mg), &mc, F32);
            close("adamw v", &p.down(&vg), &vc, F32);
        }
    }
}

#[test]
fn matmuls_and_lora_match_cpu() {
    for g in devices() {
        let g = &g;
        let p = Pair {
            g,
            c: CpuBackend::new(2),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (m, k, n) = (19, 33, 27);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (a, b) = (rnd(&mut rng, m * k), rnd(&mut rng, k * n));
            let want = p.c.matmul(&a, &b, m, k, n, ta, tb).unwrap();
            let got = g.matmul(&p.up(&a), &p.up(&b), m, k, n, ta, tb).unwrap();
            close(
                &format!("matmul ta={ta} tb={tb}"),
                &p.down(&got),
                &want,
                F32,
            );
        }
        let (x, w) = (rnd(&mut rng, m * k), rnd(&mut rng, n * k));
        let wg = g.weight(w.clone(), n, k).unwrap();
        close(
            "linear (bf16)",
            &p.down(&g.linear(&p.up(&x), &wg, m, k, n).unwrap()),
            &p.c.linear(&x, &w, m, k, n).unwrap(),
            BF16,
        );
        let dy = rnd(&mut rng, m * n);
        let mut dxc = rnd(&mut rng, m * k);
        let mut dxg = p.up(&dxc);
        p.c.linear_backward(&dy, &w, m, k, n, &mut dxc, true)
            .unwrap();
        g.linear_backward(&p.up(&dy), &wg, m, k, n, &mut dxg, true)
            .unwrap();
        close("linear backward (bf16)", &p.down(&dxg), &dxc, BF16);

        let d = LoraDims {
            m: 70,
            d_in: 96,
            r: 8,
            d_out: 130,
            scale: 2.0,
        };
        let (x, a, b) = (
            rnd(&mut rng, d.m * d.d_in),
            rnd(&mut rng, d.r * d.d_in),
            rnd(&mut rng, d.d_out * d.r),
        );
        let mut yc = rnd(&mut rng, d.m * d.d_out);
        let mut yg = p.up(&yc);
        let uc = p.c.lora_forward(&x, &a, &b, d, &mut yc).unwrap();
        let ug = g
            .lora_forward(&p.up(&x), &p.up(&a), &p.up(&b), d, &mut yg)
            .unwrap();
        close("lora forward y", &p.down(&yg), &yc, F32);
        close("lora forward u", &p.down(&ug), &uc, F32);
        let gr = rnd(&mut rng, d.m * d.d_out);
        let (mut dxc, mut dac, mut dbc) = (
            rnd(&mut rng, d.m * d.d_in),
            rnd(&mut rng, a.len()),
            rnd(&mut rng, b.len()),
        );
        let (mut dxg, mut dag, mut dbg) = (p.up(&dxc), p.up(&dac), p.up(&dbc));
        let gac =
            p.c.lora_backward(
                &gr,
                &x,
                &uc,
                &a,
                &b,
                d,
                &mut dxc,
                Some((&mut dac, &mut dbc)),
            )
            .unwrap();
        let gag = g
            .lora_backward(
                &p.up(&gr),
                &p.up(&x),
                &ug,
                &p.up(&a),
                &p.up(&b),
                d,
                &mut dxg,
                Some((&mut dag, &mut dbg)),
            )
            .unwrap();
        close("lora backward gA", &p.down(&gag), &gac, F32);
        close("lora backward dx", &p.down(&dxg), &dxc, F32);
        close("lora backward dA", &p.down(&dag), &dac, F32);
        close("lora backward dB", &p.down(&dbg), &dbc, F32);
    }
}

#[test]
fn attention_matches_cpu() {
    for g in devices() {
        let g = &g;
        let p = Pair {
            g,
            c: CpuBackend::new(2),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for (tq, tk, stride, offset) in [(13, 13, 13, 0), (3, 11, 16, 8)] {
            let s = AttnShape {
                batch: 2,
                tq,
                tk,
                tk_stride: stride,
                n_heads: 6,
                n_kv_heads: 2,
                head_dim: 16,
                q_offset: offset,
            };
            let q = rnd(&mut rng, s.batch * tq * 6 * 16);
            let (k, v) = (
                rnd(&mut rng, s.batch * stride * 32),
                rnd(&mut rng, s.batch * stride * 32),
            );
            let (oc, pc) = p.c.attention(&q, &k, &v, &s).unwrap();
            let (og, pg) = g.attention(&p.up(&q), &p.up(&k), &p.up(&v), &s).unwrap();
            close("attention out", &p.down(&og), &oc, F32);
            close("attention probs", &p.down(&pg), &pc, F32);
            let dout = rnd(&mut rng, oc.len());
            let (dqc, dkc, dvc) = p.c.attention_backward(&dout, &q, &k, &v, &pc, &s).unwrap();
            let (dqg, dkg, dvg) = g
                .attention_backward(&p.up(&dout), &p.up(&q), &p.up(&k), &p.up(&v), &pg, &s)
                .unwrap();
            close("attention dq", &p.down(&dqg), &dqc, F32);
            close("attention dk", &p.down(&dkg), &dkc, F32);
            close("attention dv", &p.down(&dvg), &dvc, F32);
        }
    }
}

#[test]
fn cross_entropy_and_sampling_match_cpu() {
    for g in devices() {
        let g = &g;
        let p = Pair {
            g,
            c: CpuBackend::new(2),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (rows, vocab) = (40, 1000);
        let logits: Vec<f32> = rnd(&mut rng, rows * vocab)
            .iter()
            .map(|x| 4.0 * x)
            .collect();
        let targets: Vec<i32> = (0..rows)
            .map(|r| {
                if r % 7 == 3 {
                    -100
                } else {
                    rng.random_range(0..vocab as i32)
                }
            })
            .collect();
        let (lc, dc) =
            p.c.cross_entropy(
                &logits,
                rows,
                vocab,
                CeTargets::Labels(&targets),
                Some(0.25),
            )
            .unwrap();
        let (lg, dg) = g
            .cross_entropy(
                &p.up(&logits),
                rows,
                vocab,
                CeTargets::Labels(&targets),
                Some(0.25),
            )
            .unwrap();
        close("ce losses", &lg, &lc, F32);
        close("ce dlogits", &p.down(&dg.unwrap()), &dc.unwrap(), F32);
        // Sampled labels come from the same counter-based uniforms: the gradients agree except
        // where a uniform falls within rounding of a CDF boundary (allow one such row).
        let t = CeTargets::Sample {
            mask: &targets,
            seed: 77,
        };
        let (_, dc) =
            p.c.cross_entropy(&logits, rows, vocab, t, Some(1.0))
                .unwrap();
        let (_, dg) = g
            .cross_entropy(&p.up(&logits), rows, vocab, t, Some(1.0))
            .unwrap();
        let (dc, dg) = (dc.unwrap(), p.down(&dg.unwrap()));
        let differing = dc
            .chunks(vocab)
            .zip(dg.chunks(vocab))
            .filter(|(a, b)| rel_err(b, a) > 1e-3)
            .count();
        assert!(differing <= 1, "{differing} rows sampled different labels");
    }
}

#[test]
fn curvature_primitives_match_cpu() {
    for g in devices() {
        let g = &g;
        let p = Pair {
            g,
            c: CpuBackend::new(2),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let segs = [
            Segment { start: 0, len: 9 },
            Segment { start: 12, len: 5 },
            Segment { start: 17, len: 13 },
        ];
        let rows = 30;
        let (dx, dy, r) = (70, 130, 8);
        let (x, y) = (rnd(&mut rng, rows * dx), rnd(&mut rng, rows * dy));
        let mut oc = rnd(&mut rng, dx * dy);
        let mut og = p.up(&oc);
        p.c.gram_accumulate(&x, dx, &y, dy, &segs, 0.7, &mut oc)
            .unwrap();
        g.gram_accumulate(&p.up(&x), dx, &p.up(&y), dy, &segs, 0.7, &mut og)
            .unwrap();
        close("gram (cross)", &p.down(&og), &oc, F32);
        let xg = p.up(&x);
        let mut sc = vec![0f32; dx * dx];
        let mut sg = p.up(&sc);
        p.c.gram_accumulate(&x, dx, &x, dx, &segs, 1.3, &mut sc)
            .unwrap();
        g.gram_accumulate(&xg, dx, &xg, dx, &segs, 1.3, &mut sg)
            .unwrap();
        close("gram (symmetric)", &p.down(&sg), &sc, F32);
        for mean in [false, true] {
            let want = p.c.segment_sum(&x, dx, &segs, mean).unwrap();
            close(
                "segment sum",
                &p.down(&g.segment_sum(&xg, dx, &segs, mean).unwrap()),
                &want,
                F32,
            );
        }
        let narrow = rnd(&mut rng, rows * r);
        // A orientation: (r, d_in) from gA (rows, r) and x (rows, d_in); B: (d_out, r).
        let mut fc = rnd(&mut rng, r * dx)
            .iter()
            .map(|v| v.abs())
            .collect::<Vec<_>>();
        let mut fg = p.up(&fc);
        p.c.sq_grad_accumulate(&narrow, r, &x, dx, &segs, 0.5, &mut fc)
            .unwrap();
        g.sq_grad_accumulate(&p.up(&narrow), r, &xg, dx, &segs, 0.5, &mut fg)
            .unwrap();
        close("per-sample squaring (A)", &p.down(&fg), &fc, F32);
        let mut fc = vec![0f32; dy * r];
        let mut fg = p.up(&fc);
        p.c.sq_grad_accumulate(&y, dy, &narrow, r, &segs, 2.0, &mut fc)
            .unwrap();
        g.sq_grad_accumulate(&p.up(&y), dy, &p.up(&narrow), r, &segs, 2.0, &mut fg)
            .unwrap();
        close("per-sample squaring (B)", &p.down(&fg), &fc, F32);
    }
}

#[test]
fn curvature_pass_and_training_step_match_cpu() {
    for g in devices() {
        let g = &g;
        let t = tiny();
        let c = CpuBackend::new(2);
        let cpu_model = tiny_model(&c);
        let m = model::load(&fixture("tiny-gqa/model"), None).unwrap();
        let gpu_model = Llama::new(g, m.cfg, m.weights).unwrap();
        let lora_g = t.adapter.map(|v| g.buf(v.clone())).unwrap();
        for scheme in [Scheme::Diag, Scheme::KfacTri] {
            let spec = Spec {
                scheme,
                fisher: Fisher::Empirical,
                approx: KfacApprox::Expand,
                seed: 0,
            };
            let cc = estimate(&c, &cpu_model, &t.adapter, &t.examples, 3, spec, || {}).unwrap();
            let cg = estimate(g, &gpu_model, &lora_g, &t.examples, 3, spec, || {}).unwrap();
            if let (Some(a), Some(b)) = (&cc.diag, &cg.diag) {
                for ((n, _, x), (_, _, y)) in b.named_tensors().into_iter().zip(a.named_tensors()) {
                    close(&format!("diag {n}"), x, y, BF16 * 5.0);
                }
            }
            if let (Some(a), Some(b)) = (&cc.kfac, &cg.kfac) {
                for (x, y) in b.iter().zip(a) {
                    close("kfac out B", &x.b_out, &y.b_out, BF16 * 5.0);
                    close("kfac in A", &x.a_in, &y.a_in, BF16);
                }
            }
        }
        let cfg = TrainConfig {
            steps: 2,
            batch_size: 3,
            lr: 1e-3,
            ..TrainConfig::default()
        };
        let opts = SessionOptions {
            out: None,
            checkpoint_every: 0,
            resume: false,
            quiet: true,
            base_model: String::new(),
            stop_after: None,
            curvature_path: None,
        };
        let rc = session::run(&c, &cpu_model, &t.examples, &cfg, None, &t.adapter, &opts).unwrap();
        let rg = session::run(g, &gpu_model, &t.examples, &cfg, None, &t.adapter, &opts).unwrap();
        for ((n, _, x), (_, _, y)) in rg
            .lora
            .named_tensors()
            .into_iter()
            .zip(rc.lora.named_tensors())
        {
            close(&format!("trained {n}"), x, y, BF16);
        }
        assert!((rg.metrics[0].loss - rc.metrics[0].loss).abs() < 1e-2 * rc.metrics[0].loss);
    }
}
