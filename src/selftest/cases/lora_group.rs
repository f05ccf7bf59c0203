//! LoRA inside the GEMMs: a q/k/v-like projection group (`Backend::project_group` and its
//! backward) with GQA-narrow k/v, k not adapted, rows and widths off the kernel's
//! 128 x 128 tile, against the reference's per-projection sequence. Its outputs feed
//! kernels, as the model's q/k/v do: with bf16 base weights the device stores them bf16.
//! RoPE rotates the first two outputs (two sequences of 35 rows): 3 heads of 32, which
//! CUDA rotates in the GEMM's epilogue, and one head of 48, which it rotates after.

use super::Checker;
use crate::backend::Backend;
use crate::backend::group::{Feeds, LoraBwd, LoraGroup, ProjBwd, ProjFwd, RopeOut};
use crate::error::Result;
use crate::selftest::check::Tolerance::{BaseWeights, F32, TensorCores};

pub fn run<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    let (m, d_in, r) = (70, 96, 8);
    let outs = [(96, true), (48, false), (48, true)];
    let lg = LoraGroup { r, scale: 2.0 };
    let (dev, re) = (c.dev, c.re);
    let shapes = format!("m {m}, d_in {d_in}, outs 96+48+48 (k not adapted), r {r}");
    // A per-projection row names its projection.
    let proj = |i: usize| {
        let lora = if outs[i].1 { "LoRA" } else { "no LoRA" };
        format!("{shapes}; projection {i}, {lora}")
    };
    c.case("project_group", &shapes);
    let x = c.up_random(m * d_in)?;
    let (mut wd, mut wr, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (d_out, _) in outs {
        let w = c.random(d_out * d_in);
        wd.push(dev.weight(w.clone(), d_out, d_in)?);
        wr.push(re.weight(w, d_out, d_in)?);
        a.push(c.up_random(r * d_in)?);
        b.push(c.up_random(d_out * r)?);
    }
    // (heads, head dim) RoPE rotates each output by.
    let heads = [Some((3, 32)), Some((1, 48)), None];
    let mut tables = Vec::new();
    for h in heads {
        tables.push(h.map(|(_, hd)| c.up_rope(35, hd)).transpose()?);
    }
    let fd: Vec<ProjFwd<'_, D>> = (0..3)
        .map(|i| ProjFwd {
            w: &wd[i],
            d_out: outs[i].0,
            lora: outs[i].1.then(|| (&a[i].0, &b[i].0)),
            feeds: Feeds::Kernels,
            rope: RopeOut::of(tables[i].as_ref().map(|t| &t.0), heads[i]),
        })
        .collect();
    let fr: Vec<ProjFwd<'_, R>> = (0..3)
        .map(|i| ProjFwd {
            w: &wr[i],
            d_out: outs[i].0,
            lora: outs[i].1.then(|| (&a[i].1, &b[i].1)),
            feeds: Feeds::Kernels,
            rope: RopeOut::of(tables[i].as_ref().map(|t| &t.1), heads[i]),
        })
        .collect();
    let yd = dev.project_group(&x.0, m, d_in, lg, &fd)?;
    let yr = re.project_group(&x.1, m, d_in, lg, &fr)?;
    for (i, ((y, u), (yw, uw))) in yd.iter().zip(&yr).enumerate() {
        let rotated = match heads[i] {
            Some((n, hd)) => format!("{}, RoPE {n} x {hd}", proj(i)),
            None => proj(i),
        };
        c.check("project_group.y", &rotated, y, yw, BaseWeights)?;
        if let (Some(u), Some(uw)) = (u, uw) {
            c.check("project_group.u", &proj(i), u, uw, F32)?;
        }
    }

    c.case("project_group_backward", &shapes);
    let mut g = Vec::new();
    let mut u = Vec::new();
    for (i, (d_out, _)) in outs.iter().enumerate() {
        g.push(c.up_random(m * d_out)?);
        u.push(match &yr[i].1 {
            Some(uw) => Some(c.up(&re.to_host(uw)?)?),
            None => None,
        });
    }
    let (mut dxd, mut dxr) = c.up_random(m * d_in)?;
    let mut da = Vec::new();
    let mut db = Vec::new();
    for (d_out, _) in outs {
        da.push(c.up_random(r * d_in)?);
        db.push(c.up_random(d_out * r)?);
    }
    let (mut dad, mut dar): (Vec<_>, Vec<_>) = da.into_iter().unzip();
    let (mut dbd, mut dbr): (Vec<_>, Vec<_>) = db.into_iter().unzip();
    let bd: Vec<ProjBwd<'_, D>> = dad
        .iter_mut()
        .zip(dbd.iter_mut())
        .enumerate()
        .map(|(i, (da, db))| ProjBwd {
            w: &wd[i],
            d_out: outs[i].0,
            g: &g[i].0,
            lora: u[i].as_ref().map(|u| LoraBwd {
                a: &a[i].0,
                b: &b[i].0,
                u: &u.0,
                grads: Some((da, db)),
            }),
        })
        .collect();
    let br: Vec<ProjBwd<'_, R>> = dar
        .iter_mut()
        .zip(dbr.iter_mut())
        .enumerate()
        .map(|(i, (da, db))| ProjBwd {
            w: &wr[i],
            d_out: outs[i].0,
            g: &g[i].1,
            lora: u[i].as_ref().map(|u| LoraBwd {
                a: &a[i].1,
                b: &b[i].1,
                u: &u.1,
                grads: Some((da, db)),
            }),
        })
        .collect();
    let gad = dev.project_group_backward(&x.0, m, d_in, lg, bd, &mut dxd, true)?;
    let gar = re.project_group_backward(&x.1, m, d_in, lg, br, &mut dxr, true)?;
    c.check(
        "project_group_backward.dx",
        &shapes,
        &dxd,
        &dxr,
        BaseWeights,
    )?;
    for (i, (gd, gr)) in gad.iter().zip(&gar).enumerate() {
        if let (Some(gd), Some(gr)) = (gd, gr) {
            c.check("project_group_backward.gA", &proj(i), gd, gr, F32)?;
            // The weight gradients are reductions over the rows on the Gram kernels
            // (tf32 tensor cores on the bf16 engine).
            c.check(
                "project_group_backward.dA",
                &proj(i),
                &dad[i],
                &dar[i],
                TensorCores,
            )?;
            c.check(
                "project_group_backward.dB",
                &proj(i),
                &dbd[i],
                &dbr[i],
                TensorCores,
            )?;
        }
    }
    Ok(())
}
