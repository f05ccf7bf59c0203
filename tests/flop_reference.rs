//! The cost report's FLOPs (`src/cost.rs`, `Flops`) against PyTorch's FlopCounterMode on
//! HF transformers' Llama with PEFT LoRA (`scripts/check-flops.py`, fixture
//! `flop-reference.json`): an evaluation batch and a training micro-batch of the tiny GQA
//! fixture, with the fixture's adapter (r 4, all seven projections) and a fresh one (r 8,
//! q_proj and v_proj), unpadded and padded. The reference runs the work the engine's
//! definitions count (the head over the labelled rows, the backward to the first layer's
//! input); its attention count is dense over T x T pairs, where the engine counts the
//! causal T (T + 1) / 2, so that part is scaled by (T + 1) / (2 T). Everything else must
//! be equal to the FLOP.

mod common;

use common::*;
use lalora_engine::cost::Flops;
use lalora_engine::data::{Batch, Example};
use lalora_engine::model::{HostLora, LoraConfig, Proj};
use serde_json::Value;

fn count(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key}: {v} has no count"))
}

/// The reference's products with its dense attention count brought to the causal pairs.
fn causal(v: &Value, t: u64) -> u64 {
    let dense = count(v, "attention");
    assert_eq!(
        dense * (t + 1) % (2 * t),
        0,
        "{dense} pairs do not scale evenly"
    );
    count(v, "linear") + dense * (t + 1) / (2 * t)
}

#[test]
fn cost_flops_equal_pytorch_flop_counter() {
    let text = std::fs::read_to_string(fixture("flop-reference.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    let t = tiny();
    let cfg = &t.loaded.cfg;
    let fresh = HostLora::init(
        cfg,
        LoraConfig {
            r: 8,
            alpha: 16.0,
            use_rslora: false,
            targets: vec![Proj::Q, Proj::V],
        },
        0,
    );
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let lora = match case["adapter"].as_str().unwrap() {
            "fixture" => &t.adapter,
            "fresh-r8-qv" => &fresh,
            other => panic!("unknown adapter {other}"),
        };
        let examples: Vec<Example> = match case["cut"].as_array() {
            None => t.examples.clone(),
            Some(cuts) => t
                .examples
                .iter()
                .zip(cuts)
                .map(|(e, n)| {
                    let n = n.as_u64().unwrap() as usize;
                    Example {
                        ids: e.ids[..n].to_vec(),
                        labels: e.labels[..n].to_vec(),
                    }
                })
                .collect(),
        };
        let batch = Batch::new(&examples.iter().collect::<Vec<_>>());
        let what = format!("{} cut {}", case["adapter"], case["cut"]);
        let shape: Vec<u64> = serde_json::from_value(case["batch"].clone()).unwrap();
        assert_eq!(shape, [batch.batch as u64, batch.seq_len as u64], "{what}");
        assert_eq!(count(case, "n_targets"), batch.n_targets as u64, "{what}");
        let flops = Flops::new(cfg, lora);
        let t = batch.seq_len as u64;
        assert_eq!(
            flops.eval_batch(&batch),
            causal(&case["eval"], t),
            "{what}: eval"
        );
        assert_eq!(
            flops.train_batch(&batch),
            causal(&case["train"], t),
            "{what}: train"
        );
    }
}
