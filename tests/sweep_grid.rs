//! `sweep` over a grid of LoRA ranks and target-module sets (issue 9, item 3) on the tiny
//! fixture: one row per shape and lambda, each naming its rank, targets and cost; each
//! shape's curvature estimated for that shape; each shape's rows exactly those of a plain
//! sweep of that shape with a curvature from the `curvature` command; a curvature file that
//! does not fit every shape refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use lalora_engine::io::TensorFile;
use serde_json::Value;

fn target() -> PathBuf {
    fixture("tiny-gqa/batch.jsonl")
}

/// `sweep` on the tiny model: 2 lambdas, a few steps, the target set also as curvature
/// data; `--json` on stdout.
fn sweep(out: &Path) -> Command {
    let mut c = bin();
    c.args(["sweep", "--device", "cpu", "--json", "--lambdas", "0,10"])
        .args([
            "--steps",
            "4",
            "--lr",
            "1e-2",
            "--batch-size",
            "2",
            "--model",
        ])
        .arg(fixture("tiny-gqa/model"))
        .arg("--data")
        .arg(target())
        .arg("--target-eval")
        .arg(target())
        .arg("--source-eval")
        .arg(fixture("tiny-gqa/mc_batch.jsonl"))
        .arg("--out")
        .arg(out);
    c
}

#[test]
fn a_grid_writes_one_row_per_shape_and_lambda_each_with_rank_targets_and_cost() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid");
    let o = sweep(&out)
        .args([
            "--ranks",
            "4,8",
            "--targets",
            "all",
            "--targets",
            "q_proj,v_proj",
        ])
        .arg("--curvature-data")
        .arg(target())
        .env("LALORA_PROGRESS_SECS", "0.0001")
        .output()
        .unwrap();
    ok(&o, "grid sweep");
    let rep = json(&o);

    // 2 ranks x 2 target sets x 2 lambdas, after the one base row.
    let rows = rep["rows"].as_array().unwrap();
    let runs = trained(&rep);
    assert_eq!((rows.len(), runs.len()), (9, 8));
    assert!(rows[0]["lambda"].is_null() && rows[0].get("rank").is_none());
    let mut seen = Vec::new();
    for r in &runs {
        let shape = (r["rank"].as_u64().unwrap(), r["targets"].as_str().unwrap());
        seen.push((shape, r["lambda"].as_f64().unwrap()));
        let stages: Vec<&str> = r["cost"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["stage"].as_str().unwrap())
            .collect();
        assert_eq!(stages, ["train", "eval"], "{r}");
        assert!(r["cost"][0]["flops"].as_u64().unwrap() > 0, "{r}");
        assert!(r["grid_pareto"].is_boolean() && r["lora_params"].as_u64().unwrap() > 0);
    }
    let mut want = Vec::new();
    for rank in [4, 8] {
        for targets in ["all", "q_proj,v_proj"] {
            for lambda in [0.0, 10.0] {
                want.push(((rank, targets), lambda));
            }
        }
    }
    assert_eq!(seen, want);
    // More rank, more parameters; all seven modules, more than two.
    let params = |i: usize| runs[i]["lora_params"].as_u64().unwrap();
    assert!(params(0) > params(2) && params(4) == 2 * params(0));

    // Each shape: its stage I cost, its directory with its plot and its curvature, whose
    // metadata name that shape.
    let shapes = rep["grid"].as_array().unwrap();
    assert_eq!(shapes.len(), 4);
    let model = lalora_engine::model::load(&fixture("tiny-gqa/model"), None).unwrap();
    for s in shapes {
        assert_eq!(s["cost"]["curvature"]["stage"], "curvature", "{s}");
        let d = out.join(s["dir"].as_str().unwrap());
        assert!(d.join("frontier.svg").exists(), "{}", d.display());
        let meta = TensorFile::read(&d.join("curvature.safetensors"))
            .unwrap()
            .metadata;
        assert_eq!(meta["lora_r"], s["rank"].to_string(), "{meta:?}");
        let targets = match s["targets"].as_str().unwrap() {
            "all" => "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
            t => t,
        };
        assert_eq!(meta["lora_targets"], targets, "{meta:?}");
        assert_eq!(meta["data"], target().display().to_string());
        // And the file reads back as a curvature for the model.
        lalora_engine::curvature::Curvature::read_for(&d.join("curvature.safetensors"), &model)
            .unwrap();
    }
    assert_eq!(shapes[1]["dir"], "r4-q_proj+v_proj");
    assert!(out.join("frontier-overlay.svg").exists());

    // One table: rank and targets columns, each row with its cost.
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 10, "{csv}");
    assert!(
        lines[0].starts_with("rank,targets,lora_params,lambda,"),
        "{csv}"
    );
    for col in [
        "grid_pareto",
        "curvature_s",
        "train_s",
        "train_gflop",
        "eval_s",
    ] {
        assert!(lines[0].split(',').any(|c| c == col), "{col}: {}", lines[0]);
    }
    // r = 4 on q_proj (64 -> 64) and v_proj (64 -> 32) of 2 layers: 2 x 4 x (128 + 96).
    assert!(lines[4].starts_with("4,\"q_proj,v_proj\",1792,0,"), "{csv}");
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.starts_with("| rank | targets | lambda |"), "{md}");
    assert!(md.contains("| 8 | q_proj,v_proj | 1e1 |"), "{md}");
    assert!(md.contains("| r=8 all: stage I | curvature |"), "{md}");

    // Progress lines name the shape that is running.
    let err = String::from_utf8_lossy(&o.stderr);
    for want in [
        "train (r=4 q_proj,v_proj): 4/4 steps done",
        "curvature (r=8 all): ",
        "eval mc_batch (r=8 q_proj,v_proj): ",
        "sweep: r=8 all (3/4), lambda 1e1 (2/2): training 4 steps",
        "r=4 all, lambda 1e1: learning ",
    ] {
        assert!(err.lines().any(|l| l.starts_with(want)), "{want}: {err}");
    }
}

