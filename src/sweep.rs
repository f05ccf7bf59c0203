//! The learning-forgetting sweep (DESIGN §7): for each lambda, stage II from the same
//! init and data order; learning = drop of the target NLL from the base model, forgetting
//! = rise of each source NLL from the base model. Writes `results.csv`, `results.json`,
//! `results.md` and `frontier.svg` (Pareto-optimal points marked).

use std::path::{Path, PathBuf};
use std::time::Instant;

use plotters::prelude::*;
use serde::Serialize;

use crate::backend::Backend;
use crate::curvature::Curvature;
use crate::data::Example;
use crate::error::{Error, Result};
use crate::eval::exact_match::{ExactMatch, exact_match};
use crate::eval::generate::Sampling;
use crate::eval::mean_nll;
use crate::io::atomic_write;
use crate::model::{HostLora, Llama, LoraWeights};
use crate::tokenizer::Tokenizer;
use crate::train::TrainConfig;
use crate::train::session::{self, SessionOptions};

/// A default log grid over the range where the trade-off lies (DESIGN §6), plus plain LoRA.
pub const DEFAULT_LAMBDAS: [f32; 9] = [0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 1e3, 1e4, 1e5];

pub struct EvalSet {
    pub name: String,
    pub examples: Vec<Example>,
}

/// Exact match on question/answer pairs: the tokenizer, the pairs, and how to generate.
pub type ExactMatchSet<'a> = (&'a Tokenizer, Vec<(String, String)>, Sampling);

pub struct SweepSpec<'a> {
    pub lambdas: Vec<f32>,
    pub train: TrainConfig,
    pub train_data: &'a [Example],
    pub target: EvalSet,
    /// Forgetting is measured on each; the first is the primary one (Pareto front, plot).
    pub sources: Vec<EvalSet>,
    pub exact_match: Option<ExactMatchSet<'a>>,
    pub eval_batch: usize,
    pub quiet: bool,
    pub base_model: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceResult {
    pub name: String,
    pub nll: f64,
    pub forgetting: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `None` for the base model without an adapter.
    pub lambda: Option<f32>,
    pub target_nll: f64,
    pub learning: f64,
    pub sources: Vec<SourceResult>,
    pub exact_match: Option<ExactMatch>,
    pub final_train_loss: Option<f64>,
    pub pareto: bool,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    pub rows: Vec<Row>,
}

fn evaluate<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: Option<&LoraWeights<B::Buf>>,
    spec: &SweepSpec<'_>,
) -> Result<(f64, Vec<f64>, Option<ExactMatch>)> {
    let nll = |set: &EvalSet| {
        mean_nll(be, model, lora, &set.examples, spec.eval_batch, || {}).map(|s| s.mean_nll)
    };
    let target = nll(&spec.target)?;
    let sources = spec.sources.iter().map(nll).collect::<Result<Vec<_>>>()?;
    let em = match &spec.exact_match {
        Some((tok, rows, s)) => Some(exact_match(be, model, lora, tok, rows, s, || {})?),
        None => None,
    };
    Ok((target, sources, em))
}

/// Run the sweep; adapters and metrics of each run go to `out/runs/lambda-<L>/`.
pub fn run<B: Backend>(
    be: &B,
    model: &Llama<B>,
    curvature: Option<&Curvature>,
    init: &HostLora,
    spec: &SweepSpec<'_>,
    out: &Path,
    mut on_run: impl FnMut(&Row),
) -> Result<Report> {
    if spec.lambdas.iter().any(|&l| l > 0.0) && curvature.is_none() {
        return Err(Error::usage("lambda > 0 needs a curvature file"));
    }
    let t0 = Instant::now();
    let (base_t, base_s, base_em) = evaluate(be, model, None, spec)?;
    let mk_sources = |nlls: &[f64]| {
        spec.sources
            .iter()
            .zip(nlls.iter().zip(&base_s))
            .map(|(s, (n, b))| SourceResult {
                name: s.name.clone(),
                nll: *n,
                forgetting: n - b,
            })
            .collect::<Vec<_>>()
    };
    let base = Row {
        lambda: None,
        target_nll: base_t,
        learning: 0.0,
        sources: mk_sources(&base_s),
        exact_match: base_em,
        final_train_loss: None,
        pareto: false,
        seconds: t0.elapsed().as_secs_f64(),
    };
    on_run(&base);
    let mut rows = vec![base];
    for &lambda in &spec.lambdas {
        let t0 = Instant::now();
        let cfg = TrainConfig {
            lambda,
            ..spec.train.clone()
        };
        let opts = SessionOptions {
            out: Some(out.join("runs").join(format!("lambda-{lambda:e}"))),
            checkpoint_every: 0,
            resume: false,
            quiet: spec.quiet,
            base_model: spec.base_model.clone(),
            stop_after: None,
            curvature_path: None,
        };
        let res = session::run(be, model, spec.train_data, &cfg, curvature, init, &opts)?;
        let lora = res.lora.map(|v| be.buf(v.clone()))?;
        let (t, s, em) = evaluate(be, model, Some(&lora), spec)?;
        let row = Row {
            lambda: Some(lambda),
            target_nll: t,
            learning: base_t - t,
            sources: mk_sources(&s),
            exact_match: em,
            final_train_loss: res.metrics.last().map(|m| m.loss),
            pareto: false,
            seconds: t0.elapsed().as_secs_f64(),
        };
        on_run(&row);
        rows.push(row);
    }
    mark_pareto(&mut rows);
    let report = Report {
        target: spec.target.name.clone(),
        rows,
    };
    report.write(out)?;
    Ok(report)
}

