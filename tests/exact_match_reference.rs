//! GSM8K exact match against lm-eval-harness's own gsm8k filters and metric
//! (scripts/check-exact-match.py, run on HF transformers' greedy generations of the
//! default model, float32): `tests/fixtures/exact-match-reference.json` holds hand-written
//! texts with lm-eval's answers and outcomes, and for 8 ASDiv and 8 GSM8K held-out problems
//! HF's generated text (cut at the task's `until`), its answer and its outcome.

mod common;

use common::*;
use lalora_engine::eval::exact_match::{
    cut_at_until, exact_match, extract_answer, read_qa, reference_answer,
};
use lalora_engine::eval::generate::Sampling;
use lalora_engine::model::{self, Llama};
use serde_json::Value;

fn reference() -> Value {
    let text = std::fs::read_to_string(fixture("exact-match-reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn str_of(v: &Value) -> Option<&str> {
    v.as_str()
}

/// Texts chosen for lm-eval's corners: the first `#### ` (strict-match), else the last
/// number-like run (flexible-extract, which takes `...` for one), commas, `$` and a final
/// `.` removed, no trailing-zero rule, and the cut at `Question:`.
#[test]
fn answers_and_outcomes_match_lm_evals_filters() {
    let refs = reference();
    let texts = refs["texts"].as_array().unwrap();
    assert!(texts.len() >= 10);
    for t in texts {
        let text = t["text"].as_str().unwrap();
        let answer = t["answer"].as_str().unwrap();
        let got = extract_answer(cut_at_until(text));
        let want = reference_answer(answer);
        assert_eq!(got.as_deref(), str_of(&t["chosen"]), "answer of {text:?}");
        assert_eq!(
            want.as_deref(),
            str_of(&t["target"]),
            "target of {answer:?}"
        );
        let right = got.is_some() && got == want;
        assert_eq!(right, t["score"].as_bool().unwrap(), "outcome of {text:?}");
    }
}

/// The engine's greedy answers on the default model, scored by its exact match, against
/// HF's generations scored by lm-eval: the same text on every question (the fixture's
/// smallest gap between the top two logits on a step is 3.4e-3, some 30 times the float32
/// difference between the two sides' logits, about 1e-5 of their magnitude, so no greedy
/// choice may differ), hence the same answers and outcomes.
#[test]
fn greedy_answers_match_hf_and_lm_eval() {
    let refs = reference();
    let qs = refs["questions"].as_array().unwrap();
    let all = read_qa(&assets().join("data").join("target-test.jsonl")).unwrap();
    let rows: Vec<(String, String)> = qs
        .iter()
        .map(|q| {
            let row = all[q["row"].as_u64().unwrap() as usize].clone();
            assert_eq!(
                row.0,
                q["question"].as_str().unwrap(),
                "the fixture's question"
            );
            row
        })
        .collect();
    let be = cpu();
    let m = model::load(&smollm2(), None).unwrap();
    let tok_model = model::load(&smollm2(), None).unwrap();
    let tok = tok_model.tokenizer().unwrap();
    let model = Llama::new(&be, m.cfg, m.weights).unwrap();
    let s = Sampling {
        max_new_tokens: refs["max_new_tokens"].as_u64().unwrap() as usize,
        ..Sampling::default()
    };
    let em = exact_match(&be, &model, None, tok, &rows, &s, || ()).unwrap();
    assert_eq!(em.n, qs.len());
    for (i, q) in qs.iter().enumerate() {
        let row = q["row"].as_u64().unwrap();
        assert_eq!(
            em.texts[i],
            q["generated"].as_str().unwrap(),
            "row {row}: text"
        );
        assert_eq!(
            em.answers[i].as_deref(),
            str_of(&q["chosen"]),
            "row {row}: answer"
        );
        assert_eq!(
            em.outcomes[i],
            q["score"].as_bool().unwrap(),
            "row {row}: outcome"
        );
    }
    let correct = qs.iter().filter(|q| q["score"].as_bool().unwrap()).count();
    assert_eq!(em.correct, correct);
}
