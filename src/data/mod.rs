//! Training and evaluation data: JSONL rows into token examples, and padded batches.

pub mod batch;
pub mod jsonl;

pub use self::batch::{Batch, batches, batches_by_length};
pub use self::jsonl::{Example, RowFormat, read_jsonl, read_jsonl_for};
