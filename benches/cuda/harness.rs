//! What every CUDA bench shares: a group of variants, run by criterion on a GPU or once
//! each on the simulator and checked against the CPU backend, and the checks' bounds.

use super::*;

pub(crate) fn rnd(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

/// Relative error bounds of the simulator checks against the CPU backend (those of
/// tests/cuda_vs_cpu.rs): f32 kernels and f32 cuBLAS products agree to ~1e-4; tensor-core
/// kernels on the bf16 engine (tf32 or bf16 operands) and anything through the bf16 base
/// weights to ~1e-2; whole passes through bf16 base weights to 5e-2.
pub(crate) const F32_BOUND: f64 = 1e-4;
pub(crate) const TC_BOUND: f64 = 1e-2;
pub(crate) const PASS_BOUND: f64 = 5e-2;

/// `||a - b|| / ||b||`.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Named host outputs of one call.
pub(crate) type Outs = Vec<(&'static str, Vec<f32>)>;

/// One call of an op on the device.
pub(crate) type Call<'a> = Rc<dyn Fn() + 'a>;

/// One bench of a group: a call on the device (timed by criterion on a GPU) and, for the
/// simulator, how to read back its outputs and what the CPU backend computes.
pub(crate) struct Variant<'a> {
    pub(crate) name: String,
    pub(crate) work: Work,
    pub(crate) call: Call<'a>,
    /// The outputs after one call from the reset state (simulator only).
    pub(crate) got: Rc<dyn Fn() -> Outs + 'a>,
    /// The CPU backend's outputs on the same inputs (empty on a GPU: not computed there).
    pub(crate) want: Rc<Outs>,
    pub(crate) bound: f64,
}

pub(crate) struct Group<'a> {
    pub(crate) name: String,
    pub(crate) sample_size: Option<usize>,
    /// Put the accumulated outputs back to their starting values (zeros).
    pub(crate) reset: Rc<dyn Fn() + 'a>,
    pub(crate) variants: Vec<Variant<'a>>,
}

/// `LALORA_KERNEL_TIMES=PATTERN`: after criterion has measured a group whose name contains
/// PATTERN (`all`: every group), one more call of each of its variants with every kernel
/// timed on the device, printed as a table (where a step's time goes, kernel by kernel).
fn kernel_times_for(group: &str) -> bool {
    match std::env::var("LALORA_KERNEL_TIMES") {
        Ok(p) => p == "all" || (!p.is_empty() && group.contains(&p)),
        Err(_) => false,
    }
}

/// `f` with the projection groups on `path` and the LoRA GEMM on `tiling`, the backend's
/// own settings restored after: the other variants, and a path or tiling the environment
/// chose (`LALORA_PROJECTION_GEMM`, `LALORA_LORA_GEMM_TILING`), run as they would have.
pub(crate) fn with_path<R>(
    g: &CudaBackend,
    path: ProjectionGemm,
    tiling: LoraGemmTiling,
    f: impl FnOnce() -> R,
) -> R {
    let before = (g.projection_gemm(), g.lora_gemm_tiling());
    g.set_projection_gemm(path);
    g.set_lora_gemm_tiling(tiling);
    let r = f();
    g.set_projection_gemm(before.0);
    g.set_lora_gemm_tiling(before.1);
    r
}

/// `f` with the bf16 Grams on `path` (`GramGemm`), the backend's own setting restored after.
pub(crate) fn with_grams<R>(g: &CudaBackend, path: GramGemm, f: impl FnOnce() -> R) -> R {
    let before = g.gram_gemm();
    g.set_gram_gemm(path);
    let r = f();
    g.set_gram_gemm(before);
    r
}

/// GPU: criterion times every variant; simulator: each runs once and is checked.
pub(crate) enum Mode<'c> {
    Gpu(&'c mut Criterion, &'c mut Report),
    Sim { checked: usize },
}

