//! What each CUDA bench does, counted from its shapes (FLOPs and bytes per call), and what
//! fraction of the H200's ceilings a measured time makes of it. Times come from
//! criterion's own estimates (`<criterion home>/<group>/<bench>/new/estimates.json`, its
//! median), never from a clock of our own.
//!
//! Conventions:
//! - FLOPs are the useful ones: 2 per multiply-add of the products that define the
//!   operation; elementwise work (scales, squares, softmax) is left out unless it says so.
//!   A kernel that does less (symmetric upper tiles, causal tile skipping) still gets the
//!   whole operation's count; one that does more (recomputation) gets no credit for it.
//! - Bytes are the compulsory traffic: each input read once, each output written once, an
//!   accumulated output (`out += ...`) read and written once. Intermediates that a path
//!   round-trips through memory (the cuBLAS sequences' `u`, the materialised scores) are
//!   not counted, so for those paths the TB/s figure is a lower bound on what they moved.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::SystemTime;

use lalora_engine::backend::{AttnShape, LoraDims};
use lalora_engine::model::Proj;
use lalora_engine::model::config::LlamaConfig;

/// The H200's dense bf16 tensor-core ceiling: issue 8's 790 TFLOP/s, which is what an
/// 8192 x 8192 x 8192 bf16 matrix product through PyTorch reached on random data on the
/// lent H200 machines (788 TFLOP/s on 2026-10-28, 769 to 798 on 2026-11-04, as the notes
/// kept on those machines record; the datasheet's dense figure is about 990). Not measured
/// by this project.
pub const PEAK_BF16_FLOPS: f64 = 790e12;

/// The H200's memory ceiling: issue 8's 4.3 TB/s, a device-to-device copy through PyTorch
/// counting bytes read and written (8.6 GB in 2.0 ms), as recorded in the same device
/// notes for both runtimes (the datasheet says 4.8 TB/s). Not measured by this project.
pub const COPY_BYTES_PER_S: f64 = 4.3e12;

/// f32 activations, LoRA weights, outputs: the buffers these benches pass are f32.
const F32: u64 = 4;
/// bf16 base weights.
const BF16: u64 = 2;

#[derive(Clone, Copy, Debug)]
pub struct Work {
    pub flops: u64,
    pub bytes: u64,
    /// What the counts leave out, when that makes them lower bounds.
    pub note: &'static str,
}

impl Work {
    fn new(flops: u64, bytes: u64) -> Self {
        Work {
            flops,
            bytes,
            note: "",
        }
    }
    pub fn noted(self, note: &'static str) -> Work {
        Work { note, ..self }
    }
    /// FLOP per byte.
    pub fn intensity(&self) -> f64 {
        self.flops as f64 / self.bytes as f64
    }
}

fn u(x: usize) -> u64 {
    x as u64
}

/// `u = x A^T` (m, r), `y += s u B^T` (m, d_out).
/// FLOPs: 2 m d_in r for `u`, 2 m r d_out for `u B^T`.
/// Bytes: read x (m d_in), A (r d_in), B (d_out r); y read and written (2 m d_out);
/// u written (m r: it is the forward's output, kept for the backward).
pub fn lora_forward(d: LoraDims) -> Work {
    let (m, di, r, dout) = (u(d.m), u(d.d_in), u(d.r), u(d.d_out));
    Work::new(
        2 * m * di * r + 2 * m * r * dout,
        F32 * (m * di + r * di + dout * r + 2 * m * dout + m * r),
    )
}

/// With `g` (m, d_out): `gA = s g B` (m, r), `dx += gA A` (m, d_in), `dA += gA^T x`
/// (r, d_in), `dB += s g^T u` (d_out, r).
/// FLOPs: 2 m d_out r + 2 m r d_in + 2 r m d_in + 2 d_out m r = 4 m r (d_in + d_out).
/// Bytes: read g (m d_out), x (m d_in), u (m r), A, B; dx, dA, dB read and written; gA
/// written (m r: returned).
pub fn lora_backward(d: LoraDims) -> Work {
    let (m, di, r, dout) = (u(d.m), u(d.d_in), u(d.r), u(d.d_out));
    Work::new(
        4 * m * r * (di + dout),
        F32 * (m * dout + m * di + m * r + r * di + dout * r)
            + F32 * 2 * (m * di + r * di + dout * r)
            + F32 * m * r,
    )
}

