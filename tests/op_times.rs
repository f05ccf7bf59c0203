//! `--op-times`: the per-op table on stderr and results unchanged on stdout (on a GPU it
//! times kernels instead: `tests/cuda_vs_cpu.rs`, `kernel_times_count_every_launch_and_gemm`).

mod common;

use std::time::{Duration, Instant};

use common::*;
use lalora_engine::backend::cpu::CpuBackend;
use lalora_engine::backend::timed::Timed;

fn eval(extra: &[&str]) -> std::process::Output {
    bin()
        .args(["eval", "--model"])
        .arg(fixture("tiny-gqa/model"))
        .arg("--data")
        .arg(fixture("tiny-gqa/batch.jsonl"))
        .args(["--quiet", "--batch-size", "4"])
        .args(extra)
        .output()
        .unwrap()
}

/// Calls per op of an evaluation, from the model and data alone: 6 sequences in batches
/// of 4 are 2 forwards; the tiny model has 2 layers; each layer runs 4 projection groups
/// (q/k/v with its RoPE on q and k, o, gate/up, down), one attention (its output alone,
/// `attention_out`: an evaluation keeps nothing for a backward) and one SwiGLU; each
/// forward ends in one classifier call.
#[test]
fn eval_prints_each_op_and_the_same_results() {
    // `--json`: the results in full precision, to hold the timed run to.
    let plain = eval(&["--device", "cpu", "--json"]);
    let timed = eval(&["--device", "cpu", "--json", "--op-times"]);
    assert_eq!(plain.status.code(), Some(0));
    assert_eq!(timed.status.code(), Some(0));
    assert_eq!(
        timed.stdout, plain.stdout,
        "results change under --op-times"
    );
    let table = String::from_utf8(timed.stderr).unwrap();
    let calls = |op: &str| -> u64 {
        let line = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(op))
            .unwrap_or_else(|| panic!("no row for {op} in\n{table}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let (forwards, layers) = (2, 2);
    assert_eq!(calls("project_group"), forwards * layers * 4, "{table}");
    assert_eq!(calls("attention_out"), forwards * layers, "{table}");
    assert_eq!(calls("swiglu"), forwards * layers, "{table}");
    assert_eq!(calls("classifier"), forwards, "{table}");
    assert!(table.starts_with("op "), "{table}");
    assert!(table.lines().any(|l| l.starts_with("wall")), "{table}");
    assert!(!String::from_utf8(plain.stderr).unwrap().contains("wall"));
}

/// The cores column is the process's CPU time over the op's wall time, counting every
/// thread: the CPU time charged to an op in which two threads spin is the sum of the two
/// threads' own CPU times (`CLOCK_THREAD_CPUTIME_ID`). Compared that way, the check holds
/// however many cores other processes leave the test (a figure of "about 2 cores" would
/// not).
#[test]
fn cores_count_the_threads_that_ran() {
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec to write; a constant clock id.
        assert_eq!(
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) },
            0
        );
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }
    /// Spins for `d` of wall time; returns the CPU time this thread got meanwhile.
    fn spin(d: Duration) -> Duration {
        let (t, c) = (Instant::now(), thread_cpu());
        let mut x = 0u64;
        while t.elapsed() < d {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        thread_cpu() - c
    }
    let be = CpuBackend::new(1);
    let t = Timed::new(&be);
    let d = Duration::from_millis(200);
    for (threads, name) in [(1, "one"), (2, "two")] {
        let spun: Duration = {
            let _w = t.stopwatch(name);
            std::thread::scope(|s| {
                let others: Vec<_> = (1..threads).map(|_| s.spawn(move || spin(d))).collect();
                spin(d)
                    + others
                        .into_iter()
                        .map(|h| h.join().unwrap())
                        .sum::<Duration>()
            })
        };
        let totals = t.totals();
        let op = totals.iter().find(|(o, _)| *o == name).unwrap().1;
        // The rest of the process (this file's other test waiting on the binary, the
        // thread spawns) adds a little; 10 % and 20 ms bound it.
        let (got, want) = (op.cpu.as_secs_f64(), spun.as_secs_f64());
        assert!(
            (got - want).abs() < 0.1 * want + 0.02,
            "{name}: the op was charged {got:.3} s of CPU, its threads ran {want:.3} s"
        );
        assert!(op.wall >= d, "{name}: wall {:?}", op.wall);
        let cores = op.cores();
        assert!(
            (cores - got / op.wall.as_secs_f64()).abs() < 1e-9,
            "{name}: cores {cores} is not CPU time over wall time"
        );
    }
}
