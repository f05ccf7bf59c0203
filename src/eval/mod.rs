//! Evaluation: perplexity / mean NLL (`perplexity`), generation and exact match
//! (`generate`), multiple choice by log-likelihood (`choice`).

pub mod perplexity;

pub use self::perplexity::{NllSummary, mean_nll};
