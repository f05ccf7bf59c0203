//! With bf16 base weights the CUDA backend stores the activations the matmuls read as
//! bf16 (`Act::Bf16`): the normed hidden states and the SwiGLU output, and the outputs of
//! the projections that only kernels read (q/k/v: RoPE and attention; gate/up: SwiGLU),
//! and the gradients of the gate/up outputs (read only by that group's backward).
//! Every op that reads such an activation, against its CPU twin fed the very same
//! (bf16-representable) values, on the simulator (and the kernels that read the
//! projections' outputs against their f32-input twins on the same values, bit for bit): the products through bf16 base weights, and those on tf32 tensor cores
//! (the Gram and per-sample-square kernels of the bf16 engine, which round an f32 operand
//! to 10 bits), to the bf16 bound; the f32 ones (LoRA) to the f32 bound, since a bf16
//! input is exact in f32 (and in tf32) and only the other operand's rounding differs.
//! Shapes have tails: rows not a multiple of the tiles, widths not a multiple of the
//! 8-element packs.

mod common;

use common::*;
use half::bf16;
use lalora_engine::backend::cpu::CpuBackend;
use lalora_engine::backend::cuda::runtime::DType;
use lalora_engine::backend::cuda::{Act, BaseDtype, CudaBackend};
use lalora_engine::backend::group::{Feeds, GradFeeds, LoraBwd, LoraGroup, ProjBwd, ProjFwd};
use lalora_engine::backend::{
    AttnSaved, AttnShape, Backend, CeTargets, LoraDims, RopeTable, Segment,
};
use lalora_engine::curvature::{Fisher, KfacApprox, Scheme, Spec, estimate};
use lalora_engine::model::CachedSeq;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const F32: f64 = 1e-4;
/// Products through bf16 base weights (8-bit mantissas, f32 accumulation).
const BF16: f64 = 1e-2;
/// An f32 result stored as bf16: one rounding to nearest, at most 2^-8 / (1 + 2^-8) =
/// 0.00389 relative per element (bf16 keeps 8 significant bits); the bound 2^-8 leaves
/// 1.5e-5 for the f32 arithmetic before the rounding (another order, fused multiply-adds).
const BF16_STORE: f64 = 1.0 / 256.0;

/// `want` rounded to bf16 (to nearest even), bit for bit.
fn same_rounded(what: &str, got: &[f32], want: &[f32]) {
    let rounded: Vec<f32> = want.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    same_bits(what, got, &rounded);
}

#[test]
fn linear_and_lora_read_bf16_activations() {
    let g = sim(BaseDtype::Bf16);
    let c = CpuBackend::new(2);
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    // d_in 36: whole f32 packs but not whole bf16 ones; m 37: a row tail everywhere.
    let d = LoraDims {
        m: 37,
        d_in: 36,
        r: 8,
        d_out: 27,
        scale: 2.0,
    };
    let (xg, x) = bf16_act(&g, &mut rng, d.m, d.d_in);
    let w = rnd(&mut rng, d.d_out * d.d_in);
    let wg = g.weight(w.clone(), d.d_out, d.d_in).unwrap();
    let w_read: Vec<f32> = w.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    // The device reads the same x; only W's rounding to bf16 differs from the CPU.
    close(
        "linear",
        &g.to_host(&g.linear(&xg, &wg, d.m, d.d_in, d.d_out).unwrap())
            .unwrap(),
        &c.linear(
            &x,
            &c.weight(w, d.d_out, d.d_in).unwrap(),
            d.m,
            d.d_in,
            d.d_out,
        )
        .unwrap(),
        BF16,
    );
    close(
        "linear, W as stored",
        &g.to_host(&g.linear(&xg, &wg, d.m, d.d_in, d.d_out).unwrap())
            .unwrap(),
        &c.linear(
            &x,
            &c.weight(w_read, d.d_out, d.d_in).unwrap(),
            d.m,
            d.d_in,
            d.d_out,
        )
        .unwrap(),
        F32,
    );

    let (a, b) = (rnd(&mut rng, d.r * d.d_in), rnd(&mut rng, d.d_out * d.r));
    let (ag, bg) = (g.buf(a.clone()).unwrap(), g.buf(b.clone()).unwrap());
    let mut yc = rnd(&mut rng, d.m * d.d_out);
    let mut yg = g.buf(yc.clone()).unwrap();
    let uc = c.lora_forward(&x, &a, &b, d, &mut yc).unwrap();
    let ug = g.lora_forward(&xg, &ag, &bg, d, &mut yg).unwrap();
    close("lora forward y", &g.to_host(&yg).unwrap(), &yc, F32);
    close("lora forward u", &g.to_host(&ug).unwrap(), &uc, F32);

    let gr = rnd(&mut rng, d.m * d.d_out);
    let (mut dxc, mut dac, mut dbc) = (
        rnd(&mut rng, d.m * d.d_in),
        rnd(&mut rng, a.len()),
        rnd(&mut rng, b.len()),
    );
    let mut dxg = g.buf(dxc.clone()).unwrap();
    let (mut dag, mut dbg) = (g.buf(dac.clone()).unwrap(), g.buf(dbc.clone()).unwrap());
    let gac = c
        .lora_backward(
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
            &g.buf(gr).unwrap(),
            &xg,
            &ug,
            &ag,
            &bg,
            d,
            &mut dxg,
            Some((&mut dag, &mut dbg)),
        )
        .unwrap();
    close("lora backward gA", &g.to_host(&gag).unwrap(), &gac, F32);
    close("lora backward dx", &g.to_host(&dxg).unwrap(), &dxc, F32);
    close("lora backward dA", &g.to_host(&dag).unwrap(), &dac, F32);
    close("lora backward dB", &g.to_host(&dbg).unwrap(), &dbc, F32);
}

