//! The projection groups on cuBLAS with the LoRA update folded into the base GEMM
//! (`ProjectionGemm::Folded`), for bf16 activations. The plain sequence
//! (`cublas_sequence.rs`) sums every adapted output in f32 and widens every bf16 operand
//! of the LoRA products to f32; on the lent H200 those passes took about 66 ms of a
//! 157 ms Llama-3.2-1B step (BENCHMARKS.md), more than the base GEMMs. Here:
//! - **Forward.** `u_p = x A_p^T` for the whole group is one bf16 GEMM against the bf16
//!   pieces of every `A_p` (`kernels/lora.cu`: an f32 factor meets a bf16 activation as
//!   three bf16 pieces, so the f32 products lose nothing, and `x` is read once, as
//!   stored). Where `y_p` is stored bf16 (`Feeds::Kernels`), `z_p = s u_p B_p^T` is
//!   written first, in bf16 (from the bf16 pieces of `u_p` and `B_p`: `lora_update_bf16`),
//!   and the base GEMM adds `x W_p^T` to it as its C operand (beta 1): `y_p`
//!   is written once, in bf16, with no f32 copy and no rounding pass. Outputs RoPE rotates
//!   (q, k) are summed in f32, rotated and rounded once, as the plain sequence stores them
//!   (rotating a rounded bf16 output rounds twice, which the tiny model's KFAC input
//!   factors in `tests/cuda_vs_cpu.rs` showed past their bound); outputs stored f32 (o,
//!   down) take the LoRA update as the plain sequence does.
//! - **Backward.** `gA_p = s g_p B_p` and `dB_p += s g_p^T u_p` read a bf16 `g_p` as
//!   stored, against the pieces of `B_p` and `u_p`; `dA_p += gA_p^T x` for the whole
//!   group is one GEMM reading `x` once, against the pieces of every `gA_p`. `dx` is summed
//!   in f32 (an f32 copy of a bf16 `dx`, rounded once, as the plain sequence does), the
//!   group's LoRA products `sum_p gA_p A_p` first, as one GEMM of K = r per adapted
//!   projection, then the base products added to them.
//!   f32 operands (the gradients KFAC reduce sums, attention's f32 output as o's input) take
//!   the plain sequence's f32 products.
//!
//! So `u_p`, `gA_p`, `dA_p` and `dB_p` are f32 values as on the other paths (the
//! curvature estimators read `u` and `gA`); a folded `y_p` (v, gate, up) carries, besides
//! its own rounding, the rounding of `z_p` to bf16 on its low-rank part. With f32
//! activations (`--base-dtype f32`) nothing is stored bf16 and nothing needs pieces: the
//! path is the plain sequence.

use super::blas::{N, Operand, T};
use super::lora_gemm::{check_backward, check_forward};
use super::runtime::{Arg, DType};
use super::{Act, CudaBackend, DevBuf};
use crate::backend::LoraDims;
use crate::backend::group::{Feeds, LoraGroup, ProjBwd, ProjFwd, Projected, lora_dims};
use crate::error::Result;

/// The folded sequence's name in shape errors.
const OP: &str = "folded sequence";

/// bf16 pieces of an f32 LoRA factor (`lora_split_pieces`): all 24 bits of its
/// significand.
const PIECES: usize = 3;

/// A row-major f32 matrix `(rows, cols)` with row stride `ld`, at `ptr`.
#[derive(Clone, Copy)]
struct Rows {
    ptr: u64,
    rows: usize,
    cols: usize,
    ld: usize,
}

impl Rows {
    fn dense(b: &DevBuf<f32>, rows: usize, cols: usize) -> Self {
        Rows {
            ptr: b.ptr(),
            rows,
            cols,
            ld: cols,
        }
    }
    /// The same matrix starting `elems` f32 further on.
    fn offset(self, elems: usize) -> Self {
        Rows {
            ptr: self.ptr + 4 * elems as u64,
            ..self
        }
    }
}

impl CudaBackend {
    /// Piece `k < PIECES` of element `(i, j)` of `src` to `dst[i * ld_dst + k * piece_off +
    /// j]` (bf16 elements from `dst`).
    fn split_pieces(&self, src: Rows, dst: u64, ld_dst: usize, piece_off: usize) -> Result<()> {
        self.split_first_pieces(src, dst, ld_dst, piece_off, PIECES)
    }

