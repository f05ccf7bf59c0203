//! Flash attention: the launches of `kernels/flash_attention.cu` (its header comment has
//! the kernel design). The forward saves only the row log-sum-exps; the backward recomputes
//! the probabilities tile by tile, so memory is O(T) per head, never T x T.

use crate::backend::cuda::runtime::{Arg, DType, LaunchConfig};
use crate::backend::cuda::{Act, CudaBackend, DevBuf};
use crate::backend::{AttnShape, RopeTable};
use crate::error::{Error, Result};

/// Threads per block of every flash kernel (8 warps).
const THREADS: u32 = 256;
/// Query rows per forward and dQ block, keys per dK/dV block (16 per warp).
const ROWS: usize = 128;
const KEYS: usize = 128;
/// Keys per forward tile.
const FWD_KEYS: usize = 64;

/// One build of the kernels for head dim `d` (smaller dims run zero-padded in it). The
/// tile sizes must equal the template arguments of its entries in flash_attention.cu.
/// The names are the entries for f32 q/k/v; those for bf16 ones add `_bf16`.
struct Variant {
    d: usize,
    fwd: &'static str,
    dq: &'static str,
    dkdv: &'static str,
    /// Keys per dQ tile.
    dq_keys: usize,
    /// Query rows per dK/dV tile.
    dkdv_rows: usize,
}

const VARIANTS: [Variant; 2] = [
    Variant {
        d: 64,
        fwd: "flash_fwd_64",
        dq: "flash_bwd_dq_64",
        dkdv: "flash_bwd_dkdv_64",
        dq_keys: 64,
        dkdv_rows: 64,
    },
    Variant {
        d: 128,
        fwd: "flash_fwd_128",
        dq: "flash_bwd_dq_128",
        dkdv: "flash_bwd_dkdv_128",
        dq_keys: 32,
        dkdv_rows: 32,
    },
];

impl Variant {
    /// A bf16 tile of `rows` rows, padded by 8 elements per row (flash_attention.cuh).
    fn tile_bytes(&self, rows: usize) -> usize {
        rows * (self.d + 8) * 2
    }
    /// Double-buffered K and V tiles.
    fn fwd_shared(&self) -> u32 {
        (4 * self.tile_bytes(FWD_KEYS)) as u32
    }
    fn dq_shared(&self) -> u32 {
        (4 * self.tile_bytes(self.dq_keys)) as u32
    }
    /// K and V of the block, double-buffered Q and dO tiles, and per row of a tile its
    /// LSE, D and last visible key (two buffers of three 4-byte values).
    fn dkdv_shared(&self) -> u32 {
        (2 * self.tile_bytes(KEYS) + 4 * self.tile_bytes(self.dkdv_rows) + 6 * self.dkdv_rows * 4)
            as u32
    }
}

/// Why flash attention cannot run shape `s`, if it cannot (the backend then takes the
/// materialised path).
pub fn unsupported(s: &AttnShape) -> Option<String> {
    let hd = s.head_dim;
    if hd == 0 || !hd.is_multiple_of(16) || hd > 128 {
        return Some(format!(
            "head dim {hd}: flash attention runs multiples of 16 up to 128"
        ));
    }
    if s.n_kv_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
        return Some(format!(
            "{} query heads do not group evenly over {} KV heads",
            s.n_heads, s.n_kv_heads
        ));
    }
    let int = i32::MAX as usize;
    if s.tq * s.n_heads > int
        || s.rows_len() > int
        || s.tk + s.q_offset > int
        || s.batch > 65535
        || s.n_kv_heads > 65535
    {
        return Some("attention shape exceeds the kernels' 32-bit row indices".into());
    }
    None
}

fn variant(s: &AttnShape) -> Result<&'static Variant> {
    if let Some(why) = unsupported(s) {
        return Err(Error::Usage(why));
    }
    Ok(VARIANTS
        .iter()
        .find(|v| s.head_dim <= v.d)
        .unwrap_or(&VARIANTS[VARIANTS.len() - 1]))
}

