//! The Llama architecture hyper-parameters, read from an HF `config.json`
//! (`hf_config.rs`) or GGUF metadata (`gguf`), and the checks both share.

/// Llama-3 style frequency-dependent RoPE scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Per-frequency divisors from a GGUF `rope_freqs.weight` (Llama-3 GGUF files store the
    /// scaling this way instead of as parameters).
    #[serde(skip)]
    pub rope_freq_factors: Option<Vec<f32>>,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// Upper bounds far above any published Llama (405B: 126 layers, hidden 16384, FFN 53248,
/// 128 heads, vocabulary 128256) that keep every size product in range and refuse a
/// corrupt header before anything is allocated from it.
const MAX_LAYERS: usize = 4096;
const MAX_DIM: usize = 1 << 20;
const MAX_HEADS: usize = 1 << 14;
const MAX_VOCAB: usize = 1 << 24;
const MAX_POSITIONS: usize = 1 << 24;

/// `x` is a finite number above zero.
fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

impl LlamaConfig {
    /// Checks shared by both loaders: sizes in range and consistent, numbers that keep the
    /// forward pass finite, token ids inside the vocabulary.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let sizes = [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_DIM),
            ("intermediate_size", self.intermediate_size, MAX_DIM),
            ("num_hidden_layers", self.num_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_kv_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_DIM),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_POSITIONS,
            ),
        ];
        for (name, v, max) in sizes {
            if v == 0 || v > max {
                return Err(format!("`{name}` is {v}; it must be in 1..={max}"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if self.q_dim() > MAX_DIM {
            return Err(format!(
                "num_attention_heads x head_dim = {} exceeds {MAX_DIM}",
                self.q_dim()
            ));
        }
        // f32 is what the kernels add: an f64 eps that rounds to 0 would divide by zero.
        if !positive(self.rms_norm_eps as f64) {
            return Err(format!(
                "rms_norm_eps {} must be a positive finite number",
                self.rms_norm_eps
            ));
        }
        if !positive(self.rope_theta) {
            return Err(format!(
                "rope_theta {} must be a positive finite number",
                self.rope_theta
            ));
        }
        if let Some(s) = &self.rope_scaling {
            let fields = [
                ("factor", s.factor),
                ("low_freq_factor", s.low_freq_factor),
                ("high_freq_factor", s.high_freq_factor),
                (
                    "original_max_position_embeddings",
                    s.original_max_position_embeddings,
                ),
            ];
            if let Some((k, v)) = fields.iter().find(|(_, v)| !positive(*v)) {
                return Err(format!(
                    "llama3 rope scaling `{k}` {v} must be a positive finite number"
                ));
            }
            // HF's blend divides by their difference.
            if s.high_freq_factor <= s.low_freq_factor {
                return Err(format!(
                    "llama3 rope scaling: high_freq_factor {} must exceed low_freq_factor {}",
                    s.high_freq_factor, s.low_freq_factor
                ));
            }
        }
        if let Some(f) = &self.rope_freq_factors {
            if f.len() != self.head_dim / 2 {
                return Err(format!(
                    "rope_freqs.weight has {} entries, expected head_dim / 2 = {}",
                    f.len(),
                    self.head_dim / 2
                ));
            }
            if let Some(x) = f.iter().find(|x| !positive(**x as f64)) {
                return Err(format!(
                    "rope_freqs.weight holds {x}; frequency factors must be positive and finite"
                ));
            }
        }
        let ids = self.bos_token_id.iter().chain(&self.eos_token_ids);
        if let Some(id) = ids.into_iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(format!(
                "special token id {id} (bos/eos) is outside the vocabulary of {}",
                self.vocab_size
            ));
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// RoPE inverse frequencies `1 / theta^(2i/d)`, with the llama3 scaling or GGUF
    /// frequency factors applied, exactly as HF's `_compute_llama3_parameters`.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let mut inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        if let Some(s) = &self.rope_scaling {
            let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        if let Some(factors) = &self.rope_freq_factors {
            for (f, k) in inv.iter_mut().zip(factors) {
                *f /= *k as f64;
            }
        }
        inv
    }

    /// Number of parameters of the base model.
    pub fn n_params(&self) -> usize {
        let d = self.hidden_size;
        let per_layer = d * self.q_dim()
            + 2 * d * self.kv_dim()
            + self.q_dim() * d
            + 3 * d * self.intermediate_size
            + 2 * d;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        self.vocab_size * d + self.num_layers * per_layer + d + head
    }
}
