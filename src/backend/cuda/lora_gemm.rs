//! LoRA inside the GEMMs: `Backend::project_group` and its backward on CUDA, as launches of
//! the grouped, K-segmented tensor-core GEMM of `kernels/lora_gemm.cuh` (its header gives
//! the tiling, the precision and how each product maps onto it). Per group, forward: one
//! launch for every `u_p = x A_p^T` (K split over blocks when the launch is narrow:
//! `splits_for`), one for every `y_p = [x | s u_p] [W_p | B_p]^T`
//! (stored bf16 where `y_p` feeds kernels and the activations are bf16: `Feeds`; q and k
//! rotated by RoPE in the epilogue, `ROPE_FUSED_HEAD_DIMS`);
//! backward (`g_p` read as stored: bf16 for gate/up, and for q/k/v where flash attention
//! stores them so, with bf16 base weights unless KFAC reduce sums them, `GradFeeds`): one
//! for every `gA_p = s g_p B_p`, one for `dx = [g_1 .. | gA_1 ..] [W_1; ..; A_1; ..]`,
//! and per adapted projection the weight gradients `dA += gA^T x`, `dB += s g^T u` as
//! tensor-core Gram products
//! (`gram_accumulate`, reductions over the rows). With `Base::Cublas`
//! (`ProjectionGemm::Hybrid`) the base products `x W_p^T` and `g_p W_p` run on cuBLAS
//! instead: each y launch takes its projection's f32 `x W_p^T` as an addend (the kernel
//! runs the LoRA segments, adds, rotates and stores); cuBLAS sums the `g_p W_p` into an
//! f32 dx, to which the dx launch adds the LoRA segments, or into an f32 copy of a bf16
//! dx, which it takes as its addend. The per-projection cuBLAS sequence
//! (`baselines.rs`, `ProjectionGemm::Cublas`) is the default path, the fastest measured.

use bytemuck::{Pod, Zeroable};

use super::runtime::{Arg, DType, LaunchConfig};
use super::{Act, BaseDtype, CudaBackend, LoraGemmTiling, Weight, lora_tiling};
use crate::backend::Segment;
use crate::backend::group::{Feeds, LoraGroup, ProjBwd, ProjFwd, Projected};
use crate::error::{Error, Result};

/// Threads per block (THREADS of lora_gemm.cuh).
const THREADS: u32 = 256;
/// bf16 pieces of an f32 operand for f32 products (PIECES of lora_gemm.cuh).
const PIECES: i32 = lora_tiling::PIECES as i32;

/// One K segment: `alpha X (m, k) op(W)`; `Seg` of lora_gemm.cuh.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Seg {
    x: u64,
    w: u64,
    ld_x: i32,
    k: i32,
    ld_w: i32,
    w_bf16: i32,
    alpha: f32,
    pieces_x: i32,
    pieces_w: i32,
    x_bf16: i32,
}

/// One output `(m, n)` and its segments; `Prob` of lora_gemm.cuh.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Prob {
    out: u64,
    rope_cos: u64,
    rope_sin: u64,
    addend: u64,
    n: i32,
    accumulate: i32,
    tile_start: i32,
    seg_begin: i32,
    seg_end: i32,
    out_bf16: i32,
    rope_hd: i32,
    rope_period: i32,
}

/// Capacity of a launch's table (`MAX_PROBS`, `MAX_SEGS` of lora_gemm.cuh).
const MAX_PROBS: usize = 8;
const MAX_SEGS: usize = 16;
/// Projections per group launch: the forward's y launch has a problem of two segments
/// per projection, the backward's dx launch two segments per projection. Larger groups
/// go in several launches.
const MAX_GROUP: usize = 8;
const _: () = assert!(MAX_GROUP <= MAX_PROBS && 2 * MAX_GROUP <= MAX_SEGS);

/// A launch's problems and segments, the kernel's by-value parameter (`Table` of
/// lora_gemm.cuh), the unused entries zero.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Table {
    probs: [Prob; MAX_PROBS],
    segs: [Seg; MAX_SEGS],
}

