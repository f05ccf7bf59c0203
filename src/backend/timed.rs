//! `--op-times`: a backend that forwards every op to another and adds up the wall time and
//! the calls of each, for a table at the end of a command (where a step's time goes, op by
//! op). Only the backend's own entry points are timed: work an op does inside (the CPU's
//! `add_rmsnorm` calling its add and its norm) counts once, to the op called.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Backend;

pub struct Timed<'a, B: Backend> {
    inner: &'a B,
    ops: Mutex<BTreeMap<&'static str, (u64, Duration)>>,
    started: Instant,
}

/// Adds the time from its creation to its drop to one op's total.
pub struct Stopwatch<'t> {
    ops: &'t Mutex<BTreeMap<&'static str, (u64, Duration)>>,
    op: &'static str,
    start: Instant,
}

impl Drop for Stopwatch<'_> {
    fn drop(&mut self) {
        let took = self.start.elapsed();
        // A panic elsewhere leaves the totals consistent: take them as they are.
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let e = ops.entry(self.op).or_default();
        e.0 += 1;
        e.1 += took;
    }
}

impl<'a, B: Backend> Timed<'a, B> {
    pub fn new(inner: &'a B) -> Self {
        Timed {
            inner,
            ops: Mutex::new(BTreeMap::new()),
            started: Instant::now(),
        }
    }

    fn stopwatch(&self, op: &'static str) -> Stopwatch<'_> {
        Stopwatch {
            ops: &self.ops,
            op,
            start: Instant::now(),
        }
    }

    /// `(op, calls, total time)` per op called so far, the longest first.
    pub fn totals(&self) -> Vec<(&'static str, u64, Duration)> {
        let ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = ops.iter().map(|(&op, &(n, t))| (op, n, t)).collect();
        v.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(b.0)));
        v
    }

    /// The table `--op-times` prints: each op's calls, seconds and share of the time since
    /// the wrapper was made, then the rest (the model's own host work, I/O, data).
    pub fn report(&self) -> String {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let totals = self.totals();
        let in_ops: f64 = totals.iter().map(|t| t.2.as_secs_f64()).sum();
        let mut s = format!(
            "{:<24} {:>9} {:>10} {:>7}\n",
            "op", "calls", "seconds", "share"
        );
        for (op, n, t) in &totals {
            let t = t.as_secs_f64();
            let _ = writeln!(s, "{op:<24} {n:>9} {t:>10.3} {:>6.1}%", 100.0 * t / wall);
        }
        let rest = (wall - in_ops).max(0.0);
        let _ = writeln!(
            s,
            "{:<24} {:>9} {rest:>10.3} {:>6.1}%",
            "(outside the ops)",
            "",
            100.0 * rest / wall
        );
        let _ = writeln!(s, "{:<24} {:>9} {wall:>10.3}", "wall", "");
        s
    }
}

impl<B: Backend> Backend for Timed<'_, B> {
    type Buf = B::Buf;
    type Weight = B::Weight;

    crate::delegate_backend!(B, watch = stopwatch;
        describe, device_memory, reset_device_peak, buf, zeros, to_host, take_host, weight, copy_into, slice, embedding, rmsnorm,
        add_rmsnorm, rmsnorm_backward, linear, linear_backward, lora_forward, lora_backward,
        project_group, project_group_backward, rope, attention, attention_out, attention_dout, attention_backward, swiglu,
        swiglu_backward, add_assign, cross_entropy, classifier, gram_accumulate, segment_sum,
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
        let calls: Vec<(&str, u64)> = t.totals().iter().map(|&(op, n, _)| (op, n)).collect();
        let mut calls = calls;
        calls.sort();
        assert_eq!(calls, [("linear", 3), ("scale", 1), ("weight", 1)]);
        let r = t.report();
        assert!(
            r.lines()
                .any(|l| l.starts_with("linear") && l.contains(" 3 "))
        );
        assert!(r.contains("(outside the ops)") && r.contains("wall"));
    }
}
