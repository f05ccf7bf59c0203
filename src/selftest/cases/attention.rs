//! Causal attention forward and backward: grouped-query heads, head dims 64 and 128, a
//! KV-cache decode step (`q_offset > 0`, `tk_stride > tk`), and rows longer than a block.

use super::Checker;
use crate::backend::{AttnShape, Backend};
use crate::error::Result;
use crate::selftest::check::Tolerance::F32;

fn shape(
    batch: usize,
    tq: usize,
    tk: usize,
    tk_stride: usize,
    heads: (usize, usize),
    head_dim: usize,
    q_offset: usize,
) -> AttnShape {
    AttnShape {
        batch,
        tq,
        tk,
        tk_stride,
        n_heads: heads.0,
        n_kv_heads: heads.1,
        head_dim,
        q_offset,
    }
}

pub fn run<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    let cases = [
        // Prefill of two sequences, 4 query heads on 2 KV heads.
        shape(2, 37, 37, 37, (4, 2), 64, 0),
        // Decode with a KV cache: 3 new queries at positions 18..21 over 21 cached keys
        // of a 32-row cache.
        shape(1, 3, 21, 32, (2, 1), 128, 18),
        // Rows of 260 keys: longer than a 256-thread block.
        shape(1, 260, 260, 260, (2, 1), 64, 0),
    ];
    for s in cases {
        one(c, &s)?;
    }
    Ok(())
}

fn one<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>, s: &AttnShape) -> Result<()> {
    let (dev, re) = (c.dev, c.re);
    let shapes = format!(
        "batch {}, tq {}, tk {} (stride {}), heads {}/{}, hd {}, offset {}",
        s.batch, s.tq, s.tk, s.tk_stride, s.n_heads, s.n_kv_heads, s.head_dim, s.q_offset
    );
    let q_len = s.batch * s.tq * s.n_heads * s.head_dim;
    let kv_len = s.batch * s.tk_stride * s.n_kv_heads * s.head_dim;
    c.case("attention", &shapes);
    // With entries of mean square ~0.35 scaled by 2.5, scores (after the 1/sqrt(hd)
    // scale) have a spread of ~2: softmaxes neither flat nor one-hot.
    let amp = 2.5;
    let q: Vec<f32> = c.random(q_len).iter().map(|v| amp * v).collect();
    let k: Vec<f32> = c.random(kv_len).iter().map(|v| amp * v).collect();
    let (q, k, v) = (c.up(&q)?, c.up(&k)?, c.up_random(kv_len)?);
    let (od, pd) = dev.attention(&q.0, &k.0, &v.0, s)?;
    let (or, pr) = re.attention(&q.1, &k.1, &v.1, s)?;
    c.check("attention.out", &shapes, &od, &or, F32)?;
    c.check("attention.probs", &shapes, &pd, &pr, F32)?;

    c.case("attention_backward", &shapes);
    let probs = c.up(&re.to_host(&pr)?)?;
    let dout = c.up_random(q_len)?;
    let (dqd, dkd, dvd) = dev.attention_backward(&dout.0, &q.0, &k.0, &v.0, &probs.0, s)?;
    let (dqr, dkr, dvr) = re.attention_backward(&dout.1, &q.1, &k.1, &v.1, &probs.1, s)?;
    c.check("attention_backward.dq", &shapes, &dqd, &dqr, F32)?;
    c.check("attention_backward.dk", &shapes, &dkd, &dkr, F32)?;
    c.check("attention_backward.dv", &shapes, &dvd, &dvr, F32)
}
