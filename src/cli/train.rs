//! `train`: LoRA fine-tuning with the LaLoRA penalty; writes a PEFT adapter.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::{
    Common, DataArgs, LoraArgs, ModelArgs, load_adapter, load_data, load_model, print_json,
    untargeted,
};
use crate::backend::Backend;
use crate::backend::device::{BackendTask, run_on};
use crate::cost::{Flops, Meter, StageCost};
use crate::curvature::Curvature;
use crate::data::Example;
use crate::error::{Error, Result};
use crate::eval::perplexity::require_targets;
use crate::io::atomic_write;
use crate::model::{HostLora, Llama, LoadedModel};
use crate::train::checkpoint;
use crate::train::session::{self, SessionOptions};
use crate::train::{Penalty, Schedule, StepMetrics, TrainConfig};

/// Optimiser and schedule flags, shared by `train`, `sweep`, `demo` and curvature warm-up.
#[derive(Args, Clone)]
pub struct HyperArgs {
    /// Optimiser steps.
    #[arg(long, allow_negative_numbers = true, default_value_t = 100)]
    pub steps: usize,
    /// Micro-batches accumulated per step.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, allow_negative_numbers = true, default_value_t = 1e-3)]
    pub lr: f32,
    /// Linear warm-up steps: step t < N runs at lr·t/N (from 0, as transformers'
    /// schedules with warm-up).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    pub warmup: usize,
    /// Decay after warm-up: cosine, linear or constant.
    #[arg(long, default_value = "cosine")]
    pub schedule: Schedule,
    /// AdamW decoupled weight decay.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Clip the loss gradient to this global norm (0: off).
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    pub clip: f32,
}

impl HyperArgs {
    pub fn config(&self, batch_size: usize, seed: u64, lambda: f32, delta: f32) -> TrainConfig {
        TrainConfig {
            steps: self.steps,
            batch_size,
            grad_accum: self.grad_accum,
            lr: self.lr,
            warmup_steps: self.warmup,
            schedule: self.schedule,
            weight_decay: self.weight_decay,
            clip: self.clip,
            seed,
            lambda,
            delta,
            ..TrainConfig::default()
        }
    }
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL training data (target domain).
    #[arg(long)]
    pub data: PathBuf,
    /// Output directory: PEFT adapter, metrics.jsonl and cost.json (at the end), train.log,
    /// checkpoint/.
    #[arg(long)]
    pub out: PathBuf,
    /// Curvature file from `curvature`: training starts at its theta* and is penalised.
    #[arg(long)]
    pub curvature: Option<PathBuf>,
    /// Penalty strength lambda (0: plain LoRA).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    pub lambda: f32,
    /// Prior precision delta added to F/N.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1e-6)]
    pub delta: f32,
    /// Start from this PEFT adapter (default: the curvature's theta*, else a fresh init).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Save a checkpoint every N steps and at the end (0: never; --resume needs one).
    #[arg(long, allow_negative_numbers = true, default_value_t = 50)]
    pub checkpoint_every: usize,
    /// Continue from OUT/checkpoint: the same model, data, curvature and flags, or refused.
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub hyper: HyperArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub batching: DataArgs,
    #[command(flatten)]
    pub common: Common,
}

struct TrainTask {
    model: LoadedModel,
    data: Vec<Example>,
    cfg: TrainConfig,
    curvature: Option<Curvature>,
    init: HostLora,
    opts: SessionOptions,
}

impl BackendTask for TrainTask {
    /// The steps run by this call, and what they cost.
    type Output = (Vec<StepMetrics>, StageCost);
    fn run<B: Backend>(self, be: &B) -> Result<Self::Output> {
        let model = Llama::new(be, self.model.cfg, self.model.weights)?;
        let meter = Meter::start("train", be);
        // The curvature's factors move into the penalty (held once for the run), or at
        // lambda 0 are dropped: the run needs only the curvature's identity.
        let penalty = self
            .curvature
            .map(|c| Penalty::for_lambdas(be, c, self.cfg.delta, &[self.cfg.lambda]))
            .transpose()?;
        let r = session::run(
            be,
            &model,
            &self.data,
            &self.cfg,
            penalty.as_ref(),
            &self.init,
            &self.opts,
        )?;
        // A resumed run costs only the steps it ran.
        let from = r.metrics.first().map_or(0, |m| m.step - 1);
        let to = r.metrics.last().map_or(0, |m| m.step);
        let (tokens, flops) = Flops::new(&model.cfg, &self.init).training(
            &self.data,
            &self.cfg,
            penalty.as_ref().map(Penalty::scheme),
            from,
            to,
        );
        Ok((r.metrics, meter.finish(tokens, flops, be)))
    }
}

