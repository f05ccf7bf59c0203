//! Stage I: a Laplace approximation of the LoRA weights, estimated on source data at
//! `theta*` (DESIGN §5).
//!
//! - `diag`: `F = sum_n (d l_n/d theta)^2` with `l_n` the summed token loss of sequence n;
//! - `kfac`: per A and per B a Kronecker block `C (x) G` (curvlinops' KFAC, `expand` or
//!   `reduce`), `vec(D)^T (C (x) G) vec(D) = tr(D^T G D C)`;
//! - `kfac-tri`: `kfac` plus the A-B cross block `C_AB (x) G_AB` of each layer.
//!
//! Fisher types: `empirical` backpropagates the data labels; `mc` backpropagates labels
//! drawn from the model's softmax at every target position, each of the k samples
//! weighted 1/k. All quantities are sums over the data (not means); the penalty divides
//! by N.

pub mod accumulate;
pub mod baseline;
pub mod file;
pub mod self_data;
pub mod summary;

use std::fmt;
use std::str::FromStr;

pub use self::accumulate::Accumulator;
pub use self::file::{Curvature, CurvatureMeta, KfacFactors};

use crate::backend::{Backend, CeTargets};
use crate::data::{Batch, Example, batches};
use crate::error::{Error, Result};
use crate::model::{HostLora, Llama, LoraWeights};
use crate::train::finite::{first_non_finite, non_finite};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Diag,
    Kfac,
    KfacTri,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fisher {
    Empirical,
    /// Monte-Carlo Fisher with this many label samples per position.
    Mc(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KfacApprox {
    Expand,
    Reduce,
}

macro_rules! names {
    ($t:ty { $($v:ident = $s:literal),* }) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $(Self::$v => $s),* })
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $($s => Ok(Self::$v),)*
                    _ => Err(format!("`{s}` is not one of: {}", [$($s),*].join(", "))),
                }
            }
        }
    };
}
names!(Scheme { Diag = "diag", Kfac = "kfac", KfacTri = "kfac-tri" });
names!(KfacApprox { Expand = "expand", Reduce = "reduce" });

impl fmt::Display for Fisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fisher::Empirical => f.write_str("empirical"),
            Fisher::Mc(_) => f.write_str("mc"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub scheme: Scheme,
    pub fisher: Fisher,
    pub approx: KfacApprox,
    /// Seeds the Monte-Carlo label sampling.
    pub seed: u64,
}

/// Seed of one Monte-Carlo draw, distinct per batch and sample.
fn mc_seed(seed: u64, batch: usize, sample: usize) -> u64 {
    seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (batch as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ (sample as u64).wrapping_mul(0x1656_67b1_9e37_79f9)
}

/// Estimate the curvature at `lora` (= theta*) over `examples`, streaming batch by batch.
pub fn estimate<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: &LoraWeights<B::Buf>,
    examples: &[Example],
    batch_size: usize,
    spec: Spec,
    mut on_batch: impl FnMut(),
) -> Result<Curvature> {
    if let Fisher::Mc(0) = spec.fisher {
        return Err(Error::usage("--mc-samples must be at least 1"));
    }
    if examples.iter().all(|e| e.n_targets() == 0) {
        // Every gradient would be zero: a curvature of nothing, not an estimate.
        return Err(Error::usage(
            "the curvature data have no target tokens (every label is -100)",
        ));
    }
    let mut acc = Accumulator::new(be, lora, spec.scheme, spec.approx)?;
    let (mut n_positions, mut n_sequences) = (0usize, 0usize);
    for (bi, batch) in batches(examples, batch_size).enumerate() {
        accumulate_batch(be, model, lora, &mut acc, &batch, bi, spec)?;
        n_positions += batch.segments.iter().map(|s| s.len).sum::<usize>();
        n_sequences += batch.batch;
        on_batch();
    }
    acc.finish(be, n_positions, n_sequences)?;
    read_out(be, lora, acc, spec, n_positions, n_sequences)
}

