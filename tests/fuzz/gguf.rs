#![allow(dead_code)]
//! A small GGUF writer for tests: the tiny fixture model as an F32 GGUF, with every field
//! of the header open to change. Q and K are not permuted as llama.cpp does, so the
//! numbers differ from the HF model's; loading and running are what these files test.

use std::path::Path;

use lalora_engine::io::TensorFile;

#[derive(Clone, Debug)]
pub enum Val {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    F64(f64),
    /// Element type id and elements (all of that type).
    Array(u32, Vec<Val>),
}

impl Val {
    pub fn type_id(&self) -> u32 {
        match self {
            Val::U32(_) => 4,
            Val::I32(_) => 5,
            Val::F32(_) => 6,
            Val::Bool(_) => 7,
            Val::Str(_) => 8,
            Val::Array(..) => 9,
            Val::U64(_) => 10,
            Val::F64(_) => 12,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Val::U32(x) => out.extend(x.to_le_bytes()),
            Val::I32(x) => out.extend(x.to_le_bytes()),
            Val::F32(x) => out.extend(x.to_le_bytes()),
            Val::Bool(x) => out.push(*x as u8),
            Val::Str(s) => {
                out.extend((s.len() as u64).to_le_bytes());
                out.extend(s.as_bytes());
            }
            Val::U64(x) => out.extend(x.to_le_bytes()),
            Val::F64(x) => out.extend(x.to_le_bytes()),
            Val::Array(ty, v) => {
                out.extend(ty.to_le_bytes());
                out.extend((v.len() as u64).to_le_bytes());
                for x in v {
                    x.write(out);
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    /// Fastest-varying first, as GGUF lists them.
    pub dims: Vec<u64>,
    pub ty: u32,
    /// `None`: placed after the previous tensor, aligned.
    pub offset: Option<u64>,
    pub data: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct Gguf {
    pub version: u32,
    pub kv: Vec<(String, Val)>,
    pub tensors: Vec<Tensor>,
    pub align: usize,
}

impl Gguf {
    /// The tiny-gqa model of `dir` (config.json + model.safetensors) as GGUF metadata and
    /// F32 tensors under llama.cpp's names.
    pub fn from_tiny(dir: &Path) -> Gguf {
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let u = |k: &str| Val::U32(cfg[k].as_u64().unwrap() as u32);
        let kv = vec![
            ("general.architecture".into(), Val::Str("llama".into())),
            ("llama.embedding_length".into(), u("hidden_size")),
            ("llama.feed_forward_length".into(), u("intermediate_size")),
            ("llama.block_count".into(), u("num_hidden_layers")),
            (
                "llama.attention.head_count".into(),
                u("num_attention_heads"),
            ),
            (
                "llama.attention.head_count_kv".into(),
                u("num_key_value_heads"),
            ),
            ("llama.context_length".into(), u("max_position_embeddings")),
            ("llama.vocab_size".into(), u("vocab_size")),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                Val::F32(1e-5),
            ),
            ("llama.rope.freq_base".into(), Val::F32(10000.0)),
            ("tokenizer.ggml.bos_token_id".into(), Val::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), Val::U32(2)),
        ];
        let st = TensorFile::read(&dir.join("model.safetensors")).unwrap();
        let tensors = st
            .tensors
            .iter()
            .map(|(name, (shape, data))| Tensor {
                name: gguf_name(name),
                dims: shape.iter().rev().map(|&d| d as u64).collect(),
                ty: 0,
                offset: None,
                data: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            })
            .collect();
        Gguf {
            version: 3,
            kv,
            tensors,
            align: 32,
        }
    }

    /// Every matrix (two dims, a whole number of 32-element blocks) stored as Q8_0: blocks
    /// of 32 values, each an f16 scale `max |x| / 127` and 32 signed bytes `round(x /
    /// scale)`, over the values in storage order (llama.cpp blocks each row; the engine
    /// reads whole tensors as one run of blocks, so either order loads here).
    pub fn quantize_q8_0(&mut self) {
        for t in self
            .tensors
            .iter_mut()
            .filter(|t| t.ty == 0 && t.dims.len() == 2)
        {
            let x: Vec<f32> = t
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if !x.len().is_multiple_of(32) {
                continue;
            }
            let mut q = Vec::with_capacity(x.len() / 32 * 34);
            for block in x.chunks_exact(32) {
                let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = half::f16::from_f32(amax / 127.0);
                let inv = if d.to_f32() > 0.0 {
                    1.0 / d.to_f32()
                } else {
                    0.0
                };
                q.extend(d.to_le_bytes());
                q.extend(
                    block
                        .iter()
                        .map(|v| ((v * inv).round().clamp(-127.0, 127.0) as i8) as u8),
                );
            }
            t.ty = 8;
            t.data = q;
        }
    }

    /// Where tensor `i`'s data starts in [`Gguf::bytes`]'s file whose header is
    /// `header_len` bytes long.
    pub fn data_at(&self, i: usize, header_len: usize) -> usize {
        header_len.next_multiple_of(self.align) + self.offsets()[i] as usize
    }

    pub fn set(&mut self, key: &str, v: Val) {
        match self.kv.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = v,
            None => self.kv.push((key.into(), v)),
        }
    }

    /// Each tensor's data offset: its `offset`, or after the previous placed tensor,
    /// aligned.
    pub fn offsets(&self) -> Vec<u64> {
        let mut end = 0usize;
        self.tensors
            .iter()
            .map(|t| match t.offset {
                Some(o) => o,
                None => {
                    let start = end.next_multiple_of(self.align);
                    end = start + t.data.len();
                    start as u64
                }
            })
            .collect()
    }

    /// The file, and the length of its header (where the padding before the data begins).
    pub fn bytes(&self) -> (Vec<u8>, usize) {
        let mut h = b"GGUF".to_vec();
        h.extend(self.version.to_le_bytes());
        h.extend((self.tensors.len() as u64).to_le_bytes());
        h.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            Val::Str(k.clone()).write(&mut h);
            h.extend(v.type_id().to_le_bytes());
            v.write(&mut h);
        }
        let mut data = Vec::new();
        for (t, offset) in self.tensors.iter().zip(self.offsets()) {
            if t.offset.is_none() {
                data.resize(offset as usize, 0);
                data.extend(&t.data);
            }
            Val::Str(t.name.clone()).write(&mut h);
            h.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend(d.to_le_bytes());
            }
            h.extend(t.ty.to_le_bytes());
            h.extend(offset.to_le_bytes());
        }
        let header_len = h.len();
        h.resize(h.len().next_multiple_of(self.align), 0);
        h.extend(data);
        (h, header_len)
    }
}

/// `model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`, etc.
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, module) = rest.split_once('.').unwrap();
    let module = module.strip_suffix(".weight").unwrap();
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("unexpected tensor {other}"),
    };
    format!("blk.{layer}.{short}.weight")
}
