//! The learning-forgetting sweep (DESIGN §7): for each lambda, stage II from the same
//! init and data order; learning = drop of the target NLL from the base model, forgetting
//! = rise of each source NLL from the base model, each with the standard error of its
//! per-sequence paired differences (`eval::paired`). Optionally also forgetting as the
//! accuracy drop on multiple-choice sets and learning as the exact-match gain, each paired
//! over the questions with the same function (unit weights). Writes `results.csv`,
//! `results.json`, `results.md` and `frontier.svg` (Pareto-optimal points, on the NLL
//! figures, marked; error bars drawn).

use std::path::{Path, PathBuf};
use std::time::Instant;

use plotters::prelude::*;
use serde::Serialize;

use crate::backend::Backend;
use crate::cost::{self, Flops, Meter, StageCost, SweepCost, penalty_state_bytes};
use crate::curvature::Curvature;
use crate::data::Example;
use crate::error::{Error, Result};
use crate::eval::choice::{ChoiceRow, ChoiceScores, accuracy, choice_logliks, score};
use crate::eval::exact_match::{ExactMatch, exact_match};
use crate::eval::generate::Sampling;
use crate::eval::paired::{Paired, paired_difference};
use crate::eval::perplexity::sequence_losses;
use crate::io::atomic_write;
use crate::model::{HostLora, Llama, LoraWeights};
use crate::progress;
use crate::tokenizer::Tokenizer;
use crate::train::TrainConfig;
use crate::train::session::{self, SessionOptions};

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
    /// Summed loss of every sequence of each set (target first, then the sources): what
    /// the paired standard errors between any two rows are computed from.
    #[serde(skip)]
    pub losses: Vec<Vec<f64>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    /// The target set, then the sources.
    pub sets: Vec<SetInfo>,
    pub rows: Vec<Row>,
    pub cost: SweepCost,
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
        losses,
    }
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
    let say = |msg: String| {
        if !spec.quiet {
            eprintln!("sweep: {msg}");
        }
    };
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
    say(format!("evaluating the base model on {on}"));
    let flops = Flops::new(&model.cfg, init);
    // The NLL sets' tokens and FLOPs; choice scoring and generation add only time.
    let (eval_tokens, eval_flops) = spec.sets().fold((0, 0), |(t, f), s| {
        let (t1, f1) = flops.evaluation(&s.examples, spec.eval_batch);
        (t + t1, f + f1)
    });
    let meter = Meter::start("eval");
    let base_ev = evaluate(be, model, None, spec)?;
    let mut base = row(None, base_ev.clone(), &base_ev, &weights, spec);
    base.cost = vec![meter.finish(eval_tokens, eval_flops)];
    base.seconds = t0.elapsed().as_secs_f64();
    on_run(&base);
    let mut rows = vec![base];
    for (i, &lambda) in spec.lambdas.iter().enumerate() {
        let t0 = Instant::now();
        say(format!(
            "lambda {} ({}/{}): training {} steps, then evaluating",
            lambda_label(Some(lambda)),
            i + 1,
            spec.lambdas.len(),
            spec.train.steps
        ));
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
        let meter = Meter::start("train");
        let res = session::run(be, model, spec.train_data, &cfg, curvature, init, &opts)?;
        let (tokens, train_flops) = flops.training(spec.train_data, &cfg, curvature, 0, cfg.steps);
        let train_cost = meter.finish(tokens, train_flops);
        let lora = res.lora.map(|v| be.buf(v.clone()))?;
        let meter = Meter::start("eval");
        let ev = evaluate(be, model, Some(&lora), spec)?;
        let mut r = row(Some(lambda), ev, &base_ev, &weights, spec);
        r.cost = vec![train_cost, meter.finish(eval_tokens, eval_flops)];
        r.final_train_loss = res.metrics.last().map(|m| m.loss);
        r.seconds = t0.elapsed().as_secs_f64();
        on_run(&r);
        rows.push(r);
    }
    mark_pareto(&mut rows, &weights);
    let report = Report {
        target: spec.target.name.clone(),
        sets,
        rows,
        cost: SweepCost {
            curvature: None,
            penalty_state_bytes: curvature.map(penalty_state_bytes),
        },
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
    for (i, r) in rows.iter_mut().enumerate() {
        r.pareto = r.lambda.is_some() && !dominated[i];
    }
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
        self.plot(&out.join("frontier.svg"))
    }

    /// The cost table: each run's stages, stage I first when it ran here.
    pub fn cost_markdown(&self) -> String {
        let runs: Vec<_> = self
            .rows
            .iter()
            .map(|r| (lambda_label(r.lambda), r.lambda, r.cost.as_slice()))
            .collect();
        cost::markdown(
            self.cost.curvature.as_ref(),
            &runs,
            self.cost.penalty_state_bytes,
        )
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
        let mut s = String::from("lambda,target_nll,learning,learning_se");
        for n in self.sources() {
            s += &format!(",{n}_nll,{n}_forgetting,{n}_forgetting_se");
        }
        for n in self.choice_sets() {
            for m in ["acc", "acc_norm"] {
                s += &format!(",{n}_{m},{n}_{m}_se,{n}_{m}_drop,{n}_{m}_drop_se");
            }
        }
        s += ",exact_match,exact_match_se,exact_match_gain,exact_match_gain_se";
        s += ",final_train_loss,pareto\n";
        for r in &self.rows {
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
            s += &format!(",{em},{fl},{}\n", r.pareto);
        }
        s
    }

    /// The table; each learning and forgetting figure is followed by its ± column.
    pub fn markdown(&self) -> String {
        let mut s = format!("| lambda | {} NLL | learning | ± |", self.target);
        let mut sep = String::from("|---:|---:|---:|---:|");
        for n in self.sources() {
            s += &format!(" {n} NLL | forgetting ({n}) | ± |");
            sep += "---:|---:|---:|";
        }
        s += " Pareto |\n";
        s += &sep;
        s += "---|\n";
        for r in &self.rows {
            s += &format!(
                "| {} | {:.4} | {:+.4} | {:.4} |",
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
            s += if r.pareto { " * |\n" } else { " |\n" };
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
        let mut s = String::from("\n| lambda |");
        let mut sep = String::from("|---:|");
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
            s += &format!("| {} |", lambda_label(r.lambda));
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
        notes
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
