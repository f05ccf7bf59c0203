//! Output paths: one that would replace an input of the run is refused and the input left
//! intact; one that cannot be written is refused before any input is read (the runs below
//! name a model that does not exist, so an error about the output shows that it came
//! first).

use super::*;

#[test]
fn an_output_never_replaces_an_input() {
    let d = tempfile::tempdir().unwrap();
    let model = tiny_copy(d.path());
    let data = d.path().join("data.jsonl");
    std::fs::copy(fixture("tiny-gqa/batch.jsonl"), &data).unwrap();
    let adapter = d.path().join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture("tiny-gqa/adapter").join(f), adapter.join(f)).unwrap();
    }
    let before = |p: &Path| std::fs::read(p).unwrap();
    let (data_bytes, weights) = (before(&data), model.join("model.safetensors"));
    let (weight_bytes, adapter_file) =
        (before(&weights), adapter.join("adapter_model.safetensors"));
    let adapter_bytes = before(&adapter_file);
    let cases: Vec<(Vec<OsString>, &Path, &str)> = vec![
        (
            argv(&[
                &"grad", &"--model", &model, &"--data", &data, &"--out", &data,
            ]),
            &data,
            "is the --data file",
        ),
        (
            curvature_args(&model, &data, &weights),
            &weights,
            "is a file the --model directory is read from",
        ),
        (
            argv(&[
                &"grad",
                &"--model",
                &model,
                &"--adapter",
                &adapter,
                &"--data",
                &data,
                &"--out",
                &adapter_file,
            ]),
            &adapter_file,
            "is a file the --adapter directory is read from",
        ),
        (
            argv(&[
                &"train",
                &"--model",
                &model,
                &"--adapter",
                &adapter,
                &"--data",
                &data,
                &"--out",
                &adapter,
                &"--steps",
                &"1",
            ]),
            &adapter,
            "is the --adapter directory",
        ),
    ];
    for (args, out, needle) in &cases {
        let what = format!("{args:?}");
        assert_clean_error(&run_args(args), needle, &what);
        assert!(out.exists(), "{what}: {} is gone", out.display());
    }
    assert_eq!(before(&data), data_bytes, "the data file changed");
    assert_eq!(
        before(&weights),
        weight_bytes,
        "the model's weights changed"
    );
    assert_eq!(before(&adapter_file), adapter_bytes, "the adapter changed");
    // Positive control: a new file beside the model's own is written.
    let beside = model.join("curvature.safetensors");
    let args = curvature_args(&model, &data, &beside);
    assert_runs(&run_args(&args), "curvature into the model's directory");
    assert!(beside.exists());
    // ... and written again: it is not one the model is read from.
    assert_runs(
        &run_args(&args),
        "curvature rewritten in the model's directory",
    );
}

/// A shard is protected by being listed in the model's index, whatever its name (HF
/// names them `model-0000N-of-0000M.safetensors`, but an index may name any file).
#[test]
fn a_shard_named_in_the_index_is_an_input() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::copy(
        fixture("tiny-gqa/model/config.json"),
        model.join("config.json"),
    )
    .unwrap();
    let shard = model.join("weights.safetensors");
    std::fs::copy(fixture("tiny-gqa/model/model.safetensors"), &shard).unwrap();
    let names = safetensors::SafeTensors::deserialize(&std::fs::read(&shard).unwrap())
        .unwrap()
        .names()
        .into_iter()
        .map(|n| (n.to_string(), serde_json::json!("weights.safetensors")))
        .collect::<serde_json::Map<_, _>>();
    let index = serde_json::json!({"metadata": {}, "weight_map": names});
    std::fs::write(
        model.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let data = fixture("tiny-gqa/batch.jsonl");
    let shard_bytes = std::fs::read(&shard).unwrap();
    let run = run_args(&curvature_args(&model, &data, &shard));
    assert_clean_error(
        &run,
        "is a file the --model directory is read from",
        "curvature --out over an indexed shard",
    );
    assert_eq!(
        std::fs::read(&shard).unwrap(),
        shard_bytes,
        "the shard changed"
    );
    // Positive control: the model loads from its index, so the refusal is about the shard.
    let beside = model.join("curvature.safetensors");
    assert_runs(
        &run_args(&curvature_args(&model, &data, &beside)),
        "curvature beside an indexed model",
    );
}