/// A projection group (q/k/v, gate/up) reading `x (m, d_in)`, every projection adapted at
/// rank r: `u_p = x A_p^T`, `y_p = x W_p^T + s u_p B_p^T`, with `D = sum_p d_out_p`.
/// FLOPs: 2 m d_in D (base) + 2 m d_in r P (the u_p) + 2 m r D (the low-rank update).
/// Bytes, x as the model stores it with bf16 base weights: read x (bf16) once, the bf16
/// W_p, the f32 A_p and B_p; write y_p and u_p (f32).
pub fn lora_group_forward(m: usize, d_in: usize, d_outs: &[usize], r: usize) -> Work {
    let (m, di, r, p) = (u(m), u(d_in), u(r), u(d_outs.len()));
    let d: u64 = d_outs.iter().map(|&o| u(o)).sum();
    Work::new(
        2 * m * di * d + 2 * m * di * r * p + 2 * m * r * d,
        BF16 * m * di + BF16 * d * di + F32 * r * (p * di + d) + F32 * (m * d + m * r * p),
    )
}

/// Its backward with `g_p (m, d_out_p)`: `gA_p = s g_p B_p`,
/// `dx += sum_p g_p W_p + gA_p A_p`, `dA_p += gA_p^T x`, `dB_p += s g_p^T u_p`.
/// FLOPs: 2 m D d_in (base), 2 m r D (gA), 2 m r d_in P (gA A), 2 m r d_in P (dA) and
/// 2 m r D (dB).
/// Bytes: read g_p and x (bf16, as the model stores them), u_p, W_p (bf16), A_p, B_p;
/// dx (f32), dA_p, dB_p read and written; gA_p written.
pub fn lora_group_backward(m: usize, d_in: usize, d_outs: &[usize], r: usize) -> Work {
    let (m, di, r, p) = (u(m), u(d_in), u(r), u(d_outs.len()));
    let d: u64 = d_outs.iter().map(|&o| u(o)).sum();
    Work::new(
        2 * m * d * di + 4 * m * r * d + 4 * m * r * di * p,
        BF16 * (m * d + m * di)
            + F32 * m * r * p
            + BF16 * d * di
            + F32 * 3 * r * (p * di + d)
            + F32 * 2 * m * di
            + F32 * m * r * p,
    )
}

/// The projection groups of one Llama layer as (d_in, output widths): q/k/v, o, gate/up,
/// down.
pub fn layer_groups(cfg: &LlamaConfig) -> [(usize, Vec<usize>); 4] {
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    [
        (h, vec![q, kv, kv]),
        (q, vec![h]),
        (h, vec![f, f]),
        (f, vec![h]),
    ]
}

/// One layer's projections (`layer_groups`), every one adapted at rank r, forward and
/// backward over m rows: the sum of `lora_group_forward` and `lora_group_backward` over the
/// groups. (Their bytes take every x and g as bf16; the model keeps o's input and the
/// residual gradients of o and down in f32, so the bytes are a slight undercount.)
pub fn lora_layer(cfg: &LlamaConfig, m: usize, r: usize) -> Work {
    let (mut flops, mut bytes) = (0, 0);
    for (d_in, outs) in layer_groups(cfg) {
        for w in [
            lora_group_forward(m, d_in, &outs, r),
            lora_group_backward(m, d_in, &outs, r),
        ] {
            flops += w.flops;
            bytes += w.bytes;
        }
    }
    Work::new(flops, bytes)
}

/// The diagonal Fisher block `out += alpha sum_n (G_n^T Y_n)^2` over `n_seg` sequences of
/// `rows` positions in all, G (rows, dg), Y (rows, dy).
/// FLOPs: 2 rows dg dy for the per-sequence products (they partition the rows), plus
/// 2 n_seg dg dy for squaring and accumulating each sequence's block.
/// Bytes: read G (rows dg) and Y (rows dy); out read and written (2 dg dy).
pub fn sq_grad(rows: usize, n_seg: usize, dg: usize, dy: usize) -> Work {
    let (rows, n, dg, dy) = (u(rows), u(n_seg), u(dg), u(dy));
    Work::new(
        2 * rows * dg * dy + 2 * n * dg * dy,
        F32 * (rows * dg + rows * dy + 2 * dg * dy),
    )
}

/// A KFAC factor `out += alpha X^T Y`, X (rows, dx), Y (rows, dy); `symmetric` when Y is X.
/// FLOPs: 2 rows dx dy, the whole product even where a kernel computes the upper tiles
/// only (a symmetric kernel's saving shows as a higher fraction of the peak).
/// Bytes: read X (rows dx), and Y (rows dy) unless it is X; out read and written (2 dx dy).
pub fn gram(rows: usize, dx: usize, dy: usize, symmetric: bool) -> Work {
    let (rows, dx, dy) = (u(rows), u(dx), u(dy));
    let inputs = if symmetric {
        rows * dx
    } else {
        rows * (dx + dy)
    };
    Work::new(2 * rows * dx * dy, F32 * (inputs + 2 * dx * dy))
}

