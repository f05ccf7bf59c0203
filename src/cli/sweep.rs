//! `sweep`: train at several lambdas from the same init and data order, and report the
//! learning-forgetting frontier.

use std::path::PathBuf;

use clap::Args;

use super::train::HyperArgs;
use super::{Common, DataArgs, LoraArgs, ModelArgs, load_data, load_model, print_json};
use crate::backend::Backend;
use crate::backend::device::{BackendTask, run_on};
use crate::curvature::Curvature;
use crate::data::Example;
use crate::error::{Error, Result};
use crate::eval::choice::read_choices;
use crate::eval::exact_match::read_qa;
use crate::eval::generate::Sampling;
use crate::model::{HostLora, Llama, LoadedModel};
use crate::progress;
use crate::sweep::{
    self, ChoiceSet, DEFAULT_LAMBDAS, EvalSet, ExactMatchSet, Report, Row, SweepSpec,
};
use crate::train::TrainConfig;

#[derive(Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Target-domain training JSONL.
    #[arg(long)]
    pub data: PathBuf,
    /// Curvature file (training starts at its theta*).
    #[arg(long)]
    pub curvature: Option<PathBuf>,
    /// Comma-separated lambdas (default: 0,1,3,10,30,100,1e3,1e4,1e5).
    #[arg(long)]
    pub lambdas: Option<String>,
    /// Prior precision delta.
    #[arg(long, default_value_t = 1e-6)]
    pub delta: f32,
    /// Held-out target JSONL: learning is the drop of its NLL.
    #[arg(long)]
    pub target_eval: PathBuf,
    /// Source JSONL files: forgetting is the rise of their NLL (the first is primary).
    #[arg(long, required = true, num_args = 1..)]
    pub source_eval: Vec<PathBuf>,
    /// Rows used from each evaluation file (at least 2: the standard errors are over rows).
    #[arg(long, default_value_t = 64)]
    pub eval_limit: usize,
    /// Multiple-choice JSONL files (rows as `eval --choice` reads them): forgetting also as
    /// the drop of acc and acc_norm from the base model, with paired standard errors.
    #[arg(long, num_args = 1..)]
    pub choice_eval: Vec<PathBuf>,
    /// Questions used from each --choice-eval file (at least 2).
    #[arg(long, default_value_t = 100)]
    pub choice_limit: usize,
    /// Question/answer JSONL (GSM8K-style): learning also as the exact-match gain over the
    /// base model, with its paired standard error (slow: generation).
    #[arg(long, alias = "exact-match")]
    pub exact_match_eval: Option<PathBuf>,
    /// Questions used for exact match (at least 2).
    #[arg(long, default_value_t = 50)]
    pub exact_match_limit: usize,
    /// Tokens generated per exact-match answer.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Output directory: results.{csv,json,md}, frontier.svg, runs/.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub hyper: HyperArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub batching: DataArgs,
    #[command(flatten)]
    pub common: Common,
}

pub struct SweepTask {
    pub model: LoadedModel,
    pub curvature: Option<Curvature>,
    /// Where training starts when there is no curvature file.
    pub init: HostLora,
    pub lambdas: Vec<f32>,
    pub train: TrainConfig,
    pub train_data: Vec<Example>,
    pub target: EvalSet,
    pub sources: Vec<EvalSet>,
    pub choices: Vec<ChoiceSet>,
    pub exact_match: Option<ExactMatchSet>,
    pub eval_batch: usize,
    pub quiet: bool,
    pub out: PathBuf,
}

impl SweepTask {
    /// Run the sweep on a model already on the device (its weights taken from
    /// `self.model`), with the penalty of `curvature`, starting at its theta* (or at
    /// `self.init` without one).
    pub fn sweep_on<B: Backend>(
        self,
        be: &B,
        model: &Llama<B>,
        curvature: Option<&Curvature>,
    ) -> Result<Report> {
        let init = curvature.map(|c| &c.mean).unwrap_or(&self.init);
        let tok = match (&self.exact_match, self.choices.is_empty()) {
            (None, true) => None,
            _ => Some(self.model.tokenizer()?),
        };
        let spec = SweepSpec {
            lambdas: self.lambdas,
            train: self.train,
            train_data: &self.train_data,
            target: self.target,
            sources: self.sources,
            choices: self.choices,
            exact_match: self.exact_match,
            tokenizer: tok,
            eval_batch: self.eval_batch,
            quiet: self.quiet,
            base_model: self.model.path.display().to_string(),
        };
        let quiet = self.quiet;
        sweep::run(be, model, curvature, init, &spec, &self.out, |row| {
            if !quiet {
                eprintln!("{}", status_line(row));
            }
        })
    }
}

