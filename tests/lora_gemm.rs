//! LoRA inside the GEMMs (`Backend::project_group` and its backward; on CUDA the grouped
//! tensor-core GEMM of kernels/lora_gemm.cuh) against the CPU's per-projection sequence,
//! on the simulator (and a GPU when there is one): q/k/v-like groups with GQA-narrow
//! outputs, widths and row counts off the 128 x 128 tile, K off the 32-row step (and odd,
//! so unaligned rows take the scalar loads) and over three steps (the cp.async stages
//! wrap), long enough with few rows that the u and gA launches split K, r in {1, 4, 8, 16, 64}, partial target sets, a group larger than one launch takes, bf16
//! and f32 base weights, f32 and bf16 activations.
//!
//! Bounds: with f32 base weights the products are f32 ones from three bf16 pieces per
//! operand and the weight gradients 3xTF32, so 1e-4 as every f32 kernel; with bf16 base
//! weights the CPU keeps the unrounded f32 weights, and rounding W and x to bf16 costs
//! about 4e-3 per element (bound 1e-2), while u and gA (LoRA segments in three pieces)
//! stay f32 (1e-4) and dA, dB (tf32 Gram products) near 1e-3 (`bound_of`).

mod common;

use common::*;
use lalora_engine::backend::Backend;
use lalora_engine::backend::cpu::CpuBackend;
use lalora_engine::backend::cuda::runtime::DType;
use lalora_engine::backend::cuda::{
    self, Act, BaseDtype, CudaBackend, LoraGemmTiling, ProjectionGemm,
};
use lalora_engine::backend::group::{Feeds, LoraBwd, LoraGroup, ProjBwd, ProjFwd, RopeOut};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rnd(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0 + 1e-3) * scale)
        .collect()
}

/// The simulator and the GPU when there is one, running the projection groups wholly in
/// the grouped kernel (`ProjectionGemm::Fused`), which most tests here are about.
fn devices(base: BaseDtype) -> Vec<CudaBackend> {
    let mut v = vec![sim(base)];
    if cuda::available() {
        v.push(CudaBackend::new(0, base).expect("CUDA device initialises"));
    } else {
        assert!(
            std::env::var("LALORA_REQUIRE_GPU").as_deref() != Ok("1"),
            "LALORA_REQUIRE_GPU=1 but no CUDA device is usable"
        );
    }
    for g in &v {
        g.set_projection_gemm(ProjectionGemm::Fused);
    }
    v
}

/// One group: rows, input width, each projection's output width and whether it is adapted.
struct Case {
    m: usize,
    d_in: usize,
    outs: Vec<(usize, bool)>,
    r: usize,
}

/// Host inputs of a case.
struct Host {
    x: Vec<f32>,
    w: Vec<Vec<f32>>,
    a: Vec<Vec<f32>>,
    b: Vec<Vec<f32>>,
    g: Vec<Vec<f32>>,
    dx0: Vec<f32>,
    da0: Vec<Vec<f32>>,
    db0: Vec<Vec<f32>>,
}

fn host(c: &Case, seed: u64) -> Host {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = c.outs.len();
    let per = |rng: &mut ChaCha8Rng, f: &dyn Fn(usize) -> usize, s: f32| {
        (0..n)
            .map(|i| rnd(rng, f(c.outs[i].0), s))
            .collect::<Vec<_>>()
    };
    let lora_scale = 1.0 / (c.d_in as f32).sqrt();
    Host {
        x: rnd(&mut rng, c.m * c.d_in, 1.0),
        w: per(&mut rng, &|o| o * c.d_in, lora_scale),
        a: per(&mut rng, &|_| c.r * c.d_in, lora_scale),
        b: per(&mut rng, &|o| o * c.r, 0.5),
        g: per(&mut rng, &|o| c.m * o, 1.0),
        dx0: rnd(&mut rng, c.m * c.d_in, 1.0),
        da0: per(&mut rng, &|_| c.r * c.d_in, 1.0),
        db0: per(&mut rng, &|o| o * c.r, 1.0),
    }
}

/// Every output of a forward + backward: `(name, values)`.
/// Named outputs of a forward + backward.
type Outputs = Vec<(String, Vec<f32>)>;

fn run<B: Backend>(be: &B, c: &Case, h: &Host, lg: LoraGroup) -> Outputs {
    let up = |v: &[f32]| be.buf(v.to_vec()).unwrap();
    let g: Vec<_> = h.g.iter().map(|v| up(v)).collect();
    run_on(
        be,
        c,
        h,
        lg,
        (&up(&h.x), &g),
        How::plain(Feeds::Residual),
        &mut || {},
    )
}

/// How a run treats its projections: what reads projection i's output, the one adapter
/// (if any) that is frozen (no weight gradients: its `dA`, `dB` must come back as they
/// were), and whether `dx` is added to or written fresh.
struct How<'a> {
    feeds: &'a dyn Fn(usize) -> Feeds,
    frozen: Option<usize>,
    accumulate: bool,
}

impl How<'static> {
    /// Every output read by `feeds`, every adapter trained, `dx` added to.
    fn plain(feeds: Feeds) -> Self {
        let feeds: &'static dyn Fn(usize) -> Feeds = match feeds {
            Feeds::Residual => &|_| Feeds::Residual,
            Feeds::Kernels => &|_| Feeds::Kernels,
        };
        How {
            feeds,
            frozen: None,
            accumulate: true,
        }
    }
}

