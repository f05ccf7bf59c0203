//! The cores' f32 FMA peak at the SIMD level the engine runs ([`super::simd`]), measured:
//! the ceiling the CPU benches report the engine's products against, as the CUDA benches
//! report theirs against the H200's. A machine's peak is not in any table one can read
//! under a hypervisor (the clock is hidden, and AVX-512 may run at a lower one), so each
//! pool thread runs a loop of nothing but independent FMAs, all threads at once, and the
//! rates are added.
//!
//! The loop holds twelve chains of FMAs in vector registers: with four cycles of latency
//! and two FMA pipes a core needs eight in flight to issue one per pipe every cycle.
//! Measured on a Zen 5 (2 vCPUs, 2026-12-02): 111-122 GFLOP/s a thread at AVX2 and
//! 224-253 at AVX-512, the clock moving with the host's load; the gemm crate's AVX2 kernel
//! ran SmolLM2's projection shapes (512 rows, one thread, weights in L3) at 88-98 % of
//! the AVX2 figure.

use std::time::Instant;

use super::{Simd, simd};

/// Independent FMA chains per thread.
const CHAINS: usize = 12;

/// Loop iterations per measurement: about 30 ms at AVX2 on a 3.5 GHz core.
const ITERS: usize = 8_000_000;

/// Measurements per thread; the fastest counts (the first ones may find the core still
/// clocking up, or preempted).
const REPEATS: usize = 4;

/// `REPEATS` runs of [`ITERS`] x [`CHAINS`] FMAs on every thread of the current rayon pool
/// at once; the sum over threads of each thread's best rate, in FLOP/s (2 per FMA lane).
pub fn fma_peak() -> f64 {
    let level = simd();
    rayon::broadcast(|_| {
        (0..REPEATS)
            .map(|_| {
                let t = Instant::now();
                let (flops, sink) = run(level, ITERS);
                std::hint::black_box(sink);
                flops / t.elapsed().as_secs_f64()
            })
            .fold(0.0, f64::max)
    })
    .into_iter()
    .sum()
}

/// f32 lanes of one FMA at `level`.
fn lanes(level: Simd) -> usize {
    match level {
        Simd::Avx512 => 16,
        Simd::Avx2 => 8,
        Simd::Below => 1,
    }
}

/// `iters` rounds of [`CHAINS`] FMAs at `level`: the FLOPs done (2 per lane) and a value
/// the caller keeps so that the loop cannot be dropped.
fn run(level: Simd, iters: usize) -> (f64, f32) {
    let flops = (iters * CHAINS * lanes(level) * 2) as f64;
    let sink = match level {
        // SAFETY: `simd` reports only levels the CPU has.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { chains_avx512(iters) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { chains_avx2(iters) },
        _ => chains_scalar(iters),
    };
    (flops, sink)
}

// The multiplier is below 1 and the addend small, so the chains converge instead of
// overflowing to infinities (which some cores run slower).
const MUL: f32 = 0.999_999;
const ADD: f32 = 1e-7;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn chains_avx512(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(MUL), _mm512_set1_ps(ADD));
    let mut acc = [_mm512_setzero_ps(); CHAINS];
    for _ in 0..iters {
        for c in acc.iter_mut() {
            *c = _mm512_fmadd_ps(*c, a, b);
        }
    }
    acc.iter().map(|&c| _mm512_reduce_add_ps(c)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn chains_avx2(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(MUL), _mm256_set1_ps(ADD));
    let mut acc = [_mm256_setzero_ps(); CHAINS];
    for _ in 0..iters {
        for c in acc.iter_mut() {
            *c = _mm256_fmadd_ps(*c, a, b);
        }
    }
    let mut lanes = [0f32; 8];
    let total = acc
        .iter()
        .fold(_mm256_setzero_ps(), |s, &c| _mm256_add_ps(s, c));
    // SAFETY: `lanes` holds the 8 floats stored.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total) };
    lanes.iter().sum()
}

fn chains_scalar(iters: usize) -> f32 {
    let mut acc = [0f32; CHAINS];
    for _ in 0..iters {
        for c in acc.iter_mut() {
            *c = c.mul_add(MUL, ADD);
        }
    }
    acc.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every lane of every chain runs `x <- x MUL + ADD` from zero, one rounding per FMA as
    /// `f32::mul_add` rounds: after 10 rounds each holds the scalar chain's value, so the
    /// sum is the lanes' count times it (an empty or shortened loop would leave less, and
    /// a level whose loop runs other than its `lanes` would leave another multiple).
    #[test]
    fn the_chains_run_their_fmas() {
        for level in [simd(), Simd::Below] {
            let n = (CHAINS * lanes(level)) as f32;
            let (flops, sink) = run(level, 10);
            assert_eq!(flops, 20.0 * n as f64);
            let x = (0..10).fold(0f32, |x, _| x.mul_add(MUL, ADD));
            assert!(
                (sink - n * x).abs() <= 1e-5 * n * x,
                "{level:?}: {sink} vs {}",
                n * x
            );
        }
    }
}
