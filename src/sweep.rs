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

use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use plotters::prelude::*;
use serde::Serialize;

use crate::backend::Backend;
use crate::cost::{self, CostBlock, Flops, Meter, StageCost, SweepCost};
use crate::data::Example;
use crate::error::{Error, Result};
use crate::eval::choice::{ChoiceRow, ChoiceScores, accuracy, choice_logliks, score};
use crate::eval::exact_match::{ExactMatch, exact_match};
use crate::eval::generate::Sampling;
use crate::eval::paired::{Paired, paired_difference};
use crate::eval::perplexity::sequence_losses;
use crate::io::atomic_write;
use crate::model::{HostLora, Llama, LoraConfig, LoraWeights, Proj};
use crate::progress;
use crate::tokenizer::Tokenizer;
use crate::train::session::{self, SessionOptions};
use crate::train::{Penalty, TrainConfig};

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
    let no_lora = LoraWeights::<()> {
        cfg: LoraConfig {
            r: 0,
            alpha: 0.0,
            use_rslora: false,
            targets: Vec::new(),
        },
        modules: Vec::new(),
    };
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
            out: Some(shape.dir.join("runs").join(format!("lambda-{lambda:e}"))),
            checkpoint_every: 0,
            resume: false,
            quiet: spec.quiet,
            base_model: spec.base_model.clone(),
            stop_after: None,
            curvature_path: None,
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

/// A LoRA shape of a grid sweep made ready to train.
pub struct Prepared<B: Backend> {
    /// Where training starts: the curvature's θ* when there is one, else a fresh init.
    pub init: HostLora,
    /// Its curvature's penalty (shared where shapes share one curvature).
    pub penalty: Option<Rc<Penalty<B>>>,
    /// Stage I, when it ran for this shape.
    pub curvature_cost: Option<StageCost>,
}

/// `all`, or the modules comma-separated (`q_proj,v_proj`).
pub fn targets_label(targets: &[Proj]) -> String {
    if targets == Proj::ALL {
        return "all".into();
    }
    let names: Vec<&str> = targets.iter().map(|p| p.name()).collect();
    names.join(",")
}

/// `r=4 all`: how the status lines, progress lines, tables and plots name a shape.
pub fn shape_name(rank: usize, targets: &str) -> String {
    format!("r={rank} {targets}")
}

pub fn shape_label(cfg: &LoraConfig) -> String {
    shape_name(cfg.r, &targets_label(&cfg.targets))
}

/// `r=4 all`, or `r=8 all, curvature quac` in a grid over curvatures: how the status lines,
/// progress lines, tables and plots name a grid's point.
pub fn point_name(rank: usize, targets: &str, curvature: Option<&str>) -> String {
    match curvature {
        Some(c) => format!("{}, curvature {c}", shape_name(rank, targets)),
        None => shape_name(rank, targets),
    }
}

impl GridPoint {
    pub fn name(&self) -> String {
        point_name(self.rank, &self.targets, self.curvature.as_deref())
    }
}

impl GridShape {
    pub fn name(&self) -> String {
        point_name(self.rank, &self.targets, self.curvature.as_deref())
    }
}

/// One point of a grid sweep to run.
#[derive(Debug, Clone)]
pub struct GridEntry {
    pub cfg: LoraConfig,
    /// The name of its curvature where the grid compares several for one shape (the
    /// demo's data study): it names the point and its directory.
    pub curvature: Option<String>,
    /// Its own lambdas (`None`: the sweep's). In a grid over curvatures only one point
    /// needs lambda 0, plain LoRA being the same run under every curvature.
    pub lambdas: Option<Vec<f32>>,
}

impl GridEntry {
    /// A point of a grid over LoRA shapes, with the sweep's lambdas.
    pub fn shape(cfg: LoraConfig) -> Self {
        GridEntry {
            cfg,
            curvature: None,
            lambdas: None,
        }
    }

    pub fn name(&self) -> String {
        point_name(
            self.cfg.r,
            &targets_label(&self.cfg.targets),
            self.curvature.as_deref(),
        )
    }

    /// Its directory in the output: `r4-all`, `r4-q_proj+v_proj`, `r8-all-quac`.
    pub fn dir(&self) -> String {
        match &self.curvature {
            Some(c) => format!("{}-{c}", shape_dir(&self.cfg)),
            None => shape_dir(&self.cfg),
        }
    }
}

