//! `eval`: mean NLL and perplexity of each `--data` file.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::{Common, DataArgs, ModelArgs, load_data, load_model, print_json};
use crate::backend::Backend;
use crate::backend::device::{BackendTask, run_on};
use crate::data::Example;
use crate::error::Result;
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
    /// JSONL data files (each evaluated separately).
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    #[command(flatten)]
    pub batching: DataArgs,
    #[command(flatten)]
    pub common: Common,
}

struct EvalTask {
    model: LoadedModel,
    adapter: Option<HostLora>,
    sets: Vec<Vec<Example>>,
    batch_size: usize,
    quiet: bool,
}

impl BackendTask for EvalTask {
    type Output = Vec<NllSummary>;
    fn run<B: Backend>(self, be: &B) -> Result<Vec<NllSummary>> {
        let lora = match &self.adapter {
            Some(h) => Some(h.map(|v| be.buf(v.clone()))?),
            None => None,
        };
        let model = Llama::new(be, self.model.cfg, self.model.weights)?;
        let mut out = Vec::new();
        for set in &self.sets {
            let pb = progress::bar(
                set.len().div_ceil(self.batch_size) as u64,
                "eval",
                self.quiet,
            );
            out.push(mean_nll(
                be,
                &model,
                lora.as_ref(),
                set,
                self.batch_size,
                || pb.inc(1),
            )?);
            pb.finish_and_clear();
        }
        Ok(out)
    }
}

pub fn run(a: EvalArgs) -> Result<()> {
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
    let quiet = a.common.quiet || a.common.json;
    let task = EvalTask {
        model: m,
        adapter,
        sets,
        batch_size: a.batching.batch_size,
        quiet,
    };
    let results = run_on(a.common.device, a.common.threads, quiet, task)?;
    if a.common.json {
        let datasets: Vec<_> = a
            .data
            .iter()
            .zip(&results)
            .map(|(p, r)| {
                json!({"path": p, "n_sequences": r.n_sequences, "n_tokens": r.n_tokens, "mean_nll": r.mean_nll, "perplexity": r.perplexity})
            })
            .collect();
        print_json(&json!({ "datasets": datasets }));
    } else {
        println!(
            "{:<40} {:>9} {:>9} {:>10} {:>11}",
            "data", "sequences", "tokens", "mean NLL", "perplexity"
        );
        for (p, r) in a.data.iter().zip(&results) {
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
    Ok(())
}
