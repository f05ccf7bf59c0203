//! The model's row and elementwise kernels (`kernels/{embedding,norm,rope,swiglu}.cu`):
//! each launch picks the entry for its operands' storage (f32, or bf16 with bf16 base
//! weights) and a 128-bit pack width where rows allow it.

use super::runtime::{Arg, DType};
use super::{Act, CudaBackend, DevBuf, Weight};
use crate::backend::RopeTable;
use crate::backend::group::GradFeeds;
use crate::error::{Error, Result};

impl CudaBackend {
    pub(super) fn embedding_impl(&self, table: &Weight, ids: &[u32], dim: usize) -> Result<Act> {
        let ids_d = self.upload(ids)?;
        let n = ids.len() * dim;
        let out = self.uninit::<f32>(n)?;
        // Rows of whole 128-bit packs (8 bf16 or 4 f32 values) go a pack per thread.
        let (kernel, width) = match table.ty {
            DType::Bf16 => ("embedding_gather", 8),
            DType::F32 => ("embedding_gather_f32", 4),
        };
        let width = if dim.is_multiple_of(width) { width } else { 1 };
        let args = [
            Arg::U64(table.ptr()),
            Arg::U64(ids_d.ptr()),
            Arg::U64(out.ptr()),
            Arg::I32(ids.len() as i32),
            Arg::I32(dim as i32),
        ];
        self.launch(kernel, Self::packed(n, width), &args)?;
        Ok(out.into())
    }

