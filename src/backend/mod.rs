//! The `Backend` trait: every op the Llama + LoRA model, the curvature estimators and the
//! optimiser need, implemented once for the CPU (the reference, `cpu/`) and once for CUDA
//! (`cuda/`). Model code is written against this trait only.
//!
//! Conventions: activations are row-major `(rows, features)` buffers of f32 values (which a
//! backend may store at lower precision: CUDA with bf16 base weights keeps the matmuls'
//! input activations, the projection outputs only kernels read, the gradient of the
//! attention output that flash attention reads, and, except in KFAC reduce passes, the
//! gradients of the q/k/v and gate/up outputs (flash attention's and the SwiGLU
//! backward's), in bf16, `cuda::Act`, `group::Feeds`,
//! `Backend::attention_dout`, `group::GradFeeds`); a frozen base weight `W` is
//! `(d_out, d_in)` and a linear layer computes `y = x W^T`.

pub mod cpu;
pub mod cuda;
mod delegate;
pub mod device;
pub mod group;
pub mod timed;

use crate::error::{Error, Result};
use group::{GradFeeds, LoraGroup, ProjBwd, ProjFwd, Projected};

/// Rows `[start, start + len)` of a batch activation belong to one sequence; padding rows
/// (right padding) are outside every segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
}

/// Shape of one attention call. `q` is `(batch*tq, n_heads*head_dim)`; `k`, `v` hold
/// `(batch*tk_stride, n_kv_heads*head_dim)` of which the first `tk` rows per sequence are
/// used. Query `i` sits at absolute position `q_offset + i` and sees keys `0..=q_offset + i`.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub batch: usize,
    pub tq: usize,
    pub tk: usize,
    pub tk_stride: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub q_offset: usize,
}

impl AttnShape {
    pub fn probs_len(&self) -> usize {
        self.batch * self.n_heads * self.tq * self.tk
    }

    /// Length of a per-row buffer `(batch, n_heads, tq)`, such as the log-sum-exps.
    pub fn rows_len(&self) -> usize {
        self.batch * self.n_heads * self.tq
    }
}

/// What `Backend::attention` keeps for `attention_backward`: which state depends on the
/// path the backend took, and the backward pass dispatches on it.
pub enum AttnSaved<Buf> {
    /// The softmax probabilities `(batch, n_heads, tq, tk)`, zero where a key is not
    /// visible: the materialised paths (the CPU; CUDA with f32 base weights). O(T^2).
    Probs(Buf),
    /// The log-sum-exp of each query row's scaled scores, `ln sum_j exp(q.k_j / sqrt(hd))`
    /// over its visible keys, `(batch, n_heads, tq)`: flash attention (CUDA with bf16 base
    /// weights), whose backward recomputes the probabilities from it. O(T).
    Lse(Buf),
}

impl<Buf> AttnSaved<Buf> {
    /// The probabilities, for a backend whose backward needs them (`who` names it).
    pub fn probs(&self, who: &str) -> Result<&Buf> {
        match self {
            AttnSaved::Probs(p) => Ok(p),
            AttnSaved::Lse(_) => Err(Error::Usage(format!(
                "{who}: attention backward needs the probabilities its forward saves, not log-sum-exps"
            ))),
        }
    }
}

/// `Backend::attention_backward`'s `rope` as passes of their own: `rope`'s inverse on
/// `dq (batch*tq rows, n_heads heads)` and `dk (batch*tk_stride rows, n_kv_heads heads)`.
/// The CPU's (and so the reference), and CUDA's on the materialised path.
pub fn unrotate_attention_grads<B: Backend + ?Sized>(
    be: &B,
    dq: &mut B::Buf,
    dk: &mut B::Buf,
    rope: &RopeTable<B::Buf>,
    s: &AttnShape,
) -> Result<()> {
    be.rope(dq, rope, s.batch * s.tq, s.n_heads, s.head_dim, true)?;
    be.rope(
        dk,
        rope,
        s.batch * s.tk_stride,
        s.n_kv_heads,
        s.head_dim,
        true,
    )
}

