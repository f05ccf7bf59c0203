//! Curvature primitives on CUDA: KFAC factor (Gram) accumulation and per-sample gradient
//! squaring for `diag` on tensor cores (`curvature_tc.cu`; its header gives the tiling,
//! precision and reduction order), plus segment sums and the mirror of symmetric factors
//! (`curvature.cu`). The host side lists the row tiles (32 positions each, never crossing
//! a gap between segments or, for squaring, a sequence boundary) and chooses how many
//! blocks share the rows of one output tile. With `GramGemm::Cublas` the Grams of two bf16
//! operands go to cuBLAS instead (`gram_gemm.rs`).

use super::blas::Operand;
use super::runtime::{Arg, DType, LaunchConfig};
use super::{Act, BaseDtype, CudaBackend, DevBuf, GramGemm, MAX_RANK, kernels};
use crate::backend::Segment;
use crate::error::{Error, Result};

/// Rows per tile and pipeline stages (BK and STAGES of curvature_tc.cu).
const BK: usize = 32;
const STAGES: usize = 3;
/// A tile's `meta`: its row count under ROWS_MASK and the flag SEQ_END on the last tile
/// of its sequence (as in curvature_tc.cu).
const ROWS_MASK: i32 = 0xff;
const SEQ_END: i32 = 0x100;
/// Blocks worth filling the GPU with: two per SM of an H100/H200 (132 SMs). Rows are split
/// across blocks only while there are fewer output tiles than this.
const TARGET_BLOCKS: usize = 264;
/// A split of the rows covers at least this many tiles (256 positions, one chain slice).
const MIN_SPLIT_TILES: usize = 8;
/// The narrow side up to which the Gram uses 256 x 32 output tiles instead of 128 x 128.
const SKINNY: usize = 32;
/// Wide-side rows per block of the squaring kernels.
const SQ_BM: usize = 64;

/// An operand of the tensor-core kernels as it is stored: they read f32 and bf16 (what the
/// bf16 engine stores as bf16) as they are, a bf16 tile staged in shared memory as bf16.
#[derive(Clone, Copy)]
pub(super) struct Input {
    ptr: u64,
    dtype: DType,
}

impl From<&Act> for Input {
    fn from(a: &Act) -> Self {
        Input {
            ptr: a.addr(),
            dtype: a.dtype(),
        }
    }
}

impl From<&DevBuf<f32>> for Input {
    fn from(b: &DevBuf<f32>) -> Self {
        Input {
            ptr: b.ptr(),
            dtype: DType::F32,
        }
    }
}

impl Input {
    /// As a cuBLAS operand: the column-major `(ld, rows)` view of a row-major `(rows, ld)`.
    pub(super) fn operand(self, ld: usize) -> Operand {
        Operand::typed(self.ptr, self.dtype, ld)
    }
    fn bytes(self) -> usize {
        match self.dtype {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
    /// The storage part of an entry's name (`<A's>_<B's>`).
    fn tag(self) -> &'static str {
        match self.dtype {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }
    /// Whether a (rows, dim) operand can be copied 16 bytes at a time.
    fn vec(self, dim: usize) -> i32 {
        (self.ptr.is_multiple_of(16) && dim.is_multiple_of(16 / self.bytes())) as i32
    }
}

/// Shared-memory row stride, in elements, of a tile `w` wide stored as `x` is, in an
/// entry on tf32 mma or (`bf16_mma`) on bf16 mma (smem_stride of curvature_tc.cu).
fn smem_stride(w: usize, x: Input, bf16_mma: bool) -> usize {
    match x.dtype {
        _ if bf16_mma => w + 8,
        DType::F32 => w.max(16) + 8,
        DType::Bf16 => w.max(32) + 16,
    }
}

/// Dynamic shared memory of the block of `entry` with `bm` x `bn` output tiles of
/// operands `a`, `b`.
fn smem_bytes(entry: &str, bm: usize, a: Input, bn: usize, b: Input) -> u32 {
    let mma = entry.starts_with("gram_bf16_");
    (STAGES * BK * (smem_stride(bm, a, mma) * a.bytes() + smem_stride(bn, b, mma) * b.bytes()))
        as u32
}

/// Adjacent segments (no padding between them) merged, empty ones dropped.
fn merged(segments: &[Segment]) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::with_capacity(segments.len());
    for s in segments.iter().filter(|s| s.len > 0) {
        match out.last_mut() {
            Some(l) if l.start + l.len == s.start => l.len += s.len,
            _ => out.push(*s),
        }
    }
    out
}

/// `(first row, rows | SEQ_END on the last tile)` for each BK-row tile of each run.
fn row_tiles(runs: &[Segment]) -> Vec<[i32; 2]> {
    let mut tiles = Vec::new();
    for s in runs {
        let mut p = 0;
        while p < s.len {
            let rows = BK.min(s.len - p);
            let end = if p + rows == s.len { SEQ_END } else { 0 };
            tiles.push([(s.start + p) as i32, rows as i32 | end]);
            p += rows;
        }
    }
    tiles
}

impl CudaBackend {
    /// The mma precision that `tc_entry`'s entry for `a` and `b` names (see there).
    fn tc_precision(&self, kind: &str, variant: &str, a: Input, b: Input) -> Result<&'static str> {
        let both_bf16 = a.dtype == DType::Bf16 && b.dtype == DType::Bf16;
        Ok(match self.base_dtype() {
            BaseDtype::Bf16 if both_bf16 && kind == "gram" && variant == "128x128" => "bf16",
            BaseDtype::Bf16 => "tf32",
            BaseDtype::F32 if a.dtype == DType::F32 && b.dtype == DType::F32 => "3xtf32",
            BaseDtype::F32 => {
                return Err(Error::Device(format!(
                    "{kind}: a bf16 operand reached the f32 engine, which has no bf16 entry"
                )));
            }
        })
    }

