//! Flag values, checked before any file is read: a zero, negative, non-finite or absurd
//! number is refused naming its flag, so that no run divides by zero, starts unbounded
//! threads, or trains on NaN from the start.

use super::curvature::EstimateArgs;
use super::train::HyperArgs;
use super::{Command, Common, DataArgs, LoraArgs};
use crate::curvature::{Fisher, KfacApprox, Scheme};
use crate::error::{Error, Result};
use crate::model::LoraConfig;

/// More threads than this only add scheduling: 4x the cores, and never above 1024.
fn max_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (4 * cores).min(1024)
}

fn refuse(flag: &str, value: impl std::fmt::Display, what: &str) -> Result<()> {
    Err(Error::usage(format!("{flag} {value}: must be {what}")))
}

fn at_least(flag: &str, v: usize, min: usize) -> Result<()> {
    if v < min {
        return refuse(flag, v, &format!("at least {min}"));
    }
    Ok(())
}

fn at_most(flag: &str, v: usize, max: usize) -> Result<()> {
    if v > max {
        return refuse(flag, v, &format!("at most {max}"));
    }
    Ok(())
}

/// A finite number >= 0.
fn non_negative(flag: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        return refuse(flag, v, "a finite number >= 0");
    }
    Ok(())
}

fn common(c: &Common) -> Result<()> {
    let max = max_threads();
    if c.threads > max {
        return refuse(
            "--threads",
            c.threads,
            &format!("at most {max} (4x the cores, and 1024)"),
        );
    }
    Ok(())
}

fn data(d: &DataArgs) -> Result<()> {
    at_least("--max-len", d.max_len, 2)?;
    at_least("--batch-size", d.batch_size, 1)?;
    if let Some(n) = d.limit {
        at_least("--limit", n, 1)?;
    }
    Ok(())
}

/// `grid`: the command takes several --targets sets (`sweep`).
fn lora(l: &LoraArgs, grid: bool) -> Result<()> {
    if let Some(r) = l.rank {
        at_least("--rank", r, 1)?;
    }
    if let Some(a) = l.alpha
        && !(a.is_finite() && a > 0.0)
    {
        return refuse("--alpha", a, "a finite number > 0");
    }
    if !grid {
        l.target_set()?;
    }
    for t in &l.targets {
        LoraConfig::parse_targets(t)?;
    }
    Ok(())
}

/// More label samples per position than this are refused: each is a backward pass of
/// every batch, so 1024 is already a thousand times the cost of the estimate.
const MAX_MC_SAMPLES: usize = 1024;

/// A finite number > 0.
fn positive(flag: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0) {
        return refuse(flag, v, "a finite number > 0");
    }
    Ok(())
}

/// Stage I's flags, and the combinations in which one would be silently ignored.
fn estimate(e: &EstimateArgs) -> Result<()> {
    let fisher = e.fisher()?;
    e.warmup_data()?;
    at_least("--mc-samples", e.mc_samples, 1)?;
    if e.mc_samples > MAX_MC_SAMPLES {
        return refuse(
            "--mc-samples",
            e.mc_samples,
            &format!("at most {MAX_MC_SAMPLES} (each sample is a backward pass of every batch)"),
        );
    }
    if e.mc_samples > 1 && fisher == Fisher::Empirical {
        return Err(Error::usage(format!(
            "--mc-samples {} goes with --fisher mc (the empirical Fisher takes the data's labels)",
            e.mc_samples
        )));
    }
    if e.kfac_approx != KfacApprox::Expand && e.scheme == Scheme::Diag {
        return Err(Error::usage(format!(
            "--kfac-approx {} goes with --scheme kfac or kfac-tri, not diag",
            e.kfac_approx
        )));
    }
    if e.warmup_steps > 0 {
        positive("--warmup-lr", e.warmup_lr as f64)?;
    }
    non_negative("--warmup-lr", e.warmup_lr as f64)
}

