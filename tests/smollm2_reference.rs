//! SmolLM2-135M-Instruct (Q4_1 GGUF from the pinned wheel) against HF transformers' GGUF
//! reader: token ids, mean NLL per text (within 2e-3, through `eval --json`) and the
//! top-5 next tokens.

mod common;

use common::*;
use lalora_engine::backend::cpu::CpuBackend;
use lalora_engine::model::{self, Llama};
use serde_json::Value;

fn reference() -> Value {
    let text = std::fs::read_to_string(fixture("smollm2-reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn gguf_tokenizer_matches_hf_ids() {
    let m = model::load(&smollm2(), None).unwrap();
    let tok = m.tokenizer().unwrap();
    for (name, t) in reference()["texts"].as_object().unwrap() {
        let ids = tok.encode(t["text"].as_str().unwrap()).unwrap();
        assert_eq!(ids, ids_of(&t["ids"]), "token ids of `{name}`");
        assert_eq!(
            tok.decode(&ids).unwrap(),
            t["text"].as_str().unwrap(),
            "round trip of `{name}`"
        );
    }
}

#[test]
fn eval_json_mean_nll_matches_hf() {
    let dir = tempfile::tempdir().unwrap();
    let refs = reference();
    let texts = refs["texts"].as_object().unwrap();
    let mut paths = Vec::new();
    for (name, t) in texts {
        let p = dir.path().join(format!("{name}.jsonl"));
        std::fs::write(&p, serde_json::json!({"text": t["text"]}).to_string()).unwrap();
        paths.push(p);
    }
    let out = bin()
        .args(["eval", "--model"])
        .arg(smollm2())
        .arg("--data")
        .args(&paths)
        .args(["--json", "--threads", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value =
        serde_json::from_slice(&out.stdout).expect("stdout is exactly one JSON document");
    let sets = v["datasets"].as_array().unwrap();
    assert_eq!(sets.len(), texts.len());
    for ((name, t), s) in texts.iter().zip(sets) {
        let want = t["mean_nll"].as_f64().unwrap();
        let got = s["mean_nll"].as_f64().unwrap();
        assert_eq!(
            s["n_tokens"].as_u64().unwrap() as usize,
            t["ids"].as_array().unwrap().len() - 1
        );
        assert_eq!(s["n_sequences"].as_u64(), Some(1));
        assert!(
            (got - want).abs() < 2e-3,
            "{name}: mean NLL {got} vs HF {want}"
        );
        assert!((s["perplexity"].as_f64().unwrap() - got.exp()).abs() < 1e-9);
    }
}

#[test]
fn next_token_top5_matches_hf() {
    let be = CpuBackend::new(2);
    let m = model::load(&smollm2(), None).unwrap();
    let model = Llama::new(&be, m.cfg, m.weights).unwrap();
    for (name, t) in reference()["texts"].as_object().unwrap() {
        let ids = ids_of(&t["ids"]);
        let mut cache = model.new_cache(&be, ids.len()).unwrap();
        let logits = model.forward_cached(&be, None, &ids, &mut cache).unwrap();
        let last = &logits[(ids.len() - 1) * model.cfg.vocab_size..];
        let mut order: Vec<usize> = (0..last.len()).collect();
        order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
        let want: Vec<usize> = t["last_logits_top5"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(&order[..5], &want[..], "top-5 after `{name}`");
        for (i, v) in t["last_logits_top5_values"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let v = v.as_f64().unwrap() as f32;
            assert!(
                (last[want[i]] - v).abs() < 1e-3 * v.abs().max(1.0),
                "{name}: logit {} vs {v}",
                last[want[i]]
            );
        }
    }
}