/// The (query, key) pairs causal attention scores: query i (at position q_offset + i)
/// sees keys 0..=q_offset + i, at most tk; per batch row and head.
fn causal_pairs(s: &AttnShape) -> u64 {
    let per_head: usize = (0..s.tq).map(|i| (s.q_offset + i + 1).min(s.tk)).sum();
    u(s.batch * s.n_heads * per_head)
}

/// The LM head with its loss and gradient (`Backend::classifier`): `z = h W^T` over the
/// vocabulary, softmax cross-entropy, `dhidden = s (softmax - onehot) W`.
/// FLOPs: the two head products, 2 rows dim vocab each (softmax not counted; the
/// materialised path does the same two, the fused one no recompute).
/// Bytes: read h (rows dim) and the bf16 head (vocab dim) once; write dhidden (rows dim)
/// and the losses (rows). The materialised logits and dlogits (rows vocab f32 each,
/// written and read) are not counted, nor the fused path's second read of the head.
pub fn classifier(rows: usize, dim: usize, vocab: usize) -> Work {
    let (rows, dim, vocab) = (u(rows), u(dim), u(vocab));
    Work::new(
        4 * rows * dim * vocab,
        F32 * (2 * rows * dim + rows) + BF16 * vocab * dim,
    )
    .noted("intermediates and the head's second read not counted")
}

/// Causal attention forward. FLOPs: the two products, S = Q K^T and O = P V, each 2
/// head_dim per (query, key) pair: 4 head_dim pairs (softmax not counted).
/// Bytes: read q (batch tq heads hd), k and v (batch tk kv_heads hd each); write out
/// (like q) and the row log-sum-exps (batch heads tq; the materialised path writes its
/// probabilities instead, not counted).
pub fn attention_forward(s: &AttnShape) -> Work {
    let hd = u(s.head_dim);
    let qn = u(s.batch * s.tq * s.n_heads * s.head_dim);
    let kn = u(s.batch * s.tk * s.n_kv_heads * s.head_dim);
    Work::new(
        4 * hd * causal_pairs(s),
        F32 * (qn + 2 * kn + qn + u(s.rows_len())),
    )
}

/// Forward then backward. FLOPs: the backward's five products (S recomputed, dV = P^T dO,
/// dP = dO V^T, dQ = dS K, dK = dS^T Q) are 2.5 times the forward's two, as in the flash
/// attention papers: 3.5 times the forward in all.
/// Bytes: the forward's, plus the backward's reads of dout, q, k, v, out, lse and writes of
/// dq, dk, dv.
pub fn attention_forward_backward(s: &AttnShape) -> Work {
    let f = attention_forward(s);
    let qn = u(s.batch * s.tq * s.n_heads * s.head_dim);
    let kn = u(s.batch * s.tk * s.n_kv_heads * s.head_dim);
    let bwd_bytes = F32 * (qn + qn + 2 * kn + qn + u(s.rows_len())) + F32 * (qn + 2 * kn);
    Work::new(f.flops * 7 / 2, f.bytes + bwd_bytes)
}

/// A LoRA training step's forward + backward (frozen base weights) on `bsz` sequences of
/// `seq` tokens, LoRA rank `r` on all seven projections of every layer.
/// FLOPs per token, per projection (d_in, d_out): the base product 2 d_in d_out forward
/// and 2 d_in d_out backward (dx only: no base-weight gradient), LoRA 2 r (d_in + d_out)
/// forward and 4 r (d_in + d_out) backward (`lora_forward`, `lora_backward`); the LM head
/// (hidden x vocab) 2 h V forward and 2 h V backward; plus each layer's causal attention
/// (`attention_forward_backward`). Norms, RoPE, SwiGLU, softmax and cross-entropy are not
/// counted.
/// Bytes: the bf16 base weights (projections and LM head) read once in the forward and
/// once in the backward; activations are not counted (a lower bound).
pub fn llama_step(cfg: &LlamaConfig, r: usize, bsz: usize, seq: usize) -> Work {
    let tokens = u(bsz * seq);
    let (r, h, v) = (u(r), u(cfg.hidden_size), u(cfg.vocab_size));
    let mut per_token = 0;
    let mut params = 0;
    for p in Proj::ALL {
        let (di, dout) = p.dims(cfg);
        let (di, dout) = (u(di), u(dout));
        per_token += 4 * di * dout + 6 * r * (di + dout);
        params += di * dout;
    }
    per_token *= u(cfg.num_layers);
    params *= u(cfg.num_layers);
    per_token += 4 * h * v;
    params += h * v;
    let attn = attention_forward_backward(&AttnShape {
        batch: bsz,
        tq: seq,
        tk: seq,
        tk_stride: seq,
        n_heads: cfg.num_heads,
        n_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        q_offset: 0,
    });
    Work::new(
        tokens * per_token + u(cfg.num_layers) * attn.flops,
        2 * BF16 * params,
    )
    .noted("lower bounds: activations' bytes not counted")
}

