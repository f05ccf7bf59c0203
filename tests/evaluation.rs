//! Evaluation paths: the KV-cache forward reproduces the full forward at every position;
//! cached greedy decoding equals naive argmax decoding; multiple choice and exact match
//! bookkeeping on the real model.

mod common;

use common::*;
use lalora_engine::data::{Batch, Example};
use lalora_engine::eval::choice::{ChoiceRow, choice_logliks, encode_pair, score};
use lalora_engine::eval::generate::{Sampling, generate};
use lalora_engine::model::{self, Llama};

#[test]
fn kv_cache_matches_full_forward() {
    let t = tiny();
    let be = cpu();
    let model = tiny_model(&be);
    let ids = t.examples[2].ids.clone();
    let acts = model
        .forward(
            &be,
            Some(&t.adapter),
            &Batch::new(&[&Example {
                ids: ids.clone(),
                labels: vec![-100; ids.len()],
            }]),
            false,
        )
        .unwrap();
    let full = model.logits(&be, &acts).unwrap();
    let v = model.cfg.vocab_size;
    let mut cache = model.new_cache(&be, ids.len()).unwrap();
    let mut got = model
        .forward_cached(&be, Some(&t.adapter), &ids[..10], &mut cache)
        .unwrap();
    for &id in &ids[10..] {
        got.extend(
            model
                .forward_cached(&be, Some(&t.adapter), &[id], &mut cache)
                .unwrap(),
        );
    }
    assert_eq!(cache.len, ids.len());
    assert!(rel_err(&got, &full) < 1e-5, "{}", rel_err(&got, &full));
    assert_eq!(got.len(), ids.len() * v);
}

#[test]
fn cached_greedy_decoding_equals_naive_argmax() {
    let t = tiny();
    let be = cpu();
    let model = tiny_model(&be);
    let prompt = t.examples[0].ids[..6].to_vec();
    let s = Sampling {
        max_new_tokens: 12,
        ..Sampling::default()
    };
    let fast = generate(&be, &model, Some(&t.adapter), &prompt, &s, &[]).unwrap();
    let mut seq = prompt.clone();
    for _ in 0..12 {
        let b = Batch::new(&[&Example {
            ids: seq.clone(),
            labels: vec![-100; seq.len()],
        }]);
        let acts = model.forward(&be, Some(&t.adapter), &b, false).unwrap();
        let logits = model.logits(&be, &acts).unwrap();
        let last = &logits[(seq.len() - 1) * 512..];
        let next = last
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32;
        seq.push(next);
    }
    assert_eq!(fast, seq[6..].to_vec());
    // Sampling is seeded: the same seed gives the same continuation.
    let hot = Sampling {
        temperature: 1.0,
        top_p: 0.9,
        max_new_tokens: 12,
        seed: 3,
    };
    let a = generate(&be, &model, Some(&t.adapter), &prompt, &hot, &[]).unwrap();
    assert_eq!(
        a,
        generate(&be, &model, Some(&t.adapter), &prompt, &hot, &[]).unwrap()
    );
}

#[test]
fn multiple_choice_on_smollm2() {
    let be = cpu();
    let m = model::load(&smollm2(), None).unwrap();
    let tok_model = model::load(&smollm2(), None).unwrap();
    let tok = tok_model.tokenizer().unwrap();
    let model = Llama::new(&be, m.cfg, m.weights).unwrap();
    let row = |line, context: &str, choices: [&str; 2], answer| ChoiceRow {
        context: context.into(),
        choices: choices.map(String::from).to_vec(),
        answer,
        line,
    };
    let rows = vec![
        row(1, "The capital of France is", ["banana", "Paris"], 1),
        row(2, "Two plus two equals", ["four", "purple"], 0),
        row(
            3,
            "Water freezes at zero degrees",
            ["Celsius", "sideways"],
            0,
        ),
    ];
    let here = std::path::Path::new("in-memory");
    let ll = choice_logliks(&be, &model, None, tok, here, &rows, 4, || {}).unwrap();
    assert_eq!(ll.len(), 6);
    assert!(ll.iter().all(|l| *l < 0.0));
    let r = score(&rows, &ll);
    assert_eq!(
        (r.acc().value, r.acc_norm().value),
        (1.0, 1.0),
        "log-likelihoods {ll:?}"
    );
    assert_eq!(r.pred, [1, 0, 0]);
    // Scoring is exactly the argmax of the sums (acc) and of the per-character sums (acc_norm).
    let flipped: Vec<f64> = ll.chunks(2).flat_map(|c| [c[1], c[0]]).collect();
    assert_eq!(score(&rows, &flipped).acc().value, 0.0);
    // The batch order (sorted by length inside) does not change any sum: one at a time gives
    // the same log-likelihoods.
    for (i, r) in rows.iter().enumerate() {
        let one = choice_logliks(
            &be,
            &model,
            None,
            tok,
            here,
            std::slice::from_ref(r),
            1,
            || {},
        )
        .unwrap();
        for (a, b) in one.iter().zip(&ll[2 * i..2 * i + 2]) {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "{a} vs {b}");
        }
    }
}

/// A trailing space of the prompt moves onto the continuation (lm-eval's `_encode_pair`):
/// the context's tokens are those of the stripped prompt, and the continuation's are the
/// joint encoding's rest, so "Answer: " + " x" scores the same tokens as "Answer:" + "  x".
#[test]
fn encode_pair_moves_trailing_space() {
    let m = model::load(&smollm2(), None).unwrap();
    let tok = m.tokenizer().unwrap();
    let (ids, n) = encode_pair(tok, "Question: where?\nAnswer: ", "in a box").unwrap();
    let ctx = tok.encode("Question: where?\nAnswer:").unwrap();
    let whole = tok.encode("Question: where?\nAnswer:  in a box").unwrap();
    assert_eq!(n, ctx.len());
    assert_eq!(&ids[..n], &ctx[..]);
    assert_eq!(&ids[n..], &whole[ctx.len()..]);
}
