//! PTX-level tests of the GPU simulator (`lalora_engine::ptxsim`): small hand-written
//! kernels, each exercising one feature, run on the simulated device, with every result
//! compared against an expectation computed here independently (plain matrix products,
//! the formulas of the PTX ISA manual, exactly known IEEE results), never against the
//! simulator's own output. Section references are to the PTX ISA manual (9.x) unless
//! said otherwise.

use bytemuck::{Pod, Zeroable};
use lalora_engine::ptxsim::blas::{DType, Gemm, Mat, Trans};
use lalora_engine::ptxsim::{Arg, Check, Checks, Device, Fault, LaunchConfig, SimError};

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

fn dev() -> Device {
    Device::new(Checks::default(), 1 << 28, 2).expect("the simulator starts")
}

fn module(target: &str, body: &str) -> String {
    format!(".version 9.0\n.target {target}\n.address_size 64\n{body}")
}

fn sm80(body: &str) -> String {
    module("sm_80", body)
}

fn cfg(grid: u32, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid: [grid, 1, 1],
        block: [block, 1, 1],
        shared_bytes: 0,
    }
}

fn up<T: Pod>(d: &Device, v: &[T]) -> u64 {
    let bytes: &[u8] = bytemuck::cast_slice(v);
    let p = d.alloc(bytes.len().max(1), false).expect("alloc");
    d.htod(p, bytes).expect("htod");
    p
}

/// An output buffer of `n` elements, zero-filled (so partial writes can be read back).
fn zeros<T: Pod>(d: &Device, n: usize) -> u64 {
    d.alloc((n * std::mem::size_of::<T>()).max(1), true)
        .expect("alloc")
}

fn down<T: Pod + Zeroable>(d: &Device, p: u64, n: usize) -> Vec<T> {
    let mut v = vec![T::zeroed(); n];
    d.dtoh(bytemuck::cast_slice_mut(&mut v), p).expect("dtoh");
    v
}

fn launch(
    d: &Device,
    ptx: &str,
    entry: &str,
    c: LaunchConfig,
    args: &[Arg],
) -> Result<(), SimError> {
    let m = d.load_module("test", ptx)?;
    let f = d
        .function(&m, entry)
        .unwrap_or_else(|| panic!("no entry `{entry}`"));
    d.launch(&f, c, args)
}

fn ok(d: &Device, ptx: &str, entry: &str, c: LaunchConfig, args: &[Arg]) {
    if let Err(e) = launch(d, ptx, entry, c, args) {
        panic!("launch of `{entry}` failed: {e}");
    }
}

fn fault(r: Result<(), SimError>) -> Fault {
    match r {
        Err(SimError::Fault(f)) => *f,
        other => panic!("expected a fault report, got {other:?}"),
    }
}

fn launch_error(r: Result<(), SimError>) -> String {
    match r {
        Err(SimError::Launch(m)) => m,
        other => panic!("expected a launch error, got {other:?}"),
    }
}

/// The 1-based line of `ptx` that contains `marker` (exactly one line must).
fn line_of(ptx: &str, marker: &str) -> u32 {
    let hits: Vec<usize> = ptx
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(marker))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "marker `{marker}` must be on one line");
    hits[0] as u32 + 1
}

fn p(v: u64) -> Arg<'static> {
    Arg::U64(v)
}

/// Deterministic pseudo-random numbers (64-bit LCG, top bits).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 16
    }
    /// An integer in [lo, hi].
    fn int(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
    /// A uniform f64 in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 5) as f64 / (1u64 << 43) as f64
    }
}

mod arith;
mod atomics;
mod barriers;
mod blas;
mod launch;
mod matrix;
mod memory;
mod robustness;
mod speed;
mod warp;
