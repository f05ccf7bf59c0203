//! What defines a training run, recorded in every checkpoint so that `--resume` refuses to
//! continue a different run: the optimiser and schedule settings (`TrainConfig`) plus the
//! inputs below. The data, the curvature and the initial weights are compared by a digest
//! of their contents, not of their files: a changed `--max-len`, `--limit` or tokenizer
//! changes the tokens and so the data digest, while a moved but identical file does not.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use xxhash_rust::xxh3;

use super::trainer::TrainConfig;
use crate::curvature::Curvature;
use crate::data::Example;
use crate::model::config::LlamaConfig;
use crate::model::{HostLora, LoraConfig};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunIdentity {
    /// The base model as named on the command line, and a digest of its configuration.
    pub model: String,
    /// Digest of the training examples (token ids and labels, in order).
    pub data: String,
    /// Digest of the curvature (metadata and every tensor), if the run has one.
    pub curvature: Option<String>,
    /// LoRA rank, alpha, scaling and target modules.
    pub lora: Value,
    /// Digest of the initial LoRA weights (the seeded init, `--adapter` or theta*).
    pub init: String,
}

/// The digest a run identity records for curvature `c`: its metadata and every tensor.
pub fn curvature_digest(c: &Curvature) -> String {
    let mut d = Digest::new();
    let m = &c.meta;
    let meta = format!(
        "{} {} {} {} {} {}",
        m.scheme, m.fisher, m.approx, m.n_sequences, m.n_positions, m.model
    );
    d.bytes(meta.as_bytes());
    for (name, data) in c.named_tensors() {
        d.bytes(name.as_bytes());
        d.floats(data);
    }
    d.hex()
}

impl RunIdentity {
    /// `curvature`: the run's curvature by its [`curvature_digest`], if it has one.
    pub fn new(
        base_model: &str,
        model: &LlamaConfig,
        data: &[Example],
        curvature: Option<&str>,
        init: &HostLora,
    ) -> Self {
        let mut d = Digest::new();
        d.bytes(serde_json::to_string(model).unwrap_or_default().as_bytes());
        let model = format!("{base_model} (config {})", d.hex());
        let mut d = Digest::new();
        for ex in data {
            d.u64(ex.ids.len() as u64);
            d.bytes(bytemuck::cast_slice(&ex.ids));
            d.bytes(bytemuck::cast_slice(&ex.labels));
        }
        let data = d.hex();
        let curvature = curvature.map(str::to_string);
        let mut d = Digest::new();
        for (name, _, data) in init.named_tensors() {
            d.bytes(name.as_bytes());
            d.floats(data);
        }
        RunIdentity {
            model,
            data,
            curvature,
            lora: lora_settings(&init.cfg),
            init: d.hex(),
        }
    }

    /// `Ok` when a checkpoint of run `saved` (with `saved_cfg`) may be continued as
    /// `self` with `cfg`; else a one-line message naming the first difference.
    pub fn check_resume(
        &self,
        cfg: &TrainConfig,
        saved: &RunIdentity,
        saved_cfg: &TrainConfig,
    ) -> std::result::Result<(), String> {
        if !saved.init.starts_with(SCHEME) {
            return Err("the checkpoint was written by an older lalora-engine, whose run digests this one cannot compare: resume it with that version, or start a new run in another --out".into());
        }
        let differs = |what: &str, now: &str, then: &str| {
            Err(format!(
                "--resume with a different {what}: `{now}` now, `{then}` in the checkpoint"
            ))
        };
        if self.model != saved.model {
            return differs("model", &self.model, &saved.model);
        }
        if let Some((key, now, then)) = first_difference(&self.lora, &saved.lora) {
            return differs(&format!("LoRA setting `{key}`"), &now, &then);
        }
        if self.data != saved.data {
            return Err("--resume with different training data: its tokens differ from the checkpoint's (--data, --max-len, --limit or the tokenizer changed)".into());
        }
        match (&self.curvature, &saved.curvature) {
            (Some(_), None) => {
                return Err("--resume with a curvature; the checkpoint's run had none".into());
            }
            (None, Some(_)) => {
                return Err("--resume without the curvature the checkpoint's run had".into());
            }
            (now, then) if now != then => {
                return Err("--resume with a different curvature: its contents differ from the checkpoint's".into());
            }
            _ => {}
        }
        let json = |c: &TrainConfig| serde_json::to_value(c).unwrap_or_default();
        if let Some((key, now, then)) = first_difference(&json(cfg), &json(saved_cfg)) {
            return differs(&format!("training setting `{key}`"), &now, &then);
        }
        if self.init != saved.init {
            return Err("--resume with different initial LoRA weights (--adapter or the curvature's theta* changed)".into());
        }
        Ok(())
    }
}

/// The first field of two JSON objects that differs: its name and both values.
fn first_difference(now: &Value, then: &Value) -> Option<(String, String, String)> {
    let empty = serde_json::Map::new();
    let (a, b) = (
        now.as_object().unwrap_or(&empty),
        then.as_object().unwrap_or(&empty),
    );
    let keys = a.keys().chain(b.keys().filter(|k| !a.contains_key(*k)));
    keys.map(|k| (k, a.get(k), b.get(k)))
        .find(|(_, x, y)| x != y)
        .map(|(k, x, y)| {
            let show = |v: Option<&Value>| v.map_or("none".to_string(), shown);
            (k.clone(), show(x), show(y))
        })
}

/// A setting as the user gave it: the settings are f32, which JSON holds widened to f64
/// (`0.001` as `0.0010000000474974513`); a number that is an f32 is shown as one.
fn shown(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if v.is_f64() && (x as f32) as f64 == x => (x as f32).to_string(),
        _ => v.to_string(),
    }
}

fn lora_settings(c: &LoraConfig) -> Value {
    let targets: Vec<&str> = c.targets.iter().map(|p| p.name()).collect();
    json!({"r": c.r, "alpha": c.alpha, "rslora": c.use_rslora, "targets": targets})
}

/// XXH3-64 (the `xxhash-rust` crate): fixed by its specification, so digests stay
/// comparable across builds and Rust versions (std's `DefaultHasher` promises neither); it
/// detects changed inputs, it is not meant to resist forgery. It reads gigabytes a second,
/// which matters: a run with a KFAC curvature digests every factor (15 GB at
/// Llama-3.2-1B's shapes), and the byte-at-a-time FNV-1a used before took about 1.6 s
/// per GB. Digests are written `xxh3-<hex>` so that a checkpoint of an older build, whose
/// FNV digests could never match, is recognised as such.
struct Digest(xxh3::Xxh3);

/// The prefix of this scheme's digests.
const SCHEME: &str = "xxh3-";

impl Digest {
    fn new() -> Self {
        Digest(xxh3::Xxh3::new())
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.update(b);
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn floats(&mut self, v: &[f32]) {
        self.u64(v.len() as u64);
        self.bytes(bytemuck::cast_slice(v));
    }
    fn hex(&self) -> String {
        format!("{SCHEME}{:016x}", self.0.digest())
    }
}
