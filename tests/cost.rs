//! The cost report's FLOP formulas (`src/cost.rs`) against a count of what the model
//! actually asks of the backend: `Count` wraps the CPU backend and adds up the products of
//! every call from its shapes (a product `(m, k) x (k, n)` is `2 m k n`; attention counts
//! the visible (query, key) pairs of each call's shape). The evaluation, training (plain,
//! diag, kfac, kfac-tri penalties, gradient accumulation) and curvature (every scheme,
//! both approximations, empirical and Monte-Carlo) FLOPs of the analytic formulas must
//! equal the counted ones exactly, on sequences of unequal lengths (padding) and with
//! LoRA on all projections and on q/v only.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use lalora_engine::Result;
use lalora_engine::backend::group::GradFeeds;
use lalora_engine::backend::{
    AttnSaved, AttnShape, Backend, CeTargets, ClassifierOut, LoraDims, RopeTable, Segment,
};

struct Count<'a, B: Backend> {
    inner: &'a B,
    flops: AtomicUsize,
}

impl<'a, B: Backend> Count<'a, B> {
    fn new(inner: &'a B) -> Self {
        Count {
            inner,
            flops: AtomicUsize::new(0),
        }
    }
    fn add(&self, n: usize) {
        self.flops.fetch_add(n, Ordering::Relaxed);
    }
    /// The FLOPs counted so far, leaving zero.
    fn take(&self) -> u64 {
        self.flops.swap(0, Ordering::Relaxed) as u64
    }
}

/// Query-key pairs a causal attention call computes, over all query heads: query `i` sees
/// keys `0..=q_offset + i` of the `tk` present.
fn visible_pairs(s: &AttnShape) -> usize {
    let per_seq: usize = (0..s.tq).map(|i| (s.q_offset + i + 1).min(s.tk)).sum();
    s.batch * s.n_heads * per_seq
}

fn rows(segments: &[Segment]) -> usize {
    segments.iter().map(|s| s.len).sum()
}

