//! The cost report (issue 9): wall time, tokens/s, peak resident memory and FLOPs of each
//! stage of a run: `curvature` (stage I), `train` (stage II) and `eval`.
//!
//! **FLOPs** are those of the matrix products, 2 per multiply-add, at the shapes the model
//! runs: a batch of `b` sequences padded to its longest, `T`, is `m = b T` rows. With `d`
//! the hidden size, `V` the vocabulary, `L` layers, `h` query heads of `hd` dimensions,
//! `P` the base projection weights (`L (d q + 2 d kv + q d + 3 d f)`: q, k, v, o, gate, up,
//! down), `R = sum_j r (d_in_j + d_out_j)` over the LoRA modules, and
//! `pairs = b T (T + 1) / 2` the causal (query, key) pairs of a sequence batch:
//! - forward body: `2 m P` (base projections) `+ 2 m R` (LoRA: `u = A x`, `B u`)
//!   `+ 4 L h hd pairs` (scores `q.k` and values `p v`, `2 hd` each per visible pair);
//! - LM head: `2 t d V` per product over the vocabulary, `t` the batch's labelled rows
//!   (the positions with a next-token target; the classifier skips the others): one for
//!   a loss (evaluation), two for a loss and its gradient (training, empirical Fisher),
//!   four with Monte-Carlo labels (the extra sweeps for the normaliser and the draw;
//!   `Backend::classifier`);
//! - backward body to the activations (the base weights are frozen: no weight gradients):
//!   `2 m P + 2 m R + 8 L h hd pairs` (`dx = dy W`; LoRA `gA = s g B`, `dx += gA A`;
//!   attention `dV`, `dP`, `dQ`, `dK`), plus `2 m R` for the LoRA weight gradients
//!   (`dA = gA^T x`, `dB = s g^T u`) when training;
//! - evaluation batch: forward body + 1 head product;
//! - training step: per micro-batch forward body + 2 head products + backward with LoRA
//!   gradients, then the penalty: `diag` none (elementwise, fused into AdamW); `kfac` per
//!   module `2 r d_in (r + d_in) + 2 r d_out (d_out + r)` (`G_A D_A C_A`, `G_B D_B C_B`);
//!   `kfac-tri` adds `2 r^2 (d_in + d_out) + 4 r d_in d_out` (`G_AB D_B C_AB^T`,
//!   `G_AB^T D_A C_AB`);
//! - curvature batch (`k` Monte-Carlo samples, 1 for the empirical Fisher; `p` real
//!   positions, `n` sequences): forward body + `k` x (head products + backward without
//!   weight gradients + the output-side sums) + the input-side sums once. `diag`: per
//!   module `2 p r (d_in + d_out)` per sample (`G_n^T X_n`, per sequence, then squared).
//!   `kfac`, expand: per sample `2 p (r^2 + d_out^2)` (`G_A`, `G_B`), once
//!   `2 p d_in^2` per shared input (q/k/v share one, gate/up one) `+ 2 p r^2` per module
//!   (`C_B`); reduce: the same with the `n` per-sequence rows for `p`. `kfac-tri` adds
//!   `2 p r d_out` per sample and `2 p d_in r` once (`G_AB`, `C_AB`). Each Gram `X^T Y`
//!   is counted in full, `2 p d_x d_y`, though symmetric ones compute a triangle.
//!
//! Excluded: elementwise and reduction work (norms, RoPE, SwiGLU, softmax, the loss,
//! AdamW, the diagonal penalty, squaring, segment sums), `O(m d)` against the products'
//! `O(m d^2)`; and text generation (exact match), whose time is in the evaluation's wall
//! time. `tests/cost.rs` counts the products of every `Backend` call on the tiny model and
//! checks these formulas against them exactly; `tests/flop_reference.rs` holds the
//! evaluation and training formulas to PyTorch's `FlopCounterMode` on HF + PEFT
//! (`scripts/check-flops.py`), equal once its dense attention count is brought to the
//! causal pairs.
//!
//! **Tokens** are the real (non-padding) positions run through the model; `tokens_per_s`
//! divides them by the stage's wall time.
//!
//! **Peak resident memory**: the kernel's high-water mark `VmHWM` is reset at the start of
//! each stage (`/proc/self/clear_refs`, Linux >= 4.0), after the allocator has returned its
//! free pages (`malloc_trim`), and read at its end, so the figure is the stage's own peak
//! (`peak_rss_scope: "stage"`). Where the reset is refused, it is the
//! process's peak so far, `getrusage` `ru_maxrss` (`"process"`): a later stage then shows
//! at least an earlier one's peak.
//!
//! **Device memory** (CUDA; `device_peak_mib`, absent on the CPU): the most the backend held
//! at once during the stage, the sum of its live allocations (`Backend::device_memory`,
//! its peak reset at the stage's start), the model's weights included; not cuBLAS's
//! workspace, the CUDA context or what the stream-ordered pool keeps cached beyond it.

