//! The CUDA backend: the hand-written kernels of `kernels/*.cu` (PTX from build.rs) for
//! every op, cuBLAS for the dense base-weight and attention products, all through one
//! runtime seam (`runtime::Runtime`) with two devices behind it: a GPU through cudarc
//! (`driver`), or the PTX simulator on the CPU (`sim`). Base weights are stored in bf16
//! (or f32 with `--base-dtype f32`), and so, then, are the activations that feed the
//! matmuls (normed hidden states, the SwiGLU output: `Act::Bf16`) and the projection
//! outputs that only kernels read (q/k/v, gate/up: `group::Feeds`), the gradient of the
//! attention output flash attention reads (`Backend::attention_dout`), and, unless KFAC
//! reduce sums them first, the gradients of the q/k/v and gate/up outputs (flash
//! attention's dq, dk, dv; dgate, dup: `group::GradFeeds`); the
//! residual stream, RMSNorm's rstd, LoRA weights, every other gradient, optimiser state and
//! curvature are f32 (`Act::F32`), and every kernel accumulates in f32. One stream, in
//! order; each op's CPU twin in `backend/cpu` is its reference.
//!
//! Allocation and waiting: ops allocate their outputs and scratch as they go (a training
//! step of SmolLM2-135M makes about 2,400 allocations, all freed by the next step), which
//! on a GPU are stream-ordered allocations from the device's default pool; `driver` raises
//! the pool's release threshold so that memory freed in one step is reused by the next
//! without returning to the driver. The host waits for the device only where it reads a
//! result back: a training step reads its losses, its batched reductions (`Backend::dots`)
//! and its finiteness check, a fixed count whatever the model's size. `CudaBackend::stats`
//! counts all of it (launches, GEMMs, allocations, copies, host syncs) on both runtimes.

mod act;
mod attention;
mod baselines;
pub mod blas;
mod classifier;
mod cublas_sequence;
mod curvature;
pub mod driver;
mod env_choice;
mod folded_sequence;
mod gram_gemm;
pub mod kernel_times;
pub mod kernels;
mod linear;
mod lora_gemm;
mod lora_tiling;
mod ops;
mod projection_gemm;
mod rows;
pub mod runtime;
pub mod sim;
mod storage;
mod vector;

use std::marker::PhantomData;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use self::act::Act;
use self::act::Wide;
pub use self::gram_gemm::GramGemm;
use self::kernels::Kernels;
pub use self::lora_tiling::LoraGemmTiling;
pub use self::projection_gemm::ProjectionGemm;
use self::runtime::{Arg, Counted, DType, LaunchConfig, Runtime, RuntimeStats};
use super::Segment;
use crate::error::{Error, Result};

/// Threads per block for the row and elementwise kernels.
const THREADS: u32 = 256;
/// LoRA ranks the register-blocked kernels support.
pub const MAX_RANK: usize = 64;

/// Storage type of the frozen base weights on the device (`--base-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseDtype {
    F32,
    #[default]
    Bf16,
}

impl FromStr for BaseDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(BaseDtype::F32),
            "bf16" => Ok(BaseDtype::Bf16),
            _ => Err(format!("`{s}` is not a base dtype (f32 or bf16)")),
        }
    }
}

impl BaseDtype {
    pub fn name(self) -> &'static str {
        match self {
            BaseDtype::F32 => "f32",
            BaseDtype::Bf16 => "bf16",
        }
    }
}

/// A typed device buffer: `len` elements of `T` at `ptr`, freed on drop. A buffer of
/// length 0 holds no allocation (`ptr` 0).
pub struct DevBuf<T> {
    ptr: u64,
    len: usize,
    rt: Arc<dyn Runtime>,
    _t: PhantomData<T>,
}

impl<T> DevBuf<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The device address (0 for an empty buffer).
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl<T> Drop for DevBuf<T> {
    fn drop(&mut self) {
        if self.ptr != 0 {
            self.rt.free(self.ptr);
        }
    }
}

/// A frozen base-weight matrix on the device.
pub struct Weight {
    buf: DevBuf<u8>,
    ty: DType,
}

impl Weight {
    pub fn ptr(&self) -> u64 {
        self.buf.ptr()
    }
}

pub struct CudaBackend {
    /// `counted`, as the seam every op goes through.
    rt: Arc<dyn Runtime>,
    counted: Arc<Counted>,
    kernels: Kernels,
    base: BaseDtype,
    /// The LoRA GEMM's tiling (`LoraGemmTiling::index`).
    lora_tiling: AtomicUsize,
    /// The projection groups' path (`ProjectionGemm`): its index in `ProjectionGemm::ALL`.
    projections: AtomicUsize,
    /// The bf16 Grams' path (`GramGemm`): its index in `GramGemm::ALL`.
    grams: AtomicUsize,
}

/// Whether a CUDA GPU can be used: kernels built, driver library present, a device.
pub fn available() -> bool {
    kernels::BUILT && driver::present()
}