    /// The entry `<kind>_<precision>_<variant>_<A's storage>_<B's storage>`: tf32 or 3xtf32
    /// for this engine's base dtype, or bf16 mma where both operands are bf16 (the 128 x 128
    /// Gram: the same products, exact in f32, at twice tf32's rate per instruction). The
    /// f32 engine stores no bf16 activations, so 3xtf32 has f32 entries only.
    fn tc_entry(&self, kind: &str, variant: &str, a: Input, b: Input) -> Result<String> {
        let precision = self.tc_precision(kind, variant, a, b)?;
        Ok(format!(
            "{kind}_{precision}_{variant}_{}_{}",
            a.tag(),
            b.tag()
        ))
    }

    /// The entry of `kind`/`variant` for operands `a (rows, a_dim)` and `b (rows, b_dim)`,
    /// and the operands it reads: as stored where an entry is built for their storage,
    /// else (a combination the model does not make) each bf16 one widened exactly to f32,
    /// a copy kept alive in `keep`, and the f32 entry. Same values, so the same result.
    fn tc_operands(
        &self,
        kind: &str,
        variant: &str,
        (a, a_dim): (Input, usize),
        (b, b_dim): (Input, usize),
        rows: usize,
        keep: &mut Vec<DevBuf<f32>>,
    ) -> Result<(String, Input, Input)> {
        let entry = self.tc_entry(kind, variant, a, b)?;
        let built = kernels::MODULES
            .iter()
            .any(|m| m.functions.contains(&entry.as_str()));
        if built {
            return Ok((entry, a, b));
        }
        let mut widen = |x: Input, dim: usize| -> Result<Input> {
            if x.dtype == DType::F32 {
                return Ok(x);
            }
            let out = self.widened(x.ptr, rows * dim)?;
            let w = Input::from(&out);
            keep.push(out);
            Ok(w)
        };
        let (a, b) = (widen(a, a_dim)?, widen(b, b_dim)?);
        Ok((self.tc_entry(kind, variant, a, b)?, a, b))
    }

    fn tiles_on_device(&self, tiles: &[[i32; 2]]) -> Result<DevBuf<i32>> {
        self.ints(&tiles.concat())
    }

