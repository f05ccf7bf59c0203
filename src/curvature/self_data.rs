//! `curvature --data self:N`: a source set the model writes itself, for when the source
//! data are not at hand. Each of the N sequences is sampled from the base model (no
//! adapter) at temperature 1 without truncation (top-p 1), starting from the model's BOS
//! token or from one of the prompts of `--self-prompts FILE` (prompt i mod the count),
//! until EOS (kept, as the model predicted it) or `--self-tokens` new tokens. Prompt
//! tokens are context only (labels -100); the sampled tokens are the targets. With
//! `--fisher mc` the labels are resampled anyway, so the estimate needs no data at all.
//!
//! Sequence i is drawn with its own seed derived from (`--seed`, i), so the first k
//! sequences of `self:N` are those of `self:k` (up to float rounding: `GENERATION_BATCH`
//! sequences are sampled together, and a product over a different number of rows may
//! round a probability differently in its last bit). The set is written beside the curvature
//! file as JSONL (`C.self.jsonl` for `C.safetensors`): `--data C.self.jsonl` reproduces the
//! estimate without sampling again.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::backend::Backend;
use crate::data::Example;
use crate::data::jsonl::IGNORE;
use crate::error::{Error, IoContext, Result};
use crate::eval::generate::{GENERATION_BATCH, Sampling, generate_batch};
use crate::model::Llama;
use crate::tokenizer::Tokenizer;

/// The `--data` value that asks for self-generated data: `self:N`.
const PREFIX: &str = "self:";

/// What to sample: the count, the continuation length, the seed and the starts.
#[derive(Debug, Clone)]
pub struct SelfData {
    pub n: usize,
    pub new_tokens: usize,
    pub seed: u64,
    /// Token ids each sequence starts from, used in turn (one entry: BOS).
    pub starts: Vec<Vec<u32>>,
    /// How the starts were chosen, for the curvature file's metadata.
    pub start_desc: String,
}

/// `Some(N)` for `--data self:N`, `None` for a file path.
pub fn parse(arg: &Path) -> Result<Option<usize>> {
    let Some(count) = arg.to_str().and_then(|s| s.strip_prefix(PREFIX)) else {
        return Ok(None);
    };
    match count.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(Some(n)),
        _ => Err(Error::usage(format!(
            "--data {}: self-generated data is `self:N` with N >= 1 sequences",
            arg.display()
        ))),
    }
}

/// Where the sampled set is kept: beside the curvature file, `C.self.jsonl`.
pub fn jsonl_path(curvature_out: &Path) -> PathBuf {
    curvature_out.with_extension("self.jsonl")
}

/// The starts: every line of `prompts` (tokenized as text rows are, with the
/// tokenizer's own post-processing), or the BOS token alone.
pub fn starts(
    prompts: Option<&Path>,
    tokenizer: Option<&Tokenizer>,
    bos: Option<u32>,
) -> Result<(Vec<Vec<u32>>, String)> {
    let Some(path) = prompts else {
        let bos = bos.ok_or_else(|| {
            Error::usage(
                "--data self:N starts from the model's BOS token, and this model declares none: give --self-prompts FILE",
            )
        })?;
        return Ok((vec![vec![bos]], format!("bos {bos}")));
    };
    let tok = tokenizer.ok_or_else(|| {
        Error::file(
            path,
            "--self-prompts needs a tokenizer, and the model has none",
        )
    })?;
    let text = std::fs::read_to_string(path).at(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ids = tok.encode_with_special(line)?;
        if ids.is_empty() {
            return Err(Error::line(path, i + 1, "the prompt encodes to no tokens"));
        }
        out.push(ids);
    }
    if out.is_empty() {
        return Err(Error::file(path, "no prompts (one per line)"));
    }
    let desc = format!("{} prompts from {}", out.len(), path.display());
    Ok((out, desc))
}

/// The seed of sequence `i`: splitmix64 of the run's seed and the index, so sequences
/// are independent of each other and of N.
fn sequence_seed(seed: u64, i: usize) -> u64 {
    let mut z = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Sample the set from `model` without an adapter; `done` is called after each sequence.
pub fn sample<B: Backend>(
    be: &B,
    model: &Llama<B>,
    spec: &SelfData,
    eos: &[u32],
    mut done: impl FnMut(),
) -> Result<Vec<Example>> {
    let sampling = Sampling {
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: spec.new_tokens,
        seed: spec.seed,
    };
    let mut out = Vec::with_capacity(spec.n);
    for first in (0..spec.n).step_by(GENERATION_BATCH) {
        let chunk = first..spec.n.min(first + GENERATION_BATCH);
        let starts: Vec<&[u32]> = chunk
            .clone()
            .map(|i| spec.starts[i % spec.starts.len()].as_slice())
            .collect();
        let seeds: Vec<u64> = chunk.map(|i| sequence_seed(spec.seed, i)).collect();
        let news = generate_batch(
            be,
            model,
            None,
            &starts,
            &sampling,
            &seeds,
            eos,
            |_| false,
            |_| done(),
        )?;
        for (start, mut new) in starts.into_iter().zip(news) {
            // `generate` drops the stop token; a sequence that ended early ended on EOS.
            if new.len() < spec.new_tokens
                && let Some(&e) = eos.first()
            {
                new.push(e);
            }
            let mut labels = vec![IGNORE; start.len()];
            labels.extend(new.iter().map(|&t| t as i32));
            let mut ids = start.to_vec();
            ids.extend(new);
            out.push(Example { ids, labels });
        }
    }
    Ok(out)
}

/// The set as JSONL rows `{"input_ids", "labels"}`, readable by `--data`.
pub fn to_jsonl(examples: &[Example]) -> String {
    let mut s = String::new();
    for e in examples {
        s.push_str(&json!({"input_ids": e.ids, "labels": e.labels}).to_string());
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_argument_forms() {
        assert_eq!(parse(Path::new("self:64")).unwrap(), Some(64));
        assert_eq!(parse(Path::new("data/source.jsonl")).unwrap(), None);
        assert!(parse(Path::new("self:0")).is_err());
        assert!(parse(Path::new("self:x")).is_err());
        assert_eq!(
            jsonl_path(Path::new("out/c.safetensors")),
            Path::new("out/c.self.jsonl")
        );
    }

    #[test]
    fn sequence_seeds_differ() {
        let s: std::collections::BTreeSet<u64> = (0..1000).map(|i| sequence_seed(7, i)).collect();
        assert_eq!(s.len(), 1000);
        assert_ne!(sequence_seed(0, 0), sequence_seed(1, 0));
    }
}
