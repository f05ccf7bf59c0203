//! `curvature`'s summary (its `--json` `summary` and its printed per-layer table) on the
//! tiny GQA fixture against `tests/fixtures/curvature-summary.json`, which
//! `scripts/make-curvature-summary-fixture.py` computed with numpy from the fixture's
//! PyTorch / curvlinops curvature (never from the engine's).
//!
//! Bounds. The engine's factors agree with the reference ones to ~1e-5 relative (norm;
//! tests/curvature_reference.rs holds them to 1e-4), so traces and maxima, sums of and
//! the largest of those entries, are held to `REL` = 1e-4 relative. An eigenvalue of the
//! assembled kfac-tri matrix `F` moves by at most `||dF||_2 <= ||dF||_F` (Weyl), and
//! `||dF||_F / ||F||_F` is about the sum of two factors' relative errors, so each
//! eigenvalue is held to `REL * ||F||_F` (the fixture's `frobenius`): a real bound on the
//! largest, but only a coarse one on the smallest, which is ~1e-7 of the largest here (the
//! fixture's system is positive semi-definite up to f32 rounding). Zero shares are counts:
//! held to 1e-12 absolute. The printed table rounds to 5 significant digits
//! (`{:.4e}`: 5e-5 relative), 0.1 % and 4 significant digits (`{:.3e}`).

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

const REL: f64 = 1e-4;
/// The relative rounding of `{:.4e}` (half a unit in the 5th significant digit).
const PRINTED: f64 = 5e-5;

fn reference() -> Value {
    let text = std::fs::read_to_string(fixture("curvature-summary.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `curvature` on the tiny fixture's batch (at its adapter unless `fresh`) with `flags`:
/// the `--json` output and, from a second run, the printed text.
fn curvature(dir: &Path, flags: &[&str], fresh: bool) -> (Value, String) {
    let f = fixture("tiny-gqa");
    let run = |json: bool| {
        let out = dir.join(format!("c-{json}.safetensors"));
        let mut c = tiny_curvature(&out, flags);
        c.args(["--quiet", "--threads", "2"]);
        if fresh {
            c.args(["--rank", "4", "--alpha", "8"]);
        } else {
            c.arg("--adapter").arg(f.join("adapter"));
        }
        if json {
            c.arg("--json");
        }
        let o = c.output().unwrap();
        ok(&o, "curvature");
        o
    };
    let j = json(&run(true));
    let text = String::from_utf8(run(false).stdout).unwrap();
    (j["summary"].clone(), text)
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key}: {} is not a number", v[key]))
}

/// `|got - want| <= tol * |want|`, the error returned.
fn rel(what: &str, got: f64, want: f64, tol: f64) -> f64 {
    let e = (got - want).abs() / want.abs();
    assert!(e <= tol, "{what}: {got} vs {want}: relative error {e:e}");
    e
}

fn abs(what: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol,
        "{what}: {got} vs {want} (bound {tol:e})"
    );
}

/// The printed table's rows: layer, trace A, trace B, max, zeros (share), min/max eig.
fn table(text: &str) -> Vec<(String, f64, f64, f64, f64, Option<f64>)> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with("layer "));
    let head: Vec<&str> = lines.next().expect("a table").split_whitespace().collect();
    assert_eq!(
        head,
        [
            "layer", "trace", "A", "trace", "B", "max", "zeros", "min/max", "eig"
        ]
    );
    lines
        .take_while(|l| !l.starts_with("note: "))
        .map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(c.len(), 6, "{l}");
            let f = |s: &str| s.parse::<f64>().unwrap_or_else(|_| panic!("{s} in {l}"));
            let zeros = f(c[4].strip_suffix('%').expect("a percentage")) / 100.0;
            let eig = (c[5] != "-").then(|| f(c[5]));
            (c[0].to_string(), f(c[1]), f(c[2]), f(c[3]), zeros, eig)
        })
        .collect()
}

