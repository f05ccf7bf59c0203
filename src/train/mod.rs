//! Stage II: LoRA training with the Laplace penalty. `grad` holds the loss-gradient pass
//! shared by `train` and the `grad` command.

pub mod grad;

pub use self::grad::{GradSummary, accumulate_gradients};