/// What the fused softmax-cross-entropy backpropagates.
#[derive(Debug, Clone, Copy)]
pub enum CeTargets<'a> {
    /// Target token per row, `-100` (any negative) to ignore the row.
    Labels(&'a [i32]),
    /// Monte-Carlo Fisher: at every row whose entry in `mask` is `>= 0`, a label drawn from
    /// the model's own softmax with the counter-based generator `sample_uniform(seed, row)`.
    Sample { mask: &'a [i32], seed: u64 },
}

/// Vocabulary columns per chunk of the fused classifier (`Backend::classifier`): the
/// logits scratch is `rows x CLASSIFIER_CHUNK` f32 (32 MiB for 1024 rows) instead of
/// `rows x vocab` (201 MiB for SmolLM2's 49152, 4 GiB for 128256 x 8192 rows). A multiple
/// of 256, so the CPU's 256-column partial sums tile every chunk but the last.
pub const CLASSIFIER_CHUNK: usize = 8192;

/// What `Backend::classifier` returns.
pub struct ClassifierOut<Buf> {
    /// `lse(z_r) - z_r[t_r]` per row; 0 on ignored rows.
    pub losses: Vec<f32>,
    /// The label `t_r` each row's loss and gradient used: the data label, or the one drawn
    /// for `CeTargets::Sample`; negative on ignored rows (`-100` for sampled targets).
    pub labels: Vec<i32>,
    /// `dL/dh (rows, dim)` when a gradient scale was given.
    pub dhidden: Option<Buf>,
}

/// Counter-based uniform in [0, 1) shared by the CPU and CUDA samplers so that both draw
/// the same labels: a splitmix64 finaliser of `seed` and `row`.
pub fn sample_uniform(seed: u64, row: u64) -> f32 {
    let mut z = seed ^ row.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

#[derive(Debug, Clone, Copy)]
pub struct AdamHyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number used for bias correction.
    pub step: u64,
}

/// The diagonal Laplace penalty fused into the optimiser step: the gradient
/// `lambda * precision * (p - mean)` is added to the (scaled) loss gradient.
pub struct DiagPenalty<'a, B: Backend + ?Sized> {
    pub mean: &'a B::Buf,
    pub precision: &'a B::Buf,
    pub lambda: f32,
}

/// Precomputed RoPE angles: row `r` of an activation uses table row `r % period`.
pub struct RopeTable<Buf> {
    pub cos: Buf,
    pub sin: Buf,
    pub period: usize,
}

/// A method added here needs an arm in `delegate_backend!` and a place in the lists of the
/// wrappers that forward every op (`selftest::tap::Tap`, `timed::Timed`): one with a
/// default body would otherwise compile and silently skip the wrapped backend's own.
pub trait Backend: Send + Sync {
    /// A buffer of f32 values on the device (`to_host` reads them as f32 whatever the
    /// storage).
    type Buf: Send + Sync;
    /// A frozen base-weight matrix (f32 on the CPU, bf16 on CUDA).
    type Weight: Send + Sync;

    fn describe(&self) -> String;

    /// Bytes of device memory the backend holds, `(now, peak)`, the peak since the last
    /// `reset_device_peak` (CUDA: the sum of its live allocations). None where its memory
    /// is the process's own (the CPU: the cost report's resident set measures it).
    fn device_memory(&self) -> Option<(u64, u64)> {
        None
    }
    /// Start a new peak of `device_memory` from what is held now.
    fn reset_device_peak(&self) {}

