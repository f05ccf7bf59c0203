//! The training loop: mean token cross-entropy over each (accumulated) batch, global-norm
//! clipping of that gradient, then AdamW with the Laplace penalty's gradient added in the
//! step (fused for diag). Deterministic on the CPU for a given seed and thread count: the
//! data order of step t follows from (seed, t) alone, so a resumed run is bit-identical.

use std::time::Instant;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::finite;
use super::grad::accumulate_gradients;
use super::penalty::Penalty;
use crate::backend::{AdamHyper, Backend};
use crate::data::{Batch, Example};
use crate::error::{Error, Result};
use crate::model::{HostLora, Llama, LoraWeights};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cosine" => Ok(Schedule::Cosine),
            "linear" => Ok(Schedule::Linear),
            "constant" => Ok(Schedule::Constant),
            _ => Err(format!("`{s}` is not one of: cosine, linear, constant")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f32,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Clip the loss gradient to this global norm (0: no clipping).
    pub clip: f32,
    pub seed: u64,
    pub lambda: f32,
    pub delta: f32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 100,
            batch_size: 8,
            grad_accum: 1,
            lr: 1e-3,
            warmup_steps: 0,
            schedule: Schedule::Cosine,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip: 1.0,
            seed: 0,
            lambda: 0.0,
            delta: 1e-6,
        }
    }
}

impl TrainConfig {
    /// Learning rate of 0-based step `t`: a linear warm-up `lr t / warmup_steps` (so step 0
    /// takes no step at all when there is a warm-up), then cosine or linear decay to 0 at
    /// `steps`, or constant: transformers' `get_{cosine,linear,constant}_schedule_with_warmup`
    /// as its optimiser steps use them (tests/lr_schedule.rs holds them to transformers').
    pub fn lr_at(&self, t: usize) -> f32 {
        if t < self.warmup_steps {
            return self.lr * t as f32 / self.warmup_steps as f32;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f32;
        let progress = ((t - self.warmup_steps) as f32 / span).min(1.0);
        match self.schedule {
            Schedule::Cosine => self.lr * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos()),
            Schedule::Linear => self.lr * (1.0 - progress),
            Schedule::Constant => self.lr,
        }
    }
}

/// The examples of every micro-batch, in order: epoch e is a permutation of the data
/// seeded by (seed, e), and the batches run through the epochs back to back.
pub struct DataOrder {
    n: usize,
    seed: u64,
    epoch: usize,
    perm: Vec<usize>,
}

impl DataOrder {
    pub fn new(n: usize, seed: u64) -> Self {
        let mut o = DataOrder {
            n,
            seed,
            epoch: usize::MAX,
            perm: Vec::new(),
        };
        o.set_epoch(0);
        o
    }

