//! The one seam between the CUDA backend and a device: allocate, copy, load a PTX module,
//! launch one of its entries, run a cuBLAS-style GEMM, synchronise. Two implementations:
//! `driver::Driver` (cudarc: the CUDA driver and cuBLAS) and `sim::Sim` (the PTX
//! simulator and its cuBLAS twin), so the same backend code runs on a GPU and on the CPU.
//!
//! The vocabulary of launches and GEMMs is the simulator's plain data types (`Arg`,
//! `LaunchConfig`, `Gemm`): the driver implementation translates them to cudarc calls.

pub use crate::ptxsim::blas::{DType, Gemm, Mat, Trans};
pub use crate::ptxsim::{Arg, LaunchConfig};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::kernel_times::KernelTimes;
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
    /// A mark on the device's queue after all work queued so far, for timing it.
    fn mark(&self) -> Result<Box<dyn Mark>>;
}

/// A point on the device's queue (`Runtime::mark`): a CUDA event on a GPU, the host clock
/// on the simulator, which runs each call to completion before returning.
pub trait Mark: Send + Sync {
    /// Milliseconds from `earlier`, a mark of the same runtime, to this one (waits for
    /// both to be reached).
    fn ms_since(&self, earlier: &dyn Mark) -> Result<f64>;
    fn as_any(&self) -> &dyn std::any::Any;
}

/// `earlier` as a mark of the runtime `who` (type `T`), for `Mark::ms_since`.
pub fn same_runtime<'a, T: 'static>(earlier: &'a dyn Mark, who: &str) -> Result<&'a T> {
    earlier
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| crate::error::Error::Device(format!("{who}: a mark of another runtime")))
}

/// What went through the runtime seam: counts since the backend started (see
/// `CudaBackend::stats`); the difference of two snapshots (`since`) is the cost of the
/// work between them, e.g. one training step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuntimeStats {
    /// Kernel launches.
    pub launches: u64,
    /// cuBLAS-style GEMM calls (each one or a few launches on a GPU).
    pub gemms: u64,
    /// Device allocations (from the stream-ordered pool on a GPU), their bytes, and frees.
    pub allocs: u64,
    pub alloc_bytes: u64,
    pub frees: u64,
    /// Host-to-device and device-to-device copies: queued on the stream, no wait.
    pub htod: u64,
    pub dtod: u64,
    /// Device-to-host copies: each waits for all queued work (a host sync).
    pub dtoh: u64,
    /// Explicit waits for the stream.
    pub synchronizes: u64,
}

impl RuntimeStats {
    /// Times the host waited for the device: `dtoh + synchronizes`.
    pub fn host_syncs(&self) -> u64 {
        self.dtoh + self.synchronizes
    }

    /// The counts between `earlier` and `self`.
    pub fn since(&self, earlier: &RuntimeStats) -> RuntimeStats {
        RuntimeStats {
            launches: self.launches - earlier.launches,
            gemms: self.gemms - earlier.gemms,
            allocs: self.allocs - earlier.allocs,
            alloc_bytes: self.alloc_bytes - earlier.alloc_bytes,
            frees: self.frees - earlier.frees,
            htod: self.htod - earlier.htod,
            dtod: self.dtod - earlier.dtod,
            dtoh: self.dtoh - earlier.dtoh,
            synchronizes: self.synchronizes - earlier.synchronizes,
        }
    }
}

impl std::fmt::Display for RuntimeStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} host syncs ({} device-to-host copies), {} kernel launches, {} GEMMs, {} allocations ({} bytes), {} frees, {} host-to-device and {} device-to-device copies",
            self.host_syncs(),
            self.dtoh,
            self.launches,
            self.gemms,
            self.allocs,
            self.alloc_bytes,
            self.frees,
            self.htod,
            self.dtod
        )
    }
}

/// Any runtime with its calls counted (relaxed atomic increments: a few nanoseconds
/// against microseconds per call), so both the driver and the simulator report the same
/// counts for the same backend code.
pub struct Counted {
    inner: Arc<dyn Runtime>,
    launches: AtomicU64,
    gemms: AtomicU64,
    allocs: AtomicU64,
    alloc_bytes: AtomicU64,
    frees: AtomicU64,
    htod: AtomicU64,
    dtod: AtomicU64,
    dtoh: AtomicU64,
    synchronizes: AtomicU64,
    /// Device time per kernel while `timing` is on (`Counted::time_kernels`).
    timing: AtomicBool,
    times: Mutex<KernelTimes>,
    memory: Mutex<Memory>,
}

/// This backend's live device allocations: their sizes, their sum and its peak.
#[derive(Default)]
struct Memory {
    sizes: std::collections::HashMap<u64, usize>,
    live: usize,
    peak: usize,
}

/// Bytes of device memory this backend holds (`Counted::memory`): now, and at most since
/// the start or the last `reset_peak`. The sum of its allocations' sizes: what the work
/// needs, not counting cuBLAS's workspace, the CUDA context, or what the stream-ordered pool
/// keeps beyond it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    pub live: usize,
    pub peak: usize,
}

fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

impl Counted {
    pub fn new(inner: Arc<dyn Runtime>) -> Self {
        Counted {
            inner,
            launches: AtomicU64::new(0),
            gemms: AtomicU64::new(0),
            allocs: AtomicU64::new(0),
            alloc_bytes: AtomicU64::new(0),
            frees: AtomicU64::new(0),
            htod: AtomicU64::new(0),
            dtod: AtomicU64::new(0),
            dtoh: AtomicU64::new(0),
            synchronizes: AtomicU64::new(0),
            timing: AtomicBool::new(false),
            times: Mutex::new(KernelTimes::default()),
            memory: Mutex::new(Memory::default()),
        }
    }

    fn lock_memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Device bytes held now and at the peak.
    pub fn memory(&self) -> MemoryStats {
        let m = self.lock_memory();
        MemoryStats {
            live: m.live,
            peak: m.peak,
        }
    }

    /// Start a new peak from the bytes held now.
    pub fn reset_peak(&self) {
        let mut m = self.lock_memory();
        m.peak = m.live;
    }

    /// Start (after clearing what was timed before) or stop timing each kernel launch and
    /// GEMM on the device: a mark before and after each call. Where the stream is busy (a
    /// training step queues far ahead) the two marks bracket the kernel alone; on an idle
    /// device the first mark passes before the launch reaches it, so the launch's latency
    /// counts in. The marks cost a few microseconds of host time per call, and every 2048
    /// calls the host waits for the device to read them (`kernel_times.rs`).
    pub fn time_kernels(&self, on: bool) {
        if on {
            *self.lock_times() = KernelTimes::default();
        }
        self.timing.store(on, Ordering::Relaxed);
    }

    /// Device time per kernel (and per cuBLAS call shape) timed so far, the longest
    /// first; waits for the timed work to finish.
    pub fn kernel_times(&self) -> Result<Vec<super::kernel_times::KernelTime>> {
        self.lock_times().totals()
    }

    fn lock_times(&self) -> std::sync::MutexGuard<'_, KernelTimes> {
        // A panic elsewhere leaves the totals consistent: take them as they are.
        self.times.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `call` on the inner runtime, between two marks when timing, under `name()`.
    fn timed(
        &self,
        name: impl FnOnce() -> String,
        call: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        if !self.timing.load(Ordering::Relaxed) {
            return call();
        }
        // A failure to time is kept for `kernel_times` to report; the launch stands.
        let start = self.inner.mark();
        call()?;
        let end = self.inner.mark();
        let mut times = self.lock_times();
        match (start, end) {
            (Ok(s), Ok(e)) => times.add(name(), s, e),
            (Err(e), _) | (_, Err(e)) => times.fail(e),
        }
        Ok(())
    }

    pub fn stats(&self) -> RuntimeStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RuntimeStats {
            launches: get(&self.launches),
            gemms: get(&self.gemms),
            allocs: get(&self.allocs),
            alloc_bytes: get(&self.alloc_bytes),
            frees: get(&self.frees),
            htod: get(&self.htod),
            dtod: get(&self.dtod),
            dtoh: get(&self.dtoh),
            synchronizes: get(&self.synchronizes),
        }
    }
}

impl Runtime for Counted {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn alloc(&self, bytes: usize, zeroed: bool) -> Result<u64> {
        bump(&self.allocs, 1);
        bump(&self.alloc_bytes, bytes as u64);
        let ptr = self.inner.alloc(bytes, zeroed)?;
        let mut m = self.lock_memory();
        m.sizes.insert(ptr, bytes);
        m.live += bytes;
        m.peak = m.peak.max(m.live);
        Ok(ptr)
    }
    fn free(&self, ptr: u64) {
        bump(&self.frees, 1);
        {
            let mut m = self.lock_memory();
            if let Some(bytes) = m.sizes.remove(&ptr) {
                m.live -= bytes;
            }
        }
        self.inner.free(ptr)
    }
    fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        bump(&self.htod, 1);
        self.inner.htod(dst, src)
    }
    fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        bump(&self.dtoh, 1);
        self.inner.dtoh(dst, src)
    }
    fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        bump(&self.dtod, 1);
        self.inner.dtod(dst, src, bytes)
    }
    fn load_module(&self, src: &PtxSource) -> Result<usize> {
        self.inner.load_module(src)
    }
    fn launch(&self, module: usize, entry: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        bump(&self.launches, 1);
        self.timed(
            || super::kernel_times::launch_name(entry, &cfg),
            || self.inner.launch(module, entry, cfg, args),
        )
    }
    fn gemm(&self, g: &Gemm) -> Result<()> {
        bump(&self.gemms, 1);
        self.timed(|| super::kernel_times::gemm_name(g), || self.inner.gemm(g))
    }
    fn synchronize(&self) -> Result<()> {
        bump(&self.synchronizes, 1);
        self.inner.synchronize()
    }
    fn mark(&self) -> Result<Box<dyn Mark>> {
        self.inner.mark()
    }
}
