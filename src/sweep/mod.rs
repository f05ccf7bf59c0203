//! The learning-forgetting sweep (DESIGN §7): for each lambda, stage II from the same
//! init and data order; learning = drop of the target NLL from the base model, forgetting
//! = rise of each source NLL from the base model, each with the standard error of its
//! per-sequence paired differences (`eval::paired`). Optionally also forgetting as the
//! accuracy drop on multiple-choice sets and learning as the exact-match gain, each paired
//! over the questions with the same function (unit weights). Writes `results.csv`,
//! `results.json`, `results.md` and `frontier.svg` (Pareto-optimal points, on the NLL
//! figures, marked; error bars drawn).
//!
//! A grid sweep ([`run_grid`]) runs the lambdas for each point of a grid after evaluating
//! the base model once: a LoRA shape (rank and target modules) and, where the grid compares
//! curvatures of one shape (the demo's data study), the curvature's name. Each point's runs
//! are exactly those of a plain sweep of that shape with that curvature. One table over all,
//! its rows naming their point, one frontier plot per point and an overlay of them all.
//!
//! Here: what a sweep is given, the evaluations and one sweep's runs. `grid` runs the grid
//! sweeps, `report` writes the files, `pareto` marks the optimal runs and `plot` draws the
//! frontiers.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::backend::Backend;
use crate::cost::{Flops, Meter, StageCost, SweepCost};
use crate::data::Example;
use crate::error::{Error, Result};
use crate::eval::choice::{ChoiceRow, ChoiceScores, accuracy, choice_logliks, score};
use crate::eval::exact_match::{ExactMatch, exact_match};
use crate::eval::generate::Sampling;
use crate::eval::paired::{Paired, paired_difference};
use crate::eval::perplexity::sequence_losses;
use crate::model::{HostLora, Llama, LoraWeights};
use crate::progress;
use crate::tokenizer::Tokenizer;
use crate::train::session::{self, SessionOptions};
use crate::train::{Penalty, TrainConfig};

mod grid;
mod pareto;
mod plot;
mod report;

pub use grid::{
    GridEntry, OVERLAY, Prepared, point_name, run_grid, shape_dir, shape_label, shape_name,
    targets_label,
};
pub use pareto::mark_pareto;
pub use report::describe_sets;

/// A default log grid over the range where the trade-off lies (DESIGN §6), plus plain LoRA.
pub const DEFAULT_LAMBDAS: [f32; 9] = [0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 1e3, 1e4, 1e5];

pub struct EvalSet {
    pub name: String,
    pub examples: Vec<Example>,
}

impl EvalSet {
    /// Predicted tokens per sequence: the weights of its per-token mean.
    fn weights(&self) -> Vec<f64> {
        self.examples.iter().map(|e| e.n_targets() as f64).collect()
    }

    fn info(&self, role: &'static str) -> SetInfo {
        SetInfo {
            name: self.name.clone(),
            role,
            n_sequences: self.examples.len(),
            n_tokens: self.examples.iter().map(Example::n_targets).sum(),
        }
    }
}

/// A multiple-choice set: forgetting as the drop of its accuracy.
pub struct ChoiceSet {
    pub name: String,
    /// Its file, to name it in errors.
    pub path: PathBuf,
    pub rows: Vec<ChoiceRow>,
}

/// Exact match on question/answer pairs: the pairs, and how to generate.
pub type ExactMatchSet = (Vec<(String, String)>, Sampling);

pub struct SweepSpec<'a> {
    pub lambdas: Vec<f32>,
    pub train: TrainConfig,
    pub train_data: &'a [Example],
    pub target: EvalSet,
    /// Forgetting is measured on each; the first is the primary one (Pareto front, plot).
    pub sources: Vec<EvalSet>,
    /// Multiple-choice sets (forgetting as an accuracy drop).
    pub choices: Vec<ChoiceSet>,
    /// Learning also as the exact-match gain.
    pub exact_match: Option<ExactMatchSet>,
    /// Needed for `choices` and `exact_match`.
    pub tokenizer: Option<&'a Tokenizer>,
    pub eval_batch: usize,
    pub quiet: bool,
    pub base_model: String,
}

impl SweepSpec<'_> {
    /// The target set, then the sources.
    fn sets(&self) -> impl Iterator<Item = &EvalSet> {
        std::iter::once(&self.target).chain(&self.sources)
    }
}