impl Mode<'_> {
    pub(crate) fn sim(&self) -> bool {
        matches!(self, Mode::Sim { .. })
    }

    pub(crate) fn run(&mut self, g: &CudaBackend, group: Group) {
        // One `work:` line per distinct count, naming the variants it is for when they differ.
        let mut seen: Vec<(u64, u64, &str)> = Vec::new();
        for v in &group.variants {
            let key = (v.work.flops, v.work.bytes, v.work.note);
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            let names: Vec<&str> = group
                .variants
                .iter()
                .filter(|w| (w.work.flops, w.work.bytes, w.work.note) == key)
                .map(|w| w.name.as_str())
                .collect();
            let which = if names.len() == group.variants.len() {
                String::new()
            } else {
                format!(" [{}]", names.join(", "))
            };
            eprintln!(
                "work: {}{which}: {}",
                group.name,
                roofline::describe(&v.work)
            );
        }
        match self {
            Mode::Gpu(c, report) => {
                let mut grp = c.benchmark_group(&group.name);
                if let Some(n) = group.sample_size {
                    grp.sample_size(n);
                }
                for v in &group.variants {
                    // criterion's own rates: elements = FLOPs, bytes = compulsory bytes.
                    grp.throughput(Throughput::ElementsAndBytes {
                        elements: v.work.flops,
                        bytes: v.work.bytes,
                    });
                    grp.bench_function(&v.name, |bn| {
                        bn.iter(|| {
                            (v.call)();
                            g.synchronize().unwrap()
                        })
                    });
                    report.add(&group.name, &v.name, v.work);
                }
                grp.finish();
                if kernel_times_for(&group.name) {
                    for v in &group.variants {
                        (group.reset)();
                        g.synchronize().unwrap();
                        g.reset_peak();
                        let before = g.memory().live;
                        g.time_kernels(true);
                        let started = std::time::Instant::now();
                        (v.call)();
                        g.synchronize().unwrap();
                        let wall = started.elapsed().as_secs_f64();
                        let times = g.kernel_times().unwrap();
                        g.time_kernels(false);
                        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
                        eprintln!(
                            "kernel times: {}/{}, one call:\n{}",
                            group.name,
                            v.name,
                            cuda::kernel_times::table(&times, 30, Some(wall))
                        );
                        eprintln!(
                            "device memory: {}/{}: peak {:.2} GiB held during the call ({:.2} GiB before it: the weights, inputs and the benches' buffers; allocations only, not cuBLAS's workspace or the context)",
                            group.name,
                            v.name,
                            gib(g.memory().peak),
                            gib(before)
                        );
                    }
                }
            }
            Mode::Sim { checked } => {
                for v in &group.variants {
                    (group.reset)();
                    (v.call)();
                    g.synchronize().unwrap();
                    let got = (v.got)();
                    assert_eq!(
                        got.len(),
                        v.want.len(),
                        "{}/{}: outputs",
                        group.name,
                        v.name
                    );
                    let mut worst = 0.0f64;
                    let mut parts = Vec::new();
                    for ((what, x), (_, y)) in got.iter().zip(v.want.iter()) {
                        let e = rel_err(x, y);
                        assert!(
                            e < v.bound,
                            "simulator check failed: {}/{} {what}: relative error {e:.2e} against the CPU backend (bound {:.0e})",
                            group.name,
                            v.name,
                            v.bound
                        );
                        worst = worst.max(e);
                        parts.push(format!("{what} {e:.1e}"));
                    }
                    eprintln!(
                        "sim check: {}/{}: ok, relative error vs CPU {} (bound {:.0e})",
                        group.name,
                        v.name,
                        parts.join(", "),
                        v.bound
                    );
                    *checked += 1;
                }
            }
        }
    }
}

/// A device buffer's values on the host.
pub(crate) fn down(g: &CudaBackend, b: &Act) -> Vec<f32> {
    g.to_host(b).unwrap()
}

/// `(rows, dim)` random values as the model stores an activation the projections read with
/// bf16 base weights (bf16: RMSNorm's output, unit weights; f32 with f32 base weights), and
/// the values it holds, for the CPU twin.
pub(crate) fn stored_act(
    g: &CudaBackend,
    rng: &mut ChaCha8Rng,
    rows: usize,
    dim: usize,
) -> (Act, Vec<f32>) {
    let ones = g.buf(vec![1.0; dim]).unwrap();
    let raw = g.buf(rnd(rng, rows * dim, 1.0)).unwrap();
    let (y, _) = g.rmsnorm(&raw, &ones, rows, dim, 1e-5).unwrap();
    let held = g.to_host(&y).unwrap();
    (y, held)
}