    /// `out (dx, dy) += alpha * sum_seg X_seg^T Y_seg`; when `x` is `y` (a symmetric
    /// factor) only its upper triangle's tiles, the mirror left to the caller
    /// (`Backend::gram_accumulate` mirrors at once, KFAC once per estimate). Returns
    /// whether it took the product as symmetric, so callers do not judge that again.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gram_accumulate_impl(
        &self,
        x: Input,
        dx: usize,
        y: Input,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut DevBuf<f32>,
    ) -> Result<bool> {
        let symmetric = x.ptr == y.ptr && dx == dy;
        let runs = merged(segments);
        if runs.is_empty() || dx == 0 || dy == 0 {
            return Ok(false);
        }
        // C = A^T B with A (rows, m), B (rows, n), stored at out[i rs + j cs]. A narrow dx
        // is computed as out^T = Y^T X so that the narrow side is always n.
        let (a, m, b, n, rs, cs) = if symmetric || dy <= SKINNY || dx > SKINNY {
            (x, dx, y, dy, dy, 1)
        } else {
            (y, dy, x, dx, 1, dy)
        };
        let (bm, bn, threads, shape) = if n <= SKINNY {
            (256, 32, 128, "256x32")
        } else {
            (128, 128, 256, "128x128")
        };
        // Where the kernel would take bf16 mma, the cuBLAS path instead (`GramGemm`).
        if self.gram_gemm() == GramGemm::Cublas && self.tc_precision("gram", shape, a, b)? == "bf16"
        {
            self.gram_cublas_bf16(x, dx, y, dy, symmetric, &runs, alpha, out)?;
            return Ok(symmetric);
        }
        let tiles = row_tiles(&runs);
        let mut keep = Vec::new();
        let (entry, a, b) =
            self.tc_operands("gram", shape, (a, m), (b, n), rows_read(&tiles), &mut keep)?;
        let (tm, tn) = (m.div_ceil(bm), n.div_ceil(bn));
        // Symmetric: the tiles on and above the diagonal only (square tiles, or one tile).
        let out_tiles = if symmetric {
            tn * (tn + 1) / 2
        } else {
            tm * tn
        };
        let nsplit = TARGET_BLOCKS
            .div_ceil(out_tiles)
            .min(tiles.len() / MIN_SPLIT_TILES)
            .max(1);
        // One run of rows (a training step's weight gradients: all of them): the kernel
        // makes its tiles itself, and no table is copied to the device.
        let (dev_tiles, run) = match runs.as_slice() {
            [one] => (None, (one.start, one.len)),
            _ => (Some(self.tiles_on_device(&tiles)?), (0, 0)),
        };
        let partial = self.uninit::<f32>(if nsplit > 1 { nsplit * m * n } else { 0 })?;
        let cfg = LaunchConfig {
            grid: [out_tiles as u32, nsplit as u32, 1],
            block: [threads, 1, 1],
            shared_bytes: smem_bytes(&entry, bm, a, bn, b),
        };
        let args = [
            Arg::U64(a.ptr),
            Arg::U64(b.ptr),
            Arg::I32(m as i32),
            Arg::I32(n as i32),
            Arg::U64(dev_tiles.as_ref().map_or(0, |t| t.ptr())),
            Arg::I32(run.0 as i32),
            Arg::I32(run.1 as i32),
            Arg::I32(tiles.len() as i32),
            Arg::I32(tn as i32),
            Arg::I32(symmetric as i32),
            Arg::F32(alpha),
            Arg::U64(out.ptr()),
            Arg::U64(rs as u64),
            Arg::U64(cs as u64),
            Arg::U64(partial.ptr()),
            Arg::I32(a.vec(m)),
            Arg::I32(b.vec(n)),
        ];
        self.launch(&entry, cfg, &args)?;
        if nsplit > 1 {
            self.reduce_splits(&partial, nsplit, m, n, symmetric, alpha, out, rs, cs)?;
        }
        Ok(symmetric)
    }

    /// `out[i rs + j cs] += alpha * sum_s partial[s][i][j]` in split order.
    #[allow(clippy::too_many_arguments)]
    fn reduce_splits(
        &self,
        partial: &DevBuf<f32>,
        nsplit: usize,
        m: usize,
        n: usize,
        upper: bool,
        alpha: f32,
        out: &mut DevBuf<f32>,
        rs: usize,
        cs: usize,
    ) -> Result<()> {
        self.launch(
            "gram_reduce_splits",
            Self::elementwise(m * n),
            &[
                Arg::U64(partial.ptr()),
                Arg::I32(nsplit as i32),
                Arg::I32(m as i32),
                Arg::I32(n as i32),
                Arg::I32(upper as i32),
                Arg::F32(alpha),
                Arg::U64(out.ptr()),
                Arg::U64(rs as u64),
                Arg::U64(cs as u64),
                Arg::I32(1),
            ],
        )
    }

    /// The lower triangle of the square `out (n, n)` from its upper one.
    pub(super) fn mirror_upper_impl(&self, out: &mut DevBuf<f32>, n: usize) -> Result<()> {
        let t = n.div_ceil(32) as u32;
        self.launch(
            "mirror_upper",
            LaunchConfig {
                grid: [t, t, 1],
                block: [32, 8, 1],
                shared_bytes: 0,
            },
            &[Arg::U64(out.ptr()), Arg::I32(n as i32)],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn sq_grad_accumulate_impl(
        &self,
        g: Input,
        dg: usize,
        y: Input,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut DevBuf<f32>,
    ) -> Result<()> {
        // C = wide^T narrow, (wide_dim, r); out is (r, wide_dim) when g is the narrow side.
        let (narrow, wide, r, wide_dim, rs, cs) = if dg <= MAX_RANK && dg <= dy {
            (g, y, dg, dy, 1, dy)
        } else if dy <= MAX_RANK {
            (y, g, dy, dg, dy, 1)
        } else {
            return Err(Error::Device(format!(
                "per-sample squaring needs one side <= {MAX_RANK} (got {dg} x {dy})"
            )));
        };
        let seqs: Vec<Segment> = segments.iter().filter(|s| s.len > 0).copied().collect();
        if seqs.is_empty() || r == 0 || wide_dim == 0 {
            return Ok(());
        }
        let tiles = row_tiles(&seqs);
        let rank_cols = 8 * r.div_ceil(8).next_power_of_two();
        let mut keep = Vec::new();
        let (entry, wide, narrow) = self.tc_operands(
            "sq_grad",
            &format!("r{rank_cols}"),
            (wide, wide_dim),
            (narrow, r),
            rows_read(&tiles),
            &mut keep,
        )?;
        let wide_tiles = wide_dim.div_ceil(SQ_BM);
        let groups = sequence_groups(&seqs, TARGET_BLOCKS.div_ceil(wide_tiles));
        let ngroups = groups.len() - 1;
        let dev_tiles = self.tiles_on_device(&tiles)?;
        let dev_groups = self.ints(&groups)?;
        let partial = self.uninit::<f32>(if ngroups > 1 {
            ngroups * wide_dim * r
        } else {
            0
        })?;
        let cfg = LaunchConfig {
            grid: [wide_tiles as u32, ngroups as u32, 1],
            block: [128, 1, 1],
            shared_bytes: smem_bytes(&entry, SQ_BM, wide, rank_cols, narrow),
        };
        let args = [
            Arg::U64(wide.ptr),
            Arg::U64(narrow.ptr),
            Arg::I32(wide_dim as i32),
            Arg::I32(r as i32),
            Arg::U64(dev_tiles.ptr()),
            Arg::U64(dev_groups.ptr()),
            Arg::F32(alpha),
            Arg::U64(out.ptr()),
            Arg::U64(rs as u64),
            Arg::U64(cs as u64),
            Arg::U64(partial.ptr()),
            Arg::I32(wide.vec(wide_dim)),
            Arg::I32(narrow.vec(r)),
        ];
        self.launch(&entry, cfg, &args)?;
        if ngroups > 1 {
            self.reduce_splits(&partial, ngroups, wide_dim, r, false, 1.0, out, rs, cs)?;
        }
        Ok(())
    }

    pub(super) fn segment_sum_impl(
        &self,
        x: &Act,
        dim: usize,
        segments: &[Segment],
        mean: bool,
    ) -> Result<Act> {
        let (st, ln) = self.segments(segments)?;
        let out = self.uninit::<f32>(segments.len() * dim)?;
        let args = [
            Arg::U64(x.addr()),
            Arg::U64(st.ptr()),
            Arg::U64(ln.ptr()),
            Arg::I32(segments.len() as i32),
            Arg::I32(dim as i32),
            Arg::I32(mean as i32),
            Arg::U64(out.ptr()),
        ];
        let entry = match x.dtype() {
            DType::F32 => "segment_sum_f32",
            DType::Bf16 => "segment_sum_bf16",
        };
        self.launch(entry, Self::elementwise(segments.len() * dim), &args)?;
        Ok(out.into())
    }
}

/// The rows the tiles read: up to the end of the last.
fn rows_read(tiles: &[[i32; 2]]) -> usize {
    tiles
        .iter()
        .map(|t| (t[0] + (t[1] & ROWS_MASK)) as usize)
        .max()
        .unwrap_or(0)
}

/// Boundaries (first tile of each group, then the tile count) of at most `max_groups`
/// groups of whole consecutive sequences with about equal numbers of tiles.
fn sequence_groups(seqs: &[Segment], max_groups: usize) -> Vec<i32> {
    let counts: Vec<usize> = seqs.iter().map(|s| s.len.div_ceil(BK)).collect();
    let total: usize = counts.iter().sum();
    let want = max_groups.clamp(1, seqs.len());
    let mut bounds = vec![0i32];
    let mut done = 0;
    for c in counts {
        done += c;
        // close the group once it reaches its share of the tiles
        let k = bounds.len();
        if done * want >= k * total && done < total {
            bounds.push(done as i32);
        }
    }
    bounds.push(total as i32);
    bounds
}

#[cfg(test)]
mod tests {
    use super::super::kernels;
    use super::*;

    fn seg(start: usize, len: usize) -> Segment {
        Segment { start, len }
    }

    /// The Gram and squaring entries of curvature_tc.cu run on tensor cores: each one's
    /// PTX body holds the mma.sync of its precision (tf32, or bf16 with ldmatrix) and the
    /// cp.async pipeline.
    #[test]
    #[cfg_attr(
        not(lalora_cuda_kernels),
        ignore = "built without CUDA kernels (no nvcc)"
    )]
    fn curvature_ptx_runs_on_tensor_cores() {
        let m = kernels::MODULES
            .iter()
            .find(|m| m.name == "curvature_tc")
            .expect("curvature_tc is registered");
        let bodies: Vec<&str> = m.ptx().split(".entry ").skip(1).collect();
        let (mut tensor_entries, mut bf16_entries) = (0, 0);
        for body in bodies {
            let name = body.split('(').next().unwrap_or("").trim();
            if (name.starts_with("gram_") && name != "gram_reduce_splits")
                || name.starts_with("sq_grad_")
            {
                tensor_entries += 1;
                let bf16_mma = name.starts_with("gram_bf16_");
                bf16_entries += bf16_mma as usize;
                let mma = if bf16_mma {
                    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
                } else {
                    "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"
                };
                for want in [mma, "cp.async.cg.shared.global", "cp.async.wait_group"] {
                    assert!(body.contains(want), "{name} lacks {want}");
                }
                assert_eq!(
                    body.contains("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"),
                    bf16_mma,
                    "{name}: ldmatrix where the mma is bf16"
                );
                // f32 operands are rounded to tf32; bf16 ones, which tf32 holds exactly,
                // go in as they are (`Frag`'s EXACT).
                let rounds = body.contains("cvt.rna.tf32.f32");
                let operands: Vec<&str> = name.rsplitn(3, '_').take(2).collect();
                assert_eq!(
                    rounds,
                    operands.contains(&"f32"),
                    "{name}: tf32 rounding only where an operand is f32"
                );
            }
        }
        assert_eq!((tensor_entries, bf16_entries), (20, 1));
    }

    #[test]
    fn row_tiles_split_runs_and_flag_their_ends() {
        let t = row_tiles(&[seg(0, 40), seg(50, 32), seg(90, 1)]);
        assert_eq!(
            t,
            vec![
                [0, 32],
                [32, 8 | SEQ_END],
                [50, 32 | SEQ_END],
                [90, 1 | SEQ_END]
            ]
        );
        assert_eq!(
            merged(&[seg(0, 5), seg(5, 0), seg(5, 3), seg(9, 2)]),
            vec![seg(0, 8), seg(9, 2)]
        );
    }

    #[test]
    fn sequence_groups_are_whole_nonempty_and_balanced() {
        let seqs: Vec<Segment> = (0..8).map(|i| seg(i * 1024, 1024 - 96 * i)).collect();
        for want in [1, 2, 3, 8, 100] {
            let b = sequence_groups(&seqs, want);
            assert_eq!(b.len() - 1, want.min(8), "{b:?}");
            assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        }
        assert_eq!(sequence_groups(&seqs[..1], 4), vec![0, 32]);
    }
}
