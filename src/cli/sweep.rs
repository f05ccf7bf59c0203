//! `sweep`: train at several lambdas from the same init and data order, and report the
//! learning-forgetting frontier; with `--ranks`, a repeated `--targets` or
//! `--curvature-data`, for each LoRA shape of a grid.

use std::path::PathBuf;

use clap::{ArgGroup, Args};

use super::curvature::{EstimateArgs, Source, Stage1};
use super::study::{self, DataStudy, Study};
use super::train::HyperArgs;
use super::{Common, DataArgs, LoraArgs, ModelArgs, load_data, load_model, print_json, untargeted};
use crate::backend::Backend;
use crate::backend::device::{BackendTask, run_on};
use crate::curvature::Curvature;
use crate::data::Example;
use crate::error::{Error, Result};
use crate::eval::perplexity::require_targets;
use crate::model::{HostLora, Llama, LoadedModel, LoraConfig};
use crate::progress;
use crate::sweep::{
    self, ChoiceSet, DEFAULT_LAMBDAS, EvalSet, ExactMatchSet, GridEntry, Report, Row, SweepSpec,
};
use crate::train::{Penalty, TrainConfig};

mod grid;
mod sets;
use grid::{GridTask, check_fits, grid};
pub use sets::{choice_set, eval_set, exact_match_set};

/// A shape's curvature estimated by a grid sweep, in its directory.
pub(crate) const CURVATURE_FILE: &str = "curvature.safetensors";

#[derive(Args)]
// The estimation flags mean nothing without data to estimate on.
#[command(group(
    ArgGroup::new("estimation")
        .multiple(true)
        .args([
            "self_prompts", "self_tokens", "scheme", "fisher", "mc_samples", "kfac_approx",
            "warmup_steps", "warmup_data", "warmup_lr",
        ])
        .requires("curvature_data")
        // Said outright: a conflict of the required flag would silence the requirement.
        .conflicts_with("curvature")
))]
pub struct SweepArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Target-domain training JSONL.
    #[arg(long)]
    pub data: PathBuf,
    /// Curvature file (training starts at its theta*). A file fits one LoRA shape: in a
    /// grid sweep, every shape must be the file's (else exit 2).
    #[arg(long)]
    pub curvature: Option<PathBuf>,
    /// A grid over LoRA ranks, comma-separated (`4,8,16`): the lambdas run for each rank
    /// with each --targets set (repeat --targets for several), one row per run in one
    /// results table with rank and targets columns; each shape's runs and frontier.svg
    /// go to `<out>/r<rank>-<targets>/`, and frontier-overlay.svg shows them all.
    #[arg(long, value_name = "R,R,...", conflicts_with = "rank")]
    pub ranks: Option<String>,
    /// Estimate the curvature on this source-domain JSONL (or `self:N`) for each LoRA shape,
    /// at its fresh init (or after --warmup-steps), as the `curvature` command does with
    /// the flags below; each goes to `<out>/r<rank>-<targets>/curvature.safetensors`.
    /// Makes a grid sweep, of one shape without --ranks or a repeated --targets.
    #[arg(long, conflicts_with = "curvature")]
    pub curvature_data: Option<PathBuf>,
    /// `data`: the lambdas under four curvatures of one LoRA shape, to tell what the source
    /// data give the penalty: estimated on --curvature-data (a file), on as many sequences
    /// sampled from the base model (--self-tokens, --self-prompts), an isotropic one of the
    /// same trace, and none (delta only). One table with a curvature column; each
    /// curvature's runs under `<out>/r<rank>-<targets>-<curvature>/`. `lambda` (the
    /// default): the lambdas under one curvature.
    #[arg(long, value_enum)]
    pub study: Option<Study>,
    /// Comma-separated lambdas (default: 0,1,3,10,30,100,1e3,1e4,1e5).
    #[arg(long)]
    pub lambdas: Option<String>,
    /// Prior precision delta added to F/N.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1e-6)]
    pub delta: f32,
    /// Held-out target JSONL: learning is the drop of its NLL.
    #[arg(long)]
    pub target_eval: PathBuf,
    /// Source JSONL files: forgetting is the rise of their NLL (the first is primary).
    #[arg(long, required = true, num_args = 1..)]
    pub source_eval: Vec<PathBuf>,
    /// Rows used from each evaluation file (at least 2: the standard errors are over rows).
    #[arg(long, allow_negative_numbers = true, default_value_t = 64)]
    pub eval_limit: usize,
    /// Multiple-choice JSONL files (rows as `eval --choice` reads them): forgetting also as
    /// the drop of acc and acc_norm from the base model, with paired standard errors.
    #[arg(long, num_args = 1..)]
    pub choice_eval: Vec<PathBuf>,
    /// Questions used from each --choice-eval file (at least 2).
    #[arg(long, allow_negative_numbers = true, default_value_t = 100)]
    pub choice_limit: usize,
    /// Question/answer JSONL (GSM8K-style): learning also as the exact-match gain over the
    /// base model, with its paired standard error (slow: generation).
    #[arg(long, alias = "exact-match")]
    pub exact_match_eval: Option<PathBuf>,
    /// Questions used for exact match (at least 2).
    #[arg(long, allow_negative_numbers = true, default_value_t = 50)]
    pub exact_match_limit: usize,
    /// Tokens generated per exact-match answer.
    #[arg(long, allow_negative_numbers = true, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Output directory: results.{csv,json,md}, frontier.svg, runs/ (a grid sweep:
    /// frontier-overlay.svg and a directory per shape for the rest).
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
    #[command(
        flatten,
        next_help_heading = "Curvature estimation (with --curvature-data)"
    )]
    pub estimate: EstimateArgs,
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
        curvature: Option<Curvature>,
    ) -> Result<Report> {
        let (quiet, out) = (self.quiet, self.out.clone());
        let theta = curvature.as_ref().map(|c| c.mean.clone());
        let penalty = curvature
            .map(|c| Penalty::for_lambdas(be, c, self.train.delta, &self.lambdas))
            .transpose()?;
        self.with_spec(|spec, fresh, _| {
            let init = theta.as_ref().unwrap_or(fresh);
            sweep::run(be, model, penalty.as_ref(), init, spec, &out, status(quiet))
        })
    }

    /// Hand the sweep's spec to `f`, with the fresh init and the model's files.
    pub(crate) fn with_spec<R>(
        self,
        f: impl FnOnce(&SweepSpec<'_>, &HostLora, &LoadedModel) -> Result<R>,
    ) -> Result<R> {
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
        f(&spec, &self.init, &self.model)
    }
}