/// `linear_backward` on a bf16 output gradient (how the cuBLAS baseline of a projection
/// group's backward is handed the model's bf16 gradients): the GEMM reads it as stored, so
/// `dx` is bit for bit that of the same values given as f32, which it rounds to bf16
/// exactly.
#[test]
fn linear_backward_reads_a_bf16_gradient_as_stored() {
    let g = sim(BaseDtype::Bf16);
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let (m, k, n) = (37, 40, 24);
    let (dy_bf16, dy_held) = bf16_act(&g, &mut rng, m, n);
    let w = g.weight(rnd(&mut rng, n * k), n, k).unwrap();
    let dy_f32 = g.buf(dy_held).unwrap();
    let run = |dy: &Act| {
        let mut dx = g.zeros(m * k).unwrap();
        g.linear_backward(dy, &w, m, k, n, &mut dx, false).unwrap();
        g.to_host(&dx).unwrap()
    };
    same_bits("linear_backward dx", &run(&dy_bf16), &run(&dy_f32));
}

#[test]
fn projection_groups_read_bf16_activations() {
    let g = sim(BaseDtype::Bf16);
    let c = CpuBackend::new(2);
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    // 130 rows: two row tiles of the 128-row GEMM tile, the second with 2 rows.
    let (m, d_in, r) = (130, 40, 4);
    let l = LoraGroup { r, scale: 0.5 };
    let (xg, x) = bf16_act(&g, &mut rng, m, d_in);
    // Two projections of different widths, the first adapted, the second not.
    let outs = [24, 17];
    let ws: Vec<Vec<f32>> = outs.iter().map(|&n| rnd(&mut rng, n * d_in)).collect();
    let (wgs, wcs): (Vec<_>, Vec<_>) = ws
        .iter()
        .zip(outs)
        .map(|(w, n)| {
            (
                g.weight(w.clone(), n, d_in).unwrap(),
                c.weight(w.clone(), n, d_in).unwrap(),
            )
        })
        .unzip();
    let (a, b) = (rnd(&mut rng, r * d_in), rnd(&mut rng, outs[0] * r));
    let (ag, bg) = (g.buf(a.clone()).unwrap(), g.buf(b.clone()).unwrap());
    // The first feeds kernels (as q/k/v and gate/up do): stored bf16; the second is added
    // to the residual stream (as o and down are): f32.
    let feeds = [Feeds::Kernels, Feeds::Residual];
    let fwd_g = |feeds: [Feeds; 2]| {
        [
            ProjFwd::<CudaBackend> {
                w: &wgs[0],
                d_out: outs[0],
                lora: Some((&ag, &bg)),
                feeds: feeds[0],
                rope: None,
            },
            ProjFwd {
                w: &wgs[1],
                d_out: outs[1],
                lora: None,
                feeds: feeds[1],
                rope: None,
            },
        ]
    };
    let fwd_c = [
        ProjFwd::<CpuBackend> {
            w: &wcs[0],
            d_out: outs[0],
            lora: Some((&a, &b)),
            feeds: feeds[0],
            rope: None,
        },
        ProjFwd {
            w: &wcs[1],
            d_out: outs[1],
            lora: None,
            feeds: feeds[1],
            rope: None,
        },
    ];
    let yg = g.project_group(&xg, m, d_in, l, &fwd_g(feeds)).unwrap();
    let yc = c.project_group(&x, m, d_in, l, &fwd_c).unwrap();
    assert_eq!(yg[0].0.dtype(), DType::Bf16, "a kernel-fed output is bf16");
    assert_eq!(yg[1].0.dtype(), DType::F32, "a residual output stays f32");
    // The bf16 output is the f32 one (same launch, same sums) rounded once.
    let y_f32 = g
        .project_group(&xg, m, d_in, l, &fwd_g([Feeds::Residual; 2]))
        .unwrap();
    same_rounded(
        "group y0 stored bf16",
        &g.to_host(&yg[0].0).unwrap(),
        &g.to_host(&y_f32[0].0).unwrap(),
    );
    for (i, ((y, u), (yw, uw))) in yg.iter().zip(&yc).enumerate() {
        close(&format!("group y{i}"), &g.to_host(y).unwrap(), yw, BF16);
        assert_eq!(u.is_some(), uw.is_some(), "u{i} present");
        if let (Some(u), Some(uw)) = (u, uw) {
            // u = x A^T: x exact in one bf16 piece, A in three: f32 products.
            close(&format!("group u{i}"), &g.to_host(u).unwrap(), uw, F32);
        }
    }

    // The adapted projection's output gradient as the model makes one for gate/up: the
    // SwiGLU backward on bf16 gate and up, stored bf16 (`g0`); its f32 twin on the same
    // values (`g0_f32`, not rounded); the plain projection's gradient f32.
    let (gate_g, gate) = bf16_act(&g, &mut rng, m, outs[0]);
    let (up_g, up) = bf16_act(&g, &mut rng, m, outs[0]);
    let dact = g.buf(rnd(&mut rng, m * outs[0])).unwrap();
    let (g0, _) = g
        .swiglu_backward(&dact, &gate_g, &up_g, GradFeeds::Backward)
        .unwrap();
    assert_eq!(g0.dtype(), DType::Bf16, "dgate is stored as gate is");
    let (gate_f, up_f) = (g.buf(gate).unwrap(), g.buf(up).unwrap());
    let (g0_f32, _) = g
        .swiglu_backward(&dact, &gate_f, &up_f, GradFeeds::Backward)
        .unwrap();
    let gs = [g.to_host(&g0).unwrap(), rnd(&mut rng, m * outs[1])];
    let g1 = g.buf(gs[1].clone()).unwrap();
    // The values g0 holds, stored f32.
    let g0_held = g.buf(gs[0].clone()).unwrap();
    let (da0, db0) = (rnd(&mut rng, a.len()), rnd(&mut rng, b.len()));
    let ucw = yc[0].1.as_ref().expect("u of the adapted projection");
    let ugw = yg[0].1.as_ref().expect("u of the adapted projection");
    // The device's group backward on gradients `gs`: (dx, gA, dA, dB) from dA0, dB0, or
    // with the first projection not `adapted` (dx) alone.
    let bwd_g = |gs: [&Act; 2], adapted: bool| -> Vec<Vec<f32>> {
        let (mut dag, mut dbg) = (g.buf(da0.clone()).unwrap(), g.buf(db0.clone()).unwrap());
        let mut dxg = g.zeros(m * d_in).unwrap();
        let lora = adapted.then_some(LoraBwd {
            a: &ag,
            b: &bg,
            u: ugw,
            grads: Some((&mut dag, &mut dbg)),
        });
        let projs = vec![
            ProjBwd::<CudaBackend> {
                w: &wgs[0],
                d_out: outs[0],
                g: gs[0],
                lora,
            },
            ProjBwd {
                w: &wgs[1],
                d_out: outs[1],
                g: gs[1],
                lora: None,
            },
        ];
        let gas = g
            .project_group_backward(&xg, m, d_in, l, projs, &mut dxg, false)
            .unwrap();
        assert!(gas[1].is_none(), "no gA for the plain projection");
        let mut out = vec![g.to_host(&dxg).unwrap()];
        if adapted {
            out.push(g.to_host(gas[0].as_ref().expect("gA")).unwrap());
            out.extend([g.to_host(&dag).unwrap(), g.to_host(&dbg).unwrap()]);
        }
        out
    };
    let got = bwd_g([&g0, &g1], true);
    let names = ["dx", "gA", "dA", "dB"];
    // The bf16 g is read exactly: the results of the same values stored f32, bit for bit.
    let held = bwd_g([&g0_held, &g1], true);
    for (name, (got, want)) in names.iter().zip(got.iter().zip(&held)) {
        same_bits(
            &format!("group {name}, bf16 g vs its values in f32"),
            got,
            want,
        );
    }
    // And the base product dx = g W, which the bf16 engine computes from g rounded to bf16
    // whatever its storage, is the one of the unrounded f32 gradient, bit for bit: storing
    // g bf16 changes it not (gA = s g B, and so dx's low-rank part, reads g unrounded).
    same_bits(
        "group dx = g W, bf16 g vs unrounded f32 g",
        &bwd_g([&g0, &g1], false)[0],
        &bwd_g([&g0_f32, &g1], false)[0],
    );

    let (mut dac, mut dbc) = (da0.clone(), db0.clone());
    let bwd_c = vec![
        ProjBwd::<CpuBackend> {
            w: &wcs[0],
            d_out: outs[0],
            g: &gs[0],
            lora: Some(LoraBwd {
                a: &a,
                b: &b,
                u: ucw,
                grads: Some((&mut dac, &mut dbc)),
            }),
        },
        ProjBwd {
            w: &wcs[1],
            d_out: outs[1],
            g: &gs[1],
            lora: None,
        },
    ];
    let mut dxc = vec![0.0; m * d_in];
    let gac = c
        .project_group_backward(&x, m, d_in, l, bwd_c, &mut dxc, false)
        .unwrap();
    close("group dx", &got[0], &dxc, BF16);
    // gA = s g B: g exact in one bf16 piece, B in three: f32 products.
    close("group gA", &got[1], gac[0].as_ref().expect("gA"), F32);
    // dA = gA^T x reads the bf16 x (widened, exact) and dB = s g^T u the bf16 g (widened,
    // exact), both on the tf32 Gram kernels, which round gA, g and u.
    close("group dA", &got[2], &dac, TF32);
    close("group dB", &got[3], &dbc, TF32);
}

