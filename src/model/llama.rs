//! The Llama forward and backward pass with LoRA, written once against `Backend`.
//!
//! Backward propagates to every LoRA A and B through the frozen base weights (no base
//! weight gradients are formed). At each adapted projection it can hand the layer input
//! `x`, the low-rank activation `u = A x`, the output gradient `g = dL/dh` and the A
//! sub-layer's output gradient `gA = s B^T g` to a [`LoraObserver`]: this is where the
//! curvature estimators hook in.

use super::config::LlamaConfig;
use super::lora::LoraWeights;
use super::proj::Proj;
use super::weights::HostWeights;
use crate::backend::group::{GradFeeds, LoraBwd, LoraGroup, ProjBwd, ProjFwd, Projected, RopeOut};
use crate::backend::{
    AttnSaved, AttnShape, Backend, CeTargets, ClassifierOut, LoraDims, RopeTable,
};
use crate::data::Batch;
use crate::error::{Error, Result};

mod decode;
mod memory;
pub use decode::{CachedSeq, KvCache};
pub use memory::{ActStorage, kept_activation_bytes, weight_bytes};

struct Layer<B: Backend> {
    attn_norm: B::Buf,
    mlp_norm: B::Buf,
    proj: [B::Weight; 7],
}

pub struct Llama<B: Backend> {
    pub cfg: LlamaConfig,
    embed: B::Weight,
    layers: Vec<Layer<B>>,
    final_norm: B::Buf,
    lm_head: Option<B::Weight>,
    inv_freq: Vec<f64>,
}

/// Receives, at every adapted projection during backward, `x (m, d_in)`, `u = x A^T
/// (m, r)`, `g = dL/dh (m, d_out)` and `gA = s g B (m, r)`; `module` indexes
/// `LoraWeights::modules`.
pub trait LoraObserver<B: Backend> {
    /// How the backward may store the projection groups' output gradients `g` that
    /// `observe` receives (`GradFeeds`): `Summed` (f32), unless every reduction the
    /// observer makes multiplies each position's `g` before summing.
    fn grad_feeds(&self) -> GradFeeds {
        GradFeeds::Summed
    }
    #[allow(clippy::too_many_arguments)]
    fn observe(
        &mut self,
        be: &B,
        module: usize,
        x: &B::Buf,
        u: &B::Buf,
        g: &B::Buf,
        ga: &B::Buf,
    ) -> Result<()>;
}

/// What backward needs from one block's forward pass (its bytes: `memory.rs`).
struct LayerActs<B: Backend> {
    x_in: B::Buf,
    xn1: B::Buf,
    rstd1: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    /// The attention state its backward needs (probabilities or log-sum-exps).
    attn_saved: AttnSaved<B::Buf>,
    /// The attention output (the O projection's input; flash backward reads it too).
    attn: B::Buf,
    h_mid: B::Buf,
    xn2: B::Buf,
    rstd2: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    act: B::Buf,
    /// `u = A x` per projection (`Proj::index()`), for adapted projections.
    u: [Option<B::Buf>; 7],
}

pub struct Activations<B: Backend> {
    layers: Vec<LayerActs<B>>,
    final_in: B::Buf,
    final_rstd: B::Buf,
    rope: RopeTable<B::Buf>,
    /// The final norm's output `(rows, hidden)`: the classifier's input.
    final_xn: B::Buf,
    pub rows: usize,
    batch: usize,
    seq_len: usize,
}

type LoraRef<'a, B> = Option<&'a LoraWeights<<B as Backend>::Buf>>;

