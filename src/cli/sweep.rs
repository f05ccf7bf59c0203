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
use crate::eval::exact_match::read_qa;
use crate::eval::generate::Sampling;
use crate::model::{HostLora, Llama, LoadedModel};
use crate::progress;
use crate::sweep::{self, DEFAULT_LAMBDAS, EvalSet, Report, Row, SweepSpec};
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
    /// Also measure exact-match accuracy on this question/answer JSONL (slow: generation).
    #[arg(long)]
    pub exact_match: Option<PathBuf>,
    /// Questions used for exact match.
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
    pub exact_match: Option<(Vec<(String, String)>, Sampling)>,
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
        let tok = match &self.exact_match {
            Some(_) => Some(self.model.tokenizer()?),
            None => None,
        };
        let spec = SweepSpec {
            lambdas: self.lambdas,
            train: self.train,
            train_data: &self.train_data,
            target: self.target,
            sources: self.sources,
            exact_match: match (tok, self.exact_match) {
                (Some(t), Some((rows, s))) => Some((t, rows, s)),
                _ => None,
            },
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
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(EvalSet { name, examples })
}

pub fn print_report(r: &Report, out: &std::path::Path, json: bool) {
    if json {
        print_json(&serde_json::to_value(r).unwrap_or_default());
    } else {
        print!("{}", r.markdown());
        for n in r.notes() {
            println!("({n})");
        }
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
    let exact_match = match &a.exact_match {
        Some(p) => {
            let mut rows = read_qa(p)?;
            rows.truncate(a.exact_match_limit);
            Some((
                rows,
                Sampling {
                    max_new_tokens: a.max_new_tokens,
                    ..Sampling::default()
                },
            ))
        }
        None => None,
    };
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
