//! The tilings of the LoRA GEMM (`Tiling` of kernels/lora_gemm.cuh): the one the engine
//! runs (kernels/lora_gemm.cu) and the others compiled beside it
//! (kernels/lora_gemm_tiles.cu), each in either block order. `CudaBackend` launches the
//! one set by `set_lora_gemm_tiling` (at start, the one `LALORA_LORA_GEMM_TILING` names);
//! `benches/cuda.rs` times them all on the same layer, so that one run on a GPU says which
//! to make the engine's.

use crate::error::{Error, Result};

/// One tiling: an output tile of `bm x bn` per block of 256 threads, K swept `bk` at a
/// time through `stages` cp.async stages, and the order in which blocks take the tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraGemmTiling {
    shape: usize,
    rows_fastest: bool,
}

/// A compiled tiling: `(bm, bn, bk, stages, nt entry, nn entry)`, the engine's first.
type Shape = (usize, usize, usize, usize, &'static str, &'static str);

const SHAPES: [Shape; 5] = [
    (128, 128, 32, 3, "lora_gemm_nt", "lora_gemm_nn"),
    (
        128,
        128,
        32,
        4,
        "lora_gemm_nt_128x128x32s4",
        "lora_gemm_nn_128x128x32s4",
    ),
    (
        128,
        128,
        64,
        4,
        "lora_gemm_nt_128x128x64s4",
        "lora_gemm_nn_128x128x64s4",
    ),
    (
        128,
        256,
        32,
        4,
        "lora_gemm_nt_128x256x32s4",
        "lora_gemm_nn_128x256x32s4",
    ),
    (
        256,
        128,
        32,
        4,
        "lora_gemm_nt_256x128x32s4",
        "lora_gemm_nn_256x128x32s4",
    ),
];

/// The entries of lora_gemm_tiles.cu (the kernel module's function list).
pub(super) const TILE_ENTRIES: [&str; 8] = [
    SHAPES[1].4,
    SHAPES[1].5,
    SHAPES[2].4,
    SHAPES[2].5,
    SHAPES[3].4,
    SHAPES[3].5,
    SHAPES[4].4,
    SHAPES[4].5,
];

/// bf16 pieces an f32 operand may be staged as (PIECES of lora_gemm.cuh): the register
/// path needs that many buffers even where the pipeline has fewer stages.
pub(super) const PIECES: usize = 3;

impl LoraGemmTiling {
    /// The tiling the engine runs: 128 x 128 tiles, K 32 at a time, 3 stages, column
    /// tiles first.
    pub const ENGINE: Self = Self {
        shape: 0,
        rows_fastest: false,
    };

    /// Every compiled tiling in both block orders, the engine's first.
    pub fn all() -> Vec<Self> {
        (0..SHAPES.len())
            .flat_map(|shape| {
                [false, true].map(|rows_fastest| Self {
                    shape,
                    rows_fastest,
                })
            })
            .collect()
    }

    /// `BMxBNxBK` and `s` stages, `-rows` when blocks take row tiles first: `128x128x32s3`.
    pub fn name(&self) -> String {
        let (bm, bn, bk, s, ..) = SHAPES[self.shape];
        let order = if self.rows_fastest { "-rows" } else { "" };
        format!("{bm}x{bn}x{bk}s{s}{order}")
    }

    /// The tiling called `name` (as `name` writes it).
    pub fn parse(name: &str) -> Option<Self> {
        Self::all().into_iter().find(|t| t.name() == name)
    }

    /// The tiling `LALORA_LORA_GEMM_TILING` names (kernel research: run any command, end
    /// to end, with another tiling), else the engine's; a name that is not a compiled
    /// tiling is a usage error listing those that are.
    pub fn from_env() -> Result<Self> {
        match std::env::var("LALORA_LORA_GEMM_TILING") {
            Ok(name) if !name.is_empty() => Self::parse(&name).ok_or_else(|| {
                let names: Vec<String> = Self::all().iter().map(Self::name).collect();
                Error::usage(format!(
                    "LALORA_LORA_GEMM_TILING={name} is not a tiling of the LoRA GEMM; the compiled ones are {}",
                    names.join(", ")
                ))
            }),
            _ => Ok(Self::ENGINE),
        }
    }

