//! The frontier plots (SVG through plotters): learning against forgetting with error bars,
//! Pareto-optimal runs marked; one plot per sweep or grid point, and the grid's overlay.

use std::cmp::Ordering;
use std::path::Path;

use plotters::prelude::*;

use super::{Report, Row, lambda_label};
use crate::error::{Error, Result};
use crate::io::atomic_write;

/// Colours of the overlay's shapes, in turn (matplotlib's tab10).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One sweep's trained runs on a frontier plot, in one colour.
struct Series<'a> {
    /// The legend entry of its line.
    name: String,
    color: RGBColor,
    rows: Vec<&'a Row>,
    /// The line joins the Pareto-optimal runs (`pareto`), else every run in lambda order.
    front: bool,
}

/// Forgetting on the primary source (0 without one): a run's x on the frontier plot.
fn forgetting(r: &Row) -> f64 {
    r.sources.first().map(|s| s.forgetting).unwrap_or(0.0)
}

/// The frontier of one sweep's `rows` (the base row is left out), Pareto-optimal points in
/// red; `caption_suffix` names the shape of a grid sweep's.
pub(super) fn frontier_svg(
    path: &Path,
    caption_suffix: &str,
    target: &str,
    rows: &[&Row],
) -> Result<()> {
    let src = rows
        .first()
        .and_then(|r| r.sources.first())
        .map(|s| s.name.as_str())
        .unwrap_or_default();
    let series = [Series {
        name: "Pareto front".into(),
        color: RED,
        rows: rows
            .iter()
            .filter(|r| r.lambda.is_some())
            .copied()
            .collect(),
        front: true,
    }];
    let caption = format!("LaLoRA: learning vs forgetting ({target} vs {src}){caption_suffix}");
    draw_frontiers(path, &caption, (target, src), &series, None, |r, _| {
        if r.pareto {
            RED.filled()
        } else {
            BLUE.filled()
        }
    })
}

