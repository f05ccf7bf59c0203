//! The curvature file (safetensors, DESIGN §8): `mean.<peft param>` (theta*),
//! `diag.<peft param>`, `kfac_in.<peft module>` / `kfac_out.<peft module>` (module =
//! `...q_proj.lora_A` / `...q_proj.lora_B`), `kfac_cross_in.<layer>` /
//! `kfac_cross_out.<layer>` (layer = `...q_proj`); sums, not means. `__metadata__` holds
//! the scheme, Fisher type, approximation, sample count, data size, LoRA config, model and
//! source data (a file name, or how a self-generated set was sampled).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

mod check;

use super::{Fisher, KfacApprox, Scheme};
use crate::error::{Error, Result};
use crate::io::{TensorFile, write_safetensors};
use crate::model::config::LlamaConfig;
use crate::model::lora::parse_peft_name;
use crate::model::{HostLora, LoadedModel, LoraConfig, LoraModule, LoraWeights};

/// The `format` metadata of every curvature file.
const FORMAT: &str = "lalora-curvature/1";

#[derive(Debug, Clone)]
pub struct CurvatureMeta {
    pub scheme: Scheme,
    pub fisher: Fisher,
    pub approx: KfacApprox,
    pub n_sequences: usize,
    pub n_positions: usize,
    /// The model's identity (file name and size).
    pub model: String,
    /// The source data: the file given, or how a self-generated set was sampled
    /// (`self_data`); empty in files written before it was recorded.
    pub data: String,
}

/// One module's Kronecker factors (see `accumulate::KfacState`).
#[derive(Debug, Clone)]
pub struct KfacFactors {
    /// `C_A (d_in, d_in)`
    pub a_in: Vec<f32>,
    /// `G_A (r, r)`
    pub a_out: Vec<f32>,
    /// `C_B (r, r)`
    pub b_in: Vec<f32>,
    /// `G_B (d_out, d_out)`
    pub b_out: Vec<f32>,
    /// `(C_AB (d_in, r), G_AB (r, d_out))` for kfac-tri.
    pub cross: Option<(Vec<f32>, Vec<f32>)>,
}

#[derive(Debug, Clone)]
pub struct Curvature {
    pub meta: CurvatureMeta,
    /// theta*, the point the curvature was estimated at.
    pub mean: HostLora,
    /// `diag` scheme: `F` with the structure of the LoRA weights.
    pub diag: Option<HostLora>,
    /// `kfac` / `kfac-tri`: factors per module, in `mean.modules` order.
    pub kfac: Option<Vec<KfacFactors>>,
}

impl Curvature {
    pub fn write(&self, path: &Path) -> Result<()> {
        let r = self.mean.cfg.r;
        let mut t: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
        for (name, shape, data) in self.mean.named_tensors() {
            t.push((format!("mean.{name}"), shape, data));
        }
        if let Some(d) = &self.diag {
            for (name, shape, data) in d.named_tensors() {
                t.push((format!("diag.{name}"), shape, data));
            }
        }
        if let Some(k) = &self.kfac {
            for (m, f) in self.mean.modules.iter().zip(k) {
                let p = m.peft_path();
                let (din, dout) = (m.d_in, m.d_out);
                t.push((format!("kfac_in.{p}.lora_A"), vec![din, din], &f.a_in));
                t.push((format!("kfac_out.{p}.lora_A"), vec![r, r], &f.a_out));
                t.push((format!("kfac_in.{p}.lora_B"), vec![r, r], &f.b_in));
                t.push((format!("kfac_out.{p}.lora_B"), vec![dout, dout], &f.b_out));
                if let Some((c, g)) = &f.cross {
                    t.push((format!("kfac_cross_in.{p}"), vec![din, r], c));
                    t.push((format!("kfac_cross_out.{p}"), vec![r, dout], g));
                }
            }
        }
        let m = &self.meta;
        let lc = &self.mean.cfg;
        let mut meta = BTreeMap::new();
        meta.insert("format".into(), FORMAT.into());
        meta.insert("scheme".into(), m.scheme.to_string());
        meta.insert("fisher".into(), m.fisher.to_string());
        meta.insert("approx".into(), m.approx.to_string());
        let k = match m.fisher {
            Fisher::Mc(k) => k,
            Fisher::Empirical => 0,
        };
        meta.insert("mc_samples".into(), k.to_string());
        meta.insert("n_sequences".into(), m.n_sequences.to_string());
        meta.insert("n_positions".into(), m.n_positions.to_string());
        meta.insert("lora_r".into(), lc.r.to_string());
        meta.insert("lora_alpha".into(), lc.alpha.to_string());
        meta.insert("lora_rslora".into(), lc.use_rslora.to_string());
        meta.insert(
            "lora_targets".into(),
            lc.targets
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join(","),
        );
        meta.insert("model".into(), m.model.clone());
        meta.insert("data".into(), m.data.clone());
        write_safetensors(path, &t, meta)
    }

