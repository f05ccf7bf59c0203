//! Device time per kernel: `--op-times` on a GPU, and the CUDA benches'
//! `LALORA_KERNEL_TIMES`. `runtime::Counted` puts a mark (`Runtime::mark`, a CUDA event)
//! before and after each launch and GEMM while timing is on; the pairs are resolved in
//! batches, so the events of a long pass do not pile up, and added up per kernel and grid
//! (per type and shape for cuBLAS calls, whose kernels cuBLAS picks).

use std::collections::HashMap;
use std::fmt::Write;

use super::runtime::{DType, Gemm, LaunchConfig, Mark, Trans};
use crate::error::{Error, Result};

/// Pairs kept before they are resolved (each resolution waits for the device).
const PENDING: usize = 2048;

/// One kernel's calls and their summed device time.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelTime {
    pub name: String,
    pub calls: u64,
    pub ms: f64,
}

/// One timed call: the kernel's name and the marks before and after it.
type Timed = (String, Box<dyn Mark>, Box<dyn Mark>);

#[derive(Default)]
pub struct KernelTimes {
    pending: Vec<Timed>,
    totals: HashMap<String, (u64, f64)>,
    /// The first failure to mark or read a time: `totals` reports it instead of figures
    /// that would leave calls out.
    error: Option<Error>,
}

impl KernelTimes {
    /// One call of `name` between the marks `start` and `end`.
    pub fn add(&mut self, name: String, start: Box<dyn Mark>, end: Box<dyn Mark>) {
        self.pending.push((name, start, end));
        if self.pending.len() >= PENDING {
            self.resolve();
        }
    }

    /// A call that could not be timed.
    pub fn fail(&mut self, e: Error) {
        self.error.get_or_insert(e);
    }

    fn resolve(&mut self) {
        for (name, start, end) in self.pending.drain(..) {
            match end.ms_since(start.as_ref()) {
                Ok(ms) => {
                    let t = self.totals.entry(name).or_default();
                    t.0 += 1;
                    t.1 += ms;
                }
                Err(e) => {
                    self.error.get_or_insert(e);
                }
            }
        }
    }

    /// Every kernel timed so far, the longest total first (then by name); an error if a
    /// call could not be timed.
    pub fn totals(&mut self) -> Result<Vec<KernelTime>> {
        self.resolve();
        if let Some(e) = &self.error {
            return Err(Error::Device(format!("kernel times: {e}")));
        }
        let mut v: Vec<KernelTime> = self
            .totals
            .iter()
            .map(|(name, &(calls, ms))| KernelTime {
                name: name.clone(),
                calls,
                ms,
            })
            .collect();
        v.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
        Ok(v)
    }
}

/// The name a launch is timed under: the entry and its grid, e.g. `lora_gemm_nt [24x16]`
/// (a kernel launched at several shapes, such as a projection group's GEMM, gets a row per
/// shape).
pub fn launch_name(entry: &str, cfg: &LaunchConfig) -> String {
    let [x, y, z] = cfg.grid;
    match (y, z) {
        (1, 1) => format!("{entry} [{x}]"),
        (_, 1) => format!("{entry} [{x}x{y}]"),
        _ => format!("{entry} [{x}x{y}x{z}]"),
    }
}

/// The name a cuBLAS call is timed under: its types, transposes and shape, e.g.
/// `cuBLAS bf16·f32→f32 NT 2048x4096x512` (m x n x k in cuBLAS's column-major terms; `x8`
/// after it for a batch of 8).
pub fn gemm_name(g: &Gemm) -> String {
    let ty = |t: DType| match t {
        DType::F32 => "f32",
        DType::Bf16 => "bf16",
    };
    let tr = |t: Trans| match t {
        Trans::N => 'N',
        Trans::T => 'T',
    };
    let batch = if g.batch > 1 {
        format!(" x{}", g.batch)
    } else {
        String::new()
    };
    format!(
        "cuBLAS {}·{}→{} {}{} {}x{}x{}{batch}",
        ty(g.a.ty),
        ty(g.b.ty),
        ty(g.c.ty),
        tr(g.ta),
        tr(g.tb),
        g.m,
        g.n,
        g.k
    )
}

