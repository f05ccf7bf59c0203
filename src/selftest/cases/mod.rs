//! One function per group of `Backend` ops; each case draws fresh random inputs, hands the
//! same values to device and reference, and compares every output. A case that needs the
//! output of another op (a backward pass needs the forward's `rstd`, `u` or `probs`) takes
//! the reference's, uploaded to both: each row then checks exactly one op.
//!
//! Shapes are chosen for the ways kernels go wrong: sizes that are not multiples of a
//! warp, a tile or a block (tails), more rows or columns than a block has threads (so
//! strided loops wrap, including grid-stride loops over more than 2^20 elements), the extremes of what a kernel supports (LoRA rank 1 and 64, head
//! dims 64 and 128, a vocabulary above 32k), and otherwise small, as this also runs on a
//! slow PTX interpreter.

mod algebra;
mod attention;
mod classifier;
mod cross_entropy;
mod curvature;
mod lora;
mod lora_group;
mod rows;

use super::check::Checker;
use crate::backend::Backend;
use crate::error::Result;

pub fn run_all<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>) -> Result<()> {
    rows::run(c)?;
    lora::run(c)?;
    lora_group::run(c)?;
    attention::run(c)?;
    cross_entropy::run(c)?;
    classifier::run(c)?;
    curvature::run(c)?;
    algebra::run(c)
}