use std::time::Instant;

use serde::Serialize;

use crate::backend::Backend;
use crate::curvature::accumulate::input_group;
use crate::curvature::{Fisher, KfacApprox, Scheme, Spec};
use crate::data::{Batch, Example, batches, batches_by_length};
use crate::model::LoraWeights;
use crate::model::config::LlamaConfig;
use crate::train::TrainConfig;
use crate::train::trainer::DataOrder;

/// What one stage cost.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageCost {
    /// `curvature`, `train` or `eval`.
    pub stage: String,
    pub wall_s: f64,
    /// Real (non-padding) tokens run through the model.
    pub tokens: u64,
    pub tokens_per_s: f64,
    /// Matrix-product FLOPs (module docs).
    pub flops: u64,
    pub peak_rss_mib: f64,
    /// `stage` (the stage's own peak) or `process` (the process's peak so far).
    pub peak_rss_scope: &'static str,
    /// The stage's peak of device memory held (CUDA only; module docs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_peak_mib: Option<f64>,
}

impl StageCost {
    /// `train: 12.3 s, 456 tokens/s, peak RSS 789 MiB (stage), 1.23 GFLOP (0.10 GFLOP/s)`
    pub fn line(&self) -> String {
        let device = match self.device_peak_mib {
            Some(m) => format!(", device peak {m:.0} MiB"),
            None => String::new(),
        };
        format!(
            "{}: {:.1} s, {:.0} tokens/s, peak RSS {:.0} MiB ({}){device}, {:.3} GFLOP ({:.2} GFLOP/s)",
            self.stage,
            self.wall_s,
            self.tokens_per_s,
            self.peak_rss_mib,
            self.peak_rss_scope,
            self.flops as f64 / 1e9,
            self.flops as f64 / 1e9 / self.wall_s.max(1e-9)
        )
    }
}

/// The sweep's costs beyond its runs' (`results.json` `"cost"`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepCost {
    /// Stage I, when it ran in the same command (`demo`).
    pub curvature: Option<StageCost>,
    /// What the penalty keeps on the device beside plain LoRA (`Curvature::value_bytes`).
    pub penalty_state_bytes: Option<u64>,
}

/// Times one stage and measures its peak memory; tokens and FLOPs are added as counted.
pub struct Meter {
    stage: &'static str,
    t0: Instant,
    scope: &'static str,
}

impl Meter {
    pub fn start<B: Backend>(stage: &'static str, be: &B) -> Self {
        be.reset_device_peak();
        // The CPU backend keeps freed memory resident for the next step
        // (`cpu::keep_freed_memory`): hand it back first, or this stage's peak would count
        // what earlier stages freed. One re-fault per stage, not per step.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free pages of the allocator's heaps.
        unsafe {
            libc::malloc_trim(0);
        }
        // "5" resets the peak to the present resident set (proc(5), clear_refs).
        let scope = match std::fs::write("/proc/self/clear_refs", "5") {
            Ok(()) => "stage",
            Err(_) => "process",
        };
        Meter {
            stage,
            t0: Instant::now(),
            scope,
        }
    }

