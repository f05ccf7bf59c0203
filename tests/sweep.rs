//! `sweep` on the tiny fixture, as a user runs it with stderr to a log: labelled plain
//! progress lines, and learning / forgetting figures whose standard errors equal the ones
//! computed here from `eval`'s loss on each sequence alone. Also `eval --json` keeps its
//! progress on stderr, `curvature` says when it writes its file, and the progress interval
//! is checked as input. On the default model:
//! the multiple-choice accuracy drops and the exact-match gain, with their paired standard
//! errors, equal the ones computed here from `eval --json`'s per-question predictions.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// One single-row JSONL file per row of `src`.
fn split_rows(src: &Path, dir: &Path, stem: &str) -> Vec<PathBuf> {
    std::fs::read_to_string(src)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            let p = dir.join(format!("{stem}-{i}.jsonl"));
            std::fs::write(&p, format!("{l}\n")).unwrap();
            p
        })
        .collect()
}

/// (summed loss, predicted tokens) of each file, by `eval --json` (with `adapter`).
fn per_sequence(files: &[PathBuf], adapter: Option<&Path>) -> Vec<(f64, f64)> {
    let mut c = bin();
    c.args(["eval", "--device", "cpu", "--model"])
        .arg(fixture("tiny-gqa/model"))
        .arg("--json")
        .arg("--data")
        .args(files)
        .env("LALORA_PROGRESS_SECS", "0.001");
    if let Some(a) = adapter {
        c.arg("--adapter").arg(a);
    }
    let o = c.output().unwrap();
    ok(&o, "eval");
    // --json owns stdout; progress still reaches a piped stderr, labelled.
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.lines()
            .any(|l| l.starts_with("eval: ") && l.contains(" done, elapsed ")),
        "eval --json printed no progress line: {err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON");
    v["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let n = d["n_tokens"].as_f64().unwrap();
            (d["mean_nll"].as_f64().unwrap() * n, n)
        })
        .collect()
}

/// `sum(a - b) / sum(T)` and its standard error over sequences, written out here as the
/// linearised ratio estimator: residuals `d_n - r T_n`, `sqrt(N/(N-1) sum e^2) / sum T`.
fn paired(a: &[(f64, f64)], b: &[(f64, f64)]) -> (f64, f64) {
    let total: f64 = a.iter().map(|x| x.1).sum();
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x.0 - y.0).collect();
    let r = d.iter().sum::<f64>() / total;
    let n = d.len() as f64;
    let ss: f64 = d.iter().zip(a).map(|(di, x)| (di - r * x.1).powi(2)).sum();
    (r, (n / (n - 1.0) * ss).sqrt() / total)
}

