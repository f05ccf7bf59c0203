//! Fuzz tests: seeded mutations of every input format (safetensors header, GGUF header,
//! metadata and quantized data, config.json, tokenizer.json, JSONL rows, multiple-choice rows,
//! adapter_config.json and the adapter's tensors, curvature files, checkpoints, prompts
//! for self-generated data), each run
//! through the binary. Every run must succeed or end with exit 2 and one error line; a
//! panic, an abort, a hang or a multi-line error fails the test, naming the seed, the case
//! and the mutation. Exit 3 is accepted only for its documented cause, a non-finite
//! number during the run (mutated weights can be NaN). Fixed seeds and counts keep the
//! whole file at a few seconds.
//!
//! A longer campaign with other mutations: `LALORA_FUZZ_SEED=7 LALORA_FUZZ_CASES=20 cargo
//! test --release --test fuzz` (the seeds moved by 7, twenty times the cases). A failure
//! names the seed it ran with; rerun with the same variables to repeat it.

mod common;
#[path = "fuzz/formats.rs"]
mod formats;
#[path = "fuzz/gguf.rs"]
mod gguf;
#[path = "fuzz/harness.rs"]
mod harness;
#[path = "fuzz/mutate.rs"]
mod mutate;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use common::fixture;
use formats::{mutate_gguf, mutate_safetensors_header, word_tokenizer};
use gguf::Gguf;
use harness::{Outcome, fuzz, os, run};
use serde_json::{Value, json};

fn tiny_model() -> PathBuf {
    fixture("tiny-gqa/model")
}

fn batch() -> PathBuf {
    fixture("tiny-gqa/batch.jsonl")
}

fn eval_args(model: &Path, data: &Path) -> Vec<OsString> {
    os(&[&"eval", &"--model", &model, &"--data", &data])
}

/// A copy of the tiny model with `config.json` as given.
fn model_with_config(dir: &Path, config: &str) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::copy(
        tiny_model().join("model.safetensors"),
        m.join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(m.join("config.json"), config).unwrap();
    m
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn fuzz_config_json() {
    let base = read_json(&tiny_model().join("config.json"));
    let domain = [
        json!("gelu"),
        json!("mistral"),
        json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        json!({"rope_type": "yarn", "factor": 2.0}),
        json!({"factor": 2.0}),
        json!(16),
        json!(4),
        json!(1e-6),
    ];
    fuzz("config.json", 1, 200, |m, dir| {
        let mut cfg = base.clone();
        let what = match m {
            Some(m) => {
                let mut w = m.mutate_json(&mut cfg, &domain);
                if m.chance(0.3) {
                    w += "; ";
                    w += &m.mutate_json(&mut cfg, &domain);
                }
                w
            }
            None => "none".into(),
        };
        let model = model_with_config(dir, &cfg.to_string());
        (eval_args(&model, &batch()), what)
    });
}

#[test]
fn fuzz_safetensors_header() {
    let bytes = std::fs::read(tiny_model().join("model.safetensors")).unwrap();
    fuzz("safetensors header", 2, 150, |m, dir| {
        let (file, what) = mutated_safetensors(&bytes, m);
        let model = dir.join("model");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::copy(tiny_model().join("config.json"), model.join("config.json")).unwrap();
        std::fs::write(model.join("model.safetensors"), file).unwrap();
        (eval_args(&model, &batch()), what)
    });
}

/// A PEFT adapter's tensors (`eval --adapter`): the safetensors header mutated as the
/// model's above, or, one case in four, bytes of the tensors' values flipped (the file
/// stays well-formed; a value can turn NaN). The adapter's tensors are small, so nearly
/// every change to its header is refused; the flipped values are what mostly runs.
#[test]
fn fuzz_adapter_safetensors() {
    let adapter = fixture("tiny-gqa/adapter");
    let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    fuzz("adapter safetensors", 8, 150, |m, dir| {
        let (file, what) = match m {
            Some(m) => {
                if m.below(4) == 0 {
                    let mut b = bytes.clone();
                    let k = 1 + m.below(3);
                    let w = m.flip_bytes(&mut b, data_start..bytes.len(), k);
                    (b, format!("values: {w}"))
                } else {
                    mutated_safetensors(&bytes, Some(m))
                }
            }
            None => mutated_safetensors(&bytes, None),
        };
        let a = dir.join("adapter");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::copy(
            adapter.join("adapter_config.json"),
            a.join("adapter_config.json"),
        )
        .unwrap();
        std::fs::write(a.join("adapter_model.safetensors"), file).unwrap();
        let mut args = eval_args(&tiny_model(), &batch());
        args.extend(os(&[&"--adapter", &a]));
        (args, what)
    });
}

/// A safetensors file (`bytes`) with one mutation (none without `m`): flipped header
/// bytes, a wrong header length, or a header changed as JSON or tensor by tensor.
fn mutated_safetensors(bytes: &[u8], m: Option<&mut mutate::Mutator>) -> (Vec<u8>, String) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8..][n..];
    let Some(m) = m else {
        return (bytes.to_vec(), "none".into());
    };
    match m.below(6) {
        0 => {
            let mut b = bytes.to_vec();
            let k = 1 + m.below(3);
            let w = m.flip_bytes(&mut b, 0..8 + n, k);
            (b, w)
        }
        1 => {
            let mut b = bytes.to_vec();
            let len = m.u64();
            b[..8].copy_from_slice(&len.to_le_bytes());
            (b, format!("header length {len}"))
        }
        k => {
            let mut h = header;
            let w = if k == 2 {
                m.mutate_json(&mut h, &[json!("F16"), json!("I64"), json!([64])])
            } else {
                mutate_safetensors_header(&mut h, m)
            };
            let hb = h.to_string().into_bytes();
            let mut b = (hb.len() as u64).to_le_bytes().to_vec();
            b.extend(hb);
            b.extend(data);
            (b, w)
        }
    }
}

