//! The `lalora-engine` command line: argument definitions and the shared loading steps.
//! Each command lives in its own file and is a thin layer over the library.

mod checks;
mod curvature;
mod demo;
mod eval;
mod generate;
mod grad;
mod info;
mod outputs;
mod selftest;
mod study;
mod sweep;
mod train;

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::backend::cuda::BaseDtype;
use crate::backend::device::{Device, Placement};
use crate::data::{Example, RowFormat, read_jsonl_for};
use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::{self, HostLora, LoadedModel, LoraConfig};
use crate::progress;

#[derive(Parser)]
#[command(
    name = "lalora-engine",
    version,
    about = "LoRA fine-tuning of Llama-family models that remembers: a Laplace approximation of the LoRA weights, estimated on source data, penalises movement in high-curvature directions (LaLoRA).",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's configuration, parameter counts and a memory estimate.
    Info(info::InfoArgs),
    /// Mean NLL, perplexity and token count of each data set.
    Eval(eval::EvalArgs),
    /// LoRA gradients of the summed token loss, written as safetensors.
    Grad(grad::GradArgs),
    /// Estimate the Laplace approximation (diag, KFAC, KFAC-tri) on source data.
    Curvature(curvature::CurvatureArgs),
    /// Fine-tune LoRA on target data with the LaLoRA penalty; writes a PEFT adapter.
    Train(train::TrainArgs),
    /// Train at several lambdas and report the learning-forgetting frontier (for each
    /// LoRA shape of a grid with --ranks / a repeated --targets).
    // Boxed: its flags outnumber every other command's by far.
    Sweep(Box<sweep::SweepArgs>),
    /// Continue a prompt with the model (and an adapter).
    Generate(generate::GenerateArgs),
    /// The whole pipeline on the default model and data (fetches them if missing).
    Demo(demo::DemoArgs),
    /// Every kernel against its reference at several shapes, then a tiny-model grad,
    /// curvature and training step; run it first on a new GPU.
    Selftest(selftest::SelftestArgs),
}

/// Flags every command takes.
#[derive(Args, Clone)]
pub struct Common {
    /// Where to run: auto (CUDA if present and built, else CPU), cpu, cuda, cuda:N, or sim
    /// (the CUDA backend on a PTX simulator with compute-sanitizer-like checks: slow, for
    /// testing kernels without a GPU).
    #[arg(long, default_value = "auto", value_parser = clap::value_parser!(Device))]
    pub device: Device,
    /// Storage type of the base weights on cuda/sim: bf16 (default) or f32 (reproduces the
    /// f32 references like the CPU).
    #[arg(long, value_parser = clap::value_parser!(BaseDtype))]
    pub base_dtype: Option<BaseDtype>,
    /// CPU threads (0 = all cores; at most 4x the cores, and 1024); on sim, the
    /// simulator's threads.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    pub threads: usize,
    /// Seed for LoRA init, data order and sampling.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    pub seed: u64,
    /// Print a machine-readable JSON summary on stdout (and nothing else there).
    #[arg(long)]
    pub json: bool,
    /// No progress bars or status lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// At the end, print on stderr where the time went, the longest first: on the CPU and
    /// sim, the wall time of each backend op (calls, seconds, share of the time since the
    /// backend started, and cores kept busy: the process's CPU time over the op's wall
    /// time); on a GPU, where kernels run asynchronously, the device time of
    /// each kernel and cuBLAS call shape (CUDA events around each launch).
    #[arg(long)]
    pub op_times: bool,
}

impl Common {
    /// Where the command runs (`quiet` also silences the device line).
    pub fn placement(&self, quiet: bool) -> Placement {
        Placement {
            device: self.device,
            threads: self.threads,
            quiet,
            base_dtype: self.base_dtype,
            op_times: self.op_times,
        }
    }
}

