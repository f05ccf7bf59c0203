//! The projection products on SmolLM2-135M's shapes, and on the two of Llama-3.2-1B's
//! where the rule's choice is closest or largest (4 x 256 = 1024 rows, 2 threads), with
//! the frozen weight stored as given (`W` row-major) and transposed (`W^T` row-major):
//! `linear` (`y = x W^T`) and `linear_backward` (`dx = dy W`) side by side, the figures
//! behind the layout `CpuWeight::new` chooses (`src/backend/cpu/weight.rs`). The gemm
//! crate packs its right-hand operand unless it is row-major, so each layout spares one of
//! the two products its packing. Random values: the cost does not depend on them.

mod common;

use criterion::{Criterion, Throughput, criterion_group};
use lalora_engine::backend::Backend;
use lalora_engine::backend::cpu::CpuBackend;
use lalora_engine::backend::cpu::weight::CpuWeight;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ROWS: usize = 4 * 256;

/// `(name, d_in, d_out)`: SmolLM2-135M's q and o, k and v, gate and up, down; then
/// Llama-3.2-1B's k and v (512 rows: the narrowest wide weight measured to gain from being
/// kept transposed, so the threshold) and down.
const SHAPES: [(&str, usize, usize); 6] = [
    ("q_o_576x576", 576, 576),
    ("k_v_576x192", 576, 192),
    ("gate_up_576x1536", 576, 1536),
    ("down_1536x576", 1536, 576),
    ("llama1b_k_v_2048x512", 2048, 512),
    ("llama1b_down_8192x2048", 8192, 2048),
];

fn weight_layout(c: &mut Criterion) {
    let be = CpuBackend::new(common::THREADS);
    eprintln!("bench backend: {}", be.describe());
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut rnd = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random::<f32>() - 0.5).collect() };
    for (name, k, n) in SHAPES {
        let (x, dy, w) = (rnd(ROWS * k), rnd(ROWS * n), rnd(n * k));
        let layouts = [
            ("row_major", CpuWeight::row_major(w.clone(), n, k)),
            ("transposed", CpuWeight::transposed(&w, n, k)),
        ];
        let mut g = c.benchmark_group(format!("weight_layout_{name}"));
        g.sample_size(20);
        g.throughput(Throughput::Elements((2 * ROWS * n * k) as u64));
        let mut dx = vec![0f32; ROWS * k];
        for (layout, cw) in &layouts {
            g.bench_function(format!("forward_{layout}"), |b| {
                b.iter(|| be.linear(&x, cw, ROWS, k, n).unwrap())
            });
            g.bench_function(format!("backward_{layout}"), |b| {
                b.iter(|| be.linear_backward(&dy, cw, ROWS, k, n, &mut dx, false))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, weight_layout);
fn main() {
    common::on_pool(benches);
}
