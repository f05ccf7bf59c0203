//! `info [MODEL]`: configuration, parameter counts, memory estimate (of the demo's default
//! model when none is named): the weights, the LoRA training state (weights, gradient, two
//! Adam moments) and the activations a training forward keeps for its backward
//! (`model::llama::memory`).

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::{Common, LoraArgs, print_json};
use crate::backend::cpu::stored;
use crate::backend::cpu::weight::kept_transposed;
use crate::error::{Error, Result};
use crate::model::llama::ActStorage;
use crate::model::{self, HostLora};

#[derive(Args)]
pub struct InfoArgs {
    /// An HF model directory or a .gguf file [default: the demo's model,
    /// SmolLM2-135M-Instruct Q4_1 in assets/ (or ASSETS_DIR), once fetched].
    pub model: Option<PathBuf>,
    /// A tokenizer.json to use instead of the model's own.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Tokens per sequence of the activation estimate (what a training forward keeps for
    /// its backward).
    #[arg(long, allow_negative_numbers = true, default_value_t = 512)]
    pub max_len: usize,
    /// Sequences per batch of the activation estimate.
    #[arg(long, allow_negative_numbers = true, default_value_t = 4)]
    pub batch_size: usize,
    #[command(flatten)]
    pub common: Common,
}

const GIB: f64 = (1u64 << 30) as f64;

pub fn run(a: InfoArgs) -> Result<()> {
    let path = match a.model {
        Some(p) => p,
        None => {
            let p = super::demo::default_model();
            if !p.exists() {
                return Err(Error::file(
                    &p,
                    "the default model is not fetched yet: run scripts/fetch-assets.sh (or the demo), or name a MODEL",
                ));
            }
            p
        }
    };
    let mut m = model::load(&path, a.tokenizer.as_deref())?;
    let c = &m.cfg;
    let lora = HostLora::init(c, a.lora.config(c)?, 0);
    let n_base = c.n_params();
    let n_lora = lora.n_params();
    let targets = lora.cfg.targets.len();
    let kept = |storage| {
        model::llama::kept_activation_bytes(
            c,
            lora.cfg.r,
            targets,
            a.batch_size,
            a.max_len,
            storage,
        ) as f64
    };
    let (acts_cpu, acts_cuda) = (kept(ActStorage::F32), kept(ActStorage::Bf16Flash));
    let weights_cpu = model::llama::weight_bytes(c, ActStorage::F32) as f64;
    let weights_cuda = model::llama::weight_bytes(c, ActStorage::Bf16Flash) as f64;
    // The file's quantised blocks the CPU keeps beside its f32 weights, for decoding.
    let stored_cpu: usize = std::mem::take(&mut m.weights.stored)
        .into_matrices()
        .filter_map(|s| {
            let (rows, cols) = s.dims();
            stored::compact(s, kept_transposed(rows, cols))
        })
        .map(|c| c.size())
        .sum();
    let stored_cpu = stored_cpu as f64;
    let lora_state = 4.0 * 4.0 * n_lora as f64; // weights, gradient, two Adam moments
    let tok = m.tokenizer().ok();
    if a.common.json {
        print_json(&json!({
            "model": m.path,
            "identity": m.identity,
            "config": c,
            "n_params": n_base,
            "lora": {"r": lora.cfg.r, "alpha": lora.cfg.alpha, "targets": lora.cfg.targets.iter().map(|p| p.name()).collect::<Vec<_>>(), "n_params": n_lora},
            "tokenizer_vocab": tok.map(|t| t.vocab_size()),
            "memory_bytes": {"weights_cpu_f32": weights_cpu, "weights_cpu_stored": stored_cpu, "weights_cuda_bf16": weights_cuda, "lora_training_state": lora_state, "activations_kept_cpu_f32": acts_cpu, "activations_kept_cuda_bf16": acts_cuda,
                "batch_size": a.batch_size, "max_len": a.max_len},
        }));
        return Ok(());
    }
    println!("model          {}", m.identity);
    println!(
        "architecture   llama: {} layers, hidden {}, FFN {}, {} heads / {} KV heads, head dim {}",
        c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    );
    println!(
        "vocabulary     {}{}",
        c.vocab_size,
        tok.map(|t| format!(" (tokenizer: {} tokens)", t.vocab_size()))
            .unwrap_or_else(|| " (no tokenizer)".into())
    );
    println!(
        "rope           theta {}{}; RMSNorm eps {:e}; tied embeddings: {}",
        c.rope_theta,
        if c.rope_scaling.is_some() || c.rope_freq_factors.is_some() {
            ", llama3 scaling"
        } else {
            ""
        },
        c.rms_norm_eps,
        c.tie_word_embeddings
    );
    println!("parameters     {n_base} ({:.1} M)", n_base as f64 / 1e6);
    println!(
        "LoRA           r={} alpha={} on {}: {n_lora} parameters ({:.3}% of the base)",
        lora.cfg.r,
        lora.cfg.alpha,
        lora.cfg
            .targets
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(","),
        100.0 * n_lora as f64 / n_base as f64
    );
    let stored = if stored_cpu > 0.0 {
        format!(
            " + {:.2} GiB of the file's quantised blocks, read when decoding",
            stored_cpu / GIB
        )
    } else {
        String::new()
    };
    println!(
        "memory         weights {:.2} GiB (CPU f32{stored}) / {:.2} GiB (CUDA bf16); LoRA training state {:.1} MiB",
        weights_cpu / GIB,
        weights_cuda / GIB,
        lora_state / (1u64 << 20) as f64,
    );
    println!(
        "activations    kept for backward, batch {} x {} tokens: {:.2} GiB (CPU f32, attention probabilities) / {:.2} GiB (CUDA bf16, flash attention); a step adds the backward's working buffers",
        a.batch_size,
        a.max_len,
        acts_cpu / GIB,
        acts_cuda / GIB
    );
    Ok(())
}