/// What a row's figures are, costs and times left out (they are measured, not computed).
fn figures(r: &Value) -> Value {
    let mut r = r.clone();
    let m = r.as_object_mut().unwrap();
    for k in [
        "cost",
        "seconds",
        "rank",
        "targets",
        "lora_params",
        "grid_pareto",
    ] {
        m.remove(k);
    }
    r
}

#[test]
fn a_shapes_rows_are_those_of_a_plain_sweep_of_that_shape() {
    let dir = tempfile::tempdir().unwrap();
    // Options other than the defaults, so that they must reach the estimate.
    let estimate = [
        "--scheme",
        "kfac",
        "--kfac-approx",
        "reduce",
        "--fisher",
        "mc",
        "--mc-samples",
        "2",
    ];
    let out = dir.path().join("grid");
    let o = sweep(&out)
        .args([
            "--ranks",
            "8,4",
            "--targets",
            "q_proj,v_proj",
            "--targets",
            "all",
        ])
        .arg("--curvature-data")
        .arg(target())
        .args(estimate)
        .output()
        .unwrap();
    ok(&o, "grid sweep");
    let grid = json(&o);

    // r=4 on q_proj,v_proj, by hand: the curvature command, then a plain sweep.
    let shape = ["--rank", "4", "--targets", "v_proj,q_proj"];
    let curv = dir.path().join("c.safetensors");
    let o = bin()
        .args([
            "curvature",
            "--device",
            "cpu",
            "--quiet",
            "--batch-size",
            "2",
        ])
        .args(shape)
        .args(estimate)
        .arg("--model")
        .arg(fixture("tiny-gqa/model"))
        .arg("--data")
        .arg(target())
        .arg("--out")
        .arg(&curv)
        .output()
        .unwrap();
    ok(&o, "curvature");
    let plain_out = dir.path().join("plain");
    let o = sweep(&plain_out)
        .args(shape)
        .arg("--curvature")
        .arg(&curv)
        .output()
        .unwrap();
    ok(&o, "plain sweep");
    let plain = json(&o);

    // The same estimate, tensor for tensor and in its metadata.
    let shape_dir = out.join("r4-q_proj+v_proj");
    let (a, b) = (
        TensorFile::read(&shape_dir.join("curvature.safetensors")).unwrap(),
        TensorFile::read(&curv).unwrap(),
    );
    assert_eq!(a.metadata, b.metadata);
    assert!(a.tensors.keys().any(|k| k.starts_with("kfac_in.")));
    assert!(a.tensors == b.tensors, "the estimates differ");

    // The same rows, to the last bit: determinism makes this exact.
    let mine: Vec<Value> = trained(&grid)
        .into_iter()
        .filter(|r| r["rank"] == 4 && r["targets"] == "q_proj,v_proj")
        .map(figures)
        .collect();
    let theirs: Vec<Value> = trained(&plain).into_iter().map(figures).collect();
    assert_eq!(mine.len(), 2);
    assert_eq!(mine, theirs);
    // The base row too, once for the whole grid.
    assert_eq!(figures(&grid["rows"][0]), figures(&plain["rows"][0]));
    // And the adapters of each run.
    for run in ["lambda-0e0", "lambda-1e1"] {
        let f = |d: &Path| {
            TensorFile::read(&d.join("runs").join(run).join("adapter_model.safetensors"))
                .unwrap()
                .tensors
        };
        assert!(f(&shape_dir) == f(&plain_out), "{run}: the adapters differ");
    }

    // A plain sweep's report is as it was: no grid columns or fields.
    let csv = std::fs::read_to_string(plain_out.join("results.csv")).unwrap();
    assert!(csv.starts_with("lambda,target_nll,"), "{csv}");
    assert!(plain.get("grid").is_none() && plain["rows"][1].get("rank").is_none());
    assert!(plain_out.join("frontier.svg").exists());
    assert!(!plain_out.join("frontier-overlay.svg").exists());
}

