//! The CPU backend keeps freed memory resident for the next step (`keep_freed_memory`):
//! a buffer freed on a pool thread, where commands run, is served again without faulting
//! its pages back in. Before, a pool thread's glibc arena unmapped each of its 64 MiB heaps
//! as it emptied, and a training step faulted 200 MB back in every time. Here the pool
//! thread may share the main heap or an arena of its own (the test harness's thread
//! allocates first): both must keep their pages.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use lalora_engine::backend::cpu::CpuBackend;

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
