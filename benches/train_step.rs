//! LoRA forward+backward throughput on SmolLM2-135M (batch 4 x 256 tokens, 2 threads):
//! the number compared against PyTorch + PEFT (`benches/peers/torch_peft_step.py`).

mod common;

use criterion::{Criterion, Throughput, criterion_group};
use lalora_engine::backend::CeTargets;
use lalora_engine::train::accumulate_gradients;

fn train_step(c: &mut Criterion) {
    let s = common::smollm2_setup();
    let mut check = s.lora.zeros_like();
    let r = accumulate_gradients(&s.be, &s.model, &s.lora, &s.batch, 1.0, &mut check).unwrap();
    eprintln!(
        "loss_sum on the batch: {:.2} over {} tokens (the peer prints its own)",
        r.loss_sum, r.n_targets
    );
    let mut g = c.benchmark_group("smollm2_lora_step");
    g.sample_size(10);
    g.throughput(Throughput::Elements((common::BATCH * common::SEQ) as u64));
    let mut grads = s.lora.zeros_like();
    g.bench_function("forward_backward_cpu", |b| {
        b.iter(|| {
            accumulate_gradients(&s.be, &s.model, &s.lora, &s.batch, 1.0, &mut grads).unwrap()
        })
    });
    // Forward through the token losses (the fused classifier), as evaluation runs it.
    g.bench_function("forward_only_cpu", |b| {
        b.iter(|| {
            let acts = s
                .model
                .forward(&s.be, Some(&s.lora), &s.batch, false)
                .unwrap();
            let t = CeTargets::Labels(&s.batch.targets);
            s.model.classify(&s.be, &acts, t, None).unwrap().losses
        })
    });
    g.finish();
}

criterion_group!(benches, train_step);
fn main() {
    common::on_pool(benches);
}
