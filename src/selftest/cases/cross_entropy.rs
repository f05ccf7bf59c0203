//! The fused softmax cross-entropy: data labels with ignored rows, with and without the
//! gradient; Monte-Carlo labels sampled from the softmax; a vocabulary above 32k.

use super::Checker;
use crate::backend::{Backend, CeTargets};
use crate::error::Result;
use crate::selftest::check::Tolerance::F32;
use crate::selftest::report::Metric;
use crate::selftest::tap::drawn_labels;

/// Rows the device may sample differently from the reference (see `DifferingLabels`).
const LABEL_FLIPS_ALLOWED: f64 = 1.0;

pub fn run<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    for (rows, vocab, grad_scale) in [
        (300, 1000, Some(0.25)),
        (4, 32771, Some(1.0)),
        (300, 1000, None),
    ] {
        labelled(c, rows, vocab, grad_scale)?;
    }
    for (rows, vocab, seed) in [(300, 1000, 77), (4, 32771, 5)] {
        sampled(c, rows, vocab, seed)?;
    }
    Ok(())
}

/// Logits of spread ~4 (peaked but not one-hot softmaxes) and a target per row, every
/// seventh row ignored (`-100`).
fn inputs<D: Backend, R: Backend>(
    c: &mut Checker<'_, D, R>,
    rows: usize,
    vocab: usize,
) -> (Vec<f32>, Vec<i32>) {
    let logits = c.random(rows * vocab).iter().map(|v| 4.0 * v).collect();
    let labels = c.below(rows, vocab);
    let targets = (0..rows)
        .map(|r| if r % 7 == 3 { -100 } else { labels[r] as i32 })
        .collect();
    (logits, targets)
}

fn labelled<D: Backend, R: Backend>(
    c: &mut Checker<'_, D, R>,
    rows: usize,
    vocab: usize,
    grad_scale: Option<f32>,
) -> Result<()> {
    let (dev, re) = (c.dev, c.re);
    let shapes = match grad_scale {
        Some(s) => format!("{rows}x{vocab}, labels, grad scale {s}"),
        None => format!("{rows}x{vocab}, labels, loss only"),
    };
    c.case("cross_entropy", &shapes);
    let (logits, targets) = inputs(c, rows, vocab);
    let z = c.up(&logits)?;
    let t = CeTargets::Labels(&targets);
    let (ld, gd) = dev.cross_entropy(&z.0, rows, vocab, t, grad_scale)?;
    let (lr, gr) = re.cross_entropy(&z.1, rows, vocab, t, grad_scale)?;
    c.check_host("cross_entropy.loss", &shapes, &ld, &lr, F32);
    if let Some((gd, gr)) = gradients(c, &shapes, gd, gr)? {
        c.check_host("cross_entropy.dlogits", &shapes, &gd, &gr, F32);
    }
    Ok(())
}

fn sampled<D: Backend, R: Backend>(
    c: &mut Checker<'_, D, R>,
    rows: usize,
    vocab: usize,
    seed: u64,
) -> Result<()> {
    let (dev, re) = (c.dev, c.re);
    let shapes = format!("{rows}x{vocab}, sampled (seed {seed})");
    c.case("cross_entropy", &shapes);
    let (logits, mask) = inputs(c, rows, vocab);
    let z = c.up(&logits)?;
    let t = CeTargets::Sample { mask: &mask, seed };
    let (ld, gd) = dev.cross_entropy(&z.0, rows, vocab, t, Some(1.0))?;
    let (lr, gr) = re.cross_entropy(&z.1, rows, vocab, t, Some(1.0))?;
    let Some((gd, gr)) = gradients(c, &shapes, gd, gr)? else {
        return Ok(());
    };
    let (labels_d, labels_r) = (
        drawn_labels(&gd, vocab, &mask),
        drawn_labels(&gr, vocab, &mask),
    );
    let same: Vec<bool> = labels_d
        .iter()
        .zip(&labels_r)
        .map(|(a, b)| a == b)
        .collect();
    let differing = same.iter().filter(|s| !**s).count();
    c.push(
        "cross_entropy.labels",
        &shapes,
        Metric::DifferingLabels(differing),
        LABEL_FLIPS_ALLOWED,
    );
    // Losses and gradients must agree wherever the labels do.
    let keep = |x: &[f32], width: usize| -> Vec<f32> {
        x.chunks(width)
            .zip(&same)
            .filter(|(_, s)| **s)
            .flat_map(|(row, _)| row.iter().copied())
            .collect()
    };
    let shapes = format!("{shapes}, rows with equal labels");
    c.check_host(
        "cross_entropy.loss",
        &shapes,
        &keep(&ld, 1),
        &keep(&lr, 1),
        F32,
    );
    c.check_host(
        "cross_entropy.dlogits",
        &shapes,
        &keep(&gd, vocab),
        &keep(&gr, vocab),
        F32,
    );
    Ok(())
}

/// Both gradients on the host, or a failed row when only one side returned one.
#[allow(clippy::type_complexity)]
fn gradients<D: Backend, R: Backend>(
    c: &mut Checker<'_, D, R>,
    shapes: &str,
    got: Option<D::Buf>,
    want: Option<R::Buf>,
) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
    match (got, want) {
        (Some(g), Some(w)) => Ok(Some((c.dev.to_host(&g)?, c.re.to_host(&w)?))),
        (None, None) => Ok(None),
        _ => {
            let missing = Metric::Rel {
                rel_err: f64::INFINITY,
                max_abs: f64::INFINITY,
            };
            c.push(
                "cross_entropy.dlogits",
                &format!("{shapes}: one side returned no gradient"),
                missing,
                0.0,
            );
            Ok(None)
        }
    }
}
