//! Non-finite numbers stop the work: a NaN or infinity in a loss, gradient, penalty or
//! weight must never be trained on, checkpointed or written out. These checks name the
//! first non-finite quantity so the user can tell a diverging run (weights) from bad input
//! (loss at the first step) or a bad curvature (penalty).
//!
//! Device tensors are checked through their squared norm: both backends accumulate the
//! dot product of f32 values in f64, which cannot overflow, so it is finite exactly when
//! every element is.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::LoraWeights;

pub fn non_finite(at: impl Into<String>, what: impl Into<String>) -> Error {
    Error::NonFinite {
        at: at.into(),
        what: what.into(),
    }
}

/// `Err` naming `what` at `at` unless `value` is finite.
pub fn check_value(value: f64, at: &str, what: &str) -> Result<()> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(non_finite(at, what))
    }
}

/// The PEFT names of the tensors of `w`, in `LoraWeights` order (A before B per module).
pub fn tensor_names<T>(w: &LoraWeights<T>) -> Vec<String> {
    w.modules
        .iter()
        .flat_map(|m| [m.a_name(), m.b_name()])
        .collect()
}

/// The squared norm of every tensor of `w`, in `LoraWeights` order.
pub fn squared_norms<B: Backend>(be: &B, w: &LoraWeights<B::Buf>) -> Result<Vec<f64>> {
    w.modules
        .iter()
        .flat_map(|m| [&m.a, &m.b])
        .map(|t| be.dot(t, t))
        .collect()
}

/// `Err` naming the first tensor of `w` whose squared norm in `sq` is not finite;
/// `what` says which quantity it is (`gradient`, `weights`).
pub fn check_norms<T>(w: &LoraWeights<T>, sq: &[f64], at: &str, what: &str) -> Result<()> {
    match sq.iter().position(|s| !s.is_finite()) {
        None => Ok(()),
        Some(i) => {
            let name = tensor_names(w).swap_remove(i);
            Err(non_finite(at, format!("{what} in `{name}`")))
        }
    }
}

/// [`check_norms`] on device tensors.
pub fn check_device<B: Backend>(
    be: &B,
    w: &LoraWeights<B::Buf>,
    at: &str,
    what: &str,
) -> Result<()> {
    check_norms(w, &squared_norms(be, w)?, at, what)
}

/// The name of the first host tensor holding a NaN or an infinity.
pub fn first_non_finite<'a>(
    tensors: impl IntoIterator<Item = (String, &'a [f32])>,
) -> Option<String> {
    tensors
        .into_iter()
        .find(|(_, data)| data.iter().any(|x| !x.is_finite()))
        .map(|(name, _)| name)
}