/// The base model (and optionally an adapter).
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// An HF model directory (config.json + safetensors) or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// A tokenizer.json to use instead of the model's own.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// How JSONL rows become batches.
#[derive(Args, Clone)]
pub struct DataArgs {
    /// Sequences are cut to this many tokens.
    #[arg(long, allow_negative_numbers = true, default_value_t = 512)]
    pub max_len: usize,
    /// Sequences per batch.
    #[arg(long, allow_negative_numbers = true, default_value_t = 4)]
    pub batch_size: usize,
    /// Use only the first N rows of each data file.
    #[arg(long, allow_negative_numbers = true)]
    pub limit: Option<usize>,
}

/// LoRA shape for a fresh adapter. As in PEFT, where a loaded adapter brings its own
/// `LoraConfig`, an `--adapter` or `--curvature` fixes the shape: these flags may repeat
/// it but not contradict it.
#[derive(Args, Clone)]
pub struct LoraArgs {
    /// LoRA rank r [default: 8]. A command given an --adapter or --curvature file takes
    /// the file's r, and a different value is an error.
    #[arg(long, allow_negative_numbers = true)]
    pub rank: Option<usize>,
    /// LoRA alpha: scale alpha/r, or alpha/sqrt(r) with --rslora [default: 16]. A command
    /// given an --adapter or --curvature file takes the file's alpha, and a different
    /// value is an error.
    #[arg(long, allow_negative_numbers = true)]
    pub alpha: Option<f64>,
    /// Comma-separated target modules, or `all` [default: all]. A command given an
    /// --adapter or --curvature file takes the file's, and a different set is an error.
    /// `sweep` takes it repeated, one set each, for a grid (`--targets all --targets
    /// q_proj,v_proj`).
    #[arg(long, action = clap::ArgAction::Append)]
    pub targets: Vec<String>,
    /// rsLoRA scaling alpha/sqrt(r) (given an --adapter or --curvature file: only if
    /// the file's).
    #[arg(long)]
    pub rslora: bool,
}

impl LoraArgs {
    /// The shape of a fresh adapter on `model`.
    pub fn config(&self, model: &LlamaConfig) -> Result<LoraConfig> {
        let r = self.rank.unwrap_or(8);
        // Every projection has the hidden size on one side, so a larger rank adds
        // nothing: refused before anything of that size is allocated.
        if r > model.hidden_size {
            return Err(Error::usage(format!(
                "--rank {r} exceeds the model's hidden size {}",
                model.hidden_size
            )));
        }
        Ok(LoraConfig {
            r,
            alpha: self.alpha.unwrap_or(16.0),
            use_rslora: self.rslora,
            targets: LoraConfig::parse_targets(self.target_set()?.unwrap_or("all"))?,
        })
    }

    /// The one set of target modules given, if any: several make a grid, which only
    /// `sweep` runs (it gives each combination its own `LoraArgs`).
    pub fn target_set(&self) -> Result<Option<&str>> {
        match self.targets.as_slice() {
            [] => Ok(None),
            [t] => Ok(Some(t)),
            _ => Err(Error::usage(
                "--targets given more than once: only `sweep` takes several sets (a grid)",
            )),
        }
    }

    /// The flags given must agree with `cfg`, the shape `file` fixes.
    pub fn agree_with(&self, cfg: &LoraConfig, file: &Path) -> Result<()> {
        let clash = |flag: String, theirs: String| {
            Err(Error::file(
                file,
                format!(
                    "{flag} contradicts its LoRA {theirs}; the shape comes from this file (drop the flag)"
                ),
            ))
        };
        if let Some(r) = self.rank.filter(|&r| r != cfg.r) {
            return clash(format!("--rank {r}"), format!("r = {}", cfg.r));
        }
        if let Some(a) = self.alpha.filter(|&a| a != cfg.alpha) {
            return clash(format!("--alpha {a}"), format!("alpha = {}", cfg.alpha));
        }
        if let Some(t) = self.target_set()?
            && LoraConfig::parse_targets(t)? != cfg.targets
        {
            let theirs: Vec<&str> = cfg.targets.iter().map(|p| p.name()).collect();
            return clash(
                format!("--targets {t}"),
                format!("targets {}", theirs.join(",")),
            );
        }
        if self.rslora && !cfg.use_rslora {
            return clash("--rslora".into(), "scaling alpha/r".into());
        }
        Ok(())
    }
}