    /// The stage's cost, given the tokens it ran and their FLOPs.
    pub fn finish<B: Backend>(self, tokens: u64, flops: u64, be: &B) -> StageCost {
        let wall_s = self.t0.elapsed().as_secs_f64();
        let (peak_kib, scope) = match (self.scope, vm_hwm_kib()) {
            ("stage", Some(k)) => (k, "stage"),
            _ => (max_rss_kib(), "process"),
        };
        StageCost {
            stage: self.stage.to_string(),
            wall_s,
            tokens,
            tokens_per_s: tokens as f64 / wall_s.max(1e-9),
            flops,
            peak_rss_mib: peak_kib as f64 / 1024.0,
            peak_rss_scope: scope,
            device_peak_mib: be
                .device_memory()
                .map(|(_, peak)| peak as f64 / (1u64 << 20) as f64),
        }
    }
}

/// `VmHWM` of /proc/self/status in KiB: the peak resident set since the last reset.
fn vm_hwm_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The process's peak resident set in KiB (`ru_maxrss` is in KiB on Linux).
fn max_rss_kib() -> u64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } == 0 {
        u.ru_maxrss.max(0) as u64
    } else {
        0
    }
}

/// The FLOP counts of the module docs for one model and LoRA configuration.
pub struct Flops {
    layers: u64,
    hidden: u64,
    vocab: u64,
    heads: u64,
    head_dim: u64,
    /// Base projection weights over all layers (`P`).
    proj_params: u64,
    rank: u64,
    /// `(layer, input group, d_in, d_out)` per LoRA module, in order.
    modules: Vec<(usize, usize, u64, u64)>,
}

impl Flops {
    pub fn new<T>(cfg: &LlamaConfig, lora: &LoraWeights<T>) -> Self {
        let (d, q, kv, f) = (
            cfg.hidden_size as u64,
            cfg.q_dim() as u64,
            cfg.kv_dim() as u64,
            cfg.intermediate_size as u64,
        );
        Flops {
            layers: cfg.num_layers as u64,
            hidden: d,
            vocab: cfg.vocab_size as u64,
            heads: cfg.num_heads as u64,
            head_dim: cfg.head_dim as u64,
            proj_params: cfg.num_layers as u64 * (d * q + 2 * d * kv + q * d + 3 * d * f),
            rank: lora.cfg.r as u64,
            modules: lora
                .modules
                .iter()
                .map(|m| (m.layer, input_group(m.proj), m.d_in as u64, m.d_out as u64))
                .collect(),
        }
    }

    /// `R = sum_j r (d_in_j + d_out_j)`.
    fn lora_r(&self) -> u64 {
        self.modules.iter().map(|m| self.rank * (m.2 + m.3)).sum()
    }

    /// `L h hd pairs` for a `(b, T)` batch.
    fn attn(&self, b: &Batch) -> u64 {
        let (n, t) = (b.batch as u64, b.seq_len as u64);
        self.layers * self.heads * self.head_dim * n * t * (t + 1) / 2
    }

    fn rows(b: &Batch) -> u64 {
        b.rows() as u64
    }

    fn forward_body(&self, b: &Batch) -> u64 {
        let m = Self::rows(b);
        2 * m * self.proj_params + 2 * m * self.lora_r() + 4 * self.attn(b)
    }

    fn backward_body(&self, b: &Batch, lora_grads: bool) -> u64 {
        let m = Self::rows(b);
        let lora = if lora_grads { 4 } else { 2 };
        2 * m * self.proj_params + lora * m * self.lora_r() + 8 * self.attn(b)
    }

    /// The head's products run over the batch's labelled rows only: the classifier
    /// skips the others (`Backend::classifier`).
    fn head(&self, b: &Batch, products: u64) -> u64 {
        2 * b.n_targets as u64 * self.hidden * self.vocab * products
    }

