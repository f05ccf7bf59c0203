//! The forward pass, losses and LoRA gradients against PyTorch + PEFT on the tiny GQA
//! fixture: on the CPU and on the CUDA backend (simulator) with f32 base weights to 1e-4
//! relative, with bf16 base weights to 2e-2.

mod common;

use common::*;
use lalora_engine::backend::cuda::BaseDtype;
use lalora_engine::backend::{Backend, CeTargets};
use lalora_engine::train::accumulate_gradients;

#[test]
fn logits_and_losses_match_pytorch() {
    logits_and_losses_on(&cpu(), bound(None));
}

#[test]
fn logits_and_losses_match_pytorch_on_sim() {
    for base in [BaseDtype::F32, BaseDtype::Bf16] {
        logits_and_losses_on(&sim(base), bound(Some(base)));
    }
}

fn logits_and_losses_on<B: Backend>(be: &B, tol: f64) {
    let t = tiny();
    let model = tiny_model(be);
    let batch = whole_batch(&t.examples);
    let lora = t.adapter.map(|v| be.buf(v.clone())).unwrap();
    let acts = model.forward(be, Some(&lora), &batch, false).unwrap();
    let logits = be.to_host(&model.logits(be, &acts).unwrap()).unwrap();
    let e = rel_err(&logits, t.expected.get("logits").unwrap());
    assert!(e < tol, "{}: logits relative error {e:e}", be.describe());

    // The fused classifier's losses (the logits above are materialised only to check them).
    let losses = model
        .classify(be, &acts, CeTargets::Labels(&batch.targets), None)
        .unwrap()
        .losses;
    let loss_sum: f64 = losses.iter().map(|&l| l as f64).sum();
    let want_sum = t.expected.get("loss_sum").unwrap()[0] as f64;
    let want_mean = t.expected.get("loss").unwrap()[0] as f64;
    assert_eq!(batch.n_targets, 107, "fixture.json says 107 target tokens");
    // The loss is a sum of 107 terms: its error is far below the logits' bound.
    let loss_tol = tol / 10.0;
    assert!(
        ((loss_sum - want_sum) / want_sum).abs() < loss_tol,
        "loss_sum {loss_sum} vs {want_sum}"
    );
    let mean = loss_sum / batch.n_targets as f64;
    assert!(
        ((mean - want_mean) / want_mean).abs() < loss_tol,
        "loss {mean} vs {want_mean}"
    );
}

#[test]
fn lora_gradients_match_pytorch() {
    lora_gradients_on(&cpu(), bound(None));
}

#[test]
fn lora_gradients_match_pytorch_on_sim() {
    for base in [BaseDtype::F32, BaseDtype::Bf16] {
        lora_gradients_on(&sim(base), bound(Some(base)));
    }
}

fn lora_gradients_on<B: Backend>(be: &B, tol: f64) {
    let t = tiny();
    let model = tiny_model(be);
    let batch = whole_batch(&t.examples);
    let lora = t.adapter.map(|v| be.buf(v.clone())).unwrap();
    let mut grads = t.adapter.map_sized(|n| be.zeros(n)).unwrap();
    accumulate_gradients(be, &model, &lora, &batch, 1.0, &mut grads).unwrap();
    let grads = grads.map(|g| be.to_host(g)).unwrap();
    let named = grads.named_tensors();
    assert_eq!(named.len(), 28, "2 layers x 7 projections x (A, B)");
    for (name, _, g) in named {
        let want = t
            .expected
            .get(&format!("grad.{name}"))
            .unwrap_or_else(|| panic!("no grad.{name}"));
        let e = rel_err(g, want);
        assert!(
            e < tol,
            "{}: grad.{name}: relative error {e:e}",
            be.describe()
        );
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
