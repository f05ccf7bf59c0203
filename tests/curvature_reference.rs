//! Curvature against curvlinops / PyTorch on the tiny GQA fixture: on the CPU and on
//! the CUDA backend (simulator) with f32 base weights to 1e-4 relative, with bf16 base
//! weights to 2e-2; the Monte-Carlo Fisher against its exact expectation, and the
//! simulator's Monte-Carlo labels against the CPU's.

mod common;

use common::*;
use lalora_engine::backend::Backend;
use lalora_engine::backend::cuda::{BaseDtype, GramGemm};
use lalora_engine::curvature::{
    Curvature, Fisher, KfacApprox, KfacFactors, Scheme, Spec, estimate,
};
use lalora_engine::data::{RowFormat, read_jsonl};
use lalora_engine::io::TensorFile;

/// Where a check runs: a backend and its relative-error bound.
struct On<'a, B: Backend> {
    be: &'a B,
    tol: f64,
}

fn run<B: Backend>(
    on: &On<B>,
    t: &Tiny,
    scheme: Scheme,
    approx: KfacApprox,
    fisher: Fisher,
    examples: &[lalora_engine::data::Example],
) -> Curvature {
    let be = on.be;
    let model = tiny_model(be);
    let spec = Spec {
        scheme,
        fisher,
        approx,
        seed: 3,
    };
    let lora = t.adapter.map(|v| be.buf(v.clone())).unwrap();
    estimate(be, &model, &lora, examples, 4, spec, || {}).unwrap()
}

fn check<B: Backend>(on: &On<B>, name: &str, got: &[f32], want: Option<&[f32]>) {
    let want = want.unwrap_or_else(|| panic!("fixture lacks {name}"));
    let e = rel_err(got, want);
    assert!(
        e < on.tol,
        "{}: {name}: relative error {e:e}",
        on.be.describe()
    );
}

/// The tiny model's adapted modules: 2 layers x 7 projections.
const MODULES: usize = 14;

/// The KFAC factors of `c`, one per adapted module (a backend that returned fewer would
/// otherwise leave the missing ones unchecked).
fn factors(c: &Curvature) -> &[KfacFactors] {
    let f = c.kfac.as_deref().expect("kfac factors");
    assert_eq!((f.len(), c.mean.modules.len()), (MODULES, MODULES));
    f
}

/// The diag curvature's tensors, A and B of each adapted module.
fn diag_tensors(c: &Curvature) -> Vec<(String, Vec<usize>, &[f32])> {
    let t = c.diag.as_ref().expect("a diag curvature").named_tensors();
    assert_eq!(t.len(), 2 * MODULES);
    t
}

/// Run `f` on the CPU and on the simulator with f32 and bf16 base weights.
fn everywhere(
    f: impl Fn(&On<lalora_engine::backend::cpu::CpuBackend>),
    g: impl Fn(&On<lalora_engine::backend::cuda::CudaBackend>),
) {
    f(&On {
        be: &cpu(),
        tol: bound(None),
    });
    for base in [BaseDtype::F32, BaseDtype::Bf16] {
        g(&On {
            be: &sim(base),
            tol: bound(Some(base)),
        });
    }
}

#[test]
fn diag_empirical_matches_per_sequence_loop() {
    everywhere(diag_empirical, diag_empirical);
}

fn diag_empirical<B: Backend>(on: &On<B>) {
    let t = tiny();
    let c = run(
        on,
        &t,
        Scheme::Diag,
        KfacApprox::Expand,
        Fisher::Empirical,
        &t.examples,
    );
    assert_eq!((c.meta.n_sequences, c.meta.n_positions), (6, 144));
    for (name, _, f) in diag_tensors(&c) {
        check(
            on,
            &format!("diag_ef.{name}"),
            f,
            t.expected.get(&format!("diag_ef.{name}")),
        );
    }
}

#[test]
fn kfac_expand_matches_curvlinops() {
    everywhere(kfac_expand, kfac_expand);
}

/// The same with the bf16 engine's Grams of two bf16 operands on cuBLAS (`GramGemm::Cublas`)
/// instead of its tensor-core kernel, at the same bound.
#[test]
fn kfac_expand_with_cublas_grams_matches_curvlinops() {
    let be = sim(BaseDtype::Bf16);
    be.set_gram_gemm(GramGemm::Cublas);
    kfac_expand(&On {
        be: &be,
        tol: bound(Some(BaseDtype::Bf16)),
    });
}