/// `run` with the input `x` and output gradients `g` given as device buffers (`h.x`, `h.g`
/// unused), run as `how` says; `mark` is called just before the forward and just after the
/// backward (every input on the device by then).
fn run_on<B: Backend>(
    be: &B,
    c: &Case,
    h: &Host,
    lg: LoraGroup,
    (x, g): (&B::Buf, &[B::Buf]),
    how: How,
    mark: &mut dyn FnMut(),
) -> Outputs {
    let up = |v: &[f32]| be.buf(v.to_vec()).unwrap();
    let ws: Vec<B::Weight> = (0..c.outs.len())
        .map(|i| be.weight(h.w[i].clone(), c.outs[i].0, c.d_in).unwrap())
        .collect();
    let (a, b): (Vec<_>, Vec<_>) = (
        h.a.iter().map(|v| up(v)).collect(),
        h.b.iter().map(|v| up(v)).collect(),
    );
    let fwd: Vec<ProjFwd<'_, B>> = c
        .outs
        .iter()
        .enumerate()
        .map(|(i, &(d_out, adapted))| ProjFwd {
            w: &ws[i],
            d_out,
            lora: adapted.then(|| (&a[i], &b[i])),
            feeds: (how.feeds)(i),
            rope: None,
        })
        .collect();
    let mut dx = up(&h.dx0);
    let mut da: Vec<B::Buf> = h.da0.iter().map(|v| up(v)).collect();
    let mut db: Vec<B::Buf> = h.db0.iter().map(|v| up(v)).collect();
    mark();
    let ys = be.project_group(x, c.m, c.d_in, lg, &fwd).unwrap();
    let mut out = Vec::new();
    for (i, (y, u)) in ys.iter().enumerate() {
        out.push((format!("y{i}"), be.to_host(y).unwrap()));
        if let Some(u) = u {
            out.push((format!("u{i}"), be.to_host(u).unwrap()));
        }
    }
    let bwd: Vec<ProjBwd<'_, B>> = da
        .iter_mut()
        .zip(db.iter_mut())
        .enumerate()
        .map(|(i, (da, db))| ProjBwd {
            w: &ws[i],
            d_out: c.outs[i].0,
            g: &g[i],
            lora: ys[i].1.as_ref().map(|u| LoraBwd {
                a: &a[i],
                b: &b[i],
                u,
                grads: (how.frozen != Some(i)).then_some((da, db)),
            }),
        })
        .collect();
    let gas = be
        .project_group_backward(x, c.m, c.d_in, lg, bwd, &mut dx, how.accumulate)
        .unwrap();
    mark();
    out.push(("dx".into(), be.to_host(&dx).unwrap()));
    for (i, ga) in gas.iter().enumerate() {
        if let Some(ga) = ga {
            out.push((format!("gA{i}"), be.to_host(ga).unwrap()));
            out.push((format!("dA{i}"), be.to_host(&da[i]).unwrap()));
            out.push((format!("dB{i}"), be.to_host(&db[i]).unwrap()));
        }
    }
    out
}

/// The relative bound against the CPU with `base` weights for the products that read the
/// base weights (y, dx; the module's doc gives why).
fn bound(base: BaseDtype) -> f64 {
    match base {
        BaseDtype::F32 => 1e-4,
        BaseDtype::Bf16 => 1e-2,
    }
}

/// The bound of the output `name` (`y0`, `u0`, `dx`, `gA0`, `dA0`, `dB0`...): u and gA
/// never read a base weight and stay f32 (1e-4) on every path; dA and dB are at worst tf32
/// Gram products with bf16 base weights, whose operands keep 11 bits (2^-11 relative
/// each, so about 1e-3 for a product); y and dx have `bound(base)`.
fn bound_of(name: &str, base: BaseDtype) -> f64 {
    match base {
        _ if name.starts_with('u') || name.starts_with("gA") => 1e-4,
        BaseDtype::Bf16 if name.starts_with("dA") || name.starts_with("dB") => 1e-3,
        _ => bound(base),
    }
}

fn check(cases: &[Case], base: BaseDtype) {
    for g in devices(base) {
        for (k, c) in cases.iter().enumerate() {
            let h = host(c, 10 + k as u64);
            let lg = lora_group(c);
            let want = run(&CpuBackend::new(2), c, &h, lg);
            let before = g.stats();
            let got = run(&g, c, &h, lg);
            // LoRA inside the GEMMs: the hand-written kernels alone, no cuBLAS call.
            assert_eq!(g.stats().since(&before).gemms, 0, "case {k}: cuBLAS called");
            compare(&g.describe(), k, c, &got, &want, base);
        }
    }
}

/// Every output of `got` (the device) within its bound (`bound_of`) of `want` (the CPU),
/// relative; the errors on stderr.
fn compare(who: &str, k: usize, c: &Case, got: &Outputs, want: &Outputs, base: BaseDtype) {
    assert_eq!(got.len(), want.len());
    let mut report = Vec::new();
    for ((name, x), (_, y)) in got.iter().zip(want) {
        let tol = bound_of(name, base);
        let e = rel_err(x, y);
        assert!(
            e < tol,
            "{who} case {k} (m {}, d_in {}, r {}): {name}: relative error {e:e} (bound {tol:e})",
            c.m,
            c.d_in,
            c.r
        );
        report.push(format!("{name} {e:.1e}"));
    }
    eprintln!("{who}: case {k}: {}", report.join(", "));
}