/// The backward entries' RoPE arguments (before `grads_bf16`): the table `(cos, sin,
/// period)`, or a null table (dq and dk stored as computed).
fn rope_args(rope: Option<&RopeTable<Act>>, s: &AttnShape) -> Result<Vec<Arg<'static>>> {
    let Some(t) = rope else {
        return Ok(vec![Arg::U64(0), Arg::U64(0), Arg::I32(1)]);
    };
    if !fuses_rope(s) {
        return Err(Error::Device(format!(
            "flash attention: no RoPE in the backward's epilogues at head dim {}",
            s.head_dim
        )));
    }
    CudaBackend::check_rope_table(t, s.head_dim, "flash attention")?;
    Ok(vec![
        Arg::U64(t.cos.f32()?.ptr()),
        Arg::U64(t.sin.f32()?.ptr()),
        Arg::I32(i32::try_from(t.period).map_err(|_| {
            Error::usage(format!(
                "flash attention: RoPE period {} exceeds i32",
                t.period
            ))
        })?),
    ])
}

/// Whether the backward can unrotate dq and dk as it stores them: at a build's own head dim
/// (64, 128; a smaller one runs zero-padded, where a column's RoPE partner is not at the
/// build's compile-time offset).
pub(super) fn fuses_rope(s: &AttnShape) -> bool {
    VARIANTS.iter().any(|v| v.d == s.head_dim)
}

/// The entry `name` for q/k/v stored as `ty`.
fn entry(name: &str, ty: DType) -> String {
    match ty {
        DType::F32 => name.to_string(),
        DType::Bf16 => format!("{name}_bf16"),
    }
}

/// The storage type q, k and v share (the entries take one for all three).
fn qkv_dtype(q: &Act, k: &Act, v: &Act) -> Result<DType> {
    let ty = q.dtype();
    if k.dtype() != ty || v.dtype() != ty {
        return Err(Error::Device(format!(
            "flash attention: q, k and v stored as {ty:?}, {:?} and {:?}",
            k.dtype(),
            v.dtype()
        )));
    }
    Ok(ty)
}

fn grid(x: usize, s: &AttnShape, shared_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid: [x as u32, s.n_kv_heads as u32, s.batch as u32],
        block: [THREADS, 1, 1],
        shared_bytes,
    }
}

/// The shape arguments every flash entry ends with.
fn shape_args(s: &AttnShape) -> [Arg<'static>; 8] {
    [
        Arg::I32(s.tq as i32),
        Arg::I32(s.tk as i32),
        Arg::I32(s.tk_stride as i32),
        Arg::I32(s.n_heads as i32),
        Arg::I32(s.n_kv_heads as i32),
        Arg::I32(s.head_dim as i32),
        Arg::I32(s.q_offset as i32),
        Arg::F32(1.0 / (s.head_dim as f32).sqrt()),
    ]
}

/// Blocks of `ROWS` packed query rows (positions x heads of a KV group).
/// bf16 operands are copied global -> shared by cp.async in 16-byte chunks (the forward's
/// and dQ's K/V tiles, dK/dV's Q and dO tiles): their rows (head dims of 16s) are whole
/// chunks, and the buffers must start on one.
fn copy_aligned(ty: DType, operands: &[(&str, &Act)]) -> Result<()> {
    if ty != DType::Bf16 {
        return Ok(());
    }
    match operands.iter().find(|(_, a)| !a.addr().is_multiple_of(16)) {
        Some((name, a)) => Err(Error::Device(format!(
            "flash attention: bf16 {name} must start 16-byte aligned (it is at {:#x})",
            a.addr()
        ))),
        None => Ok(()),
    }
}

fn row_blocks(s: &AttnShape) -> usize {
    (s.tq * (s.n_heads / s.n_kv_heads)).div_ceil(ROWS)
}

