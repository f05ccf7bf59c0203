//! `--device cuda[:N]`: the runtime seam over cudarc (the CUDA driver API, loaded
//! dynamically, and cuBLAS). Memory comes from the stream-ordered pool, whose release
//! threshold is raised so that a synchronisation does not hand the pool back to the OS;
//! cudarc's per-buffer event tracking is off (one stream, in order, raw pointers).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::cublas::result::{gemm_ex, gemm_strided_batched_ex};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::sys::{CUevent_flags, CUfunction_attribute_enum, CUmemPool_attribute};
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaStream, PushKernelArg, result};

use super::runtime::{
    Arg, DType, Gemm, LaunchConfig, Mark, PtxSource, Runtime, Trans, same_runtime,
};
use crate::error::{Error, Result};
use crate::ptxsim::device::{limits, pack_params};
use crate::ptxsim::ir::ParamSlot;

fn cu<T>(r: std::result::Result<T, impl std::fmt::Display>) -> Result<T> {
    r.map_err(|e| Error::Device(format!("cuda: {e}")))
}

struct Entry {
    f: CudaFunction,
    params: Vec<ParamSlot>,
    param_bytes: usize,
}

pub struct Driver {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    modules: Mutex<Vec<HashMap<String, Entry>>>,
    name: String,
}

/// Whether a CUDA device can be used: driver library present and a device.
pub fn present() -> bool {
    // SAFETY: only probes for the driver library with dlopen.
    let lib = unsafe { cudarc::driver::sys::is_culib_present() };
    lib && CudaContext::device_count().is_ok_and(|n| n > 0)
}

impl Driver {
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: dlopen probes.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::usage(
                "the NVIDIA driver library (libcuda) is not installed",
            ));
        }
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::usage(
                "cuBLAS (libcublas.so.13) was not found: install the CUDA 13 runtime libraries or the nvidia-cublas Python package and add its nvidia/cu13/lib folder to LD_LIBRARY_PATH",
            ));
        }
        let count = cu(CudaContext::device_count())?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::usage(format!(
                "no device cuda:{ordinal} ({count} present)"
            )));
        }
        let ctx = cu(CudaContext::new(ordinal))?;
        // SAFETY: every buffer is a raw pointer used on the one in-order stream below.
        unsafe { ctx.disable_event_tracking() };
        // SAFETY: the device ordinal was checked above.
        unsafe {
            let pool = cu(result::device::get_default_mem_pool(ctx.cu_device()))?;
            let mut threshold = u64::MAX;
            cu(cudarc::driver::sys::cuMemPoolSetAttribute(
                pool,
                CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut c_void,
            )
            .result())?;
        }
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let stream = ctx.default_stream();
        let blas = cu(CudaBlas::new(stream.clone()))?;
        Ok(Driver {
            ctx,
            stream,
            blas,
            modules: Mutex::new(Vec::new()),
            name: format!("cuda:{ordinal} ({name})"),
        })
    }

    fn bind(&self) -> Result<()> {
        cu(self.ctx.bind_to_thread())
    }
}

fn op(t: Trans) -> cublasOperation_t {
    match t {
        Trans::N => cublasOperation_t::CUBLAS_OP_N,
        Trans::T => cublasOperation_t::CUBLAS_OP_T,
    }
}

fn dtype(t: DType) -> cudaDataType {
    match t {
        DType::F32 => cudaDataType::CUDA_R_32F,
        DType::Bf16 => cudaDataType::CUDA_R_16BF,
    }
}

impl Runtime for Driver {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn alloc(&self, bytes: usize, zeroed: bool) -> Result<u64> {
        self.bind()?;
        let s = self.stream.cu_stream();
        // SAFETY: a stream-ordered allocation on our stream, freed on it in `free`.
        unsafe {
            let p = cu(result::malloc_async(s, bytes.max(1)))?;
            if zeroed {
                cu(result::memset_d8_async(p, 0, bytes, s))?;
            }
            Ok(p)
        }
    }

    fn free(&self, ptr: u64) {
        if self.bind().is_ok() {
            // SAFETY: `ptr` came from `alloc` and is no longer used (its owner dropped it);
            // work already queued on the stream that uses it runs before the free.
            let _ = unsafe { result::free_async(ptr, self.stream.cu_stream()) };
        }
    }

    fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: `dst` holds at least `src.len()` bytes; pageable source memory is staged
        // before the call returns.
        cu(unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) })
    }

    fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        self.bind()?;
        // SAFETY: `src` holds at least `dst.len()` bytes; we wait for the copy.
        unsafe {
            cu(result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()))?;
        }
        self.synchronize()
    }

    fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: both ranges lie in live allocations of at least `bytes`.
        cu(unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) })
    }

    fn load_module(&self, src: &PtxSource) -> Result<usize> {
        let bad = |msg: String| match src.path {
            Some(p) => Error::file(p, msg),
            None => Error::Device(format!(
                "cuda: embedded PTX of module `{}`: {msg}",
                src.module
            )),
        };
        // The entry signatures, for argument checks at each launch.
        let parsed = crate::ptxsim::parse::parse(src.text)
            .map_err(|(l, m)| bad(format!("line {l}: {m}")))?;
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(src.text))
            .map_err(|e| {
                let text = e.to_string();
                if text.contains("UNSUPPORTED_PTX_VERSION") || text.contains("INVALID_PTX") {
                    bad(format!(
                        "the NVIDIA driver rejects this PTX (the kernels' PTX ISA 9.0 from CUDA 13.0 needs driver 580 or newer): {text}"
                    ))
                } else {
                    bad(format!("loading into the driver: {text}"))
                }
            })?;
        let mut entries = HashMap::new();
        for name in src.entries {
            let f = parsed
                .functions
                .iter()
                .find(|f| f.is_entry && f.name == *name)
                .ok_or_else(|| bad(format!("no `.entry {name}` (the backend launches it)")))?;
            let (params, param_bytes) = crate::ptxsim::lower::param_slots(&f.params)
                .map_err(|(l, m)| bad(format!("line {l}: {m}")))?;
            let cf = module
                .load_function(name)
                .map_err(|e| bad(format!("entry `{name}`: {e}")))?;
            entries.insert(
                name.to_string(),
                Entry {
                    f: cf,
                    params,
                    param_bytes,
                },
            );
        }
        let mut mods = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        mods.push(entries);
        Ok(mods.len() - 1)
    }

    fn launch(&self, module: usize, entry: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let (f, check) = {
            let mods = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            let e = mods
                .get(module)
                .and_then(|m| m.get(entry))
                .ok_or_else(|| Error::Device(format!("cuda: no kernel `{entry}` loaded")))?;
            (e.f.clone(), pack_params(&e.params, e.param_bytes, args))
        };
        check.map_err(|m| Error::Device(format!("cuda: launch of `{entry}`: {m}")))?;
        if cfg.shared_bytes as usize > limits::SHARED_DEFAULT {
            cu(f.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                cfg.shared_bytes as i32,
            ))?;
        }
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            match a {
                Arg::U64(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                // The driver copies the parameter's declared size from the address it is
                // given: the block's first byte, the block being exactly that size
                // (`pack_params` above).
                Arg::Bytes(block) => match block.first() {
                    Some(first) => b.arg(first),
                    None => {
                        return Err(Error::Device(format!(
                            "cuda: launch of `{entry}`: an empty byte block"
                        )));
                    }
                },
            };
        }
        let c = cudarc::driver::LaunchConfig {
            grid_dim: (cfg.grid[0], cfg.grid[1], cfg.grid[2]),
            block_dim: (cfg.block[0], cfg.block[1], cfg.block[2]),
            shared_mem_bytes: cfg.shared_bytes,
        };
        // SAFETY: the arguments match the entry's parameter list (checked above) and every
        // pointer refers to a live allocation sized for the launch.
        cu(unsafe { b.launch(c) })
            .map(|_| ())
            .map_err(|e| Error::Device(format!("{e} (kernel `{entry}`)")))
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        g.validate()
            .map_err(|e| Error::Device(format!("cuda: {e}")))?;
        let h = *self.blas.handle();
        let (alpha, beta) = (g.alpha, g.beta);
        let e =
            |e: cudarc::cublas::result::CublasError| Error::Device(format!("cuda: cuBLAS: {e}"));
        // SAFETY: the operands lie in live device allocations sized for these extents
        // (the simulator's twin checks the same calls in CI).
        unsafe {
            if g.batch == 1 {
                gemm_ex(
                    h,
                    op(g.ta),
                    op(g.tb),
                    g.m as i32,
                    g.n as i32,
                    g.k as i32,
                    &alpha as *const f32 as *const c_void,
                    g.a.ptr as *const c_void,
                    dtype(g.a.ty),
                    g.a.ld as i32,
                    g.b.ptr as *const c_void,
                    dtype(g.b.ty),
                    g.b.ld as i32,
                    &beta as *const f32 as *const c_void,
                    g.c.ptr as *mut c_void,
                    dtype(g.c.ty),
                    g.c.ld as i32,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
                .map_err(e)
            } else {
                gemm_strided_batched_ex(
                    h,
                    op(g.ta),
                    op(g.tb),
                    g.m as i32,
                    g.n as i32,
                    g.k as i32,
                    &alpha as *const f32 as *const c_void,
                    g.a.ptr as *const c_void,
                    dtype(g.a.ty),
                    g.a.ld as i32,
                    g.a.stride,
                    g.b.ptr as *const c_void,
                    dtype(g.b.ty),
                    g.b.ld as i32,
                    g.b.stride,
                    &beta as *const f32 as *const c_void,
                    g.c.ptr as *mut c_void,
                    dtype(g.c.ty),
                    g.c.ld as i32,
                    g.c.stride,
                    g.batch as i32,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
                .map_err(e)
            }
        }
    }

    fn synchronize(&self) -> Result<()> {
        cu(self.stream.synchronize())
    }

    fn mark(&self) -> Result<Box<dyn Mark>> {
        let e = cu(self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)))?;
        Ok(Box::new(EventMark(e)))
    }
}

/// A timing event recorded on the stream.
struct EventMark(CudaEvent);

impl Mark for EventMark {
    fn ms_since(&self, earlier: &dyn Mark) -> Result<f64> {
        let e = same_runtime::<EventMark>(earlier, "cuda")?;
        cu(e.0.elapsed_ms(&self.0)).map(f64::from)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
