//! The curvature primitives: Gram accumulation (symmetric and cross), segment sums and
//! means, and per-sample gradient squaring in both orientations.

use super::Checker;
use crate::backend::{Backend, Segment};
use crate::error::Result;
use crate::selftest::check::Tolerance::{F32, TensorCores};

fn seg(start: usize, len: usize) -> Segment {
    Segment { start, len }
}

/// Three sequences in 300 rows with padding after the first two.
fn padded() -> Vec<Segment> {
    vec![seg(0, 37), seg(40, 100), seg(150, 150)]
}

fn describe(rows: usize, segs: &[Segment]) -> String {
    let s: Vec<String> = segs
        .iter()
        .map(|s| format!("{}+{}", s.start, s.len))
        .collect();
    format!("{rows} rows, segments {}", s.join(" "))
}

pub fn run<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    gram(c)?;
    segment_sum(c)?;
    // (rows, dg, dy, segments): A's orientation (gA (rows, r), x) at r 8 with 300 wide
    // columns and at r 1; B's (g, u (rows, r)) at r 64 and 8.
    let adjacent = vec![seg(0, 9), seg(12, 5), seg(17, 23)];
    for (rows, dg, dy, segs) in [
        (300, 8, 300, padded()),
        (40, 1, 33, adjacent.clone()),
        (300, 130, 64, padded()),
        (40, 70, 8, adjacent),
    ] {
        sq_grad(c, rows, dg, dy, &segs)?;
    }
    Ok(())
}

fn gram<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    let (dev, re) = (c.dev, c.re);
    let (rows, segs) = (300, padded());
    // Symmetric: X^T X with X passed as both operands, as the KFAC input factors are.
    let dx = 130;
    let shapes = format!("{}, {dx}x{dx}, symmetric", describe(rows, &segs));
    c.case("gram_accumulate", &shapes);
    let x = c.up_random(rows * dx)?;
    // The prior contents are symmetric too, as a factor being accumulated always is.
    let prior = c.random(dx * dx);
    let sym: Vec<f32> = (0..dx * dx)
        .map(|i| {
            let (r, col) = (i / dx, i % dx);
            prior[r.min(col) * dx + r.max(col)]
        })
        .collect();
    let (mut od, mut or) = c.up(&sym)?;
    dev.gram_accumulate(&x.0, dx, &x.0, dx, &segs, 1.3, &mut od)?;
    re.gram_accumulate(&x.1, dx, &x.1, dx, &segs, 1.3, &mut or)?;
    c.check("gram_accumulate", &shapes, &od, &or, TensorCores)?;

    // The upper triangle alone, as KFAC's factors are summed batch by batch; its lower
    // triangle is unspecified, so only the upper one is compared.
    c.case("gram_accumulate_upper", &shapes);
    let (mut od, mut or) = c.up(&sym)?;
    dev.gram_accumulate_upper(&x.0, dx, &segs, 1.3, &mut od)?;
    re.gram_accumulate(&x.1, dx, &x.1, dx, &segs, 1.3, &mut or)?;
    let (got, want) = (upper(&dev.to_host(&od)?, dx), upper(&re.to_host(&or)?, dx));
    c.check_host("gram_accumulate_upper", &shapes, &got, &want, TensorCores);

    // The mirror of an asymmetric matrix: the lower triangle replaced, the rest kept.
    let shapes = format!("{dx}x{dx}");
    c.case("mirror_upper", &shapes);
    let (mut od, mut or) = c.up_random(dx * dx)?;
    dev.mirror_upper(&mut od, dx)?;
    re.mirror_upper(&mut or, dx)?;
    c.check("mirror_upper", &shapes, &od, &or, F32)?;

    let dy = 130;
    let dx = 70;
    let shapes = format!("{}, {dx}x{dy}, cross", describe(rows, &segs));
    c.case("gram_accumulate", &shapes);
    let x = c.up_random(rows * dx)?;
    let y = c.up_random(rows * dy)?;
    let (mut od, mut or) = c.up_random(dx * dy)?;
    dev.gram_accumulate(&x.0, dx, &y.0, dy, &segs, 0.7, &mut od)?;
    re.gram_accumulate(&x.1, dx, &y.1, dy, &segs, 0.7, &mut or)?;
    c.check("gram_accumulate", &shapes, &od, &or, TensorCores)?;
    stored_gram(c, rows, &segs)
}