impl CudaBackend {
    /// Flash attention forward on q, k and v stored alike (f32 or bf16); returns
    /// `(out, lse)` with `lse` the row log-sum-exps `(batch, n_heads, tq)` (see
    /// `AttnSaved::Lse`).
    pub fn flash_attention(
        &self,
        q: &Act,
        k: &Act,
        v: &Act,
        s: &AttnShape,
    ) -> Result<(DevBuf<f32>, DevBuf<f32>)> {
        let var = variant(s)?;
        let ty = qkv_dtype(q, k, v)?;
        copy_aligned(ty, &[("k", k), ("v", v)])?;
        let out = self.uninit(s.batch * s.tq * s.n_heads * s.head_dim)?;
        let lse = self.uninit(s.rows_len())?;
        let mut args = vec![
            Arg::U64(q.addr()),
            Arg::U64(k.addr()),
            Arg::U64(v.addr()),
            Arg::U64(out.ptr()),
            Arg::U64(lse.ptr()),
        ];
        args.extend(shape_args(s));
        let cfg = grid(row_blocks(s), s, var.fwd_shared());
        self.launch(&entry(var.fwd, ty), cfg, &args)?;
        Ok((out, lse))
    }

    /// Backward of `flash_attention` from its `out` and `lse`; returns `(dq, dk, dv)`. With
    /// `rope`, dq and dk are stored through RoPE's inverse (`Backend::attention_backward`),
    /// for the head dims `fuses_rope` accepts. The gradients are stored as `grads` (bf16:
    /// the f32 results rounded once).
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention_backward(
        &self,
        dout: &Act,
        q: &Act,
        k: &Act,
        v: &Act,
        out: &DevBuf<f32>,
        lse: &DevBuf<f32>,
        rope: Option<&RopeTable<Act>>,
        grads: DType,
        s: &AttnShape,
    ) -> Result<(Act, Act, Act)> {
        let var = variant(s)?;
        let ty = qkv_dtype(q, k, v)?;
        let rope_args = rope_args(rope, s)?;
        // dO as the entries take it, stored as q/k/v are: a bf16 copy of an f32 dO holds
        // the values every read of it rounds it to anyway, an f32 copy of a bf16 one is
        // exact, so either gives the same bits.
        let converted = match (dout, ty) {
            (Act::F32(d), DType::Bf16) => Some(Act::Bf16(self.to_bf16(d)?)),
            (Act::Bf16(d), DType::F32) => Some(Act::F32(self.widened(d.ptr(), d.len())?)),
            _ => None,
        };
        let dout = converted.as_ref().unwrap_or(dout);
        copy_aligned(ty, &[("q", q), ("k", k), ("v", v), ("dO", dout)])?;
        let rows = s.rows_len();
        let delta = self.uninit::<f32>(rows)?;
        let warps_per_block = THREADS as usize / 32;
        self.launch(
            &entry("flash_bwd_delta", ty),
            LaunchConfig {
                grid: [rows.div_ceil(warps_per_block) as u32, 1, 1],
                block: [THREADS, 1, 1],
                shared_bytes: 0,
            },
            &[
                Arg::U64(dout.addr()),
                Arg::U64(out.ptr()),
                Arg::U64(delta.ptr()),
                Arg::I32(rows as i32),
                Arg::I32(s.tq as i32),
                Arg::I32(s.n_heads as i32),
                Arg::I32(s.head_dim as i32),
            ],
        )?;
        let kv_len = s.batch * s.tk_stride * s.n_kv_heads * s.head_dim;
        let dq = self.uninit_act(s.batch * s.tq * s.n_heads * s.head_dim, grads)?;
        // The kernels write the rows of the tk keys; cache rows past them get no gradient.
        let kv = |n| -> Result<Act> {
            Ok(match (s.tk < s.tk_stride, grads) {
                (true, DType::F32) => Act::F32(self.zeroed(n)?),
                (true, DType::Bf16) => Act::Bf16(self.zeroed(n)?),
                (false, _) => self.uninit_act(n, grads)?,
            })
        };
        let (dk, dv) = (kv(kv_len)?, kv(kv_len)?);
        let grads_bf16 = Arg::I32((grads == DType::Bf16) as i32);
        let mut args = vec![
            Arg::U64(q.addr()),
            Arg::U64(k.addr()),
            Arg::U64(v.addr()),
            Arg::U64(dout.addr()),
            Arg::U64(lse.ptr()),
            Arg::U64(delta.ptr()),
        ];
        args.extend(shape_args(s));
        let mut dkdv_args = args.clone();
        dkdv_args.extend([Arg::U64(dk.addr()), Arg::U64(dv.addr())]);
        dkdv_args.extend(rope_args.clone());
        dkdv_args.push(grads_bf16);
        let key_blocks = s.tk.div_ceil(KEYS);
        let cfg = grid(key_blocks, s, var.dkdv_shared());
        self.launch(&entry(var.dkdv, ty), cfg, &dkdv_args)?;
        args.push(Arg::U64(dq.addr()));
        args.extend(rope_args);
        args.push(grads_bf16);
        let cfg = grid(row_blocks(s), s, var.dq_shared());
        self.launch(&entry(var.dq, ty), cfg, &args)?;
        Ok((dq, dk, dv))
    }
}

