//! Which products run a projection group (`Backend::project_group` and its backward) on
//! CUDA:
//! - `hybrid`, the default: the base products `x W^T` and `g W` on cuBLAS; the LoRA
//!   products, RoPE and the stores (bf16 rounded once) in the engine's grouped tensor-core
//!   kernel, which adds cuBLAS's f32 results to its sums (`lora_gemm.rs`, `Base::Cublas`);
//! - `fused`: LoRA inside the GEMMs, everything in that kernel (`Base::Kernel`);
//! - `cublas`: the plain cuBLAS sequence (`baselines.rs`): per projection the base GEMM,
//!   then the LoRA products as f32 cuBLAS GEMMs.
//!
//! The default is `hybrid` because the kernel's own base products ran at 51-69 TFLOP/s
//! within the training step on the lent H200 (ninth session), where cuBLAS's bf16 GEMMs
//! run several times faster, while its LoRA segments are about r/d of the work. That is
//! an inference from those figures: the three were not yet timed side by side (the benches
//! time the step under each, `lora_forward_backward@NAME`). All three compute the same
//! products to the same bounds; they differ in speed and in the order of their sums.

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ProjectionGemm {
    /// Base products on cuBLAS, LoRA and the epilogue in the engine's kernel.
    #[default]
    Hybrid,
    /// LoRA inside the grouped tensor-core GEMM.
    Fused,
    /// The per-projection cuBLAS sequence.
    Cublas,
}

impl ProjectionGemm {
    pub const ALL: [Self; 3] = [Self::Hybrid, Self::Fused, Self::Cublas];

    pub fn name(self) -> &'static str {
        match self {
            Self::Hybrid => "hybrid",
            Self::Fused => "fused",
            Self::Cublas => "cublas",
        }
    }

    /// Its index in `ALL`.
    pub(super) fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|&p| p == self)
            .expect("every path is in ALL")
    }

    /// What the device line says of it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Hybrid => "hybrid (base products on cuBLAS, LoRA in the engine's kernel)",
            Self::Fused => "fused (LoRA inside the GEMMs)",
            Self::Cublas => "on the cuBLAS sequence",
        }
    }

    /// The path `LALORA_PROJECTION_GEMM` names (kernel research: run any command, end to
    /// end, on another path), else the default; another name is a usage error.
    pub fn from_env() -> Result<Self> {
        match std::env::var("LALORA_PROJECTION_GEMM") {
            Ok(name) if !name.is_empty() => Self::ALL
                .into_iter()
                .find(|p| p.name() == name)
                .ok_or_else(|| {
                    Error::usage(format!(
                        "LALORA_PROJECTION_GEMM={name} is not a projection path; \
                         use hybrid, fused or cublas"
                    ))
                }),
            _ => Ok(Self::default()),
        }
    }
}
