//! `selftest --device sim --json`: every kernel and the tiny-model grad, curvature and
//! training step on the simulator pass against the CPU, with bf16 and with f32 base
//! weights; a failed check exits 1.

mod common;

use common::*;

fn selftest(args: &[&str]) -> (i32, serde_json::Value, String) {
    let o = bin()
        .args(["selftest", "--quiet", "--json"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let v = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (
        o.status.code().unwrap_or(-1),
        v,
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn assert_all_pass(v: &serde_json::Value, device: &str, base: &str) {
    assert_eq!(v["passed"], true, "{v:#}");
    assert!(
        v["device"].as_str().unwrap().starts_with(device),
        "{}",
        v["device"]
    );
    assert_eq!(v["base_dtype"], base);
    let rows = v["rows"].as_array().unwrap();
    assert!(rows.len() >= 100, "{} rows", rows.len());
    assert_eq!(v["n_checks"], rows.len());
    for r in rows {
        assert_eq!(r["pass"], true, "{r}");
    }
    for kernel in [
        "attention_backward",
        "cross_entropy",
        "sq_grad_accumulate",
        "e2e.train",
    ] {
        assert!(
            rows.iter()
                .any(|r| r["kernel"].as_str().unwrap().starts_with(kernel)),
            "a row for {kernel}"
        );
    }
}

#[test]
fn selftest_passes_on_the_simulator_with_bf16_and_f32_base_weights() {
    let (code, v, err) = selftest(&["--device", "sim"]);
    assert_eq!(code, 0, "{err}");
    assert_all_pass(&v, "sim", "bf16");
    let (code, v, err) = selftest(&["--device", "sim", "--base-dtype", "f32"]);
    assert_eq!(code, 0, "{err}");
    assert_all_pass(&v, "sim", "f32");
}

#[test]
fn selftest_on_the_cpu_holds_it_to_the_plain_reference() {
    let (code, v, err) = selftest(&["--device", "cpu"]);
    assert_eq!(code, 0, "{err}");
    assert_all_pass(&v, "cpu", "f32");
    let (code, _, err) = selftest(&["--device", "cpu", "--base-dtype", "bf16"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--base-dtype bf16 applies to --device cuda and sim"),
        "{err}"
    );
}
