//! Evaluation paths: the KV-cache forward reproduces the full forward at every position;
//! cached greedy decoding equals naive argmax decoding; multiple choice and exact match
//! bookkeeping on the real model.

mod common;

use common::*;
use lalora_engine::data::{Batch, Example};
use lalora_engine::eval::choice::{ChoiceRow, choice_logliks, encode_pair, score};
use lalora_engine::eval::generate::{Sampling, generate, generate_batch};
use lalora_engine::eval::perplexity::sequence_losses;
use lalora_engine::model::{self, CachedSeq, Llama};

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

/// Several sequences in one cached forward, at different cache positions (one still in
/// its prompt, others decoding), give each sequence's next-token logits as running it
/// alone does.
#[test]
fn batched_cached_forward_matches_one_sequence_at_a_time() {
    let t = tiny();
    let be = cpu();
    let model = tiny_model(&be);
    let v = model.cfg.vocab_size;
    let seqs: Vec<Vec<u32>> = (0..3).map(|i| t.examples[i].ids[..12].to_vec()).collect();
    // Alone: prompt prefixes of 5, 9 and 12 tokens, then the rest one token at a time.
    let cut = [5, 9, 12];
    let mut want = Vec::new();
    for (s, &c) in seqs.iter().zip(&cut) {
        let mut cache = model.new_cache(&be, 12).unwrap();
        let mut logits = model
            .forward_cached(&be, Some(&t.adapter), &s[..c], &mut cache)
            .unwrap();
        for &id in &s[c..] {
            logits = model
                .forward_cached(&be, Some(&t.adapter), &[id], &mut cache)
                .unwrap();
        }
        want.push(logits[logits.len() - v..].to_vec());
    }
    // Together: the same prefixes in one call, then one token per unfinished sequence.
    let mut caches: Vec<_> = (0..3).map(|_| model.new_cache(&be, 12).unwrap()).collect();
    let mut got = vec![Vec::new(); 3];
    let mut fed = cut.to_vec();
    let mut first = true;
    loop {
        let rows: Vec<usize> = (0..3).filter(|&i| first || fed[i] < 12).collect();
        if rows.is_empty() {
            break;
        }
        let mut batch: Vec<CachedSeq<'_, _>> = Vec::new();
        for (i, cache) in caches.iter_mut().enumerate() {
            if rows.contains(&i) {
                let ids = if first {
                    &seqs[i][..cut[i]]
                } else {
                    &seqs[i][fed[i]..fed[i] + 1]
                };
                batch.push(CachedSeq { ids, cache });
            }
        }
        // The CPU backend's buffers are host vectors.
        let logits = model
            .next_logits(&be, Some(&t.adapter), &mut batch)
            .unwrap();
        drop(batch);
        for (j, &i) in rows.iter().enumerate() {
            got[i] = logits[j * v..(j + 1) * v].to_vec();
            if !first {
                fed[i] += 1;
            }
        }
        first = false;
    }
    for i in 0..3 {
        assert_eq!(caches[i].len, 12);
        let e = rel_err(&got[i], &want[i]);
        assert!(e < 1e-5, "sequence {i}: {e}");
    }
}

/// Four prompts of the tiny fixture, of 4, 6, 8 and 10 tokens.
fn four_prompts(t: &Tiny) -> Vec<Vec<u32>> {
    (0..4)
        .map(|i| t.examples[i].ids[..4 + 2 * i].to_vec())
        .collect()
}

/// Generating for several prompts together gives each prompt the continuation it gets
/// alone, greedy and sampled, with rows stopping at different steps.
#[test]
fn batched_generation_equals_one_prompt_at_a_time() {
    let t = tiny();
    let be = cpu();
    let model = tiny_model(&be);
    let prompts = four_prompts(&t);
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    for temperature in [0.0, 1.0] {
        let s = Sampling {
            temperature,
            top_p: 0.9,
            max_new_tokens: 10,
            seed: 0,
        };
        let seeds = [5u64, 6, 7, 8];
        // A stop token that ends the first prompt's continuation at its third token.
        let first = Sampling {
            seed: seeds[0],
            ..s
        };
        let free = generate(&be, &model, Some(&t.adapter), &prompts[0], &first, &[]).unwrap();
        let stop = [free[2]];
        let mut finished = Vec::new();
        let together = generate_batch(
            &be,
            &model,
            Some(&t.adapter),
            &refs,
            &s,
            &seeds,
            &stop,
            |_| false,
            |i| finished.push(i),
        )
        .unwrap();
        let mut lengths = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let alone = Sampling {
                seed: seeds[i],
                ..s
            };
            let want = generate(&be, &model, Some(&t.adapter), p, &alone, &stop).unwrap();
            assert_eq!(together[i], want, "T {temperature}, prompt {i}");
            lengths.push(want.len());
        }
        finished.sort();
        assert_eq!(finished, vec![0, 1, 2, 3], "each row finishes once");
        assert!(
            lengths.iter().any(|&n| n < 10) && lengths.iter().any(|&n| n != lengths[0]),
            "T {temperature}: rows should stop at different steps: {lengths:?}"
        );
    }
}

