//! The Llama architecture hyper-parameters, read from an HF `config.json` or GGUF metadata.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// Llama-3 style frequency-dependent RoPE scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Per-frequency divisors from a GGUF `rope_freqs.weight` (Llama-3 GGUF files store the
    /// scaling this way instead of as parameters).
    #[serde(skip)]
    pub rope_freq_factors: Option<Vec<f32>>,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn get_usize(v: &Value, key: &str, path: &Path) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| Error::file(path, format!("missing or non-integer field `{key}`")))
}

fn get_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
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
        if let Some(mt) = v.get("model_type").and_then(Value::as_str)
            && !matches!(mt, "llama" | "mistral") {
                return Err(Error::file(
                    path,
                    format!("model_type `{mt}` is not a Llama-family model"),
                ));
            }
        for flag in ["attention_bias", "mlp_bias"] {
            if v.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(Error::file(
                    path,
                    format!("`{flag}: true` is not supported"),
                ));
            }
        }
        let hidden_size = get_usize(&v, "hidden_size", path)?;
        let num_heads = get_usize(&v, "num_attention_heads", path)?;
        let num_kv_heads = v
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(num_heads);
        let head_dim = v
            .get("head_dim")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_heads.max(1));
        let rope_params = v.get("rope_parameters");
        let rope_theta = get_f64(&v, "rope_theta")
            .or_else(|| rope_params.and_then(|p| get_f64(p, "rope_theta")))
            .unwrap_or(10000.0);
        let scaling_obj = [v.get("rope_scaling"), rope_params]
            .into_iter()
            .flatten()
            .find(|s| {
                let t = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str);
                t.is_some_and(|t| t != "default")
            });
        let rope_scaling = match scaling_obj {
            None => None,
            Some(s) => {
                let t = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if t != "llama3" {
                    return Err(Error::file(
                        path,
                        format!("rope scaling type `{t}` is not supported (only `llama3`)"),
                    ));
                }
                let field = |k: &str| {
                    get_f64(s, k).ok_or_else(|| {
                        Error::file(path, format!("llama3 rope scaling lacks `{k}`"))
                    })
                };
                Some(Llama3RopeScaling {
                    factor: field("factor")?,
                    low_freq_factor: field("low_freq_factor")?,
                    high_freq_factor: field("high_freq_factor")?,
                    original_max_position_embeddings: field("original_max_position_embeddings")?,
                })
            }
        };
        let cfg = LlamaConfig {
            vocab_size: get_usize(&v, "vocab_size", path)?,
            hidden_size,
            intermediate_size: get_usize(&v, "intermediate_size", path)?,
            num_layers: get_usize(&v, "num_hidden_layers", path)?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: get_f64(&v, "rms_norm_eps").unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            rope_freq_factors: None,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(2048) as usize,
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(v.get("eos_token_id")),
        };
        cfg.validate().map_err(|m| Error::file(path, m))?;
        Ok(cfg)
    }

    /// Structural sanity checks shared by both loaders.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let dims = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return Err(format!("`{name}` must be positive"));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// RoPE inverse frequencies `1 / theta^(2i/d)`, with the llama3 scaling or GGUF
    /// frequency factors applied, exactly as HF's `_compute_llama3_parameters`.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let mut inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        if let Some(s) = &self.rope_scaling {
            let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        if let Some(factors) = &self.rope_freq_factors {
            for (f, k) in inv.iter_mut().zip(factors) {
                *f /= *k as f64;
            }
        }
        inv
    }

    /// Number of parameters of the base model.
    pub fn n_params(&self) -> usize {
        let d = self.hidden_size;
        let per_layer = d * self.q_dim()
            + 2 * d * self.kv_dim()
            + self.q_dim() * d
            + 3 * d * self.intermediate_size
            + 2 * d;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        self.vocab_size * d + self.num_layers * per_layer + d + head
    }
}
