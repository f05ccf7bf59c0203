//! The seven linear projections of a Llama block, the modules LoRA can target.

use super::config::LlamaConfig;
use crate::backend::group::Feeds;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The module name PEFT matches in `target_modules`.
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// Path below `model.layers.{i}` in HF naming.
    pub fn hf_path(self) -> String {
        let parent = match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            _ => "mlp",
        };
        format!("{parent}.{}", self.name())
    }

    /// Tensor name inside a GGUF block (`blk.{i}.<name>.weight`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Proj::Q => "attn_q",
            Proj::K => "attn_k",
            Proj::V => "attn_v",
            Proj::O => "attn_output",
            Proj::Gate => "ffn_gate",
            Proj::Up => "ffn_up",
            Proj::Down => "ffn_down",
        }
    }

    pub fn from_name(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.name() == name)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// What reads the projection's output: o and down are added to the residual stream,
    /// the others feed RoPE and attention or SwiGLU.
    pub fn feeds(self) -> Feeds {
        match self {
            Proj::O | Proj::Down => Feeds::Residual,
            _ => Feeds::Kernels,
        }
    }

    /// The heads of the output RoPE rotates: q's and k's.
    pub fn rotated_heads(self, cfg: &LlamaConfig) -> Option<usize> {
        match self {
            Proj::Q => Some(cfg.num_heads),
            Proj::K => Some(cfg.num_kv_heads),
            _ => None,
        }
    }

    /// `(d_in, d_out)` of the weight `W (d_out x d_in)`.
    pub fn dims(self, cfg: &LlamaConfig) -> (usize, usize) {
        let d = cfg.hidden_size;
        match self {
            Proj::Q => (d, cfg.q_dim()),
            Proj::K | Proj::V => (d, cfg.kv_dim()),
            Proj::O => (cfg.q_dim(), d),
            Proj::Gate | Proj::Up => (d, cfg.intermediate_size),
            Proj::Down => (cfg.intermediate_size, d),
        }
    }
}
