//! The output directory of a training run. A run holds an exclusive lock on it (a second
//! run into the same directory would interleave checkpoints), cleans what a crashed run
//! left, and appends to `train.log` as it goes. The results, the adapter and
//! `metrics.jsonl`, are written only when the run completes: a run that fails leaves the
//! directory as it found it apart from the log and the checkpoints of the steps it
//! completed (the last good one is what `--resume` continues from).

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::checkpoint;
use super::trainer::StepMetrics;
use crate::error::{Error, IoContext, Result};
use crate::io::atomic_write;
use crate::model::HostLora;

pub struct OutDir {
    pub path: PathBuf,
    /// The open directory, `flock`ed while the run lasts (released on drop).
    _lock: File,
    log: File,
}

impl OutDir {
    pub fn open(path: &Path) -> Result<Self> {
        match std::fs::metadata(path) {
            Ok(m) if !m.is_dir() => {
                return Err(Error::file(path, "exists and is not a directory"));
            }
            Ok(_) => {}
            Err(_) => std::fs::create_dir_all(path).at(path)?,
        }
        let lock = File::open(path).at(path)?;
        // SAFETY: flock on a descriptor we own; it takes no pointers.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(Error::file(
                path,
                "in use by another lalora-engine run (locked)",
            ));
        }
        checkpoint::clean_stale(path)?;
        let lp = path.join("train.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&lp)
            .at(&lp)?;
        Ok(OutDir {
            path: path.to_path_buf(),
            _lock: lock,
            log,
        })
    }

    /// Append one line to `train.log`.
    pub fn log(&mut self, line: &str) -> Result<()> {
        writeln!(self.log, "{line}").at(self.path.join("train.log"))
    }

    pub fn log_step(&mut self, m: &StepMetrics, steps: usize) -> Result<()> {
        self.log(&format!(
            "step {}/{steps} loss {:.6} penalty {:.6e} lr {:.3e} grad_norm {:.4} ({:.0} tokens/s)",
            m.step, m.loss, m.penalty, m.lr, m.grad_norm, m.tokens_per_s
        ))
    }

    /// Write the results of a completed run: the adapter, then `metrics.jsonl` (every
    /// step, those before a resume included).
    pub fn finish(
        &mut self,
        lora: &HostLora,
        base_model: &str,
        metrics: &[StepMetrics],
    ) -> Result<()> {
        lora.save(&self.path, base_model)?;
        let text = StepMetrics::jsonl(metrics);
        atomic_write(&self.path.join("metrics.jsonl"), text.as_bytes())?;
        self.log("done: adapter and metrics.jsonl written")
    }
}