/// The four factors of module `p` against the fixture's `{prefix}_in.{p}.lora_A`
/// (`C_A`), `{prefix}_out.{p}.lora_A` (`G_A`), and likewise `lora_B` (`C_B`, `G_B`).
fn check_factors<B: Backend>(
    on: &On<B>,
    p: &str,
    f: &KfacFactors,
    prefix: &str,
    want: &TensorFile,
) {
    for (got, side, t) in [
        (&f.a_in, "in", "A"),
        (&f.a_out, "out", "A"),
        (&f.b_in, "in", "B"),
        (&f.b_out, "out", "B"),
    ] {
        let name = format!("{prefix}_{side}.{p}.lora_{t}");
        check(on, &name, got, want.get(&name));
    }
}

fn kfac_expand<B: Backend>(on: &On<B>) {
    let t = tiny();
    let c = run(
        on,
        &t,
        Scheme::Kfac,
        KfacApprox::Expand,
        Fisher::Empirical,
        &t.examples,
    );
    for (m, f) in c.mean.modules.iter().zip(factors(&c)) {
        check_factors(on, &m.peft_path(), f, "kfac", &t.expected);
        assert!(f.cross.is_none());
    }
}

#[test]
fn kfac_reduce_and_tri_cross_match_curvlinops() {
    everywhere(kfac_reduce_and_tri, kfac_reduce_and_tri);
}

fn kfac_reduce_and_tri<B: Backend>(on: &On<B>) {
    let t = tiny();
    let extra = TensorFile::read(&fixture("tiny-gqa/kfac_extra.safetensors")).unwrap();
    let c = run(
        on,
        &t,
        Scheme::Kfac,
        KfacApprox::Reduce,
        Fisher::Empirical,
        &t.examples,
    );
    for (m, f) in c.mean.modules.iter().zip(factors(&c)) {
        check_factors(on, &m.peft_path(), f, "kfac_reduce", &extra);
    }
    let c = run(
        on,
        &t,
        Scheme::KfacTri,
        KfacApprox::Expand,
        Fisher::Empirical,
        &t.examples,
    );
    for (m, f) in c.mean.modules.iter().zip(factors(&c)) {
        let p = m.peft_path();
        let (ci, co) = f.cross.as_ref().unwrap();
        check(
            on,
            &format!("{p} cross in"),
            ci,
            extra.get(&format!("kfac_cross_in.{p}")),
        );
        check(
            on,
            &format!("{p} cross out"),
            co,
            extra.get(&format!("kfac_cross_out.{p}")),
        );
        check(
            on,
            &format!("{p} tri B out"),
            &f.b_out,
            t.expected.get(&format!("kfac_out.{p}.lora_B")),
        );
    }
}

#[test]
fn curvature_file_round_trips() {
    let t = tiny();
    let on = On {
        be: &cpu(),
        tol: bound(None),
    };
    let d = tempfile::tempdir().unwrap();
    for scheme in [Scheme::Diag, Scheme::KfacTri] {
        let c = run(
            &on,
            &t,
            scheme,
            KfacApprox::Expand,
            Fisher::Empirical,
            &t.examples,
        );
        let p = d.path().join("c.safetensors");
        c.write(&p).unwrap();
        // The same content, the same bytes (the metadata's order is not left to a hash).
        let again = d.path().join("again.safetensors");
        c.write(&again).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert!(
            bytes == std::fs::read(&again).unwrap(),
            "{scheme}: two writes differ"
        );
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
        let (format, scheme_key) = (header.find("\"format\""), header.find("\"scheme\""));
        assert!(format.unwrap() < scheme_key.unwrap(), "{header}");
        let back = Curvature::read(&p, &t.loaded.cfg).unwrap();
        assert_eq!(back.meta.scheme, scheme);
        assert_eq!(back.meta.n_sequences, 6);
        assert_eq!(back.mean.named_tensors(), c.mean.named_tensors());
        if scheme == Scheme::Diag {
            assert_eq!(diag_tensors(&back), diag_tensors(&c));
        } else {
            for (a, b) in factors(&c).iter().zip(factors(&back)) {
                assert_eq!(
                    (&a.a_in, &a.a_out, &a.b_in, &a.b_out, &a.cross),
                    (&b.a_in, &b.a_out, &b.b_in, &b.b_out, &b.cross)
                );
            }
        }
    }
}

fn mc_examples() -> Vec<lalora_engine::data::Example> {
    read_jsonl(
        &fixture("tiny-gqa/mc_batch.jsonl"),
        Err(lalora_engine::Error::usage("the fixture is pre-tokenized")),
        512,
        RowFormat { max_len: 64 },
    )
    .unwrap()
}