/// A trained run is Pareto-optimal when no other run learns at least as much and forgets
/// at most as much (on the primary source), one of them strictly.
pub fn mark_pareto(rows: &mut [Row]) {
    let forget = |r: &Row| r.sources.first().map(|s| s.forgetting).unwrap_or(0.0);
    let pts: Vec<(f64, f64, bool)> = rows
        .iter()
        .map(|r| (r.learning, forget(r), r.lambda.is_some()))
        .collect();
    for (i, r) in rows.iter_mut().enumerate() {
        let (l, f, trained) = pts[i];
        r.pareto = trained
            && !pts
                .iter()
                .enumerate()
                .any(|(j, &(l2, f2, t2))| j != i && t2 && l2 >= l && f2 <= f && (l2 > l || f2 < f));
    }
}

fn lambda_label(l: Option<f32>) -> String {
    match l {
        None => "base".into(),
        Some(0.0) => "0 (LoRA)".into(),
        Some(l) => format!("{l:e}"),
    }
}

impl Report {
    pub fn write(&self, out: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).unwrap_or_default();
        atomic_write(&out.join("results.json"), json.as_bytes())?;
        atomic_write(&out.join("results.csv"), self.csv().as_bytes())?;
        atomic_write(&out.join("results.md"), self.markdown().as_bytes())?;
        self.plot(&out.join("frontier.svg"))
    }

    fn sources(&self) -> Vec<String> {
        self.rows
            .first()
            .map(|r| r.sources.iter().map(|s| s.name.clone()).collect())
            .unwrap_or_default()
    }

    pub fn csv(&self) -> String {
        let mut s = String::from("lambda,target_nll,learning");
        for n in self.sources() {
            s += &format!(",{n}_nll,{n}_forgetting");
        }
        s += ",exact_match,final_train_loss,pareto\n";
        for r in &self.rows {
            s += &format!(
                "{},{:.6},{:.6}",
                r.lambda.map(|l| l.to_string()).unwrap_or("base".into()),
                r.target_nll,
                r.learning
            );
            for x in &r.sources {
                s += &format!(",{:.6},{:.6}", x.nll, x.forgetting);
            }
            let em = r
                .exact_match
                .as_ref()
                .map(|e| format!("{:.4}", e.accuracy))
                .unwrap_or_default();
            let fl = r
                .final_train_loss
                .map(|l| format!("{l:.6}"))
                .unwrap_or_default();
            s += &format!(",{em},{fl},{}\n", r.pareto);
        }
        s
    }

    pub fn markdown(&self) -> String {
        let mut s = format!("| lambda | {} NLL | learning |", self.target);
        let mut sep = String::from("|---:|---:|---:|");
        for n in self.sources() {
            s += &format!(" {n} NLL | forgetting ({n}) |");
            sep += "---:|---:|";
        }
        let has_em = self.rows.iter().any(|r| r.exact_match.is_some());
        if has_em {
            s += " exact match |";
            sep += "---:|";
        }
        s += " Pareto |\n";
        s += &sep;
        s += "---|\n";
        for r in &self.rows {
            s += &format!(
                "| {} | {:.4} | {:+.4} |",
                lambda_label(r.lambda),
                r.target_nll,
                r.learning
            );
            for x in &r.sources {
                s += &format!(" {:.4} | {:+.4} |", x.nll, x.forgetting);
            }
            if has_em {
                s += &r
                    .exact_match
                    .as_ref()
                    .map(|e| format!(" {:.1}% |", 100.0 * e.accuracy))
                    .unwrap_or(" |".into());
            }
            s += if r.pareto { " * |\n" } else { " |\n" };
        }
        s
    }

    /// Learning (y) against forgetting on the primary source (x), one point per lambda.
    pub fn plot(&self, path: &Path) -> Result<()> {
        let pts: Vec<(f64, f64, &Row)> = self
            .rows
            .iter()
            .filter(|r| r.lambda.is_some())
            .map(|r| {
                (
                    r.sources.first().map(|s| s.forgetting).unwrap_or(0.0),
                    r.learning,
                    r,
                )
            })
            .collect();
        let err = |e: String| Error::file(path, format!("plot: {e}"));
        let span = |v: Vec<f64>| {
            let (lo, hi) = v
                .iter()
                .fold((0f64, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
            let pad = ((hi - lo) * 0.12).max(1e-3);
            (lo - pad)..(hi + pad)
        };
        let xr = span(pts.iter().map(|p| p.0).collect());
        let yr = span(pts.iter().map(|p| p.1).collect());
        let (xr_len, yr_len) = (xr.end - xr.start, yr.end - yr.start);
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (720, 480)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
            let src = self.sources().first().cloned().unwrap_or_default();
            let mut chart = ChartBuilder::on(&root)
                .caption(
                    format!("LaLoRA: learning vs forgetting ({} vs {src})", self.target),
                    ("sans-serif", 18),
                )
                .margin(16)
                .x_label_area_size(44)
                .y_label_area_size(64)
                .build_cartesian_2d(xr, yr)
                .map_err(|e| err(e.to_string()))?;
            chart
                .configure_mesh()
                .x_desc(format!("forgetting: rise of {src} NLL (nats/token)"))
                .y_desc(format!("learning: drop of {} NLL", self.target))
                .draw()
                .map_err(|e| err(e.to_string()))?;
            let mut front: Vec<(f64, f64)> = pts
                .iter()
                .filter(|p| p.2.pareto)
                .map(|p| (p.0, p.1))
                .collect();
            front.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(front, RED.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label("Pareto front")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED.stroke_width(2)));
            // Points closer than ~3% of the plot share a spot: stack their labels.
            let (w, h) = (xr_len.max(1e-12), yr_len.max(1e-12));
            let mut placed: Vec<(f64, f64)> = Vec::new();
            let labelled: Vec<(f64, f64, &Row, i32)> = pts
                .iter()
                .map(|p| {
                    let near = placed
                        .iter()
                        .filter(|q| {
                            ((p.0 - q.0) / w).abs() < 0.03 && ((p.1 - q.1) / h).abs() < 0.03
                        })
                        .count();
                    placed.push((p.0, p.1));
                    (p.0, p.1, p.2, -12 + 14 * near as i32)
                })
                .collect();
            chart
                .draw_series(labelled.iter().map(|p| {
                    let style = if p.2.pareto {
                        RED.filled()
                    } else {
                        BLUE.filled()
                    };
                    EmptyElement::at((p.0, p.1))
                        + Circle::new((0, 0), 5, style)
                        + Text::new(
                            format!("λ={}", lambda_label(p.2.lambda)),
                            (7, p.3),
                            ("sans-serif", 13),
                        )
                }))
                .map_err(|e| err(e.to_string()))?;
            chart
                .configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .draw()
                .map_err(|e| err(e.to_string()))?;
            root.present().map_err(|e| err(e.to_string()))?;
        }
        atomic_write(path, svg.as_bytes())
    }
}

/// Parse a comma-separated lambda list.
pub fn parse_lambdas(s: &str) -> Result<Vec<f32>> {
    let v = s
        .split(',')
        .map(|x| {
            x.trim()
                .parse::<f32>()
                .map_err(|_| Error::usage(format!("`{x}` is not a number in --lambdas")))
        })
        .collect::<Result<Vec<_>>>()?;
    if v.is_empty() || v.iter().any(|l| !l.is_finite() || *l < 0.0) {
        return Err(Error::usage("--lambdas must be non-negative numbers"));
    }
    Ok(v)
}

pub fn results_paths(out: &Path) -> Vec<PathBuf> {
    ["results.md", "results.csv", "results.json", "frontier.svg"]
        .iter()
        .map(|f| out.join(f))
        .collect()
}