#[test]
fn sweep_figures_carry_paired_standard_errors_and_progress_is_labelled() {
    let dir = tempfile::tempdir().unwrap();
    let (model, target) = (fixture("tiny-gqa/model"), fixture("tiny-gqa/batch.jsonl"));
    let source = fixture("tiny-gqa/mc_batch.jsonl");
    let curv = dir.path().join("c.safetensors");
    let o = tiny_curvature(&curv, &["--scheme", "diag", "--quiet"])
        .output()
        .unwrap();
    ok(&o, "curvature");
    let out = dir.path().join("sweep");
    let o = bin()
        .args([
            "sweep",
            "--device",
            "cpu",
            "--lambdas",
            "0,10",
            "--steps",
            "12",
        ])
        .args(["--lr", "1e-2", "--batch-size", "2", "--json"])
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(&target)
        .arg("--curvature")
        .arg(&curv)
        .arg("--target-eval")
        .arg(&target)
        .arg("--source-eval")
        .arg(&source)
        .arg("--out")
        .arg(&out)
        // A tick far shorter than a training step: lines must come while work runs.
        .env("LALORA_PROGRESS_SECS", "0.0001")
        .output()
        .unwrap();
    ok(&o, "sweep");

    // stderr is a pipe here: plain lines, each naming its stage.
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().collect();
    let running = lines
        .iter()
        .filter(|l| {
            l.starts_with("train: ")
                && l.contains(" steps, elapsed ")
                && l.contains(" steps/s, ETA ")
        })
        .count();
    assert!(running >= 1, "no periodic training line: {err}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("train: 12/12 steps done, elapsed ")),
        "{err}"
    );
    for set in ["batch", "mc_batch"] {
        let want = format!("eval {set}: ");
        assert!(lines.iter().any(|l| l.starts_with(&want)), "{want}: {err}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("sweep: lambda 0 (LoRA) (1/2): training")),
        "{err}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("lambda 1e1: learning ")),
        "{err}"
    );
    for l in &lines {
        // A time is always labelled ("elapsed 3s", "took 3s"), never a bare "(3s)".
        let bare = l.split('(').skip(1).any(|p| {
            p.strip_suffix(')')
                .or_else(|| p.split(')').next())
                .and_then(|t| t.strip_suffix('s'))
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        });
        assert!(!bare, "unlabelled time: {l}");
    }

    // The report: standard errors next to every learning and forgetting figure.
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON");
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let header = csv.lines().next().unwrap();
    for col in ["learning_se", "mc_batch_forgetting_se"] {
        assert!(header.split(',').any(|c| c == col), "{col}: {header}");
    }
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.lines().next().unwrap().contains("| learning | ± |"),
        "{md}"
    );
    assert!(md.contains("batch (6 sequences, "), "{md}");
    let svg = std::fs::read_to_string(out.join("frontier.svg")).unwrap();
    assert!(
        svg.contains("standard error"),
        "no error bars in the plot legend"
    );
    let sets = rep["sets"].as_array().unwrap();
    assert_eq!(sets[0]["n_sequences"], 6);
    assert_eq!(sets[1]["n_sequences"], 2);

    // Recompute from each sequence scored alone by `eval`.
    let tfiles = split_rows(&target, dir.path(), "t");
    let sfiles = split_rows(&source, dir.path(), "s");
    let (bt, bs) = (per_sequence(&tfiles, None), per_sequence(&sfiles, None));
    assert_eq!(
        sets[0]["n_tokens"].as_f64().unwrap(),
        bt.iter().map(|x| x.1).sum::<f64>()
    );
    let rows = rep["rows"].as_array().unwrap();
    for (row, run) in rows[1..].iter().zip(["lambda-0e0", "lambda-1e1"]) {
        let adapter = out.join("runs").join(run);
        let (rt, rs) = (
            per_sequence(&tfiles, Some(&adapter)),
            per_sequence(&sfiles, Some(&adapter)),
        );
        let (learn, learn_se) = paired(&bt, &rt);
        let (forget, forget_se) = paired(&rs, &bs);
        let src = &row["sources"][0];
        for (name, got, want) in [
            ("learning", &row["learning"], learn),
            ("learning_se", &row["learning_se"], learn_se),
            ("forgetting", &src["forgetting"], forget),
            ("forgetting_se", &src["forgetting_se"], forget_se),
        ] {
            let got = got.as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "{run} {name}: sweep {got}, from eval {want}"
            );
        }
        // Training moved the model: the errors are real spreads, not zeros.
        assert!(
            learn_se > 0.0 && forget_se > 0.0,
            "{run}: {learn_se} {forget_se}"
        );
    }
}

/// `curvature` on the tiny GQA fixture (r 4, kfac, CPU) writing `out`.
fn tiny_kfac_curvature(out: &Path) -> std::process::Command {
    tiny_curvature(out, &["--rank", "4", "--scheme", "kfac"])
}

/// After its batches `curvature` reads the estimate out and writes the file, which takes
/// seconds for a large KFAC estimate: a line says so (and none with --quiet).
#[test]
fn curvature_says_when_it_writes_its_file() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("c.safetensors");
    for quiet in [false, true] {
        let mut c = tiny_kfac_curvature(&out);
        c.args(["--threads", "2"]);
        if quiet {
            c.arg("--quiet");
        }
        let o = c.output().unwrap();
        ok(&o, "curvature");
        let err = String::from_utf8_lossy(&o.stderr);
        let said = err.lines().any(|l| {
            l.starts_with("curvature: writing ")
                && l.contains(&*out.to_string_lossy())
                && l.ends_with(" MB)")
        });
        assert_eq!(said, !quiet, "quiet {quiet}: {err}");
        if quiet {
            assert!(err.is_empty(), "--quiet printed: {err}");
        }
    }
}