#[test]
fn classifier_and_curvature_read_bf16_activations() {
    let g = sim(BaseDtype::Bf16);
    let c = CpuBackend::new(2);
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let (rows, vocab) = (37, 301);
    // The active rows are gathered (bf16 kept) before the head: in packs of 8 at dim 48,
    // one element at a time at dim 44 (not a multiple of 8).
    for dim in [48, 44] {
        let (hg, h) = bf16_act(&g, &mut rng, rows, dim);
        let w = rnd(&mut rng, vocab * dim);
        let w_read: Vec<f32> = w.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        let wg = g.weight(w, vocab, dim).unwrap();
        let wc = c.weight(w_read, vocab, dim).unwrap();
        // Some ignored rows, so that the gather has rows to skip.
        let targets: Vec<i32> = (0..rows)
            .map(|r| {
                if r % 5 == 2 {
                    -100
                } else {
                    rng.random_range(0..vocab as i32)
                }
            })
            .collect();
        let t = CeTargets::Labels(&targets);
        let og = g
            .classifier(&hg, &wg, rows, dim, vocab, t, Some(0.25))
            .unwrap();
        let oc = c
            .classifier(&h, &wc, rows, dim, vocab, t, Some(0.25))
            .unwrap();
        // Same inputs and weights on both sides: the logits are f32 products in another
        // order; the gradient's product reads exp(z - max) rounded to bf16 (the head's
        // type).
        close("classifier losses", &og.losses, &oc.losses, F32);
        let (dg, dc) = (og.dhidden.expect("dhidden"), oc.dhidden.expect("dhidden"));
        assert_eq!(dg.dtype(), DType::F32, "gradients stay f32");
        close("classifier dhidden", &g.to_host(&dg).unwrap(), &dc, BF16);
    }

    let dim = 44;
    let (hg, h) = bf16_act(&g, &mut rng, rows, dim);
    let segs = [
        Segment { start: 0, len: 11 },
        Segment { start: 14, len: 20 },
    ];
    let mut fg = g.buf(vec![0.0; dim * dim]).unwrap();
    let mut fc = vec![0.0; dim * dim];
    g.gram_accumulate(&hg, dim, &hg, dim, &segs, 0.5, &mut fg)
        .unwrap();
    c.gram_accumulate(&h, dim, &h, dim, &segs, 0.5, &mut fc)
        .unwrap();
    // bf16 values are exact in tf32: f32 products, f32 sums.
    close("gram (symmetric)", &g.to_host(&fg).unwrap(), &fc, F32);
    let sg = g.segment_sum(&hg, dim, &segs, true).unwrap();
    let sc = c.segment_sum(&h, dim, &segs, true).unwrap();
    close("segment mean", &g.to_host(&sg).unwrap(), &sc, F32);
    let r = 8;
    let ga = rnd(&mut rng, rows * r);
    let mut qg = g.buf(vec![0.0; r * dim]).unwrap();
    let mut qc = vec![0.0; r * dim];
    g.sq_grad_accumulate(
        &g.buf(ga.clone()).unwrap(),
        r,
        &hg,
        dim,
        &segs,
        1.5,
        &mut qg,
    )
    .unwrap();
    c.sq_grad_accumulate(&ga, r, &h, dim, &segs, 1.5, &mut qc)
        .unwrap();
    // The f32 gA side rounds to tf32.
    close("per-sample squares", &g.to_host(&qg).unwrap(), &qc, TF32);
}

