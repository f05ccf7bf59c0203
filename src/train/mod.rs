//! Stage II: LoRA training with the Laplace penalty (DESIGN §6).
//! - `grad`: the loss-gradient pass shared with the `grad` command;
//! - `penalty`: the LaLoRA penalty for each curvature scheme;
//! - `trainer`: schedule, data order, accumulation, clipping, AdamW;
//! - `checkpoint`: what an exact resume needs.

pub mod checkpoint;
pub mod grad;
pub mod penalty;
pub mod session;
pub mod trainer;

pub use self::grad::{GradSummary, accumulate_gradients};
pub use self::penalty::Penalty;
pub use self::trainer::{Schedule, StepMetrics, TrainConfig, TrainState, train};
