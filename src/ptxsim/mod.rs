//! A simulator of an NVIDIA GPU for the PTX this crate's kernels compile to: it parses
//! the very PTX text the driver would JIT, lowers it once into a compact register-indexed
//! form, and runs launches on the CPU (blocks in parallel), with the checks of
//! compute-sanitizer (memcheck, racecheck, initcheck, synccheck) and the driver's launch
//! validation. See `device` for the runtime interface and `blas` for the cuBLAS twin.

mod alu;
pub mod blas;
mod block;
pub mod device;
pub mod fault;
mod float;
pub mod ir;
mod lex;
pub mod lower;
mod matrix;
pub mod memory;
pub mod parse;

pub use device::{Arg, Device, Function, LaunchConfig, Module, SimError};
pub use fault::{Check, Checks, Fault};
