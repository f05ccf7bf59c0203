//! Model files that parse but mean something this crate does not compute (another
//! activation or RoPE, fewer layers than the weights, out-of-range numbers), sizes that
//! would be allocated before anything failed, token ids beyond the embedding, and rows
//! longer than the model's positions.

use serde_json::{Value, json};

use super::gguf::{Gguf, Tensor, Val};
use super::*;

/// A named edit of an input and the words its error must contain.
type Case<T> = (&'static str, Box<dyn Fn(&mut T)>, &'static str);

fn batch() -> PathBuf {
    fixture("tiny-gqa/batch.jsonl")
}

#[test]
fn config_json_meaning() {
    let cases: Vec<Case<Value>> = vec![
        (
            "gelu",
            Box::new(|c| c["hidden_act"] = json!("gelu")),
            "hidden_act",
        ),
        (
            "scaling without type",
            Box::new(|c| c["rope_scaling"] = json!({"factor": 2.0})),
            "rope_type",
        ),
        (
            "yarn",
            Box::new(|c| c["rope_parameters"]["rope_type"] = json!("yarn")),
            "yarn",
        ),
        (
            "llama3 low = high",
            Box::new(|c| {
                c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 1.0, "original_max_position_embeddings": 64})
            }),
            "high_freq_factor",
        ),
        (
            "eps string",
            Box::new(|c| c["rms_norm_eps"] = json!("x")),
            "rms_norm_eps",
        ),
        (
            "eps negative",
            Box::new(|c| c["rms_norm_eps"] = json!(-1e-5)),
            "rms_norm_eps",
        ),
        (
            "eps zero in f32",
            Box::new(|c| c["rms_norm_eps"] = json!(1e-50)),
            "rms_norm_eps",
        ),
        (
            "theta zero",
            Box::new(|c| c["rope_parameters"]["rope_theta"] = json!(0)),
            "rope_theta",
        ),
        (
            "theta negative",
            Box::new(|c| c["rope_theta"] = json!(-5)),
            "rope_theta",
        ),
        (
            "kv heads string",
            Box::new(|c| c["num_key_value_heads"] = json!("2")),
            "num_key_value_heads",
        ),
        (
            "tie string",
            Box::new(|c| c["tie_word_embeddings"] = json!("no")),
            "tie_word_embeddings",
        ),
        (
            "positions string",
            Box::new(|c| c["max_position_embeddings"] = json!("x")),
            "max_position",
        ),
        (
            "fewer layers",
            Box::new(|c| c["num_hidden_layers"] = json!(1)),
            "hold 2",
        ),
        (
            "more layers",
            Box::new(|c| c["num_hidden_layers"] = json!(3)),
            "hold 2",
        ),
        (
            "1e9 layers",
            Box::new(|c| c["num_hidden_layers"] = json!(1_000_000_000)),
            "num_hidden_layers",
        ),
        (
            "vocab 2^40",
            Box::new(|c| c["vocab_size"] = json!(1u64 << 40)),
            "vocab_size",
        ),
        (
            "eos beyond vocab",
            Box::new(|c| c["eos_token_id"] = json!(600)),
            "600",
        ),
    ];
    for (what, edit, needle) in cases {
        let d = tempfile::tempdir().unwrap();
        let m = model_with(d.path(), edit);
        let r = eval_on(&m, &batch());
        assert_clean_error(&r, "config.json", what);
        assert!(r.stderr.contains(needle), "{what}: {}", r.stderr);
    }
    // Null is HF's "use the default".
    let d = tempfile::tempdir().unwrap();
    let m = model_with(d.path(), |c| c["head_dim"] = Value::Null);
    assert_runs(&eval_on(&m, &batch()), "head_dim null");
}

/// The tiny model as GGUF, changed by `edit`, written to `dir/tiny.gguf`.
fn gguf_with(dir: &Path, edit: impl FnOnce(&mut Gguf)) -> PathBuf {
    let mut g = Gguf::from_tiny(&fixture("tiny-gqa/model"));
    edit(&mut g);
    let p = dir.join("tiny.gguf");
    std::fs::write(&p, g.bytes().0).unwrap();
    p
}