/// q/k/v with GQA-narrow k/v, o alone, gate/up wider than one tile.
fn cases() -> Vec<Case> {
    vec![
        // q/k/v, all adapted, r 8; k/v half of q; rows and widths off the tile.
        Case {
            m: 70,
            d_in: 96,
            outs: vec![(96, true), (48, true), (48, true)],
            r: 8,
        },
        // q and v adapted, k not (a partial target set); r 1; K odd (scalar loads).
        Case {
            m: 37,
            d_in: 33,
            outs: vec![(40, true), (24, false), (24, true)],
            r: 1,
        },
        // gate/up: two column tiles each, r 64, only up adapted.
        Case {
            m: 130,
            d_in: 64,
            outs: vec![(150, false), (150, true)],
            r: 64,
        },
        // K of 160 forward and 136 backward (five 32-wide steps: the three stage buffers
        // of bf16 weights wrap round, with f32 x and g staged through registers).
        Case {
            m: 100,
            d_in: 160,
            outs: vec![(136, true), (48, false)],
            r: 16,
        },
        // Few rows, long K: the u launch (1 block, 35 steps of K) and the gA launch (19
        // steps) split K (lora_gemm.rs `splits_for`); K tails of 12 and 24.
        Case {
            m: 20,
            d_in: 1100,
            outs: vec![(600, true), (40, false)],
            r: 8,
        },
        // A group of one without LoRA (o/down when not targeted).
        Case {
            m: 20,
            d_in: 72,
            outs: vec![(40, false)],
            r: 8,
        },
        // More projections than one launch's table holds (lora_gemm.rs `MAX_GROUP`, 8):
        // the forward in two launches, the backward's dx summed over two.
        Case {
            m: 20,
            d_in: 40,
            outs: (0..9).map(|i| (8 + 4 * i, i % 3 != 1)).collect(),
            r: 4,
        },
    ]
}

/// A group's forward and backward on a device queue no host-to-device copy (each launch's
/// problems and segments go as a kernel parameter, not a table copied per launch: from
/// pageable memory such a copy may wait for the queue) and do not wait for the device;
/// the forward's outputs are read back between them, and only those reads wait.
#[test]
fn group_launches_copy_nothing_to_the_device() {
    for base in [BaseDtype::Bf16, BaseDtype::F32] {
        for g in devices(base) {
            for path in [ProjectionGemm::Fused, ProjectionGemm::Hybrid] {
                g.set_projection_gemm(path);
                for (k, c) in cases().iter().enumerate() {
                    let h = host(c, 10 + k as u64);
                    let up = |v: &[f32]| g.buf(v.to_vec()).unwrap();
                    let gs: Vec<_> = h.g.iter().map(|v| up(v)).collect();
                    let mut marks = Vec::new();
                    let io = (&up(&h.x), &gs[..]);
                    let how = How::plain(Feeds::Residual);
                    run_on(&g, c, &h, lora_group(c), io, how, &mut || {
                        marks.push(g.stats())
                    });
                    let s = marks[1].since(&marks[0]);
                    let reads = c.outs.len() + c.outs.iter().filter(|o| o.1).count();
                    let who = format!("{}: case {k}: {s}", g.describe());
                    assert!(s.launches > 0, "{who}");
                    assert_eq!(s.htod, 0, "{who}");
                    assert_eq!((s.dtoh, s.synchronizes), (reads as u64, 0), "{who}");
                }
            }
        }
    }
}

#[test]
fn lora_gemm_matches_cpu_bf16() {
    check(&cases(), BaseDtype::Bf16);
}

#[test]
fn lora_gemm_matches_cpu_f32() {
    check(&cases(), BaseDtype::F32);
}

/// bf16 activations and output gradients, as the model stores them with bf16 base weights:
/// their products with the bf16 weights stream global -> shared by cp.async
/// (kernels/lora_gemm.cuh, `w_copyable`, `x_copyable`), the rest (the LoRA segments, f32 operands, widths
/// that are not whole 16-byte chunks) through registers, in one problem. Case 0: K of 200
/// forward and 136 backward (seven and five 32-wide steps, so the three stage buffers wrap
/// round, and an 8-wide tail), rows off the tile, a second projection of width 44 (its
/// backward segment not whole chunks); case 1: d_in 92, not whole chunks, so every segment
/// takes the registers; case 3: K of 328 (six 64-wide steps, so four stages wrap round).
fn bf16_input_cases() -> Vec<Case> {
    vec![
        Case {
            m: 150,
            d_in: 200,
            outs: vec![(136, true), (44, false)],
            r: 8,
        },
        Case {
            m: 37,
            d_in: 92,
            outs: vec![(64, true)],
            r: 4,
        },
        // Split K with bf16 x and g: u over 33 steps, gA over 17 (their weights A and B are
        // f32, so the register path; the copy path never splits today).
        Case {
            m: 20,
            d_in: 1032,
            outs: vec![(520, true)],
            r: 8,
        },
        Case {
            m: 40,
            d_in: 328,
            outs: vec![(264, true)],
            r: 16,
        },
    ]
}

/// Case `k` of `bf16_input_cases` on `g` with its inputs stored bf16, and the CPU's
/// outputs on the same (rounded) values: `(got, want)`.
fn bf16_input_run(g: &CudaBackend, k: usize, c: &Case) -> (Outputs, Outputs) {
    bf16_input_run_feeding(g, k, c, Feeds::Residual)
}

/// `bf16_input_run` with the outputs read by `feeds`.
fn bf16_input_run_feeding(g: &CudaBackend, k: usize, c: &Case, feeds: Feeds) -> (Outputs, Outputs) {
    let mut rng = ChaCha8Rng::seed_from_u64(40 + k as u64);
    let mut h = host(c, 30 + k as u64);
    let (x, held) = bf16_act(g, &mut rng, c.m, c.d_in);
    h.x = held;
    let gs: Vec<Act> = c
        .outs
        .iter()
        .enumerate()
        .map(|(i, &(d_out, _))| {
            let (a, held) = bf16_act(g, &mut rng, c.m, d_out);
            h.g[i] = held;
            a
        })
        .collect();
    let lg = lora_group(c);
    let want = run(&CpuBackend::new(2), c, &h, lg);
    let how = How::plain(feeds);
    (run_on(g, c, &h, lg, (&x, &gs), how, &mut || {}), want)
}