impl<B: Backend> Backend for Count<'_, B> {
    type Buf = B::Buf;
    type Weight = B::Weight;

    /// The head products as `Backend::classifier` documents them, over the rows with a
    /// target (the others are skipped): one for the losses, one more for the gradient, two
    /// more to draw Monte-Carlo labels.
    fn classifier(
        &self,
        hidden: &B::Buf,
        head: &B::Weight,
        rows: usize,
        dim: usize,
        vocab: usize,
        targets: CeTargets<'_>,
        grad_scale: Option<f32>,
    ) -> Result<ClassifierOut<B::Buf>> {
        let (sampled, tg) = match targets {
            CeTargets::Labels(t) => (false, t),
            CeTargets::Sample { mask, .. } => (true, mask),
        };
        let active = tg.iter().filter(|&&t| t >= 0).count();
        assert!(active < rows, "the batches have rows without a target");
        let products = 1 + usize::from(grad_scale.is_some()) + 2 * usize::from(sampled);
        self.add(2 * active * dim * vocab * products);
        self.inner
            .classifier(hidden, head, rows, dim, vocab, targets, grad_scale)
    }

    fn linear(&self, x: &B::Buf, w: &B::Weight, m: usize, k: usize, n: usize) -> Result<B::Buf> {
        self.add(2 * m * k * n);
        self.inner.linear(x, w, m, k, n)
    }
    fn linear_backward(
        &self,
        dy: &B::Buf,
        w: &B::Weight,
        m: usize,
        k: usize,
        n: usize,
        dx: &mut B::Buf,
        accumulate: bool,
    ) -> Result<()> {
        self.add(2 * m * k * n);
        self.inner.linear_backward(dy, w, m, k, n, dx, accumulate)
    }
    fn lora_forward(
        &self,
        x: &B::Buf,
        a: &B::Buf,
        b: &B::Buf,
        dims: LoraDims,
        y: &mut B::Buf,
    ) -> Result<B::Buf> {
        self.add(2 * dims.m * dims.r * (dims.d_in + dims.d_out));
        self.inner.lora_forward(x, a, b, dims, y)
    }
    fn lora_backward(
        &self,
        g: &B::Buf,
        x: &B::Buf,
        u: &B::Buf,
        a: &B::Buf,
        b: &B::Buf,
        dims: LoraDims,
        dx: &mut B::Buf,
        grads: Option<(&mut B::Buf, &mut B::Buf)>,
    ) -> Result<B::Buf> {
        self.add(
            2 * dims.m * dims.r * (dims.d_in + dims.d_out) * if grads.is_some() { 2 } else { 1 },
        );
        self.inner.lora_backward(g, x, u, a, b, dims, dx, grads)
    }
    fn attention(
        &self,
        q: &B::Buf,
        k: &B::Buf,
        v: &B::Buf,
        s: &AttnShape,
    ) -> Result<(B::Buf, AttnSaved<B::Buf>)> {
        self.add(4 * visible_pairs(s) * s.head_dim);
        self.inner.attention(q, k, v, s)
    }
    fn attention_backward(
        &self,
        dout: &B::Buf,
        q: &B::Buf,
        k: &B::Buf,
        v: &B::Buf,
        out: &B::Buf,
        saved: &AttnSaved<B::Buf>,
        rope: Option<&RopeTable<B::Buf>>,
        feeds: GradFeeds,
        s: &AttnShape,
    ) -> Result<(B::Buf, B::Buf, B::Buf)> {
        self.add(8 * visible_pairs(s) * s.head_dim);
        self.inner
            .attention_backward(dout, q, k, v, out, saved, rope, feeds, s)
    }
    fn gram_accumulate(
        &self,
        x: &B::Buf,
        dx: usize,
        y: &B::Buf,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut B::Buf,
    ) -> Result<()> {
        self.add(2 * rows(segments) * dx * dy);
        self.inner
            .gram_accumulate(x, dx, y, dy, segments, alpha, out)
    }
    fn sq_grad_accumulate(
        &self,
        g: &B::Buf,
        dg: usize,
        y: &B::Buf,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut B::Buf,
    ) -> Result<()> {
        self.add(2 * rows(segments) * dg * dy);
        self.inner
            .sq_grad_accumulate(g, dg, y, dy, segments, alpha, out)
    }
    fn matmul(
        &self,
        a: &B::Buf,
        b: &B::Buf,
        m: usize,
        k: usize,
        n: usize,
        ta: bool,
        tb: bool,
    ) -> Result<B::Buf> {
        self.add(2 * m * k * n);
        self.inner.matmul(a, b, m, k, n, ta, tb)
    }

    // Everything else is forwarded unchanged; `project_group` keeps the trait's default
    // (`linear` + `lora_forward`, counted above), and so does `gram_accumulate_upper` (the
    // whole `gram_accumulate`, counted above: the FLOP count is that of the full product).
    lalora_engine::delegate_backend!(B;
        cross_entropy, describe, device_memory, reset_device_peak, buf, zeros, to_host, take_host, weight, weight_stored, copy_into, slice, embedding,
        rmsnorm, add_rmsnorm, rmsnorm_backward, rope, swiglu, swiglu_backward, add_assign,
        segment_sum, dup, mul_assign, scale, axpy, dot, dots, adamw_step, attention_dout,
        mirror_upper,
    );
}

use lalora_engine::backend::cpu::CpuBackend;
use lalora_engine::backend::cuda::{BaseDtype, CudaBackend};
use lalora_engine::cost::{Flops, Meter};
use lalora_engine::curvature::{Curvature, Fisher, KfacApprox, Scheme, Spec, estimate};
use lalora_engine::data::Example;
use lalora_engine::eval::perplexity::sequence_losses;
use lalora_engine::model::{HostLora, LoraConfig, LoraWeights, Proj};
use lalora_engine::train::session::{self, SessionOptions};
use lalora_engine::train::{Penalty, TrainConfig};

/// The fixture's sequences cut to unequal lengths, so that batches are padded.
fn uneven(t: &Tiny) -> Vec<Example> {
    t.examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let n = e.ids.len() - 3 * i;
            Example {
                ids: e.ids[..n].to_vec(),
                labels: e.labels[..n].to_vec(),
            }
        })
        .collect()
}

/// The fixture's adapter (all seven projections) and a q/v-only one (inputs shared
/// differently: one q/k/v input factor for two modules).
fn adapters(t: &Tiny) -> Vec<HostLora> {
    let qv = LoraConfig {
        r: 4,
        alpha: 8.0,
        use_rslora: false,
        targets: vec![Proj::Q, Proj::V],
    };
    vec![t.adapter.clone(), HostLora::init(&t.loaded.cfg, qv, 3)]
}

