//! Grid sweeps: the lambdas of a plain sweep run for each point of a grid of LoRA shapes
//! (rank and target modules) or of curvatures of one shape, after one evaluation of the base
//! model; the points' names and output directories, and the table and plots over all.

use std::path::Path;
use std::rc::Rc;

use super::pareto::{mark_pareto, pareto_flags};
use super::plot::frontier_svg;
use super::{
    GridPoint, GridShape, Report, Row, Shape, SweepSpec, evaluate_base, require_curvature,
    train_lambdas,
};
use crate::backend::Backend;
use crate::cost::{StageCost, SweepCost};
use crate::error::Result;
use crate::model::{HostLora, Llama, LoraConfig, Proj};
use crate::progress;
use crate::train::Penalty;

/// A LoRA shape of a grid sweep made ready to train.
pub struct Prepared<B: Backend> {
    /// Where training starts: the curvature's θ* when there is one, else a fresh init.
    pub init: HostLora,
    /// Its curvature's penalty (shared where shapes share one curvature).
    pub penalty: Option<Rc<Penalty<B>>>,
    /// Stage I, when it ran for this shape.
    pub curvature_cost: Option<StageCost>,
}

/// `all`, or the modules comma-separated (`q_proj,v_proj`).
pub fn targets_label(targets: &[Proj]) -> String {
    if targets == Proj::ALL {
        return "all".into();
    }
    let names: Vec<&str> = targets.iter().map(|p| p.name()).collect();
    names.join(",")
}

/// `r=4 all`: how the status lines, progress lines, tables and plots name a shape.
pub fn shape_name(rank: usize, targets: &str) -> String {
    format!("r={rank} {targets}")
}

pub fn shape_label(cfg: &LoraConfig) -> String {
    shape_name(cfg.r, &targets_label(&cfg.targets))
}

/// `r=4 all`, or `r=8 all, curvature quac` in a grid over curvatures: how the status lines,
/// progress lines, tables and plots name a grid's point.
pub fn point_name(rank: usize, targets: &str, curvature: Option<&str>) -> String {
    match curvature {
        Some(c) => format!("{}, curvature {c}", shape_name(rank, targets)),
        None => shape_name(rank, targets),
    }
}

impl GridPoint {
    pub fn name(&self) -> String {
        point_name(self.rank, &self.targets, self.curvature.as_deref())
    }
}

impl GridShape {
    pub fn name(&self) -> String {
        point_name(self.rank, &self.targets, self.curvature.as_deref())
    }
}

/// One point of a grid sweep to run.
#[derive(Debug, Clone)]
pub struct GridEntry {
    pub cfg: LoraConfig,
    /// The name of its curvature where the grid compares several for one shape (the
    /// demo's data study): it names the point and its directory.
    pub curvature: Option<String>,
    /// Its own lambdas (`None`: the sweep's). In a grid over curvatures only one point
    /// needs lambda 0, plain LoRA being the same run under every curvature.
    pub lambdas: Option<Vec<f32>>,
}

impl GridEntry {
    /// A point of a grid over LoRA shapes, with the sweep's lambdas.
    pub fn shape(cfg: LoraConfig) -> Self {
        GridEntry {
            cfg,
            curvature: None,
            lambdas: None,
        }
    }

    pub fn name(&self) -> String {
        point_name(
            self.cfg.r,
            &targets_label(&self.cfg.targets),
            self.curvature.as_deref(),
        )
    }

    /// Its directory in the output: `r4-all`, `r4-q_proj+v_proj`, `r8-all-quac`.
    pub fn dir(&self) -> String {
        match &self.curvature {
            Some(c) => format!("{}-{c}", shape_dir(&self.cfg)),
            None => shape_dir(&self.cfg),
        }
    }
}

/// A grid sweep's plot of every shape's frontier.
pub const OVERLAY: &str = "frontier-overlay.svg";

/// A shape's directory in the output: `r4-all`, `r4-q_proj+v_proj`.
pub fn shape_dir(cfg: &LoraConfig) -> String {
    format!(
        "r{}-{}",
        cfg.r,
        targets_label(&cfg.targets).replace(',', "+")
    )
}

/// The sweep for each point of `grid` (a combination of rank and target modules, and
/// perhaps a named curvature) from one evaluation of the base model: `prepare` makes each
/// point ready (given the point and its directory `out/<GridEntry::dir>`, which holds its
/// `runs/` and `frontier.svg`), then its lambdas run as in [`run`](super::run). One report over all,
/// written to `out` with an overlay of every point's frontier.
pub fn run_grid<B: Backend>(
    be: &B,
    model: &Llama<B>,
    spec: &SweepSpec<'_>,
    grid: &[GridEntry],
    out: &Path,
    mut prepare: impl FnMut(&GridEntry, &Path) -> Result<Prepared<B>>,
    mut on_run: impl FnMut(&Row),
) -> Result<Report> {
    let (base, base_row) = evaluate_base(be, model, spec)?;
    on_run(&base_row);
    let mut rows = vec![base_row];
    let mut shapes = Vec::new();
    for (k, entry) in grid.iter().enumerate() {
        let label = format!("{} ({}/{})", entry.name(), k + 1, grid.len());
        let dir = out.join(entry.dir());
        // Every progress line of this point's work names it.
        let _scope = progress::scope(entry.name());
        let p = prepare(entry, &dir)?;
        let lambdas = entry.lambdas.as_deref().unwrap_or(&spec.lambdas);
        require_curvature(lambdas, p.penalty.is_some())?;
        let point = GridPoint {
            rank: entry.cfg.r,
            targets: targets_label(&entry.cfg.targets),
            curvature: entry.curvature.clone(),
            lora_params: p.init.n_params(),
            grid_pareto: false,
            shape: k,
        };
        let shape = Shape {
            penalty: p.penalty.as_deref(),
            init: &p.init,
            dir: &dir,
            lambdas,
            point: Some((point.clone(), label)),
        };
        let mut runs = train_lambdas(be, model, &shape, spec, &base, &mut on_run)?;
        // Within the shape, marked as its own sweep would mark it.
        mark_pareto(&mut runs, &base.weights);
        let mine: Vec<&Row> = runs.iter().collect();
        frontier_svg(
            &dir.join("frontier.svg"),
            &format!(", {}", entry.name()),
            &spec.target.name,
            &mine,
        )?;
        rows.extend(runs);
        shapes.push(GridShape {
            rank: point.rank,
            targets: point.targets,
            curvature: point.curvature,
            lora_params: point.lora_params,
            dir: entry.dir(),
            cost: SweepCost {
                curvature: p.curvature_cost,
                penalty_state_bytes: p.penalty.as_deref().and_then(Penalty::state_bytes),
            },
        });
    }
    let over_grid = pareto_flags(&rows, &base.weights);
    for (r, optimal) in rows.iter_mut().zip(over_grid) {
        if let Some(g) = &mut r.grid {
            g.grid_pareto = optimal;
        }
    }
    let report = Report {
        target: spec.target.name.clone(),
        sets: base.sets,
        rows,
        cost: SweepCost::default(),
        grid: shapes,
    };
    report.write(out)?;
    Ok(report)
}