#[test]
fn gguf_layout_and_metadata() {
    let d = tempfile::tempdir().unwrap();
    assert_runs(
        &eval_on(&gguf_with(d.path(), |_| ()), &batch()),
        "tiny GGUF",
    );
    let third = |g: &Gguf| g.offsets()[2];
    let cases: Vec<Case<Gguf>> = vec![
        (
            "4e9 blocks",
            Box::new(|g| g.set("llama.block_count", Val::U32(4_000_000_000))),
            "num_hidden_layers",
        ),
        (
            "fewer blocks",
            Box::new(|g| g.set("llama.block_count", Val::U32(1))),
            "hold 2",
        ),
        (
            "dims overflow",
            Box::new(|g| g.tensors[0].dims = vec![1 << 32, 1 << 32]),
            "overflow",
        ),
        (
            // 2^63 f32 elements fit a usize, their 2^65 bytes do not (they wrapped to 0,
            // passed the layout check, and the allocation panicked: found by the fuzzer).
            "bytes overflow",
            Box::new(|g| {
                let t = g.tensors.iter_mut().find(|t| t.ty == 0).unwrap();
                t.dims = vec![1 << 63];
            }),
            "more bytes than can be addressed",
        ),
        (
            "offset overflow",
            Box::new(|g| g.tensors[0].offset = Some(u64::MAX - 63)),
            "truncated",
        ),
        (
            "misaligned",
            Box::new(move |g| g.tensors[3].offset = Some(third(g) + 4)),
            "not aligned",
        ),
        (
            "overlapping",
            Box::new(move |g| g.tensors[3].offset = Some(third(g))),
            "overlap",
        ),
        (
            "alignment 24",
            Box::new(|g| g.set("general.alignment", Val::U32(24))),
            "power of two",
        ),
        (
            "alignment 2^31",
            Box::new(|g| g.set("general.alignment", Val::U32(1 << 31))),
            "power of two",
        ),
        (
            "tensor twice",
            Box::new(|g| {
                let t: Tensor = g.tensors[1].clone();
                g.tensors.push(t);
            }),
            "twice",
        ),
        (
            "key twice",
            Box::new(|g| g.kv.push(g.kv[1].clone())),
            "twice",
        ),
        (
            "eps string",
            Box::new(|g| {
                g.set(
                    "llama.attention.layer_norm_rms_epsilon",
                    Val::Str("x".into()),
                )
            }),
            "layer_norm_rms_epsilon",
        ),
        (
            "eps negative",
            Box::new(|g| g.set("llama.attention.layer_norm_rms_epsilon", Val::F32(-1.0))),
            "rms_norm_eps",
        ),
        (
            "theta NaN",
            Box::new(|g| g.set("llama.rope.freq_base", Val::F32(f32::NAN))),
            "rope_theta",
        ),
        (
            "yarn",
            Box::new(|g| g.set("llama.rope.scaling.type", Val::Str("yarn".into()))),
            "yarn",
        ),
        (
            "experts",
            Box::new(|g| g.set("llama.expert_count", Val::U32(8))),
            "mixture-of-experts",
        ),
        (
            "partial rotary",
            Box::new(|g| {
                g.set("llama.attention.key_length", Val::U32(16));
                g.set("llama.rope.dimension_count", Val::U32(8));
            }),
            "dimension_count",
        ),
        (
            "eos beyond vocab",
            Box::new(|g| g.set("tokenizer.ggml.eos_token_id", Val::U32(5000))),
            "5000",
        ),
        (
            "eos beyond u32",
            Box::new(|g| g.set("tokenizer.ggml.eos_token_id", Val::U64(1 << 32))),
            "not a token id",
        ),
        (
            "nested arrays",
            Box::new(|g| {
                let mut v = Val::U32(1);
                for _ in 0..64 {
                    v = Val::Array(v.type_id(), vec![v]);
                }
                g.set("general.deep", v);
            }),
            "nested",
        ),
    ];
    for (what, edit, needle) in cases {
        let d = tempfile::tempdir().unwrap();
        let r = eval_on(&gguf_with(d.path(), edit), &batch());
        assert_clean_error(&r, "tiny.gguf", what);
        assert!(r.stderr.contains(needle), "{what}: {}", r.stderr);
    }
}

/// A word-level tokenizer.json whose word `big` has id 1000, beyond the tiny model's 512.
fn big_vocab_tokenizer(path: &Path) {
    let mut vocab = serde_json::Map::new();
    for (i, w) in ["[UNK]", "w1", "w2", "w3"].iter().enumerate() {
        vocab.insert(w.to_string(), json!(i));
    }
    vocab.insert("big".into(), json!(1000));
    let tok = json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}});
    std::fs::write(path, tok.to_string()).unwrap();
}

#[test]
fn token_ids_beyond_the_embedding() {
    let d = tempfile::tempdir().unwrap();
    let (model, tok) = (fixture("tiny-gqa/model"), d.path().join("big.json"));
    big_vocab_tokenizer(&tok);
    let text = d.path().join("text.jsonl");
    std::fs::write(&text, "{\"text\": \"w1 w2 big w3\"}\n").unwrap();
    let with_tok = |args: &[&dyn AsRef<OsStr>]| {
        let mut a = argv(args);
        a.extend(argv(&[&"--tokenizer", &tok]));
        run_args(&a)
    };
    let r = with_tok(&[&"eval", &"--model", &model, &"--data", &text]);
    assert_clean_error(&r, "big.json", "eval on text rows");
    assert!(
        r.stderr.contains("text.jsonl:1") && r.stderr.contains("1000"),
        "{}",
        r.stderr
    );
    let out = d.path().join("out");
    let r = with_tok(&[
        &"train", &"--model", &model, &"--data", &text, &"--steps", &"1", &"--out", &out,
    ]);
    assert_clean_error(&r, "big.json", "train on text rows");
    assert!(!out.exists(), "train wrote {}", out.display());
    let r = with_tok(&[
        &"generate",
        &"--model",
        &model,
        &"--prompt",
        &"w1 big",
        &"--max-new-tokens",
        &"2",
    ]);
    assert_clean_error(&r, "big.json", "generate");
    // The same tokenizer is fine as long as it produces ids the model has.
    std::fs::write(&text, "{\"text\": \"w1 w2 w3\"}\n").unwrap();
    assert_runs(
        &with_tok(&[&"eval", &"--model", &model, &"--data", &text]),
        "in-vocabulary text",
    );
}

