//! Tokenizers: an HF `tokenizer.json`, or the GPT-2 byte-level BPE embedded in a GGUF file,
//! both through the `tokenizers` crate so token ids equal HF's.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Once;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{Error, Result};
use crate::model::gguf::{GgufFile, Value};

/// Llama-3's pre-tokenizer split pattern (digits in groups of up to three).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// GGUF tokenizers: prepend BOS when encoding with special tokens.
    add_bos: Option<u32>,
    pub eos: Option<u32>,
    /// Where it was read from, for errors.
    path: PathBuf,
    /// The model's vocabulary size: a tokenizer for a bigger vocabulary may produce ids
    /// the embedding does not have, and each encoding is checked against it.
    model_vocab: usize,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::file(path, format!("tokenizer: {e}"))
}

thread_local! {
    /// Set while this thread runs a [`guarded`] call: its panic is reported as an
    /// error, so the panic hook stays silent.
    static IN_GUARD: Cell<bool> = const { Cell::new(false) };
}

/// Wraps the process's panic hook once, so that it skips panics raised inside
/// [`guarded`] (each of those ends in an error line of its own) and reports
/// every other panic as before.
fn silence_guarded_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_GUARD.with(Cell::get) {
                previous(info);
            }
        }));
    });
}

/// Runs `f`, a call into the `tokenizers` crate on the tokenizer read from `path`, turning
/// a panic into an error naming that file. Why: the crate reads tokenizer.json without
/// the checks its builders make. A `TemplateProcessing` post-processor that names a
/// special token it does not define loads, then panics on the first encoding (found by
/// `tests/fuzz.rs`); a user's file must end in a one-line error, not a panic.
fn guarded<T>(path: &Path, what: &str, f: impl FnOnce() -> T) -> Result<T> {
    silence_guarded_panics();
    let was = IN_GUARD.with(|g| g.replace(true));
    // `f` only reads the tokenizer (or builds it); a panic leaves nothing half-changed that
    // is used after: the command ends with the error.
    let r = catch_unwind(AssertUnwindSafe(f));
    IN_GUARD.with(|g| g.set(was));
    r.map_err(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        tok_err(
            path,
            format!(
                "the tokenizers library failed while {what} ({msg}); is the tokenizer well-formed?"
            ),
        )
    })
}

impl Tokenizer {
    /// An HF `tokenizer.json` for a model of `model_vocab` tokens whose EOS is `eos` (from
    /// its configuration, already checked against the vocabulary).
    pub fn from_file(path: &Path, eos: Option<u32>, model_vocab: usize) -> Result<Self> {
        if !path.exists() {
            return Err(Error::file(path, "not found"));
        }
        let inner = guarded(path, "reading it", || {
            tokenizers::Tokenizer::from_file(path)
        })?
        .map_err(|e| tok_err(path, e))?;
        Ok(Tokenizer {
            inner,
            add_bos: None,
            eos,
            path: path.to_path_buf(),
            model_vocab,
        })
    }

    /// Build the GGUF-embedded tokenizer (`tokenizer.ggml.model = "gpt2"`); its special
    /// ids are the ones the model configuration checked against `model_vocab`.
    pub fn from_gguf(f: &GgufFile, path: &Path, model_vocab: usize) -> Result<Self> {
        let model = f
            .meta("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .unwrap_or("");
        if model != "gpt2" {
            return Err(Error::file(
                path,
                format!(
                    "GGUF tokenizer model `{model}` is not supported (only gpt2 byte-level BPE); pass --tokenizer tokenizer.json"
                ),
            ));
        }
        let strings = |key: &str| -> Result<Vec<&str>> {
            let arr = f
                .meta(key)
                .and_then(Value::as_array)
                .ok_or_else(|| Error::file(path, format!("missing metadata `{key}`")))?;
            arr.iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| Error::file(path, format!("`{key}` holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = f
            .meta("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| Error::file(path, format!("malformed merge `{m}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| tok_err(path, e))?;
        let pre = f
            .meta("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tok: PreTokenizerWrapper = match pre {
            "smollm" | "starcoder" | "refact" => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            "default" | "gpt-2" | "gpt2" => byte_level.into(),
            "llama-bpe" | "llama3" => {
                let split = Split::new(
                    SplitPattern::Regex(LLAMA3_SPLIT.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| tok_err(path, e))?;
                Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ])
                .into()
            }
            other => {
                return Err(Error::file(
                    path,
                    format!(
                        "GGUF pre-tokenizer `{other}` is not supported; pass --tokenizer tokenizer.json"
                    ),
                ));
            }
        };
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tok));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control (3) and user-defined (4) tokens are matched whole before BPE, as HF does.
        let added: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == 3 || **t == 4)
            .filter_map(|(i, t)| {
                tokens
                    .get(i)
                    .map(|s| AddedToken::from(s.to_string(), *t == 3))
            })
            .collect();
        inner
            .add_special_tokens(added)
            .map_err(|e| tok_err(path, e))?;
        let add_bos = matches!(
            f.meta("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );
        Ok(Tokenizer {
            inner,
            add_bos: if add_bos {
                f.token_id("tokenizer.ggml.bos_token_id")?
            } else {
                None
            },
            eos: f.token_id("tokenizer.ggml.eos_token_id")?,
            path: path.to_path_buf(),
            model_vocab,
        })
    }

    /// `ids` if the model's embedding has every one of them.
    fn in_vocab(&self, ids: Vec<u32>) -> Result<Vec<u32>> {
        match ids.iter().find(|&&id| id as usize >= self.model_vocab) {
            None => Ok(ids),
            Some(&id) => Err(Error::file(
                &self.path,
                format!(
                    "tokenizer produced id {id} (`{}`), outside the model's vocabulary of {} (a tokenizer for another model?)",
                    self.inner.id_to_token(id).unwrap_or_default(),
                    self.model_vocab
                ),
            )),
        }
    }

    /// Token ids of `text` with no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = guarded(&self.path, "encoding", || {
            self.inner.encode_fast(text, false)
        })?
        .map_err(|e| Error::usage(format!("tokenizer: {e}")))?;
        self.in_vocab(enc.get_ids().to_vec())
    }

    /// Token ids with the tokenizer's own post-processing (BOS where the model adds one).
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>> {
        let enc = guarded(&self.path, "encoding", || {
            self.inner.encode_fast(text, true)
        })?
        .map_err(|e| Error::usage(format!("tokenizer: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if let Some(bos) = self.add_bos
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        self.in_vocab(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        guarded(&self.path, "decoding", || self.inner.decode(ids, true))?
            .map_err(|e| Error::usage(format!("tokenizer: {e}")))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