pub fn run() -> Result<()> {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => match e.kind() {
            // Help and version print in full (clap's own exit codes).
            clap::error::ErrorKind::DisplayHelp
            | clap::error::ErrorKind::DisplayVersion
            | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
            // Usage errors become the usual one line (exit 2), keeping clap's "did you
            // mean" tip for a mistyped flag or command.
            _ => return Err(Error::usage(one_line_usage(&e.to_string()))),
        },
    };
    // Checked before any work, so a bad value cannot surface mid-run from the progress
    // lines that read it.
    progress::interval()?;
    checks::validate(&cli.command)?;
    outputs::validate(&cli.command)?;
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Grad(a) => grad::run(a),
        Command::Curvature(a) => curvature::run(a),
        Command::Train(a) => train::run(a),
        Command::Sweep(a) => sweep::run(*a),
        Command::Generate(a) => generate::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Selftest(a) => selftest::run(a),
    }
}

/// clap's usage error as one line: its first paragraph and any `tip:` line (the usage
/// synopsis and the pointer to --help are left to `--help`).
fn one_line_usage(text: &str) -> String {
    let mut lines = text.lines().map(str::trim);
    let first: Vec<&str> = lines.by_ref().take_while(|l| !l.is_empty()).collect();
    let mut out = first.join(" ").trim_start_matches("error: ").to_string();
    for tip in lines.filter(|l| l.starts_with("tip:")) {
        out += "; ";
        out += tip;
    }
    out
}

pub fn load_model(args: &ModelArgs) -> Result<LoadedModel> {
    model::load(&args.model, args.tokenizer.as_deref())
}

/// Read a data file into examples (text rows need the model's tokenizer).
pub fn load_data(path: &Path, m: &LoadedModel, d: &DataArgs) -> Result<Vec<Example>> {
    let mut ex = read_jsonl_for(
        path,
        m.tokenizer(),
        &m.cfg,
        RowFormat { max_len: d.max_len },
    )?;
    if let Some(n) = d.limit {
        ex.truncate(n);
    }
    if ex.is_empty() {
        return Err(Error::file(path, "no data rows"));
    }
    Ok(ex)
}

/// How many training rows have no target token (every label -100, or --max-len cut the
/// labelled ones off), if any: they add nothing to training, and saying so keeps steps of
/// loss 0 from batches of them from being a mystery.
pub fn untargeted(path: &Path, examples: &[Example]) -> Option<String> {
    let n = examples.iter().filter(|e| e.n_targets() == 0).count();
    (n > 0).then(|| {
        format!(
            "{}: {n} of {} rows have no target token (every label -100, or --max-len cut the labelled tokens off); they add nothing to training",
            path.display(),
            examples.len()
        )
    })
}

/// `--adapter DIR` if given (the LoRA flags agreeing with it), else a fresh PEFT-style
/// init.
pub fn adapter_or_init(
    adapter: Option<&Path>,
    m: &LoadedModel,
    lora: &LoraArgs,
    seed: u64,
) -> Result<HostLora> {
    match adapter {
        Some(dir) => load_adapter(dir, m, lora),
        None => Ok(HostLora::init(&m.cfg, lora.config(&m.cfg)?, seed)),
    }
}

/// The adapter in `dir`, which the LoRA flags given must agree with.
pub fn load_adapter(dir: &Path, m: &LoadedModel, lora: &LoraArgs) -> Result<HostLora> {
    let a = HostLora::load(dir, &m.cfg)?;
    lora.agree_with(&a.cfg, &dir.join("adapter_config.json"))?;
    Ok(a)
}

/// Print `value` as JSON on stdout.
pub fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}