#[test]
fn fuzz_gguf_header_and_metadata() {
    let base = Gguf::from_tiny(&tiny_model());
    fuzz("gguf", 3, 250, |m, dir| {
        let mut g = base.clone();
        let (bytes, what) = match m {
            None => (g.bytes().0, "none".into()),
            Some(m) => {
                let w = mutate_gguf(&mut g, m);
                let (mut bytes, header_len) = g.bytes();
                let w = match m.below(4) {
                    0 => {
                        let k = 1 + m.below(2);
                        w + "; " + &m.flip_bytes(&mut bytes, 0..header_len, k)
                    }
                    1 => {
                        let cut = m.below(bytes.len());
                        bytes.truncate(cut);
                        format!("{w}; cut at {cut}")
                    }
                    _ => w,
                };
                (bytes, w)
            }
        };
        let path = dir.join("tiny.gguf");
        std::fs::write(&path, bytes).unwrap();
        (eval_args(&path, &batch()), what)
    });
}

#[test]
fn fuzz_jsonl_rows() {
    let rows: Vec<Value> = std::fs::read_to_string(batch())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let domain = [
        json!("w1 w2 w3"),
        json!("w1 big"),
        json!({"text": "w4 w5"}),
        json!({"question": "w1", "answer": "w2"}),
        json!({"prompt": "w1", "completion": "big"}),
        json!([-100, -100]),
        json!(-100),
        json!(511),
    ];
    let root = tempfile::tempdir().unwrap();
    let tok = root.path().join("tokenizer.json");
    word_tokenizer(&tok);
    fuzz("jsonl", 4, 150, |m, dir| {
        let (text, what) = mutated_rows(&rows, m, &domain);
        let data = dir.join("data.jsonl");
        std::fs::write(&data, text).unwrap();
        let mut args = eval_args(&tiny_model(), &data);
        args.extend(os(&[&"--tokenizer", &tok, &"--max-len", &"64"]));
        (args, what)
    });
}