/// `rows` positions as two sequences with a gap of two padding rows between them.
fn gapped(rows: usize) -> [Segment; 2] {
    let first = rows / 3;
    [
        Segment {
            start: 0,
            len: first,
        },
        Segment {
            start: first + 2,
            len: rows - first - 2,
        },
    ]
}

/// The curvature kernels read a bf16 operand as stored (staged in shared memory as bf16,
/// widened per fragment): since a bf16 value is exact in tf32 and f32, each result is bit
/// for bit that of the same values handed over as f32, whichever operand is bf16 (read as
/// stored where an entry is built for the combination, else widened first), except for
/// two bf16 operands at 128 x 128, which take bf16 mma (the test after this one). Shapes
/// cover both Gram tilings (128 x 128; 256 x 32 with the narrow side swapped to B), the
/// rows split across blocks (600 rows), the symmetric upper-triangle path, bf16 widths
/// that are whole 16-byte chunks (16-byte copies) or not (element copies: 44 as A in both
/// kernels and as B at 128 x 128, 300 as A), the combinations no entry is built for (a
/// bf16 B at 256 x 32 or in the squaring: widened), and each squaring rank class with its
/// rows in one group of blocks or several.
#[test]
fn curvature_kernels_read_bf16_as_stored() {
    let g = sim(BaseDtype::Bf16);
    let mut rng = ChaCha8Rng::seed_from_u64(29);
    let both = |rows: usize, dim: usize, rng: &mut ChaCha8Rng| {
        let (b, h) = bf16_act(&g, rng, rows, dim);
        let f = g.buf(h).unwrap();
        assert_eq!(f.dtype(), DType::F32);
        (b, f)
    };
    let gram = |x: &Act, dx: usize, y: &Act, dy: usize, segs: &[Segment]| {
        let mut out = g.buf(vec![0.0; dx * dy]).unwrap();
        g.gram_accumulate(x, dx, y, dy, segs, 0.75, &mut out)
            .unwrap();
        g.to_host(&out).unwrap()
    };
    for (rows, dx, dy) in [
        (37, 44, 44),
        (600, 48, 48),
        (70, 48, 20),
        (70, 20, 300),
        (600, 5, 64),
    ] {
        let segs = gapped(rows);
        // Two bf16 operands at 128 x 128 take bf16 mma (the next test): the same exact
        // products, added in another order, so not the same bits.
        let skinny = dx.min(dy) <= 32;
        let (xb, xf) = both(rows, dx, &mut rng);
        let want = gram(&xf, dx, &xf, dx, &segs);
        if dx <= 32 {
            same_bits("symmetric gram", &gram(&xb, dx, &xb, dx, &segs), &want);
        }
        let (yb, yf) = both(rows, dy, &mut rng);
        let want = gram(&xf, dx, &yf, dy, &segs);
        for (what, x, y) in [
            ("bf16 x bf16", &xb, &yb),
            ("bf16 x f32", &xb, &yf),
            ("f32 x bf16", &xf, &yb),
        ] {
            if what == "bf16 x bf16" && !skinny {
                continue;
            }
            same_bits(
                &format!("gram {rows}x{dx}x{dy} {what}"),
                &gram(x, dx, y, dy, &segs),
                &want,
            );
        }
        let sum = |x: &Act| {
            g.to_host(&g.segment_sum(x, dx, &segs, false).unwrap())
                .unwrap()
        };
        same_bits("segment sum", &sum(&xb), &sum(&xf));
    }
    let seqs: Vec<Segment> = (0..5)
        .map(|i| Segment {
            start: i * 41,
            len: 30 + i,
        })
        .collect();
    // Narrow sides r (the rank, <= wide) in the classes 8, 16, 32 (r = 20) and 64; all
    // five sequences (several groups of blocks, partials added after) or the first alone
    // (one group, written directly).
    for (r, wide, nseq) in [
        (8, 44, 5),
        (16, 48, 1),
        (20, 40, 5),
        (64, 96, 5),
        (64, 96, 1),
    ] {
        let rows = 5 * 41;
        let seqs = &seqs[..nseq];
        let (wb, wf) = both(rows, wide, &mut rng);
        let (nb, nf) = both(rows, r, &mut rng);
        let sq = |n: &Act, w: &Act| {
            let mut out = g.buf(vec![0.0; r * wide]).unwrap();
            g.sq_grad_accumulate(n, r, w, wide, seqs, 1.5, &mut out)
                .unwrap();
            g.to_host(&out).unwrap()
        };
        let want = sq(&nf, &wf);
        for (what, n, w) in [
            ("bf16 x bf16", &nb, &wb),
            ("f32 x bf16", &nf, &wb),
            ("bf16 x f32", &nb, &wf),
        ] {
            same_bits(
                &format!("per-sample squares r={r} {what}"),
                &sq(n, w),
                &want,
            );
        }
    }
}

