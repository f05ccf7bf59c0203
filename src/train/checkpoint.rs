//! Checkpoints for an exact resume: `OUT/checkpoint/` holds the adapter (PEFT layout), the
//! AdamW moments (`optimizer.safetensors`: `exp_avg.<name>`, `exp_avg_sq.<name>`) and
//! `trainer_state.json` (step and the full training configuration). The data order and
//! every random draw follow from (seed, step), so nothing else is needed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::trainer::TrainConfig;
use crate::error::{Error, IoContext, Result};
use crate::io::{TensorFile, atomic_write, write_safetensors};
use crate::model::HostLora;
use crate::model::config::LlamaConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: usize,
    pub config: TrainConfig,
    /// The curvature file the penalty came from, if any.
    pub curvature: Option<PathBuf>,
}

pub struct Checkpoint {
    pub state: TrainerState,
    pub lora: HostLora,
    pub m: HostLora,
    pub v: HostLora,
}

pub fn dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

/// Write the checkpoint into a fresh directory, then swap it in for the old one.
pub fn save(out: &Path, ck: &Checkpoint, base_model: &str) -> Result<()> {
    let final_dir = dir(out);
    let tmp = out.join(format!("checkpoint.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).at(&tmp)?;
    }
    ck.lora.save(&tmp, base_model)?;
    let mut t: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    for (prefix, w) in [("exp_avg", &ck.m), ("exp_avg_sq", &ck.v)] {
        for (name, shape, data) in w.named_tensors() {
            t.push((format!("{prefix}.{name}"), shape, data));
        }
    }
    write_safetensors(&tmp.join("optimizer.safetensors"), &t, Default::default())?;
    let json = serde_json::to_string_pretty(&ck.state).unwrap_or_default();
    atomic_write(&tmp.join("trainer_state.json"), json.as_bytes())?;
    let old = out.join("checkpoint.old");
    if final_dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).at(&old)?;
        }
        std::fs::rename(&final_dir, &old).at(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir).at(&final_dir)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).at(&old)?;
    }
    Ok(())
}

pub fn load(out: &Path, model: &LlamaConfig) -> Result<Checkpoint> {
    let d = dir(out);
    if !d.exists() {
        return Err(Error::file(&d, "no checkpoint to resume from"));
    }
    let sp = d.join("trainer_state.json");
    let text = std::fs::read_to_string(&sp).at(&sp)?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| Error::file(&sp, format!("malformed trainer state: {e}")))?;
    let lora = HostLora::load(&d, model)?;
    let op = d.join("optimizer.safetensors");
    let f = TensorFile::read(&op)?;
    let moment = |prefix: &str| -> Result<HostLora> {
        let mut w = lora.zeros_like();
        for (t, name) in w
            .tensors_mut()
            .zip(lora.named_tensors().into_iter().map(|n| n.0))
        {
            let key = format!("{prefix}.{name}");
            let data = f
                .get(&key)
                .ok_or_else(|| Error::file(&op, format!("tensor `{key}` missing")))?;
            if data.len() != t.len() {
                return Err(Error::file(
                    &op,
                    format!("tensor `{key}` has the wrong size"),
                ));
            }
            t.copy_from_slice(data);
        }
        Ok(w)
    };
    Ok(Checkpoint {
        m: moment("exp_avg")?,
        v: moment("exp_avg_sq")?,
        lora,
        state,
    })
}
