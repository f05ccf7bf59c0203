//! The fused LoRA forward and backward at ranks 1, 8 and 64 (the kernels' maximum).

use super::Checker;
use crate::backend::{Backend, LoraDims};
use crate::error::Result;
use crate::selftest::check::Tolerance::F32;

pub fn run<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    let shapes = [
        (300, 72, 8, 100, 2.0),
        (37, 200, 64, 33, 0.25),
        (5, 300, 1, 70, 16.0),
    ];
    for (i, (m, d_in, r, d_out, scale)) in shapes.into_iter().enumerate() {
        let d = LoraDims {
            m,
            d_in,
            r,
            d_out,
            scale,
        };
        forward_backward(c, d, i == 0)?;
    }
    Ok(())
}

fn forward_backward<D: Backend, R: Backend>(
    c: &mut Checker<'_, D, R>,
    d: LoraDims,
    also_without_grads: bool,
) -> Result<()> {
    let (dev, re) = (c.dev, c.re);
    let shapes = format!(
        "m {}, d_in {}, r {}, d_out {}, s {}",
        d.m, d.d_in, d.r, d.d_out, d.scale
    );
    c.case("lora_forward", &shapes);
    let x = c.up_random(d.m * d.d_in)?;
    let a = c.up_random(d.r * d.d_in)?;
    let b = c.up_random(d.d_out * d.r)?;
    // y starts non-zero: the op adds to the base layer's output.
    let (mut yd, mut yr) = c.up_random(d.m * d.d_out)?;
    let ud = dev.lora_forward(&x.0, &a.0, &b.0, d, &mut yd)?;
    let ur = re.lora_forward(&x.1, &a.1, &b.1, d, &mut yr)?;
    c.check("lora_forward.y", &shapes, &yd, &yr, F32)?;
    c.check("lora_forward.u", &shapes, &ud, &ur, F32)?;

    c.case("lora_backward", &shapes);
    let u = c.up(&re.to_host(&ur)?)?;
    let g = c.up_random(d.m * d.d_out)?;
    let (mut dxd, mut dxr) = c.up_random(d.m * d.d_in)?;
    let (mut dad, mut dar) = c.up_random(d.r * d.d_in)?;
    let (mut dbd, mut dbr) = c.up_random(d.d_out * d.r)?;
    let gad = dev.lora_backward(
        &g.0,
        &x.0,
        &u.0,
        &a.0,
        &b.0,
        d,
        &mut dxd,
        Some((&mut dad, &mut dbd)),
    )?;
    let gar = re.lora_backward(
        &g.1,
        &x.1,
        &u.1,
        &a.1,
        &b.1,
        d,
        &mut dxr,
        Some((&mut dar, &mut dbr)),
    )?;
    c.check("lora_backward.gA", &shapes, &gad, &gar, F32)?;
    c.check("lora_backward.dx", &shapes, &dxd, &dxr, F32)?;
    c.check("lora_backward.dA", &shapes, &dad, &dar, F32)?;
    c.check("lora_backward.dB", &shapes, &dbd, &dbr, F32)?;

    if also_without_grads {
        let shapes = format!("{shapes}, no weight grads");
        c.case("lora_backward", &shapes);
        let (mut dxd, mut dxr) = c.up_random(d.m * d.d_in)?;
        let gad = dev.lora_backward(&g.0, &x.0, &u.0, &a.0, &b.0, d, &mut dxd, None)?;
        let gar = re.lora_backward(&g.1, &x.1, &u.1, &a.1, &b.1, d, &mut dxr, None)?;
        c.check("lora_backward.gA", &shapes, &gad, &gar, F32)?;
        c.check("lora_backward.dx", &shapes, &dxd, &dxr, F32)?;
    }
    Ok(())
}
