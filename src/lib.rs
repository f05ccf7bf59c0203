//! lalora-engine: LoRA fine-tuning of Llama-family models with a Laplace penalty on the
//! LoRA weights (LaLoRA, arXiv 2512.17720), on the CPU or on CUDA.
//!
//! Map of the crate:
//! - [`model`]: configuration, weights (HF safetensors, GGUF), LoRA, forward/backward;
//! - [`backend`]: the `Backend` trait and its CPU (reference) and CUDA implementations;
//! - [`data`]: JSONL rows and padded batches;
//! - [`curvature`]: diagonal / KFAC / KFAC-tri Fisher estimation and curvature files;
//! - [`train`]: gradients, AdamW, the Laplace penalty, checkpoints;
//! - [`eval`]: perplexity, generation, exact match, multiple choice;
//! - [`cli`]: the `lalora-engine` command line.

pub mod backend;
pub mod cli;
pub mod cost;
pub mod curvature;
pub mod data;
pub mod error;
pub mod eval;
pub mod io;
pub mod model;
pub mod progress;
pub mod ptxsim;
pub mod selftest;
pub mod sweep;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
