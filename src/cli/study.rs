//! The data study (`sweep --study data`, `demo --study data`; issue 9): one LoRA shape
//! and one lambda grid under four curvatures, to tell what the source data give the
//! penalty. From the most to the least informed:
//! - `source-data`: estimated on the source data given (the demo: QuAC passages);
//! - `self-generated`: estimated on as many sequences sampled from the base model itself
//!   (`self:N`), which needs no source data;
//! - `isotropic`: the source-data curvature's trace spread evenly over the parameters,
//!   the same total strength in no particular direction;
//! - `none`: no curvature, the penalty is the prior precision delta alone.
//!
//! Every curvature is taken at the same fresh init, so plain LoRA (lambda 0) is one run,
//! listed under `none`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use clap::ValueEnum;

use super::DataArgs;
use super::curvature::{EstimateArgs, Source, Stage1, keep_self_data};
use super::sweep::{CURVATURE_FILE, SweepTask, status};
use crate::backend::Backend;
use crate::backend::device::BackendTask;
use crate::cost::StageCost;
use crate::curvature::Curvature;
use crate::curvature::baseline::{isotropic, none};
use crate::error::Result;
use crate::model::{Llama, LoadedModel, LoraConfig};
use crate::sweep::{self, GridEntry, Prepared, Report};
use crate::train::Penalty;

/// What a sweep or the demo compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Study {
    /// The lambda grid under the curvature of the source data.
    Lambda,
    /// The lambda grid under four curvatures: the source data's, a self-generated set's,
    /// an isotropic one of the same trace, and none (delta only).
    Data,
}

/// The study's curvatures, in the order of its table.
pub const CURVATURES: [&str; 4] = ["none", "source-data", "self-generated", "isotropic"];

/// The grid of the study: plain LoRA and the delta-only runs under `none`, the positive
/// lambdas under each of the others.
pub fn entries(cfg: &LoraConfig, lambdas: &[f32]) -> Vec<GridEntry> {
    let positive: Vec<f32> = lambdas.iter().copied().filter(|&l| l > 0.0).collect();
    CURVATURES
        .iter()
        .map(|&name| GridEntry {
            cfg: cfg.clone(),
            curvature: Some(name.to_string()),
            lambdas: Some(if name == "none" {
                lambdas.to_vec()
            } else {
                positive.clone()
            }),
        })
        .collect()
}

/// Where the self-generated curvature of a study over `cfg` goes under `out` (its sampled
/// sequences beside it).
pub fn self_curvature_path(out: &Path, cfg: &LoraConfig) -> PathBuf {
    let entry = GridEntry {
        cfg: cfg.clone(),
        curvature: Some(CURVATURES[2].to_string()),
        lambdas: None,
    };
    out.join(entry.dir()).join(CURVATURE_FILE)
}

/// The self-generated source of a study: as many sequences as the source data, sampled as
/// `estimate` says (`--self-tokens`, `--self-prompts`), with the same estimator.
pub fn plan_self(
    estimate: &EstimateArgs,
    n: usize,
    out: &Path,
    cfg: &LoraConfig,
    m: &LoadedModel,
    batching: &DataArgs,
    seed: u64,
) -> Result<(Source, Stage1)> {
    let spec = PathBuf::from(format!("self:{n}"));
    Stage1::plan(
        estimate,
        ("--study data", &spec),
        &self_curvature_path(out, cfg),
        m,
        batching,
        seed,
    )
}

/// A data study ready to run: the sweep (its `init` the fresh init every curvature is
/// taken at), and stage I on the source data and on the self-generated set.
pub struct DataStudy {
    pub sweep: SweepTask,
    pub data: (Source, Stage1),
    pub self_generated: (Source, Stage1),
}

impl BackendTask for DataStudy {
    type Output = Report;
    fn run<B: Backend>(self, be: &B) -> Result<Report> {
        let mut s = self.sweep;
        let model = Llama::new(be, s.model.cfg.clone(), s.model.take_weights())?;
        let (quiet, out) = (s.quiet, s.out.clone());
        let identity = s.model.identity.clone();
        let say = |m: String| {
            if !quiet {
                eprintln!("study: {m}");
            }
        };
        let init = s.init.clone();
        let (source, stage) = self.data;
        let (data, _) = source.examples(be, &model, quiet)?;
        say(format!(
            "estimating the curvature ({}) on {} sequences of source data",
            stage.describe(),
            data.len()
        ));
        let (on_data, data_cost) = stage.estimate(be, &model, &identity, &init, &data, quiet)?;
        let (source, stage) = self.self_generated;
        say(format!(
            "sampling {} sequences from the base model",
            data.len()
        ));
        let (sampled, _) = source.examples(be, &model, quiet)?;
        keep_self_data(&self_curvature_path(&out, &init.cfg), &sampled)?;
        say(format!(
            "estimating the curvature ({}) on the {} self-generated sequences",
            stage.describe(),
            sampled.len()
        ));
        let (on_self, self_cost) = stage.estimate(be, &model, &identity, &init, &sampled, quiet)?;
        let mut curvatures: BTreeMap<&str, (Curvature, Option<StageCost>)> = BTreeMap::from([
            (CURVATURES[0], (none(&on_data), None)),
            (CURVATURES[3], (isotropic(&on_data), None)),
            (CURVATURES[1], (on_data, Some(data_cost))),
            (CURVATURES[2], (on_self, Some(self_cost))),
        ]);
        let (lambdas, delta) = (s.lambdas.clone(), s.train.delta);
        let grid = entries(&init.cfg, &lambdas);
        s.with_spec(|spec, _, _| {
            let prepare = |e: &GridEntry, dir: &Path| {
                let name = e.curvature.as_deref().unwrap_or_default();
                let lambdas = e.lambdas.as_deref().unwrap_or(&spec.lambdas);
                let (c, cost) = curvatures
                    .remove(name)
                    .unwrap_or_else(|| unreachable!("every entry names one of CURVATURES once"));
                c.write(&dir.join(CURVATURE_FILE))?;
                Ok(Prepared {
                    init: c.mean.clone(),
                    penalty: Some(Rc::new(Penalty::for_lambdas(be, c, delta, lambdas)?)),
                    curvature_cost: cost,
                })
            };
            sweep::run_grid(be, &model, spec, &grid, &out, prepare, status(quiet))
        })
    }
}