/// A curvature pass: at least the step's forward + backward; the curvature products
/// themselves are not counted.
pub fn curvature_pass(cfg: &LlamaConfig, r: usize, bsz: usize, seq: usize) -> Work {
    llama_step(cfg, r, bsz, seq)
        .noted("lower bounds: the step's forward + backward only, curvature products and activations not counted")
}

pub fn describe(w: &Work) -> String {
    format!(
        "{} FLOP ({:.3} GFLOP), {} bytes ({:.3} MB) per call, {:.1} FLOP/byte{}",
        w.flops,
        w.flops as f64 / 1e9,
        w.bytes,
        w.bytes as f64 / 1e6,
        w.intensity(),
        if w.note.is_empty() {
            String::new()
        } else {
            format!(" ({})", w.note)
        }
    )
}

/// `x` to 3 significant digits (at least one decimal).
fn sig(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let digits = (2 - x.abs().log10().floor() as i32).max(1) as usize;
    format!("{x:.digits$}")
}

/// Criterion's output folder, found as criterion 0.8 finds it: $CRITERION_HOME, else
/// $CARGO_TARGET_DIR/criterion, else (under cargo) the target directory `cargo metadata`
/// names, else ./target/criterion.
fn criterion_home() -> PathBuf {
    if let Some(v) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(v);
    }
    if let Some(v) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(v).join("criterion");
    }
    if let Some(cargo) = std::env::var_os("CARGO") {
        let out = std::process::Command::new(cargo)
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .output();
        if let Ok(out) = out
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            && let Some(t) = v["target_directory"].as_str()
        {
            return PathBuf::from(t).join("criterion");
        }
    }
    PathBuf::from("target/criterion")
}

/// The benches measured in this process, reported at the end from criterion's estimates.
pub struct Report {
    start: SystemTime,
    rows: Vec<(String, String, Work)>,
}

impl Default for Report {
    fn default() -> Self {
        Report {
            start: SystemTime::now(),
            rows: Vec::new(),
        }
    }
}

impl Report {
    pub fn add(&mut self, group: &str, bench: &str, work: Work) {
        self.rows.push((group.into(), bench.into(), work));
    }

    /// Criterion's median (ns) for `group/bench`, if this process wrote it.
    fn median_ns(&self, home: &std::path::Path, group: &str, bench: &str) -> Option<f64> {
        let p = home.join(group).join(bench).join("new/estimates.json");
        let fresh = std::fs::metadata(&p).ok()?.modified().ok()? >= self.start;
        if !fresh {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).ok()?).ok()?;
        v["median"]["point_estimate"].as_f64().filter(|t| *t > 0.0)
    }

    /// One `roofline:` line per bench: criterion's median time, the achieved rates and
    /// their fractions of the ceilings; then a count of those measured.
    pub fn print(&self) {
        let home = criterion_home();
        eprintln!(
            "roofline: ceilings {:.0} TFLOP/s (H200 bf16 dense tensor, issue 8's figure: the lent machine's bf16 GEMM) and {:.1} TB/s (copy bandwidth seen on the lent machine); times are criterion's medians from {}",
            PEAK_BF16_FLOPS / 1e12,
            COPY_BYTES_PER_S / 1e12,
            home.display()
        );
        let mut measured = 0;
        for (group, bench, w) in &self.rows {
            let Some(ns) = self.median_ns(&home, group, bench) else {
                eprintln!(
                    "roofline: {group}/{bench}: not measured in this run (no estimates.json from this process)"
                );
                continue;
            };
            measured += 1;
            let s = ns * 1e-9;
            let (flops, bytes) = (w.flops as f64 / s, w.bytes as f64 / s);
            eprintln!(
                "roofline: {group}/{bench}: median {} ms; {} TFLOP/s = {}% of {:.0}; {} TB/s = {}% of {:.1}{}",
                sig(ns / 1e6),
                sig(flops / 1e12),
                sig(100.0 * flops / PEAK_BF16_FLOPS),
                PEAK_BF16_FLOPS / 1e12,
                sig(bytes / 1e12),
                sig(100.0 * bytes / COPY_BYTES_PER_S),
                COPY_BYTES_PER_S / 1e12,
                if w.note.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", w.note)
                }
            );
        }
        eprintln!(
            "roofline: {measured} of {} benches measured",
            self.rows.len()
        );
    }
}