    /// Rows and columns of a block's output tile.
    pub fn tile(&self) -> (usize, usize) {
        (SHAPES[self.shape].0, SHAPES[self.shape].1)
    }

    /// Columns of K per pipeline step.
    pub fn k_step(&self) -> usize {
        SHAPES[self.shape].2
    }

    /// Columns of K per step of the register path (segments of f32 or scaled operands,
    /// staged in bf16 pieces: the LoRA segments): 32 at 128 x 128, 16 at the larger tiles,
    /// whose accumulators leave fewer registers for staging (RK of lora_gemm.cuh). Within
    /// a step the products go piece pair by piece pair, so tilings with different steps add
    /// the same products in a different order.
    pub fn register_k_step(&self) -> usize {
        let (bm, bn, bk, ..) = SHAPES[self.shape];
        (128 * 32 / bm.max(bn)).min(bk)
    }

    /// Blocks take the output's row tiles first (grid x), so that the blocks resident at
    /// once share a few column tiles of W; else its column tiles first.
    pub fn rows_fastest(&self) -> bool {
        self.rows_fastest
    }

    /// The kernel entry for n-major (`nt`: `y = x W^T`) or k-major (`dx = g W`) weights.
    pub(super) fn entry(&self, k_major: bool) -> &'static str {
        let s = &SHAPES[self.shape];
        if k_major { s.5 } else { s.4 }
    }

    /// Dynamic shared memory: max(stages, PIECES) buffers of the X tile (bm x bk) and the
    /// W tile (bn x bk n-major, bk x bn k-major), bf16, rows padded by 8.
    pub(super) fn smem_bytes(&self, k_major: bool) -> u32 {
        let (bm, bn, bk, stages, ..) = SHAPES[self.shape];
        let w_tile = if k_major {
            bk * (bn + 8)
        } else {
            bn * (bk + 8)
        };
        (stages.max(PIECES) * (bm * (bk + 8) + w_tile) * 2) as u32
    }

    /// The index of this tiling in `all`.
    pub(super) fn index(&self) -> usize {
        self.shape * 2 + self.rows_fastest as usize
    }

    /// The tiling at `index` of `all`.
    pub(super) fn at(index: usize) -> Self {
        Self {
            shape: index / 2,
            rows_fastest: index % 2 == 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_the_engine_comes_first() {
        let all = LoraGemmTiling::all();
        assert_eq!(all.len(), 10);
        assert_eq!(all[0], LoraGemmTiling::ENGINE);
        assert_eq!(LoraGemmTiling::ENGINE.name(), "128x128x32s3");
        for (i, t) in all.iter().enumerate() {
            assert_eq!(LoraGemmTiling::parse(&t.name()), Some(*t));
            assert_eq!(LoraGemmTiling::at(t.index()), *t);
            assert_eq!(t.index(), i);
        }
        assert_eq!(
            LoraGemmTiling::parse("128x128x32s3-rows").map(|t| t.rows_fastest()),
            Some(true)
        );
        assert_eq!(LoraGemmTiling::parse("64x64x32s3"), None);
    }

    /// The shared memory each asks for fits an H100/H200 block's opt-in limit, and the
    /// engine's is the 60 KiB of 3 buffers of 128 x 40 and 128 x 40 (n-major) bf16.
    #[test]
    fn shared_memory_fits() {
        assert_eq!(
            LoraGemmTiling::ENGINE.smem_bytes(false),
            3 * (128 * 40 + 128 * 40) * 2
        );
        assert_eq!(
            LoraGemmTiling::ENGINE.smem_bytes(true),
            3 * (128 * 40 + 32 * 136) * 2
        );
        for t in LoraGemmTiling::all() {
            for k_major in [false, true] {
                assert!(t.smem_bytes(k_major) <= 232_448, "{}", t.name());
            }
        }
    }
}
