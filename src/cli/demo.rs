//! `demo`: the whole LaLoRA pipeline on the default model and data (the README's main
//! job). Fetches the assets if missing; curvature on QuAC passages at the fresh LoRA init;
//! training on the math target (ASDiv + GSM8K) at several lambdas including 0; evaluation
//! on held-out math (NLL and exact match), held-out QuAC and XSum (NLL) and PIQA and SIQA
//! (multiple-choice accuracy); the tables and the frontier plot. With `--study data`, the
//! same lambdas under four curvatures (QuAC's, a self-generated set's, an isotropic one,
//! none; `study.rs`).

use std::path::{Path, PathBuf};

use clap::Args;

use super::curvature::{EstimateArgs, Source, Stage1};
use super::study::{self, DataStudy, Study};
use super::sweep::{SweepTask, choice_set, eval_set, exact_match_set, print_report};
use super::{Common, DataArgs, LoraArgs, load_data};
use crate::backend::Backend;
use crate::backend::device::{BackendTask, run_on};
use crate::curvature::summary::summarize;
use crate::curvature::{Fisher, KfacApprox, Scheme, Spec};
use crate::data::Example;
use crate::error::{Error, Result};
use crate::model::{self, HostLora, Llama, LoadedModel};
use crate::sweep::{self, Report};
use crate::train::{Schedule, TrainConfig};

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Args)]
#[command(mut_arg("max_len", |a| a
    .default_value("256")
    .help("Sequences are cut to this many tokens (at most 256: the demo's runs are sized for it)")))]
pub struct DemoArgs {
    /// Where the default model and data are (fetched there if missing).
    #[arg(long, env = "ASSETS_DIR")]
    pub assets: Option<PathBuf>,
    /// `lambda`: the lambdas under the curvature of QuAC passages. `data`: the lambdas under
    /// four curvatures, to tell what the source data give the penalty: QuAC's, that of as
    /// many sequences sampled from the model itself, an isotropic one of the same trace,
    /// and none (delta only); about three times as long.
    #[arg(long, value_enum, default_value = "lambda")]
    pub study: Study,
    /// Output directory (default: runs/demo, or runs/demo-data for --study data).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Comma-separated lambdas (0 = plain LoRA).
    #[arg(long, default_value = "0,10,1e3,1e4")]
    pub lambdas: String,
    /// Curvature scheme: diag, kfac or kfac-tri.
    #[arg(long, default_value = "diag")]
    pub scheme: Scheme,
    /// Prior precision delta added to F/N.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1e-6)]
    pub delta: f32,
    /// QuAC passages for the curvature.
    #[arg(long, allow_negative_numbers = true, default_value_t = 32)]
    pub curvature_sequences: usize,
    /// Training steps per lambda.
    #[arg(long, allow_negative_numbers = true, default_value_t = 40)]
    pub steps: usize,
    /// Peak learning rate.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1e-3)]
    pub lr: f32,
    /// Held-out QuAC and XSum passages (forgetting) per set; at least 2, as the standard
    /// errors are over passages.
    #[arg(long, allow_negative_numbers = true, default_value_t = 16)]
    pub eval_sequences: usize,
    /// Held-out math problems (learning). Their labels cover only the answers, a few tokens
    /// each, so it takes many problems for the learning figures to stand clear of their
    /// standard errors; short rows keep them cheap.
    #[arg(long, allow_negative_numbers = true, default_value_t = 64)]
    pub target_eval_sequences: usize,
    /// Held-out math problems (the first of target-test, as for the NLL) answered by greedy
    /// generation: learning as the exact-match gain (0 = off; at least 2 otherwise).
    #[arg(long, allow_negative_numbers = true, default_value_t = 32)]
    pub exact_match: usize,
    /// Tokens generated per exact-match answer.
    #[arg(long, allow_negative_numbers = true, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Held-out PIQA and SIQA questions (each): forgetting as the accuracy drop (0 = off;
    /// at least 2 otherwise).
    #[arg(long, allow_negative_numbers = true, default_value_t = 100)]
    pub choice_questions: usize,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub batching: DataArgs,
    #[command(flatten)]
    pub common: Common,
}

