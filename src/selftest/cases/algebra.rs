//! The small dense algebra of the penalties (matmul in all four transposes), the
//! elementwise ops, `dot`, the copies, and AdamW with and without the fused penalty.

use super::Checker;
use crate::backend::{AdamHyper, Backend, DiagPenalty};
use crate::error::Result;
use crate::selftest::check::Tolerance::{Exact, F32};

/// Elementwise length: odd (a tail after the last 128-bit pack), and above 2^20, more
/// than a grid of 4096 blocks of 256 threads covers one element per thread, so the
/// grid-stride loops of single-element kernels wrap. (The packed kernels cover it in one
/// sweep; their wrapping is unit-tested on the simulator, backend/cuda/ops.rs.)
const N: usize = 1_050_001;

pub fn run<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    matmul(c)?;
    elementwise(c)?;
    copies(c)?;
    adamw(c)
}

fn matmul<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    let (dev, re) = (c.dev, c.re);
    let mut cases: Vec<(usize, usize, usize, bool, bool)> =
        [(false, false), (true, false), (false, true), (true, true)]
            .into_iter()
            .map(|(ta, tb)| (37, 70, 130, ta, tb))
            .collect();
    cases.push((300, 33, 65, false, false));
    for (m, k, n, ta, tb) in cases {
        let op = |t: bool, name: &str| {
            if t {
                format!("{name}^T")
            } else {
                name.to_string()
            }
        };
        let shapes = format!("m {m}, k {k}, n {n}, {} {}", op(ta, "A"), op(tb, "B"));
        c.case("matmul", &shapes);
        let (a, b) = (c.up_random(m * k)?, c.up_random(k * n)?);
        let got = dev.matmul(&a.0, &b.0, m, k, n, ta, tb)?;
        let want = re.matmul(&a.1, &b.1, m, k, n, ta, tb)?;
        c.check("matmul", &shapes, &got, &want, F32)?;
    }
    Ok(())
}

fn elementwise<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    let (dev, re) = (c.dev, c.re);
    let shapes = format!("n {N}");
    let (a, b) = (c.random(N), c.random(N));
    let ((ad, ar), (bd, br)) = (c.up(&a)?, c.up(&b)?);

    c.case("dup", &shapes);
    let (xd, xr) = (dev.dup(&ad)?, re.dup(&ar)?);
    c.check("dup", &shapes, &xd, &xr, Exact)?;

    c.case("mul_assign", &shapes);
    let (mut xd, mut xr) = c.up(&a)?;
    dev.mul_assign(&mut xd, &bd)?;
    re.mul_assign(&mut xr, &br)?;
    c.check("mul_assign", &shapes, &xd, &xr, F32)?;

    c.case("scale", &shapes);
    let (mut xd, mut xr) = c.up(&a)?;
    dev.scale(&mut xd, -1.7)?;
    re.scale(&mut xr, -1.7)?;
    c.check("scale", &shapes, &xd, &xr, F32)?;

    c.case("axpy", &shapes);
    let (mut yd, mut yr) = c.up(&a)?;
    dev.axpy(0.3, &bd, &mut yd)?;
    re.axpy(0.3, &br, &mut yr)?;
    c.check("axpy", &shapes, &yd, &yr, F32)?;

    c.case("dot", &shapes);
    let (got, want) = (dev.dot(&ad, &bd)?, re.dot(&ar, &br)?);
    c.check_scalar("dot", &shapes, got, want, F32);
    Ok(())
}

fn copies<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    let (dev, re) = (c.dev, c.re);
    let (len, n) = (3001, 50);
    let dst = c.random(len);
    let src = c.up_random(n)?;
    // At the start, in the middle, and flush with the end.
    for offset in [0, 100, len - n] {
        let shapes = format!("{n} into {len} at {offset}");
        c.case("copy_into", &shapes);
        let (mut dd, mut dr) = c.up(&dst)?;
        dev.copy_into(&mut dd, offset, &src.0)?;
        re.copy_into(&mut dr, offset, &src.1)?;
        c.check("copy_into", &shapes, &dd, &dr, Exact)?;
    }
    let whole = c.up_random(len)?;
    for offset in [0, 100, len - n] {
        let shapes = format!("{n} from {len} at {offset}");
        c.case("slice", &shapes);
        let got = dev.slice(&whole.0, offset, n)?;
        let want = re.slice(&whole.1, offset, n)?;
        c.check("slice", &shapes, &got, &want, Exact)?;
    }
    Ok(())
}

fn adamw<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    let (dev, re) = (c.dev, c.re);
    // Step 4: bias corrections well away from 1; weight decay on.
    let h = AdamHyper {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 4,
    };
    let g = c.up_random(N)?;
    let (mean, prec) = (c.up_random(N)?, c.up_positive(N)?);
    // A small second moment, so that v's change is not lost in its old value.
    let v0: Vec<f32> = c.positive(N).iter().map(|v| 1e-3 * v).collect();
    let (p0, m0) = (c.random(N), c.random(N));
    for with_penalty in [false, true] {
        let shapes = format!(
            "n {N}, step {}, grad scale 0.5{}",
            h.step,
            if with_penalty {
                ", diag penalty lambda 3"
            } else {
                ""
            }
        );
        c.case("adamw_step", &shapes);
        let ((mut pd, mut pr), (mut md, mut mr), (mut vd, mut vr)) =
            (c.up(&p0)?, c.up(&m0)?, c.up(&v0)?);
        let pen_d = with_penalty.then_some(DiagPenalty::<D> {
            mean: &mean.0,
            precision: &prec.0,
            lambda: 3.0,
        });
        let pen_r = with_penalty.then_some(DiagPenalty::<R> {
            mean: &mean.1,
            precision: &prec.1,
            lambda: 3.0,
        });
        dev.adamw_step(&mut pd, &g.0, &mut md, &mut vd, &h, 0.5, pen_d)?;
        re.adamw_step(&mut pr, &g.1, &mut mr, &mut vr, &h, 0.5, pen_r)?;
        // Compare each state's change: the unchanged part of p (~100x the step) would
        // hide an error in the step.
        for (name, old, got, want) in [
            ("dp", &p0, &pd, &pr),
            ("dm", &m0, &md, &mr),
            ("dv", &v0, &vd, &vr),
        ] {
            let delta =
                |x: Vec<f32>| -> Vec<f32> { x.iter().zip(old).map(|(a, b)| a - b).collect() };
            let (got, want) = (delta(dev.to_host(got)?), delta(re.to_host(want)?));
            c.check_host(&format!("adamw_step.{name}"), &shapes, &got, &want, F32);
        }
    }
    Ok(())
}
