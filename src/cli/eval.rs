//! `eval`: mean NLL and perplexity of each `--data` file; optionally exact-match accuracy
//! by generation (`--exact-match`) and multiple-choice accuracy (`--choice`).

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::{Common, DataArgs, ModelArgs, load_data, load_model, print_json};
use crate::backend::Backend;
use crate::backend::device::{BackendTask, run_on};
use crate::data::Example;
use crate::error::{Error, Result};
use crate::eval::choice::{ChoiceRow, ChoiceScores, Estimate, choice_logliks, read_choices, score};
use crate::eval::exact_match::{ExactMatch, exact_match, read_qa};
use crate::eval::generate::Sampling;
use crate::eval::perplexity::require_targets;
use crate::eval::{NllSummary, mean_nll};
use crate::model::{HostLora, Llama, LoadedModel};
use crate::progress;

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A PEFT adapter directory to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSONL data files for mean NLL / perplexity (each evaluated separately).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Question/answer JSONL files for exact-match accuracy by greedy generation. With
    /// --json, each question's extracted answer and whether it is right under "predictions".
    #[arg(long, num_args = 1..)]
    pub exact_match: Vec<PathBuf>,
    /// Multiple-choice JSONL files: acc and acc_norm as lm-eval-harness scores them (rows
    /// {"question", "options"|"choices", "answer"}, optional "passage"; see the README).
    /// With --json, each question's chosen option under "predictions".
    #[arg(long, num_args = 1..)]
    pub choice: Vec<PathBuf>,
    /// Tokens generated per exact-match answer.
    #[arg(long, allow_negative_numbers = true, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub batching: DataArgs,
    #[command(flatten)]
    pub common: Common,
}

struct EvalTask {
    model: LoadedModel,
    adapter: Option<HostLora>,
    sets: Vec<Vec<Example>>,
    /// The `--data` file of each set, to name it when its loss is not finite.
    paths: Vec<PathBuf>,
    qa: Vec<Vec<(String, String)>>,
    choices: Vec<Vec<ChoiceRow>>,
    /// The `--choice` file of each set, to name it in errors.
    choice_paths: Vec<PathBuf>,
    sampling: Sampling,
    batch_size: usize,
    quiet: bool,
}

type EvalOutput = (Vec<NllSummary>, Vec<ExactMatch>, Vec<ChoiceScores>);

impl BackendTask for EvalTask {
    type Output = EvalOutput;
    fn run<B: Backend>(mut self, be: &B) -> Result<EvalOutput> {
        let lora = match &self.adapter {
            Some(h) => Some(h.map(|v| be.buf(v.clone()))?),
            None => None,
        };
        let weights = self.model.take_weights();
        let model = Llama::new(be, self.model.cfg.clone(), weights)?;
        let mut nll = Vec::new();
        for (set, path) in self.sets.iter().zip(&self.paths) {
            let pb = progress::bar(
                set.len().div_ceil(self.batch_size) as u64,
                "eval",
                self.quiet,
            )
            .unit("batches");
            nll.push(
                mean_nll(be, &model, lora.as_ref(), set, self.batch_size, || {
                    pb.inc(1)
                })
                .map_err(|e| match e {
                    Error::NonFinite { at, what } => Error::NonFinite {
                        at: format!("{}: {at}", path.display()),
                        what,
                    },
                    e => e,
                })?,
            );
            pb.finish_and_clear();
        }
        let mut em = Vec::new();
        let mut mc = Vec::new();
        if !self.qa.is_empty() || !self.choices.is_empty() {
            let tok = self.model.tokenizer()?;
            for rows in &self.qa {
                let pb = progress::bar(rows.len() as u64, "generate", self.quiet).unit("answers");
                em.push(exact_match(
                    be,
                    &model,
                    lora.as_ref(),
                    tok,
                    rows,
                    &self.sampling,
                    || pb.inc(1),
                )?);
                pb.finish_and_clear();
            }
            for (rows, path) in self.choices.iter().zip(&self.choice_paths) {
                let pb = progress::bar(rows.len() as u64, "choice", self.quiet).unit("questions");
                let ll = choice_logliks(be, &model, lora.as_ref(), tok, path, rows, |n| {
                    pb.inc(n as u64)
                })
                .map_err(|e| match e {
                    Error::NonFinite { at, what } => Error::NonFinite {
                        at: format!("{}: {at}", path.display()),
                        what,
                    },
                    e => e,
                })?;
                pb.finish_and_clear();
                mc.push(score(rows, &ll));
            }
        }
        Ok((nll, em, mc))
    }
}

