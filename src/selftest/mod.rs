//! `selftest`: every `Backend` op on random non-zero inputs at several shapes (tails,
//! grid-stride wrap-around, LoRA ranks up to 64, head dims 64 and 128, a vocabulary above
//! 32k) held to a reference, then gradients, curvature (diag, kfac, kfac-tri; empirical and
//! Monte-Carlo Fisher) and training steps of a built-in tiny Llama compared tensor by
//! tensor. What a user runs first on a new GPU.
//!
//! The code is generic over the backend under test and its reference: the CUDA backend
//! (on a GPU or on the simulator) is held to the CPU backend, and the CPU backend to
//! [`Reference`], a plain f64 implementation of every op (a backend held to itself could
//! not fail).

mod cases;
mod check;
mod e2e;
mod reference;
mod report;
mod tap;
#[cfg(test)]
mod tests;
mod tiny;

use std::time::Instant;

pub use self::check::{Tolerance, rel_err};
pub use self::reference::Reference;
pub use self::report::{Metric, Report, Row};

use self::check::Checker;
use crate::backend::Backend;
pub use crate::backend::cuda::BaseDtype;
use crate::error::Result;

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// How the device stores base weights: sets the bounds of the ops that read them
    /// (see [`Tolerance`]).
    pub base_dtype: BaseDtype,
    /// Seeds every random input.
    pub seed: u64,
    /// Run the per-op cases.
    pub kernels: bool,
    /// Run the tiny-model gradient, curvature and training comparisons.
    pub end_to_end: bool,
}

/// Check `dev` against `reference`. `progress` hears each case before it runs. Errors
/// are only those the backends raise (a device fault ends the run); a wrong result is a
/// failed row of the report, never an error.
pub fn run<D: Backend, R: Backend>(
    dev: &D,
    reference: &R,
    opts: &Options,
    progress: &mut dyn FnMut(&str),
) -> Result<Report> {
    let t0 = Instant::now();
    let mut c = Checker::new(dev, reference, opts, progress);
    if opts.kernels {
        cases::run_all(&mut c)?;
    }
    if opts.end_to_end {
        e2e::run_all(&mut c, opts.seed)?;
    }
    Ok(Report {
        device: dev.describe(),
        reference: reference.describe(),
        base_dtype: opts.base_dtype,
        rows: c.rows,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
