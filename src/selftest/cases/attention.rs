//! Causal attention forward and backward: grouped-query heads, head dims 64 and 128 (and
//! 48, which flash attention runs zero-padded, and 8, which it does not run), a KV-cache
//! decode step (`q_offset > 0`, `tk_stride > tk`), and rows longer than a block.
//!
//! The device's saved state decides what is compared: probabilities (a materialised path,
//! held to f32) or row log-sum-exps (flash attention on bf16 tensor cores, held to the
//! tensor-core bound, its log-sum-exps to the reference's). The backward runs given a RoPE
//! table (dq and dk returned unrotated, as the model asks for them) and, on the first
//! shape, also without one.

use super::Checker;
use crate::backend::group::GradFeeds;
use crate::backend::{AttnSaved, AttnShape, Backend};
use crate::error::Result;
use crate::selftest::check::Tolerance::{F32, TensorCores};
use crate::selftest::reference::attention_lse;

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

/// The gradients as training asks for them: a device may store them at lower precision
/// (CUDA flash attention with bf16 base weights: bf16), within the tensor-core bound.
const BACKWARD: GradFeeds = GradFeeds::Backward;

pub fn run<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    let cases = [
        // Prefill of two sequences, 4 query heads on 2 KV heads.
        shape(2, 37, 37, 37, (4, 2), 64, 0),
        // Decode with a KV cache: 3 new queries at positions 18..21 over 21 cached keys
        // of a 32-row cache.
        shape(1, 3, 21, 32, (2, 1), 128, 18),
        // Rows of 260 keys: longer than a 256-thread block.
        shape(1, 260, 260, 260, (2, 1), 64, 0),
        // Three query heads per KV head, head dim 48.
        shape(2, 19, 19, 19, (6, 2), 48, 0),
        // Head dim 8: the materialised path on every device.
        shape(1, 9, 9, 9, (2, 2), 8, 0),
    ];
    for (i, s) in cases.iter().enumerate() {
        one(c, s, true)?;
        if i == 0 {
            one(c, s, false)?;
        }
    }
    Ok(())
}

fn one<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>, s: &AttnShape, rope: bool) -> Result<()> {
    let (dev, re) = (c.dev, c.re);
    let shapes = format!(
        "batch {}, tq {}, tk {} (stride {}), heads {}/{}, hd {}, offset {}{}",
        s.batch,
        s.tq,
        s.tk,
        s.tk_stride,
        s.n_heads,
        s.n_kv_heads,
        s.head_dim,
        s.q_offset,
        if rope {
            ", RoPE in backward"
        } else {
            ", no RoPE"
        }
    );
    let q_len = s.batch * s.tq * s.n_heads * s.head_dim;
    let kv_len = s.batch * s.tk_stride * s.n_kv_heads * s.head_dim;
    c.case("attention", &shapes);
    // With entries of mean square ~0.35 scaled by 2.5, scores (after the 1/sqrt(hd)
    // scale) have a spread of ~2: softmaxes neither flat nor one-hot.
    let amp = 2.5;
    let qh: Vec<f32> = c.random(q_len).iter().map(|v| amp * v).collect();
    let kh: Vec<f32> = c.random(kv_len).iter().map(|v| amp * v).collect();
    let (q, k, v) = (c.up(&qh)?, c.up(&kh)?, c.up_random(kv_len)?);
    let (od, sd) = dev.attention(&q.0, &k.0, &v.0, s)?;
    let (or, sr) = re.attention(&q.1, &k.1, &v.1, s)?;
    let pr = sr.probs("reference")?;
    let tol = match &sd {
        AttnSaved::Probs(pd) => {
            c.check("attention.out", &shapes, &od, &or, F32)?;
            c.check("attention.probs", &shapes, pd, pr, F32)?;
            F32
        }
        AttnSaved::Lse(ld) => {
            c.check("attention.out", &shapes, &od, &or, TensorCores)?;
            let got = dev.to_host(ld)?;
            c.check_host(
                "attention.lse",
                &shapes,
                &got,
                &attention_lse(&qh, &kh, s),
                TensorCores,
            );
            TensorCores
        }
    };

    // Both backwards get the reference's `out`, and a device that saves probabilities gets
    // the reference's, so that the rows check the backward alone; log-sum-exps are the
    // device's own (checked above).
    c.case("attention_backward", &shapes);
    let out = c.up(&re.to_host(&or)?)?;
    let dout = c.up_random(q_len)?;
    let saved = match sd {
        AttnSaved::Probs(_) => AttnSaved::Probs(dev.buf(re.to_host(pr)?)?),
        lse => lse,
    };
    // RoPE's inverse goes over dq's batch * tq rows and dk's batch * tk_stride rows, row r
    // at table row r % period (as `rope` goes over rows): a table of tk_stride rows.
    let tables = rope
        .then(|| c.up_rope(s.tk_stride, s.head_dim))
        .transpose()?;
    let (td, tr) = match &tables {
        Some((td, tr)) => (Some(td), Some(tr)),
        None => (None, None),
    };
    let (dqd, dkd, dvd) =
        dev.attention_backward(&dout.0, &q.0, &k.0, &v.0, &out.0, &saved, td, BACKWARD, s)?;
    let (dqr, dkr, dvr) =
        re.attention_backward(&dout.1, &q.1, &k.1, &v.1, &out.1, &sr, tr, BACKWARD, s)?;
    c.check("attention_backward.dq", &shapes, &dqd, &dqr, tol)?;
    c.check("attention_backward.dk", &shapes, &dkd, &dkr, tol)?;
    c.check("attention_backward.dv", &shapes, &dvd, &dvr, tol)
}
