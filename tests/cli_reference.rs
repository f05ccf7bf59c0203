//! `grad`, `eval` and `train --steps 1` through the binary on the tiny GQA fixture
//! (its model, adapter and 6-sequence masked batch), every number they print or write
//! against PyTorch + PEFT's (`expected.safetensors`: `loss`, the mean over the 107 target
//! tokens of `fixture.json`; `loss_sum`; `grad.*`, the gradients of `loss_sum`) or derived
//! from those here. tests/reference_tiny.rs holds the library's forward and backward to the
//! same values; this holds the commands' reading, batching, reduction and printing. And
//! `info`'s parameter counts against the model and adapter files' tensors.
//!
//! Bound: `REL` = 1e-4 relative, the f32 bound of the fixture's README (the engine's
//! losses and gradients agree to ~1e-6 there); printed values add their rounding.

mod common;

use std::path::Path;

use common::*;
use lalora_engine::io::TensorFile;
use serde_json::Value;

const REL: f64 = 1e-4;

fn expected() -> TensorFile {
    TensorFile::read(&fixture("tiny-gqa/expected.safetensors")).unwrap()
}

/// The fixture's `loss` and `loss_sum`.
fn losses(t: &TensorFile) -> (f64, f64) {
    (
        t.get("loss").unwrap()[0] as f64,
        t.get("loss_sum").unwrap()[0] as f64,
    )
}

