//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use half::bf16;
use lalora_engine::backend::cpu::CpuBackend;
use lalora_engine::backend::cuda::kernel_times::KernelTime;
use lalora_engine::backend::cuda::runtime::DType;
use lalora_engine::backend::cuda::{Act, BaseDtype, CudaBackend};
use lalora_engine::backend::{Backend, RopeTable};
use lalora_engine::data::{Batch, Example, RowFormat, read_jsonl};
use lalora_engine::io::TensorFile;
use lalora_engine::model::{self, HostLora, Llama, LoadedModel};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

/// The repository root: `LALORA_ROOT` when test binaries run away from their build tree
/// (scripts/gpu-check.sh), else the crate directory.
pub fn root() -> PathBuf {
    std::env::var_os("LALORA_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// `||a - b|| / ||b||`.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

pub struct Tiny {
    pub loaded: LoadedModel,
    pub adapter: HostLora,
    pub examples: Vec<Example>,
    pub expected: TensorFile,
}

/// `n` values uniform in (-1, 1), shifted off zero.
pub fn rnd(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0 + 1e-3)
        .collect()
}

/// A RoPE table of `period` rows of `hd / 2` random angles in (-3, 3) (cos and sin of each,
/// so rotations keep lengths), on `be`; the host values are `table.cos`/`table.sin` there.
pub fn rope_table<B: Backend>(
    be: &B,
    rng: &mut ChaCha8Rng,
    period: usize,
    hd: usize,
) -> (Vec<f32>, Vec<f32>, RopeTable<B::Buf>) {
    let angles: Vec<f32> = rnd(rng, period * hd / 2).iter().map(|a| 3.0 * a).collect();
    let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
    let table = RopeTable {
        cos: be.buf(cos.clone()).unwrap(),
        sin: be.buf(sin.clone()).unwrap(),
        period,
    };
    (cos, sin, table)
}

/// Fails with `what` when the relative error of `got` against `want` reaches `tol`.
/// Bit for bit.
pub fn same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}: element {i}: {a} vs {b}");
    }
}

/// The relative bound of products whose operands are rounded to tf32 (11 significant
/// bits: 2^-11 relative each, so about 1e-3 for a product), as the tensor-core Grams of
/// the bf16 engine compute them.
pub const TF32: f64 = 1e-3;

pub fn close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    assert!(e < tol, "{what}: relative error {e:e} (bound {tol:e})");
}

pub fn tiny() -> Tiny {
    let loaded = model::load(&fixture("tiny-gqa/model"), None).expect("tiny model loads");
    let adapter = HostLora::load(&fixture("tiny-gqa/adapter"), &loaded.cfg).expect("adapter loads");
    let examples = read_jsonl(
        &fixture("tiny-gqa/batch.jsonl"),
        Err(lalora_engine::Error::usage("the fixture is pre-tokenized")),
        loaded.cfg.vocab_size,
        RowFormat { max_len: 1024 },
    )
    .expect("batch reads");
    let expected =
        TensorFile::read(&fixture("tiny-gqa/expected.safetensors")).expect("expected reads");
    Tiny {
        loaded,
        adapter,
        examples,
        expected,
    }
}

pub fn cpu() -> CpuBackend {
    CpuBackend::new(2)
}

pub fn tiny_model<B: Backend>(be: &B) -> Llama<B> {
    let w = model::load(&fixture("tiny-gqa/model"), None).expect("tiny model loads");
    Llama::new(be, w.cfg, w.weights).expect("model builds")
}

/// The CUDA backend on the PTX simulator (all checks on), base weights in `base`.
pub fn sim(base: BaseDtype) -> CudaBackend {
    CudaBackend::sim(2, base).expect("the simulator starts")
}

/// The relative-error bound of a backend against the f32 references: f32 everywhere on
/// the CPU and with f32 base weights; bf16 base weights round every GEMM input to 8 bits
/// of mantissa (about 4e-3 relative per element), which sums to about 1e-2 over a layer.
pub fn bound(base: Option<BaseDtype>) -> f64 {
    match base {
        Some(BaseDtype::Bf16) => 2e-2,
        _ => 1e-4,
    }
}