    pub(super) fn rmsnorm_impl(
        &self,
        x: &Act,
        w: &Act,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(Act, Act)> {
        let y = self.uninit_act(rows * dim, self.act_dtype())?;
        let rstd = self.uninit::<f32>(rows)?;
        let args = [
            Arg::U64(x.f32()?.ptr()),
            Arg::U64(w.f32()?.ptr()),
            Arg::U64(y.addr()),
            Arg::U64(rstd.ptr()),
            Arg::I32(dim as i32),
            Arg::F32(eps),
        ];
        let kernel = match y.dtype() {
            DType::F32 => "rmsnorm_forward_f32",
            DType::Bf16 => "rmsnorm_forward_bf16",
        };
        self.launch(kernel, Self::per_row(rows), &args)?;
        Ok((y, rstd.into()))
    }

    pub(super) fn add_rmsnorm_impl(
        &self,
        h: &mut Act,
        delta: &Act,
        w: &Act,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(Act, Act)> {
        let n = rows * dim;
        if h.len() < n || delta.len() < n || w.len() < dim {
            return Err(Error::Device(format!(
                "add_rmsnorm of {rows}x{dim} on buffers of {}, {} and a weight of {}",
                h.len(),
                delta.len(),
                w.len()
            )));
        }
        let y = self.uninit_act(n, self.act_dtype())?;
        let rstd = self.uninit::<f32>(rows)?;
        let args = [
            Arg::U64(h.f32_mut()?.ptr()),
            Arg::U64(delta.f32()?.ptr()),
            Arg::U64(w.f32()?.ptr()),
            Arg::U64(y.addr()),
            Arg::U64(rstd.ptr()),
            Arg::I32(dim as i32),
            Arg::F32(eps),
        ];
        let kernel = match y.dtype() {
            DType::F32 => "add_rmsnorm_forward_f32",
            DType::Bf16 => "add_rmsnorm_forward_bf16",
        };
        self.launch(kernel, Self::per_row(rows), &args)?;
        Ok((y, rstd.into()))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn rmsnorm_backward_impl(
        &self,
        dy: &Act,
        x: &Act,
        w: &Act,
        rstd: &Act,
        rows: usize,
        dim: usize,
        dx: &mut Act,
    ) -> Result<()> {
        let args = [
            Arg::U64(dy.f32()?.ptr()),
            Arg::U64(x.f32()?.ptr()),
            Arg::U64(w.f32()?.ptr()),
            Arg::U64(rstd.f32()?.ptr()),
            Arg::U64(dx.f32_mut()?.ptr()),
            Arg::I32(dim as i32),
        ];
        self.launch("rmsnorm_backward", Self::per_row(rows), &args)
    }

    /// That `t` is a table for `head_dim`: at least one row, and `period * head_dim / 2`
    /// cos and sin values each (every kernel that rotates reads rows `row % period`).
    pub(super) fn check_rope_table(t: &RopeTable<Act>, head_dim: usize, who: &str) -> Result<()> {
        let want = t.period * head_dim / 2;
        if t.period == 0 || t.cos.len() != want || t.sin.len() != want {
            return Err(Error::Device(format!(
                "{who}: a RoPE table of {} cos and {} sin values for period {} and head dim {head_dim}",
                t.cos.len(),
                t.sin.len(),
                t.period
            )));
        }
        Ok(())
    }

    pub(super) fn rope_impl(
        &self,
        x: &mut Act,
        t: &RopeTable<Act>,
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()> {
        let sign: f32 = if inverse { -1.0 } else { 1.0 };
        // In place on x as stored: q and k with bf16 base weights are bf16.
        let kernel = match x.dtype() {
            DType::F32 => ("rope", 4),
            DType::Bf16 => ("rope_bf16", 8),
        };
        let shape = (rows, n_heads, head_dim, sign);
        self.launch_rope(kernel, &[Arg::U64(x.addr())], t, shape)
    }

    /// `rope_impl` on f32 sums `x`, the result stored bf16 (rounded once) in a new buffer:
    /// one pass where rotating in place and rounding after would take two.
    pub(super) fn rope_into_bf16(
        &self,
        x: &DevBuf<f32>,
        t: &RopeTable<Act>,
        rows: usize,
        n_heads: usize,
        head_dim: usize,
    ) -> Result<DevBuf<u16>> {
        if x.len() != rows * n_heads * head_dim {
            return Err(Error::Device(format!(
                "rope: {} values for {rows} rows of {n_heads} heads of {head_dim}",
                x.len()
            )));
        }
        let y = self.uninit::<u16>(x.len())?;
        let io = [Arg::U64(x.ptr()), Arg::U64(y.ptr())];
        let shape = (rows, n_heads, head_dim, 1.0);
        self.launch_rope(("rope_f32_to_bf16", 8), &io, t, shape)?;
        Ok(y)
    }

    /// One of rope.cu's entries `(name, pack)` on its operands `io` (x, or x and y): a
    /// 128-bit pack of rotations per thread (`pack` of the entry's widest type: four f32,
    /// eight bf16) when half a head is whole packs.
    fn launch_rope(
        &self,
        (kernel, pack): (&str, usize),
        io: &[Arg],
        t: &RopeTable<Act>,
        (rows, n_heads, head_dim, sign): (usize, usize, usize, f32),
    ) -> Result<()> {
        Self::check_rope_table(t, head_dim, "rope")?;
        let mut args = io.to_vec();
        args.extend([
            Arg::U64(t.cos.f32()?.ptr()),
            Arg::U64(t.sin.f32()?.ptr()),
            Arg::I32(rows as i32),
            Arg::I32(n_heads as i32),
            Arg::I32(head_dim as i32),
            Arg::I32(t.period as i32),
            Arg::F32(sign),
        ]);
        let half = head_dim / 2;
        let width = if half.is_multiple_of(pack) { pack } else { 1 };
        self.launch(kernel, Self::packed(rows * n_heads * half, width), &args)
    }

    pub(super) fn swiglu_impl(&self, gate: &Act, up: &Act) -> Result<Act> {
        let n = gate.len();
        let ty = swiglu_operand_type(gate, up)?;
        let out = self.uninit_act(n, self.act_dtype())?;
        let args = [
            Arg::U64(gate.addr()),
            Arg::U64(up.addr()),
            Arg::U64(out.addr()),
            Arg::U64(n as u64),
        ];
        // gate and up are bf16 only with bf16 base weights, which store the output bf16.
        let (kernel, width) = match (ty, out.dtype()) {
            (DType::F32, DType::F32) => ("swiglu_forward_f32", 4),
            (DType::F32, DType::Bf16) => ("swiglu_forward_bf16", 8),
            (DType::Bf16, DType::Bf16) => ("swiglu_forward_bf16_in", 8),
            (DType::Bf16, DType::F32) => {
                return Err(Error::Device(
                    "swiglu: bf16 gate and up with f32 activations".into(),
                ));
            }
        };
        self.launch(kernel, Self::packed(n, width), &args)?;
        Ok(out)
    }

    pub(super) fn swiglu_backward_impl(
        &self,
        dact: &Act,
        gate: &Act,
        up: &Act,
        feeds: GradFeeds,
    ) -> Result<(Act, Act)> {
        let n = gate.len();
        // Unless a reduction sums them over positions first (`GradFeeds::Summed`: KFAC
        // reduce; stored f32), dgate and dup are stored as gate and up are: bf16 with
        // bf16 base weights. The gate/up group's base GEMM dx = g W rounds g to bf16 anyway
        // (the same rounding, so that product is unchanged bit for bit); gA = s g B, the dB
        // Gram, KFAC expand's g g^T and diag's squaring read the stored g exactly, so they
        // carry g's one rounding (2^-8 relative per element at most), as dA carries that of
        // the bf16 x.
        let ty = swiglu_operand_type(gate, up)?;
        let out = match feeds {
            GradFeeds::Backward => ty,
            GradFeeds::Summed => DType::F32,
        };
        let (dg, du) = (self.uninit_act(n, out)?, self.uninit_act(n, out)?);
        let args = [
            Arg::U64(dact.f32()?.ptr()),
            Arg::U64(gate.addr()),
            Arg::U64(up.addr()),
            Arg::U64(dg.addr()),
            Arg::U64(du.addr()),
            Arg::U64(n as u64),
        ];
        let (kernel, width) = match (ty, out) {
            (DType::F32, _) => ("swiglu_backward", 4),
            (DType::Bf16, DType::F32) => ("swiglu_backward_bf16_in", 8),
            (DType::Bf16, DType::Bf16) => ("swiglu_backward_bf16", 8),
        };
        self.launch(kernel, Self::packed(n, width), &args)?;
        Ok((dg, du))
    }
}

/// The storage type of `gate` and `up`, once they are checked to be stored alike and as
/// long (the kernels take one type for both).
fn swiglu_operand_type(gate: &Act, up: &Act) -> Result<DType> {
    if gate.dtype() != up.dtype() || gate.len() != up.len() {
        return Err(Error::Device(format!(
            "swiglu of {} {:?} gate and {} {:?} up elements",
            gate.len(),
            gate.dtype(),
            up.len(),
            up.dtype()
        )));
    }
    Ok(gate.dtype())
}