/// JSONL text of `rows`, one mutated (none without `m`): a field changed as JSON, or the
/// row's bytes with one flipped, appended as a last line. Returns the text and what was
/// done.
fn mutated_rows(
    rows: &[Value],
    m: Option<&mut mutate::Mutator>,
    domain: &[Value],
) -> (String, String) {
    let mut rows = rows.to_vec();
    let mut raw_tail = String::new();
    let what = match m {
        None => "none".into(),
        Some(m) => {
            let i = m.below(rows.len());
            match m.below(5) {
                0 => {
                    let mut line = rows[i].to_string().into_bytes();
                    let n = line.len();
                    let w = m.flip_bytes(&mut line, 0..n, 1);
                    raw_tail = String::from_utf8_lossy(&line).into_owned();
                    format!("row {i}: {w}")
                }
                _ => format!("row {i}: {}", m.mutate_json(&mut rows[i], domain)),
            }
        }
    };
    let mut text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    text += &raw_tail;
    (text, what)
}

#[test]
fn fuzz_adapter_config() {
    let adapter = fixture("tiny-gqa/adapter");
    let base = read_json(&adapter.join("adapter_config.json"));
    let domain = [
        json!(["q_proj"]),
        json!([
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj"
        ]),
        json!("all-linear"),
        json!(".*proj"),
        json!(".*(q|k)_proj"),
        json!(["lm_head"]),
        json!([0]),
        json!([0, 1]),
        json!(1),
        json!("layers"),
        json!(["self_attn.q_proj"]),
        json!(4),
        json!(8),
    ];
    fuzz("adapter_config.json", 5, 150, |m, dir| {
        let mut cfg = base.clone();
        let what = match m {
            Some(m) => m.mutate_json(&mut cfg, &domain),
            None => "none".into(),
        };
        let a = dir.join("adapter");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::copy(
            adapter.join("adapter_model.safetensors"),
            a.join("adapter_model.safetensors"),
        )
        .unwrap();
        std::fs::write(a.join("adapter_config.json"), cfg.to_string()).unwrap();
        let mut args = eval_args(&tiny_model(), &batch());
        args.extend(os(&[&"--adapter", &a]));
        (args, what)
    });
}

/// A curvature file (`train --curvature`): its metadata, or its tensors' presence, values
/// and shapes.
#[test]
fn fuzz_curvature_file() {
    use lalora_engine::io::{TensorFile, write_safetensors};
    let root = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for scheme in ["diag", "kfac"] {
        let p = root.path().join(format!("{scheme}.safetensors"));
        let args = os(&[
            &"curvature",
            &"--model",
            &tiny_model(),
            &"--data",
            &batch(),
            &"--scheme",
            &scheme,
            &"--rank",
            &"2",
            &"--targets",
            &"q_proj,down_proj",
            &"--out",
            &p,
        ]);
        assert_eq!(
            run(&args, root.path()),
            Ok(Outcome::Ok),
            "curvature {scheme}"
        );
        files.push(TensorFile::read(&p).unwrap());
    }
    let values = [
        "0",
        "1",
        "-1",
        "2",
        "nan",
        "inf",
        "",
        "1e400",
        "true",
        "false",
        "diag",
        "kfac",
        "kfac-tri",
        "mc",
        "empirical",
        "expand",
        "reduce",
        "q_proj",
        "all",
        "q_proj,down_proj",
        "18446744073709551616",
        "lalora-curvature/1",
        "model (1 bytes, fingerprint 0)",
    ];
    fuzz("curvature file", 6, 120, |m, dir| {
        let (f, m) = match m {
            Some(m) => (&files[m.below(2)], Some(m)),
            None => (&files[0], None),
        };
        let mut meta = f.metadata.clone();
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = f
            .tensors
            .iter()
            .map(|(k, (s, d))| (k.clone(), s.clone(), d.clone()))
            .collect();
        let what = match m {
            None => "none".into(),
            Some(m) => {
                let keys: Vec<String> = meta.keys().cloned().collect();
                let key = m.pick(&keys).clone();
                let i = m.below(tensors.len());
                match m.below(7) {
                    0 => {
                        meta.remove(&key);
                        format!("removed {key}")
                    }
                    1 => {
                        let name = tensors.remove(i).0;
                        format!("removed tensor {name}")
                    }
                    // A value no estimate produces (a precision must be finite and not
                    // negative) or an extreme one.
                    2 => {
                        let (name, _, d) = &mut tensors[i];
                        let j = m.below(d.len().max(1)).min(d.len().saturating_sub(1));
                        let v = *m.pick(&[f32::NAN, f32::INFINITY, -1.0, -1e30, 1e30, 0.0]);
                        if let Some(x) = d.get_mut(j) {
                            *x = v;
                        }
                        format!("tensor {name}[{j}] = {v}")
                    }
                    // The same values under another shape, or one element short.
                    3 => {
                        let (name, shape, d) = &mut tensors[i];
                        let n = d.len();
                        let was = shape.clone();
                        *shape = match m.below(3) {
                            0 => vec![n],
                            1 => shape.iter().rev().copied().collect(),
                            _ => {
                                d.pop();
                                vec![n.saturating_sub(1)]
                            }
                        };
                        format!("tensor {name} shape {was:?} -> {shape:?}")
                    }
                    _ => {
                        let v = m.pick(&values).to_string();
                        meta.insert(key.clone(), v.clone());
                        format!("{key} = {v:?}")
                    }
                }
            }
        };
        let p = dir.join("c.safetensors");
        let views: Vec<(String, Vec<usize>, &[f32])> = tensors
            .iter()
            .map(|(k, s, d)| (k.clone(), s.clone(), d.as_slice()))
            .collect();
        write_safetensors(&p, &views, meta).unwrap();
        let args = os(&[
            &"train",
            &"--model",
            &tiny_model(),
            &"--data",
            &batch(),
            &"--curvature",
            &p,
            &"--lambda",
            &"1",
            &"--steps",
            &"1",
            &"--out",
            &dir.join("out"),
        ]);
        (args, what)
    });
}