pub fn whole_batch(ex: &[Example]) -> Batch {
    Batch::new(&ex.iter().collect::<Vec<_>>())
}

/// The names in `dir`, sorted.
pub fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The engine binary built alongside the tests.
pub fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_lalora-engine"))
}

/// Held by every test of a binary that spawns a child, and by every test that reopens an
/// output directory it has just closed. A child between fork and exec holds a copy of each
/// descriptor of this process, the output directory's `flock`ed one included, so a
/// directory dropped by one test thread can still read as "in use by another lalora-engine
/// run" while another thread spawns (it failed so once in tests/crash.rs under CI's load).
/// The tests that run children also need the two cores to themselves for their timing.
pub fn one_child_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE_CHILD_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE_CHILD_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// `curvature` on the CPU on the tiny GQA fixture (its batch as the data) with `flags`,
/// writing `out`.
pub fn tiny_curvature(out: &std::path::Path, flags: &[&str]) -> std::process::Command {
    let f = fixture("tiny-gqa");
    let mut c = bin();
    c.args(["curvature", "--device", "cpu"])
        .args(flags)
        .arg("--model")
        .arg(f.join("model"))
        .arg("--data")
        .arg(f.join("batch.jsonl"))
        .arg("--out")
        .arg(out);
    c
}

/// The fetched default assets (`scripts/fetch-assets.sh`); `ASSETS_DIR` overrides.
pub fn assets() -> PathBuf {
    let dir = std::env::var_os("ASSETS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("assets"));
    assert!(
        dir.join("SmolLM2-135M-Instruct.Q4_1.gguf").exists(),
        "{}: assets missing; run scripts/fetch-assets.sh first",
        dir.display()
    );
    dir
}

pub fn smollm2() -> PathBuf {
    assets().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The command succeeded; `what` names it in the failure, with its stderr.
pub fn ok(o: &std::process::Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A one-line error naming `needle`, exit 2.
pub fn refused(o: &std::process::Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(needle), "`{needle}` not in: {err}");
}

/// The `--json` summary on stdout.
pub fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).expect("stdout is JSON")
}

/// The trained rows of a sweep's report (the base row left out).
pub fn trained(rep: &serde_json::Value) -> Vec<&serde_json::Value> {
    rep["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| !r["lambda"].is_null())
        .collect()
}

/// A bf16 activation `(rows, dim)` as the model makes one (the output of RMSNorm) and the
/// values it holds, for the CPU twin.
pub fn bf16_act(g: &CudaBackend, rng: &mut ChaCha8Rng, rows: usize, dim: usize) -> (Act, Vec<f32>) {
    let (x, w) = (rnd(rng, rows * dim), rnd(rng, dim));
    let (y, _) = g
        .rmsnorm(&g.buf(x).unwrap(), &g.buf(w).unwrap(), rows, dim, 1e-5)
        .unwrap();
    assert_eq!(y.dtype(), DType::Bf16, "bf16 base weights store y as bf16");
    let host = g.to_host(&y).unwrap();
    assert!(
        host.iter().all(|&v| bf16::from_f32(v).to_f32() == v),
        "to_host widens bf16 exactly"
    );
    (y, host)
}

/// `f`'s result, and the kernels and cuBLAS call shapes it ran on `g`, each timed
/// (`CudaBackend::kernel_times`: names and call counts, the longest first).
pub fn timed<R>(g: &CudaBackend, f: impl FnOnce() -> R) -> (R, Vec<KernelTime>) {
    g.time_kernels(true);
    let r = f();
    g.time_kernels(false);
    (r, g.kernel_times().expect("the kernel times read back"))
}

/// The names of `timed`'s kernels.
pub fn kernel_names(times: &[KernelTime]) -> Vec<&str> {
    times.iter().map(|t| t.name.as_str()).collect()
}
