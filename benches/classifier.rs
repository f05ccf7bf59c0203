//! The LM head with its loss and gradient on SmolLM2-135M's shapes (vocabulary 49152,
//! hidden 576, 4 x 256 = 1024 rows, 2 threads): the fused classifier (vocabulary chunks,
//! `Backend::classifier`) against the materialised sequence it replaces (`linear` to the
//! full `(rows, vocab)` logits, `cross_entropy`, `linear_backward`), with and without the
//! gradient. Random hidden states and head of unit spread: the cost does not depend on
//! the values.

mod common;

use criterion::{Criterion, Throughput, criterion_group};
use lalora_engine::backend::cpu::CpuBackend;
use lalora_engine::backend::{Backend, CeTargets};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ROWS: usize = 4 * 256;
const DIM: usize = 576;
const VOCAB: usize = 49152;

fn classifier(c: &mut Criterion) {
    let be = CpuBackend::new(common::THREADS);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut rnd = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
            .collect()
    };
    let h = rnd(ROWS * DIM, 1.0);
    let w = be.weight(rnd(VOCAB * DIM, 0.1), VOCAB, DIM).unwrap();
    let labels: Vec<i32> = (0..ROWS).map(|r| (r * 7919 % VOCAB) as i32).collect();
    let t = CeTargets::Labels(&labels);
    let materialised = |grad: Option<f32>| {
        let z = be.linear(&h, &w, ROWS, DIM, VOCAB).unwrap();
        let (l, d) = be.cross_entropy(&z, ROWS, VOCAB, t, grad).unwrap();
        let dh = d.map(|d| {
            let mut dh = vec![0f32; ROWS * DIM];
            be.linear_backward(&d, &w, ROWS, DIM, VOCAB, &mut dh, false)
                .unwrap();
            dh
        });
        (l, dh)
    };
    let fused = |grad: Option<f32>| {
        let o = be.classifier(&h, &w, ROWS, DIM, VOCAB, t, grad).unwrap();
        (o.losses, o.dhidden)
    };
    eprintln!("classifier bench: {}", be.describe());
    let mut g = c.benchmark_group("smollm2_head_1024x576x49152");
    g.sample_size(10);
    g.throughput(Throughput::Elements(ROWS as u64));
    g.bench_function("loss_grad_materialised", |b| {
        b.iter(|| materialised(Some(1.0)))
    });
    g.bench_function("loss_grad_fused", |b| b.iter(|| fused(Some(1.0))));
    // Answer-only labels (a quarter of the rows): the fused classifier skips ignored
    // rows, the materialised path computes their logits all the same.
    let quarter: Vec<i32> = labels
        .iter()
        .enumerate()
        .map(|(r, &l)| if r % 4 == 0 { l } else { -100 })
        .collect();
    g.bench_function("loss_grad_fused_quarter_labelled", |b| {
        b.iter(|| {
            let t = CeTargets::Labels(&quarter);
            be.classifier(&h, &w, ROWS, DIM, VOCAB, t, Some(1.0))
                .unwrap()
        })
    });
    g.bench_function("loss_materialised", |b| b.iter(|| materialised(None)));
    g.bench_function("loss_fused", |b| b.iter(|| fused(None)));
    g.finish();
}

criterion_group!(benches, classifier);
fn main() {
    common::on_pool(benches);
}