/// Multiple-choice rows (`eval --choice`): mutated fields, and a row with flipped bytes.
#[test]
fn fuzz_choice_rows() {
    let rows = vec![
        json!({"question": "w1 w2 w3", "options": "\nA. w4\nB. w5 w6", "answer": "B. w5 w6"}),
        json!({"question": "w7", "options": "\nA. w8\nB. w9\nC. w10", "answer": "A. w8"}),
        json!({"passage": "w11 w12", "question": "w13", "options": "\nA. w14\nB. w15\nC. w16",
            "answer": "C. w16"}),
    ];
    let domain = [
        json!("\nA. w1\nB. w2"),
        json!("\nA. w1"),
        json!("\nB. w1\nA. w2"),
        json!("\nA. \nB. "),
        json!("A. w1"),
        json!("B. w2"),
        json!("Z. w1"),
        json!("w1 big"),
        json!(""),
        json!("\u{1F600} \u{0}"),
    ];
    let root = tempfile::tempdir().unwrap();
    let tok = root.path().join("tokenizer.json");
    word_tokenizer(&tok);
    fuzz("choice rows", 7, 150, |m, dir| {
        let (text, what) = mutated_rows(&rows, m, &domain);
        let data = dir.join("mc.jsonl");
        std::fs::write(&data, text).unwrap();
        let args = os(&[
            &"eval",
            &"--model",
            &tiny_model(),
            &"--tokenizer",
            &tok,
            &"--choice",
            &data,
        ]);
        (args, what)
    });
}