/// A grid sweep's plot of every shape's frontier.
pub const OVERLAY: &str = "frontier-overlay.svg";

/// The stages whose cost a grid sweep's CSV rows carry.
const COST_STAGES: [&str; 3] = ["curvature", "train", "eval"];

/// A shape's directory in the output: `r4-all`, `r4-q_proj+v_proj`.
pub fn shape_dir(cfg: &LoraConfig) -> String {
    format!(
        "r{}-{}",
        cfg.r,
        targets_label(&cfg.targets).replace(',', "+")
    )
}

/// The sweep for each point of `grid` (a combination of rank and target modules, and
/// perhaps a named curvature) from one evaluation of the base model: `prepare` makes each
/// point ready (given the point and its directory `out/<GridEntry::dir>`, which holds its
/// `runs/` and `frontier.svg`), then its lambdas run as in [`run`]. One report over all,
/// written to `out` with an overlay of every point's frontier.
pub fn run_grid<B: Backend>(
    be: &B,
    model: &Llama<B>,
    spec: &SweepSpec<'_>,
    grid: &[GridEntry],
    out: &Path,
    mut prepare: impl FnMut(&GridEntry, &Path) -> Result<Prepared<B>>,
    mut on_run: impl FnMut(&Row),
) -> Result<Report> {
    let (base, base_row) = evaluate_base(be, model, spec)?;
    on_run(&base_row);
    let mut rows = vec![base_row];
    let mut shapes = Vec::new();
    for (k, entry) in grid.iter().enumerate() {
        let label = format!("{} ({}/{})", entry.name(), k + 1, grid.len());
        let dir = out.join(entry.dir());
        // Every progress line of this point's work names it.
        let _scope = progress::scope(entry.name());
        let p = prepare(entry, &dir)?;
        let lambdas = entry.lambdas.as_deref().unwrap_or(&spec.lambdas);
        require_curvature(lambdas, p.penalty.is_some())?;
        let point = GridPoint {
            rank: entry.cfg.r,
            targets: targets_label(&entry.cfg.targets),
            curvature: entry.curvature.clone(),
            lora_params: p.init.n_params(),
            grid_pareto: false,
            shape: k,
        };
        let shape = Shape {
            penalty: p.penalty.as_deref(),
            init: &p.init,
            dir: &dir,
            lambdas,
            point: Some((point.clone(), label)),
        };
        let mut runs = train_lambdas(be, model, &shape, spec, &base, &mut on_run)?;
        // Within the shape, marked as its own sweep would mark it.
        mark_pareto(&mut runs, &base.weights);
        let mine: Vec<&Row> = runs.iter().collect();
        frontier_svg(
            &dir.join("frontier.svg"),
            &format!(", {}", entry.name()),
            &spec.target.name,
            &mine,
        )?;
        rows.extend(runs);
        shapes.push(GridShape {
            rank: point.rank,
            targets: point.targets,
            curvature: point.curvature,
            lora_params: point.lora_params,
            dir: entry.dir(),
            cost: SweepCost {
                curvature: p.curvature_cost,
                penalty_state_bytes: p.penalty.as_deref().and_then(Penalty::state_bytes),
            },
        });
    }
    let over_grid = pareto_flags(&rows, &base.weights);
    for (r, optimal) in rows.iter_mut().zip(over_grid) {
        if let Some(g) = &mut r.grid {
            g.grid_pareto = optimal;
        }
    }
    let report = Report {
        target: spec.target.name.clone(),
        sets: base.sets,
        rows,
        cost: SweepCost::default(),
        grid: shapes,
    };
    report.write(out)?;
    Ok(report)
}