/// The Gram of two bf16 operands at 128 x 128 tiles runs on bf16 mma (m16n8k16, fragments
/// by ldmatrix.trans): against the CPU's Gram of the same values (f32 products of bf16
/// values are exact, so only the order of the f32 sums differs: 1e-4). Shapes: several
/// tiles each way with tails that are not whole mma tiles (200, 136, 300 = 2 x 128 + 44),
/// the symmetric upper triangle over several tiles, rows split across blocks (600) or not
/// (37 in two segments with a gap), widths of whole 16-byte chunks (16-byte copies) or
/// not (300, 44: element copies), and a narrow side of 33 (the smallest at 128 x 128).
#[test]
fn bf16_operands_take_bf16_mma_in_the_gram() {
    let g = sim(BaseDtype::Bf16);
    let c = CpuBackend::new(2);
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    for (rows, dx, dy) in [
        (600, 300, 300),
        (37, 136, 136),
        (600, 200, 136),
        (70, 44, 300),
        (300, 33, 64),
    ] {
        let segs = gapped(rows);
        let (xg, x) = bf16_act(&g, &mut rng, rows, dx);
        let (yg, y) = bf16_act(&g, &mut rng, rows, dy);
        for (what, (ag, a, da), (bg, b, db)) in [
            ("symmetric", (&xg, &x, dx), (&xg, &x, dx)),
            ("cross", (&xg, &x, dx), (&yg, &y, dy)),
        ] {
            let init = rnd(&mut rng, da * db);
            let mut out = g.buf(init.clone()).unwrap();
            let before = g.stats();
            let ((), times) = timed(&g, || {
                g.gram_accumulate(ag, da, bg, db, &segs, 0.75, &mut out)
                    .unwrap()
            });
            let names = kernel_names(&times);
            assert!(
                names
                    .iter()
                    .any(|n| n.starts_with("gram_bf16_128x128_bf16_bf16")),
                "{rows}x{da}x{db} {what}: {names:?}"
            );
            assert!(
                !names.iter().any(|n| n.starts_with("gram_tf32")),
                "{rows}x{da}x{db} {what}: {names:?}"
            );
            assert!(g.stats().since(&before).launches > 0);
            let mut want = init;
            c.gram_accumulate(a, da, b, db, &segs, 0.75, &mut want)
                .unwrap();
            close(
                &format!("bf16 mma gram {rows}x{da}x{db} {what}"),
                &g.to_host(&out).unwrap(),
                &want,
                F32,
            );
        }
    }
}

/// KFAC expand and diag multiply each position's gradient before summing, so their
/// backward stores the gradients as training's does (`GradFeeds::Backward`); KFAC reduce
/// sums them alone first and keeps them f32. On the tiny model dgate and dup are then
/// bf16; dq, dk and dv stay f32 (head dim 16: RoPE's inverse runs as passes after flash
/// attention), as do the attention output and the residual gradient. Over 2 batches x 2
/// layers:
/// - expand: 5 Grams of two bf16 operands (bf16 mma) each: the input factors of the three
///   bf16 inputs (the normed hidden states twice, the SwiGLU output) and g g^T of gate and
///   up; reduce's Grams read f32 sums, so none;
/// - diag: 8 squarings with a bf16 wide side each: gA against the six bf16 inputs (all but
///   o's) and g of gate and up against u; with f32 gradients only the six.
///
/// (The curvature's accuracy against curvlinops: `tests/curvature_reference.rs`.)
#[test]
fn expand_and_diag_read_gradients_as_training_stores_them() {
    let g = sim(BaseDtype::Bf16);
    let t = tiny();
    let model = tiny_model(&g);
    let lora = t.adapter.map(|v| g.buf(v.clone())).unwrap();
    let launches = |scheme, approx, pick: &dyn Fn(&str) -> bool| {
        let spec = Spec {
            scheme,
            fisher: Fisher::Empirical,
            approx,
            seed: 0,
        };
        let (_, times) = timed(&g, || {
            estimate(&g, &model, &lora, &t.examples, 4, spec, || {}).unwrap()
        });
        times
            .iter()
            .filter(|k| pick(&k.name))
            .map(|k| k.calls)
            .sum::<u64>()
    };
    // 6 sequences in batches of 4: two backward passes over 2 layers.
    let bf16_gram = |n: &str| n.starts_with("gram_bf16_");
    assert_eq!(
        launches(Scheme::Kfac, KfacApprox::Expand, &bf16_gram),
        2 * 2 * 5
    );
    assert_eq!(launches(Scheme::Kfac, KfacApprox::Reduce, &bf16_gram), 0);
    let bf16_wide = |n: &str| n.starts_with("sq_grad_") && n.contains("_bf16_f32");
    assert_eq!(
        launches(Scheme::Diag, KfacApprox::Expand, &bf16_wide),
        2 * 2 * 8
    );
}