impl DemoArgs {
    /// `--out`, or the study's default directory.
    pub fn out_dir(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            PathBuf::from(match self.study {
                Study::Lambda => "runs/demo",
                Study::Data => "runs/demo-data",
            })
        })
    }
}

fn default_assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets")
}

/// The default model where the demo fetches it (`ASSETS_DIR`, else `assets/`).
pub fn default_model() -> PathBuf {
    std::env::var_os("ASSETS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(default_assets)
        .join(MODEL_FILE)
}

/// Run `scripts/fetch-assets.sh` when the model or a data file is missing.
fn ensure_assets(dir: &Path, quiet: bool) -> Result<()> {
    let needed = [
        MODEL_FILE,
        "data/target-train.jsonl",
        "data/target-test.jsonl",
        "data/source-curvature.jsonl",
        "data/source-test.jsonl",
        "data/source-xsum-test.jsonl",
        "data/choice-piqa-test.jsonl",
        "data/choice-siqa-test.jsonl",
    ];
    if needed.iter().all(|f| dir.join(f).exists()) {
        return Ok(());
    }
    if dir.exists() && !dir.is_dir() {
        return Err(Error::file(
            dir,
            "exists and is not a directory; --assets names the directory of the default model and data",
        ));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-assets.sh");
    if !script.exists() {
        return Err(Error::file(
            dir,
            "assets missing and scripts/fetch-assets.sh not found",
        ));
    }
    if !quiet {
        eprintln!(
            "demo: fetching the default model and data into {}",
            dir.display()
        );
    }
    let status = std::process::Command::new("bash")
        .arg(&script)
        .env("ASSETS_DIR", dir)
        .status()
        .map_err(|e| Error::io(&script, e))?;
    if !status.success() {
        return Err(Error::file(
            dir,
            format!(
                "fetching the default model and data failed ({status}; {} said why above)",
                script.display()
            ),
        ));
    }
    Ok(())
}

/// The lambda study: stage I on QuAC passages, then the sweep under that curvature.
struct DemoTask {
    sweep: SweepTask,
    curvature_data: Vec<Example>,
    stage: Stage1,
}

impl BackendTask for DemoTask {
    type Output = Report;
    fn run<B: Backend>(self, be: &B) -> Result<Report> {
        let mut s = self.sweep;
        let weights = s.model.take_weights();
        let model = Llama::new(be, s.model.cfg.clone(), weights)?;
        if !s.quiet {
            eprintln!(
                "demo: estimating the curvature ({}) on {} QuAC passages",
                self.stage.describe(),
                self.curvature_data.len()
            );
        }
        let identity = s.model.identity.clone();
        let (c, curvature_cost) = self.stage.estimate(
            be,
            &model,
            &identity,
            &s.init,
            &self.curvature_data,
            s.quiet,
        )?;
        c.write(&s.out.join("curvature.safetensors"))?;
        if !s.quiet {
            eprintln!(
                "curvature: {} over {} QuAC passages ({} positions)",
                c.meta.scheme, c.meta.n_sequences, c.meta.n_positions
            );
            for n in summarize(&c).notes {
                eprintln!("note: {n}");
            }
        }
        let out = s.out.clone();
        let mut report = s.sweep_on(be, &model, Some(c))?;
        // Stage I ran here too: the results again, with its cost.
        report.cost.curvature = Some(curvature_cost);
        report.write(&out)?;
        Ok(report)
    }
}

pub fn run(a: DemoArgs) -> Result<()> {
    // --json owns stdout only: progress stays on stderr unless --quiet.
    let quiet = a.common.quiet;
    let assets = a.assets.clone().unwrap_or_else(default_assets);
    ensure_assets(&assets, quiet)?;
    let m: LoadedModel = model::load(&assets.join(MODEL_FILE), None)?;
    let data = assets.join("data");
    let batching = a.batching.clone();
    let quac = data.join("source-curvature.jsonl");
    let mut curvature_data = load_data(&quac, &m, &batching)?;
    curvature_data.truncate(a.curvature_sequences);
    let out = a.out_dir();
    let exact_match = match a.exact_match {
        0 => None,
        n => Some(exact_match_set(
            &data.join("target-test.jsonl"),
            n,
            a.max_new_tokens,
        )?),
    };
    let choices = match a.choice_questions {
        0 => Vec::new(),
        n => ["choice-piqa-test.jsonl", "choice-siqa-test.jsonl"]
            .iter()
            .map(|f| choice_set(&data.join(f), n))
            .collect::<Result<Vec<_>>>()?,
    };
    let train = TrainConfig {
        steps: a.steps,
        batch_size: batching.batch_size,
        lr: a.lr,
        warmup_steps: a.steps / 10,
        schedule: Schedule::Cosine,
        seed: a.common.seed,
        delta: a.delta,
        ..TrainConfig::default()
    };
    let sweep_task = SweepTask {
        curvature: None,
        init: HostLora::init(&m.cfg, a.lora.config(&m.cfg)?, a.common.seed),
        lambdas: sweep::parse_lambdas(&a.lambdas)?,
        train,
        train_data: load_data(&data.join("target-train.jsonl"), &m, &batching)?,
        target: eval_set(
            &data.join("target-test.jsonl"),
            &m,
            &batching,
            a.target_eval_sequences,
        )?,
        sources: vec![
            eval_set(
                &data.join("source-test.jsonl"),
                &m,
                &batching,
                a.eval_sequences,
            )?,
            eval_set(
                &data.join("source-xsum-test.jsonl"),
                &m,
                &batching,
                a.eval_sequences,
            )?,
        ],
        choices,
        exact_match,
        eval_batch: batching.batch_size,
        quiet,
        out: out.clone(),
        model: m,
    };
    let spec = Spec {
        scheme: a.scheme,
        fisher: Fisher::Empirical,
        approx: KfacApprox::Expand,
        seed: a.common.seed,
    };
    let stage = Stage1::new(
        spec,
        batching.batch_size,
        format!(
            "{} (the first {} passages)",
            quac.display(),
            curvature_data.len()
        ),
    );
    let placement = a.common.placement(quiet);
    if a.study == Study::Data {
        // As many self-generated sequences as QuAC passages, as long as they may be.
        let sampling = EstimateArgs {
            self_prompts: None,
            self_tokens: Some(batching.max_len),
            scheme: a.scheme,
            fisher: Fisher::Empirical.to_string(),
            mc_samples: 1,
            kfac_approx: KfacApprox::Expand,
            warmup_steps: 0,
            warmup_data: None,
            warmup_lr: 0.0,
        };
        let self_generated = study::plan_self(
            &sampling,
            curvature_data.len(),
            &out,
            &sweep_task.init.cfg,
            &sweep_task.model,
            &batching,
            a.common.seed,
        )?;
        let task = DataStudy {
            sweep: sweep_task,
            data: (Source::File(curvature_data), stage),
            self_generated,
        };
        let report = run_on(placement, task)?;
        print_report(&report, &out, a.common.json);
        return Ok(());
    }
    let task = DemoTask {
        sweep: sweep_task,
        curvature_data,
        stage,
    };
    let report = run_on(placement, task)?;
    print_report(&report, &out, a.common.json);
    if !a.common.json {
        println!(
            "wrote {} (curvature), {}/runs/ (adapters, metrics)",
            out.join("curvature.safetensors").display(),
            out.display()
        );
    }
    Ok(())
}