impl<B: Backend> Llama<B> {
    pub fn new(be: &B, cfg: LlamaConfig, w: HostWeights) -> Result<Self> {
        let d = cfg.hidden_size;
        // A matrix goes to the backend with its compact form where the file has one.
        let weight = |host, stored: Option<_>, rows, cols| match stored {
            Some(s) => be.weight_stored(host, s, rows, cols),
            None => be.weight(host, rows, cols),
        };
        let mut stored = w.stored;
        let embed = weight(w.embed, stored.embed.take(), cfg.vocab_size, d)?;
        let lm_head = match w.lm_head {
            Some(h) => Some(weight(h, stored.lm_head.take(), cfg.vocab_size, d)?),
            None => None,
        };
        let mut layers = Vec::with_capacity(w.layers.len());
        let mut stored_proj = stored.proj.into_iter();
        for l in w.layers {
            let [q, k, v, o, g, u, dn] = l.proj;
            let mut ws = [q, k, v, o, g, u, dn].into_iter();
            let mut ss = stored_proj.next().unwrap_or_default().into_iter();
            let proj = Proj::ALL.map(|p| {
                let (din, dout) = p.dims(&cfg);
                weight(
                    ws.next().unwrap_or_default(),
                    ss.next().flatten(),
                    dout,
                    din,
                )
            });
            let [q, k, v, o, g, u, dn] = proj;
            layers.push(Layer {
                attn_norm: be.buf(l.attn_norm)?,
                mlp_norm: be.buf(l.mlp_norm)?,
                proj: [q?, k?, v?, o?, g?, u?, dn?],
            });
        }
        Ok(Llama {
            inv_freq: cfg.rope_inv_freq(),
            embed,
            layers,
            final_norm: be.buf(w.final_norm)?,
            lm_head,
            cfg,
        })
    }