/// RoPE in place on bf16 q/k rows: the rotation of the f32 entry on the same values,
/// rounded once (bit for bit), and the CPU's to one rounding. Head dims 16 (packs of eight
/// per half head) and 12 (single elements); 37 rows over a period of 5.
#[test]
fn rope_rotates_bf16_rows() {
    let g = sim(BaseDtype::Bf16);
    let c = CpuBackend::new(2);
    let mut rng = ChaCha8Rng::seed_from_u64(25);
    let (rows, heads, period) = (37, 3, 5);
    for hd in [16, 12] {
        let half = hd / 2;
        let (cos, sin) = (rnd(&mut rng, period * half), rnd(&mut rng, period * half));
        let tg = RopeTable {
            cos: g.buf(cos.clone()).unwrap(),
            sin: g.buf(sin.clone()).unwrap(),
            period,
        };
        let tc = RopeTable { cos, sin, period };
        let (mut xg, x) = bf16_act(&g, &mut rng, rows, heads * hd);
        let mut xf = g.buf(x.clone()).unwrap();
        let mut xc = x;
        for inverse in [false, true] {
            g.rope(&mut xg, &tg, rows, heads, hd, inverse).unwrap();
            g.rope(&mut xf, &tg, rows, heads, hd, inverse).unwrap();
            c.rope(&mut xc, &tc, rows, heads, hd, inverse).unwrap();
            assert_eq!(xg.dtype(), DType::Bf16, "rotated in place, still bf16");
            let got = g.to_host(&xg).unwrap();
            let what = format!("rope hd {hd}, inverse {inverse}");
            same_rounded(&what, &got, &g.to_host(&xf).unwrap());
            close(&what, &got, &xc, BF16_STORE);
            // The next rotation starts from the same (rounded) values on every side.
            xf = g.buf(got.clone()).unwrap();
            xc = got;
        }
    }
}

/// Attention on bf16 q/k/v: flash attention stages bf16 tiles either way, so its bf16
/// entries (which read dO as bf16 too) give bit for bit what its f32 ones give on the same
/// values (out, log-sum-exps, dq, dk, dv), and the CPU's results to the bf16 bound; at a head dim flash does not run
/// (24) the materialised path reads exact widened copies, bit for bit too. GQA, causal
/// offsets, KV strides past tk, rows off the 128-row tiles, a head dim (48) run padded.
#[test]
fn attention_reads_bf16_projections() {
    let g = sim(BaseDtype::Bf16);
    let c = CpuBackend::new(2);
    let mut rng = ChaCha8Rng::seed_from_u64(26);
    // (batch, tq, tk, tk_stride, heads, kv heads, head dim, q_offset)
    for (batch, tq, tk, tk_stride, n_heads, n_kv_heads, head_dim, q_offset) in [
        (2, 19, 19, 19, 4, 2, 64, 0),
        (1, 3, 21, 24, 4, 1, 128, 18),
        (1, 9, 9, 9, 3, 1, 48, 0),
        (2, 5, 11, 16, 6, 2, 24, 6),
        // Several query tiles per dK/dV block, double-buffered by cp.async: 3 heads per KV
        // head (150 packed rows in tiles of 64, which split groups), and head dim 128 (80
        // rows in tiles of 32).
        (1, 50, 50, 50, 6, 2, 64, 0),
        (1, 40, 44, 48, 4, 2, 128, 4),
    ] {
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
        let what = |x: &str| format!("{x} {s:?}");
        let (qg, q) = bf16_act(&g, &mut rng, batch * tq, n_heads * head_dim);
        let (kg, k) = bf16_act(&g, &mut rng, batch * tk_stride, n_kv_heads * head_dim);
        let (vg, v) = bf16_act(&g, &mut rng, batch * tk_stride, n_kv_heads * head_dim);
        let (qf, kf, vf) = (
            g.buf(q.clone()).unwrap(),
            g.buf(k.clone()).unwrap(),
            g.buf(v.clone()).unwrap(),
        );
        let (og, sg) = g.attention(&qg, &kg, &vg, &s).unwrap();
        let (of, sf) = g.attention(&qf, &kf, &vf, &s).unwrap();
        let (oc, sc) = c.attention(&q, &k, &v, &s).unwrap();
        let saved = |a: &AttnSaved<_>| match a {
            AttnSaved::Lse(x) | AttnSaved::Probs(x) => g.to_host(x).unwrap(),
        };
        let flash = matches!(sg, AttnSaved::Lse(_));
        assert_eq!(flash, head_dim != 24, "{}", what("path"));
        let got_o = g.to_host(&og).unwrap();
        same_bits(&what("out"), &got_o, &g.to_host(&of).unwrap());
        same_bits(&what("saved"), &saved(&sg), &saved(&sf));
        let bound = if flash { BF16 } else { F32 };
        close(&what("out vs cpu"), &got_o, &oc, bound);

        let dout = rnd(&mut rng, oc.len());
        let dg = g.buf(dout.clone()).unwrap();
        let grads = |q, k, v, o, saved| -> Vec<Vec<f32>> {
            let (dq, dk, dv) = g
                .attention_backward(&dg, q, k, v, o, saved, None, GradFeeds::Summed, &s)
                .unwrap();
            [dq, dk, dv].iter().map(|x| g.to_host(x).unwrap()).collect()
        };
        let got = grads(&qg, &kg, &vg, &og, &sg);
        let f32_entries = grads(&qf, &kf, &vf, &of, &sf);
        let (dqc, dkc, dvc) = c
            .attention_backward(&dout, &q, &k, &v, &oc, &sc, None, GradFeeds::Summed, &s)
            .unwrap();
        for (i, (name, want)) in [("dq", dqc), ("dk", dkc), ("dv", dvc)].iter().enumerate() {
            same_bits(&what(name), &got[i], &f32_entries[i]);
            close(&what(&format!("{name} vs cpu")), &got[i], want, bound);
        }
        // As a training step asks for them (the bf16 entries with bf16 gradients): the
        // f32 ones rounded once; the materialised path keeps f32.
        let (dq, dk, dv) = g
            .attention_backward(&dg, &qg, &kg, &vg, &og, &sg, None, GradFeeds::Backward, &s)
            .unwrap();
        for (i, (name, x)) in [("dq", dq), ("dk", dk), ("dv", dv)].iter().enumerate() {
            let want = if flash { DType::Bf16 } else { DType::F32 };
            assert_eq!(x.dtype(), want, "{}", what(name));
            if flash {
                let host = g.to_host(x).unwrap();
                same_rounded(&what(&format!("{name} stored bf16")), &host, &got[i]);
            }
        }
    }
}