#[test]
fn a_curvature_file_must_fit_every_shape_of_the_grid() {
    let dir = tempfile::tempdir().unwrap();
    let curv = dir.path().join("r8-all.safetensors");
    let o = bin()
        .args(["curvature", "--device", "cpu", "--quiet", "--model"])
        .arg(fixture("tiny-gqa/model"))
        .arg("--data")
        .arg(target())
        .arg("--out")
        .arg(&curv)
        .output()
        .unwrap();
    ok(&o, "curvature");
    let out = dir.path().join("grid");

    // r=4 does not fit a file estimated at r=8: refused before any work, naming the file.
    let o = sweep(&out)
        .args(["--ranks", "4,8", "--curvature"])
        .arg(&curv)
        .output()
        .unwrap();
    refused(&o, "r8-all.safetensors: estimated for LoRA r=8");
    assert!(String::from_utf8_lossy(&o.stderr).contains("shape r=4 all"));
    assert!(!out.exists());
    let o = sweep(&out)
        .args(["--targets", "all", "--targets", "q_proj", "--curvature"])
        .arg(&curv)
        .output()
        .unwrap();
    refused(&o, "r8-all.safetensors: estimated for LoRA r=8");

    // A grid of the file's one shape runs, its rank and targets taken from the file.
    let o = sweep(&out)
        .args(["--ranks", "8", "--curvature"])
        .arg(&curv)
        .output()
        .unwrap();
    ok(&o, "grid of the file's shape");
    let rep = json(&o);
    assert!(
        trained(&rep)
            .iter()
            .all(|r| r["rank"] == 8 && r["targets"] == "all")
    );

    // Flags that make no sense together, or outside a grid.
    let cases: [(&[&str], &str); 5] = [
        (
            &["--ranks", "4,4", "--curvature-data", "d"],
            "r=4 all twice",
        ),
        (&["--ranks", "4,x"], "`x` in --ranks"),
        (&["--ranks", "4", "--rank", "4"], "--ranks"),
        (&["--scheme", "kfac", "--curvature", "c"], "--scheme"),
        // The lambdas 0 and 10, without a curvature.
        (&["--ranks", "4"], "lambda > 0 needs a curvature"),
    ];
    for (args, needle) in cases {
        let o = sweep(&out).args(args).output().unwrap();
        refused(&o, needle);
    }
    let o = bin()
        .args([
            "train",
            "--targets",
            "all",
            "--targets",
            "q_proj",
            "--model",
        ])
        .arg(fixture("tiny-gqa/model"))
        .arg("--data")
        .arg(target())
        .arg("--out")
        .arg(dir.path().join("t"))
        .output()
        .unwrap();
    refused(&o, "only `sweep` takes several sets");

    // --help explains the grid flags.
    let o = bin().args(["sweep", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    for want in [
        "--ranks <R,R,...>",
        "--curvature-data <CURVATURE_DATA>",
        "Curvature estimation (with --curvature-data):",
        "repeated, one set each",
        "frontier-overlay.svg",
    ] {
        assert!(help.contains(want), "{want}: {help}");
    }
}
