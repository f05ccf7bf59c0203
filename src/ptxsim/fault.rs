//! Findings of the simulator's checks, each one line naming the kernel, block, thread,
//! PTX line and what went wrong (as compute-sanitizer reports them).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Out-of-bounds, misaligned or freed memory.
    Memcheck,
    /// Shared-memory hazards between threads with no barrier between them.
    Racecheck,
    /// Reads of never-written memory.
    Initcheck,
    /// Barriers and warp collectives not reached by the threads they wait for.
    Synccheck,
}

impl Check {
    pub fn name(self) -> &'static str {
        match self {
            Check::Memcheck => "memcheck",
            Check::Racecheck => "racecheck",
            Check::Initcheck => "initcheck",
            Check::Synccheck => "synccheck",
        }
    }
}

/// A finding inside a kernel.
#[derive(Debug, Clone)]
pub struct Fault {
    pub check: Check,
    pub kernel: String,
    pub block: [u32; 3],
    pub thread: [u32; 3],
    /// Line of the module's PTX text.
    pub line: u32,
    /// That line's text, trimmed (filled in by the device, which holds the text).
    pub text: String,
    pub detail: String,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [bx, by, bz] = self.block;
        let [tx, ty, tz] = self.thread;
        write!(
            f,
            "{}: kernel `{}` block ({bx},{by},{bz}) thread ({tx},{ty},{tz}) PTX line {}",
            self.check.name(),
            self.kernel,
            self.line
        )?;
        if !self.text.is_empty() {
            write!(f, " `{}`", self.text)?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// Which optional checks run (memcheck and synccheck always run: an access outside
/// memory cannot be performed, and a deadlock cannot be waited out).
#[derive(Debug, Clone, Copy)]
pub struct Checks {
    pub racecheck: bool,
    pub initcheck: bool,
}

impl Default for Checks {
    fn default() -> Self {
        Checks {
            racecheck: true,
            initcheck: true,
        }
    }
}

impl Checks {
    /// From `LALORA_SIM_CHECKS`: `all` (the default), `none`, or a comma-separated list
    /// of `racecheck`, `initcheck`.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("LALORA_SIM_CHECKS") {
            Err(_) => Ok(Checks::default()),
            Ok(v) => Self::parse(&v),
        }
    }

    pub fn parse(v: &str) -> Result<Self, String> {
        match v.trim() {
            "" | "all" => return Ok(Checks::default()),
            "none" => {
                return Ok(Checks {
                    racecheck: false,
                    initcheck: false,
                });
            }
            _ => {}
        }
        let mut c = Checks {
            racecheck: false,
            initcheck: false,
        };
        for part in v.split(',').map(str::trim) {
            match part {
                "racecheck" => c.racecheck = true,
                "initcheck" => c.initcheck = true,
                "memcheck" | "synccheck" => {}
                other => {
                    return Err(format!(
                        "LALORA_SIM_CHECKS: unknown check `{other}` (all, none, racecheck, initcheck, memcheck, synccheck)"
                    ));
                }
            }
        }
        Ok(c)
    }
}
