//! `LlamaConfig` from an HF `config.json`. A field may be absent or `null` (HF's "use the
//! default"); present with the wrong JSON type it is an error, never a silent default.

use std::path::Path;

use serde_json::Value;

use super::config::{Llama3RopeScaling, LlamaConfig};
use crate::error::{Error, Result};

/// The fields of one JSON object, with errors naming the file and the field.
struct Fields<'a> {
    obj: &'a Value,
    path: &'a Path,
    /// `rope_scaling.` for nested objects, so messages name the full field.
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    fn err(&self, key: &str, what: &str) -> Error {
        Error::file(self.path, format!("`{}{key}` must be {what}", self.prefix))
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .ok_or_else(|| self.err(key, "a non-negative integer"))
            })
            .transpose()
    }

    fn need_usize(&self, key: &str) -> Result<usize> {
        self.usize(key)?
            .ok_or_else(|| self.err(key, "present (a non-negative integer)"))
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| self.err(key, "a number")))
            .transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.err(key, "true or false")))
            .transpose()
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| self.err(key, "a string")))
            .transpose()
    }

    /// A token id or a list of them (`eos_token_id` may be either).
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let one = |v: &Value| {
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| self.err(key, "a token id or a list of token ids"))
        };
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }

    fn nested(&self, key: &'a str, prefix: &'a str) -> Result<Option<Fields<'a>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) if v.is_object() => Ok(Some(Fields {
                obj: v,
                path: self.path,
                prefix,
            })),
            Some(_) => Err(self.err(key, "an object")),
        }
    }
}

/// The RoPE variant a `rope_scaling` / `rope_parameters` object asks for.
fn rope_type<'a>(f: &Fields<'a>) -> Result<Option<&'a str>> {
    Ok(f.str("rope_type")?.or(f.str("type")?))
}

/// Llama-3 scaling from whichever object asks for a non-default RoPE; any other kind
/// would compute different positions than the model was trained with, so it is refused.
fn rope_scaling(
    scaling: Option<&Fields>,
    params: Option<&Fields>,
    path: &Path,
) -> Result<Option<Llama3RopeScaling>> {
    if let Some(s) = scaling
        && rope_type(s)?.is_none()
    {
        return Err(Error::file(path, "`rope_scaling` names no `rope_type`"));
    }
    for f in scaling.into_iter().chain(params) {
        match rope_type(f)? {
            None | Some("default") => continue,
            Some("llama3") => {
                let field = |k: &str| {
                    f.f64(k)?
                        .ok_or_else(|| f.err(k, "present for llama3 rope scaling"))
                };
                return Ok(Some(Llama3RopeScaling {
                    factor: field("factor")?,
                    low_freq_factor: field("low_freq_factor")?,
                    high_freq_factor: field("high_freq_factor")?,
                    original_max_position_embeddings: field("original_max_position_embeddings")?,
                }));
            }
            Some(t) => {
                return Err(Error::file(
                    path,
                    format!("rope scaling type `{t}` is not supported (only `llama3`)"),
                ));
            }
        }
    }
    Ok(None)
}

impl LlamaConfig {
    /// Parse an HF `config.json`. `rope_theta` may sit at the top level (transformers < 5) or
    /// inside `rope_parameters` (newer); the llama3 scaling may sit in `rope_scaling` or in
    /// `rope_parameters`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("malformed JSON: {e}")))?;
        if !v.is_object() {
            return Err(Error::file(path, "expected a JSON object"));
        }
        let f = Fields {
            obj: &v,
            path,
            prefix: "",
        };
        if let Some(mt) = f.str("model_type")?
            && !matches!(mt, "llama" | "mistral")
        {
            return Err(Error::file(
                path,
                format!("model_type `{mt}` is not a Llama-family model"),
            ));
        }
        // HF's ACT2FN maps both names to SiLU, the only activation of the Llama MLP here.
        if let Some(act) = f.str("hidden_act")?
            && !matches!(act, "silu" | "swish")
        {
            return Err(Error::file(
                path,
                format!("hidden_act `{act}` is not supported (only silu)"),
            ));
        }
        for flag in ["attention_bias", "mlp_bias"] {
            if f.bool(flag)? == Some(true) {
                return Err(Error::file(
                    path,
                    format!("`{flag}: true` is not supported"),
                ));
            }
        }
        let hidden_size = f.need_usize("hidden_size")?;
        let num_heads = f.need_usize("num_attention_heads")?;
        let rope_params = f.nested("rope_parameters", "rope_parameters.")?;
        let scaling = f.nested("rope_scaling", "rope_scaling.")?;
        let rope_theta = match f.f64("rope_theta")? {
            Some(t) => Some(t),
            None => rope_params
                .as_ref()
                .map(|p| p.f64("rope_theta"))
                .transpose()?
                .flatten(),
        };
        // Within its window, sliding-window attention (Mistral) is plain causal attention:
        // longer sequences would need the window, so they count as too long.
        let max_positions = f.usize("max_position_embeddings")?.unwrap_or(2048);
        let window = f.usize("sliding_window")?.unwrap_or(usize::MAX);
        let cfg = LlamaConfig {
            vocab_size: f.need_usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.need_usize("intermediate_size")?,
            num_layers: f.need_usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads: f.usize("num_key_value_heads")?.unwrap_or(num_heads),
            head_dim: f
                .usize("head_dim")?
                .unwrap_or(hidden_size / num_heads.max(1)),
            // HF's LlamaConfig defaults.
            rms_norm_eps: f.f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta: rope_theta.unwrap_or(10000.0),
            rope_scaling: rope_scaling(scaling.as_ref(), rope_params.as_ref(), path)?,
            rope_freq_factors: None,
            tie_word_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(false),
            max_position_embeddings: max_positions.min(window),
            bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.token_ids("eos_token_id")?,
        };
        cfg.validate().map_err(|m| Error::file(path, m))?;
        Ok(cfg)
    }
}
