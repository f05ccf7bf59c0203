//! What a training forward keeps for backward, in bytes, from the model's shapes alone
//! (`info`'s estimate), and what the weights take. It mirrors `LayerActs` and
//! `Activations` field by field, and `tests/activation_memory.rs` holds it to the bytes
//! the CUDA backend counts on the simulator, for both storage layouts: whoever adds a kept
//! buffer updates both.

use crate::model::LlamaConfig;

/// How a backend stores the weights and the kept activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActStorage {
    /// Everything f32, attention probabilities `(batch, heads, T, T)` kept: the CPU, and
    /// CUDA with f32 base weights.
    F32,
    /// CUDA with bf16 base weights: what the matmuls and flash attention read is bf16
    /// (the norms' outputs, q/k/v, gate/up and the SwiGLU output); the residual stream,
    /// the norms' reciprocal RMS, the attention output, the LoRA `u = x A^T` and flash
    /// attention's log-sum-exps `(batch, heads, T)` are f32.
    Bf16Flash,
}

/// Bytes the model's weights take: every matrix in the storage's type, the RMSNorm gains
/// in f32.
pub fn weight_bytes(c: &LlamaConfig, storage: ActStorage) -> u64 {
    let norms = ((2 * c.num_layers + 1) * c.hidden_size) as u64;
    let matrices = c.n_params() as u64 - norms;
    let elem = match storage {
        ActStorage::F32 => 4,
        ActStorage::Bf16Flash => 2,
    };
    elem * matrices + 4 * norms
}

/// Bytes a training forward over `batch` sequences of `len` tokens keeps until its
/// backward, with LoRA of rank `r` on `adapted` projections of every layer. Not counted:
/// the weights, the backward's own buffers (the classifier's logits chunk, one layer's
/// gradients in flight) and the batch's token ids. In u128: `batch` and `len` come from
/// flags, and `batch heads len^2` outgrows u64 long before they do.
pub fn kept_activation_bytes(
    c: &LlamaConfig,
    r: usize,
    adapted: usize,
    batch: usize,
    len: usize,
    storage: ActStorage,
) -> u128 {
    let w = |n: usize| n as u128;
    let (batch, len) = (w(batch), w(len));
    let tokens = batch * len;
    let (h, q, kv, ffn) = (
        w(c.hidden_size),
        w(c.q_dim()),
        w(c.kv_dim()),
        w(c.intermediate_size),
    );
    let heads = w(c.num_heads);
    let lora_u = w(r) * w(adapted);
    // Elements per token of one layer: (f32 ones, bf16 ones), and per sequence (f32).
    let (f32_tok, bf16_tok, f32_seq) = match storage {
        // x_in, xn1, h_mid, xn2; rstd1, rstd2; q and the attention output; k, v; gate, up,
        // act; u per adapted projection. The probabilities are per sequence.
        ActStorage::F32 => (
            4 * h + 2 + 2 * q + 2 * kv + 3 * ffn + lora_u,
            0,
            heads * len * len,
        ),
        // f32: x_in, h_mid; rstd1, rstd2; the attention output; the log-sum-exps; u.
        // bf16: xn1, xn2; q; k, v; gate, up, act.
        ActStorage::Bf16Flash => (
            2 * h + 2 + q + heads + lora_u,
            2 * h + q + 2 * kv + 3 * ffn,
            0,
        ),
    };
    let layer = tokens * (4 * f32_tok + 2 * bf16_tok) + batch * 4 * f32_seq;
    // After the last layer: the residual (f32), its rstd (f32) and the final norm's
    // output (the classifier's input, stored as the matmuls read it).
    let final_xn = if storage == ActStorage::F32 { 4 } else { 2 };
    let last = tokens * (4 * h + 4 + final_xn * h);
    // The rotary table: cos and sin of `len` positions, head_dim/2 frequencies, f32.
    let rope = 4 * len * w(c.head_dim);
    w(c.num_layers) * layer + last + rope
}
