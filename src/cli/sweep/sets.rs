//! The evaluation sets of a sweep (and the demo): held-out sequences for NLL,
//! multiple-choice questions, question/answer pairs; each refused with the file's name when
//! it is too small for a standard error.

use std::path::Path;

use super::super::{DataArgs, load_data};
use crate::error::{Error, Result};
use crate::eval::choice::read_choices;
use crate::eval::exact_match::read_qa;
use crate::eval::generate::Sampling;
use crate::eval::perplexity::require_targets;
use crate::model::LoadedModel;
use crate::sweep::{ChoiceSet, EvalSet, ExactMatchSet};

/// The first `limit` sequences of a held-out file, tokenized as the training data are,
/// named by its stem.
pub fn eval_set(path: &Path, m: &LoadedModel, d: &DataArgs, limit: usize) -> Result<EvalSet> {
    let mut examples = load_data(path, m, d)?;
    examples.truncate(limit);
    // A standard error needs the spread between at least two sequences.
    if examples.len() < 2 {
        return Err(Error::file(
            path,
            format!(
                "{} sequence to evaluate; a standard error needs at least 2 (more rows, or a larger --eval-limit / --eval-sequences)",
                examples.len()
            ),
        ));
    }
    // A set whose rows lost every predicted token to --max-len has no mean loss.
    require_targets(path, &examples)?;
    Ok(EvalSet {
        name: stem(path),
        examples,
    })
}

/// The first `limit` questions of a multiple-choice file, named by its stem.
pub fn choice_set(path: &Path, limit: usize) -> Result<ChoiceSet> {
    let mut rows = read_choices(path)?;
    rows.truncate(limit);
    at_least_two(path, rows.len(), "question")?;
    Ok(ChoiceSet {
        name: stem(path),
        path: path.to_path_buf(),
        rows,
    })
}

/// The first `limit` question/answer pairs of a file, answered greedily.
pub fn exact_match_set(path: &Path, limit: usize, max_new_tokens: usize) -> Result<ExactMatchSet> {
    let mut rows = read_qa(path)?;
    rows.truncate(limit);
    at_least_two(path, rows.len(), "question")?;
    Ok((
        rows,
        Sampling {
            max_new_tokens,
            ..Sampling::default()
        },
    ))
}

/// A standard error needs the spread between at least two units.
fn at_least_two(path: &Path, n: usize, unit: &str) -> Result<()> {
    if n < 2 {
        return Err(Error::file(
            path,
            format!("{n} {unit} to evaluate; a standard error needs at least 2"),
        ));
    }
    Ok(())
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}