fn need_kernels() -> Result<()> {
    if kernels::BUILT || kernels::ptx_dir().is_some() {
        Ok(())
    } else {
        Err(Error::usage(
            "this build has no CUDA kernels (nvcc was not found at build time); set NVCC and rebuild, or give LALORA_PTX_DIR",
        ))
    }
}

impl CudaBackend {
    /// The GPU `cuda:ordinal`.
    pub fn new(ordinal: usize, base: BaseDtype) -> Result<Self> {
        need_kernels()?;
        Self::on(Arc::new(driver::Driver::new(ordinal)?), base)
    }

    /// The PTX simulator, running blocks on `threads` host threads (0: all cores).
    pub fn sim(threads: usize, base: BaseDtype) -> Result<Self> {
        need_kernels()?;
        Self::on(Arc::new(sim::Sim::new(threads)?), base)
    }

    /// The backend on `device`, the LoRA GEMM's tiling the one `LALORA_LORA_GEMM_TILING`
    /// names, the projection path the one `LALORA_PROJECTION_GEMM` names and the bf16
    /// Grams' the one `LALORA_GRAM_GEMM` names, else the engine's tiling and the defaults.
    fn on(device: Arc<dyn Runtime>, base: BaseDtype) -> Result<Self> {
        let tiling = LoraGemmTiling::from_env()?;
        let projections = ProjectionGemm::from_env()?;
        let grams = GramGemm::from_env()?;
        let counted = Arc::new(Counted::new(device));
        let rt: Arc<dyn Runtime> = counted.clone();
        Ok(CudaBackend {
            kernels: Kernels::new(rt.clone()),
            rt,
            counted,
            base,
            lora_tiling: AtomicUsize::new(tiling.index()),
            projections: AtomicUsize::new(projections.index()),
            grams: AtomicUsize::new(grams.index()),
        })
    }

    /// Run the LoRA GEMM's launches with `tiling` from now on (the engine's own:
    /// `LoraGemmTiling::ENGINE`). Every tiling computes the same sums; they differ in speed.
    pub fn set_lora_gemm_tiling(&self, tiling: LoraGemmTiling) {
        self.lora_tiling.store(tiling.index(), Ordering::Relaxed)
    }

    /// The LoRA GEMM's tiling now.
    pub fn lora_gemm_tiling(&self) -> LoraGemmTiling {
        LoraGemmTiling::at(self.lora_tiling.load(Ordering::Relaxed))
    }

    /// Run the projection groups on `path` from now on (the default:
    /// `ProjectionGemm::Cublas`). All compute the same products to the same bounds; they
    /// differ in speed and in the order of their sums (and `Folded` in its rounding of
    /// `z`: `folded_sequence.rs`).
    pub fn set_projection_gemm(&self, path: ProjectionGemm) {
        self.projections.store(path.index(), Ordering::Relaxed)
    }

    /// The projection groups' path now.
    pub fn projection_gemm(&self) -> ProjectionGemm {
        ProjectionGemm::ALL[self.projections.load(Ordering::Relaxed)]
    }

    /// Form the KFAC Grams of two bf16 operands on `path` from now on (the default:
    /// `GramGemm::HandWritten`). Both form the same exact products, summed in f32 in
    /// different orders.
    pub fn set_gram_gemm(&self, path: GramGemm) {
        self.grams.store(path.index(), Ordering::Relaxed)
    }

    /// The bf16 Grams' path now.
    pub fn gram_gemm(&self) -> GramGemm {
        GramGemm::ALL[self.grams.load(Ordering::Relaxed)]
    }

    /// What this backend has asked of the device so far: launches, GEMMs, allocations,
    /// copies and host syncs (`RuntimeStats::since` gives the cost of a stretch of work).
    pub fn stats(&self) -> RuntimeStats {
        self.counted.stats()
    }

    /// Start (cleared) or stop timing every kernel and GEMM on the device
    /// (`kernel_times`); `--op-times` on a GPU.
    pub fn time_kernels(&self, on: bool) {
        self.counted.time_kernels(on)
    }

    /// Device memory this backend holds now and at its peak (`reset_peak` starts a new one).
    pub fn memory(&self) -> runtime::MemoryStats {
        self.counted.memory()
    }

    /// Start a new peak of `memory` from the bytes held now.
    pub fn reset_peak(&self) {
        self.counted.reset_peak()
    }

    /// Device time per kernel since `time_kernels(true)`, the longest first (waits for
    /// the device).
    pub fn kernel_times(&self) -> Result<Vec<kernel_times::KernelTime>> {
        self.counted.kernel_times()
    }

    pub fn base_dtype(&self) -> BaseDtype {
        self.base
    }

    /// `n` elements of `T`, uninitialised: for outputs a kernel writes in full (the
    /// simulator's initcheck holds us to that).
    fn uninit<T>(&self, n: usize) -> Result<DevBuf<T>> {
        self.raw(n, false)
    }