fn lora_group(c: &Case) -> LoraGroup {
    LoraGroup {
        r: c.r,
        scale: 16.0 / c.r as f32,
    }
}

#[test]
fn bf16_inputs_take_the_copy_path() {
    for g in devices(BaseDtype::Bf16) {
        for (k, c) in bf16_input_cases().iter().enumerate() {
            let (got, want) = bf16_input_run(&g, k, c);
            compare(&g.describe(), k, c, &got, &want, BaseDtype::Bf16);
        }
    }
}

/// Whether the u or gA launches of a case may split K (lora_gemm.rs `splits_for`: at
/// least two splits of 8 steps, so more than 15 steps of the smallest K step, 32), which
/// makes their rounding depend on the tiling.
fn may_split_k(c: &Case) -> bool {
    c.d_in > 15 * 32 || c.outs.iter().any(|&(o, _)| o > 15 * 32)
}

/// Every other tiling of the LoRA GEMM (kernels/lora_gemm_tiles.cu: a deeper pipeline, a
/// 64-wide K step, 128 x 256 and 256 x 128 tiles; each in both block orders) on the cases
/// above (f32 and bf16 base weights; with bf16 ones, f32 and bf16 inputs): within the
/// bounds of the CPU, and bit for bit the engine's tiling's outputs wherever K is not
/// split and the register path's K step is the engine's (the same mma over the same
/// 16-column K steps in the same order; a split's partial sums, whose boundaries follow the
/// tile, round differently, and so do piece pairs taken over a shorter step).
#[test]
fn every_tiling_matches_the_cpu_and_the_engines() {
    let identical = |a: &Outputs, b: &Outputs| {
        a.len() == b.len()
            && a.iter().zip(b).all(|((n, x), (m, y))| {
                n == m
                    && x.len() == y.len()
                    && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
            })
    };
    let (f32_in, bf16_in) = (cases(), bf16_input_cases());
    for base in [BaseDtype::Bf16, BaseDtype::F32] {
        let with_bf16_in: &[Case] = if base == BaseDtype::Bf16 {
            &bf16_in
        } else {
            &[]
        };
        let all: Vec<&Case> = f32_in.iter().chain(with_bf16_in).collect();
        // (device, CPU) outputs of every case under the device's current tiling.
        let run_all = |g: &CudaBackend| -> Vec<(Outputs, Outputs)> {
            let mut v: Vec<(Outputs, Outputs)> = f32_in
                .iter()
                .enumerate()
                .map(|(k, c)| {
                    let h = host(c, 10 + k as u64);
                    let lg = lora_group(c);
                    (run(g, c, &h, lg), run(&CpuBackend::new(2), c, &h, lg))
                })
                .collect();
            v.extend(
                with_bf16_in
                    .iter()
                    .enumerate()
                    .map(|(k, c)| bf16_input_run(g, k, c)),
            );
            v
        };
        for g in devices(base) {
            g.set_lora_gemm_tiling(LoraGemmTiling::ENGINE);
            let engine = run_all(&g);
            for t in LoraGemmTiling::all().into_iter().skip(1) {
                g.set_lora_gemm_tiling(t);
                // describe() names a tiling other than the engine's.
                let who = g.describe();
                assert!(who.contains(&t.name()), "{who}");
                for (k, (c, ((got, want), (mine, _)))) in
                    all.iter().zip(run_all(&g).iter().zip(&engine)).enumerate()
                {
                    compare(&who, k, c, got, want, base);
                    let same_order = t.register_k_step()
                        == LoraGemmTiling::ENGINE.register_k_step()
                        && !may_split_k(c);
                    assert!(
                        !same_order || identical(got, mine),
                        "{who}: case {k}: not bit for bit the engine tiling's outputs"
                    );
                }
            }
            g.set_lora_gemm_tiling(LoraGemmTiling::ENGINE);
        }
    }
}

