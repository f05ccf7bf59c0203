//! `selftest --device D [--json]`: every kernel against its reference at several shapes,
//! then a tiny-model grad / curvature / training comparison; a table (or JSON) on stdout,
//! one progress line per case on stderr, and a non-zero exit on any failed check. What a
//! user runs first on a new GPU.

use clap::Args;

use super::{Common, print_json};
use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::backend::device::{BackendTask, run_on};
use crate::error::{Error, Result};
use crate::selftest::{self, BaseDtype, Options, Reference, Report};

#[derive(Args)]
pub struct SelftestArgs {
    /// Instead of testing, write the embedded PTX of every kernel module to DIR as
    /// `<module>.ptx`: edit it and run any command with `LALORA_PTX_DIR=DIR` (on cuda or
    /// sim) to try the change without rebuilding.
    #[arg(long, value_name = "DIR")]
    pub write_ptx: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

struct SelftestTask {
    /// `--base-dtype` (the device's default when not given).
    base_dtype: Option<BaseDtype>,
    threads: usize,
    seed: u64,
    quiet: bool,
}

/// Whether `B` is the CPU backend. `--device auto` may resolve to it, and a backend must
/// not be held to itself: the CPU backend is held to the plain `Reference` instead.
fn is_cpu<B: Backend>() -> bool {
    std::any::type_name::<B>() == std::any::type_name::<CpuBackend>()
}

impl BackendTask for SelftestTask {
    type Output = Report;
    fn run<B: Backend>(self, dev: &B) -> Result<Report> {
        let quiet = self.quiet;
        let mut progress = |what: &str| {
            if !quiet {
                eprintln!("selftest: {what}");
            }
        };
        let opts = |base_dtype| Options {
            base_dtype,
            seed: self.seed,
            kernels: true,
            end_to_end: true,
        };
        if is_cpu::<B>() {
            selftest::run(dev, &Reference, &opts(BaseDtype::F32), &mut progress)
        } else {
            let reference = CpuBackend::new(self.threads);
            let base = self.base_dtype.unwrap_or_default();
            selftest::run(dev, &reference, &opts(base), &mut progress)
        }
    }
}

/// `--write-ptx DIR`: the embedded PTX, one file per module (written atomically).
fn write_ptx(dir: &std::path::Path) -> Result<()> {
    use crate::backend::cuda::kernels::{BUILT, MODULES};
    if !BUILT {
        return Err(Error::usage(
            "this build has no CUDA kernels (nvcc was not found at build time): nothing to write",
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for m in MODULES.iter() {
        crate::io::atomic_write(&dir.join(format!("{}.ptx", m.name)), m.ptx().as_bytes())?;
    }
    eprintln!(
        "wrote {} modules to {}; run with LALORA_PTX_DIR={} to use them",
        MODULES.len(),
        dir.display(),
        dir.display()
    );
    Ok(())
}

pub fn run(a: SelftestArgs) -> Result<()> {
    if let Some(dir) = &a.write_ptx {
        return write_ptx(dir);
    }
    let c = a.common;
    let task = SelftestTask {
        base_dtype: c.base_dtype,
        threads: c.threads,
        seed: c.seed,
        quiet: c.quiet,
    };
    let report = run_on(c.placement(c.quiet), task)?;
    if c.json {
        print_json(&report.json());
    } else {
        print!("{}", report.table());
        println!("{}", report.summary());
    }
    let failed = report.failures().count();
    if failed > 0 {
        return Err(Error::Failed(format!(
            "selftest: {failed} of {} checks failed",
            report.rows.len()
        )));
    }
    Ok(())
}
