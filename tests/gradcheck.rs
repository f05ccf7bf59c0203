//! Finite-difference check of the LoRA gradients on a tiny random model, over a batch with
//! padding (unequal lengths) and masked labels, for every A and B tensor.

mod common;

use lalora_engine::backend::CeTargets;
use lalora_engine::backend::cpu::CpuBackend;
use lalora_engine::data::{Batch, Example};
use lalora_engine::model::config::LlamaConfig;
use lalora_engine::model::weights::{HostLayer, HostWeights};
use lalora_engine::model::{HostLora, Llama, LoraConfig, Proj};
use lalora_engine::train::accumulate_gradients;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 61,
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        rope_freq_factors: None,
        tie_word_embeddings: true,
        max_position_embeddings: 64,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

fn randn(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

pub fn random_weights(cfg: &LlamaConfig, rng: &mut ChaCha8Rng) -> HostWeights {
    let d = cfg.hidden_size;
    let layers = (0..cfg.num_layers)
        .map(|_| HostLayer {
            attn_norm: (0..d).map(|_| 0.8 + 0.4 * rng.random::<f32>()).collect(),
            mlp_norm: (0..d).map(|_| 0.8 + 0.4 * rng.random::<f32>()).collect(),
            proj: Proj::ALL.map(|p| {
                let (din, dout) = p.dims(cfg);
                randn(rng, din * dout, 1.0 / (din as f32).sqrt())
            }),
        })
        .collect();
    HostWeights {
        embed: randn(rng, cfg.vocab_size * d, 1.0),
        layers,
        final_norm: vec![1.0; d],
        lm_head: None,
        stored: Default::default(),
    }
}

fn loss_sum(be: &CpuBackend, model: &Llama<CpuBackend>, lora: &HostLora, batch: &Batch) -> f64 {
    let acts = model.forward(be, Some(lora), batch, false).unwrap();
    let l = model
        .classify(be, &acts, CeTargets::Labels(&batch.targets), None)
        .unwrap()
        .losses;
    l.iter().map(|&x| x as f64).sum()
}

#[test]
fn lora_gradients_match_central_differences() {
    let cfg = tiny_config();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let be = CpuBackend::new(2);
    let model = Llama::new(&be, cfg.clone(), random_weights(&cfg, &mut rng)).unwrap();
    let lcfg = LoraConfig {
        r: 3,
        alpha: 5.0,
        use_rslora: true,
        targets: Proj::ALL.to_vec(),
    };
    let mut lora = HostLora::init(&cfg, lcfg, 1);
    for m in lora.modules.iter_mut() {
        m.b = randn(&mut rng, m.b.len(), 0.3);
    }
    let mut ex = |len: usize, masked: usize| {
        let ids: Vec<u32> = (0..len)
            .map(|_| rng.random_range(0..cfg.vocab_size as u32))
            .collect();
        let labels = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| if i < masked { -100 } else { t as i32 })
            .collect();
        Example { ids, labels }
    };
    let examples = [ex(9, 2), ex(5, 0), ex(7, 3)];
    let batch = Batch::new(&examples.iter().collect::<Vec<_>>());
    assert!(
        batch.segments.iter().any(|s| s.len < batch.seq_len),
        "batch must contain padding"
    );

    let mut grads = lora.zeros_like();
    accumulate_gradients(&be, &model, &lora, &batch, 1.0, &mut grads).unwrap();

    // Directional derivative along a random direction confined to one tensor at a time.
    // In f32 the loss (~80) carries rounding of ~1e-5, so with eps = 1e-2 the central
    // difference is good to ~1e-3 absolute: observed worst relative error ~1e-2.
    let eps = 1e-2f32;
    let n_tensors = 2 * lora.modules.len();
    for t in 0..n_tensors {
        let len = lora.tensors_mut().nth(t).unwrap().len();
        let dir = randn(&mut rng, len, 1.0);
        let analytic: f64 = grads.named_tensors()[t]
            .2
            .iter()
            .zip(&dir)
            .map(|(g, v)| (*g * *v) as f64)
            .sum();
        let shifted = |sign: f32| {
            let mut l = lora.clone();
            let p = l.tensors_mut().nth(t).unwrap();
            p.iter_mut()
                .zip(&dir)
                .for_each(|(x, v)| *x += sign * eps * v);
            loss_sum(&be, &model, &l, &batch)
        };
        let numeric = (shifted(1.0) - shifted(-1.0)) / (2.0 * eps as f64);
        let name = &grads.named_tensors()[t].0;
        let err = (numeric - analytic).abs() / analytic.abs().max(1e-2);
        assert!(
            err < 2e-2,
            "{name}: numeric {numeric:.6} analytic {analytic:.6} (rel {err:.2e})"
        );
    }
}
