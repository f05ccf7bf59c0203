//! Which products run a projection group (`Backend::project_group` and its backward) on
//! CUDA: LoRA inside the engine's grouped tensor-core GEMM (`lora_gemm.rs`), or the plain
//! cuBLAS sequence it replaces (`baselines.rs`: per projection the base GEMM on cuBLAS,
//! then the LoRA products as cuBLAS GEMMs). The model runs either; `benches/cuda.rs` times
//! the training step and one layer under both, so that a GPU run says which is faster.

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ProjectionGemm {
    /// LoRA inside the grouped tensor-core GEMM (the engine's).
    #[default]
    Fused,
    /// The per-projection cuBLAS sequence.
    Cublas,
}

impl ProjectionGemm {
    pub const ALL: [Self; 2] = [Self::Fused, Self::Cublas];

    pub fn name(self) -> &'static str {
        match self {
            Self::Fused => "fused",
            Self::Cublas => "cublas",
        }
    }

    /// The path `LALORA_PROJECTION_GEMM` names (kernel research: run any command, end to
    /// end, on the cuBLAS sequence), else the engine's; another name is a usage error.
    pub fn from_env() -> Result<Self> {
        match std::env::var("LALORA_PROJECTION_GEMM") {
            Ok(name) if !name.is_empty() => Self::ALL
                .into_iter()
                .find(|p| p.name() == name)
                .ok_or_else(|| {
                    Error::usage(format!(
                        "LALORA_PROJECTION_GEMM={name} is not a projection path; \
                         use fused or cublas"
                    ))
                }),
            _ => Ok(Self::default()),
        }
    }
}
