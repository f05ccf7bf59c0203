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

/// The cores column reads the process's CPU time: a thread spinning alone on the caller
/// charges about one core, and two spinning side by side about two (on a machine with
/// two cores; with one, both still charge CPU time and the figure is about one).
#[test]
fn cores_count_the_threads_that_ran() {
    fn spin(d: Duration) {
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < d {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
    let be = CpuBackend::new(1);
    let t = Timed::new(&be);
    let d = Duration::from_millis(150);
    {
        let _w = t.stopwatch("one");
        spin(d);
    }
    {
        let _w = t.stopwatch("two");
        std::thread::scope(|s| {
            s.spawn(|| spin(d));
            spin(d);
        });
    }
    let totals = t.totals();
    let cores = |op: &str| totals.iter().find(|(o, _)| *o == op).unwrap().1.cores();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    // Another process on the machine can take a core from the test's threads for a
    // while; a third of one is the margin.
    assert!(
        (cores("one") - 1.0).abs() < 0.34,
        "one thread: {}",
        cores("one")
    );
    let want = cpus.min(2.0);
    assert!(
        (cores("two") - want).abs() < 0.34,
        "two threads: {}",
        cores("two")
    );
}