/// The table of `times`: each kernel's calls, milliseconds, mean microseconds per call and
/// share of the summed device time, the `top` longest (the rest summed on one line), then
/// the sum; with `wall` (seconds of the whole command), the share of it the device was
/// busy with timed work.
pub fn table(times: &[KernelTime], top: usize, wall: Option<f64>) -> String {
    let total: f64 = times.iter().map(|t| t.ms).sum();
    let share = |ms: f64| 100.0 * ms / total.max(1e-12);
    let mut s = format!(
        "{:<44} {:>8} {:>11} {:>10} {:>7}\n",
        "kernel (device time, CUDA events)", "calls", "ms", "us/call", "share"
    );
    for t in times.iter().take(top) {
        let _ = writeln!(
            s,
            "{:<44} {:>8} {:>11.3} {:>10.1} {:>6.1}%",
            t.name,
            t.calls,
            t.ms,
            1e3 * t.ms / t.calls.max(1) as f64,
            share(t.ms)
        );
    }
    if times.len() > top {
        let rest = &times[top..];
        let (calls, ms) = rest
            .iter()
            .fold((0, 0.0), |(c, m), t| (c + t.calls, m + t.ms));
        let _ = writeln!(
            s,
            "{:<44} {calls:>8} {ms:>11.3} {:>10} {:>6.1}%",
            format!("({} more kernels)", rest.len()),
            "",
            share(ms)
        );
    }
    let calls: u64 = times.iter().map(|t| t.calls).sum();
    let _ = write!(s, "{:<44} {calls:>8} {total:>11.3}", "sum");
    match wall {
        Some(w) => {
            let _ = writeln!(
                s,
                "   ({:.1}% of {w:.3} s wall)",
                100.0 * total / 1e3 / w.max(1e-9)
            );
        }
        None => s.push('\n'),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mark at a fixed time, to check the arithmetic without a clock.
    struct At(f64);
    impl Mark for At {
        fn ms_since(&self, earlier: &dyn Mark) -> Result<f64> {
            let e = earlier.as_any().downcast_ref::<At>().unwrap();
            Ok(self.0 - e.0)
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    /// A mark that cannot be read (a device in an error state).
    struct Lost;
    impl Mark for Lost {
        fn ms_since(&self, _: &dyn Mark) -> Result<f64> {
            Err(Error::Device(
                "cuda: an illegal memory access was encountered".into(),
            ))
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    /// A call that could not be timed makes the totals an error, not figures without it.
    #[test]
    fn a_lost_time_is_reported_not_dropped() {
        let mut k = KernelTimes::default();
        k.add("gemm".into(), Box::new(At(0.0)), Box::new(At(1.0)));
        k.add("rmsnorm".into(), Box::new(Lost), Box::new(Lost));
        let e = k.totals().unwrap_err().to_string();
        assert!(
            e.contains("kernel times") && e.contains("illegal memory access"),
            "{e}"
        );
        let mut k = KernelTimes::default();
        k.fail(Error::Device("no event".into()));
        assert!(k.totals().is_err());
    }

    #[test]
    fn launches_are_named_by_entry_and_grid() {
        let cfg = |grid| LaunchConfig {
            grid,
            block: [256, 1, 1],
            shared_bytes: 0,
        };
        assert_eq!(launch_name("scale", &cfg([40, 1, 1])), "scale [40]");
        assert_eq!(
            launch_name("lora_gemm_nt", &cfg([24, 16, 1])),
            "lora_gemm_nt [24x16]"
        );
        assert_eq!(launch_name("gram", &cfg([2, 1, 3])), "gram [2x1x3]");
    }

    #[test]
    fn sums_per_name_longest_first() {
        let mut k = KernelTimes::default();
        let mut add =
            |name: &str, a: f64, b: f64| k.add(name.into(), Box::new(At(a)), Box::new(At(b)));
        add("rmsnorm", 0.0, 0.5);
        add("gemm", 1.0, 4.0);
        add("rmsnorm", 5.0, 5.25);
        let t = k.totals().unwrap();
        assert_eq!(
            t,
            [
                KernelTime {
                    name: "gemm".into(),
                    calls: 1,
                    ms: 3.0
                },
                KernelTime {
                    name: "rmsnorm".into(),
                    calls: 2,
                    ms: 0.75
                }
            ]
        );
        let s = table(&t, 1, Some(0.01));
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 4, "{s}");
        assert!(
            lines[1].starts_with("gemm") && lines[1].contains("3000.0"),
            "{s}"
        );
        assert!(
            lines[2].starts_with("(1 more kernels)") && lines[2].contains("20.0%"),
            "{s}"
        );
        assert!(
            lines[3].contains("3.750") && lines[3].contains("37.5% of 0.010 s wall"),
            "{s}"
        );
    }
}
