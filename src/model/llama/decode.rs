//! Incremental decoding over a key/value cache: generation, and the multiple-choice
//! scorer's shared prefixes. The same layers as the training forward, run over new
//! tokens only, each sequence attending over its own cache.

use super::{Llama, LoraRef};
use crate::backend::{AttnShape, Backend, CeTargets};
use crate::error::{Error, Result};
use crate::model::proj::Proj;

/// Keys and values of past positions for incremental decoding (one sequence).
pub struct KvCache<B: Backend> {
    k: Vec<B::Buf>,
    v: Vec<B::Buf>,
    pub len: usize,
    pub capacity: usize,
}

impl<B: Backend> KvCache<B> {
    /// An independent copy: several continuations of one cached prefix.
    pub fn fork(&self, be: &B) -> Result<Self> {
        let copy = |bufs: &[B::Buf]| bufs.iter().map(|b| be.dup(b)).collect::<Result<Vec<_>>>();
        Ok(KvCache {
            k: copy(&self.k)?,
            v: copy(&self.v)?,
            len: self.len,
            capacity: self.capacity,
        })
    }
}

/// One sequence's new tokens and the cache they extend.
pub struct CachedSeq<'a, B: Backend> {
    pub ids: &'a [u32],
    pub cache: &'a mut KvCache<B>,
}

impl<B: Backend> Llama<B> {
    /// An empty cache for up to `capacity` positions of one sequence, every layer's keys and
    /// values zeroed.
    pub fn new_cache(&self, be: &B, capacity: usize) -> Result<KvCache<B>> {
        let n = capacity * self.cfg.kv_dim();
        let mut k = Vec::with_capacity(self.cfg.num_layers);
        let mut v = Vec::with_capacity(self.cfg.num_layers);
        for _ in 0..self.cfg.num_layers {
            k.push(be.zeros(n)?);
            v.push(be.zeros(n)?);
        }
        Ok(KvCache {
            k,
            v,
            len: 0,
            capacity,
        })
    }

    /// Run `ids` (one sequence) after the cached positions; returns the logits
    /// `(ids.len(), vocab)` and extends the cache.
    pub fn forward_cached(
        &self,
        be: &B,
        lora: LoraRef<'_, B>,
        ids: &[u32],
        cache: &mut KvCache<B>,
    ) -> Result<B::Buf> {
        let h = self.hidden_cached(be, lora, &mut [CachedSeq { ids, cache }])?;
        self.head(be, &h, ids.len())
    }