/// `target-test (32 sequences, 190 predicted tokens), ...`
pub fn describe_sets(sets: &[SetInfo]) -> String {
    sets.iter()
        .map(|s| {
            format!(
                "{} ({} sequences, {} predicted tokens)",
                s.name, s.n_sequences, s.n_tokens
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Pareto marking that ignores differences within the noise. Between two trained runs i
/// and j, each axis compares them directly, paired over the same sequences: the
/// difference in learning (target set) and in forgetting (primary source), each with its
/// standard error (`paired_difference` of run j's losses against run i's). j beats i on
/// an axis when it is better by more than one standard error, and is no worse when it is
/// not worse by more than one. i is dominated when some j beats it on one axis and is no
/// worse on the other; the Pareto-optimal runs are those not dominated. With zero
/// standard errors this is the usual definition; within the noise two runs tie.
pub fn mark_pareto(rows: &mut [Row], weights: &[Vec<f64>]) {
    let optimal = pareto_flags(rows, weights);
    for (r, o) in rows.iter_mut().zip(optimal) {
        r.pareto = o;
    }
}

/// Which of `rows` are Pareto-optimal, as [`mark_pareto`] marks them.
fn pareto_flags(rows: &[Row], weights: &[Vec<f64>]) -> Vec<bool> {
    let trained: Vec<usize> = (0..rows.len())
        .filter(|&i| rows[i].lambda.is_some())
        .collect();
    // Positive when j is better than i: less target loss, less source loss.
    let gain = |i: usize, j: usize, set: usize| -> Option<Paired> {
        let (li, lj) = (rows[i].losses.get(set)?, rows[j].losses.get(set)?);
        Some(paired_difference(li, lj, weights.get(set)?))
    };
    let beats = |p: &Paired| p.diff > p.se;
    let no_worse = |p: &Paired| p.diff >= -p.se;
    let dominated: Vec<bool> = (0..rows.len())
        .map(|i| {
            trained.iter().any(|&j| {
                if j == i {
                    return false;
                }
                let learn = gain(i, j, 0);
                // Without a source, forgetting is zero for every run: a tie.
                let forget = gain(i, j, 1).unwrap_or(Paired { diff: 0.0, se: 0.0 });
                match learn {
                    Some(l) => (beats(&l) && no_worse(&forget)) || (beats(&forget) && no_worse(&l)),
                    None => false,
                }
            })
        })
        .collect();
    rows.iter()
        .zip(dominated)
        .map(|(r, d)| r.lambda.is_some() && !d)
        .collect()
}

/// `base`, `0 (LoRA)`, `1e1`: as the table, the plot and the status lines name a run.
pub fn lambda_label(l: Option<f32>) -> String {
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
        let md = format!(
            "{}\n{}\n{}",
            self.markdown(),
            self.notes().join("\n") + "\n",
            self.cost_markdown()
        );
        atomic_write(&out.join("results.md"), md.as_bytes())?;
        match self.grid.is_empty() {
            true => self.plot(&out.join("frontier.svg")),
            false => self.plot_overlay(&out.join(OVERLAY)),
        }
    }

    /// The files of the report: those `write` writes and, for a grid sweep, each shape's
    /// frontier plot (written as its runs end).
    pub fn paths(&self, out: &Path) -> Vec<PathBuf> {
        let plot = if self.grid.is_empty() {
            "frontier.svg"
        } else {
            OVERLAY
        };
        let mut paths: Vec<PathBuf> = ["results.md", "results.csv", "results.json", plot]
            .iter()
            .map(|f| out.join(f))
            .collect();
        paths.extend(
            self.grid
                .iter()
                .map(|g| out.join(&g.dir).join("frontier.svg")),
        );
        paths
    }

    /// The rows of shape `k` of a grid sweep; with `None`, the others (every row of a plain
    /// sweep, the base row of a grid sweep).
    fn rows_of(&self, k: Option<usize>) -> impl Iterator<Item = &Row> {
        self.rows
            .iter()
            .filter(move |r| r.grid.as_ref().map(|g| g.shape) == k)
    }

    /// `1e1`, or `r=4 all, 1e1` in a grid sweep.
    fn run_label(&self, r: &Row) -> String {
        match &r.grid {
            Some(g) => format!("{}, {}", g.name(), lambda_label(r.lambda)),
            None => lambda_label(r.lambda),
        }
    }

    fn cost_block<'a>(
        &'a self,
        k: Option<usize>,
        curvature: Option<(String, &'a StageCost)>,
    ) -> CostBlock<'a> {
        CostBlock {
            curvature,
            runs: self
                .rows_of(k)
                .map(|r| (self.run_label(r), r.lambda, r.cost.as_slice()))
                .collect(),
        }
    }

    /// The cost table: each run's stages, stage I first when it ran here; in a grid sweep
    /// the base model's, then each shape's (its stage I, then its runs).
    pub fn cost_markdown(&self) -> String {
        let stage1 = self.cost.curvature.as_ref().map(|c| ("stage I".into(), c));
        let mut blocks = vec![self.cost_block(None, stage1)];
        let mut penalty: Vec<(String, u64)> = self
            .cost
            .penalty_state_bytes
            .map(|b| (String::new(), b))
            .into_iter()
            .collect();
        for (k, g) in self.grid.iter().enumerate() {
            let name = g.name();
            let stage1 = g.cost.curvature.as_ref();
            blocks.push(self.cost_block(Some(k), stage1.map(|c| (format!("{name}: stage I"), c))));
            penalty.extend(g.cost.penalty_state_bytes.map(|b| (name, b)));
        }
        cost::markdown(&blocks, &penalty)
    }

    /// Whether the grid compares curvatures (its points name theirs).
    fn over_curvatures(&self) -> bool {
        self.grid.iter().any(|g| g.curvature.is_some())
    }

    /// A grid sweep's leading columns (rank, targets, and curvature in a grid over
    /// curvatures), as header and separator.
    fn lead_header(&self) -> (&'static str, &'static str) {
        match (self.grid.is_empty(), self.over_curvatures()) {
            (true, _) => ("", ""),
            (false, false) => ("| rank | targets ", "|---:|---"),
            (false, true) => ("| rank | targets | curvature ", "|---:|---|---"),
        }
    }

    /// A row's leading columns: its rank and targets (and curvature) in a grid sweep, blank
    /// for the base.
    fn lead(&self, r: &Row) -> String {
        if self.grid.is_empty() {
            return String::new();
        }
        let curvatures = self.over_curvatures();
        match &r.grid {
            Some(g) if curvatures => format!(
                "| {} | {} | {} ",
                g.rank,
                g.targets,
                g.curvature.as_deref().unwrap_or("")
            ),
            Some(g) => format!("| {} | {} ", g.rank, g.targets),
            None if curvatures => "| | | ".into(),
            None => "| | ".into(),
        }
    }

    /// A grid sweep's trailing CSV columns of a row: its Pareto flag over the grid, then
    /// wall time, tokens/s, GFLOP and peak RSS of each stage (stage I: its shape's, shared by
    /// the shape's rows).
    fn csv_tail(&self, r: &Row) -> String {
        let mut s = format!(",{}", r.grid.as_ref().is_some_and(|g| g.grid_pareto));
        for stage in COST_STAGES {
            let c = match (stage, &r.grid) {
                ("curvature", Some(g)) => self.grid[g.shape].cost.curvature.as_ref(),
                _ => r.cost.iter().find(|c| c.stage == stage),
            };
            s += &match c {
                Some(c) => format!(
                    ",{:.3},{:.1},{:.6},{:.1}",
                    c.wall_s,
                    c.tokens_per_s,
                    c.flops as f64 / 1e9,
                    c.peak_rss_mib
                ),
                None => ",,,,".into(),
            };
        }
        s
    }

    fn sources(&self) -> Vec<String> {
        self.rows
            .first()
            .map(|r| r.sources.iter().map(|s| s.name.clone()).collect())
            .unwrap_or_default()
    }

    fn choice_sets(&self) -> Vec<String> {
        self.rows
            .first()
            .map(|r| r.choice.iter().map(|c| c.name.clone()).collect())
            .unwrap_or_default()
    }

    pub fn csv(&self) -> String {
        let grid = !self.grid.is_empty();
        let curvatures = self.over_curvatures();
        let mut s = String::new();
        if grid {
            s += "rank,targets,";
            if curvatures {
                s += "curvature,";
            }
            s += "lora_params,";
        }
        s += "lambda,target_nll,learning,learning_se";
        for n in self.sources() {
            s += &format!(",{n}_nll,{n}_forgetting,{n}_forgetting_se");
        }
        for n in self.choice_sets() {
            for m in ["acc", "acc_norm"] {
                s += &format!(",{n}_{m},{n}_{m}_se,{n}_{m}_drop,{n}_{m}_drop_se");
            }
        }
        s += ",exact_match,exact_match_se,exact_match_gain,exact_match_gain_se";
        s += ",final_train_loss,pareto";
        if grid {
            s += ",grid_pareto";
            for st in COST_STAGES {
                s += &format!(",{st}_s,{st}_tokens_per_s,{st}_gflop,{st}_peak_rss_mib");
            }
        }
        s += "\n";
        for r in &self.rows {
            if grid {
                s += &match &r.grid {
                    // Quoted: a set of modules is comma-separated.
                    Some(g) => format!("{},\"{}\",", g.rank, g.targets),
                    None => ",,".into(),
                };
                if curvatures {
                    let c = r.grid.as_ref().and_then(|g| g.curvature.as_deref());
                    s += &format!("{},", c.unwrap_or(""));
                }
                s += &match &r.grid {
                    Some(g) => format!("{},", g.lora_params),
                    None => ",".into(),
                };
            }
            s += &format!(
                "{},{:.6},{:.6},{:.6}",
                r.lambda.map(|l| l.to_string()).unwrap_or("base".into()),
                r.target_nll,
                r.learning,
                r.learning_se
            );
            for x in &r.sources {
                s += &format!(",{:.6},{:.6},{:.6}", x.nll, x.forgetting, x.forgetting_se);
            }
            for c in &r.choice {
                s += &format!(
                    ",{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6}",
                    c.acc,
                    c.acc_se,
                    c.acc_drop,
                    c.acc_drop_se,
                    c.acc_norm,
                    c.acc_norm_se,
                    c.acc_norm_drop,
                    c.acc_norm_drop_se
                );
            }
            let em = r
                .exact_match
                .as_ref()
                .map(|e| {
                    format!(
                        "{:.6},{:.6},{:.6},{:.6}",
                        e.accuracy, e.accuracy_se, e.gain, e.gain_se
                    )
                })
                .unwrap_or(",,,".into());
            let fl = r
                .final_train_loss
                .map(|l| format!("{l:.6}"))
                .unwrap_or_default();
            s += &format!(",{em},{fl},{}", r.pareto);
            if grid {
                s += &self.csv_tail(r);
            }
            s += "\n";
        }
        s
    }

    /// The table; each learning and forgetting figure is followed by its ± column.
    pub fn markdown(&self) -> String {
        let (lead, lead_sep) = self.lead_header();
        let grid = !self.grid.is_empty();
        let mut s = format!("{lead}| lambda | {} NLL | learning | ± |", self.target);
        let mut sep = format!("{lead_sep}|---:|---:|---:|---:|");
        for n in self.sources() {
            s += &format!(" {n} NLL | forgetting ({n}) | ± |");
            sep += "---:|---:|---:|";
        }
        s += if grid {
            " Pareto | grid Pareto |\n"
        } else {
            " Pareto |\n"
        };
        s += &sep;
        s += if grid { "---|---|\n" } else { "---|\n" };
        for r in &self.rows {
            s += &format!(
                "{}| {} | {:.4} | {:+.4} | {:.4} |",
                self.lead(r),
                lambda_label(r.lambda),
                r.target_nll,
                r.learning,
                r.learning_se
            );
            for x in &r.sources {
                s += &format!(
                    " {:.4} | {:+.4} | {:.4} |",
                    x.nll, x.forgetting, x.forgetting_se
                );
            }
            s += if r.pareto { " * |" } else { " |" };
            if grid {
                let optimal = r.grid.as_ref().is_some_and(|g| g.grid_pareto);
                s += if optimal { " * |" } else { " |" };
            }
            s += "\n";
        }
        s + &self.accuracy_markdown()
    }

    /// The accuracy table (empty without multiple-choice sets or exact match): exact
    /// match and its gain (learning), each set's acc and acc_norm and their drops
    /// (forgetting), each figure followed by its ± column.
    fn accuracy_markdown(&self) -> String {
        let has_em = self.rows.iter().any(|r| r.exact_match.is_some());
        let sets = self.choice_sets();
        if !has_em && sets.is_empty() {
            return String::new();
        }
        let (lead, lead_sep) = self.lead_header();
        let mut s = format!("\n{lead}| lambda |");
        let mut sep = format!("{lead_sep}|---:|");
        if has_em {
            s += " exact match | ± | gain | ± |";
            sep += "---:|---:|---:|---:|";
        }
        for n in &sets {
            s += &format!(" {n} acc | ± | drop | ± | {n} acc_norm | ± | drop | ± |");
            sep += "---:|---:|---:|---:|---:|---:|---:|---:|";
        }
        s += "\n";
        s += &sep;
        s += "\n";
        for r in &self.rows {
            s += &format!("{}| {} |", self.lead(r), lambda_label(r.lambda));
            if let Some(e) = &r.exact_match {
                s += &format!(
                    " {:.4} | {:.4} | {:+.4} | {:.4} |",
                    e.accuracy, e.accuracy_se, e.gain, e.gain_se
                );
            }
            for c in &r.choice {
                s += &format!(
                    " {:.4} | {:.4} | {:+.4} | {:.4} | {:.4} | {:.4} | {:+.4} | {:.4} |",
                    c.acc,
                    c.acc_se,
                    c.acc_drop,
                    c.acc_drop_se,
                    c.acc_norm,
                    c.acc_norm_se,
                    c.acc_norm_drop,
                    c.acc_norm_drop_se
                );
            }
            s += "\n";
        }
        s
    }

    /// What the table means and what its figures rest on.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = vec![
            "learning = drop of the target NLL, forgetting = rise of a source NLL, both from \
             the base model, in nats per predicted token; ± = one standard error over the \
             set's sequences, from per-sequence differences paired with the base model"
                .to_string(),
            format!("sets: {}", describe_sets(&self.sets)),
            "* = Pareto-optimal: no other run learns more by over one standard error without \
             forgetting more (primary source) by over one, or forgets less by over one without \
             learning less by over one (each difference paired between the two runs)"
                .to_string(),
        ];
        if !self.accuracy_markdown().is_empty() {
            notes.push(
                "second table: exact match (learning; gain = run minus base) and multiple-choice \
                 acc / acc_norm as lm-eval scores them (forgetting; drop = base minus run), on \
                 the first n questions of each file; the ± after an accuracy is its binomial \
                 standard error, after a gain or drop that of the per-question differences \
                 paired with the base model; the Pareto marking uses the NLL figures only"
                    .to_string(),
            );
        }
        if self.over_curvatures() {
            notes.push(format!(
                "grid over curvatures: rank, targets and curvature give each run's point; a \
                 point's runs are those a plain sweep of that shape with that curvature makes \
                 (from the same base-model figures and the same init), and plain LoRA (lambda \
                 0) runs once, being the same under every curvature; * marks the \
                 Pareto-optimal runs within their point, grid Pareto those among every run of \
                 the grid; plots: <point>/frontier.svg for each point, {OVERLAY} for all (a \
                 colour per point; a point filled where Pareto-optimal over the grid)"
            ));
        } else if !self.grid.is_empty() {
            notes.push(format!(
                "grid: rank and targets give each run's LoRA shape; a shape's runs are those a \
                 plain sweep of that shape makes (from the same base-model figures); * marks \
                 the Pareto-optimal runs within their shape, grid Pareto those among every run \
                 of the grid; plots: <shape>/frontier.svg for each shape, {OVERLAY} for all \
                 (a colour per shape; a point filled where Pareto-optimal over the grid)"
            ));
        }
        notes
    }

    /// Learning (y) against forgetting on the primary source (x), one point per lambda.
    pub fn plot(&self, path: &Path) -> Result<()> {
        let rows: Vec<&Row> = self.rows.iter().collect();
        frontier_svg(path, "", &self.target, &rows)
    }

    /// Every shape's frontier of a grid sweep on one plot, a colour each; a point is filled
    /// where it is Pareto-optimal over the whole grid.
    pub fn plot_overlay(&self, path: &Path) -> Result<()> {
        let series: Vec<Series<'_>> = self
            .grid
            .iter()
            .enumerate()
            .map(|(k, g)| Series {
                name: g.name(),
                color: PALETTE[k % PALETTE.len()],
                rows: self.rows_of(Some(k)).collect(),
                // Each shape's path through the lambdas, to follow it among the others.
                front: false,
            })
            .collect();
        let src = self.sources().first().cloned().unwrap_or_default();
        let what = match self.over_curvatures() {
            true => "grid points",
            false => "LoRA shapes",
        };
        let caption = format!(
            "LaLoRA: learning vs forgetting ({} vs {src}), {} {what}",
            self.target,
            self.grid.len()
        );
        let filled = Some("filled: Pareto-optimal over the grid");
        draw_frontiers(
            path,
            &caption,
            (&self.target, &src),
            &series,
            filled,
            |r, c| {
                if r.grid.as_ref().is_some_and(|g| g.grid_pareto) {
                    c.filled()
                } else {
                    c.stroke_width(2)
                }
            },
        )
    }
}