/// The other projection paths on the same cases: `hybrid` (base products on cuBLAS, added
/// in the grouped kernel's epilogue to its LoRA segments), the plain cuBLAS sequence (the
/// default) and `folded` (here with f32 inputs, or bf16 ones with f32 outputs; bf16 inputs
/// and outputs: `the_folded_path_matches_the_cpu`). Within the CPU's bounds with f32 and
/// bf16 base weights, and with bf16 base weights on f32 and on bf16 inputs; and on the RoPE
/// group of `rope_in_the_lora_gemm_epilogue` (bf16 outputs, rotated after the products on
/// the cuBLAS paths). Each path is told by its cuBLAS calls.
#[test]
fn the_hybrid_cublas_and_folded_paths_match_the_cpu() {
    for base in [BaseDtype::Bf16, BaseDtype::F32] {
        let tol = bound(base);
        for g in devices(base) {
            for path in [
                ProjectionGemm::Hybrid,
                ProjectionGemm::Cublas,
                ProjectionGemm::Folded,
            ] {
                g.set_projection_gemm(path);
                let who = g.describe();
                for (k, c) in cases().iter().enumerate() {
                    let h = host(c, 10 + k as u64);
                    let lg = lora_group(c);
                    let want = run(&CpuBackend::new(2), c, &h, lg);
                    let before = g.stats();
                    let got = run(&g, c, &h, lg);
                    let gemms = g.stats().since(&before).gemms as usize;
                    // One base GEMM per projection forward and one backward; the sequence
                    // has four more per adapted projection (u, s u B^T; gA, dx, and with
                    // the weight gradients dA, dB).
                    let (n, adapted) = (c.outs.len(), c.outs.iter().filter(|o| o.1).count());
                    match path {
                        ProjectionGemm::Hybrid => assert_eq!(gemms, 2 * n, "{who}: case {k}"),
                        _ => assert!(gemms >= 2 * n + 4 * adapted, "{who}: case {k}: {gemms}"),
                    }
                    compare(&who, k, c, &got, &want, base);
                }
                if base == BaseDtype::Bf16 {
                    for (k, c) in bf16_input_cases().iter().enumerate() {
                        let (got, want) = bf16_input_run(&g, k, c);
                        compare(&who, k, c, &got, &want, base);
                    }
                }
                // RoPE on the outputs (in the epilogue at head dims 16, 32, 64, else by
                // rope.cu; by rope.cu after the sequence), and what the unrotated outputs
                // would be, which it must not give.
                let (want, plain) = (
                    rope_group(&CpuBackend::new(2), true, false),
                    rope_group(&CpuBackend::new(2), false, false),
                );
                for (i, (got, (w, p))) in rope_group(&g, true, false)
                    .iter()
                    .zip(want.iter().zip(&plain))
                    .enumerate()
                {
                    let e = rel_err(got, w);
                    assert!(e < tol, "{who}: rotated output {i}: relative error {e:e}");
                    assert!(
                        i == 5 || rel_err(got, p) > 0.1,
                        "{who}: output {i} not rotated"
                    );
                }
            }
        }
    }
}

/// The folded path (`ProjectionGemm::Folded`) with bf16 base weights, on every case with
/// `x` and the output gradients stored bf16 (the CPU given the same rounded values), the
/// outputs stored bf16 (`Feeds::Kernels`: the LoRA update is the base GEMM's C operand)
/// and f32 (`Feeds::Residual`). `y` and `dx` carry the bf16 weights' rounding (1e-2);
/// `u`, `gA`, `dA` and `dB` are products of bf16-exact activations with f32 factors in
/// three bf16 pieces, so they keep the f32 bound (1e-4), which factors rounded to bf16 (one
/// piece) would break. The cuBLAS calls tell the path: per group one u product, one dA
/// product and one dx product of the LoRA factors, per adapted projection the update, gA
/// and dB, per projection the two base products (the plain sequence: u, update, gA, dx, dA
/// and dB per adapted projection).
#[test]
fn the_folded_path_matches_the_cpu() {
    let all: Vec<Case> = cases().into_iter().chain(bf16_input_cases()).collect();
    for g in devices(BaseDtype::Bf16) {
        g.set_projection_gemm(ProjectionGemm::Folded);
        let who = g.describe();
        for (k, c) in all.iter().enumerate() {
            for feeds in [Feeds::Kernels, Feeds::Residual] {
                let before = g.stats();
                g.time_kernels(true);
                let (got, want) = bf16_input_run_feeding(&g, k, c, feeds);
                g.time_kernels(false);
                let gemms = g.stats().since(&before).gemms as usize;
                let (n, adapted) = (c.outs.len(), c.outs.iter().filter(|o| o.1).count());
                let per_group = if adapted > 0 { 3 } else { 0 };
                assert_eq!(gemms, 2 * n + 3 * adapted + per_group, "{who}: case {k}");
                // The fold itself: bf16 outputs written by GEMMs into a bf16 C (per
                // projection the base product, and the update z where adapted), never
                // rounded by a pass of their own; f32 outputs, no bf16 C at all.
                let times = g.kernel_times().unwrap();
                let calls = |pick: &dyn Fn(&str) -> bool| -> u64 {
                    times
                        .iter()
                        .filter(|t| pick(&t.name))
                        .map(|t| t.calls)
                        .sum()
                };
                let bf16_c = calls(&|n| n.starts_with("cuBLAS ") && n.contains("→bf16"));
                let rounding = calls(&|n| n.starts_with("f32_to_bf16"));
                let folded = if feeds == Feeds::Kernels {
                    n + adapted
                } else {
                    0
                };
                assert_eq!(
                    bf16_c as usize, folded,
                    "{who}: case {k} {feeds:?}: {times:?}"
                );
                assert_eq!(rounding, 0, "{who}: case {k} {feeds:?}: {times:?}");
                for ((name, x), (_, y)) in got.iter().zip(&want) {
                    let f32_values = ["u", "gA", "dA", "dB"].iter().any(|p| name.starts_with(p));
                    let tol = if f32_values { 1e-4 } else { 1e-2 };
                    let e = rel_err(x, y);
                    assert!(
                        e < tol,
                        "{who}: case {k} {feeds:?}: {name}: relative error {e:e} (bound {tol:e})"
                    );
                }
                compare(
                    &format!("{who} {feeds:?}"),
                    k,
                    c,
                    &got,
                    &want,
                    BaseDtype::Bf16,
                );
            }
        }
    }
}