/// `fixture.json`'s target-token count (107) and the batch's sequences and real positions,
/// read from the files.
fn counts() -> (u64, u64, u64) {
    let f: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-gqa/fixture.json")).unwrap())
            .unwrap();
    let rows: Vec<Value> = std::fs::read_to_string(fixture("tiny-gqa/batch.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let targets: usize = rows
        .iter()
        .map(|r| {
            // HF convention: label t is predicted from token t-1; -100 is ignored.
            let l = r["labels"].as_array().unwrap();
            l[1..].iter().filter(|v| v.as_i64() != Some(-100)).count()
        })
        .sum();
    let n = f["n_target_tokens"].as_u64().unwrap();
    assert_eq!(targets as u64, n, "fixture.json and batch.jsonl disagree");
    let positions = rows
        .iter()
        .map(|r| r["input_ids"].as_array().unwrap().len() as u64)
        .sum();
    (n, rows.len() as u64, positions)
}

/// `|got - want| <= tol |want|`; the relative error.
fn rel(what: &str, got: f64, want: f64, tol: f64) -> f64 {
    let e = ((got - want) / want).abs();
    assert!(e <= tol, "{what}: {got} vs {want}: relative error {e:e}");
    e
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("{k}: {} is not a number", v[k]))
}

/// The engine on the tiny fixture's model, adapter and batch, on the CPU.
fn on_fixture(cmd: &str) -> std::process::Command {
    let f = fixture("tiny-gqa");
    let mut c = bin();
    c.args([cmd, "--device", "cpu", "--threads", "2", "--model"])
        .arg(f.join("model"))
        .arg("--adapter")
        .arg(f.join("adapter"))
        .arg("--data")
        .arg(f.join("batch.jsonl"));
    c
}

/// The number after `key ` in `line` (up to a space, comma or parenthesis).
fn after(line: &str, key: &str) -> f64 {
    let rest = line
        .split(&format!("{key} "))
        .nth(1)
        .unwrap_or_else(|| panic!("no `{key}` in {line}"));
    let v: String = rest
        .chars()
        .take_while(|c| !matches!(c, ' ' | ',' | ')' | '('))
        .collect();
    v.parse()
        .unwrap_or_else(|_| panic!("`{key} {v}` in {line}"))
}

/// `grad`: its `--json` and printed losses and counts, and the file's gradients,
/// `loss_sum` and `loss`, against PyTorch's.
#[test]
fn grad_command_matches_pytorch() {
    let want = expected();
    let (loss, loss_sum) = losses(&want);
    let (n, seqs, _) = counts();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("g.safetensors");
    let o = on_fixture("grad")
        .args(["--quiet", "--json", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    ok(&o, "grad --json");
    let j = json(&o);
    let mut errs = vec![
        rel("--json loss", num(&j, "loss"), loss, REL),
        rel("--json loss_sum", num(&j, "loss_sum"), loss_sum, REL),
    ];
    assert_eq!(
        (j["n_tokens"].as_u64(), j["n_sequences"].as_u64()),
        (Some(n), Some(seqs))
    );

    let got = TensorFile::read(&out).unwrap();
    let names: Vec<&str> = got.tensors.keys().map(|k| k.as_str()).collect();
    let want_names: Vec<&str> = want
        .tensors
        .keys()
        .map(|k| k.as_str())
        .filter(|k| k.starts_with("grad.") || ["loss", "loss_sum"].contains(k))
        .collect();
    assert_eq!(names, want_names, "the file's tensors");
    let mut worst = 0f64;
    for name in names.iter().filter(|k| k.starts_with("grad.")) {
        let e = rel_err(got.get(name).unwrap(), want.get(name).unwrap());
        assert!(e < REL, "{name}: relative error {e:e}");
        worst = worst.max(e);
    }
    errs.push(rel(
        "file loss",
        got.get("loss").unwrap()[0] as f64,
        loss,
        REL,
    ));
    errs.push(rel(
        "file loss_sum",
        got.get("loss_sum").unwrap()[0] as f64,
        loss_sum,
        REL,
    ));
    assert_eq!(got.metadata["n_tokens"], n.to_string());
    assert_eq!(got.metadata["n_sequences"], seqs.to_string());

    // "loss 6.513484 (sum 696.9427 over 107 tokens, 6 sequences); gradients -> ..."
    std::fs::remove_file(&out).unwrap();
    let o = on_fixture("grad")
        .args(["--quiet", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    ok(&o, "grad");
    let text = String::from_utf8(o.stdout).unwrap();
    let line = text.lines().next().unwrap();
    rel("printed loss", after(line, "loss"), loss, REL + 5e-7 / loss);
    rel(
        "printed sum",
        after(line, "sum"),
        loss_sum,
        REL + 5e-5 / loss_sum,
    );
    assert_eq!(after(line, "over"), n as f64, "{line}");
    assert!(
        line.contains(&format!(" tokens, {seqs} sequences)")),
        "{line}"
    );
    eprintln!(
        "grad: gradients worst {worst:.1e}; losses worst {:.1e}",
        errs.iter().copied().fold(0.0, f64::max)
    );
}

/// `eval` on the batch (two batches of the default 4): mean NLL over its 107 target
/// tokens, their count and exp(mean NLL), in `--json` and the printed table.
#[test]
fn eval_command_matches_pytorch() {
    let (loss, _) = losses(&expected());
    let (n, seqs, _) = counts();
    let o = on_fixture("eval")
        .args(["--quiet", "--json"])
        .output()
        .unwrap();
    ok(&o, "eval --json");
    let j = json(&o);
    let ds = &j["datasets"][0];
    assert_eq!(j["datasets"].as_array().unwrap().len(), 1);
    let e = rel("mean_nll", num(ds, "mean_nll"), loss, REL);
    assert_eq!(
        (ds["n_tokens"].as_u64(), ds["n_sequences"].as_u64()),
        (Some(n), Some(seqs))
    );
    // d ppl / ppl = d nll: a relative error REL in the NLL is REL * nll in the perplexity.
    let ppl_tol = REL * loss;
    rel("perplexity", num(ds, "perplexity"), loss.exp(), ppl_tol);

    let o = on_fixture("eval").arg("--quiet").output().unwrap();
    ok(&o, "eval");
    let text = String::from_utf8(o.stdout).unwrap();
    let row: Vec<&str> = text
        .lines()
        .find(|l| l.contains("batch.jsonl"))
        .unwrap_or_else(|| panic!("no row: {text}"))
        .split_whitespace()
        .collect();
    assert_eq!(row.len(), 5, "{row:?}");
    assert_eq!((row[1], row[2]), (&*seqs.to_string(), &*n.to_string()));
    let f = |s: &str| s.parse::<f64>().unwrap();
    // {:.4} and {:.3}: half a unit in the last place.
    rel("printed mean NLL", f(row[3]), loss, REL + 5e-5 / loss);
    rel(
        "printed perplexity",
        f(row[4]),
        loss.exp(),
        ppl_tol + 5e-4 / loss.exp(),
    );
    eprintln!("eval: mean NLL relative error {e:.1e}");
}

/// `train --steps 1 --batch-size 6` from the fixture adapter: its one step sees the
/// whole batch, so `metrics.jsonl`'s `loss` is the fixture's `loss`, its `grad_norm`
/// (README: the cross-entropy gradient's global norm before clipping; the loss is the
/// mean over target tokens) is `||grad.*|| / 107`, `tokens` the batch's positions, `lr`
/// the peak (cosine at step 0), `penalty` 0; and the adapter written is AdamW's first
/// step from the fixture's gradient, derived here.
#[test]
fn one_training_step_matches_pytorch() {
    let want = expected();
    let (loss, _) = losses(&want);
    let (n, _, positions) = counts();
    let grads: Vec<(&String, Vec<f64>)> = want
        .tensors
        .iter()
        .filter(|(k, _)| k.starts_with("grad."))
        .map(|(k, (_, v))| (k, v.iter().map(|&x| x as f64 / n as f64).collect()))
        .collect();
    let norm = grads
        .iter()
        .flat_map(|(_, g)| g)
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let lr = 1e-3;
    let o = on_fixture("train")
        .args(["--quiet", "--steps", "1", "--batch-size", "6"])
        .args([
            "--checkpoint-every",
            "0",
            "--lr",
            "1e-3",
            "--clip",
            "1",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    ok(&o, "train");
    let lines: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    let m = &lines[0];
    let e_loss = rel("metrics loss", num(m, "loss"), loss, REL);
    let e_norm = rel("metrics grad_norm", num(m, "grad_norm"), norm, REL);
    assert_eq!(m["step"], 1);
    assert_eq!(m["tokens"].as_u64(), Some(positions));
    assert_eq!((num(m, "penalty"), num(m, "lr")), (0.0, lr));

    // train.log: "step 1/1 loss 6.513484 penalty 0.000000e0 lr 1.000e-3 grad_norm 1.2901 (...)"
    let log = std::fs::read_to_string(out.join("train.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.starts_with("step 1/1 "))
        .unwrap_or_else(|| panic!("{log}"));
    rel(
        "train.log loss",
        after(line, "loss"),
        loss,
        REL + 5e-7 / loss,
    );
    rel(
        "train.log grad_norm",
        after(line, "grad_norm"),
        norm,
        REL + 5e-5 / norm,
    );
    assert_eq!(
        (after(line, "penalty"), after(line, "lr")),
        (0.0, lr),
        "{line}"
    );
    // stdout: "step 1 loss 6.5135 penalty 0.0000e0 (... tokens/s); adapter -> DIR"
    let text = String::from_utf8(o.stdout).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("step 1 "))
        .unwrap_or_else(|| panic!("{text}"));
    rel("printed loss", after(line, "loss"), loss, REL + 5e-5 / loss);
    assert_eq!(after(line, "penalty"), 0.0, "{line}");

    adamw_first_step(&out, &grads, norm, lr);
    eprintln!("train: loss relative error {e_loss:.1e}, grad_norm {e_norm:.1e}");
}

/// AdamW's first step (bias-corrected, weight decay 0, eps 1e-8; README and PyTorch's
/// AdamW): with `g` the clipped gradient (clip 1: `g = grad / max(1, ||grad||)`),
/// `m_hat = g` and `v_hat = g^2`, so each weight moves by `-lr g / (|g| + eps)`.
/// Per-element bound: the engine's gradient is within `tau = REL ||g||` of the
/// reference's (in norm, so in each element); `d/dg [g / (|g| + eps)] = eps / (|g| +
/// eps)^2`, so the step moves by at most `lr eps tau / (|g| - tau)^2` where `|g| > 2 tau`
/// (elements smaller than that can go either way: bounded by `2 lr` only), plus the f32
/// rounding of the weights (half an ulp of |w| <= 0.5, 3e-8, and ~1e-7 relative of the
/// step).
fn adamw_first_step(out: &Path, grads: &[(&String, Vec<f64>)], norm: f64, lr: f64) {
    let (eps, clip) = (1e-8, 1.0 / norm.max(1.0));
    let tau = REL * norm * clip;
    let before = TensorFile::read(&fixture("tiny-gqa/adapter/adapter_model.safetensors")).unwrap();
    let after = TensorFile::read(&out.join("adapter_model.safetensors")).unwrap();
    assert_eq!(after.tensors.len(), grads.len());
    let (mut worst, mut loose, mut total) = (0f64, 0usize, 0usize);
    for (name, g) in grads {
        let w = name.strip_prefix("grad.").unwrap();
        let (w0, w1) = (before.get(w).unwrap(), after.get(w).unwrap());
        assert_eq!((w0.len(), w1.len()), (g.len(), g.len()), "{w}");
        for ((&a, &b), &gi) in w0.iter().zip(w1).zip(g) {
            let gi = gi * clip;
            let step = -lr * gi / (gi.abs() + eps);
            let got = b as f64 - a as f64;
            let bound = if gi.abs() > 2.0 * tau {
                lr * eps * tau / (gi.abs() - tau).powi(2) + 3e-8 + 1e-7 * lr
            } else {
                loose += 1;
                2.0 * lr + 3e-8
            };
            assert!(a.abs() <= 0.5, "{w}: the rounding bound assumes |w| <= 0.5");
            assert!(
                (got - step).abs() <= bound,
                "{w}: moved {got:e}, AdamW {step:e} (g {gi:e}, bound {bound:e})"
            );
            if gi.abs() > 2.0 * tau {
                worst = worst.max((got - step).abs() / lr);
            }
            total += 1;
        }
    }
    // All but a few per cent of the elements are held to the tight bound (3 % here: the
    // gradient's entries are heavy-tailed, and tau assumes the whole error in one entry).
    assert!(
        loose * 20 < total,
        "{loose} of {total} elements below 2 tau"
    );
    eprintln!(
        "train: AdamW step worst error {worst:.1e} lr where |g| > 2 tau; {loose} of {total} elements below 2 tau ({tau:.1e}) only bounded by 2 lr"
    );
}

/// Elements of every tensor of a safetensors file, read by the `safetensors` crate.
fn numel(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .iter()
        .map(|(_, v)| v.shape().iter().product::<usize>() as u64)
        .sum()
}

/// `info`'s parameter counts against the files HF transformers and PEFT wrote: the model's
/// (untied head: every tensor counts) and the adapter's at its rank and modules.
#[test]
fn info_counts_the_parameters_of_the_model_and_adapter_files() {
    let f = fixture("tiny-gqa");
    let o = bin()
        .args(["info", "--json", "--rank", "4", "--targets", "all"])
        .arg(f.join("model"))
        .output()
        .unwrap();
    ok(&o, "info");
    let j = json(&o);
    assert_eq!(j["n_params"], numel(&f.join("model/model.safetensors")));
    assert_eq!(
        j["lora"]["n_params"],
        numel(&f.join("adapter/adapter_model.safetensors"))
    );
}