/// What an evaluation set's figures rest on.
#[derive(Debug, Clone, Serialize)]
pub struct SetInfo {
    pub name: String,
    /// `target` (learning) or `source` (forgetting).
    pub role: &'static str,
    pub n_sequences: usize,
    /// Predicted (non-ignored) tokens.
    pub n_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceResult {
    pub name: String,
    pub nll: f64,
    pub forgetting: f64,
    /// Standard error of `forgetting` over the set's sequences (paired with the base model).
    pub forgetting_se: f64,
}

/// Accuracy on a multiple-choice set, and its drop from the base model.
#[derive(Debug, Clone, Serialize)]
pub struct ChoiceResult {
    pub name: String,
    pub n: usize,
    /// lm-eval's `acc` and `acc_norm`, each with its binomial standard error.
    pub acc: f64,
    pub acc_se: f64,
    pub acc_norm: f64,
    pub acc_norm_se: f64,
    /// Base accuracy minus this run's, with the standard error of the per-question
    /// differences (paired with the base model).
    pub acc_drop: f64,
    pub acc_drop_se: f64,
    pub acc_norm_drop: f64,
    pub acc_norm_drop_se: f64,
}

impl ChoiceResult {
    /// The columns of one set in the tables, in order: acc, its se, its drop and the
    /// drop's se, then the same for acc_norm.
    pub fn columns(&self) -> [f64; 8] {
        [
            self.acc,
            self.acc_se,
            self.acc_drop,
            self.acc_drop_se,
            self.acc_norm,
            self.acc_norm_se,
            self.acc_norm_drop,
            self.acc_norm_drop_se,
        ]
    }
}

/// Exact-match accuracy and its gain over the base model.
#[derive(Debug, Clone, Serialize)]
pub struct ExactMatchResult {
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// Binomial standard error of `accuracy`.
    pub accuracy_se: f64,
    /// This run's accuracy minus the base model's, with the standard error of the
    /// per-question differences (paired with the base model).
    pub gain: f64,
    pub gain_se: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `None` for the base model without an adapter.
    pub lambda: Option<f32>,
    pub target_nll: f64,
    pub learning: f64,
    /// Standard error of `learning` over the target sequences (paired with the base model).
    pub learning_se: f64,
    pub sources: Vec<SourceResult>,
    pub choice: Vec<ChoiceResult>,
    pub exact_match: Option<ExactMatchResult>,
    pub final_train_loss: Option<f64>,
    pub pareto: bool,
    pub seconds: f64,
    /// Per stage: evaluation for the base model; training, then evaluation, for a run.
    pub cost: Vec<StageCost>,
    /// A grid sweep's run: its LoRA shape (`None` in a plain sweep, and for the base row).
    #[serde(flatten)]
    pub grid: Option<GridPoint>,
    /// Summed loss of every sequence of each set (target first, then the sources): what
    /// the paired standard errors between any two rows are computed from.
    #[serde(skip)]
    pub losses: Vec<Vec<f64>>,
}

/// Where a grid sweep's run sits: its LoRA shape (and curvature, where the grid has several).
#[derive(Debug, Clone, Serialize)]
pub struct GridPoint {
    pub rank: usize,
    /// `all`, or the modules comma-separated.
    pub targets: String,
    /// The name of its curvature, in a grid over curvatures (`None` otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub curvature: Option<String>,
    /// Trainable LoRA parameters.
    pub lora_params: usize,
    /// Pareto-optimal among every run of the grid (`pareto`: within its shape's runs).
    pub grid_pareto: bool,
    /// Its shape's index in `Report::grid`.
    #[serde(skip)]
    pub shape: usize,
}

/// One point of a grid sweep: a LoRA shape (and its curvature's name, where the grid has
/// several).
#[derive(Debug, Clone, Serialize)]
pub struct GridShape {
    pub rank: usize,
    pub targets: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub curvature: Option<String>,
    pub lora_params: usize,
    /// Its directory in the output: `runs/`, `frontier.svg` and the curvature estimated for
    /// it (`curvature.safetensors`), if any.
    pub dir: String,
    /// Its stage I, when estimated in this sweep, and what its penalty keeps.
    pub cost: SweepCost,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    /// The target set, then the sources.
    pub sets: Vec<SetInfo>,
    pub rows: Vec<Row>,
    pub cost: SweepCost,
    /// A grid sweep's shapes, in the order of its rows (empty for a plain sweep).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub grid: Vec<GridShape>,
}

/// What one model scored on every set.
#[derive(Clone)]
struct Evaluation {
    /// Per-sequence summed losses on every NLL set (target first).
    losses: Vec<Vec<f64>>,
    choice: Vec<ChoiceScores>,
    exact_match: Option<ExactMatch>,
}

/// Per-sequence summed losses on every set (target first), the multiple-choice sets and
/// exact match if asked.
fn evaluate<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: Option<&LoraWeights<B::Buf>>,
    spec: &SweepSpec<'_>,
) -> Result<Evaluation> {
    let losses = spec
        .sets()
        .map(|set| {
            let pb = progress::bar(
                set.examples.len().div_ceil(spec.eval_batch) as u64,
                &format!("eval {}", set.name),
                spec.quiet,
            )
            .unit("batches");
            let l = sequence_losses(be, model, lora, &set.examples, spec.eval_batch, || {
                pb.inc(1)
            })?;
            pb.finish_and_clear();
            Ok(l)
        })
        .collect::<Result<Vec<_>>>()?;
    let tok = || {
        spec.tokenizer
            .ok_or_else(|| Error::usage("multiple choice and exact match need a tokenizer"))
    };
    let choice = spec
        .choices
        .iter()
        .map(|set| {
            let pb = progress::bar(
                set.rows.len() as u64,
                &format!("choice {}", set.name),
                spec.quiet,
            )
            .unit("questions");
            let ll = choice_logliks(be, model, lora, tok()?, &set.path, &set.rows, |n| {
                pb.inc(n as u64)
            })?;
            pb.finish_and_clear();
            Ok(score(&set.rows, &ll))
        })
        .collect::<Result<Vec<_>>>()?;
    let exact_match = match &spec.exact_match {
        Some((rows, s)) => {
            let pb = progress::bar(rows.len() as u64, "exact match", spec.quiet).unit("answers");
            let em = exact_match(be, model, lora, tok()?, rows, s, || pb.inc(1))?;
            pb.finish_and_clear();
            Some(em)
        }
        None => None,
    };
    Ok(Evaluation {
        losses,
        choice,
        exact_match,
    })
}