    /// `n` zeroed elements of `T`: for outputs that kernels accumulate into.
    fn zeroed<T>(&self, n: usize) -> Result<DevBuf<T>> {
        self.raw(n, true)
    }

    fn raw<T>(&self, n: usize, zeroed: bool) -> Result<DevBuf<T>> {
        let ptr = if n == 0 {
            0
        } else {
            self.rt.alloc(n * std::mem::size_of::<T>(), zeroed)?
        };
        Ok(DevBuf {
            ptr,
            len: n,
            rt: self.rt.clone(),
            _t: PhantomData,
        })
    }

    fn upload<T: bytemuck::Pod>(&self, v: &[T]) -> Result<DevBuf<T>> {
        let b = self.uninit::<T>(v.len())?;
        self.rt.htod(b.ptr, bytemuck::cast_slice(v))?;
        Ok(b)
    }

    fn download<T: bytemuck::Pod + Default + Clone>(&self, b: &DevBuf<T>) -> Result<Vec<T>> {
        let mut out = vec![T::default(); b.len];
        self.rt.dtoh(bytemuck::cast_slice_mut(&mut out), b.ptr)?;
        Ok(out)
    }

    fn ints(&self, v: &[i32]) -> Result<DevBuf<i32>> {
        self.upload(v)
    }

    /// Launch `name` with `args`; nothing to do when the grid is empty.
    fn launch(&self, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        if cfg.grid.contains(&0) {
            return Ok(());
        }
        self.kernels.launch(name, cfg, args)
    }

    fn elementwise(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(THREADS as usize).min(4096) as u32;
        LaunchConfig {
            grid: [blocks, 1, 1],
            block: [THREADS, 1, 1],
            shared_bytes: 0,
        }
    }

    /// For a grid-stride kernel that moves `width` elements per 128-bit access
    /// (`for_each_pack` in kernels/common.cuh): one thread per pack. Where the kernel falls
    /// back to single elements (unaligned operands, the tail) it strides over the grid
    /// anyway, so the count sets only how much runs in parallel.
    fn packed(n: usize, width: usize) -> LaunchConfig {
        Self::elementwise(n.div_ceil(width))
    }

    fn per_row(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid: [rows as u32, 1, 1],
            block: [THREADS, 1, 1],
            shared_bytes: 0,
        }
    }

    /// How activations around the matmuls are stored: as the base weights are.
    fn act_dtype(&self) -> DType {
        match self.base {
            BaseDtype::F32 => DType::F32,
            BaseDtype::Bf16 => DType::Bf16,
        }
    }

    /// `n` uninitialised elements stored as `ty`.
    fn uninit_act(&self, n: usize, ty: DType) -> Result<Act> {
        Ok(match ty {
            DType::F32 => Act::F32(self.uninit(n)?),
            DType::Bf16 => Act::Bf16(self.uninit(n)?),
        })
    }

    /// `x` as f32 (see `Wide`): a bf16 one widened exactly.
    fn wide<'a>(&self, x: &'a Act) -> Result<Wide<'a>> {
        match x {
            Act::F32(b) => Ok(Wide::Same(b)),
            Act::Bf16(b) => Ok(Wide::Copy(self.widened(b.ptr(), b.len())?)),
        }
    }

    /// The `n` bf16 values at `ptr` as a new f32 buffer (exact).
    fn widened(&self, ptr: u64, n: usize) -> Result<DevBuf<f32>> {
        let out = self.uninit::<f32>(n)?;
        self.launch(
            "bf16_to_f32",
            Self::packed(n, 8),
            &[Arg::U64(ptr), Arg::U64(out.ptr()), Arg::U64(n as u64)],
        )?;
        Ok(out)
    }

    fn to_bf16(&self, x: &DevBuf<f32>) -> Result<DevBuf<u16>> {
        let out = self.uninit::<u16>(x.len())?;
        self.round_into(x, &out)?;
        Ok(out)
    }

    /// `out = bf16(x)`, to nearest even, into a buffer of the same length.
    fn round_into(&self, x: &DevBuf<f32>, out: &DevBuf<u16>) -> Result<()> {
        let n = x.len();
        if out.len() != n {
            return Err(Error::Device(format!(
                "f32_to_bf16: {n} values into a buffer of {}",
                out.len()
            )));
        }
        self.launch(
            "f32_to_bf16",
            Self::packed(n, 8),
            &[Arg::U64(x.ptr), Arg::U64(out.ptr), Arg::U64(n as u64)],
        )
    }

    fn segments(&self, segs: &[Segment]) -> Result<(DevBuf<i32>, DevBuf<i32>)> {
        let starts: Vec<i32> = segs.iter().map(|s| s.start as i32).collect();
        let lens: Vec<i32> = segs.iter().map(|s| s.len as i32).collect();
        Ok((self.ints(&starts)?, self.ints(&lens)?))
    }
}