/// A tokenizer.json (`--tokenizer`) mutated as JSON: the word-level one, or one with added
/// tokens, a normalizer and a post-processor, so that those sections are reached too.
#[test]
fn fuzz_tokenizer_json() {
    let root = tempfile::tempdir().unwrap();
    let words = root.path().join("words.json");
    word_tokenizer(&words);
    let plain = read_json(&words);
    let mut rich = plain.clone();
    rich["added_tokens"] = json!([{"id": 7, "content": "<s>", "single_word": false,
        "lstrip": false, "rstrip": false, "normalized": false, "special": true}]);
    rich["normalizer"] = json!({"type": "Lowercase"});
    rich["post_processor"] = json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [7], "tokens": ["<s>"]}}});
    let data = root.path().join("text.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"w1 W2 w3 <s> w4 w5\"}\n{\"text\": \"w9 w8\"}\n",
    )
    .unwrap();
    let domain = [
        json!("WordLevel"),
        json!("BPE"),
        json!("WordPiece"),
        json!("Unigram"),
        json!({"type": "Whitespace"}),
        json!({"type": "ByteLevel"}),
        json!({"w1": 600}),
        json!({"w1": 1}),
        json!([["w1", 0.5]]),
        json!(["w1 w2"]),
        json!(-1),
        json!(4294967296u64),
        json!("[UNK]"),
    ];
    fuzz("tokenizer.json", 9, 150, |m, dir| {
        let (mut tok, what) = match m {
            Some(m) => {
                let mut t = if m.below(2) == 0 {
                    plain.clone()
                } else {
                    rich.clone()
                };
                let w = m.mutate_json(&mut t, &domain);
                (t, w)
            }
            None => (rich.clone(), "none".into()),
        };
        let p = dir.join("tokenizer.json");
        std::fs::write(&p, std::mem::take(&mut tok).to_string()).unwrap();
        let mut args = eval_args(&tiny_model(), &data);
        args.extend(os(&[&"--tokenizer", &p, &"--max-len", &"64"]));
        (args, what)
    });
}

/// A checkpoint (`train --resume`): its trainer_state.json, optimizer moments, adapter or
/// metrics mutated. The unmutated case is the checkpoint of a finished 2-step run moved
/// back to step 1 (its state and metrics), so that the resume runs a step on what it read.
#[test]
fn fuzz_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let train = |out: &Path, resume: bool| {
        let mut a = os(&[
            &"train",
            &"--model",
            &tiny_model(),
            &"--data",
            &batch(),
            &"--steps",
            &"2",
            &"--checkpoint-every",
            &"1",
            &"--out",
            &out,
        ]);
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let first = root.path().join("first");
    assert_eq!(run(&train(&first, false), root.path()), Ok(Outcome::Ok));
    let slot = std::fs::read_link(first.join("checkpoint")).unwrap();
    let saved = first.join(slot);
    let read = |f: &str| std::fs::read(saved.join(f)).unwrap();
    let mut state: Value = serde_json::from_slice(&read("trainer_state.json")).unwrap();
    state["step"] = json!(1);
    let metrics = String::from_utf8(read("metrics.jsonl")).unwrap();
    let first_line = metrics.lines().next().unwrap().to_string();
    let (optimizer, adapter) = (
        read("optimizer.safetensors"),
        read("adapter_model.safetensors"),
    );
    let config = read("adapter_config.json");
    let domain = [
        json!(0),
        json!(1),
        json!(2),
        json!(3),
        json!("cosine"),
        json!("linear"),
        json!(1e-3),
        json!(["q_proj"]),
        json!("xxh3-0000000000000000"),
    ];
    fuzz("checkpoint", 10, 150, |m, dir| {
        let (mut state, mut metrics) = (state.clone(), format!("{first_line}\n"));
        let (mut optimizer, mut adapter) = (optimizer.clone(), adapter.clone());
        let what = match m {
            None => "none".into(),
            Some(m) => match m.below(4) {
                0 => format!("trainer_state {}", m.mutate_json(&mut state, &domain)),
                1 => {
                    let (b, w) = mutated_safetensors(&optimizer, Some(m));
                    optimizer = b;
                    format!("optimizer {w}")
                }
                2 => {
                    let (b, w) = mutated_safetensors(&adapter, Some(m));
                    adapter = b;
                    format!("adapter {w}")
                }
                _ => {
                    let mut row: Value = serde_json::from_str(&first_line).unwrap();
                    let w = m.mutate_json(&mut row, &domain);
                    metrics = if m.below(4) == 0 {
                        String::new()
                    } else {
                        format!("{row}\n")
                    };
                    format!("metrics {w}")
                }
            },
        };
        let out = dir.join("out");
        let slot = out.join("checkpoint-a");
        std::fs::create_dir_all(&slot).unwrap();
        std::fs::write(slot.join("trainer_state.json"), state.to_string()).unwrap();
        std::fs::write(slot.join("metrics.jsonl"), metrics).unwrap();
        std::fs::write(slot.join("optimizer.safetensors"), optimizer).unwrap();
        std::fs::write(slot.join("adapter_model.safetensors"), adapter).unwrap();
        std::fs::write(slot.join("adapter_config.json"), &config).unwrap();
        std::os::unix::fs::symlink("checkpoint-a", out.join("checkpoint")).unwrap();
        (train(&out, true), what)
    });
}

