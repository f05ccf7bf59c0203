//! `--device sim`: the runtime seam over the PTX simulator. Its findings (memcheck,
//! racecheck, initcheck, synccheck, launch validation) are device faults (exit 3); PTX that
//! does not parse or lacks an entry is a bad input (exit 2, naming the file).

use std::sync::{Arc, Mutex};

use super::runtime::{Arg, Gemm, LaunchConfig, Mark, PtxSource, Runtime, same_runtime};
use crate::error::{Error, Result};
use crate::ptxsim::{Checks, Device, Function, Module, SimError};

/// Global memory of the simulated device.
const MEMORY: usize = 16 << 30;

pub struct Sim {
    dev: Device,
    modules: Mutex<Vec<(Arc<Module>, Vec<Function>)>>,
    threads: usize,
}

fn fault(e: SimError) -> Error {
    Error::Device(format!("sim: {e}"))
}

impl Sim {
    /// A simulated device running blocks on `threads` host threads (0: all cores), with
    /// the checks `LALORA_SIM_CHECKS` selects (all by default).
    pub fn new(threads: usize) -> Result<Self> {
        let checks = Checks::from_env().map_err(Error::usage)?;
        Ok(Sim {
            dev: Device::new(checks, MEMORY, threads).map_err(fault)?,
            modules: Mutex::new(Vec::new()),
            threads,
        })
    }

    fn function(&self, module: usize, entry: &str) -> Result<Function> {
        let mods = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        let (m, fs) = mods
            .get(module)
            .ok_or_else(|| Error::Device(format!("sim: no module {module}")))?;
        fs.iter()
            .find(|f| f.name() == entry)
            .cloned()
            .ok_or_else(|| {
                Error::Device(format!("sim: module `{}` has no entry `{entry}`", m.name))
            })
    }
}

impl Runtime for Sim {
    fn describe(&self) -> String {
        let c = self.dev.checks();
        let mut checks = vec!["memcheck", "synccheck"];
        if c.racecheck {
            checks.push("racecheck");
        }
        if c.initcheck {
            checks.push("initcheck");
        }
        let threads = if self.threads == 0 {
            "all cores".to_string()
        } else {
            format!("{} threads", self.threads)
        };
        format!(
            "sim (PTX simulator on {threads}; checks: {})",
            checks.join(", ")
        )
    }

    fn alloc(&self, bytes: usize, zeroed: bool) -> Result<u64> {
        self.dev.alloc(bytes, zeroed).map_err(fault)
    }

    fn free(&self, ptr: u64) {
        // Freeing a pointer this backend allocated cannot fail; nothing to report on drop.
        let _ = self.dev.free(ptr);
    }

    fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.dev.htod(dst, src).map_err(fault)
    }

    fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        self.dev.dtoh(dst, src).map_err(fault)
    }

    fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.dev.dtod(dst, src, bytes).map_err(fault)
    }

    fn load_module(&self, src: &PtxSource) -> Result<usize> {
        let bad = |msg: String| match src.path {
            Some(p) => Error::file(p, msg),
            None => Error::Device(format!(
                "sim: embedded PTX of module `{}`: {msg}",
                src.module
            )),
        };
        let m = self
            .dev
            .load_module(src.module, src.text)
            .map_err(|e| bad(e.to_string()))?;
        let mut fs = Vec::new();
        for name in src.entries {
            let f = self
                .dev
                .function(&m, name)
                .ok_or_else(|| bad(format!("no `.entry {name}` (the backend launches it)")))?;
            fs.push(f);
        }
        let mut mods = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        mods.push((m, fs));
        Ok(mods.len() - 1)
    }

    fn launch(&self, module: usize, entry: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let mut f = self.function(module, entry)?;
        if cfg.shared_bytes as usize > crate::ptxsim::device::limits::SHARED_DEFAULT {
            f.set_max_dynamic_shared(cfg.shared_bytes as usize)
                .map_err(fault)?;
        }
        self.dev.launch(&f, cfg, args).map_err(fault)
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        self.dev.gemm(g).map_err(fault)
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn mark(&self) -> Result<Box<dyn Mark>> {
        Ok(Box::new(HostMark(std::time::Instant::now())))
    }
}

/// The host clock: each simulated call has finished when it returns.
struct HostMark(std::time::Instant);

impl Mark for HostMark {
    fn ms_since(&self, earlier: &dyn Mark) -> Result<f64> {
        let e = same_runtime::<HostMark>(earlier, "sim")?;
        Ok(self.0.saturating_duration_since(e.0).as_secs_f64() * 1e3)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