    /// Read a curvature file, checking it against the model: metadata in range, exactly
    /// the tensors its scheme and LoRA configuration call for with the model's shapes, every
    /// value finite, a non-negative diagonal and symmetric PSD Kronecker factors.
    pub fn read(path: &Path, model: &LlamaConfig) -> Result<Self> {
        let f = TensorFile::read(path)?;
        let bad = |m: String| Error::file(path, m);
        let md = |k: &str| {
            f.metadata
                .get(k)
                .map(String::as_str)
                .ok_or_else(|| bad(format!("metadata lacks `{k}` (not a curvature file?)")))
        };
        let num = |k: &str, min: usize| -> Result<usize> {
            md(k)?
                .parse()
                .ok()
                .filter(|&n| n >= min)
                .ok_or_else(|| bad(format!("metadata `{k}` must be an integer >= {min}")))
        };
        if md("format")? != FORMAT {
            return Err(bad(format!("metadata `format` is not `{FORMAT}`")));
        }
        let scheme: Scheme = md("scheme")?.parse().map_err(bad)?;
        let approx: KfacApprox = md("approx")?.parse().map_err(bad)?;
        let fisher = match md("fisher")? {
            "empirical" => Fisher::Empirical,
            "mc" => Fisher::Mc(num("mc_samples", 1)?),
            other => return Err(bad(format!("unknown fisher `{other}`"))),
        };
        let n_sequences = num("n_sequences", 1)?;
        let n_positions = num("n_positions", n_sequences)?;
        let r = num("lora_r", 1)?;
        if r > model.hidden_size {
            return Err(bad(format!(
                "metadata `lora_r` {r} exceeds the model's hidden size {}",
                model.hidden_size
            )));
        }
        let alpha = md("lora_alpha")?
            .parse::<f64>()
            .ok()
            .filter(|a| a.is_finite())
            .ok_or_else(|| bad("metadata `lora_alpha` must be a finite number".into()))?;
        let use_rslora = match md("lora_rslora")? {
            "true" => true,
            "false" => false,
            other => {
                return Err(bad(format!(
                    "metadata `lora_rslora` is `{other}`, not true or false"
                )));
            }
        };
        let targets = LoraConfig::parse_targets(md("lora_targets")?)
            .map_err(|e| bad(format!("metadata `lora_targets`: {e}")))?;
        let mean = LoraWeights {
            cfg: LoraConfig {
                r,
                alpha,
                use_rslora,
                targets,
            },
            modules: mean_modules(&f, model, path)?,
        };
        check_tensors(&f, &mean, scheme).map_err(bad)?;
        let meta = CurvatureMeta {
            scheme,
            fisher,
            approx,
            n_sequences,
            n_positions,
            model: md("model")?.to_string(),
            data: f.metadata.get("data").cloned().unwrap_or_default(),
        };
        // Every tensor is present now (check_tensors); each is moved out, not copied.
        let mut f = f;
        let mut fill = |prefix: &str, w: &HostLora| {
            let mut w = w.clone();
            for m in &mut w.modules {
                m.a = f.take(&format!("{prefix}.{}", m.a_name()));
                m.b = f.take(&format!("{prefix}.{}", m.b_name()));
            }
            w
        };
        let mean = fill("mean", &mean);
        let diag = (scheme == Scheme::Diag).then(|| fill("diag", &mean));
        let kfac = (scheme != Scheme::Diag).then(|| {
            mean.modules
                .iter()
                .map(|m| {
                    let p = m.peft_path();
                    KfacFactors {
                        a_in: f.take(&format!("kfac_in.{p}.lora_A")),
                        a_out: f.take(&format!("kfac_out.{p}.lora_A")),
                        b_in: f.take(&format!("kfac_in.{p}.lora_B")),
                        b_out: f.take(&format!("kfac_out.{p}.lora_B")),
                        cross: (scheme == Scheme::KfacTri).then(|| {
                            (
                                f.take(&format!("kfac_cross_in.{p}")),
                                f.take(&format!("kfac_cross_out.{p}")),
                            )
                        }),
                    }
                })
                .collect()
        });
        Ok(Curvature {
            meta,
            mean,
            diag,
            kfac,
        })
    }

    /// Read a curvature file for use with `model`: as `read`, and estimated on that model.
    pub fn read_for(path: &Path, model: &LoadedModel) -> Result<Self> {
        let c = Self::read(path, &model.cfg)?;
        if c.meta.model != model.identity {
            return Err(Error::file(
                path,
                format!(
                    "estimated on model `{}`, not on `{}` ({})",
                    c.meta.model,
                    model.identity,
                    model.path.display()
                ),
            ));
        }
        Ok(c)
    }

