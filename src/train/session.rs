//! One training run with its side effects: the penalty from a curvature file, resume from
//! a checkpoint, periodic checkpoints, the metrics log (`metrics.jsonl`), a progress bar,
//! and the final PEFT adapter. Shared by `train`, `sweep`, `demo` and curvature warm-up.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::checkpoint::{self, Checkpoint, TrainerState};
use super::penalty::Penalty;
use super::trainer::{StepMetrics, TrainConfig, TrainState, train};
use crate::backend::Backend;
use crate::curvature::Curvature;
use crate::data::Example;
use crate::error::{Error, IoContext, Result};
use crate::model::{HostLora, Llama};
use crate::progress;

pub struct SessionOptions {
    /// Adapter, checkpoints and metrics go here; `None` keeps everything in memory.
    pub out: Option<PathBuf>,
    /// Save a checkpoint every this many steps and at the end (0: never).
    pub checkpoint_every: usize,
    pub resume: bool,
    pub quiet: bool,
    /// `base_model_name_or_path` written into adapter_config.json.
    pub base_model: String,
    /// Stop after this step (for interrupting a run in tests); `None` runs to the end.
    pub stop_after: Option<usize>,
    /// Curvature file path recorded in the checkpoint.
    pub curvature_path: Option<PathBuf>,
}

pub struct SessionResult {
    pub lora: HostLora,
    pub metrics: Vec<StepMetrics>,
}

/// Train from `init` (or the checkpoint under `out` with `resume`) with the penalty of
/// `curvature` at `cfg.lambda` (none at lambda = 0: exactly plain LoRA).
pub fn run<B: Backend>(
    be: &B,
    model: &Llama<B>,
    data: &[Example],
    cfg: &TrainConfig,
    curvature: Option<&Curvature>,
    init: &HostLora,
    opts: &SessionOptions,
) -> Result<SessionResult> {
    if let Some(c) = curvature
        && (c.mean.cfg != init.cfg || c.mean.modules.len() != init.modules.len()) {
            return Err(Error::usage(
                "the curvature file was estimated for a different LoRA configuration than the one trained",
            ));
        }
    let penalty = match curvature {
        Some(c) if cfg.lambda > 0.0 => Some(Penalty::new(be, c, cfg.lambda, cfg.delta)?),
        _ => None,
    };
    let mut state = match (&opts.out, opts.resume) {
        (Some(out), true) => {
            let ck = checkpoint::load(out, &model.cfg)?;
            if &ck.state.config != cfg {
                return Err(Error::file(
                    checkpoint::dir(out).join("trainer_state.json"),
                    "the checkpoint was made with different training settings; resume with the same flags",
                ));
            }
            TrainState {
                lora: ck.lora.map(|x| be.buf(x.clone()))?,
                m: ck.m.map(|x| be.buf(x.clone()))?,
                v: ck.v.map(|x| be.buf(x.clone()))?,
                step: ck.state.step,
            }
        }
        _ => TrainState::fresh(be, init)?,
    };
    let mut log = match &opts.out {
        Some(out) => Some(MetricsLog::open(out, state.step)?),
        None => None,
    };
    let pb = progress::bar(cfg.steps as u64, "train", opts.quiet);
    pb.set_position(state.step as u64);
    let mut metrics = Vec::new();
    let until = opts.stop_after.unwrap_or(cfg.steps);
    let save = |state: &TrainState<B>| -> Result<()> {
        let Some(out) = &opts.out else { return Ok(()) };
        let (lora, m, v) = state.to_host(be)?;
        let st = TrainerState {
            step: state.step,
            config: cfg.clone(),
            curvature: opts.curvature_path.clone(),
        };
        checkpoint::save(
            out,
            &Checkpoint {
                state: st,
                lora,
                m,
                v,
            },
            &opts.base_model,
        )
    };
    train(
        be,
        model,
        data,
        cfg,
        penalty.as_ref(),
        &mut state,
        until,
        |m, st| {
            pb.set_position(m.step as u64);
            pb.set_message(format!("loss {:.3}", m.loss));
            if let Some(log) = log.as_mut() {
                log.write(m)?;
            }
            metrics.push(m.clone());
            if opts.checkpoint_every > 0 && m.step % opts.checkpoint_every == 0 && m.step < until {
                save(st)?;
            }
            Ok(())
        },
    )?;
    pb.finish_and_clear();
    if opts.checkpoint_every > 0 {
        save(&state)?;
    }
    let (lora, _, _) = state.to_host(be)?;
    if let (Some(out), true) = (&opts.out, state.step >= cfg.steps) {
        lora.save(out, &opts.base_model)?;
    }
    Ok(SessionResult { lora, metrics })
}

/// `metrics.jsonl`: one JSON object per step; on resume, lines past the checkpoint go.
struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    fn open(out: &Path, keep_until: usize) -> Result<Self> {
        std::fs::create_dir_all(out).at(out)?;
        let path = out.join("metrics.jsonl");
        let kept: String = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter(|l| serde_json::from_str::<StepMetrics>(l).is_ok_and(|m| m.step <= keep_until))
            .map(|l| format!("{l}\n"))
            .collect();
        crate::io::atomic_write(&path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .at(&path)?;
        Ok(MetricsLog { file, path })
    }

    fn write(&mut self, m: &StepMetrics) -> Result<()> {
        let line = serde_json::to_string(m).unwrap_or_default();
        writeln!(self.file, "{line}").at(&self.path)
    }
}