/// Colours of the overlay's shapes, in turn (matplotlib's tab10).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One sweep's trained runs on a frontier plot, in one colour.
struct Series<'a> {
    /// The legend entry of its line.
    name: String,
    color: RGBColor,
    rows: Vec<&'a Row>,
    /// The line joins the Pareto-optimal runs (`pareto`), else every run in lambda order.
    front: bool,
}

/// Forgetting on the primary source (0 without one): a run's x on the frontier plot.
fn forgetting(r: &Row) -> f64 {
    r.sources.first().map(|s| s.forgetting).unwrap_or(0.0)
}

/// The frontier of one sweep's `rows` (the base row is left out), Pareto-optimal points in
/// red; `caption_suffix` names the shape of a grid sweep's.
fn frontier_svg(path: &Path, caption_suffix: &str, target: &str, rows: &[&Row]) -> Result<()> {
    let src = rows
        .first()
        .and_then(|r| r.sources.first())
        .map(|s| s.name.as_str())
        .unwrap_or_default();
    let series = [Series {
        name: "Pareto front".into(),
        color: RED,
        rows: rows
            .iter()
            .filter(|r| r.lambda.is_some())
            .copied()
            .collect(),
        front: true,
    }];
    let caption = format!("LaLoRA: learning vs forgetting ({target} vs {src}){caption_suffix}");
    draw_frontiers(path, &caption, (target, src), &series, None, |r, _| {
        if r.pareto {
            RED.filled()
        } else {
            BLUE.filled()
        }
    })
}

