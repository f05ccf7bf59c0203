//! Which products run a projection group (`Backend::project_group` and its backward) on
//! CUDA:
//! - `cublas`, the default: the plain cuBLAS sequence (`baselines.rs`): per projection the
//!   base GEMM (bf16 operands with bf16 base weights), then the LoRA products as f32 cuBLAS
//!   GEMMs, RoPE and the bf16 stores;
//! - `hybrid`: the base products `x W^T` and `g W` on cuBLAS; the LoRA products, RoPE and
//!   the stores in the engine's grouped tensor-core kernel, which adds cuBLAS's f32 results
//!   to its sums (`lora_gemm.rs`, `Base::Cublas`);
//! - `fused`: LoRA inside the GEMMs, everything in that kernel (`Base::Kernel`);
//! - `folded`: cuBLAS, the LoRA update written first and added to by the base GEMM as its
//!   C operand, the LoRA products reading bf16 activations and gradients as stored
//!   (`folded_sequence.rs`). Not timed on a GPU yet.
//!
//! The default is the fastest measured: on the lent H200 (2026-11-30, fourteenth session,
//! BENCHMARKS.md) a Llama-3.2-1B-shaped training step of 8 x 1024 tokens took 157.2 ms on
//! `cublas`, 192.8 ms on `hybrid` and 319.9 ms on `fused` (`folded` came after). All four
//! compute the same products to the same bounds; they differ in speed, in the order of
//! their sums, and (`folded`) in one more rounding of the low-rank part of outputs stored
//! bf16 without RoPE.

use super::env_choice;
use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ProjectionGemm {
    /// Base products on cuBLAS, LoRA and the epilogue in the engine's kernel.
    Hybrid,
    /// LoRA inside the grouped tensor-core GEMM.
    Fused,
    /// The per-projection cuBLAS sequence.
    #[default]
    Cublas,
    /// cuBLAS with the LoRA update as the base GEMM's C operand, bf16 operands as stored.
    Folded,
}

impl ProjectionGemm {
    pub const ALL: [Self; 4] = [Self::Hybrid, Self::Fused, Self::Cublas, Self::Folded];

    pub fn name(self) -> &'static str {
        match self {
            Self::Hybrid => "hybrid",
            Self::Fused => "fused",
            Self::Cublas => "cublas",
            Self::Folded => "folded",
        }
    }

    /// Its index in `ALL`.
    pub(super) fn index(self) -> usize {
        env_choice::index(&Self::ALL, self)
    }

    /// What the device line says of it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Hybrid => "hybrid (base products on cuBLAS, LoRA in the engine's kernel)",
            Self::Fused => "fused (LoRA inside the GEMMs)",
            Self::Cublas => "on the cuBLAS sequence",
            Self::Folded => "folded (LoRA in cuBLAS's C operand, bf16 operands as stored)",
        }
    }

    /// The path `LALORA_PROJECTION_GEMM` names (kernel research: run any command, end to
    /// end, on another path), else the default; another name is a usage error.
    pub fn from_env() -> Result<Self> {
        env_choice::from_env(
            "LALORA_PROJECTION_GEMM",
            "a projection path",
            &Self::ALL,
            Self::name,
        )
    }
}
