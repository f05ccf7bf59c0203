//! `Act`, the CUDA backend's `Backend::Buf`: f32 values stored as f32 or as bf16, and
//! `Wide`, the f32 view of one for the kernels that read f32 only.

use super::DevBuf;
use super::runtime::DType;
use crate::error::{Error, Result};

/// The `Backend::Buf` of CUDA: f32 values, stored as f32 or rounded to bf16. With bf16
/// base weights the activations the matmuls read are stored as bf16 (half the bytes
/// moved, and no conversion before a bf16 GEMM, which reads them as they are), and so are
/// the q/k/v and gate/up projections' outputs (which RoPE, flash attention and SwiGLU read
/// as stored; flash attention rounds its tiles to bf16 anyway), the gradient of the
/// attention output where flash attention reads it (`Backend::attention_dout`: its every
/// read rounds it to bf16), and, unless KFAC reduce sums them first, the gradients of the q/k/v and
/// gate/up outputs (dq, dk, dv from flash attention; dgate, dup: the group backward's base
/// GEMM rounds them to bf16 anyway, its gA and dB read them exactly); everything else, and everything with f32 base weights, is
/// f32. What reads a bf16 activation reads
/// the rounded values, as the base GEMM does: the LoRA product u = x A^T, the gradient dA
/// and the curvature's input factors too. Kernels that take one storage type
/// reach it through `f32()` (an error, not a misread, if handed the other).
pub enum Act {
    F32(DevBuf<f32>),
    Bf16(DevBuf<u16>),
}

impl Act {
    pub fn len(&self) -> usize {
        match self {
            Act::F32(b) => b.len(),
            Act::Bf16(b) => b.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> DType {
        match self {
            Act::F32(_) => DType::F32,
            Act::Bf16(_) => DType::Bf16,
        }
    }
    /// The device address, whatever the storage type: for kernels that take either.
    pub fn addr(&self) -> u64 {
        match self {
            Act::F32(b) => b.ptr(),
            Act::Bf16(b) => b.ptr(),
        }
    }
    pub(super) fn elem_bytes(&self) -> usize {
        match self {
            Act::F32(_) => 4,
            Act::Bf16(_) => 2,
        }
    }
    /// The f32 buffer, for a kernel that reads or writes f32 only; the error names the
    /// op by the line that asked (`track_caller`), so that a bf16 activation reaching an
    /// f32-only kernel says which.
    #[track_caller]
    pub fn f32(&self) -> Result<&DevBuf<f32>> {
        match self {
            Act::F32(b) => Ok(b),
            Act::Bf16(_) => Err(not_f32()),
        }
    }
    #[track_caller]
    pub fn f32_mut(&mut self) -> Result<&mut DevBuf<f32>> {
        match self {
            Act::F32(b) => Ok(b),
            Act::Bf16(_) => Err(not_f32()),
        }
    }
}

#[track_caller]
fn not_f32() -> Error {
    let at = std::panic::Location::caller();
    Error::Device(format!(
        "an f32 operand was expected, a bf16 activation was given (the op at {}:{})",
        at.file(),
        at.line()
    ))
}

impl From<DevBuf<f32>> for Act {
    fn from(b: DevBuf<f32>) -> Self {
        Act::F32(b)
    }
}

/// An f32 view of an `Act`: the buffer itself, or a widened copy of a bf16 one (for the
/// kernels that read f32 only: the per-row LoRA gradients, and attention where flash
/// attention does not apply). The curvature kernels read bf16 as stored.
pub enum Wide<'a> {
    Same(&'a DevBuf<f32>),
    Copy(DevBuf<f32>),
}

impl std::ops::Deref for Wide<'_> {
    type Target = DevBuf<f32>;
    fn deref(&self) -> &DevBuf<f32> {
        match self {
            Wide::Same(b) => b,
            Wide::Copy(b) => b,
        }
    }
}