/// The folded path on the mixes its simpler cases leave out, against the CPU: the first
/// projection not adapted and `dx` written fresh (not added to), one adapted projection
/// without weight gradients (a frozen adapter), and the input and the output gradients in
/// either storage (bf16 `x` with f32 gradients, as KFAC reduce has them; f32 `x`
/// with bf16 gradients; bf16 with one f32 gradient among bf16 ones). Bounds as in
/// `the_folded_path_matches_the_cpu`; the outputs a frozen adapter has no gradients for
/// are its `dA` and `dB`, which must come back untouched.
#[test]
fn the_folded_path_takes_mixed_groups() {
    let c = Case {
        m: 45,
        d_in: 72,
        outs: vec![(40, false), (56, true), (24, true), (32, true)],
        r: 8,
    };
    let lg = lora_group(&c);
    let n = c.outs.len();
    // (x stored bf16, which gradients are stored bf16)
    let mixes = [
        (true, [false; 4]),
        (false, [true; 4]),
        (true, [true, true, false, true]),
    ];
    for g in devices(BaseDtype::Bf16) {
        g.set_projection_gemm(ProjectionGemm::Folded);
        let who = g.describe();
        for (k, (x_bf16, g_bf16)) in mixes.into_iter().enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(90 + k as u64);
            let mut h = host(&c, 80 + k as u64);
            let x = if x_bf16 {
                let (x, held) = bf16_act(&g, &mut rng, c.m, c.d_in);
                h.x = held;
                x
            } else {
                g.buf(h.x.clone()).unwrap()
            };
            let gs: Vec<Act> = (0..n)
                .map(|i| {
                    if g_bf16[i] {
                        let (a, held) = bf16_act(&g, &mut rng, c.m, c.outs[i].0);
                        h.g[i] = held;
                        a
                    } else {
                        g.buf(h.g[i].clone()).unwrap()
                    }
                })
                .collect();
            let cpu = CpuBackend::new(2);
            let cx = cpu.buf(h.x.clone()).unwrap();
            let cgs: Vec<Vec<f32>> = h.g.clone();
            // The outputs alternate between kernels and the residual stream; the third
            // projection's adapter is frozen; dx is written fresh.
            let alternate = |i: usize| {
                if i.is_multiple_of(2) {
                    Feeds::Kernels
                } else {
                    Feeds::Residual
                }
            };
            let how = || How {
                feeds: &alternate,
                frozen: Some(2),
                accumulate: false,
            };
            let want = run_on(&cpu, &c, &h, lg, (&cx, &cgs[..]), how(), &mut || {});
            let got = run_on(&g, &c, &h, lg, (&x, &gs[..]), how(), &mut || {});
            let frozen_checked = ["dA2", "dB2"].map(|n| got.iter().any(|(name, _)| name == n));
            assert_eq!(
                frozen_checked, [true; 2],
                "{who}: the frozen adapter's dA, dB"
            );
            for ((name, a), (_, b)) in got.iter().zip(&want) {
                let f32_values = ["u", "gA", "dA", "dB"].iter().any(|p| name.starts_with(p));
                let tol = if f32_values { 1e-4 } else { 1e-2 };
                let e = rel_err(a, b);
                assert!(
                    e < tol,
                    "{who}: mix {k}: {name}: relative error {e:e} (bound {tol:e})"
                );
            }
            assert_eq!(got.len(), want.len());
        }
    }
}

/// A group as attention's side of a layer stores it with bf16 base weights: outputs that
/// feed kernels (`Feeds::Kernels`: q, k, v) stored bf16, and a bf16 `dx` (o_proj's, which
/// flash attention reads), written fresh or added to. Both projection paths store the
/// same types, and their values are the CPU's within the bf16 bound; with f32 base
/// weights everything is f32 (and 1e-4).
fn stored_types(g: &CudaBackend, path: ProjectionGemm, accumulate: bool) {
    g.set_projection_gemm(path);
    let (m, d_in, r) = (70, 96, 8);
    let outs = [96, 48, 48];
    let lg = LoraGroup { r, scale: 2.0 };
    let bf16 = g.base_dtype() == BaseDtype::Bf16;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let cpu = CpuBackend::new(2);
    // x, and dx before the backward, as stored on the device (the CPU gets the same values).
    let (x, hx) = if bf16 {
        bf16_act(g, &mut rng, m, d_in)
    } else {
        let v = rnd(&mut rng, m * d_in, 1.0);
        (g.buf(v.clone()).unwrap(), v)
    };
    let (mut dx, hdx) = if bf16 {
        bf16_act(g, &mut rng, m, d_in)
    } else {
        let v = rnd(&mut rng, m * d_in, 1.0);
        (g.buf(v.clone()).unwrap(), v)
    };
    let hw: Vec<Vec<f32>> = outs.iter().map(|&o| rnd(&mut rng, o * d_in, 0.1)).collect();
    let hab: Vec<(Vec<f32>, Vec<f32>)> = outs
        .iter()
        .map(|&o| (rnd(&mut rng, r * d_in, 0.1), rnd(&mut rng, o * r, 0.5)))
        .collect();
    let hg: Vec<Vec<f32>> = outs.iter().map(|&o| rnd(&mut rng, m * o, 1.0)).collect();
    let tol = bound(g.base_dtype());
    let who = format!("{} accumulate {accumulate}", g.describe());
    let mut results = Vec::new();
    let before = g.stats();
    for on_device in [true, false] {
        let got = if on_device {
            let ty = |b: &Act| Some(b.dtype());
            let io = (&x, &mut dx, accumulate);
            group_outputs(g, m, d_in, lg, &outs, io, (&hw, &hab, &hg), ty)
        } else {
            let (cx, mut cdx) = (hx.clone(), hdx.clone());
            let io = (&cx, &mut cdx, accumulate);
            group_outputs(&cpu, m, d_in, lg, &outs, io, (&hw, &hab, &hg), |_| None)
        };
        results.push(got);
    }
    // Which path ran: the fused one calls no cuBLAS, the hybrid one once per base product,
    // the sequence at least once per product.
    let gemms = g.stats().since(&before).gemms;
    match path {
        ProjectionGemm::Fused => assert_eq!(gemms, 0, "{who}: cuBLAS called"),
        ProjectionGemm::Hybrid => assert_eq!(gemms, 6, "{who}: base products on cuBLAS"),
        ProjectionGemm::Cublas => assert!(gemms >= 12, "{who}: {gemms} cuBLAS calls"),
        // bf16: one u product for the group, then per projection the update, the base
        // product; backward per projection the base product and gA, and one dx product of
        // the LoRA factors for the group. f32: the plain sequence.
        ProjectionGemm::Folded => {
            assert_eq!(gemms, if bf16 { 14 } else { 18 }, "{who}: cuBLAS calls")
        }
    }
    let want_ty = if bf16 { DType::Bf16 } else { DType::F32 };
    let (got, want) = (&results[0], &results[1]);
    for ((name, x, _), (_, y, _)) in got.iter().zip(want) {
        let e = rel_err(x, y);
        eprintln!("{who}: {name}: {e:.1e}");
        assert!(
            e < tol,
            "{who}: {name}: relative error {e:e} (bound {tol:e})"
        );
    }
    for (name, _, ty) in got {
        if name.starts_with('y') || name == "dx" {
            assert_eq!(
                *ty,
                Some(want_ty),
                "{who}: {name} stored as the fused path stores it"
            );
        }
    }
}

