//! The simulated device: global memory, loaded modules, launches (validated as the driver
//! validates them, blocks run in parallel on a thread pool) and the faults the checks find.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use rayon::prelude::*;

use super::block::{Block, LaunchCtx};
use super::fault::{Checks, Fault};
use super::ir::{Kernel, ParamSlot};
use super::memory::Heap;
use super::{lower, parse};

/// Device limits of an sm_90 GPU (H100/H200) that launches are validated against.
pub mod limits {
    pub const MAX_THREADS: u32 = 1024;
    pub const MAX_BLOCK: [u32; 3] = [1024, 1024, 64];
    pub const MAX_GRID: [u32; 3] = [(1 << 31) - 1, 65535, 65535];
    /// Static + dynamic shared memory without opting in.
    pub const SHARED_DEFAULT: usize = 48 * 1024;
    /// The opt-in maximum per block (227 KB on sm_90).
    pub const SHARED_OPT_IN: usize = 232_448;
    /// Kernel parameter bytes (PTX ISA 8.1+ on sm_70+).
    pub const PARAM_BYTES: usize = 32_764;
}

/// An error of the simulated device.
#[derive(Debug, Clone)]
pub enum SimError {
    /// PTX that cannot be parsed or lowered: (line, message).
    Ptx(u32, String),
    /// A launch the driver would refuse.
    Launch(String),
    /// A finding of the checks inside a kernel.
    Fault(Box<Fault>),
    /// A bad runtime call (copy out of bounds, unknown pointer, out of memory).
    Api(String),
}

impl std::fmt::Display for SimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SimError::Ptx(line, m) => write!(f, "line {line}: {m}"),
            SimError::Launch(m) | SimError::Api(m) => f.write_str(m),
            SimError::Fault(x) => x.fmt(f),
        }
    }
}

/// A kernel argument by value, as the launch pushes it. `Bytes` fills a byte-array
/// parameter (`.param .align A .b8 name[N]`: a struct passed by value, e.g. a
/// `__grid_constant__` table) and must hold exactly its N bytes.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    U64(u64),
    I32(i32),
    F32(f32),
    Bytes(&'a [u8]),
}

impl Arg<'_> {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Arg::U64(v) => v.to_le_bytes().to_vec(),
            Arg::I32(v) => v.to_le_bytes().to_vec(),
            Arg::F32(v) => v.to_le_bytes().to_vec(),
            Arg::Bytes(b) => b.to_vec(),
        }
    }
    fn is_float(&self) -> bool {
        matches!(self, Arg::F32(_))
    }
    fn describe(&self) -> &'static str {
        match self {
            Arg::U64(_) => "a 64-bit integer or pointer",
            Arg::I32(_) => "a 32-bit integer",
            Arg::F32(_) => "an f32",
            Arg::Bytes(_) => "a byte block",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
}

/// Lay out `args` in a parameter buffer for an entry with parameters `slots`, checking
/// their count, sizes and kinds (integer or float) against the `.entry` signature.
pub fn pack_params(slots: &[ParamSlot], bytes: usize, args: &[Arg]) -> Result<Vec<u8>, String> {
    if args.len() != slots.len() {
        return Err(format!(
            "{} arguments given, the .entry declares {} parameters",
            args.len(),
            slots.len()
        ));
    }
    if bytes > limits::PARAM_BYTES {
        return Err(format!(
            "{bytes} bytes of parameters exceed {}",
            limits::PARAM_BYTES
        ));
    }
    let mut buf = vec![0u8; bytes];
    for (i, (a, p)) in args.iter().zip(slots).enumerate() {
        let b = a.bytes();
        let float_param = p.ty.starts_with('f');
        if b.len() != p.size || (float_param != a.is_float() && !p.ty.starts_with('b')) {
            return Err(format!(
                "argument {i} is {} ({} bytes) but parameter `{}` is .{} ({} bytes)",
                a.describe(),
                b.len(),
                p.name,
                p.ty,
                p.size
            ));
        }
        buf[p.offset..p.offset + p.size].copy_from_slice(&b);
    }
    Ok(buf)
}

/// A loaded module: its entries, lowered, and its text (for reports).
pub struct Module {
    pub name: String,
    lines: Vec<String>,
    kernels: HashMap<String, Arc<Kernel>>,
}