#[test]
fn rows_and_prompts_beyond_the_positions() {
    let d = tempfile::tempdir().unwrap();
    let model = fixture("tiny-gqa/model");
    let long = d.path().join("long.jsonl");
    let ids: Vec<u32> = (1..300).collect();
    std::fs::write(&long, format!("{}\n", json!({"input_ids": ids}))).unwrap();
    let r = eval_on(&model, &long);
    assert_clean_error(&r, "long.jsonl:1", "300 tokens on 128 positions");
    assert!(r.stderr.contains("max_position_embeddings"), "{}", r.stderr);
    let cut = argv(&[
        &"eval",
        &"--model",
        &model,
        &"--data",
        &long,
        &"--max-len",
        &"128",
    ]);
    assert_runs(&run_args(&cut), "rows cut to the positions");
    let tok = d.path().join("tok.json");
    big_vocab_tokenizer(&tok);
    let r = run_args(&argv(&[
        &"generate",
        &"--model",
        &model,
        &"--tokenizer",
        &tok,
        &"--prompt",
        &"w1",
        &"--max-new-tokens",
        &"300",
    ]));
    assert_clean_error(
        &r,
        "max_position_embeddings",
        "generation past the positions",
    );
}

/// A NaN or an infinity in a model's or an adapter's weights is refused when the file is
/// read (exit 2, naming the file, the tensor and where), not met later as a non-finite loss
/// that named the data file instead (exit 3).
#[test]
fn non_finite_weights_name_their_file_and_tensor() {
    use lalora_engine::io::{TensorFile, write_safetensors};
    use std::collections::BTreeMap;
    let d = tempfile::tempdir().unwrap();
    // An HF model whose up projection of layer 1 holds a NaN at index 5.
    let m = tiny_copy(&d.path().join("hf"));
    let weights = m.join("model.safetensors");
    let mut t = TensorFile::read(&weights).unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    t.tensors.get_mut(name).unwrap().1[5] = f32::NAN;
    let all: Vec<(String, Vec<usize>, &[f32])> = (t.tensors.iter())
        .map(|(n, (s, v))| (n.clone(), s.clone(), v.as_slice()))
        .collect();
    write_safetensors(&weights, &all, BTreeMap::new()).unwrap();
    assert_clean_error(
        &eval_on(&m, &batch()),
        &format!(
            "{}: tensor `{name}` holds NaN at index 5",
            weights.display()
        ),
        "NaN in safetensors weights",
    );
    // The same model as GGUF, an infinity in its first attention norm.
    let g = gguf_with(d.path(), |g| {
        let t = g
            .tensors
            .iter_mut()
            .find(|t| t.name == "blk.0.attn_norm.weight");
        t.unwrap().data[8..12].copy_from_slice(&f32::INFINITY.to_le_bytes());
    });
    assert_clean_error(
        &eval_on(&g, &batch()),
        &format!(
            "{}: tensor `blk.0.attn_norm.weight` holds inf at index 2",
            g.display()
        ),
        "infinity in GGUF weights",
    );
    // An adapter with a NaN in one lora_B.
    let a = d.path().join("adapter");
    std::fs::create_dir(&a).unwrap();
    let src = fixture("tiny-gqa/adapter");
    std::fs::copy(
        src.join("adapter_config.json"),
        a.join("adapter_config.json"),
    )
    .unwrap();
    let mut t = TensorFile::read(&src.join("adapter_model.safetensors")).unwrap();
    let (name, (_, b)) = t
        .tensors
        .iter_mut()
        .find(|(n, _)| n.contains("lora_B"))
        .unwrap();
    b[0] = f32::NAN;
    let name = name.clone();
    let all: Vec<(String, Vec<usize>, &[f32])> = (t.tensors.iter())
        .map(|(n, (s, v))| (n.clone(), s.clone(), v.as_slice()))
        .collect();
    let file = a.join("adapter_model.safetensors");
    write_safetensors(&file, &all, BTreeMap::new()).unwrap();
    for cmd in ["eval", "train"] {
        let mut args = argv(&[
            &cmd,
            &"--model",
            &fixture("tiny-gqa/model"),
            &"--adapter",
            &a,
            &"--data",
            &batch(),
        ]);
        if cmd == "train" {
            args.extend(argv(&[&"--steps", &"1", &"--out", &d.path().join("out")]));
        }
        assert_clean_error(
            &run_args(&args),
            &format!("{}: tensor `{name}` holds NaN at index 0", file.display()),
            &format!("NaN in an adapter ({cmd})"),
        );
    }
    assert!(
        !d.path().join("out").exists(),
        "train wrote its output directory"
    );
}