/// `a - b` of two models' 0/1 outcomes on the same questions, with the paired standard
/// error (`paired_difference` with unit weights).
fn rate_difference(a: &[bool], b: &[bool]) -> Paired {
    let f = |v: &[bool]| v.iter().map(|&x| x as u8 as f64).collect::<Vec<_>>();
    paired_difference(&f(a), &f(b), &vec![1.0; a.len()])
}

/// Binomial standard error of an accuracy (lm-eval's); NaN below two questions.
fn accuracy_se(outcomes: &[bool]) -> f64 {
    accuracy(outcomes).stderr.unwrap_or(f64::NAN)
}

/// A row's figures from what it scored and what the base model scored.
fn row(
    lambda: Option<f32>,
    ev: Evaluation,
    base_ev: &Evaluation,
    weights: &[Vec<f64>],
    spec: &SweepSpec<'_>,
) -> Row {
    let (losses, base) = (ev.losses, &base_ev.losses);
    let mean = |l: &[f64], w: &[f64]| l.iter().sum::<f64>() / w.iter().sum::<f64>();
    // Learning: base minus run on the target; forgetting: run minus base on a source.
    let learning = paired_difference(&base[0], &losses[0], &weights[0]);
    let sources = spec
        .sources
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let f = paired_difference(&losses[k + 1], &base[k + 1], &weights[k + 1]);
            SourceResult {
                name: s.name.clone(),
                nll: mean(&losses[k + 1], &weights[k + 1]),
                forgetting: f.diff,
                forgetting_se: f.se,
            }
        })
        .collect();
    // Accuracy drop: base minus run; exact-match gain: run minus base.
    let choice = spec
        .choices
        .iter()
        .zip(ev.choice.iter().zip(&base_ev.choice))
        .map(|(set, (c, b))| {
            let (acc, norm) = (c.correct(), c.correct_norm());
            let drop = rate_difference(&b.correct(), &acc);
            let drop_norm = rate_difference(&b.correct_norm(), &norm);
            ChoiceResult {
                name: set.name.clone(),
                n: c.n(),
                acc: c.acc().value,
                acc_se: accuracy_se(&acc),
                acc_norm: c.acc_norm().value,
                acc_norm_se: accuracy_se(&norm),
                acc_drop: drop.diff,
                acc_drop_se: drop.se,
                acc_norm_drop: drop_norm.diff,
                acc_norm_drop_se: drop_norm.se,
            }
        })
        .collect();
    let exact_match = ev
        .exact_match
        .as_ref()
        .zip(base_ev.exact_match.as_ref())
        .map(|(e, b)| {
            let gain = rate_difference(&e.outcomes, &b.outcomes);
            ExactMatchResult {
                n: e.n,
                correct: e.correct,
                accuracy: e.accuracy,
                accuracy_se: accuracy_se(&e.outcomes),
                gain: gain.diff,
                gain_se: gain.se,
            }
        });
    Row {
        lambda,
        target_nll: mean(&losses[0], &weights[0]),
        learning: learning.diff,
        learning_se: learning.se,
        sources,
        choice,
        exact_match,
        final_train_loss: None,
        pareto: false,
        seconds: 0.0,
        cost: Vec::new(),
        grid: None,
        losses,
    }
}

