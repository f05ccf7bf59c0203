//! Kernel-research settings chosen by name from the environment (`LALORA_PROJECTION_GEMM`,
//! `LALORA_GRAM_GEMM`): one way to read them, and one usage error for a name they do not
//! know.

use crate::error::{Error, Result};

/// The member of `all` whose `name` the environment variable `var` holds, else the default
/// (unset or empty). Another name is a usage error naming the variable and listing the
/// members (`what`: "a projection path").
pub(super) fn from_env<T: Copy + Default>(
    var: &str,
    what: &str,
    all: &[T],
    name: fn(T) -> &'static str,
) -> Result<T> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => all.iter().copied().find(|&p| name(p) == v).ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|&p| name(p)).collect();
            let (last, rest) = names.split_last().expect("a setting has members");
            Error::usage(format!(
                "{var}={v} is not {what}; use {} or {last}",
                rest.join(", ")
            ))
        }),
        _ => Ok(T::default()),
    }
}

/// Where `v` stands in `all`: what the backend's atomic setting stores.
pub(super) fn index<T: PartialEq>(all: &[T], v: T) -> usize {
    all.iter()
        .position(|p| *p == v)
        .expect("every member is in ALL")
}