    // --- memory -------------------------------------------------------------------------
    fn buf(&self, host: Vec<f32>) -> Result<Self::Buf>;
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    fn to_host(&self, x: &Self::Buf) -> Result<Vec<f32>>;
    /// `to_host` of a buffer no longer needed. The CPU hands its vector over rather than
    /// copying it, so that an estimate read out this way (a KFAC estimate's factors: 1.2 GB
    /// on the default model, 15 GB at Llama-3.2-1B's shapes) is not held twice.
    fn take_host(&self, x: Self::Buf) -> Result<Vec<f32>> {
        self.to_host(&x)
    }
    fn weight(&self, host: Vec<f32>, rows: usize, cols: usize) -> Result<Self::Weight>;
    /// `weight` with the compact form the model file stores it in (`stored`, whose values
    /// are `host`'s exactly), for a backend that reads it where that is faster and computes
    /// the same bits: the CPU's products of up to 8 rows (decoding). Others drop it.
    fn weight_stored(
        &self,
        host: Vec<f32>,
        stored: crate::model::quant::StoredMatrix,
        rows: usize,
        cols: usize,
    ) -> Result<Self::Weight> {
        let _ = stored;
        self.weight(host, rows, cols)
    }
    /// `dst[offset..offset + src.len()] = src`.
    fn copy_into(&self, dst: &mut Self::Buf, offset: usize, src: &Self::Buf) -> Result<()>;
    /// A new buffer holding `src[offset..offset + len]`.
    fn slice(&self, src: &Self::Buf, offset: usize, len: usize) -> Result<Self::Buf>;