/// Reading a curvature file happens before the backend starts its thread pool; nothing in
/// it may start rayon's global pool first, which would leave `--threads` ignored (the
/// pool can be configured once per process).
#[test]
fn train_with_a_curvature_keeps_to_its_threads() {
    let d = tempfile::tempdir().unwrap();
    let f = fixture("tiny-gqa");
    let c = d.path().join("c.safetensors");
    let o = tiny_kfac_curvature(&c).arg("--quiet").output().unwrap();
    ok(&o, "curvature");
    // One more thread than rayon's default pool would have, so that the default cannot
    // pass for the setting on any machine.
    let n = std::thread::available_parallelism().map_or(1, |n| n.get()) + 1;
    let o = bin()
        .args([
            "train",
            "--device",
            "cpu",
            "--threads",
            &n.to_string(),
            "--rank",
            "4",
        ])
        .args(["--lambda", "1", "--steps", "1", "--batch-size", "2"])
        .arg("--model")
        .arg(f.join("model"))
        .arg("--data")
        .arg(f.join("batch.jsonl"))
        .arg("--curvature")
        .arg(&c)
        .arg("--out")
        .arg(d.path().join("run"))
        .output()
        .unwrap();
    ok(&o, "train");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("device: cpu ({n} threads")), "{err}");
}

#[test]
fn a_bad_progress_interval_is_refused_before_any_work() {
    for v in ["abc", "0", "-1", "nan"] {
        let o = bin()
            .args(["eval", "--model"])
            .arg(fixture("tiny-gqa/model"))
            .arg("--data")
            .arg(fixture("tiny-gqa/batch.jsonl"))
            .env("LALORA_PROGRESS_SECS", v)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{v}: {err}");
        assert_eq!(err.lines().count(), 1, "{v}: {err}");
        assert!(err.contains("LALORA_PROGRESS_SECS"), "{v}: {err}");
    }
}

/// An evaluation set whose rows lose every predicted token to `--max-len` has no mean
/// loss: the sweep refuses it (exit 2, one line naming the file) instead of reporting NaN.
#[test]
fn an_evaluation_set_without_predicted_tokens_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Labels on the last 4 of 20 positions only; --max-len 8 cuts them all away.
    let late = dir.path().join("late-answers.jsonl");
    let row = |k: u32| {
        let ids: Vec<u32> = (0..20).map(|i| 1 + (i * 7 + k) % 50).collect();
        let labels: Vec<i64> = (0..20)
            .map(|i| if i >= 16 { ids[i] as i64 } else { -100 })
            .collect();
        serde_json::json!({"input_ids": ids, "labels": labels}).to_string()
    };
    std::fs::write(&late, format!("{}\n{}\n{}\n", row(0), row(1), row(2))).unwrap();
    for role in ["--target-eval", "--source-eval"] {
        let (target, source) = if role == "--target-eval" {
            (late.clone(), fixture("tiny-gqa/batch.jsonl"))
        } else {
            (fixture("tiny-gqa/batch.jsonl"), late.clone())
        };
        let o = bin()
            .args(["sweep", "--device", "cpu", "--lambdas", "0", "--steps", "1"])
            .args(["--max-len", "8", "--model"])
            .arg(fixture("tiny-gqa/model"))
            .arg("--data")
            .arg(fixture("tiny-gqa/batch.jsonl"))
            .arg("--target-eval")
            .arg(&target)
            .arg("--source-eval")
            .arg(&source)
            .arg("--out")
            .arg(dir.path().join("out"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{role}: {err}");
        assert_eq!(err.lines().count(), 1, "{role}: {err}");
        assert!(
            err.contains("late-answers.jsonl") && err.contains("no target tokens"),
            "{role}: {err}"
        );
        assert!(
            !dir.path().join("out").exists(),
            "{role}: nothing is written"
        );
    }
}

/// `eval --json` on the default model (with `adapter`): each `--choice` file's
/// predictions and the `--exact-match` file's, on the first `limit` questions.
fn eval_predictions(
    choice: &[PathBuf],
    qa: &Path,
    limit: usize,
    max_new_tokens: usize,
    adapter: Option<&Path>,
) -> serde_json::Value {
    let mut c = bin();
    c.args(["eval", "--device", "cpu", "--quiet", "--json", "--model"])
        .arg(smollm2())
        .arg("--limit")
        .arg(limit.to_string())
        .arg("--max-new-tokens")
        .arg(max_new_tokens.to_string())
        .arg("--choice")
        .args(choice)
        .arg("--exact-match")
        .arg(qa);
    if let Some(a) = adapter {
        c.arg("--adapter").arg(a);
    }
    let o = c.output().unwrap();
    ok(&o, "eval --choice --exact-match");
    serde_json::from_slice(&o.stdout).expect("stdout is JSON")
}

/// Mean of `xs` and its standard error `sd / sqrt(n)` (sample sd), written out here.
fn mean_se(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0);
    (m, (var / n).sqrt())
}

