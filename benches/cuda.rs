//! CUDA benchmarks: the hand-written kernels against the plain cuBLAS sequences and SIMT
//! kernels they replace, and end to end on a Llama-3.2-1B-shaped model with random
//! weights (batch 8 x 1024, issue 8's shape): training step, diag and KFAC curvature
//! passes; the fused classifier against materialised logits. The PyTorch + PEFT bf16 peer is
//! benches/peers/torch_peft_cuda_step.py.
//!
//! Every bench explains itself: it prints a `work:` line with its FLOPs and bytes per call
//! (counted from the shapes, benches/common/roofline.rs says how), and on a GPU, after
//! criterion has measured everything, one `roofline:` line per bench with criterion's
//! median, the achieved TFLOP/s and TB/s and their fractions of the H200's ceilings.
//! Criterion's own `thrpt:` lines come from the same counts: elements are FLOPs (Gelem/s
//! is GFLOP/s), bytes the counted bytes (in binary units: GiB/s).
//!
//! Without a GPU the same bench functions run on the PTX simulator (`--device sim`) at
//! small shapes, each variant once, its outputs checked against the CPU backend: a
//! correctness check, not a speed figure (nothing is timed). With `--list` (as
//! scripts/gpu-check.sh --build-only calls it) nothing runs.

#[path = "cuda/attention.rs"]
mod attention;
#[path = "cuda/classifier.rs"]
mod classifier;
#[path = "cuda/curvature.rs"]
mod curvature;
#[path = "cuda/end_to_end.rs"]
mod end_to_end;
#[path = "cuda/harness.rs"]
mod harness;
#[path = "cuda/lora.rs"]
mod lora;
#[path = "common/roofline.rs"]
mod roofline;
#[path = "cuda/shapes.rs"]
mod shapes;
#[path = "cuda/tilings.rs"]
mod tilings;

use std::cell::RefCell;
use std::rc::Rc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lalora_engine::backend::cpu::CpuBackend;
use lalora_engine::backend::cuda::runtime::DType;
use lalora_engine::backend::cuda::{
    self, Act, BaseDtype, CudaBackend, DevBuf, GramGemm, LoraGemmTiling, ProjectionGemm,
};
use lalora_engine::backend::group::{Feeds, GradFeeds, LoraBwd, LoraGroup, ProjBwd, ProjFwd};
use lalora_engine::backend::{AttnShape, Backend, CLASSIFIER_CHUNK, CeTargets, LoraDims, Segment};
use lalora_engine::curvature::{
    Accumulator, Curvature, Fisher, KfacApprox, Scheme, Spec, accumulate_batch, estimate, read_out,
};
use lalora_engine::data::{Batch, Example};
use lalora_engine::model::config::LlamaConfig;
use lalora_engine::model::weights::{HostLayer, HostWeights};
use lalora_engine::model::{HostLora, Llama, LoraConfig, Proj};
use lalora_engine::train::accumulate_gradients;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use roofline::{Report, Work};

use attention::attention;
use classifier::classifier;
use curvature::{diag, kfac};
use end_to_end::end_to_end;
use harness::{
    Call, F32_BOUND, Group, Mode, Outs, PASS_BOUND, TC_BOUND, Variant, down, rnd, stored_act,
    with_grams, with_path,
};
use lora::{lora, lora_group};
use shapes::{Shapes, gpu_shapes, sim_shapes};

