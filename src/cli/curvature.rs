//! `curvature`: estimate the Laplace approximation on source data and write it.

use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;

use super::train::HyperArgs;
use super::{
    Common, DataArgs, LoraArgs, ModelArgs, adapter_or_init, load_data, load_model, print_json,
};
use crate::backend::Backend;
use crate::backend::device::{BackendTask, run_on};
use crate::cost::{Flops, Meter, StageCost};
use crate::curvature::self_data::{self, SelfData};
use crate::curvature::summary::summarize;
use crate::curvature::{Curvature, Fisher, KfacApprox, Scheme, Spec, estimate};
use crate::data::Example;
use crate::error::{Error, Result};
use crate::eval::perplexity::require_targets;
use crate::io::{atomic_write, check_replaceable};
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
    /// Source-domain JSONL data, or `self:N`: N sequences sampled from the base model
    /// itself (temperature 1, from BOS or --self-prompts), kept beside --out as
    /// `<out stem>.self.jsonl` so the estimate can be reproduced with --data.
    #[arg(long)]
    pub data: PathBuf,
    /// Output curvature file (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub estimate: EstimateArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub batching: DataArgs,
    #[command(flatten)]
    pub common: Common,
}

/// How stage I estimates, given its source data: shared by `curvature` and
/// `sweep --curvature-data`.
#[derive(Args, Clone)]
pub struct EstimateArgs {
    /// With `self:N` data (or `sweep --study data`): text prompts, one per line, to start
    /// the sequences from in turn (default: the model's BOS token alone).
    #[arg(long)]
    pub self_prompts: Option<PathBuf>,
    /// With `self:N` data (or `sweep --study data`): tokens sampled per sequence (fewer
    /// where the model says EOS) [default: 128].
    #[arg(long, allow_negative_numbers = true)]
    pub self_tokens: Option<usize>,
    /// diag, kfac or kfac-tri.
    #[arg(long, default_value = "diag")]
    pub scheme: Scheme,
    /// empirical (data labels) or mc (labels sampled from the model).
    #[arg(long, default_value = "empirical")]
    pub fisher: String,
    /// Label samples per position for --fisher mc.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1)]
    pub mc_samples: usize,
    /// KFAC approximation for sequences (kfac and kfac-tri only): expand or reduce.
    #[arg(long, default_value = "expand")]
    pub kfac_approx: KfacApprox,
    /// Train this many steps on --warmup-data first (from --adapter, or a fresh init) and
    /// estimate there.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Target-domain JSONL for the warm-up steps.
    #[arg(long)]
    pub warmup_data: Option<PathBuf>,
    /// Learning rate of the warm-up steps.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1e-3)]
    pub warmup_lr: f32,
}

impl EstimateArgs {
    /// `--self-tokens`, or its default.
    pub fn self_tokens(&self) -> usize {
        self.self_tokens.unwrap_or(128)
    }

    /// The Fisher `--fisher` and `--mc-samples` name (checked before any file is read, and
    /// read again where stage I is planned).
    pub fn fisher(&self) -> Result<Fisher> {
        match self.fisher.as_str() {
            "empirical" => Ok(Fisher::Empirical),
            "mc" => Ok(Fisher::Mc(self.mc_samples)),
            other => Err(Error::usage(format!(
                "--fisher `{other}` is not one of: empirical, mc"
            ))),
        }
    }

    /// The warm-up's data, if there is a warm-up: `--warmup-steps` and `--warmup-data`
    /// go together.
    pub fn warmup_data(&self) -> Result<Option<&Path>> {
        match (self.warmup_steps, &self.warmup_data) {
            (0, None) => Ok(None),
            (0, Some(_)) => Err(Error::usage(
                "--warmup-data goes with --warmup-steps N (the steps trained on it)",
            )),
            (_, None) => Err(Error::usage(
                "--warmup-steps needs --warmup-data (target-domain JSONL)",
            )),
            (_, Some(p)) => Ok(Some(p)),
        }
    }
}

/// Where the source data come from.
pub enum Source {
    File(Vec<Example>),
    /// Sampled by the model on the device, then cut to `max_len` as file rows are.
    SelfGenerated {
        spec: SelfData,
        max_len: usize,
    },
}

impl Source {
    /// The examples, and whether they were sampled here (then they are to be kept).
    pub fn examples<B: Backend>(
        self,
        be: &B,
        model: &Llama<B>,
        quiet: bool,
    ) -> Result<(Vec<Example>, bool)> {
        match self {
            Source::File(data) => Ok((data, false)),
            Source::SelfGenerated { spec, max_len } => {
                let pb =
                    progress::bar(spec.n as u64, "self-generated data", quiet).unit("sequences");
                let eos = &model.cfg.eos_token_ids;
                let mut data = self_data::sample(be, model, &spec, eos, || pb.inc(1))?;
                pb.finish_and_clear();
                for e in &mut data {
                    e.ids.truncate(max_len);
                    e.labels.truncate(max_len);
                }
                Ok((data, true))
            }
        }
    }
}

