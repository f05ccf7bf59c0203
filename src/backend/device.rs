//! `--device auto|cpu|cuda[:N]`: choose a backend and run a task on it.

use std::str::FromStr;

use super::Backend;
use super::cpu::CpuBackend;
use super::cuda::{self, CudaBackend};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// CUDA when a device is present and the kernels were built, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device (auto, cpu, cuda or cuda:N)")),
        }
    }
}

/// Work that is generic over the backend it runs on.
pub trait BackendTask {
    type Output;
    fn run<B: Backend>(self, be: &B) -> Result<Self::Output>;
}

/// Run `task` on the chosen device, saying on stderr which one runs (unless `quiet`).
/// `auto` takes CUDA when the kernels were built and a device is present, else the CPU.
pub fn run_on<T: BackendTask>(
    device: Device,
    threads: usize,
    quiet: bool,
    task: T,
) -> Result<T::Output> {
    let ordinal = match device {
        Device::Cpu => None,
        Device::Cuda(n) => Some(n),
        Device::Auto => cuda::available().then_some(0),
    };
    match ordinal {
        Some(n) => {
            let be = CudaBackend::new(n).map_err(|e| match device {
                Device::Cuda(_) => Error::usage(format!("--device cuda:{n}: {e}")),
                _ => e,
            })?;
            if !quiet {
                eprintln!("device: {}", be.describe());
            }
            task.run(&be)
        }
        None => {
            let be = CpuBackend::new(threads);
            if !quiet {
                eprintln!("device: {}", be.describe());
            }
            task.run(&be)
        }
    }
}
