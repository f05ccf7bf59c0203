//! Running the binary on one mutated input, and a seeded loop of such runs.

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::common::bin;
use super::mutate::Mutator;

/// A run longer than this is a hang (the slowest case takes well under a second).
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, PartialEq)]
pub enum Outcome {
    Ok,
    Refused,
}

/// Run the binary with `args` (quiet), its output in files under `dir`; the outcome, or a
/// description of what went wrong.
pub fn run(args: &[OsString], dir: &Path) -> Result<Outcome, String> {
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = bin()
        .args(args)
        .arg("--quiet")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running after {TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    let lines: Vec<&str> = stderr.lines().collect();
    let one_error_line = lines.len() == 1 && lines[0].starts_with("error: ");
    match status.code() {
        Some(0) => Ok(Outcome::Ok),
        Some(2) if one_error_line => Ok(Outcome::Refused),
        Some(3) if one_error_line && lines[0].contains("non-finite") => Ok(Outcome::Refused),
        code => Err(format!("exit {code:?}, stderr: {stderr}")),
    }
}

/// A longer campaign than CI's, from the environment: `LALORA_FUZZ_SEED=S` adds `S` to
/// every fuzzer's seed (other mutations) and `LALORA_FUZZ_CASES=X` multiplies its case
/// count. Unset, each fuzzer runs its fixed seed and count. A bad value is refused, not
/// ignored, so a campaign never runs CI's cases while claiming to run others.
fn campaign(seed: u64, cases: usize) -> (u64, usize) {
    let var = |name: &str| -> u64 {
        std::env::var(name).map_or(0, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v:?}: not a whole number"))
        })
    };
    let (offset, times) = (var("LALORA_FUZZ_SEED"), var("LALORA_FUZZ_CASES"));
    (seed + offset, cases * times.max(1) as usize)
}

/// Run `cases` mutated inputs: `make(m, dir)` writes one into `dir` and returns the
/// arguments and a description of the mutation. Asserts every run is clean, that the
/// unmutated input (case 0, `m` = None) runs, and that some mutations were refused and
/// some ran (else the mutator reaches either no check or nothing past the first one).
/// The seed and count are CI's unless [`campaign`]'s variables say otherwise.
pub fn fuzz(
    name: &str,
    seed: u64,
    cases: usize,
    mut make: impl FnMut(Option<&mut Mutator>, &Path) -> (Vec<OsString>, String),
) {
    let (seed, cases) = campaign(seed, cases);
    let root = tempfile::tempdir().unwrap();
    let mut m = Mutator::new(seed);
    let mut refused = 0;
    for case in 0..=cases {
        let dir = root.path().join(format!("case{case}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (args, what) = make((case > 0).then_some(&mut m), &dir);
        let outcome = run(&args, &dir).unwrap_or_else(|e| {
            panic!("{name} seed {seed} case {case} ({what}): {e}; args {args:?}")
        });
        if case == 0 {
            assert_eq!(outcome, Outcome::Ok, "{name}: the unmutated input must run");
        }
        refused += (outcome == Outcome::Refused) as usize;
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let ran = cases - refused;
    eprintln!("{name}: {ran} of {cases} mutations ran, {refused} refused");
    assert!(
        refused >= cases / 10 && ran >= cases / 20,
        "{name}: {ran} of {cases} mutations ran and {refused} were refused"
    );
}

pub fn os(args: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_os_string()).collect()
}
