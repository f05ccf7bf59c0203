//! `--device auto|cpu|cuda[:N]|sim` and `--base-dtype`: choose a backend and run a task
//! on it.

use std::str::FromStr;

use super::Backend;
use super::cpu::CpuBackend;
use super::cuda::{self, BaseDtype, CudaBackend};
use super::timed::Timed;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// CUDA when a device is present and the kernels were built, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
    /// The CUDA backend on the PTX simulator (CPU), with compute-sanitizer-like checks.
    Sim,
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            "sim" => Ok(Device::Sim),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device (auto, cpu, cuda, cuda:N or sim)")),
        }
    }
}

/// Where and how a command runs.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    pub device: Device,
    /// CPU threads (0: all cores): the CPU backend's, or the simulator's.
    pub threads: usize,
    pub quiet: bool,
    /// `--base-dtype`; None: bf16 on cuda and sim (the CPU computes in f32).
    pub base_dtype: Option<BaseDtype>,
    /// `--op-times`: time each backend op and print the table on stderr at the end.
    pub op_times: bool,
}

/// Work that is generic over the backend it runs on.
pub trait BackendTask {
    type Output: Send;
    fn run<B: Backend>(self, be: &B) -> Result<Self::Output>;
}

fn announce<B: Backend>(be: &B, quiet: bool) {
    if !quiet {
        eprintln!("device: {}", be.describe());
    }
}

/// `task` on `be`, through the per-op timer when asked (its table goes to stderr, after
/// the task and whatever it printed).
fn run_task<T: BackendTask, B: Backend>(task: T, be: &B, op_times: bool) -> Result<T::Output> {
    if !op_times {
        return task.run(be);
    }
    let timed = Timed::new(be);
    let out = task.run(&timed);
    eprint!("{}", timed.report());
    out
}

/// Run `task` on the chosen device, saying on stderr which one runs (unless quiet).
/// `auto` takes CUDA when the kernels were built and a GPU is present, else the CPU.
pub fn run_on<T: BackendTask + Send>(p: Placement, task: T) -> Result<T::Output> {
    let base = p.base_dtype.unwrap_or_default();
    let device = match p.device {
        Device::Auto if cuda::available() => Device::Cuda(0),
        Device::Auto => Device::Cpu,
        d => d,
    };
    match device {
        Device::Cuda(n) => {
            let be = CudaBackend::new(n, base).map_err(|e| match e {
                Error::Usage(m) | Error::Device(m) => {
                    Error::usage(format!("--device cuda:{n}: {m}"))
                }
                e => e,
            })?;
            announce(&be, p.quiet);
            if !p.op_times {
                return task.run(&be);
            }
            // Kernels run asynchronously: a host-side stopwatch would time their launches,
            // so a GPU reports each kernel's device time instead.
            let started = std::time::Instant::now();
            be.time_kernels(true);
            let out = task.run(&be)?;
            // The task's result stands even if reading its timings back fails.
            match be.kernel_times() {
                Ok(times) => eprint!(
                    "{}",
                    cuda::kernel_times::table(&times, 40, Some(started.elapsed().as_secs_f64()))
                ),
                Err(e) => eprintln!("--op-times: the kernel times could not be read: {e}"),
            }
            Ok(out)
        }
        Device::Sim => {
            let be = CudaBackend::sim(p.threads, base)?;
            announce(&be, p.quiet);
            run_task(task, &be, p.op_times)
        }
        _ => {
            if p.device == Device::Cpu && p.base_dtype == Some(BaseDtype::Bf16) {
                return Err(Error::usage(
                    "--base-dtype bf16 applies to --device cuda and sim; the CPU backend computes in f32",
                ));
            }
            let be = CpuBackend::new(p.threads);
            announce(&be, p.quiet);
            // On a pool thread, each parallel loop of an op splits its work in place. From
            // the main thread, each would hand its work to the pool and sleep until woken:
            // two context switches per loop, and generating a token runs thousands of them.
            rayon::scope(|_| run_task(task, &be, p.op_times))
        }
    }
}
