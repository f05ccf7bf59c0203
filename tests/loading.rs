//! Model, adapter and data loading: GGML dequantisation against gguf-py, sharded
//! safetensors, PEFT adapter round trip, config variants, padding invariance.

mod common;

use common::*;
use lalora_engine::backend::CeTargets;
use lalora_engine::data::{Batch, Example};
use lalora_engine::io::write_safetensors;
use lalora_engine::model::config::LlamaConfig;
use lalora_engine::model::quant::{GgmlType, dequantize};
use lalora_engine::model::{self, HostLora, Llama};

#[test]
fn ggml_dequantisation_matches_gguf_py() {
    let bytes = std::fs::read(fixture("quant/blocks.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, ty) in [
        ("Q8_0", GgmlType::Q8_0),
        ("Q4_0", GgmlType::Q4_0),
        ("Q4_1", GgmlType::Q4_1),
        ("Q4_K", GgmlType::Q4K),
        ("Q6_K", GgmlType::Q6K),
        ("F16", GgmlType::F16),
        ("BF16", GgmlType::BF16),
    ] {
        let raw = st.tensor(&format!("{name}.raw")).unwrap();
        let want: Vec<f32> = st
            .tensor(&format!("{name}.f32"))
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(
            ty.byte_size(want.len()),
            Ok(raw.data().len()),
            "{name} block size"
        );
        let mut got = vec![0f32; want.len()];
        dequantize(ty, raw.data(), &mut got);
        let err = rel_err(&got, &want);
        assert!(err < 1e-6, "{name}: relative error {err:e}");
    }
}

fn logits(model_dir: &std::path::Path, t: &Tiny) -> Vec<f32> {
    let be = cpu();
    let m = model::load(model_dir, None).unwrap();
    let model = Llama::new(&be, m.cfg, m.weights).unwrap();
    let acts = model
        .forward(&be, Some(&t.adapter), &whole_batch(&t.examples), false)
        .unwrap();
    model.logits(&be, &acts).unwrap()
}

#[test]
fn sharded_safetensors_equal_single_file() {
    let t = tiny();
    let d = tempfile::tempdir().unwrap();
    let src = model::weights::SafetensorsSource::open_hf_dir(&fixture("tiny-gqa/model")).unwrap();
    let mut names: Vec<String> = src.names().map(str::to_string).collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (i, part) in [a, b].into_iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let tensors: Vec<_> = part
            .iter()
            .map(|n| (n.clone(), src.get_any(n).unwrap()))
            .collect();
        let refs: Vec<_> = tensors
            .iter()
            .map(|(n, (d, s))| (n.clone(), s.clone(), d.as_slice()))
            .collect();
        write_safetensors(&d.path().join(&file), &refs, Default::default()).unwrap();
        for n in part {
            map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map.clone()});
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    std::fs::copy(
        fixture("tiny-gqa/model/config.json"),
        d.path().join("config.json"),
    )
    .unwrap();
    assert_eq!(logits(d.path(), &t), logits(&fixture("tiny-gqa/model"), &t));
    // The same index in a subdirectory, its second shard named `../` where the file is:
    // refused, as a shard is a file of the model's directory (readable as the file is).
    let inner = d.path().join("inner");
    std::fs::create_dir(&inner).unwrap();
    for f in ["config.json", "model-00001-of-00002.safetensors"] {
        std::fs::copy(d.path().join(f), inner.join(f)).unwrap();
    }
    let second = "model-00002-of-00002.safetensors";
    let outside: serde_json::Map<String, serde_json::Value> = map
        .into_iter()
        .map(|(k, v)| match v.as_str() == Some(second) {
            true => (k, format!("../{second}").into()),
            false => (k, v),
        })
        .collect();
    let index = serde_json::json!({"metadata": {}, "weight_map": outside});
    std::fs::write(
        inner.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let err = model::weights::SafetensorsSource::open_hf_dir(&inner)
        .err()
        .expect("a shard outside the directory is refused")
        .to_string();
    assert!(
        err.contains(&format!(
            "shard `../{second}` is not a file name inside the model directory"
        )),
        "{err}"
    );
}

#[test]
fn peft_adapter_round_trips_exactly() {
    let t = tiny();
    let d = tempfile::tempdir().unwrap();
    t.adapter.save(d.path(), "tiny").unwrap();
    let back = HostLora::load(d.path(), &t.loaded.cfg).unwrap();
    assert_eq!(back.cfg, t.adapter.cfg);
    let (x, y) = (back.named_tensors(), t.adapter.named_tensors());
    assert_eq!(x.len(), y.len());
    for ((n1, s1, a), (n2, s2, b)) in x.into_iter().zip(y) {
        assert_eq!((n1, s1, a), (n2, s2, b));
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
}

fn config_from(json: serde_json::Value) -> LlamaConfig {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("config.json");
    std::fs::write(&p, json.to_string()).unwrap();
    LlamaConfig::from_hf_json(&p).unwrap()
}

#[test]
fn config_variants() {
    let base = serde_json::json!({
        "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": true
    });
    let mut top = base.clone();
    top["rope_theta"] = 5e5.into();
    let mut nested = base.clone();
    nested["rope_parameters"] = serde_json::json!({"rope_theta": 5e5, "rope_type": "default"});
    assert_eq!(config_from(top.clone()).rope_theta, 5e5);
    assert_eq!(config_from(nested).rope_theta, 5e5);
    assert_eq!(config_from(base.clone()).head_dim, 16);
    let mut hd = base.clone();
    hd["head_dim"] = 32.into();
    assert_eq!(config_from(hd).q_dim(), 128);
    assert!(config_from(base.clone()).tie_word_embeddings);

    // Llama-3.1 scaling (factor 8, low 1, high 4, original 8192) as HF computes it: the
    // highest frequency is kept, the lowest divided by 8, the middle ones blended.
    let mut l3 = top;
    l3["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    let c = config_from(l3);
    let plain: Vec<f64> = (0..8)
        .map(|i| 1.0 / 5e5f64.powf(2.0 * i as f64 / 16.0))
        .collect();
    let scaled = c.rope_inv_freq();
    assert_eq!(scaled[0], plain[0]);
    assert!((scaled[7] - plain[7] / 8.0).abs() < 1e-15);
    for (i, (s, p)) in scaled.iter().zip(&plain).enumerate() {
        let wavelen = 2.0 * std::f64::consts::PI / p;
        if (2048.0..=8192.0).contains(&wavelen) {
            let smooth = (8192.0 / wavelen - 1.0) / 3.0;
            assert!(
                (s - ((1.0 - smooth) * p / 8.0 + smooth * p)).abs() < 1e-15,
                "freq {i}"
            );
        }
    }
}

#[test]
fn padding_does_not_change_per_sequence_losses() {
    let t = tiny();
    let be = cpu();
    let model = tiny_model(&be);
    // Unequal lengths force right padding inside the batch.
    let ex: Vec<Example> = t
        .examples
        .iter()
        .enumerate()
        .map(|(i, e)| Example {
            ids: e.ids[..24 - 3 * i].to_vec(),
            labels: e.labels[..24 - 3 * i].to_vec(),
        })
        .collect();
    let seq_loss = |b: &Batch| -> Vec<f64> {
        let acts = model.forward(&be, Some(&t.adapter), b, false).unwrap();
        let l = model
            .classify(&be, &acts, CeTargets::Labels(&b.targets), None)
            .unwrap()
            .losses;
        l.chunks(b.seq_len)
            .map(|c| c.iter().map(|&x| x as f64).sum())
            .collect()
    };
    let batched = seq_loss(&Batch::new(&ex.iter().collect::<Vec<_>>()));
    for (i, e) in ex.iter().enumerate() {
        let alone = seq_loss(&Batch::new(&[e]))[0];
        assert!(
            (batched[i] - alone).abs() < 1e-4 * alone.abs(),
            "sequence {i}: {} vs {alone}",
            batched[i]
        );
    }
}