    fn output(&self) -> &B::Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// cos/sin for the given positions, one table row each (computed in f64, stored as
    /// f32); the table's period is its length.
    fn rope_table(
        &self,
        be: &B,
        positions: impl ExactSizeIterator<Item = usize>,
    ) -> Result<RopeTable<B::Buf>> {
        let (len, half) = (positions.len(), self.cfg.head_dim / 2);
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for pos in positions {
            for f in &self.inv_freq {
                let a = pos as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(RopeTable {
            cos: be.buf(cos)?,
            sin: be.buf(sin)?,
            period: len,
        })
    }

    fn lora_dims(&self, lora: &LoraWeights<B::Buf>, i: usize, m: usize) -> LoraDims {
        let md = &lora.modules[i];
        LoraDims {
            m,
            d_in: md.d_in,
            r: lora.cfg.r,
            d_out: md.d_out,
            scale: lora.cfg.scale(),
        }
    }

    /// `y = x W^T + s B (A x)`; returns `(y, u)`.
    fn project(
        &self,
        be: &B,
        lora: LoraRef<'_, B>,
        l: usize,
        p: Proj,
        x: &B::Buf,
        m: usize,
    ) -> Result<(B::Buf, Option<B::Buf>)> {
        let (din, dout) = p.dims(&self.cfg);
        let mut y = be.linear(x, &self.layers[l].proj[p.index()], m, din, dout)?;
        let u = match lora.and_then(|lw| lw.find(l, p).map(|i| (lw, i))) {
            Some((lw, i)) => {
                let md = &lw.modules[i];
                Some(be.lora_forward(x, &md.a, &md.b, self.lora_dims(lw, i, m), &mut y)?)
            }
            None => None,
        };
        Ok((y, u))
    }

    /// `project` for projections `ps` sharing the input `x` (q/k/v, gate/up), as one
    /// backend call so that it can run them as one GEMM; returns `N` outputs `(y, u)`.
    /// With `rope`, q and k come back rotated (which a backend may do inside the GEMM).
    #[allow(clippy::too_many_arguments)]
    fn project_group<const N: usize>(
        &self,
        be: &B,
        lora: LoraRef<'_, B>,
        l: usize,
        ps: [Proj; N],
        x: &B::Buf,
        m: usize,
        rope: Option<&RopeTable<B::Buf>>,
    ) -> Result<[Projected<B::Buf>; N]> {
        let specs: Vec<ProjFwd<'_, B>> = ps
            .iter()
            .map(|&p| ProjFwd {
                w: &self.layers[l].proj[p.index()],
                d_out: p.dims(&self.cfg).1,
                lora: lora
                    .and_then(|lw| lw.find(l, p).map(|i| &lw.modules[i]))
                    .map(|md| (&md.a, &md.b)),
                feeds: p.feeds(),
                rope: RopeOut::of(
                    rope,
                    p.rotated_heads(&self.cfg).map(|n| (n, self.cfg.head_dim)),
                ),
            })
            .collect();
        let out = be.project_group(x, m, ps[0].dims(&self.cfg).0, group_of(lora), &specs)?;
        out.try_into()
            .map_err(|_| Error::Device("project_group: wrong number of outputs".into()))
    }

    /// Backward of `project_group`: `dx (+)= sum_p g_p W_p + gA_p A_p`, LoRA grads, then
    /// the observer for each adapted projection in order. `gs[i]` and `us[i]` belong to
    /// `ps[i]`.
    #[allow(clippy::too_many_arguments)]
    fn project_group_backward(
        &self,
        be: &B,
        lora: LoraRef<'_, B>,
        ctx: &mut BackwardCtx<'_, B>,
        l: usize,
        ps: &[Proj],
        gs: &[&B::Buf],
        x: &B::Buf,
        us: &[Option<&B::Buf>],
        m: usize,
        dx: &mut B::Buf,
        accumulate: bool,
    ) -> Result<()> {
        let idx: Vec<Option<usize>> = ps
            .iter()
            .zip(us)
            .map(|(&p, u)| u.and(lora.and_then(|lw| lw.find(l, p))))
            .collect();
        // Disjoint mutable borrows of the group's gradient modules.
        let mut grads: Vec<Option<(&mut B::Buf, &mut B::Buf)>> = ps.iter().map(|_| None).collect();
        if let Some(gw) = ctx.grads.as_deref_mut() {
            for (i, gm) in gw.modules.iter_mut().enumerate() {
                if let Some(j) = idx.iter().position(|&k| k == Some(i)) {
                    grads[j] = Some((&mut gm.a, &mut gm.b));
                }
            }
        }
        let mut specs = Vec::with_capacity(ps.len());
        for ((((&p, &g), &u), &i), gr) in ps.iter().zip(gs).zip(us).zip(&idx).zip(grads) {
            let lb = match (lora, i, u) {
                (Some(lw), Some(i), Some(u)) => Some(LoraBwd {
                    a: &lw.modules[i].a,
                    b: &lw.modules[i].b,
                    u,
                    grads: gr,
                }),
                _ => None,
            };
            specs.push(ProjBwd {
                w: &self.layers[l].proj[p.index()],
                d_out: p.dims(&self.cfg).1,
                g,
                lora: lb,
            });
        }
        let din = ps[0].dims(&self.cfg).0;
        let gas = be.project_group_backward(x, m, din, group_of(lora), specs, dx, accumulate)?;
        if let Some(obs) = ctx.observer.as_deref_mut() {
            for (((i, ga), g), u) in idx.iter().zip(&gas).zip(gs).zip(us) {
                if let (Some(i), Some(ga), Some(u)) = (i, ga, u) {
                    obs.observe(be, *i, x, u, g, ga)?;
                }
            }
        }
        Ok(())
    }

    /// Full forward pass over a padded batch. With `keep` the activations backward needs
    /// are kept; without, each block's are dropped as soon as it is done (evaluation).
    pub fn forward(
        &self,
        be: &B,
        lora: LoraRef<'_, B>,
        batch: &Batch,
        keep: bool,
    ) -> Result<Activations<B>> {
        let c = &self.cfg;
        let (bsz, t) = (batch.batch, batch.seq_len);
        let m = bsz * t;
        let d = c.hidden_size;
        let rope = self.rope_table(be, 0..t)?;
        let shape = AttnShape {
            batch: bsz,
            tq: t,
            tk: t,
            tk_stride: t,
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            q_offset: 0,
        };
        let mut h = be.embedding(&self.embed, &batch.ids, d)?;
        let mut layers = Vec::with_capacity(if keep { c.num_layers } else { 0 });
        // Each residual add runs fused with the norm that reads its sum: the MLP norm, the
        // next layer's attention norm, or after the last layer the final norm. The norm
        // of the embeddings is the only one without an add before it.
        let first_norm = self
            .layers
            .first()
            .map_or(&self.final_norm, |lw| &lw.attn_norm);
        let (mut xn, mut rstd) = be.rmsnorm(&h, first_norm, m, d, c.rms_norm_eps)?;
        for (l, lw) in self.layers.iter().enumerate() {
            let next_norm = self
                .layers
                .get(l + 1)
                .map_or(&self.final_norm, |next| &next.attn_norm);
            let (xn1, rstd1) = (xn, rstd);
            let qkv = [Proj::Q, Proj::K, Proj::V];
            let [(q, uq), (k, uk), (v, uv)] =
                self.project_group(be, lora, l, qkv, &xn1, m, Some(&rope))?;
            let (attn, attn_saved) = if keep {
                let (attn, saved) = be.attention(&q, &k, &v, &shape)?;
                (attn, Some(saved))
            } else {
                (be.attention_out(&q, &k, &v, &shape)?, None)
            };
            let [(o, uo)] = self.project_group(be, lora, l, [Proj::O], &attn, m, None)?;
            let mut h_mid = o;
            let (xn2, rstd2) =
                be.add_rmsnorm(&mut h_mid, &h, &lw.mlp_norm, m, d, c.rms_norm_eps)?;
            let [(gate, ug), (up, uu)] =
                self.project_group(be, lora, l, [Proj::Gate, Proj::Up], &xn2, m, None)?;
            let act = be.swiglu(&gate, &up)?;
            let [(down, ud)] = self.project_group(be, lora, l, [Proj::Down], &act, m, None)?;
            let mut h_out = down;
            (xn, rstd) = be.add_rmsnorm(&mut h_out, &h_mid, next_norm, m, d, c.rms_norm_eps)?;
            let x_in = std::mem::replace(&mut h, h_out);
            if let Some(attn_saved) = attn_saved {
                layers.push(LayerActs {
                    x_in,
                    xn1,
                    rstd1,
                    q,
                    k,
                    v,
                    attn_saved,
                    attn,
                    h_mid,
                    xn2,
                    rstd2,
                    gate,
                    up,
                    act,
                    u: [uq, uk, uv, uo, ug, uu, ud],
                });
            }
        }
        Ok(Activations {
            layers,
            final_in: h,
            final_rstd: rstd,
            rope,
            final_xn: xn,
            rows: m,
            batch: bsz,
            seq_len: t,
        })
    }

    /// The logits `(rows, vocab)` of a forward pass, materialised (tests, inspection).
    pub fn logits(&self, be: &B, acts: &Activations<B>) -> Result<B::Buf> {
        let c = &self.cfg;
        be.linear(
            &acts.final_xn,
            self.output(),
            acts.rows,
            c.hidden_size,
            c.vocab_size,
        )
    }

    /// The token losses of a forward pass, through the fused classifier (the logits are
    /// never materialised); with `grad_scale`, also the gradient `backward` starts from.
    pub fn classify(
        &self,
        be: &B,
        acts: &Activations<B>,
        targets: CeTargets<'_>,
        grad_scale: Option<f32>,
    ) -> Result<ClassifierOut<B::Buf>> {
        let c = &self.cfg;
        be.classifier(
            &acts.final_xn,
            self.output(),
            acts.rows,
            c.hidden_size,
            c.vocab_size,
            targets,
            grad_scale,
        )
    }

    /// Backward from `dhidden`, the gradient at the final norm's output (`classify`'s),
    /// through the whole model. LoRA gradients are *added* to `grads` (when given); the
    /// observer sees every adapted projection.
    pub fn backward<'a>(
        &self,
        be: &B,
        lora: LoraRef<'_, B>,
        acts: &Activations<B>,
        dxn: &B::Buf,
        grads: Option<&'a mut LoraWeights<B::Buf>>,
        observer: Option<&'a mut (dyn LoraObserver<B> + 'a)>,
    ) -> Result<()> {
        let c = &self.cfg;
        let m = acts.rows;
        let d = c.hidden_size;
        let mut ctx = BackwardCtx { grads, observer };
        let shape = AttnShape {
            batch: acts.batch,
            tq: acts.seq_len,
            tk: acts.seq_len,
            tk_stride: acts.seq_len,
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            q_offset: 0,
        };
        let mut dh = be.zeros(m * d)?;
        be.rmsnorm_backward(
            dxn,
            &acts.final_in,
            &self.final_norm,
            &acts.final_rstd,
            m,
            d,
            &mut dh,
        )?;
        // The gradients of the MLP's activation and of the normed inputs, written by their
        // projections' backward without accumulating (every element overwritten, none read),
        // so one buffer of each serves every layer: a new zeroed one per layer cost a pass
        // of stores over 11 MB a layer (SmolLM2, 1024 rows), about 1 % of a training step.
        let mut dact = be.zeros(m * c.intermediate_size)?;
        let mut dxn = be.zeros(m * d)?;
        for (l, (lw, a)) in self.layers.iter().zip(&acts.layers).enumerate().rev() {
            let u = |p: Proj| a.u[p.index()].as_ref();
            // MLP: h_out = h_mid + down(silu(gate(xn2)) * up(xn2))
            let down = [Proj::Down];
            self.project_group_backward(
                be,
                lora,
                &mut ctx,
                l,
                &down,
                &[&dh],
                &a.act,
                &[u(Proj::Down)],
                m,
                &mut dact,
                false,
            )?;
            let feeds = ctx
                .observer
                .as_deref()
                .map_or(GradFeeds::Backward, |o| o.grad_feeds());
            let (dgate, dup) = be.swiglu_backward(&dact, &a.gate, &a.up, feeds)?;
            let gate_up = [Proj::Gate, Proj::Up];
            self.project_group_backward(
                be,
                lora,
                &mut ctx,
                l,
                &gate_up,
                &[&dgate, &dup],
                &a.xn2,
                &gate_up.map(u),
                m,
                &mut dxn,
                false,
            )?;
            let mut dh_mid = dh;
            be.rmsnorm_backward(&dxn, &a.h_mid, &lw.mlp_norm, &a.rstd2, m, d, &mut dh_mid)?;
            // Attention: h_mid = x_in + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1)))
            let mut dattn = be.attention_dout(&a.attn_saved, m * c.q_dim())?;
            let o = [Proj::O];
            self.project_group_backward(
                be,
                lora,
                &mut ctx,
                l,
                &o,
                &[&dh_mid],
                &a.attn,
                &[u(Proj::O)],
                m,
                &mut dattn,
                false,
            )?;
            let (dq, dk, dv) = be.attention_backward(
                &dattn,
                &a.q,
                &a.k,
                &a.v,
                &a.attn,
                &a.attn_saved,
                Some(&acts.rope),
                feeds,
                &shape,
            )?;
            let qkv = [Proj::Q, Proj::K, Proj::V];
            self.project_group_backward(
                be,
                lora,
                &mut ctx,
                l,
                &qkv,
                &[&dq, &dk, &dv],
                &a.xn1,
                &qkv.map(u),
                m,
                &mut dxn,
                false,
            )?;
            let mut dx_in = dh_mid;
            be.rmsnorm_backward(&dxn, &a.x_in, &lw.attn_norm, &a.rstd1, m, d, &mut dx_in)?;
            dh = dx_in;
        }
        Ok(())
    }
}

struct BackwardCtx<'a, B: Backend> {
    grads: Option<&'a mut LoraWeights<B::Buf>>,
    observer: Option<&'a mut (dyn LoraObserver<B> + 'a)>,
}

/// The rank and scaling of `lora`'s projections (nothing is adapted without one).
fn group_of<T>(lora: Option<&LoraWeights<T>>) -> LoraGroup {
    lora.map_or(LoraGroup { r: 0, scale: 0.0 }, |lw| LoraGroup {
        r: lw.cfg.r,
        scale: lw.cfg.scale(),
    })
}