/// Lambda > 0 trains against a curvature: without one there is nothing to penalise.
pub fn require_curvature(lambdas: &[f32], has_curvature: bool) -> Result<()> {
    if lambdas.iter().any(|&l| l > 0.0) && !has_curvature {
        return Err(Error::usage("lambda > 0 needs a curvature file"));
    }
    Ok(())
}

fn say(spec: &SweepSpec<'_>, msg: String) {
    if !spec.quiet {
        eprintln!("sweep: {msg}");
    }
}

/// What every run is compared with.
struct Base {
    ev: Evaluation,
    /// Predicted tokens per sequence of each NLL set (target first).
    weights: Vec<Vec<f64>>,
    sets: Vec<SetInfo>,
}

/// Real tokens and FLOPs of one evaluation: the NLL sets' (choice scoring and generation
/// add only time).
fn eval_count(spec: &SweepSpec<'_>, flops: &Flops) -> (u64, u64) {
    spec.sets().fold((0, 0), |(t, f), s| {
        let (t1, f1) = flops.evaluation(&s.examples, spec.eval_batch);
        (t + t1, f + f1)
    })
}

/// Evaluate the base model (no adapter) on every set: what the runs are compared with, and
/// its row.
fn evaluate_base<B: Backend>(
    be: &B,
    model: &Llama<B>,
    spec: &SweepSpec<'_>,
) -> Result<(Base, Row)> {
    // The base model runs without an adapter: no LoRA products to count.
    let no_lora = LoraWeights::<()>::none();
    let flops = &Flops::new(&model.cfg, &no_lora);
    let sets: Vec<SetInfo> = spec
        .sets()
        .enumerate()
        .map(|(i, s)| s.info(if i == 0 { "target" } else { "source" }))
        .collect();
    let weights: Vec<Vec<f64>> = spec.sets().map(EvalSet::weights).collect();
    let t0 = Instant::now();
    let mut on = describe_sets(&sets);
    for c in &spec.choices {
        on += &format!(", {} ({} multiple-choice questions)", c.name, c.rows.len());
    }
    if let Some((rows, _)) = &spec.exact_match {
        on += &format!(", exact match ({} problems)", rows.len());
    }
    say(spec, format!("evaluating the base model on {on}"));
    let (eval_tokens, eval_flops) = eval_count(spec, flops);
    let meter = Meter::start("eval", be);
    let ev = evaluate(be, model, None, spec)?;
    let mut base = row(None, ev.clone(), &ev, &weights, spec);
    base.cost = vec![meter.finish(eval_tokens, eval_flops, be)];
    base.seconds = t0.elapsed().as_secs_f64();
    Ok((Base { ev, weights, sets }, base))
}

/// The runs of one LoRA shape: where they start, their penalty, where they are written.
struct Shape<'a, B: Backend> {
    penalty: Option<&'a Penalty<B>>,
    init: &'a HostLora,
    /// Adapters and metrics of each run go to `dir/runs/lambda-<L>/`.
    dir: &'a Path,
    lambdas: &'a [f32],
    /// In a grid: the shape, given to each row (its Pareto flag over the grid comes last),
    /// and `r=4 all (1/4)` to name it in the status lines.
    point: Option<(GridPoint, String)>,
}