    /// One evaluation batch (losses only).
    pub fn eval_batch(&self, b: &Batch) -> u64 {
        self.forward_body(b) + self.head(b, 1)
    }

    /// One training micro-batch: loss and LoRA gradients.
    pub fn train_batch(&self, b: &Batch) -> u64 {
        self.forward_body(b) + self.head(b, 2) + self.backward_body(b, true)
    }

    /// The penalty's products per step for a curvature of `scheme` (none for diag).
    pub fn penalty_step(&self, scheme: Scheme) -> u64 {
        if scheme == Scheme::Diag {
            return 0;
        }
        let r = self.rank;
        self.modules
            .iter()
            .map(|&(_, _, din, dout)| {
                let kfac = 2 * r * din * (r + din) + 2 * r * dout * (dout + r);
                let cross = match scheme {
                    Scheme::KfacTri => 2 * r * r * (din + dout) + 4 * r * din * dout,
                    _ => 0,
                };
                kfac + cross
            })
            .sum()
    }

    /// One curvature batch under `spec`.
    pub fn curvature_batch(&self, b: &Batch, spec: &Spec) -> u64 {
        let (samples, head) = match spec.fisher {
            Fisher::Empirical => (1, 2),
            Fisher::Mc(k) => (k as u64, 4),
        };
        let rows = match spec.approx {
            KfacApprox::Expand => b.segments.iter().map(|s| s.len as u64).sum::<u64>(),
            KfacApprox::Reduce => b.segments.len() as u64,
        };
        let r = self.rank;
        let cross = spec.scheme == Scheme::KfacTri;
        let (mut per_sample, mut once) = (0u64, 0u64);
        for (i, &(layer, group, din, dout)) in self.modules.iter().enumerate() {
            match spec.scheme {
                Scheme::Diag => {
                    let p: u64 = b.segments.iter().map(|s| s.len as u64).sum();
                    per_sample += 2 * p * r * (din + dout);
                }
                Scheme::Kfac | Scheme::KfacTri => {
                    per_sample += 2 * rows * (r * r + dout * dout);
                    let owner = self.modules[..i]
                        .iter()
                        .all(|&(l, g, _, _)| (l, g) != (layer, group));
                    if owner {
                        once += 2 * rows * din * din;
                    }
                    once += 2 * rows * r * r;
                    if cross {
                        per_sample += 2 * rows * r * dout;
                        once += 2 * rows * din * r;
                    }
                }
            }
        }
        self.forward_body(b)
            + samples * (self.head(b, head) + self.backward_body(b, false) + per_sample)
            + once
    }

    /// Real tokens and FLOPs of evaluating `examples` in batches of `batch_size` (taken
    /// shortest first, as evaluation takes them).
    pub fn evaluation(&self, examples: &[Example], batch_size: usize) -> (u64, u64) {
        batches_by_length(examples, batch_size).fold((0, 0), |(t, f), (_, b)| {
            (t + tokens(&b), f + self.eval_batch(&b))
        })
    }

    /// Real tokens and FLOPs of the curvature estimate on `examples`.
    pub fn curvature(&self, examples: &[Example], batch_size: usize, spec: &Spec) -> (u64, u64) {
        batches(examples, batch_size).fold((0, 0), |(t, f), b| {
            (t + tokens(&b), f + self.curvature_batch(&b, spec))
        })
    }

