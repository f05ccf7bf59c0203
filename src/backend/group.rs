//! Projection groups: the linear layers of a block that read the same input (q/k/v on the
//! attention norm's output, gate/up on the MLP norm's; o and down are groups of one),
//! each with its optional LoRA, as one `Backend` call so that a backend can run the group
//! as one GEMM with the low-rank update inside it (CUDA: `cuda/lora_gemm.rs`).
//!
//! The defaults here are the per-projection sequence `linear` + `lora_forward` (+ `rope`;
//! backward: `linear_backward` + `lora_backward`), in projection order: the plain form every
//! fused implementation is tested against (CUDA's cuBLAS baseline runs it). The CPU, whose
//! numbers are the references, keeps the base products one by one and runs the group's
//! low-rank parts with its ranks stacked (`cpu/lowrank.rs`): each sum the same, in an order
//! of its own.

use super::{Backend, LoraDims, RopeTable};
use crate::error::Result;

/// The LoRA rank and scaling `s` shared by a group's adapted projections.
#[derive(Debug, Clone, Copy)]
pub struct LoraGroup {
    pub r: usize,
    pub scale: f32,
}

/// What a forward group returns per projection: its output `y (m, d_out)` and, when it
/// is adapted, `u = x A^T (m, r)` (kept for the backward).
pub type Projected<Buf> = (Buf, Option<Buf>);

/// What reads a projection's output `y`, which decides how a backend may store it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feeds {
    /// Kernels only (q/k/v: RoPE and attention; gate/up: SwiGLU): a backend may keep `y`
    /// at the storage precision of the activations around the matmuls (CUDA with bf16
    /// base weights: bf16, as those kernels' consumers round it anyway).
    Kernels,
    /// The residual stream (o, down): `y` is added to it, so it stays f32 and the stream
    /// does not gather a rounding per layer.
    Residual,
}

/// What reads the gradients of a projection group's outputs (the SwiGLU backward's
/// `(dgate, dup)`, attention's `(dq, dk, dv)`), which decides how a backend may store them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradFeeds {
    /// Products of each position's `g`, summed over positions after: the projection
    /// group's backward (`dx = g W`, `gA = s g B`, `dB = g^T u`), KFAC expand's factors
    /// (`sum_t g_t g_t^T`, and kfac-tri's `sum_t gA_t g_t^T`) and diag's per-sequence
    /// gradients (`sum_{t in n} g_t u_t^T`, squared after). A backend may store them as it
    /// stores the group's outputs (CUDA with bf16 base weights: bf16, which its base GEMM
    /// rounds `g` to anyway); every product then reads the one rounding of `g`.
    Backward,
    /// A reduction that sums `g` alone over positions first: stored f32. KFAC's reduce
    /// factors square `sum_t g_t` over a sequence, where cancellation amplifies a rounding
    /// of `g` (BENCHMARKS.md, bf16 activations: the reduce factors against curvlinops
    /// crossed their bf16 bound).
    Summed,
}

/// One projection of a forward group: `y = x W^T (+ s (x A^T) B^T)`.
pub struct ProjFwd<'a, B: Backend + ?Sized> {
    /// `W (d_out, d_in)`.
    pub w: &'a B::Weight,
    pub d_out: usize,
    /// `(A (r, d_in), B (d_out, r))` when the projection is adapted.
    pub lora: Option<(&'a B::Buf, &'a B::Buf)>,
    /// What reads `y` (the CPU stores everything in f32 and ignores it).
    pub feeds: Feeds,
    /// RoPE to apply to `y` (q and k): the group returns `rope(y)` in its place.
    pub rope: Option<RopeOut<'a, B::Buf>>,
}

/// Rotate-half RoPE on a projection's output `(m, n_heads * head_dim)`, as
/// `Backend::rope` applies it (row `r` at table row `r % period`). A backend may rotate
/// inside the projection's GEMM instead of in a pass of its own (CUDA: the LoRA GEMM's
/// epilogue), which saves reading and writing `y` once.
pub struct RopeOut<'a, Buf> {
    pub table: &'a RopeTable<Buf>,
    pub n_heads: usize,
    pub head_dim: usize,
}

