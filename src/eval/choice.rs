//! Multiple choice by log-likelihood, as lm-eval-harness: each choice is scored by the
//! summed log-probability of its tokens after the context (`" " + choice`); `acc` takes
//! the best sum, `acc_norm` the best sum per byte of the choice text.

use std::path::Path;

use serde_json::Value;

use crate::backend::Backend;
use crate::data::Example;
use crate::data::jsonl::IGNORE;
use crate::error::{Error, IoContext, Result};
use crate::eval::perplexity::sequence_losses;
use crate::model::{Llama, LoraWeights};
use crate::tokenizer::Tokenizer;

pub struct ChoiceRow {
    pub context: String,
    pub choices: Vec<String>,
    pub answer: usize,
}

/// Rows `{"question"|"query"|"context", "choices": [...], "answer"|"gold"|"label": index}`.
pub fn read_choices(path: &Path) -> Result<Vec<ChoiceRow>> {
    let text = std::fs::read_to_string(path).at(path)?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let err = |m: &str| Error::line(path, i + 1, m.to_string());
        let v: Value =
            serde_json::from_str(line).map_err(|e| err(&format!("malformed JSON: {e}")))?;
        let context = ["question", "query", "context"]
            .iter()
            .find_map(|k| v.get(*k).and_then(Value::as_str))
            .ok_or_else(|| err("missing question/query/context"))?;
        let choices: Vec<String> = v
            .get("choices")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(str::to_string))
                    .collect()
            })
            .filter(|c: &Vec<String>| c.len() >= 2)
            .ok_or_else(|| err("`choices` must list at least two strings"))?;
        let answer = ["answer", "gold", "label"]
            .iter()
            .find_map(|k| v.get(*k).and_then(Value::as_u64))
            .map(|a| a as usize)
            .filter(|&a| a < choices.len())
            .ok_or_else(|| err("`answer` must be the index of a choice"))?;
        out.push(ChoiceRow {
            context: context.to_string(),
            choices,
            answer,
        });
    }
    if out.is_empty() {
        return Err(Error::file(path, "no data rows"));
    }
    Ok(out)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ChoiceResult {
    pub n: usize,
    pub acc: f64,
    pub acc_norm: f64,
}

/// Summed log-likelihood of every (row, choice) continuation, in row-major order.
pub fn choice_logliks<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: Option<&LoraWeights<B::Buf>>,
    tok: &Tokenizer,
    rows: &[ChoiceRow],
    batch_size: usize,
) -> Result<Vec<f64>> {
    let mut examples = Vec::new();
    for r in rows {
        let ctx = tok.encode(&r.context)?;
        for c in &r.choices {
            let cont = tok.encode(&format!(" {c}"))?;
            let mut ids = ctx.clone();
            ids.extend(&cont);
            let labels = ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i < ctx.len() { IGNORE } else { t as i32 })
                .collect();
            examples.push(Example { ids, labels });
        }
    }
    let positions = model.cfg.max_position_embeddings;
    if let Some(e) = examples.iter().find(|e| e.ids.len() > positions) {
        return Err(Error::usage(format!(
            "a question with one of its choices takes {} tokens, more than the model's {positions} positions (max_position_embeddings)",
            e.ids.len()
        )));
    }
    Ok(
        sequence_losses(be, model, lora, &examples, batch_size, || {})?
            .into_iter()
            .map(|l| -l)
            .collect(),
    )
}

/// `acc` and `acc_norm` from the log-likelihoods of `choice_logliks`.
pub fn score(rows: &[ChoiceRow], logliks: &[f64]) -> ChoiceResult {
    let (mut acc, mut acc_norm, mut k) = (0usize, 0usize, 0usize);
    let argmax = |v: &[f64]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    };
    for r in rows {
        let ll = &logliks[k..k + r.choices.len()];
        let norm: Vec<f64> = ll
            .iter()
            .zip(&r.choices)
            .map(|(l, c)| l / c.len().max(1) as f64)
            .collect();
        acc += (argmax(ll) == Some(r.answer)) as usize;
        acc_norm += (argmax(&norm) == Some(r.answer)) as usize;
        k += r.choices.len();
    }
    let n = rows.len().max(1) as f64;
    ChoiceResult {
        n: rows.len(),
        acc: acc as f64 / n,
        acc_norm: acc_norm as f64 / n,
    }
}
