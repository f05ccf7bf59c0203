//! Decoding's products (`linear` of 1 and 8 rows, 2 threads) with the frozen weight read
//! from its GGUF blocks (`Backend::weight_stored`, `src/backend/cpu/stored.rs`) against
//! the same weight in f32, for every quantised type the loader reads, on Llama-3.2-1B's
//! q/o (2048 x 2048), gate/up (8192 x 2048) and down (2048 x 8192, which the CPU keeps
//! transposed: Q4_1 and Q4_K as `NibbleColumns`, the other types stream their f32) shapes.
//! Both compute the same bits (tested in `stored.rs`); the blocks are 5/32 (Q4_0, Q4_K),
//! 6/32 (Q4_1), 6.56/32 (Q6_K) and 8.5/32 (Q8_0) of the f32 bytes, `NibbleColumns` 6/32.
//! Each iteration takes the next of several weights, 640 MB of f32 in all and 100-170 MB
//! of blocks, so that neither form sits in the caches (a model decodes from memory).
//! Random blocks: the cost does not depend on the values.

mod common;

use criterion::{Criterion, Throughput, criterion_group};
use lalora_engine::backend::Backend;
use lalora_engine::backend::cpu::CpuBackend;
use lalora_engine::model::quant::{GgmlType, StoredMatrix, dequantize, random_blocks};

/// `(name, d_out, d_in, weights cycled)`.
const SHAPES: [(&str, usize, usize, usize); 3] = [
    ("llama1b_q_o_2048x2048", 2048, 2048, 40),
    ("llama1b_gate_up_8192x2048", 8192, 2048, 10),
    ("llama1b_down_2048x8192", 2048, 8192, 10),
];

const TYPES: [(&str, GgmlType); 5] = [
    ("q4_0", GgmlType::Q4_0),
    ("q4_1", GgmlType::Q4_1),
    ("q8_0", GgmlType::Q8_0),
    ("q4_k", GgmlType::Q4K),
    ("q6_k", GgmlType::Q6K),
];

fn decode_stored(c: &mut Criterion) {
    let be = CpuBackend::new(common::THREADS);
    eprintln!("bench backend: {}", be.describe());
    for (shape, n, k, count) in SHAPES {
        for (tname, ty) in TYPES {
            let (mut f32_weights, mut stored) = (Vec::new(), Vec::new());
            for seed in 0..count as u64 {
                let bytes = random_blocks(ty, n, k, seed);
                let mut w = vec![0f32; n * k];
                dequantize(ty, &bytes, &mut w);
                let s = StoredMatrix::new(ty, n, k, bytes).expect("whole blocks");
                f32_weights.push(be.weight(w.clone(), n, k).expect("weight"));
                stored.push(be.weight_stored(w, s, n, k).expect("weight"));
            }
            let mut g = c.benchmark_group(format!("decode_{shape}_{tname}"));
            g.sample_size(30);
            for m in [1, 8] {
                let x = be
                    .buf((0..m * k).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect())
                    .expect("x");
                g.throughput(Throughput::Elements((2 * m * n * k) as u64));
                for (form, ws) in [("f32", &f32_weights), ("blocks", &stored)] {
                    let mut next = 0;
                    g.bench_function(format!("{m}_rows_{form}"), |b| {
                        b.iter(|| {
                            next = (next + 1) % count;
                            be.linear(&x, &ws[next], m, k, n).unwrap()
                        })
                    });
                }
            }
            g.finish();
        }
    }
}

criterion_group!(benches, decode_stored);
fn main() {
    common::on_pool(benches);
}