    /// `split_pieces` writing the first `pieces` pieces only.
    fn split_first_pieces(
        &self,
        src: Rows,
        dst: u64,
        ld_dst: usize,
        piece_off: usize,
        pieces: usize,
    ) -> Result<()> {
        self.launch(
            "lora_split_pieces",
            Self::elementwise(src.rows * src.cols),
            &[
                Arg::U64(src.ptr),
                Arg::U64(dst),
                Arg::I32(src.rows as i32),
                Arg::I32(src.cols as i32),
                Arg::I32(src.ld as i32),
                Arg::I32(ld_dst as i32),
                Arg::U64(piece_off as u64),
                Arg::I32(pieces as i32),
            ],
        )
    }

    /// `z (m, n) = s u B^T`, stored bf16, for `u (m, r)` and `B (n, r)` in f32: one GEMM
    /// of K = 3r over `[u_0 | u_1 | u_0]` and `[B_0 | B_0 | B_1]` (their bf16 pieces), so
    /// the products leave out only `u_1 B_1` and the third pieces (below 2^-16 relative)
    /// before `z` is rounded once.
    fn lora_update_bf16(
        &self,
        u: &DevBuf<f32>,
        b: &DevBuf<f32>,
        (m, n, r): (usize, usize, usize),
        s: f32,
        z: &DevBuf<u16>,
    ) -> Result<()> {
        let (up, bp) = (
            self.uninit::<u16>(m * 3 * r)?,
            self.uninit::<u16>(n * 3 * r)?,
        );
        let at = |p: &DevBuf<u16>, col: usize| p.ptr() + 2 * col as u64;
        self.split_first_pieces(Rows::dense(u, m, r), up.ptr(), 3 * r, r, 2)?;
        self.split_first_pieces(Rows::dense(u, m, r), at(&up, 2 * r), 3 * r, r, 1)?;
        self.split_first_pieces(Rows::dense(b, n, r), bp.ptr(), 3 * r, r, 1)?;
        self.split_first_pieces(Rows::dense(b, n, r), at(&bp, r), 3 * r, r, 2)?;
        self.gemm(
            T,
            N,
            n,
            m,
            3 * r,
            s,
            Operand::typed(bp.ptr(), DType::Bf16, 3 * r),
            Operand::typed(up.ptr(), DType::Bf16, 3 * r),
            0.0,
            Operand::typed(z.ptr(), DType::Bf16, n),
        )
    }

    /// `dst (+)= alpha * sum over k of src[i * ld + k * piece_off + j]`: the partial
    /// products of a GEMM against `split_pieces`' layout, added in piece order; `dst` has
    /// `src`'s `(rows, cols)`.
    fn sum_pieces(
        &self,
        src: Rows,
        piece_off: usize,
        dst: Rows,
        alpha: f32,
        accumulate: bool,
    ) -> Result<()> {
        self.sum_first_pieces(src, piece_off, PIECES, dst, (alpha, accumulate))
    }

    /// `sum_pieces` over the first `pieces` partials (one: a strided copy, scaled).
    fn sum_first_pieces(
        &self,
        src: Rows,
        piece_off: usize,
        pieces: usize,
        dst: Rows,
        (alpha, accumulate): (f32, bool),
    ) -> Result<()> {
        self.launch(
            "lora_sum_pieces",
            Self::elementwise(src.rows * src.cols),
            &[
                Arg::U64(src.ptr),
                Arg::U64(dst.ptr),
                Arg::I32(src.rows as i32),
                Arg::I32(src.cols as i32),
                Arg::I32(src.ld as i32),
                Arg::U64(piece_off as u64),
                Arg::I32(pieces as i32),
                Arg::I32(dst.ld as i32),
                Arg::F32(alpha),
                Arg::I32(accumulate as i32),
            ],
        )
    }

