//! Crash safety of `train` and what a run leaves in its output directory.
//!
//! - A save stopped at each of its steps (the deterministic version of a kill inside the
//!   link switch) resumes to the adapter of an uninterrupted run, and the next start
//!   cleans what the stopped save left.
//! - Random SIGKILLs of `train --checkpoint-every 1` all resume to the byte-identical
//!   final adapter. `LALORA_CRASH_KILLS=N` sets the number of kills (default 25; the
//!   acceptance run of issue 10 uses 100).
//! - A failed run leaves the directory as it was apart from its log; outputs respect the
//!   umask; an output is never put in place of a FIFO, link or device; one run at a time.
//! - Ctrl-C or `kill` while a file is being written removes the partial file, and the run
//!   still ends by the signal.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use lalora_engine::Error;
use lalora_engine::train::TrainConfig;
use lalora_engine::train::checkpoint::{self, SavePoint};
use lalora_engine::train::outdir::OutDir;
use lalora_engine::train::session::{self, SessionOptions};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const STEPS: &str = "10";

/// Every file under `dir` (links not followed) with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for name in entries(dir) {
        let p = dir.join(&name);
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            out.extend(snapshot(&p));
        } else if m.file_type().is_symlink() {
            out.push((
                p.clone(),
                std::fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes(),
            ));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

/// What a completed run leaves: results, log, the link and the one slot it names.
fn assert_clean_finish(out: &Path) {
    let mut e = entries(out);
    // The CLI writes the run's cost.json after the results: a kill in between leaves a
    // finished run without it, which the resume that follows has no steps to measure for.
    e.retain(|n| n != "cost.json");
    let slot = std::fs::read_link(out.join("checkpoint")).unwrap();
    let mut want = vec![
        "adapter_config.json".to_string(),
        "adapter_model.safetensors".into(),
        "checkpoint".into(),
        slot.to_string_lossy().into_owned(),
        "metrics.jsonl".into(),
        "train.log".into(),
    ];
    want.sort();
    assert_eq!(e, want, "{}", out.display());
}

fn cfg() -> TrainConfig {
    TrainConfig {
        steps: 6,
        batch_size: 2,
        warmup_steps: 1,
        seed: 3,
        ..TrainConfig::default()
    }
}

fn opts(out: &Path, stop: Option<usize>, resume: bool) -> SessionOptions {
    SessionOptions {
        out: Some(out.to_path_buf()),
        checkpoint_every: 1,
        resume,
        quiet: true,
        base_model: "tiny".into(),
        stop_after: stop,
        ..SessionOptions::default()
    }
}

// The signal test needs its write to outlast the delivery of a signal, which another
// child-running test's load on two cores can delay past the whole write: so every test here
// that runs the model in a child takes `one_child_at_a_time` (tests/common).

#[test]
fn a_save_stopped_anywhere_resumes_to_the_same_adapter() {
    let _alone = one_child_at_a_time();
    let t = tiny();
    let be = cpu();
    let model = tiny_model(&be);
    let d = tempfile::tempdir().unwrap();
    let run = |out: &Path, stop, resume| {
        session::run(
            &be,
            &model,
            &t.examples,
            &cfg(),
            None,
            &t.adapter,
            &opts(out, stop, resume),
        )
    };
    let straight = d.path().join("straight");
    run(&straight, None, false).unwrap();
    let want = std::fs::read(straight.join("adapter_model.safetensors")).unwrap();
    // The checkpoint of step 4, to be saved over one of step 3.
    let four = d.path().join("four");
    run(&four, Some(4), false).unwrap();
    let next = checkpoint::load(&four, &t.loaded.cfg).unwrap();
    for point in [
        SavePoint::SlotWritten,
        SavePoint::LinkStaged,
        SavePoint::LinkSwitched,
    ] {
        let out = d.path().join(format!("{point:?}"));
        run(&out, Some(3), false).unwrap();
        let stopped = checkpoint::save_until(&out, &next, "tiny", |p| {
            if p == point {
                Err(Error::usage("stopped"))
            } else {
                Ok(())
            }
        });
        assert!(stopped.is_err());
        let resumed_from = checkpoint::load(&out, &t.loaded.cfg).unwrap().state.step;
        let expected = if point == SavePoint::LinkSwitched {
            4
        } else {
            3
        };
        assert_eq!(resumed_from, expected, "stopped at {point:?}");
        let r = run(&out, None, true).unwrap();
        assert_eq!(r.metrics.first().map(|m| m.step), Some(expected + 1));
        assert_eq!(
            std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
            want,
            "stopped at {point:?}: the resumed adapter differs"
        );
        assert_clean_finish(&out);
    }
}

/// `train` on the tiny fixture, checkpointing every step.
fn train(out: &Path, resume: bool) -> Command {
    train_model(&fixture("tiny-gqa/model"), out, resume)
}

fn train_model(model: &Path, out: &Path, resume: bool) -> Command {
    let f = fixture("tiny-gqa");
    let mut c = bin();
    c.args([
        "train",
        "--quiet",
        "--device",
        "cpu",
        "--threads",
        "2",
        "--rank",
        "4",
    ])
    .args([
        "--steps",
        STEPS,
        "--batch-size",
        "2",
        "--checkpoint-every",
        "1",
    ])
    .arg("--model")
    .arg(model)
    .arg("--data")
    .arg(f.join("batch.jsonl"))
    .arg("--out")
    .arg(out)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if resume {
        c.arg("--resume");
    }
    c
}

/// What a kill left in the middle of a save: an unnamed slot (killed while writing it or
/// before removing the old one), a staged link (just before the switch), a temporary.
fn leftovers(out: &Path) -> &'static str {
    let named = std::fs::read_link(out.join("checkpoint")).ok();
    let e = entries(out);
    let unnamed = e
        .iter()
        .any(|n| n.starts_with("checkpoint-") && named.as_deref() != Some(Path::new(n)));
    if e.iter().any(|n| n.starts_with("checkpoint.tmp-")) {
        "staged link"
    } else if unnamed {
        "unnamed slot"
    } else if e.iter().any(|n| n.starts_with(".lalora-tmp-")) {
        "temporary"
    } else {
        "nothing"
    }
}

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn random_sigkills_all_resume_to_the_identical_adapter() {
    let _alone = one_child_at_a_time();
    let kills_wanted: usize = std::env::var("LALORA_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let d = tempfile::tempdir().unwrap();
    let reference = d.path().join("reference");
    let t0 = Instant::now();
    let o = train(&reference, false).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let span = t0.elapsed().as_micros() as u64;
    let want = std::fs::read(reference.join("adapter_model.safetensors")).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let (mut kills, mut chains) = (0, 0);
    let mut left = std::collections::BTreeMap::new();
    while kills < kills_wanted {
        // One output directory per chain: runs killed and resumed until one completes.
        let out = d.path().join(format!("chain-{chains}"));
        chains += 1;
        loop {
            let resume = out.join("checkpoint").exists();
            let mut child = train(&out, resume).spawn().unwrap();
            std::thread::sleep(Duration::from_micros(rng.random_range(0..span)));
            if kills < kills_wanted && child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
                if out.exists() {
                    *left.entry(leftovers(&out)).or_insert(0) += 1;
                }
                continue;
            }
            let o = child.wait_with_output().unwrap();
            assert!(
                o.status.success(),
                "chain {chains} after {kills} kills: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            break;
        }
        assert_eq!(
            std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
            want,
            "chain {chains}: the adapter after {kills} kills differs"
        );
        assert_eq!(
            losses(&out),
            losses(&reference),
            "chain {chains}: metrics.jsonl"
        );
        assert_clean_finish(&out);
    }
    eprintln!(
        "{kills} kills in {chains} chains, all resumed to the identical adapter; what the kills left: {left:?}"
    );
}

/// The fixture model copied with every final-norm weight set to `f32::MAX`: a valid file
/// whose logits overflow, so a run on it fails at its first step.
fn overflowing_model(dir: &Path) -> PathBuf {
    let m = dir.join("overflowing-model");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-gqa/model").join(f), m.join(f)).unwrap();
    }
    let p = m.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let off = &header["model.norm.weight"]["data_offsets"];
    let (a, b) = (
        off[0].as_u64().unwrap() as usize,
        off[1].as_u64().unwrap() as usize,
    );
    for x in bytes[8 + n + a..8 + n + b].chunks_mut(4) {
        x.copy_from_slice(&f32::MAX.to_le_bytes());
    }
    std::fs::write(&p, bytes).unwrap();
    m
}

