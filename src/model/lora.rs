//! LoRA adapters: `h = W x + s B (A x)` with `A (r, d_in)`, `B (d_out, r)`, `s = alpha/r`
//! (`alpha/sqrt(r)` with rsLoRA), stored and named exactly as PEFT does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::adapter_config::{AdapterConfig, module_key};
use super::config::LlamaConfig;
use super::proj::Proj;
use super::weights::{SafetensorsSource, finite};
use crate::error::{Error, IoContext, Result};
use crate::io::{atomic_write, write_safetensors};

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub targets: Vec<Proj>,
}

impl LoraConfig {
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            (self.alpha / (self.r as f64).sqrt()) as f32
        } else {
            (self.alpha / self.r as f64) as f32
        }
    }

    /// Parse a comma-separated module list (`all` for the seven projections).
    pub fn parse_targets(s: &str) -> Result<Vec<Proj>> {
        if s == "all" || s == "all-linear" {
            return Ok(Proj::ALL.to_vec());
        }
        let mut out = Vec::new();
        for name in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let p = Proj::from_name(name).ok_or_else(|| {
                Error::usage(format!(
                    "unknown LoRA target `{name}` (expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all)"
                ))
            })?;
            if !out.contains(&p) {
                out.push(p);
            }
        }
        if out.is_empty() {
            return Err(Error::usage("no LoRA target modules given"));
        }
        out.sort();
        Ok(out)
    }
}

/// One adapted projection. `T` is the storage: `Vec<f32>` on the host, a device buffer
/// inside a backend.
#[derive(Debug, Clone)]
pub struct LoraModule<T> {
    pub layer: usize,
    pub proj: Proj,
    pub d_in: usize,
    pub d_out: usize,
    /// `(r, d_in)`
    pub a: T,
    /// `(d_out, r)`
    pub b: T,
}

impl<T> LoraModule<T> {
    /// PEFT's module path, e.g. `base_model.model.model.layers.0.self_attn.q_proj`.
    pub fn peft_path(&self) -> String {
        format!(
            "base_model.model.model.layers.{}.{}",
            self.layer,
            self.proj.hf_path()
        )
    }
    pub fn a_name(&self) -> String {
        format!("{}.lora_A.weight", self.peft_path())
    }
    pub fn b_name(&self) -> String {
        format!("{}.lora_B.weight", self.peft_path())
    }
}

/// All adapted projections, ordered by layer then projection.
#[derive(Debug, Clone)]
pub struct LoraWeights<T> {
    pub cfg: LoraConfig,
    pub modules: Vec<LoraModule<T>>,
}

pub type HostLora = LoraWeights<Vec<f32>>;

impl<T> LoraWeights<T> {
    /// No adapter: the base model alone (rank 0, no modules), as FLOP counts and
    /// evaluations of the base model take it.
    pub fn none() -> Self {
        LoraWeights {
            cfg: LoraConfig {
                r: 0,
                alpha: 0.0,
                use_rslora: false,
                targets: Vec::new(),
            },
            modules: Vec::new(),
        }
    }

    /// Index of the module adapting `(layer, proj)`, if any.
    pub fn find(&self, layer: usize, proj: Proj) -> Option<usize> {
        self.modules
            .iter()
            .position(|m| m.layer == layer && m.proj == proj)
    }

    pub fn n_params(&self) -> usize {
        self.modules
            .iter()
            .map(|m| self.cfg.r * (m.d_in + m.d_out))
            .sum()
    }

    /// A new set of tensors with the same structure, `f(len)` making each one.
    pub fn map_sized<U>(&self, mut f: impl FnMut(usize) -> Result<U>) -> Result<LoraWeights<U>> {
        let r = self.cfg.r;
        self.rebuild(|m| Ok((f(r * m.d_in)?, f(m.d_out * r)?)))
    }

    /// Apply `f` to every module's storage.
    pub fn map<U>(&self, mut f: impl FnMut(&T) -> Result<U>) -> Result<LoraWeights<U>> {
        self.rebuild(|m| Ok((f(&m.a)?, f(&m.b)?)))
    }

