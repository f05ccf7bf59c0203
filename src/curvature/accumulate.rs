//! Streaming accumulation of the curvature sums, hooked into the backward pass as a
//! [`LoraObserver`]. Per LoRA layer and real (non-padding) position p the model hands over
//! the input `x_p (d_in)`, `u_p = A x_p (r)`, the output gradient `g_p (d_out)` of the
//! summed loss, and `gA_p = s B^T g_p (r)`; the B sub-layer's output gradient is `s g_p`.
//!
//! Everything is accumulated as plain sums, the symmetric KFAC factors on their upper
//! triangles; `finish` mirrors those and applies the `1/M` or `1/N` input normalisation.
//! Only one batch of activations is alive at a time.

use crate::backend::group::GradFeeds;
use crate::backend::{Backend, Segment};
use crate::curvature::{KfacApprox, Scheme};
use crate::error::Result;
use crate::model::{LoraObserver, LoraWeights, Proj};

/// Diagonal Fisher: `F = sum_n (d l_n / d theta)^2` (BackPACK's SumGradSquared), from the
/// per-sequence gradients `grad_n(B) = sum_{p in n} s g_p u_p^T` and
/// `grad_n(A) = sum_{p in n} gA_p x_p^T`, squared one sequence at a time.
pub struct DiagState<B: Backend> {
    /// Per module: `(F_A (r, d_in), F_B (d_out, r))`.
    pub f: Vec<(B::Buf, B::Buf)>,
}

/// Kronecker factors per module, curvlinops conventions (`F ~= C (x) G`):
/// expand: `C = (1/M) sum_p x x^T`, `G = sum_p g g^T`;
/// reduce: `C = (1/N) sum_n xbar_n xbar_n^T` (mean input), `G = sum_n gbar_n gbar_n^T`
/// (summed output gradient). For A: input `x`, output gradient `gA`; for B: input `u`,
/// output gradient `s g`. kfac-tri adds `C_AB = (1/M) sum_p x u^T` and
/// `G_AB = sum_p gA (s g)^T` (or their per-sequence reduce analogues).
pub struct KfacState<B: Backend> {
    pub approx: KfacApprox,
    pub factors: Vec<Factors<B>>,
}

pub struct Factors<B: Backend> {
    pub a_in: B::Buf,
    pub a_out: B::Buf,
    pub b_in: B::Buf,
    pub b_out: B::Buf,
    pub cross: Option<(B::Buf, B::Buf)>,
}

/// The observer the estimation loop passes to backward.
pub struct Accumulator<B: Backend> {
    pub diag: Option<DiagState<B>>,
    pub kfac: Option<KfacState<B>>,
    /// LoRA scale `s` and rank `r`.
    scale: f32,
    rank: usize,
    dims: Vec<(usize, usize)>,
    /// The module whose input factor `C_A` this one shares (q/k/v read the same normed
    /// hidden state, so do gate/up): computed once, copied at `finish`.
    input_owner: Vec<usize>,
    /// Real rows of the current batch, one segment per sequence.
    segments: Vec<Segment>,
    /// Weight of the gradient-side sums (`1/k` for k Monte-Carlo samples).
    g_weight: f32,
    /// Accumulate input-side sums (once per batch, not once per MC sample).
    inputs: bool,
}

/// Projections of one layer with the same input share it (q/k/v read the normed hidden
/// state, gate/up the second normed state): one input factor per group and layer. The FLOP
/// count of the curvature stage (`cost`) follows the same sharing.
pub fn input_group(p: Proj) -> usize {
    match p {
        Proj::Q | Proj::K | Proj::V => 0,
        Proj::Gate | Proj::Up => 1,
        Proj::O => 2,
        Proj::Down => 3,
    }
}

impl<B: Backend> Accumulator<B> {
    pub fn new(
        be: &B,
        lora: &LoraWeights<B::Buf>,
        scheme: Scheme,
        approx: KfacApprox,
    ) -> Result<Self> {
        let r = lora.cfg.r;
        let dims: Vec<(usize, usize)> = lora.modules.iter().map(|m| (m.d_in, m.d_out)).collect();
        let input_owner: Vec<usize> = lora
            .modules
            .iter()
            .enumerate()
            .map(|(i, m)| {
                lora.modules[..i]
                    .iter()
                    .position(|o| o.layer == m.layer && input_group(o.proj) == input_group(m.proj))
                    .unwrap_or(i)
            })
            .collect();
        let diag = match scheme {
            Scheme::Diag => Some(DiagState {
                f: dims
                    .iter()
                    .map(|&(din, dout)| Ok((be.zeros(r * din)?, be.zeros(dout * r)?)))
                    .collect::<Result<_>>()?,
            }),
            _ => None,
        };
        let kfac = match scheme {
            Scheme::Diag => None,
            Scheme::Kfac | Scheme::KfacTri => Some(KfacState {
                approx,
                factors: dims
                    .iter()
                    .zip(&input_owner)
                    .enumerate()
                    .map(|(i, (&(din, dout), &owner))| {
                        Ok(Factors {
                            // A module that shares its input's factor gets its copy in
                            // `finish`: holding a zeroed one through the pass would only
                            // take memory (q/k/v and gate/up share one a layer).
                            a_in: be.zeros(if owner == i { din * din } else { 0 })?,
                            a_out: be.zeros(r * r)?,
                            b_in: be.zeros(r * r)?,
                            b_out: be.zeros(dout * dout)?,
                            cross: if scheme == Scheme::KfacTri {
                                Some((be.zeros(din * r)?, be.zeros(r * dout)?))
                            } else {
                                None
                            },
                        })
                    })
                    .collect::<Result<_>>()?,
            }),
        };
        Ok(Accumulator {
            diag,
            kfac,
            scale: lora.cfg.scale(),
            rank: r,
            dims,
            input_owner,
            segments: Vec::new(),
            g_weight: 1.0,
            inputs: true,
        })
    }

