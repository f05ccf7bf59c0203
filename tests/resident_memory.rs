//! The CPU backend keeps freed memory resident for the next step (`keep_freed_memory`):
//! a buffer freed on a pool thread, where commands run, is served again without faulting
//! its pages back in. Before, a pool thread's glibc arena unmapped each of its 64 MiB heaps
//! as it emptied, and a training step faulted 200 MB back in every time. Here the pool
//! thread may share the main heap or an arena of its own (the test harness's thread
//! allocates first): both must keep their pages. And a finished curvature estimate is
//! handed over, not copied, when it is read out on the CPU.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

mod common;

use common::*;
use lalora_engine::backend::Backend;
use lalora_engine::backend::cpu::CpuBackend;
use lalora_engine::curvature::{
    Accumulator, Fisher, KfacApprox, Scheme, Spec, accumulate_batch, read_out,
};

/// Minor page faults of the calling thread so far.
fn faults() -> i64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes the struct it is given.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, u.as_mut_ptr()) };
    assert_eq!(rc, 0);
    // SAFETY: initialised by the successful call.
    unsafe { u.assume_init() }.ru_minflt
}

/// A step's worth of activation-sized buffers (each under a heap's 64 MiB; a larger one an
/// arena maps and unmaps on its own), written and freed; returns the faults it took.
fn step() -> i64 {
    let before = faults();
    let bufs: Vec<Vec<f32>> = (0..12)
        .map(|i| vec![i as f32 + 1.0; 10 << 20]) // 40 MB each
        .collect();
    assert!(bufs.iter().all(|b| b[b.len() - 1] > 0.0));
    drop(bufs);
    faults() - before
}

#[test]
fn a_second_step_reuses_the_first_steps_pages() {
    let _be = CpuBackend::new(2);
    let (first, second) = rayon::scope(|_| (step(), step()));
    // 480 MB is 117,000 pages of 4 KiB (240 huge pages where transparent huge pages are
    // always on): the first step faults them in, the second only allocator metadata.
    assert!(first >= 200, "first step: {first} faults");
    assert!(
        second * 50 < first,
        "second step: {second} faults, first {first}"
    );
}

/// `read_out` consumes the accumulator: on the CPU each factor of the estimate is the
/// accumulator's own buffer, so the estimate (1.2 GB for KFAC on the default model) is
/// never held twice.
#[test]
fn a_cpu_estimate_is_handed_over_not_copied() {
    let be = cpu();
    let t = tiny();
    let model = tiny_model(&be);
    let lora = t.adapter.map(|v| be.buf(v.clone())).unwrap();
    let batch = whole_batch(&t.examples);
    let positions = batch.segments.iter().map(|s| s.len).sum();
    for scheme in [Scheme::Diag, Scheme::KfacTri] {
        let spec = Spec {
            scheme,
            fisher: Fisher::Empirical,
            approx: KfacApprox::Expand,
            seed: 0,
        };
        let mut acc = Accumulator::new(&be, &lora, scheme, spec.approx).unwrap();
        accumulate_batch(&be, &model, &lora, &mut acc, &batch, 0, spec).unwrap();
        acc.finish(&be, positions, batch.batch).unwrap();
        let held: Vec<*const f32> = match (&acc.diag, &acc.kfac) {
            (Some(d), _) => {
                d.f.iter()
                    .flat_map(|(a, b)| [a.as_ptr(), b.as_ptr()])
                    .collect()
            }
            (_, Some(k)) => k
                .factors
                .iter()
                .flat_map(|f| [f.a_in.as_ptr(), f.b_out.as_ptr()])
                .collect(),
            _ => unreachable!("{scheme:?} keeps a diagonal or Kronecker factors"),
        };
        let c = read_out(&be, &lora, acc, spec, positions, batch.batch).unwrap();
        let out: Vec<*const f32> = match (&c.diag, &c.kfac) {
            (Some(d), _) => d
                .modules
                .iter()
                .flat_map(|m| [m.a.as_ptr(), m.b.as_ptr()])
                .collect(),
            (_, Some(k)) => k
                .iter()
                .flat_map(|f| [f.a_in.as_ptr(), f.b_out.as_ptr()])
                .collect(),
            _ => unreachable!(),
        };
        assert!(!held.is_empty());
        assert_eq!(out, held, "{scheme:?}: the estimate was copied");
    }
}
