//! JSONL rows in the HF convention: `input_ids` + `labels` of equal length, `-100` ignored,
//! position t predicting label t+1 (the model shifts).
//!
//! Accepted rows:
//! - `{"input_ids": [...], "labels": [...]}` (labels default to input_ids);
//! - `{"text": ...}`: every token is a label;
//! - `{"question", "answer"}` (GSM8K) and `{"query", "response"}` (MetaMathQA): prompt
//!   `"Question: {q}\nAnswer:"`, response `" {a}"` + EOS;
//! - `{"prompt", "completion"}`: prompt and completion as given, completion + EOS.
//!
//! For prompt/response rows only the response tokens carry labels.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, IoContext, Result};
use crate::model::config::LlamaConfig;
use crate::tokenizer::Tokenizer;

pub const IGNORE: i32 = -100;

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<i32>,
}

impl Example {
    /// Positions whose next-token label is active (what the loss counts).
    pub fn n_targets(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l >= 0).count()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct RowFormat {
    /// Sequences are cut to their first `max_len` tokens.
    pub max_len: usize,
}

/// The prompt and response texts of a question/answer row.
pub fn qa_prompt(question: &str) -> String {
    format!("Question: {question}\nAnswer:")
}

fn field<'a>(row: &'a Value, key: &str) -> Option<&'a str> {
    row.get(key).and_then(Value::as_str)
}

fn ids_of(v: &Value, key: &str) -> std::result::Result<Vec<i64>, String> {
    let arr = v
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("`{key}` must be an array of integers"))?;
    arr.iter()
        .map(|x| {
            x.as_i64()
                .ok_or_else(|| format!("`{key}` must hold integers only"))
        })
        .collect()
}

enum RowKind<'a> {
    Text(&'a str),
    /// `raw`: prompt/completion as given; otherwise the question/answer template.
    Pair {
        raw: bool,
        prompt: &'a str,
        response: &'a str,
    },
}

fn parse_row(
    row: &Value,
    tok: &Result<&Tokenizer>,
    vocab: usize,
) -> std::result::Result<Example, String> {
    if !row.is_object() {
        return Err("expected a JSON object".into());
    }
    if row.get("input_ids").is_some() {
        let ids = ids_of(row, "input_ids")?;
        let labels = if row.get("labels").is_some() {
            ids_of(row, "labels")?
        } else {
            ids.clone()
        };
        if labels.len() != ids.len() {
            return Err(format!(
                "`labels` has {} entries but `input_ids` has {}",
                labels.len(),
                ids.len()
            ));
        }
        if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= vocab) {
            return Err(format!(
                "token id {bad} is out of range for vocabulary size {vocab}"
            ));
        }
        if let Some(bad) = labels
            .iter()
            .find(|&&l| l != IGNORE as i64 && (l < 0 || l as usize >= vocab))
        {
            return Err(format!(
                "label {bad} is out of range for vocabulary size {vocab} (use -100 to ignore)"
            ));
        }
        return Ok(Example {
            ids: ids.into_iter().map(|i| i as u32).collect(),
            labels: labels.into_iter().map(|l| l as i32).collect(),
        });
    }
    let pair = [
        ("question", "answer"),
        ("query", "response"),
        ("prompt", "completion"),
    ]
    .into_iter()
    .find_map(|(p, r)| Some((p, field(row, p)?, field(row, r)?)));
    let kind = match (field(row, "text"), pair) {
        (Some(text), _) => RowKind::Text(text),
        (None, Some((kind, p, r))) => RowKind::Pair {
            raw: kind == "prompt",
            prompt: p,
            response: r,
        },
        (None, None) => {
            return Err("unknown row: expected input_ids, text, question/answer, query/response or prompt/completion".into());
        }
    };
    let tok = tok
        .as_ref()
        .map_err(|e| format!("text rows need a tokenizer: {e}"))?;
    let enc = |s: &str| tok.encode(s).map_err(|e| e.to_string());
    let (prompt, response) = match kind {
        RowKind::Text(text) => {
            let ids = tok.encode_with_special(text).map_err(|e| e.to_string())?;
            let labels = ids.iter().map(|&i| i as i32).collect();
            return Ok(Example { ids, labels });
        }
        RowKind::Pair {
            raw: true,
            prompt,
            response,
        } => (prompt.to_string(), response.to_string()),
        RowKind::Pair {
            raw: false,
            prompt,
            response,
        } => (qa_prompt(prompt), format!(" {response}")),
    };
    let mut ids = enc(&prompt)?;
    let n_prompt = ids.len();
    ids.extend(enc(&response)?);
    ids.extend(tok.eos);
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| if i < n_prompt { IGNORE } else { t as i32 })
        .collect();
    Ok(Example { ids, labels })
}

/// Read every row of a JSONL file. `tok` is the tokenizer, or the reason there is none
/// (reported if a row needs one). Errors name the file and line.
pub fn read_jsonl(
    path: &Path,
    tok: Result<&Tokenizer>,
    vocab: usize,
    fmt: RowFormat,
) -> Result<Vec<Example>> {
    read_rows(path, tok, vocab, usize::MAX, fmt)
}

/// `read_jsonl` for a model: token ids in its vocabulary and, after the cut to
/// `fmt.max_len`, no row longer than the positions it was trained for (RoPE beyond them
/// is extrapolation the model never saw).
pub fn read_jsonl_for(
    path: &Path,
    tok: Result<&Tokenizer>,
    model: &LlamaConfig,
    fmt: RowFormat,
) -> Result<Vec<Example>> {
    read_rows(
        path,
        tok,
        model.vocab_size,
        model.max_position_embeddings,
        fmt,
    )
}

fn read_rows(
    path: &Path,
    tok: Result<&Tokenizer>,
    vocab: usize,
    max_positions: usize,
    fmt: RowFormat,
) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).at(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: Value = serde_json::from_str(line)
            .map_err(|e| Error::line(path, i + 1, format!("malformed JSON: {e}")))?;
        let mut ex = parse_row(&row, &tok, vocab).map_err(|m| Error::line(path, i + 1, m))?;
        if ex.ids.is_empty() {
            return Err(Error::line(path, i + 1, "row has no tokens"));
        }
        ex.ids.truncate(fmt.max_len);
        ex.labels.truncate(fmt.max_len);
        if ex.ids.len() > max_positions {
            return Err(Error::line(
                path,
                i + 1,
                format!(
                    "row has {} tokens but the model takes at most {max_positions} positions (max_position_embeddings); cut rows with --max-len {max_positions}",
                    ex.ids.len()
                ),
            ));
        }
        out.push(ex);
    }
    if out.is_empty() {
        return Err(Error::file(path, "no data rows"));
    }
    Ok(out)
}