fn curvature_of(be: &CpuBackend, lora: &HostLora, ex: &[Example], spec: Spec) -> Curvature {
    let model = tiny_model(be);
    let w = lora.map(|v| be.buf(v.clone())).unwrap();
    estimate(be, &model, &w, ex, 4, spec, || {}).unwrap()
}

fn spec(scheme: Scheme, fisher: Fisher, approx: KfacApprox) -> Spec {
    Spec {
        scheme,
        fisher,
        approx,
        seed: 5,
    }
}

#[test]
fn evaluation_flops_equal_the_counted_products() {
    let t = tiny();
    let ex = uneven(&t);
    let be = cpu();
    let c = Count::new(&be);
    let model = tiny_model(&c);
    for lora in adapters(&t) {
        let w = lora.map(|v| c.buf(v.clone())).unwrap();
        for batch in [1, 4, 6] {
            c.take();
            sequence_losses(&c, &model, Some(&w), &ex, batch, || {}).unwrap();
            let counted = c.take();
            let (tokens, flops) = Flops::new(&t.loaded.cfg, &lora).evaluation(&ex, batch);
            assert_eq!(
                flops,
                counted,
                "batch {batch}, {} modules",
                lora.modules.len()
            );
            let real: usize = ex.iter().map(|e| e.ids.len()).sum();
            assert_eq!(tokens, real as u64);
        }
    }
    // The base model: no adapter, no LoRA products.
    for batch in [1, 4, 6] {
        c.take();
        sequence_losses(&c, &model, None, &ex, batch, || {}).unwrap();
        let counted = c.take();
        let (_, flops) =
            Flops::new(&t.loaded.cfg, &LoraWeights::<()>::none()).evaluation(&ex, batch);
        assert_eq!(flops, counted, "base model, batch {batch}");
    }
}

#[test]
fn training_flops_equal_the_counted_products() {
    let t = tiny();
    let ex = uneven(&t);
    let be = cpu();
    let c = Count::new(&be);
    let model = tiny_model(&c);
    let empirical = |s| spec(s, Fisher::Empirical, KfacApprox::Expand);
    for lora in adapters(&t) {
        let flops = Flops::new(&t.loaded.cfg, &lora);
        let curvatures: Vec<(f32, Option<Curvature>)> = vec![
            (0.0, None),
            (
                10.0,
                Some(curvature_of(&be, &lora, &ex, empirical(Scheme::Diag))),
            ),
            (
                10.0,
                Some(curvature_of(&be, &lora, &ex, empirical(Scheme::Kfac))),
            ),
            (
                10.0,
                Some(curvature_of(&be, &lora, &ex, empirical(Scheme::KfacTri))),
            ),
        ];
        for (lambda, curv) in &curvatures {
            // 3 steps of 2 x 2 sequences: 12 draws from 6 sequences, two epochs.
            let cfg = TrainConfig {
                steps: 3,
                batch_size: 2,
                grad_accum: 2,
                lambda: *lambda,
                seed: 9,
                ..TrainConfig::default()
            };
            let opts = SessionOptions {
                quiet: true,
                ..SessionOptions::default()
            };
            let penalty = curv
                .as_ref()
                .map(|k| Penalty::new(&c, k.clone(), cfg.delta).unwrap());
            c.take();
            let r = session::run(&c, &model, &ex, &cfg, penalty.as_ref(), &lora, &opts).unwrap();
            let counted = c.take();
            let scheme = curv.as_ref().map(|k| k.meta.scheme);
            let (tokens, analytic) = flops.training(&ex, &cfg, scheme, 0, cfg.steps);
            assert_eq!(
                analytic,
                counted,
                "{scheme:?}, {} modules",
                lora.modules.len()
            );
            let trained: usize = r.metrics.iter().map(|m| m.tokens).sum();
            assert_eq!(tokens, trained as u64, "tokens as the trainer counts them");
            if let Some(k) = curv.as_ref().filter(|k| k.kfac.is_some()) {
                assert!(
                    flops.penalty_step(k.meta.scheme) > 0,
                    "the kfac penalty has products"
                );
            }
        }
    }
}

