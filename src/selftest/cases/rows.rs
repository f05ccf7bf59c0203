//! Embedding, RMSNorm (alone and fused with the residual add), the base-weight linear layer, RoPE, SwiGLU and `add_assign`.

use super::Checker;
use crate::backend::group::GradFeeds;
use crate::backend::{Backend, RopeTable};
use crate::error::Result;
use crate::selftest::check::Tolerance::{Activation, BaseWeights, F32};

pub fn run<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    embedding(c)?;
    rmsnorm(c)?;
    linear(c)?;
    rope(c)?;
    swiglu(c)
}

fn embedding<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    let (dev, re) = (c.dev, c.re);
    // 4100 x 256 outputs: more than 2^20 (see algebra::N).
    for (n, vocab, dim) in [(4100, 517, 256), (7, 40, 300)] {
        let shapes = format!("{n} ids, table {vocab}x{dim}");
        c.case("embedding", &shapes);
        let table = c.random(vocab * dim);
        let ids: Vec<u32> = c.below(n, vocab).into_iter().map(|i| i as u32).collect();
        let got = dev.embedding(&dev.weight(table.clone(), vocab, dim)?, &ids, dim)?;
        let want = re.embedding(&re.weight(table, vocab, dim)?, &ids, dim)?;
        c.check("embedding", &shapes, &got, &want, BaseWeights)?;
    }
    Ok(())
}

fn rmsnorm<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    let (dev, re) = (c.dev, c.re);
    // dim 1030: four passes of a 256-thread block over each row, with a tail; dim 33: odd,
    // so rows start at addresses that are not 16-byte aligned.
    for (rows, dim) in [(300, 72), (5, 1030), (1, 64), (7, 33)] {
        let shapes = format!("{rows}x{dim}");
        c.case("rmsnorm", &shapes);
        let (x, w) = (c.up_random(rows * dim)?, c.up_random(dim)?);
        let (yd, rd) = dev.rmsnorm(&x.0, &w.0, rows, dim, 1e-5)?;
        let (yr, rr) = re.rmsnorm(&x.1, &w.1, rows, dim, 1e-5)?;
        c.check("rmsnorm.y", &shapes, &yd, &yr, Activation)?;
        c.check("rmsnorm.rstd", &shapes, &rd, &rr, F32)?;

        c.case("add_rmsnorm", &shapes);
        let delta = c.up_random(rows * dim)?;
        let (mut hd, mut hr) = c.up_random(rows * dim)?;
        let (yd, rd) = dev.add_rmsnorm(&mut hd, &delta.0, &w.0, rows, dim, 1e-5)?;
        let (yr, rr) = re.add_rmsnorm(&mut hr, &delta.1, &w.1, rows, dim, 1e-5)?;
        c.check("add_rmsnorm.h", &shapes, &hd, &hr, F32)?;
        c.check("add_rmsnorm.y", &shapes, &yd, &yr, Activation)?;
        c.check("add_rmsnorm.rstd", &shapes, &rd, &rr, F32)?;

        c.case("rmsnorm_backward", &shapes);
        let rstd = c.up(&re.to_host(&rr)?)?;
        let dy = c.up_random(rows * dim)?;
        // dx starts non-zero: the op accumulates.
        let (mut dxd, mut dxr) = c.up_random(rows * dim)?;
        dev.rmsnorm_backward(&dy.0, &x.0, &w.0, &rstd.0, rows, dim, &mut dxd)?;
        re.rmsnorm_backward(&dy.1, &x.1, &w.1, &rstd.1, rows, dim, &mut dxr)?;
        c.check("rmsnorm_backward.dx", &shapes, &dxd, &dxr, F32)?;
    }
    Ok(())
}

