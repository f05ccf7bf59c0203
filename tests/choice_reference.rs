//! `eval --choice` on the default model against an independent lm-eval-style scorer
//! (scripts/check-choice-scoring.py: HF transformers + PyTorch, float32):
//! `tests/fixtures/choice-reference.json` holds, for the first questions of two held-out
//! sets that scripts/fetch-assets.sh writes, each option's summed log-likelihood, the
//! options chosen for acc and acc_norm, and acc / acc_norm with their standard errors.

mod common;

use common::*;
use lalora_engine::eval::choice::read_choices;
use serde_json::Value;

/// Relative bound on a summed log-likelihood. Both sides run the same dequantised weights
/// in float32; they differ in summation order (GEMM blocking, attention, log-sum-exp),
/// which moves each token's log-probability by about 1e-6 relative of the logits'
/// magnitude; summed over a few to a few dozen continuation tokens this stays below 1e-4
/// of the total.
const REL_TOL: f64 = 1e-4;

fn reference() -> Value {
    let text = std::fs::read_to_string(fixture("choice-reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn index(v: &Value) -> usize {
    v.as_u64().unwrap() as usize
}

/// Whether the best two of `scores` lie within `REL_TOL` of each other: a near tie, which
/// float32 rounding may break either way.
fn near_tie(scores: &[f64]) -> bool {
    let mut s = scores.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    (s[0] - s[1]).abs() <= REL_TOL * s[0].abs()
}

#[test]
fn choices_and_logliks_match_independent_scorer() {
    let refs = reference();
    let sets = refs["sets"].as_object().unwrap();
    let n = sets.values().map(|s| index(&s["n"])).max().unwrap();
    let paths: Vec<_> = sets
        .keys()
        .map(|name| assets().join("data").join(name))
        .collect();
    let out = bin()
        .args(["eval", "--model"])
        .arg(smollm2())
        .arg("--choice")
        .args(&paths)
        .args(["--limit", &n.to_string(), "--batch-size", "8"])
        .args(["--json", "--threads", "2", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value =
        serde_json::from_slice(&out.stdout).expect("stdout is exactly one JSON document");
    let got_sets = v["choice"].as_array().unwrap();
    assert_eq!(got_sets.len(), sets.len());
    let mut worst = 0f64;
    for ((path, (name, want)), got) in paths.iter().zip(sets).zip(got_sets) {
        let wq = want["questions"].as_array().unwrap();
        let gq = got["predictions"].as_array().unwrap();
        assert_eq!(wq.len(), gq.len(), "{name}: question count");
        // The fixture was made from these very questions: same prompts, options, answers.
        let rows = read_choices(path).unwrap();
        for (r, w) in rows.iter().zip(wq) {
            assert_eq!(r.context, w["prompt"].as_str().unwrap(), "{name}: prompt");
            let opts: Vec<&str> = w["options"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o.as_str().unwrap())
                .collect();
            assert_eq!(r.choices, opts, "{name}: options");
            assert_eq!(r.answer, index(&w["answer"]), "{name}: answer");
        }
        let mut ties = 0;
        for (i, ((w, g), r)) in wq.iter().zip(gq).zip(&rows).enumerate() {
            let wl: Vec<f64> = w["loglikelihoods"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let gl: Vec<f64> = g["loglikelihoods"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(wl.len(), gl.len());
            for (a, b) in gl.iter().zip(&wl) {
                let rel = (a - b).abs() / b.abs();
                worst = worst.max(rel);
                assert!(
                    rel < REL_TOL,
                    "{name} question {i}: log-likelihood {a} vs {b}"
                );
            }
            let norm: Vec<f64> = wl
                .iter()
                .zip(&r.choices)
                .map(|(l, c)| l / c.chars().count() as f64)
                .collect();
            for (key, scores) in [("acc", &wl), ("acc_norm", &norm)] {
                if g[key] != w[key] {
                    // Only a near tie may go the other way; none is in the fixture today.
                    assert!(
                        near_tie(scores),
                        "{name} question {i}: {key} chose {} vs {}",
                        g[key],
                        w[key]
                    );
                    ties += 1;
                    eprintln!("{name} question {i}: {key} near tie {scores:?}");
                }
            }
            assert_eq!(index(&g["answer"]), index(&w["answer"]));
        }
        if ties == 0 {
            for key in ["acc", "acc_stderr", "acc_norm", "acc_norm_stderr"] {
                let (a, b) = (got[key].as_f64().unwrap(), want[key].as_f64().unwrap());
                assert!((a - b).abs() < 1e-12, "{name}: {key} {a} vs {b}");
            }
        }
        assert_eq!(index(&got["n"]), wq.len());
    }
    eprintln!("largest relative log-likelihood difference: {worst:.2e}");
}
