//! GGUF files (llama architecture): metadata, tensor directory, dequantised tensors.
//!
//! GGUF lists a matrix's dims fastest-first (`[d_in, d_out]`), so its data is the row-major
//! `(d_out, d_in)` matrix HF uses. llama.cpp's converter permutes the rows of Q and K for
//! interleaved RoPE; `get` undoes that so the weights equal the HF ones.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

mod header;

use super::config::LlamaConfig;
use super::proj::Proj;
use super::quant::{GgmlType, StoredMatrix, dequantize};
use super::weights::{TensorSource, WeightName, finite, mmap_file};
use crate::error::{Error, Result};
use header::TensorInfo;
pub use header::Value;

pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    pub metadata: HashMap<String, Value>,
    tensors: HashMap<String, TensorInfo>,
    data_start: usize,
    /// Heads used to undo the Q / K row permutation.
    n_head: usize,
    n_kv_head: usize,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let map = mmap_file(path)?;
        let h = header::parse(&map).map_err(|m| Error::file(path, m))?;
        let mut f = GgufFile {
            path: path.to_path_buf(),
            map,
            metadata: h.metadata,
            tensors: h.tensors,
            data_start: h.data_start,
            n_head: 0,
            n_kv_head: 0,
        };
        f.n_head = f.meta_u64("llama.attention.head_count").unwrap_or(0) as usize;
        f.n_kv_head = f
            .meta_u64("llama.attention.head_count_kv")
            .map(|x| x as usize)
            .unwrap_or(f.n_head);
        Ok(f)
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The names of every tensor in the file.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        self.meta(key).and_then(Value::as_u64)
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::file(&self.path, msg)
    }

    /// Metadata `key` as an integer, if present; present with another type is an error.
    fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        self.meta(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .ok_or_else(|| {
                        self.err(format!("metadata `{key}` must be a non-negative integer"))
                    })
            })
            .transpose()
    }

    fn meta_float(&self, key: &str) -> Result<Option<f64>> {
        self.meta(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.err(format!("metadata `{key}` must be a number")))
            })
            .transpose()
    }

    fn meta_string(&self, key: &str) -> Result<Option<&str>> {
        self.meta(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.err(format!("metadata `{key}` must be a string")))
            })
            .transpose()
    }

    /// A special token id from the tokenizer metadata.
    pub fn token_id(&self, key: &str) -> Result<Option<u32>> {
        self.meta_usize(key)?
            .map(|x| {
                u32::try_from(x)
                    .map_err(|_| self.err(format!("metadata `{key}` {x} is not a token id")))
            })
            .transpose()
    }

    /// The model configuration from `llama.*` metadata. What this crate cannot compute
    /// exactly (other RoPE scalings, partial rotary, experts) is refused.
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = self.meta_string("general.architecture")?.unwrap_or("");
        if arch != "llama" {
            return Err(self.err(format!(
                "architecture `{arch}` is not supported (only `llama`)"
            )));
        }
        let need = |k: &str| {
            self.meta_usize(k)?
                .ok_or_else(|| self.err(format!("missing metadata `{k}`")))
        };
        if let Some(t) = self.meta_string("llama.rope.scaling.type")?
            && t != "none"
        {
            return Err(self.err(format!(
                "rope scaling type `{t}` is not supported (llama3 scaling comes as rope_freqs.weight)"
            )));
        }
        if self.meta_usize("llama.expert_count")?.unwrap_or(0) > 0 {
            return Err(self.err("mixture-of-experts models are not supported"));
        }
        let hidden_size = need("llama.embedding_length")?;
        let num_heads = need("llama.attention.head_count")?;
        let vocab_size = match self.meta_usize("llama.vocab_size")? {
            Some(v) => v,
            None => self
                .tensors
                .get("token_embd.weight")
                .and_then(|t| t.dims.get(1).copied())
                .ok_or_else(|| self.err("cannot tell the vocabulary size"))?,
        };
        let key_length = self.meta_usize("llama.attention.key_length")?;
        let rope_dims = self.meta_usize("llama.rope.dimension_count")?;
        let head_dim = key_length
            .or(rope_dims)
            .unwrap_or(hidden_size / num_heads.max(1));
        for (k, v) in [
            ("llama.rope.dimension_count", rope_dims),
            (
                "llama.attention.value_length",
                self.meta_usize("llama.attention.value_length")?,
            ),
        ] {
            if v.is_some_and(|v| v != head_dim) {
                return Err(self.err(format!(
                    "metadata `{k}` differs from the head size {head_dim} (not supported)"
                )));
            }
        }
        let rope_freq_factors = if self.tensors.contains_key("rope_freqs.weight") {
            let (v, _) = self.tensor_f32("rope_freqs.weight")?;
            Some(v)
        } else {
            None
        };
        let cfg = LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: need("llama.feed_forward_length")?,
            num_layers: need("llama.block_count")?,
            num_heads,
            num_kv_heads: self
                .meta_usize("llama.attention.head_count_kv")?
                .unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: self
                .meta_float("llama.attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-5) as f32,
            rope_theta: self.meta_float("llama.rope.freq_base")?.unwrap_or(10000.0),
            rope_scaling: None,
            rope_freq_factors,
            tie_word_embeddings: !self.tensors.contains_key("output.weight"),
            max_position_embeddings: self.meta_usize("llama.context_length")?.unwrap_or(2048),
            bos_token_id: self.token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: self
                .token_id("tokenizer.ggml.eos_token_id")?
                .into_iter()
                .collect(),
        };
        cfg.validate().map_err(|m| self.err(m))?;
        Ok(cfg)
    }

    /// A tensor dequantised to f32, with its shape in row-major (outermost-first) order.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| self.err(format!("tensor `{name}` not found")))?;
        let (Some(ty), Some(bytes)) = (GgmlType::from_id(t.ty), t.bytes) else {
            return Err(self.err(format!(
                "tensor `{name}` has GGML type {} which is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K are)",
                t.ty
            )));
        };
        // The header check put every tensor inside the file and its dims' product in range.
        let start = self.data_start + t.offset;
        let data = self
            .map
            .get(start..start + bytes)
            .ok_or_else(|| self.err(format!("tensor `{name}` lies outside the file")))?;
        let n: usize = t.dims.iter().product();
        let mut out = vec![0f32; n];
        dequantize(ty, data, &mut out);
        let shape: Vec<usize> = t.dims.iter().rev().copied().collect();
        Ok((out, shape))
    }
}

