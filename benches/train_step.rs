//! LoRA forward+backward throughput on SmolLM2-135M (batch 4 x 256 tokens, 2 threads):
//! the number compared against PyTorch + PEFT (`benches/peers/torch_peft_step.py`).
//!
//! `cargo bench --bench train_step -- --serve` runs no criterion group: it answers one
//! pass per line on stdin (`forward_backward` or `forward`) with its seconds on stdout, so
//! that `benches/peers/interleaved.py` can alternate the engine's passes with the peer's
//! on the same cores, one by one (see that script for why).
//!
//! Both modes report each pass's FLOPs (`cost::Flops`, the products only) and the cores'
//! FMA peak at the bench's SIMD level (`backend::cpu::peak`), so that a time reads as a
//! fraction of what the machine can do.

mod common;

use std::io::{BufRead, Write};
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group};
use lalora_engine::backend::CeTargets;
use lalora_engine::backend::cpu::peak::fma_peak;
use lalora_engine::cost::Flops;
use lalora_engine::train::accumulate_gradients;

/// The two timed passes, shared by criterion and `--serve`.
struct Passes {
    s: common::Setup,
    grads: lalora_engine::model::HostLora,
}

impl Passes {
    fn new() -> Self {
        let s = common::smollm2_setup();
        let grads = s.lora.zeros_like();
        Passes { s, grads }
    }
    /// The products' FLOPs of `(forward_backward, forward)` on the bench's batch.
    fn flops(&self) -> (u64, u64) {
        let f = Flops::new(&self.s.model.cfg, &self.s.lora);
        (f.train_batch(&self.s.batch), f.eval_batch(&self.s.batch))
    }
    /// The summed loss of a forward + backward over the batch, and its token count.
    fn forward_backward(&mut self) -> (f64, usize) {
        let s = &self.s;
        let r =
            accumulate_gradients(&s.be, &s.model, &s.lora, &s.batch, 1.0, &mut self.grads).unwrap();
        (r.loss_sum, r.n_targets)
    }
    /// Forward through the token losses (the fused classifier), as evaluation runs it.
    fn forward(&self) -> Vec<f32> {
        let s = &self.s;
        let acts = s
            .model
            .forward(&s.be, Some(&s.lora), &s.batch, false)
            .unwrap();
        let t = CeTargets::Labels(&s.batch.targets);
        s.model.classify(&s.be, &acts, t, None).unwrap().losses
    }
}

fn train_step(c: &mut Criterion) {
    let mut p = Passes::new();
    let (loss_sum, n) = p.forward_backward();
    eprintln!("loss_sum on the batch: {loss_sum:.2} over {n} tokens (the peer prints its own)");
    let (fb, fwd) = p.flops();
    eprintln!(
        "products: forward_backward {:.1} GFLOP, forward_only {:.1} GFLOP; the cores' FMA \
         peak {:.1} GFLOP/s (a pass at the peak: {:.3} s, {:.3} s)",
        fb as f64 / 1e9,
        fwd as f64 / 1e9,
        peak_gflops(),
        fb as f64 / 1e9 / peak_gflops(),
        fwd as f64 / 1e9 / peak_gflops(),
    );
    let mut g = c.benchmark_group("smollm2_lora_step");
    g.sample_size(10);
    g.throughput(Throughput::Elements((common::BATCH * common::SEQ) as u64));
    g.bench_function("forward_backward_cpu", |b| b.iter(|| p.forward_backward()));
    g.bench_function("forward_only_cpu", |b| b.iter(|| p.forward()));
    g.finish();
}

/// The FMA peak of the bench's threads, GFLOP/s, measured once.
fn peak_gflops() -> f64 {
    static PEAK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *PEAK.get_or_init(|| fma_peak() / 1e9)
}

/// `--serve`: one JSON line when ready (SIMD level, loss, each pass's FLOPs, the FMA
/// peak), then one line of seconds per pass asked for, until stdin closes.
fn serve() {
    let mut p = Passes::new();
    let (loss_sum, _) = p.forward_backward();
    let simd = lalora_engine::backend::cpu::simd_level();
    let (fb, fwd) = p.flops();
    let ready = serde_json::json!({
        "simd": simd.to_string(),
        "loss_sum": loss_sum,
        "flops": {"forward_backward": fb, "forward": fwd},
        "fma_peak_gflops": (peak_gflops() * 10.0).round() / 10.0,
    });
    println!("{ready}");
    let mut out = std::io::stdout();
    out.flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let t = Instant::now();
        match line.trim() {
            "forward_backward" => _ = std::hint::black_box(p.forward_backward()),
            "forward" => _ = std::hint::black_box(p.forward()),
            other => panic!("--serve: unknown pass {other:?}"),
        }
        writeln!(out, "{}", t.elapsed().as_secs_f64()).unwrap();
        out.flush().unwrap();
    }
}

criterion_group!(benches, train_step);
fn main() {
    if std::env::args().any(|a| a == "--serve") {
        common::in_pool(serve);
    } else {
        common::on_pool(benches);
    }
}