/// The Gram of operands as the engine stores its activations (RMSNorm's output: bf16 on
/// CUDA with bf16 base weights, where two bf16 operands take bf16 mma), symmetric and
/// cross. The reference reads the values the device holds, so both sides multiply the
/// same values exactly and only the order of the f32 sums differs.
fn stored_gram<D: Backend, R: Backend>(
    c: &mut Checker<'_, D, R>,
    rows: usize,
    segs: &[Segment],
) -> Result<()> {
    let (dev, re) = (c.dev, c.re);
    let mut stored = |dim: usize| -> Result<(D::Buf, R::Buf)> {
        let raw = dev.buf(c.random(rows * dim))?;
        let (x, _) = dev.rmsnorm(&raw, &dev.buf(vec![1.0; dim])?, rows, dim, 1e-5)?;
        let held = re.buf(dev.to_host(&x)?)?;
        Ok((x, held))
    };
    let (dx, dy) = (136, 70);
    let (x, y) = (stored(dx)?, stored(dy)?);
    for (what, (a, da), (b, db)) in [
        ("symmetric", (&x, dx), (&x, dx)),
        ("cross", (&x, dx), (&y, dy)),
    ] {
        let shapes = format!(
            "{}, {da}x{db}, {what}, stored activations",
            describe(rows, segs)
        );
        c.case("gram_accumulate", &shapes);
        let (mut od, mut or) = c.up(&vec![0.0; da * db])?;
        dev.gram_accumulate(&a.0, da, &b.0, db, segs, 0.9, &mut od)?;
        re.gram_accumulate(&a.1, da, &b.1, db, segs, 0.9, &mut or)?;
        c.check("gram_accumulate", &shapes, &od, &or, F32)?;
    }
    Ok(())
}

/// The elements `i <= j` of a row-major `(d, d)` matrix, row by row.
fn upper(m: &[f32], d: usize) -> Vec<f32> {
    (0..d)
        .flat_map(|i| m[i * d + i..(i + 1) * d].to_vec())
        .collect()
}

fn segment_sum<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    let (dev, re) = (c.dev, c.re);
    let (rows, dim) = (300, 70);
    // An empty segment too: its sum and mean are zero.
    let mut segs = padded();
    segs.insert(1, seg(37, 0));
    let x = c.up_random(rows * dim)?;
    for mean in [false, true] {
        let shapes = format!(
            "{}, dim {dim}, {}",
            describe(rows, &segs),
            if mean { "mean" } else { "sum" }
        );
        c.case("segment_sum", &shapes);
        let got = dev.segment_sum(&x.0, dim, &segs, mean)?;
        let want = re.segment_sum(&x.1, dim, &segs, mean)?;
        c.check("segment_sum", &shapes, &got, &want, F32)?;
    }
    Ok(())
}

fn sq_grad<D: Backend, R: Backend>(
    c: &mut Checker<'_, D, R>,
    rows: usize,
    dg: usize,
    dy: usize,
    segs: &[Segment],
) -> Result<()> {
    let (dev, re) = (c.dev, c.re);
    let shapes = format!("{}, {dg}x{dy}", describe(rows, segs));
    c.case("sq_grad_accumulate", &shapes);
    let g = c.up_random(rows * dg)?;
    let y = c.up_random(rows * dy)?;
    let (mut od, mut or) = c.up_positive(dg * dy)?;
    dev.sq_grad_accumulate(&g.0, dg, &y.0, dy, segs, 0.5, &mut od)?;
    re.sq_grad_accumulate(&g.1, dg, &y.1, dy, segs, 0.5, &mut or)?;
    c.check("sq_grad_accumulate", &shapes, &od, &or, TensorCores)
}