fn linear<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    let (dev, re) = (c.dev, c.re);
    // 4100 x 256 inputs: more than 2^20 to convert to bf16 (see algebra::N).
    for (m, k, n) in [(300, 72, 100), (4100, 256, 33), (7, 200, 33), (1, 64, 301)] {
        let shapes = format!("m {m}, k {k}, n {n}");
        c.case("linear", &shapes);
        let w = c.random(n * k);
        let (wd, wr) = (dev.weight(w.clone(), n, k)?, re.weight(w, n, k)?);
        let x = c.up_random(m * k)?;
        let got = dev.linear(&x.0, &wd, m, k, n)?;
        let want = re.linear(&x.1, &wr, m, k, n)?;
        c.check("linear.y", &shapes, &got, &want, BaseWeights)?;

        let dy = c.up_random(m * n)?;
        for accumulate in [true, false] {
            let shapes = format!("{shapes}, {}", if accumulate { "dx +=" } else { "dx =" });
            c.case("linear_backward", &shapes);
            // A non-zero dx shows both a missing accumulation and a missing overwrite.
            let (mut dxd, mut dxr) = c.up_random(m * k)?;
            dev.linear_backward(&dy.0, &wd, m, k, n, &mut dxd, accumulate)?;
            re.linear_backward(&dy.1, &wr, m, k, n, &mut dxr, accumulate)?;
            c.check("linear_backward.dx", &shapes, &dxd, &dxr, BaseWeights)?;
        }
    }
    Ok(())
}

fn rope<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    let (dev, re) = (c.dev, c.re);
    // Tables shorter than the rows (row r uses table row r % period), as in a batch of
    // several sequences; 5462 rows x 3 heads x 64 pairs are more than 2^20 rotations
    // (see algebra::N).
    for (rows, heads, hd, period) in [(300, 3, 64, 100), (5462, 3, 128, 100), (7, 2, 128, 7)] {
        let half = hd / 2;
        let (cos, sin) = (c.random(period * half), c.random(period * half));
        let td = RopeTable {
            cos: dev.buf(cos.clone())?,
            sin: dev.buf(sin.clone())?,
            period,
        };
        let tr = RopeTable {
            cos: re.buf(cos)?,
            sin: re.buf(sin)?,
            period,
        };
        for inverse in [false, true] {
            let shapes = format!(
                "{rows} rows, {heads} heads x {hd}, period {period}{}",
                if inverse { ", inverse" } else { "" }
            );
            c.case("rope", &shapes);
            let (mut xd, mut xr) = c.up_random(rows * heads * hd)?;
            dev.rope(&mut xd, &td, rows, heads, hd, inverse)?;
            re.rope(&mut xr, &tr, rows, heads, hd, inverse)?;
            c.check("rope", &shapes, &xd, &xr, F32)?;
        }
    }
    Ok(())
}

fn swiglu<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    let (dev, re) = (c.dev, c.re);
    // More than 2^20 elements (see algebra::N).
    let n = 10_000 * 105;
    let shapes = format!("10000x105 ({n})");
    // Gate values up to +-4 reach both tails of the sigmoid.
    let gate: Vec<f32> = c.random(n).iter().map(|v| 4.0 * v).collect();
    let (g, u) = (c.up(&gate)?, c.up_random(n)?);
    c.case("swiglu", &shapes);
    let (got, want) = (dev.swiglu(&g.0, &u.0)?, re.swiglu(&g.1, &u.1)?);
    c.check("swiglu", &shapes, &got, &want, Activation)?;

    c.case("swiglu_backward", &shapes);
    let d = c.up_random(n)?;
    // f32 gate and up: f32 gradients, whatever reads them.
    let (dgd, dud) = dev.swiglu_backward(&d.0, &g.0, &u.0, GradFeeds::Backward)?;
    let (dgr, dur) = re.swiglu_backward(&d.1, &g.1, &u.1, GradFeeds::Backward)?;
    c.check("swiglu_backward.dgate", &shapes, &dgd, &dgr, F32)?;
    c.check("swiglu_backward.dup", &shapes, &dud, &dur, F32)?;

    c.case("add_assign", &shapes);
    let b = c.up_random(n)?;
    let (mut ad, mut ar) = c.up_random(n)?;
    dev.add_assign(&mut ad, &b.0)?;
    re.add_assign(&mut ar, &b.1)?;
    c.check("add_assign", &shapes, &ad, &ar, F32)
}