/// Stage I as the flags describe it, its inputs read and checked: the warm-up before the
/// estimate and the estimator.
pub struct Stage1 {
    warmup: Option<(Vec<Example>, TrainConfig)>,
    spec: Spec,
    batch_size: usize,
    /// The source data, as the file's metadata describes them.
    data_desc: String,
}

impl Stage1 {
    /// The estimator `spec` on data already read, without a warm-up; `data_desc` names the
    /// data in the file's metadata.
    pub fn new(spec: Spec, batch_size: usize, data_desc: String) -> Self {
        Stage1 {
            warmup: None,
            spec,
            batch_size,
            data_desc,
        }
    }

    /// Check the flags and read the inputs, before any work: the source `data` given with
    /// `flag` (a file or `self:N`; self-generated data are kept beside `out`, the curvature
    /// file) and the warm-up data.
    pub fn plan(
        e: &EstimateArgs,
        (flag, data): (&str, &Path),
        out: &Path,
        m: &LoadedModel,
        batching: &DataArgs,
        seed: u64,
    ) -> Result<(Source, Stage1)> {
        let fisher = e.fisher()?;
        let (source, data_desc) = match self_data::parse(data)? {
            Some(n) => self_generated(e, n, out, m, batching, seed)?,
            None => {
                for (given, what) in [
                    (e.self_prompts.is_some(), "--self-prompts"),
                    (e.self_tokens.is_some(), "--self-tokens"),
                ] {
                    if given {
                        return Err(Error::usage(format!("{what} goes with {flag} self:N")));
                    }
                }
                let examples = load_data(data, m, batching)?;
                require_targets(data, &examples)?;
                (Source::File(examples), data.display().to_string())
            }
        };
        let warmup = match e.warmup_data()? {
            None => None,
            Some(p) => {
                let hyper = HyperArgs {
                    steps: e.warmup_steps,
                    grad_accum: 1,
                    lr: e.warmup_lr,
                    warmup: 0,
                    schedule: crate::train::Schedule::Constant,
                    weight_decay: 0.0,
                    clip: 1.0,
                };
                let warm = load_data(p, m, batching)?;
                require_targets(p, &warm)?;
                Some((warm, hyper.config(batching.batch_size, seed, 0.0, 0.0)))
            }
        };
        let spec = Spec {
            scheme: e.scheme,
            fisher,
            approx: e.kfac_approx,
            seed,
        };
        let stage = Stage1 {
            warmup,
            spec,
            batch_size: batching.batch_size,
            data_desc,
        };
        Ok((source, stage))
    }

    /// `diag, empirical Fisher`: the estimator, for status lines.
    pub fn describe(&self) -> String {
        format!("{}, {} Fisher", self.spec.scheme, self.spec.fisher)
    }

    /// Estimate at `init`, after the warm-up if asked, on `data`: the curvature (its
    /// metadata naming the model and the data) and what the estimate cost (warm-up not
    /// included: stage I alone).
    pub fn estimate<B: Backend>(
        &self,
        be: &B,
        model: &Llama<B>,
        identity: &str,
        init: &HostLora,
        data: &[Example],
        quiet: bool,
    ) -> Result<(Curvature, StageCost)> {
        let warmed;
        let theta = match &self.warmup {
            Some((warm, cfg)) => {
                let opts = SessionOptions {
                    quiet,
                    ..SessionOptions::default()
                };
                warmed = session::run(be, model, warm, cfg, None, init, &opts)?.lora;
                &warmed
            }
            None => init,
        };
        let lora = theta.map(|v| be.buf(v.clone()))?;
        let batches = data.len().div_ceil(self.batch_size) as u64;
        let pb = progress::bar(batches, "curvature", quiet).unit("batches");
        let meter = Meter::start("curvature", be);
        let mut done = 0;
        let mut c = estimate(be, model, &lora, data, self.batch_size, self.spec, || {
            pb.inc(1);
            done += 1;
            if done == batches {
                // Reading every factor back after the last batch takes seconds for a
                // large KFAC estimate (15 GB at Llama-3.2-1B's shapes).
                pb.set_message("reading out".into());
            }
        })?;
        pb.set_message(String::new());
        pb.finish_and_clear();
        let (tokens, flops) =
            Flops::new(&model.cfg, &lora).curvature(data, self.batch_size, &self.spec);
        let cost = meter.finish(tokens, flops, be);
        c.meta.model = identity.to_string();
        c.meta.data = self.data_desc.clone();
        Ok((c, cost))
    }
}