/// `curvature --data self:N --self-prompts FILE`: the prompts file's lines mutated (bytes
/// flipped, lines emptied, repeated until they outgrow the model's positions, words the
/// vocabulary lacks or maps beyond the model's).
#[test]
fn fuzz_self_prompts() {
    let root = tempfile::tempdir().unwrap();
    let tok = root.path().join("tokenizer.json");
    word_tokenizer(&tok);
    let lines = ["w1 w2 w3", "w4", "w5 w6 w7 w8"];
    let pieces = [
        "",
        " ",
        "\t",
        "big",
        "w9",
        "\u{0}",
        "\u{1F600}",
        "\r",
        "x y z",
    ];
    fuzz("self prompts", 11, 150, |m, dir| {
        let mut text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        let what = match m {
            None => "none".into(),
            Some(m) => {
                let i = m.below(text.len());
                match m.below(4) {
                    0 => {
                        let mut b = text[i].clone().into_bytes();
                        let n = b.len();
                        let k = 1 + m.below(2);
                        let w = m.flip_bytes(&mut b, 0..n, k);
                        text[i] = String::from_utf8_lossy(&b).into_owned();
                        format!("line {i}: {w}")
                    }
                    1 => {
                        let times = *m.pick(&[0usize, 2, 40, 200]);
                        text[i] = vec![text[i].as_str(); times].join(" ");
                        format!("line {i} x {times}")
                    }
                    _ => {
                        let p = *m.pick(&pieces);
                        text[i] = format!("{} {p}", text[i]);
                        format!("line {i} + {p:?}")
                    }
                }
            }
        };
        let prompts = dir.join("prompts.txt");
        std::fs::write(&prompts, text.join("\n")).unwrap();
        let args = os(&[
            &"curvature",
            &"--model",
            &tiny_model(),
            &"--tokenizer",
            &tok,
            &"--data",
            &"self:3",
            &"--self-prompts",
            &prompts,
            &"--self-tokens",
            &"4",
            &"--scheme",
            &"diag",
            &"--rank",
            &"2",
            &"--targets",
            &"q_proj",
            &"--out",
            &dir.join("c.safetensors"),
        ]);
        (args, what)
    });
}

/// Quantized tensor data: the tiny model's matrices as Q8_0, then a block's f16 scale set
/// to an infinity, a NaN, the largest f16 or a subnormal, or one to three bytes of the
/// data flipped anywhere (scales and quants alike).
#[test]
fn fuzz_gguf_quantized_data() {
    let mut base = Gguf::from_tiny(&tiny_model());
    base.quantize_q8_0();
    let quantized: Vec<usize> = (0..base.tensors.len())
        .filter(|&i| base.tensors[i].ty == 8)
        .collect();
    assert!(!quantized.is_empty(), "no tensor was quantized");
    let (file, header_len) = base.bytes();
    fuzz("gguf quantized data", 12, 150, |m, dir| {
        let mut bytes = file.clone();
        let what = match m {
            None => "none".into(),
            Some(m) => {
                let i = *m.pick(&quantized);
                let t = &base.tensors[i];
                let at = base.data_at(i, header_len);
                if m.below(2) == 0 {
                    let block = m.below(t.data.len() / 34);
                    let scale: u16 = *m.pick(&[0x7C00, 0xFC00, 0x7E00, 0x7BFF, 0x0001]);
                    let p = at + block * 34;
                    bytes[p..p + 2].copy_from_slice(&scale.to_le_bytes());
                    format!("{} block {block} scale {scale:#06x}", t.name)
                } else {
                    let k = 1 + m.below(3);
                    let w = m.flip_bytes(&mut bytes, at..at + t.data.len(), k);
                    format!("{}: {w}", t.name)
                }
            }
        };
        let path = dir.join("q8.gguf");
        std::fs::write(&path, bytes).unwrap();
        (eval_args(&path, &batch()), what)
    });
}
