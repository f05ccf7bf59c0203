//! Llama-family models: configuration, weights (HF safetensors, GGUF), LoRA, and the
//! forward/backward pass.

mod adapter_config;
pub mod config;
mod fingerprint;
pub mod gguf;
mod hf_config;
pub mod llama;
pub mod lora;
pub mod proj;
pub mod quant;
pub mod weights;

use std::path::{Path, PathBuf};

use self::config::LlamaConfig;
use self::fingerprint::Fingerprint;
use self::gguf::{GgufFile, gguf_name};
use self::weights::{HostWeights, SafetensorsSource, check_layer_count, hf_name, load_weights};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

pub use self::llama::{Activations, CachedSeq, KvCache, Llama, LoraObserver};
pub use self::lora::{HostLora, LoraConfig, LoraModule, LoraWeights};
pub use self::proj::Proj;

/// A model read from disk, weights still on the host.
pub struct LoadedModel {
    pub path: PathBuf,
    pub cfg: LlamaConfig,
    pub weights: HostWeights,
    tokenizer: std::result::Result<Tokenizer, String>,
    /// What the model is, for curvature-file metadata: its name, size in bytes and a
    /// fingerprint of its configuration and weights (a renamed copy keeps the fingerprint,
    /// a fine-tuned variant of the same size does not).
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
                stored: Default::default(),
            },
        )
    }
}

/// Load an HF model directory or a `.gguf` file; `tokenizer` overrides the model's own.
pub fn load(path: &Path, tokenizer: Option<&Path>) -> Result<LoadedModel> {
    let meta = std::fs::metadata(path).map_err(|_| Error::file(path, "not found"))?;
    let (cfg, weights, own_tok, print) = if meta.is_dir() {
        let cfg_path = path.join("config.json");
        let cfg = LlamaConfig::from_hf_json(&cfg_path)?;
        let src = SafetensorsSource::open_hf_dir(path)?;
        check_layer_count(src.names(), "model.layers.", &cfg)
            .map_err(|m| Error::file(&cfg_path, m))?;
        let weights = load_weights(&cfg, &src, &hf_name)?;
        let mut print = Fingerprint::default();
        // The parsed configuration, so that formatting does not change the identity.
        print.add(serde_json::to_string(&cfg).unwrap_or_default().as_bytes());
        src.files().for_each(|b| print.add(b));
        let tj = path.join("tokenizer.json");
        let tok = if tj.exists() {
            Tokenizer::from_file(&tj, cfg.eos_token_ids.first().copied(), cfg.vocab_size)
                .map_err(|e| e.to_string())
        } else {
            Err(format!(
                "{}: no tokenizer.json (pass --tokenizer)",
                path.display()
            ))
        };
        (cfg, weights, tok, print)
    } else {
        let f = GgufFile::open(path)?;
        let cfg = f.config()?;
        check_layer_count(f.names(), "blk.", &cfg).map_err(|m| Error::file(path, m))?;
        let weights = load_weights(&cfg, &f, &gguf_name)?;
        let tok = Tokenizer::from_gguf(&f, path, cfg.vocab_size).map_err(|e| e.to_string());
        let mut print = Fingerprint::default();
        print.add(f.bytes());
        (cfg, weights, tok, print)
    };
    let tokenizer = match tokenizer {
        Some(t) => Ok(Tokenizer::from_file(
            t,
            cfg.eos_token_ids.first().copied(),
            cfg.vocab_size,
        )?),
        None => own_tok,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let identity = format!(
        "{name} ({} bytes, fingerprint {:016x})",
        print.bytes(),
        print.finish()
    );
    Ok(LoadedModel {
        path: path.to_path_buf(),
        cfg,
        weights,
        tokenizer,
        identity,
    })
}