    /// Set up for one backward pass over a batch.
    pub fn begin(&mut self, segments: &[Segment], g_weight: f32, inputs: bool) {
        self.segments = segments.to_vec();
        self.g_weight = g_weight;
        self.inputs = inputs;
    }

    /// Complete the symmetric factors' lower triangles from their upper ones, then apply
    /// the input normalisation: `1/M` (expand, M real positions) or `1/N` (reduce, N
    /// sequences) on `C_A`, `C_B` and `C_AB`.
    pub fn finish(&mut self, be: &B, n_positions: usize, n_sequences: usize) -> Result<()> {
        let Some(k) = self.kfac.as_mut() else {
            return Ok(());
        };
        let denom = match k.approx {
            KfacApprox::Expand => n_positions,
            KfacApprox::Reduce => n_sequences,
        };
        let inv = 1.0 / denom.max(1) as f32;
        // The symmetric factors were summed on their upper triangles only.
        for (i, f) in k.factors.iter_mut().enumerate() {
            let (din, dout) = self.dims[i];
            if self.input_owner[i] == i {
                be.mirror_upper(&mut f.a_in, din)?;
            }
            be.mirror_upper(&mut f.b_in, self.rank)?;
            be.mirror_upper(&mut f.a_out, self.rank)?;
            be.mirror_upper(&mut f.b_out, dout)?;
        }
        for (i, &owner) in self.input_owner.iter().enumerate() {
            if owner != i {
                k.factors[i].a_in = be.dup(&k.factors[owner].a_in)?;
            }
        }
        for f in k.factors.iter_mut() {
            be.scale(&mut f.a_in, inv)?;
            be.scale(&mut f.b_in, inv)?;
            if let Some((c, _)) = f.cross.as_mut() {
                be.scale(c, inv)?;
            }
        }
        Ok(())
    }
}

impl<B: Backend> LoraObserver<B> for Accumulator<B> {
    /// KFAC expand's factors and diag's per-sample gradients multiply each position's
    /// gradient before summing (`sum_p g_p g_p^T`, `sum_{p in n} s g_p u_p^T`, as a training
    /// step's `dB` does), so they read the gradients as the training backward stores them;
    /// KFAC reduce squares `sum_{p in n} g_p` and asks for f32.
    fn grad_feeds(&self) -> GradFeeds {
        match &self.kfac {
            Some(k) if k.approx == KfacApprox::Reduce => GradFeeds::Summed,
            _ => GradFeeds::Backward,
        }
    }

    fn observe(
        &mut self,
        be: &B,
        i: usize,
        x: &B::Buf,
        u: &B::Buf,
        g: &B::Buf,
        ga: &B::Buf,
    ) -> Result<()> {
        let (din, dout) = self.dims[i];
        let (r, s, w) = (self.rank, self.scale, self.g_weight);
        let segs = &self.segments;
        let own_input = self.inputs && self.input_owner[i] == i;
        if let Some(d) = self.diag.as_mut() {
            let (fa, fb) = &mut d.f[i];
            // (sqrt(w) * grad_n)^2 = w * grad_n^2
            let sw = w.sqrt();
            be.sq_grad_accumulate(ga, r, x, din, segs, sw, fa)?;
            be.sq_grad_accumulate(g, dout, u, r, segs, s * sw, fb)?;
        }
        if let Some(k) = self.kfac.as_mut() {
            let f = &mut k.factors[i];
            match k.approx {
                KfacApprox::Expand => {
                    if own_input {
                        be.gram_accumulate_upper(x, din, segs, 1.0, &mut f.a_in)?;
                    }
                    if self.inputs {
                        be.gram_accumulate_upper(u, r, segs, 1.0, &mut f.b_in)?;
                    }
                    be.gram_accumulate_upper(ga, r, segs, w, &mut f.a_out)?;
                    be.gram_accumulate_upper(g, dout, segs, w * s * s, &mut f.b_out)?;
                    if let Some((c, gc)) = f.cross.as_mut() {
                        if self.inputs {
                            be.gram_accumulate(x, din, u, r, segs, 1.0, c)?;
                        }
                        be.gram_accumulate(ga, r, g, dout, segs, w * s, gc)?;
                    }
                }
                KfacApprox::Reduce => {
                    let all = [Segment {
                        start: 0,
                        len: segs.len(),
                    }];
                    let ga_bar = be.segment_sum(ga, r, segs, false)?;
                    let g_bar = be.segment_sum(g, dout, segs, false)?;
                    be.gram_accumulate_upper(&ga_bar, r, &all, w, &mut f.a_out)?;
                    be.gram_accumulate_upper(&g_bar, dout, &all, w * s * s, &mut f.b_out)?;
                    if self.inputs || f.cross.is_some() {
                        let x_bar = be.segment_sum(x, din, segs, true)?;
                        let u_bar = be.segment_sum(u, r, segs, true)?;
                        if own_input {
                            be.gram_accumulate_upper(&x_bar, din, &all, 1.0, &mut f.a_in)?;
                        }
                        if self.inputs {
                            be.gram_accumulate_upper(&u_bar, r, &all, 1.0, &mut f.b_in)?;
                        }
                        if let Some((c, gc)) = f.cross.as_mut() {
                            if self.inputs {
                                be.gram_accumulate(&x_bar, din, &u_bar, r, &all, 1.0, c)?;
                            }
                            be.gram_accumulate(&ga_bar, r, &g_bar, dout, &all, w * s, gc)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