/// The engine's summary of `scheme` at the fixture's adapter against the reference:
/// every module's and layer's numbers in `--json`, and the printed table. Returns the
/// largest relative errors of (traces, maxima, max eigenvalues) and of the smallest
/// eigenvalues in units of `||F||_F`.
fn check_scheme(scheme: &str) -> [f64; 4] {
    let d = tempfile::tempdir().unwrap();
    let (got, text) = curvature(d.path(), &["--scheme", scheme], false);
    let want = &reference()[scheme];
    let mut worst = [0f64; 4];
    let modules = got["modules"].as_array().unwrap();
    assert_eq!(modules.len(), want["modules"].as_object().unwrap().len());
    for m in modules {
        let name = m["module"].as_str().unwrap();
        let w = &want["modules"][name];
        assert!(w.is_object(), "{scheme}: {name} not in the reference");
        let what = |k: &str| format!("{scheme} {name} {k}");
        for k in ["trace_a", "trace_b"] {
            worst[0] = worst[0].max(rel(&what(k), num(m, k), num(w, k), REL));
        }
        worst[1] = worst[1].max(rel(&what("max"), num(m, "max"), num(w, "max"), REL));
        assert_eq!(m["entries"], w["entries"], "{}", what("entries"));
        abs(
            &what("zero_share"),
            num(m, "zero_share"),
            num(w, "zero_share"),
            1e-12,
        );
        if scheme == "kfac-tri" {
            let f = num(w, "frobenius");
            for k in ["min_eigenvalue", "max_eigenvalue"] {
                abs(&what(k), num(m, k), num(w, k), REL * f);
            }
            worst[2] = worst[2].max(
                (num(m, "max_eigenvalue") - num(w, "max_eigenvalue")).abs()
                    / num(w, "max_eigenvalue"),
            );
            worst[3] =
                worst[3].max((num(m, "min_eigenvalue") - num(w, "min_eigenvalue")).abs() / f);
        } else {
            assert!(m["min_eigenvalue"].is_null() && m["max_eigenvalue"].is_null());
        }
    }
    // A ratio min/|max| moves by at most (|d min| + |ratio| |d max|) / (|max| - |d max|).
    let ratio_bound = |layer: &str| {
        want["modules"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(n, _)| n.starts_with(&format!("layers.{layer}.")))
            .map(|(_, w)| {
                let (d, max) = (REL * num(w, "frobenius"), num(w, "max_eigenvalue"));
                let ratio = num(w, "min_eigenvalue") / max;
                (d + ratio.abs() * d) / (max - d)
            })
            .fold(0.0, f64::max)
    };
    let layers = got["layers"].as_array().unwrap();
    let rows = table(&text);
    assert_eq!(layers.len(), want["layers"].as_object().unwrap().len());
    assert_eq!(rows.len(), layers.len(), "{text}");
    for (l, row) in layers.iter().zip(&rows) {
        let layer = l["layer"].as_str().unwrap();
        let w = &want["layers"][layer];
        assert!(
            w.is_object(),
            "{scheme}: layer {layer} not in the reference"
        );
        assert_eq!(row.0, layer);
        let what = |k: &str| format!("{scheme} layer {layer} {k}");
        for (k, printed) in [("trace_a", row.1), ("trace_b", row.2), ("max", row.3)] {
            rel(&what(k), num(l, k), num(w, k), REL);
            rel(
                &format!("{} printed", what(k)),
                printed,
                num(w, k),
                REL + PRINTED,
            );
        }
        abs(
            &what("zeros"),
            num(l, "zero_share"),
            num(w, "zero_share"),
            1e-12,
        );
        abs(
            &what("zeros printed"),
            row.4,
            num(w, "zero_share"),
            5e-4 + 1e-12,
        );
        if scheme == "kfac-tri" {
            let b = ratio_bound(layer);
            let r = num(w, "min_max_eig");
            abs(&what("min/max eig"), num(l, "min_max_eig"), r, b);
            // {:.3e}: half a unit in the 4th significant digit.
            let printed = row.5.expect("an eigenvalue ratio");
            abs(
                &what("min/max eig printed"),
                printed,
                r,
                b + 5e-4 * printed.abs(),
            );
        } else {
            assert!(l["min_max_eig"].is_null() && row.5.is_none(), "{text}");
        }
    }
    assert_eq!(got["a_is_zero"], false);
    let notes: Vec<&str> = got["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    if scheme == "kfac-tri" {
        // "... N of 14 adapted modules small enough ... (worst X; ...": X the smallest ratio.
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains(" of 14 adapted modules small enough to check"),
            "{}",
            notes[0]
        );
        let worst_note: f64 = notes[0]
            .split("(worst ")
            .nth(1)
            .and_then(|s| s.split(';').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no worst ratio in {}", notes[0]));
        let b = ratio_bound("0").max(ratio_bound("1"));
        let r = num(want, "worst");
        abs("kfac-tri note worst", worst_note, r, b + 5e-3 * r.abs());
        assert!(text.contains(&format!("note: {}", notes[0])), "{text}");
    } else {
        assert!(notes.is_empty(), "{notes:?}");
    }
    worst
}

