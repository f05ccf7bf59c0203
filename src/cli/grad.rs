//! `grad`: LoRA gradients of the summed token loss, as `grad.<peft name>` tensors plus
//! `loss_sum` and `loss` (the mean over target tokens).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::{
    Common, DataArgs, LoraArgs, ModelArgs, adapter_or_init, load_data, load_model, print_json,
};
use crate::backend::Backend;
use crate::backend::device::{BackendTask, run_on};
use crate::data::{Example, batches};
use crate::error::Result;
use crate::eval::perplexity::require_targets;
use crate::io::{check_replaceable, write_safetensors};
use crate::model::{HostLora, Llama, LoadedModel};
use crate::progress;
use crate::train::accumulate_gradients;
use crate::train::finite::{check_device, check_value};

#[derive(Args)]
pub struct GradArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// PEFT adapter at which to take the gradient (default: a fresh init).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSONL data.
    #[arg(long)]
    pub data: PathBuf,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub batching: DataArgs,
    #[command(flatten)]
    pub common: Common,
}

struct GradTask {
    model: LoadedModel,
    lora: HostLora,
    data: Vec<Example>,
    batch_size: usize,
    quiet: bool,
}

impl BackendTask for GradTask {
    type Output = (HostLora, f64, usize);
    fn run<B: Backend>(self, be: &B) -> Result<Self::Output> {
        let lora = self.lora.map(|v| be.buf(v.clone()))?;
        let mut grads = self.lora.map_sized(|n| be.zeros(n))?;
        let model = Llama::new(be, self.model.cfg, self.model.weights)?;
        let pb = progress::bar(
            self.data.len().div_ceil(self.batch_size) as u64,
            "grad",
            self.quiet,
        )
        .unit("batches");
        let (mut loss_sum, mut n) = (0f64, 0usize);
        for batch in batches(&self.data, self.batch_size) {
            let s = accumulate_gradients(be, &model, &lora, &batch, 1.0, &mut grads)?;
            loss_sum += s.loss_sum;
            n += s.n_targets;
            pb.inc(1);
        }
        pb.finish_and_clear();
        check_value(loss_sum, "grad", "loss")?;
        check_device(be, &grads, "grad", "gradient")?;
        Ok((grads.map(|g| be.to_host(g))?, loss_sum, n))
    }
}

pub fn run(a: GradArgs) -> Result<()> {
    let m = load_model(&a.model)?;
    let lora = adapter_or_init(a.adapter.as_deref(), &m, &a.lora, a.common.seed)?;
    check_replaceable(&a.out)?;
    let data = load_data(&a.data, &m, &a.batching)?;
    require_targets(&a.data, &data)?;
    let n_seq = data.len();
    // --json owns stdout only: progress stays on stderr unless --quiet.
    let quiet = a.common.quiet;
    let task = GradTask {
        model: m,
        lora,
        data,
        batch_size: a.batching.batch_size,
        quiet,
    };
    let (grads, loss_sum, n) = run_on(a.common.placement(quiet), task)?;
    let loss = loss_sum / n.max(1) as f64;
    let (ls, l) = ([loss_sum as f32], [loss as f32]);
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = grads
        .named_tensors()
        .into_iter()
        .map(|(name, shape, data)| (format!("grad.{name}"), shape, data))
        .collect();
    tensors.push(("loss_sum".into(), vec![], &ls));
    tensors.push(("loss".into(), vec![], &l));
    let mut meta = BTreeMap::new();
    meta.insert("n_sequences".into(), n_seq.to_string());
    meta.insert("n_tokens".into(), n.to_string());
    write_safetensors(&a.out, &tensors, meta)?;
    if a.common.json {
        print_json(
            &json!({"out": a.out, "loss_sum": loss_sum, "loss": loss, "n_sequences": n_seq, "n_tokens": n}),
        );
    } else {
        println!(
            "loss {loss:.6} (sum {loss_sum:.4} over {n} tokens, {n_seq} sequences); gradients -> {}",
            a.out.display()
        );
    }
    Ok(())
}