    fn rebuild<U>(
        &self,
        mut f: impl FnMut(&LoraModule<T>) -> Result<(U, U)>,
    ) -> Result<LoraWeights<U>> {
        let modules = self
            .modules
            .iter()
            .map(|m| {
                let (a, b) = f(m)?;
                Ok(LoraModule {
                    layer: m.layer,
                    proj: m.proj,
                    d_in: m.d_in,
                    d_out: m.d_out,
                    a,
                    b,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LoraWeights {
            cfg: self.cfg.clone(),
            modules,
        })
    }
}

impl HostLora {
    /// PEFT's default init: `A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))` (kaiming-uniform with
    /// a = sqrt(5)), `B = 0`, from a seeded ChaCha8 stream in module order.
    pub fn init(model: &LlamaConfig, cfg: LoraConfig, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut modules = Vec::new();
        for layer in 0..model.num_layers {
            for &proj in &cfg.targets {
                let (d_in, d_out) = proj.dims(model);
                let bound = 1.0 / (d_in as f32).sqrt();
                let a = (0..cfg.r * d_in)
                    .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound)
                    .collect();
                modules.push(LoraModule {
                    layer,
                    proj,
                    d_in,
                    d_out,
                    a,
                    b: vec![0.0; d_out * cfg.r],
                });
            }
        }
        LoraWeights { cfg, modules }
    }

    /// All zeros with the same structure (gradients, optimiser moments).
    pub fn zeros_like(&self) -> Self {
        self.map(|v| Ok(vec![0.0; v.len()]))
            .unwrap_or_else(|_| unreachable!("map with an infallible closure"))
    }

    /// `(peft name, shape, data)` for every tensor, A before B, in module order.
    pub fn named_tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        let r = self.cfg.r;
        let mut out = Vec::with_capacity(2 * self.modules.len());
        for m in &self.modules {
            out.push((m.a_name(), vec![r, m.d_in], m.a.as_slice()));
            out.push((m.b_name(), vec![m.d_out, r], m.b.as_slice()));
        }
        out
    }

    /// Mutable access to every tensor in `named_tensors` order.
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut Vec<f32>> {
        self.modules.iter_mut().flat_map(|m| [&mut m.a, &mut m.b])
    }

    /// Read a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
    /// The adapted modules are those whose tensors the file holds.
    pub fn load(dir: &Path, model: &LlamaConfig) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let AdapterConfig {
            r,
            alpha,
            use_rslora,
            selected,
        } = AdapterConfig::read(&cfg_path, model)?;

        let st_path = dir.join("adapter_model.safetensors");
        if !st_path.exists() {
            return Err(Error::file(
                &st_path,
                "not found (only safetensors adapters are read)",
            ));
        }
        let src = SafetensorsSource::open_files(std::slice::from_ref(&st_path))?;
        let mut found: BTreeMap<(usize, Proj), [Option<Vec<f32>>; 2]> = BTreeMap::new();
        for name in src.names().map(str::to_string).collect::<Vec<_>>() {
            let (layer, proj, which) = parse_peft_name(&name)
                .ok_or_else(|| Error::file(&st_path, format!("unexpected tensor `{name}`")))?;
            if layer >= model.num_layers {
                return Err(Error::file(
                    &st_path,
                    format!(
                        "tensor `{name}`: layer {layer} but the model has {}",
                        model.num_layers
                    ),
                ));
            }
            let (d_in, d_out) = proj.dims(model);
            let shape = if which == 0 { [r, d_in] } else { [d_out, r] };
            let (data, got) = src.get_any(&name)?;
            if got != shape {
                return Err(Error::file(
                    &st_path,
                    format!("tensor `{name}` has shape {got:?}, expected {shape:?}"),
                ));
            }
            finite(&data).map_err(|e| Error::file(&st_path, format!("tensor `{name}` {e}")))?;
            found.entry((layer, proj)).or_default()[which] = Some(data);
        }
        if found.is_empty() {
            return Err(Error::file(&st_path, "no LoRA tensors in the adapter"));
        }
        // PEFT adapts exactly the modules its configuration selects; tensors for others
        // (or missing ones) mean the two files do not belong together.
        if let Some(&(l, p)) = selected.iter().find(|k| !found.contains_key(k)) {
            return Err(Error::file(
                &cfg_path,
                format!(
                    "`target_modules` selects {}, which adapter_model.safetensors does not adapt",
                    module_key(l, p)
                ),
            ));
        }
        if let Some(&(l, p)) = found.keys().find(|k| !selected.contains(k)) {
            return Err(Error::file(
                &cfg_path,
                format!(
                    "adapter_model.safetensors adapts {}, which `target_modules` (with `layers_to_transform`) does not select",
                    module_key(l, p)
                ),
            ));
        }
        let mut modules = Vec::new();
        let mut targets = Vec::new();
        for ((layer, proj), [a, b]) in found {
            let path = format!("layers.{layer}.{}", proj.hf_path());
            let (d_in, d_out) = proj.dims(model);
            let a = a.ok_or_else(|| Error::file(&st_path, format!("{path}: lora_A missing")))?;
            let b = b.ok_or_else(|| Error::file(&st_path, format!("{path}: lora_B missing")))?;
            if !targets.contains(&proj) {
                targets.push(proj);
            }
            modules.push(LoraModule {
                layer,
                proj,
                d_in,
                d_out,
                a,
                b,
            });
        }
        targets.sort();
        Ok(LoraWeights {
            cfg: LoraConfig {
                r,
                alpha,
                use_rslora,
                targets,
            },
            modules,
        })
    }