/// Undo llama.cpp's `permute`: GGUF row `h*hd + 2j + c` holds HF row `h*hd + c*hd/2 + j`
/// (a row is `cols` values, or the bytes of a stored row).
fn unpermute_rows<T: Copy + Default>(w: &[T], n_head: usize, cols: usize) -> Vec<T> {
    let rows = w.len() / cols;
    let hd = rows / n_head;
    let mut out = vec![T::default(); w.len()];
    for h in 0..n_head {
        for j in 0..hd / 2 {
            for c in 0..2 {
                let src = h * hd + 2 * j + c;
                let dst = h * hd + c * (hd / 2) + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

impl TensorSource for GgufFile {
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The quantised types only, at up to 34 bytes per 32 values (Q8_0), each of which the
    /// CPU has a kernel for (`cpu::stored`): a Q4_1 copy adds 16 % to the f32 weights'
    /// memory and reads 5/32 of their bytes. F16 and BF16 would add half the f32 bytes
    /// again to save half the reading, so they are not kept.
    fn stored(&self, name: &str) -> Option<StoredMatrix> {
        let t = self.tensors.get(name)?;
        let ty = GgmlType::from_id(t.ty)?;
        let (elems, size) = ty.block();
        let (&[cols, rows], Some(bytes)) = (&t.dims[..], t.bytes) else {
            return None;
        };
        if size * 32 > elems * 34 || rows == 0 {
            return None;
        }
        let start = self.data_start + t.offset;
        let data = self.map.get(start..start + bytes)?;
        let heads = if name.ends_with("attn_q.weight") {
            Some(self.n_head)
        } else if name.ends_with("attn_k.weight") {
            Some(self.n_kv_head)
        } else {
            None
        };
        let data = match heads {
            Some(h) => unpermute_rows(data, h, bytes / rows),
            None => data.to_vec(),
        };
        StoredMatrix::new(ty, rows, cols, data)
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (data, got) = self.tensor_f32(name)?;
        if got != shape {
            return Err(self.err(format!(
                "tensor `{name}` has shape {got:?}, expected {shape:?}"
            )));
        }
        finite(&data).map_err(|e| self.err(format!("tensor `{name}` {e}")))?;
        let cols = *shape.last().unwrap_or(&1);
        Ok(if name.ends_with("attn_q.weight") {
            unpermute_rows(&data, self.n_head, cols)
        } else if name.ends_with("attn_k.weight") {
            unpermute_rows(&data, self.n_kv_head, cols)
        } else {
            data
        })
    }
}

pub fn gguf_name(w: WeightName) -> String {
    match w {
        WeightName::Embed => "token_embd.weight".into(),
        WeightName::AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
        WeightName::MlpNorm(l) => format!("blk.{l}.ffn_norm.weight"),
        WeightName::Proj(l, p) => format!("blk.{l}.{}.weight", Proj::gguf_name(p)),
        WeightName::FinalNorm => "output_norm.weight".into(),
        WeightName::LmHead => "output.weight".into(),
    }
}