/// Each run's status line on stderr as it ends, unless quiet.
pub(crate) fn status(quiet: bool) -> impl FnMut(&Row) {
    move |row| {
        if !quiet {
            eprintln!("{}", status_line(row));
        }
    }
}

/// `lambda 1e1: learning +1.5013 ± 0.0123 (target NLL 1.1338), forgetting source-test
/// -0.0048 ± 0.0021, ...; took 142s`: a run's figures as they come, labelled (in a grid,
/// `r=4 all, lambda 1e1: ...`).
fn status_line(row: &Row) -> String {
    let mut s = match (&row.grid, row.lambda) {
        (Some(g), Some(l)) => format!("{}, lambda {}: ", g.name(), sweep::lambda_label(Some(l))),
        (None, Some(l)) => format!("lambda {}: ", sweep::lambda_label(Some(l))),
        (_, None) => "base model: ".to_string(),
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
        self.sweep_on(be, &model, curvature)
    }
}

/// `sweep --study data`: the study over the one LoRA shape of the flags, its source data a
/// file (the self-generated set is the study's own).
fn data_study(
    a: &SweepArgs,
    task: SweepTask,
    grid: Option<Vec<LoraConfig>>,
    estimate: Option<(Source, Stage1)>,
) -> Result<DataStudy> {
    let shape = match grid.as_deref() {
        Some([one]) => one.clone(),
        _ => {
            return Err(Error::usage(
                "--study data compares curvatures of one LoRA shape: give at most one --targets",
            ));
        }
    };
    let Some(data) = estimate else {
        unreachable!("run() refuses --study data without --curvature-data")
    };
    let n = match &data.0 {
        Source::File(examples) => examples.len(),
        Source::SelfGenerated { .. } => {
            unreachable!("run() refuses --study data with --curvature-data self:N")
        }
    };
    let self_generated = study::plan_self(
        &a.estimate,
        n,
        &a.out,
        &shape,
        &task.model,
        &a.batching,
        a.common.seed,
    )?;
    Ok(DataStudy {
        sweep: task,
        data,
        self_generated,
    })
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
        for p in r.paths(out) {
            println!("wrote {}", p.display());
        }
    }
}

