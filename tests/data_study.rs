//! `sweep --study data` (issue 9 item 2; `demo --study data` runs the same task on the
//! default model) on the tiny fixture: the lambdas under four curvatures of one shape, plain
//! LoRA once; each point's rows exactly those of a plain sweep with that curvature; the
//! self-generated set the one `curvature --data self:N` samples; the isotropic curvature
//! as strong as the source data's in total; bad combinations refused.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use lalora_engine::io::TensorFile;
use serde_json::Value;

/// The tiny model's 6 training sequences, also its source data.
fn data() -> std::path::PathBuf {
    fixture("tiny-gqa/batch.jsonl")
}

/// `sweep` on the tiny model at lambdas 0 and 10, `--json` on stdout.
fn sweep(out: &Path) -> Command {
    let mut c = bin();
    c.args(["sweep", "--device", "cpu", "--json", "--lambdas", "0,10"])
        .args(["--steps", "4", "--lr", "1e-2", "--batch-size", "2"])
        .arg("--model")
        .arg(fixture("tiny-gqa/model"))
        .arg("--data")
        .arg(data())
        .arg("--target-eval")
        .arg(data())
        .arg("--source-eval")
        .arg(fixture("tiny-gqa/mc_batch.jsonl"))
        .arg("--out")
        .arg(out);
    c
}

fn study(out: &Path) -> Command {
    let mut c = sweep(out);
    c.args(["--study", "data", "--self-tokens", "24"])
        .arg("--curvature-data")
        .arg(data());
    c
}

/// What a row's figures are: costs, times and its place in the grid left out.
fn figures(r: &Value) -> Value {
    let mut r = r.clone();
    let m = r.as_object_mut().unwrap();
    for k in [
        "cost",
        "seconds",
        "rank",
        "targets",
        "curvature",
        "lora_params",
        "grid_pareto",
        "pareto",
    ] {
        m.remove(k);
    }
    r
}

