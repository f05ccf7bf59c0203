//! The one seam between the CUDA backend and a device: allocate, copy, load a PTX module,
//! launch one of its entries, run a cuBLAS-style GEMM, synchronise. Two implementations:
//! `driver::Driver` (cudarc: the CUDA driver and cuBLAS) and `sim::Sim` (the PTX
//! simulator and its cuBLAS twin), so the same backend code runs on a GPU and on the CPU.
//!
//! The vocabulary of launches and GEMMs is the simulator's plain data types (`Arg`,
//! `LaunchConfig`, `Gemm`): the driver implementation translates them to cudarc calls.

pub use crate::ptxsim::blas::{DType, Gemm, Mat, Trans};
pub use crate::ptxsim::{Arg, LaunchConfig};

use crate::error::Result;

/// Where a module's PTX came from: embedded at build time or read from
/// `LALORA_PTX_DIR` (then errors in it name the file).
pub struct PtxSource<'a> {
    pub module: &'a str,
    pub text: &'a str,
    pub path: Option<&'a std::path::Path>,
    /// Entries the backend will launch: a module without one of them is refused at load.
    pub entries: &'a [&'a str],
}

pub trait Runtime: Send + Sync {
    /// The device, in words (`cuda:0 (NVIDIA H200)`, `sim (PTX simulator, ...)`).
    fn describe(&self) -> String;
    /// `bytes` of device memory; zero-filled when `zeroed` (else contents undefined).
    fn alloc(&self, bytes: usize, zeroed: bool) -> Result<u64>;
    fn free(&self, ptr: u64);
    fn htod(&self, dst: u64, src: &[u8]) -> Result<()>;
    fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()>;
    fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;
    /// Load a module; returns its id for `launch`.
    fn load_module(&self, src: &PtxSource) -> Result<usize>;
    /// Launch `entry` of module `module` (opting in to more than 48 KB of dynamic shared
    /// memory when the configuration asks for it).
    fn launch(&self, module: usize, entry: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()>;
    fn gemm(&self, g: &Gemm) -> Result<()>;
    /// Wait for all queued work.
    fn synchronize(&self) -> Result<()>;
}