#[test]
fn a_failed_run_leaves_the_output_directory_as_it_was_apart_from_its_log() {
    let _alone = one_child_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    assert!(train(&out, false).status().unwrap().success());
    let before = snapshot(&out);
    let o = train_model(&overflowing_model(d.path()), &out, false)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("step 1: non-finite loss"), "{err}");
    let after = snapshot(&out);
    let log = out.join("train.log");
    let without_log = |s: &[(PathBuf, Vec<u8>)]| {
        s.iter()
            .filter(|(p, _)| *p != log)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(without_log(&after), without_log(&before));
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("error: step 1: non-finite loss")
    );
}

#[test]
fn outputs_respect_the_umask_and_never_replace_special_files() {
    let _alone = one_child_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let f = fixture("tiny-gqa");
    // The umask is per process: set it in a shell that then runs the engine.
    let cmd = format!(
        "umask 027; exec {} train --quiet --device cpu --threads 2 --steps 2 --batch-size 2 --checkpoint-every 1 --model {} --data {} --out {}",
        env!("CARGO_BIN_EXE_lalora-engine"),
        f.join("model").display(),
        f.join("batch.jsonl").display(),
        out.display()
    );
    let shell = Command::new("sh")
        .args(["-c", &cmd])
        .stdout(Stdio::null())
        .status();
    assert!(shell.unwrap().success());
    use std::os::unix::fs::PermissionsExt;
    for (rel, mode) in [
        ("adapter_model.safetensors", 0o640),
        ("metrics.jsonl", 0o640),
        ("cost.json", 0o640),
        ("train.log", 0o640),
        ("checkpoint/optimizer.safetensors", 0o640),
        ("checkpoint/", 0o750),
    ] {
        let got = std::fs::metadata(out.join(rel))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(got, mode, "{rel}: mode {got:o}");
    }
    // A FIFO or a link given as --out stays what it is (exit 2).
    let fifo = d.path().join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let target = d.path().join("target");
    std::fs::write(&target, b"keep").unwrap();
    let link = d.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    for (cmd, path) in [
        ("grad", &fifo),
        ("grad", &link),
        ("curvature", &link),
        ("train", &fifo),
    ] {
        let o = bin()
            .args([
                cmd,
                "--quiet",
                "--device",
                "cpu",
                "--threads",
                "2",
                "--model",
            ])
            .arg(f.join("model"))
            .arg("--data")
            .arg(f.join("batch.jsonl"))
            .arg("--out")
            .arg(path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{cmd} --out {}: {err}",
            path.display()
        );
    }
    let ft = std::fs::symlink_metadata(&fifo).unwrap().file_type();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&ft));
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
}