fn hyper(h: &HyperArgs) -> Result<()> {
    at_least("--steps", h.steps, 1)?;
    at_least("--grad-accum", h.grad_accum, 1)?;
    // A rate of 0 trains nothing while reporting a run.
    positive("--lr", h.lr as f64)?;
    non_negative("--weight-decay", h.weight_decay as f64)?;
    non_negative("--clip", h.clip as f64)
}

fn penalty(lambda: f32, delta: f32) -> Result<()> {
    non_negative("--lambda", lambda as f64)?;
    non_negative("--delta", delta as f64)
}

fn sampling(temperature: f32, top_p: f32) -> Result<()> {
    non_negative("--temperature", temperature as f64)?;
    if !(top_p > 0.0 && top_p <= 1.0) {
        return refuse("--top-p", top_p, "in (0, 1]");
    }
    Ok(())
}

/// Check every numeric flag of `cmd`.
pub(super) fn validate(cmd: &Command) -> Result<()> {
    match cmd {
        Command::Info(a) => {
            common(&a.common)?;
            at_least("--max-len", a.max_len, 2)?;
            at_least("--batch-size", a.batch_size, 1)?;
            // The estimate multiplies them (`batch heads len^2`); far beyond any model.
            at_most("--max-len", a.max_len, 1 << 24)?;
            at_most("--batch-size", a.batch_size, 1 << 24)?;
            lora(&a.lora, false)
        }
        Command::Eval(a) => {
            common(&a.common)?;
            at_least("--max-new-tokens", a.max_new_tokens, 1)?;
            data(&a.batching)
        }
        Command::Grad(a) => {
            common(&a.common)?;
            data(&a.batching)?;
            lora(&a.lora, false)
        }
        Command::Curvature(a) => {
            common(&a.common)?;
            data(&a.batching)?;
            lora(&a.lora, false)?;
            estimate(&a.estimate)
        }
        Command::Train(a) => {
            common(&a.common)?;
            data(&a.batching)?;
            lora(&a.lora, false)?;
            hyper(&a.hyper)?;
            penalty(a.lambda, a.delta)
        }
        Command::Sweep(a) => {
            common(&a.common)?;
            data(&a.batching)?;
            lora(&a.lora, true)?;
            if let Some(r) = &a.ranks {
                crate::sweep::parse_ranks(r)?;
            }
            if let Some(l) = &a.lambdas {
                crate::sweep::parse_lambdas(l)?;
            }
            estimate(&a.estimate)?;
            hyper(&a.hyper)?;
            penalty(0.0, a.delta)?;
            // A standard error needs the spread of at least two sequences.
            at_least("--eval-limit", a.eval_limit, 2)?;
            at_least("--choice-limit", a.choice_limit, 2)?;
            at_least("--max-new-tokens", a.max_new_tokens, 1)?;
            at_least("--exact-match-limit", a.exact_match_limit, 2)
        }
        Command::Generate(a) => {
            common(&a.common)?;
            at_least("--max-new-tokens", a.max_new_tokens, 1)?;
            sampling(a.temperature, a.top_p)
        }
        Command::Demo(a) => {
            common(&a.common)?;
            data(&a.batching)?;
            if a.batching.max_len > 256 {
                refuse("--max-len", a.batching.max_len, "at most 256 in the demo")?;
            }
            lora(&a.lora, false)?;
            at_least("--steps", a.steps, 1)?;
            crate::sweep::parse_lambdas(&a.lambdas)?;
            at_least("--curvature-sequences", a.curvature_sequences, 1)?;
            at_least("--eval-sequences", a.eval_sequences, 2)?;
            at_least("--target-eval-sequences", a.target_eval_sequences, 2)?;
            at_least("--max-new-tokens", a.max_new_tokens, 1)?;
            positive("--lr", a.lr as f64)?;
            penalty(0.0, a.delta)
        }
        Command::Selftest(a) => common(&a.common),
    }
}