/// A launch with fewer blocks than this splits K (`splits_for`): two waves of an H200's 132
/// multiprocessors at one block each (a smaller GPU is filled the more).
const MIN_BLOCKS: usize = 264;
/// Nor does a split get fewer K steps than this (each split's partial costs an m x n
/// write and read).
const MIN_SPLIT_STEPS: usize = 8;
/// At most this many splits.
const MAX_SPLITS: usize = 16;

/// How many ways to split the K steps of a launch of `blocks` blocks whose longest problem
/// has `steps` of them: enough for `MIN_BLOCKS`, each split keeping `MIN_SPLIT_STEPS`.
/// A function of the shapes alone, so results do not depend on the device.
fn splits_for(blocks: usize, steps: usize) -> usize {
    if blocks == 0 || blocks >= MIN_BLOCKS {
        return 1;
    }
    MIN_BLOCKS
        .div_ceil(blocks)
        .min(steps / MIN_SPLIT_STEPS)
        .clamp(1, MAX_SPLITS)
}

/// Head dims whose RoPE the kernel applies in its epilogue: the multiples of 16 (whole
/// 8-column fragment pairs) that divide a warp's 64 output columns (`rope_epilogue` of
/// lora_gemm.cuh), which covers the heads of 64 of Llama 3.2 1B and SmolLM2. Other head
/// dims (128: Llama 3.2 3B, Llama 3 8B) are rotated by rope.cu after the launch.
const ROPE_FUSED_HEAD_DIMS: [usize; 3] = [16, 32, 64];

/// A problem's RoPE, as the kernel reads it.
#[derive(Clone, Copy)]
struct RopeArgs {
    cos: u64,
    sin: u64,
    head_dim: i32,
    period: i32,
}

/// How the kernel reads a segment's weight: `W (n, k)` (`y = x W^T`) or `W (k, n)` (`dx = g W`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    NMajor,
    KMajor,
}

/// Where a group's base products (`x W^T` forward, `g W` backward) run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Base {
    /// In the grouped kernel, as the first segment of each problem
    /// (`ProjectionGemm::Fused`).
    Kernel,
    /// On cuBLAS, each product's f32 result the problem's addend, so that the kernel runs
    /// the LoRA segments alone and stores the output (`ProjectionGemm::Hybrid`).
    Cublas,
}

/// A problem as the host builds it.
struct Problem {
    out: u64,
    n: usize,
    accumulate: bool,
    segs: Vec<Seg>,
    /// The output is stored bf16 (else f32).
    out_bf16: bool,
    /// RoPE rotates the output before it is stored (the forward's q and k).
    rope: Option<RopeArgs>,
    /// An f32 `(m, n)` matrix added to the sums before RoPE and the store (the base
    /// product cuBLAS computed, `ProjectionGemm::Hybrid`).
    addend: Option<u64>,
}

fn dim(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::usage(format!("LoRA GEMM: {what} {v} exceeds i32")))
}

/// The op's name in shape errors.
const OP: &str = "LoRA GEMM";

/// `what` of `op` holds `want` elements, else a device error naming both.
fn check_len(op: &str, what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::Device(format!(
            "{op}: {what} holds {got} elements, the shapes need {want}"
        )));
    }
    Ok(())
}