/// What the run says before its first step (the session prints it once the directory is
/// locked and a resume checked): training rows without targets, and what becomes of an
/// earlier run's checkpoint in OUT.
fn notices(a: &TrainArgs, held: bool, data: &[Example]) -> Vec<String> {
    let mut v: Vec<String> = untargeted(&a.data, data).into_iter().collect();
    if held && !a.resume {
        let out = a.out.display();
        v.push(match a.checkpoint_every {
            0 => format!(
                "train: {out} holds an earlier run's checkpoint; this run writes none (--checkpoint-every 0), so it stays, and --resume would continue the earlier run"
            ),
            _ => format!(
                "train: {out} holds an earlier run's checkpoint; this run starts afresh and its first checkpoint replaces it (--resume continues the earlier run)"
            ),
        });
    }
    v
}

pub fn run(a: TrainArgs) -> Result<()> {
    // Before anything is loaded or created: --resume needs a checkpoint.
    let held = checkpoint::exists(&a.out)?;
    if a.resume && !held {
        return Err(Error::file(
            checkpoint::dir(&a.out),
            "no checkpoint to resume from (without --resume the run starts afresh)",
        ));
    }
    let m = load_model(&a.model)?;
    if a.lambda > 0.0 && a.curvature.is_none() {
        return Err(Error::usage("--lambda > 0 needs --curvature"));
    }
    let curvature = a
        .curvature
        .as_deref()
        .map(|p| Curvature::read_for(p, &m))
        .transpose()?;
    let init = match (&a.adapter, &curvature, &a.curvature) {
        (Some(dir), _, _) => load_adapter(dir, &m, &a.lora)?,
        (None, Some(c), Some(p)) => {
            a.lora.agree_with(&c.mean.cfg, p)?;
            c.mean.clone()
        }
        _ => HostLora::init(&m.cfg, a.lora.config(&m.cfg)?, a.common.seed),
    };
    if let (Some(c), Some(p)) = (&curvature, &a.curvature) {
        c.check_lora(p, &init, "the adapter trained")?;
    }
    let data = load_data(&a.data, &m, &a.batching)?;
    require_targets(&a.data, &data)?;
    let cfg = a
        .hyper
        .config(a.batching.batch_size, a.common.seed, a.lambda, a.delta);
    // --json owns stdout only: progress stays on stderr unless --quiet.
    let quiet = a.common.quiet;
    let opts = SessionOptions {
        out: Some(a.out.clone()),
        checkpoint_every: a.checkpoint_every,
        resume: a.resume,
        quiet,
        base_model: m.path.display().to_string(),
        stop_after: None,
        curvature_path: a.curvature.clone(),
        notices: notices(&a, held, &data),
    };
    let task = TrainTask {
        model: m,
        data,
        cfg,
        curvature,
        init,
        opts,
    };
    let (metrics, cost) = run_on(a.common.placement(quiet), task)?;
    let last = metrics.last();
    if last.is_some() {
        // Beside metrics.jsonl, not in it: each of its lines is a step, as its readers
        // (resume checks, tests, scripts) take them.
        let text = serde_json::to_string_pretty(&json!({"cost": [&cost]})).unwrap_or_default();
        atomic_write(&a.out.join("cost.json"), text.as_bytes())?;
    }
    if a.common.json {
        print_json(
            &json!({"out": a.out, "steps": last.map(|m| m.step), "final": last, "cost": [cost]}),
        );
    } else if let Some(l) = last {
        println!(
            "step {} loss {:.4} penalty {:.4e} ({:.0} tokens/s); adapter -> {}",
            l.step,
            l.loss,
            l.penalty,
            l.tokens_per_s,
            a.out.display()
        );
        println!("cost: {}", cost.line());
    } else {
        println!(
            "nothing to do: already at step {}; adapter in {}",
            a.hyper.steps,
            a.out.display()
        );
    }
    Ok(())
}