impl Module {
    pub fn entries(&self) -> impl Iterator<Item = &str> {
        self.kernels.keys().map(String::as_str)
    }
}

/// A kernel ready to launch.
#[derive(Clone)]
pub struct Function {
    module: Arc<Module>,
    kernel: Arc<Kernel>,
    max_dynamic_shared: Option<usize>,
}

impl Function {
    pub fn name(&self) -> &str {
        &self.kernel.name
    }
    /// Opt in to more than 48 KB of shared memory (cuFuncSetAttribute
    /// MAX_DYNAMIC_SHARED_SIZE_BYTES).
    pub fn set_max_dynamic_shared(&mut self, bytes: usize) -> Result<(), SimError> {
        if self.kernel.shared_static + bytes > limits::SHARED_OPT_IN {
            return Err(SimError::Launch(format!(
                "kernel `{}`: {} bytes of dynamic shared memory plus {} static exceed the device's {} bytes per block",
                self.kernel.name,
                bytes,
                self.kernel.shared_static,
                limits::SHARED_OPT_IN
            )));
        }
        self.max_dynamic_shared = Some(bytes);
        Ok(())
    }
}

pub struct Device {
    heap: Mutex<Heap>,
    checks: Checks,
    pool: rayon::ThreadPool,
}

/// Parse and lower a whole PTX module (module-level `.global`/`.const` variables get
/// addresses from `alloc`).
pub fn compile(
    name: &str,
    ptx: &str,
    mut alloc: impl FnMut(usize, &[u8]) -> Result<u64, SimError>,
) -> Result<Module, SimError> {
    let m = parse::parse(ptx).map_err(|(l, e)| SimError::Ptx(l, e))?;
    let mut globals = HashMap::new();
    for v in m
        .vars
        .iter()
        .filter(|v| matches!(v.space, parse::Space::Global | parse::Space::Const))
    {
        let elem = super::ir::Ty::parse(&v.ty)
            .ok_or_else(|| SimError::Ptx(v.line, format!("unknown type `.{}`", v.ty)))?
            .bytes() as usize
            * v.vec as usize;
        let n = match v.array {
            Some(Some(n)) => n as usize,
            Some(None) => v.init.len().max(1),
            None => 1,
        };
        let mut bytes = vec![0u8; elem * n];
        for (i, x) in v.init.iter().enumerate() {
            let at = i * elem;
            if at + elem <= bytes.len() {
                bytes[at..at + elem].copy_from_slice(&x.to_le_bytes()[..elem.min(8)]);
            }
        }
        globals.insert(v.name.clone(), alloc(bytes.len(), &bytes)?);
    }
    let mut kernels = HashMap::new();
    for f in m.functions.iter().filter(|f| f.is_entry) {
        let k = lower::lower(&m, f, &globals).map_err(|(l, e)| SimError::Ptx(l, e))?;
        kernels.insert(f.name.clone(), Arc::new(k));
    }
    Ok(Module {
        name: name.to_string(),
        lines: ptx.lines().map(|l| l.trim().to_string()).collect(),
        kernels,
    })
}