    /// Real tokens and FLOPs of training steps `from..to` (0-based) with the trainer's data
    /// order, with the penalty of a curvature of scheme `penalty` when `cfg.lambda > 0`.
    pub fn training(
        &self,
        data: &[Example],
        cfg: &TrainConfig,
        penalty: Option<Scheme>,
        from: usize,
        to: usize,
    ) -> (u64, u64) {
        if data.is_empty() {
            return (0, 0);
        }
        let penalty = match penalty {
            Some(scheme) if cfg.lambda > 0.0 => self.penalty_step(scheme),
            _ => 0,
        };
        let mut order = DataOrder::new(data.len(), cfg.seed);
        let per_step = cfg.batch_size * cfg.grad_accum;
        let (mut tok, mut flops) = (0, 0);
        for t in from..to {
            for j in 0..cfg.grad_accum {
                let idx = order.take(t * per_step + j * cfg.batch_size, cfg.batch_size);
                let b = Batch::new(&idx.iter().map(|&i| &data[i]).collect::<Vec<_>>());
                tok += tokens(&b);
                flops += self.train_batch(&b);
            }
            flops += penalty;
        }
        (tok, flops)
    }
}

fn tokens(b: &Batch) -> u64 {
    b.segments.iter().map(|s| s.len as u64).sum()
}

/// One part of the cost table: stage I (named, when it ran) and the runs that share it.
pub struct CostBlock<'a> {
    pub curvature: Option<(String, &'a StageCost)>,
    /// `(name, lambda, stages)` per run.
    pub runs: Vec<(String, Option<f32>, &'a [StageCost])>,
}

/// The cost table of `results.md`: one line per stage of each run, each block's curvature
/// first, with each training run's wall time over plain LoRA's (λ = 0) of the same block:
/// what the penalty adds. `penalty_state_bytes`: what the penalty keeps, per LoRA shape
/// (named; a single unnamed one for a plain sweep).
pub fn markdown(blocks: &[CostBlock<'_>], penalty_state_bytes: &[(String, u64)]) -> String {
    let mut s = String::from(
        "| run | stage | wall s | tokens/s | peak RSS MiB | GFLOP | GFLOP/s | train time / λ=0 |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let line = |run: &str, c: &StageCost, ratio: String| {
        format!(
            "| {run} | {} | {:.1} | {:.0} | {:.0} | {:.3} | {:.2} | {ratio} |\n",
            c.stage,
            c.wall_s,
            c.tokens_per_s,
            c.peak_rss_mib,
            c.flops as f64 / 1e9,
            c.flops as f64 / 1e9 / c.wall_s.max(1e-9)
        )
    };
    for b in blocks {
        let lora_train = b
            .runs
            .iter()
            .find(|(_, l, _)| *l == Some(0.0))
            .and_then(|(_, _, c)| c.iter().find(|x| x.stage == "train"))
            .map(|c| c.wall_s);
        if let Some((name, c)) = &b.curvature {
            s += &line(name, c, String::new());
        }
        for (name, _, stages) in &b.runs {
            for c in *stages {
                let ratio = match (c.stage.as_str(), lora_train) {
                    ("train", Some(w)) => format!("{:.3}", c.wall_s / w.max(1e-9)),
                    _ => String::new(),
                };
                s += &line(name, c, ratio);
            }
        }
    }
    let scope = blocks
        .iter()
        .flat_map(|b| {
            let runs = b.runs.iter().flat_map(|(_, _, c)| c.iter());
            runs.chain(b.curvature.as_ref().map(|(_, c)| *c))
        })
        .any(|c| c.peak_rss_scope == "process");
    s += "\n(FLOPs: matrix products only, as `src/cost.rs` states; tokens: real, not padding; ";
    s += if scope {
        "peak RSS: the process's peak so far, as the kernel would not reset it per stage"
    } else {
        "peak RSS: each stage's own peak"
    };
    let mib = |b: u64| format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0));
    match penalty_state_bytes {
        [] => {}
        [(name, b)] if name.is_empty() => {
            s += &format!(
                "; the penalty keeps θ* and the curvature, {}, on the device beside plain LoRA",
                mib(*b)
            )
        }
        shapes => {
            let each: Vec<String> = shapes
                .iter()
                .map(|(name, b)| format!("{name} {}", mib(*b)))
                .collect();
            s += &format!(
                "; the penalty keeps θ* and the curvature on the device beside plain LoRA: {}",
                each.join(", ")
            )
        }
    }
    s + ")\n"
}
