//! CUDA benchmarks (skipped without a device): the hand-written kernels against the plain
//! cuBLAS sequences they replace, and end to end on a Llama-3.2-1B-shaped model with random
//! weights (batch 4 x 512): training step, diag and KFAC curvature passes; the fused
//! classifier against materialised logits. The PyTorch + PEFT bf16 peer is
//! benches/peers/torch_peft_cuda_step.py.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lalora_engine::backend::cuda::{self, BaseDtype, CudaBackend};
use lalora_engine::backend::{AttnShape, Backend, CeTargets, LoraDims, Segment};
use lalora_engine::curvature::{Fisher, KfacApprox, Scheme, Spec, estimate};
use lalora_engine::data::{Batch, Example};
use lalora_engine::model::config::LlamaConfig;
use lalora_engine::model::weights::{HostLayer, HostWeights};
use lalora_engine::model::{HostLora, Llama, LoraConfig, Proj};
use lalora_engine::train::accumulate_gradients;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rnd(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

/// Llama-3.2-1B's shape: 16 layers, hidden 2048, FFN 8192, 32 heads / 8 KV heads, vocab
/// 128256, tied embeddings.
pub fn llama_1b_shape() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 128256,
        hidden_size: 2048,
        intermediate_size: 8192,
        num_layers: 16,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 500000.0,
        rope_scaling: None,
        rope_freq_factors: None,
        tie_word_embeddings: true,
        max_position_embeddings: 131072,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

fn kernels(c: &mut Criterion, g: &CudaBackend) {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let d = LoraDims {
        m: 4096,
        d_in: 2048,
        r: 16,
        d_out: 2048,
        scale: 2.0,
    };
    let up = |v: Vec<f32>| g.buf(v).unwrap();
    let (x, a, b) = (
        up(rnd(&mut rng, d.m * d.d_in, 1.0)),
        up(rnd(&mut rng, d.r * d.d_in, 0.02)),
        up(rnd(&mut rng, d.d_out * d.r, 0.02)),
    );
    let gr = up(rnd(&mut rng, d.m * d.d_out, 1.0));
    let (mut y, mut dx) = (
        g.zeros(d.m * d.d_out).unwrap(),
        g.zeros(d.m * d.d_in).unwrap(),
    );
    let (mut da, mut db) = (
        g.zeros(d.r * d.d_in).unwrap(),
        g.zeros(d.d_out * d.r).unwrap(),
    );
    let u = g.lora_forward(&x, &a, &b, d, &mut y).unwrap();
    let mut grp = c.benchmark_group("cuda_lora_4096x2048_r16");
    grp.bench_function("forward_fused", |bn| {
        bn.iter(|| {
            g.lora_forward(&x, &a, &b, d, &mut y).unwrap();
            g.synchronize().unwrap()
        })
    });
    grp.bench_function("forward_cublas", |bn| {
        bn.iter(|| {
            g.lora_forward_unfused(&x, &a, &b, d, &mut y).unwrap();
            g.synchronize().unwrap()
        })
    });
    grp.bench_function("backward_fused", |bn| {
        bn.iter(|| {
            g.lora_backward(&gr, &x, &u, &a, &b, d, &mut dx, Some((&mut da, &mut db)))
                .unwrap();
            g.synchronize().unwrap()
        })
    });
    grp.bench_function("backward_cublas", |bn| {
        bn.iter(|| {
            g.lora_backward_unfused(&gr, &x, &u, &a, &b, d, &mut dx, &mut da, &mut db)
                .unwrap();
            g.synchronize().unwrap()
        })
    });
    grp.finish();

    // diag: 16 sequences of 256 positions, A-side block (r=16, d_in=2048).
    let segs: Vec<Segment> = (0..16)
        .map(|i| Segment {
            start: i * 256,
            len: 256,
        })
        .collect();
    let ga = up(rnd(&mut rng, 4096 * 16, 1.0));
    let mut f = g.zeros(16 * 2048).unwrap();
    let mut grp = c.benchmark_group("cuda_diag_16x256_r16_d2048");
    // FLOPs of the 16 per-sequence products G_n^T X_n (the squares are negligible).
    let flops = 2 * 4096 * 16 * 2048;
    eprintln!("cuda_diag_16x256_r16_d2048: {flops} FLOP per call (elem/s = FLOP/s)");
    grp.throughput(Throughput::Elements(flops));
    grp.bench_function("per_sample_squaring", |bn| {
        bn.iter(|| {
            g.sq_grad_accumulate(&ga, 16, &x, 2048, &segs, 1.0, &mut f)
                .unwrap();
            g.synchronize().unwrap()
        })
    });
    grp.bench_function("per_sample_squaring_simt", |bn| {
        bn.iter(|| {
            g.sq_grad_simt(&ga, 16, &x, 2048, &segs, 1.0, &mut f)
                .unwrap();
            g.synchronize().unwrap()
        })
    });
    grp.bench_function("materialised_cublas", |bn| {
        bn.iter(|| {
            g.sq_grad_materialized(&ga, 16, &x, 2048, &segs, 1.0, &mut f)
                .unwrap();
            g.synchronize().unwrap()
        })
    });
    grp.finish();

    // KFAC input factor: X^T X over 4096 positions, d = 2048.
    let all = [Segment {
        start: 0,
        len: 4096,
    }];
    let mut cf = g.zeros(2048 * 2048).unwrap();
    let mut grp = c.benchmark_group("cuda_kfac_factor_4096x2048");
    // FLOPs of the full product X^T X; the symmetric kernels compute its upper tiles only.
    let flops = 2 * 4096 * 2048 * 2048;
    eprintln!("cuda_kfac_factor_4096x2048: {flops} FLOP per call (elem/s = FLOP/s)");
    grp.throughput(Throughput::Elements(flops));
    grp.bench_function("hand_written_symmetric", |bn| {
        bn.iter(|| {
            g.gram_accumulate(&x, 2048, &x, 2048, &all, 1.0, &mut cf)
                .unwrap();
            g.synchronize().unwrap()
        })
    });
    grp.bench_function("simt_symmetric", |bn| {
        bn.iter(|| {
            g.gram_simt(&x, 2048, &x, 2048, &all, 1.0, &mut cf).unwrap();
            g.synchronize().unwrap()
        })
    });
    grp.bench_function("cublas_gemm", |bn| {
        bn.iter(|| {
            g.gram_cublas(&x, 2048, &x, 2048, 4096, 1.0, &mut cf)
                .unwrap();
            g.synchronize().unwrap()
        })
    });
    grp.finish();

    // kfac-tri cross factor shape: X^T G over the same positions, no symmetry.
    let mut grp = c.benchmark_group("cuda_kfac_cross_4096x2048x2048");
    eprintln!("cuda_kfac_cross_4096x2048x2048: {flops} FLOP per call (elem/s = FLOP/s)");
    grp.throughput(Throughput::Elements(flops));
    grp.bench_function("tensor_cores", |bn| {
        bn.iter(|| {
            g.gram_accumulate(&x, 2048, &gr, 2048, &all, 1.0, &mut cf)
                .unwrap();
            g.synchronize().unwrap()
        })
    });
    grp.bench_function("simt", |bn| {
        bn.iter(|| {
            g.gram_simt(&x, 2048, &gr, 2048, &all, 1.0, &mut cf)
                .unwrap();
            g.synchronize().unwrap()
        })
    });
    grp.bench_function("cublas_gemm", |bn| {
        bn.iter(|| {
            g.gram_cublas(&x, 2048, &gr, 2048, 4096, 1.0, &mut cf)
                .unwrap();
            g.synchronize().unwrap()
        })
    });
    grp.finish();
}

/// Causal attention at Llama-3.2-1B's shapes (32 heads on 8 KV heads, head dim 64), 4 x
/// 1024 tokens: flash attention against the materialised path (cuBLAS products, f32
/// probabilities kept), forward alone and forward + backward.
fn attention(c: &mut Criterion, g: &CudaBackend) {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let s = AttnShape {
        batch: 4,
        tq: 1024,
        tk: 1024,
        tk_stride: 1024,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 64,
        q_offset: 0,
    };
    let rows = s.batch * s.tq;
    let (qw, kw) = (s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim);
    let mut up = |n: usize| g.buf(rnd(&mut rng, n, 1.0)).unwrap();
    let (q, k, v, dout) = (up(rows * qw), up(rows * kw), up(rows * kw), up(rows * qw));
    // Useful FLOPs: the forward's two products over the causal (query, key) pairs; the
    // backward's five are 2.5 times that.
    let pairs = (s.batch * s.n_heads * s.tq * (s.tq + 1) / 2) as u64;
    let fwd = 4 * pairs * s.head_dim as u64;
    for (name, flops, backward) in [
        ("forward", fwd, false),
        ("forward_backward", fwd * 7 / 2, true),
    ] {
        let group = format!("cuda_attention_4x1024_h32_kv8_d64_{name}");
        eprintln!("{group}: {flops} FLOP per call (elem/s = FLOP/s)");
        let mut grp = c.benchmark_group(&group);
        grp.throughput(Throughput::Elements(flops));
        grp.bench_function("flash", |bn| {
            bn.iter(|| {
                let (out, lse) = g.flash_attention(&q, &k, &v, &s).unwrap();
                if backward {
                    g.flash_attention_backward(&dout, &q, &k, &v, &out, &lse, &s)
                        .unwrap();
                }
                g.synchronize().unwrap()
            })
        });
        grp.bench_function("materialised", |bn| {
            bn.iter(|| {
                let (_, probs) = g.attention_materialised(&q, &k, &v, &s).unwrap();
                if backward {
                    g.attention_materialised_backward(&dout, &q, &k, &v, &probs, &s)
                        .unwrap();
                }
                g.synchronize().unwrap()
            })
        });
        grp.finish();
    }
}

/// The LM head with its loss and gradient at Llama-3.2-1B's shapes (hidden 2048, vocab
/// 128256), 4 x 512 rows: the fused classifier (vocabulary chunks, `rows x 8192` logits
/// scratch) against the materialised sequence (`linear` to 1 GB of f32 logits,
/// `cross_entropy` writing 1 GB of dlogits, `linear_backward`).
fn classifier(c: &mut Criterion, g: &CudaBackend) {
    let cfg = llama_1b_shape();
    let (rows, dim, vocab) = (4 * 512, cfg.hidden_size, cfg.vocab_size);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let h = g.buf(rnd(&mut rng, rows * dim, 1.0)).unwrap();
    let w = g
        .weight(rnd(&mut rng, vocab * dim, 0.05), vocab, dim)
        .unwrap();
    let labels: Vec<i32> = (0..rows).map(|r| (r * 7919 % vocab) as i32).collect();
    let t = CeTargets::Labels(&labels);
    // Useful FLOPs: the two head products (logits, gradient); the materialised path does
    // the same, the fused one no recompute.
    let flops = 2 * 2 * (rows * dim * vocab) as u64;
    let group = "cuda_classifier_2048x2048x128256";
    eprintln!("{group}: {flops} FLOP per call (elem/s = FLOP/s)");
    let mut grp = c.benchmark_group(group);
    grp.throughput(Throughput::Elements(flops));
    grp.bench_function("fused", |bn| {
        bn.iter(|| {
            g.classifier(&h, &w, rows, dim, vocab, t, Some(1.0))
                .unwrap();
            g.synchronize().unwrap()
        })
    });
    grp.bench_function("materialised", |bn| {
        bn.iter(|| {
            let z = g.linear(&h, &w, rows, dim, vocab).unwrap();
            let (_, d) = g.cross_entropy(&z, rows, vocab, t, Some(1.0)).unwrap();
            let mut dh = g.zeros(rows * dim).unwrap();
            let d = d.unwrap();
            g.linear_backward(&d, &w, rows, dim, vocab, &mut dh, false)
                .unwrap();
            g.synchronize().unwrap()
        })
    });
    grp.finish();
}

fn end_to_end(c: &mut Criterion, g: &CudaBackend) {
    let cfg = llama_1b_shape();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let dm = cfg.hidden_size;
    let layers = (0..cfg.num_layers)
        .map(|_| HostLayer {
            attn_norm: vec![1.0; dm],
            mlp_norm: vec![1.0; dm],
            proj: Proj::ALL.map(|p| {
                let (din, dout) = p.dims(&cfg);
                rnd(&mut rng, din * dout, 1.0 / (din as f32).sqrt())
            }),
        })
        .collect();
    let weights = HostWeights {
        embed: rnd(&mut rng, cfg.vocab_size * dm, 0.02),
        layers,
        final_norm: vec![1.0; dm],
        lm_head: None,
    };
    let model = Llama::new(g, cfg.clone(), weights).unwrap();
    let lora_host = HostLora::init(
        &cfg,
        LoraConfig {
            r: 16,
            alpha: 32.0,
            use_rslora: false,
            targets: Proj::ALL.to_vec(),
        },
        0,
    );
    let lora = lora_host.map(|v| g.buf(v.clone())).unwrap();
    let (bsz, seq) = (4, 512);
    let examples: Vec<Example> = (0..bsz)
        .map(|_| {
            let ids: Vec<u32> = (0..seq)
                .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                .collect();
            Example {
                labels: ids.iter().map(|&i| i as i32).collect(),
                ids,
            }
        })
        .collect();
    let batch = Batch::new(&examples.iter().collect::<Vec<_>>());
    let mut grads = lora.map_sized(|n| g.zeros(n)).unwrap();
    let mut grp = c.benchmark_group("cuda_llama1b_shape_4x512");
    grp.sample_size(10);
    grp.throughput(Throughput::Elements((bsz * seq) as u64));
    grp.bench_function("lora_forward_backward", |bn| {
        bn.iter(|| {
            accumulate_gradients(g, &model, &lora, &batch, 1.0, &mut grads).unwrap();
            g.synchronize().unwrap()
        })
    });
    for (name, scheme) in [
        ("curvature_diag", Scheme::Diag),
        ("curvature_kfac", Scheme::Kfac),
    ] {
        let spec = Spec {
            scheme,
            fisher: Fisher::Empirical,
            approx: KfacApprox::Expand,
            seed: 0,
        };
        grp.bench_function(name, |bn| {
            bn.iter(|| estimate(g, &model, &lora, &examples, bsz, spec, || {}).unwrap())
        });
    }
    grp.finish();
}

fn benches(c: &mut Criterion) {
    if !cuda::available() {
        assert!(
            std::env::var("LALORA_REQUIRE_GPU").as_deref() != Ok("1"),
            "LALORA_REQUIRE_GPU=1 but no CUDA device is usable"
        );
        eprintln!("skipped: no CUDA device");
        return;
    }
    let g = CudaBackend::new(0, BaseDtype::Bf16).expect("the CUDA device initialises");
    eprintln!("device: {}", g.describe());
    kernels(c, &g);
    attention(c, &g);
    classifier(c, &g);
    end_to_end(c, &g);
}

criterion_group!(cuda_benches, benches);
criterion_main!(cuda_benches);