#[test]
fn diag_summary_matches_numpy_on_the_reference_fisher() {
    let w = check_scheme("diag");
    eprintln!("diag: traces {:.1e}, max {:.1e}", w[0], w[1]);
}

#[test]
fn kfac_summary_matches_numpy_on_the_curvlinops_factors() {
    let w = check_scheme("kfac");
    eprintln!("kfac: traces {:.1e}, max {:.1e}", w[0], w[1]);
}

#[test]
fn kfac_tri_summary_and_eigenvalues_match_numpy() {
    let w = check_scheme("kfac-tri");
    eprintln!(
        "kfac-tri: traces {:.1e}, max {:.1e}, max eigenvalue {:.1e}, min eigenvalue {:.1e} of ||F||_F",
        w[0], w[1], w[2], w[3]
    );
}

/// At the fresh init `B = 0`: A's curvature is exactly zero and B's is not, so every zero
/// share follows from the shapes, and a layer's is its zero entries over its entries
/// (the modules differ in size: a mean of their shares would be 51.5 % for diag, not
/// 48.1 %).
#[test]
fn zero_shares_at_the_fresh_init_are_the_share_of_entries() {
    let want = &reference()["fresh_init"];
    let d = tempfile::tempdir().unwrap();
    for scheme in ["diag", "kfac"] {
        let (got, text) = curvature(d.path(), &["--scheme", scheme], true);
        let w = &want[scheme];
        for m in got["modules"].as_array().unwrap() {
            let name = m["module"].as_str().unwrap();
            let share = w["modules"][name].as_f64().unwrap();
            abs(
                &format!("{scheme} {name}"),
                num(m, "zero_share"),
                share,
                1e-12,
            );
        }
        let rows = table(&text);
        let layers = got["layers"].as_array().unwrap();
        assert_eq!((layers.len(), rows.len()), (2, 2), "{text}");
        for (l, row) in layers.iter().zip(&rows) {
            let layer = l["layer"].as_str().unwrap();
            let share = w["layers"][layer].as_f64().unwrap();
            abs(
                &format!("{scheme} layer {layer}"),
                num(l, "zero_share"),
                share,
                1e-12,
            );
            abs(
                &format!("{scheme} layer {layer} printed"),
                row.4,
                share,
                5e-4 + 1e-12,
            );
        }
        assert_eq!(got["a_is_zero"], true);
        assert!(
            got["notes"][0]
                .as_str()
                .unwrap()
                .starts_with("A's curvature is exactly zero"),
            "{}",
            got["notes"]
        );
    }
}