    /// `u_q = x A_q^T (m, r)` in f32 for each `A_q (r, d_in)` of `a_s`, from a bf16 `x`:
    /// one GEMM of `x` against the pieces of every `A_q` stacked, `(PIECES R, d_in)` with
    /// `R = r * a_s.len()`, then the pieces summed.
    fn u_from_pieces(
        &self,
        x: &DevBuf<u16>,
        m: usize,
        d_in: usize,
        r: usize,
        a_s: &[&DevBuf<f32>],
    ) -> Result<Vec<DevBuf<f32>>> {
        let wide = r * a_s.len();
        let pieces = self.uninit::<u16>(PIECES * wide * d_in)?;
        for (q, a) in a_s.iter().enumerate() {
            let dst = pieces.ptr() + 2 * (q * r * d_in) as u64;
            self.split_pieces(Rows::dense(a, r, d_in), dst, d_in, wide * d_in)?;
        }
        let parts = self.uninit::<f32>(m * PIECES * wide)?;
        self.gemm(
            T,
            N,
            PIECES * wide,
            m,
            d_in,
            1.0,
            Operand::typed(pieces.ptr(), DType::Bf16, d_in),
            Operand::typed(x.ptr(), DType::Bf16, d_in),
            0.0,
            Operand::f32(parts.ptr(), PIECES * wide),
        )?;
        let parts = Rows::dense(&parts, m, PIECES * wide);
        (0..a_s.len())
            .map(|q| {
                let u = self.uninit::<f32>(m * r)?;
                let src = Rows { cols: r, ..parts }.offset(q * r);
                self.sum_pieces(src, wide, Rows::dense(&u, m, r), 1.0, false)?;
                Ok(u)
            })
            .collect()
    }