/// Host weights, LoRA factors and output gradients of `stored_types`' group.
type GroupHost<'a> = (&'a [Vec<f32>], &'a [(Vec<f32>, Vec<f32>)], &'a [Vec<f32>]);

/// Outputs of `stored_types`' group on `be` from `(x, dx, accumulate)`: `(name, values,
/// storage type as `ty` reads it)`.
#[allow(clippy::too_many_arguments)]
fn group_outputs<B: Backend>(
    be: &B,
    m: usize,
    d_in: usize,
    lg: LoraGroup,
    outs: &[usize],
    (x, dx, accumulate): (&B::Buf, &mut B::Buf, bool),
    (hw, hab, hg): GroupHost<'_>,
    ty: impl Fn(&B::Buf) -> Option<DType>,
) -> Vec<(String, Vec<f32>, Option<DType>)> {
    let up = |v: &[f32]| be.buf(v.to_vec()).unwrap();
    let ws: Vec<B::Weight> = outs
        .iter()
        .zip(hw)
        .map(|(&o, w)| be.weight(w.clone(), o, d_in).unwrap())
        .collect();
    let ab: Vec<(B::Buf, B::Buf)> = hab.iter().map(|(a, b)| (up(a), up(b))).collect();
    let gs: Vec<B::Buf> = hg.iter().map(|v| up(v)).collect();
    let fwd: Vec<ProjFwd<'_, B>> = outs
        .iter()
        .enumerate()
        .map(|(i, &d_out)| ProjFwd {
            w: &ws[i],
            d_out,
            lora: Some((&ab[i].0, &ab[i].1)),
            feeds: Feeds::Kernels,
            rope: None,
        })
        .collect();
    let ys = be.project_group(x, m, d_in, lg, &fwd).unwrap();
    let mut out: Vec<(String, Vec<f32>, Option<DType>)> = ys
        .iter()
        .enumerate()
        .map(|(i, (y, _))| (format!("y{i}"), be.to_host(y).unwrap(), ty(y)))
        .collect();
    let bwd: Vec<ProjBwd<'_, B>> = (0..outs.len())
        .map(|i| ProjBwd {
            w: &ws[i],
            d_out: outs[i],
            g: &gs[i],
            lora: ys[i].1.as_ref().map(|u| LoraBwd {
                a: &ab[i].0,
                b: &ab[i].1,
                u,
                grads: None,
            }),
        })
        .collect();
    be.project_group_backward(x, m, d_in, lg, bwd, dx, accumulate)
        .unwrap();
    out.push(("dx".into(), be.to_host(dx).unwrap(), ty(dx)));
    out
}

#[test]
fn every_projection_path_stores_what_the_model_stores() {
    for base in [BaseDtype::Bf16, BaseDtype::F32] {
        for g in devices(base) {
            for path in ProjectionGemm::ALL {
                for accumulate in [false, true] {
                    stored_types(&g, path, accumulate);
                }
            }
        }
    }
}

/// RoPE on a group's outputs (the forward's q and k): rotated in the GEMM's epilogue for
/// head dims 16, 32 and 64, by rope.cu after the launch for others (48, 128). Outputs:
/// 5 heads of 64 (three column tiles, the last half full), 3 of 32 (one partial tile),
/// 7 of 16, 1 of 48, 2 of 128 and one not rotated (v); 300 rows (three row tiles, the
/// last partial) of three sequences of 100 positions.
fn rope_group<B: Backend>(be: &B, rotate: bool, separate: bool) -> Vec<Vec<f32>> {
    let (m, d_in, r, period) = (300, 96, 8, 100);
    let heads = [(5, 64), (3, 32), (7, 16), (1, 48), (2, 128), (2, 0)];
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let up = |v: Vec<f32>| be.buf(v).unwrap();
    let x = up(rnd(&mut rng, m * d_in, 1.0));
    let width = |(n, hd): (usize, usize)| n * if hd == 0 { 32 } else { hd };
    let mut ws = Vec::new();
    let mut ab = Vec::new();
    let mut tables = Vec::new();
    for &h in &heads {
        let d_out = width(h);
        ws.push(
            be.weight(rnd(&mut rng, d_out * d_in, 0.1), d_out, d_in)
                .unwrap(),
        );
        ab.push((
            up(rnd(&mut rng, r * d_in, 0.1)),
            up(rnd(&mut rng, d_out * r, 0.5)),
        ));
        tables.push(rope_table(be, &mut rng, period, h.1).2);
    }
    let specs: Vec<ProjFwd<'_, B>> = heads
        .iter()
        .enumerate()
        .map(|(i, &(n_heads, head_dim))| ProjFwd {
            w: &ws[i],
            d_out: width(heads[i]),
            lora: Some((&ab[i].0, &ab[i].1)),
            feeds: Feeds::Kernels,
            rope: (rotate && !separate && head_dim > 0).then(|| RopeOut {
                table: &tables[i],
                n_heads,
                head_dim,
            }),
        })
        .collect();
    let lg = LoraGroup { r, scale: 2.0 };
    let mut ys = be.project_group(&x, m, d_in, lg, &specs).unwrap();
    heads
        .iter()
        .zip(&mut ys)
        .zip(&tables)
        .map(|((&(n_heads, head_dim), (y, _)), t)| {
            if rotate && separate && head_dim > 0 {
                be.rope(y, t, m, n_heads, head_dim, false).unwrap();
            }
            be.to_host(y).unwrap()
        })
        .collect()
}