#[cfg(test)]
mod tests {
    use super::{VARIANTS, entry, unsupported};
    use crate::backend::AttnShape;
    use crate::backend::cuda::kernels::MODULES;
    use crate::backend::cuda::runtime::DType;

    /// Shapes whose rows (batch x heads x queries) or keys pass the kernels' 32-bit
    /// indices are refused (the backend then takes the materialised path), the largest
    /// that fit are not.
    #[test]
    fn shapes_past_32_bit_rows_are_refused() {
        // Llama-3.1-8B's heads at 16 x 8192 tokens: 2^22 rows.
        let s = AttnShape {
            batch: 16,
            tq: 8192,
            tk: 8192,
            tk_stride: 8192,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            q_offset: 0,
        };
        assert_eq!(unsupported(&s), None);
        // 2^31 rows: each head's rows fit, their batch does not.
        let wide = AttnShape {
            batch: 1 << 13,
            ..s
        };
        assert_eq!(wide.rows_len(), 1 << 31);
        assert!(unsupported(&wide).is_some_and(|w| w.contains("32-bit")));
        assert_eq!(
            unsupported(&AttnShape {
                batch: (1 << 13) - 1,
                ..s
            }),
            None
        );
        let long = AttnShape {
            tk: i32::MAX as usize,
            q_offset: 1,
            batch: 1,
            ..s
        };
        assert!(unsupported(&long).is_some());
    }

    /// Every flash entry the backend launches runs its products on tensor cores: its PTX
    /// body holds bf16 `mma.sync` and `ldmatrix`.
    #[test]
    #[cfg_attr(
        not(lalora_cuda_kernels),
        ignore = "built without CUDA kernels (no nvcc)"
    )]
    fn flash_kernels_use_tensor_cores() {
        let module = MODULES
            .iter()
            .find(|m| m.name == "flash_attention")
            .expect("the flash_attention module is registered");
        let names = VARIANTS.iter().flat_map(|v| [v.fwd, v.dq, v.dkdv]);
        for name in names.flat_map(|n| [entry(n, DType::F32), entry(n, DType::Bf16)]) {
            let start = module
                .ptx()
                .find(&format!(".entry {name}("))
                .unwrap_or_else(|| panic!("no .entry {name}"));
            let body = &module.ptx()[start..];
            let body = &body[..body[1..].find(".entry").map_or(body.len(), |e| e + 1)];
            for inst in [
                "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                "ldmatrix.sync.aligned.m8n8.x4",
            ] {
                assert!(body.contains(inst), "{name} has no {inst}");
            }
        }
    }
}