/// `||estimate - expectation|| / ||expectation||` over all tensors of one kind.
fn mc_errors(t: &Tiny, samples: usize) -> (f64, f64) {
    let ex = mc_examples();
    let on = On {
        be: &cpu(),
        tol: bound(None),
    };
    let want = TensorFile::read(&fixture("tiny-gqa/mc_expected.safetensors")).unwrap();
    let err = |pairs: Vec<(Vec<f32>, &[f32])>| {
        let (mut num, mut den) = (0f64, 0f64);
        for (g, w) in pairs {
            num += g
                .iter()
                .zip(w)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>();
            den += w.iter().map(|b| (*b as f64).powi(2)).sum::<f64>();
        }
        (num / den).sqrt()
    };
    let d = run(
        &on,
        t,
        Scheme::Diag,
        KfacApprox::Expand,
        Fisher::Mc(samples),
        &ex,
    );
    let diag_pairs = diag_tensors(&d)
        .into_iter()
        .map(|(n, _, f)| (f.to_vec(), want.get(&format!("diag_mc.{n}")).unwrap()))
        .collect();
    let k = run(
        &on,
        t,
        Scheme::Kfac,
        KfacApprox::Expand,
        Fisher::Mc(samples),
        &ex,
    );
    let mut kfac_pairs = Vec::new();
    for (m, f) in k.mean.modules.iter().zip(factors(&k)) {
        let p = m.peft_path();
        kfac_pairs.push((
            f.a_out.clone(),
            want.get(&format!("kfac_out_mc.{p}.lora_A")).unwrap(),
        ));
        kfac_pairs.push((
            f.b_out.clone(),
            want.get(&format!("kfac_out_mc.{p}.lora_B")).unwrap(),
        ));
    }
    (err(diag_pairs), err(kfac_pairs))
}

#[test]
fn mc_fisher_is_unbiased() {
    let t = tiny();
    let (d_small, k_small) = mc_errors(&t, 250);
    let (d_big, k_big) = mc_errors(&t, 4000);
    eprintln!(
        "MC relative error: 250 samples diag {d_small:.4} kfac {k_small:.4}; 4000 samples diag {d_big:.4} kfac {k_big:.4}"
    );
    // 16x the samples should shrink the error ~4x; allow sampling noise down to 1.7x.
    assert!(
        d_big < 0.05 && k_big < 0.05,
        "4000 samples: diag {d_big}, kfac {k_big}"
    );
    assert!(
        d_big < d_small / 1.7 && k_big < k_small / 1.7,
        "error does not shrink like 1/sqrt(samples)"
    );
}

/// The simulator draws the same Monte-Carlo labels as the CPU (one counter-based uniform
/// per row, the CDF inverted in the same order): with f32 base weights its MC curvature
/// equals the CPU's. (With bf16 base weights the logits differ by ~1e-2, so a few labels
/// fall on the other side of a CDF boundary and the estimates differ by a sampling error,
/// not a rounding error: no bound of 2e-2 applies there.)
#[test]
fn mc_fisher_on_sim_equals_cpu() {
    let t = tiny();
    let ex = mc_examples();
    let cpu_on = On {
        be: &cpu(),
        tol: bound(None),
    };
    {
        let s = sim(BaseDtype::F32);
        let on = On {
            be: &s,
            tol: bound(Some(BaseDtype::F32)),
        };
        for scheme in [Scheme::Diag, Scheme::KfacTri] {
            let want = run(&cpu_on, &t, scheme, KfacApprox::Expand, Fisher::Mc(2), &ex);
            let got = run(&on, &t, scheme, KfacApprox::Expand, Fisher::Mc(2), &ex);
            match scheme {
                Scheme::Diag => {
                    for ((n, _, x), (_, _, y)) in
                        diag_tensors(&got).into_iter().zip(diag_tensors(&want))
                    {
                        check(&on, &format!("mc diag {n}"), x, Some(y));
                    }
                }
                _ => {
                    for (x, y) in factors(&got).iter().zip(factors(&want)) {
                        check(&on, "mc kfac A in", &x.a_in, Some(&y.a_in));
                        check(&on, "mc kfac A out", &x.a_out, Some(&y.a_out));
                        check(&on, "mc kfac B in", &x.b_in, Some(&y.b_in));
                        check(&on, "mc kfac B out", &x.b_out, Some(&y.b_out));
                        let ((xi, xo), (yi, yo)) =
                            (x.cross.as_ref().unwrap(), y.cross.as_ref().unwrap());
                        check(&on, "mc kfac cross in", xi, Some(yi));
                        check(&on, "mc kfac cross out", xo, Some(yo));
                    }
                }
            }
        }
    }
}
