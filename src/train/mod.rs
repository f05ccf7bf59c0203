//! Stage II: LoRA training with the Laplace penalty (DESIGN §6).
//! - `grad`: the loss-gradient pass shared with the `grad` command;
//! - `penalty`: the LaLoRA penalty for each curvature scheme;
//! - `trainer`: schedule, data order, accumulation, clipping, AdamW;
//! - `checkpoint`: what an exact resume needs, crash-safe;
//! - `identity`: what defines a run, checked on resume;
//! - `finite`: non-finite numbers stop a run;
//! - `outdir`: the output directory: lock, log, results;
//! - `session`: one run with all its side effects.

pub mod checkpoint;
pub mod finite;
pub mod grad;
pub mod identity;
pub mod outdir;
pub mod penalty;
pub mod session;
pub mod trainer;

pub use self::grad::{GradSummary, accumulate_gradients};
pub use self::penalty::Penalty;
pub use self::trainer::{Schedule, StepMetrics, TrainConfig, TrainState, train};
