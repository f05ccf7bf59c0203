//! The shapes the benches run at: issue 8's Llama-3.2-1B shapes on a GPU, small ones with
//! tails on the simulator.

use super::*;

/// Llama-3.2-1B's shape: 16 layers, hidden 2048, FFN 8192, 32 heads / 8 KV heads, vocab
/// 128256, tied embeddings.
fn llama_1b_shape() -> LlamaConfig {
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

/// A small model of the same form for the simulator: 2 layers, hidden 128, FFN 256, 2 heads
/// on 1 KV head of dim 64 (the flash kernels' head dim), vocab 512.
fn tiny_shape() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 512,
        hidden_size: 128,
        intermediate_size: 256,
        num_layers: 2,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 64,
        max_position_embeddings: 4096,
        ..llama_1b_shape()
    }
}

/// The shapes of one run: the GPU's or the simulator's.
pub(crate) struct Shapes {
    pub(crate) prefix: &'static str,
    pub(crate) lora: LoraDims,
    /// (rows, d_in, output widths, r) of a q/k/v group, every projection adapted.
    pub(crate) group: (usize, usize, [usize; 3], usize),
    /// (sequences, positions each) for the per-sample squaring; r = lora.r.
    pub(crate) diag: (usize, usize),
    /// (rows, d) of the KFAC factors.
    pub(crate) kfac: (usize, usize),
    pub(crate) attn: AttnShape,
    /// (rows, hidden, vocabulary) of the LM head with its loss.
    pub(crate) classifier: (usize, usize, usize),
    pub(crate) model: LlamaConfig,
    /// (batch, sequence length) end to end.
    pub(crate) step: (usize, usize),
}

pub(crate) fn gpu_shapes() -> Shapes {
    Shapes {
        prefix: "cuda",
        lora: LoraDims {
            m: 4096,
            d_in: 2048,
            r: 16,
            d_out: 2048,
            scale: 2.0,
        },
        // Llama-3.2-1B's q/k/v: 32 query and 8 KV heads of 64.
        group: (4096, 2048, [2048, 512, 512], 16),
        diag: (16, 256),
        kfac: (4096, 2048),
        attn: AttnShape {
            batch: 4,
            tq: 1024,
            tk: 1024,
            tk_stride: 1024,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 64,
            q_offset: 0,
        },
        classifier: (4 * 512, 2048, 128256),
        model: llama_1b_shape(),
        // Issue 8's shape for the training step and the curvature passes.
        step: (8, 1024),
    }
}

/// Small, with tails: no dimension a multiple of the kernels' tiles where it can help it.
pub(crate) fn sim_shapes() -> Shapes {
    Shapes {
        prefix: "sim",
        lora: LoraDims {
            m: 70,
            d_in: 96,
            r: 16,
            d_out: 130,
            scale: 2.0,
        },
        group: (70, 96, [96, 48, 48], 8),
        diag: (3, 37),
        kfac: (75, 70),
        attn: AttnShape {
            batch: 1,
            tq: 77,
            tk: 77,
            tk_stride: 77,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
            q_offset: 0,
        },
        // One full vocabulary chunk and a tail.
        classifier: (37, 48, CLASSIFIER_CHUNK + 77),
        model: tiny_shape(),
        step: (2, 40),
    }
}