impl<'a, Buf> RopeOut<'a, Buf> {
    /// The rotation by `table` of `(n_heads, head_dim)` heads, where both are given.
    pub fn of(table: Option<&'a RopeTable<Buf>>, heads: Option<(usize, usize)>) -> Option<Self> {
        table
            .zip(heads)
            .map(|(table, (n_heads, head_dim))| RopeOut {
                table,
                n_heads,
                head_dim,
            })
    }
}

impl<Buf> Clone for RopeOut<'_, Buf> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<Buf> Copy for RopeOut<'_, Buf> {}

/// An adapted projection's part of a backward group.
pub struct LoraBwd<'a, B: Backend + ?Sized> {
    pub a: &'a B::Buf,
    pub b: &'a B::Buf,
    /// The forward's `u = x A^T (m, r)`.
    pub u: &'a B::Buf,
    /// `(dA, dB)` to add the weight gradients to, when they are wanted.
    pub grads: Option<(&'a mut B::Buf, &'a mut B::Buf)>,
}

/// One projection of a backward group, with its output gradient `g (m, d_out)`.
pub struct ProjBwd<'a, B: Backend + ?Sized> {
    pub w: &'a B::Weight,
    pub d_out: usize,
    pub g: &'a B::Buf,
    pub lora: Option<LoraBwd<'a, B>>,
}

/// The `LoraDims` of one projection of a group.
pub fn lora_dims(m: usize, d_in: usize, d_out: usize, l: LoraGroup) -> LoraDims {
    LoraDims {
        m,
        d_in,
        r: l.r,
        d_out,
        scale: l.scale,
    }
}

/// `Backend::project_group` as the per-projection sequence: `linear`, then `lora` (with
/// `lora_forward`'s arguments and result: the default passes `lora_forward`, the CUDA
/// baseline its cuBLAS twin), then `rope` where asked.
#[allow(clippy::too_many_arguments)]
pub fn unfused_forward<B: Backend + ?Sized>(
    be: &B,
    x: &B::Buf,
    m: usize,
    d_in: usize,
    l: LoraGroup,
    projs: &[ProjFwd<'_, B>],
    lora: impl Fn(&B::Buf, &B::Buf, &B::Buf, LoraDims, &mut B::Buf) -> Result<B::Buf>,
) -> Result<Vec<Projected<B::Buf>>> {
    projs
        .iter()
        .map(|p| {
            let mut y = be.linear(x, p.w, m, d_in, p.d_out)?;
            let u = match p.lora {
                Some((a, b)) => Some(lora(x, a, b, lora_dims(m, d_in, p.d_out, l), &mut y)?),
                None => None,
            };
            if let Some(r) = p.rope {
                be.rope(&mut y, r.table, m, r.n_heads, r.head_dim, false)?;
            }
            Ok((y, u))
        })
        .collect()
}

/// `Backend::project_group_backward` as the per-projection sequence: `linear_backward`,
/// then `lora` (with `lora_backward`'s arguments `(g, x, u, A, B, dims, dx, grads)` and
/// result `gA`: the default passes `lora_backward`, the CUDA baseline its cuBLAS twin).
#[allow(clippy::too_many_arguments)]
pub fn unfused_backward<B: Backend + ?Sized>(
    be: &B,
    x: &B::Buf,
    m: usize,
    d_in: usize,
    l: LoraGroup,
    projs: Vec<ProjBwd<'_, B>>,
    dx: &mut B::Buf,
    accumulate: bool,
    lora: impl Fn(
        &B::Buf,
        &B::Buf,
        &B::Buf,
        &B::Buf,
        &B::Buf,
        LoraDims,
        &mut B::Buf,
        Option<(&mut B::Buf, &mut B::Buf)>,
    ) -> Result<B::Buf>,
) -> Result<Vec<Option<B::Buf>>> {
    let mut out = Vec::with_capacity(projs.len());
    for (i, p) in projs.into_iter().enumerate() {
        be.linear_backward(p.g, p.w, m, d_in, p.d_out, dx, accumulate || i > 0)?;
        out.push(match p.lora {
            Some(lb) => {
                let d = lora_dims(m, d_in, p.d_out, l);
                Some(lora(p.g, x, lb.u, lb.a, lb.b, d, dx, lb.grads)?)
            }
            None => None,
        });
    }
    Ok(out)
}
