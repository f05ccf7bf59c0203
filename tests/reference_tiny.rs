//! The forward pass, losses and LoRA gradients against PyTorch + PEFT on the tiny GQA
//! fixture (relative error < 1e-4, f32 against f32).

mod common;

use common::*;
use lalora_engine::backend::{Backend, CeTargets};
use lalora_engine::train::accumulate_gradients;

#[test]
fn logits_and_losses_match_pytorch() {
    let t = tiny();
    let be = cpu();
    let model = tiny_model(&be);
    let batch = whole_batch(&t.examples);
    let lora = Some(&t.adapter);
    let acts = model.forward(&be, lora, &batch, false).unwrap();
    let e = rel_err(&acts.logits, t.expected.get("logits").unwrap());
    assert!(e < 1e-4, "logits relative error {e:e}");

    let (losses, _) = be
        .cross_entropy(
            &acts.logits,
            acts.rows,
            model.cfg.vocab_size,
            CeTargets::Labels(&batch.targets),
            None,
        )
        .unwrap();
    let loss_sum: f64 = losses.iter().map(|&l| l as f64).sum();
    let want_sum = t.expected.get("loss_sum").unwrap()[0] as f64;
    let want_mean = t.expected.get("loss").unwrap()[0] as f64;
    assert_eq!(batch.n_targets, 107, "fixture.json says 107 target tokens");
    assert!(
        ((loss_sum - want_sum) / want_sum).abs() < 1e-5,
        "loss_sum {loss_sum} vs {want_sum}"
    );
    let mean = loss_sum / batch.n_targets as f64;
    assert!(
        ((mean - want_mean) / want_mean).abs() < 1e-5,
        "loss {mean} vs {want_mean}"
    );
}

#[test]
fn lora_gradients_match_pytorch() {
    let t = tiny();
    let be = cpu();
    let model = tiny_model(&be);
    let batch = whole_batch(&t.examples);
    let mut grads = t.adapter.zeros_like();
    accumulate_gradients(&be, &model, &t.adapter, &batch, 1.0, &mut grads).unwrap();
    let named = grads.named_tensors();
    assert_eq!(named.len(), 28, "2 layers x 7 projections x (A, B)");
    for (name, _, g) in named {
        let want = t
            .expected
            .get(&format!("grad.{name}"))
            .unwrap_or_else(|| panic!("no grad.{name}"));
        let e = rel_err(g, want);
        assert!(e < 1e-4, "grad.{name}: relative error {e:e}");
    }
}

#[test]
fn batch_split_does_not_change_gradients() {
    // Gradients are sums over sequences: two half batches equal one whole batch.
    let t = tiny();
    let be = cpu();
    let model = tiny_model(&be);
    let mut whole = t.adapter.zeros_like();
    accumulate_gradients(
        &be,
        &model,
        &t.adapter,
        &whole_batch(&t.examples),
        1.0,
        &mut whole,
    )
    .unwrap();
    let mut split = t.adapter.zeros_like();
    for half in t.examples.chunks(3) {
        accumulate_gradients(&be, &model, &t.adapter, &whole_batch(half), 1.0, &mut split).unwrap();
    }
    for ((n, _, a), (_, _, b)) in split.named_tensors().into_iter().zip(whole.named_tensors()) {
        assert!(rel_err(a, b) < 1e-5, "{n}");
    }
}