/// dO as the model makes it: o_proj's group backward writes its dx into the buffer
/// `attention_dout` gives, bf16 where flash attention reads it (its every read rounds dO
/// to bf16), f32 for the materialised path. The bf16 dx is the f32 one rounded once, and
/// the gradients from it are bit for bit those from the f32 dO, which the host rounds on
/// the way into the bf16 entries (that those entries read a bf16 dO right, against the
/// f32 entries, is `attention_reads_bf16_projections`' check).
#[test]
fn o_proj_writes_do_as_flash_attention_reads_it() {
    let g = sim(BaseDtype::Bf16);
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    // (batch, t, heads, kv heads, head dim): flash (64, 128 with RoPE's inverse fused;
    // 48 padded) and materialised (24).
    for (batch, t, n_heads, n_kv_heads, head_dim) in [
        (2, 19, 4, 2, 64),
        (1, 21, 2, 1, 128),
        (1, 9, 3, 1, 48),
        (3, 7, 4, 2, 16),
        (1, 11, 2, 2, 24),
    ] {
        let s = AttnShape {
            batch,
            tq: t,
            tk: t,
            tk_stride: t,
            n_heads,
            n_kv_heads,
            head_dim,
            q_offset: 0,
        };
        let (m, q_dim, d) = (batch * t, n_heads * head_dim, 40);
        let what = |x: &str| format!("{x} {s:?}");
        let (q, _) = bf16_act(&g, &mut rng, m, q_dim);
        let (k, _) = bf16_act(&g, &mut rng, m, n_kv_heads * head_dim);
        let (v, _) = bf16_act(&g, &mut rng, m, n_kv_heads * head_dim);
        let (out, saved) = g.attention(&q, &k, &v, &s).unwrap();
        let flash = matches!(saved, AttnSaved::Lse(_));
        assert_eq!(flash, head_dim != 24, "{}", what("path"));
        // o_proj's backward, adapted, as the model runs it: dx = g W + (s g B) A with
        // W (d, q_dim), A (r, q_dim), B (d, r); u = x A^T (m, r) from the forward.
        let r = 4;
        let w = g.weight(rnd(&mut rng, d * q_dim), d, q_dim).unwrap();
        let dh = g.buf(rnd(&mut rng, m * d)).unwrap();
        let a = g.buf(rnd(&mut rng, r * q_dim)).unwrap();
        let b = g.buf(rnd(&mut rng, d * r)).unwrap();
        let u = g.buf(rnd(&mut rng, m * r)).unwrap();
        let l = LoraGroup { r, scale: 0.5 };
        let o_backward = |dx: &mut Act| {
            let spec = ProjBwd {
                w: &w,
                d_out: d,
                g: &dh,
                lora: Some(LoraBwd {
                    a: &a,
                    b: &b,
                    u: &u,
                    grads: None,
                }),
            };
            g.project_group_backward(&out, m, q_dim, l, vec![spec], dx, false)
                .unwrap();
        };
        let mut dout = g.attention_dout(&saved, m * q_dim).unwrap();
        let want = if flash { DType::Bf16 } else { DType::F32 };
        assert_eq!(dout.dtype(), want, "{}", what("dO storage"));
        if !flash {
            continue;
        }
        o_backward(&mut dout);
        let mut dout_f32 = g.zeros(m * q_dim).unwrap();
        o_backward(&mut dout_f32);
        let (got, wide) = (g.to_host(&dout).unwrap(), g.to_host(&dout_f32).unwrap());
        same_rounded(&what("dO"), &got, &wide);
        let rope = RopeTable {
            cos: g.buf(rnd(&mut rng, t * head_dim / 2)).unwrap(),
            sin: g.buf(rnd(&mut rng, t * head_dim / 2)).unwrap(),
            period: t,
        };
        let grads = |dout: &Act| -> Vec<Vec<f32>> {
            let (dq, dk, dv) = g
                .attention_backward(
                    dout,
                    &q,
                    &k,
                    &v,
                    &out,
                    &saved,
                    Some(&rope),
                    GradFeeds::Summed,
                    &s,
                )
                .unwrap();
            [dq, dk, dv].iter().map(|x| g.to_host(x).unwrap()).collect()
        };
        let (a, b) = (grads(&dout), grads(&dout_f32));
        for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
            same_bits(&what(name), &a[i], &b[i]);
        }
    }
}