    /// `Backend::project_group` with the LoRA update folded into the base GEMM (module
    /// doc).
    pub(super) fn project_group_folded(
        &self,
        x: &Act,
        m: usize,
        d_in: usize,
        l: LoraGroup,
        projs: &[ProjFwd<'_, Self>],
    ) -> Result<Vec<Projected<Act>>> {
        if self.act_dtype() == DType::F32 {
            return self.project_group_cublas(x, m, d_in, l, projs);
        }
        check_forward(OP, x, m, d_in, l, projs)?;
        let a_s: Vec<&DevBuf<f32>> = projs
            .iter()
            .filter_map(|p| p.lora.map(|(a, _)| a.f32()))
            .collect::<Result<_>>()?;
        let mut us = match x {
            Act::Bf16(xb) => self.u_from_pieces(xb, m, d_in, l.r, &a_s)?,
            Act::F32(xf) => {
                let d = lora_dims(m, d_in, 0, l);
                a_s.iter()
                    .map(|a| self.lora_u_f32(xf, a, d))
                    .collect::<Result<_>>()?
            }
        }
        .into_iter();
        let mut out = Vec::with_capacity(projs.len());
        for p in projs {
            let n = p.d_out;
            let lora = match p.lora {
                Some((_, b)) => Some((b.f32()?, us.next().expect("one u per adapted projection"))),
                None => None,
            };
            let bf16_out = p.feeds == Feeds::Kernels && p.w.ty == DType::Bf16;
            let y = if bf16_out && p.rope.is_none() {
                let y = self.uninit::<u16>(m * n)?;
                let beta = match &lora {
                    Some((b, u)) => {
                        // z = s u B^T in bf16, which the base GEMM adds to.
                        self.lora_update_bf16(u, b, (m, n, l.r), l.scale, &y)?;
                        1.0
                    }
                    None => 0.0,
                };
                let yo = Operand::typed(y.ptr(), DType::Bf16, n);
                self.base_product(x, p.w, (m, d_in, n), beta, yo)?;
                Act::Bf16(y)
            } else {
                // f32 sums, rotated, then rounded once where stored bf16 (q, k: in one pass).
                let mut y = self.linear_impl(x, p.w, m, d_in, n)?;
                if let Some((b, u)) = &lora {
                    self.lora_update_f32(u, b, lora_dims(m, d_in, n, l), y.f32()?)?;
                }
                match p.rope {
                    Some(r) if bf16_out => {
                        let t = r.table;
                        Act::Bf16(self.rope_into_bf16(y.f32()?, t, m, r.n_heads, r.head_dim)?)
                    }
                    Some(r) => {
                        self.rope_impl(&mut y, r.table, m, r.n_heads, r.head_dim, false)?;
                        y
                    }
                    None => y,
                }
            };
            out.push((y, lora.map(|(_, u)| Act::F32(u))));
        }
        Ok(out)
    }

    /// `Backend::project_group_backward` with bf16 gradients and inputs read as stored
    /// (module doc).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn project_group_backward_folded(
        &self,
        x: &Act,
        m: usize,
        d_in: usize,
        l: LoraGroup,
        projs: Vec<ProjBwd<'_, Self>>,
        dx: &mut Act,
        accumulate: bool,
    ) -> Result<Vec<Option<Act>>> {
        if self.act_dtype() == DType::F32 {
            return self.project_group_backward_cublas(x, m, d_in, l, projs, dx, accumulate);
        }
        check_backward(OP, (x, dx), m, d_in, l, &projs)?;
        if projs.is_empty() {
            // Nothing to add, and a fresh bf16 dx is left as it is, as the other paths leave it.
            return Ok(Vec::new());
        }
        let r = l.r;
        let mut wide = self.f32_sums(dx, accumulate)?;
        let sums = match wide.as_mut() {
            Some(w) => w.f32()?.ptr(),
            None => dx.f32_mut()?.ptr(),
        };
        let mut gas = Vec::with_capacity(projs.len());
        // The dA each gA is added into, after the loop (one GEMM for the group).
        let mut pending = Vec::new();
        // The A of each gA, for dx's LoRA products; the base products, added after them.
        let mut a_s = Vec::new();
        let mut bases = Vec::with_capacity(projs.len());
        for p in projs {
            let n = p.d_out;
            bases.push((p.g, p.w, n));
            let Some(lb) = p.lora else {
                gas.push(None);
                continue;
            };
            let (a, b, u) = (lb.a.f32()?, lb.b.f32()?, lb.u.f32()?);
            let ga = match p.g {
                Act::Bf16(g) => {
                    let ga = self.uninit::<f32>(m * r)?;
                    // gA = s g [B_0 | B_1 | B_2], the pieces summed.
                    let bp = self.uninit::<u16>(n * PIECES * r)?;
                    self.split_pieces(Rows::dense(b, n, r), bp.ptr(), PIECES * r, r)?;
                    let parts = self.uninit::<f32>(m * PIECES * r)?;
                    self.gemm(
                        N,
                        N,
                        PIECES * r,
                        m,
                        n,
                        1.0,
                        Operand::typed(bp.ptr(), DType::Bf16, PIECES * r),
                        Operand::typed(g.ptr(), DType::Bf16, n),
                        0.0,
                        Operand::f32(parts.ptr(), PIECES * r),
                    )?;
                    let src = Rows::dense(&parts, m, PIECES * r);
                    let src = Rows { cols: r, ..src };
                    self.sum_pieces(src, r, Rows::dense(&ga, m, r), l.scale, false)?;
                    ga
                }
                Act::F32(g) => self.lora_ga_f32(g, b, lora_dims(m, d_in, n, l))?,
            };
            if let Some((da, db)) = lb.grads {
                self.add_db(p.g, u, (m, n, r), l.scale, db.f32_mut()?)?;
                pending.push((gas.len(), da));
            }
            a_s.push(a);
            gas.push(Some(ga));
        }
        // dx: the group's LoRA products first, one GEMM (written, or added to dx), then the
        // base products added to them, so that f32 dx is read and written once for the
        // low-rank part rather than once per adapted projection.
        let sums_op = Operand::f32(sums, d_in);
        let gs: Vec<&DevBuf<f32>> = gas.iter().flatten().collect();
        if !gs.is_empty() {
            self.lora_dx(&gs, &a_s, (m, d_in, r), accumulate, sums_op)?;
        }
        for (i, (g, w, n)) in bases.into_iter().enumerate() {
            let add = accumulate || !gs.is_empty() || i > 0;
            self.base_backward(g, w, (m, d_in, n), add, sums_op)?;
        }
        if !pending.is_empty() {
            let ga_of = |q: usize| gas[q].as_ref().expect("a pending dA has its gA");
            match x {
                Act::Bf16(xb) => {
                    let mut gs = Vec::with_capacity(pending.len());
                    let mut das = Vec::with_capacity(pending.len());
                    for (q, da) in pending {
                        gs.push(ga_of(q));
                        das.push(da.f32_mut()?);
                    }
                    self.add_da_from_pieces(xb, (m, d_in, r), &gs, &mut das)?;
                }
                Act::F32(xf) => {
                    for (q, da) in pending {
                        let d = lora_dims(m, d_in, 0, l);
                        self.lora_da_f32(xf, ga_of(q), d, da.f32_mut()?)?;
                    }
                }
            }
        }
        if let (Some(w), Act::Bf16(b)) = (&wide, &*dx) {
            self.round_into(w.f32()?, b)?;
        }
        Ok(gas.into_iter().map(|g| g.map(Act::F32)).collect())
    }

