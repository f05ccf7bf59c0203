//! `curvature`: estimate the Laplace approximation on source data and write it.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::train::HyperArgs;
use super::{
    Common, DataArgs, LoraArgs, ModelArgs, adapter_or_init, load_data, load_model, print_json,
};
use crate::backend::Backend;
use crate::backend::device::{BackendTask, run_on};
use crate::curvature::summary::summarize;
use crate::curvature::{Curvature, Fisher, KfacApprox, Scheme, Spec, estimate};
use crate::data::Example;
use crate::error::{Error, Result};
use crate::eval::perplexity::require_targets;
use crate::io::check_replaceable;
use crate::model::{HostLora, Llama, LoadedModel};
use crate::progress;
use crate::train::TrainConfig;
use crate::train::session::{self, SessionOptions};

#[derive(Args)]
pub struct CurvatureArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Estimate at this PEFT adapter (default: a fresh init, or after --warmup-steps).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Source-domain JSONL data.
    #[arg(long)]
    pub data: PathBuf,
    /// diag, kfac or kfac-tri.
    #[arg(long, default_value = "diag")]
    pub scheme: Scheme,
    /// empirical (data labels) or mc (labels sampled from the model).
    #[arg(long, default_value = "empirical")]
    pub fisher: String,
    /// Label samples per position for --fisher mc.
    #[arg(long, default_value_t = 1)]
    pub mc_samples: usize,
    /// KFAC approximation for sequences: expand or reduce.
    #[arg(long, default_value = "expand")]
    pub kfac_approx: KfacApprox,
    /// Output curvature file (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Train this many steps on --warmup-data first and estimate there.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Target-domain JSONL for the warm-up steps.
    #[arg(long)]
    pub warmup_data: Option<PathBuf>,
    /// Learning rate of the warm-up steps.
    #[arg(long, default_value_t = 1e-3)]
    pub warmup_lr: f32,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub batching: DataArgs,
    #[command(flatten)]
    pub common: Common,
}

struct CurvatureTask {
    model: LoadedModel,
    init: HostLora,
    data: Vec<Example>,
    warmup: Option<(Vec<Example>, TrainConfig)>,
    spec: Spec,
    batch_size: usize,
    quiet: bool,
}

impl BackendTask for CurvatureTask {
    type Output = Curvature;
    fn run<B: Backend>(self, be: &B) -> Result<Curvature> {
        let identity = self.model.identity.clone();
        let model = Llama::new(be, self.model.cfg, self.model.weights)?;
        let theta = match &self.warmup {
            Some((data, cfg)) => {
                let opts = SessionOptions {
                    out: None,
                    checkpoint_every: 0,
                    resume: false,
                    quiet: self.quiet,
                    base_model: String::new(),
                    stop_after: None,
                    curvature_path: None,
                };
                session::run(be, &model, data, cfg, None, &self.init, &opts)?.lora
            }
            None => self.init,
        };
        let lora = theta.map(|v| be.buf(v.clone()))?;
        let pb = progress::bar(
            self.data.len().div_ceil(self.batch_size) as u64,
            "curvature",
            self.quiet,
        );
        let mut c = estimate(
            be,
            &model,
            &lora,
            &self.data,
            self.batch_size,
            self.spec,
            || pb.inc(1),
        )?;
        pb.finish_and_clear();
        c.meta.model = identity;
        Ok(c)
    }
}

pub fn run(a: CurvatureArgs) -> Result<()> {
    let fisher = match a.fisher.as_str() {
        "empirical" => Fisher::Empirical,
        "mc" => Fisher::Mc(a.mc_samples),
        other => {
            return Err(Error::usage(format!(
                "--fisher `{other}` is not one of: empirical, mc"
            )));
        }
    };
    let m = load_model(&a.model)?;
    let init = adapter_or_init(a.adapter.as_deref(), &m, &a.lora, a.common.seed)?;
    check_replaceable(&a.out)?;
    let data = load_data(&a.data, &m, &a.batching)?;
    require_targets(&a.data, &data)?;
    let warmup = match (a.warmup_steps, &a.warmup_data) {
        (0, _) => None,
        (_, None) => {
            return Err(Error::usage(
                "--warmup-steps needs --warmup-data (target-domain JSONL)",
            ));
        }
        (n, Some(p)) => {
            let hyper = HyperArgs {
                steps: n,
                grad_accum: 1,
                lr: a.warmup_lr,
                warmup: 0,
                schedule: crate::train::Schedule::Constant,
                weight_decay: 0.0,
                clip: 1.0,
            };
            let warm = load_data(p, &m, &a.batching)?;
            require_targets(p, &warm)?;
            Some((
                warm,
                hyper.config(a.batching.batch_size, a.common.seed, 0.0, 0.0),
            ))
        }
    };
    let quiet = a.common.quiet || a.common.json;
    let spec = Spec {
        scheme: a.scheme,
        fisher,
        approx: a.kfac_approx,
        seed: a.common.seed,
    };
    let task = CurvatureTask {
        model: m,
        init,
        data,
        warmup,
        spec,
        batch_size: a.batching.batch_size,
        quiet,
    };
    let c = run_on(a.common.placement(quiet), task)?;
    c.write(&a.out)?;
    let summary = summarize(&c);
    if a.common.json {
        print_json(&json!({
            "out": a.out, "scheme": c.meta.scheme.to_string(), "fisher": c.meta.fisher.to_string(),
            "n_sequences": c.meta.n_sequences, "n_positions": c.meta.n_positions, "summary": summary,
        }));
    } else {
        println!(
            "{} curvature ({} Fisher{}) over {} sequences / {} positions -> {}",
            c.meta.scheme,
            c.meta.fisher,
            match c.meta.fisher {
                Fisher::Mc(k) => format!(", {k} samples"),
                Fisher::Empirical => String::new(),
            },
            c.meta.n_sequences,
            c.meta.n_positions,
            a.out.display()
        );
        summary.print();
    }
    Ok(())
}