    /// The logits of each sequence's last new token, `(seqs.len(), vocab)`, extending every
    /// cache: one batched forward for several sequences at different positions (prefill
    /// and decoding for generation), and the LM head only where the next token is read.
    pub fn next_logits(
        &self,
        be: &B,
        lora: LoraRef<'_, B>,
        seqs: &mut [CachedSeq<'_, B>],
    ) -> Result<B::Buf> {
        let h = self.hidden_cached(be, lora, seqs)?;
        let d = self.cfg.hidden_size;
        let last = if seqs.iter().all(|s| s.ids.len() == 1) {
            h
        } else {
            let mut last = be.zeros(seqs.len() * d)?;
            let mut end = 0;
            for (i, s) in seqs.iter().enumerate() {
                end += s.ids.len();
                be.copy_into(&mut last, i * d, &be.slice(&h, (end - 1) * d, d)?)?;
            }
            last
        };
        self.head(be, &last, seqs.len())
    }

    /// Extend every cache by its sequence's tokens, computing no logits.
    pub fn prefill(
        &self,
        be: &B,
        lora: LoraRef<'_, B>,
        seqs: &mut [CachedSeq<'_, B>],
    ) -> Result<()> {
        self.hidden_cached(be, lora, seqs).map(drop)
    }

    /// The loss `lse(z) - z[t]` of every new token's row against `targets` (one per row,
    /// rows in order, negative to ignore), through the fused classifier; extends every cache.
    pub fn cached_losses(
        &self,
        be: &B,
        lora: LoraRef<'_, B>,
        seqs: &mut [CachedSeq<'_, B>],
        targets: &[i32],
    ) -> Result<Vec<f32>> {
        let rows: usize = seqs.iter().map(|s| s.ids.len()).sum();
        if targets.len() != rows {
            return Err(Error::usage(format!(
                "{} targets for {rows} rows",
                targets.len()
            )));
        }
        let h = self.hidden_cached(be, lora, seqs)?;
        let c = &self.cfg;
        let (xn, _) = be.rmsnorm(&h, &self.final_norm, rows, c.hidden_size, c.rms_norm_eps)?;
        let out = be.classifier(
            &xn,
            self.output(),
            rows,
            c.hidden_size,
            c.vocab_size,
            CeTargets::Labels(targets),
            None,
        )?;
        Ok(out.losses)
    }

    /// Final norm and LM head over `rows` hidden states.
    fn head(&self, be: &B, h: &B::Buf, rows: usize) -> Result<B::Buf> {
        let c = &self.cfg;
        let (xn, _) = be.rmsnorm(h, &self.final_norm, rows, c.hidden_size, c.rms_norm_eps)?;
        be.linear(&xn, self.output(), rows, c.hidden_size, c.vocab_size)
    }

    /// The last layer's output for the new tokens of every sequence, rows in order. The
    /// projections, norms and MLPs run over all rows at once; RoPE takes each row's own
    /// position, and attention runs per sequence over its own cache.
    fn hidden_cached(
        &self,
        be: &B,
        lora: LoraRef<'_, B>,
        seqs: &mut [CachedSeq<'_, B>],
    ) -> Result<B::Buf> {
        let c = &self.cfg;
        let (d, qd, kvd) = (c.hidden_size, c.num_heads * c.head_dim, c.kv_dim());
        if seqs.is_empty() {
            return Err(Error::usage("no sequence to run"));
        }
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for s in seqs.iter() {
            let (n, start) = (s.ids.len(), s.cache.len);
            if n == 0 {
                return Err(Error::usage("an empty sequence to run"));
            }
            if start + n > s.cache.capacity {
                return Err(Error::usage(format!(
                    "sequence of {} tokens exceeds the cache of {}",
                    start + n,
                    s.cache.capacity
                )));
            }
            ids.extend_from_slice(s.ids);
            positions.extend(start..start + n);
        }
        let n = ids.len();
        // One sequence needs no per-sequence copies of its rows.
        let single = seqs.len() == 1;
        let rope = self.rope_table(be, positions.into_iter())?;
        let mut h = be.embedding(&self.embed, &ids, d)?;
        // The residual adds run fused with the norm after them (the MLP norm, the next
        // layer's attention norm), except the last layer's: its callers normalise only the
        // rows they read (or none, to prefill), so it stays a plain add. `fused` holds the
        // attention norm the previous layer's add computed (none before the first layer).
        let mut fused = None;
        for (l, lw) in self.layers.iter().enumerate() {
            let xn1 = match fused.take() {
                Some(xn) => xn,
                None => be.rmsnorm(&h, &lw.attn_norm, n, d, c.rms_norm_eps)?.0,
            };
            let (mut q, _) = self.project(be, lora, l, Proj::Q, &xn1, n)?;
            let (mut k, _) = self.project(be, lora, l, Proj::K, &xn1, n)?;
            let (v, _) = self.project(be, lora, l, Proj::V, &xn1, n)?;
            be.rope(&mut q, &rope, n, c.num_heads, c.head_dim, false)?;
            be.rope(&mut k, &rope, n, c.num_kv_heads, c.head_dim, false)?;
            let mut attn = if single {
                None
            } else {
                Some(be.zeros(n * qd)?)
            };
            let mut row = 0;
            for s in seqs.iter_mut() {
                let (m, start) = (s.ids.len(), s.cache.len);
                let rows = |x: &B::Buf, w: usize| -> Result<Option<B::Buf>> {
                    (!single).then(|| be.slice(x, row * w, m * w)).transpose()
                };
                let (qs, ks, vs) = (rows(&q, qd)?, rows(&k, kvd)?, rows(&v, kvd)?);
                let cache = &mut *s.cache;
                be.copy_into(&mut cache.k[l], start * kvd, ks.as_ref().unwrap_or(&k))?;
                be.copy_into(&mut cache.v[l], start * kvd, vs.as_ref().unwrap_or(&v))?;
                let shape = AttnShape {
                    batch: 1,
                    tq: m,
                    tk: start + m,
                    tk_stride: cache.capacity,
                    n_heads: c.num_heads,
                    n_kv_heads: c.num_kv_heads,
                    head_dim: c.head_dim,
                    q_offset: start,
                };
                let q_seq = qs.as_ref().unwrap_or(&q);
                let (out, _) = be.attention(q_seq, &cache.k[l], &cache.v[l], &shape)?;
                match attn.as_mut() {
                    Some(all) => be.copy_into(all, row * qd, &out)?,
                    None => attn = Some(out),
                }
                row += m;
            }
            let attn = attn.ok_or_else(|| Error::usage("no sequence to run"))?;
            let (mut h_mid, _) = self.project(be, lora, l, Proj::O, &attn, n)?;
            let (xn2, _) = be.add_rmsnorm(&mut h_mid, &h, &lw.mlp_norm, n, d, c.rms_norm_eps)?;
            let (gate, _) = self.project(be, lora, l, Proj::Gate, &xn2, n)?;
            let (up, _) = self.project(be, lora, l, Proj::Up, &xn2, n)?;
            let act = be.swiglu(&gate, &up)?;
            let (mut out, _) = self.project(be, lora, l, Proj::Down, &act, n)?;
            match self.layers.get(l + 1) {
                Some(next) => {
                    let eps = c.rms_norm_eps;
                    fused = Some(
                        be.add_rmsnorm(&mut out, &h_mid, &next.attn_norm, n, d, eps)?
                            .0,
                    );
                }
                None => be.add_assign(&mut out, &h_mid)?,
            }
            h = out;
        }
        for s in seqs.iter_mut() {
            s.cache.len += s.ids.len();
        }
        Ok(h)
    }
}