pub fn run(a: SweepArgs) -> Result<()> {
    if a.study == Some(Study::Data) && a.curvature_data.is_none() {
        return Err(Error::usage(
            "--study data needs --curvature-data (the source data to compare with)",
        ));
    }
    let m = load_model(&a.model)?;
    let curvature = a
        .curvature
        .as_deref()
        .map(|p| Curvature::read_for(p, &m))
        .transpose()?;
    let grid = grid(&a, &m.cfg, curvature.as_ref().map(|c| &c.mean.cfg))?;
    if let (Some(c), Some(p)) = (&curvature, &a.curvature) {
        match &grid {
            None => a.lora.agree_with(&c.mean.cfg, p)?,
            Some(g) => check_fits(c, p, g, &m)?,
        }
    }
    let lambdas = match &a.lambdas {
        Some(s) => sweep::parse_lambdas(s)?,
        None => DEFAULT_LAMBDAS.to_vec(),
    };
    let has_curvature = curvature.is_some() || a.curvature_data.is_some();
    sweep::require_curvature(&lambdas, has_curvature)?;
    // In a data study the sampling flags are for its self-generated set, and the source
    // data come from a file.
    let mut on_data = a.estimate.clone();
    if a.study == Some(Study::Data) {
        if let Some(d) = &a.curvature_data
            && crate::curvature::self_data::parse(d)?.is_some()
        {
            return Err(Error::usage(
                "--study data samples its own self-generated set: give --curvature-data a file",
            ));
        }
        on_data.self_prompts = None;
        on_data.self_tokens = None;
    }
    let estimate = match &a.curvature_data {
        Some(d) => Some(Stage1::plan(
            &on_data,
            ("--curvature-data", d),
            &a.out.join(CURVATURE_FILE),
            &m,
            &a.batching,
            a.common.seed,
        )?),
        None => None,
    };
    // A grid's shapes each start at their own init: the first one's stands in.
    let lora = match &grid {
        Some(g) => g[0].clone(),
        None => a.lora.config(&m.cfg)?,
    };
    let init = HostLora::init(&m.cfg, lora, a.common.seed);
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
    let train_data = load_data(&a.data, &m, &a.batching)?;
    require_targets(&a.data, &train_data)?;
    let task = SweepTask {
        curvature,
        init,
        lambdas,
        train: a
            .hyper
            .config(a.batching.batch_size, a.common.seed, 0.0, a.delta),
        train_data,
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
    // Said once every input has been read and every flag checked: a refusal stays the
    // one line it is.
    let note = untargeted(&a.data, &task.train_data).filter(|_| !quiet);
    let placement = a.common.placement(quiet);
    if a.study == Some(Study::Data) {
        let study = data_study(&a, task, grid, estimate)?;
        note.iter().for_each(|n| eprintln!("{n}"));
        let report = run_on(placement, study)?;
        print_report(&report, &a.out, a.common.json);
        return Ok(());
    }
    note.iter().for_each(|n| eprintln!("{n}"));
    let report = match grid {
        None => run_on(placement, task)?,
        Some(grid) => run_on(
            placement,
            GridTask {
                sweep: task,
                grid: grid.into_iter().map(GridEntry::shape).collect(),
                estimate,
                seed: a.common.seed,
            },
        )?,
    };
    print_report(&report, &a.out, a.common.json);
    Ok(())
}
