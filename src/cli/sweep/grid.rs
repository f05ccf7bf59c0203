//! Grid sweeps: the sweep for each LoRA shape of `--ranks` x the `--targets` sets, each
//! shape penalised by a `--curvature` file that fits it or by a curvature estimated for it
//! (`--curvature-data`).

use std::path::Path;
use std::rc::Rc;

use super::super::LoraArgs;
use super::super::curvature::{Source, Stage1, keep_self_data};
use super::{CURVATURE_FILE, SweepArgs, SweepTask, status};
use crate::backend::Backend;
use crate::backend::device::BackendTask;
use crate::curvature::Curvature;
use crate::data::Example;
use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::{HostLora, Llama, LoadedModel, LoraConfig};
use crate::sweep::{self, GridEntry, Prepared, Report};
use crate::train::Penalty;

/// A grid sweep: the sweep for each LoRA shape. `sweep.curvature` is a --curvature file
/// that fits every shape (checked); `sweep.init` is unused, each shape starting at its own.
pub(super) struct GridTask {
    pub(super) sweep: SweepTask,
    pub(super) grid: Vec<GridEntry>,
    /// Stage I for each shape (--curvature-data), its source data still to be sampled
    /// when self-generated.
    pub(super) estimate: Option<(Source, Stage1)>,
    pub(super) seed: u64,
}

impl BackendTask for GridTask {
    type Output = Report;
    fn run<B: Backend>(mut self, be: &B) -> Result<Report> {
        let s = &mut self.sweep;
        let model = Llama::new(be, s.model.cfg.clone(), s.model.take_weights())?;
        let (quiet, out, delta) = (s.quiet, s.out.clone(), s.train.delta);
        // A --curvature file fits every shape: its penalty is built once, for them all.
        let lambdas: Vec<f32> = (self.grid.iter())
            .flat_map(|e| e.lambdas.as_deref().unwrap_or(&s.lambdas))
            .copied()
            .collect();
        let fixed = match s.curvature.take() {
            Some(c) => {
                let theta = c.mean.clone();
                let penalty = Penalty::for_lambdas(be, c, delta, &lambdas)?;
                Some((theta, Rc::new(penalty)))
            }
            None => None,
        };
        let estimate = match self.estimate {
            Some((source, stage)) => {
                let (data, sampled) = source.examples(be, &model, quiet)?;
                if sampled {
                    // Sampled once, from the base model: the same data for every shape.
                    keep_self_data(&out.join(CURVATURE_FILE), &data)?;
                }
                Some((stage, data))
            }
            None => None,
        };
        let (grid, seed) = (self.grid, self.seed);
        self.sweep.with_spec(|spec, _, files| {
            let shapes = Shapes {
                files,
                fixed: fixed.as_ref(),
                delta,
                estimate: estimate.as_ref().map(|(s, d)| (s, d.as_slice())),
                seed,
                quiet,
            };
            let prepare = |e: &GridEntry, dir: &Path| {
                let lambdas = e.lambdas.as_deref().unwrap_or(&spec.lambdas);
                shapes.prepare(be, &model, &e.cfg, lambdas, dir)
            };
            sweep::run_grid(be, &model, spec, &grid, &out, prepare, status(quiet))
        })
    }
}

/// How a grid sweep makes each shape ready: the --curvature file that fits it, a
/// curvature estimated for it, or neither (lambda 0 only).
struct Shapes<'a, B: Backend> {
    files: &'a LoadedModel,
    /// The --curvature file's theta* and penalty.
    fixed: Option<&'a (HostLora, Rc<Penalty<B>>)>,
    /// The prior precision of the penalties estimated here.
    delta: f32,
    estimate: Option<(&'a Stage1, &'a [Example])>,
    seed: u64,
    quiet: bool,
}

