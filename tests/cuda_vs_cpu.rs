//! Every CUDA op against its CPU twin on random, non-zero inputs; then a whole curvature
//! pass and a training step on the tiny fixture. f32 kernels agree to ~1e-4 (relative);
//! ops through the bf16 base weights to ~1e-2. Every test runs on the PTX simulator (with
//! all its checks) and, when there is one, on the GPU; `LALORA_REQUIRE_GPU=1` makes a
//! missing GPU a failure.

mod common;

use common::*;
use lalora_engine::backend::cpu::CpuBackend;
use lalora_engine::backend::cuda::runtime::{DType, RuntimeStats};
use lalora_engine::backend::cuda::{self, Act, BaseDtype, CudaBackend, GramGemm, ProjectionGemm};
use lalora_engine::backend::group::GradFeeds;
use lalora_engine::backend::{
    AdamHyper, AttnSaved, AttnShape, Backend, CLASSIFIER_CHUNK, CeTargets, DiagPenalty, LoraDims,
    RopeTable, Segment,
};
use lalora_engine::curvature::{Fisher, KfacApprox, Scheme, Spec, estimate};
use lalora_engine::data::batches;
use lalora_engine::model::weights::HostWeights;
use lalora_engine::model::{self, Llama};
use lalora_engine::train::session::{self, SessionOptions};
use lalora_engine::train::{Penalty, TrainConfig, TrainState, train};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const F32: f64 = 1e-4;
/// What reads attention's gradients: a training step, KFAC expand or diag (stored bf16 with
/// bf16 base weights, on the flash path), or a reduction that sums them first (KFAC
/// reduce: f32).
const TRAIN: GradFeeds = GradFeeds::Backward;
const SUMMED: GradFeeds = GradFeeds::Summed;
const BF16: f64 = 1e-2;
/// An f32 result stored as a bf16 activation (bf16 base weights): one rounding to
/// nearest, at most 2^-8 / (1 + 2^-8) = 0.00389 relative per element (bf16 keeps 8
/// significant bits). The bound 2^-8 leaves 1.5e-5 for the f32 arithmetic before the
/// rounding, whose errors here are about 1e-6.
const BF16_STORE: f64 = 1.0 / 256.0;

/// The bound for an op's activation output on `g`, and the storage type it must have:
/// bf16 with bf16 base weights, f32 (and f32 accuracy) with f32 ones.
fn stored(g: &CudaBackend) -> (f64, DType) {
    match g.base_dtype() {
        BaseDtype::Bf16 => (BF16_STORE, DType::Bf16),
        BaseDtype::F32 => (F32, DType::F32),
    }
}

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

struct Pair<'a> {
    g: &'a CudaBackend,
    c: CpuBackend,
}

impl Pair<'_> {
    fn up(&self, v: &[f32]) -> Act {
        self.g.buf(v.to_vec()).unwrap()
    }
    fn down(&self, b: &Act) -> Vec<f32> {
        self.g.to_host(b).unwrap()
    }
    /// A random RoPE table (`common::rope_table`) on the CPU and on the device.
    fn rope(
        &self,
        rng: &mut ChaCha8Rng,
        period: usize,
        hd: usize,
    ) -> (RopeTable<Vec<f32>>, RopeTable<Act>) {
        let (cos, sin, dev) = rope_table(self.g, rng, period, hd);
        (RopeTable { cos, sin, period }, dev)
    }
}

