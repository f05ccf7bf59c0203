//! Evaluation: perplexity / mean NLL (`perplexity`), generation with a KV cache
//! (`generate`), GSM8K-style exact match (`exact_match`), multiple choice by
//! log-likelihood (`choice`), standard errors of paired differences between models
//! (`paired`).

pub mod choice;
pub mod exact_match;
pub mod generate;
pub mod paired;
pub mod perplexity;

pub use self::perplexity::{NllSummary, mean_nll};