/// Train from the same init and data order at each lambda, and evaluate each run.
fn train_lambdas<B: Backend>(
    be: &B,
    model: &Llama<B>,
    shape: &Shape<'_, B>,
    spec: &SweepSpec<'_>,
    base: &Base,
    on_run: &mut impl FnMut(&Row),
) -> Result<Vec<Row>> {
    let penalty = shape.penalty;
    let flops = Flops::new(&model.cfg, shape.init);
    let (eval_tokens, eval_flops) = eval_count(spec, &flops);
    let prefix = match &shape.point {
        Some((_, label)) => format!("{label}, "),
        None => String::new(),
    };
    let runs = shape.dir.join("runs");
    let run_dir = |lambda: f32| format!("lambda-{lambda:e}");
    let stale = stale_runs(
        &runs,
        &shape
            .lambdas
            .iter()
            .map(|&l| run_dir(l))
            .collect::<Vec<_>>(),
    );
    if !stale.is_empty() {
        say(
            spec,
            format!(
                "{} holds runs of an earlier sweep that this one does not run ({}); they stay, and the results describe this sweep's runs only",
                runs.display(),
                stale.join(", ")
            ),
        );
    }
    let mut rows = Vec::new();
    for (i, &lambda) in shape.lambdas.iter().enumerate() {
        let t0 = Instant::now();
        say(
            spec,
            format!(
                "{prefix}lambda {} ({}/{}): training {} steps, then evaluating",
                lambda_label(Some(lambda)),
                i + 1,
                shape.lambdas.len(),
                spec.train.steps
            ),
        );
        let cfg = TrainConfig {
            lambda,
            ..spec.train.clone()
        };
        let opts = SessionOptions {
            out: Some(runs.join(run_dir(lambda))),
            quiet: spec.quiet,
            base_model: spec.base_model.clone(),
            ..SessionOptions::default()
        };
        let meter = Meter::start("train", be);
        let res = session::run(be, model, spec.train_data, &cfg, penalty, shape.init, &opts)?;
        let scheme = penalty.map(Penalty::scheme);
        let (tokens, train_flops) = flops.training(spec.train_data, &cfg, scheme, 0, cfg.steps);
        let train_cost = meter.finish(tokens, train_flops, be);
        let lora = res.lora.map(|v| be.buf(v.clone()))?;
        let meter = Meter::start("eval", be);
        let ev = evaluate(be, model, Some(&lora), spec)?;
        let mut r = row(Some(lambda), ev, &base.ev, &base.weights, spec);
        r.cost = vec![train_cost, meter.finish(eval_tokens, eval_flops, be)];
        r.final_train_loss = res.metrics.last().map(|m| m.loss);
        r.seconds = t0.elapsed().as_secs_f64();
        r.grid = shape.point.as_ref().map(|(p, _)| p.clone());
        on_run(&r);
        rows.push(r);
    }
    Ok(rows)
}

/// The `lambda-*` directories under `runs` (sorted) that are not among `ours`: what an
/// earlier sweep into the same directory left and this one will not replace.
fn stale_runs(runs: &Path, ours: &[String]) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(runs) else {
        return Vec::new();
    };
    let mut stale: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("lambda-") && !ours.contains(n))
        .collect();
    stale.sort();
    stale
}

/// Run the sweep; adapters and metrics of each run go to `out/runs/lambda-<L>/`.
pub fn run<B: Backend>(
    be: &B,
    model: &Llama<B>,
    penalty: Option<&Penalty<B>>,
    init: &HostLora,
    spec: &SweepSpec<'_>,
    out: &Path,
    mut on_run: impl FnMut(&Row),
) -> Result<Report> {
    require_curvature(&spec.lambdas, penalty.is_some())?;
    let (base, base_row) = evaluate_base(be, model, spec)?;
    on_run(&base_row);
    let shape = Shape {
        penalty,
        init,
        dir: out,
        lambdas: &spec.lambdas,
        point: None,
    };
    let mut rows = vec![base_row];
    rows.extend(train_lambdas(be, model, &shape, spec, &base, &mut on_run)?);
    mark_pareto(&mut rows, &base.weights);
    let report = Report {
        target: spec.target.name.clone(),
        sets: base.sets,
        rows,
        cost: SweepCost {
            curvature: None,
            penalty_state_bytes: penalty.and_then(Penalty::state_bytes),
        },
        grid: Vec::new(),
    };
    report.write(out)?;
    Ok(report)
}

/// `base`, `0 (LoRA)`, `1e1`: as the table, the plot and the status lines name a run.
pub fn lambda_label(l: Option<f32>) -> String {
    match l {
        None => "base".into(),
        Some(0.0) => "0 (LoRA)".into(),
        Some(l) => format!("{l:e}"),
    }
}

/// Parse a comma-separated list of LoRA ranks (`--ranks 4,8,16`).
pub fn parse_ranks(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|x| match x.trim().parse::<usize>() {
            Ok(r) if r >= 1 => Ok(r),
            _ => Err(Error::usage(format!(
                "`{x}` in --ranks is not a rank (a whole number >= 1)"
            ))),
        })
        .collect()
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
    // Each lambda's run has its own directory and row: a repeat would train it twice.
    if let Some((i, l)) = v.iter().enumerate().find(|(i, l)| v[..*i].contains(l)) {
        return Err(Error::usage(format!(
            "--lambdas {s}: {l} given twice (item {})",
            i + 1
        )));
    }
    Ok(v)
}