/// `ended` ends a row once it holds for what the row has generated (the token that made it
/// hold is kept, unlike a stop token): each row is its free continuation cut after the first
/// occurrence of the token the condition looks for, and rows without it run to the limit.
#[test]
fn a_row_ends_once_its_output_says_so() {
    let t = tiny();
    let be = cpu();
    let model = tiny_model(&be);
    let prompts = four_prompts(&t);
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let s = Sampling {
        temperature: 1.0,
        top_p: 0.9,
        max_new_tokens: 10,
        seed: 0,
    };
    let seeds = [5u64, 6, 7, 8];
    let free: Vec<Vec<u32>> = prompts
        .iter()
        .zip(seeds)
        .map(|(p, seed)| {
            let alone = Sampling { seed, ..s };
            generate(&be, &model, Some(&t.adapter), p, &alone, &[]).unwrap()
        })
        .collect();
    let marker = free[0][1];
    let ended = |out: &[u32]| out.last() == Some(&marker);
    let cut = generate_batch(
        &be,
        &model,
        Some(&t.adapter),
        &refs,
        &s,
        &seeds,
        &[],
        ended,
        |_| (),
    )
    .unwrap();
    for (i, (got, all)) in cut.iter().zip(&free).enumerate() {
        let end = all
            .iter()
            .position(|&x| x == marker)
            .map_or(all.len(), |p| p + 1);
        assert_eq!(got[..], all[..end], "prompt {i}");
    }
    assert_eq!(cut[0].len(), 2, "the first row ends at its second token");
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
    let ll = choice_logliks(&be, &model, None, tok, here, &rows, |_| {}).unwrap();
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
    // The shared-context route gives the sums of running every (context, option) pair in
    // full, as lm-eval does; a one-token context (nothing to prefill) included.
    let mut with_short = rows.clone();
    with_short.push(row(4, "Yes", ["no", "yes indeed"], 0));
    let shared = choice_logliks(&be, &model, None, tok, here, &with_short, |_| {}).unwrap();
    let mut pairs = Vec::new();
    for r in &with_short {
        for c in &r.choices {
            let (ids, n_ctx) = encode_pair(tok, &r.context, c).unwrap();
            let labels = (0..ids.len())
                .map(|i| if i < n_ctx { -100 } else { ids[i] as i32 })
                .collect();
            pairs.push(Example { ids, labels });
        }
    }
    assert_eq!(tok.encode("Yes").unwrap().len(), 1);
    let full = sequence_losses(&be, &model, None, &pairs, 1, || {}).unwrap();
    // The two routes compute the same sums in other orders: the shared route attends
    // through a KV cache and projects a few continuation rows, each full forward a whole
    // short sequence, and the products take the few-row path their row count and the
    // weight's layout pick (`cpu::weight`). So the log-likelihoods agree to the f32
    // rounding of logits of O(10), about 1e-6 nats a token whatever the sum: 1e-5 nats
    // below 1 nat and relative above, as for one question at a time below. A purely relative bound asks for less
    // than one rounding of a logit on a sum below 1 nat (0.13 nats here: 1.3e-6; the two
    // routes differed by 1.9e-6, one rounding of a logit of 16).
    for (a, l) in shared.iter().zip(&full) {
        assert!(
            (a + l).abs() <= 1e-5 * l.abs().max(1.0),
            "{a} vs full forward {}",
            -l
        );
    }
    // Scoring questions together does not change any sum beyond rounding: one at a time
    // gives the same log-likelihoods. One question's few continuation rows take the
    // streaming few-row product, which sums in another order than the batched GEMM, so
    // the sums agree to f32 rounding of the logits (O(10) each), not bit for bit: 1e-5
    // nats below 1 nat, relative above.
    for (i, r) in rows.iter().enumerate() {
        let one = choice_logliks(
            &be,
            &model,
            None,
            tok,
            here,
            std::slice::from_ref(r),
            |_| {},
        )
        .unwrap();
        for (a, b) in one.iter().zip(&ll[2 * i..2 * i + 2]) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
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
