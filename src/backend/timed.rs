//! `--op-times`: a backend that forwards every op to another and adds up the wall time and
//! the calls of each, for a table at the end of a command (where a step's time goes, op by
//! op). Only the backend's own entry points are timed: work an op does inside (the CPU's
//! `add_rmsnorm` calling its add and its norm) counts once, to the op called.
//!
//! Each op's row also says how many cores it kept busy: the process's CPU time over the
//! op's calls divided by their wall time. An op at 1.0 of 2 cores runs on one thread while
//! the other idles, which a wall-time share alone does not show. The model calls ops one
//! at a time from one thread, so the CPU time between an op's start and end is its own
//! (and that of anything else the process runs meanwhile, such as a progress bar's thread).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Backend;

/// One op's totals: calls, wall time, and the process's CPU time during those calls.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpTotal {
    pub calls: u64,
    pub wall: Duration,
    pub cpu: Duration,
}

impl OpTotal {
    /// Cores kept busy on average: CPU time over wall time.
    pub fn cores(&self) -> f64 {
        self.cpu.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }
}

pub struct Timed<'a, B: Backend> {
    inner: &'a B,
    ops: Mutex<BTreeMap<&'static str, OpTotal>>,
    started: Instant,
    started_cpu: Duration,
}

/// CPU time the whole process (every thread) has used so far.
fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux and the
    // BSDs define. On failure (never seen) the time reads as zero and the column as 0.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// Adds the wall and CPU time from its creation to its drop to one op's totals.
pub struct Stopwatch<'t> {
    ops: &'t Mutex<BTreeMap<&'static str, OpTotal>>,
    op: &'static str,
    start: Instant,
    start_cpu: Duration,
}

impl Drop for Stopwatch<'_> {
    fn drop(&mut self) {
        let took = self.start.elapsed();
        let cpu = process_cpu_time().saturating_sub(self.start_cpu);
        // A panic elsewhere leaves the totals consistent: take them as they are.
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let e = ops.entry(self.op).or_default();
        e.calls += 1;
        e.wall += took;
        e.cpu += cpu;
    }
}

impl<'a, B: Backend> Timed<'a, B> {
    pub fn new(inner: &'a B) -> Self {
        Timed {
            inner,
            ops: Mutex::new(BTreeMap::new()),
            started: Instant::now(),
            started_cpu: process_cpu_time(),
        }
    }

    /// Times from now until the returned guard drops, under `op`: how each backend op is
    /// timed, and open to host work a caller wants in the same table.
    pub fn stopwatch(&self, op: &'static str) -> Stopwatch<'_> {
        Stopwatch {
            ops: &self.ops,
            op,
            start: Instant::now(),
            start_cpu: process_cpu_time(),
        }
    }

    /// Each op's totals so far, the longest (wall time) first.
    pub fn totals(&self) -> Vec<(&'static str, OpTotal)> {
        let ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = ops.iter().map(|(&op, &t)| (op, t)).collect();
        v.sort_by(|a, b| b.1.wall.cmp(&a.1.wall).then(a.0.cmp(b.0)));
        v
    }

    /// The table `--op-times` prints: each op's calls, seconds, share of the time since
    /// the wrapper was made and cores kept busy, then the rest (the model's own host work,
    /// I/O, data), and the whole.
    pub fn report(&self) -> String {
        let whole = OpTotal {
            calls: 0,
            wall: self.started.elapsed(),
            cpu: process_cpu_time().saturating_sub(self.started_cpu),
        };
        let wall = whole.wall.as_secs_f64().max(1e-9);
        let totals = self.totals();
        let in_ops = totals.iter().fold(OpTotal::default(), |a, (_, t)| OpTotal {
            calls: 0,
            wall: a.wall + t.wall,
            cpu: a.cpu + t.cpu,
        });
        let rest = OpTotal {
            calls: 0,
            wall: whole.wall.saturating_sub(in_ops.wall),
            cpu: whole.cpu.saturating_sub(in_ops.cpu),
        };
        let mut s = format!(
            "{:<24} {:>9} {:>10} {:>7} {:>6}\n",
            "op", "calls", "seconds", "share", "cores"
        );
        let mut row = |op: &str, calls: &str, t: &OpTotal| {
            let secs = t.wall.as_secs_f64();
            let _ = writeln!(
                s,
                "{op:<24} {calls:>9} {secs:>10.3} {:>6.1}% {:>6.2}",
                100.0 * secs / wall,
                t.cores()
            );
        };
        for (op, t) in &totals {
            row(op, &t.calls.to_string(), t);
        }
        row("(outside the ops)", "", &rest);
        row("wall", "", &whole);
        s
    }
}

impl<B: Backend> Backend for Timed<'_, B> {
    type Buf = B::Buf;
    type Weight = B::Weight;

    crate::delegate_backend!(B, watch = stopwatch;
        describe, device_memory, reset_device_peak, buf, zeros, to_host, take_host, weight, weight_stored, copy_into, slice, embedding, rmsnorm,
        add_rmsnorm, rmsnorm_backward, linear, linear_backward, lora_forward, lora_backward,
        project_group, project_group_backward, rope, attention, attention_out, attention_dout, attention_backward, swiglu,
        swiglu_backward, add_assign, cross_entropy, classifier, gram_accumulate, gram_accumulate_upper, mirror_upper, segment_sum,
        sq_grad_accumulate, matmul, dup, mul_assign, scale, axpy, dot, dots, adamw_step,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    /// Results pass through unchanged, and every call is counted under its op.
    #[test]
    fn forwards_and_counts() {
        let be = CpuBackend::new(2);
        let t = Timed::new(&be);
        let (m, k, n) = (70, 33, 19);
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.25).collect();
        let (wc, wt) = (
            be.weight(w.clone(), n, k).unwrap(),
            t.weight(w, n, k).unwrap(),
        );
        let want = be.linear(&x, &wc, m, k, n).unwrap();
        for _ in 0..3 {
            assert_eq!(t.linear(&x, &wt, m, k, n).unwrap(), want);
        }
        let mut y = want.clone();
        t.scale(&mut y, 2.0).unwrap();
        assert_eq!(y, want.iter().map(|v| v * 2.0).collect::<Vec<_>>());
        let calls: Vec<(&str, u64)> = t.totals().iter().map(|(op, t)| (*op, t.calls)).collect();
        let mut calls = calls;
        calls.sort();
        assert_eq!(calls, [("linear", 3), ("scale", 1), ("weight", 1)]);
        let r = t.report();
        assert!(
            r.lines()
                .any(|l| l.starts_with("linear") && l.contains(" 3 "))
        );
        assert!(r.contains("(outside the ops)") && r.contains("wall") && r.contains("cores"));
    }
}
