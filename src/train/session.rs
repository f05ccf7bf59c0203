//! One training run with its side effects: the penalty from a curvature file, resume from
//! a checkpoint, periodic checkpoints, the output directory (`outdir`), a progress bar,
//! and the final PEFT adapter. Shared by `train`, `sweep`, `demo` and curvature warm-up.

use std::path::PathBuf;

use super::checkpoint::{self, Checkpoint, TrainerState};
use super::finite::first_non_finite;
use super::identity::RunIdentity;
use super::outdir::OutDir;
use super::penalty::{Penalty, not_loaded};
use super::trainer::{StepMetrics, TrainConfig, TrainState, train};
use crate::backend::Backend;
use crate::data::Example;
use crate::error::{Error, Result};
use crate::model::{HostLora, Llama};
use crate::progress;

/// How a training run is kept. `Default`: in memory only (no output directory, no
/// checkpoints), progress shown; the curvature warm-up, the selftest and tests run so.
#[derive(Default)]
pub struct SessionOptions {
    /// Adapter, checkpoints and metrics go here; `None` keeps everything in memory.
    pub out: Option<PathBuf>,
    /// Save a checkpoint every this many steps and at the end (0: never).
    pub checkpoint_every: usize,
    pub resume: bool,
    pub quiet: bool,
    /// `base_model_name_or_path` written into adapter_config.json; also the model's name
    /// in the run identity a resume is checked against.
    pub base_model: String,
    /// Stop after this step (for interrupting a run in tests); `None` runs to the end.
    pub stop_after: Option<usize>,
    /// Curvature file path recorded in the checkpoint.
    pub curvature_path: Option<PathBuf>,
    /// Lines for stderr (unless quiet) once the output directory is locked and a resume
    /// checked, just before the first step: said then, a refusal stays the one line it is.
    pub notices: Vec<String>,
}

pub struct SessionResult {
    pub lora: HostLora,
    /// The steps run by this call (not those before a resume).
    pub metrics: Vec<StepMetrics>,
}

/// Train from `init` (or the checkpoint under `out` with `resume`) with `penalty` at
/// `cfg.lambda` (none at lambda = 0: exactly plain LoRA). The penalty's curvature is part
/// of the run's identity at every lambda.
pub fn run<B: Backend>(
    be: &B,
    model: &Llama<B>,
    data: &[Example],
    cfg: &TrainConfig,
    penalty: Option<&Penalty<B>>,
    init: &HostLora,
    opts: &SessionOptions,
) -> Result<SessionResult> {
    if let Some(p) = penalty
        && (p.mean.cfg != init.cfg || p.mean.modules.len() != init.modules.len())
    {
        return Err(Error::usage(
            "the curvature file was estimated for a different LoRA configuration than the one trained",
        ));
    }
    if cfg.lambda.is_nan() || cfg.lambda < 0.0 {
        return Err(Error::usage("--lambda must be >= 0"));
    }
    if let Some(p) = penalty
        && p.delta() != cfg.delta
    {
        return Err(Error::usage(format!(
            "the penalty was prepared with delta {} but the run asks for {}",
            p.delta(),
            cfg.delta
        )));
    }
    let named = init.named_tensors().into_iter().map(|(n, _, d)| (n, d));
    if let Some(name) = first_non_finite(named) {
        return Err(Error::usage(format!(
            "the initial LoRA weights (--adapter, or the curvature's theta*) hold non-finite values in `{name}`"
        )));
    }
    let digest = penalty.map(Penalty::digest);
    let penalty = penalty.filter(|_| cfg.lambda > 0.0);
    if penalty.is_some_and(|p| !p.loaded()) {
        return Err(not_loaded());
    }
    let Some(path) = &opts.out else {
        let mut state = TrainState::fresh(be, init)?;
        let metrics = steps(be, model, data, cfg, penalty, &mut state, opts, |_, _| {
            Ok(())
        })?;
        let (lora, _, _) = state.to_host(be)?;
        return Ok(SessionResult { lora, metrics });
    };
    let identity = RunIdentity::new(&opts.base_model, &model.cfg, data, digest, init);
    let mut out = OutDir::open(path)?;
    let r = run_in(
        be, model, data, cfg, penalty, init, opts, identity, &mut out,
    );
    if let Err(e) = &r {
        // The run's error is what matters; a log that cannot be written adds nothing.
        let _ = out.log(&format!("error: {e}"));
    }
    r
}