#[test]
fn one_run_at_a_time_and_foreign_checkpoints_are_left_alone() {
    let _alone = one_child_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let held = OutDir::open(d.path()).unwrap();
    let e = OutDir::open(d.path())
        .err()
        .expect("a second run into a locked directory");
    assert!(e.to_string().contains("in use"), "{e}");
    drop(held);
    OutDir::open(d.path()).unwrap();
    // The output check's probe file, left by a kill while it existed, is removed at start.
    std::fs::write(d.path().join(".lalora-probe-Ab12Cd"), b"").unwrap();
    drop(OutDir::open(d.path()).unwrap());
    assert!(!d.path().join(".lalora-probe-Ab12Cd").exists());
    // A `checkpoint` directory (an older layout, or not ours) is refused, not replaced.
    std::fs::create_dir(d.path().join("checkpoint")).unwrap();
    std::fs::write(d.path().join("checkpoint/keep"), b"x").unwrap();
    let e = OutDir::open(d.path())
        .err()
        .expect("a foreign checkpoint directory");
    assert_eq!(e.exit_code(), 2);
    assert!(d.path().join("checkpoint/keep").exists());
}

/// SIGINT and SIGTERM sent while `curvature` writes its file (a KFAC estimate of the
/// default model: 1.2 GB, a second or more to write) leave nothing in the output's
/// directory, and the process still ends by the signal. Without the handler the partial
/// file stayed, under the temporaries' prefix. A SIGHUP inherited as ignored (`nohup`)
/// stays ignored: that run completes its write.
#[test]
fn a_signal_while_writing_removes_the_partial_file() {
    let _alone = one_child_at_a_time();
    use std::os::unix::process::ExitStatusExt;
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // A run whose write finishes before the signal lands (this thread descheduled
        // under load for longer than the write) shows nothing: it runs again, three times
        // at most.
        let mut attempt = 0;
        let (o, d) = loop {
            attempt += 1;
            let (o, d) = write_and_signal(signal);
            let finished = d.path().join("out/c.safetensors").exists();
            if signal == libc::SIGHUP || !finished {
                break (o, d);
            }
            assert!(
                attempt < 3,
                "signal {signal}: the write finished first {attempt} times; the test needs a longer write"
            );
        };
        let dir = d.path().join("out");
        if signal == libc::SIGHUP {
            ok(&o, "curvature with SIGHUP ignored");
            assert_eq!(entries(&dir), ["c.safetensors"], "the write completed");
            continue;
        }
        assert_eq!(o.status.signal(), Some(signal), "ended by the signal");
        assert_eq!(
            entries(&dir),
            Vec::<String>::new(),
            "signal {signal}: the partial file was left"
        );
    }
}

