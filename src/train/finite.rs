//! Non-finite numbers stop the work: a NaN or infinity in a loss, gradient, penalty or
//! weight must never be trained on, checkpointed or written out. These checks name the
//! first non-finite quantity so the user can tell a diverging run (weights) from bad input
//! (loss at the first step) or a bad curvature (penalty).
//!
//! Device tensors are checked through their squared norm: both backends accumulate the
//! dot product of f32 values in f64, which cannot overflow, so it is finite exactly when
//! every element is. All the norms of a check come from one `Backend::dots` call: on a
//! GPU one launch and one wait for the device, not one per tensor.

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

/// The tensors of `w` in `LoraWeights` order.
pub fn tensors<T>(w: &LoraWeights<T>) -> impl Iterator<Item = &T> {
    w.modules.iter().flat_map(|m| [&m.a, &m.b])
}

/// The pairs `(t, t)` whose dot products are the squared norms of `w`'s tensors.
pub fn norm_pairs<T>(w: &LoraWeights<T>) -> impl Iterator<Item = (&T, &T)> {
    tensors(w).map(|t| (t, t))
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
    check_devices(be, &[(w, what)], at)
}

/// [`check_norms`] on several sets of device tensors with one `dots` call; the error
/// names the first non-finite tensor of the first set holding one.
pub fn check_devices<B: Backend>(
    be: &B,
    sets: &[(&LoraWeights<B::Buf>, &str)],
    at: &str,
) -> Result<()> {
    let pairs: Vec<_> = sets.iter().flat_map(|(w, _)| norm_pairs(w)).collect();
    let sq = be.dots(&pairs)?;
    let mut rest = sq.as_slice();
    for (w, what) in sets {
        let (mine, tail) = rest.split_at(2 * w.modules.len());
        check_norms(w, mine, at, what)?;
        rest = tail;
    }
    Ok(())
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
