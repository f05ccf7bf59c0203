//! Mutations that know a format's structure (GGUF metadata and tensor directory,
//! safetensors header), reaching past the first parse where random bytes would not, and
//! a tokenizer for text rows.

use std::path::Path;

use serde_json::{Value, json};

use super::gguf::{Gguf, Val};
use super::mutate::Mutator;

/// A random GGUF metadata value of any type.
fn gguf_value(m: &mut Mutator) -> Val {
    match m.below(8) {
        0 => Val::U32(m.u64() as u32),
        1 => Val::I32(m.int() as i32),
        2 => Val::F32(m.float() as f32),
        3 => Val::U64(m.u64()),
        4 => Val::F64(m.float()),
        5 => Val::Bool(m.chance(0.5)),
        6 => Val::Str(m.pick(&["llama", "yarn", "none", "gpt2", ""]).to_string()),
        _ => Val::Array(
            4,
            (0..m.below(4)).map(|_| Val::U32(m.u64() as u32)).collect(),
        ),
    }
}

/// Keys the loader reads, for mutations that add or replace them.
const GGUF_KEYS: [&str; 10] = [
    "general.alignment",
    "llama.rope.scaling.type",
    "llama.rope.dimension_count",
    "llama.attention.key_length",
    "llama.attention.value_length",
    "llama.expert_count",
    "llama.context_length",
    "llama.vocab_size",
    "tokenizer.ggml.eos_token_id",
    "llama.attention.head_count_kv",
];

pub fn mutate_gguf(g: &mut Gguf, m: &mut Mutator) -> String {
    let (nk, nt) = (g.kv.len(), g.tensors.len());
    match m.below(9) {
        0 => {
            let i = m.below(nk);
            g.kv[i].1 = gguf_value(m);
            format!("{} = {:?}", g.kv[i].0, g.kv[i].1)
        }
        1 => {
            let key = *m.pick(&GGUF_KEYS);
            let v = gguf_value(m);
            let w = format!("{key} = {v:?}");
            g.set(key, v);
            w
        }
        2 => format!("removed {}", g.kv.remove(m.below(nk)).0),
        3 => {
            let (i, d) = (m.below(nt), m.below(2));
            let v = m.u64();
            let t = &mut g.tensors[i];
            if let Some(x) = t.dims.get_mut(d) {
                *x = v;
            }
            format!("{} dims {:?}", t.name, t.dims)
        }
        4 => {
            let i = m.below(nt);
            g.tensors[i].ty = *m.pick(&[1, 2, 3, 8, 12, 14, 30, 99]);
            format!("{} type {}", g.tensors[i].name, g.tensors[i].ty)
        }
        5 => {
            let (i, j) = (m.below(nt), m.below(nt));
            let offsets = g.offsets();
            let o = match m.below(3) {
                0 => offsets[j],
                1 => offsets[j] + [1, 4, 16, 32][m.below(4)],
                _ => m.u64(),
            };
            g.tensors[i].offset = Some(o);
            format!("{} offset {o}", g.tensors[i].name)
        }
        6 => {
            let i = m.below(nt);
            let t = g.tensors.remove(i);
            if m.chance(0.5) {
                g.tensors.push(t.clone());
                g.tensors.push(t.clone());
                return format!("{} listed twice", t.name);
            }
            format!("removed {}", t.name)
        }
        7 => {
            g.version = m.u64() as u32;
            format!("version {}", g.version)
        }
        _ => {
            g.align = *m.pick(&[1, 8, 64, 4096]);
            g.set("general.alignment", Val::U32(g.align as u32));
            format!("alignment {}", g.align)
        }
    }
}

/// A word-level tokenizer.json: `w1` .. `w99` have ids 1..99, `big` has 1000 (beyond the
/// tiny model's 512).
pub fn word_tokenizer(path: &Path) {
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), json!(0));
    for i in 1..100 {
        vocab.insert(format!("w{i}"), json!(i));
    }
    vocab.insert("big".into(), json!(1000));
    let tok = json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}});
    std::fs::write(path, tok.to_string()).unwrap();
}

/// Change one tensor entry of a safetensors header so that the file stays well-formed
/// (or nearly): shapes reversed or regrouped, data ranges swapped, names changed, a
/// half-width dtype over the same bytes. Returns what was done.
pub fn mutate_safetensors_header(h: &mut Value, m: &mut Mutator) -> String {
    let names: Vec<String> = h
        .as_object()
        .map(|o| o.keys().filter(|k| *k != "__metadata__").cloned().collect())
        .unwrap_or_default();
    let (a, b) = (m.pick(&names).clone(), m.pick(&names).clone());
    match m.below(5) {
        0 => {
            if let Some(s) = h[&a]["shape"].as_array_mut() {
                s.reverse();
            }
            format!("{a}: shape reversed")
        }
        1 => {
            let n: u64 = h[&a]["shape"]
                .as_array()
                .map_or(1, |s| s.iter().filter_map(Value::as_u64).product());
            h[&a]["shape"] = json!([n]);
            format!("{a}: shape [{n}]")
        }
        2 => {
            let (x, y) = (h[&a]["data_offsets"].clone(), h[&b]["data_offsets"].clone());
            h[&a]["data_offsets"] = y;
            h[&b]["data_offsets"] = x;
            format!("data of {a} and {b} swapped")
        }
        3 => {
            let v = h[&a].clone();
            let new = m
                .pick(&[
                    "model.layers.2.input_layernorm.weight",
                    "model.layers.0.self_attn.q_proj.bias",
                    "lm_head.weight",
                    "model.layers.x.mlp.up_proj.weight",
                ])
                .to_string();
            if let Some(o) = h.as_object_mut() {
                o.remove(&a);
                o.insert(new.clone(), v);
            }
            format!("{a} renamed {new}")
        }
        _ => {
            let dtype = m.pick(&["F16", "BF16"]).to_string();
            h[&a]["dtype"] = json!(dtype);
            if let Some(last) = h[&a]["shape"].as_array_mut().and_then(|s| s.last_mut()) {
                *last = json!(last.as_u64().unwrap_or(1) * 2);
            }
            format!("{a}: {dtype} over the same bytes")
        }
    }
}
