//! Zero, negative, non-finite and absurd flag values: refused naming the flag before any
//! work starts (they divided by zero, started 100000 threads, allocated 256 GB, or trained
//! on NaN), and nothing written.

use super::*;

#[test]
fn zero_negative_and_non_finite_flags() {
    let d = tempfile::tempdir().unwrap();
    let (model, data) = (fixture("tiny-gqa/model"), fixture("tiny-gqa/batch.jsonl"));
    let out = d.path().join("out");
    let base = |cmd: &str| {
        let mut a = argv(&[&cmd, &"--model", &model, &"--data", &data]);
        if cmd != "eval" {
            a.extend(argv(&[&"--out", &out]));
        }
        a
    };
    let cases: [(&str, &[&str], &str); 37] = [
        ("eval", &["--batch-size", "0"], "--batch-size 0"),
        ("grad", &["--batch-size", "0"], "--batch-size 0"),
        ("curvature", &["--batch-size", "0"], "--batch-size 0"),
        ("train", &["--batch-size", "0"], "--batch-size 0"),
        ("train", &["--grad-accum", "0"], "--grad-accum 0"),
        ("train", &["--steps", "0"], "--steps 0"),
        ("eval", &["--limit", "0"], "--limit 0"),
        ("eval", &["--max-len", "1"], "--max-len 1"),
        ("eval", &["--threads", "100000"], "--threads 100000"),
        (
            "curvature",
            &["--fisher", "mc", "--mc-samples", "0"],
            "--mc-samples 0",
        ),
        ("curvature", &["--warmup-lr", "nan"], "--warmup-lr NaN"),
        ("train", &["--lr", "nan"], "--lr NaN"),
        ("train", &["--lr=-1"], "--lr -1"),
        ("train", &["--weight-decay", "nan"], "--weight-decay NaN"),
        ("train", &["--weight-decay", "-0.1"], "--weight-decay -0.1"),
        ("train", &["--clip", "inf"], "--clip inf"),
        ("train", &["--clip", "-1"], "--clip -1"),
        ("train", &["--lambda", "-1"], "--lambda -1"),
        ("train", &["--lambda", "nan"], "--lambda NaN"),
        ("train", &["--delta", "inf"], "--delta inf"),
        ("train", &["--delta", "-1"], "--delta -1"),
        // A negative number after a float flag is its value (not an unknown flag `-1`), so
        // the error names the flag's range.
        ("train", &["--lr", "-1"], "--lr -1"),
        ("train", &["--alpha", "-2"], "--alpha -2"),
        // Likewise after a whole-number flag: clap's error names the flag.
        (
            "train",
            &["--steps", "-1"],
            "invalid value '-1' for '--steps <STEPS>'",
        ),
        (
            "eval",
            &["--limit", "-5"],
            "invalid value '-5' for '--limit <LIMIT>'",
        ),
        (
            "curvature",
            &["--seed", "-3"],
            "invalid value '-3' for '--seed <SEED>'",
        ),
        ("train", &["--alpha", "nan"], "--alpha NaN"),
        ("train", &["--rank", "0"], "--rank 0"),
        ("grad", &["--rank", "1000000000"], "hidden size 64"),
        // A rate of 0 trains nothing; 0 tokens generate nothing.
        (
            "train",
            &["--lr", "0"],
            "--lr 0: must be a finite number > 0",
        ),
        ("eval", &["--max-new-tokens", "0"], "--max-new-tokens 0"),
        // Flags that the rest of the command would silently ignore, or absurd.
        (
            "curvature",
            &["--mc-samples", "3"],
            "--mc-samples 3 goes with --fisher mc",
        ),
        (
            "curvature",
            &["--fisher", "mc", "--mc-samples", "100000000"],
            "--mc-samples 100000000: must be at most 1024",
        ),
        (
            "curvature",
            &["--kfac-approx", "reduce"],
            "--kfac-approx reduce goes with --scheme kfac or kfac-tri",
        ),
        (
            "curvature",
            &["--warmup-data", "warm.jsonl"],
            "--warmup-data goes with --warmup-steps",
        ),
        (
            "curvature",
            &[
                "--warmup-steps",
                "2",
                "--warmup-data",
                "warm.jsonl",
                "--warmup-lr",
                "0",
            ],
            "--warmup-lr 0: must be a finite number > 0",
        ),
        ("train", &["--lambda", "inf"], "--lambda inf"),
    ];
    for (cmd, flags, needle) in cases {
        let mut a = base(cmd);
        a.extend(flags.iter().map(OsString::from));
        let r = run_args(&a);
        assert_clean_error(&r, needle, &format!("{cmd} {flags:?}"));
        assert!(!out.exists(), "{cmd} {flags:?}: output written");
    }
}