/// One batch (the `bi`-th) of a curvature estimate into `acc`: its forward, then per label
/// sample the classifier and the backward whose observer `acc` is (the pass whose cost the
/// curvature benches compare with a training step's).
pub fn accumulate_batch<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: &LoraWeights<B::Buf>,
    acc: &mut Accumulator<B>,
    batch: &Batch,
    bi: usize,
    spec: Spec,
) -> Result<()> {
    let acts = model.forward(be, Some(lora), batch, true)?;
    let samples = match spec.fisher {
        Fisher::Empirical => 1,
        Fisher::Mc(k) => k,
    };
    for s in 0..samples {
        let targets = match spec.fisher {
            Fisher::Empirical => CeTargets::Labels(&batch.targets),
            Fisher::Mc(_) => CeTargets::Sample {
                mask: &batch.targets,
                seed: mc_seed(spec.seed, bi, s),
            },
        };
        let out = model.classify(be, &acts, targets, Some(1.0))?;
        if out.losses.iter().any(|l| !l.is_finite()) {
            return Err(non_finite(format!("curvature batch {}", bi + 1), "loss"));
        }
        let dxn = out
            .dhidden
            .ok_or_else(|| Error::usage("the classifier returned no gradient"))?;
        acc.begin(&batch.segments, 1.0 / samples as f32, s == 0);
        model.backward(be, Some(lora), &acts, &dxn, None, Some(&mut *acc))?;
    }
    Ok(())
}

/// The estimate of a finished accumulator, on the host (every factor read back from the
/// device: for KFAC at Llama-3.2-1B's shapes about 15 GB, a cost per estimate, not per
/// batch). The accumulator is consumed: each factor's buffer is freed (on the CPU, handed
/// over) as it is read, so the estimate is never held twice.
pub fn read_out<B: Backend>(
    be: &B,
    lora: &LoraWeights<B::Buf>,
    acc: Accumulator<B>,
    spec: Spec,
    n_positions: usize,
    n_sequences: usize,
) -> Result<Curvature> {
    let host = |x: &B::Buf| be.to_host(x);
    let mean: HostLora = lora.map(host)?;
    let take = |x: B::Buf| be.take_host(x);
    let diag = match acc.diag {
        Some(d) => {
            let mut f = mean.zeros_like();
            for (m, (fa, fb)) in f.modules.iter_mut().zip(d.f) {
                m.a = take(fa)?;
                m.b = take(fb)?;
            }
            Some(f)
        }
        None => None,
    };
    let kfac = match acc.kfac {
        Some(k) => Some(
            k.factors
                .into_iter()
                .map(|f| {
                    Ok(KfacFactors {
                        a_in: take(f.a_in)?,
                        a_out: take(f.a_out)?,
                        b_in: take(f.b_in)?,
                        b_out: take(f.b_out)?,
                        cross: match f.cross {
                            Some((c, g)) => Some((take(c)?, take(g)?)),
                            None => None,
                        },
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        None => None,
    };
    let c = Curvature {
        meta: CurvatureMeta {
            scheme: spec.scheme,
            fisher: spec.fisher,
            approx: spec.approx,
            n_sequences,
            n_positions,
            model: String::new(),
            data: String::new(),
        },
        mean,
        diag,
        kfac,
    };
    if let Some(name) = first_non_finite(c.named_tensors()) {
        return Err(non_finite(
            "curvature estimate",
            format!("values in `{name}`"),
        ));
    }
    Ok(c)
}

impl Curvature {
    /// Bytes of all its values as f32: θ* and the curvature (`diag`: as many numbers as
    /// LoRA weights; `kfac`: the factors). The file's data, and what a loaded penalty
    /// keeps on the device beside plain LoRA.
    pub fn value_bytes(&self) -> u64 {
        self.named_tensors()
            .iter()
            .map(|(_, d)| 4 * d.len() as u64)
            .sum()
    }

    /// Every tensor under its name in the curvature file (`mean.<peft param>`,
    /// `diag.<peft param>`, `kfac_in.<peft module>`, ...), for checks and digests.
    pub fn named_tensors(&self) -> Vec<(String, &[f32])> {
        let mut t: Vec<(String, &[f32])> = Vec::new();
        for (prefix, w) in [("mean", Some(&self.mean)), ("diag", self.diag.as_ref())] {
            for (name, _, data) in w.iter().flat_map(|w| w.named_tensors()) {
                t.push((format!("{prefix}.{name}"), data));
            }
        }
        for (m, f) in self.mean.modules.iter().zip(self.kfac.iter().flatten()) {
            let p = m.peft_path();
            t.push((format!("kfac_in.{p}.lora_A"), &f.a_in));
            t.push((format!("kfac_out.{p}.lora_A"), &f.a_out));
            t.push((format!("kfac_in.{p}.lora_B"), &f.b_in));
            t.push((format!("kfac_out.{p}.lora_B"), &f.b_out));
            if let Some((c, g)) = &f.cross {
                t.push((format!("kfac_cross_in.{p}"), c));
                t.push((format!("kfac_cross_out.{p}"), g));
            }
        }
        t
    }
}