/// Learning (y) against forgetting on the primary source (x): each series' points, with
/// error bars and lambda labels, and its line; `sets` names the target and the primary
/// source; `point` styles a run's point given its series' colour, and `filled` says in the
/// legend what a filled point means, when it means more than the colour.
fn draw_frontiers(
    path: &Path,
    caption: &str,
    (target, src): (&str, &str),
    series: &[Series<'_>],
    filled: Option<&str>,
    point: impl Fn(&Row, RGBColor) -> ShapeStyle,
) -> Result<()> {
    let pts: Vec<(f64, f64, &Row, RGBColor)> = series
        .iter()
        .flat_map(|s| {
            s.rows
                .iter()
                .map(move |r| (forgetting(r), r.learning, *r, s.color))
        })
        .collect();
    let err = |e: String| Error::file(path, format!("plot: {e}"));
    let span = |v: Vec<f64>| {
        let (lo, hi) = v
            .iter()
            .fold((0f64, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
        let pad = ((hi - lo) * 0.12).max(1e-3);
        (lo - pad)..(hi + pad)
    };
    // One standard error either way on each axis; finite only (n >= 2 sequences).
    let se = |v: f64| if v.is_finite() { v } else { 0.0 };
    let bars: Vec<(f64, f64, f64, f64)> = pts
        .iter()
        .map(|p| {
            let xse = p.2.sources.first().map(|s| se(s.forgetting_se));
            (p.0, p.1, xse.unwrap_or(0.0), se(p.2.learning_se))
        })
        .collect();
    let xr = span(bars.iter().flat_map(|b| [b.0 - b.2, b.0 + b.2]).collect());
    let yr = span(bars.iter().flat_map(|b| [b.1 - b.3, b.1 + b.3]).collect());
    let (xr_len, yr_len) = (xr.end - xr.start, yr.end - yr.start);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 18))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(xr, yr)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc(format!("forgetting: rise of {src} NLL (nats/token)"))
            .y_desc(format!("learning: drop of {target} NLL"))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for s in series {
            let mut line: Vec<&Row> = s
                .rows
                .iter()
                .filter(|r| r.pareto || !s.front)
                .copied()
                .collect();
            match s.front {
                true => line.sort_by(|a, b| forgetting(a).total_cmp(&forgetting(b))),
                false => {
                    line.sort_by(|a, b| a.lambda.partial_cmp(&b.lambda).unwrap_or(Ordering::Equal))
                }
            }
            let line = line.iter().map(|r| (forgetting(r), r.learning));
            let color = s.color;
            chart
                .draw_series(LineSeries::new(line, color.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        let grey = RGBColor(110, 110, 110);
        chart
            .draw_series(bars.iter().flat_map(|&(x, y, xse, yse)| {
                [
                    PathElement::new(vec![(x - xse, y), (x + xse, y)], grey.stroke_width(1)),
                    PathElement::new(vec![(x, y - yse), (x, y + yse)], grey.stroke_width(1)),
                ]
            }))
            .map_err(|e| err(e.to_string()))?
            .label("± 1 standard error")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], grey));
        if let Some(text) = filled {
            chart
                .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                .map_err(|e| err(e.to_string()))?
                .label(text)
                .legend(|(x, y)| Circle::new((x + 8, y), 5, BLACK.filled()));
        }
        // Points closer than ~3% of the plot share a spot: stack their labels.
        let (w, h) = (xr_len.max(1e-12), yr_len.max(1e-12));
        let mut placed: Vec<(f64, f64)> = Vec::new();
        let labelled: Vec<(f64, f64, &Row, RGBColor, i32)> = pts
            .iter()
            .map(|p| {
                let near = placed
                    .iter()
                    .filter(|q| ((p.0 - q.0) / w).abs() < 0.03 && ((p.1 - q.1) / h).abs() < 0.03)
                    .count();
                placed.push((p.0, p.1));
                (p.0, p.1, p.2, p.3, -12 + 14 * near as i32)
            })
            .collect();
        chart
            .draw_series(labelled.iter().map(|p| {
                EmptyElement::at((p.0, p.1))
                    + Circle::new((0, 0), 5, point(p.2, p.3))
                    + Text::new(
                        format!("λ={}", lambda_label(p.2.lambda)),
                        (7, p.4),
                        ("sans-serif", 13),
                    )
            }))
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    atomic_write(path, svg.as_bytes())
}

impl Report {
    /// Learning (y) against forgetting on the primary source (x), one point per lambda.
    pub fn plot(&self, path: &Path) -> Result<()> {
        let rows: Vec<&Row> = self.rows.iter().collect();
        frontier_svg(path, "", &self.target, &rows)
    }

    /// Every shape's frontier of a grid sweep on one plot, a colour each; a point is filled
    /// where it is Pareto-optimal over the whole grid.
    pub fn plot_overlay(&self, path: &Path) -> Result<()> {
        let series: Vec<Series<'_>> = self
            .grid
            .iter()
            .enumerate()
            .map(|(k, g)| Series {
                name: g.name(),
                color: PALETTE[k % PALETTE.len()],
                rows: self.rows_of(Some(k)).collect(),
                // Each shape's path through the lambdas, to follow it among the others.
                front: false,
            })
            .collect();
        let src = self.sources().first().cloned().unwrap_or_default();
        let what = match self.over_curvatures() {
            true => "grid points",
            false => "LoRA shapes",
        };
        let caption = format!(
            "LaLoRA: learning vs forgetting ({} vs {src}), {} {what}",
            self.target,
            self.grid.len()
        );
        let filled = Some("filled: Pareto-optimal over the grid");
        draw_frontiers(
            path,
            &caption,
            (&self.target, &src),
            &series,
            filled,
            |r, c| {
                if r.grid.as_ref().is_some_and(|g| g.grid_pareto) {
                    c.filled()
                } else {
                    c.stroke_width(2)
                }
            },
        )
    }
}
