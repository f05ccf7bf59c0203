//! The curvature file (safetensors, DESIGN §8): `mean.<peft param>` (theta*),
//! `diag.<peft param>`, `kfac_in.<peft module>` / `kfac_out.<peft module>` (module =
//! `...q_proj.lora_A` / `...q_proj.lora_B`), `kfac_cross_in.<layer>` /
//! `kfac_cross_out.<layer>` (layer = `...q_proj`); sums, not means. `__metadata__` holds
//! the scheme, Fisher type, approximation, sample count, data size, LoRA config and model.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Fisher, KfacApprox, Scheme};
use crate::error::{Error, Result};
use crate::io::{TensorFile, write_safetensors};
use crate::model::config::LlamaConfig;
use crate::model::lora::parse_peft_name;
use crate::model::{HostLora, LoraConfig, LoraModule, LoraWeights};

#[derive(Debug, Clone)]
pub struct CurvatureMeta {
    pub scheme: Scheme,
    pub fisher: Fisher,
    pub approx: KfacApprox,
    pub n_sequences: usize,
    pub n_positions: usize,
    /// The model's identity (file name and size).
    pub model: String,
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
        meta.insert("format".into(), "lalora-curvature/1".into());
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
        write_safetensors(path, &t, meta)
    }

    /// Read a curvature file, checking every shape against the model.
    pub fn read(path: &Path, model: &LlamaConfig) -> Result<Self> {
        let f = TensorFile::read(path)?;
        let bad = |m: String| Error::file(path, m);
        let md = |k: &str| {
            f.metadata
                .get(k)
                .cloned()
                .ok_or_else(|| bad(format!("metadata lacks `{k}` (not a curvature file?)")))
        };
        let num = |k: &str| -> Result<usize> {
            md(k)?
                .parse()
                .map_err(|_| bad(format!("metadata `{k}` is not a number")))
        };
        let scheme: Scheme = md("scheme")?.parse().map_err(bad)?;
        let approx: KfacApprox = md("approx")?.parse().map_err(bad)?;
        let fisher = match md("fisher")?.as_str() {
            "empirical" => Fisher::Empirical,
            "mc" => Fisher::Mc(num("mc_samples")?),
            other => return Err(bad(format!("unknown fisher `{other}`"))),
        };
        let r = num("lora_r")?;
        let alpha: f64 = md("lora_alpha")?
            .parse()
            .map_err(|_| bad("bad `lora_alpha`".into()))?;
        let use_rslora = md("lora_rslora")? == "true";
        let targets = LoraConfig::parse_targets(&md("lora_targets")?)?;
        let mut modules = Vec::new();
        for (name, (shape, data)) in &f.tensors {
            let Some(rest) = name.strip_prefix("mean.") else {
                continue;
            };
            let (layer, proj, which) =
                parse_peft_name(rest).ok_or_else(|| bad(format!("unexpected tensor `{name}`")))?;
            if which != 0 || layer >= model.num_layers {
                continue;
            }
            let (d_in, d_out) = proj.dims(model);
            let mut m = LoraModule {
                layer,
                proj,
                d_in,
                d_out,
                a: data.clone(),
                b: Vec::new(),
            };
            if shape != &[r, d_in] {
                return Err(bad(format!(
                    "`{name}` has shape {shape:?}, expected {:?}",
                    [r, d_in]
                )));
            }
            let b_name = format!("mean.{}", m.b_name());
            m.b = tensor(&f, &b_name, &[d_out, r], path)?;
            modules.push(m);
        }
        modules.sort_by_key(|m| (m.layer, m.proj));
        if modules.is_empty() {
            return Err(bad("no `mean.*` tensors".into()));
        }
        let mean = LoraWeights {
            cfg: LoraConfig {
                r,
                alpha,
                use_rslora,
                targets,
            },
            modules,
        };
        let diag = if scheme == Scheme::Diag {
            let mut d = mean.zeros_like();
            for m in d.modules.iter_mut() {
                m.a = tensor(&f, &format!("diag.{}", m.a_name()), &[r, m.d_in], path)?;
                m.b = tensor(&f, &format!("diag.{}", m.b_name()), &[m.d_out, r], path)?;
            }
            Some(d)
        } else {
            None
        };
        let kfac = if scheme == Scheme::Diag {
            None
        } else {
            let mut out = Vec::new();
            for m in &mean.modules {
                let p = m.peft_path();
                let (din, dout) = (m.d_in, m.d_out);
                out.push(KfacFactors {
                    a_in: tensor(&f, &format!("kfac_in.{p}.lora_A"), &[din, din], path)?,
                    a_out: tensor(&f, &format!("kfac_out.{p}.lora_A"), &[r, r], path)?,
                    b_in: tensor(&f, &format!("kfac_in.{p}.lora_B"), &[r, r], path)?,
                    b_out: tensor(&f, &format!("kfac_out.{p}.lora_B"), &[dout, dout], path)?,
                    cross: if scheme == Scheme::KfacTri {
                        Some((
                            tensor(&f, &format!("kfac_cross_in.{p}"), &[din, r], path)?,
                            tensor(&f, &format!("kfac_cross_out.{p}"), &[r, dout], path)?,
                        ))
                    } else {
                        None
                    },
                });
            }
            Some(out)
        };
        Ok(Curvature {
            meta: CurvatureMeta {
                scheme,
                fisher,
                approx,
                n_sequences: num("n_sequences")?,
                n_positions: num("n_positions")?,
                model: f.metadata.get("model").cloned().unwrap_or_default(),
            },
            mean,
            diag,
            kfac,
        })
    }
}

fn tensor(f: &TensorFile, name: &str, shape: &[usize], path: &Path) -> Result<Vec<f32>> {
    let (s, d) = f
        .tensors
        .get(name)
        .ok_or_else(|| Error::file(path, format!("tensor `{name}` missing")))?;
    if s != shape {
        return Err(Error::file(
            path,
            format!("`{name}` has shape {s:?}, expected {shape:?}"),
        ));
    }
    Ok(d.clone())
}