    /// `dx (m, d_in) (+)= sum_q gA_q A_q` for `gA_q (m, r)`, `A_q (r, d_in)`: one f32 GEMM
    /// of K = r * gs.len() over `[gA_1 | gA_2 | ..]` and `[A_1; A_2; ..]` (copied side by
    /// side and stacked where the group has more than one), `dx` written unless
    /// `accumulate`.
    fn lora_dx(
        &self,
        gs: &[&DevBuf<f32>],
        a_s: &[&DevBuf<f32>],
        (m, d_in, r): (usize, usize, usize),
        accumulate: bool,
        dx: Operand,
    ) -> Result<()> {
        let wide = r * gs.len();
        let beta = if accumulate { 1.0 } else { 0.0 };
        let product = |ga: u64, a: u64| {
            self.gemm(
                N,
                N,
                d_in,
                m,
                wide,
                1.0,
                Operand::f32(a, d_in),
                Operand::f32(ga, wide),
                beta,
                dx,
            )
        };
        if let ([ga], [a]) = (gs, a_s) {
            return product(ga.ptr(), a.ptr());
        }
        let (ga_cat, a_cat) = (
            self.uninit::<f32>(m * wide)?,
            self.uninit::<f32>(wide * d_in)?,
        );
        for (q, (ga, a)) in gs.iter().zip(a_s).enumerate() {
            let dst = Rows {
                ld: wide,
                ..Rows::dense(&ga_cat, m, r)
            };
            self.sum_first_pieces(Rows::dense(ga, m, r), 0, 1, dst.offset(q * r), (1.0, false))?;
            let at = a_cat.ptr() + 4 * (q * r * d_in) as u64;
            self.rt.dtod(at, a.ptr(), 4 * r * d_in)?;
        }
        product(ga_cat.ptr(), a_cat.ptr())
    }

    /// `dB (n, r) += s g^T u` for `g (m, n)`: a bf16 `g` as stored against the pieces of
    /// `u`, an f32 one in f32.
    fn add_db(
        &self,
        g: &Act,
        u: &DevBuf<f32>,
        (m, n, r): (usize, usize, usize),
        s: f32,
        db: &DevBuf<f32>,
    ) -> Result<()> {
        match g {
            Act::Bf16(g) => {
                let up = self.uninit::<u16>(m * PIECES * r)?;
                self.split_pieces(Rows::dense(u, m, r), up.ptr(), PIECES * r, r)?;
                let parts = self.uninit::<f32>(n * PIECES * r)?;
                self.gemm(
                    N,
                    T,
                    PIECES * r,
                    n,
                    m,
                    1.0,
                    Operand::typed(up.ptr(), DType::Bf16, PIECES * r),
                    Operand::typed(g.ptr(), DType::Bf16, n),
                    0.0,
                    Operand::f32(parts.ptr(), PIECES * r),
                )?;
                let src = Rows {
                    cols: r,
                    ..Rows::dense(&parts, n, PIECES * r)
                };
                self.sum_pieces(src, r, Rows::dense(db, n, r), s, true)
            }
            Act::F32(g) => {
                let d = LoraDims {
                    m,
                    d_in: 0,
                    r,
                    d_out: n,
                    scale: s,
                };
                self.lora_db_f32(g, u, d, db)
            }
        }
    }

    /// `dA_q (r, d_in) += gA_q^T x` for every `gA_q (m, r)` of `gs`: one GEMM of the pieces
    /// of every `gA_q` side by side, `(m, PIECES R)` with `R = r * gs.len()`, against a bf16
    /// `x` as stored, then each `dA_q`'s pieces summed into it.
    fn add_da_from_pieces(
        &self,
        x: &DevBuf<u16>,
        (m, d_in, r): (usize, usize, usize),
        gs: &[&DevBuf<f32>],
        das: &mut [&mut DevBuf<f32>],
    ) -> Result<()> {
        let wide = r * gs.len();
        let pieces = self.uninit::<u16>(m * PIECES * wide)?;
        for (q, ga) in gs.iter().enumerate() {
            let dst = pieces.ptr() + 2 * (q * r) as u64;
            self.split_pieces(Rows::dense(ga, m, r), dst, PIECES * wide, wide)?;
        }
        let parts = self.uninit::<f32>(PIECES * wide * d_in)?;
        self.gemm(
            N,
            T,
            d_in,
            PIECES * wide,
            m,
            1.0,
            Operand::typed(x.ptr(), DType::Bf16, d_in),
            Operand::typed(pieces.ptr(), DType::Bf16, PIECES * wide),
            0.0,
            Operand::f32(parts.ptr(), d_in),
        )?;
        for (q, da) in das.iter_mut().enumerate() {
            let src = Rows::dense(&parts, r, d_in).offset(q * r * d_in);
            self.sum_pieces(src, wide * d_in, Rows::dense(da, r, d_in), 1.0, true)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
