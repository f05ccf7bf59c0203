//! Llama-family models: configuration, weights (HF safetensors, GGUF), LoRA, and the
//! forward/backward pass.

pub mod config;
pub mod gguf;
pub mod llama;
pub mod lora;
pub mod proj;
pub mod quant;
pub mod weights;

use std::path::{Path, PathBuf};

use self::config::LlamaConfig;
use self::gguf::{GgufFile, gguf_name};
use self::weights::{HostWeights, SafetensorsSource, hf_name, load_weights};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

pub use self::llama::{Activations, KvCache, Llama, LoraObserver};
pub use self::lora::{HostLora, LoraConfig, LoraModule, LoraWeights};
pub use self::proj::Proj;

/// A model read from disk, weights still on the host.
pub struct LoadedModel {
    pub path: PathBuf,
    pub cfg: LlamaConfig,
    pub weights: HostWeights,
    tokenizer: std::result::Result<Tokenizer, String>,
    /// What the model is, for curvature-file metadata: file name and size in bytes.
    pub identity: String,
}

impl LoadedModel {
    /// The tokenizer, or the reason there is none (only text data needs one).
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().map_err(|e| Error::usage(e.clone()))
    }

    /// Move the weights out (onto a device) while keeping config and tokenizer.
    pub fn take_weights(&mut self) -> HostWeights {
        std::mem::replace(
            &mut self.weights,
            HostWeights {
                embed: Vec::new(),
                layers: Vec::new(),
                final_norm: Vec::new(),
                lm_head: None,
            },
        )
    }
}

/// Load an HF model directory or a `.gguf` file; `tokenizer` overrides the model's own.
pub fn load(path: &Path, tokenizer: Option<&Path>) -> Result<LoadedModel> {
    let meta = std::fs::metadata(path).map_err(|_| Error::file(path, "not found"))?;
    let (cfg, weights, own_tok) = if meta.is_dir() {
        let cfg = LlamaConfig::from_hf_json(&path.join("config.json"))?;
        let src = SafetensorsSource::open_hf_dir(path)?;
        let weights = load_weights(&cfg, &src, &hf_name)?;
        let tj = path.join("tokenizer.json");
        let tok = if tj.exists() {
            Tokenizer::from_file(&tj, cfg.eos_token_ids.first().copied()).map_err(|e| e.to_string())
        } else {
            Err(format!(
                "{}: no tokenizer.json (pass --tokenizer)",
                path.display()
            ))
        };
        (cfg, weights, tok)
    } else {
        let f = GgufFile::open(path)?;
        let cfg = f.config()?;
        let weights = load_weights(&cfg, &f, &gguf_name)?;
        let tok = Tokenizer::from_gguf(&f, path).map_err(|e| e.to_string());
        (cfg, weights, tok)
    };
    let tokenizer = match tokenizer {
        Some(t) => Ok(Tokenizer::from_file(t, cfg.eos_token_ids.first().copied())?),
        None => own_tok,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let identity = format!(
        "{name} ({} bytes)",
        if meta.is_dir() {
            dir_size(path)
        } else {
            meta.len()
        }
    );
    Ok(LoadedModel {
        path: path.to_path_buf(),
        cfg,
        weights,
        tokenizer,
        identity,
    })
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