/// The lengths a forward group needs (`x`, and each projection's `W`, `A`, `B` and rotated
/// width), checked before any work; `op` names the path in the error.
pub(super) fn check_forward(
    op: &str,
    x: &Act,
    m: usize,
    d_in: usize,
    l: LoraGroup,
    projs: &[ProjFwd<'_, CudaBackend>],
) -> Result<()> {
    check_len(op, "x", x.len(), m * d_in)?;
    for p in projs {
        check_len(op, "W", weight_elems(p.w), p.d_out * d_in)?;
        if let Some((a, b)) = p.lora {
            check_len(op, "A", a.len(), l.r * d_in)?;
            check_len(op, "B", b.len(), p.d_out * l.r)?;
        }
        if let Some(r) = p.rope {
            check_len(op, "rotated output", p.d_out, r.n_heads * r.head_dim)?;
        }
    }
    Ok(())
}

/// The lengths a backward group needs (`x`, `dx`, and each projection's `W`, `g`, `A`,
/// `B`, `u`, `dA`, `dB`), checked before any work; `op` names the path in the error.
pub(super) fn check_backward(
    op: &str,
    (x, dx): (&Act, &Act),
    m: usize,
    d_in: usize,
    l: LoraGroup,
    projs: &[ProjBwd<'_, CudaBackend>],
) -> Result<()> {
    check_len(op, "x", x.len(), m * d_in)?;
    check_len(op, "dx", dx.len(), m * d_in)?;
    for p in projs {
        check_len(op, "W", weight_elems(p.w), p.d_out * d_in)?;
        check_len(op, "g", p.g.len(), m * p.d_out)?;
        if let Some(lb) = &p.lora {
            check_len(op, "A", lb.a.len(), l.r * d_in)?;
            check_len(op, "B", lb.b.len(), p.d_out * l.r)?;
            check_len(op, "u", lb.u.len(), m * l.r)?;
            if let Some((da, db)) = &lb.grads {
                check_len(op, "dA", da.len(), l.r * d_in)?;
                check_len(op, "dB", db.len(), p.d_out * l.r)?;
            }
        }
    }
    Ok(())
}

/// Elements of a base weight (its buffer holds bytes).
fn weight_elems(w: &Weight) -> usize {
    w.buf.len() / if w.ty == DType::Bf16 { 2 } else { 4 }
}

impl CudaBackend {
    /// A segment over the f32 LoRA matrix `w`: three bf16 pieces per side, f32 products.
    fn lora_seg(
        &self,
        x: u64,
        ld_x: usize,
        k: usize,
        w: u64,
        ld_w: usize,
        alpha: f32,
    ) -> Result<Seg> {
        Ok(Seg {
            x,
            w,
            ld_x: dim(ld_x, "row stride")?,
            k: dim(k, "K")?,
            ld_w: dim(ld_w, "row stride")?,
            w_bf16: 0,
            alpha,
            pieces_x: PIECES,
            pieces_w: PIECES,
            x_bf16: 0,
        })
    }

    /// A segment over a base weight: bf16 products on the bf16 engine (X rounded to bf16,
    /// as cuBLAS is fed there, or a bf16 activation as stored), f32 ones from bf16 pieces
    /// on the f32 engine. `x` is an f32 matrix unless `x_bf16`.
    fn base_seg(
        &self,
        (x, x_bf16): (u64, bool),
        ld_x: usize,
        k: usize,
        w: &Weight,
        ld_w: usize,
    ) -> Result<Seg> {
        let f32_engine = self.base_dtype() == BaseDtype::F32;
        Ok(Seg {
            x,
            w: w.ptr(),
            ld_x: dim(ld_x, "row stride")?,
            k: dim(k, "K")?,
            ld_w: dim(ld_w, "row stride")?,
            w_bf16: (w.ty == DType::Bf16) as i32,
            alpha: 1.0,
            // A bf16 X is one exact piece.
            pieces_x: if f32_engine && !x_bf16 { PIECES } else { 1 },
            pieces_w: if w.ty == DType::F32 { PIECES } else { 1 },
            x_bf16: x_bf16 as i32,
        })
    }

    /// One launch of the grouped GEMM over `problems`, all with `m` rows.
    fn lora_gemm(&self, layout: Layout, m: usize, problems: &[Problem]) -> Result<()> {
        self.lora_gemm_splits(self.lora_gemm_tiling(), layout, m, problems, 1)
    }

    /// `lora_gemm` for problems a few column tiles wide (the u and gA products: r columns
    /// each) with f32 outputs, not accumulated or rotated: with too few
    /// blocks to fill the device, K is split (`splits_for`), each split's partial sum
    /// written to its own slice of a scratch buffer and the slices added in split order
    /// (`gram_reduce_splits`): deterministic, the sum's rounding fixed by the shapes.
    fn lora_gemm_split_k(&self, layout: Layout, m: usize, problems: &[Problem]) -> Result<()> {
        let tiling = self.lora_gemm_tiling();
        let ((bm, bn), bk) = (tiling.tile(), tiling.k_step());
        let blocks: usize =
            problems.iter().map(|p| p.n.div_ceil(bn)).sum::<usize>() * m.div_ceil(bm);
        let steps = problems
            .iter()
            .map(|p| {
                p.segs
                    .iter()
                    .map(|s| (s.k.max(0) as usize).div_ceil(bk))
                    .sum::<usize>()
            })
            .max()
            .unwrap_or(0);
        let splits = splits_for(blocks, steps);
        if splits == 1 {
            return self.lora_gemm_splits(tiling, layout, m, problems, 1);
        }
        if problems
            .iter()
            .any(|p| p.accumulate || p.out_bf16 || p.rope.is_some() || p.addend.is_some())
        {
            return Err(Error::Device(
                "LoRA GEMM: split K needs f32 outputs, not accumulated, added to or rotated".into(),
            ));
        }
        let parts = problems
            .iter()
            .map(|p| self.uninit::<f32>(splits * m * p.n))
            .collect::<Result<Vec<_>>>()?;
        let staged: Vec<Problem> = problems
            .iter()
            .zip(&parts)
            .map(|(p, part)| Problem {
                out: part.ptr(),
                n: p.n,
                accumulate: false,
                segs: p.segs.clone(),
                out_bf16: false,
                rope: None,
                addend: None,
            })
            .collect();
        self.lora_gemm_splits(tiling, layout, m, &staged, splits)?;
        for (p, part) in problems.iter().zip(&parts) {
            // out[i][j] = sum_s part[s][i][j] (rows m, columns n, row stride n).
            self.launch(
                "gram_reduce_splits",
                Self::elementwise(m * p.n),
                &[
                    Arg::U64(part.ptr()),
                    Arg::I32(splits as i32),
                    Arg::I32(dim(m, "rows")?),
                    Arg::I32(dim(p.n, "width")?),
                    Arg::I32(0),
                    Arg::F32(1.0),
                    Arg::U64(p.out),
                    Arg::U64(p.n as u64),
                    Arg::U64(1),
                    Arg::I32(0),
                ],
            )?;
        }
        Ok(())
    }

    /// One launch over `problems` with K split `splits` ways (grid z; one: no split).
    fn lora_gemm_splits(
        &self,
        tiling: LoraGemmTiling,
        layout: Layout,
        m: usize,
        problems: &[Problem],
        splits: usize,
    ) -> Result<()> {
        let (bm, bn) = tiling.tile();
        let n_segs: usize = problems.iter().map(|p| p.segs.len()).sum();
        if problems.len() > MAX_PROBS || n_segs > MAX_SEGS {
            return Err(Error::Device(format!(
                "LoRA GEMM: {} problems with {n_segs} segments exceed a launch's table \
                 ({MAX_PROBS} problems, {MAX_SEGS} segments)",
                problems.len()
            )));
        }
        let mut table = Table::zeroed();
        let mut segs = 0usize;
        let mut tiles = 0usize;
        for (slot, p) in table.probs.iter_mut().zip(problems) {
            let rope = p.rope.unwrap_or(RopeArgs {
                cos: 0,
                sin: 0,
                head_dim: 0,
                period: 1,
            });
            *slot = Prob {
                out: p.out,
                addend: p.addend.unwrap_or(0),
                rope_cos: rope.cos,
                rope_sin: rope.sin,
                rope_hd: rope.head_dim,
                rope_period: rope.period,
                n: dim(p.n, "width")?,
                accumulate: p.accumulate as i32,
                tile_start: dim(tiles, "column tiles")?,
                seg_begin: segs as i32,
                seg_end: (segs + p.segs.len()) as i32,
                out_bf16: p.out_bf16 as i32,
            };
            table.segs[segs..segs + p.segs.len()].copy_from_slice(&p.segs);
            segs += p.segs.len();
            tiles += p.n.div_ceil(bn);
        }
        let row_tiles = m.div_ceil(bm);
        if tiles == 0 || row_tiles == 0 {
            return Ok(());
        }
        // Grid y holds the row tiles, or the column tiles when rows come first.
        let (across, down) = if tiling.rows_fastest() {
            (row_tiles, tiles)
        } else {
            (tiles, row_tiles)
        };
        if down > 65535 {
            return Err(Error::usage(format!(
                "LoRA GEMM: {m} rows by {tiles} column tiles exceed the grid ({} tiling)",
                tiling.name()
            )));
        }
        let k_major = layout == Layout::KMajor;
        let cfg = LaunchConfig {
            grid: [dim(across, "tiles")? as u32, down as u32, splits as u32],
            block: [THREADS, 1, 1],
            shared_bytes: tiling.smem_bytes(k_major),
        };
        let args = [
            Arg::Bytes(bytemuck::bytes_of(&table)),
            Arg::I32(problems.len() as i32),
            Arg::I32(dim(m, "rows")?),
            Arg::I32(tiling.rows_fastest() as i32),
        ];
        self.launch(tiling.entry(k_major), cfg, &args)
    }

    /// `project_group`, `MAX_GROUP` projections at a time (each launch's table holds
    /// them), the base products where `base` says.
    pub(super) fn project_group_impl(
        &self,
        x: &Act,
        m: usize,
        d_in: usize,
        l: LoraGroup,
        projs: &[ProjFwd<'_, Self>],
        base: Base,
    ) -> Result<Vec<Projected<Act>>> {
        let mut out = Vec::with_capacity(projs.len());
        for chunk in projs.chunks(MAX_GROUP) {
            out.extend(self.project_chunk(x, m, d_in, l, chunk, base)?);
        }
        Ok(out)
    }

    fn project_chunk(
        &self,
        x: &Act,
        m: usize,
        d_in: usize,
        l: LoraGroup,
        projs: &[ProjFwd<'_, Self>],
        base: Base,
    ) -> Result<Vec<Projected<Act>>> {
        check_forward(OP, x, m, d_in, l, projs)?;
        let xs = (x.addr(), x.dtype() == DType::Bf16);
        let mut us = Vec::with_capacity(projs.len());
        let mut problems = Vec::new();
        for p in projs {
            us.push(match p.lora {
                Some((a, _)) => {
                    let u = self.uninit::<f32>(m * l.r)?;
                    let mut seg = self.lora_seg(x.addr(), d_in, d_in, a.f32()?.ptr(), d_in, 1.0)?;
                    if xs.1 {
                        // A bf16 x is one exact piece; A keeps its three.
                        seg.x_bf16 = 1;
                        seg.pieces_x = 1;
                    }
                    problems.push(Problem {
                        out: u.ptr(),
                        n: l.r,
                        accumulate: false,
                        segs: vec![seg],
                        out_bf16: false,
                        rope: None,
                        addend: None,
                    });
                    Some(Act::from(u))
                }
                None => None,
            });
        }
        self.lora_gemm_split_k(Layout::NMajor, m, &problems)?;
        let mut ys = Vec::with_capacity(projs.len());
        let mut problems = Vec::with_capacity(projs.len());
        // The base products from cuBLAS (`Base::Cublas`), held until the launch that adds
        // them is queued.
        let mut addends = Vec::new();
        // Rotations the epilogue cannot do: rope.cu after the launch.
        let mut unfused = Vec::new();
        for (i, (p, u)) in projs.iter().zip(&us).enumerate() {
            let ty = match p.feeds {
                Feeds::Kernels => self.act_dtype(),
                Feeds::Residual => DType::F32,
            };
            let y = self.uninit_act(m * p.d_out, ty)?;
            let mut segs = Vec::with_capacity(2);
            let mut addend = None;
            match base {
                Base::Kernel => segs.push(self.base_seg(xs, d_in, d_in, p.w, d_in)?),
                Base::Cublas => {
                    let yb = self.linear_impl(x, p.w, m, d_in, p.d_out)?;
                    addend = Some(yb.addr());
                    addends.push(yb);
                }
            }
            if let (Some((_, b)), Some(u)) = (p.lora, u) {
                segs.push(self.lora_seg(u.addr(), l.r, l.r, b.f32()?.ptr(), l.r, l.scale)?);
            }
            let mut rope = None;
            if let Some(r) = p.rope {
                Self::check_rope_table(r.table, r.head_dim, "LoRA GEMM")?;
                if ROPE_FUSED_HEAD_DIMS.contains(&r.head_dim) {
                    rope = Some(RopeArgs {
                        cos: r.table.cos.f32()?.ptr(),
                        sin: r.table.sin.f32()?.ptr(),
                        head_dim: dim(r.head_dim, "head dim")?,
                        period: dim(r.table.period, "RoPE period")?,
                    });
                } else {
                    unfused.push((i, r));
                }
            }
            problems.push(Problem {
                out: y.addr(),
                n: p.d_out,
                accumulate: false,
                segs,
                out_bf16: ty == DType::Bf16,
                rope,
                addend,
            });
            ys.push(y);
        }
        self.lora_gemm(Layout::NMajor, m, &problems)?;
        for (i, r) in unfused {
            self.rope_impl(&mut ys[i], r.table, m, r.n_heads, r.head_dim, false)?;
        }
        Ok(ys.into_iter().zip(us).collect())
    }

    /// `project_group_backward`, `MAX_GROUP` projections at a time, the later ones adding
    /// to `dx`, the base products where `base` says.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn project_group_backward_impl(
        &self,
        x: &Act,
        m: usize,
        d_in: usize,
        l: LoraGroup,
        mut projs: Vec<ProjBwd<'_, Self>>,
        dx: &mut Act,
        accumulate: bool,
        base: Base,
    ) -> Result<Vec<Option<Act>>> {
        let mut gas = Vec::with_capacity(projs.len());
        let mut accumulate = accumulate;
        while !projs.is_empty() {
            let rest = projs.split_off(projs.len().min(MAX_GROUP));
            let chunk = std::mem::replace(&mut projs, rest);
            let io = (&mut *dx, accumulate);
            gas.extend(self.project_chunk_backward(x, m, d_in, l, chunk, io, base)?);
            accumulate = true;
        }
        Ok(gas)
    }

    #[allow(clippy::too_many_arguments)]
    fn project_chunk_backward(
        &self,
        x: &Act,
        m: usize,
        d_in: usize,
        l: LoraGroup,
        projs: Vec<ProjBwd<'_, Self>>,
        (dx, accumulate): (&mut Act, bool),
        base: Base,
    ) -> Result<Vec<Option<Act>>> {
        check_backward(OP, (x, dx), m, d_in, l, &projs)?;
        // gA_p = s g_p B_p for every adapted projection: one launch.
        let mut gas = Vec::with_capacity(projs.len());
        let mut problems = Vec::new();
        for p in &projs {
            gas.push(match &p.lora {
                Some(lb) => {
                    let ga = self.uninit::<f32>(m * l.r)?;
                    let mut seg = self.lora_seg(
                        p.g.addr(),
                        p.d_out,
                        p.d_out,
                        lb.b.f32()?.ptr(),
                        l.r,
                        l.scale,
                    )?;
                    if p.g.dtype() == DType::Bf16 {
                        // A bf16 g (dgate, dup; dq, dk, dv) is one exact piece; B keeps its three:
                        // f32 products of the values g holds.
                        seg.x_bf16 = 1;
                        seg.pieces_x = 1;
                    }
                    problems.push(Problem {
                        out: ga.ptr(),
                        n: l.r,
                        accumulate: false,
                        out_bf16: false,
                        segs: vec![seg],
                        rope: None,
                        addend: None,
                    });
                    Some(ga)
                }
                None => None,
            });
        }
        self.lora_gemm_split_k(Layout::KMajor, m, &problems)?;
        // dx (+)= [g_1 .. g_P | gA_1 ..] [W_1; ..; W_P; A_1; ..]: one launch (with
        // `Base::Cublas`, the g W products first on cuBLAS, then the launch for the rest).
        let mut segs = Vec::with_capacity(2 * projs.len());
        // An f32 copy of a bf16 dx that cuBLAS summed into, held until the launch is queued.
        let mut held = None;
        let mut dx_accumulate = accumulate;
        let mut addend = None;
        match base {
            Base::Kernel => {
                for p in &projs {
                    // The bf16 engine rounds an f32 g to bf16 here, as it rounds a stored
                    // bf16 g (to nearest even both), so a g stored bf16 gives this product
                    // bit for bit.
                    let g = (p.g.addr(), p.g.dtype() == DType::Bf16);
                    segs.push(self.base_seg(g, p.d_out, p.d_out, p.w, d_in)?);
                }
            }
            Base::Cublas => {
                // cuBLAS adds into f32: into dx itself, or into an f32 copy of a bf16 dx
                // that the launch adds and rounds once.
                let mut wide = self.f32_sums(dx, accumulate)?;
                let sums: &mut Act = match wide.as_mut() {
                    Some(w) => w,
                    None => &mut *dx,
                };
                for (i, p) in projs.iter().enumerate() {
                    self.linear_backward_impl(
                        p.g,
                        p.w,
                        m,
                        d_in,
                        p.d_out,
                        sums,
                        accumulate || i > 0,
                    )?;
                }
                match wide {
                    Some(w) => {
                        addend = Some(w.addr());
                        dx_accumulate = false;
                        held = Some(w);
                    }
                    None => dx_accumulate = true,
                }
            }
        }
        for (p, ga) in projs.iter().zip(&gas) {
            if let (Some(lb), Some(ga)) = (&p.lora, ga) {
                segs.push(self.lora_seg(ga.ptr(), l.r, l.r, lb.a.f32()?.ptr(), d_in, 1.0)?);
            }
        }
        // dx as the caller stores it: f32, or bf16 for o_proj's dx when flash attention
        // reads it (`Backend::attention_dout`).
        let dx_problem = Problem {
            out: dx.addr(),
            n: d_in,
            accumulate: dx_accumulate,
            segs,
            out_bf16: dx.dtype() == DType::Bf16,
            rope: None,
            addend,
        };
        // Nothing left for the launch when cuBLAS summed into an f32 dx and no projection
        // is adapted.
        if !(dx_problem.segs.is_empty() && dx_problem.addend.is_none() && dx_accumulate) {
            self.lora_gemm(Layout::KMajor, m, std::slice::from_ref(&dx_problem))?;
        }
        drop(held);
        // The weight gradients: reductions over all m rows, on the Gram kernels (which read
        // x and g as stored).
        let rows = [Segment { start: 0, len: m }];
        for (p, ga) in projs.into_iter().zip(&gas) {
            if let (Some(lb), Some(ga)) = (p.lora, ga)
                && let Some((da, db)) = lb.grads
            {
                self.gram_accumulate_impl(
                    ga.into(),
                    l.r,
                    x.into(),
                    d_in,
                    &rows,
                    1.0,
                    da.f32_mut()?,
                )?;
                let u = lb.u.f32()?;
                self.gram_accumulate_impl(
                    p.g.into(),
                    p.d_out,
                    u.into(),
                    l.r,
                    &rows,
                    l.scale,
                    db.f32_mut()?,
                )?;
            }
        }
        Ok(gas.into_iter().map(|g| g.map(Act::from)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::splits_for;

    /// Enough splits to reach two waves of 132 multiprocessors, each keeping 8 steps, at
    /// most 16; none for a launch already that wide or too short to split.
    #[test]
    fn splits_fill_the_device_and_keep_steps() {
        assert_eq!(splits_for(264, 256), 1, "wide enough");
        assert_eq!(splits_for(0, 256), 1, "nothing to launch");
        assert_eq!(
            splits_for(48, 64),
            6,
            "q/k/v u at 2048 rows: 48 blocks, K 2048"
        );
        assert_eq!(
            splits_for(16, 256),
            16,
            "down's u: 16 blocks, K 8192 (17 capped)"
        );
        assert_eq!(splits_for(1, 35), 4, "35 steps keep 8 each");
        assert_eq!(splits_for(3, 15), 1, "under two splits of 8 steps");
    }
}