/// The rotation inside the GEMM is the separate pass it replaces, bit for bit, where the
/// output is f32 (the f32 engine): both rotate the same f32 sums with the same operations
/// (`rope_rotate` of common.cuh). With bf16 outputs the fused path rounds once where the
/// separate pass rounds before and after rotating, so there both are held to the CPU's
/// linear + LoRA + rope (bf16 bound), as is the f32 engine (1e-4). Unrotated, the outputs
/// differ from the rotated ones (the test can tell).
#[test]
fn rope_in_the_lora_gemm_epilogue() {
    let cpu = CpuBackend::new(2);
    let want = rope_group(&cpu, true, false);
    let plain = rope_group(&cpu, false, false);
    for base in [BaseDtype::F32, BaseDtype::Bf16] {
        let tol = match base {
            BaseDtype::F32 => 1e-4,
            BaseDtype::Bf16 => 1e-2,
        };
        for g in devices(base) {
            // The epilogue sees 32 x 64 warp tiles at 128 x 128 and 64 x 64 at the larger
            // tiles, in either block order.
            for t in ["128x128x32s3", "128x256x32s4-rows", "256x128x32s4"] {
                let t = LoraGemmTiling::parse(t).expect("a compiled tiling");
                g.set_lora_gemm_tiling(t);
                let fused = rope_group(&g, true, false);
                let separate = rope_group(&g, true, true);
                for (i, ((f, s), (w, p))) in fused
                    .iter()
                    .zip(&separate)
                    .zip(want.iter().zip(&plain))
                    .enumerate()
                {
                    let e = rel_err(f, w);
                    eprintln!(
                        "{} {}: output {i}: fused vs CPU {e:.1e}",
                        g.describe(),
                        base.name()
                    );
                    assert!(
                        e < tol,
                        "{} {}: output {i}: relative error {e:e} (bound {tol:e})",
                        g.describe(),
                        base.name()
                    );
                    if i < 5 {
                        assert!(rel_err(p, w) > 0.1, "output {i}: rotation changes it");
                    }
                    if base == BaseDtype::F32 {
                        let same = f.iter().zip(s).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "{} output {i}: fused and separate rotations differ",
                            g.describe()
                        );
                    }
                }
            }
        }
    }
}

/// The LoRA GEMM runs on tensor cores.
#[test]
#[cfg_attr(
    not(lalora_cuda_kernels),
    ignore = "built without CUDA kernels (no nvcc)"
)]
fn lora_gemm_ptx_uses_mma_sync() {
    let m = cuda::kernels::MODULES
        .iter()
        .find(|m| m.name == "lora_gemm")
        .expect("lora_gemm is registered");
    assert!(
        m.ptx()
            .contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32")
    );
}

/// A group whose buffers do not match its shapes is refused before any work, on every
/// path, with an error naming the path and the operand: forward with a B one row short,
/// backward with a dx one row short.
#[test]
fn mismatched_shapes_are_refused_on_every_path() {
    let g = sim(BaseDtype::Bf16);
    let (m, d_in, d_out, r) = (8, 16, 24, 4);
    let lg = LoraGroup { r, scale: 1.0 };
    let up = |n: usize| g.buf(vec![0.25; n]).unwrap();
    let (x, a) = (up(m * d_in), up(r * d_in));
    let w = g.weight(vec![0.1; d_out * d_in], d_out, d_in).unwrap();
    let (b_short, b) = (up((d_out - 1) * r), up(d_out * r));
    let (gy, u) = (up(m * d_out), up(m * r));
    for path in ProjectionGemm::ALL {
        g.set_projection_gemm(path);
        let op = match path {
            ProjectionGemm::Cublas => "cuBLAS sequence",
            ProjectionGemm::Folded => "folded sequence",
            _ => "LoRA GEMM",
        };
        let fwd = [ProjFwd {
            w: &w,
            d_out,
            lora: Some((&a, &b_short)),
            feeds: Feeds::Residual,
            rope: None,
        }];
        let err = match g.project_group(&x, m, d_in, lg, &fwd) {
            Ok(_) => panic!("{path:?}: a short B was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(op) && err.contains("B holds"),
            "{path:?}: {err}"
        );
        let bwd = vec![ProjBwd {
            w: &w,
            d_out,
            g: &gy,
            lora: Some(LoraBwd {
                a: &a,
                b: &b,
                u: &u,
                grads: None,
            }),
        }];
        let mut dx = up((m - 1) * d_in);
        let err = match g.project_group_backward(&x, m, d_in, lg, bwd, &mut dx, false) {
            Ok(_) => panic!("{path:?}: a short dx was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(op) && err.contains("dx holds"),
            "{path:?}: {err}"
        );
    }
}
