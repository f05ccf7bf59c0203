//! The fused classifier (LM head + cross-entropy + its backward, in vocabulary chunks):
//! data labels with ignored rows, with and without the gradient; Monte-Carlo labels; a
//! vocabulary of four full chunks and a tail of three columns.

use super::Checker;
use crate::backend::{Backend, CeTargets};
use crate::error::Result;
use crate::selftest::check::Tolerance::BaseWeights;
use crate::selftest::report::Metric;

/// Rows the device may sample differently from the reference (see `DifferingLabels`).
const LABEL_FLIPS_ALLOWED: f64 = 1.0;

pub fn run<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    for (rows, dim, vocab, grad_scale) in [
        (37, 40, 1000, Some(0.25)),
        (4, 24, 32771, Some(1.0)),
        (37, 40, 1000, None),
    ] {
        one(c, rows, dim, vocab, None, grad_scale)?;
    }
    for (rows, dim, vocab, seed) in [(37, 40, 1000, 77), (4, 24, 32771, 5)] {
        one(c, rows, dim, vocab, Some(seed), Some(1.0))?;
    }
    Ok(())
}

fn one<D: Backend, R: Backend>(
    c: &mut Checker<'_, D, R>,
    rows: usize,
    dim: usize,
    vocab: usize,
    seed: Option<u64>,
    grad_scale: Option<f32>,
) -> Result<()> {
    let (dev, re) = (c.dev, c.re);
    let kind = match (seed, grad_scale) {
        (Some(s), _) => format!("sampled (seed {s})"),
        (None, Some(s)) => format!("labels, grad scale {s}"),
        (None, None) => "labels, loss only".into(),
    };
    let shapes = format!("{rows}x{dim} hidden, vocab {vocab}, {kind}");
    c.case("classifier", &shapes);
    // Values the bf16 device holds exactly, so that sampled labels can be compared.
    let head = c.random(vocab * dim);
    let head = c.as_base_input(head);
    let (wd, wr) = (
        dev.weight(head.clone(), vocab, dim)?,
        re.weight(head, vocab, dim)?,
    );
    let h = c.random(rows * dim);
    let h = c.up(&c.as_base_input(h))?;
    let labels = c.below(rows, vocab);
    // Every seventh row ignored.
    let targets: Vec<i32> = (0..rows)
        .map(|r| if r % 7 == 3 { -100 } else { labels[r] as i32 })
        .collect();
    let t = match seed {
        Some(seed) => CeTargets::Sample {
            mask: &targets,
            seed,
        },
        None => CeTargets::Labels(&targets),
    };
    let od = dev.classifier(&h.0, &wd, rows, dim, vocab, t, grad_scale)?;
    let or = re.classifier(&h.1, &wr, rows, dim, vocab, t, grad_scale)?;
    // Losses and gradients are compared on rows with equal labels (all, for data labels).
    let same: Vec<bool> = od
        .labels
        .iter()
        .zip(&or.labels)
        .map(|(a, b)| a == b)
        .collect();
    if seed.is_some() {
        let differing = same.iter().filter(|s| !**s).count();
        c.push(
            "classifier.labels",
            &shapes,
            Metric::DifferingLabels(differing),
            LABEL_FLIPS_ALLOWED,
        );
    }
    let keep = |x: &[f32], width: usize| -> Vec<f32> {
        x.chunks(width)
            .zip(&same)
            .filter(|(_, s)| **s)
            .flat_map(|(row, _)| row.iter().copied())
            .collect()
    };
    c.check_host(
        "classifier.loss",
        &shapes,
        &keep(&od.losses, 1),
        &keep(&or.losses, 1),
        BaseWeights,
    );
    match (od.dhidden, or.dhidden) {
        (Some(gd), Some(gr)) => {
            let (gd, gr) = (dev.to_host(&gd)?, re.to_host(&gr)?);
            c.check_host(
                "classifier.dhidden",
                &shapes,
                &keep(&gd, dim),
                &keep(&gr, dim),
                BaseWeights,
            );
        }
        (None, None) => {}
        _ => {
            let missing = Metric::Rel {
                rel_err: f64::INFINITY,
                max_abs: f64::INFINITY,
            };
            c.push(
                "classifier.dhidden",
                &format!("{shapes}: one side returned no gradient"),
                missing,
                0.0,
            );
        }
    }
    Ok(())
}