fn tensors(p: &Path) -> TensorFile {
    TensorFile::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `sum` of every `diag.` tensor of a curvature file, and whether all its entries are equal.
fn diag_sum(f: &TensorFile) -> (f64, bool) {
    let vals: Vec<f32> = f
        .tensors
        .iter()
        .filter(|(k, _)| k.starts_with("diag."))
        .flat_map(|(_, (_, v))| v.iter().copied())
        .collect();
    let even = vals.iter().all(|&v| v == vals[0]);
    (vals.iter().map(|&v| f64::from(v)).sum(), even)
}

#[test]
fn four_curvatures_one_lora_run_each_point_a_plain_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("study");
    let o = study(&out).output().unwrap();
    ok(&o, "study");
    let rep = json(&o);

    // The base row, plain LoRA and delta alone under `none`, lambda 10 under the others.
    let rows = rep["rows"].as_array().unwrap();
    let seen: Vec<(String, f64)> = rows[1..]
        .iter()
        .map(|r| {
            (
                r["curvature"].as_str().unwrap().to_string(),
                r["lambda"].as_f64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, f64)> = [
        ("none", 0.0),
        ("none", 10.0),
        ("source-data", 10.0),
        ("self-generated", 10.0),
        ("isotropic", 10.0),
    ]
    .iter()
    .map(|(c, l)| (c.to_string(), *l))
    .collect();
    assert_eq!(seen, want);
    assert!(rows[0]["lambda"].is_null() && rows[0].get("curvature").is_none());

    // Stage I ran for the two estimated curvatures only.
    let points = rep["grid"].as_array().unwrap();
    let dirs: Vec<&str> = points.iter().map(|p| p["dir"].as_str().unwrap()).collect();
    assert_eq!(
        dirs,
        [
            "r8-all-none",
            "r8-all-source-data",
            "r8-all-self-generated",
            "r8-all-isotropic"
        ]
    );
    let staged: Vec<bool> = points
        .iter()
        .map(|p| p["cost"]["curvature"].is_object())
        .collect();
    assert_eq!(staged, [false, true, true, false]);

    // Each point's curvature file, its metadata saying where it came from.
    let file = |d: &str| tensors(&out.join(d).join("curvature.safetensors"));
    let (source, own, iso, none) = (file(dirs[1]), file(dirs[2]), file(dirs[3]), file(dirs[0]));
    assert_eq!(source.metadata["data"], data().display().to_string());
    assert!(own.metadata["data"].starts_with("self-generated: 6 sequences"));
    assert!(iso.metadata["data"].starts_with("isotropic: the trace of the diag curvature"));
    assert!(none.metadata["data"].starts_with("none:"));
    // Isotropic: the source data's total, evenly; none: nothing.
    let ((s_sum, s_even), (i_sum, i_even)) = (diag_sum(&source), diag_sum(&iso));
    assert!(!s_even && i_even && s_sum > 0.0);
    assert!((i_sum - s_sum).abs() / s_sum < 1e-4, "{i_sum} vs {s_sum}");
    assert_eq!(diag_sum(&none), (0.0, true));
    // Every curvature at the same theta*.
    for f in [&own, &iso, &none] {
        for (k, t) in source
            .tensors
            .iter()
            .filter(|(k, _)| k.starts_with("mean."))
        {
            assert!(f.tensors[k].1 == t.1, "{k}");
        }
    }

    // The self-generated set is `curvature --data self:6`'s, kept beside its curvature.
    let kept = out.join(dirs[2]).join("curvature.self.jsonl");
    assert_eq!(std::fs::read_to_string(&kept).unwrap().lines().count(), 6);
    let by_hand = dir.path().join("self.safetensors");
    let o = bin()
        .args([
            "curvature",
            "--device",
            "cpu",
            "--quiet",
            "--batch-size",
            "2",
        ])
        .args(["--data", "self:6", "--self-tokens", "24", "--model"])
        .arg(fixture("tiny-gqa/model"))
        .arg("--out")
        .arg(&by_hand)
        .output()
        .unwrap();
    ok(&o, "curvature self:6");
    assert!(
        tensors(&by_hand).tensors == own.tensors,
        "the self-generated estimates differ"
    );

    // The source-data point is a plain sweep with --curvature-data, to the last bit; plain
    // LoRA is its lambda 0, run once under `none`.
    let plain_out = dir.path().join("plain");
    let o = sweep(&plain_out)
        .arg("--curvature-data")
        .arg(data())
        .output()
        .unwrap();
    ok(&o, "plain sweep");
    let plain = json(&o);
    let plain_rows = plain["rows"].as_array().unwrap();
    assert_eq!(figures(&rows[0]), figures(&plain_rows[0]), "base");
    assert_eq!(figures(&rows[1]), figures(&plain_rows[1]), "lambda 0");
    assert_eq!(figures(&rows[3]), figures(&plain_rows[2]), "lambda 10");

    // One table with a curvature column.
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert!(
        csv.starts_with("rank,targets,curvature,lora_params,lambda,"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 7, "{csv}");
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.starts_with("| rank | targets | curvature | lambda |"),
        "{md}"
    );
    assert!(md.contains("| 8 | all | self-generated | 1e1 |"), "{md}");
    for d in dirs {
        assert!(out.join(d).join("frontier.svg").exists(), "{d}");
    }
    assert!(out.join("frontier-overlay.svg").exists());
}

#[test]
fn a_study_needs_one_shape_and_source_data_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("study");
    let o = sweep(&out)
        .args([
            "--study",
            "data",
            "--curvature-data",
            "self:4",
            "--self-tokens",
            "24",
        ])
        .output()
        .unwrap();
    refused(&o, "give --curvature-data a file");
    let o = study(&out)
        .args(["--targets", "all", "--targets", "q_proj"])
        .output()
        .unwrap();
    refused(&o, "one LoRA shape");
    let o = sweep(&out).args(["--study", "data"]).output().unwrap();
    refused(&o, "--study data needs --curvature-data");
    let o = study(&out).args(["--ranks", "4,8"]).output().unwrap();
    refused(&o, "one LoRA shape");
    assert!(!out.exists(), "nothing written for a refused study");
}