/// The `self:N` source: the sampling spec, checked against the model, and its description.
fn self_generated(
    e: &EstimateArgs,
    n: usize,
    out: &Path,
    m: &LoadedModel,
    batching: &DataArgs,
    seed: u64,
) -> Result<(Source, String)> {
    let self_tokens = e.self_tokens();
    if self_tokens == 0 {
        return Err(Error::usage("--self-tokens 0: must be at least 1"));
    }
    check_replaceable(&self_data::jsonl_path(out))?;
    let tok = m.tokenizer().ok();
    let (starts, from) = self_data::starts(e.self_prompts.as_deref(), tok, m.cfg.bos_token_id)?;
    let positions = m.cfg.max_position_embeddings;
    let longest = starts.iter().map(Vec::len).max().unwrap_or(0);
    if longest.saturating_add(self_tokens) > positions {
        return Err(Error::usage(format!(
            "--self-tokens {}: a {longest}-token start plus the sampled tokens exceeds the model's {positions} positions (max_position_embeddings)",
            self_tokens
        )));
    }
    let spec = SelfData {
        n,
        new_tokens: self_tokens,
        seed,
        starts,
        start_desc: from,
    };
    let desc = format!(
        "self-generated: {n} sequences sampled from the base model (temperature 1, top-p 1, up to {} new tokens, seed {}, from {}), kept in {}",
        spec.new_tokens,
        spec.seed,
        spec.start_desc,
        self_data::jsonl_path(out).display()
    );
    let max_len = batching.max_len;
    Ok((Source::SelfGenerated { spec, max_len }, desc))
}

/// Self-generated data beside the curvature file `out`, as JSONL (to reproduce the estimate).
pub fn keep_self_data(out: &Path, data: &[Example]) -> Result<()> {
    atomic_write(
        &self_data::jsonl_path(out),
        self_data::to_jsonl(data).as_bytes(),
    )
}

struct CurvatureTask {
    model: LoadedModel,
    init: HostLora,
    source: Source,
    stage: Stage1,
    quiet: bool,
}

impl BackendTask for CurvatureTask {
    /// The estimate, the data when they were sampled here (to be kept), and what the
    /// estimate cost (sampling and warm-up not included: stage I alone).
    type Output = (Curvature, Option<Vec<Example>>, StageCost);
    fn run<B: Backend>(self, be: &B) -> Result<Self::Output> {
        let identity = self.model.identity.clone();
        let model = Llama::new(be, self.model.cfg, self.model.weights)?;
        let (data, sampled) = self.source.examples(be, &model, self.quiet)?;
        let (c, cost) = self
            .stage
            .estimate(be, &model, &identity, &self.init, &data, self.quiet)?;
        Ok((c, sampled.then_some(data), cost))
    }
}

pub fn run(a: CurvatureArgs) -> Result<()> {
    let m = load_model(&a.model)?;
    let init = adapter_or_init(a.adapter.as_deref(), &m, &a.lora, a.common.seed)?;
    check_replaceable(&a.out)?;
    let (source, stage) = Stage1::plan(
        &a.estimate,
        ("--data", &a.data),
        &a.out,
        &m,
        &a.batching,
        a.common.seed,
    )?;
    // --json owns stdout only: progress stays on stderr unless --quiet.
    let quiet = a.common.quiet;
    let task = CurvatureTask {
        model: m,
        init,
        source,
        stage,
        quiet,
    };
    let (c, sampled, cost) = run_on(a.common.placement(quiet), task)?;
    if let Some(data) = &sampled {
        keep_self_data(&a.out, data)?;
    }
    if !quiet {
        eprintln!(
            "curvature: writing {} ({:.1} MB)",
            a.out.display(),
            c.value_bytes() as f64 / 1e6
        );
    }
    c.write(&a.out)?;
    let summary = summarize(&c);
    if a.common.json {
        print_json(&json!({
            "out": a.out, "scheme": c.meta.scheme.to_string(), "fisher": c.meta.fisher.to_string(),
            "mc_samples": match c.meta.fisher {
                Fisher::Mc(k) => Some(k),
                Fisher::Empirical => None,
            },
            "approx": (c.meta.scheme != Scheme::Diag).then(|| c.meta.approx.to_string()),
            "n_sequences": c.meta.n_sequences, "n_positions": c.meta.n_positions, "data": c.meta.data,
            "summary": summary, "cost": [cost],
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
        if sampled.is_some() {
            println!("source data: {}", c.meta.data);
        }
        println!("cost: {}", cost.line());
        summary.print();
    }
    Ok(())
}