    /// `target_modules` and `layers_to_transform` that select exactly these modules, as
    /// `load` (and PEFT) match them: projection names on the layers held when the modules
    /// are every target on every one of those layers, else each module by its full key.
    fn peft_selection(&self) -> (Vec<String>, Option<Vec<usize>>) {
        let held: BTreeSet<(usize, Proj)> =
            self.modules.iter().map(|m| (m.layer, m.proj)).collect();
        let layers: BTreeSet<usize> = held.iter().map(|&(l, _)| l).collect();
        let product = layers.len() * self.cfg.targets.len() == held.len()
            && held.iter().all(|(_, p)| self.cfg.targets.contains(p));
        if product {
            let names = self.cfg.targets.iter().map(|p| p.name().to_string());
            (names.collect(), Some(layers.into_iter().collect()))
        } else {
            let keys = held.iter().map(|&(l, p)| module_key(l, p));
            (keys.collect(), None)
        }
    }

    /// Write a PEFT adapter directory that `PeftModel.from_pretrained` loads unchanged.
    pub fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).at(dir)?;
        let (targets, layers) = self.peft_selection();
        let config = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.cfg.r,
            "lora_alpha": self.cfg.alpha,
            "lora_dropout": 0.0,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": self.cfg.use_rslora,
            "use_dora": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": layers,
            "rank_pattern": {},
            "alpha_pattern": {},
        });
        let tensors: Vec<(String, Vec<usize>, &[f32])> = self.named_tensors();
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, meta)?;
        let text = serde_json::to_string_pretty(&config).unwrap_or_default();
        atomic_write(&dir.join("adapter_config.json"), text.as_bytes())
    }
}

/// `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}[.default].weight`
/// into `(layer, proj, 0 for A / 1 for B)`.
pub fn parse_peft_name(name: &str) -> Option<(usize, Proj, usize)> {
    let rest = name.strip_prefix("base_model.model.model.layers.")?;
    let rest = rest.strip_suffix(".weight")?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    let mut parts = rest.split('.');
    let layer = parts.next()?.parse().ok()?;
    let parent = parts.next()?;
    let proj = Proj::from_name(parts.next()?)?;
    let which = match parts.next()? {
        "lora_A" => 0,
        "lora_B" => 1,
        _ => return None,
    };
    let expected_parent = proj.hf_path();
    if parts.next().is_some() || !expected_parent.starts_with(parent) {
        return None;
    }
    Some((layer, proj, which))
}