#[test]
fn sampling_and_sweep_flags() {
    let d = tempfile::tempdir().unwrap();
    let (model, data) = (fixture("tiny-gqa/model"), fixture("tiny-gqa/batch.jsonl"));
    let generate = |flags: &[&str]| {
        let mut a = argv(&[&"generate", &"--model", &model, &"--prompt", &"hi"]);
        a.extend(flags.iter().map(OsString::from));
        run_args(&a)
    };
    for (flags, needle) in [
        (&["--temperature", "nan"][..], "--temperature NaN"),
        (&["--temperature=-1"], "--temperature -1"),
        (&["--temperature", "-1"], "--temperature -1"),
        (&["--top-p", "-0.5"], "--top-p -0.5"),
        (&["--top-p", "0"], "--top-p 0"),
        (&["--top-p", "1.5"], "--top-p 1.5"),
    ] {
        assert_clean_error(&generate(flags), needle, &format!("generate {flags:?}"));
    }
    let out = d.path().join("sweep");
    let sweep_at = |lambdas: &str, flags: &[&OsStr]| {
        let mut a = argv(&[
            &"sweep",
            &"--model",
            &model,
            &"--data",
            &data,
            &"--target-eval",
            &data,
            &"--source-eval",
            &data,
            &"--lambdas",
            &lambdas,
            &"--steps",
            &"1",
            &"--out",
            &out,
        ]);
        a.extend(flags.iter().map(OsString::from));
        run_args(&a)
    };
    let sweep = |flags: &[&OsStr]| sweep_at("0", flags);
    // Multiple-choice and question/answer files of one row, and of two.
    let row = r#"{"question": "q", "choices": ["a", "b"], "answer": 0}"#;
    let (one, two) = (d.path().join("one.jsonl"), d.path().join("two.jsonl"));
    std::fs::write(&one, format!("{row}\n")).unwrap();
    std::fs::write(&two, format!("{row}\n{row}\n")).unwrap();
    let qa = r#"{"question": "q", "answer": "1"}"#;
    let qa_one = d.path().join("qa.jsonl");
    std::fs::write(&qa_one, format!("{qa}\n")).unwrap();
    let s = |x: &'static str| OsStr::new(x);
    for (flags, needle) in [
        (vec![s("--eval-limit"), s("0")], "--eval-limit 0"),
        (vec![s("--choice-limit"), s("1")], "--choice-limit 1"),
        (
            vec![s("--exact-match-limit"), s("1")],
            "--exact-match-limit 1",
        ),
        (vec![s("--choice-eval"), one.as_os_str()], "at least 2"),
        (
            vec![s("--exact-match-eval"), qa_one.as_os_str()],
            "at least 2",
        ),
        // The tiny model has no tokenizer: refused before any training.
        (vec![s("--choice-eval"), two.as_os_str()], "tokenizer"),
    ] {
        assert_clean_error(&sweep(&flags), needle, &format!("sweep {flags:?}"));
        assert!(!out.exists(), "sweep {flags:?} wrote {}", out.display());
    }
    // A lambda given twice (spelt two ways) would train and report it twice.
    assert_clean_error(
        &sweep_at("0,10,1e1", &[]),
        "10 given twice (item 3)",
        "--lambdas",
    );
    assert!(
        !out.exists(),
        "sweep with a repeated lambda wrote its output"
    );
    // The demo's runs are sized for sequences of 256 tokens: a longer --max-len is
    // refused (it was cut to 256 without a word), before the assets are looked for.
    let missing = d.path().join("no-assets");
    assert_clean_error(
        &run_args(&argv(&[
            &"demo",
            &"--max-len",
            &"300",
            &"--assets",
            &missing,
        ])),
        "--max-len 300: must be at most 256 in the demo",
        "demo --max-len 300",
    );
}

#[test]
fn a_mistyped_flag_or_command_gets_the_nearest_one_in_its_single_line() {
    let (model, data) = (fixture("tiny-gqa/model"), fixture("tiny-gqa/batch.jsonl"));
    let r = run_args(&argv(&[&"eval", &"--model", &model, &"--dataa", &data]));
    assert_clean_error(&r, "'--dataa'", "eval --dataa");
    assert!(
        r.stderr
            .contains("tip: a similar argument exists: '--data'"),
        "{}",
        r.stderr
    );
    let r = run_args(&argv(&[&"evl", &"--model", &model]));
    assert_clean_error(&r, "'evl'", "evl");
    assert!(r.stderr.contains("'eval'"), "{}", r.stderr);
}

#[test]
fn info_without_a_model_names_the_default_it_could_not_find() {
    let d = tempfile::tempdir().unwrap();
    let out = bin()
        .arg("info")
        .env("ASSETS_DIR", d.path())
        .output()
        .unwrap();
    let r = Run {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_clean_error(
        &r,
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "info, nothing fetched",
    );
    assert!(r.stderr.contains("fetch-assets.sh"), "{}", r.stderr);
}
