//! The selftest passes on a correct backend, and each of its checks can fail: a backend
//! with one wrong op fails exactly that op's rows.

mod wrapper;

use self::wrapper::Wrapped;
use super::{BaseDtype, Metric, Options, Reference, Report, Row, rel_err, run};
use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;

fn opts(base_dtype: BaseDtype, kernels: bool, end_to_end: bool) -> Options {
    Options {
        base_dtype,
        seed: 0,
        kernels,
        end_to_end,
    }
}

fn check<D: Backend, R: Backend>(dev: &D, re: &R, o: Options) -> Report {
    match run(dev, re, &o, &mut |_| {}) {
        Ok(r) => r,
        Err(e) => panic!("selftest errored: {e}"),
    }
}

fn failing(r: &Report) -> Vec<String> {
    r.failures()
        .map(|r| format!("{} [{}]", r.kernel, r.shapes))
        .collect()
}

#[test]
fn cpu_backend_passes_against_the_plain_reference() {
    let r = check(
        &CpuBackend::new(2),
        &Reference,
        opts(BaseDtype::F32, true, true),
    );
    assert!(r.passed(), "{}\n{}", r.table(), r.summary());
    // Every op of the trait has a row (the memory ops aside, which every row uses).
    let ops: std::collections::BTreeSet<&str> = r.rows.iter().filter_map(Row::op).collect();
    assert_eq!(ops.len(), OPS.len(), "{ops:?}");
    assert!(
        r.rows
            .iter()
            .any(|r| r.kernel.starts_with("e2e.curvature kfac-tri/mc"))
    );
}

/// Every op with kernel rows.
const OPS: [&str; 32] = [
    "embedding",
    "rmsnorm",
    "add_rmsnorm",
    "rmsnorm_backward",
    "linear",
    "linear_backward",
    "lora_forward",
    "lora_backward",
    "project_group",
    "project_group_backward",
    "rope",
    "attention",
    "attention_backward",
    "swiglu",
    "swiglu_backward",
    "add_assign",
    "cross_entropy",
    "classifier",
    "gram_accumulate",
    "gram_accumulate_upper",
    "mirror_upper",
    "segment_sum",
    "sq_grad_accumulate",
    "matmul",
    "dup",
    "mul_assign",
    "scale",
    "axpy",
    "dot",
    "copy_into",
    "slice",
    "adamw_step",
];

/// Whether a fault in `op` reaches a row of another op through the ops it is built from:
/// the projection group (the test backend runs it as the per-projection sequence, as the
/// trait's default does, with `rope` on the rotated outputs), and the attention backward
/// given a RoPE table (`rope`'s inverse on dq and dk).
fn group_row_reached(op: &str, row: &Row) -> bool {
    let adapted = !row.shapes.contains("no LoRA");
    let rotated = row.shapes.contains("RoPE") && !row.shapes.contains("no RoPE");
    match (op, row.kernel.as_str()) {
        ("linear", "project_group.y") | ("linear_backward", "project_group_backward.dx") => true,
        ("rope", "project_group.y" | "attention_backward.dq" | "attention_backward.dk") => rotated,
        ("lora_forward", "project_group.y" | "project_group.u") => adapted,
        // gA, dA and dB exist only for adapted projections; dx sums over the group.
        ("lora_backward", k) => k.starts_with("project_group_backward."),
        _ => false,
    }
}

#[test]
fn a_wrong_op_fails_its_rows_and_only_its_rows() {
    let cpu = CpuBackend::new(2);
    for op in OPS {
        let r = check(
            &Wrapped::faulty(op),
            &cpu,
            opts(BaseDtype::F32, true, false),
        );
        for row in &r.rows {
            // Scaling the gradient leaves the sampled labels (its negative entry) alone.
            let scale_invariant = matches!(row.metric, Metric::DifferingLabels(_));
            let reached = row.op() == Some(op) || group_row_reached(op, row);
            let should_fail = reached && !scale_invariant;
            assert_eq!(!row.pass, should_fail, "fault in {op}: {row:?}");
        }
    }
}

#[test]
fn differing_sampled_labels_fail_the_labels_row() {
    let r = check(
        &Wrapped::faulty("sampling"),
        &CpuBackend::new(2),
        opts(BaseDtype::F32, true, false),
    );
    let f = failing(&r);
    assert_eq!(f.len(), 4, "{f:?}");
    assert!(
        f.iter()
            .all(|k| k.starts_with("cross_entropy.labels") || k.starts_with("classifier.labels")),
        "{f:?}"
    );
}

