//! GGUF files (llama architecture): metadata, tensor directory, dequantised tensors.
//!
//! GGUF lists a matrix's dims fastest-first (`[d_in, d_out]`), so its data is the row-major
//! `(d_out, d_in)` matrix HF uses. llama.cpp's converter permutes the rows of Q and K for
//! interleaved RoPE; `get` undoes that so the weights equal the HF ones.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::config::LlamaConfig;
use super::proj::Proj;
use super::quant::{GgmlType, dequantize};
use super::weights::{TensorSource, WeightName, mmap_file};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Int(i) if *i >= 0 => Some(*i as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

struct TensorInfo {
    dims: Vec<usize>,
    ty: u32,
    offset: usize,
}

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

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| format!("truncated header (needed {n} bytes at offset {})", self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let n = self.u64()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("invalid UTF-8 string at {}", self.pos))
    }
    fn value(&mut self, ty: u32) -> std::result::Result<Value, String> {
        Ok(match ty {
            0 => Value::Int(self.take(1)?[0] as i64),
            1 => Value::Int(self.take(1)?[0] as i8 as i64),
            2 => Value::Int(u16::from_le_bytes([self.take(1)?[0], self.take(1)?[0]]) as i64),
            3 => Value::Int(i16::from_le_bytes([self.take(1)?[0], self.take(1)?[0]]) as i64),
            4 => Value::Int(self.u32()? as i64),
            5 => Value::Int(self.u32()? as i32 as i64),
            6 => Value::Float(f32::from_bits(self.u32()?) as f64),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                let elem = self.u32()?;
                let n = self.u64()? as usize;
                // Every element takes at least one byte: a bigger count is a corrupt file.
                if n > self.buf.len() - self.pos {
                    return Err(format!("array of {n} elements exceeds the file"));
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(elem)?);
                }
                Value::Array(v)
            }
            10 => Value::Int(self.u64()? as i64),
            11 => Value::Int(self.u64()? as i64),
            12 => Value::Float(f64::from_bits(self.u64()?)),
            t => return Err(format!("unknown metadata value type {t}")),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let map = mmap_file(path)?;
        let (metadata, tensors, data_start) =
            Self::parse(&map).map_err(|m| Error::file(path, m))?;
        let mut f = GgufFile {
            path: path.to_path_buf(),
            map,
            metadata,
            tensors,
            data_start,
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

    #[allow(clippy::type_complexity)]
    fn parse(
        buf: &[u8],
    ) -> std::result::Result<(HashMap<String, Value>, HashMap<String, TensorInfo>, usize), String>
    {
        let mut r = Reader { buf, pos: 0 };
        if r.take(4).map_err(|_| "not a GGUF file (too short)")? != b"GGUF" {
            return Err("not a GGUF file (bad magic)".into());
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format!("unsupported GGUF version {version}"));
        }
        let n_tensors = r.u64()? as usize;
        let n_kv = r.u64()? as usize;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty).map_err(|e| format!("metadata `{key}`: {e}"))?;
            metadata.insert(key, v);
        }
        let mut tensors = HashMap::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()? as usize;
            if nd > 4 {
                return Err(format!("tensor `{name}` has {nd} dimensions"));
            }
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                dims.push(r.u64()? as usize);
            }
            let ty = r.u32()?;
            let offset = r.u64()? as usize;
            tensors.insert(name, TensorInfo { dims, ty, offset });
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32) as usize;
        let data_start = r.pos.div_ceil(align.max(1)) * align.max(1);
        for (name, t) in &tensors {
            let n: usize = t.dims.iter().product();
            let ty = GgmlType::from_id(t.ty);
            let end = ty
                .and_then(|ty| ty.byte_size(n))
                .map(|b| data_start + t.offset + b);
            if let Some(end) = end
                && end > buf.len() {
                    return Err(format!(
                        "truncated: tensor `{name}` ends at byte {end}, file has {}",
                        buf.len()
                    ));
                }
        }
        Ok((metadata, tensors, data_start))
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

    /// The model configuration from `llama.*` metadata.
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = self
            .meta("general.architecture")
            .and_then(Value::as_str)
            .unwrap_or("");
        if arch != "llama" {
            return Err(self.err(format!(
                "architecture `{arch}` is not supported (only `llama`)"
            )));
        }
        let need = |k: &str| {
            self.meta_u64(k)
                .map(|x| x as usize)
                .ok_or_else(|| self.err(format!("missing metadata `{k}`")))
        };
        let hidden_size = need("llama.embedding_length")?;
        let num_heads = need("llama.attention.head_count")?;
        let vocab_size = match self.meta_u64("llama.vocab_size") {
            Some(v) => v as usize,
            None => self
                .tensors
                .get("token_embd.weight")
                .and_then(|t| t.dims.get(1).copied())
                .ok_or_else(|| self.err("cannot tell the vocabulary size"))?,
        };
        let head_dim = self
            .meta_u64("llama.attention.key_length")
            .or_else(|| self.meta_u64("llama.rope.dimension_count"))
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_heads.max(1));
        let rope_freq_factors = if self.tensors.contains_key("rope_freqs.weight") {
            let (v, _) = self.tensor_f32("rope_freqs.weight")?;
            Some(v)
        } else {
            None
        };
        let token_id = |k: &str| self.meta_u64(k).map(|x| x as u32);
        let cfg = LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: need("llama.feed_forward_length")?,
            num_layers: need("llama.block_count")?,
            num_heads,
            num_kv_heads: self
                .meta_u64("llama.attention.head_count_kv")
                .map(|x| x as usize)
                .unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: self
                .meta("llama.attention.layer_norm_rms_epsilon")
                .and_then(Value::as_f64)
                .unwrap_or(1e-5) as f32,
            rope_theta: self
                .meta("llama.rope.freq_base")
                .and_then(Value::as_f64)
                .unwrap_or(10000.0),
            rope_scaling: None,
            rope_freq_factors,
            tie_word_embeddings: !self.tensors.contains_key("output.weight"),
            max_position_embeddings: self.meta_u64("llama.context_length").unwrap_or(2048) as usize,
            bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: token_id("tokenizer.ggml.eos_token_id")
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
        let ty = GgmlType::from_id(t.ty).ok_or_else(|| {
            self.err(format!(
                "tensor `{name}` has GGML type {} which is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K are)",
                t.ty
            ))
        })?;
        let n: usize = t.dims.iter().product();
        let bytes = ty.byte_size(n).ok_or_else(|| {
            self.err(format!("tensor `{name}`: {n} elements is not whole blocks"))
        })?;
        let start = self.data_start + t.offset;
        let data = &self.map[start..start + bytes];
        let mut out = vec![0f32; n];
        dequantize(ty, data, &mut out);
        let shape: Vec<usize> = t.dims.iter().rev().copied().collect();
        Ok((out, shape))
    }
}

/// Undo llama.cpp's `permute`: GGUF row `h*hd + 2j + c` holds HF row `h*hd + c*hd/2 + j`.
fn unpermute_rows(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let hd = rows / n_head;
    let mut out = vec![0f32; w.len()];
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

    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (data, got) = self.tensor_f32(name)?;
        if got != shape {
            return Err(self.err(format!(
                "tensor `{name}` has shape {got:?}, expected {shape:?}"
            )));
        }
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