#[test]
fn curvature_flops_equal_the_counted_products() {
    let t = tiny();
    let ex = uneven(&t);
    let be = cpu();
    let c = Count::new(&be);
    let model = tiny_model(&c);
    for lora in adapters(&t) {
        let flops = Flops::new(&t.loaded.cfg, &lora);
        let w = lora.map(|v| c.buf(v.clone())).unwrap();
        for scheme in [Scheme::Diag, Scheme::Kfac, Scheme::KfacTri] {
            for fisher in [Fisher::Empirical, Fisher::Mc(2)] {
                for approx in [KfacApprox::Expand, KfacApprox::Reduce] {
                    let s = spec(scheme, fisher, approx);
                    c.take();
                    estimate(&c, &model, &w, &ex, 4, s, || {}).unwrap();
                    let counted = c.take();
                    let (_, analytic) = flops.curvature(&ex, 4, &s);
                    assert_eq!(
                        analytic,
                        counted,
                        "{scheme} {fisher:?} {approx:?}, {} modules",
                        lora.modules.len()
                    );
                }
            }
        }
    }
}

#[test]
fn meter_sees_a_stage_allocation_and_divides_tokens_by_time() {
    let cpu = CpuBackend::new(1);
    let m = Meter::start("probe", &cpu);
    let block = vec![1u8; 64 << 20];
    std::hint::black_box(&block);
    let c = m.finish(1000, 2_000_000, &cpu);
    assert_eq!(c.stage, "probe");
    assert!(c.wall_s > 0.0);
    assert!((c.tokens_per_s - 1000.0 / c.wall_s).abs() <= 1e-9 * c.tokens_per_s);
    // The 64 MiB block was resident during the stage, whichever scope the peak has.
    assert!(c.peak_rss_mib >= 64.0, "{c:?}");
    assert_eq!(c.flops, 2_000_000);
    assert_eq!(c.device_peak_mib, None, "the CPU holds no device memory");
}

/// On a device the stage's peak of device memory: what it held at the start (kept) plus
/// the most it allocated at once during the stage, not what an earlier stage peaked at.
#[test]
fn meter_reports_the_device_peak_of_the_stage() {
    let g = CudaBackend::sim(1, BaseDtype::Bf16).unwrap();
    let kept = g.zeros(1 << 18).unwrap(); // 1 MiB held throughout
    let earlier = g.zeros(3 << 18).unwrap(); // 3 MiB, freed before the stage
    drop(earlier);
    let m = Meter::start("probe", &g);
    let a = g.zeros(1 << 19).unwrap(); // 2 MiB during the stage
    drop(a);
    let c = m.finish(1, 1, &g);
    assert_eq!(c.device_peak_mib, Some(3.0), "{c:?}");
    assert!(c.line().contains("device peak 3 MiB"), "{}", c.line());
    drop(kept);
}

