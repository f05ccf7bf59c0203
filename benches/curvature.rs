//! The cost of curvature on SmolLM2-135M (batch 4 x 256 tokens, 2 threads): one curvature
//! pass over the batch per scheme, next to a plain LoRA forward+backward on the same batch.
//! Peers: benches/peers/torch_curvature.py (per-sequence loop, BackPACK, curvlinops).

mod common;

use criterion::{Criterion, Throughput, criterion_group};
use lalora_engine::curvature::{Fisher, KfacApprox, Scheme, Spec, estimate};
use lalora_engine::data::Example;
use lalora_engine::train::accumulate_gradients;

fn curvature(c: &mut Criterion) {
    let s = common::smollm2_setup();
    let examples: Vec<Example> = s
        .batch
        .segments
        .iter()
        .map(|seg| {
            let ids = s.batch.ids[seg.start..seg.start + seg.len].to_vec();
            Example {
                labels: ids.iter().map(|&i| i as i32).collect(),
                ids,
            }
        })
        .collect();
    let mut g = c.benchmark_group("smollm2_curvature");
    g.sample_size(10);
    g.throughput(Throughput::Elements((common::BATCH * common::SEQ) as u64));
    let mut grads = s.lora.zeros_like();
    g.bench_function("lora_forward_backward", |b| {
        b.iter(|| {
            accumulate_gradients(&s.be, &s.model, &s.lora, &s.batch, 1.0, &mut grads).unwrap()
        })
    });
    for (name, scheme, approx) in [
        ("diag", Scheme::Diag, KfacApprox::Expand),
        ("kfac_expand", Scheme::Kfac, KfacApprox::Expand),
        ("kfac_reduce", Scheme::Kfac, KfacApprox::Reduce),
        ("kfac_tri", Scheme::KfacTri, KfacApprox::Expand),
    ] {
        let spec = Spec {
            scheme,
            fisher: Fisher::Empirical,
            approx,
            seed: 0,
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                estimate(
                    &s.be,
                    &s.model,
                    &s.lora,
                    &examples,
                    common::BATCH,
                    spec,
                    || {},
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, curvature);
fn main() {
    common::on_pool(benches);
}