/// SwiGLU on bf16 gate and up: the f32 entries' results on the same values rounded once,
/// bit for bit (forward and backward both stored bf16), and the CPU's to one rounding.
/// 37 x 44: a tail after the last pack of eight.
#[test]
fn swiglu_reads_bf16_gate_and_up() {
    let g = sim(BaseDtype::Bf16);
    let c = CpuBackend::new(2);
    let mut rng = ChaCha8Rng::seed_from_u64(27);
    let (rows, dim) = (37, 44);
    let (gg, gate) = bf16_act(&g, &mut rng, rows, dim);
    let (ug, up) = bf16_act(&g, &mut rng, rows, dim);
    let (gf, uf) = (g.buf(gate.clone()).unwrap(), g.buf(up.clone()).unwrap());
    let a = g.swiglu(&gg, &ug).unwrap();
    assert_eq!(
        a.dtype(),
        DType::Bf16,
        "the down projection's input is bf16"
    );
    let got = g.to_host(&a).unwrap();
    same_bits(
        "swiglu",
        &got,
        &g.to_host(&g.swiglu(&gf, &uf).unwrap()).unwrap(),
    );
    close(
        "swiglu vs cpu",
        &got,
        &c.swiglu(&gate, &up).unwrap(),
        BF16_STORE,
    );

    let dact = rnd(&mut rng, rows * dim);
    let da = g.buf(dact.clone()).unwrap();
    let (dgg, dug) = g
        .swiglu_backward(&da, &gg, &ug, GradFeeds::Backward)
        .unwrap();
    let (dgf, duf) = g
        .swiglu_backward(&da, &gf, &uf, GradFeeds::Backward)
        .unwrap();
    // Summed over positions first (KFAC reduce): stored f32, whatever gate and up are.
    let (dgk, duk) = g.swiglu_backward(&da, &gg, &ug, GradFeeds::Summed).unwrap();
    let (dgc, duc) = c
        .swiglu_backward(&dact, &gate, &up, GradFeeds::Backward)
        .unwrap();
    for (name, got, f32_entry, kept, want) in
        [("dgate", dgg, dgf, dgk, dgc), ("dup", dug, duf, duk, duc)]
    {
        // Only products read them (the gate/up group backward, which rounds them anyway).
        assert_eq!(got.dtype(), DType::Bf16, "{name}: stored as gate and up");
        for (what, b) in [
            ("for f32 gate and up", &f32_entry),
            ("in KFAC reduce passes", &kept),
        ] {
            assert_eq!(b.dtype(), DType::F32, "{name}: f32 {what}");
        }
        let f32_entry = g.to_host(&f32_entry).unwrap();
        same_bits(
            &format!("{name}, curvature"),
            &g.to_host(&kept).unwrap(),
            &f32_entry,
        );
        close(
            &format!("{name}, curvature, vs cpu"),
            &f32_entry,
            &want,
            F32,
        );
        let got = g.to_host(&got).unwrap();
        same_rounded(name, &got, &f32_entry);
        close(&format!("{name} vs cpu"), &got, &want, BF16_STORE);
    }
}

/// An op that takes f32 only, handed a bf16 activation, refuses it and names itself (the
/// line of the op that asked for f32).
#[test]
fn f32_only_ops_name_themselves_when_handed_bf16() {
    let g = sim(BaseDtype::Bf16);
    let mut rng = ChaCha8Rng::seed_from_u64(28);
    let (x, _) = bf16_act(&g, &mut rng, 3, 8);
    let mut y = g.zeros(24).unwrap();
    let e = g.add_assign(&mut y, &x).unwrap_err().to_string();
    assert!(
        e.contains("bf16 activation") && e.contains("cuda/vector.rs:"),
        "{e}"
    );
}

/// With f32 base weights nothing is bf16: the f32 path is the one that reproduces the f32
/// references.
#[test]
fn f32_base_weights_keep_activations_f32() {
    let g = sim(BaseDtype::F32);
    let mut rng = ChaCha8Rng::seed_from_u64(24);
    let (rows, dim) = (5, 16);
    let x = g.buf(rnd(&mut rng, rows * dim)).unwrap();
    let w = g.buf(rnd(&mut rng, dim)).unwrap();
    let (y, rstd) = g.rmsnorm(&x, &w, rows, dim, 1e-5).unwrap();
    let act = g.swiglu(&x, &x).unwrap();
    let wt = g.weight(rnd(&mut rng, dim * dim), dim, dim).unwrap();
    let proj = ProjFwd {
        w: &wt,
        d_out: dim,
        lora: None,
        feeds: Feeds::Kernels,
        rope: None,
    };
    let l = LoraGroup { r: 0, scale: 0.0 };
    let [(q, _)]: [_; 1] = g
        .project_group(&y, rows, dim, l, &[proj])
        .unwrap()
        .try_into()
        .ok()
        .unwrap();
    for (what, b) in [("y", &y), ("rstd", &rstd), ("swiglu", &act), ("q", &q)] {
        assert_eq!(b.dtype(), DType::F32, "{what}");
    }
}

/// The cached path (several sequences at once; each projection a `linear` and a per-row
/// `lora_forward` reading the bf16 normed states) against the CPU: the logits of every
/// sequence's last token, to the model-level bf16 bound.
#[test]
fn cached_batch_on_bf16_activations_matches_cpu() {
    let t = tiny();
    let (g, c) = (sim(BaseDtype::Bf16), CpuBackend::new(2));
    let (mg, mc) = (tiny_model(&g), tiny_model(&c));
    let lg = t.adapter.map(|v| g.buf(v.clone())).unwrap();
    let lc = t.adapter.map(|v| c.buf(v.clone())).unwrap();
    let ids: Vec<Vec<u32>> = t.examples[..3]
        .iter()
        .enumerate()
        .map(|(i, e)| e.ids[..7 + 3 * i].to_vec())
        .collect();
    let logits = |be_g: bool| -> Vec<f32> {
        if be_g {
            let mut caches: Vec<_> = (0..3).map(|_| mg.new_cache(&g, 16).unwrap()).collect();
            let mut seqs: Vec<CachedSeq<'_, CudaBackend>> = ids
                .iter()
                .zip(caches.iter_mut())
                .map(|(ids, cache)| CachedSeq { ids, cache })
                .collect();
            g.to_host(&mg.next_logits(&g, Some(&lg), &mut seqs).unwrap())
                .unwrap()
        } else {
            let mut caches: Vec<_> = (0..3).map(|_| mc.new_cache(&c, 16).unwrap()).collect();
            let mut seqs: Vec<CachedSeq<'_, CpuBackend>> = ids
                .iter()
                .zip(caches.iter_mut())
                .map(|(ids, cache)| CachedSeq { ids, cache })
                .collect();
            mc.next_logits(&c, Some(&lc), &mut seqs).unwrap()
        }
    };
    let e = rel_err(&logits(true), &logits(false));
    assert!(
        e < bound(Some(BaseDtype::Bf16)),
        "logits: relative error {e:e}"
    );
}