impl Device {
    /// A device with `mem_limit` bytes of global memory, running blocks on `threads` host
    /// threads (0: all cores).
    pub fn new(checks: Checks, mem_limit: usize, threads: usize) -> Result<Self, SimError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ptxsim-{i}"))
            .build()
            .map_err(|e| SimError::Api(format!("simulator thread pool: {e}")))?;
        Ok(Device {
            heap: Mutex::new(Heap::new(mem_limit)),
            checks,
            pool,
        })
    }

    fn heap(&self) -> MutexGuard<'_, Heap> {
        // A panic while the lock was held cannot leave the heap half-updated in a way that
        // matters more than the panic itself; keep going.
        self.heap.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn checks(&self) -> Checks {
        self.checks
    }

    pub fn load_module(&self, name: &str, ptx: &str) -> Result<Arc<Module>, SimError> {
        let m = compile(name, ptx, |n, init| {
            let p = self.alloc(n.max(1), true)?;
            self.htod(p, init)?;
            Ok(p)
        })?;
        Ok(Arc::new(m))
    }

    pub fn function(&self, module: &Arc<Module>, name: &str) -> Option<Function> {
        module.kernels.get(name).map(|k| Function {
            module: module.clone(),
            kernel: k.clone(),
            max_dynamic_shared: None,
        })
    }

    pub fn alloc(&self, bytes: usize, zeroed: bool) -> Result<u64, SimError> {
        let mut h = self.heap();
        let used = h.bytes_in_use();
        h.alloc(bytes, zeroed).ok_or_else(|| {
            SimError::Api(format!(
                "out of memory: {bytes} bytes requested with {used} bytes in use"
            ))
        })
    }

    pub fn free(&self, ptr: u64) -> Result<(), SimError> {
        if self.heap().free(ptr) {
            Ok(())
        } else {
            Err(SimError::Api(format!(
                "free of {ptr:#x}, which is not a live allocation"
            )))
        }
    }

    pub fn htod(&self, dst: u64, src: &[u8]) -> Result<(), SimError> {
        if src.is_empty() {
            return Ok(());
        }
        let h = self.heap();
        let (a, off) = h
            .range(dst, src.len())
            .map_err(|e| SimError::Api(format!("copy to device: {e}")))?;
        a.write(off, src);
        Ok(())
    }

    /// Copy device memory to the host; reading never-written bytes is an initcheck
    /// finding (an output a kernel was supposed to fill but did not).
    pub fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<(), SimError> {
        if dst.is_empty() {
            return Ok(());
        }
        let h = self.heap();
        let (a, off) = h
            .range(src, dst.len())
            .map_err(|e| SimError::Api(format!("copy to host: {e}")))?;
        if self.checks.initcheck
            && let Some(b) = a.first_uninit(off, dst.len())
        {
            return Err(SimError::Api(format!(
                "initcheck: copy to host reads never-written byte {b} of {}",
                a.describe()
            )));
        }
        a.read(off, dst);
        Ok(())
    }

    pub fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<(), SimError> {
        if bytes == 0 {
            return Ok(());
        }
        let h = self.heap();
        let (s, so) = h
            .range(src, bytes)
            .map_err(|e| SimError::Api(format!("device copy source: {e}")))?;
        let (d, doff) = h
            .range(dst, bytes)
            .map_err(|e| SimError::Api(format!("device copy destination: {e}")))?;
        if self.checks.initcheck
            && let Some(b) = s.first_uninit(so, bytes)
        {
            return Err(SimError::Api(format!(
                "initcheck: device copy reads never-written byte {b} of {}",
                s.describe()
            )));
        }
        let mut buf = vec![0u8; bytes];
        s.read(so, &mut buf);
        d.write(doff, &buf);
        Ok(())
    }

    pub fn memset(&self, dst: u64, value: u8, bytes: usize) -> Result<(), SimError> {
        if bytes == 0 {
            return Ok(());
        }
        let h = self.heap();
        let (d, off) = h
            .range(dst, bytes)
            .map_err(|e| SimError::Api(format!("memset: {e}")))?;
        d.write(off, &vec![value; bytes]);
        Ok(())
    }

    /// The driver's launch validation for `f` with `cfg` and `args`; the parameter buffer.
    fn validate(
        &self,
        f: &Function,
        cfg: &LaunchConfig,
        args: &[Arg],
    ) -> Result<Vec<u8>, SimError> {
        let k = &f.kernel;
        let name = &k.name;
        let bad = |m: String| Err(SimError::Launch(format!("launch of `{name}`: {m}")));
        let [bx, by, bz] = cfg.block;
        let threads = bx as u64 * by as u64 * bz as u64;
        if cfg.block.contains(&0) || cfg.grid.contains(&0) {
            return bad(format!(
                "grid {:?} and block {:?} must be at least 1 in every dimension",
                cfg.grid, cfg.block
            ));
        }
        if threads > limits::MAX_THREADS as u64 {
            return bad(format!(
                "block {:?} has {threads} threads (at most {})",
                cfg.block,
                limits::MAX_THREADS
            ));
        }
        for (i, axis) in ["x", "y", "z"].iter().enumerate() {
            if cfg.block[i] > limits::MAX_BLOCK[i] {
                return bad(format!(
                    "block {axis} = {} exceeds {}",
                    cfg.block[i],
                    limits::MAX_BLOCK[i]
                ));
            }
            if cfg.grid[i] > limits::MAX_GRID[i] {
                return bad(format!(
                    "grid {axis} = {} exceeds {}",
                    cfg.grid[i],
                    limits::MAX_GRID[i]
                ));
            }
        }
        if let Some(m) = k.maxntid {
            let most = m[0] as u64 * m[1] as u64 * m[2] as u64;
            if threads > most {
                return bad(format!(
                    "{threads} threads per block exceed the kernel's .maxntid ({most})"
                ));
            }
        }
        if let Some(r) = k.reqntid
            && r != cfg.block
        {
            return bad(format!(
                "block {:?} differs from the kernel's .reqntid {r:?}",
                cfg.block
            ));
        }
        let dynamic = cfg.shared_bytes as usize;
        let total = k.shared_static + dynamic;
        if k.shared_static > limits::SHARED_DEFAULT {
            return bad(format!(
                "{} bytes of static shared memory exceed {}",
                k.shared_static,
                limits::SHARED_DEFAULT
            ));
        }
        match f.max_dynamic_shared {
            None if total > limits::SHARED_DEFAULT => {
                return bad(format!(
                    "{total} bytes of shared memory ({} static + {dynamic} dynamic) exceed {} without opting in (set the kernel's maximum dynamic shared memory)",
                    k.shared_static,
                    limits::SHARED_DEFAULT
                ));
            }
            Some(opt) if dynamic > opt || total > limits::SHARED_OPT_IN => {
                return bad(format!(
                    "{dynamic} bytes of dynamic shared memory exceed the opted-in {opt} (or {total} in all exceed {})",
                    limits::SHARED_OPT_IN
                ));
            }
            _ => {}
        }
        pack_params(&k.params, k.param_bytes, args)
            .map_err(|m| SimError::Launch(format!("launch of `{name}`: {m}")))
    }

    /// Run `f` over the grid; a fault ends the launch, the one of the lowest block reported.
    pub fn launch(&self, f: &Function, cfg: LaunchConfig, args: &[Arg]) -> Result<(), SimError> {
        let params = self.validate(f, &cfg, args)?;
        let heap = self.heap();
        let ctx = LaunchCtx {
            kernel: &f.kernel,
            heap: &heap,
            params: &params,
            grid: cfg.grid,
            block: cfg.block,
            dyn_shared: cfg.shared_bytes as usize,
            checks: self.checks,
        };
        let [gx, gy, gz] = cfg.grid;
        let n = gx as u64 * gy as u64 * gz as u64;
        // Blocks after the lowest faulting one found so far are skipped; those before it
        // still run, so the report is the lowest faulting block whichever worker finds a
        // fault first.
        let lowest = std::sync::atomic::AtomicU64::new(u64::MAX);
        let first: Mutex<Option<(u64, Fault)>> = Mutex::new(None);
        self.pool.install(|| {
            (0..n).into_par_iter().for_each_init(
                || Block::new(&ctx),
                |blk, i| {
                    if i > lowest.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    let ctaid = [
                        (i % gx as u64) as u32,
                        ((i / gx as u64) % gy as u64) as u32,
                        (i / (gx as u64 * gy as u64)) as u32,
                    ];
                    if let Err(fault) = blk.run(ctaid) {
                        lowest.fetch_min(i, std::sync::atomic::Ordering::Relaxed);
                        let mut g = first.lock().unwrap_or_else(|p| p.into_inner());
                        if g.as_ref().is_none_or(|(j, _)| i < *j) {
                            *g = Some((i, fault));
                        }
                    }
                },
            )
        });
        for a in heap.live() {
            a.refresh_all_init();
        }
        match first.into_inner().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some((_, mut fault)) => {
                fault.text = f
                    .module
                    .lines
                    .get(fault.line.saturating_sub(1) as usize)
                    .cloned()
                    .unwrap_or_default();
                Err(SimError::Fault(Box::new(fault)))
            }
        }
    }

    /// The global-memory heap, for the cuBLAS twin.
    pub(super) fn heap_for_blas(&self) -> MutexGuard<'_, Heap> {
        self.heap()
    }

    pub(super) fn pool(&self) -> &rayon::ThreadPool {
        &self.pool
    }
}