    fn set_epoch(&mut self, e: usize) {
        if e != self.epoch {
            self.perm = (0..self.n).collect();
            let mut rng = ChaCha8Rng::seed_from_u64(
                self.seed ^ (e as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            self.perm.shuffle(&mut rng);
            self.epoch = e;
        }
    }

    /// Indices of the `size` examples starting at global position `start`.
    pub fn take(&mut self, start: usize, size: usize) -> Vec<usize> {
        (start..start + size)
            .map(|q| {
                self.set_epoch(q / self.n);
                self.perm[q % self.n]
            })
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    pub penalty: f64,
    pub lr: f32,
    pub grad_norm: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
}

impl StepMetrics {
    /// `metrics.jsonl`: one JSON object per step.
    pub fn jsonl(all: &[StepMetrics]) -> String {
        all.iter()
            .map(|m| serde_json::to_string(m).unwrap_or_default() + "\n")
            .collect()
    }
}

/// Trainable state: the weights and AdamW moments on the device, and the step count.
pub struct TrainState<B: Backend> {
    pub lora: LoraWeights<B::Buf>,
    pub m: LoraWeights<B::Buf>,
    pub v: LoraWeights<B::Buf>,
    pub step: usize,
}

impl<B: Backend> TrainState<B> {
    pub fn fresh(be: &B, init: &HostLora) -> Result<Self> {
        Ok(TrainState {
            lora: init.map(|x| be.buf(x.clone()))?,
            m: init.map_sized(|n| be.zeros(n))?,
            v: init.map_sized(|n| be.zeros(n))?,
            step: 0,
        })
    }

    pub fn to_host(&self, be: &B) -> Result<(HostLora, HostLora, HostLora)> {
        let h = |x: &B::Buf| be.to_host(x);
        Ok((self.lora.map(h)?, self.m.map(h)?, self.v.map(h)?))
    }
}

fn tensors_mut<T>(w: &mut LoraWeights<T>) -> impl Iterator<Item = &mut T> {
    w.modules.iter_mut().flat_map(|m| [&mut m.a, &mut m.b])
}

/// Run steps `state.step .. until` (at most `cfg.steps`), calling `on_step` after each.
#[allow(clippy::too_many_arguments)]
pub fn train<B: Backend>(
    be: &B,
    model: &Llama<B>,
    data: &[Example],
    cfg: &TrainConfig,
    penalty: Option<&Penalty<B>>,
    state: &mut TrainState<B>,
    until: usize,
    mut on_step: impl FnMut(&StepMetrics, &TrainState<B>) -> Result<()>,
) -> Result<()> {
    if data.is_empty() {
        return Err(Error::usage("no training data"));
    }
    if cfg.batch_size == 0 || cfg.grad_accum == 0 {
        return Err(Error::usage(
            "--batch-size and --grad-accum must be positive",
        ));
    }
    if data.iter().all(|e| e.n_targets() == 0) {
        return Err(Error::usage(
            "the training data have no target tokens (every label is -100)",
        ));
    }
    let mut order = DataOrder::new(data.len(), cfg.seed);
    let per_step = cfg.batch_size * cfg.grad_accum;
    let mut pen_grads = Vec::new();
    while state.step < until.min(cfg.steps) {
        let t0 = Instant::now();
        let t = state.step;
        let micro: Vec<Batch> = (0..cfg.grad_accum)
            .map(|j| {
                let idx = order.take(t * per_step + j * cfg.batch_size, cfg.batch_size);
                Batch::new(&idx.iter().map(|&i| &data[i]).collect::<Vec<_>>())
            })
            .collect();
        let n_targets: usize = micro.iter().map(|b| b.n_targets).sum();
        let tokens: usize = micro
            .iter()
            .map(|b| b.segments.iter().map(|s| s.len).sum::<usize>())
            .sum();
        let mut grads = state.lora.map_sized(|n| be.zeros(n))?;
        let scale = 1.0 / n_targets.max(1) as f32;
        let mut loss_sum = 0f64;
        for b in &micro {
            loss_sum +=
                accumulate_gradients(be, model, &state.lora, b, scale, &mut grads)?.loss_sum;
        }
        // Checked in the order they arise, so the message names the first non-finite one;
        // an error here leaves the last checkpoint as the last good state.
        let at = format!("step {}", t + 1);
        finite::check_value(loss_sum, &at, "loss")?;
        // The gradient norms and the penalty's dot products in one `dots` call: on a GPU
        // the step waits for the device here, once, and once more for the finiteness
        // check after the update (and once per micro-batch for its losses).
        let terms = penalty.map(|p| p.terms(be, &state.lora)).transpose()?;
        let mut pairs: Vec<_> = finite::norm_pairs(&grads).collect();
        if let Some(t) = &terms {
            pairs.extend(t.pairs());
        }
        let dots = be.dots(&pairs)?;
        drop(pairs); // ends its borrows of `grads` and `terms`
        let (sq, pen_dots) = dots.split_at(2 * grads.modules.len());
        finite::check_norms(&grads, sq, &at, "gradient")?;
        let norm = sq.iter().sum::<f64>().sqrt();
        let clip_scale = if cfg.clip > 0.0 && norm > cfg.clip as f64 {
            (cfg.clip as f64 / norm) as f32
        } else {
            1.0
        };
        let pen_value = match (penalty, terms) {
            (Some(p), Some(t)) => p.finish(be, t, pen_dots, cfg.lambda, Some(&mut pen_grads))?,
            _ => 0.0,
        };
        finite::check_value(pen_value, &at, "penalty")?;
        let lr = cfg.lr_at(t);
        let h = AdamHyper {
            lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            step: t as u64 + 1,
        };
        let moments = tensors_mut(&mut state.m).zip(tensors_mut(&mut state.v));
        for (i, ((p, g), (m, v))) in tensors_mut(&mut state.lora)
            .zip(tensors_mut(&mut grads))
            .zip(moments)
            .enumerate()
        {
            let mut g_scale = clip_scale;
            let fused = penalty.and_then(|pen| pen.fused(i, cfg.lambda));
            if fused.is_none()
                && let Some(pg) = pen_grads.get(i)
            {
                // kfac: the step sees clip_scale * g + penalty gradient.
                be.scale(g, clip_scale)?;
                be.axpy(1.0, pg, g)?;
                g_scale = 1.0;
            }
            be.adamw_step(p, g, m, v, &h, g_scale, fused)?;
        }
        finite::check_devices(
            be,
            &[
                (&state.lora, "weights after the update"),
                (&state.m, "AdamW first moment"),
                (&state.v, "AdamW second moment"),
            ],
            &at,
        )?;
        state.step += 1;
        let secs = t0.elapsed().as_secs_f64();
        let metrics = StepMetrics {
            step: state.step,
            loss: loss_sum / n_targets.max(1) as f64,
            penalty: pen_value,
            lr,
            grad_norm: norm,
            tokens,
            tokens_per_s: tokens as f64 / secs.max(1e-9),
        };
        on_step(&metrics, state)?;
    }
    Ok(())
}