/// `train` and `curvature` report their cost: in `--json`, in `cost.json` beside
/// `metrics.jsonl` (which keeps one step per line), and with the tokens the run counted.
#[test]
fn train_and_curvature_commands_report_their_cost() {
    let d = tempfile::tempdir().unwrap();
    let f = fixture("tiny-gqa");
    let run = |args: &[&str]| -> serde_json::Value {
        let o = bin()
            .args(args)
            .args(["--quiet", "--json", "--device", "cpu", "--threads", "2"])
            .arg("--model")
            .arg(f.join("model"))
            .arg("--data")
            .arg(f.join("batch.jsonl"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let out = d.path().join("run");
    let j = run(&[
        "train",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--rank",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    let cost = &j["cost"][0];
    assert_eq!(cost["stage"], "train");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(steps.len(), 3, "one line per step, nothing else");
    let tokens: u64 = steps.iter().map(|s| s["tokens"].as_u64().unwrap()).sum();
    assert_eq!(cost["tokens"].as_u64(), Some(tokens));
    assert!(cost["flops"].as_u64().unwrap() > 0 && cost["peak_rss_mib"].as_f64().unwrap() > 0.0);
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("cost.json")).unwrap()).unwrap();
    assert_eq!(file["cost"], j["cost"]);

    let c = d.path().join("c.safetensors");
    let j = run(&[
        "curvature",
        "--scheme",
        "kfac",
        "--rank",
        "4",
        "--out",
        c.to_str().unwrap(),
    ]);
    let cost = &j["cost"][0];
    assert_eq!(cost["stage"], "curvature");
    assert_eq!(cost["tokens"], j["n_positions"]);
    assert!(cost["flops"].as_u64().unwrap() > 0);
    // The estimator in full, as the file's metadata has it.
    assert_eq!(
        (&j["scheme"], &j["fisher"], &j["approx"], &j["mc_samples"]),
        (
            &"kfac".into(),
            &"empirical".into(),
            &"expand".into(),
            &serde_json::Value::Null
        )
    );
    let j = run(&[
        "curvature",
        "--fisher",
        "mc",
        "--mc-samples",
        "2",
        "--rank",
        "4",
        "--out",
        c.to_str().unwrap(),
    ]);
    assert_eq!(
        (&j["scheme"], &j["fisher"], &j["approx"], &j["mc_samples"]),
        (
            &"diag".into(),
            &"mc".into(),
            &serde_json::Value::Null,
            &2.into()
        )
    );
}

/// `sweep` records each run's training and evaluation cost in results.json and the cost
/// table of results.md; the kfac penalty's products make up the difference between a
/// penalised run's training FLOPs and plain LoRA's.
#[test]
fn sweep_reports_each_runs_cost() {
    let d = tempfile::tempdir().unwrap();
    let f = fixture("tiny-gqa");
    let common = [
        "--quiet",
        "--device",
        "cpu",
        "--threads",
        "2",
        "--rank",
        "4",
    ];
    let c = d.path().join("c.safetensors");
    let data = f.join("batch.jsonl");
    let o = bin()
        .args(["curvature", "--scheme", "kfac", "--model"])
        .arg(f.join("model"))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&c)
        .args(common)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = d.path().join("sweep");
    let o = bin()
        .args([
            "sweep",
            "--lambdas",
            "0,10",
            "--steps",
            "2",
            "--batch-size",
            "2",
        ])
        .arg("--model")
        .arg(f.join("model"))
        .arg("--data")
        .arg(&data)
        .arg("--curvature")
        .arg(&c)
        .arg("--target-eval")
        .arg(&data)
        .arg("--source-eval")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args(common)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let stages = |i: usize| -> Vec<String> {
        r["rows"][i]["cost"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["stage"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(stages(0), ["eval"]);
    assert_eq!(stages(1), ["train", "eval"]);
    assert_eq!(stages(2), ["train", "eval"]);
    let train_flops = |i: usize| r["rows"][i]["cost"][0]["flops"].as_u64().unwrap();
    let t = tiny();
    let curv = Curvature::read_for(&c, &t.loaded).unwrap();
    let flops = Flops::new(&t.loaded.cfg, &curv.mean);
    assert_eq!(
        train_flops(2) - train_flops(1),
        2 * flops.penalty_step(curv.meta.scheme)
    );
    // Both evaluation sets are the fixture's 6 sequences, in batches of 2: the base model
    // runs no LoRA products, each run runs its adapter's.
    let eval =
        |lora: &LoraWeights<_>| 2 * Flops::new(&t.loaded.cfg, lora).evaluation(&t.examples, 2).1;
    let (base, run) = (
        eval(&LoraWeights::<()>::none()),
        eval(&curv.mean.map(|_| Ok(())).unwrap()),
    );
    assert!(run > base);
    assert_eq!(
        r["rows"][0]["cost"][0]["flops"], base,
        "the base model's evaluation"
    );
    for i in [1, 2] {
        assert_eq!(
            r["rows"][i]["cost"][1]["flops"], run,
            "run {i}'s evaluation"
        );
    }
    // The kfac penalty keeps θ* (A and B) and four f32 factors per module: A's input and
    // output sides (d_in², r²), B's (r², d_out²).
    let r4 = curv.mean.cfg.r;
    let kept: usize = curv
        .mean
        .modules
        .iter()
        .map(|m| r4 * (m.d_in + m.d_out) + m.d_in * m.d_in + 2 * r4 * r4 + m.d_out * m.d_out)
        .sum();
    assert_eq!(
        curv.mean.modules.len(),
        14,
        "seven projections in two layers"
    );
    assert_eq!(r["cost"]["penalty_state_bytes"], 4 * kept as u64);
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("| run | stage | wall s |"), "{md}");
    assert!(md.contains("| 0 (LoRA) | train |"), "{md}");
}