/// Runs `curvature` into `out/c.safetensors` of a new directory and sends it `signal` as
/// soon as its write begins (SIGHUP to a run that inherits it ignored, as under `nohup`).
fn write_and_signal(signal: i32) -> (std::process::Output, tempfile::TempDir) {
    let data = assets().join("data/source-curvature.jsonl");
    let d = tempfile::tempdir().unwrap();
    // In a directory the write creates: the output check's probe (in `d`) is not taken for
    // the write.
    let dir = d.path().join("out");
    let ignore = if signal == libc::SIGHUP {
        "trap '' HUP; "
    } else {
        ""
    };
    let mut cmd = Command::new("sh");
    // SIGINT and SIGTERM at their default disposition in the child, whatever this test
    // inherited: a background job (`cmd &` from a script, as a CI runner may start it)
    // inherits SIGINT ignored, which the engine rightly keeps ignored.
    // SAFETY: `signal` is async-signal-safe, as a `pre_exec` hook must be.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd
        .arg("-c")
        .arg(format!("{ignore}exec \"$0\" \"$@\""))
        .arg(bin().get_program())
        .args([
            "curvature",
            "--device",
            "cpu",
            "--quiet",
            "--scheme",
            "kfac",
        ])
        .args(["--limit", "2", "--max-len", "32"])
        .arg("--model")
        .arg(smollm2())
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(dir.join("c.safetensors"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    // The temporary appears when the write starts.
    while !dir.exists() || entries(&dir).is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "curvature ended before writing"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no write began"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: a signal to our own child, whose pid is live (not yet waited for).
    unsafe { libc::kill(child.id() as i32, signal) };
    (child.wait_with_output().unwrap(), d)
}