impl<B: Backend> Shapes<'_, B> {
    fn prepare(
        &self,
        be: &B,
        model: &Llama<B>,
        cfg: &LoraConfig,
        lambdas: &[f32],
        dir: &Path,
    ) -> Result<Prepared<B>> {
        if let Some((theta, penalty)) = self.fixed {
            return Ok(Prepared {
                init: theta.clone(),
                penalty: Some(penalty.clone()),
                curvature_cost: None,
            });
        }
        let fresh = HostLora::init(&self.files.cfg, cfg.clone(), self.seed);
        let Some((stage, data)) = self.estimate else {
            return Ok(Prepared {
                init: fresh,
                penalty: None,
                curvature_cost: None,
            });
        };
        if !self.quiet {
            eprintln!(
                "sweep: {}: estimating the curvature ({}) on {} sequences",
                sweep::shape_label(cfg),
                stage.describe(),
                data.len()
            );
        }
        let identity = &self.files.identity;
        let (c, cost) = stage.estimate(be, model, identity, &fresh, data, self.quiet)?;
        c.write(&dir.join(CURVATURE_FILE))?;
        Ok(Prepared {
            init: c.mean.clone(),
            penalty: Some(Rc::new(Penalty::for_lambdas(be, c, self.delta, lambdas)?)),
            curvature_cost: Some(cost),
        })
    }
}

/// The LoRA shapes of a grid sweep: each rank of --ranks (else --rank) with each --targets
/// set, in that order; `None` for a plain sweep (no --ranks, at most one --targets, no
/// --curvature-data). What the flags leave open a --curvature file's shape fills in, as in
/// a plain sweep (`fixed`).
pub(super) fn grid(
    a: &SweepArgs,
    model: &LlamaConfig,
    fixed: Option<&LoraConfig>,
) -> Result<Option<Vec<LoraConfig>>> {
    if a.ranks.is_none() && a.lora.targets.len() < 2 && a.curvature_data.is_none() {
        return Ok(None);
    }
    let flags = match fixed {
        Some(cfg) => filled(&a.lora, cfg),
        None => a.lora.clone(),
    };
    let ranks: Vec<Option<usize>> = match &a.ranks {
        Some(s) => sweep::parse_ranks(s)?.into_iter().map(Some).collect(),
        None => vec![flags.rank],
    };
    let sets: Vec<Vec<String>> = match flags.targets.as_slice() {
        [] => vec![Vec::new()],
        sets => sets.iter().map(|t| vec![t.clone()]).collect(),
    };
    let mut shapes: Vec<LoraConfig> = Vec::new();
    for rank in ranks {
        for targets in &sets {
            let one = LoraArgs {
                rank,
                targets: targets.clone(),
                ..flags.clone()
            };
            let cfg = one.config(model)?;
            if shapes.contains(&cfg) {
                return Err(Error::usage(format!(
                    "--ranks / --targets name the LoRA shape {} twice",
                    sweep::shape_label(&cfg)
                )));
            }
            shapes.push(cfg);
        }
    }
    Ok(Some(shapes))
}

/// `lora` with what it leaves open taken from `cfg`.
fn filled(lora: &LoraArgs, cfg: &LoraConfig) -> LoraArgs {
    let targets = match lora.targets.is_empty() {
        true => vec![sweep::targets_label(&cfg.targets)],
        false => lora.targets.clone(),
    };
    LoraArgs {
        rank: lora.rank.or(Some(cfg.r)),
        alpha: lora.alpha.or(Some(cfg.alpha)),
        targets,
        rslora: lora.rslora || cfg.use_rslora,
    }
}

/// A --curvature file in a grid sweep must fit every shape of it (it fits one).
pub(super) fn check_fits(
    c: &Curvature,
    path: &Path,
    grid: &[LoraConfig],
    m: &LoadedModel,
) -> Result<()> {
    for cfg in grid {
        let lora = HostLora::init(&m.cfg, cfg.clone(), 0);
        let what = format!("the grid's shape {}", sweep::shape_label(cfg));
        c.check_lora(path, &lora, &what).map_err(|e| match e {
            Error::File { path, msg } => Error::File {
                path,
                msg: format!(
                    "{msg}; a file fits one shape, --curvature-data estimates one for each"
                ),
            },
            e => e,
        })?;
    }
    Ok(())
}
