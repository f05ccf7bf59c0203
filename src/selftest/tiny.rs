//! The built-in tiny Llama of the end-to-end checks: 2 layers, hidden 64, 4 query heads on
//! 2 KV heads of dim 16, an MLP of 96 (not a multiple of 64), vocabulary 300, LoRA r 8 on
//! all seven projections; and five short sequences with padding and ignored labels.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::Example;
use crate::data::jsonl::IGNORE;
use crate::model::config::LlamaConfig;
use crate::model::weights::{HostLayer, HostWeights};
use crate::model::{HostLora, LoraConfig, Proj};

/// Sequences per batch: 5 sequences make a padded batch of 3 and one of 2.
pub const BATCH: usize = 3;

pub fn config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 300,
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        rope_freq_factors: None,
        tie_word_embeddings: false,
        max_position_embeddings: 64,
        bos_token_id: None,
        eos_token_ids: Vec::new(),
    }
}

/// `n` values uniform in `center +- half_width`, rounded to the nearest bf16: a device
/// that stores base weights as bf16 then holds exactly the weights the reference
/// computes with, and the comparison sees only the arithmetic.
fn uniform(rng: &mut ChaCha8Rng, n: usize, center: f32, half_width: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v = center + half_width * (rng.random::<f32>() * 2.0 - 1.0);
            half::bf16::from_f32(v).to_f32()
        })
        .collect()
}

/// Random base weights: projections scaled by `1/sqrt(d_in)` so activations keep their
/// size through the layers; norm weights near 1.
pub fn weights(cfg: &LlamaConfig, seed: u64) -> HostWeights {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7e1f_7e57);
    let (d, v) = (cfg.hidden_size, cfg.vocab_size);
    let layers = (0..cfg.num_layers)
        .map(|_| HostLayer {
            attn_norm: uniform(&mut rng, d, 1.0, 0.2),
            mlp_norm: uniform(&mut rng, d, 1.0, 0.2),
            proj: Proj::ALL.map(|p| {
                let (d_in, d_out) = p.dims(cfg);
                uniform(&mut rng, d_out * d_in, 0.0, (3.0 / d_in as f32).sqrt())
            }),
        })
        .collect();
    HostWeights {
        embed: uniform(&mut rng, v * d, 0.0, 1.0),
        layers,
        final_norm: uniform(&mut rng, d, 1.0, 0.2),
        lm_head: Some(uniform(&mut rng, v * d, 0.0, (3.0 / d as f32).sqrt())),
        stored: Default::default(),
    }
}

/// PEFT's init with `B` made non-zero: at `B = 0` every gradient and curvature of `A`
/// vanishes, and a check of them could not fail.
pub fn lora(cfg: &LlamaConfig, seed: u64) -> HostLora {
    let lc = LoraConfig {
        r: 8,
        alpha: 16.0,
        use_rslora: false,
        targets: Proj::ALL.to_vec(),
    };
    let mut l = HostLora::init(cfg, lc, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x10ba);
    for m in &mut l.modules {
        m.b = uniform(&mut rng, m.b.len(), 0.0, 0.05);
    }
    l
}

/// Five sequences of lengths 19, 11, 23, 6 and 14 (right-padded in their batches); the
/// first has a 6-token prompt without labels, the third every fifth label ignored.
pub fn examples(cfg: &LlamaConfig, seed: u64) -> Vec<Example> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xda7a);
    [19, 11, 23, 6, 14]
        .into_iter()
        .enumerate()
        .map(|(n, len)| {
            let ids: Vec<u32> = (0..len)
                .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                .collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(t, &id)| {
                    let ignored = (n == 0 && t < 6) || (n == 2 && t % 5 == 4);
                    if ignored { IGNORE } else { id as i32 }
                })
                .collect();
            Example { ids, labels }
        })
        .collect()
}