#[test]
fn end_to_end_rows_fail_where_a_wrong_op_is_used() {
    let cpu = CpuBackend::new(2);
    // (wrong op, rows that must fail, rows that must pass), by kernel prefix.
    let cases: [(&str, &[&str], &[&str]); 6] = [
        (
            "sq_grad_accumulate",
            &["e2e.curvature diag/"],
            &["e2e.grad", "e2e.curvature kfac", "e2e.train"],
        ),
        (
            "segment_sum",
            &["e2e.curvature kfac/empirical reduce"],
            &["e2e.grad", "e2e.curvature diag", "e2e.train"],
        ),
        ("adamw_step", &["e2e.train"], &["e2e.grad", "e2e.curvature"]),
        (
            "lora_backward",
            &["e2e.grad", "e2e.curvature", "e2e.train"],
            &[],
        ),
        // The model's residual adds run fused with the norms after them.
        (
            "add_rmsnorm",
            &["e2e.grad", "e2e.curvature", "e2e.train"],
            &[],
        ),
        // The model's projections run as groups: the device's group op is the one used.
        (
            "project_group_backward",
            &["e2e.grad", "e2e.curvature", "e2e.train"],
            &[],
        ),
    ];
    for (op, fail, pass) in cases {
        let r = check(
            &Wrapped::faulty(op),
            &cpu,
            opts(BaseDtype::F32, false, true),
        );
        for row in &r.rows {
            let is = |prefixes: &[&str]| prefixes.iter().any(|p| row.kernel.starts_with(p));
            let metrics_only = row.shapes.contains("per-step metrics");
            if is(fail) && !metrics_only {
                assert!(!row.pass, "fault in {op} should fail {row:?}");
            }
            if is(pass) {
                assert!(row.pass, "fault in {op} should not fail {row:?}");
            }
        }
    }
}

#[test]
fn a_correct_bf16_device_passes_at_the_bf16_bounds_only() {
    let cpu = CpuBackend::new(2);
    let r = check(&Wrapped::bf16(), &cpu, opts(BaseDtype::Bf16, true, true));
    assert!(r.passed(), "{}\n{}", r.table(), r.summary());
    // The same device held to the f32 bounds fails every base-weight product.
    let r = check(&Wrapped::bf16(), &cpu, opts(BaseDtype::F32, true, false));
    let f = failing(&r);
    assert!(!f.is_empty());
    assert!(
        f.iter().all(|k| [
            "embedding",
            "linear",
            "classifier",
            "project_group.y",
            "project_group_backward.dx"
        ]
        .iter()
        .any(|p| k.starts_with(p))),
        "{f:?}"
    );
    // The projection group's base-weight products among them; its LoRA products pass.
    for row in ["project_group.y", "project_group_backward.dx"] {
        assert!(f.iter().any(|k| k.starts_with(row)), "{row}: {f:?}");
    }
}

#[test]
fn metric_edge_cases() {
    assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), (0.0, 0.0));
    assert_eq!(rel_err(&[0.0], &[0.0]), (0.0, 0.0));
    assert_eq!(rel_err(&[1.0], &[0.0]).0, f64::INFINITY);
    assert_eq!(rel_err(&[1.0], &[1.0, 2.0]).0, f64::INFINITY);
    let (rel, abs) = rel_err(&[f32::NAN, 1.0], &[1.0, 1.0]);
    assert!(rel.is_nan() && abs.is_nan());
    let nan = Row::new(
        "x",
        "",
        Metric::Rel {
            rel_err: f64::NAN,
            max_abs: 0.0,
        },
        1.0,
    );
    assert!(!nan.pass);
    assert!(Row::new("x", "", Metric::DifferingLabels(1), 1.0).pass);
    assert!(!Row::new("x", "", Metric::DifferingLabels(2), 1.0).pass);
}

#[test]
fn json_report_has_the_documented_fields() {
    let r = check(
        &CpuBackend::new(2),
        &Reference,
        opts(BaseDtype::F32, false, true),
    );
    let j = r.json();
    assert_eq!(j["passed"], true);
    assert_eq!(j["base_dtype"], "f32");
    for key in ["kernel", "shapes", "rel_err", "max_abs", "bound", "pass"] {
        assert!(
            j["rows"][0].get(key).is_some(),
            "row lacks {key}: {}",
            j["rows"][0]
        );
    }
}