/// `lambda 1e1: learning +1.5013 ± 0.0123 (target NLL 1.1338), forgetting source-test
/// -0.0048 ± 0.0021, ...; took 142s`: a run's figures as they come, labelled.
fn status_line(row: &Row) -> String {
    let mut s = match row.lambda {
        Some(l) => format!("lambda {}: ", sweep::lambda_label(Some(l))),
        None => "base model: ".to_string(),
    };
    if row.lambda.is_some() {
        s += &format!(
            "learning {:+.4} ± {:.4} (target NLL {:.4})",
            row.learning, row.learning_se, row.target_nll
        );
        for x in &row.sources {
            s += &format!(
                ", forgetting {} {:+.4} ± {:.4}",
                x.name, x.forgetting, x.forgetting_se
            );
        }
    } else {
        s += &format!("target NLL {:.4}", row.target_nll);
        for x in &row.sources {
            s += &format!(", {} NLL {:.4}", x.name, x.nll);
        }
    }
    if let Some(e) = &row.exact_match {
        s += &format!(", exact match {}/{}", e.correct, e.n);
        if row.lambda.is_some() {
            s += &format!(" (gain {:+.4} ± {:.4})", e.gain, e.gain_se);
        }
    }
    for c in &row.choice {
        s += &format!(", {} acc {:.4} acc_norm {:.4}", c.name, c.acc, c.acc_norm);
        if row.lambda.is_some() {
            s += &format!(
                " (drop {:+.4} ± {:.4}, acc_norm drop {:+.4} ± {:.4})",
                c.acc_drop, c.acc_drop_se, c.acc_norm_drop, c.acc_norm_drop_se
            );
        }
    }
    s + &format!("; took {}", progress::duration(row.seconds))
}

impl BackendTask for SweepTask {
    type Output = Report;
    fn run<B: Backend>(mut self, be: &B) -> Result<Report> {
        let model = Llama::new(be, self.model.cfg.clone(), self.model.take_weights())?;
        let curvature = self.curvature.take();
        self.sweep_on(be, &model, curvature.as_ref())
    }
}

pub fn eval_set(
    path: &std::path::Path,
    m: &LoadedModel,
    d: &DataArgs,
    limit: usize,
) -> Result<EvalSet> {
    let mut examples = load_data(path, m, d)?;
    examples.truncate(limit);
    // A standard error needs the spread between at least two sequences.
    if examples.len() < 2 {
        return Err(Error::file(
            path,
            format!(
                "{} sequence to evaluate; a standard error needs at least 2 (more rows, or a larger --eval-limit / --eval-sequences)",
                examples.len()
            ),
        ));
    }
    Ok(EvalSet {
        name: stem(path),
        examples,
    })
}

/// The first `limit` questions of a multiple-choice file, named by its stem.
pub fn choice_set(path: &std::path::Path, limit: usize) -> Result<ChoiceSet> {
    let mut rows = read_choices(path)?;
    rows.truncate(limit);
    at_least_two(path, rows.len(), "question")?;
    Ok(ChoiceSet {
        name: stem(path),
        path: path.to_path_buf(),
        rows,
    })
}

/// The first `limit` question/answer pairs of a file, answered greedily.
pub fn exact_match_set(
    path: &std::path::Path,
    limit: usize,
    max_new_tokens: usize,
) -> Result<ExactMatchSet> {
    let mut rows = read_qa(path)?;
    rows.truncate(limit);
    at_least_two(path, rows.len(), "question")?;
    Ok((
        rows,
        Sampling {
            max_new_tokens,
            ..Sampling::default()
        },
    ))
}

/// A standard error needs the spread between at least two units.
fn at_least_two(path: &std::path::Path, n: usize, unit: &str) -> Result<()> {
    if n < 2 {
        return Err(Error::file(
            path,
            format!("{n} {unit} to evaluate; a standard error needs at least 2"),
        ));
    }
    Ok(())
}

fn stem(path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub fn print_report(r: &Report, out: &std::path::Path, json: bool) {
    if json {
        print_json(&serde_json::to_value(r).unwrap_or_default());
    } else {
        print!("{}", r.markdown());
        for n in r.notes() {
            println!("({n})");
        }
        print!("\n{}", r.cost_markdown());
        for p in sweep::results_paths(out) {
            println!("wrote {}", p.display());
        }
    }
}

pub fn run(a: SweepArgs) -> Result<()> {
    let m = load_model(&a.model)?;
    let curvature = a
        .curvature
        .as_deref()
        .map(|p| Curvature::read_for(p, &m))
        .transpose()?;
    if let (Some(c), Some(p)) = (&curvature, &a.curvature) {
        a.lora.agree_with(&c.mean.cfg, p)?;
    }
    let init = HostLora::init(&m.cfg, a.lora.config(&m.cfg)?, a.common.seed);
    let lambdas = match &a.lambdas {
        Some(s) => sweep::parse_lambdas(s)?,
        None => DEFAULT_LAMBDAS.to_vec(),
    };
    let exact_match = a
        .exact_match_eval
        .as_deref()
        .map(|p| exact_match_set(p, a.exact_match_limit, a.max_new_tokens))
        .transpose()?;
    let choices = a
        .choice_eval
        .iter()
        .map(|p| choice_set(p, a.choice_limit))
        .collect::<Result<Vec<_>>>()?;
    if exact_match.is_some() || !choices.is_empty() {
        // Before any training: a model without a tokenizer cannot score text.
        m.tokenizer()?;
    }
    // --json owns stdout only: progress stays on stderr unless --quiet.
    let quiet = a.common.quiet;
    let task = SweepTask {
        curvature,
        init,
        lambdas,
        train: a
            .hyper
            .config(a.batching.batch_size, a.common.seed, 0.0, a.delta),
        train_data: load_data(&a.data, &m, &a.batching)?,
        target: eval_set(&a.target_eval, &m, &a.batching, a.eval_limit)?,
        sources: a
            .source_eval
            .iter()
            .map(|p| eval_set(p, &m, &a.batching, a.eval_limit))
            .collect::<Result<_>>()?,
        choices,
        exact_match,
        eval_batch: a.batching.batch_size,
        quiet,
        out: a.out.clone(),
        model: m,
    };
    let report = run_on(a.common.placement(quiet), task)?;
    print_report(&report, &a.out, a.common.json);
    Ok(())
}