#[test]
fn row_ops_match_cpu() {
    for g in devices_with(BaseDtype::F32).into_iter().chain(devices()) {
        let g = &g;
        let (store_tol, store_ty) = stored(g);
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
        assert_eq!(yg.dtype(), store_ty, "rmsnorm y storage");
        close("rmsnorm y", &p.down(&yg), &yc, store_tol);
        close("rmsnorm rstd", &p.down(&rg), &rc, F32);
        let mut dxc = rnd(&mut rng, rows * dim);
        let mut dxg = p.up(&dxc);
        p.c.rmsnorm_backward(&dy, &x, &w, &rc, rows, dim, &mut dxc)
            .unwrap();
        g.rmsnorm_backward(&p.up(&dy), &p.up(&x), &p.up(&w), &rg, rows, dim, &mut dxg)
            .unwrap();
        close("rmsnorm backward", &p.down(&dxg), &dxc, F32);

        // The fused residual add + norm, also on an odd row length (unaligned rows) and on
        // one of whole f32 packs but not whole bf16 ones (36).
        for (rows, dim) in [(rows, dim), (5, 33), (4, 36)] {
            let (h, delta, w) = (
                rnd(&mut rng, rows * dim),
                rnd(&mut rng, rows * dim),
                rnd(&mut rng, dim),
            );
            let (mut hc, mut hg) = (h.clone(), p.up(&h));
            let (yc, rc) =
                p.c.add_rmsnorm(&mut hc, &delta, &w, rows, dim, 1e-5)
                    .unwrap();
            let (yg, rg) = g
                .add_rmsnorm(&mut hg, &p.up(&delta), &p.up(&w), rows, dim, 1e-5)
                .unwrap();
            close("add_rmsnorm h", &p.down(&hg), &hc, F32);
            assert_eq!(yg.dtype(), store_ty, "add_rmsnorm y storage");
            close("add_rmsnorm y", &p.down(&yg), &yc, store_tol);
            close("add_rmsnorm rstd", &p.down(&rg), &rc, F32);
        }

        let (heads, hd, period) = (4, 24, 5);
        let half = hd / 2;
        let (cos, sin) = (rnd(&mut rng, period * half), rnd(&mut rng, period * half));
        for inverse in [false, true] {
            let mut xc = rnd(&mut rng, rows * heads * hd);
            let mut xg = p.up(&xc);
            let tc = RopeTable {
                cos: cos.clone(),
                sin: sin.clone(),
                period,
            };
            let tg = RopeTable {
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
        let act = g.swiglu(&p.up(&ga), &p.up(&up)).unwrap();
        assert_eq!(act.dtype(), store_ty, "swiglu output storage");
        close(
            "swiglu",
            &p.down(&act),
            &p.c.swiglu(&ga, &up).unwrap(),
            store_tol,
        );
        let (dgc, duc) =
            p.c.swiglu_backward(&d, &ga, &up, GradFeeds::Backward)
                .unwrap();
        let (dgg, dug) = g
            .swiglu_backward(&p.up(&d), &p.up(&ga), &p.up(&up), GradFeeds::Backward)
            .unwrap();
        close("swiglu dgate", &p.down(&dgg), &dgc, F32);
        close("swiglu dup", &p.down(&dug), &duc, F32);

        let table = rnd(&mut rng, 50 * dim);
        let ids: Vec<u32> = (0..rows).map(|_| rng.random_range(0..50)).collect();
        let want =
            p.c.embedding(&p.c.weight(table.clone(), 50, dim).unwrap(), &ids, dim)
                .unwrap();
        let got = g
            .embedding(&g.weight(table.clone(), 50, dim).unwrap(), &ids, dim)
            .unwrap();
        // A gather copies: the table's values as stored (rounded to bf16 with bf16 base
        // weights), bit for bit.
        let want: Vec<f32> = match g.base_dtype() {
            BaseDtype::Bf16 => want
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect(),
            BaseDtype::F32 => want,
        };
        same_bits("embedding", &p.down(&got), &want);
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
        // Many dot products at once: lengths with tails, an empty pair, one long enough to
        // span several chunks, and a squared norm (the same buffer twice). The products
        // of two f32 are exact in f64, so any summation order of n of them is within
        // n * 2^-53 * sum |x_i y_i| of the exact sum; 1e-10 covers n up to 10^6.
        let lens = [3001, 1, 0, 257, 70_000, 5, 1024];
        let host: Vec<(Vec<f32>, Vec<f32>)> = lens
            .iter()
            .map(|&n| (rnd(&mut rng, n), rnd(&mut rng, n)))
            .collect();
        let dev: Vec<_> = host.iter().map(|(x, y)| (p.up(x), p.up(y))).collect();
        let mut pairs: Vec<_> = dev.iter().map(|(x, y)| (x, y)).collect();
        pairs.push((&dev[0].0, &dev[0].0));
        let got = g.dots(&pairs).unwrap();
        assert_eq!(got.len(), pairs.len());
        let mut want: Vec<(&[f32], &[f32])> = host.iter().map(|(x, y)| (&x[..], &y[..])).collect();
        want.push((&host[0].0, &host[0].0));
        for (k, ((x, y), got)) in want.iter().zip(&got).enumerate() {
            let exact = p.c.dot(&x.to_vec(), &y.to_vec()).unwrap();
            let mass: f64 = x
                .iter()
                .zip(*y)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            assert!(
                (got - exact).abs() <= 1e-10 * mass,
                "dots pair {k} (n = {}): {got} vs {exact}",
                x.len()
            );
        }
        assert!(g.dots(&[]).unwrap().is_empty());
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
        let (wg, wc) = (
            g.weight(w.clone(), n, k).unwrap(),
            p.c.weight(w, n, k).unwrap(),
        );
        close(
            "linear (bf16)",
            &p.down(&g.linear(&p.up(&x), &wg, m, k, n).unwrap()),
            &p.c.linear(&x, &wc, m, k, n).unwrap(),
            BF16,
        );
        let dy = rnd(&mut rng, m * n);
        let mut dxc = rnd(&mut rng, m * k);
        let mut dxg = p.up(&dxc);
        p.c.linear_backward(&dy, &wc, m, k, n, &mut dxc, true)
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

/// The materialised path (f32 cuBLAS products, probabilities kept): with f32 base weights,
/// and with bf16 ones at a head dim flash attention does not run (24); the backward given
/// a RoPE table (dq, dk unrotated by rope passes after it).
#[test]
fn attention_matches_cpu() {
    for (base, hd) in [(BaseDtype::F32, 16), (BaseDtype::Bf16, 24)] {
        for g in devices_with(base) {
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
                    head_dim: hd,
                    q_offset: offset,
                };
                let q = rnd(&mut rng, s.batch * tq * 6 * hd);
                let (k, v) = (
                    rnd(&mut rng, s.batch * stride * 2 * hd),
                    rnd(&mut rng, s.batch * stride * 2 * hd),
                );
                let (oc, sc) = p.c.attention(&q, &k, &v, &s).unwrap();
                let (og, sg) = g.attention(&p.up(&q), &p.up(&k), &p.up(&v), &s).unwrap();
                let (AttnSaved::Probs(pc), AttnSaved::Probs(pg)) = (&sc, &sg) else {
                    panic!("{base:?}, head dim {hd}: the materialised path saves probabilities");
                };
                close("attention out", &p.down(&og), &oc, F32);
                close("attention probs", &p.down(pg), pc, F32);
                let dout = rnd(&mut rng, oc.len());
                let (tc, tg) = p.rope(&mut rng, stride, hd);
                let (dqc, dkc, dvc) =
                    p.c.attention_backward(&dout, &q, &k, &v, &oc, &sc, Some(&tc), TRAIN, &s)
                        .unwrap();
                let (qg, kg, vg, dg) = (p.up(&q), p.up(&k), p.up(&v), p.up(&dout));
                let (dqg, dkg, dvg) = g
                    .attention_backward(&dg, &qg, &kg, &vg, &og, &sg, Some(&tg), TRAIN, &s)
                    .unwrap();
                assert_eq!(
                    dqg.dtype(),
                    DType::F32,
                    "the materialised path's gradients are f32"
                );
                close("attention dq", &p.down(&dqg), &dqc, F32);
                close("attention dk", &p.down(&dkg), &dkc, F32);
                close("attention dv", &p.down(&dvg), &dvc, F32);
            }
        }
    }
}

/// `ln sum_j exp(q_i . k_j / sqrt(hd))` over the keys query i sees, in f64, `(batch,
/// n_heads, tq)`: what flash attention saves.
fn host_lse(q: &[f32], k: &[f32], s: &AttnShape) -> Vec<f32> {
    let (hd, group) = (s.head_dim, s.n_heads / s.n_kv_heads);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = Vec::with_capacity(s.batch * s.n_heads * s.tq);
    for b in 0..s.batch {
        for h in 0..s.n_heads {
            for i in 0..s.tq {
                let qi = &q[((b * s.tq + i) * s.n_heads + h) * hd..][..hd];
                let scores: Vec<f64> = (0..(s.q_offset + i + 1).min(s.tk))
                    .map(|j| {
                        let kj =
                            &k[((b * s.tk_stride + j) * s.n_kv_heads + h / group) * hd..][..hd];
                        let dot: f64 = qi.iter().zip(kj).map(|(&x, &y)| x as f64 * y as f64).sum();
                        dot * scale
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                out.push((m + scores.iter().map(|x| (x - m).exp()).sum::<f64>().ln()) as f32);
            }
        }
    }
    out
}

/// Flash attention (bf16 base weights): out, log-sum-exps, dq, dk, dv against the CPU to
/// the bf16 bound, on grouped-query, causal, KV-cache and ragged shapes; the backward is
/// bit-for-bit repeatable. The backward runs given a RoPE table, as the model calls it:
/// at head dims 64 and 128 its epilogues unrotate dq and dk, which must be bit for bit the
/// backward without the table followed by the inverse rope passes (`rope_rotate` of
/// common.cuh in both); elsewhere rope passes run after it (held to the CPU only).
#[test]
fn flash_attention_matches_cpu() {
    // (batch, tq, tk, tk_stride, heads, kv heads, head dim, q_offset)
    let cases = [
        // Prefill of two 77-token sequences (no multiple of a tile), 4 heads per KV head.
        (2, 77, 77, 77, 8, 2, 64, 0),
        // Decode: 5 queries at positions 65..70 over a 96-row cache, head dim 128.
        (1, 5, 70, 96, 4, 1, 128, 65),
        // Chunked prefill: 40 queries at 60..100 over 100 keys of a 112-row stride.
        (2, 40, 100, 112, 4, 2, 64, 60),
        // Multi-head (groups of 1), 130 tokens: two dK/dV blocks, three key tiles.
        (1, 130, 130, 130, 2, 2, 128, 0),
        // Head dim 32, run zero-padded in the 64 build; 3 heads per KV head.
        (1, 20, 20, 20, 3, 1, 32, 0),
        // Head dim 96, padded in the 128 build: RoPE in passes after the backward.
        (2, 12, 12, 12, 2, 1, 96, 0),
    ];
    for g in devices() {
        let g = &g;
        let p = Pair {
            g,
            c: CpuBackend::new(2),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (n, &(batch, tq, tk, tk_stride, n_heads, n_kv_heads, head_dim, q_offset)) in
            cases.iter().enumerate()
        {
            let s = AttnShape {
                batch,
                tq,
                tk,
                tk_stride,
                n_heads,
                n_kv_heads,
                head_dim,
                q_offset,
            };
            let what = |x: &str| format!("flash {x} {s:?}");
            // Scores with a spread of ~2: softmaxes neither flat nor one-hot.
            let amp = |v: Vec<f32>| v.into_iter().map(|x| 2.5 * x).collect::<Vec<_>>();
            let kv_len = batch * tk_stride * n_kv_heads * head_dim;
            let q = amp(rnd(&mut rng, batch * tq * n_heads * head_dim));
            let (k, v) = (amp(rnd(&mut rng, kv_len)), rnd(&mut rng, kv_len));
            let (qg, kg, vg) = (p.up(&q), p.up(&k), p.up(&v));
            let (oc, sc) = p.c.attention(&q, &k, &v, &s).unwrap();
            let (og, sg) = g.attention(&qg, &kg, &vg, &s).unwrap();
            let AttnSaved::Lse(lse) = &sg else {
                panic!("{}: bf16 attention did not take the flash path", what(""));
            };
            close(&what("out"), &p.down(&og), &oc, BF16);
            close(&what("lse"), &p.down(lse), &host_lse(&q, &k, &s), BF16);
            let dout = rnd(&mut rng, oc.len());
            let dg = p.up(&dout);
            let (tc, tg) = p.rope(&mut rng, tk_stride, head_dim);
            let (dqc, dkc, dvc) =
                p.c.attention_backward(&dout, &q, &k, &v, &oc, &sc, Some(&tc), SUMMED, &s)
                    .unwrap();
            // f32 gradients, as KFAC reduce asks for them.
            let (dqg, dkg, dvg) = g
                .attention_backward(&dg, &qg, &kg, &vg, &og, &sg, Some(&tg), SUMMED, &s)
                .unwrap();
            assert_eq!(dqg.dtype(), DType::F32, "{}", what("curvature grads"));
            let got = [p.down(&dqg), p.down(&dkg), p.down(&dvg)];
            close(&what("dq"), &got[0], &dqc, BF16);
            close(&what("dk"), &got[1], &dkc, BF16);
            close(&what("dv"), &got[2], &dvc, BF16);
            // As training asks for them: where the epilogues unrotate, stored bf16, the f32
            // ones rounded once (bit for bit but for the sign of zero); where rope passes
            // run after, f32 (a pass over a bf16 dq would round twice), the same bits.
            let fused = head_dim == 64 || head_dim == 128;
            let (dqt, dkt, dvt) = g
                .attention_backward(&dg, &qg, &kg, &vg, &og, &sg, Some(&tg), TRAIN, &s)
                .unwrap();
            let want_ty = if fused { DType::Bf16 } else { DType::F32 };
            for (i, (name, x)) in [("dq", &dqt), ("dk", &dkt), ("dv", &dvt)]
                .iter()
                .enumerate()
            {
                assert_eq!(x.dtype(), want_ty, "{}", what(&format!("training {name}")));
                let want: Vec<f32> = if fused {
                    got[i]
                        .iter()
                        .map(|&v| half::bf16::from_f32(v).to_f32())
                        .collect()
                } else {
                    got[i].clone()
                };
                assert!(
                    p.down(x)
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0)),
                    "{}: training gradients are not the curvature ones (rounded once)",
                    what(name)
                );
            }
            // Where the epilogues unrotate (head dims 64, 128): without the table, then the
            // two inverse rope passes, gives the same values, bit for bit but for the sign
            // of zero (cache rows past tk: stored +0 by the fused path, rotated zeros may
            // come out -0). Elsewhere both sides would run the passes.
            let (mut dq0, mut dk0, dv0) = g
                .attention_backward(&dg, &qg, &kg, &vg, &og, &sg, None, SUMMED, &s)
                .unwrap();
            let rows = (batch * tq, batch * tk_stride);
            g.rope(&mut dq0, &tg, rows.0, n_heads, head_dim, true)
                .unwrap();
            g.rope(&mut dk0, &tg, rows.1, n_kv_heads, head_dim, true)
                .unwrap();
            let separate = [p.down(&dq0), p.down(&dk0), p.down(&dv0)];
            for (name, (a, b)) in ["dq", "dk", "dv"]
                .iter()
                .zip(got.iter().zip(separate))
                .filter(|_| fused)
            {
                assert!(
                    a.iter()
                        .zip(&b)
                        .all(|(x, y)| x.to_bits() == y.to_bits() || (*x == 0.0 && *y == 0.0)),
                    "{}: the fused unrotation differs from the rope passes",
                    what(name)
                );
            }
            if n == 0 {
                let (dq2, dk2, dv2) = g
                    .attention_backward(&dg, &qg, &kg, &vg, &og, &sg, Some(&tg), SUMMED, &s)
                    .unwrap();
                let again = [p.down(&dq2), p.down(&dk2), p.down(&dv2)];
                assert!(
                    got.iter()
                        .zip(&again)
                        .all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())),
                    "flash attention backward is not deterministic"
                );
            }
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

/// The fused classifier against the CPU's, with f32 and bf16 base weights: 37 rows (5
/// ignored, or none), hidden 48, a vocabulary of two full chunks and a tail of 77 columns;
/// data labels with and without the gradient, and Monte-Carlo labels. With bf16 the CPU gets
/// the head and hidden states rounded as the device reads them, so the remaining error is
/// the device's bf16 rounding of `exp(z - m)` for the gradient product (1e-2) and sampled
/// labels agree up to summation order (one boundary row allowed, as for cross_entropy).
#[test]
fn classifier_matches_cpu() {
    for base in [BaseDtype::F32, BaseDtype::Bf16] {
        for g in devices_with(base) {
            let g = &g;
            let c = CpuBackend::new(2);
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            let (rows, dim, vocab) = (37, 48, 2 * CLASSIFIER_CHUNK + 77);
            let as_read = |v: Vec<f32>| -> Vec<f32> {
                match base {
                    BaseDtype::F32 => v,
                    BaseDtype::Bf16 => v
                        .iter()
                        .map(|&x| half::bf16::from_f32(x).to_f32())
                        .collect(),
                }
            };
            let h = as_read(rnd(&mut rng, rows * dim));
            let w = as_read(rnd(&mut rng, vocab * dim));
            let targets: Vec<i32> = (0..rows)
                .map(|r| {
                    if r % 7 == 3 {
                        -100
                    } else {
                        rng.random_range(0..vocab as i32)
                    }
                })
                .collect();
            let wg = g.weight(w.clone(), vocab, dim).unwrap();
            let wc = c.weight(w.clone(), vocab, dim).unwrap();
            let hg = g.buf(h.clone()).unwrap();
            let tol = match base {
                BaseDtype::F32 => F32,
                BaseDtype::Bf16 => BF16,
            };
            // Every row labelled: the path that gathers no rows.
            let all: Vec<i32> = targets.iter().map(|&t| t.max(0)).collect();
            let cases = [
                (CeTargets::Labels(&all), Some(0.5)),
                (CeTargets::Labels(&targets), Some(0.25)),
                (CeTargets::Labels(&targets), None),
                (
                    CeTargets::Sample {
                        mask: &targets,
                        seed: 77,
                    },
                    Some(1.0),
                ),
                (
                    CeTargets::Sample {
                        mask: &targets,
                        seed: 78,
                    },
                    Some(1.0),
                ),
            ];
            for (t, scale) in cases {
                let want = c.classifier(&h, &wc, rows, dim, vocab, t, scale).unwrap();
                let got = g.classifier(&hg, &wg, rows, dim, vocab, t, scale).unwrap();
                let same: Vec<bool> = got
                    .labels
                    .iter()
                    .zip(&want.labels)
                    .map(|(a, b)| a == b || (*a < 0 && *b < 0))
                    .collect();
                let differing = same.iter().filter(|s| !**s).count();
                assert!(differing <= 1, "{base:?} {t:?}: {differing} labels differ");
                let keep = |x: &[f32], width: usize| -> Vec<f32> {
                    x.chunks(width)
                        .zip(&same)
                        .filter(|(_, s)| **s)
                        .flat_map(|(r, _)| r.iter().copied())
                        .collect()
                };
                let what = format!("classifier {base:?} {t:?} {scale:?}");
                close(
                    &format!("{what} losses"),
                    &keep(&got.losses, 1),
                    &keep(&want.losses, 1),
                    tol,
                );
                match (got.dhidden, want.dhidden) {
                    (Some(dg), Some(dc)) => close(
                        &format!("{what} dhidden"),
                        &keep(&g.to_host(&dg).unwrap(), dim),
                        &keep(&dc, dim),
                        tol,
                    ),
                    (None, None) => {}
                    _ => panic!("{what}: one side returned no gradient"),
                }
            }
        }
    }
}

/// Segments with padding gaps between some of them and none between others (runs to
/// merge), lengths below, at and above the 32-row tile; and the rows they span.
fn gappy_segments() -> (Vec<Segment>, usize) {
    let lens = [37, 5, 64, 1, 33, 90, 12, 31, 48];
    let gaps = [0, 3, 0, 7, 2, 0, 5, 1, 4];
    let mut segs = Vec::new();
    let mut p = 0;
    for (len, gap) in lens.into_iter().zip(gaps) {
        segs.push(Segment { start: p, len });
        p += len + gap;
    }
    (segs, p)
}

/// The relative error of what the device added to `prior` against what the CPU added
/// (`got`, `want`: both `out += op` from `prior`), printed as well: the op's own error,
/// undiluted by the prior.
fn increment_err(what: &str, prior: &[f32], got: &[f32], want: &[f32]) -> f64 {
    let d = |v: &[f32]| v.iter().zip(prior).map(|(a, b)| a - b).collect::<Vec<_>>();
    let e = rel_err(&d(got), &d(want));
    eprintln!("{what}: increment relative error {e:.2e}");
    e
}

#[test]
fn curvature_primitives_match_cpu() {
    let (gappy, gappy_rows) = gappy_segments();
    let long = vec![Segment { start: 3, len: 700 }];
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for base in [BaseDtype::F32, BaseDtype::Bf16] {
        // f32 engine: 3xTF32 on tensor cores; bf16 engine: single tf32.
        let tol = if base == BaseDtype::F32 { F32 } else { TF32 };
        for g in devices_with(base) {
            let p = Pair {
                g: &g,
                c: CpuBackend::new(2),
            };
            let c = &p.c;
            let tag = |what: &str| format!("{what} ({}, {})", g.describe(), base.name());
            // Cross factors: tails everywhere (70, 130, 13, 270 are not multiples of the
            // tiles or of 4), a narrow side (256 x 32 tiles) on either side, alpha != 1.
            for (dx, dy, segs, rows) in [
                (70, 130, &gappy, gappy_rows),
                (260, 72, &gappy, gappy_rows),
                (300, 20, &gappy, gappy_rows),
                (13, 270, &gappy, gappy_rows),
                (300, 20, &long, 703),
            ] {
                let (x, y) = (rnd(&mut rng, rows * dx), rnd(&mut rng, rows * dy));
                let prior = rnd(&mut rng, dx * dy);
                let (mut oc, mut og) = (prior.clone(), p.up(&prior));
                c.gram_accumulate(&x, dx, &y, dy, segs, 0.7, &mut oc)
                    .unwrap();
                g.gram_accumulate(&p.up(&x), dx, &p.up(&y), dy, segs, 0.7, &mut og)
                    .unwrap();
                let got = p.down(&og);
                let what = tag(&format!("gram {dx}x{dy}, {rows} rows"));
                assert!(increment_err(&what, &prior, &got, &oc) < tol, "{what}");
                close(&what, &got, &oc, tol);
            }
            // Symmetric factors (upper tiles, then mirrored), from a symmetric prior; the
            // long run splits its rows across blocks.
            for (dx, segs, rows) in [
                (130, &gappy, gappy_rows),
                (20, &gappy, gappy_rows),
                (130, &long, 703),
            ] {
                let x = rnd(&mut rng, rows * dx);
                let r = rnd(&mut rng, dx * dx);
                let prior: Vec<f32> = (0..dx * dx)
                    .map(|i| r[(i / dx).min(i % dx) * dx + (i / dx).max(i % dx)])
                    .collect();
                let xg = p.up(&x);
                let (mut oc, mut og) = (prior.clone(), p.up(&prior));
                c.gram_accumulate(&x, dx, &x, dx, segs, 1.3, &mut oc)
                    .unwrap();
                g.gram_accumulate(&xg, dx, &xg, dx, segs, 1.3, &mut og)
                    .unwrap();
                let got = p.down(&og);
                let what = tag(&format!("gram {dx}x{dx} symmetric, {rows} rows"));
                assert!(increment_err(&what, &prior, &got, &oc) < tol, "{what}");
                close(&what, &got, &oc, tol);
                assert!(
                    (0..dx * dx).all(|i| got[i] == got[(i % dx) * dx + i / dx]),
                    "{what}: not symmetric"
                );
                if segs.len() == 1 {
                    // split rows, partials reduced in order: the same bits every time
                    let mut again = p.up(&prior);
                    g.gram_accumulate(&xg, dx, &xg, dx, segs, 1.3, &mut again)
                        .unwrap();
                    assert_eq!(p.down(&again), got, "{what}: not deterministic");
                }
            }
            let one = vec![Segment { start: 2, len: 70 }];
            // Per-sample squaring: A's orientation (out (r, d)) and B's (out (d, r)) at
            // r 1, 8, 16, 32, 64; many sequences (groups reduced in order) and one.
            for (r, d, a_side, segs, rows) in [
                (8, 300, true, &gappy, gappy_rows),
                (1, 33, true, &gappy, gappy_rows),
                (32, 40, true, &gappy, gappy_rows),
                (64, 70, true, &gappy, gappy_rows),
                (64, 130, false, &gappy, gappy_rows),
                (16, 70, false, &one, 72),
            ] {
                let (narrow, wide) = (rnd(&mut rng, rows * r), rnd(&mut rng, rows * d));
                let prior: Vec<f32> = rnd(&mut rng, r * d).iter().map(|v| v.abs()).collect();
                let (mut oc, mut og) = (prior.clone(), p.up(&prior));
                let (ng, wg) = (p.up(&narrow), p.up(&wide));
                if a_side {
                    c.sq_grad_accumulate(&narrow, r, &wide, d, segs, 0.5, &mut oc)
                        .unwrap();
                    g.sq_grad_accumulate(&ng, r, &wg, d, segs, 0.5, &mut og)
                        .unwrap();
                } else {
                    c.sq_grad_accumulate(&wide, d, &narrow, r, segs, 2.0, &mut oc)
                        .unwrap();
                    g.sq_grad_accumulate(&wg, d, &ng, r, segs, 2.0, &mut og)
                        .unwrap();
                }
                let got = p.down(&og);
                let what = tag(&format!(
                    "per-sample squaring r {r}, d {d} ({}), {} sequences",
                    if a_side { "A" } else { "B" },
                    segs.len()
                ));
                assert!(increment_err(&what, &prior, &got, &oc) < tol, "{what}");
                close(&what, &got, &oc, tol);
                if r == 64 && !a_side {
                    // sequence groups reduced in order: the same bits every time
                    let mut again = p.up(&prior);
                    g.sq_grad_accumulate(&wg, d, &ng, r, segs, 2.0, &mut again)
                        .unwrap();
                    assert_eq!(p.down(&again), got, "{what}: not deterministic");
                }
            }
            let (x, dx) = (rnd(&mut rng, gappy_rows * 70), 70);
            for mean in [false, true] {
                let want = c.segment_sum(&x, dx, &gappy, mean).unwrap();
                let got = g.segment_sum(&p.up(&x), dx, &gappy, mean).unwrap();
                close("segment sum", &p.down(&got), &want, F32);
            }
        }
    }
}

/// Runs of adjacent segments (what `GramGemm::Cublas` makes one GEMM of): a segment starts
/// one unless the one before ended where it starts.
fn runs_of(segments: &[Segment]) -> usize {
    1 + segments
        .windows(2)
        .filter(|w| w[0].start + w[0].len != w[1].start)
        .count()
}

/// The Grams of two bf16 operands on cuBLAS (`GramGemm::Cublas`) against the CPU's Grams of
/// the same values, at the f32 bound: bf16 x bf16 products are exact in f32, so only the
/// order of the f32 sums differs. One GEMM per run of adjacent segments (and per row panel
/// of a symmetric factor: 2100 wide is two, the second starting at row and column 2048),
/// no Gram kernel launched; f32 operands, a bf16 one beside an f32 one, and a side of 32
/// or less keep the kernel. Symmetric factors come out symmetric from a symmetric prior.
#[test]
fn bf16_grams_on_cublas_match_cpu() {
    let (gappy, gappy_rows) = gappy_segments();
    let runs = runs_of(&gappy);
    assert_eq!(runs, 6);
    let two = vec![Segment { start: 1, len: 9 }, Segment { start: 12, len: 6 }];
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for g in devices() {
        g.set_gram_gemm(GramGemm::Cublas);
        let c = CpuBackend::new(2);
        let tag = |what: &str| format!("{what} ({})", g.describe());
        // (dx, dy: None for symmetric, segments, rows, runs, panels)
        for (dx, dy, segs, rows, nruns, npanels) in [
            (70, Some(130), &gappy, gappy_rows, runs, 1),
            (260, Some(72), &gappy, gappy_rows, runs, 1),
            (2100, Some(40), &two, 18, 2, 1),
            (130, None, &gappy, gappy_rows, runs, 1),
            (2100, None, &two, 18, 2, 2),
        ] {
            let (xg, x) = bf16_act(&g, &mut rng, rows, dx);
            let (yg, y, dy) = match dy {
                Some(dy) => {
                    let (yg, y) = bf16_act(&g, &mut rng, rows, dy);
                    (Some(yg), y, dy)
                }
                None => (None, x.clone(), dx),
            };
            let r = rnd(&mut rng, dx * dy);
            // A symmetric factor's prior is symmetric, as the estimators keep it.
            let prior: Vec<f32> = match yg {
                Some(_) => r,
                None => (0..dx * dx)
                    .map(|i| r[(i / dx).min(i % dx) * dx + (i / dx).max(i % dx)])
                    .collect(),
            };
            let (mut oc, mut og) = (prior.clone(), g.buf(prior.clone()).unwrap());
            c.gram_accumulate(&x, dx, &y, dy, segs, 0.7, &mut oc)
                .unwrap();
            let before = g.stats();
            let ((), times) = timed(&g, || {
                g.gram_accumulate(&xg, dx, yg.as_ref().unwrap_or(&xg), dy, segs, 0.7, &mut og)
                    .unwrap()
            });
            let spent = g.stats().since(&before);
            let names = kernel_names(&times);
            let what = tag(&format!("cuBLAS gram {dx}x{dy}, {rows} rows"));
            assert_eq!(spent.gemms, (nruns * npanels) as u64, "{what}");
            assert!(
                !names.iter().any(|n| n.starts_with("gram_")),
                "{what}: {names:?}"
            );
            let got = g.to_host(&og).unwrap();
            assert!(increment_err(&what, &prior, &got, &oc) < F32, "{what}");
            close(&what, &got, &oc, F32);
            if npanels == 2 {
                // Rows [0, 2048) against columns [0, 2100), then [2048, 2100) against
                // [2048, 2100), each per run (cuBLAS's m x n x k: columns, rows, positions).
                for shape in [
                    "NT 2100x2048x9",
                    "NT 52x52x9",
                    "NT 2100x2048x6",
                    "NT 52x52x6",
                ] {
                    assert!(
                        names.iter().any(|n| n.ends_with(shape)),
                        "{what}: {names:?}"
                    );
                }
            }
            if yg.is_none() {
                assert!(
                    names.iter().any(|n| n.starts_with("mirror_upper")),
                    "{what}: {names:?}"
                );
                assert!(
                    (0..dx * dx).all(|i| got[i] == got[(i % dx) * dx + i / dx]),
                    "{what}: not symmetric"
                );
            }
        }
        // What the kernel keeps: f32 operands (the f32 gradients), a bf16 operand beside an
        // f32 one, and two bf16 operands with a side of 32 or less (the 256 x 32 tiles).
        let f = g.buf(rnd(&mut rng, gappy_rows * 130)).unwrap();
        let (b, _) = bf16_act(&g, &mut rng, gappy_rows, 130);
        let (narrow, _) = bf16_act(&g, &mut rng, gappy_rows, 20);
        for (what, x, dx, y, dy, entry) in [
            ("f32 x f32", &f, 130, &f, 130, "gram_tf32_128x128_f32_f32"),
            ("bf16 x f32", &b, 130, &f, 130, "gram_tf32_128x128_bf16_f32"),
            (
                "bf16, 20 wide",
                &narrow,
                20,
                &narrow,
                20,
                "gram_tf32_256x32_",
            ),
        ] {
            let mut out = g.buf(vec![0.0; dx * dy]).unwrap();
            let before = g.stats();
            let ((), times) = timed(&g, || {
                g.gram_accumulate(x, dx, y, dy, &gappy, 1.0, &mut out)
                    .unwrap()
            });
            let names = kernel_names(&times);
            assert_eq!(g.stats().since(&before).gemms, 0, "{what}: {names:?}");
            assert!(
                names.iter().any(|n| n.starts_with(entry)),
                "{what}: {names:?}"
            );
        }
    }
}

/// `x` in tf32 (10 fraction bits), rounded to nearest with ties away from zero as PTX's
/// `cvt.rna.tf32.f32`, or truncated as the tensor cores read an unrounded operand.
fn tf32(x: &[f32], nearest: bool) -> Vec<f32> {
    x.iter()
        .map(|&v| {
            let b = v.to_bits();
            let b = if nearest && v.is_finite() {
                b.wrapping_add(0x1000)
            } else {
                b
            };
            f32::from_bits(b & 0xffff_e000)
        })
        .collect()
}

/// `product` of raw f32 operands gives the bits it gives of the operands rounded to tf32
/// to nearest on the host, and not those of the operands truncated.
fn assert_rounds_to_nearest(
    what: &str,
    a: &[f32],
    b: &[f32],
    product: impl Fn(&[f32], &[f32]) -> Vec<f32>,
) {
    let raw = product(a, b);
    let differ = |o: Vec<f32>| {
        raw.iter()
            .zip(&o)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count()
    };
    let near = differ(product(&tf32(a, true), &tf32(b, true)));
    assert_eq!(
        near, 0,
        "{what}: {near} elements differ from nearest-rounded operands"
    );
    let cut = differ(product(&tf32(a, false), &tf32(b, false)));
    assert!(cut > 0, "{what}: the same as with truncated operands");
}

/// With bf16 base weights the Gram and squaring kernels round their f32 operands to tf32
/// to nearest (ties away), whichever tile shape, copy width (16-byte chunks or single
/// values) and rounding place (shared memory or fragment) they take: raw operands give
/// the same bits as operands rounded beforehand on the host, and not those of operands
/// truncated, which is what the tensor cores would read unrounded.
#[test]
fn tf32_products_round_f32_operands_to_nearest() {
    let (gappy, gappy_rows) = gappy_segments();
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    for g in devices_with(BaseDtype::Bf16) {
        let zeros = |n: usize| g.buf(vec![0.0; n]).unwrap();
        let up = |v: &[f32]| g.buf(v.to_vec()).unwrap();
        let down = |b: &Act| g.to_host(b).unwrap();
        // (dx, dy): 128 x 128 tiles with 16-byte copies (132, 260) and single ones (130
        // is not a multiple of 4); 256 x 32 tiles (300 x 20 and, narrow side first, 20 x 300).
        for (dx, dy) in [(132, 260), (130, 68), (300, 20), (20, 300)] {
            let (x, y) = (
                rnd(&mut rng, gappy_rows * dx),
                rnd(&mut rng, gappy_rows * dy),
            );
            let gram = |x: &[f32], y: &[f32]| {
                let mut out = zeros(dx * dy);
                g.gram_accumulate(&up(x), dx, &up(y), dy, &gappy, 0.7, &mut out)
                    .unwrap();
                down(&out)
            };
            let what = format!("gram {dx}x{dy} ({})", g.describe());
            assert_rounds_to_nearest(&what, &x, &y, gram);
        }
        // Per-sample squaring: the rank side rounded per fragment (r 8) or in shared
        // memory (r 16, 64), the wide side per fragment, with 16-byte copies (132) or not (130).
        for (r, d) in [(8, 132), (16, 130), (64, 132)] {
            let (narrow, wide) = (rnd(&mut rng, gappy_rows * r), rnd(&mut rng, gappy_rows * d));
            let sq = |n: &[f32], w: &[f32]| {
                let mut out = zeros(r * d);
                g.sq_grad_accumulate(&up(n), r, &up(w), d, &gappy, 0.5, &mut out)
                    .unwrap();
                down(&out)
            };
            let what = format!("per-sample squaring r {r}, d {d} ({})", g.describe());
            assert_rounds_to_nearest(&what, &narrow, &wide, sq);
        }
    }
}

/// A curvature pass (diag, kfac-tri) and two training steps on the tiny model against the
/// CPU: with f32 base weights on the default path, and with bf16 ones with the projection
/// groups on each path (`ProjectionGemm`: hybrid, fused, the cuBLAS sequence, folded).
#[test]
fn curvature_pass_and_training_step_match_cpu() {
    for g in devices_with(BaseDtype::F32) {
        pass_and_step_match_cpu(&g);
    }
    for g in devices() {
        let gemms = ProjectionGemm::ALL.map(|path| {
            g.set_projection_gemm(path);
            pass_and_step_match_cpu(&g)
        });
        // Which path ran, by cuBLAS calls beyond the fused path's (the rest of the step, the
        // classifier, calls it on every path), per adapted projection (7 in each of 2
        // layers) in each of two steps: the hybrid path its base products (1 forward, 1
        // backward: 56 calls), the sequence those and its LoRA products (3 forward, 5
        // backward: 224 calls); the folded path the base products and per adapted
        // projection the update, gA and dB, and per group (4 in a layer) u, dA and dx's
        // LoRA product (188 calls: the sequence's u, dA and dx products for each of q, k, v,
        // and for each of gate and up, are one each here).
        let [hybrid, fused, cublas, folded] = gemms;
        assert!(
            hybrid >= fused + 56 && cublas >= fused + 224 && cublas > hybrid,
            "{gemms:?}"
        );
        assert_eq!(cublas - folded, 36, "{gemms:?}");
        assert!(folded >= fused + 188, "{gemms:?}");
    }
}

/// The KFAC estimate (expand) on the tiny model with its bf16 Grams on cuBLAS. Per layer
/// and batch, 5 Grams read two bf16 operands (`bf16_activations.rs` counts them): each is
/// now one GEMM per run of adjacent sequences (the tiny dims are one panel) and no Gram
/// kernel. Everything before the Grams runs as on the kernel path, so every factor matches
/// that path's at the f32 bound (the same exact products, summed in another order), and
/// the CPU's at the bound of `pass_and_step_match_cpu`, on the weights as stored.
#[test]
fn kfac_estimate_with_cublas_grams_matches_cpu() {
    let t = tiny();
    let c = CpuBackend::new(2);
    let spec = Spec {
        scheme: Scheme::Kfac,
        fisher: Fisher::Empirical,
        approx: KfacApprox::Expand,
        seed: 0,
    };
    let (mut nbatches, mut runs) = (0, 0);
    for b in batches(&t.examples, 3) {
        nbatches += 1;
        runs += runs_of(&b.segments);
    }
    let grams = 5 * t.loaded.cfg.num_layers;
    for g in devices() {
        let who = g.describe();
        let tol = bound(Some(g.base_dtype()));
        let m = model::load(&fixture("tiny-gqa/model"), None).unwrap();
        let cpu_model = Llama::new(&c, m.cfg.clone(), stored_weights(&g, m.weights)).unwrap();
        let cc = estimate(&c, &cpu_model, &t.adapter, &t.examples, 3, spec, || {}).unwrap();
        let model = tiny_model(&g);
        let lora = t.adapter.map(|v| g.buf(v.clone())).unwrap();
        let on = |path| {
            g.set_gram_gemm(path);
            let before = g.stats();
            let (cur, times) = timed(&g, || {
                estimate(&g, &model, &lora, &t.examples, 3, spec, || {}).unwrap()
            });
            let gemms = g.stats().since(&before).gemms;
            let bf16_grams: u64 = times
                .iter()
                .filter(|k| k.name.starts_with("gram_bf16_"))
                .map(|k| k.calls)
                .sum();
            (cur.kfac.expect("a kfac estimate"), gemms, bf16_grams)
        };
        let (kernel, kernel_gemms, kernel_grams) = on(GramGemm::HandWritten);
        let (cublas, cublas_gemms, cublas_grams) = on(GramGemm::Cublas);
        g.set_gram_gemm(GramGemm::default());
        assert_eq!(kernel_grams, (grams * nbatches) as u64, "{who}");
        assert_eq!(cublas_grams, 0, "{who}");
        assert_eq!(cublas_gemms - kernel_gemms, (grams * runs) as u64, "{who}");
        let cpu = cc.kfac.as_ref().unwrap();
        let modules = t.adapter.modules.len();
        assert_eq!(
            (cublas.len(), kernel.len(), cpu.len()),
            (modules, modules, modules)
        );
        for ((x, y), z) in cublas.iter().zip(&kernel).zip(cpu) {
            for (what, got, path, want) in [
                ("C_A", &x.a_in, &y.a_in, &z.a_in),
                ("G_A", &x.a_out, &y.a_out, &z.a_out),
                ("C_B", &x.b_in, &y.b_in, &z.b_in),
                ("G_B", &x.b_out, &y.b_out, &z.b_out),
            ] {
                close(
                    &format!("{who}: cuBLAS Grams, kfac {what} against the kernel's"),
                    got,
                    path,
                    F32,
                );
                close(&format!("{who}: cuBLAS Grams, kfac {what}"), got, want, tol);
            }
        }
    }
}

/// The base weights as `g` stores them: the matrices (embeddings, projections, head)
/// rounded to bf16 with bf16 base weights, as `CudaBackend::weight` rounds them; the norms
/// stay f32 on every device. The CPU runs the same model then, so what a comparison sees
/// is the device's arithmetic and its bf16 activations, not the rounding of the weights.
fn stored_weights(g: &CudaBackend, mut w: HostWeights) -> HostWeights {
    if g.base_dtype() == BaseDtype::Bf16 {
        let round = |v: &mut Vec<f32>| {
            for x in v.iter_mut() {
                *x = half::bf16::from_f32(*x).to_f32();
            }
        };
        round(&mut w.embed);
        w.lm_head.iter_mut().for_each(round);
        for l in &mut w.layers {
            l.proj.iter_mut().for_each(round);
        }
    }
    w
}

/// Checks the passes and the steps on `g` against the CPU running the model as `g` stores
/// it (`stored_weights`); returns the cuBLAS calls of the two steps.
///
/// The bound is the model's against f32 references (`common::bound`: 1e-4 with f32 base
/// weights, 2e-2 with bf16 ones, the bound at which `reference_tiny` holds the simulator's
/// gradients and `curvature_reference` its curvature), for every factor of both curvature
/// schemes and for what two training steps change in each LoRA tensor. The steps run with
/// Adam's `eps` (1.0) far above the gradients' elements and without clipping, so that a
/// step is nearly `lr g` and its error that of the gradient. At the default `eps` (1e-8)
/// a step is about `lr sign(g)`: an element whose gradient is near zero flips its sign
/// under any rounding (even f32 base weights moved one element of the tiny model by 2 lr,
/// 1e-3 of a tensor), and a gradient wrong by any positive factor would pass unseen, as it
/// would under clipping to a norm. (A device gradient 5 % too large fails here.)
fn pass_and_step_match_cpu(g: &CudaBackend) -> u64 {
    let who = g.describe();
    let tol = bound(Some(g.base_dtype()));
    let t = tiny();
    let c = CpuBackend::new(2);
    let m = model::load(&fixture("tiny-gqa/model"), None).unwrap();
    let stored = stored_weights(
        g,
        model::load(&fixture("tiny-gqa/model"), None)
            .unwrap()
            .weights,
    );
    let cpu_model = Llama::new(&c, m.cfg.clone(), stored).unwrap();
    let gpu_model = Llama::new(g, m.cfg, m.weights).unwrap();
    let lora_g = t.adapter.map(|v| g.buf(v.clone())).unwrap();
    let modules = t.adapter.modules.len();
    for scheme in [Scheme::Diag, Scheme::KfacTri] {
        let spec = Spec {
            scheme,
            fisher: Fisher::Empirical,
            approx: KfacApprox::Expand,
            seed: 0,
        };
        let cc = estimate(&c, &cpu_model, &t.adapter, &t.examples, 3, spec, || {}).unwrap();
        let cg = estimate(g, &gpu_model, &lora_g, &t.examples, 3, spec, || {}).unwrap();
        match scheme {
            Scheme::Diag => {
                let (a, b) = (cc.diag.as_ref().unwrap(), cg.diag.as_ref().unwrap());
                let (a, b) = (a.named_tensors(), b.named_tensors());
                assert_eq!((a.len(), b.len()), (2 * modules, 2 * modules), "{who}");
                for ((n, _, x), (_, _, y)) in b.into_iter().zip(a) {
                    close(&format!("{who}: diag {n}"), x, y, tol);
                }
            }
            _ => {
                let (a, b) = (cc.kfac.as_ref().unwrap(), cg.kfac.as_ref().unwrap());
                assert_eq!((a.len(), b.len()), (modules, modules), "{who}");
                for (i, (x, y)) in b.iter().zip(a).enumerate() {
                    let (xc, yc) = (x.cross.as_ref().unwrap(), y.cross.as_ref().unwrap());
                    for (what, got, want) in [
                        ("C_A", &x.a_in, &y.a_in),
                        ("G_A", &x.a_out, &y.a_out),
                        ("C_B", &x.b_in, &y.b_in),
                        ("G_B", &x.b_out, &y.b_out),
                        ("C_AB", &xc.0, &yc.0),
                        ("G_AB", &xc.1, &yc.1),
                    ] {
                        close(
                            &format!("{who}: kfac-tri module {i} {what}"),
                            got,
                            want,
                            tol,
                        );
                    }
                }
            }
        }
    }
    let cfg = TrainConfig {
        steps: 2,
        batch_size: 3,
        lr: 0.1,
        eps: 1.0,
        clip: 0.0,
        ..TrainConfig::default()
    };
    let opts = SessionOptions {
        quiet: true,
        ..SessionOptions::default()
    };
    let rc = session::run(&c, &cpu_model, &t.examples, &cfg, None, &t.adapter, &opts).unwrap();
    let before = g.stats();
    let rg = session::run(g, &gpu_model, &t.examples, &cfg, None, &t.adapter, &opts).unwrap();
    let gemms = g.stats().since(&before).gemms;
    let (got, want, init) = (
        rg.lora.named_tensors(),
        rc.lora.named_tensors(),
        t.adapter.named_tensors(),
    );
    assert_eq!((got.len(), want.len()), (2 * modules, 2 * modules), "{who}");
    let change =
        |w: &[f32], w0: &[f32]| -> Vec<f32> { w.iter().zip(w0).map(|(a, b)| a - b).collect() };
    for (((n, _, x), (_, _, y)), (_, _, w0)) in got.into_iter().zip(want).zip(init) {
        close(
            &format!("{who}: trained {n}, its change"),
            &change(x, w0),
            &change(y, w0),
            tol,
        );
    }
    for (step, (a, b)) in rg.metrics.iter().zip(&rc.metrics).enumerate() {
        let e = (a.loss - b.loss).abs() / b.loss.abs();
        assert!(
            e < tol,
            "{who}: loss of step {step}: {} against the CPU's {}",
            a.loss,
            b.loss
        );
    }
    assert_eq!((rg.metrics.len(), rc.metrics.len()), (2, 2), "{who}");
    gemms
}

/// A training step waits for the device a fixed number of times, whatever the number of
/// LoRA tensors: once per micro-batch (its losses), once for the gradient norms together
/// with the penalty's dot products, once for the finiteness check after the update. A
/// change that reads back per tensor again (the tiny model has 28 tensors) fails here.
/// From the second step on a step frees what it allocates (activations and scratch come
/// from the stream-ordered pool on a GPU) and allocates the same every step.
#[test]
fn training_step_waits_for_the_device_a_fixed_number_of_times() {
    let g = sim(BaseDtype::Bf16);
    let t = tiny();
    let c = CpuBackend::new(2);
    let cpu_model = tiny_model(&c);
    let m = model::load(&fixture("tiny-gqa/model"), None).unwrap();
    let model = Llama::new(&g, m.cfg, m.weights).unwrap();
    let curv = |scheme| {
        let spec = Spec {
            scheme,
            fisher: Fisher::Empirical,
            approx: KfacApprox::Expand,
            seed: 0,
        };
        estimate(&c, &cpu_model, &t.adapter, &t.examples, 3, spec, || {}).unwrap()
    };
    let cases = [
        (None, 1),
        (Some(Scheme::Diag), 1),
        (Some(Scheme::KfacTri), 2),
    ];
    for (scheme, grad_accum) in cases {
        let cfg = TrainConfig {
            steps: 3,
            batch_size: 2,
            grad_accum,
            lambda: 1.0,
            delta: 1e-3,
            ..TrainConfig::default()
        };
        let pen = scheme.map(|s| Penalty::new(&g, curv(s), cfg.delta).unwrap());
        let mut state = TrainState::fresh(&g, &t.adapter).unwrap();
        let mut last = g.stats();
        let mut steps = Vec::new();
        train(
            &g,
            &model,
            &t.examples,
            &cfg,
            pen.as_ref(),
            &mut state,
            3,
            |_, _| {
                let now = g.stats();
                steps.push(now.since(&last));
                last = now;
                Ok(())
            },
        )
        .unwrap();
        let case = format!("{scheme:?}, grad_accum {grad_accum}");
        for (i, s) in steps.iter().enumerate() {
            assert_eq!(
                s.host_syncs(),
                grad_accum as u64 + 2,
                "{case}, step {}: {s}",
                i + 1
            );
        }
        // Host-to-device copies are a micro-batch's inputs (token ids, labels, the rows
        // the classifier reads): a few per micro-batch, none per layer or launch (the LoRA
        // GEMM's problems go as a kernel parameter, a Gram over all rows makes its own
        // tiles). A table copied per launch would add more than ten per layer.
        for (i, s) in steps.iter().enumerate() {
            assert!(
                s.htod <= 8 * grad_accum as u64,
                "{case}, step {}: {s}",
                i + 1
            );
        }
        // Bytes vary with the batch's sequence lengths; the counts do not.
        for s in &steps[1..] {
            assert_eq!(s.allocs, s.frees, "{case}: {s}");
            let counts = |s: &RuntimeStats| (s.allocs, s.launches, s.gemms, s.htod, s.dtod);
            assert_eq!(counts(s), counts(&steps[1]), "{case}: steps differ");
        }
    }
}

/// `--op-times` on a device: every kernel launch and GEMM of a curvature pass is timed
/// once, under its kernel's name and grid (cuBLAS calls under their types and shape), with a device
/// time that is finite and not negative; work after timing stops is not counted.
#[test]
fn kernel_times_count_every_launch_and_gemm() {
    for g in devices() {
        let t = tiny();
        let m = model::load(&fixture("tiny-gqa/model"), None).unwrap();
        let model = Llama::new(&g, m.cfg, m.weights).unwrap();
        let lora = t.adapter.map(|v| g.buf(v.clone())).unwrap();
        let spec = Spec {
            scheme: Scheme::KfacTri,
            fisher: Fisher::Empirical,
            approx: KfacApprox::Expand,
            seed: 0,
        };
        let before = g.stats();
        g.time_kernels(true);
        estimate(&g, &model, &lora, &t.examples, 3, spec, || {}).unwrap();
        let done = g.stats().since(&before);
        g.time_kernels(false);
        estimate(&g, &model, &lora, &t.examples, 3, spec, || {}).unwrap();
        let times = g.kernel_times().unwrap();
        let calls = |pick: &dyn Fn(&str) -> bool| -> u64 {
            times
                .iter()
                .filter(|k| pick(&k.name))
                .map(|k| k.calls)
                .sum()
        };
        let gemm = |n: &str| n.starts_with("cuBLAS ");
        assert!(done.launches > 0 && done.gemms > 0, "{done}");
        assert_eq!(calls(&|n| !gemm(n)), done.launches, "{times:?}");
        assert_eq!(calls(&gemm), done.gemms, "{times:?}");
        // Kernels keyed by their grid; the projections' base GEMMs (the default path's
        // cuBLAS sequence, bf16 base weights) by their types and shape.
        assert!(
            times
                .iter()
                .any(|k| k.name.starts_with("flash_fwd_64_bf16 [")),
            "{times:?}"
        );
        assert!(
            times
                .iter()
                .any(|k| k.name.starts_with("cuBLAS bf16·bf16→f32 TN ")),
            "{times:?}"
        );
        assert!(
            times.iter().all(|k| k.ms.is_finite() && k.ms >= 0.0),
            "{times:?}"
        );
        assert!(times.iter().map(|k| k.ms).sum::<f64>() > 0.0, "{times:?}");
        assert!(
            times.windows(2).all(|w| w[0].ms >= w[1].ms),
            "not the longest first: {times:?}"
        );
    }
}

/// The device memory a backend holds: each allocation counted while it lives, its peak
/// kept until `reset_peak`, and a training step's scratch given back by its end.
#[test]
fn device_memory_is_counted_while_held() {
    for g in devices() {
        let start = g.memory();
        let a = g.zeros(1000).unwrap();
        let b = g.zeros(250).unwrap();
        assert_eq!(g.memory().live, start.live + 5000, "{:?}", g.memory());
        drop(a);
        assert_eq!(g.memory().live, start.live + 1000);
        assert!(g.memory().peak >= start.live + 5000);
        g.reset_peak();
        assert_eq!(g.memory().peak, start.live + 1000);
        drop(b);
        assert_eq!(g.memory().live, start.live);

        let t = tiny();
        let m = model::load(&fixture("tiny-gqa/model"), None).unwrap();
        let model = Llama::new(&g, m.cfg, m.weights).unwrap();
        let lora = t.adapter.map(|v| g.buf(v.clone())).unwrap();
        let mut grads = lora.map_sized(|n| g.zeros(n)).unwrap();
        let batch = lalora_engine::data::Batch::new(&t.examples.iter().take(2).collect::<Vec<_>>());
        let held = g.memory().live;
        g.reset_peak();
        lalora_engine::train::accumulate_gradients(&g, &model, &lora, &batch, 1.0, &mut grads)
            .unwrap();
        let after = g.memory();
        assert_eq!(after.live, held, "a step's scratch is freed by its end");
        assert!(
            after.peak > held,
            "activations are held during the step: {after:?}"
        );
    }
}
