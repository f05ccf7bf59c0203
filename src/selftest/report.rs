//! The selftest's result: one row per comparison, printed as a table or as JSON.

use serde_json::{Value, json};

use super::BaseDtype;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Metric {
    /// `||got - want|| / ||want||` and `max |got - want|`.
    Rel { rel_err: f64, max_abs: f64 },
    /// Rows whose Monte-Carlo label differs between device and reference: a uniform that
    /// falls within rounding of a CDF boundary may legitimately land on either side.
    DifferingLabels(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// `op` or `op.output` (`op` a `Backend` method), or `e2e.<what>`.
    pub kernel: String,
    pub shapes: String,
    pub metric: Metric,
    pub bound: f64,
    pub pass: bool,
}

impl Row {
    pub fn new(kernel: &str, shapes: &str, metric: Metric, bound: f64) -> Self {
        // Written as `<=` so that a NaN error fails.
        let pass = match metric {
            Metric::Rel { rel_err, .. } => rel_err <= bound,
            Metric::DifferingLabels(n) => n as f64 <= bound,
        };
        Row {
            kernel: kernel.into(),
            shapes: shapes.into(),
            metric,
            bound,
            pass,
        }
    }

    /// The `Backend` op this row checks (`None` for end-to-end rows).
    pub fn op(&self) -> Option<&str> {
        let op = self.kernel.split('.').next().unwrap_or_default();
        (op != "e2e").then_some(op)
    }

    fn cells(&self) -> [String; 6] {
        let (err, abs, bound) = match self.metric {
            Metric::Rel { rel_err, max_abs } => (
                format!("{rel_err:.2e}"),
                format!("{max_abs:.2e}"),
                format!("{:.0e}", self.bound),
            ),
            Metric::DifferingLabels(n) => (
                format!("{n} labels"),
                "-".into(),
                format!("{} labels", self.bound),
            ),
        };
        let pass = if self.pass { "ok" } else { "FAIL" };
        [
            self.kernel.clone(),
            self.shapes.clone(),
            err,
            abs,
            bound,
            pass.into(),
        ]
    }

    fn json(&self) -> Value {
        let (metric, err, abs) = match self.metric {
            Metric::Rel { rel_err, max_abs } => ("rel_err", json!(rel_err), json!(max_abs)),
            Metric::DifferingLabels(n) => ("differing_labels", json!(n), Value::Null),
        };
        json!({
            "kernel": self.kernel,
            "shapes": self.shapes,
            "metric": metric,
            "rel_err": err,
            "max_abs": abs,
            "bound": self.bound,
            "pass": self.pass,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    /// The backend under test and the one it was held to, as they describe themselves.
    pub device: String,
    pub reference: String,
    pub base_dtype: BaseDtype,
    pub rows: Vec<Row>,
    pub seconds: f64,
}

impl Report {
    pub fn failures(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(|r| !r.pass)
    }

    pub fn passed(&self) -> bool {
        self.failures().next().is_none()
    }

    /// The aligned table, a header line first.
    pub fn table(&self) -> String {
        let head = [
            "kernel",
            "shapes",
            "max rel err",
            "max abs",
            "bound",
            "pass",
        ]
        .map(String::from);
        let cells: Vec<[String; 6]> = std::iter::once(head)
            .chain(self.rows.iter().map(Row::cells))
            .collect();
        let mut width = [0usize; 6];
        for row in &cells {
            for (w, c) in width.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        for row in &cells {
            let line: Vec<String> = row
                .iter()
                .zip(width)
                .enumerate()
                // Text columns left-aligned, numbers right-aligned.
                .map(|(i, (c, w))| {
                    if i < 2 {
                        format!("{c:<w$}")
                    } else {
                        format!("{c:>w$}")
                    }
                })
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out
    }

    pub fn summary(&self) -> String {
        let n = self.rows.len();
        let failed: Vec<String> = self
            .failures()
            .map(|r| format!("{} [{}]", r.kernel, r.shapes))
            .collect();
        let what = format!(
            "{} against {}, base dtype {}, {:.1} s",
            self.device,
            self.reference,
            self.base_dtype.name(),
            self.seconds
        );
        if failed.is_empty() {
            format!("selftest: all {n} checks passed ({what})")
        } else {
            format!(
                "selftest: {} of {n} checks FAILED ({what}): {}",
                failed.len(),
                failed.join("; ")
            )
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "device": self.device,
            "reference": self.reference,
            "base_dtype": self.base_dtype.name(),
            "rows": self.rows.iter().map(Row::json).collect::<Vec<_>>(),
            "passed": self.passed(),
            "n_checks": self.rows.len(),
            "n_failed": self.failures().count(),
            "seconds": self.seconds,
        })
    }
}