/// [`run`] with an output directory: resume, checkpoints, results.
#[allow(clippy::too_many_arguments)]
fn run_in<B: Backend>(
    be: &B,
    model: &Llama<B>,
    data: &[Example],
    cfg: &TrainConfig,
    penalty: Option<&Penalty<B>>,
    init: &HostLora,
    opts: &SessionOptions,
    run: RunIdentity,
    out: &mut OutDir,
) -> Result<SessionResult> {
    let (mut state, history) = if opts.resume {
        let ck = checkpoint::load(&out.path, &model.cfg)?;
        run.check_resume(cfg, &ck.state.run, &ck.state.config)
            .map_err(|m| Error::file(checkpoint::dir(&out.path).join("trainer_state.json"), m))?;
        let state = TrainState {
            lora: ck.lora.map(|x| be.buf(x.clone()))?,
            m: ck.m.map(|x| be.buf(x.clone()))?,
            v: ck.v.map(|x| be.buf(x.clone()))?,
            step: ck.state.step,
        };
        (state, ck.metrics)
    } else {
        (TrainState::fresh(be, init)?, Vec::new())
    };
    if !opts.quiet {
        opts.notices.iter().for_each(|n| eprintln!("{n}"));
    }
    out.log(&format!(
        "start at step {} of {}{}",
        state.step,
        cfg.steps,
        if opts.resume { " (resumed)" } else { "" }
    ))?;
    let path = out.path.clone();
    let save = |state: &TrainState<B>, metrics: &[StepMetrics]| -> Result<()> {
        let (lora, m, v) = state.to_host(be)?;
        let st = TrainerState {
            step: state.step,
            config: cfg.clone(),
            run: run.clone(),
            curvature: opts.curvature_path.clone(),
        };
        let metrics = [history.as_slice(), metrics].concat();
        let ck = Checkpoint {
            state: st,
            lora,
            m,
            v,
            metrics,
        };
        checkpoint::save(&path, &ck, &opts.base_model)
    };
    let every = opts.checkpoint_every;
    let until = opts.stop_after.unwrap_or(cfg.steps);
    let metrics = steps(
        be,
        model,
        data,
        cfg,
        penalty,
        &mut state,
        opts,
        |done, st| {
            let Some(m) = done.last() else { return Ok(()) };
            out.log_step(m, cfg.steps)?;
            if every > 0 && m.step % every == 0 && m.step < until {
                save(st, done)?;
            }
            Ok(())
        },
    )?;
    if every > 0 && !metrics.is_empty() {
        save(&state, &metrics)?;
    }
    let (lora, _, _) = state.to_host(be)?;
    if state.step >= cfg.steps {
        out.finish(
            &lora,
            &opts.base_model,
            &[history, metrics.clone()].concat(),
        )?;
    }
    Ok(SessionResult { lora, metrics })
}

/// Run the steps with a progress bar, calling `after` with the metrics so far.
#[allow(clippy::too_many_arguments)]
fn steps<B: Backend>(
    be: &B,
    model: &Llama<B>,
    data: &[Example],
    cfg: &TrainConfig,
    penalty: Option<&Penalty<B>>,
    state: &mut TrainState<B>,
    opts: &SessionOptions,
    mut after: impl FnMut(&[StepMetrics], &TrainState<B>) -> Result<()>,
) -> Result<Vec<StepMetrics>> {
    let pb = progress::bar(cfg.steps as u64, "train", opts.quiet).unit("steps");
    pb.set_position(state.step as u64);
    let mut metrics = Vec::new();
    let until = opts.stop_after.unwrap_or(cfg.steps);
    train(be, model, data, cfg, penalty, state, until, |m, st| {
        pb.set_position(m.step as u64);
        pb.set_message(format!("loss {:.3}", m.loss));
        metrics.push(m.clone());
        after(&metrics, st)
    })?;
    pb.finish_and_clear();
    Ok(metrics)
}