    /// The LoRA configuration and modules of `lora` (`what`: where it comes from) must be
    /// the ones this file was estimated for.
    pub fn check_lora(&self, path: &Path, lora: &HostLora, what: &str) -> Result<()> {
        let (c, l) = (&self.mean.cfg, &lora.cfg);
        let modules = |w: &HostLora| {
            w.modules
                .iter()
                .map(|m| (m.layer, m.proj))
                .collect::<Vec<_>>()
        };
        if c != l || modules(&self.mean) != modules(lora) {
            return Err(Error::file(
                path,
                format!(
                    "estimated for LoRA {} but {what} is LoRA {}",
                    describe(&self.mean),
                    describe(lora)
                ),
            ));
        }
        Ok(())
    }
}

/// `r=8 alpha=16 on q_proj,v_proj (24 modules)`.
fn describe(w: &HostLora) -> String {
    format!(
        "r={} alpha={}{} on {} ({} modules)",
        w.cfg.r,
        w.cfg.alpha,
        if w.cfg.use_rslora { " rslora" } else { "" },
        w.cfg
            .targets
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(","),
        w.modules.len()
    )
}

/// The modules of the `mean.*` tensors (data still empty), each in the model.
fn mean_modules(
    f: &TensorFile,
    model: &LlamaConfig,
    path: &Path,
) -> Result<Vec<LoraModule<Vec<f32>>>> {
    let bad = |m: String| Error::file(path, m);
    let mut found = BTreeSet::new();
    for name in f.tensors.keys() {
        let Some(rest) = name.strip_prefix("mean.") else {
            continue;
        };
        let (layer, proj, _) =
            parse_peft_name(rest).ok_or_else(|| bad(format!("unexpected tensor `{name}`")))?;
        if layer >= model.num_layers {
            return Err(bad(format!(
                "`{name}`: layer {layer}, but the model has {} layers",
                model.num_layers
            )));
        }
        found.insert((layer, proj));
    }
    if found.is_empty() {
        return Err(bad("no `mean.*` tensors".into()));
    }
    Ok(found
        .into_iter()
        .map(|(layer, proj)| {
            let (d_in, d_out) = proj.dims(model);
            LoraModule {
                layer,
                proj,
                d_in,
                d_out,
                a: Vec::new(),
                b: Vec::new(),
            }
        })
        .collect())
}

/// Exactly the tensors `scheme` calls for, each with its shape and with valid numbers.
fn check_tensors(
    f: &TensorFile,
    mean: &HostLora,
    scheme: Scheme,
) -> std::result::Result<(), String> {
    let mut targets: Vec<_> = mean.modules.iter().map(|m| m.proj).collect();
    targets.sort();
    targets.dedup();
    if targets != mean.cfg.targets {
        return Err("metadata `lora_targets` disagrees with the `mean.*` tensors".into());
    }
    let r = mean.cfg.r;
    let mut expected: BTreeMap<String, (Vec<usize>, Kind)> = BTreeMap::new();
    for m in &mean.modules {
        let (a, b) = (m.a_name(), m.b_name());
        let (din, dout, p) = (m.d_in, m.d_out, m.peft_path());
        expected.insert(format!("mean.{a}"), (vec![r, din], Kind::Any));
        expected.insert(format!("mean.{b}"), (vec![dout, r], Kind::Any));
        if scheme == Scheme::Diag {
            expected.insert(format!("diag.{a}"), (vec![r, din], Kind::Diagonal));
            expected.insert(format!("diag.{b}"), (vec![dout, r], Kind::Diagonal));
            continue;
        }
        expected.insert(
            format!("kfac_in.{p}.lora_A"),
            (vec![din, din], Kind::Factor),
        );
        expected.insert(format!("kfac_out.{p}.lora_A"), (vec![r, r], Kind::Factor));
        expected.insert(format!("kfac_in.{p}.lora_B"), (vec![r, r], Kind::Factor));
        expected.insert(
            format!("kfac_out.{p}.lora_B"),
            (vec![dout, dout], Kind::Factor),
        );
        if scheme == Scheme::KfacTri {
            expected.insert(format!("kfac_cross_in.{p}"), (vec![din, r], Kind::Any));
            expected.insert(format!("kfac_cross_out.{p}"), (vec![r, dout], Kind::Any));
        }
    }
    if let Some(name) = f.tensors.keys().find(|n| !expected.contains_key(*n)) {
        return Err(format!(
            "unexpected tensor `{name}` for a {scheme} curvature file"
        ));
    }
    for (name, (shape, kind)) in &expected {
        let (s, data) = f
            .tensors
            .get(name)
            .ok_or_else(|| format!("tensor `{name}` missing"))?;
        if s != shape {
            return Err(format!("`{name}` has shape {s:?}, expected {shape:?}"));
        }
        let checked = check::finite(data).and_then(|()| match kind {
            Kind::Any => Ok(()),
            Kind::Diagonal => check::non_negative(data),
            Kind::Factor => check::symmetric_psd(data, shape[0]),
        });
        checked.map_err(|e| format!("`{name}` {e}"))?;
    }
    Ok(())
}

/// What a tensor of the file holds, for its value checks.
enum Kind {
    Any,
    Diagonal,
    Factor,
}