pub fn run(a: EvalArgs) -> Result<()> {
    if a.data.is_empty() && a.exact_match.is_empty() && a.choice.is_empty() {
        return Err(Error::usage(
            "nothing to evaluate: give --data, --exact-match or --choice",
        ));
    }
    let m = load_model(&a.model)?;
    let adapter = a
        .adapter
        .as_deref()
        .map(|d| HostLora::load(d, &m.cfg))
        .transpose()?;
    let sets = a
        .data
        .iter()
        .map(|p| load_data(p, &m, &a.batching))
        .collect::<Result<Vec<_>>>()?;
    for (path, set) in a.data.iter().zip(&sets) {
        require_targets(path, set)?;
    }
    let n = a.batching.limit.unwrap_or(usize::MAX);
    let qa = a
        .exact_match
        .iter()
        .map(|p| read_qa(p).map(|v| v.into_iter().take(n).collect()))
        .collect::<Result<Vec<_>>>()?;
    let choices = a
        .choice
        .iter()
        .map(|p| read_choices(p).map(|v| v.into_iter().take(n).collect()))
        .collect::<Result<Vec<_>>>()?;
    if !(qa.is_empty() && choices.is_empty()) {
        m.tokenizer()?;
    }
    // --json owns stdout only: progress stays on stderr unless --quiet.
    let quiet = a.common.quiet;
    let sampling = Sampling {
        max_new_tokens: a.max_new_tokens,
        seed: a.common.seed,
        ..Sampling::default()
    };
    let task = EvalTask {
        model: m,
        adapter,
        sets,
        paths: a.data.clone(),
        qa,
        choices,
        choice_paths: a.choice.clone(),
        sampling,
        batch_size: a.batching.batch_size,
        quiet,
    };
    let (nll, em, mc) = run_on(a.common.placement(quiet), task)?;
    if a.common.json {
        let datasets: Vec<_> = a
            .data
            .iter()
            .zip(&nll)
            .map(|(p, r)| json!({"path": p, "n_sequences": r.n_sequences, "n_tokens": r.n_tokens, "mean_nll": r.mean_nll, "perplexity": r.perplexity}))
            .collect();
        let mut out = json!({ "datasets": datasets });
        if !em.is_empty() {
            out["exact_match"] = a
                .exact_match
                .iter()
                .zip(&em)
                .map(|(p, e)| {
                    let predictions: Vec<_> = e
                        .answers
                        .iter()
                        .zip(&e.outcomes)
                        .map(|(got, ok)| json!({"extracted": got, "correct": ok}))
                        .collect();
                    json!({"path": p, "n": e.n, "correct": e.correct, "accuracy": e.accuracy, "predictions": predictions})
                })
                .collect();
        }
        if !mc.is_empty() {
            out["choice"] = a
                .choice
                .iter()
                .zip(&mc)
                .map(|(p, c)| {
                    let predictions: Vec<_> = (0..c.n())
                        .map(|i| json!({"answer": c.answers[i], "acc": c.pred[i], "acc_norm": c.pred_norm[i], "loglikelihoods": c.logliks[i]}))
                        .collect();
                    let (acc, norm) = (c.acc(), c.acc_norm());
                    json!({"path": p, "n": c.n(), "acc": acc.value, "acc_stderr": acc.stderr,
                           "acc_norm": norm.value, "acc_norm_stderr": norm.stderr, "predictions": predictions})
                })
                .collect();
        }
        print_json(&out);
        return Ok(());
    }
    if !nll.is_empty() {
        println!(
            "{:<40} {:>9} {:>9} {:>10} {:>11}",
            "data", "sequences", "tokens", "mean NLL", "perplexity"
        );
        for (p, r) in a.data.iter().zip(&nll) {
            println!(
                "{:<40} {:>9} {:>9} {:>10.4} {:>11.3}",
                p.display(),
                r.n_sequences,
                r.n_tokens,
                r.mean_nll,
                r.perplexity
            );
        }
    }
    for (p, e) in a.exact_match.iter().zip(&em) {
        println!(
            "exact match {}: {}/{} = {:.1}%",
            p.display(),
            e.correct,
            e.n,
            100.0 * e.accuracy
        );
    }
    for (p, c) in a.choice.iter().zip(&mc) {
        println!(
            "multiple choice {}: acc {}, acc_norm {} ({} questions)",
            p.display(),
            with_stderr(c.acc()),
            with_stderr(c.acc_norm()),
            c.n()
        );
    }
    Ok(())
}

/// `0.650 ± 0.034` (the value alone below two questions).
fn with_stderr(e: Estimate) -> String {
    match e.stderr {
        Some(se) => format!("{:.3} ± {se:.3}", e.value),
        None => format!("{:.3}", e.value),
    }
}
