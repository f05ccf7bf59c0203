//! The CUDA backend: cudarc with dynamic loading (the binary starts without any CUDA
//! library), the hand-written kernels of `kernels/*.cu` (PTX from build.rs) for every op,
//! cuBLAS for the dense base-weight and attention products. Base weights live in bf16;
//! activations, LoRA weights, gradients, optimiser state and curvature in f32. One stream,
//! in order; each op's CPU twin in `backend/cpu` is its reference.

mod attention;
mod baselines;
pub mod blas;
pub mod kernels;
mod ops;

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use half::bf16;

use self::kernels::Kernels;
use super::Segment;
use crate::error::{Error, Result};

/// Threads per block for the row and elementwise kernels.
const THREADS: u32 = 256;
/// LoRA ranks the register-blocked kernels support.
pub const MAX_RANK: usize = 64;

pub struct CudaBackend {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    name: String,
}

fn cu<T>(r: std::result::Result<T, impl std::fmt::Display>) -> Result<T> {
    r.map_err(|e| Error::Cuda(e.to_string()))
}

/// Whether a CUDA device can be used: kernels built, driver library present, a device.
pub fn available() -> bool {
    // SAFETY: only probes for the driver library with dlopen.
    kernels::BUILT
        && unsafe { cudarc::driver::sys::is_culib_present() }
        && CudaContext::device_count().is_ok_and(|n| n > 0)
}

impl CudaBackend {
    pub fn new(ordinal: usize) -> Result<Self> {
        if !kernels::BUILT {
            return Err(Error::Cuda(
                "this build has no CUDA kernels (nvcc was not found at build time)".into(),
            ));
        }
        // SAFETY: as in `available`.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "the NVIDIA driver library (libcuda) is not installed".into(),
            ));
        }
        let count = cu(CudaContext::device_count())?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Cuda(format!(
                "no device cuda:{ordinal} ({count} present)"
            )));
        }
        let ctx = cu(CudaContext::new(ordinal))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let stream = ctx.default_stream();
        let blas = cu(CudaBlas::new(stream.clone()))?;
        Ok(CudaBackend {
            kernels: Kernels::new(ctx),
            stream,
            blas,
            name: format!("cuda:{ordinal} ({name})"),
        })
    }

    fn ptr<U>(&self, s: &CudaSlice<U>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }

    fn h(&self) -> cudarc::cublas::sys::cublasHandle_t {
        *self.blas.handle()
    }

    fn ints(&self, v: &[i32]) -> Result<CudaSlice<i32>> {
        cu(self.stream.clone_htod(v))
    }

    fn alloc(&self, n: usize) -> Result<CudaSlice<f32>> {
        cu(self.stream.alloc_zeros::<f32>(n.max(1)))
    }

    /// Launch `name` with `args` (each a reference to a device pointer or scalar).
    fn launch(&self, name: &str, cfg: LaunchConfig, args: &[&dyn KernelArg]) -> Result<()> {
        let f = self.kernels.function(name)?;
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            a.push(&mut b);
        }
        // SAFETY: each kernel's parameter list matches `args` (see kernels/*.cu), and every
        // pointer refers to a live allocation sized for the launch.
        cu(unsafe { b.launch(cfg) }).map(|_| ())
    }

    fn elementwise(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(THREADS as usize).clamp(1, 4096) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn per_row(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn to_bf16(&self, x: &CudaSlice<f32>) -> Result<CudaSlice<bf16>> {
        let n = x.len();
        let out = cu(self.stream.alloc_zeros::<bf16>(n.max(1)))?;
        self.launch(
            "f32_to_bf16",
            Self::elementwise(n),
            &[&self.ptr(x), &self.ptr(&out), &(n as u64)],
        )?;
        Ok(out)
    }

    fn segments(&self, segs: &[Segment]) -> Result<(CudaSlice<i32>, CudaSlice<i32>)> {
        let starts: Vec<i32> = segs.iter().map(|s| s.start as i32).collect();
        let lens: Vec<i32> = segs.iter().map(|s| s.len as i32).collect();
        Ok((self.ints(&starts)?, self.ints(&lens)?))
    }
}

/// Something a kernel takes by value: a device pointer (`u64`) or a scalar.
trait KernelArg {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>);
}

macro_rules! kernel_arg {
    ($($t:ty),*) => {$(
        impl KernelArg for $t {
            fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
                b.arg(self);
            }
        }
    )*};
}
kernel_arg!(u64, i32, f32);