/// Learning (y) against forgetting on the primary source (x): each series' points, with
/// error bars and lambda labels, and its line; `sets` names the target and the primary
/// source; `point` styles a run's point given its series' colour, and `filled` says in the
/// legend what a filled point means, when it means more than the colour.
fn draw_frontiers(
    path: &Path,
    caption: &str,
    (target, src): (&str, &str),
    series: &[Series<'_>],
    filled: Option<&str>,
    point: impl Fn(&Row, RGBColor) -> ShapeStyle,
) -> Result<()> {
    let pts: Vec<(f64, f64, &Row, RGBColor)> = series
        .iter()
        .flat_map(|s| {
            s.rows
                .iter()
                .map(move |r| (forgetting(r), r.learning, *r, s.color))
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
    // One standard error either way on each axis; finite only (n >= 2 sequences).
    let se = |v: f64| if v.is_finite() { v } else { 0.0 };
    let bars: Vec<(f64, f64, f64, f64)> = pts
        .iter()
        .map(|p| {
            let xse = p.2.sources.first().map(|s| se(s.forgetting_se));
            (p.0, p.1, xse.unwrap_or(0.0), se(p.2.learning_se))
        })
        .collect();
    let xr = span(bars.iter().flat_map(|b| [b.0 - b.2, b.0 + b.2]).collect());
    let yr = span(bars.iter().flat_map(|b| [b.1 - b.3, b.1 + b.3]).collect());
    let (xr_len, yr_len) = (xr.end - xr.start, yr.end - yr.start);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 18))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(xr, yr)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc(format!("forgetting: rise of {src} NLL (nats/token)"))
            .y_desc(format!("learning: drop of {target} NLL"))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for s in series {
            let mut line: Vec<&Row> = s
                .rows
                .iter()
                .filter(|r| r.pareto || !s.front)
                .copied()
                .collect();
            match s.front {
                true => line.sort_by(|a, b| forgetting(a).total_cmp(&forgetting(b))),
                false => {
                    line.sort_by(|a, b| a.lambda.partial_cmp(&b.lambda).unwrap_or(Ordering::Equal))
                }
            }
            let line = line.iter().map(|r| (forgetting(r), r.learning));
            let color = s.color;
            chart
                .draw_series(LineSeries::new(line, color.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        let grey = RGBColor(110, 110, 110);
        chart
            .draw_series(bars.iter().flat_map(|&(x, y, xse, yse)| {
                [
                    PathElement::new(vec![(x - xse, y), (x + xse, y)], grey.stroke_width(1)),
                    PathElement::new(vec![(x, y - yse), (x, y + yse)], grey.stroke_width(1)),
                ]
            }))
            .map_err(|e| err(e.to_string()))?
            .label("± 1 standard error")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], grey));
        if let Some(text) = filled {
            chart
                .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                .map_err(|e| err(e.to_string()))?
                .label(text)
                .legend(|(x, y)| Circle::new((x + 8, y), 5, BLACK.filled()));
        }
        // Points closer than ~3% of the plot share a spot: stack their labels.
        let (w, h) = (xr_len.max(1e-12), yr_len.max(1e-12));
        let mut placed: Vec<(f64, f64)> = Vec::new();
        let labelled: Vec<(f64, f64, &Row, RGBColor, i32)> = pts
            .iter()
            .map(|p| {
                let near = placed
                    .iter()
                    .filter(|q| ((p.0 - q.0) / w).abs() < 0.03 && ((p.1 - q.1) / h).abs() < 0.03)
                    .count();
                placed.push((p.0, p.1));
                (p.0, p.1, p.2, p.3, -12 + 14 * near as i32)
            })
            .collect();
        chart
            .draw_series(labelled.iter().map(|p| {
                EmptyElement::at((p.0, p.1))
                    + Circle::new((0, 0), 5, point(p.2, p.3))
                    + Text::new(
                        format!("λ={}", lambda_label(p.2.lambda)),
                        (7, p.4),
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
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trained run with these per-sequence losses on the target set and one source.
    fn run(lambda: f32, target: &[f64], source: &[f64]) -> Row {
        Row {
            lambda: Some(lambda),
            target_nll: 0.0,
            learning: 0.0,
            learning_se: 0.0,
            sources: Vec::new(),
            choice: Vec::new(),
            exact_match: None,
            final_train_loss: None,
            pareto: false,
            seconds: 0.0,
            cost: Vec::new(),
            grid: None,
            losses: vec![target.to_vec(), source.to_vec()],
        }
    }

    fn pareto(rows: &mut [Row]) -> Vec<bool> {
        let n = rows[0].losses[0].len();
        mark_pareto(rows, &[vec![1.0; n], vec![1.0; n]]);
        rows.iter().map(|r| r.pareto).collect()
    }

    #[test]
    fn pareto_marking_treats_differences_within_one_standard_error_as_ties() {
        // Run 0 has the lowest target loss, but only by noise: its per-sequence
        // differences from run 1 are +-0.5 around a mean of 0.05. Run 1 forgets less by a
        // consistent 1.0 per sequence. An exact comparison would keep both; within the
        // noise run 1 learns as much and forgets less, so it alone is optimal.
        let t1 = [5.0, 5.0, 5.0, 5.0];
        let t0 = [4.4, 5.5, 4.5, 5.4];
        let mut rows = vec![run(0.0, &t0, &[3.0; 4]), run(10.0, &t1, &[2.0; 4])];
        assert_eq!(pareto(&mut rows), [false, true]);
        // Without that tie (run 0 better on every sequence) both are optimal.
        let mut rows = vec![run(0.0, &[4.0; 4], &[3.0; 4]), run(10.0, &t1, &[2.0; 4])];
        assert_eq!(pareto(&mut rows), [true, true]);
    }

    #[test]
    fn pareto_marking_never_drops_a_run_for_a_difference_within_the_noise() {
        // Run 1 learns less on average and forgets the same, but only by noise: both stay.
        let mut rows = vec![
            run(0.0, &[4.0, 5.0, 4.0, 5.0], &[2.0; 4]),
            run(10.0, &[5.0, 4.0, 5.0, 4.1], &[2.0; 4]),
        ];
        assert_eq!(pareto(&mut rows), [true, true]);
        // A clear loss on learning with equal forgetting is dominated; the base row
        // (no lambda) is never marked.
        let mut rows = vec![
            run(0.0, &[4.0; 4], &[2.0; 4]),
            run(10.0, &[5.0, 5.1, 5.0, 5.1], &[2.0; 4]),
        ];
        rows[0].lambda = None;
        assert_eq!(pareto(&mut rows), [false, true]);
        let mut rows = vec![
            run(0.0, &[4.0; 4], &[2.0; 4]),
            run(10.0, &[5.0, 5.1, 5.0, 5.1], &[2.0; 4]),
        ];
        assert_eq!(pareto(&mut rows), [true, false]);
    }
}