    // --- model ops ----------------------------------------------------------------------
    /// `out[i, :] = table[ids[i], :]`.
    fn embedding(&self, table: &Self::Weight, ids: &[u32], dim: usize) -> Result<Self::Buf>;
    /// `y = w * x * rstd` with `rstd = 1/sqrt(mean(x^2) + eps)` per row; returns `(y, rstd)`.
    fn rmsnorm(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// The residual add and the RMSNorm after it, fused: `h += delta`, then
    /// `(y, rstd) = rmsnorm(h)` of the updated `h`, i.e. per row
    /// `y = w * h * rstd` with `rstd = 1/sqrt(mean(h^2) + eps)`. One pass over each row
    /// instead of an elementwise add and a norm that reads `h` again. The default is
    /// `add_assign` then `rmsnorm`, whose numbers a fused version must reproduce.
    #[allow(clippy::too_many_arguments)]
    fn add_rmsnorm(
        &self,
        h: &mut Self::Buf,
        delta: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(Self::Buf, Self::Buf)> {
        self.add_assign(h, delta)?;
        self.rmsnorm(h, w, rows, dim, eps)
    }
    /// `dx += d/dx <dy, rmsnorm(x)>` (the weight is frozen).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        rows: usize,
        dim: usize,
        dx: &mut Self::Buf,
    ) -> Result<()>;
    /// `y = x W^T` with `x (m, k)`, `W (n, k)`.
    fn linear(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<Self::Buf>;
    /// `dx = dy W` (or `dx += dy W` when `accumulate`).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        dy: &Self::Buf,
        w: &Self::Weight,
        m: usize,
        k: usize,
        n: usize,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// `y += s B (A x)` per row; returns `u = x A^T (m, r)`.
    fn lora_forward(
        &self,
        x: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        dims: LoraDims,
        y: &mut Self::Buf,
    ) -> Result<Self::Buf>;
    /// With `g = dL/dy (m, d_out)`: `gA = s g B (m, r)`, `dx += gA A`, and when `grads` is
    /// given `dA += gA^T x`, `dB += s g^T u`. Returns `gA`.
    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        &self,
        g: &Self::Buf,
        x: &Self::Buf,
        u: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        dims: LoraDims,
        dx: &mut Self::Buf,
        grads: Option<(&mut Self::Buf, &mut Self::Buf)>,
    ) -> Result<Self::Buf>;
    /// The projections of one group, all reading `x (m, d_in)`: `y_p = x W_p^T` plus, for
    /// an adapted one, `s u_p B_p^T` with `u_p = x A_p^T`, then RoPE where the projection
    /// asks for it (`ProjFwd::rope`: q and k). Returns `(y_p, u_p)` in order. The default
    /// is `linear` + `lora_forward` (+ `rope`) per projection (`group.rs`).
    fn project_group(
        &self,
        x: &Self::Buf,
        m: usize,
        d_in: usize,
        lora: LoraGroup,
        projs: &[ProjFwd<'_, Self>],
    ) -> Result<Vec<Projected<Self::Buf>>> {
        group::unfused_forward(self, x, m, d_in, lora, projs, |x, a, b, d, y| {
            self.lora_forward(x, a, b, d, y)
        })
    }
    /// Backward of `project_group`: `dx (+)= sum_p g_p W_p + gA_p A_p` with
    /// `gA_p = s g_p B_p`, and each adapted projection's `lora_backward` gradients.
    /// Returns `gA_p` per projection (None where not adapted).
    #[allow(clippy::too_many_arguments)]
    fn project_group_backward(
        &self,
        x: &Self::Buf,
        m: usize,
        d_in: usize,
        lora: LoraGroup,
        projs: Vec<ProjBwd<'_, Self>>,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<Vec<Option<Self::Buf>>> {
        group::unfused_backward(
            self,
            x,
            m,
            d_in,
            lora,
            projs,
            dx,
            accumulate,
            |g, x, u, a, b, d, dx, grads| self.lora_backward(g, x, u, a, b, d, dx, grads),
        )
    }
    /// Rotate-half RoPE in place on `(rows, n_heads*head_dim)`; `inverse` applies the
    /// transpose rotation (the backward pass).
    fn rope(
        &self,
        x: &mut Self::Buf,
        table: &RopeTable<Self::Buf>,
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()>;
    /// Causal softmax attention with scale `1/sqrt(head_dim)`; returns `out` and what the
    /// backward pass needs (`AttnSaved`, backend-defined).
    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        s: &AttnShape,
    ) -> Result<(Self::Buf, AttnSaved<Self::Buf>)>;
    /// `attention`'s output alone, for a forward that keeps nothing for a backward
    /// (evaluation): a backend may skip what only the backward reads (the CPU: the
    /// probabilities, 9.4 MB a layer at SmolLM2's 4 x 256, written out and read back). The
    /// default is `attention`'s `out`.
    fn attention_out(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        s: &AttnShape,
    ) -> Result<Self::Buf> {
        Ok(self.attention(q, k, v, s)?.0)
    }
    /// A zeroed buffer of `n` values for `attention_backward`'s `dout` (the o projection
    /// group's backward writes it as its `dx`), stored as the backward of the attention
    /// that saved `saved` reads it: a backend may store it at lower precision where that
    /// backward rounds every read of it anyway (CUDA's flash attention: bf16, the same
    /// values in half the bytes). The default is `zeros`.
    fn attention_dout(&self, saved: &AttnSaved<Self::Buf>, n: usize) -> Result<Self::Buf> {
        let _ = saved;
        self.zeros(n)
    }
    /// Given the forward's `out` and saved state, returns `(dq, dk, dv)`; `dk`/`dv` rows
    /// past `tk` (up to `tk_stride`) are zero. With `rope` (the table q and k were rotated
    /// by), `dq` and `dk` come back as the gradients of the unrotated q and k: `rope`'s
    /// inverse applied to `dq (batch*tq rows)` and `dk (batch*tk_stride rows)`, which a
    /// backend may do as it writes them (CUDA: flash attention's epilogues) instead of in
    /// passes of their own (`unrotate_attention_grads`). `feeds` says what reads the
    /// gradients (the q/k/v group's backward, and in a curvature pass the curvature's
    /// reductions, which may sum them over positions first), and so how a backend may
    /// store them (`GradFeeds`).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        saved: &AttnSaved<Self::Buf>,
        rope: Option<&RopeTable<Self::Buf>>,
        feeds: GradFeeds,
        s: &AttnShape,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;
    /// `silu(gate) * up`.
    fn swiglu(&self, gate: &Self::Buf, up: &Self::Buf) -> Result<Self::Buf>;
    /// Returns `(dgate, dup)`, which the gate/up projection group's backward (and, in a
    /// curvature pass, the curvature's reductions) reads and nothing else: `feeds` says
    /// which, and so how a backend may store them (`group::GradFeeds`).
    fn swiglu_backward(
        &self,
        dact: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
        feeds: GradFeeds,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// `a += b`.
    fn add_assign(&self, a: &mut Self::Buf, b: &Self::Buf) -> Result<()>;
    /// Fused softmax cross-entropy over `(rows, vocab)` logits. Returns the per-row loss
    /// (0 for ignored rows; for sampled targets the loss of the sampled label) and, when
    /// `grad_scale` is given, `dlogits = grad_scale * (softmax - onehot)` on active rows.
    fn cross_entropy(
        &self,
        logits: &Self::Buf,
        rows: usize,
        vocab: usize,
        targets: CeTargets<'_>,
        grad_scale: Option<f32>,
    ) -> Result<(Vec<f32>, Option<Self::Buf>)>;

    /// The fused classifier: the LM head, softmax cross-entropy (with Monte-Carlo labels)
    /// and its backward to the hidden states, never holding the `(rows, vocab)` logits.
    /// With `h (rows, dim)`, the frozen head `W (vocab, dim)` and `z_r = W h_r`:
    /// `loss_r = lse(z_r) - z_r[t_r]` and, when `grad_scale = s` is given,
    /// `dhidden_r = s (softmax(z_r) - onehot(t_r)) W`, the numbers of `linear` +
    /// `cross_entropy` + `linear_backward`. Sampled labels use `cross_entropy`'s rule: the
    /// first `j` with `sum_{i <= j} exp(z_i - max) > sample_uniform(seed, r) * sum_i
    /// exp(z_i - max)` (the last label if rounding leaves none).
    ///
    /// The vocabulary is swept in chunks of `CLASSIFIER_CHUNK` columns: `Z_c = h W_c^T`,
    /// then per row a running max `m` and sum `S = sum exp(z - m)` (rescaled by
    /// `exp(m_old - m_new)` when the max grows, as online softmax does) and, for the
    /// gradient, `acc = sum_{j != t} exp(z_j - m) W_j` accumulated by a second product
    /// `E_c W_c` with the same rescaling; at the end `dhidden = s (acc / S + (p_t - 1) W_t)`
    /// with `p_t = exp(z_t - lse)`, the target's term in f32 (not through a bf16 `E`,
    /// whose rounding of `p_t ~ 1` would swamp `p_t - 1`). Two head products, as the
    /// materialised path; sampled labels need the final max and sum first, so
    /// `CeTargets::Sample` adds a sweep for them and one that inverts the CDF (four).
    /// The products run over the rows with a target only (ignored rows get loss 0 and a
    /// zero gradient without entering them), as the cost report counts them.
    /// Memory: the `rows x chunk` logits (and gradient-product input), `rows x dim`.
    #[allow(clippy::too_many_arguments)]
    fn classifier(
        &self,
        hidden: &Self::Buf,
        head: &Self::Weight,
        rows: usize,
        dim: usize,
        vocab: usize,
        targets: CeTargets<'_>,
        grad_scale: Option<f32>,
    ) -> Result<ClassifierOut<Self::Buf>>;

    // --- curvature ----------------------------------------------------------------------
    /// `out (dx, dy) += alpha * sum_{segments} X_seg^T Y_seg` (KFAC factors, cross factors).
    /// When `x` and `y` are the same buffer (a symmetric factor) only the upper triangle is
    /// accumulated and then mirrored, so `out` must start symmetric (as factors do).
    #[allow(clippy::too_many_arguments)]
    fn gram_accumulate(
        &self,
        x: &Self::Buf,
        dx: usize,
        y: &Self::Buf,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// `out (d, d) += alpha * sum_{segments} X_seg^T X_seg` on the upper triangle
    /// (`i <= j`) only: the lower triangle is unspecified until [`Backend::mirror_upper`].
    /// Why: a KFAC factor sums every batch of an estimate, and mirroring it once at the end
    /// instead of after each batch saves a pass over the factor per batch (on the CPU about
    /// 1 % of a batch of a KFAC estimate of SmolLM2-135M; BENCHMARKS.md). The default
    /// accumulates the whole factor.
    fn gram_accumulate_upper(
        &self,
        x: &Self::Buf,
        d: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut Self::Buf,
    ) -> Result<()> {
        self.gram_accumulate(x, d, x, d, segments, alpha, out)
    }
    /// `out (n, n)[i, j] = out[j, i]` for `i > j`: the lower triangle from the upper.
    fn mirror_upper(&self, out: &mut Self::Buf, n: usize) -> Result<()>;
    /// `(n_segments, dim)`: the sum (or with `mean` the mean) of each segment's rows.
    fn segment_sum(
        &self,
        x: &Self::Buf,
        dim: usize,
        segments: &[Segment],
        mean: bool,
    ) -> Result<Self::Buf>;
    /// Per-sample gradient squaring: for every segment `n`,
    /// `out (dg, dy) += (alpha * G_n^T Y_n)^2` elementwise, without storing `G_n^T Y_n`
    /// for more than one segment at a time.
    #[allow(clippy::too_many_arguments)]
    fn sq_grad_accumulate(
        &self,
        g: &Self::Buf,
        dg: usize,
        y: &Self::Buf,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut Self::Buf,
    ) -> Result<()>;

    // --- small dense algebra (penalties) and the optimiser ------------------------------
    /// `C (m, n) = op(A) op(B)` with `op(A) (m, k)`: `ta`/`tb` read A/B transposed.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        a: &Self::Buf,
        b: &Self::Buf,
        m: usize,
        k: usize,
        n: usize,
        ta: bool,
        tb: bool,
    ) -> Result<Self::Buf>;
    /// A copy of `x`.
    fn dup(&self, x: &Self::Buf) -> Result<Self::Buf>;
    /// `a *= b` elementwise.
    fn mul_assign(&self, a: &mut Self::Buf, b: &Self::Buf) -> Result<()>;
    /// `x *= k`.
    fn scale(&self, x: &mut Self::Buf, k: f32) -> Result<()>;
    /// `y += alpha * x`.
    fn axpy(&self, alpha: f32, x: &Self::Buf, y: &mut Self::Buf) -> Result<()>;
    /// `sum x_i y_i` in f64.
    fn dot(&self, x: &Self::Buf, y: &Self::Buf) -> Result<f64>;
    /// `out_k = sum_i x_k[i] y_k[i]` in f64 for every pair `(x_k, y_k)` (equal lengths):
    /// the reductions of a training step (gradient norms, the penalty's forms, the
    /// finiteness checks) in one batch, so that a device waits for the host once for all
    /// of them instead of once per tensor. The default is `dot` per pair, in order (the
    /// CPU's, whose numbers therefore do not change); CUDA launches one kernel and reads
    /// back once.
    fn dots(&self, pairs: &[(&Self::Buf, &Self::Buf)]) -> Result<Vec<f64>> {
        pairs.iter().map(|(x, y)| self.dot(x, y)).collect()
    }
    /// One AdamW step on `p` with gradient `grad_scale * g` (+ the fused diagonal penalty).
    #[allow(clippy::too_many_arguments)]
    fn adamw_step(
        &self,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        h: &AdamHyper,
        grad_scale: f32,
        penalty: Option<DiagPenalty<'_, Self>>,
    ) -> Result<()>;
}

/// Dimensions of one LoRA-adapted linear layer.
#[derive(Debug, Clone, Copy)]
pub struct LoraDims {
    pub m: usize,
    pub d_in: usize,
    pub r: usize,
    pub d_out: usize,
    pub scale: f32,
}