/// The GPU shapes' counts, printed where they do not run (no device): what each bench will
/// be measured against.
fn gpu_work() {
    let sh = gpu_shapes();
    let d = sh.lora;
    let (gm, gd, go, gr) = sh.group;
    let (n_seg, len) = sh.diag;
    let (rows, dk) = sh.kfac;
    let s = sh.attn;
    let (bsz, seq) = sh.step;
    let attn = |name| {
        format!(
            "cuda_attention_{}x{}_h{}_kv{}_d{}_{name}",
            s.batch, s.tq, s.n_heads, s.n_kv_heads, s.head_dim
        )
    };
    let rows_ = [
        (
            format!("cuda_lora_{}x{}_r{} [forward_*]", d.m, d.d_in, d.r),
            roofline::lora_forward(d),
        ),
        (
            format!("cuda_lora_{}x{}_r{} [backward_*]", d.m, d.d_in, d.r),
            roofline::lora_backward(d),
        ),
        (
            format!(
                "cuda_lora_qkv_{gm}x{gd}_o{}+{}+{}_r{gr} [forward_*]",
                go[0], go[1], go[2]
            ),
            roofline::lora_group_forward(gm, gd, &go, gr),
        ),
        (
            format!(
                "cuda_lora_qkv_{gm}x{gd}_o{}+{}+{}_r{gr} [backward_*]",
                go[0], go[1], go[2]
            ),
            roofline::lora_group_backward(gm, gd, &go, gr),
        ),
        (
            format!("cuda_diag_{n_seg}x{len}_r{}_d{}", d.r, d.d_in),
            roofline::sq_grad(n_seg * len, n_seg, d.r, d.d_in),
        ),
        (
            format!("cuda_kfac_factor_{rows}x{dk}"),
            roofline::gram(rows, dk, dk, true),
        ),
        (
            format!("cuda_kfac_cross_{rows}x{dk}x{dk}"),
            roofline::gram(rows, dk, dk, false),
        ),
        (attn("forward"), roofline::attention_forward(&s)),
        (
            attn("forward_backward"),
            roofline::attention_forward_backward(&s),
        ),
        (
            format!(
                "cuda_classifier_{}x{}x{}",
                sh.classifier.0, sh.classifier.1, sh.classifier.2
            ),
            roofline::classifier(sh.classifier.0, sh.classifier.1, sh.classifier.2),
        ),
        (
            format!("cuda_llama1b_shape_{bsz}x{seq} [lora_forward_backward]"),
            roofline::llama_step(&sh.model, 16, bsz, seq),
        ),
        (
            format!("cuda_llama1b_shape_{bsz}x{seq} [curvature_*]"),
            roofline::curvature_pass(&sh.model, 16, bsz, seq),
        ),
    ];
    for (name, w) in rows_ {
        eprintln!(
            "work (GPU shape, counted, not run here): {name}: {}",
            roofline::describe(&w)
        );
    }
}

fn all(mode: &mut Mode, g: &CudaBackend, sh: &Shapes) {
    lora(mode, g, sh);
    lora_group(mode, g, sh);
    tilings::lora_gemm_tilings(mode, g, sh);
    diag(mode, g, sh);
    kfac(mode, g, sh);
    attention(mode, g, sh);
    classifier(mode, g, sh);
    end_to_end(mode, g, sh);
}

fn benches(c: &mut Criterion) {
    // `--list` (scripts/gpu-check.sh --build-only calls it): names only, nothing run.
    let listing = std::env::args().any(|a| a == "--list");
    if cuda::available() {
        let g = CudaBackend::new(0, BaseDtype::Bf16).expect("the CUDA device initialises");
        eprintln!("device: {}", g.describe());
        let mut report = Report::default();
        all(&mut Mode::Gpu(c, &mut report), &g, &gpu_shapes());
        if !listing {
            report.print();
        }
        return;
    }
    assert!(
        std::env::var("LALORA_REQUIRE_GPU").as_deref() != Ok("1"),
        "LALORA_REQUIRE_GPU=1 but no CUDA device is usable"
    );
    if listing {
        return;
    }
    let g = CudaBackend::sim(0, BaseDtype::Bf16).expect("the simulator starts");
    eprintln!(
        "no CUDA device: the same benches on the PTX simulator at small shapes, each variant once, checked against the CPU backend"
    );
    eprintln!("simulator: correctness only, not a speed figure (nothing is timed)");
    eprintln!("device: {}", g.describe());
    gpu_work();
    let start = std::time::Instant::now();
    let mut mode = Mode::Sim { checked: 0 };
    all(&mut mode, &g, &sim_shapes());
    let Mode::Sim { checked } = mode else {
        unreachable!()
    };
    eprintln!(
        "simulator: {checked} bench variants checked against the CPU backend in {:.0} s (correctness only, not a speed figure)",
        start.elapsed().as_secs_f64()
    );
}

criterion_group!(cuda_benches, benches);
criterion_main!(cuda_benches);
