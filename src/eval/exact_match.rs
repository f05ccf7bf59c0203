//! GSM8K-style exact match: the number after `####`, else the last number, of the
//! generated answer against the reference's.

use std::path::Path;

use regex::Regex;
use serde_json::Value;

use super::generate::{GENERATION_BATCH, Sampling, generate_batch};
use crate::backend::Backend;
use crate::data::jsonl::qa_prompt;
use crate::error::{Error, IoContext, Result};
use crate::model::{Llama, LoraWeights};
use crate::tokenizer::Tokenizer;

/// The final numeric answer of a solution text, normalised (no thousands separators, no
/// trailing zeros after a decimal point).
pub fn extract_answer(text: &str) -> Option<String> {
    let num = Regex::new(r"-?\d[\d,]*(?:\.\d+)?").ok()?;
    let tail = text.rsplit_once("####").map(|(_, t)| t).unwrap_or(text);
    let found = if text.contains("####") {
        num.find(tail)
    } else {
        num.find_iter(tail).last()
    }?;
    let mut s = found.as_str().replace(',', "");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    Some(s)
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
    let (mut answers, mut outcomes) = (Vec::new(), Vec::new());
    for chunk in rows.chunks(GENERATION_BATCH) {
        let prompts = chunk
            .iter()
            .map(|(q, _)| tok.encode(&qa_prompt(q)))
            .collect::<Result<Vec<_>>>()?;
        let prompts: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let seeds = vec![s.seed; chunk.len()];
        let outs = generate_batch(be, model, lora, &prompts, s, &seeds, &stop, |_| on_row())?;
        for ((_, a), out) in chunk.iter().zip(outs) {
            let got = extract_answer(&tok.decode(&out)?);
            outcomes.push(got.is_some() && got == extract_answer(a));
            answers.push(got);
        }
    }
    let correct = outcomes.iter().filter(|&&c| c).count();
    Ok(ExactMatch {
        n: rows.len(),
        correct,
        accuracy: correct as f64 / rows.len().max(1) as f64,
        answers,
        outcomes,
    })
}

#[cfg(test)]
mod tests {
    use super::extract_answer;

    #[test]
    fn answers_are_extracted_like_gsm8k() {
        assert_eq!(
            extract_answer("so 48+24 = 72 clips.\n#### 72").as_deref(),
            Some("72")
        );
        assert_eq!(extract_answer("#### 1,200").as_deref(), Some("1200"));
        assert_eq!(
            extract_answer("The answer is 3.50 dollars, not 4").as_deref(),
            Some("4")
        );
        assert_eq!(extract_answer("9 apples").as_deref(), Some("9"));
        assert_eq!(extract_answer("costs 2.50").as_deref(), Some("2.5"));
        assert_eq!(extract_answer("-3 degrees").as_deref(), Some("-3"));
        assert_eq!(extract_answer("no number"), None);
    }
}
