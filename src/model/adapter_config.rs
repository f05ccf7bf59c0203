//! PEFT's `adapter_config.json`: the LoRA shape, and which modules PEFT itself would adapt
//! (`target_modules`, `layers_to_transform`, `exclude_modules`), so that the tensors can be
//! held to it. Options that change the model in ways this crate does not compute are
//! refused rather than ignored.

use std::collections::BTreeSet;
use std::path::Path;

use regex::Regex;
use serde_json::Value;

use super::config::LlamaConfig;
use super::proj::Proj;
use crate::error::{Error, IoContext, Result};

pub struct AdapterConfig {
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    /// `(layer, projection)` of every module PEFT adapts with this configuration.
    pub selected: BTreeSet<(usize, Proj)>,
}

/// PEFT's module key for a projection, as `target_modules` is matched against.
pub fn module_key(layer: usize, proj: Proj) -> String {
    format!("model.layers.{layer}.{}", proj.hf_path())
}

/// How PEFT matches `target_modules` / `exclude_modules`: a string is a regex that must
/// match the whole key ("all-linear" meaning every linear layer but the output); a list
/// matches a key equal to an entry or ending in `.entry`.
enum Matcher {
    All,
    Regex(Regex),
    Names(Vec<String>),
}

impl Matcher {
    fn parse(v: &Value, field: &str) -> std::result::Result<Self, String> {
        match v {
            Value::String(s) if s == "all-linear" => Ok(Matcher::All),
            Value::String(s) => Regex::new(&format!("^(?:{s})$"))
                .map(Matcher::Regex)
                .map_err(|e| format!("`{field}` is not a regex this crate can read: {e}")),
            Value::Array(a) => a
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .map(Matcher::Names)
                .ok_or_else(|| format!("`{field}` must be a string or a list of strings")),
            _ => Err(format!("`{field}` must be a string or a list of strings")),
        }
    }

    fn matches(&self, key: &str) -> bool {
        match self {
            Matcher::All => !key.ends_with("lm_head"),
            Matcher::Regex(re) => re.is_match(key),
            Matcher::Names(names) => names
                .iter()
                .any(|n| key == n || key.ends_with(&format!(".{n}"))),
        }
    }

    /// A module this crate cannot adapt (the output layer, the embeddings, a non-linear
    /// block) that PEFT would: the adapter is then not one this crate can apply.
    fn foreign_target(&self) -> Option<String> {
        match self {
            Matcher::All => None,
            Matcher::Regex(_) => ["lm_head", "model.embed_tokens"]
                .into_iter()
                .find(|k| self.matches(k))
                .map(str::to_string),
            Matcher::Names(names) => names
                .iter()
                .find(|n| Proj::from_name(n.rsplit('.').next().unwrap_or(n)).is_none())
                .cloned(),
        }
    }
}

/// `layers_to_transform`: an index or a list of them; `None` for every layer.
fn layer_filter(v: Option<&Value>) -> std::result::Result<Option<BTreeSet<usize>>, String> {
    let index = |x: &Value| {
        x.as_u64()
            .and_then(|i| usize::try_from(i).ok())
            .ok_or("`layers_to_transform` must hold layer indices")
    };
    Ok(match v {
        None => None,
        Some(Value::Array(a)) if a.is_empty() => None,
        Some(Value::Array(a)) => Some(a.iter().map(index).collect::<std::result::Result<_, _>>()?),
        Some(x) => Some(BTreeSet::from([index(x)?])),
    })
}

/// Options that would change the adapted model; each must be absent, null, false or empty.
const UNSUPPORTED: [&str; 13] = [
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "megatron_config",
];

fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

impl AdapterConfig {
    pub fn read(path: &Path, model: &LlamaConfig) -> Result<Self> {
        let text = std::fs::read_to_string(path).at(path)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("malformed JSON: {e}")))?;
        Self::parse(&v, model).map_err(|m| Error::file(path, m))
    }

    fn parse(v: &Value, model: &LlamaConfig) -> std::result::Result<Self, String> {
        if !v.is_object() {
            return Err("expected a JSON object".into());
        }
        let get = |k: &str| v.get(k).filter(|x| !x.is_null());
        if let Some(t) = get("peft_type")
            && t.as_str() != Some("LORA")
        {
            return Err(format!("peft_type {t} is not \"LORA\""));
        }
        if let Some(key) = UNSUPPORTED
            .iter()
            .find(|k| get(k).is_some_and(|x| !is_unset(x)))
        {
            return Err(format!("`{key}` is set, which is not supported"));
        }
        let r = get("r")
            .and_then(Value::as_u64)
            .and_then(|r| usize::try_from(r).ok())
            .filter(|&r| r > 0)
            .ok_or("`r` must be a positive integer")?;
        // Every Llama projection has the hidden size on one side: a larger rank adds
        // nothing, and an absurd one would be allocated before anything else fails.
        if r > model.hidden_size {
            return Err(format!(
                "`r` {r} exceeds the model's hidden size {}",
                model.hidden_size
            ));
        }
        let alpha = get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or("`lora_alpha` must be a number")?;
        let use_rslora = match get("use_rslora") {
            None => false,
            Some(x) => x.as_bool().ok_or("`use_rslora` must be true or false")?,
        };
        if let Some(p) = get("layers_pattern")
            && !is_unset(p)
            && p != "layers"
            && p != &serde_json::json!(["layers"])
        {
            return Err(format!(
                "`layers_pattern` {p} is not supported (Llama blocks are `layers`)"
            ));
        }
        // PEFT's default for Llama when the config names no targets.
        let default_targets = serde_json::json!(["q_proj", "v_proj"]);
        let targets = Matcher::parse(
            get("target_modules").unwrap_or(&default_targets),
            "target_modules",
        )?;
        if let Some(t) = targets.foreign_target() {
            return Err(format!(
                "`target_modules` selects `{t}`, which is not one of the projections q/k/v/o/gate/up/down_proj"
            ));
        }
        let exclude = get("exclude_modules")
            .map(|x| Matcher::parse(x, "exclude_modules"))
            .transpose()?;
        // PEFT applies `layers_to_transform` to list targets only, not to a regex.
        let layers = match targets {
            Matcher::Names(_) => layer_filter(get("layers_to_transform"))?,
            _ => None,
        };
        let mut selected = BTreeSet::new();
        for layer in 0..model.num_layers {
            for proj in Proj::ALL {
                let key = module_key(layer, proj);
                // A list entry equal to the whole key is taken whatever the layer filter.
                let exact = matches!(&targets, Matcher::Names(n) if n.contains(&key));
                let in_layers = layers.as_ref().is_none_or(|l| l.contains(&layer));
                if targets.matches(&key)
                    && (exact || in_layers)
                    && !exclude.as_ref().is_some_and(|e| e.matches(&key))
                {
                    selected.insert((layer, proj));
                }
            }
        }
        Ok(AdapterConfig {
            r,
            alpha,
            use_rslora,
            selected,
        })
    }
}
