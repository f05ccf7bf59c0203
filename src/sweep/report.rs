//! The sweep's report: `results.json`, `results.csv`, `results.md` (the runs' table, the
//! accuracy table, the notes and the cost table) and the call for its frontier plot.

use std::path::{Path, PathBuf};

use super::{OVERLAY, Report, Row, SetInfo, lambda_label};
use crate::cost::{self, CostBlock, StageCost};
use crate::error::Result;
use crate::io::atomic_write;

/// The stages whose cost a grid sweep's CSV rows carry.
const COST_STAGES: [&str; 3] = ["curvature", "train", "eval"];

/// `target-test (32 sequences, 190 predicted tokens), ...`
pub fn describe_sets(sets: &[SetInfo]) -> String {
    sets.iter()
        .map(|s| {
            format!(
                "{} ({} sequences, {} predicted tokens)",
                s.name, s.n_sequences, s.n_tokens
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Report {
    pub fn write(&self, out: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).unwrap_or_default();
        atomic_write(&out.join("results.json"), json.as_bytes())?;
        atomic_write(&out.join("results.csv"), self.csv().as_bytes())?;
        let md = format!(
            "{}\n{}\n{}",
            self.markdown(),
            self.notes().join("\n") + "\n",
            self.cost_markdown()
        );
        atomic_write(&out.join("results.md"), md.as_bytes())?;
        match self.grid.is_empty() {
            true => self.plot(&out.join("frontier.svg")),
            false => self.plot_overlay(&out.join(OVERLAY)),
        }
    }

    /// The files of the report: those `write` writes and, for a grid sweep, each shape's
    /// frontier plot (written as its runs end).
    pub fn paths(&self, out: &Path) -> Vec<PathBuf> {
        let plot = if self.grid.is_empty() {
            "frontier.svg"
        } else {
            OVERLAY
        };
        let mut paths: Vec<PathBuf> = ["results.md", "results.csv", "results.json", plot]
            .iter()
            .map(|f| out.join(f))
            .collect();
        paths.extend(
            self.grid
                .iter()
                .map(|g| out.join(&g.dir).join("frontier.svg")),
        );
        paths
    }

    /// The rows of shape `k` of a grid sweep; with `None`, the others (every row of a plain
    /// sweep, the base row of a grid sweep).
    pub(super) fn rows_of(&self, k: Option<usize>) -> impl Iterator<Item = &Row> {
        self.rows
            .iter()
            .filter(move |r| r.grid.as_ref().map(|g| g.shape) == k)
    }

    /// `1e1`, or `r=4 all, 1e1` in a grid sweep.
    fn run_label(&self, r: &Row) -> String {
        match &r.grid {
            Some(g) => format!("{}, {}", g.name(), lambda_label(r.lambda)),
            None => lambda_label(r.lambda),
        }
    }

    fn cost_block<'a>(
        &'a self,
        k: Option<usize>,
        curvature: Option<(String, &'a StageCost)>,
    ) -> CostBlock<'a> {
        CostBlock {
            curvature,
            runs: self
                .rows_of(k)
                .map(|r| (self.run_label(r), r.lambda, r.cost.as_slice()))
                .collect(),
        }
    }

    /// The cost table: each run's stages, stage I first when it ran here; in a grid sweep
    /// the base model's, then each shape's (its stage I, then its runs).
    pub fn cost_markdown(&self) -> String {
        let stage1 = self.cost.curvature.as_ref().map(|c| ("stage I".into(), c));
        let mut blocks = vec![self.cost_block(None, stage1)];
        let mut penalty: Vec<(String, u64)> = self
            .cost
            .penalty_state_bytes
            .map(|b| (String::new(), b))
            .into_iter()
            .collect();
        for (k, g) in self.grid.iter().enumerate() {
            let name = g.name();
            let stage1 = g.cost.curvature.as_ref();
            blocks.push(self.cost_block(Some(k), stage1.map(|c| (format!("{name}: stage I"), c))));
            penalty.extend(g.cost.penalty_state_bytes.map(|b| (name, b)));
        }
        cost::markdown(&blocks, &penalty)
    }

    /// Whether the grid compares curvatures (its points name theirs).
    pub(super) fn over_curvatures(&self) -> bool {
        self.grid.iter().any(|g| g.curvature.is_some())
    }

    /// A grid sweep's leading columns (rank, targets, and curvature in a grid over
    /// curvatures), as header and separator.
    fn lead_header(&self) -> (&'static str, &'static str) {
        match (self.grid.is_empty(), self.over_curvatures()) {
            (true, _) => ("", ""),
            (false, false) => ("| rank | targets ", "|---:|---"),
            (false, true) => ("| rank | targets | curvature ", "|---:|---|---"),
        }
    }

    /// A row's leading columns: its rank and targets (and curvature) in a grid sweep, blank
    /// for the base.
    fn lead(&self, r: &Row) -> String {
        if self.grid.is_empty() {
            return String::new();
        }
        let curvatures = self.over_curvatures();
        match &r.grid {
            Some(g) if curvatures => format!(
                "| {} | {} | {} ",
                g.rank,
                g.targets,
                g.curvature.as_deref().unwrap_or("")
            ),
            Some(g) => format!("| {} | {} ", g.rank, g.targets),
            None if curvatures => "| | | ".into(),
            None => "| | ".into(),
        }
    }

    /// A grid sweep's trailing CSV columns of a row: its Pareto flag over the grid, then
    /// wall time, tokens/s, GFLOP and peak RSS of each stage (stage I: its shape's, shared by
    /// the shape's rows).
    fn csv_tail(&self, r: &Row) -> String {
        let mut s = format!(",{}", r.grid.as_ref().is_some_and(|g| g.grid_pareto));
        for stage in COST_STAGES {
            let c = match (stage, &r.grid) {
                ("curvature", Some(g)) => self.grid[g.shape].cost.curvature.as_ref(),
                _ => r.cost.iter().find(|c| c.stage == stage),
            };
            s += &match c {
                Some(c) => format!(
                    ",{:.3},{:.1},{:.6},{:.1}",
                    c.wall_s,
                    c.tokens_per_s,
                    c.flops as f64 / 1e9,
                    c.peak_rss_mib
                ),
                None => ",,,,".into(),
            };
        }
        s
    }

    pub(super) fn sources(&self) -> Vec<String> {
        self.rows
            .first()
            .map(|r| r.sources.iter().map(|s| s.name.clone()).collect())
            .unwrap_or_default()
    }

    fn choice_sets(&self) -> Vec<String> {
        self.rows
            .first()
            .map(|r| r.choice.iter().map(|c| c.name.clone()).collect())
            .unwrap_or_default()
    }

    pub fn csv(&self) -> String {
        let grid = !self.grid.is_empty();
        let curvatures = self.over_curvatures();
        let mut s = String::new();
        if grid {
            s += "rank,targets,";
            if curvatures {
                s += "curvature,";
            }
            s += "lora_params,";
        }
        s += "lambda,target_nll,learning,learning_se";
        for n in self.sources() {
            s += &format!(",{n}_nll,{n}_forgetting,{n}_forgetting_se");
        }
        for n in self.choice_sets() {
            for m in ["acc", "acc_norm"] {
                s += &format!(",{n}_{m},{n}_{m}_se,{n}_{m}_drop,{n}_{m}_drop_se");
            }
        }
        s += ",exact_match,exact_match_se,exact_match_gain,exact_match_gain_se";
        s += ",final_train_loss,pareto";
        if grid {
            s += ",grid_pareto";
            for st in COST_STAGES {
                s += &format!(",{st}_s,{st}_tokens_per_s,{st}_gflop,{st}_peak_rss_mib");
            }
        }
        s += "\n";
        for r in &self.rows {
            if grid {
                s += &match &r.grid {
                    // Quoted: a set of modules is comma-separated.
                    Some(g) => format!("{},\"{}\",", g.rank, g.targets),
                    None => ",,".into(),
                };
                if curvatures {
                    let c = r.grid.as_ref().and_then(|g| g.curvature.as_deref());
                    s += &format!("{},", c.unwrap_or(""));
                }
                s += &match &r.grid {
                    Some(g) => format!("{},", g.lora_params),
                    None => ",".into(),
                };
            }
            s += &format!(
                "{},{:.6},{:.6},{:.6}",
                r.lambda.map(|l| l.to_string()).unwrap_or("base".into()),
                r.target_nll,
                r.learning,
                r.learning_se
            );
            for x in &r.sources {
                s += &format!(",{:.6},{:.6},{:.6}", x.nll, x.forgetting, x.forgetting_se);
            }
            for c in &r.choice {
                for v in c.columns() {
                    s += &format!(",{v:.6}");
                }
            }
            let em = r
                .exact_match
                .as_ref()
                .map(|e| {
                    format!(
                        "{:.6},{:.6},{:.6},{:.6}",
                        e.accuracy, e.accuracy_se, e.gain, e.gain_se
                    )
                })
                .unwrap_or(",,,".into());
            let fl = r
                .final_train_loss
                .map(|l| format!("{l:.6}"))
                .unwrap_or_default();
            s += &format!(",{em},{fl},{}", r.pareto);
            if grid {
                s += &self.csv_tail(r);
            }
            s += "\n";
        }
        s
    }

    /// The table; each learning and forgetting figure is followed by its ± column.
    pub fn markdown(&self) -> String {
        let (lead, lead_sep) = self.lead_header();
        let grid = !self.grid.is_empty();
        let mut s = format!("{lead}| lambda | {} NLL | learning | ± |", self.target);
        let mut sep = format!("{lead_sep}|---:|---:|---:|---:|");
        for n in self.sources() {
            s += &format!(" {n} NLL | forgetting ({n}) | ± |");
            sep += "---:|---:|---:|";
        }
        s += if grid {
            " Pareto | grid Pareto |\n"
        } else {
            " Pareto |\n"
        };
        s += &sep;
        s += if grid { "---|---|\n" } else { "---|\n" };
        for r in &self.rows {
            s += &format!(
                "{}| {} | {:.4} | {:+.4} | {:.4} |",
                self.lead(r),
                lambda_label(r.lambda),
                r.target_nll,
                r.learning,
                r.learning_se
            );
            for x in &r.sources {
                s += &format!(
                    " {:.4} | {:+.4} | {:.4} |",
                    x.nll, x.forgetting, x.forgetting_se
                );
            }
            s += if r.pareto { " * |" } else { " |" };
            if grid {
                let optimal = r.grid.as_ref().is_some_and(|g| g.grid_pareto);
                s += if optimal { " * |" } else { " |" };
            }
            s += "\n";
        }
        s + &self.accuracy_markdown()
    }

    /// The accuracy table (empty without multiple-choice sets or exact match): exact
    /// match and its gain (learning), each set's acc and acc_norm and their drops
    /// (forgetting), each figure followed by its ± column.
    fn accuracy_markdown(&self) -> String {
        let has_em = self.rows.iter().any(|r| r.exact_match.is_some());
        let sets = self.choice_sets();
        if !has_em && sets.is_empty() {
            return String::new();
        }
        let (lead, lead_sep) = self.lead_header();
        let mut s = format!("\n{lead}| lambda |");
        let mut sep = format!("{lead_sep}|---:|");
        if has_em {
            s += " exact match | ± | gain | ± |";
            sep += "---:|---:|---:|---:|";
        }
        for n in &sets {
            s += &format!(" {n} acc | ± | drop | ± | {n} acc_norm | ± | drop | ± |");
            sep += "---:|---:|---:|---:|---:|---:|---:|---:|";
        }
        s += "\n";
        s += &sep;
        s += "\n";
        for r in &self.rows {
            s += &format!("{}| {} |", self.lead(r), lambda_label(r.lambda));
            if let Some(e) = &r.exact_match {
                s += &format!(
                    " {:.4} | {:.4} | {:+.4} | {:.4} |",
                    e.accuracy, e.accuracy_se, e.gain, e.gain_se
                );
            }
            for c in &r.choice {
                for (i, v) in c.columns().into_iter().enumerate() {
                    // The drops (third of each four) carry their sign.
                    s += &match i % 4 {
                        2 => format!(" {v:+.4} |"),
                        _ => format!(" {v:.4} |"),
                    };
                }
            }
            s += "\n";
        }
        s
    }

    /// What the table means and what its figures rest on.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = vec![
            "learning = drop of the target NLL, forgetting = rise of a source NLL, both from \
             the base model, in nats per predicted token; ± = one standard error over the \
             set's sequences, from per-sequence differences paired with the base model"
                .to_string(),
            format!("sets: {}", describe_sets(&self.sets)),
            "* = Pareto-optimal: no other run learns more by over one standard error without \
             forgetting more (primary source) by over one, or forgets less by over one without \
             learning less by over one (each difference paired between the two runs)"
                .to_string(),
        ];
        if !self.accuracy_markdown().is_empty() {
            notes.push(
                "second table: exact match (learning; gain = run minus base) and multiple-choice \
                 acc / acc_norm as lm-eval scores them (forgetting; drop = base minus run), on \
                 the first n questions of each file; the ± after an accuracy is its binomial \
                 standard error, after a gain or drop that of the per-question differences \
                 paired with the base model; the Pareto marking uses the NLL figures only"
                    .to_string(),
            );
        }
        if self.over_curvatures() {
            notes.push(format!(
                "grid over curvatures: rank, targets and curvature give each run's point; a \
                 point's runs are those a plain sweep of that shape with that curvature makes \
                 (from the same base-model figures and the same init), and plain LoRA (lambda \
                 0) runs once, being the same under every curvature; * marks the \
                 Pareto-optimal runs within their point, grid Pareto those among every run of \
                 the grid; plots: <point>/frontier.svg for each point, {OVERLAY} for all (a \
                 colour per point; a point filled where Pareto-optimal over the grid)"
            ));
        } else if !self.grid.is_empty() {
            notes.push(format!(
                "grid: rank and targets give each run's LoRA shape; a shape's runs are those a \
                 plain sweep of that shape makes (from the same base-model figures); * marks \
                 the Pareto-optimal runs within their shape, grid Pareto those among every run \
                 of the grid; plots: <shape>/frontier.svg for each shape, {OVERLAY} for all \
                 (a colour per shape; a point filled where Pareto-optimal over the grid)"
            ));
        }
        notes
    }
}