#[test]
fn an_unwritable_output_is_refused_before_anything_is_read() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let missing = d.path().join("no-such-model");
    let data = fixture("tiny-gqa/batch.jsonl");
    let under_file = file.join("out.safetensors");
    let model_args = |cmd: &str| argv(&[&cmd, &"--model", &missing, &"--data", &data]);
    let with = |cmd: &str, rest: &[&dyn AsRef<OsStr>]| {
        let mut a = model_args(cmd);
        a.extend(argv(rest));
        a
    };
    let cases: Vec<(Vec<OsString>, String)> = vec![
        (
            with("grad", &[&"--out", &under_file]),
            format!("{}: is not a directory", file.display()),
        ),
        (
            with("curvature", &[&"--out", &under_file]),
            format!("{}: is not a directory", file.display()),
        ),
        (
            with("curvature", &[&"--out", &d.path()]),
            "is a directory; --out names the file".into(),
        ),
        (
            with("grad", &[&"--out", &"/proc/lalora-out.safetensors"]),
            "/proc: cannot create a file here".into(),
        ),
        (
            with("train", &[&"--out", &file]),
            "exists and is not a directory".into(),
        ),
        (
            with(
                "sweep",
                &[
                    &"--target-eval",
                    &data,
                    &"--source-eval",
                    &data,
                    &"--out",
                    &file,
                ],
            ),
            "exists and is not a directory".into(),
        ),
        (
            argv(&[&"demo", &"--assets", &missing, &"--out", &file]),
            "exists and is not a directory".into(),
        ),
    ];
    for (args, needle) in &cases {
        assert_clean_error(&run_args(args), needle, &format!("{args:?}"));
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"x", "the file was replaced");
    assert_eq!(entries(d.path()), ["a-file"], "something was written");
    // demo's default directory (runs/demo, runs/demo-data for --study data) is checked
    // as an explicit --out is: here `runs` is a file in the working directory.
    let cwd = tempfile::tempdir().unwrap();
    std::fs::write(cwd.path().join("runs"), "x").unwrap();
    for study in ["lambda", "data"] {
        let out = bin()
            .current_dir(cwd.path())
            .args([
                OsStr::new("demo"),
                OsStr::new("--study"),
                OsStr::new(study),
                OsStr::new("--assets"),
            ])
            .arg(&missing)
            .arg("--quiet")
            .output()
            .unwrap();
        let run = Run {
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        assert_clean_error(
            &run,
            "runs: is not a directory",
            &format!("demo --study {study}"),
        );
    }
    assert_eq!(entries(cwd.path()), ["runs"], "something was written");
}

/// `--resume` without a checkpoint is refused before the output directory is created; a
/// fresh run into a directory holding another run's checkpoint says that it replaces it.
#[test]
fn train_says_what_it_does_with_a_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let (model, data) = (fixture("tiny-gqa/model"), fixture("tiny-gqa/batch.jsonl"));
    let out = d.path().join("run");
    let train = |extra: &[&str], quiet: bool| {
        let mut c = bin();
        c.arg("train")
            .arg("--model")
            .arg(&model)
            .arg("--data")
            .arg(&data);
        c.arg("--out")
            .arg(&out)
            .args(["--device", "cpu", "--steps", "2"]);
        if !extra.contains(&"--checkpoint-every") {
            c.args(["--checkpoint-every", "1"]);
        }
        c.args(extra);
        if quiet {
            c.arg("--quiet");
        }
        c.output().unwrap()
    };
    let o = train(&["--resume"], true);
    refused(&o, "checkpoint: no checkpoint to resume from");
    assert!(
        !out.exists(),
        "--resume without a checkpoint created {}",
        out.display()
    );
    ok(&train(&[], true), "a first run");
    let again = train(&[], false);
    ok(&again, "a fresh run over a checkpoint");
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("holds an earlier run's checkpoint; this run starts afresh"),
        "{err}"
    );
    // A run that writes no checkpoint leaves the earlier one, and says so.
    let none = train(&["--checkpoint-every", "0"], false);
    ok(&none, "a run without checkpoints over one");
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(
        err.contains("this run writes none (--checkpoint-every 0), so it stays"),
        "{err}"
    );
    let resumed = train(&["--resume"], false);
    ok(&resumed, "a resumed run");
    assert!(!String::from_utf8_lossy(&resumed.stderr).contains("earlier run's checkpoint"));
}