fn close(got: &serde_json::Value, want: f64, what: &str) {
    let got = got
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: {got} is not a number"));
    assert!(
        (got - want).abs() < 1e-9,
        "{what}: sweep {got}, from eval {want}"
    );
}

#[test]
fn sweep_accuracy_drop_and_exact_match_gain_match_eval_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let data = assets().join("data");
    let (target, qa) = (
        data.join("target-train.jsonl"),
        data.join("target-test.jsonl"),
    );
    let choice = [
        data.join("choice-piqa-test.jsonl"),
        data.join("choice-siqa-test.jsonl"),
    ];
    let (n_choice, n_qa, new_tokens) = (4, 3, 12);
    let curv = dir.path().join("c.safetensors");
    let o = bin()
        .args([
            "curvature",
            "--device",
            "cpu",
            "--quiet",
            "--scheme",
            "diag",
        ])
        .args(["--limit", "2", "--max-len", "32", "--model"])
        .arg(smollm2())
        .arg("--data")
        .arg(data.join("source-curvature.jsonl"))
        .arg("--out")
        .arg(&curv)
        .output()
        .unwrap();
    ok(&o, "curvature");
    let out = dir.path().join("sweep");
    // A large learning rate, so that a few steps change some answers.
    let o = bin()
        .args(["sweep", "--device", "cpu", "--json", "--lambdas", "0,1e3"])
        .args([
            "--steps",
            "3",
            "--lr",
            "3e-2",
            "--limit",
            "8",
            // The first two target-test rows keep half their answer tokens at 48 (none at
            // 32, which the sweep refuses).
            "--max-len",
            "48",
        ])
        .args(["--eval-limit", "2", "--model"])
        .arg(smollm2())
        .arg("--data")
        .arg(&target)
        .arg("--curvature")
        .arg(&curv)
        .arg("--target-eval")
        .arg(&qa)
        .arg("--source-eval")
        .arg(data.join("source-test.jsonl"))
        .arg("--choice-eval")
        .args(&choice)
        .args(["--choice-limit", &n_choice.to_string()])
        .arg("--exact-match-eval")
        .arg(&qa)
        .args(["--exact-match-limit", &n_qa.to_string()])
        .args(["--max-new-tokens", &new_tokens.to_string()])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    ok(&o, "sweep");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.lines().any(|l| l.starts_with("lambda 1e3: ")
            && l.contains(", exact match ")
            && l.contains(" (gain ")
            && l.contains("choice-piqa-test acc ")
            && l.contains(" (drop ")),
        "{err}"
    );
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON");
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    for col in [
        "choice-siqa-test_acc_norm_drop_se",
        "choice-piqa-test_acc_drop",
        "exact_match_gain_se",
    ] {
        assert!(header.contains(&col), "{col}: {header:?}");
    }
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("| exact match | ± | gain | ± | choice-piqa-test acc | ± | drop | ± |"),
        "{md}"
    );
    // The CSV and the table carry the JSON's figures, column by column.
    let keys = [
        "acc",
        "acc_se",
        "acc_drop",
        "acc_drop_se",
        "acc_norm",
        "acc_norm_se",
        "acc_norm_drop",
        "acc_norm_drop_se",
    ];
    let json_rows = rep["rows"].as_array().unwrap();
    let csv_rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(csv_rows.len(), json_rows.len());
    let mut sets_checked = 0;
    for (cells, row) in csv_rows.iter().zip(json_rows) {
        assert_eq!(cells.len(), header.len());
        let mut md_cells = String::new();
        for set in row["choice"].as_array().unwrap() {
            let name = set["name"].as_str().unwrap();
            for key in keys {
                let col = format!("{name}_{key}");
                let at = header.iter().position(|h| *h == col).expect(&col);
                let v = set[key].as_f64().unwrap();
                let got: f64 = cells[at].parse().unwrap();
                assert!((got - v).abs() <= 5e-7, "{col}: csv {got}, json {v}");
                md_cells += &match key.ends_with("drop") {
                    true => format!(" {v:+.4} |"),
                    false => format!(" {v:.4} |"),
                };
            }
            sets_checked += 1;
        }
        assert!(md.contains(&md_cells), "{md_cells} not in\n{md}");
    }
    assert!(
        sets_checked >= json_rows.len(),
        "{sets_checked} sets checked"
    );

    // Recompute every accuracy figure from eval's per-question predictions.
    let outcomes = |v: &serde_json::Value| -> (Vec<Vec<f64>>, Vec<Vec<f64>>, Vec<f64>) {
        let right = |key: &str| -> Vec<Vec<f64>> {
            v["choice"]
                .as_array()
                .unwrap()
                .iter()
                .map(|set| {
                    set["predictions"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| (p[key] == p["answer"]) as u8 as f64)
                        .collect()
                })
                .collect()
        };
        let em = v["exact_match"][0]["predictions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["correct"].as_bool().unwrap() as u8 as f64)
            .collect();
        (right("acc"), right("acc_norm"), em)
    };
    let base = outcomes(&eval_predictions(&choice, &qa, n_choice, new_tokens, None));
    assert_eq!((base.0[0].len(), base.2.len()), (n_choice, n_choice));
    let rows = rep["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let mut moved = 0;
    for (row, run) in rows
        .iter()
        .zip([None, Some("lambda-0e0"), Some("lambda-1e3")])
    {
        let adapter = run.map(|r| out.join("runs").join(r));
        let now = outcomes(&eval_predictions(
            &choice,
            &qa,
            n_choice,
            new_tokens,
            adapter.as_deref(),
        ));
        let paired = |b: &[f64], a: &[f64]| {
            mean_se(&b.iter().zip(a).map(|(x, y)| x - y).collect::<Vec<_>>())
        };
        for (k, set) in row["choice"].as_array().unwrap().iter().enumerate() {
            for (m, b, a) in [
                ("acc", &base.0[k], &now.0[k]),
                ("acc_norm", &base.1[k], &now.1[k]),
            ] {
                let what = format!("{run:?} set {k} {m}");
                let (acc, acc_se) = mean_se(a);
                let (drop, drop_se) = paired(b, a);
                close(&set[m], acc, &what);
                close(&set[format!("{m}_se")], acc_se, &what);
                close(&set[format!("{m}_drop")], drop, &what);
                close(&set[format!("{m}_drop_se")], drop_se, &what);
                moved += (drop_se > 0.0) as usize;
            }
        }
        // Exact match on the first n_qa problems.
        let (b, a) = (&base.2[..n_qa], &now.2[..n_qa]);
        let em = &row["exact_match"];
        let (acc, acc_se) = mean_se(a);
        let (gain, gain_se) = paired(a, b);
        close(&em["accuracy"], acc, "exact match");
        close(&em["accuracy_se"], acc_se, "exact match se");
        close(&em["gain"], gain, "exact match gain");
        close(&em["gain_se"], gain_se, "exact match gain se");
    }
    // Training changed some answers: the paired errors are real spreads, not zeros.
    assert!(moved > 0, "no accuracy moved: {}", rep["rows"]);
}

/// A sweep into an earlier sweep's directory says which of the earlier runs it leaves
/// there (their lambdas are not its own), and says nothing when it replaces them all.
#[test]
fn a_sweep_over_an_earlier_one_names_the_runs_it_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = (fixture("tiny-gqa/model"), fixture("tiny-gqa/batch.jsonl"));
    let curv = dir.path().join("c.safetensors");
    let o = tiny_curvature(&curv, &["--quiet"]).output().unwrap();
    ok(&o, "curvature");
    let out = dir.path().join("sweep");
    let sweep = |lambdas: &str| {
        let o = bin()
            .args([
                "sweep",
                "--device",
                "cpu",
                "--steps",
                "1",
                "--lambdas",
                lambdas,
            ])
            .arg("--model")
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .arg("--curvature")
            .arg(&curv)
            .arg("--target-eval")
            .arg(&data)
            .arg("--source-eval")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        ok(&o, &format!("sweep --lambdas {lambdas}"));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let said = "holds runs of an earlier sweep that this one does not run";
    assert!(!sweep("0,10,1e3").contains(said), "a fresh directory");
    let err = sweep("0,10");
    let want = format!(
        "sweep: {} {said} (lambda-1e3); they stay",
        out.join("runs").display()
    );
    assert!(err.contains(&want), "`{want}` not in: {err}");
    // The three again: every earlier run is one of its own.
    assert!(!sweep("0,1e3,10").contains(said), "all replaced");
}
