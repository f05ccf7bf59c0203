//! GSM8K exact match as lm-eval-harness's `gsm8k` task scores it: generation ends at its
//! `until` strings, the answer is its strict-match filter's (the number after the first
//! `#### `), else its flexible-extract filter's (the last number), and answer and reference
//! are normalised by its `regexes_to_ignore` before they are compared.

use std::path::Path;
use std::sync::LazyLock;

use regex::Regex;
use serde_json::Value;

use super::generate::{GENERATION_BATCH, Sampling, generate_batch};
use crate::backend::Backend;
use crate::data::jsonl::qa_prompt;
use crate::error::{Error, IoContext, Result};
use crate::model::{Llama, LoraWeights};
use crate::tokenizer::Tokenizer;

/// lm-eval gsm8k's `until`: a generated answer ends before the first of these.
pub const UNTIL: [&str; 3] = ["Question:", "</s>", "<|im_end|>"];

/// `text` up to the first of [`UNTIL`].
pub fn cut_at_until(text: &str) -> &str {
    let end = UNTIL.iter().filter_map(|u| text.find(u)).min();
    &text[..end.unwrap_or(text.len())]
}

/// lm-eval's strict-match pattern (first match), and its flexible-extract one (last match).
static STRICT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"#### (-?[0-9.,]+)").unwrap());
static FLEXIBLE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(-?[$0-9.,]{2,})|(-?[0-9]+)").unwrap());
/// lm-eval gsm8k's `regexes_to_ignore`, removed in this order (`$` is the end of the text;
/// Python's would also match before a final newline, which neither side here ends with).
static IGNORED: LazyLock<[Regex; 4]> =
    LazyLock::new(|| [r",", r"\$", r"(?s).*#### ", r"\.$"].map(|p| Regex::new(p).unwrap()));

/// What lm-eval's exact match compares: the text with the ignored patterns removed, lower
/// case (`ignore_case: true`).
fn normalise(text: &str) -> String {
    let s = IGNORED.iter().fold(text.to_string(), |s, re| {
        re.replace_all(&s, "").into_owned()
    });
    s.to_lowercase()
}

/// The answer of a generated text (already cut at [`UNTIL`]): the strict-match number, else
/// the flexible-extract one, normalised; `None` where both filters find nothing (lm-eval's
/// `[invalid]`, which matches no reference).
pub fn extract_answer(text: &str) -> Option<String> {
    let found = match STRICT.captures(text) {
        Some(c) => c.get(1)?.as_str(),
        None => FLEXIBLE.find_iter(text).last()?.as_str(),
    };
    Some(normalise(found))
}

/// The reference answer of a solution text: a GSM8K solution (with `#### `) normalised as
/// lm-eval's target (everything up to the last `#### ` removed); any other reference (an
/// ASDiv answer such as `9 apples`) by [`extract_answer`], its number.
pub fn reference_answer(solution: &str) -> Option<String> {
    if solution.contains("#### ") {
        Some(normalise(solution))
    } else {
        extract_answer(solution)
    }
}

/// `(question, answer)` pairs of a JSONL file (`question`/`answer` or `query`/`response`).
pub fn read_qa(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).at(path)?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(line)
            .map_err(|e| Error::line(path, i + 1, format!("malformed JSON: {e}")))?;
        let get = |a: &str, b: &str| {
            v.get(a)
                .or_else(|| v.get(b))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        match (get("question", "query"), get("answer", "response")) {
            (Some(q), Some(a)) => out.push((q, a)),
            _ => {
                return Err(Error::line(
                    path,
                    i + 1,
                    "exact match needs question/answer rows",
                ));
            }
        }
    }
    if out.is_empty() {
        return Err(Error::file(path, "no data rows"));
    }
    Ok(out)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ExactMatch {
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// Each question's answer as extracted from the generated text, and whether it is
    /// right: what paired comparisons between models are computed from.
    #[serde(skip)]
    pub answers: Vec<Option<String>>,
    /// Each generated text, cut at [`UNTIL`].
    #[serde(skip)]
    pub texts: Vec<String>,
    #[serde(skip)]
    pub outcomes: Vec<bool>,
}

/// Greedy (or sampled) answers to each question in the training prompt format.
#[allow(clippy::too_many_arguments)]
pub fn exact_match<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: Option<&LoraWeights<B::Buf>>,
    tok: &Tokenizer,
    rows: &[(String, String)],
    s: &Sampling,
    mut on_row: impl FnMut(),
) -> Result<ExactMatch> {
    let stop: Vec<u32> = tok.eos.into_iter().collect();
    let (mut answers, mut outcomes, mut texts) = (Vec::new(), Vec::new(), Vec::new());
    for chunk in rows.chunks(GENERATION_BATCH) {
        let prompts = chunk
            .iter()
            .map(|(q, _)| tok.encode(&qa_prompt(q)))
            .collect::<Result<Vec<_>>>()?;
        let prompts: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let seeds = vec![s.seed; chunk.len()];
        // Decoding what a row has so far at each step is cheap beside the step's forward.
        let until = |out: &[u32]| {
            tok.decode(out)
                .is_ok_and(|t| cut_at_until(&t).len() < t.len())
        };
        let outs = generate_batch(be, model, lora, &prompts, s, &seeds, &stop, until, |_| {
            on_row()
        })?;
        for ((_, a), out) in chunk.iter().zip(outs) {
            let text = tok.decode(&out)?;
            let text = cut_at_until(&text);
            let got = extract_answer(text);
            outcomes.push(got.is_some() && got == reference_answer(a));
            answers.push(got);
            texts.push(text.to_string());
        }
    }
    let correct = outcomes.iter().filter(|&&c| c).count();
    Ok(ExactMatch {
        n: rows.len(),
        correct,
        accuracy: correct as f64 / rows.len().max(1) as f64,
        answers,
        texts,
        outcomes,
    })
}

#[cfg(test)]
mod tests {
    use super::{cut_at_until, extract_answer};

    /// lm-eval's extraction is held to its own code by tests/exact_match_reference.rs;
    /// these are the cut and the two filters' order.
    #[test]
    fn answers_are_cut_then_strict_else_flexible() {
        assert_eq!(cut_at_until("7 <|im_end|> x Question: y"), "7 ");
        assert_eq!(cut_at_until("8\nQuestion: 9"), "8\n");
        assert_eq!(cut_at_until("no stop"), "no stop");
        assert_eq!(extract_answer("#### 3 and 4").as_deref(), Some("3"));
        assert_eq!(extract_answer("3 and 4").as_deref(), Some("4"));
        assert_eq!(extract_answer("no number"), None);
    }
}
